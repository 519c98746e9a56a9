//! Mutation fuzzing of every parser of untrusted input, on stable Rust.
//!
//! Each target starts from real, valid files (stories260K's `.bin` and `tok512.bin`, a GGUF
//! written here from stories260K, the header region of the SmolLM2 GGUF, the Hugging Face
//! fixtures' safetensors / config.json / tokenizer.json, a calibration statistics file, a
//! native quantized directory) and mutates them: bit flips, interesting integers written over
//! header fields (0, -1, 2^31, 2^63, the file length +-1...), truncation at every header
//! boundary, duplicated, deleted and inserted spans, and for JSON, structural edits (values
//! replaced by huge / negative / wrongly typed ones, duplicated keys, one node's value copied
//! over another, e.g. overlapping `data_offsets`, and nesting bombs thousands deep).
//!
//! Every case must end in `Ok` or `Err`: a panic fails the test (the input is saved under
//! `target/fuzz-failures/`), and a counting allocator aborts on any single allocation over
//! 1 GiB and checks each case's peak heap against the input's size.
//!
//! `cargo test --test fuzz` runs a quick subset (about a second per parser); `cargo xtask fuzz
//! --cases N` runs N cases per parser and prints cases per second. Environment:
//! `SQ_FUZZ_CASES` (cases per parser), `SQ_FUZZ_SECONDS` (time per parser when no count is
//! given, default 1), `SQ_FUZZ_SEED`, `SQ_FUZZ_TARGETS` (comma-separated names).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use smoothquant_rs::calib::{calibrate, CalibConfig, StatsTable};
use smoothquant_rs::model::gguf::GgufFile;
use smoothquant_rs::model::llama2c::load_llama2c_bytes;
use smoothquant_rs::model::loader::{build_model, from_raw};
use smoothquant_rs::model::native::load_native;
use smoothquant_rs::model::raw::{permute_interleaved_rope, RawModel};
use smoothquant_rs::model::tokenizer::{hf_tokenizer_from_gguf, HfTokenizer, Llama2cTokenizer};
use smoothquant_rs::model::Tokenizer;
use smoothquant_rs::smooth::{paper_groups, save_native, smooth_model, AlphaSpec, ExportInfo};
use smoothquant_rs::tensor::{save_safetensors, Checkpoint, SafetensorsFile, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Heap accounting

/// No single allocation may be larger than this while fuzzing.
const MAX_ALLOCATION: usize = 1 << 30;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicUsize = AtomicUsize::new(0);

fn oversize(size: usize) -> ! {
    // No allocation here: format the size into a stack buffer.
    let mut buf =
        *b"fuzz: an allocation of                     bytes was requested (limit 1 GiB)\n";
    let mut n = size;
    let mut i = 42;
    loop {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 23 {
            break;
        }
        i -= 1;
    }
    let _ = std::io::stderr().write_all(&buf);
    // Disarmed, the backtrace may allocate (the allocator is re-entered, which System allows).
    ARMED.store(0, Relaxed);
    eprintln!("{}", std::backtrace::Backtrace::force_capture());
    std::process::abort();
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Relaxed) != 0 && layout.size() > MAX_ALLOCATION {
            oversize(layout.size());
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Relaxed) != 0 && layout.size() > MAX_ALLOCATION {
            oversize(layout.size());
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Relaxed) != 0 && new_size > MAX_ALLOCATION {
            oversize(new_size);
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now =
                    LIVE.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Seeds and mutations

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Binary: mutations favour `hot` (the header) and the `marks` (field boundaries).
    Binary,
    /// A JSON document: structural edits or byte edits.
    Json,
    /// A safetensors file: structural edits of its JSON header (length fixed up), or bytes.
    Safetensors,
}

struct Seed {
    bytes: Vec<u8>,
    kind: Kind,
    /// Length of the header region.
    hot: usize,
    /// Offsets where header fields end.
    marks: Vec<usize>,
}

impl Seed {
    fn binary(bytes: Vec<u8>, hot: usize, marks: Vec<usize>) -> Seed {
        let hot = hot.min(bytes.len()).max(1);
        Seed {
            bytes,
            kind: Kind::Binary,
            hot,
            marks,
        }
    }
    fn json(bytes: Vec<u8>) -> Seed {
        let hot = bytes.len();
        Seed {
            bytes,
            kind: Kind::Json,
            hot,
            marks: vec![],
        }
    }
    fn safetensors(bytes: Vec<u8>) -> Seed {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut marks = vec![8, 8 + n];
        for v in header.values() {
            if let Some(o) = v.get("data_offsets").and_then(Value::as_array) {
                for x in o {
                    marks.push(8 + n + x.as_u64().unwrap() as usize);
                }
            }
        }
        marks.sort();
        marks.dedup();
        Seed {
            bytes,
            kind: Kind::Safetensors,
            hot: 8 + n,
            marks,
        }
    }
}

fn interesting_u64(rng: &mut ChaCha8Rng, len: usize) -> u64 {
    let len = len as u64;
    let table = [
        0,
        1,
        2,
        3,
        4,
        7,
        8,
        16,
        31,
        32,
        255,
        256,
        0x7fff,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 32,
        1 << 40,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX,
        u64::MAX - 1,
        len,
        len.wrapping_sub(1),
        len + 1,
        len / 2,
        len * 2,
    ];
    table[rng.random_range(0..table.len())]
}

/// A position in the header region (usually) or anywhere.
fn position(rng: &mut ChaCha8Rng, seed: &Seed, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let p = if !seed.marks.is_empty() && rng.random_bool(0.4) {
        seed.marks[rng.random_range(0..seed.marks.len())]
    } else if rng.random_bool(0.85) {
        rng.random_range(0..seed.hot.max(1))
    } else {
        rng.random_range(0..len)
    };
    p.min(len - 1)
}

fn mutate_bytes(rng: &mut ChaCha8Rng, seed: &Seed, mut b: Vec<u8>) -> Vec<u8> {
    let rounds = rng.random_range(1..=3);
    for _ in 0..rounds {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let len = b.len();
        match rng.random_range(0..10) {
            0 | 1 => {
                let p = position(rng, seed, len);
                b[p] ^= 1 << rng.random_range(0..8);
            }
            2 => {
                let p = position(rng, seed, len);
                b[p] = [0u8, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'['][rng.random_range(0..8)];
            }
            3 => {
                let p = position(rng, seed, len);
                let v = interesting_u64(rng, len) as u32;
                let end = (p + 4).min(len);
                b[p..end].copy_from_slice(&v.to_le_bytes()[..end - p]);
            }
            4 => {
                let p = position(rng, seed, len);
                let v = interesting_u64(rng, len);
                let end = (p + 8).min(len);
                b[p..end].copy_from_slice(&v.to_le_bytes()[..end - p]);
            }
            5 => {
                // Truncate at a header boundary (or anywhere).
                let p = if !seed.marks.is_empty() && rng.random_bool(0.7) {
                    seed.marks[rng.random_range(0..seed.marks.len())]
                } else {
                    rng.random_range(0..len)
                };
                let p = p.saturating_sub(rng.random_range(0..2)).min(len);
                b.truncate(p);
            }
            6 => {
                // Copy a span over another (duplicated fields and entries).
                let a = position(rng, seed, len);
                let c = position(rng, seed, len);
                let n = rng.random_range(1..=64).min(len - a).min(len - c);
                let span = b[a..a + n].to_vec();
                b[c..c + n].copy_from_slice(&span);
            }
            7 => {
                // Insert a copy of a span.
                let a = position(rng, seed, len);
                let n = rng.random_range(1..=64).min(len - a);
                let span = b[a..a + n].to_vec();
                let c = position(rng, seed, len);
                b.splice(c..c, span);
            }
            8 => {
                let a = position(rng, seed, len);
                let n = rng.random_range(1..=64).min(len - a);
                b.drain(a..a + n);
            }
            _ => {
                let n = rng.random_range(1..=16);
                let extra: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.extend(extra);
            }
        }
    }
    b
}

/// Every node of a JSON document, as JSON pointers.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{at}/{key}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

const BOMB: &str = "__fuzz_bomb__";
const DUP: &str = "__fuzz_dup__";

fn replacement(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..17) {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(u64::MAX),
        3 => Value::from(1u64 << 31),
        4 => Value::from(1u64 << 53),
        5 => Value::from(1e300),
        6 => Value::from(-1e300),
        7 => Value::from(1.5),
        8 => Value::from(""),
        9 => Value::from("x".repeat(rng.random_range(1..100_000))),
        10 => Value::Null,
        11 => Value::from(true),
        12 => Value::Array(vec![]),
        13 => Value::Object(Default::default()),
        14 => Value::from(BOMB),
        15 => Value::Array(vec![Value::from(u64::MAX), Value::from(0)]),
        _ => Value::from(i64::MIN),
    }
}

fn bomb(rng: &mut ChaCha8Rng) -> String {
    let depth = [100, 127, 128, 129, 1_000, 100_000][rng.random_range(0..6)];
    if rng.random_bool(0.5) {
        "[".repeat(depth) + &"]".repeat(depth)
    } else {
        "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)
    }
}

fn mutate_json_value(rng: &mut ChaCha8Rng, doc: &mut Value) -> Option<String> {
    let mut ptrs = Vec::new();
    pointers(doc, String::new(), &mut ptrs);
    let target = ptrs[rng.random_range(0..ptrs.len())].clone();
    let mut dup_key = None;
    match rng.random_range(0..6) {
        0 | 1 => {
            let r = replacement(rng);
            if let Some(node) = doc.pointer_mut(&target) {
                *node = r;
            }
        }
        2 => {
            // Copy another node's value here (overlapping offsets, shared shapes...).
            let src = ptrs[rng.random_range(0..ptrs.len())].clone();
            let value = doc.pointer(&src).cloned();
            if let (Some(value), Some(node)) = (value, doc.pointer_mut(&target)) {
                if !src.starts_with(&target) {
                    *node = value;
                }
            }
        }
        3 => {
            // Delete the node.
            if let Some((parent, last)) = target.rsplit_once('/') {
                match doc.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&last.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = last.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        4 => {
            // Duplicate a key or an array element.
            match doc.pointer_mut(&target) {
                Some(Value::Object(m)) if !m.is_empty() => {
                    let i = rng.random_range(0..m.len());
                    let (k, v) = m.iter().nth(i).map(|(k, v)| (k.clone(), v.clone()))?;
                    let v = if rng.random_bool(0.5) {
                        v
                    } else {
                        replacement(rng)
                    };
                    m.insert(DUP.to_string(), v);
                    dup_key = Some(k);
                }
                Some(Value::Array(a)) if !a.is_empty() => {
                    let i = rng.random_range(0..a.len());
                    let v = a[i].clone();
                    a.push(v);
                }
                _ => {}
            }
        }
        _ => {
            if let Some(node) = doc.pointer_mut(&target) {
                *node = Value::from(BOMB);
            }
        }
    }
    let mut text = serde_json::to_string(doc).ok()?;
    if let Some(k) = dup_key {
        text = text.replacen(&format!("\"{DUP}\""), &serde_json::to_string(&k).ok()?, 1);
    }
    if text.contains(BOMB) {
        text = text.replacen(&format!("\"{BOMB}\""), &bomb(rng), 1);
    }
    Some(text)
}

fn mutate(rng: &mut ChaCha8Rng, seed: &Seed) -> Vec<u8> {
    match seed.kind {
        Kind::Binary => mutate_bytes(rng, seed, seed.bytes.clone()),
        Kind::Json => {
            if rng.random_bool(0.75) {
                let mut doc: Value = serde_json::from_slice(&seed.bytes).unwrap();
                let rounds = rng.random_range(1..=2);
                let mut text = None;
                for _ in 0..rounds {
                    text = mutate_json_value(rng, &mut doc);
                    if text.as_deref().is_some_and(|t| t.len() > 1 << 20) {
                        break;
                    }
                }
                match text {
                    Some(t) => t.into_bytes(),
                    None => mutate_bytes(rng, seed, seed.bytes.clone()),
                }
            } else {
                mutate_bytes(rng, seed, seed.bytes.clone())
            }
        }
        Kind::Safetensors => {
            if rng.random_bool(0.5) {
                let n = seed.hot - 8;
                let mut doc: Value = serde_json::from_slice(&seed.bytes[8..8 + n]).unwrap();
                match mutate_json_value(rng, &mut doc) {
                    Some(header) => {
                        let mut out = (header.len() as u64).to_le_bytes().to_vec();
                        out.extend_from_slice(header.as_bytes());
                        out.extend_from_slice(&seed.bytes[seed.hot..]);
                        out
                    }
                    None => mutate_bytes(rng, seed, seed.bytes.clone()),
                }
            } else {
                mutate_bytes(rng, seed, seed.bytes.clone())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targets

type Run = Box<dyn Fn(&[u8], usize) -> Result<(), String>>;

struct Target {
    name: &'static str,
    class: &'static str,
    seeds: Vec<Seed>,
    run: Run,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shared() -> Option<PathBuf> {
    let p = root().join("../shared/assets");
    p.is_dir().then_some(p)
}

fn stories_files() -> (Vec<u8>, Vec<u8>) {
    let dir = root().join("crates/sq-model/assets/stories260k");
    (
        std::fs::read(dir.join("stories260K.bin")).unwrap(),
        std::fs::read(dir.join("tok512.bin")).unwrap(),
    )
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/hf").join(name)
}

const FIXTURES: [&str; 4] = ["llama-gqa", "opt-prenorm", "bloom", "qwen2-bias"];
const SAMPLE: &str =
    "Once upon a time, a little girl named Lily found 3 shiny stones. Ünïcödé ok? 🙂";

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// A GGUF image of `raw` (F32 tensors, SentencePiece tokenizer metadata), and the offsets
/// where its header fields end.
fn gguf_from_raw(raw: &RawModel, tok: &Llama2cTokenizer) -> (Vec<u8>, Vec<usize>) {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let c = &raw.config;
    let u = |k: &str| c[k].as_u64().unwrap() as u32;
    let (hidden, heads, kv_heads) = (
        u("hidden_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
    );
    let head_dim = (hidden / heads) as usize;
    let mut marks = Vec::new();
    let mut kv: Vec<(&str, u32, Vec<u8>)> = Vec::new();
    let str_val = |v: &str| {
        let mut o = Vec::new();
        s(&mut o, v);
        o
    };
    kv.push(("general.architecture", 8, str_val("llama")));
    for (k, v) in [
        ("llama.context_length", u("max_position_embeddings")),
        ("llama.embedding_length", hidden),
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", kv_heads),
    ] {
        kv.push((k, 4, v.to_le_bytes().to_vec()));
    }
    kv.push((
        "llama.attention.layer_norm_rms_epsilon",
        6,
        1e-5f32.to_le_bytes().to_vec(),
    ));
    kv.push(("tokenizer.ggml.model", 8, str_val("llama")));
    let n = tok.vocab_size();
    let (mut tokens, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for id in 0..n as u32 {
        let piece = String::from_utf8_lossy(tok.piece(id).unwrap()).into_owned();
        let (t, ty) = match id {
            0 => ("<unk>".to_string(), 2i32),
            1 => ("<s>".to_string(), 3),
            2 => ("</s>".to_string(), 3),
            _ if piece.starts_with("<0x") => (piece, 6),
            _ => (piece.replace(' ', "▁"), 1),
        };
        s(&mut tokens, &t);
        scores.extend(tok.score(id).unwrap().to_le_bytes());
        types.extend(ty.to_le_bytes());
    }
    let array = |elem: u32, body: Vec<u8>| {
        let mut o = elem.to_le_bytes().to_vec();
        o.extend((n as u64).to_le_bytes());
        o.extend(body);
        o
    };
    kv.push(("tokenizer.ggml.tokens", 9, array(8, tokens)));
    kv.push(("tokenizer.ggml.scores", 9, array(6, scores)));
    kv.push(("tokenizer.ggml.token_type", 9, array(5, types)));
    for (k, v) in [
        ("tokenizer.ggml.unknown_token_id", 0u32),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
    ] {
        kv.push((k, 4, v.to_le_bytes().to_vec()));
    }

    // (gguf name, data, dims innermost first)
    let mut tensors: Vec<(String, Vec<f32>, Vec<u64>)> = Vec::new();
    let t = |name: &str| raw.tensors[name].to_f32_vec().unwrap();
    let dims = |name: &str| -> Vec<u64> {
        raw.tensors[name]
            .shape()
            .iter()
            .rev()
            .map(|&d| d as u64)
            .collect()
    };
    tensors.push((
        "token_embd.weight".into(),
        t("model.embed_tokens.weight"),
        dims("model.embed_tokens.weight"),
    ));
    tensors.push((
        "output_norm.weight".into(),
        t("model.norm.weight"),
        dims("model.norm.weight"),
    ));
    if raw.tensors.contains_key("lm_head.weight") {
        tensors.push((
            "output.weight".into(),
            t("lm_head.weight"),
            dims("lm_head.weight"),
        ));
    }
    for layer in 0..u("num_hidden_layers") {
        let p = format!("model.layers.{layer}");
        for (suffix, hf, rope) in [
            ("attn_norm", "input_layernorm", None),
            ("attn_q", "self_attn.q_proj", Some(heads)),
            ("attn_k", "self_attn.k_proj", Some(kv_heads)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_norm", "post_attention_layernorm", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ] {
            let name = format!("{p}.{hf}.weight");
            let mut data = t(&name);
            if let Some(h) = rope {
                data =
                    permute_interleaved_rope(&data, h as usize, head_dim, hidden as usize).unwrap();
            }
            tensors.push((format!("blk.{layer}.{suffix}.weight"), data, dims(&name)));
        }
    }

    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    marks.push(out.len());
    out.extend((tensors.len() as u64).to_le_bytes());
    marks.push(out.len());
    out.extend((kv.len() as u64).to_le_bytes());
    marks.push(out.len());
    for (k, ty, v) in &kv {
        s(&mut out, k);
        marks.push(out.len());
        out.extend(ty.to_le_bytes());
        marks.push(out.len());
        out.extend(v);
        marks.push(out.len());
    }
    let mut offset = 0u64;
    for (name, data, d) in &tensors {
        s(&mut out, name);
        marks.push(out.len());
        out.extend((d.len() as u32).to_le_bytes());
        for x in d {
            out.extend(x.to_le_bytes());
            marks.push(out.len());
        }
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        marks.push(out.len());
        offset = (offset + 4 * data.len() as u64).next_multiple_of(32);
    }
    let data_start = out.len().next_multiple_of(32);
    out.resize(data_start, 0);
    marks.push(data_start);
    for (_, data, _) in &tensors {
        let start = out.len().next_multiple_of(32);
        out.resize(start, 0);
        marks.push(start);
        for v in data {
            out.extend(v.to_le_bytes());
        }
    }
    (out, marks)
}

fn llama2c_marks(model: &[u8]) -> Vec<usize> {
    let h =
        smoothquant_rs::model::llama2c::Llama2cHeader::parse(model, model.len(), Path::new("seed"))
            .unwrap();
    let mut marks: Vec<usize> = (1..=7).map(|i| 4 * i).collect();
    let (d, hd, l, v) = (h.dim, h.hidden_dim, h.n_layers, h.vocab_size);
    let kv = h.kv_dim();
    let mut pos = 28;
    for n in [
        v * d,
        l * d,
        l * d * d,
        l * kv * d,
        l * kv * d,
        l * d * d,
        l * d,
        l * hd * d,
        l * d * hd,
        l * hd * d,
        d,
    ] {
        pos += 4 * n;
        marks.push(pos);
    }
    marks
}

fn tokenizer_marks(tok: &[u8]) -> Vec<usize> {
    let mut marks = vec![4];
    let mut pos = 4;
    while pos + 8 <= tok.len() {
        let len = i32::from_le_bytes(tok[pos + 4..pos + 8].try_into().unwrap()) as usize;
        marks.push(pos + 4);
        marks.push(pos + 8);
        pos += 8 + len;
        marks.push(pos);
    }
    marks
}

fn stories_raw() -> RawModel {
    let (model, tok) = stories_files();
    load_llama2c_bytes(&model, &tok, Path::new("stories260K.bin")).unwrap()
}

fn clone_raw(raw: &RawModel) -> RawModel {
    RawModel {
        config: raw.config.clone(),
        tensors: raw.tensors.clone(),
        tokenizer: raw.tokenizer.clone(),
        source: raw.source.clone(),
        format: raw.format,
    }
}

fn targets(work: &Path) -> Vec<Target> {
    let mut out = Vec::new();
    let (model_bin, tok_bin) = stories_files();
    let raw = stories_raw();
    let tok = Llama2cTokenizer::from_bytes(&tok_bin, Some(512), "tok512.bin").unwrap();

    // A calibration statistics file and a native quantized directory from stories260K.
    let mut fp = from_raw(clone_raw(&raw), true).unwrap();
    let text = "Once upon a time there was a little dog. He liked to run and play in the park with his friends every day.";
    let ids = fp.tokenizer.encode(text).unwrap();
    let cfg = CalibConfig {
        samples: 1,
        seq_len: ids.len(),
        seed: 0,
    };
    let mut stats = calibrate(&mut fp.model, &ids, &cfg, |_, _| {}).unwrap();
    let stats_path = work.join("seed-stats.safetensors");
    stats.save(&stats_path).unwrap();
    let groups = paper_groups(&fp.model).unwrap();
    smooth_model(&mut fp.model, &groups, &mut stats, &AlphaSpec::Global(0.5)).unwrap();
    let native_seed = work.join("seed-native");
    let info = ExportInfo {
        scheme: "smoothquant".into(),
        recipe: smoothquant_rs::smooth::Recipe::O3,
        record: Default::default(),
        add_bos: true,
        int8_attention: false,
        tokenizer_json: fp.tokenizer.to_hf_json().unwrap(),
        extra_files: vec![],
        max_shard_bytes: None,
        lm_head: Default::default(),
    };
    save_native(
        &fp.model,
        &fp.hf_config,
        Some(&stats),
        &info,
        &native_seed,
        true,
    )
    .unwrap();

    // safetensors: the fixtures' weights, the statistics file, every dtype.
    {
        let dtypes_path = work.join("seed-dtypes.safetensors");
        let f32s: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = Tensor::from_vec(f32s, &[4, 6]).unwrap();
        let tensors: Vec<(String, Tensor)> = ["F32", "F16", "BF16"]
            .iter()
            .zip([
                smoothquant_rs::tensor::DType::F32,
                smoothquant_rs::tensor::DType::F16,
                smoothquant_rs::tensor::DType::BF16,
            ])
            .map(|(n, d)| (n.to_string(), t.to_dtype(d).unwrap()))
            .chain([
                (
                    "I8".to_string(),
                    Tensor::from_vec((0..12i8).collect::<Vec<_>>(), &[3, 4]).unwrap(),
                ),
                (
                    "I32".to_string(),
                    Tensor::from_vec((0..5i32).collect::<Vec<_>>(), &[5]).unwrap(),
                ),
            ])
            .collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&dtypes_path, &tensors, Some(&meta)).unwrap();
        let mut seeds = vec![
            Seed::safetensors(std::fs::read(&dtypes_path).unwrap()),
            Seed::safetensors(std::fs::read(&stats_path).unwrap()),
        ];
        for f in ["opt-prenorm", "llama-tied-bf16"] {
            seeds.push(Seed::safetensors(
                std::fs::read(fixture(f).join("model.safetensors")).unwrap(),
            ));
        }
        let path = work.join("case.safetensors");
        out.push(Target {
            name: "safetensors",
            class: "safetensors file (header, offsets, dtypes, data)",
            seeds,
            run: Box::new(move |b, _| {
                write(&path, b);
                let f = SafetensorsFile::open(&path).map_err(err)?;
                let _ = f.user_metadata();
                for name in f.names() {
                    let t = f.tensor(&name).map_err(err)?;
                    let _ = f.view(&name).map_err(err)?;
                    if t.dtype() != smoothquant_rs::tensor::DType::I32 {
                        let _ = t.to_f32_vec().map_err(err)?;
                    }
                }
                Ok(())
            }),
        });
    }

    // Sharded checkpoint index.
    {
        let dir = work.join("sharded");
        std::fs::create_dir_all(&dir).unwrap();
        let ckpt = Checkpoint::open(fixture("opt-prenorm")).unwrap();
        let names: Vec<String> = ckpt.names().map(str::to_string).collect();
        let mut map = serde_json::Map::new();
        for (i, part) in names.chunks(names.len().div_ceil(3)).enumerate() {
            let shard = format!("model-0000{}-of-00003.safetensors", i + 1);
            let tensors: Vec<(String, Tensor)> = part
                .iter()
                .map(|n| (n.clone(), ckpt.tensor(n).unwrap()))
                .collect();
            save_safetensors(dir.join(&shard), &tensors, None).unwrap();
            for n in part {
                map.insert(n.clone(), Value::from(shard.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        let path = dir.join("model.safetensors.index.json");
        out.push(Target {
            name: "shard-index",
            class: "sharded checkpoint index (model.safetensors.index.json)",
            seeds: vec![Seed::json(serde_json::to_vec_pretty(&index).unwrap())],
            run: Box::new(move |b, _| {
                write(&path, b);
                let c = Checkpoint::open(&path).map_err(err)?;
                for n in c.names() {
                    let _ = c.tensor(n).map_err(err)?;
                }
                Ok(())
            }),
        });
    }

    // GGUF: stories260K as a complete GGUF (header, tokenizer metadata, tensors).
    {
        let (bytes, marks) = gguf_from_raw(&raw, &tok);
        let hot = *marks.iter().rev().nth(60).unwrap_or(&bytes.len());
        let hot = hot.max(marks[marks.len() / 2]);
        out.push(Target {
            name: "gguf",
            class: "GGUF file (header, metadata, tensor table, data)",
            seeds: vec![Seed::binary(bytes, hot, marks)],
            run: Box::new(|b, _| {
                let f = GgufFile::from_bytes(b.to_vec(), "case.gguf").map_err(err)?;
                let raw = smoothquant_rs::model::gguf::load_gguf_file(&f).map_err(err)?;
                from_raw(raw, true).map_err(err)?;
                Ok(())
            }),
        });
    }

    // GGUF: the header region of SmolLM2 (49k-token BPE tokenizer metadata), tensors dropped.
    if let Some(assets) = shared() {
        let path = assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        if path.is_file() {
            let data_offset = GgufFile::open(&path).unwrap().data_offset() as usize;
            let mut head = vec![0u8; data_offset];
            use std::io::Read;
            std::fs::File::open(&path)
                .unwrap()
                .read_exact(&mut head)
                .unwrap();
            // Tensor count 0: the metadata then is the whole file (the tensor table after it
            // is ignored), so mutations reach the tokenizer builder.
            head[8..16].copy_from_slice(&0u64.to_le_bytes());
            out.push(Target {
                name: "gguf-smollm2-header",
                class: "GGUF metadata of a real model (SmolLM2 BPE tokenizer)",
                seeds: vec![Seed::binary(head, 64, vec![4, 8, 16, 24])],
                run: Box::new(|b, _| {
                    let f = GgufFile::from_bytes(b.to_vec(), "smollm2-head.gguf").map_err(err)?;
                    for (_, v) in f.metadata() {
                        let _ = v.summary();
                    }
                    let t = hf_tokenizer_from_gguf(&f).map_err(err)?;
                    let ids = t.encode(SAMPLE).map_err(err)?;
                    t.decode(&ids).map_err(err)?;
                    Ok(())
                }),
            });
        }
    }

    // llama2.c checkpoint (stories260K.bin) with its real tokenizer.
    {
        let marks = llama2c_marks(&model_bin);
        let tok_bytes = tok_bin.clone();
        out.push(Target {
            name: "llama2c",
            class: "llama2.c checkpoint (.bin header and sections)",
            seeds: vec![Seed::binary(model_bin.clone(), 28, marks)],
            run: Box::new(move |b, _| {
                let raw = load_llama2c_bytes(b, &tok_bytes, Path::new("case.bin")).map_err(err)?;
                from_raw(raw, true).map_err(err)?;
                Ok(())
            }),
        });
    }

    // llama2.c tokenizer.bin.
    {
        let marks = tokenizer_marks(&tok_bin);
        let hot = tok_bin.len();
        out.push(Target {
            name: "llama2c-tokenizer",
            class: "llama2.c tokenizer.bin",
            seeds: vec![Seed::binary(tok_bin.clone(), hot, marks)],
            run: Box::new(|b, _| {
                let sized = Llama2cTokenizer::from_bytes(b, Some(512), "case.bin");
                let t = Llama2cTokenizer::from_bytes(b, None, "case.bin").map_err(err)?;
                let ids = t.encode(SAMPLE).map_err(err)?;
                t.decode(&ids).map_err(err)?;
                let _ = t.to_hf_json();
                sized.map(|_| ()).map_err(err)
            }),
        });
    }

    // config.json of each fixture, built against that fixture's weights.
    {
        let ckpts: Vec<Checkpoint> = FIXTURES
            .iter()
            .map(|f| Checkpoint::open(fixture(f)).unwrap())
            .collect();
        let seeds = FIXTURES
            .iter()
            .map(|f| Seed::json(std::fs::read(fixture(f).join("config.json")).unwrap()))
            .collect();
        out.push(Target {
            name: "config-json",
            class: "config.json (architecture, sizes, rope, eps, ids)",
            seeds,
            run: Box::new(move |b, i| {
                let v: Value = serde_json::from_slice(b).map_err(err)?;
                build_model(&v, Path::new("config.json"), &ckpts[i]).map_err(err)?;
                Ok(())
            }),
        });
    }

    // tokenizer.json of the fixtures (BPE with byte-level and metaspace pre-tokenizers).
    {
        let mut seeds: Vec<Seed> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for f in FIXTURES {
            let b = std::fs::read(fixture(f).join("tokenizer.json")).unwrap();
            if seen.insert(b.clone()) {
                seeds.push(Seed::json(b));
            }
        }
        seeds.push(Seed::json(info.tokenizer_json.clone().into_bytes()));
        out.push(Target {
            name: "tokenizer-json",
            class: "tokenizer.json",
            seeds,
            run: Box::new(|b, _| {
                let t = HfTokenizer::from_bytes(b, "tokenizer.json").map_err(err)?;
                let ids = t.encode(SAMPLE).map_err(err)?;
                t.decode(&ids).map_err(err)?;
                Ok(())
            }),
        });
    }

    // Calibration statistics, then smoothing stories260K with them.
    {
        let path = work.join("case-stats.safetensors");
        let raw2 = clone_raw(&raw);
        out.push(Target {
            name: "stats",
            class: "calibration statistics (.safetensors from `calibrate`)",
            seeds: vec![Seed::safetensors(std::fs::read(&stats_path).unwrap())],
            run: Box::new(move |b, _| {
                write(&path, b);
                let mut stats = StatsTable::load(&path).map_err(err)?;
                let mut m = from_raw(clone_raw(&raw2), true).map_err(err)?;
                let groups = paper_groups(&m.model).map_err(err)?;
                smooth_model(&mut m.model, &groups, &mut stats, &AlphaSpec::Global(0.5))
                    .map_err(err)?;
                Ok(())
            }),
        });
    }

    // Our native quantized directory: its config.json or its model.safetensors mutated.
    {
        let dir = work.join("case-native");
        let originals: Vec<(String, Vec<u8>)> = std::fs::read_dir(&native_seed)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        let backend = smoothquant_rs::kernels::select_backend().unwrap();
        let seeds = vec![
            Seed::json(std::fs::read(native_seed.join("config.json")).unwrap()),
            Seed::safetensors(std::fs::read(native_seed.join("model.safetensors")).unwrap()),
        ];
        out.push(Target {
            name: "native",
            class: "native quantized checkpoint (config.json + INT8 safetensors)",
            seeds,
            run: Box::new(move |b, i| {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let mutated = ["config.json", "model.safetensors"][i];
                for (name, bytes) in &originals {
                    write(&dir.join(name), if name == mutated { b } else { bytes });
                }
                load_native(&dir, backend.clone()).map_err(err)?;
                Ok(())
            }),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Driver

struct Report {
    name: &'static str,
    class: &'static str,
    cases: usize,
    errors: usize,
    accepted: usize,
    panics: Vec<String>,
    seconds: f64,
    slowest_ms: f64,
    peak_mib: f64,
}

/// Where the last caught panic happened.
static PANIC_AT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

fn failures_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("fuzz-failures")
}

fn run_target(t: &Target, base_seed: u64, cases: Option<usize>, budget: Duration) -> Report {
    // Every seed must be valid: the mutations then start from deep inside the parser.
    for (i, s) in t.seeds.iter().enumerate() {
        if let Err(e) = (t.run)(&s.bytes, i) {
            panic!("{}: seed {i} does not load: {e}", t.name);
        }
    }
    let mut report = Report {
        name: t.name,
        class: t.class,
        cases: 0,
        errors: 0,
        accepted: 0,
        panics: vec![],
        seconds: 0.0,
        slowest_ms: 0.0,
        peak_mib: 0.0,
    };
    let name_hash = t.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let start = Instant::now();
    let mut case = 0usize;
    loop {
        match cases {
            Some(n) if case >= n => break,
            None if start.elapsed() >= budget => break,
            _ => {}
        }
        let mut rng = ChaCha8Rng::seed_from_u64(base_seed ^ name_hash ^ (case as u64) << 20);
        let si = rng.random_range(0..t.seeds.len());
        let input = mutate(&mut rng, &t.seeds[si]);
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        ARMED.store(1, Relaxed);
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&input, si)));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        ARMED.store(0, Relaxed);
        let peak = PEAK.load(Relaxed).saturating_sub(base);
        report.slowest_ms = report.slowest_ms.max(ms);
        report.peak_mib = report.peak_mib.max(peak as f64 / (1 << 20) as f64);
        // Bounded memory: never more than a generous multiple of the input.
        let bound = (256 << 20) + 64 * input.len();
        assert!(
            peak <= bound,
            "{} case {case}: peak heap {peak} bytes for a {}-byte input",
            t.name,
            input.len()
        );
        match result {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(_)) => report.errors += 1,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let dir = failures_dir();
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("{}-{case}.bin", t.name));
                let _ = std::fs::write(&file, &input);
                let at = PANIC_AT.lock().unwrap_or_else(|p| p.into_inner()).clone();
                report.panics.push(format!(
                    "case {case} (seed {si}): {msg} at {at} [input saved to {}]",
                    file.display()
                ));
            }
        }
        case += 1;
    }
    report.cases = case;
    report.seconds = start.elapsed().as_secs_f64();
    report
}

#[test]
fn mutated_inputs_never_panic() {
    let work = tempfile::tempdir().unwrap();
    let base_seed = env_usize("SQ_FUZZ_SEED").unwrap_or(0) as u64;
    let cases = env_usize("SQ_FUZZ_CASES");
    let budget = Duration::from_secs_f64(
        std::env::var("SQ_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0),
    );
    let only: Option<Vec<String>> = std::env::var("SQ_FUZZ_TARGETS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    // Caught panics are counted and reported below, not printed one by one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if let Some(l) = info.location() {
            *PANIC_AT.lock().unwrap_or_else(|p| p.into_inner()) = l.to_string();
        }
    }));
    let mut reports = Vec::new();
    for t in targets(work.path()) {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == t.name))
        {
            continue;
        }
        eprintln!("fuzzing {} ...", t.name);
        reports.push(run_target(&t, base_seed, cases, budget));
    }
    std::panic::set_hook(hook);

    println!(
        "\n{:<20} {:>8} {:>8} {:>8} {:>7} {:>9} {:>10} {:>9}",
        "parser", "cases", "errors", "accepted", "panics", "cases/s", "slowest ms", "peak MiB"
    );
    for r in &reports {
        println!(
            "{:<20} {:>8} {:>8} {:>8} {:>7} {:>9.0} {:>10.1} {:>9.1}",
            r.name,
            r.cases,
            r.errors,
            r.accepted,
            r.panics.len(),
            r.cases as f64 / r.seconds.max(1e-9),
            r.slowest_ms,
            r.peak_mib
        );
    }
    println!();
    for r in &reports {
        println!("{}: {}", r.name, r.class);
    }
    let failures: Vec<String> = reports
        .iter()
        .flat_map(|r| r.panics.iter().map(move |p| format!("{}: {p}", r.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} panics:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(reports.iter().all(|r| r.cases > 0));
}

//! Loader and tokenizer tests: hand-built quantized blocks, GGUF files written here (round
//! trips and malformed input), llama2.c checkpoints, and the real assets in `../shared` when
//! they are present (SmolLM2 GGUF, stories260K, WikiText-2) against golden files computed with
//! transformers and a NumPy port of llama2.c.

use half::{bf16, f16};
use sq_model::gguf::{dequantize, load_gguf, load_gguf_file, GgmlType, GgufFile, GgufValue};
use sq_model::llama2c::{embedded_stories260k, load_llama2c, load_llama2c_bytes};
use sq_model::raw::RawModel;
use sq_model::tokenizer::{HfTokenizer, Llama2cTokenizer, Tokenizer};
use sq_model::ModelError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Dequantization of hand-built blocks

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

#[test]
fn dequantize_q8_0_block() {
    let mut block = f16_bytes(0.5).to_vec();
    let qs: Vec<i8> = (0..32).map(|i| i as i8 * 4 - 64).collect(); // -64, -60, ..., 60
    block.extend(qs.iter().map(|&q| q as u8));
    let out = dequantize(GgmlType::Q8_0, &block).unwrap();
    assert_eq!(out.len(), 32);
    assert_eq!(out[0], -32.0);
    assert_eq!(out[1], -30.0);
    assert_eq!(out[16], 0.0);
    assert_eq!(out[31], 30.0);
    // Two blocks: the second with scale -0.25 and all q = 127.
    let mut two = block.clone();
    two.extend(f16_bytes(-0.25));
    two.extend([127u8; 32]);
    let out = dequantize(GgmlType::Q8_0, &two).unwrap();
    assert_eq!(out.len(), 64);
    assert!(out[32..].iter().all(|&v| v == -31.75));
}

#[test]
fn dequantize_q4_0_block() {
    // Byte j holds value j in its low nibble and value j + 16 in its high nibble.
    let mut block = f16_bytes(2.0).to_vec();
    for j in 0..16u8 {
        block.push(j | ((15 - j) << 4));
    }
    let out = dequantize(GgmlType::Q4_0, &block).unwrap();
    // Low nibbles j -> (j - 8) * 2; high nibbles 15 - j -> (7 - j) * 2.
    assert_eq!(out[0], -16.0);
    assert_eq!(out[8], 0.0);
    assert_eq!(out[15], 14.0);
    assert_eq!(out[16], 14.0);
    assert_eq!(out[31], -16.0);
    assert_eq!(out[20], 6.0);
}

#[test]
fn dequantize_q4_1_block() {
    let mut block = f16_bytes(0.5).to_vec();
    block.extend(f16_bytes(-1.0));
    for j in 0..16u8 {
        block.push(j | (3 << 4));
    }
    let out = dequantize(GgmlType::Q4_1, &block).unwrap();
    // value = nibble * 0.5 - 1.
    assert_eq!(out[0], -1.0);
    assert_eq!(out[1], -0.5);
    assert_eq!(out[15], 6.5);
    assert!(out[16..].iter().all(|&v| v == 0.5));
}

#[test]
fn dequantize_plain_types() {
    let f16s: Vec<u8> = [1.5f32, -2.0, 65504.0, 0.000061035156]
        .iter()
        .flat_map(|&v| f16_bytes(v))
        .collect();
    assert_eq!(
        dequantize(GgmlType::F16, &f16s).unwrap(),
        [1.5, -2.0, 65504.0, 0.000061035156]
    );
    // bf16 0x3FC0 = 1.5, 0xC040 = -3.0, 0x4780 = 65536.
    let bf16s = [0xC0u8, 0x3F, 0x40, 0xC0, 0x80, 0x47];
    assert_eq!(
        dequantize(GgmlType::BF16, &bf16s).unwrap(),
        [1.5, -3.0, 65536.0]
    );
    assert_eq!(bf16::from_bits(0x3FC0).to_f32(), 1.5);
    let f32s: Vec<u8> = [0.1f32, -7.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::F32, &f32s).unwrap(), [0.1, -7.0]);
    assert!(dequantize(GgmlType::F32, &f32s[..7]).is_err());
}

// ---------------------------------------------------------------------------------------------
// A GGUF writer

#[derive(Clone, Debug)]
enum V {
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    Bool(bool),
    Str(String),
    /// Element type id and elements.
    Arr(u32, Vec<V>),
    /// Any type id with raw bytes (for malformed values).
    Raw(u32, Vec<u8>),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::Raw(t, _) => *t,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U32(v) => out.extend(v.to_le_bytes()),
            V::I32(v) => out.extend(v.to_le_bytes()),
            V::F32(v) => out.extend(v.to_le_bytes()),
            V::U64(v) => out.extend(v.to_le_bytes()),
            V::Bool(v) => out.push(*v as u8),
            V::Str(s) => write_str(out, s),
            V::Arr(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(out);
                }
            }
            V::Raw(_, bytes) => out.extend(bytes),
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn strs(items: &[&str]) -> V {
    V::Arr(8, items.iter().map(|s| V::Str(s.to_string())).collect())
}

#[derive(Clone, Debug)]
struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Overrides the offset the writer would choose.
    offset: Option<u64>,
}

#[derive(Clone, Debug)]
struct GgufWriter {
    version: u32,
    kv: Vec<(String, V)>,
    tensors: Vec<TensorSpec>,
    /// Overrides the tensor count written in the header.
    tensor_count: Option<u64>,
}

impl GgufWriter {
    fn alignment(&self) -> u64 {
        self.kv
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| match v {
                V::U32(a) => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(32)
    }

    fn set(&mut self, key: &str, value: V) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.kv.push((key.to_string(), value)),
        }
    }

    fn remove(&mut self, key: &str) {
        self.kv.retain(|(k, _)| k != key);
    }

    fn tensor(&mut self, name: &str) -> &mut TensorSpec {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    /// The file, and the offsets where each header field ends.
    fn build(&self) -> (Vec<u8>, Vec<usize>) {
        let mut out = b"GGUF".to_vec();
        let mut marks = vec![4];
        out.extend(self.version.to_le_bytes());
        marks.push(out.len());
        out.extend(
            self.tensor_count
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        marks.push(out.len());
        out.extend((self.kv.len() as u64).to_le_bytes());
        marks.push(out.len());
        for (k, v) in &self.kv {
            write_str(&mut out, k);
            marks.push(out.len());
            out.extend(v.type_id().to_le_bytes());
            marks.push(out.len());
            v.write(&mut out);
            marks.push(out.len());
        }
        let align = self.alignment();
        let mut next = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            if off <= 1 << 30 {
                next = (off + t.data.len() as u64).next_multiple_of(align);
            }
        }
        for (t, off) in self.tensors.iter().zip(&offsets) {
            write_str(&mut out, &t.name);
            marks.push(out.len());
            out.extend((t.dims.len() as u32).to_le_bytes());
            marks.push(out.len());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
                marks.push(out.len());
            }
            out.extend(t.ty.to_le_bytes());
            marks.push(out.len());
            out.extend(off.to_le_bytes());
            marks.push(out.len());
        }
        let data_start = (out.len() as u64).next_multiple_of(align) as usize;
        out.resize(data_start, 0);
        marks.push(out.len());
        for (t, off) in self.tensors.iter().zip(&offsets) {
            if *off > 1 << 30 {
                continue; // deliberately out of range: no data to place
            }
            let start = data_start + *off as usize;
            if out.len() < start + t.data.len() {
                out.resize(start + t.data.len(), 0);
            }
            out[start..start + t.data.len()].copy_from_slice(&t.data);
        }
        (out, marks)
    }

    fn bytes(&self) -> Vec<u8> {
        self.build().0
    }
}

// ---------------------------------------------------------------------------------------------
// Encoders of exactly representable values (multiples of 0.25 in [-2, 1.75])

const STEP: f32 = 0.25;

/// Hugging Face name -> (shape, values) a loaded model must have.
type Expected = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn encode(ty: u32, values: &[f32]) -> Vec<u8> {
    let q = |v: f32| (v / STEP).round() as i32; // in -8..=7
    match ty {
        0 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        1 => values.iter().flat_map(|&v| f16_bytes(v)).collect(),
        30 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        8 => values
            .chunks(32)
            .flat_map(|b| {
                let mut out = f16_bytes(STEP).to_vec();
                out.extend(b.iter().map(|&v| q(v) as i8 as u8));
                out
            })
            .collect(),
        2 | 3 => values
            .chunks(32)
            .flat_map(|b| {
                let mut out = f16_bytes(STEP).to_vec();
                if ty == 3 {
                    out.extend(f16_bytes(-8.0 * STEP)); // m: nibble 0 is -2.0
                }
                // Q4_0: (n - 8) * d; Q4_1: n * d - 8d: both n = q + 8.
                out.extend(
                    (0..16).map(|j| (q(b[j]) + 8) as u8 | (((q(b[j + 16]) + 8) as u8) << 4)),
                );
                out
            })
            .collect(),
        _ => panic!("no encoder for type {ty}"),
    }
}

/// Deterministic values in {-2, -1.75, ..., 1.75}.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) % 16) as f32 * STEP - 2.0
        })
        .collect()
}

/// Hugging Face rows -> interleaved-RoPE rows, written independently of the crate:
/// stored row `h*hd + 2j + s` is HF row `h*hd + s*hd/2 + j`.
fn to_interleaved(hf: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; hf.len()];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for s in 0..2 {
                let stored = h * hd + 2 * j + s;
                let hf_row = h * hd + s * hd / 2 + j;
                out[stored * cols..(stored + 1) * cols]
                    .copy_from_slice(&hf[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;

/// Byte-level BPE vocabulary of the tiny model.
const TOKENS: [&str; 12] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "a",
    "b",
    "c",
    "Ġ",
    "Ġa",
    "ab",
    "Ġab",
    "1",
    "2",
];

/// A tiny llama GGUF and the Hugging Face tensors it must load as.
fn tiny_llama(version: u32, tied: bool) -> (GgufWriter, Expected) {
    let vocab = TOKENS.len();
    let mut kv = vec![
        ("general.architecture".to_string(), V::Str("llama".into())),
        ("general.name".to_string(), V::Str("tiny".into())),
        ("llama.block_count".to_string(), V::U32(LAYERS as u32)),
        ("llama.context_length".to_string(), V::U64(128)),
        ("llama.embedding_length".to_string(), V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".to_string(), V::U32(FFN as u32)),
        (
            "llama.attention.head_count".to_string(),
            V::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".to_string(),
            V::U32(KV_HEADS as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            V::F32(1e-5),
        ),
        ("llama.rope.freq_base".to_string(), V::F32(100000.0)),
        (
            "llama.rope.dimension_count".to_string(),
            V::U32(HEAD_DIM as u32),
        ),
        ("tokenizer.ggml.model".to_string(), V::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), V::Str("smollm".into())),
        ("tokenizer.ggml.tokens".to_string(), strs(&TOKENS)),
        (
            "tokenizer.ggml.token_type".to_string(),
            V::Arr(
                5,
                (0..vocab)
                    .map(|i| V::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            strs(&["Ġ a", "a b", "Ġa b"]),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), V::U32(2)),
    ];
    if version == 3 {
        kv.push(("general.alignment".to_string(), V::U32(64)));
    }
    let mut tensors = Vec::new();
    let mut expected = BTreeMap::new();
    let mut seed = 1;
    let mut add = |gguf: String, hf: String, shape: Vec<usize>, ty: u32, rope: Option<usize>| {
        seed += 1;
        let n: usize = shape.iter().product();
        let hf_values = values(seed, n);
        let stored = match rope {
            Some(heads) => to_interleaved(&hf_values, heads, HEAD_DIM, HIDDEN),
            None => hf_values.clone(),
        };
        tensors.push(TensorSpec {
            name: gguf,
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data: encode(ty, &stored),
            offset: None,
        });
        expected.insert(hf, (shape, hf_values));
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![vocab, HIDDEN],
        8,
        None,
    );
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        add(
            format!("{b}.attn_norm.weight"),
            format!("{p}.input_layernorm.weight"),
            vec![HIDDEN],
            0,
            None,
        );
        add(
            format!("{b}.attn_q.weight"),
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            3,
            Some(HEADS),
        );
        add(
            format!("{b}.attn_k.weight"),
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            2,
            Some(KV_HEADS),
        );
        add(
            format!("{b}.attn_v.weight"),
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            8,
            None,
        );
        add(
            format!("{b}.attn_output.weight"),
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            1,
            None,
        );
        add(
            format!("{b}.ffn_norm.weight"),
            format!("{p}.post_attention_layernorm.weight"),
            vec![HIDDEN],
            0,
            None,
        );
        add(
            format!("{b}.ffn_gate.weight"),
            format!("{p}.mlp.gate_proj.weight"),
            vec![FFN, HIDDEN],
            30,
            None,
        );
        add(
            format!("{b}.ffn_up.weight"),
            format!("{p}.mlp.up_proj.weight"),
            vec![FFN, HIDDEN],
            2,
            None,
        );
        add(
            format!("{b}.ffn_down.weight"),
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, FFN],
            3,
            None,
        );
    }
    add(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![HIDDEN],
        0,
        None,
    );
    if !tied {
        add(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, HIDDEN],
            1,
            None,
        );
    }
    let writer = GgufWriter {
        version,
        kv,
        tensors,
        tensor_count: None,
    };
    (writer, expected)
}

fn from_bytes(bytes: Vec<u8>) -> Result<RawModel, ModelError> {
    load_gguf_file(&GgufFile::from_bytes(bytes, "test.gguf")?)
}

fn check_round_trip(model: &RawModel, expected: &Expected, tied: bool) {
    assert_eq!(model.format, "gguf");
    let names: Vec<&String> = model.tensors.keys().collect();
    assert_eq!(names, expected.keys().collect::<Vec<_>>());
    for (name, (shape, values)) in expected {
        let t = &model.tensors[name];
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.as_slice::<f32>().unwrap(), values.as_slice(), "{name}");
    }
    let c = &model.config;
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["hidden_size"], HIDDEN);
    assert_eq!(c["intermediate_size"], FFN);
    assert_eq!(c["num_hidden_layers"], LAYERS);
    assert_eq!(c["num_attention_heads"], HEADS);
    assert_eq!(c["num_key_value_heads"], KV_HEADS);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["vocab_size"], TOKENS.len());
    assert_eq!(c["max_position_embeddings"], 128);
    assert_eq!(c["tie_word_embeddings"], tied);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert!(c.get("rope_scaling").is_none());
    let tok = &model.tokenizer;
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.vocab_size()),
        (Some(1), Some(2), 12)
    );
    assert_eq!(tok.encode("ab ab c").unwrap(), [8, 9, 6, 5]);
    assert_eq!(tok.encode("<|im_start|>ab a12").unwrap(), [1, 8, 7, 10, 11]);
    assert_eq!(tok.decode(&[1, 8, 9, 6, 5, 2]).unwrap(), "ab ab c");
    // The tokenizer exports to tokenizer.json and reads back identically.
    let json = tok.to_hf_json().unwrap();
    let back = HfTokenizer::from_bytes(json.as_bytes(), "exported.json").unwrap();
    // BOS/EOS guessed from the special tokens: `<|endoftext|>` is EOS, no BOS spelling.
    assert_eq!((back.bos_id(), back.eos_id()), (None, Some(0)));
    let back = back.with_special_ids(Some(1), Some(2)).unwrap();
    assert_eq!((back.bos_id(), back.eos_id()), (Some(1), Some(2)));
    assert!(matches!(
        back.decode(&[12]),
        Err(ModelError::Tokenizer { .. })
    ));
    assert_eq!(
        back.encode("<|im_start|>ab ab c 12").unwrap(),
        tok.encode("<|im_start|>ab ab c 12").unwrap()
    );
}

#[test]
fn gguf_v3_round_trip_untied() {
    let (w, expected) = tiny_llama(3, false);
    let bytes = w.bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let model = load_gguf(&path).unwrap();
    assert_eq!(model.source, path);
    check_round_trip(&model, &expected, false);

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.get("llama.block_count"), Some(&GgufValue::U32(2)));
    assert_eq!(file.tensors().len(), 3 + 9 * LAYERS);
    let q = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q.dims.clone(), q.ggml_type),
        (vec![32, 32], GgmlType::Q4_1)
    );
    assert_eq!(q.n_bytes, 32 * 20);
    assert_eq!(q.shape(), [32, 32]);
    // tensor_f32 gives the stored (still interleaved) rows.
    let raw = file.tensor_f32("blk.0.attn_q.weight").unwrap();
    let hf = &expected["model.layers.0.self_attn.q_proj.weight"].1;
    assert_eq!(
        raw.as_slice::<f32>().unwrap(),
        to_interleaved(hf, HEADS, HEAD_DIM, HIDDEN).as_slice()
    );
}

#[test]
fn gguf_v2_round_trip_tied_with_sentencepiece_tokenizer() {
    let (mut w, expected) = tiny_llama(2, true);
    // A SentencePiece-style ("llama") vocabulary of the same size.
    let spm = [
        "<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "ab", "▁ab", "<0x41>", "<0x0A>",
    ];
    w.set("tokenizer.ggml.model", V::Str("llama".into()));
    w.remove("tokenizer.ggml.pre");
    w.remove("tokenizer.ggml.merges");
    w.set("tokenizer.ggml.tokens", strs(&spm));
    let scores = [
        0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -7.0, -6.0, 0.0, 0.0,
    ];
    w.set(
        "tokenizer.ggml.scores",
        V::Arr(6, scores.iter().map(|&s| V::F32(s)).collect()),
    );
    let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 6, 6];
    w.set(
        "tokenizer.ggml.token_type",
        V::Arr(5, types.iter().map(|&t| V::I32(t)).collect()),
    );
    w.set("tokenizer.ggml.unknown_token_id", V::U32(0));
    w.set("tokenizer.ggml.add_space_prefix", V::Bool(true));
    let model = from_bytes(w.bytes()).unwrap();
    let tok = &model.tokenizer;
    // "▁ab▁ab▁c": "▁a" (-5) merges before "ab" (-7), then "▁ab" (-6).
    assert_eq!(tok.encode("ab ab c").unwrap(), [9, 9, 3, 6]);
    // "A" and "\n" fall back to byte pieces; "Z" has none and is unknown.
    assert_eq!(tok.encode("A\nZ").unwrap(), [3, 10, 11, 0]);
    assert_eq!(tok.decode(&[1, 9, 9, 3, 6, 2]).unwrap(), "ab ab c");
    assert_eq!(tok.decode(&[3, 10, 11]).unwrap(), "A\n");
    // Everything else as in v3, tied.
    let c = &model.config;
    assert_eq!(c["tie_word_embeddings"], true);
    assert!(!model.tensors.contains_key("lm_head.weight"));
    for (name, (shape, values)) in &expected {
        assert_eq!(model.tensors[name].shape(), shape.as_slice());
        assert_eq!(
            model.tensors[name].as_slice::<f32>().unwrap(),
            values.as_slice(),
            "{name}"
        );
    }
    assert_eq!(
        GgufFile::from_bytes(w.bytes(), "x").unwrap().alignment(),
        32
    );
}

#[test]
fn gguf_rope_scaling_and_eps_decimal() {
    let (mut w, _) = tiny_llama(3, true);
    w.set("llama.rope.scaling.type", V::Str("linear".into()));
    w.set("llama.rope.scaling.factor", V::F32(4.0));
    let model = from_bytes(w.bytes()).unwrap();
    assert_eq!(model.config["rope_scaling"]["rope_type"], "linear");
    assert_eq!(model.config["rope_scaling"]["factor"], 4.0);
    w.set("llama.rope.scaling.type", V::Str("su".into()));
    assert!(matches!(
        from_bytes(w.bytes()),
        Err(ModelError::Config { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Malformed GGUF input: every failure is a named error, never a panic

fn gguf_reason(r: Result<impl std::fmt::Debug, ModelError>) -> String {
    match r {
        Err(ModelError::Gguf { reason, .. }) => reason,
        other => panic!("expected ModelError::Gguf, got {other:?}"),
    }
}

#[test]
fn gguf_truncated_anywhere_in_the_header() {
    let (w, _) = tiny_llama(3, false);
    let (bytes, marks) = w.build();
    let data_start = *marks.last().unwrap();
    // Every byte of the header (every field boundary included) and a stride through the data.
    let cuts = (0..data_start).chain((data_start..bytes.len()).step_by(97));
    for cut in cuts {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec(), "cut.gguf");
        let reason = gguf_reason(r);
        assert!(
            reason.contains("truncated")
                || reason.contains("past the end")
                || reason.contains("remain"),
            "cut at {cut}: {reason}"
        );
    }
    for &m in &marks {
        assert!(GgufFile::from_bytes(bytes[..m.min(bytes.len() - 1)].to_vec(), "m").is_err());
    }
    assert!(GgufFile::from_bytes(bytes, "whole").is_ok());
}

#[test]
fn gguf_huge_counts_and_lengths() {
    let (w, _) = tiny_llama(3, false);
    let (bytes, _) = w.build();
    // Tensor count and metadata count at offsets 8 and 16.
    for (at, what) in [(8, "tensor count"), (16, "metadata count")] {
        for n in [u64::MAX, 1 << 40, 1_000_000] {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&n.to_le_bytes());
            let reason = gguf_reason(GgufFile::from_bytes(b, "h"));
            assert!(reason.contains(what), "{reason}");
        }
    }
    // First key's length.
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(gguf_reason(GgufFile::from_bytes(b, "h")).contains("length of key"));
    // Array element count and string length inside metadata.
    let mut w2 = w.clone();
    w2.set(
        "huge.array",
        V::Raw(
            9,
            [8u32.to_le_bytes().to_vec(), u64::MAX.to_le_bytes().to_vec()].concat(),
        ),
    );
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("element count"));
    let mut w2 = w.clone();
    w2.set(
        "huge.string",
        V::Raw(8, (1u64 << 62).to_le_bytes().to_vec()),
    );
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h"))
        .contains("length of metadata `huge.string`"));
    // Deeply nested arrays.
    let mut nested = V::U32(0);
    for _ in 0..20 {
        nested = V::Arr(nested.type_id(), vec![nested]);
    }
    let mut w2 = w.clone();
    w2.set("deep", nested);
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("nests arrays"));
    // Too many dims, dims whose product overflows, a zero dim, a dim not a block multiple.
    let mut w2 = w.clone();
    w2.tensor("output_norm.weight").dims = vec![1, 1, 1, 1, 32];
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("dimensions"));
    let mut w2 = w.clone();
    w2.tensor("output_norm.weight").dims = vec![1 << 32, 1 << 32, 1 << 32];
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("overflow"));
    let mut w2 = w.clone();
    w2.tensor("output_norm.weight").dims = vec![1 << 40, 1 << 20];
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("past the end"));
    let mut w2 = w.clone();
    w2.tensor("output_norm.weight").dims = vec![32, 0];
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("zero dimension"));
    let mut w2 = w.clone();
    w2.tensor("blk.0.attn_q.weight").dims = vec![16, 64];
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "h")).contains("block size"));
}

#[test]
fn gguf_bad_offsets_and_overlaps() {
    let (w, _) = tiny_llama(3, false);
    let mut w2 = w.clone();
    w2.tensor("output.weight").offset = Some(1 << 50);
    let reason = gguf_reason(GgufFile::from_bytes(w2.bytes(), "o"));
    assert!(
        reason.contains("output.weight") && reason.contains("past the end"),
        "{reason}"
    );
    let mut w2 = w.clone();
    w2.tensor("output.weight").offset = Some(u64::MAX - 63);
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "o")).contains("past the end"));
    let mut w2 = w.clone();
    w2.tensor("output.weight").offset = Some(3);
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "o")).contains("alignment"));
    // Two tensors sharing bytes.
    let mut w2 = w.clone();
    w2.tensor("blk.0.attn_k.weight").offset = Some(0);
    let reason = gguf_reason(GgufFile::from_bytes(w2.bytes(), "o"));
    assert!(reason.contains("overlaps"), "{reason}");
    // Duplicate tensor names and metadata keys.
    let mut w2 = w.clone();
    let dup = w2.tensors[1].clone();
    w2.tensors.push(dup);
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "o")).contains("duplicate tensor"));
    let mut w2 = w.clone();
    w2.kv.push(("general.name".into(), V::Str("again".into())));
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "o")).contains("duplicate metadata"));
    // Alignment that is not a power of two.
    let mut w2 = w.clone();
    w2.set("general.alignment", V::U32(48));
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "o")).contains("power of two"));
}

#[test]
fn gguf_bad_magic_version_and_values() {
    let (w, _) = tiny_llama(3, false);
    let bytes = w.bytes();
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(gguf_reason(GgufFile::from_bytes(b, "v")).contains("magic"));
    for (v, needle) in [
        (1u32, "version 1"),
        (4, "unsupported version 4"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let reason = gguf_reason(GgufFile::from_bytes(b, "v"));
        assert!(reason.contains(needle), "{reason}");
    }
    let mut w2 = w.clone();
    w2.set("bad.bool", V::Raw(7, vec![2]));
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "v")).contains("bool"));
    let mut w2 = w.clone();
    w2.set("bad.type", V::Raw(13, vec![0; 8]));
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "v")).contains("unknown value type id 13"));
    let mut w2 = w.clone();
    w2.set(
        "bad.utf8",
        V::Raw(8, [2u64.to_le_bytes().to_vec(), vec![0xff, 0xfe]].concat()),
    );
    assert!(gguf_reason(GgufFile::from_bytes(w2.bytes(), "v")).contains("UTF-8"));
    assert!(gguf_reason(GgufFile::from_bytes(Vec::new(), "empty")).contains("truncated"));
}

#[test]
fn gguf_unknown_and_unsupported_types() {
    let (w, _) = tiny_llama(3, false);
    let mut w2 = w.clone();
    w2.tensor("blk.1.ffn_up.weight").ty = 99;
    match GgufFile::from_bytes(w2.bytes(), "t") {
        Err(ModelError::UnsupportedGgufType {
            name, ggml_type, ..
        }) => {
            assert_eq!(
                (name.as_str(), ggml_type.as_str()),
                ("blk.1.ffn_up.weight", "unknown type id 99")
            )
        }
        other => panic!("{other:?}"),
    }
    // A known type without a dequantizer opens (for inspection) but does not load.
    let q4k = GgufWriter {
        version: 3,
        kv: vec![("general.architecture".into(), V::Str("llama".into()))],
        tensors: vec![TensorSpec {
            name: "x".into(),
            dims: vec![256, 2],
            ty: 12,
            data: vec![0; 288],
            offset: None,
        }],
        tensor_count: None,
    };
    let file = GgufFile::from_bytes(q4k.bytes(), "k.gguf").unwrap();
    assert_eq!(file.tensor_info("x").unwrap().n_bytes, 288);
    match file.tensor_f32("x") {
        Err(ModelError::UnsupportedGgufType {
            name, ggml_type, ..
        }) => assert_eq!((name.as_str(), ggml_type.as_str()), ("x", "Q4_K")),
        other => panic!("{other:?}"),
    }
    // In a model: Q5_0 (blocks of 32 values in 22 bytes) has the right shape but no dequantizer.
    let mut w2 = w.clone();
    let t = w2.tensor("blk.1.ffn_up.weight");
    t.ty = 6;
    t.data = vec![0; 64 * 22];
    match from_bytes(w2.bytes()) {
        Err(ModelError::UnsupportedGgufType {
            name, ggml_type, ..
        }) => {
            assert_eq!(
                (name.as_str(), ggml_type.as_str()),
                ("blk.1.ffn_up.weight", "Q5_0")
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn gguf_model_level_errors() {
    let (w, _) = tiny_llama(3, false);
    let mut w2 = w.clone();
    w2.set("general.architecture", V::Str("gpt2".into()));
    match from_bytes(w2.bytes()) {
        Err(ModelError::UnsupportedArchitecture { architecture, .. }) => {
            assert_eq!(architecture, "gpt2")
        }
        other => panic!("{other:?}"),
    }
    let mut w2 = w.clone();
    w2.tensors.retain(|t| t.name != "blk.1.ffn_down.weight");
    match from_bytes(w2.bytes()) {
        Err(ModelError::MissingTensor { name, .. }) => assert_eq!(name, "blk.1.ffn_down.weight"),
        other => panic!("{other:?}"),
    }
    let mut w2 = w.clone();
    w2.tensor("blk.0.attn_v.weight").dims = vec![32, 32];
    w2.tensor("blk.0.attn_v.weight").data = vec![0; 32 * 34];
    match from_bytes(w2.bytes()) {
        Err(ModelError::TensorShape {
            name,
            expected,
            actual,
            ..
        }) => {
            assert!(name.contains("blk.0.attn_v.weight"));
            assert_eq!((expected, actual), (vec![16, 32], vec![32, 32]));
        }
        other => panic!("{other:?}"),
    }
    let mut w2 = w.clone();
    w2.tensors.push(TensorSpec {
        name: "blk.0.attn_q.bias".into(),
        dims: vec![32],
        ty: 0,
        data: vec![0; 128],
        offset: None,
    });
    assert!(gguf_reason(from_bytes(w2.bytes())).contains("unexpected tensor `blk.0.attn_q.bias`"));
    // NaN in an F32 norm, infinity in an F16 projection.
    let mut w2 = w.clone();
    w2.tensor("blk.1.attn_norm.weight").data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    match from_bytes(w2.bytes()) {
        Err(ModelError::NonFinite {
            name, what, index, ..
        }) => assert_eq!(
            (name.as_str(), what, index),
            ("blk.1.attn_norm.weight", "NaN", 2)
        ),
        other => panic!("{other:?}"),
    }
    let mut w2 = w.clone();
    w2.tensor("output.weight").data[2..4].copy_from_slice(&f16::INFINITY.to_bits().to_le_bytes());
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::NonFinite {
            what: "infinity",
            index: 1,
            ..
        })
    ));
    // Config: missing key, heads not dividing the width, kv heads not dividing heads.
    let mut w2 = w.clone();
    w2.remove("llama.block_count");
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Config { .. })
    ));
    let mut w2 = w.clone();
    w2.set("llama.attention.head_count", V::U32(5));
    w2.remove("llama.rope.dimension_count");
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Config { .. })
    ));
    let mut w2 = w.clone();
    w2.set("llama.attention.head_count_kv", V::U32(3));
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Config { .. })
    ));
    let mut w2 = w.clone();
    w2.set("llama.embedding_length", V::Str("32".into()));
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Config { .. })
    ));
    // Tokenizer: unknown pre-tokenizer, out-of-range BOS, missing tokens.
    let mut w2 = w.clone();
    w2.set("tokenizer.ggml.pre", V::Str("mystery".into()));
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Tokenizer { .. })
    ));
    let mut w2 = w.clone();
    w2.set("tokenizer.ggml.bos_token_id", V::U32(12));
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Tokenizer { .. })
    ));
    let mut w2 = w.clone();
    w2.remove("tokenizer.ggml.tokens");
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Tokenizer { .. })
    ));
    let mut w2 = w.clone();
    w2.set("tokenizer.ggml.merges", strs(&["Ġ a", "a z"]));
    assert!(matches!(
        from_bytes(w2.bytes()),
        Err(ModelError::Tokenizer { .. })
    ));
}

/// Random byte flips in a valid file: any outcome but a panic.
#[test]
fn gguf_random_corruption_never_panics() {
    let (w, _) = tiny_llama(3, false);
    let bytes = w.bytes();
    let mut s = 0x1234_5678u64;
    for _ in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (s >> 33) as usize % 2000.min(b.len());
            b[at] = (s >> 20) as u8;
        }
        let _ = from_bytes(b);
    }
}

// ---------------------------------------------------------------------------------------------
// llama2.c checkpoints written here

struct TinyLlama2c {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq_len: usize,
    shared: bool,
}

impl TinyLlama2c {
    /// The checkpoint, with every f32 equal to its own index in the data (so each tensor's
    /// origin can be checked).
    fn bytes(&self) -> Vec<u8> {
        let vocab_field = if self.shared {
            self.vocab as i32
        } else {
            -(self.vocab as i32)
        };
        let header = [
            self.dim,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            0,
            self.seq_len,
        ];
        let mut out: Vec<u8> = header
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| if i == 5 { vocab_field } else { v as i32 }.to_le_bytes())
            .collect();
        let n = self.n_floats();
        out.extend((0..n).flat_map(|i| (i as f32).to_le_bytes()));
        out
    }

    fn sections(&self) -> Vec<(&'static str, usize)> {
        let (d, h, l, v) = (self.dim, self.hidden, self.layers, self.vocab);
        let kv = d / self.heads * self.kv_heads;
        let hs = d / self.heads;
        let mut s = vec![
            ("emb", v * d),
            ("rms_att", l * d),
            ("wq", l * d * d),
            ("wk", l * kv * d),
            ("wv", l * kv * d),
            ("wo", l * d * d),
            ("rms_ffn", l * d),
            ("w1", l * h * d),
            ("w2", l * d * h),
            ("w3", l * h * d),
            ("rms_final", d),
            ("freq_real", self.seq_len * hs / 2),
            ("freq_imag", self.seq_len * hs / 2),
        ];
        if !self.shared {
            s.push(("wcls", v * d));
        }
        s
    }

    fn n_floats(&self) -> usize {
        self.sections().iter().map(|s| s.1).sum()
    }

    fn start(&self, name: &str) -> usize {
        let mut acc = 0;
        for (n, len) in self.sections() {
            if n == name {
                return acc;
            }
            acc += len;
        }
        panic!("{name}")
    }
}

fn tok_bin(pieces: &[(&str, f32)]) -> Vec<u8> {
    let mut out = 16i32.to_le_bytes().to_vec();
    for (p, s) in pieces {
        out.extend(s.to_le_bytes());
        out.extend((p.len() as i32).to_le_bytes());
        out.extend(p.as_bytes());
    }
    out
}

fn tiny_tok(vocab: usize) -> Vec<u8> {
    let mut pieces: Vec<(String, f32)> = vec![
        ("<unk>".into(), 0.0),
        ("\n<s>\n".into(), 0.0),
        ("\n</s>\n".into(), 0.0),
        (" ".into(), -1.0),
    ];
    while pieces.len() < vocab {
        pieces.push((format!("t{}", pieces.len()), -(pieces.len() as f32)));
    }
    let refs: Vec<(&str, f32)> = pieces.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    tok_bin(&refs)
}

fn l2c_reason(r: Result<RawModel, ModelError>) -> String {
    match r {
        Err(ModelError::Llama2c { reason, .. }) => reason,
        other => panic!("expected ModelError::Llama2c, got {other:?}"),
    }
}

#[test]
fn llama2c_tensor_mapping() {
    let m = TinyLlama2c {
        dim: 8,
        hidden: 12,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        vocab: 6,
        seq_len: 4,
        shared: false,
    };
    let model = load_llama2c_bytes(&m.bytes(), &tiny_tok(6), Path::new("tiny.bin")).unwrap();
    assert_eq!(model.format, "llama2.c");
    let c = &model.config;
    assert_eq!(
        (c["hidden_size"].as_u64(), c["intermediate_size"].as_u64()),
        (Some(8), Some(12))
    );
    assert_eq!(
        (
            c["num_attention_heads"].as_u64(),
            c["num_key_value_heads"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        (
            c["vocab_size"].as_u64(),
            c["max_position_embeddings"].as_u64()
        ),
        (Some(6), Some(4))
    );
    assert_eq!(
        (c["rope_theta"].as_f64(), c["rms_norm_eps"].as_f64()),
        (Some(10000.0), Some(1e-5))
    );
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(
        (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    let t = |name: &str| model.tensors[name].as_slice::<f32>().unwrap().to_vec();
    let first = |name: &str| t(name)[0] as usize;
    // Layer 1's slice of each stacked section; w1 = gate, w3 = up, w2 = down.
    assert_eq!(
        first("model.layers.1.input_layernorm.weight"),
        m.start("rms_att") + 8
    );
    assert_eq!(
        first("model.layers.1.self_attn.v_proj.weight"),
        m.start("wv") + 32
    );
    assert_eq!(
        first("model.layers.1.self_attn.o_proj.weight"),
        m.start("wo") + 64
    );
    assert_eq!(
        first("model.layers.1.post_attention_layernorm.weight"),
        m.start("rms_ffn") + 8
    );
    assert_eq!(
        first("model.layers.1.mlp.gate_proj.weight"),
        m.start("w1") + 96
    );
    assert_eq!(
        first("model.layers.1.mlp.up_proj.weight"),
        m.start("w3") + 96
    );
    assert_eq!(
        first("model.layers.1.mlp.down_proj.weight"),
        m.start("w2") + 96
    );
    assert_eq!(first("model.norm.weight"), m.start("rms_final"));
    assert_eq!(first("lm_head.weight"), m.start("wcls"));
    assert_eq!(
        model.tensors["model.layers.0.mlp.down_proj.weight"].shape(),
        [8, 12]
    );
    assert_eq!(model.tensors["lm_head.weight"].shape(), [6, 8]);
    // Q rows within each head of width 4 come from stored rows (0, 2, 1, 3).
    let q = t("model.layers.0.self_attn.q_proj.weight");
    let rows: Vec<usize> = q
        .chunks(8)
        .map(|r| (r[0] as usize - m.start("wq")) / 8)
        .collect();
    assert_eq!(rows, [0, 2, 1, 3, 4, 6, 5, 7]);
    let k = t("model.layers.1.self_attn.k_proj.weight");
    let rows: Vec<usize> = k
        .chunks(8)
        .map(|r| (r[0] as usize - m.start("wk") - 32) / 8)
        .collect();
    assert_eq!(rows, [0, 2, 1, 3]);

    let shared = TinyLlama2c { shared: true, ..m };
    let model = load_llama2c_bytes(&shared.bytes(), &tiny_tok(6), Path::new("t")).unwrap();
    assert!(!model.tensors.contains_key("lm_head.weight"));
    assert_eq!(model.config["tie_word_embeddings"], true);
}

#[test]
fn llama2c_header_validation() {
    let base = TinyLlama2c {
        dim: 8,
        hidden: 12,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        vocab: 6,
        seq_len: 4,
        shared: true,
    };
    let tok = tiny_tok(6);
    let with_field = |i: usize, v: i32| {
        let mut b = base.bytes();
        b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        load_llama2c_bytes(&b, &tok, Path::new("h.bin"))
    };
    assert!(l2c_reason(with_field(3, 0)).contains("n_heads is 0"));
    assert!(l2c_reason(with_field(4, 0)).contains("n_kv_heads is 0"));
    assert!(l2c_reason(with_field(3, 3)).contains("not divisible by n_heads"));
    assert!(l2c_reason(with_field(4, 3)).contains("not divisible by n_kv_heads"));
    assert!(l2c_reason(with_field(0, -8)).contains("dim is -8"));
    assert!(l2c_reason(with_field(2, i32::MAX)).contains("implies"));
    assert!(l2c_reason(with_field(1, i32::MAX)).contains("implies"));
    // Wrong file size: one float short, one float extra, header only, empty.
    let b = base.bytes();
    assert!(
        l2c_reason(load_llama2c_bytes(&b[..b.len() - 4], &tok, Path::new("s"))).contains("implies")
    );
    let mut longer = b.clone();
    longer.extend([0; 4]);
    assert!(l2c_reason(load_llama2c_bytes(&longer, &tok, Path::new("s"))).contains("implies"));
    assert!(l2c_reason(load_llama2c_bytes(&b[..28], &tok, Path::new("s"))).contains("implies"));
    assert!(l2c_reason(load_llama2c_bytes(&b[..10], &tok, Path::new("s"))).contains("header"));
    // A tokenizer with fewer tokens than the header's vocab_size.
    assert!(matches!(
        load_llama2c_bytes(&b, &tiny_tok(5), Path::new("s")),
        Err(ModelError::Tokenizer { .. })
    ));
    // NaN in a weight.
    let mut nan = b.clone();
    let at = 28 + 4 * base.start("w2") + 4;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    match load_llama2c_bytes(&nan, &tok, Path::new("s")) {
        Err(ModelError::NonFinite { name, index, .. }) => assert_eq!(
            (name.as_str(), index),
            ("w2[0] (model.layers.0.mlp.down_proj.weight)", 1)
        ),
        other => panic!("{other:?}"),
    }
    // Missing files are I/O errors naming the path.
    let err = load_llama2c(
        Path::new("/nonexistent/m.bin"),
        Path::new("/nonexistent/t.bin"),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }) && err.to_string().contains("/nonexistent/m.bin"));
}

// ---------------------------------------------------------------------------------------------
// Real files

fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent", p.display());
        None
    }
}

fn fixture(name: &str) -> Option<sq_tensor::SafetensorsFile> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/real"
    ))
    .join(name);
    if p.is_file() {
        Some(sq_tensor::SafetensorsFile::open(&p).unwrap())
    } else {
        eprintln!("skipping golden comparison: {} is absent", p.display());
        None
    }
}

fn ids_of(file: &sq_tensor::SafetensorsFile, name: &str) -> Vec<u32> {
    file.tensor(name)
        .unwrap()
        .to_vec::<i32>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}

fn smollm2_path(shared: &Path) -> PathBuf {
    shared.join("assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn smollm2_gguf_loads() {
    let Some(shared) = shared() else { return };
    let path = smollm2_path(&shared);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(
        file.tensor_info("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        file.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    assert_eq!(
        file.get("tokenizer.ggml.pre").and_then(GgufValue::as_str),
        Some("smollm")
    );

    let model = load_gguf(&path).unwrap();
    let c = &model.config;
    for (key, value) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("vocab_size", 49152),
        ("max_position_embeddings", 8192),
        ("head_dim", 64),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(c[key].as_u64(), Some(value), "{key}");
    }
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(model.tensors.len(), 2 + 30 * 9);
    let shape = |n: &str| model.tensors[n].shape().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(shape("model.layers.29.self_attn.q_proj.weight"), [576, 576]);
    assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), [192, 576]);
    assert_eq!(shape("model.layers.0.self_attn.v_proj.weight"), [192, 576]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [576, 1536]);
    assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), [1536, 576]);
    assert_eq!(shape("model.norm.weight"), [576]);
    // The loaded K is the stored K with rows un-permuted per KV head.
    let stored = file.tensor_f32("blk.3.attn_k.weight").unwrap();
    let stored = stored.as_slice::<f32>().unwrap();
    let k = model.tensors["model.layers.3.self_attn.k_proj.weight"]
        .as_slice::<f32>()
        .unwrap();
    assert_eq!(&k[576..2 * 576], &stored[2 * 576..3 * 576]); // HF row 1 = stored row 2
    assert_eq!(&k[32 * 576..33 * 576], &stored[576..2 * 576]); // HF row 32 = stored row 1
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(shared) = shared() else { return };
    let file = GgufFile::open(smollm2_path(&shared)).unwrap();
    let tok = sq_model::tokenizer::hf_tokenizer_from_gguf(&file).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.vocab_size()),
        (Some(1), Some(2), 49152)
    );
    let prompt = "The capital of France is";
    let ids = tok.encode(prompt).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), prompt);
    // Chat markers are special tokens; digits are split one by one.
    let chat = tok.encode("<|im_start|>user\nIn 2024<|im_end|>").unwrap();
    assert_eq!(chat[0], 1);
    assert_eq!(*chat.last().unwrap(), 2);
    assert_eq!(tok.decode(&chat).unwrap(), "user\nIn 2024");
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4);
    // Streaming through multi-byte characters split across byte-level tokens.
    let emoji = tok.encode("Café 日本語 🎉🦀 done").unwrap();
    let full = tok.decode(&emoji).unwrap();
    assert_eq!(full, "Café 日本語 🎉🦀 done");
    for n in 0..emoji.len() {
        let part = tok.decode(&emoji[..n]).unwrap();
        assert!(
            full.starts_with(&part) && !part.contains('\u{FFFD}'),
            "prefix {n}: {part:?}"
        );
    }

    let text = std::fs::read_to_string(shared.join("assets/wikitext-2/wiki.test.txt")).unwrap();
    let wiki_ids = tok.encode(&text).unwrap();
    // Streaming: every decoded prefix is a prefix of the full text.
    let head = &wiki_ids[..400];
    let full = tok.decode(head).unwrap();
    for n in 0..head.len() {
        assert!(
            full.starts_with(&tok.decode(&head[..n]).unwrap()),
            "prefix {n}"
        );
    }
    let Some(golden) = fixture("smollm2_golden.safetensors") else {
        return;
    };
    assert_eq!(ids, ids_of(&golden, "input_ids"));
    let expected = ids_of(&golden, "wikitext_test_ids");
    let first_diff = wiki_ids.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "first differing token index");
    assert!(wiki_ids.len() >= expected.len());
    let meta = golden.user_metadata().expect("golden metadata");
    assert_eq!(
        wiki_ids.len().to_string(),
        meta["wikitext_test_total_tokens"]
    );
    // A probe where llama.cpp's "smollm" pre-tokenizer (single digits first) and transformers'
    // GGUF tokenizer (GPT-2 regex only) disagree: we follow llama.cpp and the original model.
    let probe = tok.encode(&meta["tokenizer_probe_text"]).unwrap();
    assert_eq!(probe, ids_of(&golden, "tokenizer_probe_ids"));
    assert_ne!(
        probe,
        ids_of(&golden, "tokenizer_probe_ids_transformers_gguf")
    );
}

#[test]
fn smollm2_forward_matches_transformers() {
    let Some(shared) = shared() else { return };
    let Some(golden) = fixture("smollm2_golden.safetensors") else {
        return;
    };
    let model = load_gguf(&smollm2_path(&shared)).unwrap();
    let f = Forward::new(&model);
    let ids = model.tokenizer.encode("The capital of France is").unwrap();
    let logits = f.logits(&ids);
    let expected = golden.tensor("last_logits").unwrap().to_f32_vec().unwrap();
    let last = logits.last().unwrap();
    let max_diff = last
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 5e-4, "max |logit difference| = {max_diff}");
    eprintln!("SmolLM2 max |logit difference| vs transformers: {max_diff}");
    let expected = ids_of(&golden, "greedy_ids");
    let greedy = f.greedy(&ids, expected.len());
    assert_eq!(greedy, expected);
    assert!(model
        .tokenizer
        .decode(&greedy)
        .unwrap()
        .starts_with(" Paris."));
}

fn stories_tokenizer(shared: &Path) -> Llama2cTokenizer {
    Llama2cTokenizer::from_file(shared.join("assets/stories260k/tok512.bin"), Some(512)).unwrap()
}

#[test]
fn stories260k_tokenizer() {
    let Some(shared) = shared() else { return };
    let tok = stories_tokenizer(&shared);
    let ids = tok.encode("Once upon a time").unwrap();
    let mut with_bos = vec![Llama2cTokenizer::BOS];
    with_bos.extend(&ids);
    assert_eq!(tok.decode(&with_bos).unwrap(), "Once upon a time");
    assert_eq!(tok.decode(&ids).unwrap(), " Once upon a time");
    // The SentencePiece-style tokenizer.json export encodes like run.c on real text.
    let hf = HfTokenizer::from_bytes(tok.to_hf_json().unwrap().as_bytes(), "tok512.json").unwrap();
    let text = std::fs::read_to_string(shared.join("assets/wikitext-2/wiki.valid.txt")).unwrap();
    for line in text
        .lines()
        .take(300)
        .chain(["Once upon a time", "Lily's cat: \"Meow!\" ☃ 42"])
    {
        assert_eq!(
            hf.encode(line).unwrap(),
            tok.encode(line).unwrap(),
            "{line:?}"
        );
        assert_eq!(
            hf.decode(&tok.encode(line).unwrap()).unwrap(),
            tok.decode(
                &with_bos[..1]
                    .iter()
                    .chain(&tok.encode(line).unwrap())
                    .copied()
                    .collect::<Vec<_>>()
            )
            .unwrap()
        );
    }
    let Some(golden) = fixture("stories260k_golden.safetensors") else {
        return;
    };
    assert_eq!(with_bos, ids_of(&golden, "input_ids"));
}

// ---------------------------------------------------------------------------------------------
// A test-only f32 LLaMA forward (Hugging Face rotate_half RoPE) on the un-permuted weights

struct Forward<'a> {
    m: &'a RawModel,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    eps: f32,
    theta: f32,
}

/// Per layer, the keys and values of every position so far.
type KvCache = (Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>);

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
}

impl<'a> Forward<'a> {
    fn new(m: &'a RawModel) -> Self {
        let c = &m.config;
        let get = |k: &str| c[k].as_u64().unwrap() as usize;
        Forward {
            m,
            dim: get("hidden_size"),
            heads: get("num_attention_heads"),
            kv_heads: get("num_key_value_heads"),
            layers: get("num_hidden_layers"),
            eps: c["rms_norm_eps"].as_f64().unwrap() as f32,
            theta: c["rope_theta"].as_f64().unwrap() as f32,
        }
    }

    fn w(&self, name: &str) -> &[f32] {
        self.m.tensors[name].as_slice::<f32>().unwrap()
    }

    fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
        w.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let s = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * s * g).collect()
    }

    /// rotate_half: pairs (i, i + hd/2) rotated by pos * theta^(-2i/hd).
    fn rope(&self, v: &mut [f32], pos: usize) {
        let hd = self.dim / self.heads;
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let freq = self.theta.powf(-((2 * i) as f32) / hd as f32);
                let (s, c) = (pos as f32 * freq).sin_cos();
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * c - b * s;
                head[i + hd / 2] = b * c + a * s;
            }
        }
    }

    /// Logits at every position of `ids` (only the last for long vocabularies, to save time).
    fn logits(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        self.extend(
            &mut (vec![Vec::new(); self.layers], vec![Vec::new(); self.layers]),
            ids,
        )
    }

    /// Greedy continuation of `ids` by `n` tokens, with a KV cache.
    fn greedy(&self, ids: &[u32], n: usize) -> Vec<u32> {
        let mut cache = (vec![Vec::new(); self.layers], vec![Vec::new(); self.layers]);
        let mut last = self.extend(&mut cache, ids).pop().unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            out.push(argmax(&last));
            last = self
                .extend(&mut cache, &out[out.len() - 1..])
                .pop()
                .unwrap();
        }
        out
    }

    /// Runs `ids` after the positions already in the (keys, values) cache.
    fn extend(&self, cache: &mut KvCache, ids: &[u32]) -> Vec<Vec<f32>> {
        let (d, hd) = (self.dim, self.dim / self.heads);
        let group = self.heads / self.kv_heads;
        let emb = self.w("model.embed_tokens.weight");
        let (keys, vals) = cache;
        let start = keys[0].len();
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let pos = start + i;
            let mut x = emb[id as usize * d..(id as usize + 1) * d].to_vec();
            for l in 0..self.layers {
                let p = format!("model.layers.{l}");
                let h = Self::rmsnorm(&x, self.w(&format!("{p}.input_layernorm.weight")), self.eps);
                let mut q = Self::matvec(self.w(&format!("{p}.self_attn.q_proj.weight")), &h);
                let mut k = Self::matvec(self.w(&format!("{p}.self_attn.k_proj.weight")), &h);
                let v = Self::matvec(self.w(&format!("{p}.self_attn.v_proj.weight")), &h);
                self.rope(&mut q, pos);
                self.rope(&mut k, pos);
                keys[l].push(k);
                vals[l].push(v);
                let mut att = vec![0.0; d];
                for head in 0..self.heads {
                    let kvh = head / group;
                    let qh = &q[head * hd..(head + 1) * hd];
                    let scores: Vec<f32> = keys[l]
                        .iter()
                        .map(|k| {
                            qh.iter()
                                .zip(&k[kvh * hd..(kvh + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                / (hd as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (t, w) in e.iter().enumerate() {
                        for i in 0..hd {
                            att[head * hd + i] += w / z * vals[l][t][kvh * hd + i];
                        }
                    }
                }
                let o = Self::matvec(self.w(&format!("{p}.self_attn.o_proj.weight")), &att);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let h = Self::rmsnorm(
                    &x,
                    self.w(&format!("{p}.post_attention_layernorm.weight")),
                    self.eps,
                );
                let g = Self::matvec(self.w(&format!("{p}.mlp.gate_proj.weight")), &h);
                let u = Self::matvec(self.w(&format!("{p}.mlp.up_proj.weight")), &h);
                let a: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = Self::matvec(self.w(&format!("{p}.mlp.down_proj.weight")), &a);
                x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
            if i + 1 < ids.len() && emb.len() > 1 << 20 {
                continue;
            }
            let x = Self::rmsnorm(&x, self.w("model.norm.weight"), self.eps);
            out.push(Self::matvec(emb, &x));
        }
        out
    }
}

#[test]
fn stories260k_forward_matches_llama2c_reference() {
    let model = embedded_stories260k().unwrap();
    let f = Forward::new(&model);
    let tok = &model.tokenizer;
    let mut ids = vec![1];
    ids.extend(tok.encode("Once upon a time").unwrap());
    // Greedy decoding reproduces llama2.c's documented story.
    let mut seq = ids.clone();
    seq.extend(f.greedy(&ids, 30));
    let text = tok.decode(&seq).unwrap();
    assert!(
        text.starts_with("Once upon a time, there was a little girl named Lily."),
        "{text}"
    );

    let Some(golden) = fixture("stories260k_golden.safetensors") else {
        return;
    };
    assert_eq!(ids, ids_of(&golden, "input_ids"));
    assert_eq!(&seq[ids.len()..], ids_of(&golden, "greedy_ids").as_slice());
    let expected = golden.tensor("logits").unwrap();
    assert_eq!(expected.shape(), [ids.len(), 512]);
    let expected = expected.to_f32_vec().unwrap();
    let ours: Vec<f32> = f.logits(&ids).concat();
    let max_diff = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 1e-4, "max |logit difference| = {max_diff}");
    eprintln!("stories260K max |logit difference| vs llama2.c reference: {max_diff}");
    // Without the un-permutation the logits would be far off: permuting Q and K back must break it.
    let mut broken = embedded_stories260k().unwrap();
    for l in 0..f.layers {
        let name = format!("model.layers.{l}.self_attn.q_proj.weight");
        let q = broken.tensors[&name].as_slice::<f32>().unwrap().to_vec();
        let p =
            sq_model::raw::permute_interleaved_rope(&q, f.heads, f.dim / f.heads, f.dim).unwrap();
        broken.tensors.insert(
            name,
            sq_tensor::Tensor::from_vec(p, &[f.dim, f.dim]).unwrap(),
        );
    }
    let fb = Forward { m: &broken, ..f };
    let bad: Vec<f32> = fb.logits(&ids).concat();
    let bad_diff = bad
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(bad_diff > 0.1, "{bad_diff}");
}

#[test]
fn stories260k_file_and_embedded_agree() {
    let Some(shared) = shared() else { return };
    let dir = shared.join("assets/stories260k");
    let a = load_llama2c(&dir.join("stories260K.bin"), &dir.join("tok512.bin")).unwrap();
    let b = embedded_stories260k().unwrap();
    assert_eq!(a.config, b.config);
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &a.tensors {
        assert_eq!(
            t.as_slice::<f32>().unwrap(),
            b.tensors[name].as_slice::<f32>().unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        a.tokenizer.encode("Lily").unwrap(),
        b.tokenizer.encode("Lily").unwrap()
    );
}

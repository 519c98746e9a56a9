//! `cargo xtask scale --gb N`: quantize a synthetic LLaMA-shaped checkpoint of about N GB in
//! streaming mode and report peak memory, throughput and where the time went.
//!
//! The checkpoint (random bf16 weights, a few outlier channels in every norm so the activations
//! have outliers to smooth) is written once, as Hugging Face shards with an index, under
//! `<target>/scale/llama-<N>gb`, and reused by later runs.

use anyhow::{bail, Context, Result};
use sq_tensor::{DType, TensorSource};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A LLaMA-7B-shaped layer: 202M parameters, 405 MB in bf16.
const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 11008;
const HEADS: usize = 32;
const VOCAB: usize = 32000;
/// Hugging Face's default shard size.
const SHARD_BYTES: u64 = 5_000_000_000;
/// Input channels of every norm given a large gain (activation outliers).
const OUTLIER_CHANNELS: [usize; 4] = [7, 1033, 2222, 3901];

struct Options {
    gb: f64,
    windows: usize,
    seq_len: usize,
    keep: bool,
    /// A smoothquant binary to use instead of building the release one.
    bin: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        gb: 16.0,
        windows: 8,
        seq_len: 128,
        keep: false,
        bin: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--gb" => o.gb = value("--gb")?.parse().context("--gb takes a number")?,
            "--windows" => o.windows = value("--windows")?.parse().context("--windows N")?,
            "--seq-len" => o.seq_len = value("--seq-len")?.parse().context("--seq-len N")?,
            "--keep" => o.keep = true,
            "--bin" => o.bin = Some(PathBuf::from(value("--bin")?)),
            other => bail!("unknown option `{other}` for `cargo xtask scale` (--gb N, --windows N, --seq-len N, --keep, --bin PATH)"),
        }
    }
    if o.gb.is_nan() || o.gb < 1.0 || o.windows == 0 || o.seq_len == 0 {
        bail!("--gb must be at least 1 (one 7B-shaped layer is 0.4 GB), --windows and --seq-len positive");
    }
    Ok(o)
}

/// Random bf16 values, generated while they are written (splitmix64 per 4 values).
struct RandomBf16 {
    shape: Vec<usize>,
    seed: u64,
    /// Values are uniform in [-scale, scale].
    scale: f32,
}

/// A norm's gain: 1, with a large gain at the outlier channels.
struct NormGain {
    shape: Vec<usize>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TensorSource for RandomBf16 {
    fn dtype(&self) -> DType {
        DType::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn write_data(&self, out: &mut dyn Write) -> sq_tensor::Result<()> {
        let n: usize = self.shape.iter().product();
        let mut state = self.seed;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(1 << 19);
            buf.clear();
            for _ in 0..chunk.div_ceil(4) {
                let r = splitmix(&mut state);
                for k in 0..4 {
                    let u = ((r >> (16 * k)) & 0xFFFF) as f32 / 65535.0;
                    let v = (2.0 * u - 1.0) * self.scale;
                    buf.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
                }
            }
            buf.truncate(2 * chunk);
            out.write_all(&buf)
                .map_err(|e| sq_tensor::TensorError::io("<scale checkpoint>", "writing", e))?;
            done += chunk;
        }
        Ok(())
    }
}

impl TensorSource for NormGain {
    fn dtype(&self) -> DType {
        DType::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn write_data(&self, out: &mut dyn Write) -> sq_tensor::Result<()> {
        let mut buf = Vec::with_capacity(2 * self.shape[0]);
        for c in 0..self.shape[0] {
            let v: f32 = if OUTLIER_CHANNELS.contains(&c) {
                24.0
            } else {
                1.0
            };
            buf.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
        }
        out.write_all(&buf)
            .map_err(|e| sq_tensor::TensorError::io("<scale checkpoint>", "writing", e))
    }
}

enum Synthetic {
    Random(RandomBf16),
    Norm(NormGain),
}

impl TensorSource for Synthetic {
    fn dtype(&self) -> DType {
        DType::BF16
    }
    fn shape(&self) -> &[usize] {
        match self {
            Synthetic::Random(r) => &r.shape,
            Synthetic::Norm(n) => &n.shape,
        }
    }
    fn write_data(&self, out: &mut dyn Write) -> sq_tensor::Result<()> {
        match self {
            Synthetic::Random(r) => r.write_data(out),
            Synthetic::Norm(n) => n.write_data(out),
        }
    }
}

fn layers_for(gb: f64) -> usize {
    let per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) as u64;
    let outer = 2 * 2 * (VOCAB * HIDDEN) as u64;
    ((gb * 1e9 - outer as f64) / per_layer as f64)
        .round()
        .max(1.0) as usize
}

/// Every tensor of the checkpoint, in the order of the shards.
fn tensors(layers: usize) -> Vec<(String, Synthetic)> {
    let mut seed = 1u64;
    let mut random = |shape: &[usize], fan_in: usize| {
        seed += 1;
        Synthetic::Random(RandomBf16 {
            shape: shape.to_vec(),
            seed: seed.wrapping_mul(0x1234_5678_9ABC_DEF1),
            scale: (3.0 / fan_in as f32).sqrt(),
        })
    };
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        random(&[VOCAB, HIDDEN], 3),
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((
                format!("{p}.{norm}.weight"),
                Synthetic::Norm(NormGain {
                    shape: vec![HIDDEN],
                }),
            ));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((
                format!("{p}.self_attn.{proj}.weight"),
                random(&[HIDDEN, HIDDEN], HIDDEN),
            ));
        }
        for (proj, shape, fan_in) in [
            ("gate_proj", [INTERMEDIATE, HIDDEN], HIDDEN),
            ("up_proj", [INTERMEDIATE, HIDDEN], HIDDEN),
            ("down_proj", [HIDDEN, INTERMEDIATE], INTERMEDIATE),
        ] {
            out.push((format!("{p}.mlp.{proj}.weight"), random(&shape, fan_in)));
        }
    }
    out.push((
        "model.norm.weight".to_string(),
        Synthetic::Norm(NormGain {
            shape: vec![HIDDEN],
        }),
    ));
    out.push((
        "lm_head.weight".to_string(),
        random(&[VOCAB, HIDDEN], HIDDEN),
    ));
    out
}

/// Write the checkpoint into `dir` (a fresh directory) as shards of at most [`SHARD_BYTES`].
fn write_checkpoint(root: &Path, dir: &Path, layers: usize) -> Result<()> {
    let all = tensors(layers);
    let mut shards: Vec<Vec<(String, Synthetic)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in all {
        let bytes = 2 * t.shape().iter().product::<usize>() as u64;
        if size + bytes > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push((name, t));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        eprintln!("scale: writing {file} ({} tensors)", shard.len());
        sq_tensor::save_safetensors(dir.join(&file), shard, None)?;
        for (name, t) in shard {
            weight_map.insert(name.clone(), file.clone().into());
            total += 2 * t.shape().iter().product::<usize>() as u64;
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    // A small BPE tokenizer from the test fixtures: its ids are all below VOCAB.
    let fixture = root.join("tests/fixtures/hf/llama-gqa");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

pub fn scale(root: &Path, args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let layers = layers_for(o.gb);
    let target = target_dir(root);
    let base = target.join("scale");
    let ckpt = base.join(format!("llama-{}gb", o.gb));
    if !ckpt.join("model.safetensors.index.json").is_file() {
        std::fs::create_dir_all(&base)?;
        let tmp = base.join(format!(".llama-{}gb.partial", o.gb));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        eprintln!(
            "scale: generating a {layers}-layer LLaMA-shaped bf16 checkpoint in {}",
            ckpt.display()
        );
        let start = std::time::Instant::now();
        write_checkpoint(root, &tmp, layers)?;
        std::fs::rename(&tmp, &ckpt)?;
        eprintln!("scale: generated in {:.0} s", start.elapsed().as_secs_f64());
    }
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => {
            let status = Command::new("cargo")
                .args(["build", "--release", "-p", "sq-cli"])
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build --release -p sq-cli failed");
            }
            target.join("release/smoothquant")
        }
    };
    let out = base.join("quantized");
    let calib = root.join("crates/sq-cli/assets/demo/calib.txt");
    let windows = o.windows.to_string();
    let seq_len = o.seq_len.to_string();
    let args = [
        "quantize",
        "--model",
        ckpt.to_str().context("non-UTF-8 path")?,
        "--calib-data",
        calib.to_str().context("non-UTF-8 path")?,
        "--calib-samples",
        &windows,
        "--calib-seq-len",
        &seq_len,
        "--stream",
        "--force",
        "--out",
        out.to_str().context("non-UTF-8 path")?,
        "--json",
    ];
    eprintln!("scale: smoothquant {}", args.join(" "));
    let output = Command::new(&bin)
        .args(args)
        .output()
        .context("running smoothquant")?;
    if !output.status.success() {
        bail!(
            "smoothquant quantize failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reading the JSON report")?;
    let out_bytes = dir_bytes(&out);
    if !o.keep {
        std::fs::remove_dir_all(&out).ok();
    }
    let s = &v["stream"];
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let input = f("input_bytes");
    let peak = v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
    println!(
        "checkpoint      {} ({layers} layers, {:.2} GB bf16)",
        ckpt.display(),
        input / 1e9
    );
    println!(
        "calibration     {} windows x {} tokens",
        o.windows, o.seq_len
    );
    println!("peak RSS        {:.2} GiB", peak / (1u64 << 30) as f64);
    println!(
        "throughput      {:.2} layers/s, {:.0} MB/s of input weights ({:.1} s)",
        f("layers_per_s"),
        input / 1e6 / f("seconds"),
        f("seconds")
    );
    println!(
        "time split      read {:.1} s, calibrate {:.1} s, smooth {:.1} s, quantize {:.1} s, write {:.1} s",
        f("read_s"),
        f("calibrate_s"),
        f("smooth_s"),
        f("quantize_s"),
        f("write_s")
    );
    println!(
        "output          {:.2} GB{}",
        out_bytes as f64 / 1e9,
        if o.keep { "" } else { " (deleted)" }
    );
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

//! The command line, as fixed by `shared/cli-contract.md`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "smoothquant",
    version,
    about = "SmoothQuant W8A8 post-training quantization for OPT, BLOOM and LLaMA models",
    long_about = "SmoothQuant W8A8 post-training quantization for OPT, BLOOM and LLaMA models.\n\n\
        Calibrate activation ranges on text, migrate the quantization difficulty from activations to \
        weights, quantize both to INT8 and run every Linear as an integer GEMM. Evaluate perplexity \
        side by side (fp32, naive W8A8, SmoothQuant), generate text, benchmark, and export checkpoints.",
    propagate_version = true
)]
pub struct Cli {
    /// More logging on stderr: -v times each phase (load, calibrate, smooth, quantize, eval),
    /// -vv also every forward pass, decoder layer and quantized Linear
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Worker threads for every subcommand's kernels (default: all cores)
    #[arg(long, global = true, value_name = "N", value_parser = positive)]
    pub threads: Option<usize>,

    /// Where the model runs: cpu, or cuda[:N] for NVIDIA GPU N (needs a build with
    /// `--features cuda`; eval, generate and bench)
    #[arg(long, global = true, value_name = "DEVICE", default_value = "cpu")]
    pub device: sq_model::Device,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Calibrate, smooth, quantize and compare schemes on the embedded model, no arguments needed
    Demo(DemoArgs),
    /// Architecture, sizes and (with calibration data) activation outlier statistics per layer
    Inspect(InspectArgs),
    /// Record per-channel max|x| of every Linear input into a safetensors file
    Calibrate(CalibrateArgs),
    /// Smooth and quantize a model to W8A8 and write the checkpoint
    Quantize(QuantizeArgs),
    /// Perplexity over non-overlapping windows of a text, for each scheme
    Eval(EvalArgs),
    /// Generate text from a prompt (greedy by default)
    Generate(GenerateArgs),
    /// Prefill and decode speed, peak memory and model size per scheme
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face directory, .gguf file, llama2.c .bin, or a directory written by `quantize`
    /// (default: the embedded stories260K model)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// Tokenizer for a llama2.c checkpoint (default: tok512.bin or tokenizer.bin beside it)
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightGranularity {
    /// One scale per output channel
    Channel,
    /// One scale per weight tensor
    Tensor,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActGranularity {
    /// Dynamic, one scale per token
    Token,
    /// Dynamic, one scale per tensor
    Tensor,
    /// Static per tensor, from calibration
    Static,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Weights per tensor, activations dynamic per token
    O1,
    /// Weights per tensor, activations dynamic per tensor
    O2,
    /// Weights per tensor, activations static per tensor
    O3,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmoothTargets {
    /// Only the Linears after a norm, as the paper and the official code
    Paper,
    /// Every Linear input that can be smoothed
    All,
}

impl From<SmoothTargets> for sq_smooth::SmoothTargets {
    fn from(t: SmoothTargets) -> Self {
        match t {
            SmoothTargets::Paper => sq_smooth::SmoothTargets::Paper,
            SmoothTargets::All => sq_smooth::SmoothTargets::All,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SmoothFold {
    /// Into the producing Linear's output rows
    Rows,
    /// A run-time divide fused into the activation quantizer
    Runtime,
}

impl From<SmoothFold> for sq_smooth::BeyondFold {
    fn from(f: SmoothFold) -> Self {
        match f {
            SmoothFold::Rows => sq_smooth::BeyondFold::Rows,
            SmoothFold::Runtime => sq_smooth::BeyondFold::Runtime,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// smoothquant-rs' own layout (INT8 weights, scales and the recipe)
    Native,
    /// The compressed-tensors layout that vLLM and transformers load
    CompressedTensors,
}

#[derive(Args, Debug, Clone)]
pub struct CalibArgs {
    /// Calibration text file
    #[arg(long, value_name = "FILE")]
    pub calib_data: Option<PathBuf>,

    /// Number of random calibration windows
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = positive)]
    pub calib_samples: usize,

    /// Tokens per calibration window
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = positive)]
    pub calib_seq_len: usize,

    /// Seed for calibration windows and sampling
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct QuantArgs {
    /// Comma-separated schemes: fp32, naive (W8A8 without smoothing), smoothquant
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub scheme: Option<Vec<String>>,

    /// Weight scale granularity
    #[arg(long, value_enum, default_value_t = WeightGranularity::Channel)]
    pub weights: WeightGranularity,

    /// Activation scales
    #[arg(long, value_enum, default_value_t = ActGranularity::Token)]
    pub acts: ActGranularity,

    /// The paper's levels; overrides --weights/--acts
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,

    /// Migration strength: a number in [0, 1], `auto` for a per-group search, or a JSON file
    /// mapping each smoothing group (named by its first Linear) to its alpha
    #[arg(
        long,
        value_name = "VALUE|auto|FILE.json",
        default_value = "0.5",
        allow_negative_numbers = true
    )]
    pub alpha: String,

    /// Which Linear inputs to smooth: `all` also smooths the attention output and last MLP
    /// projections (folded into the value / up / fc1 rows, or divided at run time); `paper`
    /// smooths only the Linears after a norm, exactly as the paper and the official code
    #[arg(long, value_enum, default_value_t = SmoothTargets::All)]
    pub smooth_targets: SmoothTargets,

    /// Where `1/s` goes for the smoothed inputs that do not follow a norm (`--smooth-targets
    /// all`): `rows` folds it into the producing Linear's output rows (value / up / fc1; free at
    /// run time, and expressible in compressed-tensors), `runtime` divides at run time inside
    /// the activation quantizer (the producer's weights stay as they were, which keeps
    /// per-tensor weight scales intact). Default: rows; `--alpha auto` then also tries runtime
    /// and keeps it only on significant evidence (not for compressed-tensors export)
    #[arg(long, value_enum, value_name = "rows|runtime")]
    pub smooth_fold: Option<SmoothFold>,

    #[command(flatten)]
    pub calib: CalibArgs,

    /// Activation statistics written by `calibrate` (instead of --calib-data)
    #[arg(long, value_name = "FILE")]
    pub act_scales: Option<PathBuf>,

    /// Also run the attention BMMs and the KV cache in INT8 (W8A8 schemes, on the CPU)
    #[arg(long)]
    pub int8_attention: bool,

    /// The LM head of the W8A8 schemes: fp32 as in the paper, or int8 (weights per channel,
    /// activations per token; a tied embedding then reads the head's INT8 rows)
    #[arg(long, value_enum, default_value_t = LmHeadArg::Fp32)]
    pub lm_head: LmHeadArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LmHeadArg {
    Fp32,
    Int8,
}

impl From<LmHeadArg> for sq_smooth::LmHead {
    fn from(h: LmHeadArg) -> Self {
        match h {
            LmHeadArg::Fp32 => sq_smooth::LmHead::Fp32,
            LmHeadArg::Int8 => sq_smooth::LmHead::Int8,
        }
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON object instead of the table
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Activation statistics written by `calibrate` (instead of --calib-data)
    #[arg(long, value_name = "FILE")]
    pub act_scales: Option<PathBuf>,
    /// Migration strength used for the "after smoothing" statistics
    #[arg(long, value_name = "VALUE", default_value = "0.5")]
    pub alpha: String,
    /// Which Linear inputs are smoothed for the "after smoothing" statistics
    #[arg(long, value_enum, default_value_t = SmoothTargets::All)]
    pub smooth_targets: SmoothTargets,
    /// Draw one Linear input's per-channel ranges and every layer's outlier ratios, before and
    /// after smoothing, to this PNG (needs --calib-data or --act-scales)
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// The Linear whose input --plot draws (default: the smoothed input with the largest
    /// outlier ratio)
    #[arg(long, value_name = "NAME")]
    pub plot_linear: Option<String>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text file (alias: --data)
    #[arg(long, alias = "data", value_name = "FILE")]
    pub calib_data: PathBuf,
    /// Number of random calibration windows
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = positive)]
    pub calib_samples: usize,
    /// Tokens per calibration window
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = positive)]
    pub calib_seq_len: usize,
    /// Seed for choosing the windows
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Output statistics file (.safetensors)
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
    /// Run the model one decoder layer at a time in bounded memory (the default when its f32
    /// weights would take more than half the available memory); same statistics
    #[arg(long)]
    pub stream: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Output directory
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoint layout
    #[arg(long, value_enum, default_value_t = ExportFormat::Native)]
    pub format: ExportFormat,
    /// Calibrate, smooth, quantize and write one decoder layer at a time in bounded memory (the
    /// default when the model's f32 weights would take more than half the available memory);
    /// same output, byte for byte; native layout only
    #[arg(long)]
    pub stream: bool,
    /// Calibrate each layer on the outputs of the earlier layers as quantized, not of the FP
    /// model (implies --stream; needs --calib-data)
    #[arg(long)]
    pub sequential: bool,
    /// Largest weights file of the native layout: bigger checkpoints are written as shards
    /// (model-00001-of-0000N.safetensors) with model.safetensors.index.json
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = byte_size)]
    pub shard_size: u64,
    /// Replace a non-empty output directory
    #[arg(long)]
    pub force: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Evaluation text file
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Tokens per window
    #[arg(long, value_name = "N", default_value_t = 2048, value_parser = at_least_two)]
    pub seq_len: usize,
    /// Evaluate at most this many windows
    #[arg(long, value_name = "N", value_parser = positive)]
    pub max_windows: Option<usize>,
    /// Also report each scheme's KL divergence from the fp32 model's next-token distributions
    /// on the same windows (nats per token; its 64 most likely tokens and one bucket for the rest)
    #[arg(long)]
    pub kl: bool,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P
    #[arg(
        long,
        value_name = "P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub top_p: f32,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Prompt lengths to time prefill at
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "128,512,2048"
    )]
    pub prompt_len: Vec<usize>,
    /// Tokens to decode after each prompt
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Then load every scheme at once and run them in turn N times per prompt length: each
    /// scheme's speed-up over the first, as the median of N ratios of runs seconds apart
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub pairs: usize,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

/// A count that must be at least 1.
/// A size in bytes: `5GB`, `500MB`, `2GiB`, or a plain number of bytes.
fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB or GiB, e.g. 5GB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 5GB or 500MB)"))?;
    let bytes = (n * mult).round();
    if !(1.0..1e19).contains(&bytes) {
        return Err(format!("`{s}` must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

fn positive(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A window length: perplexity predicts every token but the first, so at least 2.
fn at_least_two(s: &str) -> Result<usize, String> {
    let n = positive(s)?;
    if n < 2 {
        return Err("a window needs at least 2 tokens (the first is not predicted)".into());
    }
    Ok(n)
}

//! What the subcommands share: loading, scheme parsing, progress, JSON output.

use crate::args::{ModelArgs, QuantArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sq_model::LoadedModel;
use std::io::IsTerminal;
use std::time::Duration;

/// A scheme of the contract's `--scheme` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Fp32,
    Naive,
    SmoothQuant,
    /// A W8A8 checkpoint another tool wrote (compressed-tensors), whose recipe is unknown: it
    /// runs only as stored, and `--scheme` cannot name it.
    W8A8,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Fp32 => "fp32",
            Scheme::Naive => "naive",
            Scheme::SmoothQuant => "smoothquant",
            Scheme::W8A8 => "w8a8",
        }
    }
}

/// The scheme of a quantized checkpoint, when `--model` is one: written by `quantize` (native
/// or compressed-tensors), or a compressed-tensors W8A8 checkpoint from another tool.
pub fn quantized_scheme(model: &ModelArgs) -> Result<Option<Scheme>> {
    let Some(dir) = model.model.as_deref().filter(|p| p.is_dir()) else {
        return Ok(None);
    };
    let native = sq_model::native::is_native_dir(dir);
    if !native && !sq_model::compressed::is_compressed_tensors_dir(dir) {
        return Ok(None);
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let scheme = if native {
        &config["quantization_config"]["scheme"]
    } else {
        &config[sq_model::compressed::RECORD_KEY]["scheme"]
    };
    match scheme.as_str() {
        Some("naive") => Ok(Some(Scheme::Naive)),
        Some("smoothquant") => Ok(Some(Scheme::SmoothQuant)),
        _ if !native => Ok(Some(Scheme::W8A8)),
        other => bail!(
            "{}: unknown quantization scheme {other:?} in config.json",
            dir.display()
        ),
    }
}

/// Parse `--scheme`, defaulting to `default`, or to the checkpoint's own scheme when `--model`
/// is a quantized checkpoint (which runs only as it was quantized).
pub fn schemes_for(
    model: &ModelArgs,
    quant: &QuantArgs,
    default: &[Scheme],
) -> Result<Vec<Scheme>> {
    let Some(own) = quantized_scheme(model)? else {
        return parse_schemes(quant, default);
    };
    if own == Scheme::W8A8 {
        if quant.scheme.is_some() {
            bail!(
                "{} is a W8A8 compressed-tensors checkpoint and runs only as it was quantized; drop --scheme",
                model.model.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        return Ok(vec![own]);
    }
    let asked = parse_schemes(quant, &[own])?;
    if asked != [own] {
        bail!(
            "{} is a {} W8A8 checkpoint and runs only as it was quantized; drop --scheme or pass --scheme {}",
            model.model.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            own.name(),
            own.name()
        );
    }
    Ok(asked)
}

/// Parse `--scheme`, defaulting to `default`.
pub fn parse_schemes(quant: &QuantArgs, default: &[Scheme]) -> Result<Vec<Scheme>> {
    let Some(list) = &quant.scheme else {
        return Ok(default.to_vec());
    };
    let mut out = Vec::new();
    for s in list {
        let scheme = match s.trim() {
            "" => bail!(
                "--scheme: an empty entry in the list; give comma-separated names from fp32, naive, \
                 smoothquant (e.g. --scheme fp32,smoothquant)"
            ),
            "fp32" => Scheme::Fp32,
            "naive" => Scheme::Naive,
            "smoothquant" => Scheme::SmoothQuant,
            other => {
                bail!("--scheme: unknown scheme `{other}` (choose from fp32, naive, smoothquant)")
            }
        };
        if !out.contains(&scheme) {
            out.push(scheme);
        }
    }
    if out.is_empty() {
        bail!("--scheme: the list is empty (choose from fp32, naive, smoothquant)");
    }
    Ok(out)
}

/// The contract's rule: a quantized scheme on an FP model needs calibration input. And
/// `--int8-attention` applies to the W8A8 schemes: with fp32 alone it would change nothing.
pub fn require_runnable(schemes: &[Scheme], model: &ModelArgs, quant: &QuantArgs) -> Result<()> {
    if quant.int8_attention && schemes.iter().all(|s| *s == Scheme::Fp32) {
        bail!(
            "--int8-attention quantizes the attention of the W8A8 schemes (naive, smoothquant); \
             --scheme fp32 alone keeps f32 attention: add --scheme naive or smoothquant, or drop \
             --int8-attention"
        );
    }
    if quantized_scheme(model)?.is_some() {
        return Ok(());
    }
    let quantized: Vec<&str> = schemes
        .iter()
        .filter(|s| **s != Scheme::Fp32)
        .map(|s| s.name())
        .collect();
    if !quantized.is_empty() && quant.calib.calib_data.is_none() && quant.act_scales.is_none() {
        let (what, verbs) = if quantized.len() == 1 {
            (
                format!("scheme {}", quantized[0]),
                "quantizes activations and needs",
            )
        } else {
            (
                format!("schemes {}", quantized.join(" and ")),
                "quantize activations and need",
            )
        };
        bail!(
            "{what} {verbs} calibration: pass --calib-data FILE (text) or \
             --act-scales FILE (from `smoothquant calibrate`), or --scheme fp32 to run the FP model only"
        );
    }
    // Validate --alpha early so a typo fails before minutes of calibration.
    if schemes.contains(&Scheme::SmoothQuant) {
        super::pipeline::alpha(quant)?;
    }
    Ok(())
}

/// Calibration statistics if any scheme needs them.
pub fn stats_if_needed(
    schemes: &[Scheme],
    model: &ModelArgs,
    quant: &QuantArgs,
    show: bool,
) -> Result<Option<sq_calib::StatsTable>> {
    if schemes.iter().all(|s| *s == Scheme::Fp32) || quantized_scheme(model)?.is_some() {
        return Ok(None);
    }
    Ok(Some(super::pipeline::statistics(model, quant, show)?))
}

/// Check that activation statistics describe `model`: an entry with the right channel count for
/// every decoder Linear (statistics from `--act-scales` may come from another model).
pub fn check_stats_fit(model: &sq_model::Model, stats: &sq_calib::StatsTable) -> Result<()> {
    let fix = "calibrate this model with `smoothquant calibrate --model M --calib-data FILE --out \
               FILE.safetensors`, or pass --calib-data instead of --act-scales";
    for block in &model.layers {
        for l in block.linears() {
            let Some(s) = stats.get(&l.name) else {
                bail!(
                    "the activation statistics have no entry for `{}`: they were calibrated on \
                     another model; {fix}",
                    l.name
                );
            };
            let (have, want) = (s.channel_absmax().len(), l.linear.in_features());
            if have != want {
                bail!(
                    "the activation statistics of `{}` have {have} channels but this model's Linear \
                     has {want} inputs: they were calibrated on another model; {fix}",
                    l.name
                );
            }
        }
    }
    Ok(())
}

/// Whether progress bars may draw: stderr is a terminal and no JSON was asked for.
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

pub fn spinner(msg: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, target(show));
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn target(show: bool) -> ProgressDrawTarget {
    if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar over `len` items (`unit`: "groups", "Linears"), with rate and ETA.
pub fn bar(len: u64, msg: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), target(show));
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} {per_sec:.dim} eta {eta} ({elapsed})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A bar over `tokens` tokens, with tokens/s and ETA: calibration and evaluation.
pub fn token_bar(tokens: u64, msg: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(tokens), target(show));
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {human_pos}/{human_len} tokens {tps} eta {eta} ({elapsed})",
        )
        .expect("static template")
        .with_key(
            "tps",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} tok/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Load `--model` (or the embedded default), with a spinner.
pub fn load_model(args: &ModelArgs, show: bool) -> Result<LoadedModel> {
    with_model_source(
        args,
        show,
        "load",
        "loading",
        Some("a directory written by `smoothquant quantize`"),
        sq_model::load,
    )
}

/// Check `--model`, then run `open` on it (and `--tokenizer`) under a tracing span and a
/// spinner, naming the model in any error. `verb` names the work (`load`: "loading ...",
/// "cannot load the model ..."); `also` is a further kind of input the command accepts.
fn with_model_source<T, E: std::fmt::Display>(
    args: &ModelArgs,
    show: bool,
    verb: &str,
    doing: &str,
    also: Option<&str>,
    open: impl FnOnce(Option<&std::path::Path>, Option<&std::path::Path>) -> std::result::Result<T, E>,
) -> Result<T> {
    if let Some(path) = &args.model {
        if !path.exists() {
            let kinds = match also {
                Some(more) => format!(
                    "a Hugging Face model directory, a .gguf file, a llama2.c .bin checkpoint or {more}"
                ),
                None => "a Hugging Face model directory, a .gguf file or a llama2.c .bin checkpoint"
                    .to_string(),
            };
            bail!(
                "--model {}: no such file or directory; pass {kinds} (or leave --model out for the \
                 embedded stories260K)",
                path.display()
            );
        }
    }
    let what = args
        .model
        .as_ref()
        .map_or("embedded stories260K".to_string(), |p| {
            p.display().to_string()
        });
    // Span names are static: `load` and `open_layered`, as `-v` has always shown them.
    let span = if verb == "load" {
        tracing::info_span!("load", model = %what)
    } else {
        tracing::info_span!("open_layered", model = %what)
    };
    let _span = span.entered();
    let pb = spinner(&format!("{doing} {what}"), show);
    let opened = open(args.model.as_deref(), args.tokenizer.as_deref());
    pb.finish_and_clear();
    opened.map_err(|e| {
        // Library errors start with the file at fault: do not name the model twice.
        let msg = e.to_string();
        if msg.starts_with(&what) {
            anyhow::anyhow!("cannot {verb} the model: {msg}")
        } else {
            anyhow::anyhow!("cannot {verb} the model {what}: {msg}")
        }
    })
}

/// The name users see for the model.
pub fn model_label(loaded: &LoadedModel) -> String {
    loaded.source.display().to_string()
}

/// Check that an output file's directory exists before any work is done.
pub fn check_out_file(path: &std::path::Path, option: &str) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            bail!(
                "{option} {}: the directory {} does not exist; create it first or choose another path",
                path.display(),
                dir.display()
            );
        }
    }
    if path.is_dir() {
        bail!(
            "{option} {} is a directory; give a file name, e.g. {}",
            path.display(),
            path.join("act_scales.safetensors").display()
        );
    }
    Ok(())
}

/// Read a text file that must not be empty.
pub fn read_text(path: &std::path::Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!(
            "the {what} file {} is empty; pass a UTF-8 text file with some text in it",
            path.display()
        );
    }
    Ok(text)
}

/// Calibration needs at least one full window: a shorter text is refused rather than
/// silently calibrating on a few tokens.
pub fn require_calib_window(n_tokens: usize, seq_len: usize, data: &std::path::Path) -> Result<()> {
    if n_tokens < seq_len {
        bail!(
            "the calibration text {} has {n_tokens} tokens, fewer than one window of {seq_len} (--calib-seq-len); give more text or a smaller --calib-seq-len",
            data.display()
        );
    }
    Ok(())
}

/// Print one JSON object on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Peak resident memory of this process (since the last [`reset_peak_rss`]), from /proc (0
/// where unavailable).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Open `--model` for a layer-by-layer run (`--stream`).
pub fn open_layered(args: &ModelArgs, show: bool) -> Result<sq_model::LayeredModel> {
    with_model_source(args, show, "open", "opening", None, |m, t| {
        sq_model::LayeredModel::open(m, t)
    })
}

/// Whether to run layer by layer: forced by `--stream`, or because the model's weights as f32
/// would take more than half the memory available now (Hugging Face directories; the other
/// inputs are small enough to load).
pub fn should_stream(args: &ModelArgs, forced: bool, show: bool) -> Result<bool> {
    if forced {
        return Ok(true);
    }
    let Some(path) = &args.model else {
        return Ok(false);
    };
    let Ok(Some(f32_bytes)) = sq_model::hf_f32_bytes(path) else {
        return Ok(false);
    };
    let Some(available) = mem_available_bytes() else {
        return Ok(false);
    };
    let stream = f32_bytes > available / 2;
    if stream {
        tracing::info!(
            f32_bytes,
            available,
            "the model does not fit comfortably in memory: streaming"
        );
        if show {
            eprintln!(
                "{} needs {:.1} GB as f32 and {:.1} GB of memory is available: quantizing layer by layer (as --stream)",
                path.display(),
                f32_bytes as f64 / 1e9,
                available as f64 / 1e9
            );
        }
    }
    Ok(stream)
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset the peak resident memory to the current one (Linux: `5` to /proc/self/clear_refs), so
/// each scheme of `bench` reports its own peak. Where unavailable the peak stays the process's.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Hand the allocator's free memory back to the system, so resident memory measures what is
/// held (glibc keeps freed load buffers otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

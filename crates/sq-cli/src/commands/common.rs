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

/// The contract's rule: a quantized scheme on an FP model needs calibration input.
pub fn require_runnable(schemes: &[Scheme], model: &ModelArgs, quant: &QuantArgs) -> Result<()> {
    if quantized_scheme(model)?.is_some() {
        return Ok(());
    }
    let quantized: Vec<&str> = schemes
        .iter()
        .filter(|s| **s != Scheme::Fp32)
        .map(|s| s.name())
        .collect();
    if !quantized.is_empty() && quant.calib.calib_data.is_none() && quant.act_scales.is_none() {
        bail!(
            "scheme {} quantizes activations and needs calibration: pass --calib-data FILE (text) or \
             --act-scales FILE (from `smoothquant calibrate`), or --scheme fp32 to run the FP model only",
            quantized.join(", ")
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

/// Whether progress bars may draw: stderr is a terminal and no JSON was asked for.
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

pub fn spinner(msg: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        None,
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

pub fn bar(len: u64, msg: &str, show: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(len),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Load `--model` (or the embedded default), with a spinner.
pub fn load_model(args: &ModelArgs, show: bool) -> Result<LoadedModel> {
    let what = args
        .model
        .as_ref()
        .map_or("embedded stories260K".to_string(), |p| {
            p.display().to_string()
        });
    let pb = spinner(&format!("loading {what}"), show);
    let loaded = sq_model::load(args.model.as_deref(), args.tokenizer.as_deref())
        .with_context(|| format!("cannot load the model {what}"))?;
    pb.finish_and_clear();
    Ok(loaded)
}

/// The name users see for the model.
pub fn model_label(loaded: &LoadedModel) -> String {
    loaded.source.display().to_string()
}

/// Read a text file that must not be empty.
pub fn read_text(path: &std::path::Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    if text.trim().is_empty() {
        bail!("the {what} file {} is empty", path.display());
    }
    Ok(text)
}

/// Print one JSON object on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Peak resident memory of this process, from /proc (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

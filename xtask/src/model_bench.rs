//! `cargo xtask bench model [--threads N] [--lm-head fp32|int8] [--json]`: `smoothquant bench` on
//! ../shared's SmolLM2-135M for fp32 and each W8A8 preset (channel/token, O1, O2, O3), each in
//! its own process (so its memory is its own), at 1 and 2 threads unless `--threads` says;
//! prefill at 128, 512 and 2048 tokens, decode after each prompt. Then, unless `--pairs 0`, each
//! W8A8 variant against fp32 in one process (`smoothquant bench --pairs N` at 512 tokens), for
//! ratios that a drifting machine speed does not skew. Prints the tables (or one JSON object) and
//! draws `docs/images/bench_smollm2.png` (prefill tokens/s by prompt length, per scheme).

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::{Path, PathBuf};
use std::process::Command;

const FONT: &[u8] = include_bytes!("../../crates/sq-cli/assets/fonts/DejaVuSans-subset.ttf");
const PROMPT_LENS: &str = "128,512,2048";
const GEN_TOKENS: &str = "32";
const GGUF: &str = "assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
const CALIB: &str = "assets/wikitext-2/wiki.valid.txt";

/// One `smoothquant bench` invocation: a label and the options that pick its scheme.
struct Variant {
    label: &'static str,
    args: &'static [&'static str],
}

const VARIANTS: [Variant; 5] = [
    Variant {
        label: "fp32",
        args: &["--scheme", "fp32"],
    },
    Variant {
        label: "W8A8 channel/token",
        args: &["--scheme", "smoothquant"],
    },
    Variant {
        label: "W8A8 O1",
        args: &["--scheme", "smoothquant", "--preset", "o1"],
    },
    Variant {
        label: "W8A8 O2",
        args: &["--scheme", "smoothquant", "--preset", "o2"],
    },
    Variant {
        label: "W8A8 O3",
        args: &["--scheme", "smoothquant", "--preset", "o3"],
    },
];

pub struct Options {
    pub threads: Option<usize>,
    pub json: bool,
    pub lm_head: String,
    /// `--int8-attention` for the W8A8 variants.
    pub int8_attention: bool,
    /// Rounds of `smoothquant bench --pairs` (fp32 and each W8A8 variant in one process, at
    /// 512 tokens); 0 skips them.
    pub pairs: usize,
}

/// The prompt length of the paired runs (the one issue 10's targets name).
const PAIRED_PROMPT_LEN: &str = "512";

/// The results as one JSON object (`cargo xtask bench all --json` nests it under `model`).
pub fn run(root: &Path, o: &Options) -> Result<serde_json::Value> {
    let shared = root
        .parent()
        .map(|p| p.join("shared"))
        .filter(|p| p.join(GGUF).is_file())
        .with_context(|| {
            format!(
                "`cargo xtask bench model` needs ../shared/{GGUF} beside the repository ({})",
                root.display()
            )
        })?;
    if !matches!(o.lm_head.as_str(), "fp32" | "int8") {
        bail!("--lm-head {}: expected fp32 or int8", o.lm_head);
    }
    let threads: Vec<usize> = match o.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => vec![t],
        None => vec![1, 2],
    };
    crate::run(Command::new("cargo").args(["build", "--release", "-p", "sq-cli"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/smoothquant");
    let gguf = shared.join(GGUF);
    // Calibrated once and kept: the statistics do not depend on the thread count.
    let act_scales = target.join("xtask-bench/smollm2-act-scales.safetensors");
    if !act_scales.is_file() {
        std::fs::create_dir_all(act_scales.parent().expect("has a parent"))?;
        crate::run(
            Command::new(&bin)
                .arg("calibrate")
                .arg("--model")
                .arg(&gguf)
                .arg("--calib-data")
                .arg(shared.join(CALIB))
                .args(["--calib-samples", "32", "--calib-seq-len", "512", "--out"])
                .arg(&act_scales)
                // Its summary goes to stderr: with --json, stdout is one JSON object.
                .stdout(std::process::Stdio::from(std::io::stderr())),
        )?;
    }
    let bench = |t: usize, scheme: &[&str], prompt_lens: &str, pairs: usize, w8a8: bool| {
        let mut cmd = Command::new(&bin);
        cmd.args(["--threads", &t.to_string(), "bench", "--model"])
            .arg(&gguf)
            .args(["--prompt-len", prompt_lens, "--gen-tokens", GEN_TOKENS])
            .args(scheme)
            .arg("--json");
        if pairs > 0 {
            cmd.args(["--pairs", &pairs.to_string()]);
        }
        if w8a8 {
            cmd.arg("--act-scales")
                .arg(&act_scales)
                .args(["--lm-head", &o.lm_head]);
            if o.int8_attention {
                cmd.arg("--int8-attention");
            }
        }
        json_of(cmd)
    };
    let mut runs = Vec::new();
    for &t in &threads {
        for v in &VARIANTS {
            let w8a8 = v.label != "fp32";
            runs.push(serde_json::json!({
                "label": v.label,
                "threads": t,
                "lm_head": if w8a8 { o.lm_head.as_str() } else { "fp32" },
                "bench": bench(t, v.args, PROMPT_LENS, 0, w8a8)?,
            }));
        }
    }
    // Each W8A8 variant against fp32 in one process, run in turn: the ratios the targets ask
    // for, robust to the machine's speed drifting between the separate runs above.
    let mut paired = Vec::new();
    if o.pairs > 0 {
        for &t in &threads {
            for v in VARIANTS.iter().filter(|v| v.label != "fp32") {
                // The variant's own options, with fp32 first in its `--scheme` list.
                let scheme: Vec<&str> = v
                    .args
                    .iter()
                    .map(|&a| {
                        if a == "smoothquant" {
                            "fp32,smoothquant"
                        } else {
                            a
                        }
                    })
                    .collect();
                let report = bench(t, &scheme, PAIRED_PROMPT_LEN, o.pairs, true)?;
                paired.push(serde_json::json!({
                    "label": v.label,
                    "threads": t,
                    "rows": report["paired"],
                }));
            }
        }
    }
    let report = serde_json::json!({
        "cpu": cpu_name(),
        "model": gguf.file_name().map(|n| n.to_string_lossy().into_owned()),
        "threads": threads,
        "int8_attention": o.int8_attention,
        "runs": runs,
        "paired": paired,
    });
    let plot = root.join("docs/images/bench_smollm2.png");
    draw(&plot, &report).with_context(|| format!("cannot draw {}", plot.display()))?;
    if !o.json {
        print!("{}", table(&report));
        println!("plot: {}", plot.display());
    }
    Ok(report)
}

/// Runs `cmd` (a `smoothquant ... --json`), echoing it, and parses its one JSON object.
fn json_of(mut cmd: Command) -> Result<serde_json::Value> {
    eprintln!("$ {cmd:?}");
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{cmd:?} did not print one JSON object"))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// (label, threads, rows of the bench report).
fn rows(report: &serde_json::Value) -> Vec<(String, u64, Vec<serde_json::Value>)> {
    report["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["label"].as_str().unwrap_or("").to_string(),
                r["threads"].as_u64().unwrap_or(0),
                r["bench"]["results"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Per threads and scheme: prefill tok/s per prompt length, decode after 512, memory, and the
/// ratios to fp32 of the same thread count.
fn table(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>7} {:<20} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "threads",
        "scheme",
        "prefill128",
        "prefill512",
        "prefill2048",
        "decode@512",
        "x fp32 p",
        "x fp32 d",
        "RSS MB",
        "model MB"
    );
    let all = rows(report);
    let at = |rows: &[serde_json::Value], len: u64, key: &str| -> f64 {
        rows.iter()
            .find(|r| r["prompt_len"].as_u64() == Some(len))
            .and_then(|r| r[key].as_f64())
            .unwrap_or(f64::NAN)
    };
    for (label, threads, r) in &all {
        let fp32 = all
            .iter()
            .find(|(l, t, _)| l == "fp32" && t == threads)
            .map(|x| x.2.clone())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:>7} {:<20} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>8.2}x {:>8.2}x {:>9.1} {:>9.1}",
            threads,
            label,
            at(r, 128, "prefill_tokens_per_s"),
            at(r, 512, "prefill_tokens_per_s"),
            at(r, 2048, "prefill_tokens_per_s"),
            at(r, 512, "decode_tokens_per_s"),
            at(r, 512, "prefill_tokens_per_s") / at(&fp32, 512, "prefill_tokens_per_s"),
            at(r, 512, "decode_tokens_per_s") / at(&fp32, 512, "decode_tokens_per_s"),
            at(r, 512, "loaded_rss_bytes") / 1e6,
            at(r, 512, "model_bytes") / 1e6,
        );
    }
    let paired = report["paired"].as_array().cloned().unwrap_or_default();
    if let Some(first) = paired.first() {
        let _ = writeln!(
            s,
            "\nfp32 and each W8A8 variant in one process, run in turn ({} rounds, prompt {PAIRED_PROMPT_LEN}):\nspeed-up over fp32 as the median of the per-round ratios [min, max]",
            first["rows"][0]["pairs"]
        );
        let _ = writeln!(
            s,
            "{:>7} {:<20} {:>24} {:>24}",
            "threads", "scheme", "prefill x fp32", "decode x fp32"
        );
        let cell = |r: &serde_json::Value, key: &str| {
            format!(
                "{:.2}x [{:.2}, {:.2}]",
                r[key].as_f64().unwrap_or(f64::NAN),
                r[format!("{key}_min")].as_f64().unwrap_or(f64::NAN),
                r[format!("{key}_max")].as_f64().unwrap_or(f64::NAN)
            )
        };
        for p in &paired {
            let r = &p["rows"][0];
            let _ = writeln!(
                s,
                "{:>7} {:<20} {:>24} {:>24}",
                p["threads"],
                p["label"].as_str().unwrap_or(""),
                cell(r, "prefill_speedup"),
                cell(r, "decode_speedup"),
            );
        }
    }
    s
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, report: &serde_json::Value) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded plot font cannot be read"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    draw_inner(path, report).map_err(|e| anyhow!("{e}"))
}

fn draw_inner(path: &Path, report: &serde_json::Value) -> DrawResult {
    let all = rows(report);
    let threads: Vec<u64> = report["threads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_u64())
        .collect();
    let width = 720 * threads.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, threads.len().max(1)));
    let max = all
        .iter()
        .flat_map(|(_, _, r)| r.iter().filter_map(|x| x["prefill_tokens_per_s"].as_f64()))
        .fold(1.0f64, f64::max);
    for (panel, &t) in panels.iter().zip(&threads) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{}: prefill tokens/s, {t} thread{}",
                    report["model"].as_str().unwrap_or("SmolLM2"),
                    if t == 1 { "" } else { "s" }
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(6.5f64..11.5f64, 0f64..max * 1.1)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(235, 235, 235))
            .x_desc("prompt length (tokens)")
            .y_desc("tokens/s")
            .axis_desc_style(("sans-serif", 16))
            .label_style(("sans-serif", 14))
            .x_labels(5)
            .x_label_formatter(&|x| {
                let v = 2f64.powf(*x);
                if (x - x.round()).abs() < 1e-6 && [128.0, 512.0, 2048.0].contains(&v) {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (i, (label, _, r)) in all.iter().filter(|(_, tt, _)| *tt == t).enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let points: Vec<(f64, f64)> = r
                .iter()
                .filter_map(|x| {
                    Some((
                        (x["prompt_len"].as_f64()?).log2(),
                        x["prefill_tokens_per_s"].as_f64()?,
                    ))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(
                    points.clone(),
                    ShapeStyle::from(&color).stroke_width(3),
                ))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(
                        [(x, y), (x + 20, y)],
                        ShapeStyle::from(&color).stroke_width(3),
                    )
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 4, ShapeStyle::from(&color).filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

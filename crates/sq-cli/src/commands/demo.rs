use super::common::{print_json, show_progress, spinner};
use crate::args::DemoArgs;
use anyhow::Result;
use sq_calib::{calibrate, CalibConfig};
use sq_model::{generate, perplexity, LoadedModel, Sampler};
use sq_smooth::{quantize_model, smooth_model, smoothing_groups, AlphaSpec, Recipe, SmoothTargets};

/// Calibration and evaluation text for the demo: stories the embedded model wrote itself (seeded
/// sampling, see `assets/demo/README.md`), so the demo needs nothing outside the repository.
const DEMO_CALIB_TEXT: &str = include_str!("../../assets/demo/calib.txt");
const DEMO_EVAL_TEXT: &str = include_str!("../../assets/demo/eval.txt");
const SEQ_LEN: usize = 256;
const ALPHA: f32 = 0.5;

pub fn run(a: DemoArgs) -> Result<()> {
    let show = show_progress(a.json);
    let pb = spinner("calibrating the embedded stories260K model", show);
    let mut fp = sq_model::load(None, None)?;
    let calib_tokens = fp.tokenizer.encode(DEMO_CALIB_TEXT)?;
    let cfg = CalibConfig {
        samples: 64,
        seq_len: SEQ_LEN,
        seed: 0,
    };
    let stats = calibrate(&mut fp.model, &calib_tokens, &cfg, |_, _| {})?;
    pb.finish_and_clear();
    let backend = sq_kernels::select_backend()?;
    let recipe = Recipe::CHANNEL_TOKEN;

    let mut rows = Vec::new();
    for scheme in ["fp32", "naive", "smoothquant"] {
        let pb = spinner(&format!("evaluating {scheme}"), show);
        let mut loaded: LoadedModel = sq_model::load(None, None)?;
        let mut s = stats.clone();
        if scheme == "smoothquant" {
            let groups = smoothing_groups(&loaded.model, SmoothTargets::All)?;
            smooth_model(
                &mut loaded.model,
                &groups,
                &mut s,
                &AlphaSpec::Global(ALPHA),
            )?;
        }
        if scheme != "fp32" {
            quantize_model(&mut loaded.model, &recipe, Some(&s), backend.clone())?;
        }
        let model = &loaded.model;
        let tokens = loaded.tokenizer.encode(DEMO_EVAL_TEXT)?;
        let p = perplexity(model, &tokens, SEQ_LEN, None, |_, _| {})?;
        let mut prompt = vec![loaded.tokenizer.bos_id().unwrap_or(1)];
        prompt.extend(loaded.tokenizer.encode("Once upon a time")?);
        let sample = generate(
            model,
            loaded.tokenizer.as_ref(),
            &prompt,
            40,
            &mut Sampler::greedy(),
            |_| {},
        )?;
        let (prefill, decode) = super::bench::measure(model, 128, 64, 0)?;
        pb.finish_and_clear();
        let quantized = scheme != "fp32";
        rows.push(serde_json::json!({
            "scheme": scheme,
            "weights": if quantized { Some("channel") } else { None },
            "acts": if quantized { Some("token") } else { None },
            "alpha": if scheme == "smoothquant" { super::pipeline::f32_json(ALPHA) } else { serde_json::Value::Null },
            "perplexity": p.perplexity,
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode,
            "model_bytes": model.weight_bytes(),
            "sample": format!("Once upon a time{}", sample.text),
        }));
    }
    if a.json {
        return print_json(&serde_json::json!({
            "model": "stories260K (embedded)",
            "seq_len": SEQ_LEN,
            "calib_windows": cfg.samples,
            "backend": backend.name(),
            "results": rows,
        }));
    }
    println!("smoothquant demo: the embedded stories260K model (260K parameters), W8A8 on the {} INT8 GEMM", backend.name());
    println!(
        "calibrated on {} windows of its own stories, perplexity on {}-token windows of others\n",
        cfg.samples, SEQ_LEN
    );
    println!(
        "{:<12} {:<8} {:<6} {:<6} {:>10} {:>14} {:>13} {:>12}",
        "scheme",
        "weights",
        "acts",
        "alpha",
        "perplexity",
        "prefill tok/s",
        "decode tok/s",
        "model bytes"
    );
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for r in &rows {
        println!(
            "{:<12} {:<8} {:<6} {:<6} {:>10.3} {:>14.0} {:>13.0} {:>12}",
            cell(&r["scheme"]),
            cell(&r["weights"]),
            cell(&r["acts"]),
            cell(&r["alpha"]),
            r["perplexity"].as_f64().unwrap_or(f64::NAN),
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["model_bytes"].as_u64().unwrap_or(0)
        );
    }
    println!();
    for r in &rows {
        println!(
            "{:<12} {}",
            cell(&r["scheme"]),
            r["sample"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

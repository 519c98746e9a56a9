use super::common::{
    model_label, print_json, read_text, require_runnable, show_progress, spinner, stats_if_needed,
    token_bar, Scheme,
};
use super::pipeline::build;
use crate::args::EvalArgs;
use anyhow::{bail, Result};
use sq_model::perplexity;

pub fn run(a: EvalArgs, device: sq_model::Device) -> Result<()> {
    let schemes = super::common::schemes_for(
        &a.model,
        &a.quant,
        &[Scheme::Fp32, Scheme::Naive, Scheme::SmoothQuant],
    )?;
    require_runnable(&schemes, &a.model, &a.quant)?;
    let show = show_progress(a.json);
    let text = read_text(&a.data, "evaluation data (--data)")?;
    let stats = stats_if_needed(&schemes, &a.model, &a.quant, show)?;
    let reference = if a.kl {
        Some(kl_reference(&a, &text, show)?)
    } else {
        None
    };
    let mut results = Vec::new();
    let mut summary = None;
    let mut label = String::new();
    for scheme in &schemes {
        let built = build(*scheme, &a.model, &a.quant, stats.as_ref(), show)?;
        let loaded = &built.loaded;
        label = model_label(loaded);
        let context = loaded.model.config.max_position_embeddings;
        if a.seq_len > context {
            bail!(
                "--seq-len {} is longer than the model's context of {context} tokens; pass \
                 --seq-len {context} or less",
                a.seq_len
            );
        }
        let tokens = loaded.tokenizer.encode(&text)?;
        let windows = (tokens.len() / a.seq_len.max(1)).min(a.max_windows.unwrap_or(usize::MAX));
        let _span = tracing::info_span!("eval", scheme = scheme.name(), windows).entered();
        let runner = super::gpu::runner(&loaded.model, device, show)?;
        let pb = token_bar(
            (windows * a.seq_len) as u64,
            &format!("eval {}", scheme.name()),
            show,
        );
        let p = perplexity(&runner, &tokens, a.seq_len, a.max_windows, |done, _| {
            pb.set_position((done * a.seq_len) as u64)
        })?;
        pb.finish_and_clear();
        let mut row =
            super::pipeline::scheme_fields_for(*scheme, &a.quant, loaded.quantization.as_ref())?;
        row.insert("perplexity".into(), p.perplexity.into());
        if let Some(reference) = &reference {
            let pb = token_bar(
                (reference.windows() * a.seq_len) as u64,
                &format!("KL {}", scheme.name()),
                show,
            );
            let d = reference.divergence(&runner)?;
            pb.finish_and_clear();
            row.insert("kl_from_fp32".into(), d.mean_kl.into());
        }
        row.insert(
            "int8_attention".into(),
            loaded.model.attention.is_int8().into(),
        );
        row.insert("model_bytes".into(), runner.weight_bytes().into());
        if *scheme == Scheme::SmoothQuant && loaded.quantization.is_none() {
            row.insert("smoothed_groups".into(), built.smoothing.len().into());
            row.insert(
                "smooth_fold".into(),
                built.smooth_fold.map(|f| f.name()).into(),
            );
            if super::pipeline::is_auto(&a.quant) {
                // Groups auto left unsmoothed are `null`: the object replays as `--alpha FILE`.
                let alphas: serde_json::Map<String, serde_json::Value> = built
                    .smoothing
                    .iter()
                    .map(|g| {
                        (
                            g.group.name().to_string(),
                            super::pipeline::f32_json(g.alpha),
                        )
                    })
                    .chain(
                        built
                            .unsmoothed
                            .iter()
                            .map(|g| (g.clone(), serde_json::Value::Null)),
                    )
                    .collect();
                row.insert("alphas".into(), alphas.into());
            }
        }
        results.push(serde_json::Value::Object(row));
        summary = Some(p);
    }
    let p = summary.expect("at least one scheme");
    let report = serde_json::json!({
        "model": label,
        "data": a.data.display().to_string(),
        "seq_len": a.seq_len,
        "windows": p.windows,
        "tokens": p.windows * a.seq_len,
        "predicted_tokens": p.predicted_tokens,
        "results": results,
    });
    if a.json {
        return print_json(&report);
    }
    println!("model   {label}");
    println!(
        "data    {}  ({} windows of {} tokens, {} predicted)",
        a.data.display(),
        p.windows,
        a.seq_len,
        p.predicted_tokens
    );
    println!();
    let kl_header = if a.kl { "  KL from fp32" } else { "" };
    println!(
        "{:<12} {:<8} {:<7} {:<6} {:>12}{kl_header}",
        "scheme", "weights", "acts", "alpha", "perplexity"
    );
    for r in &results {
        let cell = |k: &str| r[k].as_str().map_or("-".to_string(), str::to_string);
        let alpha = match &r["alpha"] {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Null => "-".into(),
            serde_json::Value::String(s) => s.clone(),
            _ => "table".into(),
        };
        let kl = r["kl_from_fp32"]
            .as_f64()
            .map_or(String::new(), |v| format!("  {v:>12.5}"));
        println!(
            "{:<12} {:<8} {:<7} {:<6} {:>12.4}{kl}",
            cell("scheme"),
            cell("weights"),
            cell("acts"),
            alpha,
            r["perplexity"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let int8_attention: Vec<&str> = results
        .iter()
        .filter(|r| r["int8_attention"].as_bool() == Some(true))
        .filter_map(|r| r["scheme"].as_str())
        .collect();
    if !int8_attention.is_empty() {
        println!();
        println!(
            "INT8 attention (Q·Kᵀ, P·V and KV cache in INT8): {}",
            int8_attention.join(", ")
        );
    }
    Ok(())
}

/// `--kl`: the fp32 model's next-token distributions on the evaluation windows, computed on the
/// CPU from the full-precision model (a quantized checkpoint has none to compare with).
fn kl_reference(a: &EvalArgs, text: &str, show: bool) -> Result<sq_model::ReferenceDistributions> {
    let built = build(Scheme::Fp32, &a.model, &a.quant, None, show)?;
    let loaded = &built.loaded;
    if loaded.quantization.is_some() {
        bail!(
            "--kl compares each scheme with the fp32 model, and {} is a quantized checkpoint \
             with no full-precision weights: run eval with --kl on the original model",
            model_label(loaded)
        );
    }
    let tokens = loaded.tokenizer.encode(text)?;
    let vocab = loaded.model.config.vocab_size;
    let _span = tracing::info_span!("kl_reference").entered();
    let pb = spinner("fp32 reference distributions (--kl)", show);
    let reference = sq_model::ReferenceDistributions::new(
        &loaded.model,
        &tokens,
        a.seq_len,
        a.max_windows,
        KL_TOP_K.min(vocab.saturating_sub(1)).max(1),
    )?;
    pb.finish_and_clear();
    Ok(reference)
}

/// The fp32 model's most likely tokens kept per position for `--kl` (the rest is one bucket).
const KL_TOP_K: usize = 64;

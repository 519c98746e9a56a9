use super::common::{
    model_label, peak_rss_bytes, print_json, release_free_memory, require_runnable, reset_peak_rss,
    rss_bytes, show_progress, spinner, stats_if_needed, Scheme,
};
use super::pipeline::build;
use crate::args::BenchArgs;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use sq_model::{Forward, Logits};
use std::time::Instant;

/// Prefill and decode speed of one prompt length (one warm run first, then the median of three).
pub fn measure<M: Forward + ?Sized>(
    model: &M,
    prompt_len: usize,
    gen_tokens: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let vocab = model.config().vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut session = model.new_session(prompt_len + gen_tokens)?;
    let mut logits = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..4 {
        M::clear_session(&mut session);
        let t = Instant::now();
        model.forward(&prompt, &mut session, Logits::Last, &mut logits)?;
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut next = sq_model::generate::argmax(&logits);
        for _ in 0..gen_tokens {
            model.forward(&[next], &mut session, Logits::Last, &mut logits)?;
            next = sq_model::generate::argmax(&logits);
        }
        let d = t.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(prompt_len as f64 / p);
            decode.push(gen_tokens as f64 / d.max(1e-12));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((
        median(&mut prefill),
        if gen_tokens == 0 {
            0.0
        } else {
            median(&mut decode)
        },
    ))
}

pub fn run(a: BenchArgs, device: sq_model::Device) -> Result<()> {
    let schemes = super::common::schemes_for(&a.model, &a.quant, &[Scheme::Fp32])?;
    require_runnable(&schemes, &a.model, &a.quant)?;
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!("--prompt-len needs positive lengths, e.g. 128,512,2048");
    }
    let show = show_progress(a.json);
    let stats = stats_if_needed(&schemes, &a.model, &a.quant, show)?;
    let mut rows = Vec::new();
    let mut label = String::new();
    for scheme in &schemes {
        // Each scheme's memory alone: the previous scheme's model is dropped by now.
        release_free_memory();
        reset_peak_rss();
        let loaded = build(*scheme, &a.model, &a.quant, stats.as_ref(), show)?.loaded;
        label = model_label(&loaded);
        let model = super::gpu::runner(&loaded.model, device, show)?;
        // What the loaded model holds, without the load's freed buffers.
        release_free_memory();
        let loaded_rss = rss_bytes();
        let context = model.config().max_position_embeddings;
        for &len in &a.prompt_len {
            if len + a.gen_tokens > context {
                eprintln!(
                    "note: prompt length {len} + {} generated tokens exceeds the context of {context}; skipped",
                    a.gen_tokens
                );
                continue;
            }
            let _span =
                tracing::info_span!("bench", scheme = scheme.name(), prompt_len = len).entered();
            let pb = spinner(
                &format!(
                    "timing {}: prefill {len} tokens, decode {}",
                    scheme.name(),
                    a.gen_tokens
                ),
                show,
            );
            let (prefill, decode) = measure(&model, len, a.gen_tokens, a.quant.calib.seed)?;
            pb.finish_and_clear();
            let mut row = super::pipeline::scheme_fields_for(
                *scheme,
                &a.quant,
                loaded.quantization.as_ref(),
            )?;
            row.remove("smooth_targets");
            row.insert("prompt_len".into(), len.into());
            row.insert("prefill_tokens_per_s".into(), prefill.into());
            row.insert("decode_tokens_per_s".into(), decode.into());
            row.insert("peak_rss_bytes".into(), peak_rss_bytes().into());
            row.insert("loaded_rss_bytes".into(), loaded_rss.into());
            row.insert("model_bytes".into(), model.weight_bytes().into());
            row.insert(
                "int8_attention".into(),
                loaded.model.attention.is_int8().into(),
            );
            // The session's cache: prompt plus generated tokens.
            row.insert(
                "kv_cache_bytes".into(),
                loaded.model.kv_cache_bytes(len + a.gen_tokens).into(),
            );
            if let Some(used) = model.device_memory_used() {
                // The stream-ordered allocator keeps what the run needed: about its peak.
                row.insert("gpu_memory_bytes".into(), used.into());
            }
            rows.push(serde_json::Value::Object(row));
        }
    }
    let report = serde_json::json!({
        "model": label,
        "threads": rayon::current_num_threads(),
        "gen_tokens": a.gen_tokens,
        "results": rows,
    });
    if a.json {
        return print_json(&report);
    }
    println!(
        "model {}  threads {}  decode {} tokens after each prompt",
        report["model"].as_str().unwrap_or(""),
        report["threads"],
        a.gen_tokens
    );
    println!(
        "{:<12} {:<5} {:>10} {:>14} {:>14} {:>12} {:>14} {:>12} {:>10}",
        "scheme",
        "attn",
        "prompt",
        "prefill tok/s",
        "decode tok/s",
        "peak RSS MB",
        "loaded RSS MB",
        "model MB",
        "KV MB"
    );
    for r in report["results"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<5} {:>10} {:>14.1} {:>14.1} {:>12.1} {:>14.1} {:>12.1} {:>10.1}",
            r["scheme"].as_str().unwrap_or(""),
            if r["int8_attention"].as_bool() == Some(true) {
                "int8"
            } else {
                "f32"
            },
            r["prompt_len"].as_u64().unwrap_or(0),
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["loaded_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["model_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["kv_cache_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
    Ok(())
}

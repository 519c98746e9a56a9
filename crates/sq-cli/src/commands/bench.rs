use super::common::{
    load_model, model_label, parse_schemes, peak_rss_bytes, print_json, require_runnable,
    show_progress, Scheme,
};
use crate::args::BenchArgs;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use sq_model::{Logits, Model};
use std::time::Instant;

/// Prefill and decode speed of one prompt length (one warm run first, then the median of three).
pub fn measure(
    model: &Model,
    prompt_len: usize,
    gen_tokens: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let vocab = model.config.vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let mut session = model.session(prompt_len + gen_tokens);
    let mut logits = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..4 {
        session.cache.clear();
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

pub fn run(a: BenchArgs) -> Result<()> {
    let schemes = parse_schemes(&a.quant, &[Scheme::Fp32])?;
    require_runnable(&schemes, &a.quant)?;
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!("--prompt-len needs positive lengths, e.g. 128,512,2048");
    }
    let loaded = load_model(&a.model, show_progress(a.json))?;
    let model = &loaded.model;
    let context = model.config.max_position_embeddings;
    let mut rows = Vec::new();
    for scheme in &schemes {
        for &len in &a.prompt_len {
            if len + a.gen_tokens > context {
                eprintln!(
                    "note: prompt length {len} + {} generated tokens exceeds the context of {context}; skipped",
                    a.gen_tokens
                );
                continue;
            }
            let (prefill, decode) = measure(model, len, a.gen_tokens, a.quant.calib.seed)?;
            rows.push(serde_json::json!({
                "scheme": scheme.name(),
                "weights": null,
                "acts": null,
                "prompt_len": len,
                "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": decode,
                "peak_rss_bytes": peak_rss_bytes(),
                "model_bytes": model.weight_bytes(),
            }));
        }
    }
    let report = serde_json::json!({
        "model": model_label(&loaded),
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
        "{:<12} {:>10} {:>14} {:>14} {:>12} {:>12}",
        "scheme", "prompt", "prefill tok/s", "decode tok/s", "peak RSS MB", "model MB"
    );
    for r in report["results"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:>10} {:>14.1} {:>14.1} {:>12.1} {:>12.1}",
            r["scheme"].as_str().unwrap_or(""),
            r["prompt_len"],
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["model_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
    Ok(())
}

use super::common::{
    model_label, peak_rss_bytes, print_json, release_free_memory, require_runnable, reset_peak_rss,
    rss_bytes, show_progress, spinner, stats_if_needed, Scheme,
};
use super::pipeline::build;
use crate::args::BenchArgs;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use sq_calib::StatsTable;
use sq_model::{Forward, Logits};
use std::time::Instant;

/// One prompt's prefill and decode, timed: a seeded random prompt and a session kept between
/// runs, so a run allocates nothing.
struct Timing<'m, M: Forward + ?Sized> {
    model: &'m M,
    prompt: Vec<u32>,
    session: M::Session,
    logits: Vec<f32>,
    gen_tokens: usize,
}

impl<'m, M: Forward + ?Sized> Timing<'m, M> {
    fn new(model: &'m M, prompt_len: usize, gen_tokens: usize, seed: u64) -> Result<Self> {
        let vocab = model.config().vocab_size as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let prompt = (0..prompt_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        Ok(Timing {
            session: model.new_session(prompt_len + gen_tokens)?,
            model,
            prompt,
            logits: Vec::new(),
            gen_tokens,
        })
    }

    /// Seconds of the prefill and of the greedy decode after it.
    fn run(&mut self) -> Result<(f64, f64)> {
        M::clear_session(&mut self.session);
        let t = Instant::now();
        self.model.forward(
            &self.prompt,
            &mut self.session,
            Logits::Last,
            &mut self.logits,
        )?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut next = sq_model::generate::argmax(&self.logits);
        for _ in 0..self.gen_tokens {
            self.model
                .forward(&[next], &mut self.session, Logits::Last, &mut self.logits)?;
            next = sq_model::generate::argmax(&self.logits);
        }
        Ok((prefill, t.elapsed().as_secs_f64()))
    }

    /// Tokens/s of a prefill and of a decode that took these seconds.
    fn rates(&self, (prefill, decode): (f64, f64)) -> (f64, f64) {
        (
            self.prompt.len() as f64 / prefill.max(1e-12),
            if self.gen_tokens == 0 {
                0.0
            } else {
                self.gen_tokens as f64 / decode.max(1e-12)
            },
        )
    }
}

/// The median (the upper one of an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Prefill and decode speed of one prompt length (one warm run first, then the median of three).
pub fn measure<M: Forward + ?Sized>(
    model: &M,
    prompt_len: usize,
    gen_tokens: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let mut timing = Timing::new(model, prompt_len, gen_tokens, seed)?;
    timing.run()?;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..3 {
        let secs = timing.run()?;
        let (p, d) = timing.rates(secs);
        prefill.push(p);
        decode.push(d);
    }
    Ok((median(prefill), median(decode)))
}

/// `--pairs N`: every scheme loaded at once and run in turn, N rounds per prompt length, the
/// order rotating each round. Each round gives every scheme's speed-up over the first scheme
/// from runs seconds apart, so a machine whose speed drifts over minutes moves both sides of a
/// ratio alike; the rows give the median of the N ratios and their range.
fn paired(
    a: &BenchArgs,
    schemes: &[Scheme],
    stats: Option<&StatsTable>,
    device: sq_model::Device,
    show: bool,
) -> Result<Vec<serde_json::Value>> {
    let built = schemes
        .iter()
        .map(|s| build(*s, &a.model, &a.quant, stats, show).map(|b| b.loaded))
        .collect::<Result<Vec<_>>>()?;
    let runners = built
        .iter()
        .map(|l| super::gpu::runner(&l.model, device, false))
        .collect::<Result<Vec<_>>>()?;
    let context = runners[0].config().max_position_embeddings;
    let mut rows = Vec::new();
    for &len in a
        .prompt_len
        .iter()
        .filter(|&&l| l + a.gen_tokens <= context)
    {
        let _span = tracing::info_span!("bench_pairs", prompt_len = len, pairs = a.pairs).entered();
        let pb = spinner(
            &format!(
                "timing {} schemes in turn: {} rounds at {len} tokens",
                schemes.len(),
                a.pairs
            ),
            show,
        );
        let mut timings = runners
            .iter()
            .map(|r| Timing::new(r, len, a.gen_tokens, a.quant.calib.seed))
            .collect::<Result<Vec<_>>>()?;
        for t in timings.iter_mut() {
            t.run()?; // warm: caches, page faults, the scratch buffers' first growth
        }
        // rates[round][scheme] = (prefill tok/s, decode tok/s)
        let mut rates = vec![vec![(0.0, 0.0); schemes.len()]; a.pairs];
        for (round, row) in rates.iter_mut().enumerate() {
            for k in 0..schemes.len() {
                let i = (round + k) % schemes.len();
                let secs = timings[i].run()?;
                row[i] = timings[i].rates(secs);
            }
        }
        pb.finish_and_clear();
        for (i, scheme) in schemes.iter().enumerate().skip(1) {
            let ratios = |f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
                rates
                    .iter()
                    .map(|r| f(&r[i]) / f(&r[0]).max(1e-12))
                    .collect()
            };
            let (p, d) = (ratios(|r| r.0), ratios(|r| r.1));
            let range = |v: &[f64]| {
                (
                    v.iter().copied().fold(f64::INFINITY, f64::min),
                    v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                )
            };
            let mut row = super::pipeline::scheme_fields_for(
                *scheme,
                &a.quant,
                built[i].quantization.as_ref(),
            )?;
            row.remove("smooth_targets");
            row.insert("baseline".into(), schemes[0].name().into());
            row.insert("prompt_len".into(), len.into());
            row.insert("pairs".into(), a.pairs.into());
            row.insert(
                "int8_attention".into(),
                built[i].model.attention.is_int8().into(),
            );
            row.insert("prefill_speedup".into(), median(p.clone()).into());
            row.insert("prefill_speedup_min".into(), range(&p).0.into());
            row.insert("prefill_speedup_max".into(), range(&p).1.into());
            if a.gen_tokens > 0 {
                row.insert("decode_speedup".into(), median(d.clone()).into());
                row.insert("decode_speedup_min".into(), range(&d).0.into());
                row.insert("decode_speedup_max".into(), range(&d).1.into());
            }
            let col = |k: usize, f: fn(&(f64, f64)) -> f64| -> f64 {
                median(rates.iter().map(|r| f(&r[k])).collect())
            };
            row.insert("prefill_tokens_per_s".into(), col(i, |r| r.0).into());
            row.insert("decode_tokens_per_s".into(), col(i, |r| r.1).into());
            row.insert(
                "baseline_prefill_tokens_per_s".into(),
                col(0, |r| r.0).into(),
            );
            row.insert(
                "baseline_decode_tokens_per_s".into(),
                col(0, |r| r.1).into(),
            );
            rows.push(serde_json::Value::Object(row));
        }
    }
    Ok(rows)
}

pub fn run(a: BenchArgs, device: sq_model::Device) -> Result<()> {
    let schemes = super::common::schemes_for(&a.model, &a.quant, &[Scheme::Fp32])?;
    require_runnable(&schemes, &a.model, &a.quant)?;
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!("--prompt-len needs positive lengths, e.g. 128,512,2048");
    }
    if a.pairs > 0 && schemes.len() < 2 {
        bail!("--pairs compares schemes with the first one: give at least two in --scheme, e.g. fp32,smoothquant");
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
    let mut report = serde_json::json!({
        "model": label,
        "threads": rayon::current_num_threads(),
        "gen_tokens": a.gen_tokens,
        "results": rows,
    });
    if a.pairs > 0 {
        release_free_memory();
        report["paired"] = paired(&a, &schemes, stats.as_ref(), device, show)?.into();
    }
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
            attention_label(r),
            r["prompt_len"].as_u64().unwrap_or(0),
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["loaded_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["model_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            r["kv_cache_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        );
    }
    if let Some(paired) = report["paired"].as_array() {
        println!(
            "\nin turn, {} rounds: speed-up over {} (median of the per-round ratios, [min, max])",
            a.pairs,
            schemes[0].name()
        );
        println!(
            "{:<12} {:<5} {:>10} {:>24} {:>24}",
            "scheme", "attn", "prompt", "prefill", "decode"
        );
        let cell = |r: &serde_json::Value, key: &str| match r[key].as_f64() {
            Some(m) => format!(
                "{m:.2}x [{:.2}, {:.2}]",
                r[format!("{key}_min")].as_f64().unwrap_or(0.0),
                r[format!("{key}_max")].as_f64().unwrap_or(0.0)
            ),
            None => "-".into(),
        };
        for r in paired {
            println!(
                "{:<12} {:<5} {:>10} {:>24} {:>24}",
                r["scheme"].as_str().unwrap_or(""),
                attention_label(r),
                r["prompt_len"].as_u64().unwrap_or(0),
                cell(r, "prefill_speedup"),
                cell(r, "decode_speedup"),
            );
        }
    }
    Ok(())
}

/// The table's `attn` column: how a result row ran attention.
fn attention_label(row: &serde_json::Value) -> &'static str {
    if row["int8_attention"].as_bool() == Some(true) {
        "int8"
    } else {
        "f32"
    }
}

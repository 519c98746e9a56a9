use super::common::{print_json, require_runnable, show_progress, stats_if_needed, Scheme};
use super::pipeline::build;
use crate::args::GenerateArgs;
use anyhow::{bail, Context, Result};
use sq_model::{generate, Sampler};
use std::io::Write;

pub fn run(a: GenerateArgs, device: sq_model::Device) -> Result<()> {
    let schemes = super::common::schemes_for(&a.model, &a.quant, &[Scheme::Fp32])?;
    if schemes.len() != 1 {
        bail!(
            "generate runs one scheme at a time, but --scheme lists {}; pass one, e.g. --scheme {}",
            schemes.len(),
            schemes[schemes.len() - 1].name()
        );
    }
    require_runnable(&schemes, &a.model, &a.quant)?;
    if a.prompt.is_empty() {
        bail!("--prompt is empty: give the text to continue");
    }
    let sampler = Sampler::new(a.temperature, a.top_p, a.quant.calib.seed)
        .context("invalid sampling options")?;
    let mut sampler = sampler;
    let show = show_progress(a.json);
    let stats = stats_if_needed(&schemes, &a.model, &a.quant, show)?;
    let loaded = build(schemes[0], &a.model, &a.quant, stats.as_ref(), show)?.loaded;
    let mut prompt = Vec::new();
    if loaded.add_bos {
        if let Some(bos) = loaded.tokenizer.bos_id() {
            prompt.push(bos);
        }
    }
    prompt.extend(loaded.tokenizer.encode(&a.prompt)?);
    // Checked before anything is printed: the prompt plus one new token must fit the context.
    let context = loaded.model.config.max_position_embeddings;
    if a.max_tokens > 0 && prompt.len() >= context {
        bail!(
            "the prompt has {} tokens, which leaves no room in the model's context of {context} tokens; shorten the prompt",
            prompt.len()
        );
    }
    let runner = super::gpu::runner(&loaded.model, device, show)?;
    let stream = !a.json;
    if stream {
        print!("{}", a.prompt);
        std::io::stdout().flush()?;
    }
    let out = generate(
        &runner,
        loaded.tokenizer.as_ref(),
        &prompt,
        a.max_tokens,
        &mut sampler,
        |piece| {
            if stream {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        },
    )?;
    if a.json {
        print_json(&serde_json::json!({
            "prompt": a.prompt,
            "text": out.text,
            "tokens": out.tokens.len(),
            "tokens_per_s": out.decode_tokens_per_s(),
            "prompt_tokens": out.prompt_tokens,
            "prefill_tokens_per_s": out.prompt_tokens as f64 / out.prefill_seconds.max(1e-9),
            "scheme": schemes[0].name(),
            "int8_attention": loaded.model.attention.is_int8(),
        }))?;
    } else {
        println!();
        eprintln!(
            "{} tokens, prefill {:.1} tok/s ({} prompt tokens), decode {:.1} tok/s",
            out.tokens.len(),
            out.prompt_tokens as f64 / out.prefill_seconds.max(1e-9),
            out.prompt_tokens,
            out.decode_tokens_per_s()
        );
    }
    Ok(())
}

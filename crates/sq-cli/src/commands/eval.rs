use super::common::{
    bar, load_model, model_label, parse_schemes, print_json, read_text, require_runnable,
    show_progress, Scheme,
};
use crate::args::EvalArgs;
use anyhow::Result;
use sq_model::perplexity;

pub fn run(a: EvalArgs) -> Result<()> {
    let schemes = parse_schemes(
        &a.quant,
        &[Scheme::Fp32, Scheme::Naive, Scheme::SmoothQuant],
    )?;
    require_runnable(&schemes, &a.quant)?;
    let show = show_progress(a.json);
    let text = read_text(&a.data, "evaluation data (--data)")?;
    let loaded = load_model(&a.model, show)?;
    let tokens = loaded.tokenizer.encode(&text)?;
    let mut results = Vec::new();
    let mut summary = None;
    for scheme in &schemes {
        let windows = (tokens.len() / a.seq_len.max(1)).min(a.max_windows.unwrap_or(usize::MAX));
        let pb = bar(windows as u64, &format!("eval {}", scheme.name()), show);
        let p = perplexity(
            &loaded.model,
            &tokens,
            a.seq_len,
            a.max_windows,
            |done, _| pb.set_position(done as u64),
        )?;
        pb.finish_and_clear();
        results.push(serde_json::json!({
            "scheme": scheme.name(),
            "weights": null,
            "acts": null,
            "alpha": null,
            "smooth_targets": null,
            "perplexity": p.perplexity,
        }));
        summary = Some(p);
    }
    let p = summary.expect("at least one scheme");
    let report = serde_json::json!({
        "model": model_label(&loaded),
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
    println!("model   {}", report["model"].as_str().unwrap_or(""));
    println!(
        "data    {}  ({} windows of {} tokens, {} predicted)",
        a.data.display(),
        p.windows,
        a.seq_len,
        p.predicted_tokens
    );
    println!();
    println!(
        "{:<12} {:<8} {:<7} {:<6} {:>12}",
        "scheme", "weights", "acts", "alpha", "perplexity"
    );
    for r in &results {
        let cell = |k: &str| r[k].as_str().map_or("-".to_string(), str::to_string);
        println!(
            "{:<12} {:<8} {:<7} {:<6} {:>12.4}",
            cell("scheme"),
            cell("weights"),
            cell("acts"),
            r["alpha"]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v}")),
            r["perplexity"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

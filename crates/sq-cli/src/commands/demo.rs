use super::common::{print_json, show_progress, spinner};
use crate::args::DemoArgs;
use anyhow::Result;
use sq_model::{generate, perplexity, Sampler};

/// Evaluation text for the demo: stories the embedded model wrote itself (seeded sampling,
/// see `assets/README.md`), so the demo needs nothing outside the repository.
const DEMO_EVAL_TEXT: &str = include_str!("../../assets/demo/eval.txt");

pub fn run(a: DemoArgs) -> Result<()> {
    let show = show_progress(a.json);
    let pb = spinner("loading the embedded stories260K model", show);
    let loaded = sq_model::load(None, None)?;
    pb.finish_and_clear();
    let model = &loaded.model;
    let tokens = loaded.tokenizer.encode(DEMO_EVAL_TEXT)?;
    let seq_len = 256;
    let p = perplexity(model, &tokens, seq_len, None, |_, _| {})?;
    let mut prompt = vec![loaded.tokenizer.bos_id().unwrap_or(1)];
    prompt.extend(loaded.tokenizer.encode("Once upon a time")?);
    let sample = generate(
        model,
        loaded.tokenizer.as_ref(),
        &prompt,
        48,
        &mut Sampler::greedy(),
        |_| {},
    )?;
    let (prefill, decode) = super::bench::measure(model, 128, 64, 0)?;
    let row = serde_json::json!({
        "scheme": "fp32", "weights": null, "acts": null, "alpha": null,
        "perplexity": p.perplexity,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "model_bytes": model.weight_bytes(),
        "sample": format!("Once upon a time{}", sample.text),
    });
    if a.json {
        return print_json(&serde_json::json!({
            "model": "stories260K (embedded)",
            "eval_windows": p.windows,
            "seq_len": seq_len,
            "results": [row],
            "pending": ["naive", "smoothquant"],
        }));
    }
    println!(
        "smoothquant demo on the embedded stories260K model ({} parameters)",
        model.num_params()
    );
    println!(
        "perplexity over {} windows of {seq_len} tokens of the model's own stories\n",
        p.windows
    );
    println!(
        "{:<12} {:<8} {:<6} {:<6} {:>10} {:>14} {:>13} {:>11}",
        "scheme",
        "weights",
        "acts",
        "alpha",
        "perplexity",
        "prefill tok/s",
        "decode tok/s",
        "model bytes"
    );
    println!(
        "{:<12} {:<8} {:<6} {:<6} {:>10.3} {:>14.0} {:>13.0} {:>11}",
        "fp32",
        "-",
        "-",
        "-",
        p.perplexity,
        prefill,
        decode,
        model.weight_bytes()
    );
    println!(
        "\nnaive W8A8 and SmoothQuant rows arrive with the SmoothQuant pipeline (sq-smooth).\n"
    );
    println!("fp32 sample: Once upon a time{}", sample.text);
    Ok(())
}

use super::common::{load_model, model_label, print_json, show_progress};
use crate::args::InspectArgs;
use anyhow::{bail, Result};

pub fn run(a: InspectArgs) -> Result<()> {
    if a.calib.calib_data.is_some() || a.act_scales.is_some() || a.plot.is_some() {
        bail!(
            "activation outlier statistics (--calib-data, --act-scales, --plot) arrive with the \
             SmoothQuant pipeline; run `inspect` without them for the architecture summary"
        );
    }
    let loaded = load_model(&a.model, show_progress(a.json))?;
    let m = &loaded.model;
    let c = &m.config;
    let hf_arch = loaded
        .hf_config
        .get("architectures")
        .and_then(|v| v.get(0))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let linears: Vec<serde_json::Value> = m
        .linears()
        .iter()
        .map(|l| {
            serde_json::json!({
                "name": l.name,
                "in": l.linear.in_features(),
                "out": l.linear.out_features(),
                "kind": l.linear.kind(),
                "act_max_median_ratio": null,
                "act_max_median_ratio_smoothed": null,
            })
        })
        .collect();
    let report = serde_json::json!({
        "model": model_label(&loaded),
        "format": loaded.format,
        "architecture": c.architecture.name(),
        "hf_architecture": hf_arch,
        "layers": c.num_layers,
        "hidden": c.hidden_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "context": c.max_position_embeddings,
        "params": m.num_params(),
        "weight_bytes": m.weight_bytes(),
        "linears": linears,
    });
    if a.json {
        return print_json(&report);
    }
    println!(
        "model         {} ({})",
        report["model"].as_str().unwrap_or(""),
        loaded.format
    );
    println!("architecture  {} {}", c.architecture.name(), hf_arch);
    println!(
        "shape         {} layers, hidden {}, {} heads ({} KV) of {}, MLP {}, vocab {}, context {}",
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings
    );
    println!(
        "params        {} ({:.1} MB as held)",
        m.num_params(),
        m.weight_bytes() as f64 / 1e6
    );
    println!();
    println!("{:<48} {:>7} {:>7}  kind", "linear", "in", "out");
    for l in m.linears() {
        println!(
            "{:<48} {:>7} {:>7}  {}",
            l.name,
            l.linear.in_features(),
            l.linear.out_features(),
            l.linear.kind()
        );
    }
    Ok(())
}

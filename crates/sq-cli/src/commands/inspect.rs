use super::common::{load_model, model_label, print_json, show_progress};
use crate::args::InspectArgs;
use anyhow::{bail, Result};

pub fn run(a: InspectArgs) -> Result<()> {
    if a.plot.is_some() {
        bail!("--plot is not in this build yet; `inspect --calib-data FILE --json` gives the numbers it will draw");
    }
    let show = show_progress(a.json);
    let mut loaded = load_model(&a.model, show)?;
    let ratios = outlier_ratios(&a, &mut loaded, show)?;
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
                "act_max_median_ratio": ratios.as_ref().and_then(|r| r.0.get(&l.name)).map(|v| super::pipeline::f32_json(*v)),
                "act_max_median_ratio_smoothed": ratios.as_ref().and_then(|r| r.1.get(&l.name)).map(|v| super::pipeline::f32_json(*v)),
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
    match &ratios {
        None => {
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
        }
        Some((before, after)) => {
            println!("activation outliers: max/median of the per-channel input ranges (1 = flat)");
            println!(
                "{:<48} {:>7} {:>7} {:>10} {:>10}",
                "linear", "in", "out", "ratio", "smoothed"
            );
            for l in m.linears() {
                let Some(b) = before.get(&l.name) else {
                    continue;
                };
                let s = after
                    .get(&l.name)
                    .map_or("-".to_string(), |v| format!("{v:.1}"));
                println!(
                    "{:<48} {:>7} {:>7} {:>10.1} {:>10}",
                    l.name,
                    l.linear.in_features(),
                    l.linear.out_features(),
                    b,
                    s
                );
            }
        }
    }
    Ok(())
}

type Ratios = (
    std::collections::BTreeMap<String, f32>,
    std::collections::BTreeMap<String, f32>,
);

/// Max/median channel-range ratio of every Linear input, before and after smoothing with the
/// paper's groups at `--alpha` (only when calibration input is given).
fn outlier_ratios(
    a: &InspectArgs,
    loaded: &mut sq_model::LoadedModel,
    show: bool,
) -> Result<Option<Ratios>> {
    if a.calib.calib_data.is_none() && a.act_scales.is_none() {
        return Ok(None);
    }
    let quant = crate::args::QuantArgs {
        scheme: None,
        weights: crate::args::WeightGranularity::Channel,
        acts: crate::args::ActGranularity::Token,
        preset: None,
        alpha: a.alpha.clone(),
        smooth_targets: a.smooth_targets,
        calib: a.calib.clone(),
        act_scales: a.act_scales.clone(),
        int8_attention: false,
    };
    if super::pipeline::is_auto(&quant) {
        bail!("inspect shows smoothing at one --alpha (a number or a JSON table), not `auto`");
    }
    let alpha = super::pipeline::alpha(&quant)?;
    let mut stats = super::pipeline::statistics(&a.model, &quant, show)?;
    let before = stats
        .iter()
        .map(|s| (s.name().to_string(), s.max_median_ratio()))
        .collect();
    // Smoothing a copy of the model updates the statistics to what the smoothed model sees.
    let after = match sq_smooth::smoothing_groups(&loaded.model, a.smooth_targets.into()) {
        Ok(groups) => {
            sq_smooth::smooth_model(&mut loaded.model, &groups, &mut stats, &alpha)?;
            stats
                .iter()
                .map(|s| (s.name().to_string(), s.max_median_ratio()))
                .collect()
        }
        Err(e) => {
            eprintln!("note: no smoothed ratios: {e}");
            Default::default()
        }
    };
    Ok(Some((before, after)))
}

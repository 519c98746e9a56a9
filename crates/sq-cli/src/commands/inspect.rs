//! `smoothquant inspect`: architecture and tensor summary; with calibration input, every Linear
//! input's outlier ratio before and after smoothing; `--plot` draws them.

use super::common::{load_model, model_label, print_json, show_progress};
use super::pipeline::f32_json;
use super::plot::{self, InputRatio, PlotData};
use crate::args::InspectArgs;
use anyhow::{bail, Context, Result};
use sq_calib::StatsTable;
use sq_model::config::{Activation, NormKind, PositionEncoding};
use sq_model::layers::Norm;
use sq_model::model::{Block, Embedding};
use sq_model::{LoadedModel, Model, NamedLinear};
use std::collections::BTreeMap;

pub fn run(a: InspectArgs) -> Result<()> {
    let calibrated = a.calib.calib_data.is_some() || a.act_scales.is_some();
    if let Some(path) = &a.plot {
        plot::check_path(path)?;
        if !calibrated {
            bail!(
                "--plot draws activation statistics: pass --calib-data FILE (text to calibrate on) or \
                 --act-scales FILE (from `smoothquant calibrate`) with it"
            );
        }
    }
    if a.plot_linear.is_some() && a.plot.is_none() {
        bail!("--plot-linear chooses the Linear drawn by --plot FILE.png; pass --plot too");
    }
    let quant = quant_args(&a);
    if calibrated {
        if super::pipeline::is_auto(&quant) {
            bail!(
                "--alpha auto: inspect shows smoothing at one α (a number in [0, 1] or a JSON table \
                 of per-group values); run `smoothquant quantize --alpha auto --json` to see the \
                 searched values"
            );
        }
        super::pipeline::alpha(&quant)?;
    }
    let show = show_progress(a.json);
    let mut loaded = load_model(&a.model, show)?;
    if let Some(name) = &a.plot_linear {
        check_plot_linear(&loaded.model, name)?;
    }
    let outliers = if calibrated {
        Some(outlier_stats(&quant, &mut loaded, show)?)
    } else {
        None
    };
    let report = report(&loaded, outliers.as_ref(), a.smooth_targets.into());
    if let (Some(path), Some(o)) = (&a.plot, &outliers) {
        draw_plot(path, &a, &loaded, o)?;
    }
    if a.json {
        let mut report = report;
        if let Some(p) = &a.plot {
            report["plot"] = p.display().to_string().into();
        }
        return print_json(&report);
    }
    print_summary(&loaded, &report);
    if let Some(o) = &outliers {
        print_outliers(&loaded.model, o);
    }
    if let Some(p) = &a.plot {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}

fn quant_args(a: &InspectArgs) -> crate::args::QuantArgs {
    crate::args::QuantArgs {
        scheme: None,
        weights: crate::args::WeightGranularity::Channel,
        acts: crate::args::ActGranularity::Token,
        preset: None,
        alpha: a.alpha.clone(),
        smooth_targets: a.smooth_targets,
        smooth_fold: None,
        calib: a.calib.clone(),
        act_scales: a.act_scales.clone(),
        int8_attention: false,
        lm_head: crate::args::LmHeadArg::Fp32,
    }
}

fn check_plot_linear(model: &Model, name: &str) -> Result<()> {
    let linears = model.linears();
    if !linears.iter().any(|l| l.name == name) {
        let example = linears.first().map_or("", |l| l.name.as_str());
        bail!(
            "--plot-linear `{name}`: the model has no Linear of that name; Linears are named by their \
             Hugging Face names, e.g. `{example}` (`smoothquant inspect` lists them)"
        );
    }
    if name == model.lm_head.name {
        bail!(
            "--plot-linear `{name}`: the LM head is not calibrated (it stays in full precision); \
             choose a decoder Linear, e.g. `{}`",
            linears[0].name
        );
    }
    Ok(())
}

/// Activation statistics before smoothing, and the same after smoothing the `--smooth-targets` groups.
struct Outliers {
    before: StatsTable,
    after: StatsTable,
    alpha: String,
    calibration: String,
}

impl Outliers {
    fn ratios(table: &StatsTable) -> BTreeMap<String, f32> {
        table
            .iter()
            .map(|s| (s.name().to_string(), s.max_median_ratio()))
            .collect()
    }
}

fn outlier_stats(
    q: &crate::args::QuantArgs,
    loaded: &mut LoadedModel,
    show: bool,
) -> Result<Outliers> {
    let alpha = super::pipeline::alpha(q)?;
    let before = super::pipeline::statistics_of(Some(loaded), q, show)?;
    super::common::check_stats_fit(&loaded.model, &before)?;
    let mut after = before.clone();
    // Smoothing the model (a copy held only by this command) updates the statistics to what
    // the smoothed model's Linears see.
    match sq_smooth::smoothing_groups(&loaded.model, q.smooth_targets.into()) {
        Ok(groups) => {
            sq_smooth::smooth_model(&mut loaded.model, &groups, &mut after, &alpha).with_context(
                || "cannot smooth the model with these statistics (were they calibrated on it?)",
            )?;
        }
        Err(e) => eprintln!("note: no smoothed ratios: {e}"),
    }
    let calibration = match (&q.act_scales, &q.calib.calib_data) {
        (Some(p), _) => file_name(p),
        (None, Some(p)) => format!(
            "{} ({} windows of {} tokens)",
            file_name(p),
            q.calib.calib_samples,
            q.calib.calib_seq_len
        ),
        (None, None) => String::new(),
    };
    let alpha = match &alpha {
        sq_smooth::AlphaSpec::Global(a) => format!("{a}"),
        sq_smooth::AlphaSpec::PerGroup { .. } => format!("per group ({})", q.alpha),
    };
    Ok(Outliers {
        before,
        after,
        alpha,
        calibration,
    })
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

/// The position of the layer index in a Hugging Face name: `model.layers.3.mlp.up_proj` ->
/// (`model.layers.N.mlp.up_proj`, 3).
fn layer_template(name: &str) -> Option<(String, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    let pos = parts.iter().position(|p| p.parse::<usize>().is_ok())?;
    let layer = parts[pos].parse().ok()?;
    let mut t = parts.clone();
    t[pos] = "N";
    Some((t.join("."), layer))
}

/// The Linear's name within its layer (`self_attn.q_proj`), or the full name outside layers.
fn short_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        Some(pos) => parts[pos + 1..].join("."),
        None => name.to_string(),
    }
}

/// One row of the tensor summary: name (layer index as N), shape, what it is.
struct TensorRow {
    name: String,
    shape: String,
    kind: String,
}

fn norm_row(n: &Norm) -> TensorRow {
    TensorRow {
        name: n.name.clone(),
        shape: format!("{}", n.weight.len()),
        kind: format!(
            "{}{}",
            match n.kind {
                NormKind::RmsNorm => "RMSNorm",
                NormKind::LayerNorm => "LayerNorm",
            },
            if n.bias.is_some() { " + bias" } else { "" }
        ),
    }
}

fn linear_row(l: &NamedLinear) -> TensorRow {
    TensorRow {
        name: l.name.clone(),
        shape: format!("{} -> {}", l.linear.in_features(), l.linear.out_features()),
        kind: l.linear.kind(),
    }
}

fn block_rows(b: &Block) -> Vec<TensorRow> {
    let mut rows = vec![norm_row(&b.attn_norm)];
    for l in b.linears() {
        rows.push(linear_row(l));
        if l.name == b.o_proj.name {
            rows.push(norm_row(&b.mlp_norm));
        }
    }
    rows
}

fn tensor_rows(m: &Model) -> (Vec<TensorRow>, bool) {
    let emb = |e: &Embedding| TensorRow {
        name: e.name.clone(),
        shape: format!("{} x {}", e.weight.len() / e.dim.max(1), e.dim),
        kind: "embedding".into(),
    };
    let mut rows = vec![TensorRow {
        shape: format!("{} x {}", m.embedding_rows(), m.embed.dim),
        ..emb(&m.embed)
    }];
    rows.extend(m.pos_embed.iter().map(emb));
    rows.extend(m.embed_norm.iter().map(norm_row));
    rows.extend(m.project_in.iter().map(linear_row));
    // Layers of one shape are shown once, with N for the index.
    let first: Vec<(String, String, String)> = m
        .layers
        .first()
        .map(block_rows)
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            (
                layer_template(&r.name).map_or(r.name, |t| t.0),
                r.shape,
                r.kind,
            )
        })
        .collect();
    let uniform = m.layers.iter().all(|b| {
        let rows: Vec<(String, String, String)> = block_rows(b)
            .into_iter()
            .map(|r| {
                (
                    layer_template(&r.name).map_or(r.name, |t| t.0),
                    r.shape,
                    r.kind,
                )
            })
            .collect();
        rows == first
    });
    if uniform {
        rows.extend(
            first
                .into_iter()
                .map(|(name, shape, kind)| TensorRow { name, shape, kind }),
        );
    } else {
        for b in &m.layers {
            rows.extend(block_rows(b));
        }
    }
    rows.extend(m.final_norm.iter().map(norm_row));
    rows.extend(m.project_out.iter().map(linear_row));
    let mut head = linear_row(&m.lm_head);
    if m.config.tie_word_embeddings {
        head.kind = format!("{} (tied to {})", head.kind, m.embed.name);
    }
    rows.push(head);
    (rows, uniform)
}

fn report(
    loaded: &LoadedModel,
    o: Option<&Outliers>,
    targets: sq_smooth::SmoothTargets,
) -> serde_json::Value {
    let m = &loaded.model;
    let c = &m.config;
    let hf_arch = loaded
        .hf_config
        .get("architectures")
        .and_then(|v| v.get(0))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let (before, after) = match o {
        Some(o) => (Outliers::ratios(&o.before), Outliers::ratios(&o.after)),
        None => Default::default(),
    };
    let linears: Vec<serde_json::Value> = m
        .linears()
        .iter()
        .map(|l| {
            serde_json::json!({
                "name": l.name,
                "in": l.linear.in_features(),
                "out": l.linear.out_features(),
                "kind": l.linear.kind(),
                "act_max_median_ratio": before.get(&l.name).map(|v| f32_json(*v)),
                "act_max_median_ratio_smoothed": after.get(&l.name).map(|v| f32_json(*v)),
            })
        })
        .collect();
    // A quantized checkpoint is already smoothed: no groups to offer.
    let groups: Vec<serde_json::Value> = sq_smooth::smoothing_groups(m, targets)
        .ok()
        .filter(|_| loaded.quantization.is_none())
        .map(|g| {
            g.into_iter()
                .map(|g| serde_json::json!({"fold": g.fold.describe(), "linears": g.linears}))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "model": model_label(loaded),
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
        "norm": match c.norm_kind {
            NormKind::RmsNorm => "rmsnorm",
            NormKind::LayerNorm => "layernorm",
        },
        "norm_eps": f32_json(c.norm_eps),
        "pre_norm": c.pre_norm,
        "activation": activation_name(c.activation),
        "positions": positions_name(&c.positions),
        "tied_embeddings": c.tie_word_embeddings,
        "params": m.num_params(),
        "weight_bytes": m.weight_bytes(),
        "add_bos": loaded.add_bos,
        "quantization": loaded.quantization.as_ref().map(|q| serde_json::to_value(q).unwrap_or_default()),
        "smooth_targets": targets.name(),
        "smoothing_groups": groups,
        "alpha": o.map(|o| o.alpha.clone()),
        "linears": linears,
    })
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Silu => "silu",
        Activation::Relu => "relu",
        Activation::GeluTanh => "gelu_tanh",
        Activation::Gelu => "gelu",
    }
}

fn positions_name(p: &PositionEncoding) -> &'static str {
    match p {
        PositionEncoding::Rotary { .. } => "rotary",
        PositionEncoding::Learned { .. } => "learned",
        PositionEncoding::Alibi { .. } => "alibi",
    }
}

/// Digits grouped by thousands: 134,515,008.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn print_summary(loaded: &LoadedModel, r: &serde_json::Value) {
    let m = &loaded.model;
    let c = &m.config;
    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
    println!("model         {} ({})", s("model"), loaded.format);
    let hf = s("hf_architecture");
    println!(
        "architecture  {}{}: {} {} (eps {:e}), {} MLP, {} positions{}",
        c.architecture.name(),
        if hf.is_empty() {
            String::new()
        } else {
            format!(" ({hf})")
        },
        if c.pre_norm { "pre-norm" } else { "post-norm" },
        match c.norm_kind {
            NormKind::RmsNorm => "RMSNorm",
            NormKind::LayerNorm => "LayerNorm",
        },
        c.norm_eps,
        activation_name(c.activation),
        positions_name(&c.positions),
        if c.tie_word_embeddings {
            ", tied LM head"
        } else {
            ""
        }
    );
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
        "params        {} ({:.1} MB held in memory)",
        thousands(m.num_params() as u64),
        m.weight_bytes() as f64 / 1e6
    );
    println!(
        "tokenizer     {} tokens, {}",
        loaded.tokenizer.vocab_size(),
        if loaded.add_bos {
            "BOS added before a prompt"
        } else {
            "no BOS added"
        }
    );
    if let Some(q) = &loaded.quantization {
        let alpha = q
            .extra
            .get("alpha")
            .map_or("-".to_string(), |a| a.to_string());
        println!(
            "quantized     {} W8A8: weights per {}, acts {}, alpha {}",
            q.scheme,
            serde_json::to_value(q.weights)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            q.acts,
            alpha
        );
    }
    let (rows, uniform) = tensor_rows(m);
    println!();
    if uniform {
        println!(
            "tensors (Hugging Face names; N = each of the {} layers, all the same shape)",
            c.num_layers
        );
    } else {
        println!("tensors (Hugging Face names)");
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0) + 2;
    for row in &rows {
        println!(
            "  {:<width$}{:<16}{}",
            row.name,
            row.shape,
            row.kind,
            width = width
        );
    }
    if let Some(groups) = r["smoothing_groups"].as_array() {
        let per_layer: Vec<String> = groups
            .iter()
            .take(groups.len() / c.num_layers.max(1))
            .map(|g| {
                let short = |v: &serde_json::Value| short_name(v.as_str().unwrap_or(""));
                let linears: Vec<String> = g["linears"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(short)
                    .collect();
                format!(
                    "{} -> {}",
                    g["fold"].as_str().unwrap_or(""),
                    linears.join(", ")
                )
            })
            .collect();
        if !per_layer.is_empty() {
            println!();
            println!(
                "smoothing groups (--smooth-targets {}, {} in all): per layer",
                r["smooth_targets"].as_str().unwrap_or(""),
                groups.len()
            );
            for g in per_layer {
                println!("  {g}");
            }
        }
    }
}

fn print_outliers(m: &Model, o: &Outliers) {
    let before = Outliers::ratios(&o.before);
    let after = Outliers::ratios(&o.after);
    println!();
    println!(
        "activation outliers: max/median of the per-channel input ranges (1 = flat), before and \
         after smoothing with alpha {}",
        o.alpha
    );
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
    let worst = |t: &BTreeMap<String, f32>| {
        t.iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(n, v)| format!("{v:.1} at {n}"))
            .unwrap_or_default()
    };
    println!();
    println!("largest ratio before smoothing  {}", worst(&before));
    println!("largest ratio after smoothing   {}", worst(&after));
}

/// The Linear drawn by default: the smoothed input with the largest outlier ratio (the one the
/// picture explains best), else the first Linear with statistics.
fn default_plot_linear(o: &Outliers) -> Option<String> {
    let changed = o.before.iter().filter(|s| {
        o.after
            .get(s.name())
            .is_some_and(|a| a.channel_absmax() != s.channel_absmax())
    });
    changed
        .max_by(|a, b| a.max_median_ratio().total_cmp(&b.max_median_ratio()))
        .or_else(|| o.before.iter().next())
        .map(|s| s.name().to_string())
}

/// The distinct inputs of every layer (Linears reading the same tensor share one statistic).
fn layer_inputs(m: &Model, o: &Outliers) -> Vec<InputRatio> {
    let mut out = Vec::new();
    for (li, block) in m.layers.iter().enumerate() {
        let mut seen: Vec<(Vec<f32>, usize)> = Vec::new();
        let mut layer: Vec<(Vec<String>, f32, f32)> = Vec::new();
        for l in block.linears() {
            let (Some(b), Some(a)) = (o.before.get(&l.name), o.after.get(&l.name)) else {
                continue;
            };
            let short = short_name(&l.name);
            let short = short.rsplit('.').next().unwrap_or(&short).to_string();
            match seen
                .iter()
                .find(|(v, _)| v.as_slice() == b.channel_absmax())
            {
                Some((_, idx)) => layer[*idx].0.push(short),
                None => {
                    seen.push((b.channel_absmax().to_vec(), layer.len()));
                    layer.push((vec![short], b.max_median_ratio(), a.max_median_ratio()));
                }
            }
        }
        for (names, before, after) in layer {
            out.push(InputRatio {
                layer: li,
                kind: names.join(", "),
                before,
                after,
            });
        }
    }
    out
}

fn draw_plot(
    path: &std::path::Path,
    a: &InspectArgs,
    loaded: &LoadedModel,
    o: &Outliers,
) -> Result<()> {
    let name = match &a.plot_linear {
        Some(n) => n.clone(),
        None => default_plot_linear(o).context("the statistics are empty: nothing to plot")?,
    };
    let before = o.before.get(&name).with_context(|| {
        format!("--plot-linear `{name}`: the activation statistics have no entry for it")
    })?;
    let after = o.after.get(&name).unwrap_or(before);
    let inputs = layer_inputs(&loaded.model, o);
    let label = match &loaded.format {
        &"gguf" | &"llama2.c" | &"hf" => loaded
            .source
            .file_name()
            .map_or_else(|| model_label(loaded), |n| n.to_string_lossy().into()),
        _ => model_label(loaded),
    };
    plot::draw(
        path,
        &PlotData {
            model: &label,
            alpha: &o.alpha,
            calibration: &o.calibration,
            linear: &name,
            before: before.channel_absmax(),
            after: after.channel_absmax(),
            inputs: &inputs,
        },
    )
}

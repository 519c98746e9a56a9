//! From an FP model and the quantization options to a model running a scheme.

use super::common::{bar, load_model, read_text, spinner, token_bar, Scheme};
use crate::args::{ActGranularity, ModelArgs, Preset, QuantArgs, SmoothFold, WeightGranularity};
use anyhow::{bail, Context, Result};
use sq_calib::{calibrate, CalibConfig, StatsTable};
use sq_model::LoadedModel;
use sq_smooth::{
    quantize_model, quantize_model_with_progress, smooth_model, smoothing_groups, ActPolicy,
    AlphaSpec, GroupResult, Recipe,
};

/// The W8A8 recipe chosen by `--preset` or `--weights`/`--acts`.
pub fn recipe(q: &QuantArgs) -> Recipe {
    match q.preset {
        Some(Preset::O1) => Recipe::O1,
        Some(Preset::O2) => Recipe::O2,
        Some(Preset::O3) => Recipe::O3,
        None => Recipe {
            weights: match q.weights {
                WeightGranularity::Channel => sq_model::WeightGranularity::Channel,
                WeightGranularity::Tensor => sq_model::WeightGranularity::Tensor,
            },
            acts: match q.acts {
                ActGranularity::Token => ActPolicy::Token,
                ActGranularity::Tensor => ActPolicy::Tensor,
                ActGranularity::Static => ActPolicy::Static,
            },
        },
    }
}

/// Whether `--alpha auto` was asked for.
pub fn is_auto(q: &QuantArgs) -> bool {
    q.alpha.trim() == "auto"
}

/// `--alpha`: a number in [0, 1], or a JSON file of per-group values (`auto` is resolved by
/// [`auto_alpha`] on the model).
pub fn alpha(q: &QuantArgs) -> Result<AlphaSpec> {
    let text = q.alpha.trim();
    if text == "auto" {
        if q.calib.calib_data.is_none() {
            bail!("--alpha auto searches each group on real calibration inputs: it needs --calib-data FILE (statistics alone are not enough)");
        }
        return Ok(AlphaSpec::Global(0.5));
    }
    if let Ok(v) = text.parse::<f32>() {
        if !(0.0..=1.0).contains(&v) {
            bail!("--alpha {v} is outside [0, 1]: the migration strength is a number between 0 (no smoothing of activations) and 1 (all difficulty moved to the weights)");
        }
        return Ok(AlphaSpec::Global(v));
    }
    let path = std::path::Path::new(text);
    if !path.is_file() {
        bail!(
            "--alpha `{text}` is neither a number in [0, 1], `auto`, nor an existing JSON file; \
             e.g. --alpha 0.5 (the paper's default), --alpha auto, or --alpha alphas.json"
        );
    }
    let json = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the alpha table {}", path.display()))?;
    AlphaSpec::from_json(&json, 0.5).with_context(|| {
        format!(
            "invalid alpha table {} (it must be one JSON object mapping smoothing groups to numbers \
             in [0, 1], e.g. {{\"model.layers.0.self_attn.q_proj\": 0.8}})",
            path.display()
        )
    })
}

/// The JSON value of `--alpha` for reports.
pub fn alpha_json(spec: &AlphaSpec) -> serde_json::Value {
    match spec {
        AlphaSpec::Global(a) => f32_json(*a),
        AlphaSpec::PerGroup {
            groups,
            default,
            unsmoothed,
        } => {
            let groups: serde_json::Map<String, serde_json::Value> = groups
                .iter()
                .map(|(k, v)| (k.clone(), f32_json(*v)))
                .chain(
                    unsmoothed
                        .iter()
                        .map(|k| (k.clone(), serde_json::Value::Null)),
                )
                .collect();
            serde_json::json!({"default": f32_json(*default), "groups": groups})
        }
    }
}

/// An f32 as the JSON number users typed (0.6, not 0.6000000238418579).
pub fn f32_json(x: f32) -> serde_json::Value {
    format!("{x}")
        .parse::<f64>()
        .map_or(serde_json::Value::Null, serde_json::Value::from)
}

/// Statistics for the quantized schemes: `--act-scales`, or a calibration run on `--calib-data`.
pub fn statistics(model: &ModelArgs, q: &QuantArgs, show: bool) -> Result<StatsTable> {
    if q.act_scales.is_none() && q.calib.calib_data.is_some() {
        // Read the text before the (possibly long) model load, so a bad file fails fast.
        read_text(
            q.calib.calib_data.as_deref().expect("checked"),
            "calibration data (--calib-data)",
        )?;
        let mut loaded = load_model(model, show)?;
        return calibrate_loaded(&mut loaded, q, show);
    }
    statistics_of(None, q, show)
}

/// [`statistics`] on a model already loaded (`inspect`).
pub fn statistics_of(
    loaded: Option<&mut LoadedModel>,
    q: &QuantArgs,
    show: bool,
) -> Result<StatsTable> {
    if let Some(path) = &q.act_scales {
        return load_act_scales(path);
    }
    match loaded {
        Some(loaded) => calibrate_loaded(loaded, q, show),
        None => bail!("quantized schemes need --calib-data FILE or --act-scales FILE"),
    }
}

/// Read `--act-scales`, with messages that say what the file should be.
pub fn load_act_scales(path: &std::path::Path) -> Result<StatsTable> {
    if !path.is_file() {
        bail!(
            "--act-scales {}: no such file; write one with `smoothquant calibrate --calib-data FILE \
             --out {}`",
            path.display(),
            path.display()
        );
    }
    StatsTable::load(path).with_context(|| {
        format!(
            "cannot read the activation statistics {} (--act-scales takes a .safetensors file \
             written by `smoothquant calibrate`)",
            path.display()
        )
    })
}

/// Calibrate `loaded` on `--calib-data`, with a tokens/s progress bar.
fn calibrate_loaded(loaded: &mut LoadedModel, q: &QuantArgs, show: bool) -> Result<StatsTable> {
    let Some(data) = &q.calib.calib_data else {
        bail!("quantized schemes need --calib-data FILE or --act-scales FILE");
    };
    let text = read_text(data, "calibration data (--calib-data)")?;
    let tokens = loaded.tokenizer.encode(&text)?;
    let cfg = CalibConfig {
        samples: q.calib.calib_samples,
        seq_len: q
            .calib
            .calib_seq_len
            .min(loaded.model.config.max_position_embeddings),
        seed: q.calib.seed,
    };
    let windows = sq_calib::calibration_windows(tokens.len(), &cfg)
        .with_context(|| format!("cannot calibrate on {}", data.display()))?;
    super::common::require_calib_window(tokens.len(), cfg.seq_len, data)?;
    let _span = tracing::info_span!("calibrate", windows = windows.len()).entered();
    let done_tokens: Vec<u64> = windows
        .iter()
        .scan(0u64, |acc, w| {
            *acc += w.len() as u64;
            Some(*acc)
        })
        .collect();
    let pb = token_bar(
        done_tokens.last().copied().unwrap_or(0),
        "calibrating",
        show,
    );
    let stats = calibrate(&mut loaded.model, &tokens, &cfg, |d, _| {
        pb.set_position(done_tokens[d - 1])
    })?;
    pb.finish_and_clear();
    Ok(stats)
}

/// Calibration windows that score each whole-model candidate of `--alpha auto`: 16 x 512 tokens
/// (8,192 tokens). Fewer windows were a noisy judge of the small differences on SmolLM2
/// (docs/results.md); 16 also give the paired per-window test of `refine_alphas` its power.
const AUTO_SCORE_WINDOWS: usize = 16;

/// The smoothing groups of `--smooth-targets`, with `--smooth-fold` applied.
pub fn groups_for(model: &sq_model::Model, q: &QuantArgs) -> Result<Vec<sq_smooth::SmoothGroup>> {
    let groups = smoothing_groups(model, q.smooth_targets.into())?;
    Ok(sq_smooth::BeyondFold::from(q.smooth_fold.unwrap_or(SmoothFold::Rows)).apply(&groups))
}

/// Where `1/s` went for the groups after no norm, for reports: `--smooth-fold` when given, else
/// `--alpha auto`'s choice (`auto`), else rows; none for `--smooth-targets paper`.
pub fn reported_fold(
    q: &QuantArgs,
    auto: Option<sq_smooth::BeyondFold>,
) -> Option<sq_smooth::BeyondFold> {
    (sq_smooth::SmoothTargets::from(q.smooth_targets) == sq_smooth::SmoothTargets::All)
        .then(|| q.smooth_fold.map(Into::into).or(auto).unwrap_or_default())
}

/// Resolve `--alpha auto`: sample each group's inputs on calibration windows of the FP model and
/// search the α grid per group for the recipe's quantization. With `runtime_allowed` and no
/// `--smooth-fold`, the model-level stage also tries run-time divides for the groups that fold
/// into a producer's rows; the returned groups carry the chosen folds, and the fold is returned.
pub fn auto_alpha(
    loaded: &mut LoadedModel,
    groups: &[sq_smooth::SmoothGroup],
    stats: &StatsTable,
    recipe: &Recipe,
    q: &QuantArgs,
    runtime_allowed: bool,
    show: bool,
) -> Result<(
    AlphaSpec,
    Vec<sq_smooth::SmoothGroup>,
    sq_smooth::BeyondFold,
)> {
    let data = q
        .calib
        .calib_data
        .as_ref()
        .context("--alpha auto needs --calib-data")?;
    let tokens = loaded
        .tokenizer
        .encode(&read_text(data, "calibration data (--calib-data)")?)?;
    let cfg = CalibConfig {
        samples: q.calib.calib_samples.min(16),
        seq_len: q
            .calib
            .calib_seq_len
            .min(loaded.model.config.max_position_embeddings),
        seed: q.calib.seed,
    };
    let names: Vec<String> = groups.iter().map(|g| g.name().to_string()).collect();
    let _span = tracing::info_span!("alpha_search", groups = groups.len()).entered();
    let pb = spinner("sampling the smoothing groups' inputs", show);
    let samples = sq_calib::sample_inputs(&mut loaded.model, &tokens, &cfg, &names, 512, 4)?;
    pb.finish_and_clear();
    let pb = bar(groups.len() as u64, "alpha search", show);
    let choices = sq_smooth::search_alphas(
        &loaded.model,
        groups,
        stats,
        &samples,
        recipe,
        &sq_smooth::default_grid(),
        |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    for c in &choices {
        tracing::info!(group = %c.group, alpha = c.alpha, error = c.error, error_at_half = c.error_at_half, "alpha search");
    }
    // Model-level stage: whole-model candidates scored by the quantized model's loss on a few
    // calibration windows (the per-group errors alone do not always track perplexity).
    let seq_len = cfg.seq_len.max(2);
    if tokens.len() < seq_len {
        bail!(
            "--alpha auto: the calibration text has {} tokens, fewer than one window of --calib-seq-len {seq_len}",
            tokens.len()
        );
    }
    let grid: Vec<f32> = (3..=8).map(|i| i as f32 / 10.0).collect();
    let backend = sq_kernels::select_backend()?;
    let pb = bar((grid.len() + 2) as u64, "alpha search (model)", show);
    let refinement = sq_smooth::refine_alphas(
        &loaded.model,
        groups,
        stats,
        &choices,
        &grid,
        &tokens,
        seq_len,
        AUTO_SCORE_WINDOWS,
        runtime_allowed && q.smooth_fold.is_none(),
        |m, st| quantize_model(m, recipe, Some(st), backend.clone()).map(|_| ()),
        |d, total| {
            pb.set_length(total as u64);
            pb.set_position(d as u64)
        },
    )?;
    pb.finish_and_clear();
    let chosen = refinement.chosen;
    tracing::info!(
        candidate = %chosen.label,
        mean_kl = chosen.mean_kl(),
        mean_nll = chosen.mean_nll(),
        "alpha search: chosen"
    );
    if show {
        eprintln!(
            "alpha auto: {} (KL from fp32 {:.4} nats/token, calibration loss {:.4}; {} candidates tried)",
            chosen.label,
            chosen.mean_kl(),
            chosen.mean_nll(),
            refinement.tried.len()
        );
    }
    // Reports name every smoothed group's α, and the searched groups the choice left unsmoothed
    // (so the reported table replays as `--alpha FILE`).
    let spec = AlphaSpec::PerGroup {
        default: chosen.alphas.for_group(""),
        groups: chosen
            .groups
            .iter()
            .map(|g| (g.name().to_string(), chosen.alphas.for_group(g.name())))
            .collect(),
        unsmoothed: groups
            .iter()
            .filter(|g| !chosen.groups.iter().any(|c| c.name() == g.name()))
            .map(|g| g.name().to_string())
            .collect(),
    };
    Ok((spec, chosen.groups, chosen.fold))
}

/// What was done to build a scheme's model, for reports.
pub struct Built {
    pub loaded: LoadedModel,
    pub smoothing: Vec<GroupResult>,
    /// Smoothing groups left unsmoothed by the α table or `--alpha auto`.
    pub unsmoothed: Vec<String>,
    /// Where `1/s` went for the groups after no norm (SmoothQuant built here).
    pub smooth_fold: Option<sq_smooth::BeyondFold>,
}

/// Load the model and turn it into `scheme`.
pub fn build(
    scheme: Scheme,
    model: &ModelArgs,
    q: &QuantArgs,
    stats: Option<&StatsTable>,
    show: bool,
) -> Result<Built> {
    let mut loaded = load_model(model, show)?;
    let mut smoothing = Vec::new();
    let mut unsmoothed = Vec::new();
    if let Some(qc) = &loaded.quantization {
        // A checkpoint written by `quantize` already runs INT8 (schemes_for checked the scheme);
        // its attention is INT8 when it records so, or when asked now (the scales are dynamic).
        let head = qc.extra.get("lm_head").and_then(|v| v.as_str());
        if q.lm_head == crate::args::LmHeadArg::Int8 && head != Some("int8") {
            bail!(
                "--lm-head int8: {} was quantized with a full-precision LM head; quantize it again \
                 with --lm-head int8, or drop the option",
                loaded.source.display()
            );
        }
        if q.int8_attention {
            loaded.model.attention = sq_model::AttentionMode::Int8(sq_kernels::select_backend()?);
        }
        return Ok(Built {
            loaded,
            smoothing,
            unsmoothed: Vec::new(),
            smooth_fold: None,
        });
    }
    if scheme == Scheme::Fp32 {
        return Ok(Built {
            loaded,
            smoothing,
            unsmoothed: Vec::new(),
            smooth_fold: None,
        });
    }
    let stats = stats.context("quantized schemes need calibration statistics")?;
    super::common::check_stats_fit(&loaded.model, stats)?;
    let mut stats = stats.clone();
    let recipe = recipe(q);
    let mut smooth_fold = None;
    if scheme == Scheme::SmoothQuant {
        let groups = groups_for(&loaded.model, q)?;
        let (spec, groups, auto_fold) = if is_auto(q) {
            let (spec, groups, fold) =
                auto_alpha(&mut loaded, &groups, &stats, &recipe, q, true, show)?;
            (spec, groups, Some(fold))
        } else {
            (alpha(q)?, groups, None)
        };
        smooth_fold = reported_fold(q, auto_fold);
        let _span = tracing::info_span!("smooth", groups = groups.len()).entered();
        smoothing = smooth_model(&mut loaded.model, &groups, &mut stats, &spec)?;
        unsmoothed = spec.unsmoothed().into_iter().map(str::to_string).collect();
    }
    let backend = sq_kernels::select_backend()?;
    let _span =
        tracing::info_span!("quantize", scheme = scheme.name(), backend = backend.name()).entered();
    let pb = bar(0, &format!("quantize {}", scheme.name()), show);
    quantize_model_with_progress(
        &mut loaded.model,
        &recipe,
        Some(&stats),
        backend.clone(),
        |d, n| {
            pb.set_length(n as u64);
            pb.set_position(d as u64);
        },
    )?;
    if sq_smooth::LmHead::from(q.lm_head) == sq_smooth::LmHead::Int8 {
        sq_smooth::quantize_lm_head(&mut loaded.model, backend.clone())?;
    }
    pb.finish_and_clear();
    if q.int8_attention {
        loaded.model.attention = sq_model::AttentionMode::Int8(backend);
    }
    Ok(Built {
        loaded,
        smoothing,
        unsmoothed,
        smooth_fold,
    })
}

/// The per-scheme fields of the contract's report rows.
/// The per-scheme fields of the contract's report rows (from the checkpoint when `--model` is
/// a quantized one).
pub fn scheme_fields_for(
    scheme: Scheme,
    q: &QuantArgs,
    checkpoint: Option<&sq_model::native::NativeQuantConfig>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    if let Some(qc) = checkpoint {
        let mut m = serde_json::Map::new();
        m.insert("scheme".into(), qc.scheme.clone().into());
        m.insert("weights".into(), serde_json::to_value(qc.weights)?);
        m.insert("acts".into(), qc.acts.clone().into());
        m.insert(
            "alpha".into(),
            qc.extra.get("alpha").cloned().unwrap_or_default(),
        );
        m.insert(
            "smooth_targets".into(),
            qc.extra.get("smooth_targets").cloned().unwrap_or_default(),
        );
        if let Some(a) = qc.extra.get("alphas") {
            m.insert("alphas".into(), a.clone());
        }
        if let Some(f) = qc.extra.get("smooth_fold") {
            m.insert("smooth_fold".into(), f.clone());
        }
        m.insert(
            "lm_head".into(),
            qc.extra.get("lm_head").cloned().unwrap_or("fp32".into()),
        );
        return Ok(m);
    }
    let mut m = serde_json::Map::new();
    m.insert("scheme".into(), scheme.name().into());
    let r = recipe(q);
    let (w, a) = match scheme {
        Scheme::Fp32 => (serde_json::Value::Null, serde_json::Value::Null),
        _ => (
            serde_json::to_value(r.weights)?,
            serde_json::Value::from(r.acts.name()),
        ),
    };
    m.insert("weights".into(), w);
    m.insert("acts".into(), a);
    let targets = serde_json::Value::from(sq_smooth::SmoothTargets::from(q.smooth_targets).name());
    let (alpha, targets) = match scheme {
        Scheme::SmoothQuant if is_auto(q) => (serde_json::Value::from("auto"), targets),
        Scheme::SmoothQuant => (alpha_json(&alpha(q)?), targets),
        _ => (serde_json::Value::Null, serde_json::Value::Null),
    };
    m.insert("alpha".into(), alpha);
    m.insert("smooth_targets".into(), targets);
    m.insert(
        "lm_head".into(),
        match scheme {
            Scheme::Fp32 => "fp32",
            _ => sq_smooth::LmHead::from(q.lm_head).name(),
        }
        .into(),
    );
    Ok(m)
}

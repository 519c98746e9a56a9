//! `--alpha auto`: for each smoothing group, the migration strength that minimizes the
//! quantized output error of the group's Linears on real calibration inputs.

use crate::groups::{BeyondFold, Fold, RowLayout, SmoothGroup};
use crate::AlphaSpec;
use crate::{weight_absmax_per_input_channel, ActPolicy, Recipe, Result, SmoothError};
use sq_calib::{InputSample, StatsTable};
use sq_model::quant::{fake_quantize_input, fake_quantize_weight, static_scale};
use sq_model::{ActQuant, Divergence, Linear, Model, ReferenceDistributions};
use std::collections::BTreeMap;

/// The default search grid: 0, 0.05, ..., 1.
pub fn default_grid() -> Vec<f32> {
    (0..=20).map(|i| i as f32 / 20.0).collect()
}

/// The chosen α of one group and what it bought.
#[derive(Clone, Debug, PartialEq)]
pub struct AlphaChoice {
    pub group: String,
    pub alpha: f32,
    /// Sum of squared output errors of the group's Linears at the chosen α.
    pub error: f64,
    /// The same at α = 0.5 (the paper's default), for reporting.
    pub error_at_half: f64,
}

/// The activation quantizer of `acts`, with the calibrated range for static scales.
fn act_quant(acts: ActPolicy, static_absmax: f32) -> ActQuant {
    match acts {
        ActPolicy::Token => ActQuant::Token,
        ActPolicy::Tensor => ActQuant::Tensor,
        ActPolicy::Static => ActQuant::Static {
            scale: static_scale(static_absmax),
        },
    }
}

fn matmul(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    let packed = sq_kernels::pack_f32(w, n, k)?;
    let mut y = vec![0.0f32; rows * n];
    sq_kernels::f32_gemm(x, rows, &packed, None, &mut y)?;
    Ok(y)
}

/// Search each group's α over `grid`: smooth the sampled inputs and the weights with that α,
/// quantize both with `recipe` and measure the squared error of every output against the FP
/// outputs. `stats` are the (unsmoothed) statistics of the whole calibration set; `samples` hold
/// input rows of each group's first Linear.
pub fn search_alphas(
    model: &Model,
    groups: &[SmoothGroup],
    stats: &StatsTable,
    samples: &BTreeMap<String, InputSample>,
    recipe: &Recipe,
    grid: &[f32],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<AlphaChoice>> {
    if grid.is_empty() {
        return Err(SmoothError::Config("the alpha search grid is empty".into()));
    }
    let mut out = Vec::with_capacity(groups.len());
    for (gi, group) in groups.iter().enumerate() {
        let _span = tracing::debug_span!("alpha_search", group = group.name()).entered();
        let act = stats
            .get(group.name())
            .ok_or_else(|| SmoothError::Config(format!("no statistics for `{}`", group.name())))?
            .channel_absmax()
            .to_vec();
        let sample = samples
            .get(group.name())
            .filter(|s| s.rows > 0)
            .ok_or_else(|| {
                SmoothError::Config(format!("no sampled inputs for `{}`", group.name()))
            })?;
        let k = act.len();
        if sample.data.len() != sample.rows * k {
            return Err(SmoothError::Shape {
                what: group.name().to_string(),
                detail: format!(
                    "{} sampled values for {} rows of {k}",
                    sample.data.len(),
                    sample.rows
                ),
            });
        }
        let mut weights = Vec::new();
        for name in &group.linears {
            let fp = model
                .linears()
                .into_iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.as_fp())
                .ok_or_else(|| {
                    SmoothError::Config(format!(
                        "`{name}` is not a full-precision Linear of the model"
                    ))
                })?;
            weights.push((fp.weight(), fp.out_features()));
        }
        let refs: Vec<&[f32]> = weights.iter().map(|(w, _)| w.as_slice()).collect();
        let w_absmax = weight_absmax_per_input_channel(&refs, k)?;
        let reference: Vec<Vec<f32>> = weights
            .iter()
            .map(|(w, n)| matmul(&sample.data, sample.rows, w, *n, k))
            .collect::<Result<_>>()?;
        let mut best = (f64::INFINITY, grid[0]);
        let mut at_half = f64::NAN;
        for &alpha in grid {
            let s = crate::group_scales(group, &act, &w_absmax, alpha)?;
            let mut x = sample.data.clone();
            for row in x.chunks_exact_mut(k) {
                for (v, si) in row.iter_mut().zip(&s) {
                    *v /= si;
                }
            }
            let static_absmax = act
                .iter()
                .zip(&s)
                .map(|(a, si)| a / si)
                .fold(0.0f32, f32::max);
            let x = fake_quantize_input(act_quant(recipe.acts, static_absmax), &x, sample.rows, k)?;
            let mut err = 0.0f64;
            for ((w, n), y_ref) in weights.iter().zip(&reference) {
                let mut ws = w.clone();
                for row in ws.chunks_exact_mut(k) {
                    for (v, si) in row.iter_mut().zip(&s) {
                        *v *= si;
                    }
                }
                let ws = fake_quantize_weight(&ws, *n, k, recipe.weights)?;
                let y = matmul(&x, sample.rows, &ws, *n, k)?;
                err += y
                    .iter()
                    .zip(y_ref)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
            }
            if (alpha - 0.5).abs() < 1e-6 {
                at_half = err;
            }
            if err < best.0 {
                best = (err, alpha);
            }
        }
        out.push(AlphaChoice {
            group: group.name().to_string(),
            alpha: best.1,
            error: best.0,
            error_at_half: at_half,
        });
        progress(gi + 1, groups.len());
    }
    Ok(out)
}

/// One candidate of the model-level stage of `--alpha auto` and how close it stays to the
/// full-precision model.
#[derive(Clone, Debug, PartialEq)]
pub struct AlphaCandidate {
    /// `global 0.45`, `global 0.45, paper groups`, `per-group within 0.1 of 0.45`, ...
    pub label: String,
    pub alphas: AlphaSpec,
    /// The groups smoothed (a subset of the searched ones: smoothing a group can hurt when it
    /// moves a producer's rows far apart under per-tensor weight scales).
    pub groups: Vec<SmoothGroup>,
    /// `Runtime` when the search turned the row folds of `groups` into run-time divides;
    /// `Rows` when it kept the folds the groups came with.
    pub fold: BeyondFold,
    /// The quantized model's divergence from the FP model on the scoring windows (mean KL per
    /// token, per window; the score), and its NLL of the text there (reported).
    pub divergence: Divergence,
}

impl AlphaCandidate {
    pub fn mean_kl(&self) -> f64 {
        self.divergence.mean_kl
    }
    pub fn mean_nll(&self) -> f64 {
        self.divergence.mean_nll
    }
}

/// What the model-level stage of `--alpha auto` tried and chose.
#[derive(Clone, Debug)]
pub struct AlphaRefinement {
    pub chosen: AlphaCandidate,
    pub tried: Vec<AlphaCandidate>,
}

/// Which kinds of groups a candidate smooths.
#[derive(Clone, Copy, PartialEq)]
enum Subset {
    All,
    NormOnly,
    NormAndAttention,
    NormAndMlp,
}

impl Subset {
    fn keeps(self, g: &SmoothGroup) -> bool {
        let attention_rows = matches!(
            &g.fold,
            Fold::Rows {
                layout: RowLayout::Values | RowLayout::BloomFusedValues,
                ..
            }
        );
        match self {
            Subset::All => true,
            Subset::NormOnly => g.norm().is_some(),
            Subset::NormAndAttention => g.norm().is_some() || attention_rows,
            Subset::NormAndMlp => g.norm().is_some() || !attention_rows,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Subset::All => "",
            Subset::NormOnly => ", norm groups only",
            Subset::NormAndAttention => ", norm and attention-output groups",
            Subset::NormAndMlp => ", norm and MLP-output groups",
        }
    }
}

/// How many standard errors of the paired per-window difference of KL a candidate must gain
/// over the current choice to replace it. Small differences between α values are within the
/// scoring windows' noise (a candidate chosen on noise did worse on held-out text:
/// docs/results.md), so a move needs evidence; the paper's α = 0.5 is the starting choice.
pub const SIGNIFICANCE: f64 = 2.0;

/// The FP model's top tokens kept per position to score candidates (the rest is one bucket).
pub const REFERENCE_TOP_K: usize = 64;

/// Whether `candidate` replaces `current`: a lower mean KL from the FP model by at least
/// [`SIGNIFICANCE`] standard errors of the paired per-window difference, and a lower NLL of the
/// calibration text. KL separates candidates with less noise; the NLL condition keeps a move
/// that brings the model closer to the FP one but predicts the text worse (SmolLM2 O1: α 0.3
/// was significantly closer to fp32 than 0.5, and worse on both calibration and test text).
fn significantly_better(candidate: &AlphaCandidate, current: &AlphaCandidate) -> Result<bool> {
    let (diff, se) = candidate
        .divergence
        .paired_difference(&current.divergence)?;
    Ok(diff < 0.0 && -diff > SIGNIFICANCE * se && candidate.mean_nll() < current.mean_nll())
}

/// The model-level stage of `--alpha auto`. The per-group search ([`search_alphas`]) minimizes
/// each group's own output error, which does not always track the model's loss (errors of
/// neighbouring groups interact through the residual stream and the norms, and a row fold
/// changes the producing Linear's weight quantization). This stage smooths and quantizes copies
/// of `fp` (with `quantize`, the real INT8 path) for whole-model candidates and scores each by
/// its divergence from `fp` ([`ReferenceDistributions`]: mean KL per token against the FP
/// model's distributions) on up to `max_windows` windows of `seq_len` tokens of `eval_tokens`
/// (calibration text, windowed as `sq_model::perplexity` does). The choice starts at global
/// α = 0.5 (or the grid's first value) and moves only to a candidate that is
/// [`significantly_better`] than it (closer to the FP model beyond the noise, and better on the
/// calibration text), through these stages:
/// 1. every global α of `global_grid` on all `groups` (the best one challenges the choice), then
///    the α 0.05 either side of the chosen one;
/// 2. at the chosen global α, the groups that do not fold into a norm dropped in part or whole
///    (when `groups` has any; the best subset challenges the choice), and with `try_runtime`
///    the same subsets with those groups' `1/s` applied at run time instead of folded into the
///    producing Linear's rows ([`BeyondFold::Runtime`]);
/// 3. on the chosen subset, one α per kind of group (the groups that play the same role in
///    every layer, e.g. all `q_proj` groups): a coordinate search that moves one kind at a time
///    by ±0.05 and ±0.1 and keeps each move that wins;
/// 4. on the chosen subset, the per-group choices `local`, as found and clamped to within 0.1
///    of the α of their kind.
///
/// `stats` are the unsmoothed statistics.
#[allow(clippy::too_many_arguments)]
pub fn refine_alphas(
    fp: &Model,
    groups: &[SmoothGroup],
    stats: &StatsTable,
    local: &[AlphaChoice],
    global_grid: &[f32],
    eval_tokens: &[u32],
    seq_len: usize,
    max_windows: usize,
    try_runtime: bool,
    mut quantize: impl FnMut(&mut Model, &StatsTable) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<AlphaRefinement> {
    if global_grid.is_empty() {
        return Err(SmoothError::Config(
            "the model-level alpha search needs a grid of alpha values".into(),
        ));
    }
    let reference = {
        let _span = tracing::debug_span!("alpha_reference").entered();
        ReferenceDistributions::new(
            fp,
            eval_tokens,
            seq_len,
            Some(max_windows),
            REFERENCE_TOP_K
                .min(fp.config.vocab_size.saturating_sub(1))
                .max(1),
        )?
    };
    let has_beyond = groups.iter().any(|g| g.norm().is_none());
    let n_kinds = {
        let mut kinds: Vec<String> = groups.iter().map(|g| group_kind(g.name())).collect();
        kinds.sort();
        kinds.dedup();
        kinds.len()
    };
    let kind_moves = if n_kinds > 1 {
        KIND_STEPS.len() * n_kinds
    } else {
        0
    };
    let try_runtime = try_runtime && groups.iter().any(|g| matches!(g.fold, Fold::Rows { .. }));
    let subset_candidates = match (has_beyond, try_runtime) {
        (false, _) => 0,
        (true, false) => 3,
        (true, true) => 6,
    };
    let total = global_grid.len() + 2 + subset_candidates + kind_moves + 2;
    let mut tried: Vec<AlphaCandidate> = Vec::with_capacity(total);
    let mut evaluate = |tried: &mut Vec<AlphaCandidate>,
                        label: String,
                        alphas: AlphaSpec,
                        (subset, fold): (Subset, BeyondFold)|
     -> Result<usize> {
        let _span = tracing::debug_span!("alpha_candidate", candidate = %label).entered();
        let kept: Vec<SmoothGroup> = groups.iter().filter(|g| subset.keeps(g)).cloned().collect();
        let chosen = fold.apply(&kept);
        let mut model = fp.try_clone()?;
        let mut st = stats.clone();
        crate::smooth_model(&mut model, &chosen, &mut st, &alphas)?;
        quantize(&mut model, &st)?;
        let divergence = reference.divergence(&model)?;
        tracing::info!(
            candidate = %label,
            mean_kl = divergence.mean_kl,
            mean_nll = divergence.mean_nll,
            "alpha candidate"
        );
        tried.push(AlphaCandidate {
            label,
            alphas,
            groups: chosen,
            fold,
            divergence,
        });
        progress(tried.len(), total);
        Ok(tried.len() - 1)
    };
    // The lowest mean KL among `tried[from..]`.
    let lowest = |tried: &[AlphaCandidate], from: usize| -> usize {
        let mut b = from;
        for (i, c) in tried.iter().enumerate().skip(from) {
            if c.mean_kl() < tried[b].mean_kl() {
                b = i;
            }
        }
        b
    };
    // `challenger` replaces `current` when significantly better.
    let challenge = |tried: &[AlphaCandidate],
                     current: usize,
                     challenger: usize|
     -> Result<usize> {
        Ok(
            if challenger != current && significantly_better(&tried[challenger], &tried[current])? {
                challenger
            } else {
                current
            },
        )
    };
    let global_alpha = |c: &AlphaCandidate| match c.alphas {
        AlphaSpec::Global(a) => a,
        _ => unreachable!("only global candidates in this stage"),
    };
    let start = global_grid
        .iter()
        .position(|&a| (a - 0.5).abs() < 1e-6)
        .unwrap_or(0);
    for &a in global_grid {
        evaluate(
            &mut tried,
            format!("global {a}"),
            AlphaSpec::Global(a),
            (Subset::All, BeyondFold::Rows),
        )?;
    }
    let mut current = challenge(&tried, start, lowest(&tried, 0))?;
    // Refine the coarse grid: the α 0.05 either side of the chosen one.
    let coarse = global_alpha(&tried[current]);
    for a in [coarse - 0.05, coarse + 0.05] {
        let a = (a * 100.0).round() / 100.0;
        if (0.0..=1.0).contains(&a) && !global_grid.iter().any(|g| (g - a).abs() < 1e-6) {
            let label = format!("global {a}");
            let i = evaluate(
                &mut tried,
                label,
                AlphaSpec::Global(a),
                (Subset::All, BeyondFold::Rows),
            )?;
            current = challenge(&tried, current, i)?;
        }
    }
    let best_global = global_alpha(&tried[current]);
    let mut subset = (Subset::All, BeyondFold::Rows);
    if has_beyond {
        let before = tried.len();
        let mut subsets = vec![
            (Subset::NormOnly, BeyondFold::Rows),
            (Subset::NormAndAttention, BeyondFold::Rows),
            (Subset::NormAndMlp, BeyondFold::Rows),
        ];
        if try_runtime {
            for s in [Subset::All, Subset::NormAndAttention, Subset::NormAndMlp] {
                subsets.push((s, BeyondFold::Runtime));
            }
        }
        for &s in &subsets {
            let label = format!("global {best_global}{}", choice_label(s));
            evaluate(&mut tried, label, AlphaSpec::Global(best_global), s)?;
        }
        let b = challenge(&tried, current, lowest(&tried, before))?;
        if b != current {
            subset = subsets[b - before];
            current = b;
        }
    }
    // One α per kind of group, by coordinate search around the chosen global α.
    let kept: Vec<&SmoothGroup> = groups.iter().filter(|g| subset.0.keeps(g)).collect();
    let mut kinds: Vec<String> = Vec::new();
    for g in &kept {
        let kind = group_kind(g.name());
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let mut kind_alpha: BTreeMap<String, f32> =
        kinds.iter().map(|k| (k.clone(), best_global)).collect();
    let by_kind = |kind_alpha: &BTreeMap<String, f32>| AlphaSpec::PerGroup {
        default: best_global,
        unsmoothed: Default::default(),
        groups: kept
            .iter()
            .map(|g| (g.name().to_string(), kind_alpha[&group_kind(g.name())]))
            .collect(),
    };
    if kinds.len() > 1 {
        for kind in &kinds {
            let center = kind_alpha[kind];
            for step in KIND_STEPS {
                let a = ((center + step) * 100.0).round() / 100.0;
                if !(0.0..=1.0).contains(&a) {
                    continue;
                }
                let mut trial = kind_alpha.clone();
                trial.insert(kind.clone(), a);
                let label = format!("per-kind {}{}", kinds_label(&trial), choice_label(subset));
                let i = evaluate(&mut tried, label, by_kind(&trial), subset)?;
                let next = challenge(&tried, current, i)?;
                if next == i {
                    current = i;
                    kind_alpha = trial;
                }
            }
        }
    }
    let per_group = |clamp: Option<f32>| AlphaSpec::PerGroup {
        default: best_global,
        unsmoothed: Default::default(),
        groups: local
            .iter()
            .filter(|c| kept.iter().any(|g| g.name() == c.group))
            .map(|c| {
                let a = match clamp {
                    Some(w) => {
                        let center = kind_alpha
                            .get(&group_kind(&c.group))
                            .copied()
                            .unwrap_or(best_global);
                        // On the 0.01 grid: 0.6 + 0.1 is 0.70000005 in f32.
                        (c.alpha.clamp(center - w, center + w).clamp(0.0, 1.0) * 100.0).round()
                            / 100.0
                    }
                    None => c.alpha,
                };
                (c.group.clone(), a)
            })
            .collect(),
    };
    let i = evaluate(
        &mut tried,
        format!("per-group{}", choice_label(subset)),
        per_group(None),
        subset,
    )?;
    current = challenge(&tried, current, i)?;
    let center_label = if kind_alpha.values().all(|&a| a == best_global) {
        format!("{best_global}")
    } else {
        "the per-kind alphas".to_string()
    };
    let i = evaluate(
        &mut tried,
        format!(
            "per-group within 0.1 of {center_label}{}",
            choice_label(subset)
        ),
        per_group(Some(0.1)),
        subset,
    )?;
    current = challenge(&tried, current, i)?;
    let chosen = tried[current].clone();
    Ok(AlphaRefinement { chosen, tried })
}

/// A candidate's label suffix: which groups it smooths and where their `1/s` goes.
fn choice_label((subset, fold): (Subset, BeyondFold)) -> String {
    match fold {
        BeyondFold::Rows => subset.label().to_string(),
        BeyondFold::Runtime => format!(
            "{}, divided at run time",
            if subset == Subset::All {
                ", all groups"
            } else {
                subset.label()
            }
        ),
    }
}

/// Moves tried for each kind's α in the per-kind stage of [`refine_alphas`].
const KIND_STEPS: [f32; 4] = [-0.1, -0.05, 0.05, 0.1];

/// The role of a group in its layer: its name with the layer index replaced by `*`
/// (`model.layers.3.self_attn.q_proj` -> `model.layers.*.self_attn.q_proj`).
pub fn group_kind(name: &str) -> String {
    let mut replaced = false;
    name.split('.')
        .map(|part| {
            if !replaced && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                replaced = true;
                "*"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `q_proj 0.6, gate_proj 0.45` for a per-kind table (the last part of each kind's name).
fn kinds_label(kind_alpha: &BTreeMap<String, f32>) -> String {
    kind_alpha
        .iter()
        .map(|(k, a)| format!("{} {a}", k.rsplit('.').next().unwrap_or(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::group_kind;

    #[test]
    fn group_kind_replaces_the_layer_index_only() {
        assert_eq!(
            group_kind("model.layers.12.self_attn.q_proj"),
            "model.layers.*.self_attn.q_proj"
        );
        assert_eq!(
            group_kind("transformer.h.3.self_attention.query_key_value"),
            "transformer.h.*.self_attention.query_key_value"
        );
        assert_eq!(group_kind("lm_head"), "lm_head");
        assert_eq!(group_kind("a.0.b.1"), "a.*.b.1");
    }
}

//! Folding smoothing scales into a model: `1/s` into the norm, `s` into the Linears' inputs.

use crate::groups::{Fold, SmoothGroup};
use crate::{smoothing_scales, Result, SmoothError};
use sq_calib::StatsTable;
use sq_model::{Linear, Model};
use std::collections::{BTreeMap, BTreeSet};

/// Migration strength: one value for every group, or one per group (named by its first Linear).
#[derive(Clone, Debug, PartialEq)]
pub enum AlphaSpec {
    Global(f32),
    PerGroup {
        default: f32,
        groups: BTreeMap<String, f32>,
        /// Groups left unsmoothed ([`smooth_model`] skips them): `null` in an α table, and the
        /// groups `--alpha auto` dropped.
        unsmoothed: BTreeSet<String>,
    },
}

impl AlphaSpec {
    /// The α of `group`.
    pub fn for_group(&self, group: &str) -> f32 {
        match self {
            AlphaSpec::Global(a) => *a,
            AlphaSpec::PerGroup {
                default, groups, ..
            } => groups.get(group).copied().unwrap_or(*default),
        }
    }

    /// Whether `group` is smoothed at all.
    pub fn smooths(&self, group: &str) -> bool {
        match self {
            AlphaSpec::Global(_) => true,
            AlphaSpec::PerGroup { unsmoothed, .. } => !unsmoothed.contains(group),
        }
    }

    /// The groups left unsmoothed.
    pub fn unsmoothed(&self) -> Vec<&str> {
        match self {
            AlphaSpec::Global(_) => Vec::new(),
            AlphaSpec::PerGroup { unsmoothed, .. } => {
                unsmoothed.iter().map(String::as_str).collect()
            }
        }
    }

    /// Read a JSON object `{"model.layers.0.self_attn.q_proj": 0.8, ...}`; groups it does not name
    /// use `default`, and a group mapped to `null` is left unsmoothed (so the `alphas` that
    /// `--alpha auto` reports replay exactly).
    pub fn from_json(text: &str, default: f32) -> Result<Self> {
        let map: BTreeMap<String, Option<f32>> = serde_json::from_str(text)
            .map_err(|e| SmoothError::Config(format!("alpha table: {e}")))?;
        let mut groups = BTreeMap::new();
        let mut unsmoothed = BTreeSet::new();
        for (k, v) in map {
            match v {
                None => {
                    unsmoothed.insert(k);
                }
                Some(v) if (0.0..=1.0).contains(&v) => {
                    groups.insert(k, v);
                }
                Some(v) => {
                    return Err(SmoothError::Config(format!(
                        "alpha table: `{k}` has alpha {v}, outside [0, 1]"
                    )))
                }
            }
        }
        Ok(AlphaSpec::PerGroup {
            default,
            groups,
            unsmoothed,
        })
    }
}

/// What smoothing did to one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupResult {
    pub group: SmoothGroup,
    pub alpha: f32,
    /// The per-channel scales `s` of the group's input channels.
    pub scales: Vec<f32>,
    /// max/median of the group's input ranges before and after smoothing.
    pub ratio_before: f32,
    pub ratio_after: f32,
}

/// The scales of `group` for its input ranges `act_absmax` and weight ranges `weight_absmax`:
/// SmoothQuant's formula, except that input channels reading one shared value row (grouped-
/// query attention) share one scale, computed from their largest ranges.
pub fn group_scales(
    group: &SmoothGroup,
    act_absmax: &[f32],
    weight_absmax: &[f32],
    alpha: f32,
) -> Result<Vec<f32>> {
    if !group.fold.ties_channels() || act_absmax.len() != weight_absmax.len() {
        return smoothing_scales(act_absmax, weight_absmax, alpha);
    }
    let rows = (0..act_absmax.len())
        .map(|c| group.fold.producer_row(c))
        .max()
        .map_or(0, |r| r + 1);
    let (mut act, mut w) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    for c in 0..act_absmax.len() {
        let r = group.fold.producer_row(c);
        act[r] = act[r].max(act_absmax[c]);
        w[r] = w[r].max(weight_absmax[c]);
    }
    let per_row = smoothing_scales(&act, &w, alpha)?;
    Ok((0..act_absmax.len())
        .map(|c| per_row[group.fold.producer_row(c)])
        .collect())
}

/// Compute every group's scales from `stats` and fold them into `model`. The activation
/// statistics of the smoothed Linears are divided by `s` in `stats`, so they describe the
/// smoothed model (static activation scales need that).
pub fn smooth_model(
    model: &mut Model,
    groups: &[SmoothGroup],
    stats: &mut StatsTable,
    alpha: &AlphaSpec,
) -> Result<Vec<GroupResult>> {
    let mut results = Vec::with_capacity(groups.len());
    for group in groups.iter().filter(|g| alpha.smooths(g.name())) {
        let act = stats
            .get(group.name())
            .ok_or_else(|| {
                SmoothError::Config(format!(
                    "the activation statistics have no entry for `{}` (calibrated on another model?)",
                    group.name()
                ))
            })?
            .clone();
        let in_features = act.channel_absmax().len();
        // The weight range per input channel, read from the packed weights in place.
        let mut w_absmax = vec![0.0f32; in_features];
        for name in &group.linears {
            let linear = model
                .linears()
                .into_iter()
                .find(|l| &l.name == name)
                .ok_or_else(|| SmoothError::Config(format!("the model has no Linear `{name}`")))?;
            let fp = linear.as_fp().ok_or_else(|| {
                SmoothError::Config(format!(
                    "`{name}` is already quantized; smoothing needs the FP weights"
                ))
            })?;
            if fp.in_features() != in_features {
                return Err(SmoothError::Shape {
                    what: name.clone(),
                    detail: format!(
                        "{} input channels, but its statistics have {in_features}",
                        fp.in_features()
                    ),
                });
            }
            fp.input_channel_absmax_into(&mut w_absmax)
                .map_err(|e| SmoothError::Config(format!("`{name}`: {e}")))?;
        }
        let a = alpha.for_group(group.name());
        let scales = group_scales(group, act.channel_absmax(), &w_absmax, a)?;

        match &group.fold {
            Fold::Norm { norm } => fold_into_norm(model, norm, &scales)?,
            Fold::Rows { linear, .. } => fold_into_rows(model, group, linear, &scales)?,
            Fold::Runtime => {
                let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
                for name in &group.linears {
                    fp_mut(model, name)?.smooth_input_at_runtime(&inv)?;
                }
            }
        }
        for name in &group.linears {
            fp_mut(model, name)?
                .scale_input_channels(&scales)
                .map_err(|e| SmoothError::Config(format!("`{name}`: {e}")))?;
            if let Some(st) = stats.get_mut(name) {
                st.scale_channels(&scales);
            }
        }
        let ratio_before = act.max_median_ratio();
        let ratio_after = stats
            .get(group.name())
            .map_or(ratio_before, |s| s.max_median_ratio());
        tracing::debug!(group = group.name(), fold = %group.fold.describe(), alpha = a, ratio_before, ratio_after, "smoothed");
        results.push(GroupResult {
            group: group.clone(),
            alpha: a,
            scales,
            ratio_before,
            ratio_after,
        });
    }
    Ok(results)
}

fn fp_mut<'a>(model: &'a mut Model, name: &str) -> Result<&'a mut sq_model::FpLinear> {
    model
        .linear_mut(name)
        .and_then(|l| l.as_fp_mut())
        .ok_or_else(|| {
            SmoothError::Config(format!(
                "`{name}` is not a full-precision Linear of the model"
            ))
        })
}

/// The paper's fold: `gamma / s` (and `beta / s`).
fn fold_into_norm(model: &mut Model, name: &str, scales: &[f32]) -> Result<()> {
    let norm = model
        .norm_mut(name)
        .ok_or_else(|| SmoothError::Config(format!("the model has no norm `{name}`")))?;
    if norm.weight.len() != scales.len() {
        return Err(SmoothError::Shape {
            what: name.to_string(),
            detail: format!(
                "{} channels, the group has {}",
                norm.weight.len(),
                scales.len()
            ),
        });
    }
    for (w, s) in norm.weight.iter_mut().zip(scales) {
        *w /= s;
    }
    if let Some(b) = norm.bias.as_mut() {
        for (x, s) in b.iter_mut().zip(scales) {
            *x /= s;
        }
    }
    Ok(())
}

/// Divide the producing Linear's output rows (weight and bias) by the scale of the input channel
/// each row feeds.
fn fold_into_rows(
    model: &mut Model,
    group: &SmoothGroup,
    producer: &str,
    scales: &[f32],
) -> Result<()> {
    let fp = fp_mut(model, producer)?;
    let n = fp.out_features();
    let mut row_scale: Vec<Option<f32>> = vec![None; n];
    for (c, &s) in scales.iter().enumerate() {
        let r = group.fold.producer_row(c);
        let slot = row_scale.get_mut(r).ok_or_else(|| SmoothError::Shape {
            what: producer.to_string(),
            detail: format!(
                "{n} output rows, but input channel {c} of `{}` reads row {r}",
                group.name()
            ),
        })?;
        *slot = Some(s);
    }
    fp.divide_output_rows(&row_scale)
        .map_err(|e| SmoothError::Config(format!("`{producer}`: {e}")))?;
    if let Some(b) = fp.bias_mut() {
        for (v, s) in b.iter_mut().zip(&row_scale) {
            if let Some(s) = s {
                *v /= s;
            }
        }
    }
    Ok(())
}

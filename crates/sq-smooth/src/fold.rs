//! Folding smoothing scales into a model: `1/s` into the norm, `s` into the Linears' inputs.

use crate::groups::SmoothGroup;
use crate::{smoothing_scales, weight_absmax_per_input_channel, Result, SmoothError};
use sq_calib::StatsTable;
use sq_model::{Linear, Model};
use std::collections::BTreeMap;

/// Migration strength: one value for every group, or one per group (named by its first Linear).
#[derive(Clone, Debug, PartialEq)]
pub enum AlphaSpec {
    Global(f32),
    PerGroup {
        default: f32,
        groups: BTreeMap<String, f32>,
    },
}

impl AlphaSpec {
    /// The α of `group`.
    pub fn for_group(&self, group: &str) -> f32 {
        match self {
            AlphaSpec::Global(a) => *a,
            AlphaSpec::PerGroup { default, groups } => {
                groups.get(group).copied().unwrap_or(*default)
            }
        }
    }

    /// Read a JSON object `{"model.layers.0.self_attn.q_proj": 0.8, ...}`; groups it does not name
    /// use `default`.
    pub fn from_json(text: &str, default: f32) -> Result<Self> {
        let map: BTreeMap<String, f32> = serde_json::from_str(text)
            .map_err(|e| SmoothError::Config(format!("alpha table: {e}")))?;
        for (k, v) in &map {
            if !(0.0..=1.0).contains(v) {
                return Err(SmoothError::Config(format!(
                    "alpha table: `{k}` has alpha {v}, outside [0, 1]"
                )));
            }
        }
        Ok(AlphaSpec::PerGroup {
            default,
            groups: map,
        })
    }
}

/// What smoothing did to one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupResult {
    pub group: SmoothGroup,
    pub alpha: f32,
    /// The per-channel scales `s`.
    pub scales: Vec<f32>,
    /// max/median of the group's input ranges before and after smoothing.
    pub ratio_before: f32,
    pub ratio_after: f32,
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
    for group in groups {
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
        let mut weights = Vec::with_capacity(group.linears.len());
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
            weights.push(fp.weight());
        }
        let refs: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
        let w_absmax = weight_absmax_per_input_channel(&refs, in_features)?;
        let a = alpha.for_group(group.name());
        let scales = smoothing_scales(act.channel_absmax(), &w_absmax, a)?;

        let norm = model.norm_mut(&group.norm).ok_or_else(|| {
            SmoothError::Config(format!("the model has no norm `{}`", group.norm))
        })?;
        if norm.weight.len() != in_features {
            return Err(SmoothError::Shape {
                what: group.norm.clone(),
                detail: format!(
                    "{} channels, the group has {in_features}",
                    norm.weight.len()
                ),
            });
        }
        for (w, s) in norm.weight.iter_mut().zip(&scales) {
            *w /= s;
        }
        if let Some(b) = norm.bias.as_mut() {
            for (x, s) in b.iter_mut().zip(&scales) {
                *x /= s;
            }
        }
        for name in &group.linears {
            let fp = model
                .linear_mut(name)
                .and_then(|l| l.as_fp_mut())
                .expect("checked above");
            fp.update_weight(|w| {
                for row in w.chunks_exact_mut(in_features) {
                    for (w, s) in row.iter_mut().zip(&scales) {
                        *w *= s;
                    }
                }
            })?;
            if let Some(st) = stats.get_mut(name) {
                st.scale_channels(&scales);
            }
        }
        let ratio_before = act.max_median_ratio();
        let ratio_after = stats
            .get(group.name())
            .map_or(ratio_before, |s| s.max_median_ratio());
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

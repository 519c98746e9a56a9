//! `--alpha auto`: for each smoothing group, the migration strength that minimizes the
//! quantized output error of the group's Linears on real calibration inputs.

use crate::groups::SmoothGroup;
use crate::{
    smoothing_scales, weight_absmax_per_input_channel, ActPolicy, Recipe, Result, SmoothError,
};
use sq_calib::{InputSample, StatsTable};
use sq_model::quant::{fake_quantize_input, fake_quantize_weight, static_scale};
use sq_model::{ActQuant, Linear, Model};
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
            let s = smoothing_scales(&act, &w_absmax, alpha)?;
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

//! # sq-smooth
//!
//! SmoothQuant's difficulty migration. For a group of Linears that share one input `X`, the
//! smoothing scale of input channel `j` is
//!
//! ```text
//! s_j = max(max|X_j|^α / max(max_i |W_ij|, 1e-5)^(1-α), 1e-5)
//! ```
//!
//! where the weight range is taken over every Linear of the group (their weights concatenated
//! along the output dimension), exactly as the official implementation does. Dividing `X` by `s`
//! (folded into the preceding norm) and multiplying the weights' input channels by `s` leaves
//! `Y = X Wᵀ` unchanged, while flattening the activation outliers.
//!
//! ```
//! use sq_smooth::{smoothing_scales, weight_absmax_per_input_channel};
//!
//! // Input channel 1 is an activation outlier (range 100 vs 1).
//! let act_absmax = [1.0, 100.0];
//! // Two Linears reading the same input: q [1 x 2] and k [1 x 2].
//! let q = [0.5f32, -0.25];
//! let k = [-2.0f32, 0.25];
//! let w_absmax = weight_absmax_per_input_channel(&[&q, &k], 2).unwrap();
//! assert_eq!(w_absmax, [2.0, 0.25]);
//! let s = smoothing_scales(&act_absmax, &w_absmax, 0.5).unwrap();
//! assert!((s[0] - (1.0f32 / 2.0).sqrt()).abs() < 1e-6);
//! assert!((s[1] - 20.0).abs() < 1e-5); // sqrt(100) / sqrt(0.25)
//! // After smoothing both channels' activation ranges are close: 1/s = 1.41 and 100/s = 5.
//! ```
//!
//! The whole pipeline on the embedded stories260K model: calibrate, smooth the paper's groups,
//! quantize every decoder Linear to W8A8 on the INT8 GEMM, and compare perplexity with FP32.
//!
//! ```
//! use sq_calib::{calibrate, CalibConfig};
//! use sq_model::{generate, perplexity, Sampler};
//! use sq_smooth::{paper_groups, quantize_model, smooth_model, AlphaSpec, Recipe};
//!
//! let mut loaded = sq_model::load(None, None).unwrap();
//! // Text for calibration and evaluation: a story the model writes itself.
//! let mut prompt = vec![loaded.tokenizer.bos_id().unwrap()];
//! prompt.extend(loaded.tokenizer.encode("Once upon a time").unwrap());
//! let story = generate(&loaded.model, loaded.tokenizer.as_ref(), &prompt, 200,
//!                      &mut Sampler::new(1.0, 1.0, 7).unwrap(), |_| {}).unwrap();
//! let tokens = loaded.tokenizer.encode(&story.text).unwrap();
//! let fp32 = perplexity(&loaded.model, &tokens, 64, None, |_, _| {}).unwrap().perplexity;
//!
//! let cfg = CalibConfig { samples: 8, seq_len: 64, seed: 0 };
//! let mut stats = calibrate(&mut loaded.model, &tokens, &cfg, |_, _| {}).unwrap();
//! let groups = paper_groups(&loaded.model).unwrap(); // 2 per layer
//! let smoothed = smooth_model(&mut loaded.model, &groups, &mut stats, &AlphaSpec::Global(0.5)).unwrap();
//! assert_eq!(smoothed.len(), 10);
//! // Smoothing flattens the inputs of the first group (the attention input of layer 0).
//! assert!(smoothed[0].ratio_after < smoothed[0].ratio_before);
//!
//! let backend = sq_kernels::select_backend().unwrap();
//! let n = quantize_model(&mut loaded.model, &Recipe::CHANNEL_TOKEN, Some(&stats), backend).unwrap();
//! assert_eq!(n, 35);
//! let w8a8 = perplexity(&loaded.model, &tokens, 64, None, |_, _| {}).unwrap().perplexity;
//! assert!((w8a8 / fp32 - 1.0).abs() < 0.05, "fp32 {fp32}, W8A8 {w8a8}");
//! ```

use std::fmt;

mod compressed_tensors;
mod export;
mod fold;
mod groups;
mod quantize;
mod search;
mod stream;

pub use compressed_tensors::{
    ct_quantization_config, save_compressed_tensors, CT_FORMAT, CT_QUANT_METHOD, CT_RECORD_KEY,
    CT_VERSION,
};
pub use export::{native_layer_tensors, save_native, ExportInfo, NativeStreamWriter};
pub use fold::{group_scales, smooth_model, AlphaSpec, GroupResult};
pub use groups::{
    beyond_specs, paper_groups, paper_specs, smoothing_groups, BeyondFold, Fold, GroupSpec,
    RowLayout, SmoothGroup, SmoothTargets, SourceSpec, BLOOM_BEYOND, BLOOM_PAPER, LLAMA_BEYOND,
    LLAMA_PAPER, OPT_BEYOND, OPT_PAPER,
};
pub use quantize::{
    fake_quantize_model, quantize_lm_head, quantize_model, quantize_model_with_progress, ActPolicy,
    LmHead, Recipe,
};
pub use search::{
    default_grid, group_kind, refine_alphas, search_alphas, AlphaCandidate, AlphaChoice,
    AlphaRefinement, REFERENCE_TOP_K, SIGNIFICANCE,
};
pub use stream::{run_layers, LayerOutcome, LayerPlan, LayerTimings};

/// Smallest smoothing scale and smallest weight range, as in the official code.
pub const MIN_SCALE: f32 = 1e-5;

/// Every error sq-smooth returns; messages name the group and the shapes.
#[derive(Debug, thiserror::Error)]
pub enum SmoothError {
    #[error("alpha must be a number in [0, 1], got {0}")]
    Alpha(f32),
    #[error("{what}: {detail}")]
    Shape { what: String, detail: String },
    #[error("{what}: channel {channel} has range {value}, which is not finite and non-negative")]
    BadRange {
        what: &'static str,
        channel: usize,
        value: f32,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] sq_model::ModelError),
    #[error(transparent)]
    Calib(#[from] sq_calib::CalibError),
    #[error(transparent)]
    Tensor(#[from] sq_tensor::TensorError),
    #[error(transparent)]
    Kernel(#[from] sq_kernels::KernelError),
}

/// Result with [`SmoothError`].
pub type Result<T, E = SmoothError> = std::result::Result<T, E>;

/// Per input channel `max_i |W_ij|` over several `[out, in]` row-major weights that share the
/// same `in_features`.
pub fn weight_absmax_per_input_channel(weights: &[&[f32]], in_features: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; in_features];
    for (i, w) in weights.iter().enumerate() {
        if in_features == 0 || w.len() % in_features != 0 {
            return Err(SmoothError::Shape {
                what: format!("weight {i} of the smoothing group"),
                detail: format!(
                    "{} values are not rows of {in_features} input channels",
                    w.len()
                ),
            });
        }
        for row in w.chunks_exact(in_features) {
            for (m, &v) in out.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    Ok(out)
}

/// SmoothQuant's scales `s_j = max|X_j|^α / max|W_j|^(1-α)`, with the weight range and the
/// result both clamped to at least [`MIN_SCALE`].
pub fn smoothing_scales(act_absmax: &[f32], weight_absmax: &[f32], alpha: f32) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(SmoothError::Alpha(alpha));
    }
    if act_absmax.len() != weight_absmax.len() {
        return Err(SmoothError::Shape {
            what: "smoothing scales".into(),
            detail: format!(
                "{} activation channels but {} weight input channels",
                act_absmax.len(),
                weight_absmax.len()
            ),
        });
    }
    check_ranges("activation range", act_absmax)?;
    check_ranges("weight range", weight_absmax)?;
    Ok(act_absmax
        .iter()
        .zip(weight_absmax)
        .map(|(&a, &w)| {
            let w = w.max(MIN_SCALE);
            (a.powf(alpha) / w.powf(1.0 - alpha)).max(MIN_SCALE)
        })
        .collect())
}

fn check_ranges(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite() || *v < 0.0) {
        Some(channel) => Err(SmoothError::BadRange {
            what,
            channel,
            value: values[channel],
        }),
        None => Ok(()),
    }
}

/// A migration strength in [0, 1], validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alpha(f32);

impl Alpha {
    pub fn new(value: f32) -> Result<Self> {
        if (0.0..=1.0).contains(&value) {
            Ok(Alpha(value))
        } else {
            Err(SmoothError::Alpha(value))
        }
    }
    pub fn get(self) -> f32 {
        self.0
    }
}

impl fmt::Display for Alpha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_extremes() {
        let a = [4.0, 0.0, 9.0];
        let w = [2.0, 3.0, 0.0];
        // alpha = 1: s = act range (clamped), all the difficulty goes to the weights.
        assert_eq!(
            smoothing_scales(&a, &w, 1.0).unwrap(),
            [4.0, MIN_SCALE, 9.0]
        );
        // alpha = 0: s = 1 / weight range (weight range clamped to 1e-5).
        let s = smoothing_scales(&a, &w, 0.0).unwrap();
        assert_eq!(s[0], 0.5);
        assert!((s[2] - 1e5).abs() / 1e5 < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(smoothing_scales(&[1.0], &[1.0], 1.5).is_err());
        assert!(smoothing_scales(&[1.0], &[1.0], f32::NAN).is_err());
        assert!(smoothing_scales(&[1.0, 2.0], &[1.0], 0.5).is_err());
        assert!(smoothing_scales(&[f32::INFINITY], &[1.0], 0.5).is_err());
        assert!(smoothing_scales(&[1.0], &[-1.0], 0.5).is_err());
        assert!(weight_absmax_per_input_channel(&[&[1.0, 2.0, 3.0]], 2).is_err());
        assert!(Alpha::new(-0.1).is_err());
        assert_eq!(Alpha::new(0.85).unwrap().get(), 0.85);
    }
}

//! # sq-calib
//!
//! Activation statistics for SmoothQuant calibration. For every Linear input the calibration
//! run records the per-channel range `max|X_j|` (the smoothing statistic), the per-tensor range
//! (for static activation scales) and enough to report outliers (the max/median channel ratio).
//!
//! Statistics are stored as safetensors: one f32 tensor of per-channel maxima per Linear, named
//! like the Linear (`model.layers.0.self_attn.q_proj`), plus a 1-element tensor with the suffix
//! `.input_absmax` holding the per-tensor range.
//!
//! ```
//! use sq_calib::{ActStats, StatsTable};
//!
//! let mut stats = ActStats::new("model.layers.0.mlp.down_proj", 4);
//! // Two tokens of a 4-channel activation; channel 2 is an outlier.
//! stats.observe(&[0.5, -1.0, 40.0, 0.25, -0.75, 0.5, -60.0, 1.0], 2).unwrap();
//! assert_eq!(stats.channel_absmax(), &[0.75, 1.0, 60.0, 1.0]);
//! assert_eq!(stats.tensor_absmax(), 60.0);
//! assert_eq!(stats.max_median_ratio(), 60.0);
//! assert!(stats.observe(&[f32::NAN, 0.0, 0.0, 0.0], 1).is_err());
//!
//! let mut table = StatsTable::default();
//! table.insert(stats);
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("act_scales.safetensors");
//! table.save(&path).unwrap();
//! let loaded = StatsTable::load(&path).unwrap();
//! assert_eq!(loaded.get("model.layers.0.mlp.down_proj").unwrap().channel_absmax()[2], 60.0);
//! ```
//!
//! Calibrating a model: seeded windows of a token stream through the FP model, every Linear
//! input observed (the embedded stories260K model here; any [`sq_model::load`]ed model works).
//!
//! ```
//! use sq_calib::{calibrate, CalibConfig};
//!
//! let mut loaded = sq_model::load(None, None).unwrap();
//! let text = "Once upon a time, there was a little girl named Lily. She loved to play outside. \
//!             One day, she saw a big red ball in the park and ran to get it.";
//! let tokens = loaded.tokenizer.encode(text).unwrap();
//! let cfg = CalibConfig { samples: 4, seq_len: 16, seed: 0 };
//! let stats = calibrate(&mut loaded.model, &tokens, &cfg, |done, total| {
//!     assert!(done <= total);
//! })
//! .unwrap();
//! // One entry per decoder Linear (5 layers x 7), named by its Hugging Face name.
//! assert_eq!(stats.len(), 35);
//! let q = stats.get("model.layers.0.self_attn.q_proj").unwrap();
//! assert_eq!(q.channel_absmax().len(), 64);
//! assert_eq!(q.tokens(), 4 * 16);
//! assert!(q.max_median_ratio() >= 1.0);
//! // The same windows and seed give the same statistics.
//! let again = calibrate(&mut loaded.model, &tokens, &cfg, |_, _| {}).unwrap();
//! assert_eq!(again.get(q.name()).unwrap().channel_absmax(), q.channel_absmax());
//! ```

mod calibrate;
mod sample;
mod stats;

pub use calibrate::{calibrate, calibration_windows, CalibConfig, StatsObserver};
pub use sample::{sample_inputs, InputSample};
pub use stats::{ActStats, StatsTable, TENSOR_ABSMAX_SUFFIX};

use std::path::PathBuf;

/// Every error sq-calib returns; messages name the layer, the file and the shapes.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("activation of `{layer}` contains {what} at token {token}, channel {channel}: the FP model is producing non-finite values on the calibration text")]
    NonFinite {
        layer: String,
        what: &'static str,
        token: usize,
        channel: usize,
    },
    #[error("`{layer}`: got {len} values for {rows} rows of {channels} channels")]
    Shape {
        layer: String,
        len: usize,
        rows: usize,
        channels: usize,
    },
    #[error("{path}: statistics tensor `{name}`: {reason}")]
    BadStats {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("calibration: {0}")]
    Config(String),
    #[error(transparent)]
    Tensor(#[from] sq_tensor::TensorError),
    #[error(transparent)]
    Model(#[from] sq_model::ModelError),
}

/// Result with [`CalibError`].
pub type Result<T, E = CalibError> = std::result::Result<T, E>;

//! # smoothquant-rs
//!
//! SmoothQuant (Xiao et al., 2022) W8A8 post-training quantization for OPT, BLOOM and LLaMA
//! decoders, in Rust. This facade re-exports the workspace crates; each also stands alone:
//!
//! | crate | owns |
//! |---|---|
//! | [`tensor`] (`sq-tensor`) | storage, dtypes, layouts, memory-mapped and atomic safetensors I/O |
//! | [`kernels`] (`sq-kernels`) | INT8 GEMM backends, quantize kernels, the f32 GEMM |
//! | [`model`] (`sq-model`) | OPT, BLOOM and LLaMA decoders, checkpoint loaders, tokenizers |
//! | [`calib`] (`sq-calib`) | activation statistics from calibration text |
//! | [`smooth`] (`sq-smooth`) | smoothing scales, folding, W8A8 quantization recipes |
//!
//! The `smoothquant` binary lives in `sq-cli`. See `docs/architecture.md` for how data flows.
//!
//! ```
//! use smoothquant_rs::tensor::{DType, Tensor};
//! let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap();
//! assert_eq!(t.to_dtype(DType::BF16).unwrap().to_f32_vec().unwrap(), [1.0, 2.0, 3.0]);
//! ```

pub use sq_calib as calib;
pub use sq_kernels as kernels;
pub use sq_model as model;
pub use sq_smooth as smooth;
pub use sq_tensor as tensor;

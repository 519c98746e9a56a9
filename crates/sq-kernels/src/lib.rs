//! # sq-kernels
//!
//! The compute kernels of [smoothquant-rs](https://github.com/smoothquant-rs/smoothquant-rs):
//!
//! - **INT8 GEMM** `Y = X · Wᵀ` (X `[m, k]` i8, W `[n, k]` i8 in nn.Linear layout) behind the
//!   object-safe [`Int8Gemm`] trait, with exact INT32 accumulation and a fused epilogue
//!   (per-token / per-tensor activation scales, per-channel / per-tensor weight scales, bias,
//!   optional requantization to i8), plus a batched [`Int8Gemm::bmm`] for attention.
//!   Backends: [`Avx512Vnni`], [`AvxVnni`], [`Portable`] and the scalar oracle [`Reference`];
//!   all return bit-identical results. [`select_backend`] picks the fastest, or the one named
//!   by `SQ_KERNEL=reference|avx512vnni|avxvnni|portable`.
//! - **Quantization** ([`quantize_per_token`], [`quantize_per_tensor`], [`quantize_static`],
//!   weight helpers), vectorized and bit-identical to their scalar definition.
//! - **f32 GEMM** for the full-precision model: [`pack_f32`] + [`f32_gemm`], and a strided
//!   [`sgemm`] for attention.
//! - [`bench`](mod@bench): the machine's peaks, read bandwidth and the GEMM suite behind
//!   `cargo xtask bench gemm`.
//!
//! All multi-threaded kernels run on rayon's current pool.
//!
//! ```
//! use sq_kernels::{quantize_per_token, quantize_weights_per_channel, select_backend, ActScales, WeightScales};
//!
//! # fn main() -> Result<(), sq_kernels::KernelError> {
//! let (m, n, k) = (2, 3, 4);
//! let x = [0.5f32, -1.0, 0.25, 2.0, 1.0, 1.0, -1.0, 0.0];
//! let w = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5];
//!
//! let gemm = select_backend()?;
//! let (w_q, w_scales) = quantize_weights_per_channel(&w, n, k)?;
//! let packed = gemm.pack_weights(&w_q, n, k, WeightScales::PerChannel(w_scales), Some(&[0.0, 0.0, 1.0]))?;
//!
//! let (mut x_q, mut x_scales) = (vec![0i8; m * k], vec![0f32; m]);
//! quantize_per_token(&x, m, k, &mut x_q, &mut x_scales)?;
//!
//! let mut y = vec![0f32; m * n];
//! gemm.gemm_f32_out(&x_q, m, ActScales::PerToken(&x_scales), &packed, &mut y)?;
//! // y ≈ x · wᵀ + bias
//! let expected = [0.5, -1.0, 1.875, 1.0, 1.0, 1.5];
//! for (got, want) in y.iter().zip(expected) {
//!     assert!((got - want).abs() < 0.03, "{got} vs {want}");
//! }
//! # Ok(())
//! # }
//! ```

/// Dispatches runtime `(rows, panels)` to a const-generic tile function: `f::<R, V> args`.
macro_rules! dispatch_tile {
    ($f:ident $args:tt, $rows:expr, $panels:expr, [$($r:literal)*], $vs:tt) => {
        match $rows {
            $( $r => dispatch_tile!(@v $f $args, $r, $panels, $vs), )*
            _ => unreachable!("tile rows out of range"),
        }
    };
    (@v $f:ident $args:tt, $r:literal, $panels:expr, [$($v:literal)*]) => {
        match $panels {
            $( $v => $f::<$r, $v> $args, )*
            _ => unreachable!("tile panels out of range"),
        }
    };
}

pub mod attention;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dispatch;
mod error;
mod f32gemm;
pub mod int8;
pub mod math;
pub mod quantize;
mod scratch;
pub mod team;

pub use dispatch::{
    available_backends, backend_by_name, select_backend, select_backend_with, BACKEND_ENV,
    BACKEND_NAMES,
};
pub use error::{KernelError, Result};
pub use f32gemm::{
    f32_gemm, pack_f32, pack_f32_rows, reference_sgemm, sgemm, sgemm_packed_serial, sgemm_serial,
    MatMut, MatRef, PackedB, PackedF32, Transpose,
};
pub use int8::{
    dequantize_acc, requantize, ActScales, Avx512Vnni, AvxVnni, BatchedI8, BmmOutput, Int8Gemm,
    PackedInt8, PackedLayout, Portable, Reference, WeightScales, MAX_K, PANEL_COLS,
};
pub use quantize::{
    absmax, dequantize_per_row, quantize_packed_weights_per_channel, quantize_per_tensor,
    quantize_per_tensor_smoothed, quantize_per_token, quantize_per_token_smoothed,
    quantize_softmax_row, quantize_static, quantize_static_smoothed, quantize_weights_per_channel,
    quantize_weights_per_tensor, quantize_with_absmax,
};

/// Compiles and runs the README's Rust examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

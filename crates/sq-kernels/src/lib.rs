//! # sq-kernels
//!
//! INT8 GEMM for smoothquant-rs: one backend trait (reference, AVX-512 VNNI, AVX-VNNI, portable;
//! CUDA behind a feature), weight packing, fused dequantize epilogues, quantize kernels and the
//! f32 GEMM. The backends land with the kernels issue; this crate currently holds the INT8 range
//! convention every layer shares.
//!
//! ```
//! // Symmetric INT8: values are clamped to [-127, 127] so that negation never overflows.
//! assert_eq!(sq_kernels::INT8_QMAX, 127);
//! ```

/// Largest magnitude of a symmetric INT8 value.
pub const INT8_QMAX: i8 = 127;

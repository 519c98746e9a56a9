/// Every error sq-kernels returns. Messages name the operation and the shapes involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A slice does not have the length the stated shape implies.
    #[error("{op}: `{operand}` has {actual} elements, but shape {shape} needs {expected}")]
    BadLength {
        op: &'static str,
        operand: &'static str,
        shape: String,
        expected: usize,
        actual: usize,
    },

    /// Two operands disagree on a shared dimension, or a dimension is out of range.
    #[error("{op}: {detail}")]
    ShapeMismatch { op: &'static str, detail: String },

    /// A scale is negative, NaN or infinite, where a finite non-negative one is required.
    #[error("{op}: invalid scale {value} for {what}: scales must be finite and non-negative")]
    InvalidScale {
        op: &'static str,
        what: &'static str,
        value: f32,
    },

    /// Weights packed by one backend were handed to a backend that reads another layout.
    #[error("{op}: weights were packed by backend `{packed_by}` in the {layout} layout, which backend `{backend}` cannot read; pack them with `{backend}`")]
    LayoutMismatch {
        op: &'static str,
        packed_by: &'static str,
        layout: &'static str,
        backend: &'static str,
    },

    /// The requested backend exists but this CPU lacks the instructions it needs.
    #[error("kernel backend `{name}` is not available on this CPU: {reason}")]
    BackendUnavailable { name: &'static str, reason: String },

    /// A rayon pool for a benchmark could not be built.
    #[error("{op}: could not build a rayon pool of {threads} threads: {reason}")]
    ThreadPool {
        op: &'static str,
        threads: usize,
        reason: String,
    },

    /// The CUDA backend cannot run here: built without the `cuda` feature, no NVIDIA driver,
    /// no such device, or a CUDA library (cuBLASLt, NVRTC) missing.
    #[error("CUDA is not available: {reason}")]
    CudaUnavailable { reason: String },

    /// A CUDA driver, cuBLAS(Lt) or NVRTC call failed.
    #[error("{op}: CUDA error: {detail}")]
    Cuda { op: &'static str, detail: String },

    /// No backend has this name.
    #[error("unknown kernel backend `{name}` (expected one of: reference, avx512vnni, avxvnni, portable)")]
    UnknownBackend { name: String },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Checks `actual == expected` for an operand of `op`, describing the shape in the error.
pub(crate) fn check_len(
    op: &'static str,
    operand: &'static str,
    shape: impl FnOnce() -> String,
    expected: usize,
    actual: usize,
) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::BadLength {
            op,
            operand,
            shape: shape(),
            expected,
            actual,
        })
    }
}

/// Checks a scale is finite and non-negative.
pub(crate) fn check_scale(op: &'static str, what: &'static str, value: f32) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(KernelError::InvalidScale { op, what, value })
    }
}

/// `a * b`, or a [`KernelError::ShapeMismatch`] naming the shape if it overflows `usize`.
pub(crate) fn checked_mul(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::ShapeMismatch {
        op,
        detail: format!("{a} x {b} elements overflow usize"),
    })
}

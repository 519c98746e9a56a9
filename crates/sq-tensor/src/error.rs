use crate::DType;
use std::path::PathBuf;

/// Every error sq-tensor returns. Messages name the file, the tensor, the dtype and the shapes
/// involved, so that a user can act on them without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    InvalidHeader { path: PathBuf, reason: String },

    #[error(
        "{path}: truncated safetensors file: the header says {expected} bytes, the file has {actual}"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("{path}: tensor `{name}` has dtype {dtype}, which sq-tensor does not support (supported: F32, F16, BF16, I8, U8, I32)")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: tensor `{name}` with shape {shape:?} and dtype {dtype} needs {expected} bytes, but its data offsets span {actual}")]
    ByteLengthMismatch {
        path: PathBuf,
        name: String,
        dtype: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },

    #[error("{path}: tensor `{name}` not found")]
    TensorNotFound { path: PathBuf, name: String },

    #[error("{index}: shard `{shard}` (holding tensor `{name}`) is missing: {reason}")]
    MissingShard {
        index: PathBuf,
        shard: String,
        name: String,
        reason: String,
    },

    #[error("{index}: invalid shard index: {reason}")]
    InvalidIndex { index: PathBuf, reason: String },

    #[error("{path}: no `model.safetensors` or `model.safetensors.index.json` in this directory")]
    NoCheckpoint { path: PathBuf },

    #[error("{op}: expected dtype {expected}, the tensor has {actual}")]
    DTypeMismatch {
        op: &'static str,
        expected: DType,
        actual: DType,
    },

    #[error("{op}: shape {actual:?} does not match {expected:?}")]
    ShapeMismatch {
        op: &'static str,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("shape {shape:?} has more elements than memory can address")]
    ShapeOverflow { shape: Vec<usize> },

    #[error("{what} is out of range for shape {shape:?}")]
    OutOfRange { what: String, shape: Vec<usize> },

    #[error("{op} needs a contiguous tensor, this one has shape {shape:?} and strides {strides:?}; call `contiguous()` first")]
    NotContiguous {
        op: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },

    #[error("{op}: the {dtype} data is not aligned for direct access (it starts at byte {byte_offset}); use `to_vec` to copy it")]
    Misaligned {
        op: &'static str,
        dtype: DType,
        byte_offset: usize,
    },

    #[error("tensor data of {len} bytes does not hold shape {shape:?} of dtype {dtype} ({expected} bytes)")]
    DataLength {
        dtype: DType,
        shape: Vec<usize>,
        len: usize,
        expected: usize,
    },

    #[error("cannot convert {from} to {to} without losing values; quantize explicitly instead")]
    UnsupportedConversion { from: DType, to: DType },

    #[error("{path}: cannot write tensor `{name}`: {reason}")]
    Write {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

/// Result with [`TensorError`].
pub type Result<T, E = TensorError> = std::result::Result<T, E>;

impl TensorError {
    /// An I/O error on `path` while `action`.
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        TensorError::Io {
            path: path.into(),
            action,
            source,
        }
    }
}

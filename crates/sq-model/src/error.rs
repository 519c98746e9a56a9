use std::path::PathBuf;

/// Every error sq-model returns. Messages name the file, the tensor and the shapes involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Tensor(#[from] sq_tensor::TensorError),

    #[error(transparent)]
    Kernel(#[from] sq_kernels::KernelError),

    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{path}: unsupported architecture `{architecture}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: String,
        supported: &'static str,
    },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` contains {what} (first at element {index})")]
    NonFinite {
        path: PathBuf,
        name: String,
        what: &'static str,
        index: usize,
    },

    #[error("{path}: invalid GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },

    #[error("{path}: tensor `{name}` has GGML type {ggml_type}, which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    UnsupportedGgufType {
        path: PathBuf,
        name: String,
        ggml_type: String,
    },

    #[error("{path}: invalid llama2.c checkpoint: {reason}")]
    Llama2c { path: PathBuf, reason: String },

    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{path}: unrecognised model format: {reason}")]
    UnknownFormat { path: PathBuf, reason: String },

    #[error("{linear}: {reason}")]
    Observer { linear: String, reason: String },

    /// The device asked for cannot run the model (no CUDA support built in, no driver or GPU).
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },

    #[error("{0}")]
    Invalid(String),
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            action,
            source,
        }
    }
}

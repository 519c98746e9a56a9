//! # sq-model
//!
//! OPT, BLOOM and LLaMA decoders for smoothquant-rs, with loaders for Hugging Face directories,
//! GGUF and llama2.c checkpoints. The decoders land with the model issue; this crate currently
//! holds the error type every loader reports through.
//!
//! ```
//! use sq_model::ModelError;
//! let e = ModelError::MissingTensor { path: "model.safetensors".into(), name: "lm_head.weight".into() };
//! assert_eq!(e.to_string(), "model.safetensors: tensor `lm_head.weight` is missing");
//! ```

pub mod error;
pub use error::{ModelError, Result};

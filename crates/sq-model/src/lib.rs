//! # sq-model
//!
//! OPT, BLOOM and LLaMA-family decoders in FP32 for smoothquant-rs, with loaders for Hugging
//! Face directories (config.json, single or sharded safetensors in f32/f16/bf16,
//! tokenizer.json), GGUF v2/v3 files and llama2.c checkpoints, generation and perplexity.
//!
//! One decoder implementation serves every architecture ([`Model`]); the per-architecture
//! modules ([`llama`], [`opt`], [`bloom`]) map configs and tensor names into it. Every
//! projection is a [`NamedLinear`] holding a `Box<dyn Linear>`, so FP, naive W8A8 and
//! SmoothQuant share the decoder, and calibration can observe every Linear's input. Norms are
//! addressable by name ([`Model::norm_mut`]) because smoothing folds scales into them.
//!
//! ```
//! use sq_model::{generate, load, Sampler};
//!
//! // With no path, the embedded stories260K model (llama2.c, 260K parameters) is used.
//! let loaded = load(None, None).unwrap();
//! let mut prompt = vec![loaded.tokenizer.bos_id().unwrap()];
//! prompt.extend(loaded.tokenizer.encode("Once upon a time").unwrap());
//! let out = generate(&loaded.model, loaded.tokenizer.as_ref(), &prompt, 12, &mut Sampler::greedy(), |_| {})
//!     .unwrap();
//! assert!(out.text.starts_with(", there was a little girl named Lily"), "{}", out.text);
//! ```

pub mod bloom;
pub mod compressed;
pub mod config;
pub mod device;
pub mod divergence;
pub mod error;
pub mod generate;
pub mod gguf;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod int8_attention;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod llama2c;
pub mod loader;
pub mod model;
pub mod native;
pub mod opt;
pub mod quant;
pub mod raw;
pub mod runner;
mod scratch;
pub mod tokenizer;
pub mod weights;

pub use config::{Activation, Architecture, ModelConfig};
pub use device::Device;
pub use divergence::{Divergence, ReferenceDistributions};
pub use error::{ModelError, Result};
pub use generate::{generate, perplexity, GenerateOutput, Perplexity, Sampler};
pub use int8_attention::AttentionMode;
pub use linear::{FpLinear, Linear, LinearObserver, NamedLinear};
pub use loader::{hf_f32_bytes, load, load_hf_dir, LayeredModel, LoadedModel};
pub use model::{Block, Logits, Model, Session};
pub use quant::{ActQuant, FakeQuantLinear, Int8Linear, WeightGranularity};
pub use runner::{Forward, Runner, RunnerSession};
pub use tokenizer::Tokenizer;

// One loaded model serves several generations at once (each with its own `Session`): the
// model, its tokenizer and the file readers must stay shareable across threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync + ?Sized>() {}
    send_sync::<Model>();
    send_sync::<LoadedModel>();
    send_sync::<dyn Tokenizer>();
    send_sync::<gguf::GgufFile>();
    send_sync::<sq_tensor::Checkpoint>();
};

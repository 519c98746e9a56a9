//! Loading any supported checkpoint into a [`Model`] and its tokenizer.

use crate::config::{read_config_json, Architecture, SUPPORTED_ARCHITECTURES};
use crate::model::Model;
use crate::raw::RawModel;
use crate::tokenizer::{HfTokenizer, Tokenizer};
use crate::weights::{TensorMap, WeightSource};
use crate::{bloom, llama, opt, ModelError, Result};
use sq_tensor::Checkpoint;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model ready to run, with its tokenizer and provenance.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Where it came from (`<embedded stories260K>` for the default).
    pub source: PathBuf,
    /// `"hf"`, `"gguf"`, `"llama2.c"`, `"smoothquant-rs"`, `"compressed-tensors"`.
    pub format: &'static str,
    /// Whether generation should start with BOS (llama2.c and SentencePiece-style models do).
    pub add_bos: bool,
    /// The config.json (or its equivalent for GGUF / llama2.c), for export.
    pub hf_config: serde_json::Value,
    /// Set when the model is a quantized checkpoint (native or compressed-tensors; it runs INT8
    /// as written).
    pub quantization: Option<crate::native::NativeQuantConfig>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("architecture", &self.model.config.architecture)
            .finish()
    }
}

/// The architecture named by a config.json's `architectures` (or `model_type`).
pub fn architecture_of(config: &serde_json::Value, path: &Path) -> Result<Architecture> {
    let names: Vec<String> = match config.get("architectures").and_then(|a| a.as_array()) {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        None => config
            .get("model_type")
            .and_then(|v| v.as_str())
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
    };
    for name in &names {
        match name.as_str() {
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "llama"
            | "mistral" | "qwen2" => return Ok(Architecture::Llama),
            "OPTForCausalLM" | "opt" => return Ok(Architecture::Opt),
            "BloomForCausalLM" | "bloom" => return Ok(Architecture::Bloom),
            _ => {}
        }
    }
    Err(ModelError::UnsupportedArchitecture {
        path: path.to_path_buf(),
        architecture: if names.is_empty() {
            "<none given>".into()
        } else {
            names.join(", ")
        },
        supported: SUPPORTED_ARCHITECTURES,
    })
}

/// Build a model from a config.json value and Hugging Face-named weights.
pub fn build_model(
    config: &serde_json::Value,
    config_path: &Path,
    weights: &dyn WeightSource,
) -> Result<Model> {
    let arch = architecture_of(config, config_path)?;
    let _span = tracing::info_span!("build_model", architecture = arch.name()).entered();
    let mut model = match arch {
        Architecture::Llama => llama::build(llama::config(config, config_path)?, weights)?,
        Architecture::Opt => opt::build(opt::config(config, config_path)?, config, weights)?,
        Architecture::Bloom => bloom::build(bloom::config(config, config_path)?, weights)?,
    };
    model.share_tied_embedding()?;
    Ok(model)
}

/// The model without its decoder layers (embeddings, final norm, LM head), for layer-by-layer
/// runs ([`LayeredModel`]).
pub fn build_shell(
    config: &serde_json::Value,
    config_path: &Path,
    weights: &dyn WeightSource,
) -> Result<Model> {
    match architecture_of(config, config_path)? {
        Architecture::Llama => llama::build_shell(llama::config(config, config_path)?, weights),
        Architecture::Opt => opt::build_shell(opt::config(config, config_path)?, config, weights),
        Architecture::Bloom => bloom::build_shell(bloom::config(config, config_path)?, weights),
    }
}

/// Decoder layer `i` (full precision) of the architecture `cfg` describes.
pub(crate) fn build_block(
    cfg: &crate::config::ModelConfig,
    weights: &dyn WeightSource,
    i: usize,
) -> Result<crate::model::Block> {
    match cfg.architecture {
        Architecture::Llama => llama::block(cfg, weights, i),
        Architecture::Opt => opt::block(cfg, weights, i),
        Architecture::Bloom => bloom::block(cfg, weights, i),
    }
}

/// A model read one decoder layer at a time: the shell (embeddings, final norm, LM head) in
/// memory, each layer built from its weights on demand and dropped by the caller. With a
/// Hugging Face directory the weights stay memory-mapped and [`LayeredModel::release_pages`]
/// drops the pages read so far, so peak memory is the shell plus one layer whatever the model
/// size. GGUF and llama2.c files are read whole (they are small or already quantized).
pub struct LayeredModel {
    /// The model with no layers (`layers` is empty; `config.num_layers` says how many follow).
    pub shell: Model,
    pub tokenizer: Arc<dyn Tokenizer>,
    pub source: PathBuf,
    pub format: &'static str,
    pub add_bos: bool,
    pub hf_config: serde_json::Value,
    /// Bytes of the weights as stored in the input (throughput reports).
    pub stored_bytes: u64,
    weights: Box<dyn WeightSource>,
}

impl std::fmt::Debug for LayeredModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredModel")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("layers", &self.shell.config.num_layers)
            .finish()
    }
}

impl LayeredModel {
    /// Open `path` like [`load`] does (the embedded stories260K without a path), without
    /// building its decoder layers. Quantized checkpoints are refused.
    pub fn open(path: Option<&Path>, tokenizer: Option<&Path>) -> Result<LayeredModel> {
        if let Some(dir) = path.filter(|p| p.is_dir()) {
            if crate::native::is_native_dir(dir)
                || crate::compressed::is_compressed_tensors_dir(dir)
            {
                return Err(ModelError::UnknownFormat {
                    path: dir.to_path_buf(),
                    reason: "this checkpoint is already quantized; a layer-by-layer run starts from an FP model".into(),
                });
            }
            if dir.join("config.json").is_file() {
                let config_path = dir.join("config.json");
                let config = read_config_json(&config_path)?;
                let ckpt = Checkpoint::open(dir)?;
                let shell = build_shell(&config, &config_path, &ckpt)?;
                let tok_path = dir.join("tokenizer.json");
                if !tok_path.is_file() {
                    return Err(ModelError::Tokenizer {
                        path: tok_path,
                        reason: "missing: a Hugging Face model directory needs its tokenizer.json"
                            .into(),
                    });
                }
                let tokenizer = HfTokenizer::from_file(&tok_path)?
                    .with_special_ids(shell.config.bos_token_id, shell.config.eos_token_id)?;
                ckpt.release_pages();
                return Ok(LayeredModel {
                    stored_bytes: ckpt.stored_bytes()?,
                    shell,
                    tokenizer: Arc::new(tokenizer),
                    source: dir.to_path_buf(),
                    format: "hf",
                    add_bos: read_add_bos(dir),
                    hf_config: config,
                    weights: Box::new(ckpt),
                });
            }
        }
        // GGUF, llama2.c, the embedded model: the loader's own detection, weights kept whole.
        let (raw, add_bos) = crate::loader::load_raw(path, tokenizer)?;
        let weights = crate::weights::OwnedTensors {
            tensors: raw.tensors,
            source: raw.source.clone(),
        };
        let stored_bytes = weights
            .tensors
            .values()
            .map(|t| (t.numel() * t.dtype().size_in_bytes()) as u64)
            .sum();
        let shell = build_shell(&raw.config, &raw.source, &weights)?;
        Ok(LayeredModel {
            shell,
            tokenizer: raw.tokenizer,
            source: raw.source,
            format: raw.format,
            add_bos,
            hf_config: raw.config,
            stored_bytes,
            weights: Box::new(weights),
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.shell.config.num_layers
    }

    /// Build decoder layer `i` (full precision) from its weights.
    pub fn block(&self, i: usize) -> Result<crate::model::Block> {
        let cfg = &self.shell.config;
        if i >= cfg.num_layers {
            return Err(ModelError::Invalid(format!(
                "layer {i} requested from a model of {} layers",
                cfg.num_layers
            )));
        }
        let _span = tracing::debug_span!("read_layer", index = i).entered();
        let block = build_block(cfg, self.weights.as_ref(), i)?;
        // Layer `i` lives under `<prefix>.<i>.` (`model.layers.3.input_layernorm`): have the
        // kernel read layer `i + 1` from disk while this one is calibrated and quantized.
        if i + 1 < cfg.num_layers {
            let layer_prefix = block
                .attn_norm
                .name
                .rsplit_once('.')
                .and_then(|(p, _)| p.strip_suffix(&format!(".{i}")));
            if let Some(p) = layer_prefix {
                self.weights.prefetch_prefix(&format!("{p}.{}.", i + 1));
            }
        }
        Ok(block)
    }

    /// Drop the mapped pages of the weights read so far (after each layer).
    pub fn release_pages(&self) {
        self.weights.release_pages();
    }
}

/// Bytes the weights of the Hugging Face directory `dir` would take as f32, from the headers
/// alone (`None` for other inputs): whether a model fits in memory.
pub fn hf_f32_bytes(dir: &Path) -> Result<Option<u64>> {
    if !dir.is_dir()
        || !dir.join("config.json").is_file()
        || crate::native::is_native_dir(dir)
        || crate::compressed::is_compressed_tensors_dir(dir)
    {
        return Ok(None);
    }
    let ckpt = Checkpoint::open(dir)?;
    let mut total = 0u64;
    for name in ckpt.names() {
        let info = ckpt.info(name)?;
        total += 4 * info.shape.iter().product::<usize>() as u64;
    }
    Ok(Some(total))
}

/// Load a Hugging Face model directory (config.json, safetensors, tokenizer.json).
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let config = read_config_json(&config_path)?;
    let ckpt = Checkpoint::open(dir)?;
    let model = build_model(&config, &config_path, &ckpt)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::Tokenizer {
            path: tok_path,
            reason: "missing: a Hugging Face model directory needs its tokenizer.json".into(),
        });
    }
    let tokenizer = HfTokenizer::from_file(&tok_path)?
        .with_special_ids(model.config.bos_token_id, model.config.eos_token_id)?;
    let add_bos = read_add_bos(dir);
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        source: dir.to_path_buf(),
        format: "hf",
        add_bos,
        hf_config: config,
        quantization: None,
    })
}

/// `add_bos_token` from tokenizer_config.json (LLaMA-style tokenizers set it), default false.
pub(crate) fn read_add_bos(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("add_bos_token").and_then(|b| b.as_bool()))
        .unwrap_or(false)
}

/// Turn a GGUF or llama2.c load into a model.
pub fn from_raw(raw: RawModel, add_bos: bool) -> Result<LoadedModel> {
    let config_path = raw.source.clone();
    let map = TensorMap {
        tensors: &raw.tensors,
        source: &raw.source,
    };
    let model = build_model(&raw.config, &config_path, &map)?;
    Ok(LoadedModel {
        model,
        tokenizer: raw.tokenizer,
        source: raw.source,
        format: raw.format,
        add_bos,
        hf_config: raw.config,
        quantization: None,
    })
}

/// Load whatever `path` is: a Hugging Face directory, a `.gguf` file, a llama2.c `.bin`
/// (tokenizer from `tokenizer` or `tok512.bin`/`tokenizer.bin` beside it), or, with no path,
/// the embedded stories260K model.
pub fn load(path: Option<&Path>, tokenizer: Option<&Path>) -> Result<LoadedModel> {
    if let Some(dir) = path.filter(|p| p.is_dir()) {
        if crate::native::is_native_dir(dir) {
            let backend = sq_kernels::select_backend()?;
            let (mut loaded, qc) = crate::native::load_native(dir, backend)?;
            loaded.quantization = Some(qc);
            return Ok(loaded);
        }
        if crate::compressed::is_compressed_tensors_dir(dir) {
            let backend = sq_kernels::select_backend()?;
            let (mut loaded, qc) = crate::compressed::load_compressed_tensors(dir, backend)?;
            loaded.quantization = Some(qc);
            return Ok(loaded);
        }
        if dir.join("config.json").is_file() {
            return load_hf_dir(dir);
        }
    }
    let (raw, add_bos) = load_raw(path, tokenizer)?;
    from_raw(raw, add_bos)
}

/// A GGUF file, a llama2.c checkpoint or (no path) the embedded stories260K, read whole, with
/// whether generation starts with BOS.
pub(crate) fn load_raw(path: Option<&Path>, tokenizer: Option<&Path>) -> Result<(RawModel, bool)> {
    let Some(path) = path else {
        return Ok((crate::llama2c::embedded_stories260k()?, true));
    };
    if !path.exists() {
        return Err(ModelError::io(
            path,
            "opening the model",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    if path.is_dir() {
        return Err(ModelError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "a model directory needs a config.json (Hugging Face layout)".into(),
        });
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, "opening", e))?;
        let _ = f
            .read(&mut magic)
            .map_err(|e| ModelError::io(path, "reading", e))?;
    }
    if &magic == b"GGUF" {
        let file = crate::gguf::GgufFile::open(path)?;
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(file.get("tokenizer.ggml.model").and_then(|v| v.as_str()) == Some("llama"));
        return Ok((crate::gguf::load_gguf_file(&file)?, add_bos));
    }
    if path.extension().is_some_and(|e| e == "bin") {
        let tok = match tokenizer {
            Some(t) => t.to_path_buf(),
            None => {
                let dir = path.parent().unwrap_or(Path::new("."));
                ["tok512.bin", "tokenizer.bin"]
                    .iter()
                    .map(|n| dir.join(n))
                    .find(|p| p.is_file())
                    .ok_or_else(|| ModelError::Tokenizer {
                        path: dir.join("tokenizer.bin"),
                        reason: "no tokenizer for this llama2.c checkpoint: pass --tokenizer FILE"
                            .into(),
                    })?
            }
        };
        return Ok((crate::llama2c::load_llama2c(path, &tok)?, true));
    }
    Err(ModelError::UnknownFormat {
        path: path.to_path_buf(),
        reason: "expected a Hugging Face directory, a .gguf file or a llama2.c .bin checkpoint"
            .into(),
    })
}

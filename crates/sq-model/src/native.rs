//! smoothquant-rs' own W8A8 checkpoint: a Hugging Face-style directory whose `config.json`
//! carries a `quantization_config` with `quant_method = "smoothquant-rs"`. Decoder Linears are
//! stored as INT8 `weight` with `weight_scale` (and `input_scale` for static activations); every
//! other tensor (embeddings, smoothed norms, LM head) is f32 under its Hugging Face name.
//! Loading runs INT8 directly, with no recalibration.

use crate::config::read_config_json;
use crate::linear::Linear;
use crate::linear::NamedLinear;
use crate::loader::{build_block, build_shell, LoadedModel};
use crate::quant::{ActQuant, Int8Linear, WeightGranularity};
use crate::tokenizer::HfTokenizer;
use crate::{ModelError, Result};
use sq_kernels::{Int8Gemm, WeightScales};
use sq_tensor::Checkpoint;
use std::path::Path;
use std::sync::Arc;

/// `quantization_config.quant_method` of our checkpoints.
pub const QUANT_METHOD: &str = "smoothquant-rs";

/// The fields of `quantization_config` the loader needs (the rest is the recipe's record).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NativeQuantConfig {
    pub quant_method: String,
    pub format: String,
    pub version: u32,
    /// `naive` or `smoothquant`.
    pub scheme: String,
    pub weights: WeightGranularity,
    /// `token`, `tensor` or `static`.
    pub acts: String,
    /// Whether generation starts with BOS for this model's tokenizer.
    #[serde(default)]
    pub add_bos: bool,
    /// INT8 attention products and KV cache (`--int8-attention`); absent in older checkpoints.
    #[serde(default)]
    pub int8_attention: bool,
    /// Everything else the writer recorded (alpha per group, calibration settings...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Whether `dir` holds one of our quantized checkpoints.
pub fn is_native_dir(dir: &Path) -> bool {
    read_config_json(&dir.join("config.json"))
        .ok()
        .and_then(|c| {
            c.get("quantization_config")?
                .get("quant_method")?
                .as_str()
                .map(|m| m == QUANT_METHOD)
        })
        .unwrap_or(false)
}

/// Replace the LM head (built from the checkpoint's INT8 values read as f32; tied, from the
/// embedding's tensor) by its INT8 form with `lm_head.weight_scale`. A tied embedding that the
/// loader shared with the head then reads the dequantized rows, as when it was quantized.
fn int8_head(
    model: &mut crate::Model,
    ckpt: &Checkpoint,
    dir: &Path,
    backend: Arc<dyn Int8Gemm>,
) -> Result<()> {
    let head = &mut model.lm_head;
    let name = head.name.clone();
    let bad = |reason: String| ModelError::Config {
        path: dir.to_path_buf(),
        reason,
    };
    let fp = head
        .as_fp()
        .ok_or_else(|| bad(format!("`{name}` is not a plain Linear")))?;
    let (n, k) = (fp.out_features(), fp.in_features());
    // The INT8 codes as stored (tied: under the embedding's name), read without an f32 copy.
    let weight_name = if model.config.tie_word_embeddings {
        format!("{}.weight", model.embed.name)
    } else {
        format!("{name}.weight")
    };
    let weight = ckpt.tensor(&weight_name)?;
    let w_q = weight.to_vec::<i8>().map_err(|_| {
        bad(format!(
            "`{weight_name}` is {}, expected the INT8 LM head's i8 codes",
            weight.dtype()
        ))
    })?;
    if w_q.len() != n * k {
        return Err(ModelError::TensorShape {
            path: dir.to_path_buf(),
            name: weight_name,
            expected: vec![n, k],
            actual: weight.shape().to_vec(),
        });
    }
    let scale_name = format!("{name}.weight_scale");
    let scales = ckpt.tensor(&scale_name)?.to_f32_vec()?;
    if scales.len() != n {
        return Err(ModelError::TensorShape {
            path: dir.to_path_buf(),
            name: scale_name,
            expected: vec![n],
            actual: vec![scales.len()],
        });
    }
    if let Some(i) = scales.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(ModelError::NonFinite {
            path: dir.to_path_buf(),
            name: scale_name,
            what: "a non-finite or negative scale",
            index: i,
        });
    }
    let bias = fp.bias().map(<[f32]>::to_vec);
    head.linear = Box::new(Int8Linear::from_quantized(
        &w_q,
        WeightScales::PerChannel(scales),
        bias.as_deref(),
        n,
        k,
        WeightGranularity::Channel,
        ActQuant::Token,
        backend,
    )?);
    Ok(())
}

/// Replace the FP `linear` (built from the checkpoint's INT8 values read as f32) by its packed
/// INT8 form with the checkpoint's scales, activation policy and run-time smoothing.
fn int8_linear(
    linear: &mut NamedLinear,
    ckpt: &Checkpoint,
    dir: &Path,
    config_path: &Path,
    qc: &NativeQuantConfig,
    backend: &Arc<dyn Int8Gemm>,
) -> Result<()> {
    let name = linear.name.clone();
    let (n, k) = (linear.linear.out_features(), linear.linear.in_features());
    let weight = ckpt.tensor(&format!("{name}.weight"))?;
    let w_q = weight.to_vec::<i8>().map_err(|_| ModelError::Config {
        path: dir.to_path_buf(),
        reason: format!(
            "`{name}.weight` is {}, expected i8 in a quantized checkpoint",
            weight.dtype()
        ),
    })?;
    let scale = ckpt.tensor(&format!("{name}.weight_scale"))?.to_f32_vec()?;
    let scales = match (qc.weights, scale.len()) {
        (WeightGranularity::Channel, len) if len == n => WeightScales::PerChannel(scale),
        (WeightGranularity::Tensor, 1) => WeightScales::PerTensor(scale[0]),
        (_, len) => {
            return Err(ModelError::TensorShape {
                path: dir.to_path_buf(),
                name: format!("{name}.weight_scale"),
                expected: vec![if qc.weights == WeightGranularity::Channel {
                    n
                } else {
                    1
                }],
                actual: vec![len],
            })
        }
    };
    {
        let s: &[f32] = match &scales {
            WeightScales::PerChannel(s) => s,
            WeightScales::PerTensor(s) => std::slice::from_ref(s),
        };
        if let Some(i) = s.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(ModelError::NonFinite {
                path: dir.to_path_buf(),
                name: format!("{name}.weight_scale"),
                what: "a non-finite or negative scale",
                index: i,
            });
        }
    }
    let act = match qc.acts.as_str() {
        "token" => ActQuant::Token,
        "tensor" => ActQuant::Tensor,
        "static" => {
            let s = ckpt.tensor(&format!("{name}.input_scale"))?.to_f32_vec()?;
            match s.as_slice() {
                [v] if v.is_finite() && *v > 0.0 => ActQuant::Static { scale: *v },
                _ => {
                    return Err(ModelError::Config {
                        path: dir.to_path_buf(),
                        reason: format!("`{name}.input_scale` must hold one positive number"),
                    })
                }
            }
        }
        other => {
            return Err(ModelError::Config {
                path: config_path.to_path_buf(),
                reason: format!(
                    "quantization_config.acts `{other}` is not token, tensor or static"
                ),
            })
        }
    };
    let bias = linear.as_fp().and_then(|fp| fp.bias().map(<[f32]>::to_vec));
    let int8 = Int8Linear::from_quantized(
        &w_q,
        scales,
        bias.as_deref(),
        n,
        k,
        qc.weights,
        act,
        backend.clone(),
    )?;
    // A run-time smoothing divide (no exact fold existed for this input).
    let smoothing_name = format!("{name}.input_smoothing");
    let int8 = if ckpt.contains(&smoothing_name) {
        let f = ckpt.tensor(&smoothing_name)?.to_f32_vec()?;
        int8.with_input_smoothing(f)
            .map_err(|e| ModelError::Config {
                path: dir.to_path_buf(),
                reason: format!("`{smoothing_name}`: {e}"),
            })?
    } else {
        int8
    };
    linear.linear = Box::new(int8);
    Ok(())
}

/// Load a directory written by `smoothquant quantize --format native`.
pub fn load_native(
    dir: &Path,
    backend: Arc<dyn Int8Gemm>,
) -> Result<(LoadedModel, NativeQuantConfig)> {
    let config_path = dir.join("config.json");
    let config = read_config_json(&config_path)?;
    let qc: NativeQuantConfig = serde_path_to_error::deserialize(
        config
            .get("quantization_config")
            .cloned()
            .unwrap_or_default(),
    )
    .map_err(|e| ModelError::Config {
        path: config_path.clone(),
        reason: format!("quantization_config: {e}"),
    })?;
    if qc.quant_method != QUANT_METHOD || qc.format != "native" {
        return Err(ModelError::Config {
            path: config_path,
            reason: format!(
                "quantization_config is `{}`/`{}`, not {QUANT_METHOD}/native",
                qc.quant_method, qc.format
            ),
        });
    }
    let ckpt = Checkpoint::open(dir)?;
    // The shell (embeddings, norms, LM head) is built as usual (INT8 values read as exact f32),
    // the LM head replaced by its INT8 form when it is one; then each decoder layer is built,
    // its Linears replaced by their packed INT8 forms and its f32 copies dropped before the
    // next layer is read, so the f32 model never exists whole (peak memory: the shell plus one
    // f32 layer), and the mapped pages read so far are released after each layer.
    let mut model = build_shell(&config, &config_path, &ckpt)?;
    model.share_tied_embedding()?;
    match qc.extra.get("lm_head").and_then(|v| v.as_str()) {
        None | Some("fp32") => {}
        Some("int8") => int8_head(&mut model, &ckpt, dir, backend.clone())?,
        Some(other) => {
            return Err(ModelError::Config {
                path: config_path,
                reason: format!("quantization_config.lm_head `{other}` is not fp32 or int8"),
            })
        }
    }
    ckpt.release_pages();
    for i in 0..model.config.num_layers {
        let mut block = build_block(&model.config, &ckpt, i)?;
        for linear in block.linears_mut() {
            int8_linear(linear, &ckpt, dir, &config_path, &qc, &backend)?;
        }
        model.layers.push(block);
        ckpt.release_pages();
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = HfTokenizer::from_file(&tok_path)?
        .with_special_ids(model.config.bos_token_id, model.config.eos_token_id)?;
    if qc.int8_attention {
        model.attention = crate::AttentionMode::Int8(backend);
    }
    let add_bos = qc.add_bos;
    Ok((
        LoadedModel {
            model,
            tokenizer: Arc::new(tokenizer),
            source: dir.to_path_buf(),
            format: "smoothquant-rs",
            add_bos,
            hf_config: config,
            quantization: None,
        },
        qc,
    ))
}

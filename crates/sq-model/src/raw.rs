//! The common output of the non-Hugging-Face loaders (GGUF, llama2.c): a LLaMA model as a
//! Hugging Face `config.json`, f32 tensors under Hugging Face names and layout, and a tokenizer.
//!
//! Both llama.cpp and llama2.c store the rows of the Q and K projections permuted for
//! *interleaved* RoPE (rotation pairs `(2i, 2i+1)` inside a head), while Hugging Face rotates
//! pairs `(i, i + head_dim/2)` (`rotate_half`). The loaders undo that permutation with
//! [`unpermute_interleaved_rope`], so one attention implementation serves every format.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use sq_tensor::Tensor;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A LLaMA model loaded from a GGUF file or a llama2.c checkpoint.
pub struct RawModel {
    /// Equivalent of a Hugging Face config.json for LlamaForCausalLM: architectures, hidden_size, intermediate_size,
    /// num_hidden_layers, num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, vocab_size,
    /// max_position_embeddings, tie_word_embeddings, bos_token_id, eos_token_id (and rope_scaling when the GGUF has it).
    pub config: serde_json::Value,
    /// f32 tensors (dequantized) under Hugging Face names and in Hugging Face layout:
    /// model.embed_tokens.weight, model.layers.{i}.input_layernorm.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
    /// model.layers.{i}.post_attention_layernorm.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.norm.weight,
    /// lm_head.weight only when untied. Linear weights are [out_features, in_features] row-major as in PyTorch.
    pub tensors: BTreeMap<String, Tensor>,
    /// The model's tokenizer.
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The file it came from (for error messages).
    pub source: PathBuf,
    /// A short format name (`"gguf"`, `"llama2.c"`).
    pub format: &'static str,
}

impl fmt::Debug for RawModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawModel")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab_size", &self.tokenizer.vocab_size())
            .finish()
    }
}

/// Hyper-parameters of a LLaMA model, as both non-HF formats describe them.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHyperParams {
    /// Model width (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the gated MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
    /// Hugging Face `rope_scaling` object, when the checkpoint has one.
    pub rope_scaling: Option<serde_json::Value>,
}

impl LlamaHyperParams {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size
            .checked_div(self.num_attention_heads)
            .unwrap_or(0)
    }

    /// Width of the K and V projections' outputs (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads.saturating_mul(self.head_dim())
    }

    /// Checks the invariants every LLaMA decoder relies on (positive sizes, heads dividing the
    /// width, query heads a multiple of KV heads, an even head width for RoPE, finite
    /// positive epsilon and theta).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(err(format!("{name} must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(err(format!(
                "head_dim {} is odd; RoPE needs an even head width",
                self.head_dim()
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(err(format!(
                "rms_norm_eps {} must be finite and positive",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err(format!(
                "rope_theta {} must be finite and positive",
                self.rope_theta
            )));
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(err(format!(
                        "{name} {id} is outside the vocabulary of {}",
                        self.vocab_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// The Hugging Face `config.json` of a `LlamaForCausalLM` with these hyper-parameters.
    pub fn to_hf_config(&self) -> serde_json::Value {
        let mut config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let (Some(scaling), Some(obj)) = (&self.rope_scaling, config.as_object_mut()) {
            obj.insert("rope_scaling".to_string(), scaling.clone());
        }
        config
    }
}

/// Hugging Face names of the tensors of layer `layer`, in the order
/// input_layernorm, q, k, v, o, post_attention_layernorm, gate, up, down.
pub fn hf_layer_tensor_names(layer: usize) -> [String; 9] {
    let p = format!("model.layers.{layer}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

/// Checks the dimensions of a `[n_heads * head_dim, cols]` matrix for a RoPE row permutation.
fn rope_rows(len: usize, n_heads: usize, head_dim: usize, cols: usize) -> Result<usize> {
    let rows = n_heads.checked_mul(head_dim);
    match rows.and_then(|r| r.checked_mul(cols)) {
        Some(n) if n == len && head_dim.is_multiple_of(2) => Ok(n),
        _ => Err(ModelError::Invalid(format!(
            "RoPE row permutation: {len} values do not form {n_heads} heads of even width {head_dim} by {cols} columns"
        ))),
    }
}

/// Converts the rows of a Q or K projection (`[n_heads * head_dim, cols]`, row-major) from the
/// interleaved-RoPE order of llama.cpp and llama2.c to the Hugging Face `rotate_half` order:
/// Hugging Face row `h*head_dim + s*head_dim/2 + j` is stored row `h*head_dim + 2j + s`.
pub fn unpermute_interleaved_rope(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    permute_rows(data, n_heads, head_dim, cols, false)
}

/// The inverse of [`unpermute_interleaved_rope`]: Hugging Face rows to interleaved-RoPE order
/// (what llama.cpp's converter does when it writes a GGUF).
pub fn permute_interleaved_rope(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    permute_rows(data, n_heads, head_dim, cols, true)
}

fn permute_rows(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
    to_interleaved: bool,
) -> Result<Vec<f32>> {
    rope_rows(data.len(), n_heads, head_dim, cols)?;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    if cols == 0 {
        return Ok(out);
    }
    for (hf_row, dst) in out.chunks_exact_mut(cols).enumerate() {
        let (head, within) = (hf_row / head_dim, hf_row % head_dim);
        let (s, j) = (within / half, within % half);
        let interleaved_row = head * head_dim + 2 * j + s;
        // The map is a bijection on rows; for the inverse direction swap source and target.
        let src_row = if to_interleaved {
            // Interleaved row `hf_row` takes Hugging Face row with (s, j) = (within % 2, within / 2).
            head * head_dim + (within % 2) * half + within / 2
        } else {
            interleaved_row
        };
        let start = src_row * cols;
        dst.copy_from_slice(&data[start..start + cols]);
    }
    Ok(out)
}

/// Rejects NaN and infinities in a loaded tensor, naming the first offending element.
pub fn check_finite(path: &Path, name: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            name: name.to_string(),
            what: if data[index].is_nan() {
                "NaN"
            } else {
                "infinity"
            },
            index,
        }),
    }
}

/// Builds an f32 tensor after checking that every value is finite.
pub(crate) fn finite_tensor(
    path: &Path,
    name: &str,
    data: Vec<f32>,
    shape: &[usize],
) -> Result<Tensor> {
    check_finite(path, name, &data)?;
    Ok(Tensor::from_vec(data, shape)?)
}

/// An `f32` as the `f64` with the same shortest decimal form (`1e-5f32` becomes `1e-5`, not
/// `9.999999747378752e-6`), so configs read like the Hugging Face originals.
pub(crate) fn f32_to_f64_decimal(v: f32) -> f64 {
    format!("{v}").parse::<f64>().unwrap_or(v as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_matches_the_definition_and_inverts() {
        // 2 heads of width 4, 3 columns; row r holds r*10 + c.
        let (heads, hd, cols) = (2, 4, 3);
        let data: Vec<f32> = (0..heads * hd)
            .flat_map(|r| (0..cols).map(move |c| (r * 10 + c) as f32))
            .collect();
        let hf = unpermute_interleaved_rope(&data, heads, hd, cols).unwrap();
        // Within a head, HF rows (0,1,2,3) come from interleaved rows (0,2,1,3).
        let rows: Vec<f32> = hf.chunks(cols).map(|r| r[0] / 10.0).collect();
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(
            permute_interleaved_rope(&hf, heads, hd, cols).unwrap(),
            data
        );
        // Width 8: HF rows (0..8) come from (0,2,4,6,1,3,5,7).
        let data: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            unpermute_interleaved_rope(&data, 1, 8, 1).unwrap(),
            [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
        );
        assert_eq!(
            permute_interleaved_rope(&data, 1, 8, 1).unwrap(),
            [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
        );
        assert!(unpermute_interleaved_rope(&data, 1, 3, 1).is_err());
        assert!(unpermute_interleaved_rope(&data, 2, 8, 1).is_err());
    }

    #[test]
    fn finite_check_names_the_element() {
        let p = Path::new("x.gguf");
        assert!(check_finite(p, "w", &[1.0, 2.0]).is_ok());
        match check_finite(p, "w", &[1.0, f32::NAN]) {
            Err(ModelError::NonFinite {
                name, what, index, ..
            }) => {
                assert_eq!((name.as_str(), what, index), ("w", "NaN", 1))
            }
            other => panic!("{other:?}"),
        }
        match check_finite(p, "w", &[f32::NEG_INFINITY]) {
            Err(ModelError::NonFinite { what, index, .. }) => {
                assert_eq!((what, index), ("infinity", 0))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decimal_conversion() {
        assert_eq!(f32_to_f64_decimal(1e-5), 1e-5);
        assert_eq!(f32_to_f64_decimal(100000.0), 100000.0);
        assert_ne!(1e-5f32 as f64, 1e-5);
        assert_eq!(f32_to_f64_decimal(0.1), 0.1);
    }
}

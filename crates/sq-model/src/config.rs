//! The internal model configuration every decoder is built from, and the validation that
//! turns a Hugging Face `config.json` into it (per-architecture serde structs live in
//! `llama.rs`, `opt.rs` and `bloom.rs`).

use crate::{ModelError, Result};
use std::path::Path;

/// The decoder families sq-model implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    /// LLaMA and LLaMA-shaped variants (Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// OPT: LayerNorm, learned positions, ReLU MLP, biases.
    Opt,
    /// BLOOM: LayerNorm, ALiBi, fused QKV, GELU MLP, biases.
    Bloom,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Opt => "opt",
            Architecture::Bloom => "bloom",
        }
    }
}

/// The supported `architectures` values of a config.json.
pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM, BloomForCausalLM";

/// Normalization flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
}

/// Activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU on the gate of a gated (SwiGLU) MLP.
    Silu,
    Relu,
    /// GELU, tanh approximation (BLOOM, `gelu_new`).
    GeluTanh,
    /// GELU, exact erf form.
    Gelu,
}

impl Activation {
    pub fn from_hf(name: &str, path: &Path) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "bloom_gelu" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    reason: format!("unsupported activation function `{other}`"),
                })
            }
        })
    }
}

/// How token positions enter the model.
#[derive(Clone, Debug, PartialEq)]
pub enum PositionEncoding {
    /// Rotary embeddings on Q and K (Hugging Face `rotate_half` layout) with the given
    /// per-pair inverse frequencies (rope scaling already applied).
    Rotary { inv_freq: Vec<f32> },
    /// Learned absolute positions added to the embeddings, looked up at `position + offset`.
    Learned { offset: usize },
    /// ALiBi biases on the attention scores, one slope per head.
    Alibi { slopes: Vec<f32> },
}

/// Everything a decoder needs to know about its shape, independent of the source format.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub norm_kind: NormKind,
    pub norm_eps: f32,
    pub activation: Activation,
    pub positions: PositionEncoding,
    pub tie_word_embeddings: bool,
    /// Norms before attention/MLP (true) or after the residual add (OPT-350m style).
    pub pre_norm: bool,
    /// OPT `word_embed_proj_dim` when it differs from the hidden size.
    pub word_embed_proj_dim: Option<usize>,
    /// Mistral-style sliding window attention.
    pub sliding_window: Option<usize>,
    /// BLOOM's `apply_residual_connection_post_layernorm`.
    pub residual_from_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Largest value any size in a config may have. Sizes are checked against it before anything
/// (RoPE frequencies, ALiBi slopes, the MLP width) is computed or allocated from them.
pub const MAX_DIM: usize = 1 << 24;

/// Check raw sizes from a config file before they are used.
pub(crate) fn check_sizes(path: &Path, fields: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in fields {
        if v > MAX_DIM {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                reason: format!("{name} = {v} is implausibly large"),
            });
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Check the invariants every decoder relies on; `path` names the config in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                reason,
            })
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > MAX_DIM {
                return bad(format!("{name} = {v} is implausibly large"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.architecture != Architecture::Llama
            && self.hidden_size != self.num_heads * self.head_dim
        {
            return bad(format!(
                "hidden_size ({}) is not divisible by the number of heads ({})",
                self.hidden_size, self.num_heads
            ));
        }
        if matches!(self.positions, PositionEncoding::Rotary { .. })
            && !self.head_dim.is_multiple_of(2)
        {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!(
                "norm epsilon {} is not a finite non-negative number",
                self.norm_eps
            ));
        }
        match &self.positions {
            PositionEncoding::Rotary { inv_freq } if inv_freq.iter().any(|f| !f.is_finite()) => {
                return bad(
                    "rotary frequencies are not finite (check rope_theta / rope_scaling)".into(),
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// Width of the key/value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// Hugging Face's `rope_scaling` entry.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
    /// transformers >= 5 puts the base here too (`rope_parameters`).
    pub rope_theta: Option<f64>,
}

/// Rotary inverse frequencies as Hugging Face computes them (f32), with `default`, `linear`
/// and `llama3` scaling.
pub fn rope_inv_freq(
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
    path: &Path,
) -> Result<Vec<f32>> {
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            reason: format!("rope_theta {theta} must be a positive number"),
        });
    }
    let base = theta as f32;
    let mut inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else {
        return Ok(inv_freq);
    };
    let kind = s.rope_type.as_deref().unwrap_or("default");
    let need = |v: Option<f64>, key: &str| {
        v.filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                reason: format!("rope_scaling of type `{kind}` needs a positive `{key}`"),
            })
    };
    match kind {
        "default" => {}
        "linear" => {
            let factor = need(s.factor, "factor")? as f32;
            for f in &mut inv_freq {
                *f /= factor;
            }
        }
        "llama3" => {
            let factor = need(s.factor, "factor")? as f32;
            let low = need(s.low_freq_factor, "low_freq_factor")? as f32;
            let high = need(s.high_freq_factor, "high_freq_factor")? as f32;
            let old_len = need(
                s.original_max_position_embeddings,
                "original_max_position_embeddings",
            )? as f32;
            if high == low {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    reason: "rope_scaling llama3 needs high_freq_factor != low_freq_factor".into(),
                });
            }
            let low_wavelen = old_len / low;
            let high_wavelen = old_len / high;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                let smooth = (old_len / wavelen - low) / (high - low);
                let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium { smoothed } else { scaled };
            }
        }
        other => {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                reason: format!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ),
            })
        }
    }
    Ok(inv_freq)
}

/// BLOOM's ALiBi slopes, for any number of heads.
pub fn alibi_slopes(num_heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
    let base = 2f32.powf(-(2f32.powf(-((closest as f32).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|i| base.powi(i as i32)).collect();
    if closest != num_heads {
        let extra_base = 2f32.powf(-(2f32.powf(-((2 * closest) as f32).log2() + 3.0)));
        let remaining = num_heads - closest;
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes
}

/// Read and parse a config.json into a JSON value, with errors naming the file.
pub fn read_config_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, "reading", e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// Deserialize a config value into an architecture's serde struct, naming the file on error.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    path: &Path,
) -> Result<T> {
    // The path in the error names the offending key (`hidden_size: invalid type ...`).
    serde_path_to_error::deserialize(value).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_matches_bloom_for_powers_of_two_and_others() {
        // 4 heads: base 2^-2, slopes 1/4, 1/16, 1/64, 1/256.
        let s = alibi_slopes(4);
        assert_eq!(s, [0.25, 0.0625, 0.015625, 0.00390625]);
        // 8 heads: 2^-1 .. 2^-8.
        let s = alibi_slopes(8);
        assert!((s[0] - 0.5).abs() < 1e-7 && (s[7] - 2f32.powi(-8)).abs() < 1e-9);
        // 6 heads: 4 from base 1/4, then 2 from base 2^-1 at odd powers 1, 3.
        let s = alibi_slopes(6);
        assert_eq!(s.len(), 6);
        assert!((s[4] - 0.5).abs() < 1e-7 && (s[5] - 0.125).abs() < 1e-7);
    }

    #[test]
    fn rope_scaling_kinds() {
        let p = Path::new("config.json");
        let plain = rope_inv_freq(8, 10000.0, None, p).unwrap();
        assert_eq!(plain[0], 1.0);
        let lin = RopeScaling {
            rope_type: Some("linear".into()),
            factor: Some(2.0),
            ..Default::default()
        };
        assert_eq!(rope_inv_freq(8, 10000.0, Some(&lin), p).unwrap()[0], 0.5);
        let bad = RopeScaling {
            rope_type: Some("yarn".into()),
            ..Default::default()
        };
        assert!(rope_inv_freq(8, 10000.0, Some(&bad), p).is_err());
        assert!(rope_inv_freq(8, -1.0, None, p).is_err());
    }
}

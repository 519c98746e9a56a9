//! LLaMA-family decoders (LLaMA 1/2/3, Mistral, Qwen2 and SmolLM-style models): RMSNorm,
//! rotary embeddings, grouped-query attention, SwiGLU MLP, optional q/k/v biases.

use crate::config::{
    parse_config, rope_inv_freq, Activation, Architecture, ModelConfig, NormKind, PositionEncoding,
    RopeScaling,
};
use crate::layers::Norm;
use crate::linear::{FpLinear, NamedLinear};
use crate::model::{Block, Embedding, Mlp, Model, QkvProj};
use crate::weights::{Prefixed, WeightSource};
use crate::{ModelError, Result};
use std::path::Path;

/// The `config.json` fields a LLaMA-family model uses.
#[derive(Debug, serde::Deserialize)]
pub struct LlamaHfConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5: `{rope_theta, rope_type, factor, ...}`.
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// A token id from a config (`2`, `[2, 32000]` or null).
pub(crate) fn first_token_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        serde_json::Value::Array(a) => a
            .first()
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok()),
        _ => None,
    }
}

/// Map a LLaMA-family config.json into the internal config.
pub fn config(value: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let c: LlamaHfConfig = parse_config(value, path)?;
    let heads = c.num_attention_heads;
    if heads == 0 {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            reason: "num_attention_heads is 0".into(),
        });
    }
    let head_dim = match c.head_dim {
        Some(d) => d,
        None if c.hidden_size.is_multiple_of(heads) => c.hidden_size / heads,
        None => {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                    c.hidden_size
                ),
            })
        }
    };
    crate::config::check_sizes(
        path,
        &[("hidden_size", c.hidden_size), ("head_dim", head_dim)],
    )?;
    let activation = match &c.hidden_act {
        Some(a) => Activation::from_hf(a, path)?,
        None => Activation::Silu,
    };
    let params = c.rope_parameters.as_ref();
    let theta = c
        .rope_theta
        .or(params.and_then(|p| p.rope_theta))
        .unwrap_or(10000.0);
    let scaling = c.rope_scaling.as_ref().or(params);
    let inv_freq = rope_inv_freq(head_dim, theta, scaling, path)?;
    let sliding_window = match c.use_sliding_window {
        Some(false) => None,
        _ => c
            .sliding_window
            .filter(|&w| w > 0 && w < c.max_position_embeddings),
    };
    let cfg = ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
        head_dim,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm_kind: NormKind::RmsNorm,
        norm_eps: c.rms_norm_eps as f32,
        activation,
        positions: PositionEncoding::Rotary { inv_freq },
        tie_word_embeddings: c.tie_word_embeddings,
        pre_norm: true,
        word_embed_proj_dim: None,
        sliding_window,
        residual_from_norm: false,
        bos_token_id: first_token_id(&c.bos_token_id),
        eos_token_id: first_token_id(&c.eos_token_id),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

fn rms_norm(p: &Prefixed<'_>, leaf: &str, dim: usize, eps: f32) -> Result<Norm> {
    let np = p.pp(leaf);
    Ok(Norm {
        name: np.prefix().to_string(),
        kind: NormKind::RmsNorm,
        weight: np.get("weight", &[dim])?,
        bias: None,
        eps,
    })
}

/// Build a LLaMA-family model from Hugging Face-named weights.
pub fn build(cfg: ModelConfig, source: &dyn WeightSource) -> Result<Model> {
    let mut model = build_shell(cfg, source)?;
    model.layers = (0..model.config.num_layers)
        .map(|i| block(&model.config, source, i))
        .collect::<Result<_>>()?;
    Ok(model)
}

/// Decoder layer `i`.
pub fn block(cfg: &ModelConfig, source: &dyn WeightSource, i: usize) -> Result<Block> {
    let m = Prefixed::new(source, "model");
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let l = m.pp("layers").pp(i);
    let a = l.pp("self_attn");
    let mlp = l.pp("mlp");
    Ok(Block {
        attn_norm: rms_norm(&l, "input_layernorm", h, cfg.norm_eps)?,
        qkv: QkvProj::Separate {
            q: a.linear("q_proj", qd, h)?,
            k: a.linear("k_proj", kvd, h)?,
            v: a.linear("v_proj", kvd, h)?,
        },
        o_proj: a.linear("o_proj", h, qd)?,
        mlp_norm: rms_norm(&l, "post_attention_layernorm", h, cfg.norm_eps)?,
        mlp: Mlp::Gated {
            gate: mlp.linear("gate_proj", inter, h)?,
            up: mlp.linear("up_proj", inter, h)?,
            down: mlp.linear("down_proj", h, inter)?,
        },
    })
}

/// The model without its decoder layers (embeddings, final norm, LM head).
pub fn build_shell(cfg: ModelConfig, source: &dyn WeightSource) -> Result<Model> {
    let root = Prefixed::new(source, "");
    let m = root.pp("model");
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed_name = m.pp("embed_tokens").name("weight");
    let embed_weight = m.get("embed_tokens.weight", &[v, h])?;
    let final_norm = rms_norm(&m, "norm", h, cfg.norm_eps)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed_weight.clone()
    } else {
        root.get("lm_head.weight", &[v, h])?
    };
    Ok(Model {
        embed: Embedding {
            name: embed_name.trim_end_matches(".weight").to_string(),
            weight: embed_weight,
            dim: h,
            in_lm_head: false,
        },
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        project_out: None,
        layers: Vec::new(),
        final_norm: Some(final_norm),
        lm_head: NamedLinear::new("lm_head", FpLinear::new(lm_head, v, h, None)?),
        config: cfg,
        attention: Default::default(),
    })
}

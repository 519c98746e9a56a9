//! BLOOM decoders: ALiBi, `word_embeddings_layernorm`, fused `query_key_value` laid out per
//! head as `[q, k, v]`, tanh-approximated GELU MLP, biases everywhere, tied LM head.

use crate::config::{
    alibi_slopes, parse_config, Activation, Architecture, ModelConfig, NormKind, PositionEncoding,
};
use crate::layers::Norm;
use crate::linear::{FpLinear, NamedLinear};
use crate::llama::first_token_id;
use crate::model::{Block, Embedding, Mlp, Model, QkvProj};
use crate::weights::{Prefixed, WeightSource};
use crate::Result;
use std::path::Path;

/// ALiBi has no learned positions; this bounds a session's KV cache.
pub const MAX_CONTEXT: usize = 1 << 16;

#[derive(Debug, serde::Deserialize)]
pub struct BloomHfConfig {
    pub vocab_size: usize,
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub seq_length: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}

pub fn config(value: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let c: BloomHfConfig = parse_config(value, path)?;
    crate::config::check_sizes(
        path,
        &[("n_head", c.n_head), ("hidden_size", c.hidden_size)],
    )?;
    let heads = c.n_head.max(1);
    let cfg = ModelConfig {
        architecture: Architecture::Bloom,
        hidden_size: c.hidden_size,
        num_layers: c.n_layer,
        num_heads: c.n_head,
        num_kv_heads: c.n_head,
        head_dim: c.hidden_size / heads,
        intermediate_size: 4 * c.hidden_size,
        vocab_size: c.vocab_size,
        max_position_embeddings: MAX_CONTEXT,
        norm_kind: NormKind::LayerNorm,
        norm_eps: c.layer_norm_epsilon as f32,
        activation: Activation::GeluTanh,
        positions: PositionEncoding::Alibi {
            slopes: alibi_slopes(heads),
        },
        tie_word_embeddings: true,
        pre_norm: true,
        word_embed_proj_dim: None,
        sliding_window: None,
        residual_from_norm: c.apply_residual_connection_post_layernorm,
        bos_token_id: first_token_id(&c.bos_token_id),
        eos_token_id: first_token_id(&c.eos_token_id),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

fn layer_norm(p: &Prefixed<'_>, leaf: &str, dim: usize, eps: f32) -> Result<Norm> {
    let np = p.pp(leaf);
    Ok(Norm {
        name: np.prefix().to_string(),
        kind: NormKind::LayerNorm,
        weight: np.get("weight", &[dim])?,
        bias: Some(np.get("bias", &[dim])?),
        eps,
    })
}

pub fn build(cfg: ModelConfig, source: &dyn WeightSource) -> Result<Model> {
    let mut model = build_shell(cfg, source)?;
    model.layers = (0..model.config.num_layers)
        .map(|i| block(&model.config, source, i))
        .collect::<Result<_>>()?;
    Ok(model)
}

/// transformers writes `transformer.*`; the bigscience hub checkpoints have no prefix.
fn transformer<'a>(root: &Prefixed<'a>) -> Result<Prefixed<'a>> {
    Ok(if root.contains("transformer.word_embeddings.weight")? {
        root.pp("transformer")
    } else {
        root.pp("")
    })
}

/// Decoder layer `i`.
pub fn block(cfg: &ModelConfig, source: &dyn WeightSource, i: usize) -> Result<Block> {
    let t = transformer(&Prefixed::new(source, ""))?;
    let h = cfg.hidden_size;
    let eps = cfg.norm_eps;
    let l = t.pp("h").pp(i);
    let a = l.pp("self_attention");
    let mlp = l.pp("mlp");
    Ok(Block {
        attn_norm: layer_norm(&l, "input_layernorm", h, eps)?,
        qkv: QkvProj::BloomFused(a.linear("query_key_value", 3 * h, h)?),
        o_proj: a.linear("dense", h, h)?,
        mlp_norm: layer_norm(&l, "post_attention_layernorm", h, eps)?,
        mlp: Mlp::Plain {
            fc1: mlp.linear("dense_h_to_4h", 4 * h, h)?,
            fc2: mlp.linear("dense_4h_to_h", h, 4 * h)?,
        },
    })
}

/// The model without its decoder layers (embeddings and their norm, final norm, LM head).
pub fn build_shell(cfg: ModelConfig, source: &dyn WeightSource) -> Result<Model> {
    let root = Prefixed::new(source, "");
    let t = transformer(&root)?;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let eps = cfg.norm_eps;
    let embed_weight = t.get("word_embeddings.weight", &[v, h])?;
    let embed_norm = layer_norm(&t, "word_embeddings_layernorm", h, eps)?;
    let final_norm = layer_norm(&t, "ln_f", h, eps)?;
    let lm_head = match root.get_opt("lm_head.weight", &[v, h])? {
        Some(w) => w,
        None => embed_weight.clone(),
    };
    Ok(Model {
        embed: Embedding {
            name: t.name("word_embeddings"),
            weight: embed_weight,
            dim: h,
            in_lm_head: false,
        },
        pos_embed: None,
        embed_norm: Some(embed_norm),
        project_in: None,
        project_out: None,
        layers: Vec::new(),
        final_norm: Some(final_norm),
        lm_head: NamedLinear::new("lm_head", FpLinear::new(lm_head, v, h, None)?),
        config: cfg,
        attention: Default::default(),
    })
}

//! OPT decoders: learned positions (offset 2), LayerNorm before or after each block
//! (`do_layer_norm_before`, false for opt-350m), `project_in`/`project_out` when
//! `word_embed_proj_dim != hidden_size`, ReLU MLP (`fc1`, `fc2`), biases everywhere.

use crate::config::{
    parse_config, Activation, Architecture, ModelConfig, NormKind, PositionEncoding,
};
use crate::layers::Norm;
use crate::linear::{FpLinear, NamedLinear};
use crate::llama::first_token_id;
use crate::model::{Block, Embedding, Mlp, Model, QkvProj};
use crate::weights::{Prefixed, WeightSource};
use crate::Result;
use std::path::Path;

/// OPT's learned positions are looked up at `position + 2` (a fairseq legacy).
pub const POSITION_OFFSET: usize = 2;

#[derive(Debug, serde::Deserialize)]
pub struct OptHfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "relu".into()
}

/// Whether the final LayerNorm exists (pre-norm models that did not remove it).
fn has_final_norm(c: &OptHfConfig) -> bool {
    c.do_layer_norm_before && !c.remove_final_layer_norm
}

pub fn config(value: &serde_json::Value, path: &Path) -> Result<ModelConfig> {
    let c: OptHfConfig = parse_config(value, path)?;
    let heads = c.num_attention_heads.max(1);
    let proj = c.word_embed_proj_dim.filter(|&d| d != c.hidden_size);
    let cfg = ModelConfig {
        architecture: Architecture::Opt,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_attention_heads,
        head_dim: c.hidden_size / heads,
        intermediate_size: c.ffn_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm_kind: NormKind::LayerNorm,
        norm_eps: 1e-5,
        activation: Activation::from_hf(&c.activation_function, path)?,
        positions: PositionEncoding::Learned {
            offset: POSITION_OFFSET,
        },
        tie_word_embeddings: c.tie_word_embeddings,
        pre_norm: c.do_layer_norm_before,
        word_embed_proj_dim: proj,
        sliding_window: None,
        residual_from_norm: false,
        bos_token_id: first_token_id(&c.bos_token_id),
        eos_token_id: first_token_id(&c.eos_token_id),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

fn layer_norm(p: &Prefixed<'_>, leaf: &str, dim: usize) -> Result<Norm> {
    let np = p.pp(leaf);
    // Without elementwise affine, the norm has unit gamma and no beta (smoothing adds gamma).
    let weight = np
        .get_opt("weight", &[dim])?
        .unwrap_or_else(|| vec![1.0; dim]);
    Ok(Norm {
        name: np.prefix().to_string(),
        kind: NormKind::LayerNorm,
        weight,
        bias: Some(
            np.get_opt("bias", &[dim])?
                .unwrap_or_else(|| vec![0.0; dim]),
        ),
        eps: 1e-5,
    })
}

pub fn build(
    cfg: ModelConfig,
    raw: &serde_json::Value,
    source: &dyn WeightSource,
) -> Result<Model> {
    let mut model = build_shell(cfg, raw, source)?;
    model.layers = (0..model.config.num_layers)
        .map(|i| block(&model.config, source, i))
        .collect::<Result<_>>()?;
    Ok(model)
}

/// Hub checkpoints use `model.decoder.*`; older exports drop the `model.` prefix.
fn decoder<'a>(root: &Prefixed<'a>) -> Result<Prefixed<'a>> {
    Ok(if root.contains("model.decoder.embed_tokens.weight")? {
        root.pp("model").pp("decoder")
    } else {
        root.pp("decoder")
    })
}

/// Decoder layer `i`.
pub fn block(cfg: &ModelConfig, source: &dyn WeightSource, i: usize) -> Result<Block> {
    let d = decoder(&Prefixed::new(source, ""))?;
    let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
    let l = d.pp("layers").pp(i);
    let a = l.pp("self_attn");
    Ok(Block {
        attn_norm: layer_norm(&l, "self_attn_layer_norm", h)?,
        qkv: QkvProj::Separate {
            q: a.linear("q_proj", h, h)?,
            k: a.linear("k_proj", h, h)?,
            v: a.linear("v_proj", h, h)?,
        },
        o_proj: a.linear("out_proj", h, h)?,
        mlp_norm: layer_norm(&l, "final_layer_norm", h)?,
        mlp: Mlp::Plain {
            fc1: l.linear("fc1", ffn, h)?,
            fc2: l.linear("fc2", h, ffn)?,
        },
    })
}

/// The model without its decoder layers (embeddings, projections, final norm, LM head).
pub fn build_shell(
    cfg: ModelConfig,
    raw: &serde_json::Value,
    source: &dyn WeightSource,
) -> Result<Model> {
    let c: OptHfConfig = parse_config(raw, source.path())?;
    let root = Prefixed::new(source, "");
    let d = decoder(&root)?;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let emb_dim = cfg.word_embed_proj_dim.unwrap_or(h);
    let embed_weight = d.get("embed_tokens.weight", &[v, emb_dim])?;
    let n_pos = cfg.max_position_embeddings + POSITION_OFFSET;
    let pos_weight = d.get("embed_positions.weight", &[n_pos, h])?;
    let (project_in, project_out) = match cfg.word_embed_proj_dim {
        Some(p) => (
            Some(d.linear("project_in", h, p)?),
            Some(d.linear("project_out", p, h)?),
        ),
        None => (None, None),
    };
    let final_norm = if has_final_norm(&c) {
        Some(layer_norm(&d, "final_layer_norm", h)?)
    } else {
        None
    };
    let lm_head = if cfg.tie_word_embeddings {
        embed_weight.clone()
    } else {
        root.get("lm_head.weight", &[v, emb_dim])?
    };
    Ok(Model {
        embed: Embedding {
            name: d.name("embed_tokens"),
            weight: embed_weight,
            dim: emb_dim,
            in_lm_head: false,
        },
        pos_embed: Some(Embedding {
            name: d.name("embed_positions"),
            weight: pos_weight,
            dim: h,
            in_lm_head: false,
        }),
        embed_norm: None,
        project_in,
        project_out,
        layers: Vec::new(),
        final_norm,
        lm_head: NamedLinear::new("lm_head", FpLinear::new(lm_head, v, emb_dim, None)?),
        config: cfg,
        attention: Default::default(),
    })
}

//! Which norm feeds which Linears, per architecture, as data.

use crate::{Result, SmoothError};
use sq_model::{Architecture, Model};

/// One row of a mapping table: a norm (named relative to its layer) and the Linears that read
/// its output. The first Linear names the group (and its activation statistics).
#[derive(Clone, Copy, Debug)]
pub struct GroupSpec {
    pub norm: &'static str,
    pub linears: &'static [&'static str],
}

/// The paper's groups for LLaMA-family models.
pub const LLAMA_PAPER: &[GroupSpec] = &[
    GroupSpec {
        norm: "input_layernorm",
        linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    },
    GroupSpec {
        norm: "post_attention_layernorm",
        linears: &["mlp.gate_proj", "mlp.up_proj"],
    },
];

/// The paper's groups for OPT (pre-norm).
pub const OPT_PAPER: &[GroupSpec] = &[
    GroupSpec {
        norm: "self_attn_layer_norm",
        linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    },
    GroupSpec {
        norm: "final_layer_norm",
        linears: &["fc1"],
    },
];

/// The paper's groups for BLOOM.
pub const BLOOM_PAPER: &[GroupSpec] = &[
    GroupSpec {
        norm: "input_layernorm",
        linears: &["self_attention.query_key_value"],
    },
    GroupSpec {
        norm: "post_attention_layernorm",
        linears: &["mlp.dense_h_to_4h"],
    },
];

/// The mapping table of an architecture.
pub fn paper_specs(arch: Architecture) -> &'static [GroupSpec] {
    match arch {
        Architecture::Llama => LLAMA_PAPER,
        Architecture::Opt => OPT_PAPER,
        Architecture::Bloom => BLOOM_PAPER,
    }
}

/// A smoothing group of a concrete model: full Hugging Face names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmoothGroup {
    /// The norm whose gamma (and beta) absorb `1/s`.
    pub norm: String,
    /// The Linears whose input channels absorb `s`; the first names the group.
    pub linears: Vec<String>,
}

impl SmoothGroup {
    /// The group's name: its first Linear (`model.layers.0.self_attn.q_proj`).
    pub fn name(&self) -> &str {
        &self.linears[0]
    }
}

/// The paper's smoothing groups of `model`. Refuses models whose norms also write the residual
/// stream (OPT post-norm, BLOOM with `apply_residual_connection_post_layernorm`), where folding
/// `1/s` into the norm would change the model.
pub fn paper_groups(model: &Model) -> Result<Vec<SmoothGroup>> {
    let cfg = &model.config;
    if !cfg.pre_norm {
        return Err(SmoothError::Unsupported(
            "this OPT model applies its LayerNorms after the residual add (do_layer_norm_before = false, \
             as opt-350m): their output is the residual stream itself, so folding smoothing scales into \
             them would change the model. Use --scheme naive for it"
                .into(),
        ));
    }
    if cfg.residual_from_norm {
        return Err(SmoothError::Unsupported(
            "this BLOOM model takes its residual from the LayerNorm output \
             (apply_residual_connection_post_layernorm = true), so folding smoothing scales into the norms \
             would change the model. Use --scheme naive for it"
                .into(),
        ));
    }
    let specs = paper_specs(cfg.architecture);
    let mut groups = Vec::with_capacity(model.layers.len() * specs.len());
    for block in &model.layers {
        let first = specs[0].norm;
        let layer = block
            .attn_norm
            .name
            .strip_suffix(first)
            .and_then(|p| p.strip_suffix('.'))
            .ok_or_else(|| {
                SmoothError::Unsupported(format!(
                    "norm `{}` does not follow the {} naming (`<layer>.{first}`)",
                    block.attn_norm.name,
                    cfg.architecture.name()
                ))
            })?;
        for spec in specs {
            groups.push(SmoothGroup {
                norm: format!("{layer}.{}", spec.norm),
                linears: spec
                    .linears
                    .iter()
                    .map(|l| format!("{layer}.{l}"))
                    .collect(),
            });
        }
    }
    Ok(groups)
}

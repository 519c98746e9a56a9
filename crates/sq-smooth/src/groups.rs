//! Which layer produces each smoothed input, per architecture, as data.
//!
//! A smoothing group is a set of Linears reading the same input `X`, plus the place where `1/s`
//! goes so that `X / s` is what they read:
//!
//! - the paper's groups fold `1/s` into the LayerNorm/RMSNorm that produces `X`;
//! - `--smooth-targets all` adds the inputs no norm produces: the attention output projection
//!   (its input is `softmax(QKᵀ)·V`, linear in V, so `1/s` folds into the value rows), LLaMA's
//!   down projection (`act(gate)·up`, linear in `up`), and OPT's `fc2` (`ReLU(fc1 x)`: ReLU
//!   commutes with a positive scale). Where no exact fold exists (BLOOM's GELU before
//!   `dense_4h_to_h`) the divide happens at run time, fused into the activation quantizer.

use crate::{Result, SmoothError};
use sq_model::{Activation, Architecture, Model};

/// Which Linears are smoothed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SmoothTargets {
    /// Only the Linears after a norm: the paper and the official code, exactly.
    Paper,
    /// Every Linear input that can be smoothed.
    #[default]
    All,
}

impl SmoothTargets {
    pub fn name(self) -> &'static str {
        match self {
            SmoothTargets::Paper => "paper",
            SmoothTargets::All => "all",
        }
    }
}

/// How the producing Linear's output rows line up with the smoothed Linear's input channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLayout {
    /// Output row `c` is input channel `c`.
    Direct,
    /// The value projection feeding the attention output projection: input channel `(head, d)`
    /// reads value row `(head / (heads / kv_heads), d)`. With grouped-query attention the heads
    /// sharing a value row share its scale.
    Values,
    /// BLOOM's fused `query_key_value`, laid out per head as `[q, k, v]`: input channel
    /// `(head, d)` reads row `head · 3 · head_dim + 2 · head_dim + d`.
    BloomFusedValues,
}

/// Where a group's `1/s` comes from, relative to its layer.
#[derive(Clone, Copy, Debug)]
pub enum SourceSpec {
    /// Folded into this norm's gamma (and beta).
    Norm(&'static str),
    /// Folded into the output rows (weight and bias) of this Linear. With `through_activation`
    /// the MLP activation sits between the two, so the fold is exact only for activations that
    /// commute with a positive scale (ReLU); otherwise the divide happens at run time.
    Rows {
        linear: &'static str,
        layout: RowLayout,
        through_activation: bool,
    },
}

/// One row of a mapping table: where `1/s` goes, and the Linears that read the smoothed input.
/// The first Linear names the group (and its activation statistics).
#[derive(Clone, Copy, Debug)]
pub struct GroupSpec {
    pub source: SourceSpec,
    pub linears: &'static [&'static str],
}

const fn norm(norm: &'static str, linears: &'static [&'static str]) -> GroupSpec {
    GroupSpec {
        source: SourceSpec::Norm(norm),
        linears,
    }
}

const fn rows(
    linear: &'static str,
    layout: RowLayout,
    through_activation: bool,
    consumer: &'static [&'static str],
) -> GroupSpec {
    GroupSpec {
        source: SourceSpec::Rows {
            linear,
            layout,
            through_activation,
        },
        linears: consumer,
    }
}

/// The paper's groups for LLaMA-family models.
pub const LLAMA_PAPER: &[GroupSpec] = &[
    norm(
        "input_layernorm",
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    norm(
        "post_attention_layernorm",
        &["mlp.gate_proj", "mlp.up_proj"],
    ),
];

/// LLaMA inputs beyond the paper: `o_proj` through `v_proj`, `down_proj` through `up_proj`.
pub const LLAMA_BEYOND: &[GroupSpec] = &[
    rows(
        "self_attn.v_proj",
        RowLayout::Values,
        false,
        &["self_attn.o_proj"],
    ),
    rows("mlp.up_proj", RowLayout::Direct, false, &["mlp.down_proj"]),
];

/// The paper's groups for OPT (pre-norm).
pub const OPT_PAPER: &[GroupSpec] = &[
    norm(
        "self_attn_layer_norm",
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    norm("final_layer_norm", &["fc1"]),
];

/// OPT inputs beyond the paper: `out_proj` through `v_proj`, `fc2` through `fc1` and ReLU.
pub const OPT_BEYOND: &[GroupSpec] = &[
    rows(
        "self_attn.v_proj",
        RowLayout::Values,
        false,
        &["self_attn.out_proj"],
    ),
    rows("fc1", RowLayout::Direct, true, &["fc2"]),
];

/// The paper's groups for BLOOM.
pub const BLOOM_PAPER: &[GroupSpec] = &[
    norm("input_layernorm", &["self_attention.query_key_value"]),
    norm("post_attention_layernorm", &["mlp.dense_h_to_4h"]),
];

/// BLOOM inputs beyond the paper: `dense` through the fused value rows; `dense_4h_to_h` sits
/// after GELU, so its divide happens at run time.
pub const BLOOM_BEYOND: &[GroupSpec] = &[
    rows(
        "self_attention.query_key_value",
        RowLayout::BloomFusedValues,
        false,
        &["self_attention.dense"],
    ),
    rows(
        "mlp.dense_h_to_4h",
        RowLayout::Direct,
        true,
        &["mlp.dense_4h_to_h"],
    ),
];

/// The paper's mapping table of an architecture.
pub fn paper_specs(arch: Architecture) -> &'static [GroupSpec] {
    match arch {
        Architecture::Llama => LLAMA_PAPER,
        Architecture::Opt => OPT_PAPER,
        Architecture::Bloom => BLOOM_PAPER,
    }
}

/// The groups `--smooth-targets all` adds to the paper's.
pub fn beyond_specs(arch: Architecture) -> &'static [GroupSpec] {
    match arch {
        Architecture::Llama => LLAMA_BEYOND,
        Architecture::Opt => OPT_BEYOND,
        Architecture::Bloom => BLOOM_BEYOND,
    }
}

/// Where a concrete group's `1/s` goes (full Hugging Face names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fold {
    /// Into the norm's gamma (and beta).
    Norm { norm: String },
    /// Into the output rows (weight and bias) of the producing Linear.
    Rows {
        linear: String,
        layout: RowLayout,
        /// Number of query heads and key/value heads, and the head size, for value layouts.
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    /// Multiplied by `1/s` at run time, inside the activation quantize of the group's Linears.
    Runtime,
}

impl Fold {
    /// A short description for reports: `norm input_layernorm`, `rows of v_proj`, `run time`.
    pub fn describe(&self) -> String {
        let short = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
        match self {
            Fold::Norm { norm } => format!("norm {}", short(norm)),
            Fold::Rows { linear, .. } => format!("rows of {}", short(linear)),
            Fold::Runtime => "run time".into(),
        }
    }

    /// The producer row that input channel `c` of the smoothed Linear reads (`Rows` folds).
    pub fn producer_row(&self, c: usize) -> usize {
        match self {
            Fold::Rows {
                layout: RowLayout::Values,
                heads,
                kv_heads,
                head_dim,
                ..
            } => {
                let group = (heads / kv_heads.max(&1)).max(1);
                let (head, d) = (c / head_dim.max(&1), c % head_dim.max(&1));
                (head / group) * head_dim + d
            }
            Fold::Rows {
                layout: RowLayout::BloomFusedValues,
                head_dim,
                ..
            } => {
                let (head, d) = (c / head_dim.max(&1), c % head_dim.max(&1));
                head * 3 * head_dim + 2 * head_dim + d
            }
            _ => c,
        }
    }

    /// Whether input channels that read the same producer row must share one scale (grouped-
    /// query attention).
    pub fn ties_channels(&self) -> bool {
        matches!(self, Fold::Rows { layout: RowLayout::Values, heads, kv_heads, .. } if heads != kv_heads)
    }
}

/// A smoothing group of a concrete model: full Hugging Face names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmoothGroup {
    /// Where `1/s` goes.
    pub fold: Fold,
    /// The Linears whose input channels absorb `s`; the first names the group.
    pub linears: Vec<String>,
}

impl SmoothGroup {
    /// The group's name: its first Linear (`model.layers.0.self_attn.q_proj`).
    pub fn name(&self) -> &str {
        &self.linears[0]
    }
    /// The norm absorbing `1/s`, for the paper's groups.
    pub fn norm(&self) -> Option<&str> {
        match &self.fold {
            Fold::Norm { norm } => Some(norm),
            _ => None,
        }
    }
    /// The same group with `1/s` applied at run time instead of folded into the producing
    /// Linear's rows (norm folds are kept). The producer's weights then stay as they were: with
    /// per-tensor weight scales, rows divided by large `s` lose precision in the producer's
    /// quantization, and the channel's error grows by `s` again in this group's Linears.
    pub fn divided_at_runtime(&self) -> SmoothGroup {
        SmoothGroup {
            fold: match self.fold {
                Fold::Rows { .. } => Fold::Runtime,
                ref other => other.clone(),
            },
            linears: self.linears.clone(),
        }
    }
}

/// Where `1/s` goes for the groups that do not follow a norm (`--smooth-fold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BeyondFold {
    /// Into the producing Linear's output rows where the architecture allows (free at run time,
    /// and expressible in the compressed-tensors layout).
    #[default]
    Rows,
    /// A run-time divide fused into the activation quantizer of the group's Linears.
    Runtime,
}

impl BeyondFold {
    pub fn name(self) -> &'static str {
        match self {
            BeyondFold::Rows => "rows",
            BeyondFold::Runtime => "runtime",
        }
    }
    /// `groups` with this fold applied to those that fold into a producer's rows.
    pub fn apply(self, groups: &[SmoothGroup]) -> Vec<SmoothGroup> {
        match self {
            BeyondFold::Rows => groups.to_vec(),
            BeyondFold::Runtime => groups.iter().map(SmoothGroup::divided_at_runtime).collect(),
        }
    }
}

/// Why a model's norms cannot absorb smoothing scales, if they cannot.
fn norm_fold_refusal(model: &Model) -> Option<&'static str> {
    let cfg = &model.config;
    if !cfg.pre_norm {
        return Some(
            "this OPT model applies its LayerNorms after the residual add (do_layer_norm_before = false, \
             as opt-350m): their output is the residual stream itself, so folding smoothing scales into \
             them would change the model",
        );
    }
    if cfg.residual_from_norm {
        return Some(
            "this BLOOM model takes its residual from the LayerNorm output \
             (apply_residual_connection_post_layernorm = true), so folding smoothing scales into the norms \
             would change the model",
        );
    }
    None
}

/// The paper's smoothing groups of `model`. Refuses models whose norms also write the residual
/// stream (OPT post-norm, BLOOM with `apply_residual_connection_post_layernorm`), where folding
/// `1/s` into the norm would change the model.
pub fn paper_groups(model: &Model) -> Result<Vec<SmoothGroup>> {
    smoothing_groups(model, SmoothTargets::Paper)
}

/// The smoothing groups of `model` for `targets`, layer by layer in forward order. With `all`,
/// models whose norms cannot absorb scales (see [`paper_groups`]) still get the groups that do
/// not fold into a norm.
pub fn smoothing_groups(model: &Model, targets: SmoothTargets) -> Result<Vec<SmoothGroup>> {
    let cfg = &model.config;
    let refusal = norm_fold_refusal(model);
    if let (Some(reason), SmoothTargets::Paper) = (refusal, targets) {
        return Err(SmoothError::Unsupported(format!(
            "{reason}. Use --scheme naive, or --smooth-targets all, which smooths only the inputs \
             that do not come from a norm"
        )));
    }
    let paper = paper_specs(cfg.architecture);
    let beyond = match targets {
        SmoothTargets::Paper => &[][..],
        SmoothTargets::All => beyond_specs(cfg.architecture),
    };
    // Forward order within a layer: attention input, attention output, MLP input, MLP output.
    let specs: Vec<&GroupSpec> = match beyond {
        [] => paper.iter().collect(),
        _ => vec![&paper[0], &beyond[0], &paper[1], &beyond[1]],
    };
    let mut groups = Vec::with_capacity(model.layers.len() * specs.len());
    for block in &model.layers {
        let first = match paper[0].source {
            SourceSpec::Norm(n) => n,
            SourceSpec::Rows { .. } => unreachable!("the first paper group folds into a norm"),
        };
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
        for spec in &specs {
            let fold = match spec.source {
                SourceSpec::Norm(_) if refusal.is_some() => continue,
                SourceSpec::Norm(n) => Fold::Norm {
                    norm: format!("{layer}.{n}"),
                },
                SourceSpec::Rows {
                    through_activation: true,
                    ..
                } if cfg.activation != Activation::Relu => Fold::Runtime,
                SourceSpec::Rows { linear, layout, .. } => Fold::Rows {
                    linear: format!("{layer}.{linear}"),
                    layout,
                    heads: cfg.num_heads,
                    kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                },
            };
            groups.push(SmoothGroup {
                fold,
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

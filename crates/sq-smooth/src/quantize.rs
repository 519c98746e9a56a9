//! W8A8 recipes: which granularity each side uses, and turning a (smoothed or not) FP model
//! into one whose decoder Linears run on the INT8 GEMM.

use crate::{Result, SmoothError};
use sq_calib::StatsTable;
use sq_kernels::Int8Gemm;
use sq_model::{ActQuant, FakeQuantLinear, FpLinear, Int8Linear, Model, WeightGranularity};
use std::sync::Arc;

/// How activations are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActPolicy {
    /// Dynamic, per token.
    Token,
    /// Dynamic, per tensor.
    Tensor,
    /// Static per tensor, from calibration.
    Static,
}

impl ActPolicy {
    pub fn name(self) -> &'static str {
        match self {
            ActPolicy::Token => "token",
            ActPolicy::Tensor => "tensor",
            ActPolicy::Static => "static",
        }
    }
}

/// A W8A8 quantization recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recipe {
    pub weights: WeightGranularity,
    pub acts: ActPolicy,
}

impl Recipe {
    /// The paper's O1: weights per tensor, activations dynamic per token.
    pub const O1: Recipe = Recipe {
        weights: WeightGranularity::Tensor,
        acts: ActPolicy::Token,
    };
    /// The paper's O2: weights per tensor, activations dynamic per tensor.
    pub const O2: Recipe = Recipe {
        weights: WeightGranularity::Tensor,
        acts: ActPolicy::Tensor,
    };
    /// The paper's O3: weights per tensor, activations static per tensor.
    pub const O3: Recipe = Recipe {
        weights: WeightGranularity::Tensor,
        acts: ActPolicy::Static,
    };
    /// The most accurate W8A8 setting: weights per channel, activations per token.
    pub const CHANNEL_TOKEN: Recipe = Recipe {
        weights: WeightGranularity::Channel,
        acts: ActPolicy::Token,
    };

    /// The activation quantizer of Linear `name`.
    pub fn act_quant(&self, name: &str, stats: Option<&StatsTable>) -> Result<ActQuant> {
        Ok(match self.acts {
            ActPolicy::Token => ActQuant::Token,
            ActPolicy::Tensor => ActQuant::Tensor,
            ActPolicy::Static => {
                let s = stats.and_then(|s| s.get(name)).ok_or_else(|| {
                    SmoothError::Config(format!(
                        "static activation scales need calibration statistics for `{name}`"
                    ))
                })?;
                // An input that was always zero quantizes to zero whatever the scale.
                ActQuant::Static {
                    scale: (s.tensor_absmax() / 127.0).max(f32::MIN_POSITIVE),
                }
            }
        })
    }
}

/// The LM head's representation in a W8A8 model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LmHead {
    /// Full precision, as in the paper.
    #[default]
    Fp32,
    /// INT8 weights per output channel, activations dynamic per token, whatever the recipe of
    /// the decoder layers. A tied embedding that lives in the head then reads its rows
    /// dequantized, so the model holds the table once, in INT8.
    Int8,
}

impl LmHead {
    pub fn name(self) -> &'static str {
        match self {
            LmHead::Fp32 => "fp32",
            LmHead::Int8 => "int8",
        }
    }
}

/// Replace the (FP) LM head with an [`Int8Linear`]: weights per channel, activations per token.
pub fn quantize_lm_head(model: &mut Model, backend: Arc<dyn Int8Gemm>) -> Result<()> {
    let head = &mut model.lm_head;
    let fp = head
        .as_fp()
        .ok_or_else(|| SmoothError::Config(format!("`{}` is already quantized", head.name)))?;
    if fp.input_smoothing().is_some() {
        return Err(SmoothError::Config(format!(
            "`{}` divides its input at run time; it cannot be quantized",
            head.name
        )));
    }
    let int8 = Int8Linear::from_fp(fp, WeightGranularity::Channel, ActQuant::Token, backend)
        .map_err(|e| SmoothError::Config(format!("{}: {e}", head.name)))?;
    head.linear = Box::new(int8);
    Ok(())
}

/// Replace every decoder-layer Linear (not the embeddings' projections, not the LM head, as in
/// the paper) with an [`Int8Linear`] packed for `backend`. `stats` must describe the model as it
/// is now (smoothed statistics for a smoothed model); only static activations read them.
/// Returns the number of Linears quantized.
pub fn quantize_model(
    model: &mut Model,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
    backend: Arc<dyn Int8Gemm>,
) -> Result<usize> {
    quantize_model_with_progress(model, recipe, stats, backend, |_, _| {})
}

/// [`quantize_model`], calling `progress(done, total)` after each Linear (progress bars).
pub fn quantize_model_with_progress(
    model: &mut Model,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
    backend: Arc<dyn Int8Gemm>,
    progress: impl FnMut(usize, usize),
) -> Result<usize> {
    quantize_with(model, recipe, stats, progress, |fp, act| {
        Ok(Box::new(Int8Linear::from_fp(
            fp,
            recipe.weights,
            act,
            backend.clone(),
        )?))
    })
}

/// Like [`quantize_model`] with the f32 fake-quant oracle instead of the INT8 GEMM (tests).
pub fn fake_quantize_model(
    model: &mut Model,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
) -> Result<usize> {
    quantize_with(
        model,
        recipe,
        stats,
        |_, _| {},
        |fp, act| Ok(Box::new(FakeQuantLinear::from_fp(fp, recipe.weights, act)?)),
    )
}

fn quantize_with(
    model: &mut Model,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
    mut progress: impl FnMut(usize, usize),
    make: impl Fn(&FpLinear, ActQuant) -> Result<Box<dyn sq_model::Linear>>,
) -> Result<usize> {
    let total: usize = model.layers.iter().map(|b| b.linears().len()).sum();
    let mut count = 0;
    for block in &mut model.layers {
        for linear in block.linears_mut() {
            let act = recipe.act_quant(&linear.name, stats)?;
            let fp = linear.as_fp().ok_or_else(|| {
                SmoothError::Config(format!("`{}` is already quantized", linear.name))
            })?;
            let _span = tracing::trace_span!("quantize_linear", name = %linear.name).entered();
            linear.linear = make(fp, act).map_err(|e| match e {
                SmoothError::Model(m) => SmoothError::Config(format!("{}: {m}", linear.name)),
                other => other,
            })?;
            count += 1;
            progress(count, total);
        }
    }
    Ok(count)
}

//! W8A8 Linears: INT8 weights packed once for the selected sq-kernels backend, activations
//! quantized per call (dynamic per token, dynamic per tensor, or static), one INT8 GEMM with
//! the dequantize epilogue fused. [`FakeQuantLinear`] computes the same thing in f32 and is the
//! test oracle.

use crate::linear::{check_forward_shapes, check_input_smoothing, FpLinear, Linear, NamedLinear};
use crate::{ModelError, Result};
use sq_kernels::{ActScales, Int8Gemm, PackedInt8, WeightScales};
use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

/// Weight scale granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightGranularity {
    /// One scale per output channel.
    Channel,
    /// One scale for the whole weight.
    Tensor,
}

/// How a Linear's input is quantized.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ActQuant {
    /// Dynamic, one scale per token (row).
    Token,
    /// Dynamic, one scale for the whole input.
    Tensor,
    /// Static per tensor: `scale = calibrated max|x| / 127`.
    Static { scale: f32 },
}

impl ActQuant {
    pub fn name(&self) -> &'static str {
        match self {
            ActQuant::Token => "token",
            ActQuant::Tensor => "tensor",
            ActQuant::Static { .. } => "static",
        }
    }
}

thread_local! {
    // Quantized activations and their scales: grown once, then reused (no per-token allocation).
    static ACT_SCRATCH: RefCell<(Vec<i8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Quantize `x` (`[m, k]`) with `act` into `q`/`scales`, multiplying its columns by
/// `smoothing` (run-time smoothing, fused into the quantize pass) when given; returns the
/// activation scales view.
fn quantize_input<'a>(
    act: ActQuant,
    x: &[f32],
    m: usize,
    k: usize,
    smoothing: Option<&[f32]>,
    q: &mut [i8],
    scales: &'a mut [f32],
) -> Result<ActScales<'a>> {
    use sq_kernels as sk;
    Ok(match (act, smoothing) {
        (ActQuant::Token, None) => {
            sk::quantize_per_token(x, m, k, q, &mut scales[..m])?;
            ActScales::PerToken(&scales[..m])
        }
        (ActQuant::Token, Some(f)) => {
            sk::quantize_per_token_smoothed(x, m, k, f, q, &mut scales[..m])?;
            ActScales::PerToken(&scales[..m])
        }
        (ActQuant::Tensor, None) => ActScales::PerTensor(sk::quantize_per_tensor(x, q)?),
        (ActQuant::Tensor, Some(f)) => {
            ActScales::PerTensor(sk::quantize_per_tensor_smoothed(x, m, k, f, q)?)
        }
        (ActQuant::Static { scale }, None) => {
            sk::quantize_static(x, scale, q)?;
            ActScales::PerTensor(scale)
        }
        (ActQuant::Static { scale }, Some(f)) => {
            sk::quantize_static_smoothed(x, m, k, f, scale, q)?;
            ActScales::PerTensor(scale)
        }
    })
}

/// Symmetric INT8 quantization of an FP weight: `(w_q, scales)`.
pub fn quantize_weight(
    fp: &FpLinear,
    granularity: WeightGranularity,
) -> Result<(Vec<i8>, WeightScales)> {
    match granularity {
        // Per channel from the packed weights, a block of rows at a time (no whole copy).
        WeightGranularity::Channel => {
            let (q, s) = sq_kernels::quantize_packed_weights_per_channel(fp.packed())?;
            Ok((q, WeightScales::PerChannel(s)))
        }
        WeightGranularity::Tensor => quantize_weight_values(
            &fp.weight(),
            fp.out_features(),
            fp.in_features(),
            granularity,
        ),
    }
}

/// Symmetric INT8 quantization of `w` (`[n, k]` row-major): `(w_q, scales)`.
pub fn quantize_weight_values(
    w: &[f32],
    n: usize,
    k: usize,
    granularity: WeightGranularity,
) -> Result<(Vec<i8>, WeightScales)> {
    Ok(match granularity {
        WeightGranularity::Channel => {
            let (q, s) = sq_kernels::quantize_weights_per_channel(w, n, k)?;
            (q, WeightScales::PerChannel(s))
        }
        WeightGranularity::Tensor => {
            let (q, s) = sq_kernels::quantize_weights_per_tensor(w, n, k)?;
            (q, WeightScales::PerTensor(s))
        }
    })
}

/// The static per-tensor activation scale for a calibrated range `max|x|` (an input that was
/// always zero quantizes to zero whatever the scale, so the scale only has to be positive).
pub fn static_scale(absmax: f32) -> f32 {
    (absmax / 127.0).max(f32::MIN_POSITIVE)
}

/// `w` quantized to INT8 and back to f32, as the INT8 path sees it (oracle and alpha search).
pub fn fake_quantize_weight(
    w: &[f32],
    n: usize,
    k: usize,
    granularity: WeightGranularity,
) -> Result<Vec<f32>> {
    let (q, scales) = quantize_weight_values(w, n, k, granularity)?;
    Ok(q.iter()
        .enumerate()
        .map(|(i, &v)| {
            v as f32
                * match &scales {
                    WeightScales::PerChannel(s) => s[i / k.max(1)],
                    WeightScales::PerTensor(s) => *s,
                }
        })
        .collect())
}

/// `x` (`[m, k]`) quantized with `act` and back to f32, as the INT8 path sees it.
pub fn fake_quantize_input(act: ActQuant, x: &[f32], m: usize, k: usize) -> Result<Vec<f32>> {
    let mut q = vec![0i8; x.len()];
    let mut scales = vec![0.0f32; m.max(1)];
    let xs = quantize_input(act, x, m, k, None, &mut q, &mut scales)?;
    Ok(q.iter()
        .enumerate()
        .map(|(i, &v)| {
            v as f32
                * match xs {
                    ActScales::PerToken(s) => s[i / k.max(1)],
                    ActScales::PerTensor(s) => s,
                }
        })
        .collect())
}

/// A W8A8 Linear running on an INT8 GEMM backend.
pub struct Int8Linear {
    in_features: usize,
    out_features: usize,
    packed: PackedInt8,
    backend: Arc<dyn Int8Gemm>,
    act: ActQuant,
    weights: WeightGranularity,
    /// Run-time smoothing factors (`1 / s`), applied inside the activation quantize pass.
    input_smoothing: Option<Vec<f32>>,
}

impl fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Int8Linear([{} x {}], weights per {:?}, acts {:?}, {})",
            self.out_features,
            self.in_features,
            self.weights,
            self.act,
            self.backend.name()
        )
    }
}

impl Int8Linear {
    /// Quantize `fp`'s weights and pack them once for `backend`.
    pub fn from_fp(
        fp: &FpLinear,
        weights: WeightGranularity,
        act: ActQuant,
        backend: Arc<dyn Int8Gemm>,
    ) -> Result<Self> {
        let (q, scales) = quantize_weight(fp, weights)?;
        let linear = Self::from_quantized(
            &q,
            scales,
            fp.bias(),
            fp.out_features(),
            fp.in_features(),
            weights,
            act,
            backend,
        )?;
        match fp.input_smoothing() {
            Some(f) => linear.with_input_smoothing(f.to_vec()),
            None => Ok(linear),
        }
    }

    /// Pack already-quantized weights (a checkpoint written by `quantize`).
    #[allow(clippy::too_many_arguments)]
    pub fn from_quantized(
        w_q: &[i8],
        scales: WeightScales,
        bias: Option<&[f32]>,
        out_features: usize,
        in_features: usize,
        weights: WeightGranularity,
        act: ActQuant,
        backend: Arc<dyn Int8Gemm>,
    ) -> Result<Self> {
        if let ActQuant::Static { scale } = act {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(ModelError::Invalid(format!(
                    "static activation scale {scale} must be a positive number"
                )));
            }
        }
        let packed = backend.pack_weights(w_q, out_features, in_features, scales, bias)?;
        Ok(Int8Linear {
            in_features,
            out_features,
            packed,
            backend,
            act,
            weights,
            input_smoothing: None,
        })
    }

    /// Multiply the input's columns by `factors` (`1 / s`) inside the activation quantize pass:
    /// SmoothQuant's run-time divide where no exact fold exists.
    pub fn with_input_smoothing(mut self, factors: Vec<f32>) -> Result<Self> {
        check_input_smoothing(&factors, self.in_features)?;
        self.input_smoothing = Some(factors);
        Ok(self)
    }
    pub fn input_smoothing(&self) -> Option<&[f32]> {
        self.input_smoothing.as_deref()
    }

    pub fn act_quant(&self) -> ActQuant {
        self.act
    }
    pub fn weight_granularity(&self) -> WeightGranularity {
        self.weights
    }
    pub fn packed(&self) -> &PackedInt8 {
        &self.packed
    }
}

impl Linear for Int8Linear {
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        check_forward_shapes(self, x, m, y)?;
        ACT_SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (q, scales) = &mut *s;
            if q.len() < x.len() {
                q.resize(x.len(), 0);
            }
            if scales.len() < m {
                scales.resize(m, 0.0);
            }
            let q = &mut q[..x.len()];
            let x_scales = quantize_input(
                self.act,
                x,
                m,
                self.in_features,
                self.input_smoothing.as_deref(),
                q,
                scales,
            )?;
            self.backend.gemm_f32_out(q, m, x_scales, &self.packed, y)?;
            Ok(())
        })
    }
    fn weight_bytes(&self) -> usize {
        self.packed.weight_bytes() + 4 * self.input_smoothing.as_ref().map_or(0, Vec::len)
    }
    fn weight_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if self.input_smoothing.is_some() {
            return Err(ModelError::Invalid(
                "an INT8 Linear with run-time input smoothing cannot serve as an embedding table"
                    .into(),
            ));
        }
        Ok(self.packed.dequantize_row_into(row, out)?)
    }
    fn kind(&self) -> String {
        format!(
            "w8a8 (weights per {}, acts {})",
            match self.weights {
                WeightGranularity::Channel => "channel",
                WeightGranularity::Tensor => "tensor",
            },
            self.act.name()
        )
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Run Linears that read the same input `x` (`[m, k]`): W8A8 ones that quantize it the same
/// way (same policy, no run-time smoothing, no observer) share one quantize pass (q/k/v,
/// gate/up); otherwise each runs its own forward. Results are identical either way.
pub fn forward_same_input(
    linears: &[&NamedLinear],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let int8: Option<Vec<&Int8Linear>> = linears
        .iter()
        .map(|l| {
            l.observer
                .is_none()
                .then(|| l.linear.as_any().downcast_ref::<Int8Linear>())
                .flatten()
                .filter(|q| q.input_smoothing.is_none())
        })
        .collect();
    let shared = match &int8 {
        Some(v) if v.len() > 1 => v.iter().all(|q| {
            q.act == v[0].act
                && q.in_features == v[0].in_features
                && q.backend.name() == v[0].backend.name()
        }),
        _ => false,
    };
    if !shared || linears.len() != outs.len() {
        for (l, y) in linears.iter().zip(outs.iter_mut()) {
            l.forward(x, m, y)?;
        }
        return Ok(());
    }
    let int8 = int8.expect("checked above");
    let name_err = |name: &str, e: ModelError| match e {
        ModelError::Invalid(msg) => ModelError::Invalid(format!("{name}: {msg}")),
        other => other,
    };
    for ((l, q), y) in linears.iter().zip(&int8).zip(outs.iter()) {
        check_forward_shapes(*q, x, m, y).map_err(|e| name_err(&l.name, e))?;
    }
    let first = int8[0];
    ACT_SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (q, scales) = &mut *s;
        if q.len() < x.len() {
            q.resize(x.len(), 0);
        }
        if scales.len() < m {
            scales.resize(m, 0.0);
        }
        let q = &mut q[..x.len()];
        let x_scales = quantize_input(first.act, x, m, first.in_features, None, q, scales)?;
        for ((l, lin), y) in linears.iter().zip(&int8).zip(outs.iter_mut()) {
            lin.backend
                .gemm_f32_out(q, m, x_scales, &lin.packed, y)
                .map_err(|e| name_err(&l.name, e.into()))?;
        }
        Ok(())
    })
}

/// The same W8A8 computation in f32 (dequantized weights, quantize-dequantize of the input):
/// the oracle the INT8 path is tested against. Not for production use.
#[derive(Debug)]
pub struct FakeQuantLinear {
    dequantized: FpLinear,
    act: ActQuant,
    /// Run-time smoothing: divide (multiply by `1 / s`) first, then quantize.
    input_smoothing: Option<Vec<f32>>,
}

impl FakeQuantLinear {
    pub fn from_fp(fp: &FpLinear, weights: WeightGranularity, act: ActQuant) -> Result<Self> {
        let (n, k) = (fp.out_features(), fp.in_features());
        let w = fake_quantize_weight(&fp.weight(), n, k, weights)?;
        Ok(FakeQuantLinear {
            dequantized: FpLinear::new(w, n, k, fp.bias().map(<[f32]>::to_vec))?,
            act,
            input_smoothing: fp.input_smoothing().map(<[f32]>::to_vec),
        })
    }
}

impl Linear for FakeQuantLinear {
    fn in_features(&self) -> usize {
        self.dequantized.in_features()
    }
    fn out_features(&self) -> usize {
        self.dequantized.out_features()
    }
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        check_forward_shapes(self, x, m, y)?;
        let k = self.in_features();
        let xd = match &self.input_smoothing {
            Some(f) => {
                let divided: Vec<f32> = x
                    .chunks_exact(k.max(1))
                    .flat_map(|row| row.iter().zip(f).map(|(v, s)| v * s))
                    .collect();
                fake_quantize_input(self.act, &divided, m, k)?
            }
            None => fake_quantize_input(self.act, x, m, k)?,
        };
        self.dequantized.forward(&xd, m, y)
    }
    fn weight_bytes(&self) -> usize {
        self.dequantized.weight_bytes()
    }
    fn kind(&self) -> String {
        format!("fake-quant (acts {})", self.act.name())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

//! W8A8 Linears: INT8 weights packed once for the selected sq-kernels backend, activations
//! quantized per call (dynamic per token, dynamic per tensor, or static), one INT8 GEMM with
//! the dequantize epilogue fused. [`FakeQuantLinear`] computes the same thing in f32 and is the
//! test oracle.

use crate::layers::Norm;
use crate::linear::{check_forward_shapes, check_input_smoothing, FpLinear, Linear, NamedLinear};
use crate::{ModelError, Result};
use rayon::prelude::*;
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
        crate::scratch::with_scratch(&ACT_SCRATCH, |s| {
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

/// `l` as a W8A8 Linear that can take a shared quantized input (no observer, no run-time
/// smoothing).
fn plain_int8(l: &NamedLinear) -> Option<&Int8Linear> {
    if l.observer.is_some() {
        return None;
    }
    l.linear
        .as_any()
        .downcast_ref::<Int8Linear>()
        .filter(|q| q.input_smoothing.is_none())
}

/// The first of `linears` when every one is a W8A8 Linear that can share one quantized input
/// with it (same policy, width and backend; [`plain_int8`]). Allocates nothing.
fn shared_int8<'a>(linears: &[&'a NamedLinear]) -> Option<&'a Int8Linear> {
    let first = plain_int8(linears.first()?)?;
    linears
        .iter()
        .all(|l| {
            plain_int8(l).is_some_and(|q| {
                q.act == first.act
                    && q.in_features == first.in_features
                    && q.backend.name() == first.backend.name()
            })
        })
        .then_some(first)
}

fn name_err(name: &str, e: ModelError) -> ModelError {
    match e {
        ModelError::Invalid(msg) => ModelError::Invalid(format!("{name}: {msg}")),
        other => other,
    }
}

/// The shared activation scratch, grown to `[m, k]` codes and `m` scales.
fn with_act_scratch<R>(
    len: usize,
    m: usize,
    f: impl FnOnce(&mut [i8], &mut [f32]) -> Result<R>,
) -> Result<R> {
    crate::scratch::with_scratch(&ACT_SCRATCH, |s| {
        let (q, scales) = &mut *s;
        if q.len() < len {
            q.resize(len, 0);
        }
        if scales.len() < m.max(1) {
            scales.resize(m.max(1), 0.0);
        }
        f(&mut q[..len], scales)
    })
}

/// Run each of `linears` (checked by [`shared_int8`]) on the quantized input `q` into `outs`.
fn gemms(
    linears: &[&NamedLinear],
    q: &[i8],
    m: usize,
    x_scales: ActScales<'_>,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    for (l, y) in linears.iter().zip(outs.iter_mut()) {
        let lin = plain_int8(l).ok_or_else(|| {
            ModelError::Invalid(format!("{}: not a W8A8 Linear with a plain input", l.name))
        })?;
        lin.backend
            .gemm_f32_out(q, m, x_scales, &lin.packed, y)
            .map_err(|e| name_err(&l.name, e.into()))?;
    }
    Ok(())
}

/// Check `outs` against `linears` for the input `x` of `m` rows, naming the Linear.
fn check_outputs(linears: &[&NamedLinear], x: &[f32], m: usize, outs: &[&mut [f32]]) -> Result<()> {
    for (l, y) in linears.iter().zip(outs.iter()) {
        check_forward_shapes(l.linear.as_ref(), x, m, y).map_err(|e| name_err(&l.name, e))?;
    }
    Ok(())
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
    let first = shared_int8(linears).filter(|_| linears.len() > 1 && linears.len() == outs.len());
    let Some(first) = first else {
        for (l, y) in linears.iter().zip(outs.iter_mut()) {
            l.forward(x, m, y)?;
        }
        return Ok(());
    };
    check_outputs(linears, x, m, outs)?;
    with_act_scratch(x.len(), m, |q, scales| {
        let x_scales = quantize_input(first.act, x, m, first.in_features, None, q, scales)?;
        gemms(linears, q, m, x_scales, outs)
    })
}

thread_local! {
    // One normalized row of the fused norm + quantize pass (stays in L1; grown once).
    static NORM_ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    // One row of `act(gate) * up` of the fused gated-MLP quantize pass (stays in L1).
    static GATED_ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows below which the fused norm + quantize pass runs on the calling thread.
const NORM_PARALLEL_ROWS: usize = 8;

/// One row of [`each_normed_row`]: input, kept norm output, codes and scale slot.
type NormedRow<'r> = ((&'r [f32], &'r mut [f32]), (&'r mut [i8], &'r mut f32));

/// For each row of `x` (`[m, k]`): normalize it (into its row of `normed` when given, else into
/// a thread-local row) and hand the normalized row to `f` with its row of `q` and `aux[row]`.
fn each_normed_row<F>(
    norm: &Norm,
    x: &[f32],
    k: usize,
    normed: Option<&mut [f32]>,
    q: &mut [i8],
    aux: &mut [f32],
    f: F,
) -> Result<()>
where
    F: Fn(&[f32], &mut [i8], &mut f32) -> Result<()> + Sync,
{
    let m = aux.len();
    match normed {
        Some(normed) => {
            let row = |((xr, nr), (qr, a)): NormedRow<'_>| {
                norm.forward_row(xr, nr);
                f(nr, qr, a)
            };
            let rows = x.par_chunks(k).zip(normed.par_chunks_mut(k));
            let rest = q.par_chunks_mut(k).zip(aux.par_iter_mut());
            if m >= NORM_PARALLEL_ROWS {
                rows.zip(rest)
                    .with_min_len(NORM_PARALLEL_ROWS)
                    .try_for_each(row)
            } else {
                x.chunks(k)
                    .zip(normed.chunks_mut(k))
                    .zip(q.chunks_mut(k).zip(aux.iter_mut()))
                    .try_for_each(row)
            }
        }
        None => {
            let row = |(xr, (qr, a)): (&[f32], (&mut [i8], &mut f32))| {
                crate::scratch::with_scratch(&NORM_ROW, |buf| {
                    if buf.len() < k {
                        buf.resize(k, 0.0);
                    }
                    let nr = &mut buf[..k];
                    norm.forward_row(xr, nr);
                    f(nr, qr, a)
                })
            };
            if m >= NORM_PARALLEL_ROWS {
                x.par_chunks(k)
                    .zip(q.par_chunks_mut(k).zip(aux.par_iter_mut()))
                    .with_min_len(NORM_PARALLEL_ROWS)
                    .try_for_each(row)
            } else {
                x.chunks(k)
                    .zip(q.chunks_mut(k).zip(aux.iter_mut()))
                    .try_for_each(row)
            }
        }
    }
}

/// `norm` (`[m, k]` rows of `x`) followed by its quantization with `act`, fused: each row is
/// normalized and quantized while it is in L1, so the f32 norm output is written only when
/// `normed` asks for it (BLOOM's residual from the norm output). The codes and scales equal
/// [`Norm::forward`] followed by [`quantize_input`] exactly. Dynamic per-tensor runs two passes
/// (row magnitudes, then codes with the tensor's scale), recomputing the rows unless `normed`
/// holds them.
#[allow(clippy::too_many_arguments)]
fn norm_quantize<'a>(
    norm: &Norm,
    act: ActQuant,
    x: &[f32],
    m: usize,
    k: usize,
    mut normed: Option<&mut [f32]>,
    q: &mut [i8],
    scales: &'a mut [f32],
) -> Result<ActScales<'a>> {
    use sq_kernels as sk;
    let scales = &mut scales[..m];
    if k == 0 || m == 0 {
        return quantize_input(act, x, m, k, None, q, scales);
    }
    match act {
        ActQuant::Token => {
            each_normed_row(norm, x, k, normed, q, scales, |nr, qr, s| {
                Ok(sk::quantize_per_token(
                    nr,
                    1,
                    k,
                    qr,
                    std::slice::from_mut(s),
                )?)
            })?;
            Ok(ActScales::PerToken(scales))
        }
        ActQuant::Static { scale } => {
            each_normed_row(norm, x, k, normed, q, scales, |nr, qr, _| {
                Ok(sk::quantize_static(nr, scale, qr)?)
            })?;
            Ok(ActScales::PerTensor(scale))
        }
        ActQuant::Tensor => {
            // Pass 1: each row's largest magnitude (rows kept in `normed` when asked for).
            each_normed_row(norm, x, k, normed.as_deref_mut(), q, scales, |nr, _, s| {
                *s = sk::absmax(nr);
                Ok(())
            })?;
            let absmax = scales.iter().copied().fold(0.0f32, f32::max);
            // Pass 2: the codes with the tensor's scale.
            let scale = match normed {
                Some(normed) => sk::quantize_with_absmax(normed, absmax, q)?,
                None => {
                    each_normed_row(norm, x, k, None, q, scales, |nr, qr, _| {
                        sk::quantize_with_absmax(nr, absmax, qr)?;
                        Ok(())
                    })?;
                    sk::quantize::scale_for_absmax(absmax).0
                }
            };
            Ok(ActScales::PerTensor(scale))
        }
    }
}

/// `norm` over `x` (`[m, k]`, the residual stream, left untouched) feeding `linears` (q/k/v,
/// gate/up, fc1, BLOOM's query_key_value), which write `outs`. When they are W8A8 Linears
/// sharing one input quantization ([`forward_same_input`]'s conditions), the norm writes INT8
/// codes and scales directly (one fused pass, [`norm_quantize`]) and the f32 norm output goes to
/// `normed` only when `keep_normed`; otherwise the norm writes `normed` and the Linears read it.
/// Results are identical either way.
#[allow(clippy::too_many_arguments)]
pub fn forward_normed(
    norm: &Norm,
    linears: &[&NamedLinear],
    x: &[f32],
    m: usize,
    normed: &mut [f32],
    keep_normed: bool,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let k = norm.weight.len();
    if m.checked_mul(k) != Some(x.len()) || normed.len() != x.len() {
        return Err(ModelError::Invalid(format!(
            "{}: input of {} values and output of {} values are not {m} rows of {k} channels",
            norm.name,
            x.len(),
            normed.len()
        )));
    }
    let first = shared_int8(linears).filter(|q| q.in_features == k && linears.len() == outs.len());
    let Some(first) = first else {
        norm.forward(x, normed);
        return forward_same_input(linears, normed, m, outs);
    };
    check_outputs(linears, x, m, outs)?;
    let normed = keep_normed.then_some(normed);
    with_act_scratch(x.len(), m, |q, scales| {
        let x_scales = norm_quantize(norm, first.act, x, m, k, normed, q, scales)?;
        gemms(linears, q, m, x_scales, outs)
    })
}

/// A gated MLP's down projection of `act(gate) * up` (`[m, k]` each; `gate` may be overwritten),
/// into `out`. When `down` is a plain W8A8 Linear quantizing per token or statically, each row
/// is activated, multiplied and quantized while it is in L1 (the f32 product is never written);
/// otherwise the passes run one after the other. Results are identical either way.
pub fn forward_gated(
    act: crate::config::Activation,
    down: &NamedLinear,
    gate: &mut [f32],
    up: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<()> {
    use sq_kernels as sk;
    let k = down.linear.in_features();
    if m.checked_mul(k) != Some(gate.len()) || up.len() != gate.len() {
        return Err(ModelError::Invalid(format!(
            "{}: gate of {} values and up of {} values are not {m} rows of {k} channels",
            down.name,
            gate.len(),
            up.len()
        )));
    }
    let fused = plain_int8(down).filter(|d| !matches!(d.act, ActQuant::Tensor));
    let Some(d) = fused else {
        crate::layers::activate(act, gate);
        for (x, y) in gate.iter_mut().zip(up) {
            *x *= y;
        }
        return down.forward(gate, m, out);
    };
    check_forward_shapes(d, gate, m, out).map_err(|e| name_err(&down.name, e))?;
    let gated_row = |(g, u): (&[f32], &[f32]), qr: &mut [i8], s: &mut f32| -> Result<()> {
        crate::scratch::with_scratch(&GATED_ROW, |buf| {
            if buf.len() < k {
                buf.resize(k, 0.0);
            }
            let row = &mut buf[..k];
            if act == crate::config::Activation::Silu {
                sk::math::silu_mul(g, u, row);
            } else {
                row.copy_from_slice(g);
                crate::layers::activate_serial(act, row);
                for (x, y) in row.iter_mut().zip(u) {
                    *x *= y;
                }
            }
            match d.act {
                ActQuant::Static { scale } => sk::quantize_static(row, scale, qr)?,
                _ => sk::quantize_per_token(row, 1, k, qr, std::slice::from_mut(s))?,
            }
            Ok(())
        })
    };
    with_act_scratch(gate.len(), m, |q, scales| {
        let scales = &mut scales[..m];
        if k > 0 {
            let rows = gate.par_chunks(k).zip(up.par_chunks(k));
            rows.zip(q.par_chunks_mut(k).zip(scales.par_iter_mut()))
                .with_min_len(NORM_PARALLEL_ROWS)
                .try_for_each(|(gu, (qr, s))| gated_row(gu, qr, s))?;
        }
        let x_scales = match d.act {
            ActQuant::Static { scale } => ActScales::PerTensor(scale),
            _ => ActScales::PerToken(scales),
        };
        d.backend
            .gemm_f32_out(q, m, x_scales, &d.packed, out)
            .map_err(|e| name_err(&down.name, e.into()))
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

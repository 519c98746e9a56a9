//! The one trait every projection goes through, so that FP, naive W8A8 and SmoothQuant share
//! the same decoder code, and calibration can observe every Linear's input.

use crate::{ModelError, Result};
use std::any::Any;
use std::fmt;

/// `y[m, out] = x[m, in] · Wᵀ + bias`, whatever the weights' representation.
pub trait Linear: Send + Sync + fmt::Debug {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Apply to `m` rows of `x` (row-major `[m, in]`), writing `y` (`[m, out]`).
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()>;
    /// Bytes held for weights, scales and bias (the model-size figure).
    fn weight_bytes(&self) -> usize;
    /// Short description of the representation (`"f32"`, `"w8a8"`, ...).
    fn kind(&self) -> String;
    /// Row `row` of the weights as the GEMM sees them (dequantized), `in_features` values: the
    /// embedding lookup of a tied model whose only copy of the table is the LM head.
    fn weight_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let _ = (row, out);
        Err(ModelError::Invalid(format!(
            "{} Linear [{} x {}] cannot serve as an embedding table",
            self.kind(),
            self.out_features(),
            self.in_features()
        )))
    }
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Check the slice lengths of a `forward` call; every `Linear` calls this first.
pub fn check_forward_shapes(linear: &dyn Linear, x: &[f32], m: usize, y: &[f32]) -> Result<()> {
    let (k, n) = (linear.in_features(), linear.out_features());
    if m.checked_mul(k) != Some(x.len()) || m.checked_mul(n) != Some(y.len()) {
        return Err(ModelError::Invalid(format!(
            "{} Linear [{n} x {k}]: input of {} values and output of {} values do not hold {m} rows",
            linear.kind(),
            x.len(),
            y.len()
        )));
    }
    Ok(())
}

/// A full-precision Linear on the sq-kernels f32 GEMM. The weights (`[out, in]` row-major as in
/// PyTorch) are held only in the GEMM's packed panel layout, packed once at load; [`FpLinear::weight`]
/// unpacks a copy for smoothing and quantization.
#[derive(Clone)]
pub struct FpLinear {
    in_features: usize,
    out_features: usize,
    packed: sq_kernels::PackedF32,
    bias: Option<Vec<f32>>,
    /// Run-time smoothing: the input's columns are multiplied by these factors (`1 / s`) before
    /// the GEMM, where no exact fold into a preceding layer exists (BLOOM's `dense_4h_to_h`).
    input_smoothing: Option<Vec<f32>>,
}

thread_local! {
    // The smoothed input of FpLinear::forward: grown once, then reused.
    static SMOOTHED_INPUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Check a run-time smoothing vector against a Linear's input width.
pub(crate) fn check_input_smoothing(factors: &[f32], in_features: usize) -> Result<()> {
    if factors.len() != in_features {
        return Err(ModelError::Invalid(format!(
            "input smoothing of {} factors for a Linear with {in_features} input channels",
            factors.len()
        )));
    }
    if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(ModelError::Invalid(format!(
            "input smoothing factor {bad} is not a positive finite number"
        )));
    }
    Ok(())
}

impl fmt::Debug for FpLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FpLinear([{} x {}], bias: {})",
            self.out_features,
            self.in_features,
            self.bias.is_some()
        )
    }
}

impl FpLinear {
    pub fn new(
        weight: Vec<f32>,
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        if out_features.checked_mul(in_features) != Some(weight.len()) {
            return Err(ModelError::Invalid(format!(
                "FpLinear: {} weights do not make [{out_features} x {in_features}]",
                weight.len()
            )));
        }
        Self::from_packed(
            sq_kernels::pack_f32(&weight, out_features, in_features)?,
            bias,
        )
    }

    /// A Linear on weights packed already ([`sq_kernels::pack_f32_rows`]: a layer read
    /// straight from bf16 into the packed layout).
    pub fn from_packed(packed: sq_kernels::PackedF32, bias: Option<Vec<f32>>) -> Result<Self> {
        let (out_features, in_features) = (packed.n(), packed.k());
        if bias.as_ref().is_some_and(|b| b.len() != out_features) {
            return Err(ModelError::Invalid(format!(
                "FpLinear: bias of {} values for {out_features} outputs",
                bias.as_ref().map_or(0, Vec::len)
            )));
        }
        Ok(FpLinear {
            in_features,
            out_features,
            packed,
            bias,
            input_smoothing: None,
        })
    }

    /// The weights in the GEMM's packed layout.
    pub fn packed(&self) -> &sq_kernels::PackedF32 {
        &self.packed
    }

    /// Multiply input channel `j` of the weights by `scales[j]` (smoothing), in the packed
    /// layout: exactly the values of unpacking, scaling each row, and packing again.
    pub fn scale_input_channels(&mut self, scales: &[f32]) -> Result<()> {
        Ok(self.packed.scale_columns(scales)?)
    }

    /// Divide output row `r` of the weights by `divisors[r]` where one is given (a smoothing
    /// fold into a producing Linear), in the packed layout. The bias is left alone.
    pub fn divide_output_rows(&mut self, divisors: &[Option<f32>]) -> Result<()> {
        Ok(self.packed.divide_rows(divisors)?)
    }

    /// `out[j] = max(out[j], max_r |W[r, j]|)`: the weight range per input channel.
    pub fn input_channel_absmax_into(&self, out: &mut [f32]) -> Result<()> {
        Ok(self.packed.column_absmax_into(out)?)
    }

    /// A copy of the weights `[out, in]`, row-major.
    pub fn weight(&self) -> Vec<f32> {
        self.packed.unpack()
    }
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    pub fn bias_mut(&mut self) -> Option<&mut [f32]> {
        self.bias.as_deref_mut()
    }
    /// The run-time smoothing factors (`1 / s` per input channel), if any.
    pub fn input_smoothing(&self) -> Option<&[f32]> {
        self.input_smoothing.as_deref()
    }
    /// Multiply the input's columns by `factors` at run time (composes with an existing one).
    pub fn smooth_input_at_runtime(&mut self, factors: &[f32]) -> Result<()> {
        check_input_smoothing(factors, self.in_features)?;
        match &mut self.input_smoothing {
            Some(f) => f.iter_mut().zip(factors).for_each(|(a, b)| *a *= b),
            None => self.input_smoothing = Some(factors.to_vec()),
        }
        Ok(())
    }
}

impl Linear for FpLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        check_forward_shapes(self, x, m, y)?;
        let Some(factors) = &self.input_smoothing else {
            sq_kernels::f32_gemm(x, m, &self.packed, self.bias.as_deref(), y)?;
            return Ok(());
        };
        crate::scratch::with_scratch(&SMOOTHED_INPUT, |buf| {
            if buf.len() < x.len() {
                buf.resize(x.len(), 0.0);
            }
            let xs = &mut buf[..x.len()];
            for (dst, src) in xs
                .chunks_exact_mut(self.in_features.max(1))
                .zip(x.chunks_exact(self.in_features.max(1)))
            {
                for ((d, s), f) in dst.iter_mut().zip(src).zip(factors) {
                    *d = s * f;
                }
            }
            sq_kernels::f32_gemm(xs, m, &self.packed, self.bias.as_deref(), y)?;
            Ok(())
        })
    }
    fn weight_bytes(&self) -> usize {
        4 * (self.in_features * self.out_features
            + self.bias.as_ref().map_or(0, Vec::len)
            + self.input_smoothing.as_ref().map_or(0, Vec::len))
    }
    fn kind(&self) -> String {
        "f32".into()
    }
    fn weight_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if self.input_smoothing.is_some() {
            return Err(ModelError::Invalid(
                "an f32 Linear with run-time input smoothing cannot serve as an embedding table"
                    .into(),
            ));
        }
        Ok(self.packed.row_into(row, out)?)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Sees every input of the Linears it is attached to (calibration, activation sampling).
pub trait LinearObserver: Send + Sync {
    /// `x` holds `rows` rows of the input of Linear `linear`. An error stops the forward pass.
    fn observe(&self, linear: &str, x: &[f32], rows: usize) -> std::result::Result<(), String>;
}

/// A Linear with its Hugging Face name (`model.layers.0.self_attn.q_proj`).
pub struct NamedLinear {
    pub name: String,
    pub linear: Box<dyn Linear>,
    /// Called with the input before every forward (see [`crate::Model::set_observer`]).
    pub observer: Option<std::sync::Arc<dyn LinearObserver>>,
}

impl fmt::Debug for NamedLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}", self.name, self.linear)
    }
}

impl NamedLinear {
    pub fn new(name: impl Into<String>, linear: impl Linear + 'static) -> Self {
        NamedLinear {
            name: name.into(),
            linear: Box::new(linear),
            observer: None,
        }
    }

    /// Forward with the shape check naming this Linear on error.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        if let Some(observer) = &self.observer {
            observer
                .observe(&self.name, x, m)
                .map_err(|reason| ModelError::Observer {
                    linear: self.name.clone(),
                    reason,
                })?;
        }
        self.linear.forward(x, m, y).map_err(|e| match e {
            ModelError::Invalid(msg) => ModelError::Invalid(format!("{}: {msg}", self.name)),
            other => other,
        })
    }

    /// A copy of a full-precision Linear (without its observer); quantized ones are an error.
    pub fn try_clone(&self) -> Result<NamedLinear> {
        let fp = self.as_fp().ok_or_else(|| {
            ModelError::Invalid(format!(
                "{}: only full-precision Linears can be copied, this one is {}",
                self.name,
                self.linear.kind()
            ))
        })?;
        Ok(NamedLinear::new(self.name.clone(), fp.clone()))
    }

    /// The FP weights, when this Linear is still full precision.
    pub fn as_fp(&self) -> Option<&FpLinear> {
        self.linear.as_any().downcast_ref()
    }
    pub fn as_fp_mut(&mut self) -> Option<&mut FpLinear> {
        self.linear.as_any_mut().downcast_mut()
    }
}

//! INT8 GEMM: the [`Int8Gemm`] trait, its operand types, and the backends.
//!
//! Every backend computes the exact INT32 dot products, then applies the same f32 epilogue
//! ([`dequantize_acc`], [`requantize`]) operation by operation, so all backends return
//! bit-identical results.

/// Implements [`Int8Gemm`] for a panel backend through the shared driver.
macro_rules! impl_panel_backend {
    ($ty:ty) => {
        impl $crate::int8::Int8Gemm for $ty {
            fn name(&self) -> &'static str {
                Self::NAME
            }

            fn layout(&self) -> $crate::int8::PackedLayout {
                $crate::int8::PackedLayout::VnniPanels16
            }

            fn gemm_i32_out(
                &self,
                x_q: &[i8],
                m: usize,
                w: &$crate::int8::PackedInt8,
                out: &mut [i32],
            ) -> $crate::Result<()> {
                let (ptr, len) = (out.as_mut_ptr(), out.len());
                $crate::int8::driver::gemm(
                    self,
                    Self::NAME,
                    "gemm_i32_out",
                    x_q,
                    m,
                    None,
                    w,
                    $crate::int8::driver::OutPtr::I32(ptr),
                    len,
                    None,
                )
            }

            fn gemm_f32_out(
                &self,
                x_q: &[i8],
                m: usize,
                x_scales: $crate::int8::ActScales<'_>,
                w: &$crate::int8::PackedInt8,
                out: &mut [f32],
            ) -> $crate::Result<()> {
                let (ptr, len) = (out.as_mut_ptr(), out.len());
                $crate::int8::driver::gemm(
                    self,
                    Self::NAME,
                    "gemm_f32_out",
                    x_q,
                    m,
                    Some(x_scales),
                    w,
                    $crate::int8::driver::OutPtr::F32(ptr),
                    len,
                    None,
                )
            }

            fn gemm_i8_out(
                &self,
                x_q: &[i8],
                m: usize,
                x_scales: $crate::int8::ActScales<'_>,
                w: &$crate::int8::PackedInt8,
                out_scale: f32,
                out: &mut [i8],
            ) -> $crate::Result<()> {
                let (ptr, len) = (out.as_mut_ptr(), out.len());
                $crate::int8::driver::gemm(
                    self,
                    Self::NAME,
                    "gemm_i8_out",
                    x_q,
                    m,
                    Some(x_scales),
                    w,
                    $crate::int8::driver::OutPtr::I8(ptr),
                    len,
                    Some(out_scale),
                )
            }

            fn bmm(
                &self,
                a: $crate::int8::BatchedI8<'_>,
                b: $crate::int8::BatchedI8<'_>,
                b_transposed: bool,
                out: $crate::int8::BmmOutput<'_>,
            ) -> $crate::Result<()> {
                $crate::int8::driver::bmm(self, a, b, b_transposed, out)
            }
        }
    };
}

mod driver;
mod pack;
mod portable;
mod reference;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::Portable;
pub use reference::Reference;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx512Vnni, AvxVnni};

#[cfg(not(target_arch = "x86_64"))]
mod x86_stub;
#[cfg(not(target_arch = "x86_64"))]
pub use x86_stub::{Avx512Vnni, AvxVnni};

use crate::error::{check_len, check_scale, checked_mul, KernelError, Result};
pub(crate) use driver::panel_block;
pub(crate) use pack::Line64;

/// Largest reduction length accepted: with operands in `[-128, 127]` every INT32 dot product
/// (`|sum| <= 128 * 128 * K`) is exact up to this K.
pub const MAX_K: usize = 131_071;

/// Columns per packed weight panel: one 64-byte line holds 16 columns x 4 consecutive k.
pub const PANEL_COLS: usize = 16;

/// Dequantization scales of the weights.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightScales {
    /// One scale per output channel (row of W), `n` of them.
    PerChannel(Vec<f32>),
    /// One scale for the whole tensor.
    PerTensor(f32),
}

/// Dequantization scales of the activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActScales<'a> {
    /// One scale per row (token), `m` of them.
    PerToken(&'a [f32]),
    /// One scale for the whole tensor.
    PerTensor(f32),
}

/// Memory layout of a [`PackedInt8`]; a backend reads exactly one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedLayout {
    /// The original `[n, k]` row-major i8 weights (the reference backend).
    RowMajor,
    /// Panels of [`PANEL_COLS`] columns; within a panel, one 64-byte line per group of 4 k
    /// holding `w + 128` as u8 for columns 0..16 (4 bytes each). K is zero-padded to a
    /// multiple of 4 and N to a multiple of 16. Read by `avx512vnni`, `avxvnni` and `portable`.
    VnniPanels16,
}

impl PackedLayout {
    /// Short name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            PackedLayout::RowMajor => "row-major",
            PackedLayout::VnniPanels16 => "vnni-panels-16",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum PackedData {
    RowMajor(Vec<i8>),
    Panels(Vec<Line64>),
}

/// Quantized weights `W_q [n, k]` with their scales and bias, packed once (at model load) in
/// the layout of the backend that packed them.
///
/// A backend accepts a `PackedInt8` whose [`layout`](Self::layout) it reads and returns
/// [`KernelError::LayoutMismatch`] otherwise: `avx512vnni`, `avxvnni` and `portable` share
/// [`PackedLayout::VnniPanels16`], `reference` reads [`PackedLayout::RowMajor`].
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    n: usize,
    k: usize,
    packed_by: &'static str,
    data: PackedData,
    scales: WeightScales,
    /// `scales` expanded to one per column, so every epilogue does the same multiplications.
    col_scales: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl PackedInt8 {
    /// Output features (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Name of the backend that packed these weights.
    pub fn packed_by(&self) -> &'static str {
        self.packed_by
    }
    /// Memory layout of the packed data.
    pub fn layout(&self) -> PackedLayout {
        match self.data {
            PackedData::RowMajor(_) => PackedLayout::RowMajor,
            PackedData::Panels(_) => PackedLayout::VnniPanels16,
        }
    }
    /// The weight scales as given to `pack_weights`.
    pub fn scales(&self) -> &WeightScales {
        &self.scales
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// The quantized weights `[n, k]`, row-major, whatever the layout (to hand them to
    /// another backend or device).
    pub fn unpack(&self) -> Vec<i8> {
        match &self.data {
            PackedData::RowMajor(w) => w.clone(),
            PackedData::Panels(lines) => {
                let (n, k) = (self.n, self.k);
                let groups = pack::k_groups(k);
                let mut out = vec![0i8; n * k];
                for (j, row) in out.chunks_mut(k.max(1)).take(n).enumerate() {
                    let panel = &lines[(j / PANEL_COLS) * groups..];
                    let c = j % PANEL_COLS;
                    for (kk, w) in row.iter_mut().enumerate().take(k) {
                        *w = (panel[kk / 4].0[c * 4 + kk % 4] ^ 0x80) as i8;
                    }
                }
                out
            }
        }
    }

    /// Row `r` dequantized (`w_q[r, :] * scale[r]`, `k` values) into `out`: a tied embedding's
    /// lookup reads the INT8 LM head instead of holding an f32 table.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "PackedInt8::dequantize_row_into";
        let (n, k) = (self.n, self.k);
        if r >= n {
            return Err(KernelError::ShapeMismatch {
                op: OP,
                detail: format!("row {r} of a [{n}, {k}] weight"),
            });
        }
        check_len(OP, "out", || format!("[{k}]"), k, out.len())?;
        let scale = self.col_scales[r];
        match &self.data {
            PackedData::RowMajor(w) => {
                for (o, &v) in out.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *o = v as f32 * scale;
                }
            }
            PackedData::Panels(lines) => {
                let panel = &lines[(r / PANEL_COLS) * pack::k_groups(k)..];
                let c = r % PANEL_COLS;
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = ((panel[kk / 4].0[c * 4 + kk % 4] ^ 0x80) as i8) as f32 * scale;
                }
            }
        }
        Ok(())
    }

    /// Bytes of packed weight data (what a GEMM streams from memory).
    pub fn weight_bytes(&self) -> usize {
        match &self.data {
            PackedData::RowMajor(w) => w.len(),
            PackedData::Panels(p) => p.len() * std::mem::size_of::<Line64>(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        op: &'static str,
        packed_by: &'static str,
        w_q: &[i8],
        n: usize,
        k: usize,
        scales: WeightScales,
        bias: Option<&[f32]>,
        layout: PackedLayout,
    ) -> Result<Self> {
        check_k(op, k)?;
        check_len(
            op,
            "w_q",
            || format!("[{n}, {k}]"),
            checked_mul(op, n, k)?,
            w_q.len(),
        )?;
        let col_scales = match &scales {
            WeightScales::PerChannel(s) => {
                check_len(op, "weight scales", || format!("[{n}]"), n, s.len())?;
                for &v in s {
                    check_scale(op, "a weight channel", v)?;
                }
                s.clone()
            }
            WeightScales::PerTensor(s) => {
                check_scale(op, "the weight tensor", *s)?;
                vec![*s; n]
            }
        };
        if let Some(b) = bias {
            check_len(op, "bias", || format!("[{n}]"), n, b.len())?;
        }
        let data = match layout {
            PackedLayout::RowMajor => PackedData::RowMajor(w_q.to_vec()),
            PackedLayout::VnniPanels16 => {
                let mut lines = Vec::new();
                pack::pack_panels(w_q, n, k, k, 1, &mut lines);
                PackedData::Panels(lines)
            }
        };
        Ok(Self {
            n,
            k,
            packed_by,
            data,
            scales,
            col_scales,
            bias: bias.map(<[f32]>::to_vec),
        })
    }

    pub(crate) fn col_scales(&self) -> &[f32] {
        &self.col_scales
    }

    pub(crate) fn row_major(&self) -> Option<&[i8]> {
        match &self.data {
            PackedData::RowMajor(w) => Some(w),
            PackedData::Panels(_) => None,
        }
    }

    pub(crate) fn panels(&self) -> Option<&[Line64]> {
        match &self.data {
            PackedData::Panels(p) => Some(p),
            PackedData::RowMajor(_) => None,
        }
    }

    /// Returns an error unless `backend` (which reads `layout`) can use these weights.
    pub(crate) fn check_layout(
        &self,
        op: &'static str,
        backend: &'static str,
        layout: PackedLayout,
    ) -> Result<()> {
        if self.layout() == layout {
            Ok(())
        } else {
            Err(KernelError::LayoutMismatch {
                op,
                packed_by: self.packed_by,
                layout: self.layout().name(),
                backend,
            })
        }
    }
}

/// A batch of i8 matrices `[batch, rows, cols]` with arbitrary batch and row strides (in
/// elements), e.g. one attention head per batch entry of an interleaved `[seq, heads * d]` tensor.
#[derive(Clone, Copy, Debug)]
pub struct BatchedI8<'a> {
    pub data: &'a [i8],
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
}

impl<'a> BatchedI8<'a> {
    /// A densely packed `[batch, rows, cols]` tensor.
    pub fn contiguous(data: &'a [i8], batch: usize, rows: usize, cols: usize) -> Self {
        Self {
            data,
            batch,
            rows,
            cols,
            batch_stride: rows * cols,
            row_stride: cols,
        }
    }

    /// The shape and strides, without the data.
    pub(crate) fn shape(&self) -> BatchedShape {
        BatchedShape {
            len: self.data.len(),
            batch: self.batch,
            rows: self.rows,
            cols: self.cols,
            batch_stride: self.batch_stride,
            row_stride: self.row_stride,
        }
    }

    pub(crate) fn offset(&self, b: usize, r: usize, c: usize) -> usize {
        b * self.batch_stride + r * self.row_stride + c
    }
}

/// A batched operand's shape and strides with the length of its buffer: what the bmm checks
/// need, whether the data lives on the host or on a GPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchedShape {
    pub len: usize,
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
}

impl BatchedShape {
    /// Index one past the last element addressed, checking the strides cannot overflow.
    fn required_len(&self, op: &'static str) -> Result<usize> {
        if self.batch == 0 || self.rows == 0 || self.cols == 0 {
            return Ok(0);
        }
        let last_b = checked_mul(op, self.batch - 1, self.batch_stride)?;
        let last_r = checked_mul(op, self.rows - 1, self.row_stride)?;
        last_b
            .checked_add(last_r)
            .and_then(|v| v.checked_add(self.cols))
            .ok_or_else(|| KernelError::ShapeMismatch {
                op,
                detail: "strides overflow usize".into(),
            })
    }

    fn validate(&self, op: &'static str, operand: &'static str) -> Result<()> {
        let need = self.required_len(op)?;
        if self.len < need {
            return Err(KernelError::BadLength {
                op,
                operand,
                shape: format!(
                    "[{}, {}, {}] with strides ({}, {})",
                    self.batch, self.rows, self.cols, self.batch_stride, self.row_stride
                ),
                expected: need,
                actual: self.len,
            });
        }
        Ok(())
    }
}

/// Output of [`Int8Gemm::bmm`]: `[batch, m, n]` with strides in elements. Batches and rows may
/// be interleaved (`row_stride >= batch * batch_stride`) or batch-major, but must not overlap.
#[derive(Debug)]
pub enum BmmOutput<'a> {
    /// Raw INT32 dot products.
    I32 {
        data: &'a mut [i32],
        batch_stride: usize,
        row_stride: usize,
    },
    /// `acc as f32 * scale` (e.g. `scale = Δq·Δk / sqrt(d)` for attention scores).
    F32 {
        data: &'a mut [f32],
        batch_stride: usize,
        row_stride: usize,
        scale: f32,
    },
}

impl<'a> BmmOutput<'a> {
    /// Dense `[batch, m, n]` INT32 output.
    pub fn i32(data: &'a mut [i32], m: usize, n: usize) -> Self {
        BmmOutput::I32 {
            data,
            batch_stride: m * n,
            row_stride: n,
        }
    }
    /// Dense `[batch, m, n]` f32 output scaled by `scale`.
    pub fn f32(data: &'a mut [f32], m: usize, n: usize, scale: f32) -> Self {
        BmmOutput::F32 {
            data,
            batch_stride: m * n,
            row_stride: n,
            scale,
        }
    }
    fn strides(&self) -> (usize, usize, usize) {
        match self {
            BmmOutput::I32 {
                data,
                batch_stride,
                row_stride,
            } => (data.len(), *batch_stride, *row_stride),
            BmmOutput::F32 {
                data,
                batch_stride,
                row_stride,
                ..
            } => (data.len(), *batch_stride, *row_stride),
        }
    }
}

/// Validated shape of a batched product `C[b] = A[b] · op(B[b])`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BmmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

pub(crate) fn validate_bmm(
    op: &'static str,
    a: &BatchedI8<'_>,
    b: &BatchedI8<'_>,
    b_transposed: bool,
    out: &BmmOutput<'_>,
) -> Result<BmmShape> {
    let scale = match out {
        BmmOutput::F32 { scale, .. } => Some(*scale),
        BmmOutput::I32 { .. } => None,
    };
    validate_bmm_shapes(
        op,
        &a.shape(),
        &b.shape(),
        b_transposed,
        out.strides(),
        scale,
    )
}

/// [`validate_bmm`] on shapes: `out` is `(len, batch_stride, row_stride)`, `out_scale` the f32
/// output's scale (None for INT32).
pub(crate) fn validate_bmm_shapes(
    op: &'static str,
    a: &BatchedShape,
    b: &BatchedShape,
    b_transposed: bool,
    out: (usize, usize, usize),
    out_scale: Option<f32>,
) -> Result<BmmShape> {
    a.validate(op, "a")?;
    b.validate(op, "b")?;
    let (n, kb) = if b_transposed {
        (b.rows, b.cols)
    } else {
        (b.cols, b.rows)
    };
    if a.batch != b.batch || a.cols != kb {
        return Err(KernelError::ShapeMismatch {
            op,
            detail: format!(
                "a is [{}, {}, {}] but b is [{}, {}, {}] ({}); need equal batch and a.cols == {}",
                a.batch,
                a.rows,
                a.cols,
                b.batch,
                b.rows,
                b.cols,
                if b_transposed {
                    "transposed: [batch, n, k]"
                } else {
                    "[batch, k, n]"
                },
                if b_transposed { "b.cols" } else { "b.rows" }
            ),
        });
    }
    let shape = BmmShape {
        batch: a.batch,
        m: a.rows,
        n,
        k: a.cols,
    };
    check_k(op, shape.k)?;
    if let Some(scale) = out_scale {
        if !scale.is_finite() {
            return Err(KernelError::InvalidScale {
                op,
                what: "the bmm output",
                value: scale,
            });
        }
    }
    let (len, bs, rs) = out;
    let (batch, m) = (shape.batch, shape.m);
    if batch == 0 || m == 0 || n == 0 {
        return Ok(shape);
    }
    // Tiles are written in parallel, so rows of different (batch, row) pairs must not overlap.
    let rows_ok = m == 1 || rs >= n;
    let batch_major = rows_ok && (batch == 1 || bs >= (m - 1).saturating_mul(rs).saturating_add(n));
    let row_major = (batch == 1 || bs >= n)
        && (m == 1 || rs >= (batch - 1).saturating_mul(bs).saturating_add(n));
    if !(batch_major || row_major) {
        return Err(KernelError::ShapeMismatch {
            op,
            detail: format!(
                "output strides (batch {bs}, row {rs}) make rows of the [{batch}, {m}, {n}] output overlap"
            ),
        });
    }
    let need = (batch - 1)
        .checked_mul(bs)
        .and_then(|x| (m - 1).checked_mul(rs).and_then(|y| x.checked_add(y)))
        .and_then(|x| x.checked_add(n))
        .ok_or_else(|| KernelError::ShapeMismatch {
            op,
            detail: "output strides overflow usize".into(),
        })?;
    if len < need {
        return Err(KernelError::BadLength {
            op,
            operand: "out",
            shape: format!("[{batch}, {m}, {n}] with strides ({bs}, {rs})"),
            expected: need,
            actual: len,
        });
    }
    Ok(shape)
}

pub(crate) fn check_k(op: &'static str, k: usize) -> Result<()> {
    if k > MAX_K {
        return Err(KernelError::ShapeMismatch {
            op,
            detail: format!("k = {k} exceeds MAX_K = {MAX_K} (INT32 accumulators could overflow)"),
        });
    }
    Ok(())
}

/// Checks a GEMM call's operands; returns the activation scales as (pointer-able slice, stride).
pub(crate) fn validate_gemm<'s>(
    op: &'static str,
    x_len: usize,
    m: usize,
    w: &PackedInt8,
    x_scales: Option<&ActScales<'s>>,
    out_len: usize,
    scale_storage: &'s mut [f32; 1],
) -> Result<(&'s [f32], usize)> {
    let (n, k) = (w.n, w.k);
    check_len(
        op,
        "x_q",
        || format!("[{m}, {k}]"),
        checked_mul(op, m, k)?,
        x_len,
    )?;
    check_len(
        op,
        "out",
        || format!("[{m}, {n}]"),
        checked_mul(op, m, n)?,
        out_len,
    )?;
    match x_scales {
        None => Ok((&scale_storage[..], 0)),
        Some(ActScales::PerToken(s)) => {
            check_len(op, "x_scales", || format!("[{m}]"), m, s.len())?;
            for &v in s.iter() {
                check_scale(op, "an activation row", v)?;
            }
            Ok((s, 1))
        }
        Some(ActScales::PerTensor(s)) => {
            check_scale(op, "the activation tensor", *s)?;
            scale_storage[0] = *s;
            Ok((&scale_storage[..], 0))
        }
    }
}

pub(crate) fn check_out_scale(op: &'static str, out_scale: f32) -> Result<f32> {
    if !(out_scale.is_finite() && out_scale > 0.0) {
        return Err(KernelError::InvalidScale {
            op,
            what: "the i8 output (must be positive)",
            value: out_scale,
        });
    }
    Ok(1.0 / out_scale)
}

/// The f32 epilogue every backend applies to an exact INT32 dot product, in this order and
/// without fused multiply-add: `((acc as f32) * x_scale) * w_scale + bias`.
#[inline(always)]
pub fn dequantize_acc(acc: i32, x_scale: f32, w_scale: f32, bias: Option<f32>) -> f32 {
    let v = acc as f32 * x_scale * w_scale;
    match bias {
        Some(b) => v + b,
        None => v,
    }
}

/// The O3 output requantization: `y * inv_out_scale`, clamped to `[-127, 127]` (NaN becomes
/// -127), then rounded half to even. `inv_out_scale` is `1.0 / out_scale`.
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp` would keep NaN; max-then-min maps it to -127 like the SIMD code.
pub fn requantize(y: f32, inv_out_scale: f32) -> i8 {
    (y * inv_out_scale).max(-127.0).min(127.0).round_ties_even() as i8
}

/// An INT8 GEMM backend: `Y = X · Wᵀ` with X `[m, k]` i8 row-major, W `[n, k]` i8 (packed) and
/// Y `[m, n]` row-major. Object safe; the model holds an `Arc<dyn Int8Gemm>`.
///
/// Inputs use the full i8 range `[-128, 127]` for both operands; `k <= MAX_K`.
/// Multi-threaded on rayon's current pool.
pub trait Int8Gemm: Send + Sync + std::fmt::Debug {
    /// `reference`, `avx512vnni`, `avxvnni` or `portable`.
    fn name(&self) -> &'static str;

    /// The packed layout this backend produces and reads.
    fn layout(&self) -> PackedLayout;

    /// Packs `w_q` (`[n, k]` row-major) with its scales and optional bias (`[n]`).
    fn pack_weights(
        &self,
        w_q: &[i8],
        n: usize,
        k: usize,
        scales: WeightScales,
        bias: Option<&[f32]>,
    ) -> Result<PackedInt8> {
        PackedInt8::new(
            "pack_weights",
            self.name(),
            w_q,
            n,
            k,
            scales,
            bias,
            self.layout(),
        )
    }

    /// Raw INT32 dot products `out[i][j] = Σ_k x[i][k]·w[j][k]` (scales and bias ignored).
    fn gemm_i32_out(&self, x_q: &[i8], m: usize, w: &PackedInt8, out: &mut [i32]) -> Result<()>;

    /// `out[i][j] = dequantize_acc(Σ_k x·w, Δx[i], Δw[j], bias[j])`.
    fn gemm_f32_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out: &mut [f32],
    ) -> Result<()>;

    /// Like [`gemm_f32_out`](Self::gemm_f32_out), then `requantize` with the static
    /// `out_scale` (> 0): the O3 path that keeps activations in INT8.
    fn gemm_i8_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out_scale: f32,
        out: &mut [i8],
    ) -> Result<()>;

    /// Batched `C[b] = A[b] · op(B[b])` for attention: `op(B) = Bᵀ` when `b_transposed`
    /// (B is `[batch, n, k]`, e.g. Q·Kᵀ), else B is `[batch, k, n]` (e.g. P·V).
    fn bmm(
        &self,
        a: BatchedI8<'_>,
        b: BatchedI8<'_>,
        b_transposed: bool,
        out: BmmOutput<'_>,
    ) -> Result<()>;
}

//! Symmetric INT8 quantization of f32 activations and weights.
//!
//! One definition everywhere ([`scalar`] spells it out; the vector kernels match it bit for bit):
//!
//! - `absmax` = largest `|x|` (NaN elements are ignored);
//! - `scale = absmax / 127` and `inv = 127 / absmax`; a row whose absmax is 0 (or so small that
//!   `127 / absmax` overflows, below ~1.2e-37) gets `scale = 0` and quantizes to all zeros;
//! - `q = round_half_to_even(clamp(x * inv, -127, 127))` ([`crate::requantize`]); NaN
//!   becomes -127. The static path uses `inv = 1 / scale`.
//!
//! Infinite inputs are rejected with an error: they would make every other value of the row 0.

use crate::error::{check_len, check_scale, checked_mul, KernelError, Result};
use rayon::prelude::*;

/// Below this many elements quantization runs on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// `(scale, inv)` for a row or tensor whose largest magnitude is `absmax` (finite, >= 0).
#[inline]
pub fn scale_for_absmax(absmax: f32) -> (f32, f32) {
    let inv = 127.0 / absmax;
    if absmax > 0.0 && inv.is_finite() {
        (absmax / 127.0, inv)
    } else {
        (0.0, 0.0)
    }
}

fn check_finite_absmax(op: &'static str, what: &str, absmax: f32) -> Result<()> {
    if absmax.is_finite() {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            op,
            detail: format!("{what} contains an infinite value, which cannot be quantized"),
        })
    }
}

/// The scalar definitions; the dispatched functions return exactly what these return.
pub mod scalar {
    use crate::int8::requantize;

    /// Largest `|x * factor|` (`factor = 1` without smoothing), ignoring NaN.
    pub fn absmax(x: &[f32], factor: Option<&[f32]>) -> f32 {
        match factor {
            None => x.iter().fold(0.0f32, |m, &v| m.max(v.abs())),
            Some(f) => x
                .iter()
                .zip(f)
                .fold(0.0f32, |m, (&v, &s)| m.max((v * s).abs())),
        }
    }

    /// `q[c] = requantize(x[c] * factor[c], inv)`.
    pub fn quantize_row(x: &[f32], factor: Option<&[f32]>, inv: f32, q: &mut [i8]) {
        match factor {
            None => q
                .iter_mut()
                .zip(x)
                .for_each(|(q, &v)| *q = requantize(v, inv)),
            Some(f) => q
                .iter_mut()
                .zip(x.iter().zip(f))
                .for_each(|(q, (&v, &s))| *q = requantize(v * s, inv)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    #[inline(always)]
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// # Safety
    /// Needs AVX-512 F and BW; `factor`, when given, is as long as `x`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn absmax(x: &[f32], factor: Option<&[f32]>) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let chunks = x.len() / 16;
        let f = factor.map(|f| f.as_ptr());
        let load = |i: usize, mask: __mmask16| {
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            match f {
                Some(f) => _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, f.add(i))),
                None => v,
            }
        };
        for c in 0..chunks {
            // The accumulator second: a NaN lane keeps the accumulator, like f32::max.
            acc = _mm512_max_ps(_mm512_abs_ps(load(c * 16, 0xFFFF)), acc);
        }
        let rest = x.len() - chunks * 16;
        if rest > 0 {
            acc = _mm512_max_ps(_mm512_abs_ps(load(chunks * 16, tail_mask(rest))), acc);
        }
        _mm512_reduce_max_ps(acc)
    }

    /// # Safety
    /// Needs AVX-512 F and BW; `q` and `factor` (when given) are as long as `x`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_row(x: &[f32], factor: Option<&[f32]>, inv: f32, q: &mut [i8]) {
        let inv = _mm512_set1_ps(inv);
        let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
        let f = factor.map(|f| f.as_ptr());
        let qp = q.as_mut_ptr();
        let one = |i: usize, mask: __mmask16| {
            let mut v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            if let Some(f) = f {
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, f.add(i)));
            }
            let v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi);
            let r =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_mask_cvtepi32_storeu_epi8(qp.add(i), mask, r);
        };
        let chunks = x.len() / 16;
        for c in 0..chunks {
            one(c * 16, 0xFFFF);
        }
        let rest = x.len() - chunks * 16;
        if rest > 0 {
            one(chunks * 16, tail_mask(rest));
        }
    }
}

#[derive(Clone, Copy)]
enum Impl {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn best_impl() -> Impl {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return Impl::Avx512;
    }
    Impl::Scalar
}

fn absmax_with(imp: Impl, x: &[f32], factor: Option<&[f32]>) -> f32 {
    match imp {
        Impl::Scalar => scalar::absmax(x, factor),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Impl::Avx512` is only chosen when the CPU has AVX-512 F and BW.
        Impl::Avx512 => unsafe { avx512::absmax(x, factor) },
    }
}

fn quantize_row_with(imp: Impl, x: &[f32], factor: Option<&[f32]>, inv: f32, q: &mut [i8]) {
    match imp {
        Impl::Scalar => scalar::quantize_row(x, factor, inv, q),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; lengths are equal (checked by the public functions).
        Impl::Avx512 => unsafe { avx512::quantize_row(x, factor, inv, q) },
    }
}

/// Per-row quantization shared by the per-token and per-channel entry points.
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    op: &'static str,
    imp: Impl,
    x: &[f32],
    m: usize,
    k: usize,
    factor: Option<&[f32]>,
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<()> {
    let shape = || format!("[{m}, {k}]");
    let len = checked_mul(op, m, k)?;
    check_len(op, "x", shape, len, x.len())?;
    check_len(op, "q", shape, len, q.len())?;
    check_len(op, "scales", || format!("[{m}]"), m, scales.len())?;
    if let Some(f) = factor {
        check_len(op, "inv_smooth", || format!("[{k}]"), k, f.len())?;
    }
    if k == 0 {
        scales.fill(0.0);
        return Ok(());
    }
    let row = |(x, (q, scale)): (&[f32], (&mut [i8], &mut f32))| -> Result<()> {
        let absmax = absmax_with(imp, x, factor);
        check_finite_absmax(op, "a row", absmax)?;
        let (s, inv) = scale_for_absmax(absmax);
        *scale = s;
        quantize_row_with(imp, x, factor, inv, q);
        Ok(())
    };
    if len >= PARALLEL_ELEMENTS && m > 1 {
        x.par_chunks(k)
            .zip(q.par_chunks_mut(k).zip(scales.par_iter_mut()))
            .try_for_each(row)
    } else {
        x.chunks(k)
            .zip(q.chunks_mut(k).zip(scales.iter_mut()))
            .try_for_each(row)
    }
}

/// One attention row's probabilities as INT8 codes for an INT8 `P·V`: `row` holds the scores;
/// the softmax is taken in place (`row` is left holding the unnormalized exponentials `e`), each
/// probability is multiplied by its key's `fold` (the value scale, which lies along `P·V`'s
/// reduction axis) and the row is quantized: `codes[j] = round(e[j]·fold[j] · 127 / max)`. The
/// returned scale includes the softmax's `1 / Σe`, so `codes[j] · scale ≈ p[j] · fold[j]`.
/// Computing the codes from `e` rather than from `p` saves a pass (the normalization only
/// rescales the row, and per-row quantization is scale-invariant).
pub fn quantize_softmax_row(row: &mut [f32], fold: &[f32], codes: &mut [i8]) -> Result<f32> {
    const OP: &str = "quantize_softmax_row";
    let shape = || format!("[{}]", row.len());
    check_len(OP, "fold", shape, row.len(), fold.len())?;
    check_len(OP, "codes", shape, row.len(), codes.len())?;
    if row.is_empty() {
        return Ok(0.0);
    }
    let sum = crate::math::exp_sum_inplace(row);
    let imp = best_impl();
    let absmax = absmax_with(imp, row, Some(fold));
    check_finite_absmax(OP, "the folded probabilities", absmax)?;
    let (scale, inv) = scale_for_absmax(absmax);
    quantize_row_with(imp, row, Some(fold), inv, codes);
    Ok(scale / sum)
}

/// Dynamic per-token quantization of `x [m, k]`: one scale per row into `scales [m]`.
pub fn quantize_per_token(
    x: &[f32],
    m: usize,
    k: usize,
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<()> {
    quantize_rows("quantize_per_token", best_impl(), x, m, k, None, q, scales)
}

/// Per-token quantization of `x · diag(inv_smooth)`: each column is multiplied by its
/// smoothing factor (`inv_smooth [k]`, i.e. `1 / s`) in the same pass.
pub fn quantize_per_token_smoothed(
    x: &[f32],
    m: usize,
    k: usize,
    inv_smooth: &[f32],
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<()> {
    quantize_rows(
        "quantize_per_token_smoothed",
        best_impl(),
        x,
        m,
        k,
        Some(inv_smooth),
        q,
        scales,
    )
}

/// Dynamic per-tensor quantization: one scale for all of `x`, which is returned.
pub fn quantize_per_tensor(x: &[f32], q: &mut [i8]) -> Result<f32> {
    const OP: &str = "quantize_per_tensor";
    check_len(OP, "q", || format!("[{}]", x.len()), x.len(), q.len())?;
    let imp = best_impl();
    let absmax = if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks(PARALLEL_ELEMENTS)
            .map(|c| absmax_with(imp, c, None))
            .reduce(|| 0.0, f32::max)
    } else {
        absmax_with(imp, x, None)
    };
    check_finite_absmax(OP, "the tensor", absmax)?;
    let (scale, inv) = scale_for_absmax(absmax);
    quantize_chunks(imp, x, inv, q);
    Ok(scale)
}

/// Largest `|x|` (NaN ignored): the dispatched reduction the dynamic quantizers use. The
/// largest magnitude of a tensor is the largest of its parts', so a caller producing a tensor
/// piece by piece (a norm fused with its quantizer) can reduce as it goes.
pub fn absmax(x: &[f32]) -> f32 {
    absmax_with(best_impl(), x, None)
}

/// Dynamic per-tensor quantization of `x`, one part of a tensor whose largest magnitude (over
/// every part, [`absmax`]) is `absmax`: the same codes [`quantize_per_tensor`] gives these
/// elements when run on the whole tensor. Returns the tensor's scale.
pub fn quantize_with_absmax(x: &[f32], absmax: f32, q: &mut [i8]) -> Result<f32> {
    const OP: &str = "quantize_with_absmax";
    check_len(OP, "q", || format!("[{}]", x.len()), x.len(), q.len())?;
    check_finite_absmax(OP, "the tensor", absmax)?;
    if absmax < 0.0 {
        return Err(KernelError::InvalidScale {
            op: OP,
            what: "the tensor's largest magnitude (must not be negative)",
            value: absmax,
        });
    }
    let (scale, inv) = scale_for_absmax(absmax);
    quantize_row_with(best_impl(), x, None, inv, q);
    Ok(scale)
}

/// Dynamic per-tensor quantization of `x [m, k] · diag(inv_smooth)` (a run-time smoothing
/// divide, `inv_smooth = 1 / s`) in one pass over the rows; returns the tensor's scale. Equals
/// multiplying the columns first and then [`quantize_per_tensor`], bit for bit.
pub fn quantize_per_tensor_smoothed(
    x: &[f32],
    m: usize,
    k: usize,
    inv_smooth: &[f32],
    q: &mut [i8],
) -> Result<f32> {
    const OP: &str = "quantize_per_tensor_smoothed";
    check_smoothed_shapes(OP, x, m, k, inv_smooth, q)?;
    let imp = best_impl();
    let absmax = x
        .chunks_exact(k.max(1))
        .map(|row| absmax_with(imp, row, Some(inv_smooth)))
        .fold(0.0f32, f32::max);
    check_finite_absmax(OP, "the tensor", absmax)?;
    let (scale, inv) = scale_for_absmax(absmax);
    quantize_smoothed_rows(imp, x, k, inv_smooth, inv, q);
    Ok(scale)
}

/// Static quantization of `x [m, k] · diag(inv_smooth)` with a calibrated `scale` (> 0), the
/// smoothing multiply fused into the quantize pass.
pub fn quantize_static_smoothed(
    x: &[f32],
    m: usize,
    k: usize,
    inv_smooth: &[f32],
    scale: f32,
    q: &mut [i8],
) -> Result<()> {
    const OP: &str = "quantize_static_smoothed";
    check_smoothed_shapes(OP, x, m, k, inv_smooth, q)?;
    check_scale(OP, "the static activation scale", scale)?;
    if scale == 0.0 {
        return Err(KernelError::InvalidScale {
            op: OP,
            what: "the static activation scale (must be positive)",
            value: scale,
        });
    }
    quantize_smoothed_rows(best_impl(), x, k, inv_smooth, 1.0 / scale, q);
    Ok(())
}

fn check_smoothed_shapes(
    op: &'static str,
    x: &[f32],
    m: usize,
    k: usize,
    inv_smooth: &[f32],
    q: &[i8],
) -> Result<()> {
    let shape = || format!("[{m}, {k}]");
    let len = checked_mul(op, m, k)?;
    check_len(op, "x", shape, len, x.len())?;
    check_len(op, "q", shape, len, q.len())?;
    check_len(op, "inv_smooth", || format!("[{k}]"), k, inv_smooth.len())
}

fn quantize_smoothed_rows(
    imp: Impl,
    x: &[f32],
    k: usize,
    inv_smooth: &[f32],
    inv: f32,
    q: &mut [i8],
) {
    if k == 0 {
        return;
    }
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks(k)
            .zip(q.par_chunks_mut(k))
            .for_each(|(x, q)| quantize_row_with(imp, x, Some(inv_smooth), inv, q));
    } else {
        x.chunks(k)
            .zip(q.chunks_mut(k))
            .for_each(|(x, q)| quantize_row_with(imp, x, Some(inv_smooth), inv, q));
    }
}

/// Static quantization with a calibrated `scale` (> 0): `q = requantize(x, 1 / scale)`.
pub fn quantize_static(x: &[f32], scale: f32, q: &mut [i8]) -> Result<()> {
    const OP: &str = "quantize_static";
    check_len(OP, "q", || format!("[{}]", x.len()), x.len(), q.len())?;
    check_scale(OP, "the static activation scale", scale)?;
    if scale == 0.0 {
        return Err(KernelError::InvalidScale {
            op: OP,
            what: "the static activation scale (must be positive)",
            value: scale,
        });
    }
    quantize_chunks(best_impl(), x, 1.0 / scale, q);
    Ok(())
}

fn quantize_chunks(imp: Impl, x: &[f32], inv: f32, q: &mut [i8]) {
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks(PARALLEL_ELEMENTS / 4)
            .zip(q.par_chunks_mut(PARALLEL_ELEMENTS / 4))
            .for_each(|(x, q)| quantize_row_with(imp, x, None, inv, q));
    } else {
        quantize_row_with(imp, x, None, inv, q);
    }
}

/// Symmetric per-output-channel weight quantization of `w [n, k]`: returns `(w_q, scales [n])`.
pub fn quantize_weights_per_channel(w: &[f32], n: usize, k: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    let mut q = vec![0i8; w.len()];
    let mut scales = vec![0.0f32; n];
    quantize_rows(
        "quantize_weights_per_channel",
        best_impl(),
        w,
        n,
        k,
        None,
        &mut q,
        &mut scales,
    )?;
    Ok((q, scales))
}

/// [`quantize_weights_per_channel`] of packed weights (the same bytes as on the unpacked
/// copy), one block of rows at a time, so no unpacked copy of the whole weight is made.
pub fn quantize_packed_weights_per_channel(w: &crate::PackedF32) -> Result<(Vec<i8>, Vec<f32>)> {
    let (n, k) = (w.n(), w.k());
    let len = checked_mul("quantize_weights_per_channel", n, k)?;
    let mut q = vec![0i8; len];
    let mut scales = vec![0.0f32; n];
    if k == 0 {
        return Ok((q, scales));
    }
    let imp = best_impl();
    // One output item per row: the row's scale, with its INT8 values beside it.
    let mut rows: Vec<(&mut [i8], &mut f32)> = q.chunks_mut(k).zip(scales.iter_mut()).collect();
    w.try_for_each_row_block(&mut rows, 1, |_, x, out| {
        for ((q, scale), x) in out.iter_mut().zip(x.chunks_exact(k)) {
            quantize_rows(
                "quantize_weights_per_channel",
                imp,
                x,
                1,
                k,
                None,
                q,
                std::slice::from_mut(*scale),
            )?;
        }
        Ok::<(), KernelError>(())
    })?;
    Ok((q, scales))
}

/// Symmetric per-tensor weight quantization of `w [n, k]`: returns `(w_q, scale)`.
pub fn quantize_weights_per_tensor(w: &[f32], n: usize, k: usize) -> Result<(Vec<i8>, f32)> {
    const OP: &str = "quantize_weights_per_tensor";
    check_len(
        OP,
        "w",
        || format!("[{n}, {k}]"),
        checked_mul(OP, n, k)?,
        w.len(),
    )?;
    let mut q = vec![0i8; w.len()];
    let scale = quantize_per_tensor(w, &mut q).map_err(|e| match e {
        KernelError::ShapeMismatch { detail, .. } => KernelError::ShapeMismatch { op: OP, detail },
        other => other,
    })?;
    Ok((q, scale))
}

/// Dequantizes `q` with one scale per row of `k` elements (`scales.len()` rows).
pub fn dequantize_per_row(q: &[i8], k: usize, scales: &[f32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "dequantize_per_row";
    let m = scales.len();
    let len = checked_mul(OP, m, k)?;
    check_len(OP, "q", || format!("[{m}, {k}]"), len, q.len())?;
    check_len(OP, "out", || format!("[{m}, {k}]"), len, out.len())?;
    if k == 0 {
        return Ok(());
    }
    for ((q, out), &s) in q.chunks(k).zip(out.chunks_mut(k)).zip(scales) {
        out.iter_mut().zip(q).for_each(|(o, &v)| *o = v as f32 * s);
    }
    Ok(())
}

/// Scalar versions of the dispatched entry points, for tests and as the definition.
#[doc(hidden)]
pub fn quantize_per_token_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    inv_smooth: Option<&[f32]>,
    q: &mut [i8],
    scales: &mut [f32],
) -> Result<()> {
    quantize_rows(
        "quantize_per_token_scalar",
        Impl::Scalar,
        x,
        m,
        k,
        inv_smooth,
        q,
        scales,
    )
}

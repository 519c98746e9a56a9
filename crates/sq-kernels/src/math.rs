//! Elementwise math of the decoder's hot loops (softmax, SiLU): a branch-free `exp` that the
//! compiler vectorizes, where `f32::exp` is a scalar libm call per element.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so `x - k ln2` stays exact for |k| <= 128.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x` within 2 ulp of `f32::exp` for `x` in [-87, 88] (clamped outside, so no infinities);
/// NaN gives NaN. Branch-free, integer work on the float's bits, so loops over slices vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let k = t - ROUND;
    // The rounded integer sits in the low mantissa bits of `t`.
    let ki = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Taylor to degree 7 on |r| <= ln2/2: truncation error below 2^-26 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits((ki.wrapping_add(127) as u32) << 23);
    let y = p * scale;
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn silu_loop(xs: &mut [f32]) {
    for v in xs {
        *v /= 1.0 + exp(-*v);
    }
}

#[inline(always)]
fn silu_mul_loop(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// Lanes of the softmax reductions: independent partial maxima and sums let the compiler keep
/// them in one vector register (a single running f32 sum would serialize the loop).
const LANES: usize = 16;

#[inline(always)]
fn exp_sum_loop(row: &mut [f32]) -> f32 {
    // `if v > m` rather than `f32::max`: one vmaxps a chunk instead of a NaN-handling blend
    // chain (a NaN is skipped either way and turns the row to NaN in the exp pass).
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lane_max.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lane_max.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    let max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // One pass writes each exponential and adds it to its lane's sum.
    let mut lane_sum = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in lane_sum.iter_mut().zip(c) {
            *v = exp(*v - max);
            *a += *v;
        }
    }
    // The tail (attention rows end anywhere) as one padded vector, not a scalar exp each.
    let tail = chunks.into_remainder();
    let mut rest = 0.0f32;
    if !tail.is_empty() {
        let mut pad = [max; LANES];
        pad[..tail.len()].copy_from_slice(tail);
        for v in pad.iter_mut() {
            *v = exp(*v - max);
        }
        for (v, &e) in tail.iter_mut().zip(&pad) {
            *v = e;
            rest += e;
        }
    }
    lane_sum.iter().sum::<f32>() + rest
}

#[inline(always)]
fn softmax_loop(row: &mut [f32]) {
    let inv = 1.0 / exp_sum_loop(row);
    for s in row.iter_mut() {
        *s *= inv;
    }
}

// AVX-512 versions with explicit intrinsics: the same polynomial as [`exp`], but with fused
// multiply-adds (Rust never contracts `a * b + c`), `vscalefps` for the 2^k, masked tails and
// one-instruction horizontal reductions. About half the instructions of the compiled loops.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{LN2_HI, LN2_LO, LOG2E};
    use std::arch::x86_64::*;

    #[inline(always)]
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// `e^x` on 16 lanes, within 2 ulp of `f32::exp` on [-87, 88] (clamped outside); NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        // The input second: vmaxps/vminps return their second operand when one is NaN.
        let xc = _mm512_min_ps(
            _mm512_set1_ps(88.0),
            _mm512_max_ps(_mm512_set1_ps(-87.0), x),
        );
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.0 / 5040.0);
        p = _mm512_fmadd_ps(p, r, c(1.0 / 720.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, c(0.5));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        _mm512_scalef_ps(p, k)
    }

    /// `x / (1 + e^-x)` on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn silu16(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(
            x,
            _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub fn silu(xs: &mut [f32]) {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut i = 0;
        // SAFETY (all pointer accesses below): `i + 16 <= n`, or a mask of the `n - i` lanes left.
        while i + 16 <= n {
            unsafe { _mm512_storeu_ps(p.add(i), silu16(_mm512_loadu_ps(p.add(i)))) };
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), m, silu16(v));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all pointer accesses below): `i + 16 <= n`, or a mask of the `n - i` lanes left.
        while i + 16 <= n {
            unsafe {
                let v = _mm512_mul_ps(silu16(_mm512_loadu_ps(g.add(i))), _mm512_loadu_ps(u.add(i)));
                _mm512_storeu_ps(o.add(i), v);
            }
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            unsafe {
                let v = _mm512_mul_ps(
                    silu16(_mm512_maskz_loadu_ps(m, g.add(i))),
                    _mm512_maskz_loadu_ps(m, u.add(i)),
                );
                _mm512_mask_storeu_ps(o.add(i), m, v);
            }
        }
    }

    /// Each element becomes `e^(x - max)`; returns their sum.
    #[target_feature(enable = "avx512f")]
    pub fn exp_sum(row: &mut [f32]) -> f32 {
        let n = row.len();
        let p = row.as_mut_ptr();
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // Two accumulators: the max pass is one load and one vmaxps per vector.
        let (mut m0, mut m1) = (neg_inf, neg_inf);
        let mut i = 0;
        // SAFETY (all pointer accesses below): in bounds by the loop conditions or the tail mask.
        while i + 32 <= n {
            unsafe {
                m0 = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), m0);
                m1 = _mm512_max_ps(_mm512_loadu_ps(p.add(i + 16)), m1);
            }
            i += 32;
        }
        while i + 16 <= n {
            m0 = _mm512_max_ps(unsafe { _mm512_loadu_ps(p.add(i)) }, m0);
            i += 16;
        }
        if i < n {
            let v = unsafe { _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), p.add(i)) };
            m1 = _mm512_max_ps(v, m1);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            unsafe {
                let e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
                let e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), max));
                _mm512_storeu_ps(p.add(i), e0);
                _mm512_storeu_ps(p.add(i + 16), e1);
                s0 = _mm512_add_ps(s0, e0);
                s1 = _mm512_add_ps(s1, e1);
            }
            i += 32;
        }
        while i + 16 <= n {
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
                _mm512_storeu_ps(p.add(i), e);
                s0 = _mm512_add_ps(s0, e);
            }
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), max));
                _mm512_mask_storeu_ps(p.add(i), m, e);
                s1 = _mm512_mask_add_ps(s1, m, s1, e);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    #[target_feature(enable = "avx512f")]
    pub fn scale(row: &mut [f32], by: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let f = _mm512_set1_ps(by);
        let mut i = 0;
        // SAFETY: `i + 16 <= n`, or a mask of the `n - i` lanes left.
        while i + 16 <= n {
            unsafe { _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), f)) };
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, f));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// SiLU `x / (1 + e^-x)` on every element.
pub fn silu_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { avx512::silu(xs) };
    }
    silu_loop(xs)
}

/// A gated MLP's `SiLU(gate) * up` into `out` (the shortest of the three sets the length): the
/// values of [`silu_inplace`] on `gate` followed by a multiply by `up`, in one pass.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { avx512::silu_mul(gate, up, out) };
    }
    silu_mul_loop(gate, up, out)
}

/// Softmax of `row` in place (the max subtracted first).
pub fn softmax_inplace(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe {
            let inv = 1.0 / avx512::exp_sum(row);
            return avx512::scale(row, inv);
        }
    }
    softmax_loop(row)
}

/// Softmax of `row` in place without the final division: each element becomes `e^(x - max)`,
/// and their sum is returned (attention divides P·V's output rows instead, `head_dim` values a
/// row rather than one per key). [`softmax_inplace`] is this, then a multiply by `1 / sum`.
pub fn exp_sum_inplace(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { avx512::exp_sum(row) };
    }
    exp_sum_loop(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, x.exp() as f64);
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn softmax_sums_to_one_and_matches_std() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.77).sin() * 9.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let denom: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let want: Vec<f32> = row.iter().map(|v| (v - max).exp() / denom).collect();
        softmax_inplace(&mut row);
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn exp_sum_is_softmax_before_its_division() {
        for len in [1, 15, 16, 17, 53] {
            let row: Vec<f32> = (0..len).map(|i| (i as f32 * 0.61).cos() * 7.0).collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want_sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let mut e = row.clone();
            let sum = exp_sum_inplace(&mut e);
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "{sum} vs {want_sum}"
            );
            for (a, &v) in e.iter().zip(&row) {
                let b = ((v - max) as f64).exp();
                assert!((*a as f64 - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
            }
            // softmax_inplace is exactly these exponentials times 1 / sum.
            let mut p = row.clone();
            softmax_inplace(&mut p);
            for (a, b) in p.iter().zip(&e) {
                assert_eq!(*a, b * (1.0 / sum));
            }
        }
    }

    #[test]
    fn silu_mul_is_silu_then_multiply() {
        for len in [1, 15, 16, 17, 61] {
            let gate: Vec<f32> = (0..len).map(|i| (i as f32 * 0.83).sin() * 11.0).collect();
            let up: Vec<f32> = (0..len).map(|i| (i as f32 * 0.29).cos() * 3.0).collect();
            let mut want = gate.clone();
            silu_inplace(&mut want);
            for (w, u) in want.iter_mut().zip(&up) {
                *w *= u;
            }
            let mut got = vec![f32::NAN; len];
            silu_mul(&gate, &up, &mut got);
            assert_eq!(got, want);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_matches_std_within_2_ulp() {
        if !has_avx512() {
            return;
        }
        use std::arch::x86_64::*;
        let mut xs: Vec<f32> = Vec::new();
        let mut x = -90.0f32;
        while x < 90.0 {
            xs.push(x);
            x += 0.0071;
        }
        xs.extend([0.0, -0.0, 88.0, -87.0, 1e-30, -1e-30, f32::NEG_INFINITY]);
        for c in xs.chunks(16) {
            let mut lanes = [0.0f32; 16];
            lanes[..c.len()].copy_from_slice(c);
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512F checked above; both arrays hold 16 lanes.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    avx512::exp16(_mm512_loadu_ps(lanes.as_ptr())),
                )
            };
            for (&g, &v) in got.iter().zip(&lanes) {
                // Same clamp as the scalar `exp`.
                let want = (v.clamp(-87.0, 88.0) as f64).exp();
                assert!(
                    ((g as f64 - want).abs() / want) < 2.5e-7,
                    "exp({v}) = {g}, want {want}"
                );
                assert!(g.is_finite(), "exp({v}) = {g}");
            }
        }
        let mut nan = [f32::NAN; 16];
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(
                nan.as_mut_ptr(),
                avx512::exp16(_mm512_loadu_ps(nan.as_ptr())),
            )
        };
        assert!(nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn vector_and_scalar_loops_agree_on_every_tail_length() {
        // The dispatched (AVX-512 here) kernels against the portable loops, lengths 0..=70.
        for len in 0..=70usize {
            let row: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 13.0).collect();
            let up: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos() * 2.0).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            let (sa, sb) = (exp_sum_inplace(&mut a), exp_sum_loop(&mut b));
            if len > 0 {
                assert!((sa - sb).abs() <= 2e-6 * sb, "len {len}: {sa} vs {sb}");
            }
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 3e-7 * y.max(1e-30),
                    "len {len}: {x} vs {y}"
                );
            }
            let (mut a, mut b) = (row.clone(), row.clone());
            silu_inplace(&mut a);
            silu_loop(&mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                    "len {len}: {x} vs {y}"
                );
            }
            let mut out = vec![f32::NAN; len + 3];
            silu_mul(&row, &up, &mut out);
            for ((o, x), u) in out.iter().zip(&a).zip(&up) {
                assert_eq!(*o, x * u);
            }
            // `out` is longer: its extra elements are left alone.
            assert!(out[len..].iter().all(|v| v.is_nan()));
        }
    }

    #[test]
    fn silu_matches_std() {
        let mut xs: Vec<f32> = (-200..200).map(|i| i as f32 * 0.11).collect();
        let want: Vec<f32> = xs.iter().map(|v| v / (1.0 + (-v).exp())).collect();
        silu_inplace(&mut xs);
        for (a, b) in xs.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-2), "{a} vs {b}");
        }
    }
}

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

// The same loops compiled for AVX-512 (16 lanes instead of SSE's 4), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_avx512(xs: &mut [f32]) {
    silu_loop(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(row: &mut [f32]) {
    softmax_loop(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_loop(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sum_avx512(row: &mut [f32]) -> f32 {
    exp_sum_loop(row)
}

/// SiLU `x / (1 + e^-x)` on every element.
pub fn silu_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { silu_avx512(xs) };
    }
    silu_loop(xs)
}

/// A gated MLP's `SiLU(gate) * up` into `out` (the shortest of the three sets the length): the
/// values of [`silu_inplace`] on `gate` followed by a multiply by `up`, in one pass.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { silu_mul_avx512(gate, up, out) };
    }
    silu_mul_loop(gate, up, out)
}

/// Softmax of `row` in place (the max subtracted first).
pub fn softmax_inplace(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { softmax_avx512(row) };
    }
    softmax_loop(row)
}

/// Softmax of `row` in place without the final division: each element becomes `e^(x - max)`,
/// and their sum is returned (attention divides P·V's output rows instead, `head_dim` values a
/// row rather than one per key). [`softmax_inplace`] is this, then a multiply by `1 / sum`.
pub fn exp_sum_inplace(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { exp_sum_avx512(row) };
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

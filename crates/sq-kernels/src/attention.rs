//! One query row of one head attending over cached keys and values: the decode step's attention
//! (`scores = scale · q Kᵀ (+ ALiBi)`, softmax, `out = P V`). Keys and values are rows of `d`
//! floats `stride` apart (the KV cache's `[position, kv_head, head_dim]` layout, already offset
//! to the head). With AVX-512 and `d` of 32, 64 or 128 the query and the output stay in
//! registers; otherwise (and on other CPUs) the same steps run as lane-blocked loops the compiler
//! vectorizes.

/// Keys and values of one KV head: rows `0..n`, each `d` floats, `stride` apart.
#[derive(Clone, Copy, Debug)]
pub struct HeadKv<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub stride: usize,
    pub n: usize,
}

/// ALiBi for one head: `slope * (first + j)` is added to the score of key row `j`.
#[derive(Clone, Copy, Debug)]
pub struct Alibi {
    pub slope: f32,
    pub first: usize,
}

/// Scores of one query row from INT8 `Q·Kᵀ` accumulators: `out[j] = acc[j] · (q_scale ·
/// key_scales[j])` (+ ALiBi's `slope · (first + j)`), where `key_scales` already include the
/// softmax scale. Vectorized for AVX-512 when the CPU has it.
///
/// # Panics
/// When `acc`, `key_scales` and `out` differ in length.
pub fn scores_from_i32(
    acc: &[i32],
    q_scale: f32,
    key_scales: &[f32],
    alibi: Option<Alibi>,
    out: &mut [f32],
) {
    assert!(acc.len() == out.len() && key_scales.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { scores_from_i32_avx512(acc, q_scale, key_scales, alibi, out) };
    }
    scores_from_i32_loop(acc, q_scale, key_scales, alibi, out)
}

#[inline(always)]
fn scores_from_i32_loop(
    acc: &[i32],
    q_scale: f32,
    key_scales: &[f32],
    alibi: Option<Alibi>,
    out: &mut [f32],
) {
    for ((o, &a), &k) in out.iter_mut().zip(acc).zip(key_scales) {
        *o = a as f32 * (q_scale * k);
    }
    if let Some(Alibi { slope, first }) = alibi {
        for (j, o) in out.iter_mut().enumerate() {
            *o += slope * (first + j) as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_from_i32_avx512(
    acc: &[i32],
    q_scale: f32,
    key_scales: &[f32],
    alibi: Option<Alibi>,
    out: &mut [f32],
) {
    scores_from_i32_loop(acc, q_scale, key_scales, alibi, out)
}

/// INT8 dot products of `q` with `out.len()` rows of `rows`, `stride` apart: `out[j] = Σ_d q[d]
/// · rows[j · stride + d]`, exact in i32 (one query row's `Q·Kᵀ` over an INT8 KV cache, without
/// packing the cache as a GEMM would). With AVX-512 VNNI and rows of up to 256 bytes: 16 keys
/// at a time, `vpdpbusd` with the u8 offset (`q · k = (q + 128) · k - 128 Σ k`), one
/// transposing reduction per 16 keys.
///
/// # Panics
/// When `rows` is shorter than the last row `out` asks for.
pub fn dot_i8_rows(q: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
    if let Some(last) = out.len().checked_sub(1) {
        assert!(
            rows.len() >= last * stride + q.len(),
            "dot_i8_rows: rows too short"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if q.len() <= vnni_rows::MAX_D && vnni_rows::available() {
        // SAFETY: the CPU has AVX-512 F, BW and VNNI; `rows` holds every row (asserted above).
        return unsafe { vnni_rows::dot(q, rows, stride, out) };
    }
    dot_i8_rows_loop(q, rows, stride, out)
}

/// `out[d] = Σ_j w[j] · rows[j · stride + d]` over `w.len()` rows, exact in i32: one row of an
/// INT8 `P·V` over an INT8 KV cache (zero weights, most of a long softmax row, are skipped).
/// With AVX-512 VNNI, non-negative weights (softmax codes are) and rows of up to 256 bytes: four
/// rows interleaved bytewise per `vpdpbusd`, the weights as its u8 side; otherwise a loop.
///
/// # Panics
/// When `rows` is shorter than the last row `w` asks for.
pub fn weighted_sum_i8_rows(w: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
    if let Some(last) = w.len().checked_sub(1) {
        assert!(
            rows.len() >= last * stride + out.len(),
            "weighted_sum_i8_rows: rows too short"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if out.len() <= vnni_rows::MAX_D && vnni_rows::available() && all_nonnegative(w) {
        // SAFETY: the CPU has AVX-512 F, BW and VNNI; `rows` holds every row (asserted above);
        // the weights are non-negative (checked just above).
        return unsafe { vnni_rows::weighted_sum_nonnegative(w, rows, stride, out) };
    }
    weighted_sum_i8_rows_loop(w, rows, stride, out)
}

/// Whether no weight is negative: one OR of every sign bit (no early exit, so it vectorizes).
#[cfg(target_arch = "x86_64")]
fn all_nonnegative(w: &[i8]) -> bool {
    w.iter().fold(0u8, |acc, &v| acc | v as u8) & 0x80 == 0
}

#[inline(always)]
fn dot_i8_rows_loop(q: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
    let d = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let row = &rows[j * stride..][..d];
        // i16 products summed in i32: the shape of `vpmaddwd`.
        *o = q
            .iter()
            .zip(row)
            .map(|(&a, &b)| (a as i16 * b as i16) as i32)
            .sum();
    }
}

#[inline(always)]
fn weighted_sum_i8_rows_loop(w: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
    let d = out.len();
    out.fill(0);
    for (j, &wj) in w.iter().enumerate() {
        if wj == 0 {
            continue;
        }
        let wj = wj as i32;
        for (o, &v) in out.iter_mut().zip(&rows[j * stride..][..d]) {
            *o += wj * v as i32;
        }
    }
}

/// The INT8 row kernels on AVX-512 VNNI (`vpdpbusd`: u8 × i8, four products a lane).
#[cfg(target_arch = "x86_64")]
mod vnni_rows {
    use std::arch::x86_64::*;

    /// Longest row these kernels take (four 64-byte chunks); longer rows use the loops.
    pub const MAX_D: usize = 256;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Byte mask of the first `len` (at most 64) bytes.
    #[inline(always)]
    fn mask64(len: usize) -> __mmask64 {
        if len >= 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        }
    }

    /// The 16 horizontal sums of `v[0..16]` as one vector (lane j = Σ v[j]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum16(v: &[__m512i; 16]) -> __m512i {
        // Within each 128-bit lane: four vectors to one of their four lane sums.
        let four = |a: __m512i, b: __m512i, c: __m512i, d: __m512i| {
            let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd))
        };
        let w0 = four(v[0], v[1], v[2], v[3]);
        let w1 = four(v[4], v[5], v[6], v[7]);
        let w2 = four(v[8], v[9], v[10], v[11]);
        let w3 = four(v[12], v[13], v[14], v[15]);
        // Then across the four 128-bit lanes (a 4x4 transpose of lanes, added as it goes).
        let y0 = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x44>(w0, w1),
            _mm512_shuffle_i32x4::<0xEE>(w0, w1),
        );
        let y1 = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x44>(w2, w3),
            _mm512_shuffle_i32x4::<0xEE>(w2, w3),
        );
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(y0, y1),
            _mm512_shuffle_i32x4::<0xDD>(y0, y1),
        )
    }

    /// [`super::dot_i8_rows`]: exact for every i8, by the u8 offset: `q · k = (q + 128) · k
    /// - 128 Σ k`, both sums in `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI; `q.len() <= MAX_D`; `rows` holds `(out.len() - 1) * stride +
    /// q.len()` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot(q: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
        let d = q.len();
        let chunks = d.div_ceil(64);
        // The byte 0x80: flips i8 to u8 + 128, and is 128 as the u8 side of `vpdpbusd`.
        let c128 = _mm512_set1_epi8(-128);
        let mut q_u = [_mm512_setzero_si512(); MAX_D / 64];
        let mut masks = [0u64; MAX_D / 64];
        for c in 0..chunks {
            masks[c] = mask64(d - c * 64);
            // SAFETY: the mask stays within `q`.
            let v = unsafe { _mm512_maskz_loadu_epi8(masks[c], q.as_ptr().add(c * 64)) };
            // Bytes past `d` stay 0 (and their keys load as 0): they add nothing.
            q_u[c] = _mm512_maskz_mov_epi8(masks[c], _mm512_xor_si512(v, c128));
        }
        let key = |j: usize| -> __m512i {
            let row = rows.as_ptr().wrapping_add(j * stride);
            let (mut acc, mut sum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in 0..chunks {
                // SAFETY: row j's first `d` bytes are in `rows` (the caller's contract).
                let k = unsafe { _mm512_maskz_loadu_epi8(masks[c], row.add(c * 64)) };
                acc = _mm512_dpbusd_epi32(acc, q_u[c], k);
                sum = _mm512_dpbusd_epi32(sum, c128, k);
            }
            _mm512_sub_epi32(acc, sum)
        };
        let n = out.len();
        let mut j = 0;
        while j + 16 <= n {
            let mut lanes = [_mm512_setzero_si512(); 16];
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = key(j + i);
            }
            // SAFETY: `j + 16 <= n`.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), sum16(&lanes)) };
            j += 16;
        }
        for (i, o) in out[j..].iter_mut().enumerate() {
            *o = _mm512_reduce_add_epi32(key(j + i));
        }
    }

    /// [`super::weighted_sum_i8_rows`] for weights in `0..=127`: four rows at a time, their
    /// bytes interleaved so one `vpdpbusd` adds four weighted rows; groups of four zero
    /// weights are skipped.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI; `out.len() <= MAX_D`; every `w[j] >= 0`; `rows` holds
    /// `(w.len() - 1) * stride + out.len()` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn weighted_sum_nonnegative(w: &[i8], rows: &[i8], stride: usize, out: &mut [i32]) {
        let d = out.len();
        let chunks = d.div_ceil(64);
        // acc[4c + m], 128-bit lane L, element i holds out[64c + 16L + 4m + i].
        let mut acc = [_mm512_setzero_si512(); 4 * MAX_D / 64];
        let n = w.len();
        let mut j = 0;
        while j < n {
            let group = (n - j).min(4);
            let mut wb = [0u8; 4];
            for (b, &v) in wb.iter_mut().zip(&w[j..j + group]) {
                *b = v as u8;
            }
            let wd = u32::from_le_bytes(wb);
            if wd != 0 {
                let weights = _mm512_set1_epi32(wd as i32);
                for c in 0..chunks {
                    let mask = mask64(d - c * 64);
                    let mut r = [_mm512_setzero_si512(); 4];
                    for (t, rt) in r.iter_mut().enumerate().take(group) {
                        // SAFETY: row j + t exists and its first `d` bytes are in `rows`.
                        *rt = unsafe {
                            _mm512_maskz_loadu_epi8(
                                mask,
                                rows.as_ptr().add((j + t) * stride + c * 64),
                            )
                        };
                    }
                    let lo01 = _mm512_unpacklo_epi8(r[0], r[1]);
                    let hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
                    let lo23 = _mm512_unpacklo_epi8(r[2], r[3]);
                    let hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
                    let a = &mut acc[4 * c..4 * c + 4];
                    a[0] = _mm512_dpbusd_epi32(a[0], weights, _mm512_unpacklo_epi16(lo01, lo23));
                    a[1] = _mm512_dpbusd_epi32(a[1], weights, _mm512_unpackhi_epi16(lo01, lo23));
                    a[2] = _mm512_dpbusd_epi32(a[2], weights, _mm512_unpacklo_epi16(hi01, hi23));
                    a[3] = _mm512_dpbusd_epi32(a[3], weights, _mm512_unpackhi_epi16(hi01, hi23));
                }
            }
            j += group;
        }
        let mut lanes = [0i32; 16];
        for c in 0..chunks {
            for m in 0..4 {
                // SAFETY: `lanes` holds 16 i32.
                unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), acc[4 * c + m]) };
                for (l, four) in lanes.chunks_exact(4).enumerate() {
                    for (i, &v) in four.iter().enumerate() {
                        if let Some(o) = out.get_mut(64 * c + 16 * l + 4 * m + i) {
                            *o = v;
                        }
                    }
                }
            }
        }
    }
}

/// Lanes of the portable dot products (independent partial sums, one vector register).
const LANES: usize = 16;

/// Attention of `q` (`d` floats) over `kv`: `scores` (at least `kv.n` floats) is scratch, the
/// result goes to `out` (`d` floats).
///
/// # Panics
/// When the slices are shorter than `kv`, `q` and `out` say (callers size them from the same
/// shape).
pub fn attend_row(
    q: &[f32],
    kv: HeadKv<'_>,
    scale: f32,
    alibi: Option<Alibi>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    assert!(
        out.len() == d && scores.len() >= kv.n,
        "attend_row: buffer sizes"
    );
    if kv.n == 0 {
        out.fill(0.0);
        return;
    }
    let need = (kv.n - 1) * kv.stride + d;
    assert!(
        kv.keys.len() >= need && kv.values.len() >= need,
        "attend_row: {} keys of {d} floats with stride {} need {need} floats",
        kv.n,
        kv.stride
    );
    let scores = &mut scores[..kv.n];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the sizes were checked above.
        unsafe {
            match d {
                32 => return x86::attend::<2>(q, kv, scale, alibi, scores, out),
                64 => return x86::attend::<4>(q, kv, scale, alibi, scores, out),
                128 => return x86::attend::<8>(q, kv, scale, alibi, scores, out),
                _ => return portable_avx512(q, kv, scale, alibi, scores, out),
            }
        }
    }
    portable(q, kv, scale, alibi, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn portable_avx512(
    q: &[f32],
    kv: HeadKv<'_>,
    scale: f32,
    alibi: Option<Alibi>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    portable(q, kv, scale, alibi, scores, out)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    // Pairwise, so the reduction is a few vector shuffles rather than 16 dependent adds.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[inline(always)]
fn portable(
    q: &[f32],
    kv: HeadKv<'_>,
    scale: f32,
    alibi: Option<Alibi>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &kv.keys[j * kv.stride..][..d];
        let mut v = dot(q, k) * scale;
        if let Some(a) = alibi {
            v += a.slope * (a.first + j) as f32;
        }
        *s = v;
    }
    crate::math::softmax_inplace(scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        let v = &kv.values[j * kv.stride..][..d];
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Alibi, HeadKv};
    use std::arch::x86_64::*;

    /// `d = 16 * C`: the query and two sets of output accumulators live in registers.
    ///
    /// # Safety
    /// Needs AVX-512F; `q` and `out` hold `16 * C` floats, `kv` rows `0..scores.len()` exist.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend<const C: usize>(
        q: &[f32],
        kv: HeadKv<'_>,
        scale: f32,
        alibi: Option<Alibi>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let n = scores.len();
        let mut qv = [_mm512_setzero_ps(); C];
        for (c, r) in qv.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(q.as_ptr().add(16 * c));
        }
        let kp = kv.keys.as_ptr();
        for (j, s) in scores.iter_mut().enumerate() {
            let k = kp.add(j * kv.stride);
            let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
            for (c, &qc) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k.add(16 * c)), acc);
            }
            let mut v = _mm512_reduce_add_ps(acc) * scale;
            if let Some(a) = alibi {
                v += a.slope * (a.first + j) as f32;
            }
            *s = v;
        }
        crate::math::softmax_inplace(scores);
        // Two accumulator sets (even and odd keys) halve the FMA dependency chains.
        let mut o0 = [_mm512_setzero_ps(); C];
        let mut o1 = [_mm512_setzero_ps(); C];
        let vp = kv.values.as_ptr();
        let mut j = 0;
        while j + 1 < n {
            let (p0, p1) = (_mm512_set1_ps(scores[j]), _mm512_set1_ps(scores[j + 1]));
            let (v0, v1) = (vp.add(j * kv.stride), vp.add((j + 1) * kv.stride));
            for c in 0..C {
                o0[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0.add(16 * c)), o0[c]);
                o1[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1.add(16 * c)), o1[c]);
            }
            j += 2;
        }
        if j < n {
            let p = _mm512_set1_ps(scores[j]);
            let v = vp.add(j * kv.stride);
            for (c, o) in o0.iter_mut().enumerate() {
                *o = _mm512_fmadd_ps(p, _mm512_loadu_ps(v.add(16 * c)), *o);
            }
        }
        for c in 0..C {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), _mm512_add_ps(o0[c], o1[c]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_row_products_are_exact() {
        let val = |i: usize| ((i.wrapping_mul(2654435761) >> 7) % 255) as i32 as i8;
        let mut cases = vec![(1usize, 1usize, 1usize), (37, 80, 80), (200, 17, 40)];
        // Every key count around the 16-key and 4-row blocks, and row widths around the
        // 64-byte chunks (up to past the vector kernels' 256).
        for n in 1..=35 {
            cases.push((n, 64, 192));
        }
        for d in [2, 31, 63, 65, 127, 128, 129, 192, 255, 256, 257, 300] {
            cases.push((19, d, d + 5));
        }
        for (n, d, stride) in cases {
            let rows: Vec<i8> = (0..(n - 1) * stride + d.max(1))
                .map(|i| val(i + 3))
                .collect();
            let q: Vec<i8> = (0..d).map(|i| val(i * 7 + 1)).collect();
            let mut dots = vec![7i32; n];
            dot_i8_rows(&q, &rows, stride, &mut dots);
            // Signed weights (the loop), then non-negative ones with runs of zeros (the
            // vector kernel's fast path and its skipped groups).
            let signed: Vec<i8> = (0..n).map(|j| val(j * 13)).collect();
            let nonneg: Vec<i8> = (0..n)
                .map(|j| {
                    if j % 9 < 5 {
                        0
                    } else {
                        val(j * 13).unsigned_abs().min(127) as i8
                    }
                })
                .collect();
            for mut w in [signed, nonneg] {
                w[0] = 0;
                let mut sums = vec![7i32; d];
                weighted_sum_i8_rows(&w, &rows, stride, &mut sums);
                for j in 0..n {
                    let want: i32 = (0..d)
                        .map(|e| q[e] as i32 * rows[j * stride + e] as i32)
                        .sum();
                    assert_eq!(dots[j], want, "n {n} d {d} j {j}");
                }
                for e in 0..d {
                    let want: i32 = (0..n)
                        .map(|j| w[j] as i32 * rows[j * stride + e] as i32)
                        .sum();
                    assert_eq!(sums[e], want, "n {n} d {d} e {e}");
                }
            }
        }
        // Extremes: -128 never occurs in codes, -127 * -127 sums stay exact.
        let rows = vec![-127i8; 64 * 3];
        let mut dots = [0i32; 3];
        dot_i8_rows(&[-127i8; 64], &rows, 64, &mut dots);
        assert_eq!(dots, [64 * 16129; 3]);
        let mut sums = [0i32; 64];
        weighted_sum_i8_rows(&[127i8; 3], &rows, 64, &mut sums);
        assert_eq!(sums, [-3 * 16129; 64]);
        // -128 (which no quantizer here writes) is still exact, in either operand.
        let rows = vec![-128i8; 64 * 17];
        let mut dots = [0i32; 17];
        dot_i8_rows(&[-128i8; 64], &rows, 64, &mut dots);
        assert_eq!(dots, [64 * 16384; 17]);
        dot_i8_rows(&[127i8; 64], &rows, 64, &mut dots);
        assert_eq!(dots, [-64 * 16256; 17]);
        weighted_sum_i8_rows(&[127i8; 17], &rows, 64, &mut sums);
        assert_eq!(sums, [-17 * 16256; 64]);
    }

    #[test]
    fn scores_from_i32_match_the_scalar_formula() {
        for n in [1usize, 7, 16, 33, 100] {
            let acc: Vec<i32> = (0..n as i32).map(|j| (j * 7919) % 20001 - 10000).collect();
            let ks: Vec<f32> = (0..n).map(|j| 1e-3 + j as f32 * 1e-4).collect();
            for alibi in [
                None,
                Some(Alibi {
                    slope: -0.25,
                    first: 5,
                }),
            ] {
                let mut got = vec![f32::NAN; n];
                scores_from_i32(&acc, 0.03, &ks, alibi, &mut got);
                for j in 0..n {
                    let want = acc[j] as f32 * (0.03 * ks[j])
                        + alibi.map_or(0.0, |a| a.slope * (a.first + j) as f32);
                    assert_eq!(got[j], want, "n {n} j {j}");
                }
            }
        }
    }

    fn reference(q: &[f32], kv: HeadKv<'_>, scale: f32, alibi: Option<Alibi>, out: &mut [f32]) {
        let d = q.len();
        let mut s: Vec<f64> = (0..kv.n)
            .map(|j| {
                let k = &kv.keys[j * kv.stride..][..d];
                let dot: f64 = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                dot * scale as f64 + alibi.map_or(0.0, |a| a.slope as f64 * (a.first + j) as f64)
            })
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = s
            .iter_mut()
            .map(|v| {
                *v = (*v - max).exp();
                *v
            })
            .sum();
        for (i, o) in out.iter_mut().enumerate() {
            *o = (0..kv.n)
                .map(|j| s[j] / sum * kv.values[j * kv.stride + i] as f64)
                .sum::<f64>() as f32;
        }
    }

    #[test]
    fn every_path_matches_an_f64_reference() {
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0;
        // d 64/32/128 take the register kernels on AVX-512, 24 and 80 the portable loop.
        for (d, n, stride, alibi) in [
            (64, 1, 64, None),
            (64, 513, 192, None),
            (
                64,
                40,
                64,
                Some(Alibi {
                    slope: -0.3,
                    first: 5,
                }),
            ),
            (32, 77, 96, None),
            (
                128,
                130,
                384,
                Some(Alibi {
                    slope: 0.01,
                    first: 0,
                }),
            ),
            (24, 33, 48, None),
            (
                80,
                19,
                80,
                Some(Alibi {
                    slope: -0.05,
                    first: 3,
                }),
            ),
        ] {
            let q: Vec<f32> = (0..d).map(|i| val(i + 3)).collect();
            let keys: Vec<f32> = (0..n * stride).map(|i| val(i + 7)).collect();
            let values: Vec<f32> = (0..n * stride).map(|i| val(i + 13)).collect();
            let kv = HeadKv {
                keys: &keys,
                values: &values,
                stride,
                n,
            };
            let mut want = vec![0.0; d];
            reference(&q, kv, 0.125, alibi, &mut want);
            let mut got = vec![f32::NAN; d];
            let mut scores = vec![0.0; n + 3];
            attend_row(&q, kv, 0.125, alibi, &mut scores, &mut got);
            let mut port = vec![f32::NAN; d];
            portable(&q, kv, 0.125, alibi, &mut scores[..n], &mut port);
            for ((g, p), w) in got.iter().zip(&port).zip(&want) {
                assert!((g - w).abs() < 1e-5, "d {d} n {n}: {g} vs {w}");
                assert!((p - w).abs() < 1e-5, "portable d {d} n {n}: {p} vs {w}");
            }
        }
    }
}

//! x86-64 VNNI backends: `vpdpbusd` on 512-bit (AVX-512 VNNI) or 256-bit (AVX-VNNI) registers.
//!
//! Both use the [`VnniPanels16`](super::PackedLayout::VnniPanels16) layout: the weights
//! (`w + 128`, unsigned) sit in registers, the activations (signed) are broadcast 4 bytes at a
//! time straight from the row-major X, so X is never packed. The `128 · Σ_k x` the offset adds
//! is subtracted in the epilogue; `vpdpbusd` wraps, so the result is exact whenever the true
//! dot product fits in i32.

use super::driver::{row_sums_scalar, Epilogue, OutPtr, TileAt, TileCtx, TileKernel};
use super::PANEL_COLS;
use std::arch::x86_64::*;

/// AVX-512 VNNI backend (`vpdpbusd zmm`), 8 rows x 3 panels (48 columns) per micro-tile.
#[derive(Clone, Copy, Debug)]
pub struct Avx512Vnni {
    _proof: (),
}

impl Avx512Vnni {
    pub const NAME: &'static str = "avx512vnni";

    /// `Some` only when the CPU has AVX-512 F, BW and VNNI: holding one proves it.
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
        .then_some(Self { _proof: () })
    }
}

impl_panel_backend!(Avx512Vnni);

impl TileKernel for Avx512Vnni {
    const MR: usize = 8;
    const NV: usize = 3;
    const MC: usize = 64;
    // 3 panels x 128 lines = 24 KiB of weights per k block: stays in a 32 KiB L1D.
    const KC_GROUPS: usize = 128;
    // 2 KiB ahead in each of the 3 panel streams: about DRAM latency x bandwidth in flight
    // (measured on Zen 5: m = 16 at 604 GOPS with it, 558 without, 399 with k blocks).
    const PREFETCH_LINES: usize = 32;

    unsafe fn tile(&self, ctx: &TileCtx, at: &TileAt, rows: usize, panels: usize) {
        dispatch_tile!(tile_512(ctx, at), rows, panels, [1 2 3 4 5 6 7 8], [1 2 3]);
    }

    unsafe fn row_sums(&self, a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
        row_sums_512(a, lda, k, out);
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn row_sums_512(a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
    row_sums_scalar(a, lda, k, out);
}

/// Mask of the columns of a 16-column panel that exist when `remaining` columns are left.
#[inline(always)]
fn lane_mask(remaining: usize) -> __mmask16 {
    if remaining >= 16 {
        0xFFFF
    } else {
        ((1u32 << remaining) - 1) as __mmask16
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_512<const R: usize, const V: usize>(ctx: &TileCtx, at: &TileAt) {
    let (i0, p0) = (at.i0, at.p0);
    let mut acc = [[_mm512_setzero_si512(); V]; R];
    if !at.first() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (v, a) in acc_r.iter_mut().enumerate() {
                *a = _mm512_loadu_si512(
                    at.partial.add(r * at.ld_partial + v * PANEL_COLS) as *const _
                );
            }
        }
    }
    let stride = ctx.groups;
    let b0 = ctx.panels.add(p0 * stride);
    let a0 = ctx.a.add(i0 * ctx.lda);
    let (pf, pf_shift) = (at.prefetch, at.prefetch_shift);
    let pf_mask = (1usize << pf_shift) - 1;
    for g in at.full_groups(ctx) {
        if pf != 0 && g & pf_mask == 0 {
            for v in 0..V {
                // May point past the panels (prefetches never fault): wrapping, not `add`.
                let line = v * stride + (g >> pf_shift) + pf;
                _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(line) as *const i8);
            }
        }
        let mut b = [_mm512_setzero_si512(); V];
        for (v, bv) in b.iter_mut().enumerate() {
            *bv = _mm512_load_si512(b0.add(v * stride + g) as *const _);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = (a0.add(r * ctx.lda + 4 * g) as *const i32).read_unaligned();
            let x = _mm512_set1_epi32(x);
            for (a, &bv) in acc_r.iter_mut().zip(&b) {
                *a = _mm512_dpbusd_epi32(*a, bv, x);
            }
        }
    }
    if at.has_tail(ctx) {
        let full = ctx.k / 4;
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_epi32(ctx.tail_word(i0 + r));
            for (v, a) in acc_r.iter_mut().enumerate() {
                let bv = _mm512_load_si512(b0.add(v * stride + full) as *const _);
                *a = _mm512_dpbusd_epi32(*a, bv, x);
            }
        }
    }
    // Copy out once: the loops below index dynamically, and doing that on `acc` itself would
    // make the compiler keep (and store) the accumulators in memory inside the k loop.
    let result = acc;
    if !at.last(ctx) {
        for (r, acc_r) in result.iter().enumerate() {
            for (v, &a) in acc_r.iter().enumerate() {
                _mm512_storeu_si512(
                    at.partial.add(r * at.ld_partial + v * PANEL_COLS) as *mut _,
                    a,
                );
            }
        }
        return;
    }
    for (r, acc_r) in result.iter().enumerate() {
        let i = i0 + r;
        let offset = _mm512_set1_epi32((*ctx.row_sums.add(i)).wrapping_mul(128));
        for (v, &a) in acc_r.iter().enumerate() {
            let j = (p0 + v) * PANEL_COLS;
            store_512(
                &ctx.ep,
                i,
                j,
                lane_mask(ctx.n - j),
                _mm512_sub_epi32(a, offset),
            );
        }
    }
}

/// The vector form of [`Epilogue::store`]: the same f32 operations, in the same order.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn store_512(ep: &Epilogue, i: usize, j: usize, mask: __mmask16, acc: __m512i) {
    let at = i * ep.ldo + j;
    let dequant = || {
        let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(ep.row_scale(i)));
        if !ep.col_scale.is_null() {
            v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, ep.col_scale.add(j)));
        }
        if !ep.bias.is_null() {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ep.bias.add(j)));
        }
        v
    };
    match ep.out {
        OutPtr::I32(p) => _mm512_mask_storeu_epi32(p.add(at), mask, acc),
        OutPtr::F32(p) => _mm512_mask_storeu_ps(p.add(at), mask, dequant()),
        OutPtr::I8(p) => {
            let v = _mm512_mul_ps(dequant(), _mm512_set1_ps(ep.inv_out_scale));
            // max first with the constant second: a NaN lane becomes -127, like f32::max.
            let v = _mm512_min_ps(
                _mm512_max_ps(v, _mm512_set1_ps(-127.0)),
                _mm512_set1_ps(127.0),
            );
            let q =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_mask_cvtepi32_storeu_epi8(p.add(at), mask, q);
        }
    }
}

/// AVX-VNNI backend (`vpdpbusd ymm`, VEX-encoded), 6 rows x 1 panel per micro-tile.
#[derive(Clone, Copy, Debug)]
pub struct AvxVnni {
    _proof: (),
}

impl AvxVnni {
    pub const NAME: &'static str = "avxvnni";

    /// `Some` only when the CPU has AVX2 and AVX-VNNI: holding one proves it.
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"))
            .then_some(Self { _proof: () })
    }
}

impl_panel_backend!(AvxVnni);

impl TileKernel for AvxVnni {
    const MR: usize = 6;
    const NV: usize = 1;
    const MC: usize = 60;
    const KC_GROUPS: usize = 256;

    unsafe fn tile(&self, ctx: &TileCtx, at: &TileAt, rows: usize, panels: usize) {
        dispatch_tile!(tile_256_vex(ctx, at), rows, panels, [1 2 3 4 5 6], [1]);
    }

    unsafe fn row_sums(&self, a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
        row_sums_256(a, lda, k, out);
    }
}

#[target_feature(enable = "avx2")]
unsafe fn row_sums_256(a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
    row_sums_scalar(a, lda, k, out);
}

/// A 256-bit tile kernel; `$dp` is the `vpdpbusd ymm` intrinsic of the encoding `$features`
/// provides (VEX for AVX-VNNI, EVEX for AVX-512 VNNI + VL, which tests use on CPUs without
/// AVX-VNNI).
macro_rules! tile_256 {
    ($name:ident, $features:literal, $dp:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const V: usize>(ctx: &TileCtx, at: &TileAt) {
            let (i0, p0) = (at.i0, at.p0);
            let zero = _mm256_setzero_si256();
            let mut acc = [[[zero; 2]; V]; R];
            if !at.first() {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (v, a) in acc_r.iter_mut().enumerate() {
                        let src =
                            at.partial.add(r * at.ld_partial + v * PANEL_COLS) as *const __m256i;
                        *a = [_mm256_loadu_si256(src), _mm256_loadu_si256(src.add(1))];
                    }
                }
            }
            let stride = ctx.groups;
            let b0 = ctx.panels.add(p0 * stride);
            let a0 = ctx.a.add(i0 * ctx.lda);
            let load = |v: usize, g: usize| {
                let p = b0.add(v * stride + g) as *const __m256i;
                [_mm256_load_si256(p), _mm256_load_si256(p.add(1))]
            };
            for g in at.full_groups(ctx) {
                let mut b = [[zero; 2]; V];
                for (v, bv) in b.iter_mut().enumerate() {
                    *bv = load(v, g);
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let x = (a0.add(r * ctx.lda + 4 * g) as *const i32).read_unaligned();
                    let x = _mm256_set1_epi32(x);
                    for (a, bv) in acc_r.iter_mut().zip(&b) {
                        a[0] = $dp(a[0], bv[0], x);
                        a[1] = $dp(a[1], bv[1], x);
                    }
                }
            }
            if at.has_tail(ctx) {
                let full = ctx.k / 4;
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(ctx.tail_word(i0 + r));
                    for (v, a) in acc_r.iter_mut().enumerate() {
                        let bv = load(v, full);
                        a[0] = $dp(a[0], bv[0], x);
                        a[1] = $dp(a[1], bv[1], x);
                    }
                }
            }
            // Copy out once so the k loop keeps the accumulators in registers.
            let result = acc;
            if !at.last(ctx) {
                for (r, acc_r) in result.iter().enumerate() {
                    for (v, a) in acc_r.iter().enumerate() {
                        let dst =
                            at.partial.add(r * at.ld_partial + v * PANEL_COLS) as *mut __m256i;
                        _mm256_storeu_si256(dst, a[0]);
                        _mm256_storeu_si256(dst.add(1), a[1]);
                    }
                }
                return;
            }
            let mut lanes = [0i32; PANEL_COLS];
            for (r, acc_r) in result.iter().enumerate() {
                let i = i0 + r;
                let offset = _mm256_set1_epi32((*ctx.row_sums.add(i)).wrapping_mul(128));
                for (v, a) in acc_r.iter().enumerate() {
                    let dst = lanes.as_mut_ptr() as *mut __m256i;
                    _mm256_storeu_si256(dst, _mm256_sub_epi32(a[0], offset));
                    _mm256_storeu_si256(dst.add(1), _mm256_sub_epi32(a[1], offset));
                    let j0 = (p0 + v) * PANEL_COLS;
                    for (c, &d) in lanes.iter().enumerate().take(ctx.n - j0) {
                        ctx.ep.store(i, j0 + c, d);
                    }
                }
            }
        }
    };
}

tile_256!(tile_256_vex, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);

/// The AVX-VNNI kernel compiled with the EVEX `vpdpbusd ymm` (AVX-512 VNNI + VL), so its
/// blocking, tail and epilogue are tested on CPUs that lack AVX-VNNI.
#[cfg(test)]
pub(crate) mod evex_ymm {
    use super::*;

    tile_256!(
        tile_256_evex,
        "avx2,avx512f,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32
    );

    #[derive(Clone, Copy, Debug)]
    pub(crate) struct AvxVnniEvex {
        _proof: (),
    }

    impl AvxVnniEvex {
        pub const NAME: &'static str = "avxvnni-evex";

        pub(crate) fn new() -> Option<Self> {
            (is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni"))
            .then_some(Self { _proof: () })
        }
    }

    impl_panel_backend!(AvxVnniEvex);

    impl TileKernel for AvxVnniEvex {
        const MR: usize = AvxVnni::MR;
        const NV: usize = AvxVnni::NV;
        const MC: usize = AvxVnni::MC;
        const KC_GROUPS: usize = AvxVnni::KC_GROUPS;

        unsafe fn tile(&self, ctx: &TileCtx, at: &TileAt, rows: usize, panels: usize) {
            dispatch_tile!(tile_256_evex(ctx, at), rows, panels, [1 2 3 4 5 6], [1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::evex_ymm::AvxVnniEvex;
    use crate::int8::{ActScales, Int8Gemm, Reference, WeightScales};

    /// The 256-bit kernel (as AVX-VNNI runs it, EVEX-encoded) equals the reference bit for bit.
    #[test]
    fn avxvnni_kernel_matches_reference() {
        let Some(ymm) = AvxVnniEvex::new() else {
            eprintln!("skipping: this CPU has neither AVX-VNNI nor AVX-512 VNNI + VL");
            return;
        };
        assert_eq!(ymm.name(), AvxVnniEvex::NAME);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const EDGES: [usize; 6] = [1, 5, 6, 7, 16, 17];
        let mut shapes = vec![(7, 33, 1030), (13, 17, 2051)];
        for dim in 0..3 {
            for v in 1..=67 {
                for &a in &EDGES {
                    for &b in &EDGES {
                        shapes.push(match dim {
                            0 => (v, a, b),
                            1 => (a, v, b),
                            _ => (a, b, v),
                        });
                    }
                }
            }
        }
        for (m, n, k) in shapes {
            let x: Vec<i8> = (0..m * k).map(|_| (next() >> 56) as i8).collect();
            let w: Vec<i8> = (0..n * k).map(|_| (next() >> 56) as i8).collect();
            let ws: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
            let xs: Vec<f32> = (0..m).map(|i| 0.02 + i as f32 * 1e-3).collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1 - 1.0).collect();
            let mut outs = Vec::new();
            for backend in [&Reference as &dyn Int8Gemm, &ymm] {
                let p = backend
                    .pack_weights(&w, n, k, WeightScales::PerChannel(ws.clone()), Some(&bias))
                    .unwrap();
                let mut i32_out = vec![0i32; m * n];
                let mut f32_out = vec![0f32; m * n];
                let mut i8_out = vec![0i8; m * n];
                backend.gemm_i32_out(&x, m, &p, &mut i32_out).unwrap();
                backend
                    .gemm_f32_out(&x, m, ActScales::PerToken(&xs), &p, &mut f32_out)
                    .unwrap();
                backend
                    .gemm_i8_out(&x, m, ActScales::PerTensor(0.03), &p, 0.5, &mut i8_out)
                    .unwrap();
                let bits: Vec<u32> = f32_out.iter().map(|v| v.to_bits()).collect();
                outs.push((i32_out, bits, i8_out));
            }
            assert!(
                outs[0] == outs[1],
                "avxvnni kernel differs at m={m} n={n} k={k}"
            );
        }
    }
}

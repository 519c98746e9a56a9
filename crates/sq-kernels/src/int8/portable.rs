//! Plain-Rust panel backend: runs on any CPU, reads the same packed layout as the VNNI
//! backends, and leaves vectorization to the compiler.

use super::driver::{TileAt, TileCtx, TileKernel};
use super::PANEL_COLS;

/// Portable backend (no intrinsics); the fallback when no VNNI backend is available.
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable;

impl Portable {
    pub const NAME: &'static str = "portable";

    /// Always available.
    pub fn new() -> Option<Self> {
        Some(Portable)
    }
}

impl_panel_backend!(Portable);

impl TileKernel for Portable {
    const MR: usize = 4;
    const NV: usize = 1;
    const MC: usize = 64;
    const KC_GROUPS: usize = 256;

    unsafe fn tile(&self, ctx: &TileCtx, at: &TileAt, rows: usize, panels: usize) {
        dispatch_tile!(tile(ctx, at), rows, panels, [1 2 3 4], [1]);
    }
}

/// Adds one group of 4 k of one row (`x`) against `V` panels.
///
/// # Safety
/// Panels `p0..p0 + V` and group `g` must exist.
#[inline(always)]
unsafe fn accumulate<const V: usize>(
    acc: &mut [[i32; PANEL_COLS]; V],
    ctx: &TileCtx,
    p0: usize,
    g: usize,
    x: [i8; 4],
) {
    for (v, acc_v) in acc.iter_mut().enumerate() {
        let line = &(*ctx.panels.add((p0 + v) * ctx.groups + g)).0;
        for (c, a) in acc_v.iter_mut().enumerate() {
            // At most 4 * 255 * 128: no overflow before the wrapping add.
            let s: i32 = (0..4).map(|t| line[c * 4 + t] as i32 * x[t] as i32).sum();
            *a = a.wrapping_add(s);
        }
    }
}

/// # Safety
/// Rows `at.i0..at.i0 + R`, panels `at.p0..at.p0 + V` and the partial buffer must exist.
#[inline(always)]
unsafe fn tile<const R: usize, const V: usize>(ctx: &TileCtx, at: &TileAt) {
    let (i0, p0) = (at.i0, at.p0);
    let mut acc = [[[0i32; PANEL_COLS]; V]; R];
    if !at.first() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (v, acc_v) in acc_r.iter_mut().enumerate() {
                let src = at.partial.add(r * at.ld_partial + v * PANEL_COLS);
                acc_v.copy_from_slice(std::slice::from_raw_parts(src, PANEL_COLS));
            }
        }
    }
    for g in at.full_groups(ctx) {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = (ctx.a.add((i0 + r) * ctx.lda + 4 * g) as *const [i8; 4]).read_unaligned();
            accumulate(acc_r, ctx, p0, g, x);
        }
    }
    if at.has_tail(ctx) {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = ctx.tail_word(i0 + r).to_le_bytes().map(|b| b as i8);
            accumulate(acc_r, ctx, p0, ctx.k / 4, x);
        }
    }
    if !at.last(ctx) {
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, acc_v) in acc_r.iter().enumerate() {
                let dst = at.partial.add(r * at.ld_partial + v * PANEL_COLS);
                std::slice::from_raw_parts_mut(dst, PANEL_COLS).copy_from_slice(acc_v);
            }
        }
        return;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        let i = i0 + r;
        let offset = (*ctx.row_sums.add(i)).wrapping_mul(128);
        for (v, acc_v) in acc_r.iter().enumerate() {
            for (c, &a) in acc_v.iter().enumerate() {
                let j = (p0 + v) * PANEL_COLS + c;
                if j < ctx.n {
                    ctx.ep.store(i, j, a.wrapping_sub(offset));
                }
            }
        }
    }
}

//! The blocking and threading shared by the panel backends (`avx512vnni`, `avxvnni`,
//! `portable`): they differ only in their [`TileKernel`].

use super::pack::{k_groups, pack_panels_into, Line64};
use super::{
    check_out_scale, validate_bmm, validate_gemm, ActScales, BatchedI8, BmmOutput, PackedInt8,
    PackedLayout, PANEL_COLS,
};
use crate::error::Result;
use crate::scratch::{with_buffer, SendConstPtr};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    static ROW_SUMS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    static PACKED_B: RefCell<Vec<Line64>> = const { RefCell::new(Vec::new()) };
    static PARTIAL: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// Where a tile's results go, and the epilogue applied on the way.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OutPtr {
    I32(*mut i32),
    F32(*mut f32),
    I8(*mut i8),
}

/// Epilogue parameters; the null pointers mean "no column scale" / "no bias".
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epilogue {
    pub out: OutPtr,
    /// Row stride of the output, in elements.
    pub ldo: usize,
    pub row_scale: *const f32,
    /// 1 for per-token scales, 0 for a per-tensor scale.
    pub row_scale_stride: usize,
    pub col_scale: *const f32,
    pub bias: *const f32,
    pub inv_out_scale: f32,
}

impl Epilogue {
    /// # Safety
    /// `i` must be a valid row for the scales.
    #[inline(always)]
    pub unsafe fn row_scale(&self, i: usize) -> f32 {
        *self.row_scale.add(i * self.row_scale_stride)
    }

    /// The scalar epilogue: same operations, in the same order, as the SIMD ones.
    ///
    /// # Safety
    /// `(i, j)` must lie inside the output and the scale/bias arrays.
    #[inline(always)]
    pub unsafe fn store(&self, i: usize, j: usize, acc: i32) {
        let at = i * self.ldo + j;
        match self.out {
            OutPtr::I32(p) => *p.add(at) = acc,
            OutPtr::F32(p) => *p.add(at) = self.dequant(i, j, acc),
            OutPtr::I8(p) => {
                *p.add(at) = super::requantize(self.dequant(i, j, acc), self.inv_out_scale)
            }
        }
    }

    #[inline(always)]
    unsafe fn dequant(&self, i: usize, j: usize, acc: i32) -> f32 {
        let mut v = acc as f32 * self.row_scale(i);
        if !self.col_scale.is_null() {
            v *= *self.col_scale.add(j);
        }
        if !self.bias.is_null() {
            v += *self.bias.add(j);
        }
        v
    }
}

/// Everything a tile kernel reads. Pointers are valid for the whole call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileCtx {
    /// Activations: row `i` starts at `a + i * lda`, `k` bytes long.
    pub a: *const i8,
    pub lda: usize,
    pub k: usize,
    /// Packed B: panel `p` starts at line `p * groups`.
    pub panels: *const Line64,
    pub groups: usize,
    pub n: usize,
    /// `Σ_k a[i][k]` for every row, to undo the +128 offset of the packed weights.
    pub row_sums: *const i32,
    pub ep: Epilogue,
}

// SAFETY: the context only carries pointers to buffers that outlive the parallel section;
// tiles write disjoint parts of the output.
unsafe impl Send for TileCtx {}
unsafe impl Sync for TileCtx {}

impl TileCtx {
    /// Reads the last, partial group of 4 k of row `i` as a little-endian word, zero padded.
    ///
    /// # Safety
    /// `i` must be a valid row.
    #[inline(always)]
    pub unsafe fn tail_word(&self, i: usize) -> i32 {
        let full = self.k / 4 * 4;
        let row = self.a.add(i * self.lda);
        let mut bytes = [0u8; 4];
        for (t, b) in bytes.iter_mut().enumerate().take(self.k - full) {
            *b = *row.add(full + t) as u8;
        }
        i32::from_le_bytes(bytes)
    }
}

/// Where a micro-tile sits and which slice of k it covers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileAt {
    pub i0: usize,
    pub p0: usize,
    /// Groups of 4 k `g_lo..g_hi`; the product is complete when `g_hi == ctx.groups`.
    pub g_lo: usize,
    pub g_hi: usize,
    /// INT32 partial sums of this tile between k blocks (`partial[r * ld_partial + col]`);
    /// read unless `g_lo == 0`, written unless the block is the last. Null when k is one block.
    pub partial: *mut i32,
    pub ld_partial: usize,
    /// Lines ahead to prefetch in each panel (0: none): at group `g`, line
    /// `(g >> prefetch_shift) + prefetch` of each panel, at the groups `g` that are multiples
    /// of `1 << prefetch_shift` (shift 1: half the lines, at half the rate).
    pub prefetch: usize,
    pub prefetch_shift: u32,
}

impl TileAt {
    #[inline(always)]
    pub fn first(&self) -> bool {
        self.g_lo == 0
    }
    #[inline(always)]
    pub fn last(&self, ctx: &TileCtx) -> bool {
        self.g_hi == ctx.groups
    }
    /// Full groups of this block (the zero-padded tail group is handled separately).
    #[inline(always)]
    pub fn full_groups(&self, ctx: &TileCtx) -> std::ops::Range<usize> {
        self.g_lo..self.g_hi.min(ctx.k / 4)
    }
    /// Whether this block ends with the partial group of the last `k % 4` values.
    #[inline(always)]
    pub fn has_tail(&self, ctx: &TileCtx) -> bool {
        self.last(ctx) && !ctx.k.is_multiple_of(4)
    }
}

/// A register-blocked micro-kernel over at most `MR` rows and `NV` panels of 16 columns.
pub(crate) trait TileKernel: Sync {
    const MR: usize;
    const NV: usize;
    /// Rows per cache block: the rows a task keeps hot while it sweeps its panels.
    const MC: usize;
    /// Groups of 4 k per k block, sized so `NV` panels of one block stay in L1.
    const KC_GROUPS: usize;
    /// How many lines ahead, in each panel, a tile prefetches when the weights stream from
    /// DRAM (decode-sized m); 0 where the kernel does not prefetch.
    const PREFETCH_LINES: usize = 0;

    /// Computes rows `at.i0..at.i0 + rows` against panels `at.p0..at.p0 + panels` over the
    /// groups of `at`, then stores partial sums or (last block) writes through the epilogue.
    ///
    /// # Safety
    /// `rows <= MR`, `panels <= NV`, and the rows, panels and partial buffer must exist.
    unsafe fn tile(&self, ctx: &TileCtx, at: &TileAt, rows: usize, panels: usize);

    /// `out[i] = Σ_k a[i * lda + k]`.
    ///
    /// # Safety
    /// `a` must address `m` rows of `k` bytes with stride `lda`.
    unsafe fn row_sums(&self, a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
        row_sums_scalar(a, lda, k, out);
    }
}

/// # Safety
/// `a` must address `out.len()` rows of `k` bytes with stride `lda`.
#[inline(always)]
pub(crate) unsafe fn row_sums_scalar(a: *const i8, lda: usize, k: usize, out: &mut [i32]) {
    for (i, s) in out.iter_mut().enumerate() {
        let row = std::slice::from_raw_parts(a.add(i * lda), k);
        *s = row.iter().map(|&v| v as i32).sum();
    }
}

/// Below this many multiply-adds a call runs on the calling thread: rayon's fork costs more.
const SERIAL_WORK: usize = 1 << 20;

/// The same threshold for decode-sized m (weights streamed once from DRAM).
const STREAMING_SERIAL_WORK: usize = 1 << 17;

/// Panels per task: up to 18 (288 columns, whose weights stay in L2), fewer when that leaves
/// under 4 tasks per thread, and split evenly so no thread gets a short last task.
pub(crate) fn panel_block(panels: usize, m_blocks: usize, threads: usize, nv: usize) -> usize {
    let max = 18usize.div_ceil(nv) * nv;
    let wanted_n_blocks = (4 * threads).div_ceil(m_blocks).max(1);
    panels.div_ceil(wanted_n_blocks).clamp(1, max)
}

/// Runs the whole `m x n` product described by `ctx` (row sums already filled in).
pub(crate) fn run_tiles<K: TileKernel>(kern: &K, ctx: &TileCtx, m: usize, parallel: bool) {
    let n = ctx.n;
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(PANEL_COLS);
    let work = m.saturating_mul(n).saturating_mul(ctx.k.max(1));
    // Decode-sized m: each weight line is used by at most two row tiles, so the weights stream
    // from DRAM once (see below). Such a product is bound by read bandwidth, which a second
    // core raises, so it is split over output panels from a smaller size.
    let streaming = m <= 2 * K::MR;
    let serial_work = if streaming {
        STREAMING_SERIAL_WORK
    } else {
        SERIAL_WORK
    };
    let threads = if parallel && work >= serial_work {
        rayon::current_num_threads()
    } else {
        1
    };
    let mc = m.min(K::MC);
    let m_blocks = m.div_ceil(mc);
    // Panel blocks: wide enough to amortize the task, enough of them to balance the threads.
    let np = panel_block(panels, m_blocks, threads, K::NV);
    let n_blocks = panels.div_ceil(np);
    let tasks = m_blocks * n_blocks;

    // Streaming: one k block keeps every panel a single long sequential stream (k blocks
    // would restart the hardware prefetcher every KC groups), and software prefetch runs ahead.
    let kc = if streaming {
        ctx.groups.max(1)
    } else {
        K::KC_GROUPS
    };
    let prefetch = if streaming { K::PREFETCH_LINES } else { 0 };
    // Streaming with two full-ish row tiles: the second re-reads the panels from L2, and a
    // tile computes faster than its panels arrive from DRAM. So both tiles prefetch the *next*
    // panels (NV panels on), each half of their lines at half rate, and the next panels stream
    // in during both tiles' arithmetic instead of stalling the first tile. The first panels of a
    // task, and a short second tile (it would end before its half arrives), keep the plain
    // prefetch ahead in their own panels.
    let two_tiles = streaming && prefetch != 0 && m - m.min(K::MR) > K::MR / 2;
    let next_panels = K::NV * ctx.groups;
    let prefetch_plan = |row_offset: usize, after_first: bool| -> (usize, u32) {
        match (two_tiles, row_offset == 0) {
            (false, _) => (prefetch, 0),
            (true, true) if !after_first => (prefetch, 0),
            (true, true) => (next_panels, 1),
            // The task's first panels: the first tile prefetched its own, so the second
            // fetches all of the next.
            (true, false) if !after_first => (next_panels, 0),
            (true, false) => (next_panels + ctx.groups.div_ceil(2), 1),
        }
    };
    let k_blocks = ctx.groups.div_ceil(kc).max(1);
    let ld_partial = np * PANEL_COLS;

    let sweep = |i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize, partial: *mut i32| {
        for kb in 0..k_blocks {
            let (g_lo, g_hi) = (kb * kc, ((kb + 1) * kc).min(ctx.groups));
            let mut p = p_lo;
            while p < p_hi {
                let pn = K::NV.min(p_hi - p);
                let mut i = i_lo;
                while i < i_hi {
                    let rows = K::MR.min(i_hi - i);
                    let (pf, pf_shift) = prefetch_plan(i - i_lo, p > p_lo);
                    let at = TileAt {
                        i0: i,
                        p0: p,
                        g_lo,
                        g_hi,
                        partial: if partial.is_null() {
                            partial
                        } else {
                            // SAFETY: inside the task's mc x (np * 16) buffer.
                            unsafe {
                                partial.add((i - i_lo) * ld_partial + (p - p_lo) * PANEL_COLS)
                            }
                        },
                        ld_partial,
                        prefetch: pf,
                        prefetch_shift: pf_shift,
                    };
                    // SAFETY: rows and panels are inside the validated problem.
                    unsafe { kern.tile(ctx, &at, rows, pn) };
                    i += rows;
                }
                p += pn;
            }
        }
    };
    let run_task = |t: usize| {
        // n-block outer: its weights stay in L2 while the row blocks of X stream past.
        let (nb, mb) = (t / m_blocks, t % m_blocks);
        let (i_lo, i_hi) = (mb * mc, ((mb + 1) * mc).min(m));
        let (p_lo, p_hi) = (nb * np, ((nb + 1) * np).min(panels));
        if k_blocks == 1 {
            sweep(i_lo, i_hi, p_lo, p_hi, std::ptr::null_mut());
        } else {
            with_buffer(&PARTIAL, mc * ld_partial, |buf| {
                sweep(i_lo, i_hi, p_lo, p_hi, buf.as_mut_ptr())
            });
        }
    };
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(run_task);
    } else if streaming {
        // Microseconds per product: the spinning team, not rayon's sleeping workers.
        crate::team::run_parts(tasks, threads, &run_task);
    } else {
        (0..tasks).into_par_iter().for_each(run_task);
    }
}

/// Computes row sums into scratch, then runs the tiles.
fn run_with_row_sums<K: TileKernel>(kern: &K, mut ctx: TileCtx, m: usize, parallel: bool) {
    with_buffer(&ROW_SUMS, m, |sums| {
        // SAFETY: `ctx.a` addresses m rows of k bytes with stride lda (validated by callers).
        unsafe { kern.row_sums(ctx.a, ctx.lda, ctx.k, sums) };
        ctx.row_sums = sums.as_ptr();
        run_tiles(kern, &ctx, m, parallel);
    })
}

fn panels_of<'w>(
    op: &'static str,
    backend: &'static str,
    w: &'w PackedInt8,
) -> Result<&'w [Line64]> {
    w.check_layout(op, backend, PackedLayout::VnniPanels16)?;
    Ok(w.panels().expect("layout checked"))
}

/// The three GEMM entry points of a panel backend.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<K: TileKernel>(
    kern: &K,
    backend: &'static str,
    op: &'static str,
    x_q: &[i8],
    m: usize,
    x_scales: Option<ActScales<'_>>,
    w: &PackedInt8,
    out: OutPtr,
    out_len: usize,
    out_scale: Option<f32>,
) -> Result<()> {
    let panels = panels_of(op, backend, w)?;
    let mut tensor_scale = [0.0f32; 1];
    let (row_scale, row_scale_stride) = validate_gemm(
        op,
        x_q.len(),
        m,
        w,
        x_scales.as_ref(),
        out_len,
        &mut tensor_scale,
    )?;
    let inv_out_scale = match out_scale {
        Some(s) => check_out_scale(op, s)?,
        None => 1.0,
    };
    let dequant = !matches!(out, OutPtr::I32(_));
    let ctx = TileCtx {
        a: x_q.as_ptr(),
        lda: w.k(),
        k: w.k(),
        panels: panels.as_ptr(),
        groups: k_groups(w.k()),
        n: w.n(),
        row_sums: std::ptr::null(),
        ep: Epilogue {
            out,
            ldo: w.n(),
            row_scale: row_scale.as_ptr(),
            row_scale_stride,
            col_scale: if dequant {
                w.col_scales().as_ptr()
            } else {
                std::ptr::null()
            },
            bias: match (dequant, w.bias()) {
                (true, Some(b)) => b.as_ptr(),
                _ => std::ptr::null(),
            },
            inv_out_scale,
        },
    };
    run_with_row_sums(kern, ctx, m, true);
    Ok(())
}

/// Batched product for a panel backend: B is packed per batch entry into thread-local scratch.
pub(crate) fn bmm<K: TileKernel>(
    kern: &K,
    a: BatchedI8<'_>,
    b: BatchedI8<'_>,
    b_transposed: bool,
    mut out: BmmOutput<'_>,
) -> Result<()> {
    let shape = validate_bmm("bmm", &a, &b, b_transposed, &out)?;
    let (batch, m, n, k) = (shape.batch, shape.m, shape.n, shape.k);
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let scale = match &out {
        BmmOutput::F32 { scale, .. } => *scale,
        BmmOutput::I32 { .. } => 1.0,
    };
    let (out_base, out_bs, out_rs) = match &mut out {
        BmmOutput::I32 {
            data,
            batch_stride,
            row_stride,
        } => (OutPtr::I32(data.as_mut_ptr()), *batch_stride, *row_stride),
        BmmOutput::F32 {
            data,
            batch_stride,
            row_stride,
            ..
        } => (OutPtr::F32(data.as_mut_ptr()), *batch_stride, *row_stride),
    };
    let (stride_n, stride_k) = if b_transposed {
        (b.row_stride, 1)
    } else {
        (1, b.row_stride)
    };
    let groups = k_groups(k);
    let lines = n.div_ceil(PANEL_COLS) * groups;
    let scale_ptr = SendConstPtr(&scale as *const f32);
    let out_base = OutPtrSend(out_base);

    let one = |bi: usize, parallel: bool| {
        let (out_base, scale_ptr) = (out_base, scale_ptr);
        with_buffer(&PACKED_B, lines, |packed| {
            pack_panels_into(
                &b.data[b.offset(bi, 0, 0)..],
                n,
                k,
                stride_n,
                stride_k,
                packed,
            );
            let at = bi * out_bs;
            // SAFETY: `at` is inside the validated output.
            let out = unsafe {
                match out_base.0 {
                    OutPtr::I32(p) => OutPtr::I32(p.add(at)),
                    OutPtr::F32(p) => OutPtr::F32(p.add(at)),
                    OutPtr::I8(p) => OutPtr::I8(p.add(at)),
                }
            };
            let ctx = TileCtx {
                a: a.data[a.offset(bi, 0, 0)..].as_ptr(),
                lda: a.row_stride,
                k,
                panels: packed.as_ptr(),
                groups,
                n,
                row_sums: std::ptr::null(),
                ep: Epilogue {
                    out,
                    ldo: out_rs,
                    row_scale: scale_ptr.0,
                    row_scale_stride: 0,
                    col_scale: std::ptr::null(),
                    bias: std::ptr::null(),
                    inv_out_scale: 1.0,
                },
            };
            run_with_row_sums(kern, ctx, m, parallel);
        })
    };
    if batch >= rayon::current_num_threads() && m * n * k.max(1) * batch >= SERIAL_WORK {
        (0..batch).into_par_iter().for_each(|bi| one(bi, false));
    } else {
        (0..batch).for_each(|bi| one(bi, true));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct OutPtrSend(OutPtr);
// SAFETY: batch entries write disjoint rows (checked by `validate_bmm`).
unsafe impl Send for OutPtrSend {}
unsafe impl Sync for OutPtrSend {}

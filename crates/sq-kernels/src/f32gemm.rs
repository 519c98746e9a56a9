//! f32 GEMM for the full-precision model: `Y = X · Wᵀ (+ bias)` with W packed once, and a
//! general strided `C = alpha · A · op(B) + beta · C` for attention.
//!
//! B is packed in panels of 16 columns, one 64-byte line per k, so the AVX-512 micro-kernel
//! (8 rows x 48 columns, 24 accumulators) loads whole lines and broadcasts A from memory.
//! Results may differ from [`reference_sgemm`] in the last bits (FMA, summation order).

use crate::error::{check_len, checked_mul, KernelError, Result};
use crate::int8::panel_block;
use crate::scratch::with_buffer;
use rayon::prelude::*;
use std::cell::RefCell;

const PANEL: usize = 16;

/// 16 f32 columns of one k: one cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct LineF32(pub [f32; PANEL]);

thread_local! {
    static PACKED_B: RefCell<Vec<LineF32>> = const { RefCell::new(Vec::new()) };
}

/// f32 weights `W [n, k]` packed once for [`f32_gemm`].
#[derive(Clone, Debug)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    lines: Vec<LineF32>,
}

impl PackedF32 {
    /// Output features (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Bytes of packed weights (what a GEMM streams from memory).
    pub fn weight_bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<LineF32>()
    }

    /// Row `r` of the original weights (`k` values) into `out`: a tied embedding's lookup reads
    /// the LM head's packed copy instead of holding a second one.
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "PackedF32::row_into";
        if r >= self.n {
            return Err(KernelError::ShapeMismatch {
                op: OP,
                detail: format!("row {r} of a [{}, {}] weight", self.n, self.k),
            });
        }
        check_len(OP, "out", || format!("[{}]", self.k), self.k, out.len())?;
        let (p, c) = (r / PANEL, r % PANEL);
        for (o, line) in out
            .iter_mut()
            .zip(&self.lines[p * self.k..(p + 1) * self.k])
        {
            *o = line.0[c];
        }
        Ok(())
    }

    /// The original `[n, k]` row-major weights (exact: packing only moves values).
    /// Multi-threaded on rayon's current pool for large weights.
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0.0f32; n * k];
        if k == 0 {
            return w;
        }
        let unpack_panel = |(rows, panel): (&mut [f32], &[LineF32])| {
            let cols = rows.len() / k;
            for (kk, line) in panel.iter().enumerate() {
                for c in 0..cols {
                    rows[c * k + kk] = line.0[c];
                }
            }
        };
        if n * k >= PARALLEL_PACK {
            w.par_chunks_mut(PANEL * k)
                .zip(self.lines.par_chunks_exact(k))
                .for_each(unpack_panel);
        } else {
            w.chunks_mut(PANEL * k)
                .zip(self.lines.chunks_exact(k))
                .for_each(unpack_panel);
        }
        w
    }

    /// Rows `16 p ..` (panel `p`, up to 16 rows) of the original weights into `out`
    /// (row-major, `k` values a row); returns the number of rows.
    fn panel_rows_into(&self, p: usize, out: &mut [f32]) -> usize {
        let k = self.k;
        let cols = (self.n - p * PANEL).min(PANEL);
        for (kk, line) in self.lines[p * k..(p + 1) * k].iter().enumerate() {
            for c in 0..cols {
                out[c * k + kk] = line.0[c];
            }
        }
        cols
    }

    /// Visit the weights in blocks of up to 16 whole rows: `f(first_row, rows, out)` gets the
    /// block row-major (`k` values a row) with `out`, this block's part of `outputs` (split in
    /// `per_row` items a row). Blocks run in parallel on rayon's pool for large weights; an
    /// error from `f` stops the visit.
    pub fn try_for_each_row_block<T: Send, E: Send + From<KernelError>>(
        &self,
        outputs: &mut [T],
        per_row: usize,
        f: impl Fn(usize, &[f32], &mut [T]) -> std::result::Result<(), E> + Sync,
    ) -> std::result::Result<(), E> {
        let (n, k) = (self.n, self.k);
        if outputs.len() != n * per_row {
            return Err(KernelError::ShapeMismatch {
                op: "PackedF32::try_for_each_row_block",
                detail: format!("{} outputs for {n} rows of {per_row} items", outputs.len()),
            }
            .into());
        }
        if n == 0 {
            return Ok(());
        }
        let visit = |buf: &mut Vec<f32>, (p, out): (usize, &mut [T])| {
            let rows = self.panel_rows_into(p, buf);
            f(p * PANEL, &buf[..rows * k], out)
        };
        let chunk = (PANEL * per_row).max(1);
        if n * k >= PARALLEL_PACK && per_row > 0 {
            outputs
                .par_chunks_mut(chunk)
                .enumerate()
                .try_for_each_init(|| vec![0.0f32; PANEL * k], visit)
        } else {
            let mut buf = vec![0.0f32; PANEL * k];
            if per_row == 0 {
                return (0..n.div_ceil(PANEL)).try_for_each(|p| visit(&mut buf, (p, &mut [])));
            }
            outputs
                .chunks_mut(chunk)
                .enumerate()
                .try_for_each(|item| visit(&mut buf, item))
        }
    }

    /// Multiply input channel (column) `j` of the weights by `scales[j]`, in place: what
    /// scaling every row of the unpacked weights by `scales` gives, without unpacking.
    pub fn scale_columns(&mut self, scales: &[f32]) -> Result<()> {
        let k = self.k;
        check_len(
            "PackedF32::scale_columns",
            "scales",
            || format!("[{k}]"),
            k,
            scales.len(),
        )?;
        if k == 0 {
            return Ok(());
        }
        let scale = |panel: &mut [LineF32]| {
            for (line, &s) in panel.iter_mut().zip(scales) {
                line.0.iter_mut().for_each(|v| *v *= s);
            }
        };
        if self.n * k >= PARALLEL_PACK {
            self.lines.par_chunks_exact_mut(k).for_each(scale);
        } else {
            self.lines.chunks_exact_mut(k).for_each(scale);
        }
        Ok(())
    }

    /// Divide output row `r` of the weights by `divisors[r]` where one is given, in place.
    pub fn divide_rows(&mut self, divisors: &[Option<f32>]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        check_len(
            "PackedF32::divide_rows",
            "divisors",
            || format!("[{n}]"),
            n,
            divisors.len(),
        )?;
        if k == 0 {
            return Ok(());
        }
        let divide = |(p, panel): (usize, &mut [LineF32])| {
            let cols = (n - p * PANEL).min(PANEL);
            for (c, d) in divisors[p * PANEL..p * PANEL + cols].iter().enumerate() {
                if let Some(d) = d {
                    panel.iter_mut().for_each(|line| line.0[c] /= d);
                }
            }
        };
        if n * k >= PARALLEL_PACK {
            self.lines
                .par_chunks_exact_mut(k)
                .enumerate()
                .for_each(divide);
        } else {
            self.lines.chunks_exact_mut(k).enumerate().for_each(divide);
        }
        Ok(())
    }

    /// `out[j] = max(out[j], max_r |W[r, j]|)` for every input channel `j`: the weight range per
    /// input channel (smoothing), accumulated over several weights.
    pub fn column_absmax_into(&self, out: &mut [f32]) -> Result<()> {
        let k = self.k;
        check_len(
            "PackedF32::column_absmax_into",
            "out",
            || format!("[{k}]"),
            k,
            out.len(),
        )?;
        if k == 0 {
            return Ok(());
        }
        // Padding columns hold zeros, which leave a maximum of absolute values unchanged.
        let absmax = |(b, out): (usize, &mut [f32])| {
            let (k0, len) = (b * ABSMAX_BLOCK, out.len());
            for panel in self.lines.chunks_exact(k) {
                for (m, line) in out.iter_mut().zip(&panel[k0..k0 + len]) {
                    *m = line.0.iter().fold(*m, |m, v| m.max(v.abs()));
                }
            }
        };
        if self.n * k >= PARALLEL_PACK {
            out.par_chunks_mut(ABSMAX_BLOCK)
                .enumerate()
                .for_each(absmax);
        } else {
            out.chunks_mut(ABSMAX_BLOCK).enumerate().for_each(absmax);
        }
        Ok(())
    }
}

/// Below this many weights, packing and unpacking stay on the calling thread.
const PARALLEL_PACK: usize = 1 << 16;
/// Input channels a task of [`PackedF32::column_absmax_into`] covers.
const ABSMAX_BLOCK: usize = 256;

/// `len` zero lines from zeroed memory: the pages are touched (and faulted in) only by the
/// threads that pack into them, not by a serial fill first.
fn zeroed_lines(op: &'static str, len: usize) -> Result<Vec<LineF32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout =
        std::alloc::Layout::array::<LineF32>(len).map_err(|_| KernelError::ShapeMismatch {
            op,
            detail: format!("{len} packed lines overflow the address space"),
        })?;
    // SAFETY: the layout has a non-zero size; all-zero bytes are a valid `LineF32` (16 zero
    // floats); the pointer comes from the global allocator with the layout of `len` elements,
    // as `Vec::from_raw_parts` requires.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut LineF32;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

/// Pack `rows` (up to 16 rows of `k` values, row-major) into one panel of `k` lines.
fn pack_panel(rows: &[f32], k: usize, panel: &mut [LineF32]) {
    let cols = rows.len() / k;
    for (kk, line) in panel.iter_mut().enumerate() {
        for c in 0..PANEL {
            line.0[c] = if c < cols { rows[c * k + kk] } else { 0.0 };
        }
    }
}

/// Pack `W [n, k]` produced a block of rows at a time: `fill(first_row, rows)` writes rows
/// `first_row ..` (up to 16, `rows.len() / k` of them, row-major) into `rows`. The blocks are
/// filled and packed in parallel on rayon's pool for large weights, so a converting source
/// (bf16 to f32) is read once and never held whole in f32. An error from `fill` stops packing.
pub fn pack_f32_rows<E: Send + From<KernelError>>(
    n: usize,
    k: usize,
    fill: impl Fn(usize, &mut [f32]) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<PackedF32, E> {
    let len = checked_mul("pack_f32_rows", n.div_ceil(PANEL), k)?;
    let mut lines = zeroed_lines("pack_f32_rows", len)?;
    if k > 0 {
        let pack = |buf: &mut Vec<f32>, (p, panel): (usize, &mut [LineF32])| {
            let rows = (n - p * PANEL).min(PANEL);
            let block = &mut buf[..rows * k];
            fill(p * PANEL, block)?;
            pack_panel(block, k, panel);
            Ok::<(), E>(())
        };
        if n * k >= PARALLEL_PACK {
            lines
                .par_chunks_exact_mut(k)
                .enumerate()
                .try_for_each_init(|| vec![0.0f32; PANEL * k], pack)?;
        } else {
            let mut buf = vec![0.0f32; PANEL * k];
            lines
                .chunks_exact_mut(k)
                .enumerate()
                .try_for_each(|item| pack(&mut buf, item))?;
        }
    }
    Ok(PackedF32 { n, k, lines })
}

/// Packs B (`n` columns by `k`; element `(j, kk)` at `src[j * stride_n + kk * stride_k]`) into
/// `ceil(n/16) * k` lines, zero-padded.
fn pack_into(
    src: &[f32],
    n: usize,
    k: usize,
    stride_n: usize,
    stride_k: usize,
    dst: &mut [LineF32],
) {
    debug_assert_eq!(dst.len(), n.div_ceil(PANEL) * k);
    if k == 0 {
        return;
    }
    for (p, panel) in dst.chunks_exact_mut(k).enumerate() {
        let cols = (n - p * PANEL).min(PANEL);
        for (kk, line) in panel.iter_mut().enumerate() {
            let base = p * PANEL * stride_n + kk * stride_k;
            for c in 0..PANEL {
                line.0[c] = if c < cols {
                    src[base + c * stride_n]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs `w [n, k]` (row-major, nn.Linear layout) for [`f32_gemm`].
pub fn pack_f32(w: &[f32], n: usize, k: usize) -> Result<PackedF32> {
    const OP: &str = "pack_f32";
    check_len(
        OP,
        "w",
        || format!("[{n}, {k}]"),
        checked_mul(OP, n, k)?,
        w.len(),
    )?;
    let mut lines = zeroed_lines(OP, n.div_ceil(PANEL) * k)?;
    if k > 0 {
        let pack = |(p, panel): (usize, &mut [LineF32])| {
            let rows = &w[p * PANEL * k..((p + 1) * PANEL).min(n) * k];
            pack_panel(rows, k, panel);
        };
        if n * k >= PARALLEL_PACK {
            lines.par_chunks_exact_mut(k).enumerate().for_each(pack);
        } else {
            lines.chunks_exact_mut(k).enumerate().for_each(pack);
        }
    }
    Ok(PackedF32 { n, k, lines })
}

/// A read-only strided matrix: element `(r, c)` at `data[r * row_stride + c]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

/// A mutable strided matrix: element `(r, c)` at `data[r * row_stride + c]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }
}

impl<'a> MatMut<'a> {
    /// A dense row-major `[rows, cols]` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }
}

fn check_strided(
    op: &'static str,
    operand: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if rows > 1 && row_stride < cols {
        return Err(KernelError::ShapeMismatch {
            op,
            detail: format!("`{operand}` [{rows}, {cols}] has row stride {row_stride} < {cols}"),
        });
    }
    let need = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|v| v.checked_add(cols))
        .ok_or_else(|| KernelError::ShapeMismatch {
            op,
            detail: format!("`{operand}` strides overflow usize"),
        })?;
    if len < need {
        return Err(KernelError::BadLength {
            op,
            operand,
            shape: format!("[{rows}, {cols}] with row stride {row_stride}"),
            expected: need,
            actual: len,
        });
    }
    Ok(())
}

/// Whether `op(B)` is B or its transpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// B is `[k, n]`.
    No,
    /// B is `[n, k]` and the product uses Bᵀ (e.g. `Q · Kᵀ`, or nn.Linear weights).
    Yes,
}

/// Everything a tile reads; pointers valid for the call, tiles write disjoint outputs.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    a: *const f32,
    lda: usize,
    k: usize,
    panels: *const LineF32,
    /// Lines from one panel to the next (`k`, or more for a k window of a [`PackedB`]).
    pstride: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    bias: *const f32,
}
// SAFETY: see the struct docs.
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

/// A micro-tile's origin and its slice `k_lo..k_hi` of the reduction.
#[derive(Clone, Copy, Debug)]
struct At {
    i0: usize,
    p0: usize,
    k_lo: usize,
    k_hi: usize,
}

/// k per block: 3 panels x 16 columns x 128 k x 4 bytes = 24 KiB of B stays in L1.
const KC: usize = 128;

impl Ctx {
    /// Scalar epilogue: `alpha · acc (+ beta · c) (+ bias)` for the first k block, then
    /// `c += alpha · acc` for the others.
    #[inline(always)]
    unsafe fn store(&self, i: usize, j: usize, acc: f32, first_block: bool) {
        let dst = self.c.add(i * self.ldc + j);
        let mut v = acc * self.alpha;
        if !first_block {
            v += *dst;
        } else {
            if self.beta != 0.0 {
                v += self.beta * *dst;
            }
            if !self.bias.is_null() {
                v += *self.bias.add(j);
            }
        }
        *dst = v;
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        Kernel::Portable
    }

    fn mr(self) -> usize {
        match self {
            Kernel::Portable => 4,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => 8,
        }
    }

    fn nv(self) -> usize {
        match self {
            Kernel::Portable => 1,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => 3,
        }
    }

    /// # Safety
    /// Rows `i0..i0 + rows` (`<= mr`) and panels `p0..p0 + panels` (`<= nv`) exist in `ctx`.
    unsafe fn tile(self, ctx: &Ctx, at: &At, rows: usize, panels: usize) {
        match self {
            Kernel::Portable => {
                dispatch_tile!(tile_portable(ctx, at), rows, panels, [1 2 3 4], [1])
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                dispatch_tile!(tile_avx512(ctx, at), rows, panels, [1 2 3 4 5 6 7 8], [1 2 3])
            }
        }
    }
}

/// # Safety
/// As [`Kernel::tile`].
#[inline(always)]
unsafe fn tile_portable<const R: usize, const V: usize>(ctx: &Ctx, at: &At) {
    let (i0, p0) = (at.i0, at.p0);
    let mut acc = [[[0.0f32; PANEL]; V]; R];
    for kk in at.k_lo..at.k_hi {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = *ctx.a.add((i0 + r) * ctx.lda + kk);
            for (v, acc_v) in acc_r.iter_mut().enumerate() {
                let line = &(*ctx.panels.add((p0 + v) * ctx.pstride + kk)).0;
                for (a, &b) in acc_v.iter_mut().zip(line) {
                    *a += x * b;
                }
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (v, acc_v) in acc_r.iter().enumerate() {
            let j0 = (p0 + v) * PANEL;
            for (c, &a) in acc_v.iter().enumerate().take(ctx.n - j0) {
                ctx.store(i0 + r, j0 + c, a, at.k_lo == 0);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::tile as tile_avx512;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{At, Ctx, PANEL};
    use std::arch::x86_64::*;

    /// # Safety
    /// Needs AVX-512 F; rows `i0..i0 + R` and panels `p0..p0 + V` exist in `ctx`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize, const V: usize>(ctx: &Ctx, at: &At) {
        let (i0, p0) = (at.i0, at.p0);
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let b0 = ctx.panels.add(p0 * ctx.pstride) as *const f32;
        let a0 = ctx.a.add(i0 * ctx.lda);
        for kk in at.k_lo..at.k_hi {
            let mut b = [_mm512_setzero_ps(); V];
            for (v, bv) in b.iter_mut().enumerate() {
                *bv = _mm512_load_ps(b0.add((v * ctx.pstride + kk) * PANEL));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a0.add(r * ctx.lda + kk));
                for (a, &bv) in acc_r.iter_mut().zip(&b) {
                    *a = _mm512_fmadd_ps(bv, x, *a);
                }
            }
        }
        let alpha = _mm512_set1_ps(ctx.alpha);
        let beta = _mm512_set1_ps(ctx.beta);
        // Copy out once so the k loop keeps the accumulators in registers.
        let result = acc;
        for (r, acc_r) in result.iter().enumerate() {
            let row = ctx.c.add((i0 + r) * ctx.ldc);
            for (v, &a) in acc_r.iter().enumerate() {
                let j = (p0 + v) * PANEL;
                let rem = ctx.n - j;
                let mask: __mmask16 = if rem >= PANEL {
                    0xFFFF
                } else {
                    ((1u32 << rem) - 1) as __mmask16
                };
                let mut y = _mm512_mul_ps(a, alpha);
                if at.k_lo != 0 {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, row.add(j)));
                } else {
                    if ctx.beta != 0.0 {
                        y = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(mask, row.add(j)), y);
                    }
                    if !ctx.bias.is_null() {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, ctx.bias.add(j)));
                    }
                }
                _mm512_mask_storeu_ps(row.add(j), mask, y);
            }
        }
    }
}

/// Below this many multiply-adds a call stays on the calling thread.
const SERIAL_WORK: usize = 1 << 20;
/// The same threshold for decode-sized m (at most one row tile).
const STREAMING_SERIAL_WORK: usize = 1 << 17;
/// Rows a task keeps hot while it sweeps its panels.
const MC: usize = 64;

fn run(kernel: Kernel, ctx: &Ctx, m: usize, parallel: bool) {
    let n = ctx.n;
    if m == 0 || n == 0 {
        return;
    }
    let (mr, nv) = (kernel.mr(), kernel.nv());
    let panels = n.div_ceil(PANEL);
    let work = m.saturating_mul(n).saturating_mul(ctx.k.max(1));
    // Decode-sized m streams the weights once, bound by read bandwidth that a second core
    // raises: split from a smaller size, on the spinning team (see `crate::team`).
    let streaming = m <= mr;
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
    let mc = m.min(MC);
    let m_blocks = m.div_ceil(mc);
    let np = panel_block(panels, m_blocks, threads, nv);
    let n_blocks = panels.div_ceil(np);
    let tasks = m_blocks * n_blocks;
    let k_blocks = ctx.k.div_ceil(KC).max(1);
    let task = |t: usize| {
        // m-block outer: its rows of A (f32, 4x the INT8 bytes) stay in L2 while the
        // contiguous weight panels stream past.
        let (mb, nb) = (t / n_blocks, t % n_blocks);
        let (i_lo, i_hi) = (mb * mc, ((mb + 1) * mc).min(m));
        let (p_lo, p_hi) = (nb * np, ((nb + 1) * np).min(panels));
        // k blocks outer: the first writes C (beta, bias), the others accumulate into it.
        for kb in 0..k_blocks {
            let (k_lo, k_hi) = (kb * KC, ((kb + 1) * KC).min(ctx.k));
            let mut p = p_lo;
            while p < p_hi {
                let pn = nv.min(p_hi - p);
                let mut i = i_lo;
                while i < i_hi {
                    let rows = mr.min(i_hi - i);
                    let at = At {
                        i0: i,
                        p0: p,
                        k_lo,
                        k_hi,
                    };
                    // SAFETY: the tile lies inside the validated problem.
                    unsafe { kernel.tile(ctx, &at, rows, pn) };
                    i += rows;
                }
                p += pn;
            }
        }
    };
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(task);
    } else if streaming {
        crate::team::run_parts(tasks, threads, &task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// `out [m, n] = x [m, k] · Wᵀ + bias`, W packed by [`pack_f32`]; multi-threaded on rayon's
/// current pool (split over N for small m).
pub fn f32_gemm(
    x: &[f32],
    m: usize,
    w: &PackedF32,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "f32_gemm";
    let (n, k) = (w.n, w.k);
    check_len(
        OP,
        "x",
        || format!("[{m}, {k}]"),
        checked_mul(OP, m, k)?,
        x.len(),
    )?;
    check_len(
        OP,
        "out",
        || format!("[{m}, {n}]"),
        checked_mul(OP, m, n)?,
        out.len(),
    )?;
    if let Some(b) = bias {
        check_len(OP, "bias", || format!("[{n}]"), n, b.len())?;
    }
    let ctx = Ctx {
        a: x.as_ptr(),
        lda: k,
        k,
        panels: w.lines.as_ptr(),
        pstride: k,
        n,
        c: out.as_mut_ptr(),
        ldc: n,
        alpha: 1.0,
        beta: 0.0,
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
    };
    run(Kernel::best(), &ctx, m, true);
    Ok(())
}

/// General strided `C = alpha · A · op(B) + beta · C`; A is `[m, k]`, `op(B)` is `[k, n]`,
/// C is `[m, n]`. When `beta == 0`, C is not read (it may hold NaN). B is packed per call into
/// thread-local scratch. Multi-threaded on rayon's current pool.
pub fn sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    b_op: Transpose,
    beta: f32,
    c: MatMut<'_>,
) -> Result<()> {
    sgemm_with(Kernel::best(), alpha, a, b, b_op, beta, c, true)
}

/// [`sgemm`] on the calling thread only, for callers that already parallelize (e.g. over
/// attention heads).
pub fn sgemm_serial(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    b_op: Transpose,
    beta: f32,
    c: MatMut<'_>,
) -> Result<()> {
    sgemm_with(Kernel::best(), alpha, a, b, b_op, beta, c, false)
}

#[allow(clippy::too_many_arguments)]
fn sgemm_with(
    kernel: Kernel,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    b_op: Transpose,
    beta: f32,
    c: MatMut<'_>,
    parallel: bool,
) -> Result<()> {
    const OP: &str = "sgemm";
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = match b_op {
        Transpose::No => (b.rows, b.cols),
        Transpose::Yes => (b.cols, b.rows),
    };
    if bk != k || c.rows != m || c.cols != n {
        return Err(KernelError::ShapeMismatch {
            op: OP,
            detail: format!(
                "A is [{m}, {k}], op(B) is [{bk}, {n}] (B [{}, {}], transpose {:?}), C is [{}, {}]",
                b.rows, b.cols, b_op, c.rows, c.cols
            ),
        });
    }
    check_strided(OP, "a", a.data.len(), a.rows, a.cols, a.row_stride)?;
    check_strided(OP, "b", b.data.len(), b.rows, b.cols, b.row_stride)?;
    check_strided(OP, "c", c.data.len(), c.rows, c.cols, c.row_stride)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (stride_n, stride_k) = match b_op {
        Transpose::No => (1, b.row_stride),
        Transpose::Yes => (b.row_stride, 1),
    };
    let lines = n.div_ceil(PANEL) * k;
    with_buffer(&PACKED_B, lines, |packed| {
        pack_into(b.data, n, k, stride_n, stride_k, packed);
        let ctx = Ctx {
            a: a.data.as_ptr(),
            lda: a.row_stride,
            k,
            panels: packed.as_ptr(),
            pstride: k,
            n,
            c: c.data.as_mut_ptr(),
            ldc: c.row_stride,
            alpha,
            beta,
            bias: std::ptr::null(),
        };
        run(kernel, &ctx, m, parallel);
    });
    Ok(())
}

/// `op(B)` (`[k, n]`) packed once for several [`sgemm_packed_serial`] calls, each over a window
/// of its k rows and a prefix of its panels (e.g. the keys and values of one attention head,
/// used by every causal block of a prefill chunk). Grows, never shrinks, across [`PackedB::pack`].
#[derive(Debug, Default)]
pub struct PackedB {
    lines: Vec<LineF32>,
    n: usize,
    k: usize,
}

impl PackedB {
    pub fn new() -> Self {
        Self::default()
    }

    /// Columns of `op(B)`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows of `op(B)` (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Packs `op(B)` for `b` as [`sgemm`] reads it.
    pub fn pack(&mut self, b: MatRef<'_>, b_op: Transpose) -> Result<()> {
        check_strided(
            "PackedB::pack",
            "b",
            b.data.len(),
            b.rows,
            b.cols,
            b.row_stride,
        )?;
        let (k, n, stride_n, stride_k) = match b_op {
            Transpose::No => (b.rows, b.cols, 1, b.row_stride),
            Transpose::Yes => (b.cols, b.rows, b.row_stride, 1),
        };
        let lines = checked_mul("PackedB::pack", n.div_ceil(PANEL), k)?;
        if self.lines.len() < lines {
            self.lines.resize(lines, LineF32([0.0; PANEL]));
        }
        pack_into(b.data, n, k, stride_n, stride_k, &mut self.lines[..lines]);
        self.n = n;
        self.k = k;
        Ok(())
    }
}

/// `C = alpha · A · op(B)[k_lo .. k_lo + A.cols, n_lo .. n_lo + C.cols] + beta · C` on the
/// calling thread, with `op(B)` packed in `b`; `n_lo` must be a multiple of 16 (a panel edge).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed_serial(
    alpha: f32,
    a: MatRef<'_>,
    b: &PackedB,
    k_lo: usize,
    n_lo: usize,
    beta: f32,
    c: MatMut<'_>,
) -> Result<()> {
    const OP: &str = "sgemm_packed_serial";
    let (m, k, n) = (a.rows, a.cols, c.cols);
    if c.rows != m
        || !n_lo.is_multiple_of(PANEL)
        || k_lo.checked_add(k).is_none_or(|e| e > b.k)
        || n_lo.checked_add(n).is_none_or(|e| e > b.n)
    {
        return Err(KernelError::ShapeMismatch {
            op: OP,
            detail: format!(
                "A is [{m}, {k}], C is [{}, {n}], window k {k_lo}.. n {n_lo}.. of a packed op(B) of [{}, {}] (n start must be a multiple of {PANEL})",
                c.rows, b.k, b.n
            ),
        });
    }
    check_strided(OP, "a", a.data.len(), a.rows, a.cols, a.row_stride)?;
    check_strided(OP, "c", c.data.len(), c.rows, c.cols, c.row_stride)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ctx = Ctx {
        a: a.data.as_ptr(),
        lda: a.row_stride,
        k,
        // SAFETY (of the offset): inside the packed lines, checked above.
        panels: b.lines[(n_lo / PANEL) * b.k + k_lo..].as_ptr(),
        pstride: b.k,
        n,
        c: c.data.as_mut_ptr(),
        ldc: c.row_stride,
        alpha,
        beta,
        bias: std::ptr::null(),
    };
    run(Kernel::best(), &ctx, m, false);
    Ok(())
}

/// Scalar `C = alpha · A · op(B) + beta · C`, the oracle for tests (k summed in order, no FMA).
pub fn reference_sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    b_op: Transpose,
    beta: f32,
    c: MatMut<'_>,
) -> Result<()> {
    const OP: &str = "reference_sgemm";
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = match b_op {
        Transpose::No => (b.rows, b.cols),
        Transpose::Yes => (b.cols, b.rows),
    };
    if bk != k || c.rows != m || c.cols != n {
        return Err(KernelError::ShapeMismatch {
            op: OP,
            detail: format!(
                "A is [{m}, {k}], op(B) is [{bk}, {n}], C is [{}, {}]",
                c.rows, c.cols
            ),
        });
    }
    check_strided(OP, "a", a.data.len(), a.rows, a.cols, a.row_stride)?;
    check_strided(OP, "b", b.data.len(), b.rows, b.cols, b.row_stride)?;
    check_strided(OP, "c", c.data.len(), c.rows, c.cols, c.row_stride)?;
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for kk in 0..k {
                let bv = match b_op {
                    Transpose::No => b.data[kk * b.row_stride + j],
                    Transpose::Yes => b.data[j * b.row_stride + kk],
                };
                acc += a.data[i * a.row_stride + kk] * bv;
            }
            let dst = &mut c.data[i * c.row_stride + j];
            *dst = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * *dst
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable kernel against the oracle (the AVX-512 one is covered by the public tests).
    #[test]
    fn unpack_inverts_pack() {
        for (n, k) in [(1, 1), (17, 3), (32, 0), (5, 40), (33, 65)] {
            let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 7.0).collect();
            assert_eq!(pack_f32(&w, n, k).unwrap().unpack(), w, "{n}x{k}");
        }
    }

    /// The in-place operations on packed weights give exactly what the same operation on the
    /// unpacked weights gives, on both sides of the parallel threshold.
    #[test]
    fn packed_operations_match_the_unpacked_ones() {
        for (n, k) in [(1, 1), (17, 3), (32, 0), (33, 65), (300, 257)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let scales: Vec<f32> = (0..k).map(|j| 0.5 + (j % 7) as f32 / 3.0).collect();
            let divisors: Vec<Option<f32>> = (0..n)
                .map(|r| (r % 3 != 0).then_some(1.0 + (r % 5) as f32 / 4.0))
                .collect();

            let mut want = w.clone();
            if k > 0 {
                for row in want.chunks_exact_mut(k) {
                    row.iter_mut().zip(&scales).for_each(|(v, s)| *v *= s);
                }
                for (row, d) in want.chunks_exact_mut(k).zip(&divisors) {
                    if let Some(d) = d {
                        row.iter_mut().for_each(|v| *v /= d);
                    }
                }
            }
            let mut packed = pack_f32(&w, n, k).unwrap();
            packed.scale_columns(&scales).unwrap();
            packed.divide_rows(&divisors).unwrap();
            assert_eq!(packed.unpack(), want, "{n}x{k}");

            let mut absmax = vec![0.25f32; k];
            packed.column_absmax_into(&mut absmax).unwrap();
            let mut expect = vec![0.25f32; k];
            for row in want.chunks_exact(k.max(1)).take(if k == 0 { 0 } else { n }) {
                expect
                    .iter_mut()
                    .zip(row)
                    .for_each(|(m, v)| *m = m.max(v.abs()));
            }
            assert_eq!(absmax, expect, "{n}x{k}");

            let from_rows = pack_f32_rows(n, k, |r0, rows: &mut [f32]| {
                rows.copy_from_slice(&w[r0 * k..r0 * k + rows.len()]);
                Ok::<(), KernelError>(())
            })
            .unwrap();
            assert_eq!(from_rows.unpack(), w, "{n}x{k}");

            let mut seen = vec![0.0f32; n * k];
            packed
                .try_for_each_row_block(&mut seen, k, |_, rows, out| {
                    out.copy_from_slice(rows);
                    Ok::<(), KernelError>(())
                })
                .unwrap();
            assert_eq!(seen, want, "{n}x{k}");
        }
        let mut packed = pack_f32(&[1.0; 6], 2, 3).unwrap();
        assert!(packed.scale_columns(&[1.0; 2]).is_err());
        assert!(packed.divide_rows(&[None; 3]).is_err());
        assert!(packed.column_absmax_into(&mut [0.0; 4]).is_err());
        let stop = pack_f32_rows(40, 3, |r0, _: &mut [f32]| {
            if r0 == 32 {
                Err(KernelError::ShapeMismatch {
                    op: "test",
                    detail: "stop".into(),
                })
            } else {
                Ok(())
            }
        });
        assert!(stop.is_err());
    }

    #[test]
    fn rows_of_the_packed_weights() {
        let (n, k) = (33, 65);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.25 - 3.0).collect();
        let packed = pack_f32(&w, n, k).unwrap();
        let mut row = vec![0.0; k];
        for r in 0..n {
            packed.row_into(r, &mut row).unwrap();
            assert_eq!(&row[..], &w[r * k..(r + 1) * k], "row {r}");
        }
        assert!(packed.row_into(n, &mut row).is_err());
        assert!(packed.row_into(0, &mut row[1..]).is_err());
    }

    #[test]
    fn portable_kernel_matches_reference() {
        for (m, n, k) in [(1, 1, 1), (5, 17, 3), (9, 33, 20), (4, 48, 0), (13, 50, 37)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                .collect();
            let mut got = vec![1.0f32; m * n];
            let mut want = vec![1.0f32; m * n];
            for (op, bm) in [
                (Transpose::Yes, MatRef::new(&b, n, k)),
                (Transpose::No, MatRef::new(&b, k, n)),
            ] {
                sgemm_with(
                    Kernel::Portable,
                    0.5,
                    MatRef::new(&a, m, k),
                    bm,
                    op,
                    0.25,
                    MatMut::new(&mut got, m, n),
                    false,
                )
                .unwrap();
                reference_sgemm(
                    0.5,
                    MatRef::new(&a, m, k),
                    bm,
                    op,
                    0.25,
                    MatMut::new(&mut want, m, n),
                )
                .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{n}x{k} {op:?}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

//! Packing of i8 weights into [`PackedLayout::VnniPanels16`](super::PackedLayout) panels.

use super::PANEL_COLS;

/// One cache line: 16 columns x 4 consecutive k of `w + 128` (u8), column-major within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct Line64(pub [u8; 64]);

impl Default for Line64 {
    /// Padding value: `0 + 128`, i.e. a zero weight.
    fn default() -> Self {
        Line64([0x80; 64])
    }
}

/// Lines per panel for reduction length `k`.
pub(crate) fn k_groups(k: usize) -> usize {
    k.div_ceil(4)
}

/// Packs B (`n` columns by `k`), element `(j, kk)` at `src[j * stride_n + kk * stride_k]`,
/// into `dst` (resized to `ceil(n/16) * ceil(k/4)` lines, panel-major).
///
/// The u8 offset (`w ^ 0x80 == w + 128`) lets `vpdpbusd` take the weights as its unsigned
/// operand and the activations, signed, straight from memory as a broadcast; the kernels
/// subtract `128 · Σ_k x` afterwards.
pub(crate) fn pack_panels(
    src: &[i8],
    n: usize,
    k: usize,
    stride_n: usize,
    stride_k: usize,
    dst: &mut Vec<Line64>,
) {
    let groups = k_groups(k);
    let panels = n.div_ceil(PANEL_COLS);
    dst.clear();
    dst.resize(panels * groups, Line64::default());
    pack_panels_into(src, n, k, stride_n, stride_k, dst);
}

/// As [`pack_panels`], into a slice of exactly `ceil(n/16) * ceil(k/4)` lines.
pub(crate) fn pack_panels_into(
    src: &[i8],
    n: usize,
    k: usize,
    stride_n: usize,
    stride_k: usize,
    dst: &mut [Line64],
) {
    let groups = k_groups(k);
    debug_assert_eq!(dst.len(), n.div_ceil(PANEL_COLS) * groups);
    for (p, panel) in dst.chunks_exact_mut(groups.max(1)).enumerate() {
        if groups == 0 {
            break;
        }
        for line in panel.iter_mut() {
            *line = Line64::default();
        }
        let cols = (n - p * PANEL_COLS).min(PANEL_COLS);
        if stride_k == 1 {
            // Rows of B contiguous along k (weights, attention keys): 4 bytes per column and line.
            for c in 0..cols {
                let row = &src[(p * PANEL_COLS + c) * stride_n..][..k];
                for (line, quad) in panel.iter_mut().zip(row.chunks(4)) {
                    for (d, &w) in line.0[c * 4..].iter_mut().zip(quad) {
                        *d = (w as u8) ^ 0x80;
                    }
                }
            }
        } else if stride_n == 1 {
            // Columns contiguous (attention values `[keys, head_dim]`): one source row per k.
            for kk in 0..k {
                let row = &src[kk * stride_k + p * PANEL_COLS..][..cols];
                let (line, off) = (&mut panel[kk / 4].0, kk % 4);
                for (c, &w) in row.iter().enumerate() {
                    line[c * 4 + off] = (w as u8) ^ 0x80;
                }
            }
        } else {
            for c in 0..cols {
                let base = (p * PANEL_COLS + c) * stride_n;
                for kk in 0..k {
                    let w = src[base + kk * stride_k];
                    panel[kk / 4].0[c * 4 + kk % 4] = (w as u8) ^ 0x80;
                }
            }
        }
    }
}

//! The scalar oracle: plain loops over the unpacked operands, single-threaded.

use super::{
    check_out_scale, dequantize_acc, requantize, validate_bmm, validate_gemm, ActScales, BatchedI8,
    BmmOutput, Int8Gemm, PackedInt8, PackedLayout,
};
use crate::error::Result;

/// Scalar reference backend: the definition every other backend must match bit for bit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Reference {
    pub const NAME: &'static str = "reference";

    /// Always available.
    pub fn new() -> Option<Self> {
        Some(Reference)
    }
}

/// `Σ_k x[k]·w[k]` in exact INT32 arithmetic.
fn dot(x: &[i8], w: &[i8]) -> i32 {
    x.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum()
}

impl Reference {
    fn weights<'w>(&self, op: &'static str, w: &'w PackedInt8) -> Result<&'w [i8]> {
        w.check_layout(op, Self::NAME, PackedLayout::RowMajor)?;
        Ok(w.row_major().expect("layout checked"))
    }

    /// Calls `f(i, j, acc)` for every output element after validating the operands.
    #[allow(clippy::too_many_arguments)]
    fn for_each_acc(
        &self,
        op: &'static str,
        x_q: &[i8],
        m: usize,
        x_scales: Option<&ActScales<'_>>,
        w: &PackedInt8,
        out_len: usize,
        mut f: impl FnMut(usize, usize, i32, f32),
    ) -> Result<()> {
        let wq = self.weights(op, w)?;
        let mut storage = [0.0f32; 1];
        let (row_scales, stride) =
            validate_gemm(op, x_q.len(), m, w, x_scales, out_len, &mut storage)?;
        let (n, k) = (w.n(), w.k());
        for i in 0..m {
            let x_row = &x_q[i * k..(i + 1) * k];
            for j in 0..n {
                f(
                    i,
                    j,
                    dot(x_row, &wq[j * k..(j + 1) * k]),
                    row_scales[i * stride],
                );
            }
        }
        Ok(())
    }
}

impl Int8Gemm for Reference {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn layout(&self) -> PackedLayout {
        PackedLayout::RowMajor
    }

    fn gemm_i32_out(&self, x_q: &[i8], m: usize, w: &PackedInt8, out: &mut [i32]) -> Result<()> {
        let n = w.n();
        let len = out.len();
        self.for_each_acc("gemm_i32_out", x_q, m, None, w, len, |i, j, acc, _| {
            out[i * n + j] = acc
        })
    }

    fn gemm_f32_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out: &mut [f32],
    ) -> Result<()> {
        let n = w.n();
        let len = out.len();
        let (scales, bias) = (w.col_scales(), w.bias());
        self.for_each_acc(
            "gemm_f32_out",
            x_q,
            m,
            Some(&x_scales),
            w,
            len,
            |i, j, acc, dx| {
                out[i * n + j] = dequantize_acc(acc, dx, scales[j], bias.map(|b| b[j]));
            },
        )
    }

    fn gemm_i8_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out_scale: f32,
        out: &mut [i8],
    ) -> Result<()> {
        let inv = check_out_scale("gemm_i8_out", out_scale)?;
        let n = w.n();
        let len = out.len();
        let (scales, bias) = (w.col_scales(), w.bias());
        self.for_each_acc(
            "gemm_i8_out",
            x_q,
            m,
            Some(&x_scales),
            w,
            len,
            |i, j, acc, dx| {
                let y = dequantize_acc(acc, dx, scales[j], bias.map(|b| b[j]));
                out[i * n + j] = requantize(y, inv);
            },
        )
    }

    fn bmm(
        &self,
        a: BatchedI8<'_>,
        b: BatchedI8<'_>,
        b_transposed: bool,
        mut out: BmmOutput<'_>,
    ) -> Result<()> {
        let s = validate_bmm("bmm", &a, &b, b_transposed, &out)?;
        for bi in 0..s.batch {
            for i in 0..s.m {
                for j in 0..s.n {
                    let mut acc = 0i32;
                    for kk in 0..s.k {
                        let bv = if b_transposed {
                            b.data[b.offset(bi, j, kk)]
                        } else {
                            b.data[b.offset(bi, kk, j)]
                        };
                        acc += a.data[a.offset(bi, i, kk)] as i32 * bv as i32;
                    }
                    match &mut out {
                        BmmOutput::I32 {
                            data,
                            batch_stride,
                            row_stride,
                        } => data[bi * *batch_stride + i * *row_stride + j] = acc,
                        BmmOutput::F32 {
                            data,
                            batch_stride,
                            row_stride,
                            scale,
                        } => data[bi * *batch_stride + i * *row_stride + j] = acc as f32 * *scale,
                    }
                }
            }
        }
        Ok(())
    }
}

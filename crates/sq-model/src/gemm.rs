//! f32 matrix products used by the FP path.

use rayon::prelude::*;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize without reassociation flags.
    let mut acc = [0.0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0;
    for i in chunks * 16..a.len() {
        s += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + s
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias`.
pub fn matmul_xwt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in y.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return;
    }
    // Split over output columns for small m (decode), over rows for large m.
    if m < 8 {
        for (i, yr) in y.chunks_exact_mut(n).enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            yr.par_chunks_mut(64).enumerate().for_each(|(c, out)| {
                for (j, o) in out.iter_mut().enumerate() {
                    let col = c * 64 + j;
                    *o = dot(xr, &w[col * k..(col + 1) * k]) + bias.map_or(0.0, |b| b[col]);
                }
            });
        }
    } else {
        y.par_chunks_mut(n * 4).enumerate().for_each(|(c, out)| {
            let rows = out.len() / n;
            // Walk weight rows in the outer loop so each is read once per block of 4 rows.
            for col in 0..n {
                let wr = &w[col * k..(col + 1) * k];
                let b = bias.map_or(0.0, |b| b[col]);
                for r in 0..rows {
                    let i = c * 4 + r;
                    out[r * n + col] = dot(&x[i * k..(i + 1) * k], wr) + b;
                }
            }
        });
    }
}

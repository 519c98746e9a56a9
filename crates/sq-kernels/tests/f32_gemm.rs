//! The f32 path against the scalar oracle, on odd shapes and strides.

mod common;

use common::Rng;
use sq_kernels::{
    f32_gemm, pack_f32, reference_sgemm, sgemm, sgemm_packed_serial, sgemm_serial, KernelError,
    MatMut, MatRef, PackedB, Transpose,
};

fn assert_close(got: &[f32], want: &[f32], k: usize, ctx: &str) {
    // Inputs in [-1, 1]: the summation-order error grows with k.
    let tol = 1e-5 * (k as f32 + 1.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{ctx}: element {i}: {g} vs {w}"
        );
    }
}

const EDGES: [usize; 6] = [1, 7, 8, 9, 17, 49];

/// Decode-sized products large enough to split over output panels on several threads give
/// the serial result bit for bit.
#[test]
fn decode_sized_split_products_equal_the_serial_ones() {
    let mut rng = Rng::new(12);
    for (m, n, k) in [(1, 1536, 576), (1, 3001, 130), (3, 1000, 300)] {
        let x = rng.f32s(m * k, -1.0, 1.0);
        let w = rng.f32s(n * k, -1.0, 1.0);
        let bias = rng.f32s(n, -1.0, 1.0);
        let packed = pack_f32(&w, n, k).unwrap();
        let mut outs = Vec::new();
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![f32::NAN; m * n];
            pool.install(|| f32_gemm(&x, m, &packed, Some(&bias), &mut out))
                .unwrap();
            outs.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        assert!(outs.windows(2).all(|p| p[0] == p[1]), "{m}x{n}x{k}");
        let mut want = vec![0f32; m * n];
        reference_sgemm(
            1.0,
            MatRef::new(&x, m, k),
            MatRef::new(&w, n, k),
            Transpose::Yes,
            0.0,
            MatMut::new(&mut want, m, n),
        )
        .unwrap();
        for (i, v) in want.iter_mut().enumerate() {
            *v += bias[i % n];
        }
        let got: Vec<f32> = outs[0].iter().map(|&b| f32::from_bits(b)).collect();
        assert_close(&got, &want, k, &format!("split f32_gemm {m}x{n}x{k}"));
    }
}

/// A packed op(B) used over windows of its k rows and panel-aligned column ranges equals the
/// reference on the same sub-matrix; windows outside it are errors.
#[test]
fn packed_b_windows_match_the_reference() {
    let mut rng = Rng::new(13);
    let mut packed = PackedB::new();
    // (b rows, b cols, transpose, m, k_lo, k, n_lo, n); b is stored with a wider row stride.
    for (br, bc, op, m, k_lo, k, n_lo, n) in [
        (100, 64, Transpose::Yes, 9, 0, 64, 0, 100),
        (100, 64, Transpose::Yes, 9, 0, 64, 32, 50),
        (100, 64, Transpose::Yes, 3, 5, 40, 16, 7),
        (70, 24, Transpose::No, 11, 0, 70, 0, 24),
        (70, 24, Transpose::No, 11, 13, 50, 16, 8),
        (70, 24, Transpose::No, 1, 69, 1, 0, 24),
    ] {
        let stride = bc + 3;
        let b = rng.f32s(br * stride, -1.0, 1.0);
        let bm = MatRef {
            data: &b,
            rows: br,
            cols: bc,
            row_stride: stride,
        };
        packed.pack(bm, op).unwrap();
        let a = rng.f32s(m * k, -1.0, 1.0);
        let mut got = vec![f32::NAN; m * n];
        sgemm_packed_serial(
            0.5,
            MatRef::new(&a, m, k),
            &packed,
            k_lo,
            n_lo,
            0.0,
            MatMut::new(&mut got, m, n),
        )
        .unwrap();
        // op(B)[k_lo.., n_lo..] as a dense [k, n] matrix.
        let at = |kk: usize, j: usize| match op {
            Transpose::Yes => b[j * stride + kk],
            Transpose::No => b[kk * stride + j],
        };
        let sub: Vec<f32> = (0..k)
            .flat_map(|kk| (0..n).map(move |j| (kk, j)))
            .map(|(kk, j)| at(k_lo + kk, n_lo + j))
            .collect();
        let mut want = vec![0f32; m * n];
        reference_sgemm(
            0.5,
            MatRef::new(&a, m, k),
            MatRef::new(&sub, k, n),
            Transpose::No,
            0.0,
            MatMut::new(&mut want, m, n),
        )
        .unwrap();
        assert_close(&got, &want, k, &format!("{op:?} k {k_lo}+{k} n {n_lo}+{n}"));
    }
    // The last op(B) packed is [70, 24]: a k window past its end, a column start off a panel
    // edge, and columns past its end.
    let a = [0f32; 16 * 4];
    let mut c = [0f32; 16];
    for (k_lo, n_lo, n) in [(67, 0, 4), (0, 8, 4), (0, 16, 16)] {
        let r = sgemm_packed_serial(
            1.0,
            MatRef::new(&a[..4], 1, 4),
            &packed,
            k_lo,
            n_lo,
            0.0,
            MatMut::new(&mut c[..n], 1, n),
        );
        assert!(
            matches!(r, Err(KernelError::ShapeMismatch { .. })),
            "{k_lo} {n_lo} {n}"
        );
    }
}

#[test]
fn f32_gemm_matches_reference_on_every_small_dimension() {
    let mut rng = Rng::new(11);
    for dim in 0..3 {
        for v in 1..=67 {
            for &a in &EDGES {
                for &b in &EDGES {
                    let (m, n, k) = match dim {
                        0 => (v, a, b),
                        1 => (a, v, b),
                        _ => (a, b, v),
                    };
                    let x = rng.f32s(m * k, -1.0, 1.0);
                    let w = rng.f32s(n * k, -1.0, 1.0);
                    let bias = rng.f32s(n, -1.0, 1.0);
                    let packed = pack_f32(&w, n, k).unwrap();
                    let mut got = vec![f32::NAN; m * n];
                    f32_gemm(&x, m, &packed, Some(&bias), &mut got).unwrap();
                    let mut want = vec![0f32; m * n];
                    reference_sgemm(
                        1.0,
                        MatRef::new(&x, m, k),
                        MatRef::new(&w, n, k),
                        Transpose::Yes,
                        0.0,
                        MatMut::new(&mut want, m, n),
                    )
                    .unwrap();
                    for (i, v) in want.iter_mut().enumerate() {
                        *v += bias[i % n];
                    }
                    assert_close(&got, &want, k, &format!("f32_gemm {m}x{n}x{k}"));
                }
            }
        }
    }
}

#[test]
fn sgemm_strided_with_alpha_beta_and_both_layouts() {
    let mut rng = Rng::new(12);
    for (m, n, k) in [
        (1, 1, 1),
        (5, 70, 64),
        (64, 64, 64),
        (130, 33, 100),
        (1, 4096, 128),
        (300, 300, 300),
    ] {
        for b_op in [Transpose::No, Transpose::Yes] {
            for (alpha, beta) in [(1.0, 0.0), (0.125, 1.0), (-2.0, 0.5)] {
                let (lda, ldb, ldc) = (
                    k + 3,
                    if b_op == Transpose::Yes { k + 5 } else { n + 2 },
                    n + 1,
                );
                let (br, bc) = if b_op == Transpose::Yes {
                    (n, k)
                } else {
                    (k, n)
                };
                let a = rng.f32s(m * lda, -1.0, 1.0);
                let b = rng.f32s(br * ldb, -1.0, 1.0);
                // NaN in C must not leak through when beta == 0.
                let c0: Vec<f32> = if beta == 0.0 {
                    vec![f32::NAN; m * ldc]
                } else {
                    rng.f32s(m * ldc, -1.0, 1.0)
                };
                let am = MatRef {
                    data: &a,
                    rows: m,
                    cols: k,
                    row_stride: lda,
                };
                let bm = MatRef {
                    data: &b,
                    rows: br,
                    cols: bc,
                    row_stride: ldb,
                };
                let mut got = c0.clone();
                let mut serial = c0.clone();
                let mut want = c0.clone();
                sgemm(
                    alpha,
                    am,
                    bm,
                    b_op,
                    beta,
                    MatMut {
                        data: &mut got,
                        rows: m,
                        cols: n,
                        row_stride: ldc,
                    },
                )
                .unwrap();
                sgemm_serial(
                    alpha,
                    am,
                    bm,
                    b_op,
                    beta,
                    MatMut {
                        data: &mut serial,
                        rows: m,
                        cols: n,
                        row_stride: ldc,
                    },
                )
                .unwrap();
                reference_sgemm(
                    alpha,
                    am,
                    bm,
                    b_op,
                    beta,
                    MatMut {
                        data: &mut want,
                        rows: m,
                        cols: n,
                        row_stride: ldc,
                    },
                )
                .unwrap();
                let ctx = format!("sgemm {m}x{n}x{k} {b_op:?} alpha={alpha} beta={beta}");
                // Compare only the C elements; the padding columns must stay untouched.
                for i in 0..m {
                    let row = i * ldc..i * ldc + n;
                    assert_close(&got[row.clone()], &want[row.clone()], k, &ctx);
                    assert_eq!(got[row.clone()], serial[row], "{ctx}: serial differs");
                    if ldc > n {
                        assert_eq!(
                            got[i * ldc + n].to_bits(),
                            c0[i * ldc + n].to_bits(),
                            "{ctx}: padding written"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn f32_errors() {
    let packed = pack_f32(&[0.0; 6], 2, 3).unwrap();
    let err = f32_gemm(&[0.0; 5], 2, &packed, None, &mut [0.0; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::BadLength {
                op: "f32_gemm",
                operand: "x",
                ..
            }
        ),
        "{err}"
    );
    let err = f32_gemm(&[0.0; 6], 2, &packed, Some(&[0.0; 3]), &mut [0.0; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::BadLength {
                operand: "bias",
                ..
            }
        ),
        "{err}"
    );
    assert!(pack_f32(&[0.0; 5], 2, 3).is_err());
    let a = [0.0f32; 6];
    let err = sgemm(
        1.0,
        MatRef::new(&a, 2, 3),
        MatRef::new(&a, 2, 3),
        Transpose::No,
        0.0,
        MatMut::new(&mut [0.0; 4], 2, 2),
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::ShapeMismatch { op: "sgemm", .. }),
        "{err}"
    );
    let err = sgemm(
        1.0,
        MatRef {
            data: &a,
            rows: 2,
            cols: 3,
            row_stride: 4,
        },
        MatRef::new(&a, 3, 2),
        Transpose::No,
        0.0,
        MatMut::new(&mut [0.0; 4], 2, 2),
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::BadLength { operand: "a", .. }),
        "{err}"
    );
}

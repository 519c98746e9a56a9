//! Every optimized backend must equal the reference bit for bit: INT32 products, the f32
//! epilogue and the i8 requantization.

mod common;

use common::{optimized_backends, Rng};
use sq_kernels::{
    ActScales, BatchedI8, BmmOutput, Int8Gemm, KernelError, PackedLayout, Reference, WeightScales,
    MAX_K,
};

fn first_mismatch<T: PartialEq + Copy + std::fmt::Debug>(
    a: &[T],
    b: &[T],
) -> Option<(usize, T, T)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (&x, &y))| (i, x, y))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs all three outputs on every backend and compares with the reference.
fn check_gemm(
    backends: &[std::sync::Arc<dyn Int8Gemm>],
    m: usize,
    n: usize,
    k: usize,
    x_q: &[i8],
    w_q: &[i8],
    rng: &mut Rng,
) {
    let per_token = rng.below(4) != 0;
    let x_scales: Vec<f32> = (0..m)
        .map(|_| {
            if rng.below(16) == 0 {
                0.0
            } else {
                rng.f32_in(1e-3, 0.1)
            }
        })
        .collect();
    let x_sc = if per_token {
        ActScales::PerToken(&x_scales)
    } else {
        ActScales::PerTensor(0.037)
    };
    let w_scales = if rng.below(3) != 0 {
        WeightScales::PerChannel(rng.f32s(n, 1e-3, 0.05))
    } else {
        WeightScales::PerTensor(0.011)
    };
    let bias = (rng.below(2) == 0).then(|| rng.f32s(n, -1.0, 1.0));

    let reference = Reference;
    let w_ref = reference
        .pack_weights(w_q, n, k, w_scales.clone(), bias.as_deref())
        .unwrap();
    let mut want_i32 = vec![0i32; m * n];
    let mut want_f32 = vec![0f32; m * n];
    let mut want_i8 = vec![0i8; m * n];
    reference
        .gemm_i32_out(x_q, m, &w_ref, &mut want_i32)
        .unwrap();
    reference
        .gemm_f32_out(x_q, m, x_sc, &w_ref, &mut want_f32)
        .unwrap();
    let max_abs = want_f32.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    // Sometimes small enough that outputs clamp at ±127.
    let out_scale = (max_abs / if rng.below(3) == 0 { 60.0 } else { 127.0 }).max(1e-6);
    reference
        .gemm_i8_out(x_q, m, x_sc, &w_ref, out_scale, &mut want_i8)
        .unwrap();

    for b in backends {
        let ctx = format!("backend {} m={m} n={n} k={k}", b.name());
        let w = b
            .pack_weights(w_q, n, k, w_scales.clone(), bias.as_deref())
            .unwrap();
        let mut got_i32 = vec![7i32; m * n];
        let mut got_f32 = vec![f32::NAN; m * n];
        let mut got_i8 = vec![99i8; m * n];
        b.gemm_i32_out(x_q, m, &w, &mut got_i32).unwrap();
        b.gemm_f32_out(x_q, m, x_sc, &w, &mut got_f32).unwrap();
        b.gemm_i8_out(x_q, m, x_sc, &w, out_scale, &mut got_i8)
            .unwrap();
        if let Some(d) = first_mismatch(&got_i32, &want_i32) {
            panic!("{ctx}: i32 mismatch at {d:?}");
        }
        if let Some((i, g, r)) = first_mismatch(&bits(&got_f32), &bits(&want_f32)) {
            panic!(
                "{ctx}: f32 mismatch at {i}: {} vs {}",
                f32::from_bits(g),
                f32::from_bits(r)
            );
        }
        if let Some(d) = first_mismatch(&got_i8, &want_i8) {
            panic!("{ctx}: i8 mismatch at {d:?}");
        }
    }
}

/// Block edges of the micro-kernels: rows (MR 4, 6, 8), k groups of 4, 16-column panels and
/// 3-panel (48-column) tiles.
const EDGES: [usize; 8] = [1, 3, 4, 8, 9, 16, 17, 49];

#[test]
fn every_dimension_from_1_to_67_against_block_edges() {
    let backends = optimized_backends();
    let mut rng = Rng::new(1);
    let mut cases = 0;
    for dim in 0..3 {
        for v in 1..=67 {
            for &a in &EDGES {
                for &b in &EDGES {
                    let (m, n, k) = match dim {
                        0 => (v, a, b),
                        1 => (a, v, b),
                        _ => (a, b, v),
                    };
                    let x = rng.i8s(m * k);
                    let w = rng.i8s(n * k);
                    check_gemm(&backends, m, n, k, &x, &w, &mut rng);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * 67 * EDGES.len() * EDGES.len());
}

#[test]
fn random_large_shapes() {
    let backends = optimized_backends();
    let mut rng = Rng::new(2);
    for (m, n, k) in [
        (1, 2048, 2048),
        (16, 1000, 777),
        (130, 300, 515),
        (257, 97, 1031),
        (64, 4096, 64),
        (3, 5000, 130),
        (200, 200, 2),
    ] {
        let x = rng.i8s(m * k);
        let w = rng.i8s(n * k);
        check_gemm(&backends, m, n, k, &x, &w, &mut rng);
    }
}

#[test]
fn extreme_values() {
    let backends = optimized_backends();
    let mut rng = Rng::new(3);
    let (m, n, k) = (9, 33, 1027);
    type Pattern = Box<dyn Fn(usize) -> i8>;
    let patterns: [(&str, Pattern, Pattern); 5] = [
        ("-128 x -128", Box::new(|_| -128), Box::new(|_| -128)),
        ("127 x -127", Box::new(|_| 127), Box::new(|_| -127)),
        ("-128 x 127", Box::new(|_| -128), Box::new(|_| 127)),
        (
            "zeros",
            Box::new(|_| 0),
            Box::new(|i| (i % 255) as u8 as i8),
        ),
        (
            "alternating extremes",
            Box::new(|i| if i % 3 == 0 { -128 } else { 127 }),
            Box::new(|i| if i % 2 == 0 { -128 } else { 127 }),
        ),
    ];
    for (name, xf, wf) in &patterns {
        let x: Vec<i8> = (0..m * k).map(xf).collect();
        let w: Vec<i8> = (0..n * k).map(wf).collect();
        eprintln!("pattern {name}");
        check_gemm(&backends, m, n, k, &x, &w, &mut rng);
    }
}

#[test]
fn largest_k_does_not_overflow() {
    let (m, n, k) = (2, 17, MAX_K);
    let x = vec![-128i8; m * k];
    let w = vec![-128i8; n * k];
    let exact = 128 * 128 * k as i64;
    assert!(exact <= i32::MAX as i64);
    let mut all = optimized_backends();
    all.push(std::sync::Arc::new(Reference));
    for b in &all {
        let packed = b
            .pack_weights(&w, n, k, WeightScales::PerTensor(1.0), None)
            .unwrap();
        let mut out = vec![0i32; m * n];
        b.gemm_i32_out(&x, m, &packed, &mut out).unwrap();
        assert!(out.iter().all(|&v| v as i64 == exact), "{}", b.name());
    }
    let err = Reference
        .pack_weights(
            &[0; MAX_K + 1],
            1,
            MAX_K + 1,
            WeightScales::PerTensor(1.0),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, KernelError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn degenerate_shapes() {
    let mut all = optimized_backends();
    all.push(std::sync::Arc::new(Reference));
    for b in &all {
        // k = 0: the product is empty, the output is the bias.
        let w = b
            .pack_weights(
                &[],
                3,
                0,
                WeightScales::PerTensor(1.0),
                Some(&[1.0, 2.0, 3.0]),
            )
            .unwrap();
        let mut out = vec![0f32; 6];
        b.gemm_f32_out(&[], 2, ActScales::PerTensor(1.0), &w, &mut out)
            .unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0], "{}", b.name());
        // m = 0 and n = 0 do nothing.
        b.gemm_f32_out(&[], 0, ActScales::PerTensor(1.0), &w, &mut [])
            .unwrap();
        let w0 = b
            .pack_weights(&[], 0, 5, WeightScales::PerChannel(vec![]), None)
            .unwrap();
        b.gemm_i32_out(&[1; 10], 2, &w0, &mut []).unwrap();
    }
}

fn check_bmm(m: usize, n: usize, k: usize, batch: usize, interleaved: bool, rng: &mut Rng) {
    let backends = optimized_backends();
    // A: [batch, m, k]; interleaved puts heads side by side in each row, as in [seq, heads*d].
    let a_data = rng.i8s(batch * m * k + 5);
    let a = if interleaved {
        BatchedI8 {
            data: &a_data,
            batch,
            rows: m,
            cols: k,
            batch_stride: k,
            row_stride: batch * k,
        }
    } else {
        BatchedI8::contiguous(&a_data, batch, m, k)
    };
    for b_transposed in [true, false] {
        let (br, bc) = if b_transposed { (n, k) } else { (k, n) };
        let b_data = rng.i8s(batch * br * bc);
        let b = if interleaved {
            BatchedI8 {
                data: &b_data,
                batch,
                rows: br,
                cols: bc,
                batch_stride: bc,
                row_stride: batch * bc,
            }
        } else {
            BatchedI8::contiguous(&b_data, batch, br, bc)
        };
        let (bs, rs) = if interleaved {
            (n, batch * n)
        } else {
            (m * n, n)
        };
        let len = batch * m * n;
        let mut want_i32 = vec![0i32; len];
        let mut want_f32 = vec![0f32; len];
        fn out_i32(data: &mut [i32], bs: usize, rs: usize) -> BmmOutput<'_> {
            BmmOutput::I32 {
                data,
                batch_stride: bs,
                row_stride: rs,
            }
        }
        fn out_f32(data: &mut [f32], bs: usize, rs: usize) -> BmmOutput<'_> {
            BmmOutput::F32 {
                data,
                batch_stride: bs,
                row_stride: rs,
                scale: 0.125,
            }
        }
        Reference
            .bmm(a, b, b_transposed, out_i32(&mut want_i32, bs, rs))
            .unwrap();
        Reference
            .bmm(a, b, b_transposed, out_f32(&mut want_f32, bs, rs))
            .unwrap();
        // The reference against a direct product of the first entry.
        let acc: i32 = (0..k)
            .map(|kk| {
                let bv = if b_transposed {
                    b.data[kk]
                } else {
                    b.data[kk * b.row_stride]
                };
                a.data[kk] as i32 * bv as i32
            })
            .sum();
        assert_eq!(want_i32[0], acc);
        for be in &backends {
            let mut got_i32 = vec![0i32; len];
            let mut got_f32 = vec![0f32; len];
            be.bmm(a, b, b_transposed, out_i32(&mut got_i32, bs, rs))
                .unwrap();
            be.bmm(a, b, b_transposed, out_f32(&mut got_f32, bs, rs))
                .unwrap();
            let ctx = format!(
                "{} bmm batch={batch} m={m} n={n} k={k} transposed={b_transposed} interleaved={interleaved}",
                be.name()
            );
            assert_eq!(first_mismatch(&got_i32, &want_i32), None, "{ctx}");
            assert_eq!(
                first_mismatch(&bits(&got_f32), &bits(&want_f32)),
                None,
                "{ctx}"
            );
        }
    }
}

#[test]
fn bmm_matches_reference() {
    let mut rng = Rng::new(4);
    for (m, n, k, batch) in [
        (1, 1, 1, 1),
        (7, 19, 13, 3),
        (1, 70, 64, 12),
        (33, 33, 64, 4),
        (64, 64, 64, 12),
    ] {
        check_bmm(m, n, k, batch, false, &mut rng);
        check_bmm(m, n, k, batch, true, &mut rng);
    }
}

#[test]
fn errors_name_the_operation_and_shapes() {
    let mut all = optimized_backends();
    all.push(std::sync::Arc::new(Reference));
    for b in &all {
        let w = b
            .pack_weights(&[1; 12], 3, 4, WeightScales::PerChannel(vec![1.0; 3]), None)
            .unwrap();
        let err = b
            .gemm_f32_out(&[1; 7], 2, ActScales::PerTensor(1.0), &w, &mut [0.0; 6])
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::BadLength {
                    operand: "x_q",
                    expected: 8,
                    actual: 7,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("gemm_f32_out") && err.to_string().contains("[2, 4]"),
            "{err}"
        );
        let err = b.gemm_i32_out(&[1; 8], 2, &w, &mut [0; 5]).unwrap_err();
        assert!(
            matches!(err, KernelError::BadLength { operand: "out", .. }),
            "{err}"
        );
        let err = b
            .gemm_f32_out(&[1; 8], 2, ActScales::PerToken(&[1.0]), &w, &mut [0.0; 6])
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::BadLength {
                    operand: "x_scales",
                    ..
                }
            ),
            "{err}"
        );
        let err = b
            .gemm_f32_out(
                &[1; 8],
                2,
                ActScales::PerTensor(f32::NAN),
                &w,
                &mut [0.0; 6],
            )
            .unwrap_err();
        assert!(matches!(err, KernelError::InvalidScale { .. }), "{err}");
        let err = b
            .gemm_i8_out(&[1; 8], 2, ActScales::PerTensor(1.0), &w, 0.0, &mut [0; 6])
            .unwrap_err();
        assert!(matches!(err, KernelError::InvalidScale { .. }), "{err}");
        let err = b
            .pack_weights(&[1; 12], 3, 4, WeightScales::PerChannel(vec![1.0; 2]), None)
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::BadLength {
                    operand: "weight scales",
                    ..
                }
            ),
            "{err}"
        );
        let err = b
            .pack_weights(
                &[1; 12],
                3,
                4,
                WeightScales::PerTensor(1.0),
                Some(&[0.0; 4]),
            )
            .unwrap_err();
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
        let err = b
            .pack_weights(&[1; 11], 3, 4, WeightScales::PerTensor(1.0), None)
            .unwrap_err();
        assert!(
            matches!(err, KernelError::BadLength { operand: "w_q", .. }),
            "{err}"
        );

        // bmm: mismatched k, overlapping output rows, short output.
        let a = BatchedI8::contiguous(&[1; 24], 2, 3, 4);
        let bt = BatchedI8::contiguous(&[1; 30], 2, 3, 5);
        let err = b
            .bmm(a, bt, true, BmmOutput::i32(&mut [0; 18], 3, 3))
            .unwrap_err();
        assert!(
            matches!(err, KernelError::ShapeMismatch { op: "bmm", .. }),
            "{err}"
        );
        let bt = BatchedI8::contiguous(&[1; 24], 2, 3, 4);
        let overlapping = BmmOutput::I32 {
            data: &mut [0; 18],
            batch_stride: 1,
            row_stride: 1,
        };
        let err = b.bmm(a, bt, true, overlapping).unwrap_err();
        assert!(matches!(err, KernelError::ShapeMismatch { .. }), "{err}");
        let err = b
            .bmm(a, bt, true, BmmOutput::i32(&mut [0; 17], 3, 3))
            .unwrap_err();
        assert!(
            matches!(err, KernelError::BadLength { operand: "out", .. }),
            "{err}"
        );
    }
}

#[test]
fn packed_weights_only_work_with_a_backend_reading_their_layout() {
    let w = [1i8; 16];
    let from_ref = Reference
        .pack_weights(&w, 4, 4, WeightScales::PerTensor(1.0), None)
        .unwrap();
    assert_eq!(from_ref.layout(), PackedLayout::RowMajor);
    assert_eq!(from_ref.packed_by(), "reference");
    for b in optimized_backends() {
        let err = b
            .gemm_i32_out(&[1; 4], 1, &from_ref, &mut [0; 4])
            .unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::LayoutMismatch {
                    packed_by: "reference",
                    ..
                }
            ),
            "{err}"
        );
        let packed = b
            .pack_weights(&w, 4, 4, WeightScales::PerTensor(1.0), None)
            .unwrap();
        assert_eq!(packed.layout(), PackedLayout::VnniPanels16);
        let err = Reference
            .gemm_i32_out(&[1; 4], 1, &packed, &mut [0; 4])
            .unwrap_err();
        assert!(matches!(err, KernelError::LayoutMismatch { .. }), "{err}");
        assert!(err.to_string().contains(b.name()), "{err}");
    }
}

/// Running inside pools of different sizes must not change a single bit.
#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(5);
    let (m, n, k) = (100, 700, 300);
    let x = rng.i8s(m * k);
    let w = rng.i8s(n * k);
    let scales = rng.f32s(m, 0.01, 0.02);
    for b in optimized_backends() {
        let packed = b
            .pack_weights(
                &w,
                n,
                k,
                WeightScales::PerChannel(rng.f32s(n, 0.01, 0.02)),
                None,
            )
            .unwrap();
        let mut outs = Vec::new();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; m * n];
            pool.install(|| b.gemm_f32_out(&x, m, ActScales::PerToken(&scales), &packed, &mut out))
                .unwrap();
            outs.push(bits(&out));
        }
        assert!(outs.windows(2).all(|p| p[0] == p[1]), "{}", b.name());
    }
}

/// Decode-sized products (m of 1 and 2) above the streaming split threshold run over output
/// panels on several threads: bit for bit the serial result, which equals the reference.
#[test]
fn decode_sized_split_products_equal_the_serial_ones() {
    let mut rng = Rng::new(6);
    // 576 x 1536 is SmolLM2's gate/up shape; 49 x 3000 is odd-sized with a partial panel.
    for (m, n, k) in [
        (1, 1536, 576),
        (2, 1536, 576),
        (1, 3000, 49),
        (1, 4000, 130),
    ] {
        let x = rng.i8s(m * k);
        let w = rng.i8s(n * k);
        let scales = rng.f32s(m, 0.01, 0.02);
        let col = rng.f32s(n, 0.01, 0.02);
        let bias = rng.f32s(n, -1.0, 1.0);
        let reference = Reference
            .pack_weights(&w, n, k, WeightScales::PerChannel(col.clone()), Some(&bias))
            .unwrap();
        let mut want = vec![0f32; m * n];
        Reference
            .gemm_f32_out(&x, m, ActScales::PerToken(&scales), &reference, &mut want)
            .unwrap();
        for b in optimized_backends() {
            let packed = b
                .pack_weights(&w, n, k, WeightScales::PerChannel(col.clone()), Some(&bias))
                .unwrap();
            let mut outs = Vec::new();
            for threads in [1, 2, 4] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![0f32; m * n];
                pool.install(|| {
                    b.gemm_f32_out(&x, m, ActScales::PerToken(&scales), &packed, &mut out)
                })
                .unwrap();
                outs.push(bits(&out));
            }
            assert!(
                outs.windows(2).all(|p| p[0] == p[1]),
                "{} m={m} n={n} k={k}",
                b.name()
            );
            assert_eq!(outs[0], bits(&want), "{} m={m} n={n} k={k}", b.name());
        }
    }
}

#[test]
fn unpack_returns_the_weights_whatever_the_layout() {
    let mut rng = Rng::new(21);
    let mut backends = optimized_backends();
    backends.push(std::sync::Arc::new(Reference));
    for (n, k) in [(1, 1), (3, 5), (17, 7), (16, 64), (33, 130)] {
        let w = rng.i8s(n * k);
        for b in &backends {
            let packed = b
                .pack_weights(&w, n, k, WeightScales::PerTensor(1.0), None)
                .unwrap();
            assert_eq!(packed.unpack(), w, "{} n={n} k={k}", b.name());
        }
    }
}

#[test]
fn dequantized_rows_are_the_weights_times_their_scales() {
    let mut rng = Rng::new(22);
    let mut backends = optimized_backends();
    backends.push(std::sync::Arc::new(Reference));
    for (n, k) in [(1, 1), (17, 7), (33, 130)] {
        let w = rng.i8s(n * k);
        let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 0.003).collect();
        for b in &backends {
            let packed = b
                .pack_weights(&w, n, k, WeightScales::PerChannel(scales.clone()), None)
                .unwrap();
            let mut row = vec![0f32; k];
            for r in 0..n {
                packed.dequantize_row_into(r, &mut row).unwrap();
                let want: Vec<f32> = w[r * k..(r + 1) * k]
                    .iter()
                    .map(|&v| v as f32 * scales[r])
                    .collect();
                assert_eq!(row, want, "{} row {r}", b.name());
            }
            assert!(packed.dequantize_row_into(n, &mut row).is_err());
            assert!(packed.dequantize_row_into(0, &mut row[..k - 1]).is_err() || k == 1);
        }
    }
}

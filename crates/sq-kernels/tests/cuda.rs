//! The CUDA backend against the CPU `Reference` (feature `cuda`):
//! `cargo test -p sq-kernels --features cuda --test cuda`.
//!
//! Without an NVIDIA driver or GPU the GPU tests print why and pass without checking anything;
//! the tests of the error paths run everywhere. With a GPU every kernel is compared with the
//! CPU on odd shapes: INT32 products exactly, and the f32 / INT8 epilogues and the quantizers
//! bit for bit too, since the kernels apply the same operations in the same order without FMA.
#![cfg(feature = "cuda")]

mod common;

use common::Rng;
use sq_kernels::cuda::{
    CudaBackend, CudaDevice, DeviceActQuant, DeviceActs, GemmOut, GemmPath, SMALL_M_MAX_ROWS,
};
use sq_kernels::{
    quantize_per_tensor, quantize_per_token, quantize_per_token_smoothed, quantize_static,
    ActScales, BatchedI8, BmmOutput, Int8Gemm, KernelError, Reference, WeightScales,
};
use std::sync::{Arc, OnceLock};

/// The GPU, or `None` after printing why the test is skipped.
fn device(test: &str) -> Option<Arc<CudaDevice>> {
    static DEVICE: OnceLock<Result<Arc<CudaDevice>, KernelError>> = OnceLock::new();
    match DEVICE.get_or_init(|| CudaDevice::new(0)) {
        Ok(d) => Some(d.clone()),
        Err(KernelError::CudaUnavailable { reason }) => {
            eprintln!("skipping {test}: no usable GPU ({reason})");
            None
        }
        Err(e) => panic!("{test}: opening the GPU failed: {e}"),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

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

#[test]
fn a_missing_gpu_or_driver_is_an_error_not_a_panic() {
    // Here (no driver) and on a GPU machine alike: no machine has GPU number 1000.
    match CudaDevice::new(1000) {
        Err(KernelError::CudaUnavailable { reason }) => {
            assert!(!reason.is_empty());
            eprintln!("cuda:1000: {reason}");
        }
        other => panic!("expected CudaUnavailable, got {other:?}"),
    }
    match CudaBackend::new(0) {
        Ok(b) => assert_eq!(b.name(), "cuda"),
        Err(KernelError::CudaUnavailable { reason }) => eprintln!("cuda:0: {reason}"),
        Err(e) => panic!("expected a backend or CudaUnavailable, got {e}"),
    }
}

/// All three outputs through the `Int8Gemm` trait on `path`, against `Reference`.
fn check_gemm(
    device: &Arc<CudaDevice>,
    path: GemmPath,
    m: usize,
    n: usize,
    k: usize,
    rng: &mut Rng,
) {
    let x_q = rng.i8s(m * k);
    let w_q = rng.i8s(n * k);
    let x_scales: Vec<f32> = (0..m).map(|_| rng.f32_in(1e-3, 0.1)).collect();
    let x_sc = if rng.below(4) != 0 {
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
    let w_ref = Reference
        .pack_weights(&w_q, n, k, w_scales.clone(), bias.as_deref())
        .unwrap();
    let (mut want_i32, mut want_f32, mut want_i8) =
        (vec![0i32; m * n], vec![0f32; m * n], vec![0i8; m * n]);
    Reference
        .gemm_i32_out(&x_q, m, &w_ref, &mut want_i32)
        .unwrap();
    Reference
        .gemm_f32_out(&x_q, m, x_sc, &w_ref, &mut want_f32)
        .unwrap();
    let max_abs = want_f32.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let out_scale = (max_abs / 100.0).max(1e-6);
    Reference
        .gemm_i8_out(&x_q, m, x_sc, &w_ref, out_scale, &mut want_i8)
        .unwrap();

    let backend = CudaBackend::with_path(device.clone(), path);
    let w = backend
        .pack_weights(&w_q, n, k, w_scales, bias.as_deref())
        .unwrap();
    let (mut got_i32, mut got_f32, mut got_i8) =
        (vec![7i32; m * n], vec![f32::NAN; m * n], vec![99i8; m * n]);
    let ctx = format!("{path:?} m={m} n={n} k={k}");
    backend
        .gemm_i32_out(&x_q, m, &w, &mut got_i32)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    backend
        .gemm_f32_out(&x_q, m, x_sc, &w, &mut got_f32)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    backend
        .gemm_i8_out(&x_q, m, x_sc, &w, out_scale, &mut got_i8)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert_eq!(first_mismatch(&got_i32, &want_i32), None, "{ctx}: i32");
    if let Some((i, g, r)) = first_mismatch(&bits(&got_f32), &bits(&want_f32)) {
        panic!(
            "{ctx}: f32 mismatch at {i}: {} vs {}",
            f32::from_bits(g),
            f32::from_bits(r)
        );
    }
    assert_eq!(first_mismatch(&got_i8, &want_i8), None, "{ctx}: i8");
}

const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 7, 3),
    (3, 5, 7),
    (8, 33, 65),
    (16, 100, 4099),
    (17, 33, 65),
    (33, 17, 129),
    (64, 100, 200),
    (130, 257, 515),
    (200, 64, 1000),
];

#[test]
fn gemm_paths_match_reference() {
    let Some(dev) = device("gemm_paths_match_reference") else {
        return;
    };
    let mut rng = Rng::new(11);
    for (m, n, k) in SHAPES {
        for path in [GemmPath::Auto, GemmPath::SmallM, GemmPath::Tiled] {
            check_gemm(&dev, path, m, n, k, &mut rng);
        }
        // cuBLASLt's IMMA kernels are only asked for where Auto would use them.
        if m > SMALL_M_MAX_ROWS {
            check_gemm(&dev, GemmPath::CublasLt, m, n, k, &mut rng);
        }
    }
}

#[test]
fn large_and_extreme_gemms_match_reference() {
    let Some(dev) = device("large_and_extreme_gemms_match_reference") else {
        return;
    };
    let mut rng = Rng::new(12);
    check_gemm(&dev, GemmPath::Auto, 512, 1536, 576, &mut rng);
    check_gemm(&dev, GemmPath::Auto, 2048, 1000, 333, &mut rng);
    let backend = CudaBackend::with_device(dev);
    // -128 everywhere at the largest K: the INT32 sums are exact up to MAX_K.
    let (m, n, k) = (20, 3, sq_kernels::MAX_K);
    let x = vec![-128i8; m * k];
    let w = Reference
        .pack_weights(
            &vec![-128i8; n * k],
            n,
            k,
            WeightScales::PerTensor(1.0),
            None,
        )
        .unwrap();
    let mut got = vec![0i32; m * n];
    backend.gemm_i32_out(&x, m, &w, &mut got).unwrap();
    assert!(
        got.iter().all(|&v| v == 16384 * k as i32),
        "{:?}",
        &got[..3]
    );
}

#[test]
fn f16_output_is_the_f32_output_rounded() {
    let Some(d) = device("f16_output_is_the_f32_output_rounded") else {
        return;
    };
    let mut rng = Rng::new(13);
    for (m, n, k) in [(1, 9, 17), (40, 70, 130)] {
        let (x_q, w_q) = (rng.i8s(m * k), rng.i8s(n * k));
        let xs = rng.f32s(m, 1e-3, 0.1);
        let ws = WeightScales::PerChannel(rng.f32s(n, 1e-3, 0.05));
        let bias = rng.f32s(n, -1.0, 1.0);
        let dw = d.upload_weights(&w_q, n, k, &ws, Some(&bias)).unwrap();
        let da = d.upload_acts(&x_q, m, k, ActScales::PerToken(&xs)).unwrap();
        let (mut y32, mut y16) = (d.zeros::<f32>(m * n).unwrap(), d.zeros(m * n).unwrap());
        d.gemm(&da, &dw, GemmOut::F32(y32.as_view_mut())).unwrap();
        d.gemm(&da, &dw, GemmOut::F16(y16.as_view_mut())).unwrap();
        let (mut h32, mut h16) = (vec![0f32; m * n], vec![half::f16::ZERO; m * n]);
        d.download(&y32, &mut h32).unwrap();
        d.download(&y16, &mut h16).unwrap();
        let want: Vec<half::f16> = h32.iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(first_mismatch(&h16, &want), None, "m={m} n={n} k={k}");
    }
}

fn activations(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    let mut x = rng.f32s(m * k, -3.0, 3.0);
    // Outlier channels, an all-zero row and a NaN, as real activations and the edge cases have.
    for row in x.chunks_mut(k) {
        row[k / 2] *= 40.0;
    }
    if m > 2 {
        x[k..2 * k].fill(0.0);
        x[2 * k] = f32::NAN;
    }
    x
}

fn download_acts(d: &CudaDevice, a: &DeviceActs) -> (Vec<i8>, Vec<f32>) {
    let (m, k, kp) = (a.m(), a.k(), a.kp());
    let mut padded = vec![0i8; m * kp];
    d.download(a.q(), &mut padded).unwrap();
    assert!(
        padded.chunks(kp).all(|r| r[k..].iter().all(|&v| v == 0)),
        "padding columns must be zero"
    );
    let q = padded.chunks(kp).flat_map(|r| r[..k].to_vec()).collect();
    let mut s = vec![0f32; if a.per_token() { m } else { 1 }];
    d.download(a.scales(), &mut s).unwrap();
    (q, s)
}

#[test]
fn quantizers_match_the_cpu_bit_for_bit() {
    let Some(d) = device("quantizers_match_the_cpu_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(14);
    for (m, k) in [(1, 1), (3, 17), (5, 576), (33, 1000), (130, 4099)] {
        let x = activations(&mut rng, m, k);
        let factor = rng.f32s(k, 0.1, 4.0);
        let dx = d.upload(&x).unwrap();
        let df = d.upload(&factor).unwrap();
        let ctx = format!("m={m} k={k}");

        let (mut q, mut s) = (vec![0i8; m * k], vec![0f32; m]);
        quantize_per_token(&x, m, k, &mut q, &mut s).unwrap();
        let got = download_acts(
            &d,
            &d.quantize(&dx, m, k, DeviceActQuant::Token, None).unwrap(),
        );
        assert_eq!(got.0, q, "{ctx}: per-token q");
        assert_eq!(bits(&got.1), bits(&s), "{ctx}: per-token scales");

        quantize_per_token_smoothed(&x, m, k, &factor, &mut q, &mut s).unwrap();
        let got = download_acts(
            &d,
            &d.quantize(&dx, m, k, DeviceActQuant::Token, Some(&df))
                .unwrap(),
        );
        assert_eq!(got.0, q, "{ctx}: smoothed q");
        assert_eq!(bits(&got.1), bits(&s), "{ctx}: smoothed scales");

        let scale = quantize_per_tensor(&x, &mut q).unwrap();
        let got = download_acts(
            &d,
            &d.quantize(&dx, m, k, DeviceActQuant::Tensor, None).unwrap(),
        );
        assert_eq!(got.0, q, "{ctx}: per-tensor q");
        assert_eq!(
            got.1[0].to_bits(),
            scale.to_bits(),
            "{ctx}: per-tensor scale"
        );

        quantize_static(&x, 0.05, &mut q).unwrap();
        let got = download_acts(
            &d,
            &d.quantize(&dx, m, k, DeviceActQuant::Static(0.05), None)
                .unwrap(),
        );
        assert_eq!(got.0, q, "{ctx}: static q");
        assert_eq!(got.1, vec![0.05], "{ctx}: static scale");

        // f16 activations quantize like their f32 values.
        let x16: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let x16_f32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
        quantize_per_token(&x16_f32, m, k, &mut q, &mut s).unwrap();
        let dx16 = d.upload(&x16).unwrap();
        let got = download_acts(
            &d,
            &d.quantize(&dx16, m, k, DeviceActQuant::Token, None)
                .unwrap(),
        );
        assert_eq!(got.0, q, "{ctx}: f16 per-token q");
        assert_eq!(bits(&got.1), bits(&s), "{ctx}: f16 per-token scales");
    }
}

fn check_bmm(
    backend: &CudaBackend,
    (m, n, k, batch): (usize, usize, usize, usize),
    interleaved: bool,
    rng: &mut Rng,
) {
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
        // Interleaved outputs leave a gap column after each row: it must keep its value.
        let (bs, rs) = if interleaved {
            (n, batch * n + 1)
        } else {
            (m * n, n)
        };
        let len = (m - 1) * rs + (batch - 1) * bs + n + 1;
        let ctx = format!("bmm batch={batch} m={m} n={n} k={k} bt={b_transposed} il={interleaved}");
        let (mut want_i32, mut got_i32) = (vec![-5i32; len], vec![-5i32; len]);
        let (mut want_f32, mut got_f32) = (vec![-5f32; len], vec![-5f32; len]);
        for (be, i32s, f32s) in [
            (&Reference as &dyn Int8Gemm, &mut want_i32, &mut want_f32),
            (backend as &dyn Int8Gemm, &mut got_i32, &mut got_f32),
        ] {
            be.bmm(
                a,
                b,
                b_transposed,
                BmmOutput::I32 {
                    data: i32s,
                    batch_stride: bs,
                    row_stride: rs,
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            be.bmm(
                a,
                b,
                b_transposed,
                BmmOutput::F32 {
                    data: f32s,
                    batch_stride: bs,
                    row_stride: rs,
                    scale: 0.125,
                },
            )
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        assert_eq!(first_mismatch(&got_i32, &want_i32), None, "{ctx}: i32");
        assert_eq!(
            first_mismatch(&bits(&got_f32), &bits(&want_f32)),
            None,
            "{ctx}: f32"
        );
    }
}

#[test]
fn bmm_matches_reference() {
    let Some(dev) = device("bmm_matches_reference") else {
        return;
    };
    let backend = CudaBackend::with_device(dev);
    let mut rng = Rng::new(15);
    for dims in [
        (1, 1, 1, 1),
        (7, 19, 13, 3),
        (1, 70, 64, 12),
        (65, 129, 64, 4),
        (100, 100, 33, 9),
    ] {
        check_bmm(&backend, dims, false, &mut rng);
        check_bmm(&backend, dims, true, &mut rng);
    }
}

#[test]
fn fp16_gemm_matches_an_f32_product() {
    let Some(d) = device("fp16_gemm_matches_an_f32_product") else {
        return;
    };
    let mut rng = Rng::new(16);
    for (m, n, k) in [(1, 5, 3), (37, 70, 130)] {
        let to16 =
            |v: Vec<f32>| -> Vec<half::f16> { v.into_iter().map(half::f16::from_f32).collect() };
        let (x, w) = (
            to16(rng.f32s(m * k, -1.0, 1.0)),
            to16(rng.f32s(n * k, -1.0, 1.0)),
        );
        let (dx, dw) = (d.upload(&x).unwrap(), d.upload(&w).unwrap());
        let mut dy = d.zeros::<half::f16>(m * n).unwrap();
        d.hgemm(&dx, m, &dw, n, k, &mut dy).unwrap();
        let mut y = vec![half::f16::ZERO; m * n];
        d.download(&dy, &mut y).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k)
                    .map(|kk| x[i * k + kk].to_f32() * w[j * k + kk].to_f32())
                    .sum();
                let got = y[i * n + j].to_f32();
                // f16 output rounding (2^-11 relative) plus FP32 accumulation order.
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs() + 1e-3,
                    "m={m} n={n} k={k} [{i},{j}]: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn device_shape_errors_are_reported() {
    let Some(d) = device("device_shape_errors_are_reported") else {
        return;
    };
    let dw = d
        .upload_weights(&[1i8; 12], 3, 4, &WeightScales::PerTensor(1.0), None)
        .unwrap();
    let da = d
        .upload_acts(&[1i8; 10], 2, 5, ActScales::PerTensor(1.0))
        .unwrap();
    let mut out = d.zeros::<f32>(6).unwrap();
    let err = d
        .gemm(&da, &dw, GemmOut::F32(out.as_view_mut()))
        .unwrap_err();
    assert!(matches!(err, KernelError::ShapeMismatch { .. }), "{err}");
    let da = d
        .upload_acts(&[1i8; 8], 2, 4, ActScales::PerTensor(1.0))
        .unwrap();
    let mut small = d.zeros::<f32>(5).unwrap();
    let err = d
        .gemm(&da, &dw, GemmOut::F32(small.as_view_mut()))
        .unwrap_err();
    assert!(
        matches!(err, KernelError::BadLength { operand: "out", .. }),
        "{err}"
    );
    let err = d
        .gemm(
            &da,
            &dw,
            GemmOut::I8 {
                out: d.zeros::<i8>(6).unwrap().as_view_mut(),
                out_scale: 0.0,
            },
        )
        .unwrap_err();
    assert!(matches!(err, KernelError::InvalidScale { .. }), "{err}");
}

//! Quantization: the dispatched kernels equal their scalar definition bit for bit, and the
//! round trip stays within half a step.

mod common;

use common::Rng;
use proptest::prelude::*;
use sq_kernels::quantize::{quantize_per_token_scalar, scalar, scale_for_absmax};
use sq_kernels::{
    dequantize_per_row, pack_f32, quantize_packed_weights_per_channel, quantize_per_tensor,
    quantize_per_tensor_smoothed, quantize_per_token, quantize_per_token_smoothed, quantize_static,
    quantize_static_smoothed, quantize_weights_per_channel, quantize_weights_per_tensor,
    KernelError,
};

/// `|dequantized - x| <= scale / 2`, with slack for the two f32 roundings involved.
fn assert_within_half_step(x: &[f32], q: &[i8], scale: f32) {
    for (&v, &qv) in x.iter().zip(q) {
        let err = (qv as f32 * scale - v).abs();
        let bound = scale * 0.5 * (1.0 + 1e-5) + v.abs() * 1e-6;
        assert!(
            err <= bound,
            "x = {v}, q = {qv}, scale = {scale}: error {err} > {bound}"
        );
    }
}

fn rows_strategy() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..6, 1usize..80).prop_flat_map(|(m, k)| {
        let value = prop_oneof![
            4 => -1e3f32..1e3,
            1 => -1e-3f32..1e-3,
            1 => Just(0.0f32),
        ];
        (Just(m), Just(k), prop::collection::vec(value, m * k))
    })
}

proptest! {
    #[test]
    fn per_token_round_trip_within_half_step((m, k, x) in rows_strategy(), zero_row in 0usize..8) {
        let mut x = x;
        if zero_row < m {
            x[zero_row * k..(zero_row + 1) * k].fill(0.0);
        }
        let mut q = vec![0i8; m * k];
        let mut scales = vec![f32::NAN; m];
        quantize_per_token(&x, m, k, &mut q, &mut scales).unwrap();
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            prop_assert!(scales[i].is_finite() && scales[i] >= 0.0);
            assert_within_half_step(row, &q[i * k..(i + 1) * k], scales[i]);
            if row.iter().all(|&v| v == 0.0) {
                prop_assert_eq!(scales[i], 0.0);
                prop_assert!(q[i * k..(i + 1) * k].iter().all(|&v| v == 0));
            } else {
                // The largest magnitude maps to ±127.
                prop_assert_eq!(q[i * k..(i + 1) * k].iter().map(|v| v.unsigned_abs()).max(), Some(127));
            }
        }
        let mut deq = vec![0f32; m * k];
        dequantize_per_row(&q, k, &scales, &mut deq).unwrap();
        prop_assert!(deq.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn vector_kernels_equal_the_scalar_definition((m, k, x) in rows_strategy(), seed in 0u64..1000) {
        let mut rng = Rng::new(seed);
        let inv_smooth = rng.f32s(k, 0.1, 4.0);
        for smooth in [None, Some(&inv_smooth[..])] {
            let (mut q, mut s) = (vec![0i8; m * k], vec![0f32; m]);
            let (mut q_ref, mut s_ref) = (vec![0i8; m * k], vec![0f32; m]);
            match smooth {
                None => quantize_per_token(&x, m, k, &mut q, &mut s).unwrap(),
                Some(f) => quantize_per_token_smoothed(&x, m, k, f, &mut q, &mut s).unwrap(),
            }
            quantize_per_token_scalar(&x, m, k, smooth, &mut q_ref, &mut s_ref).unwrap();
            prop_assert_eq!(&q, &q_ref);
            prop_assert_eq!(s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s_ref.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        let mut q = vec![0i8; m * k];
        let scale = quantize_per_tensor(&x, &mut q).unwrap();
        let (s_ref, inv) = scale_for_absmax(scalar::absmax(&x, None));
        let mut q_ref = vec![0i8; m * k];
        scalar::quantize_row(&x, None, inv, &mut q_ref);
        prop_assert_eq!(scale.to_bits(), s_ref.to_bits());
        prop_assert_eq!(&q, &q_ref);
        assert_within_half_step(&x, &q, scale);
    }

    #[test]
    fn runtime_smoothing_equals_divide_then_quantize((m, k, x) in rows_strategy(), seed in 0u64..1000, scale in 1e-3f32..10.0) {
        // The run-time smoothing divide is stored as `inv_smooth = 1 / s`; the fused kernels must
        // equal dividing (multiplying by inv_smooth) first and quantizing the result.
        let mut rng = Rng::new(seed);
        let s = rng.f32s(k, 0.05, 50.0);
        let inv_smooth: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let divided: Vec<f32> = x
            .chunks(k.max(1))
            .flat_map(|row| row.iter().zip(&inv_smooth).map(|(v, f)| v * f))
            .collect();
        let (mut q, mut q_ref) = (vec![0i8; m * k], vec![0i8; m * k]);
        let (mut sc, mut sc_ref) = (vec![0f32; m], vec![0f32; m]);
        quantize_per_token_smoothed(&x, m, k, &inv_smooth, &mut q, &mut sc).unwrap();
        quantize_per_token(&divided, m, k, &mut q_ref, &mut sc_ref).unwrap();
        prop_assert_eq!(&q, &q_ref);
        prop_assert_eq!(&sc, &sc_ref);
        let t = quantize_per_tensor_smoothed(&x, m, k, &inv_smooth, &mut q).unwrap();
        let t_ref = quantize_per_tensor(&divided, &mut q_ref).unwrap();
        prop_assert_eq!(t.to_bits(), t_ref.to_bits());
        prop_assert_eq!(&q, &q_ref);
        quantize_static_smoothed(&x, m, k, &inv_smooth, scale, &mut q).unwrap();
        quantize_static(&divided, scale, &mut q_ref).unwrap();
        prop_assert_eq!(&q, &q_ref);
    }

    #[test]
    fn static_quantization_rounds_and_clamps(x in prop::collection::vec(-1e3f32..1e3, 0..100), scale in 1e-3f32..10.0) {
        let mut q = vec![0i8; x.len()];
        quantize_static(&x, scale, &mut q).unwrap();
        let mut q_ref = vec![0i8; x.len()];
        scalar::quantize_row(&x, None, 1.0 / scale, &mut q_ref);
        prop_assert_eq!(&q, &q_ref);
        for (&v, &qv) in x.iter().zip(&q) {
            prop_assert!((-127..=127).contains(&qv));
            if (v / scale).abs() < 126.0 {
                prop_assert!((qv as f32 * scale - v).abs() <= scale * 0.5 * (1.0 + 1e-5) + v.abs() * 1e-6);
            }
        }
    }
}

#[test]
fn large_inputs_take_the_parallel_path_and_still_match() {
    let mut rng = Rng::new(9);
    let (m, k) = (300, 1001);
    let x = rng.f32s(m * k, -5.0, 5.0);
    let (mut q, mut s) = (vec![0i8; m * k], vec![0f32; m]);
    let (mut q_ref, mut s_ref) = (vec![0i8; m * k], vec![0f32; m]);
    quantize_per_token(&x, m, k, &mut q, &mut s).unwrap();
    quantize_per_token_scalar(&x, m, k, None, &mut q_ref, &mut s_ref).unwrap();
    assert_eq!(q, q_ref);
    assert_eq!(s, s_ref);
    let mut qt = vec![0i8; m * k];
    let st = quantize_per_tensor(&x, &mut qt).unwrap();
    assert_within_half_step(&x, &qt, st);
}

#[test]
fn rounding_is_half_to_even_and_nan_is_defined() {
    // scale 1: x * inv is exact, so the ties are real ties.
    let x = [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, 200.0, -200.0, f32::NAN];
    let mut q = [0i8; 9];
    quantize_static(&x, 1.0, &mut q).unwrap();
    assert_eq!(q, [0, 2, 2, 0, -2, 126, 127, -127, -127]);
    // NaN does not poison the row's scale.
    let mut q = [0i8; 3];
    let mut s = [0f32; 1];
    quantize_per_token(&[f32::NAN, 2.0, -1.0], 1, 3, &mut q, &mut s).unwrap();
    assert_eq!(s[0], 2.0 / 127.0);
    assert_eq!(q, [-127, 127, -64]);
}

#[test]
fn weight_helpers_are_symmetric_absmax() {
    let w = [1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0, 4.0, 3.0, -1.0];
    let (q, scales) = quantize_weights_per_channel(&w, 3, 3).unwrap();
    assert_eq!(scales, [2.0 / 127.0, 0.0, 4.0 / 127.0]);
    assert_eq!(q, [64, -127, 32, 0, 0, 0, 127, 95, -32]);
    let (q, scale) = quantize_weights_per_tensor(&w, 3, 3).unwrap();
    assert_eq!(scale, 4.0 / 127.0);
    assert_eq!(q, [32, -64, 16, 0, 0, 0, 127, 95, -32]);
}

/// Quantizing the packed weights block by block gives the bytes of the unpacked path, on both
/// sides of the parallel threshold; a non-finite weight is refused the same way.
#[test]
fn packed_per_channel_quantization_matches_the_unpacked_one() {
    let mut rng = Rng::new(11);
    for (n, k) in [(1, 1), (3, 3), (17, 5), (40, 0), (300, 301)] {
        let mut w = rng.f32s(n * k, -2.0, 2.0);
        if n * k > 100 {
            w[123] = 40.0;
        }
        let want = quantize_weights_per_channel(&w, n, k).unwrap();
        let got = quantize_packed_weights_per_channel(&pack_f32(&w, n, k).unwrap()).unwrap();
        assert_eq!(got, want, "{n}x{k}");
    }
    let mut w = vec![1.0f32; 300 * 301];
    w[5000] = f32::INFINITY;
    let packed = pack_f32(&w, 300, 301).unwrap();
    assert!(quantize_weights_per_channel(&w, 300, 301).is_err());
    assert!(quantize_packed_weights_per_channel(&packed).is_err());
}

#[test]
fn bad_input_is_an_error() {
    let mut q = [0i8; 6];
    let mut s = [0f32; 2];
    let err = quantize_per_token(&[0.0; 5], 2, 3, &mut q, &mut s).unwrap_err();
    assert!(
        matches!(err, KernelError::BadLength { operand: "x", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("[2, 3]"), "{err}");
    let err = quantize_per_token(&[0.0; 6], 2, 3, &mut q, &mut [0.0; 3]).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::BadLength {
                operand: "scales",
                ..
            }
        ),
        "{err}"
    );
    let err = quantize_per_token_smoothed(&[0.0; 6], 2, 3, &[1.0; 2], &mut q, &mut s).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::BadLength {
                operand: "inv_smooth",
                ..
            }
        ),
        "{err}"
    );
    let err = quantize_per_token(
        &[1.0, f32::INFINITY, 0.0, 1.0, 1.0, 1.0],
        2,
        3,
        &mut q,
        &mut s,
    )
    .unwrap_err();
    assert!(err.to_string().contains("infinite"), "{err}");
    assert!(quantize_static(&[1.0], 0.0, &mut [0]).is_err());
    assert!(quantize_static(&[1.0], f32::NAN, &mut [0]).is_err());
    assert!(quantize_per_tensor(&[1.0, 2.0], &mut [0]).is_err());
    assert!(quantize_weights_per_channel(&[1.0; 5], 2, 3).is_err());
    // k = 0 rows are empty, with scale 0.
    let mut s = [f32::NAN; 2];
    quantize_per_token(&[], 2, 0, &mut [], &mut s).unwrap();
    assert_eq!(s, [0.0, 0.0]);
}

/// The INT8-attention probability row: the codes are the per-row quantization of `p · fold`
/// (up to a rounding of the code at a half step), and codes times the returned scale are
/// `p · fold` within half a step.
#[test]
fn softmax_rows_quantize_the_folded_probabilities() {
    let mut rng = Rng::new(11);
    for n in [1usize, 2, 15, 16, 17, 63, 200, 513] {
        let scores: Vec<f32> = (0..n).map(|_| rng.f32_in(-6.0, 6.0)).collect();
        let fold: Vec<f32> = (0..n).map(|_| rng.f32_in(1e-3, 0.05)).collect();
        // f64 reference probabilities, folded.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let want: Vec<f32> = e
            .iter()
            .zip(&fold)
            .map(|(e, &f)| (e / sum * f as f64) as f32)
            .collect();
        let mut row = scores.clone();
        let mut codes = vec![0i8; n];
        let scale = sq_kernels::quantize_softmax_row(&mut row, &fold, &mut codes).unwrap();
        let peak = want.iter().fold(0f32, |m, &v| m.max(v));
        assert!((scale * 127.0 - peak).abs() <= 1e-5 * peak, "n {n}");
        assert!(
            codes.iter().all(|&c| c >= 0) && codes.contains(&127),
            "n {n}"
        );
        for (&c, &w) in codes.iter().zip(&want) {
            let err = (c as f32 * scale - w).abs();
            assert!(
                err <= scale * 0.5 * (1.0 + 1e-4),
                "n {n}: {c} x {scale} vs {w}"
            );
        }
    }
    let mut empty: [f32; 0] = [];
    assert_eq!(
        sq_kernels::quantize_softmax_row(&mut empty, &[], &mut []).unwrap(),
        0.0
    );
    assert!(sq_kernels::quantize_softmax_row(&mut [0.0, 1.0], &[1.0], &mut [0, 0]).is_err());
    assert!(
        sq_kernels::quantize_softmax_row(&mut [0.0, 1.0], &[1.0, f32::INFINITY], &mut [0, 0])
            .is_err()
    );
}

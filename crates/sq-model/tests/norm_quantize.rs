//! The norm fused with the input quantization of the Linears it feeds
//! (`quant::forward_normed`) against the unfused path (norm, then `forward_same_input`) and the
//! fake-quant oracle: RMSNorm, LayerNorm with and without bias, every activation policy, the
//! serial and parallel row paths, with and without the f32 norm output kept.

use sq_model::config::NormKind;
use sq_model::layers::Norm;
use sq_model::quant::{forward_normed, forward_same_input};
use sq_model::{
    ActQuant, FakeQuantLinear, FpLinear, Int8Linear, Linear, NamedLinear, WeightGranularity,
};

fn val(i: usize, salt: usize) -> f32 {
    (((i + salt) * 2654435761usize) % 1000) as f32 / 500.0 - 1.0
}

fn norm(kind: NormKind, bias: bool, k: usize) -> Norm {
    Norm {
        name: "input_layernorm".into(),
        kind,
        weight: (0..k).map(|c| 0.5 + val(c, 11).abs()).collect(),
        bias: bias.then(|| (0..k).map(|c| 0.1 * val(c, 17)).collect()),
        eps: 1e-5,
    }
}

fn fp(n: usize, k: usize, salt: usize) -> FpLinear {
    let w = (0..n * k).map(|i| 0.2 * val(i, salt)).collect();
    FpLinear::new(
        w,
        n,
        k,
        Some((0..n).map(|i| 0.01 * val(i, salt + 1)).collect()),
    )
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn fused_norm_quantize_equals_the_unfused_path_and_the_oracle() {
    let backend = sq_kernels::select_backend().unwrap();
    let k = 72;
    let widths = [40, 24, 24];
    let fps: Vec<FpLinear> = widths
        .iter()
        .enumerate()
        .map(|(i, &n)| fp(n, k, 100 * i))
        .collect();
    for (kind, bias) in [
        (NormKind::RmsNorm, false),
        (NormKind::LayerNorm, true),
        (NormKind::LayerNorm, false),
    ] {
        let norm = norm(kind, bias, k);
        for act in [
            ActQuant::Token,
            ActQuant::Tensor,
            ActQuant::Static { scale: 0.09 },
        ] {
            for weights in [WeightGranularity::Channel, WeightGranularity::Tensor] {
                let named: Vec<NamedLinear> = fps
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        NamedLinear::new(
                            format!("l{i}"),
                            Int8Linear::from_fp(f, weights, act, backend.clone()).unwrap(),
                        )
                    })
                    .collect();
                let oracles: Vec<FakeQuantLinear> = fps
                    .iter()
                    .map(|f| FakeQuantLinear::from_fp(f, weights, act).unwrap())
                    .collect();
                // One row (decode), a few (serial), many (parallel rows).
                for m in [1, 5, 40] {
                    // A residual stream with an outlier channel.
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| 3.0 * val(i, 7) + if i % k == 5 { 40.0 } else { 0.0 })
                        .collect();
                    let mut reference_normed = vec![0.0; m * k];
                    norm.forward(&x, &mut reference_normed);
                    // Every subset a decoder uses: q/k/v, gate/up, a single fc1.
                    for count in [3, 2, 1] {
                        let linears: Vec<&NamedLinear> = named.iter().take(count).collect();
                        let mut want: Vec<Vec<f32>> =
                            widths[..count].iter().map(|&n| vec![0.0; m * n]).collect();
                        {
                            let mut outs: Vec<&mut [f32]> =
                                want.iter_mut().map(|v| v.as_mut_slice()).collect();
                            forward_same_input(&linears, &reference_normed, m, &mut outs).unwrap();
                        }
                        for keep in [false, true] {
                            let mut normed = vec![f32::NAN; m * k];
                            let mut got: Vec<Vec<f32>> =
                                widths[..count].iter().map(|&n| vec![0.0; m * n]).collect();
                            {
                                let mut outs: Vec<&mut [f32]> =
                                    got.iter_mut().map(|v| v.as_mut_slice()).collect();
                                forward_normed(
                                    &norm,
                                    &linears,
                                    &x,
                                    m,
                                    &mut normed,
                                    keep,
                                    &mut outs,
                                )
                                .unwrap();
                            }
                            let what = format!("{kind:?} bias {bias} {act:?} {weights:?} m {m} linears {count} keep {keep}");
                            if keep {
                                assert_eq!(
                                    max_abs_diff(&normed, &reference_normed),
                                    0.0,
                                    "{what}: kept norm output"
                                );
                            }
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                // The same codes and scales: the same GEMM inputs, so equal.
                                let d = max_abs_diff(g, w);
                                assert!(d <= 0.0, "{what}: linear {i} differs from unfused by {d}");
                                let mut o = vec![0.0; g.len()];
                                oracles[i].forward(&reference_normed, m, &mut o).unwrap();
                                let scale = o.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                                let e = max_abs_diff(g, &o) / scale;
                                assert!(e < 1e-5, "{what}: linear {i} vs oracle {e}");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn linears_that_cannot_share_an_input_fall_back_to_the_f32_norm_output() {
    let backend = sq_kernels::select_backend().unwrap();
    let k = 16;
    let norm = norm(NormKind::RmsNorm, false, k);
    let (a, b) = (fp(8, k, 1), fp(8, k, 2));
    // Different policies, and an f32 Linear: the norm writes f32 and each Linear quantizes.
    let named = [
        NamedLinear::new(
            "a",
            Int8Linear::from_fp(
                &a,
                WeightGranularity::Channel,
                ActQuant::Token,
                backend.clone(),
            )
            .unwrap(),
        ),
        NamedLinear::new(
            "b",
            Int8Linear::from_fp(&b, WeightGranularity::Channel, ActQuant::Tensor, backend).unwrap(),
        ),
        NamedLinear::new("c", fp(8, k, 3)),
    ];
    let m = 3;
    let x: Vec<f32> = (0..m * k).map(|i| val(i, 5)).collect();
    let mut reference_normed = vec![0.0; m * k];
    norm.forward(&x, &mut reference_normed);
    let linears: Vec<&NamedLinear> = named.iter().collect();
    let mut normed = vec![0.0; m * k];
    let mut got = vec![vec![0.0; m * 8]; 3];
    {
        let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
        forward_normed(&norm, &linears, &x, m, &mut normed, false, &mut outs).unwrap();
    }
    assert_eq!(max_abs_diff(&normed, &reference_normed), 0.0);
    for (l, g) in named.iter().zip(&got) {
        let mut want = vec![0.0; m * 8];
        l.linear.forward(&reference_normed, m, &mut want).unwrap();
        assert_eq!(max_abs_diff(g, &want), 0.0, "{}", l.name);
    }
    // A wrong output length is an error naming the Linear, not a panic.
    let mut short = vec![0.0; 5];
    let mut ok = vec![0.0; m * 8];
    let err = forward_normed(
        &norm,
        &[&named[0], &named[0]],
        &x,
        m,
        &mut normed,
        false,
        &mut [&mut ok, &mut short],
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("a: "), "{err}");
    // An input that is not whole rows of the norm's width is an error naming the norm.
    let err = forward_normed(
        &norm,
        &linears,
        &x[..m * k - 1],
        m,
        &mut normed,
        false,
        &mut [],
    )
    .unwrap_err();
    assert!(err.to_string().contains("input_layernorm"), "{err}");
}

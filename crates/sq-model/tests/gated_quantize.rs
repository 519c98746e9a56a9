//! A gated MLP's activation, product and down-projection input quantization fused per row
//! (`quant::forward_gated`) against the unfused passes (activate, multiply, `Linear::forward`):
//! bit-identical for every activation policy, weight granularity and activation, on odd widths,
//! serial and parallel row counts.

use sq_model::config::Activation;
use sq_model::layers::activate;
use sq_model::quant::forward_gated;
use sq_model::{ActQuant, FpLinear, Int8Linear, NamedLinear, WeightGranularity};

fn val(i: usize, salt: usize) -> f32 {
    (((i + salt) * 2654435761usize) % 1000) as f32 / 500.0 - 1.0
}

#[test]
fn fused_gated_quantize_equals_the_unfused_passes() {
    let backend = sq_kernels::select_backend().unwrap();
    let (k, n) = (37, 24);
    let w = (0..n * k).map(|i| 0.2 * val(i, 3)).collect();
    let fp = FpLinear::new(w, n, k, None).unwrap();
    for act in [
        ActQuant::Token,
        ActQuant::Tensor,
        ActQuant::Static { scale: 0.05 },
    ] {
        for weights in [WeightGranularity::Channel, WeightGranularity::Tensor] {
            let down = NamedLinear::new(
                "down_proj",
                Int8Linear::from_fp(&fp, weights, act, backend.clone()).unwrap(),
            );
            for activation in [Activation::Silu, Activation::Relu, Activation::GeluTanh] {
                for m in [1, 5, 40] {
                    let gate: Vec<f32> = (0..m * k).map(|i| 6.0 * val(i, 7)).collect();
                    let up: Vec<f32> = (0..m * k).map(|i| 2.0 * val(i, 11)).collect();
                    let mut product = gate.clone();
                    activate(activation, &mut product);
                    for (x, y) in product.iter_mut().zip(&up) {
                        *x *= y;
                    }
                    let mut want = vec![0.0; m * n];
                    down.forward(&product, m, &mut want).unwrap();
                    let mut g = gate.clone();
                    let mut got = vec![f32::NAN; m * n];
                    forward_gated(activation, &down, &mut g, &up, m, &mut got).unwrap();
                    assert_eq!(got, want, "{act:?} {weights:?} {activation:?} m {m}");
                }
            }
        }
    }
    // Shapes that do not match the Linear are errors, not panics.
    let down = NamedLinear::new(
        "down_proj",
        Int8Linear::from_fp(&fp, WeightGranularity::Channel, ActQuant::Token, backend).unwrap(),
    );
    let mut gate = vec![0.0; 2 * k];
    let mut out = vec![0.0; 2 * n];
    let (short_up, full_up) = (vec![0.0; 3], vec![0.0; 2 * k]);
    assert!(forward_gated(Activation::Silu, &down, &mut gate, &short_up, 2, &mut out).is_err());
    assert!(forward_gated(Activation::Silu, &down, &mut gate, &full_up, 3, &mut out).is_err());
}

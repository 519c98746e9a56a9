//! The W8A8 model on the INT8 GEMM against the f32 fake-quant oracle, and SmoothQuant against
//! naive W8A8 on fixtures with outlier channels.

use sq_calib::{calibrate, CalibConfig, StatsTable};
use sq_model::{load_hf_dir, LoadedModel, Logits, Model};
use sq_smooth::{
    fake_quantize_model, paper_groups, quantize_model, smooth_model, smoothing_groups, AlphaSpec,
    Fold, Recipe, SmoothTargets,
};
use std::path::PathBuf;

fn fixture(name: &str) -> LoadedModel {
    load_hf_dir(
        &PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/hf"
        ))
        .join(name),
    )
    .unwrap()
}

const TEXT: &str = "Robert Boulter is an English film , television and theatre actor . He had a guest \
    starring role on the television series The Bill in 2000 . This was followed by a starring role in the play \
    Herons written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre .";

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut session = model.session(ids.len());
    let mut out = Vec::new();
    model
        .forward(ids, &mut session, Logits::All, &mut out)
        .unwrap();
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn mean_abs_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

fn prepared(name: &str) -> (LoadedModel, Vec<u32>, StatsTable) {
    let mut loaded = fixture(name);
    let mut ids = loaded.tokenizer.encode(TEXT).unwrap();
    ids.truncate(96);
    let stats = calibrate(
        &mut loaded.model,
        &ids,
        &CalibConfig {
            samples: 1,
            seq_len: 96,
            seed: 0,
        },
        |_, _| {},
    )
    .unwrap();
    (loaded, ids, stats)
}

const RECIPES: [Recipe; 4] = [Recipe::CHANNEL_TOKEN, Recipe::O1, Recipe::O2, Recipe::O3];

#[test]
fn int8_model_equals_the_fake_quant_oracle() {
    let backend = sq_kernels::select_backend().unwrap();
    for name in ["llama-gqa", "opt-prenorm", "bloom", "qwen2-bias"] {
        for (i, recipe) in RECIPES.into_iter().enumerate() {
            let (mut int8, ids, mut stats) = prepared(name);
            let (mut fake, _, mut fake_stats) = prepared(name);
            // Half the recipes run on a model smoothed everywhere (run-time divide included).
            if i % 2 == 1 {
                let groups = smoothing_groups(&int8.model, SmoothTargets::All).unwrap();
                let alpha = AlphaSpec::Global(0.5);
                smooth_model(&mut int8.model, &groups, &mut stats, &alpha).unwrap();
                smooth_model(&mut fake.model, &groups, &mut fake_stats, &alpha).unwrap();
            }
            let n =
                quantize_model(&mut int8.model, &recipe, Some(&stats), backend.clone()).unwrap();
            assert_eq!(
                n,
                int8.model
                    .layers
                    .iter()
                    .map(|b| b.linears().len())
                    .sum::<usize>()
            );
            fake_quantize_model(&mut fake.model, &recipe, Some(&stats)).unwrap();
            let (a, b) = (logits(&int8.model, &ids), logits(&fake.model, &ids));
            // Each Linear matches its oracle to float rounding (next test); through the whole model
            // an activation that lands within rounding of a quantization boundary can round the
            // other way in a later layer, so the model-level check bounds the effect of such flips.
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let e = rel_err(&a, &b);
            assert!(
                e < 5e-2,
                "{name} {recipe:?}: INT8 vs fake-quant relative error {e}"
            );
            let mean = mean_abs_err(&a, &b) / scale;
            assert!(mean < 1e-3, "{name} {recipe:?}: mean error {mean}");
            let vocab = int8.model.config.vocab_size;
            let agree = a
                .chunks(vocab)
                .zip(b.chunks(vocab))
                .filter(|(x, y)| sq_model::generate::argmax(x) == sq_model::generate::argmax(y))
                .count();
            assert!(
                agree * 100 >= ids.len() * 95,
                "{name} {recipe:?}: argmax agrees at {agree}/{}",
                ids.len()
            );
        }
    }
}

#[test]
fn smoothquant_beats_naive_w8a8_on_outlier_channels() {
    let backend = sq_kernels::select_backend().unwrap();
    for name in ["llama-gqa", "opt-prenorm", "bloom"] {
        let (fp, ids, _) = prepared(name);
        let reference = logits(&fp.model, &ids);
        for recipe in [Recipe::O2, Recipe::O3] {
            let (mut naive, _, stats) = prepared(name);
            quantize_model(&mut naive.model, &recipe, Some(&stats), backend.clone()).unwrap();
            let naive_err = mean_abs_err(&logits(&naive.model, &ids), &reference);

            for targets in [SmoothTargets::Paper, SmoothTargets::All] {
                let (mut sq, _, mut stats) = prepared(name);
                let groups = smoothing_groups(&sq.model, targets).unwrap();
                smooth_model(&mut sq.model, &groups, &mut stats, &AlphaSpec::Global(0.5)).unwrap();
                quantize_model(&mut sq.model, &recipe, Some(&stats), backend.clone()).unwrap();
                let sq_err = mean_abs_err(&logits(&sq.model, &ids), &reference);
                assert!(
                    sq_err < naive_err,
                    "{name} {recipe:?} {targets:?}: smoothquant {sq_err} vs naive {naive_err}"
                );
            }
        }
    }
}

#[test]
fn w8a8_model_is_smaller_and_static_needs_stats() {
    let backend = sq_kernels::select_backend().unwrap();
    let (mut loaded, _, _) = prepared("llama-gqa");
    let fp_linear_bytes: usize = loaded
        .model
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .map(|l| l.linear.weight_bytes())
        .sum();
    quantize_model(
        &mut loaded.model,
        &Recipe::CHANNEL_TOKEN,
        None,
        backend.clone(),
    )
    .unwrap();
    let q_bytes: usize = loaded
        .model
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .map(|l| l.linear.weight_bytes())
        .sum();
    assert!(
        q_bytes * 3 < fp_linear_bytes,
        "{q_bytes} vs {fp_linear_bytes}"
    );
    let (mut loaded, _, _) = prepared("llama-gqa");
    let err = quantize_model(&mut loaded.model, &Recipe::O3, None, backend).unwrap_err();
    assert!(err.to_string().contains("static"), "{err}");
}

/// Each INT8 Linear equals its fake-quant twin on the same input, to float rounding.
#[test]
fn every_int8_linear_equals_its_oracle_on_the_same_input() {
    use sq_model::{ActQuant, FakeQuantLinear, Int8Linear, Linear, WeightGranularity};
    let backend = sq_kernels::select_backend().unwrap();
    for name in ["llama-gqa", "opt-prenorm", "bloom", "qwen2-bias"] {
        let (loaded, _, stats) = prepared(name);
        for l in loaded.model.layers.iter().flat_map(|b| b.linears()) {
            let fp = l.as_fp().unwrap();
            let k = fp.in_features();
            let m = 7;
            // Inputs with an outlier channel, like the real activations.
            let x: Vec<f32> = (0..m * k)
                .map(|i| {
                    ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0
                        + if i % k == 3 { 25.0 } else { 0.0 }
                })
                .collect();
            // The same Linear with a run-time smoothing divide fused into its quantizer.
            let mut divided = fp.clone();
            let factors: Vec<f32> = (0..k).map(|c| 1.0 / (0.5 + (c % 7) as f32)).collect();
            divided.smooth_input_at_runtime(&factors).unwrap();
            for (fp, weights) in [
                (fp, WeightGranularity::Channel),
                (fp, WeightGranularity::Tensor),
                (&divided, WeightGranularity::Channel),
                (&divided, WeightGranularity::Tensor),
            ] {
                let statics = ActQuant::Static {
                    scale: stats.get(&l.name).unwrap().tensor_absmax().max(26.0) / 127.0,
                };
                for act in [ActQuant::Token, ActQuant::Tensor, statics] {
                    let a = Int8Linear::from_fp(fp, weights, act, backend.clone()).unwrap();
                    assert_eq!(a.input_smoothing(), fp.input_smoothing());
                    let b = FakeQuantLinear::from_fp(fp, weights, act).unwrap();
                    let (mut ya, mut yb) = (
                        vec![0.0; m * fp.out_features()],
                        vec![0.0; m * fp.out_features()],
                    );
                    a.forward(&x, m, &mut ya).unwrap();
                    b.forward(&x, m, &mut yb).unwrap();
                    let e = rel_err(&ya, &yb);
                    assert!(e < 1e-5, "{} {weights:?} {act:?}: {e}", l.name);
                }
            }
        }
    }
}

#[test]
fn alpha_search_picks_per_group_strengths_that_beat_naive() {
    use sq_smooth::{default_grid, search_alphas};
    let backend = sq_kernels::select_backend().unwrap();
    let grid = default_grid();
    assert_eq!(grid.len(), 21);
    assert_eq!(grid[9], 0.45);
    for name in ["llama-gqa", "opt-prenorm", "bloom"] {
        let (fp, ids, _) = prepared(name);
        let reference = logits(&fp.model, &ids);
        let (mut loaded, _, mut stats) = prepared(name);
        let groups = paper_groups(&loaded.model).unwrap();
        let names: Vec<String> = groups.iter().map(|g| g.name().to_string()).collect();
        let cfg = CalibConfig {
            samples: 1,
            seq_len: 96,
            seed: 0,
        };
        let samples =
            sq_calib::sample_inputs(&mut loaded.model, &ids, &cfg, &names, 64, 1).unwrap();
        assert!(samples.values().all(|s| s.rows == 64));
        let choices = search_alphas(
            &loaded.model,
            &groups,
            &stats,
            &samples,
            &Recipe::O3,
            &grid,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(choices.len(), groups.len());
        for c in &choices {
            assert!(grid.contains(&c.alpha));
            assert!(c.error <= c.error_at_half, "{name} {}: {c:?}", c.group);
        }
        let spec = AlphaSpec::PerGroup {
            default: 0.5,
            groups: choices.iter().map(|c| (c.group.clone(), c.alpha)).collect(),
            unsmoothed: Default::default(),
        };
        smooth_model(&mut loaded.model, &groups, &mut stats, &spec).unwrap();
        quantize_model(
            &mut loaded.model,
            &Recipe::O3,
            Some(&stats),
            backend.clone(),
        )
        .unwrap();
        let auto_err = mean_abs_err(&logits(&loaded.model, &ids), &reference);

        let (mut naive, _, stats) = prepared(name);
        quantize_model(&mut naive.model, &Recipe::O3, Some(&stats), backend.clone()).unwrap();
        let naive_err = mean_abs_err(&logits(&naive.model, &ids), &reference);
        assert!(
            auto_err < naive_err,
            "{name}: auto {auto_err} vs naive {naive_err}"
        );
    }
}

/// The model-level stage of `--alpha auto` tries the global grid, the group subsets and the
/// per-group choices on the real INT8 path, moves away from global 0.5 only on significant
/// evidence, and its choice reproduces its score.
#[test]
fn model_level_alpha_refinement_moves_only_on_evidence() {
    use sq_smooth::{default_grid, refine_alphas, search_alphas};
    let backend = sq_kernels::select_backend().unwrap();
    let recipe = Recipe::O3;
    let (mut loaded, ids, stats) = prepared("llama-gqa");
    let groups = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
    let names: Vec<String> = groups.iter().map(|g| g.name().to_string()).collect();
    let cfg = CalibConfig {
        samples: 1,
        seq_len: 96,
        seed: 0,
    };
    let samples = sq_calib::sample_inputs(&mut loaded.model, &ids, &cfg, &names, 96, 1).unwrap();
    let local = search_alphas(
        &loaded.model,
        &groups,
        &stats,
        &samples,
        &recipe,
        &default_grid(),
        |_, _| {},
    )
    .unwrap();
    let quantize = |m: &mut Model, st: &StatsTable| {
        quantize_model(m, &recipe, Some(st), backend.clone()).map(|_| ())
    };
    let grid = [0.3, 0.5, 0.7];
    let r = refine_alphas(
        &loaded.model,
        &groups,
        &stats,
        &local,
        &grid,
        &ids,
        48,
        2,
        true,
        quantize,
        |_, _| {},
    )
    .unwrap();
    // 3 global + up to 2 refinements + 6 subsets + per-kind moves + 2 per-group.
    assert!(r.tried.len() >= 11, "{:?}", r.tried.len());
    assert!(r.tried.iter().any(|c| c.label.contains("norm groups only")));
    // The run-time divide candidates smooth the same groups with `1/s` applied at run time.
    let runtime: Vec<_> = r
        .tried
        .iter()
        .filter(|c| c.label.contains("divided at run time"))
        .collect();
    assert_eq!(runtime.len(), 3);
    for c in &runtime {
        assert!(
            c.groups.iter().any(|g| g.fold == Fold::Runtime),
            "{}",
            c.label
        );
        assert!(c
            .groups
            .iter()
            .all(|g| !matches!(g.fold, Fold::Rows { .. })));
    }
    assert!(r.tried.iter().any(|c| c.label.starts_with("per-kind")));
    // Per-kind candidates give every group of one kind the same alpha.
    for c in r.tried.iter().filter(|c| c.label.starts_with("per-kind")) {
        let mut by_kind: std::collections::BTreeMap<String, f32> = Default::default();
        for g in &c.groups {
            let a = c.alphas.for_group(g.name());
            let prev = *by_kind.entry(sq_smooth::group_kind(g.name())).or_insert(a);
            assert_eq!(prev, a, "{}: {}", c.label, g.name());
        }
    }
    assert!(r.tried.iter().any(|c| c.label.starts_with("per-group")));
    let half = r.tried.iter().find(|c| c.label == "global 0.5").unwrap();
    for c in &r.tried {
        assert!(c.mean_nll().is_finite() && c.mean_kl().is_finite() && c.mean_kl() >= 0.0);
        assert_eq!(c.divergence.window_kl.len(), 2);
        assert!(c.groups.iter().all(|g| groups
            .iter()
            .any(|o| o == g || o.divided_at_runtime() == *g)));
    }
    // The choice is global 0.5 or reached from it by moves that each lower both the KL (by
    // SIGNIFICANCE standard errors) and the calibration NLL.
    if r.chosen.label != "global 0.5" {
        assert!(
            r.chosen.mean_kl() < half.mean_kl() && r.chosen.mean_nll() < half.mean_nll(),
            "{} chosen over global 0.5",
            r.chosen.label
        );
    }
    println!("chosen: {}", r.chosen.label);
    // The choice applies to a fresh copy, and the search is deterministic.
    let mut again = loaded.model.try_clone().unwrap();
    let mut st = stats.clone();
    smooth_model(&mut again, &r.chosen.groups, &mut st, &r.chosen.alphas).unwrap();
    quantize_model(&mut again, &recipe, Some(&st), backend.clone()).unwrap();
    let fp_logits = logits(&again, &ids[..48]);
    assert!(fp_logits.iter().all(|v| v.is_finite()));
    let r2 = refine_alphas(
        &loaded.model,
        &groups,
        &stats,
        &local,
        &grid,
        &ids,
        48,
        2,
        true,
        |m: &mut Model, st: &StatsTable| {
            quantize_model(m, &recipe, Some(st), backend.clone()).map(|_| ())
        },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(r2.chosen.label, r.chosen.label);
    assert_eq!(r2.chosen.divergence, r.chosen.divergence);
}

/// Sees every Linear input and does nothing: attached to a model it turns off the shared and
/// fused input quantization (each Linear then quantizes the f32 norm output itself).
struct NoOpObserver;

impl sq_model::LinearObserver for NoOpObserver {
    fn observe(&self, _: &str, _: &[f32], _: usize) -> Result<(), String> {
        Ok(())
    }
}

/// The decoder with each norm fused into the quantization of the Linears it feeds equals the
/// unfused decoder (norm to f32, each Linear quantizing its input) on LLaMA, OPT and BLOOM, for
/// per-token, dynamic per-tensor and static activations, in prefill and in decode.
#[test]
fn the_norm_fused_with_the_input_quantizer_equals_the_unfused_decoder() {
    let backend = sq_kernels::select_backend().unwrap();
    for name in ["llama-gqa", "opt-prenorm", "bloom"] {
        for recipe in [Recipe::CHANNEL_TOKEN, Recipe::O2, Recipe::O3] {
            for residual_from_norm in [false, true] {
                if residual_from_norm && name != "bloom" {
                    continue;
                }
                let (mut fused, ids, stats) = prepared(name);
                quantize_model(&mut fused.model, &recipe, Some(&stats), backend.clone()).unwrap();
                let (mut unfused, _, stats) = prepared(name);
                quantize_model(&mut unfused.model, &recipe, Some(&stats), backend.clone()).unwrap();
                unfused
                    .model
                    .set_observer(Some(std::sync::Arc::new(NoOpObserver)));
                fused.model.config.residual_from_norm = residual_from_norm;
                unfused.model.config.residual_from_norm = residual_from_norm;
                let what = format!("{name} {recipe:?} residual from norm {residual_from_norm}");
                // Prefill of all but the last 3 tokens, then 3 decode steps.
                let split = ids.len() - 3;
                let run = |model: &Model| {
                    let mut session = model.session(ids.len());
                    let mut out = Vec::new();
                    let mut all = Vec::new();
                    model
                        .forward(&ids[..split], &mut session, Logits::All, &mut out)
                        .unwrap();
                    all.extend_from_slice(&out);
                    for &id in &ids[split..] {
                        model
                            .forward(&[id], &mut session, Logits::Last, &mut out)
                            .unwrap();
                        all.extend_from_slice(&out);
                    }
                    all
                };
                let (a, b) = (run(&fused.model), run(&unfused.model));
                assert_eq!(a.len(), b.len());
                let e = rel_err(&a, &b);
                assert!(e <= 1e-6, "{what}: fused vs unfused relative error {e}");
            }
        }
    }
}

//! Smoothing alone (no quantization) leaves the model's outputs unchanged.

use sq_calib::{calibrate, CalibConfig};
use sq_model::{load_hf_dir, Logits, Model};
use sq_smooth::{
    paper_groups, smooth_model, smoothing_groups, AlphaSpec, BeyondFold, Fold, SmoothTargets,
};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
}

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

const TEXT: &str = "Robert Boulter is an English film , television and theatre actor . He had a guest \
    starring role on the television series The Bill in 2000 . This was followed by a starring role in the play \
    Herons written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre .";

#[test]
fn smoothing_preserves_logits_on_every_prenorm_fixture() {
    for name in [
        "llama-gqa",
        "llama-tied-bf16",
        "llama-linear-rope",
        "qwen2-bias",
        "opt-prenorm",
        "bloom",
        "bloom-bf16",
    ] {
        for alpha in [0.5, 0.85] {
            let mut loaded = load_hf_dir(&fixture(name)).unwrap();
            let mut ids = loaded.tokenizer.encode(TEXT).unwrap();
            ids.truncate(96);
            let before = logits(&loaded.model, &ids);
            let mut stats = calib(&mut loaded.model, &ids);
            let groups = paper_groups(&loaded.model).unwrap();
            assert_eq!(groups.len(), 2 * loaded.model.layers.len());
            let results = smooth_model(
                &mut loaded.model,
                &groups,
                &mut stats,
                &AlphaSpec::Global(alpha),
            )
            .unwrap();
            let after = logits(&loaded.model, &ids);
            let e = rel_err(&after, &before);
            assert!(
                e < 1e-4,
                "{name} alpha {alpha}: smoothing changed the logits by {e}"
            );
            // The injected outlier channels make layer 0's attention input spiky; smoothing flattens it.
            let first = &results[0];
            assert!(first.ratio_after < first.ratio_before, "{name}: {first:?}");
            // The statistics now describe the smoothed model: recalibrating gives the same ranges.
            let fresh = calib(&mut loaded.model, &ids);
            let q = first.group.name();
            let (a, b) = (
                stats.get(q).unwrap().channel_absmax(),
                fresh.get(q).unwrap().channel_absmax(),
            );
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-4 * y.abs().max(1e-3),
                    "{name} {q}: {x} vs {y}"
                );
            }
        }
    }
}

fn calib(model: &mut Model, ids: &[u32]) -> sq_calib::StatsTable {
    let cfg = CalibConfig {
        samples: 1,
        seq_len: 128,
        seed: 0,
    };
    calibrate(model, ids, &cfg, |_, _| {}).unwrap()
}

/// `--smooth-targets all`: the attention output and last MLP projections are smoothed too
/// (value rows, up_proj rows, fc1 rows through ReLU, BLOOM's run-time divide), and the model's
/// outputs stay the same, including post-norm OPT where only the non-norm folds apply.
#[test]
fn smoothing_every_input_preserves_logits() {
    for name in [
        "llama-gqa",
        "llama-tied-bf16",
        "llama-linear-rope",
        "qwen2-bias",
        "opt-prenorm",
        "opt-postnorm",
        "opt-project",
        "bloom",
        "bloom-bf16",
    ] {
        for alpha in [0.5, 0.85] {
            let mut loaded = load_hf_dir(&fixture(name)).unwrap();
            let mut ids = loaded.tokenizer.encode(TEXT).unwrap();
            ids.truncate(96);
            let before = logits(&loaded.model, &ids);
            let mut stats = calib(&mut loaded.model, &ids);
            let groups = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
            let layers = loaded.model.layers.len();
            let per_layer = if loaded.model.config.pre_norm { 4 } else { 2 };
            assert_eq!(groups.len(), per_layer * layers, "{name}");
            let cfg = &loaded.model.config;
            let runtime = groups.iter().filter(|g| g.fold == Fold::Runtime).count();
            // BLOOM's GELU has no exact fold: its last MLP projection divides at run time.
            let expect_runtime = if name.starts_with("bloom") { layers } else { 0 };
            assert_eq!(runtime, expect_runtime, "{name}");
            let tied = groups.iter().filter(|g| g.fold.ties_channels()).count();
            assert_eq!(
                tied,
                if cfg.num_kv_heads < cfg.num_heads {
                    layers
                } else {
                    0
                },
                "{name}"
            );
            let results = smooth_model(
                &mut loaded.model,
                &groups,
                &mut stats,
                &AlphaSpec::Global(alpha),
            )
            .unwrap();
            let after = logits(&loaded.model, &ids);
            let e = rel_err(&after, &before);
            assert!(
                e < 1e-4,
                "{name} alpha {alpha}: smoothing every input changed the logits by {e}"
            );
            for r in &results {
                // Tied channels (heads sharing a value row) got one scale.
                if r.group.fold.ties_channels() {
                    for c in 0..r.scales.len() {
                        let peer = r.group.fold.producer_row(c);
                        let first = (0..r.scales.len())
                            .find(|&d| r.group.fold.producer_row(d) == peer)
                            .unwrap();
                        assert_eq!(r.scales[c], r.scales[first], "{name} {}", r.group.name());
                    }
                }
            }
            // The statistics describe the smoothed model for every folded group (a run-time divide
            // happens inside the Linear, after the observer).
            let fresh = calib(&mut loaded.model, &ids);
            for r in results.iter().filter(|r| r.group.fold != Fold::Runtime) {
                let q = r.group.name();
                let (a, b) = (
                    stats.get(q).unwrap().channel_absmax(),
                    fresh.get(q).unwrap().channel_absmax(),
                );
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-4 * y.abs().max(1e-3),
                        "{name} {q}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

/// `--smooth-fold runtime`: every group that would fold into a producer's rows divides at run
/// time instead (norm folds stay), the producers' weights are untouched, and the logits stay
/// the same.
#[test]
fn runtime_divides_preserve_logits_and_leave_producers_alone() {
    for name in ["llama-gqa", "opt-prenorm", "opt-postnorm", "bloom"] {
        let mut loaded = load_hf_dir(&fixture(name)).unwrap();
        let mut ids = loaded.tokenizer.encode(TEXT).unwrap();
        ids.truncate(96);
        let before = logits(&loaded.model, &ids);
        let mut stats = calib(&mut loaded.model, &ids);
        let all = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
        let groups = BeyondFold::Runtime.apply(&all);
        assert_eq!(groups.len(), all.len());
        assert!(groups.iter().all(|g| !matches!(g.fold, Fold::Rows { .. })));
        for (g, o) in groups.iter().zip(&all) {
            assert_eq!(g.linears, o.linears);
            if o.norm().is_some() {
                assert_eq!(g, o, "{name}: norm folds are kept");
            }
        }
        // The producers of the row folds keep their output rows: their weights equal those of
        // the same model smoothed with the norm groups alone (which scale their input channels).
        let producers: Vec<String> = all
            .iter()
            .filter_map(|g| match &g.fold {
                Fold::Rows { linear, .. } => Some(linear.clone()),
                _ => None,
            })
            .collect();
        assert!(!producers.is_empty(), "{name}");
        let mut norms_only = loaded.model.try_clone().unwrap();
        let norm_groups: Vec<_> = all.iter().filter(|g| g.norm().is_some()).cloned().collect();
        smooth_model(
            &mut norms_only,
            &norm_groups,
            &mut stats.clone(),
            &AlphaSpec::Global(0.5),
        )
        .unwrap();
        smooth_model(
            &mut loaded.model,
            &groups,
            &mut stats,
            &AlphaSpec::Global(0.5),
        )
        .unwrap();
        let weight = |m: &Model, l: &str| {
            m.linears()
                .into_iter()
                .find(|x| x.name == l)
                .unwrap()
                .as_fp()
                .unwrap()
                .weight()
        };
        for l in &producers {
            assert!(
                weight(&loaded.model, l) == weight(&norms_only, l),
                "{name}: {l} was changed by a run-time divide"
            );
        }
        let e = rel_err(&logits(&loaded.model, &ids), &before);
        assert!(
            e < 1e-4,
            "{name}: run-time divides changed the logits by {e}"
        );
    }
}

#[test]
fn paper_targets_are_the_paper_groups() {
    for name in ["llama-gqa", "opt-prenorm", "bloom"] {
        let loaded = load_hf_dir(&fixture(name)).unwrap();
        let paper = paper_groups(&loaded.model).unwrap();
        assert_eq!(
            smoothing_groups(&loaded.model, SmoothTargets::Paper).unwrap(),
            paper
        );
        assert!(paper.iter().all(|g| g.norm().is_some()));
        let all = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
        // `all` keeps the paper's groups, in forward order with the new ones.
        let norms: Vec<_> = all.iter().filter(|g| g.norm().is_some()).cloned().collect();
        assert_eq!(norms, paper, "{name}");
    }
    let loaded = load_hf_dir(&fixture("llama-gqa")).unwrap();
    let all = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
    assert_eq!(all[1].name(), "model.layers.0.self_attn.o_proj");
    assert_eq!(all[1].fold.describe(), "rows of v_proj");
    assert_eq!(all[3].name(), "model.layers.0.mlp.down_proj");
    assert_eq!(all[3].fold.describe(), "rows of up_proj");
}

#[test]
fn post_norm_models_are_refused_clearly() {
    for name in ["opt-postnorm", "opt-project"] {
        let loaded = load_hf_dir(&fixture(name)).unwrap();
        let err = paper_groups(&loaded.model).unwrap_err();
        assert!(err.to_string().contains("do_layer_norm_before"), "{err}");
    }
}

#[test]
fn group_tables_name_hugging_face_modules() {
    let loaded = load_hf_dir(&fixture("bloom")).unwrap();
    let groups = paper_groups(&loaded.model).unwrap();
    assert_eq!(groups[0].norm(), Some("transformer.h.0.input_layernorm"));
    assert_eq!(
        groups[0].linears,
        ["transformer.h.0.self_attention.query_key_value"]
    );
    assert_eq!(
        groups[3].norm(),
        Some("transformer.h.1.post_attention_layernorm")
    );
    let loaded = load_hf_dir(&fixture("opt-prenorm")).unwrap();
    let groups = paper_groups(&loaded.model).unwrap();
    assert_eq!(groups[1].linears, ["model.decoder.layers.0.fc1"]);
    assert_eq!(groups[0].name(), "model.decoder.layers.0.self_attn.q_proj");
}

#[test]
fn alpha_tables() {
    let spec = AlphaSpec::from_json(r#"{"model.layers.0.self_attn.q_proj": 0.8}"#, 0.5).unwrap();
    assert_eq!(spec.for_group("model.layers.0.self_attn.q_proj"), 0.8);
    assert_eq!(spec.for_group("model.layers.1.self_attn.q_proj"), 0.5);
    assert!(AlphaSpec::from_json(r#"{"x": 1.5}"#, 0.5).is_err());
    assert!(AlphaSpec::from_json("[1]", 0.5).is_err());
    assert!(AlphaSpec::from_json(r#"{"x": "0.5"}"#, 0.5).is_err());
}

/// `null` in an α table leaves that group unsmoothed: its norm and weights stay as they were,
/// the other groups are smoothed, and the outputs are still unchanged.
#[test]
fn alpha_table_null_leaves_a_group_unsmoothed() {
    let mut loaded = load_hf_dir(&fixture("llama-gqa")).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 97).collect();
    let mut stats = calibrate(
        &mut loaded.model,
        &ids,
        &CalibConfig {
            samples: 1,
            seq_len: 40,
            seed: 0,
        },
        |_, _| {},
    )
    .unwrap();
    let groups = smoothing_groups(&loaded.model, SmoothTargets::All).unwrap();
    let skipped = groups[0].name().to_string();
    let Fold::Norm { norm } = &groups[0].fold else {
        panic!("the first group folds into a norm")
    };
    let norm_before = loaded.model.layers[0].attn_norm.weight.clone();
    assert_eq!(&loaded.model.layers[0].attn_norm.name, norm);
    let before = logits(&loaded.model, &ids);
    let spec = AlphaSpec::from_json(&format!(r#"{{"{skipped}": null}}"#), 0.6).unwrap();
    assert!(!spec.smooths(&skipped) && spec.smooths(groups[1].name()));
    assert_eq!(spec.unsmoothed(), [skipped.as_str()]);
    let results = smooth_model(&mut loaded.model, &groups, &mut stats, &spec).unwrap();
    assert_eq!(results.len(), groups.len() - 1);
    assert!(results
        .iter()
        .all(|r| r.group.name() != skipped && r.alpha == 0.6));
    assert_eq!(loaded.model.layers[0].attn_norm.weight, norm_before);
    assert_ne!(loaded.model.layers[0].mlp_norm.weight, {
        let fresh = load_hf_dir(&fixture("llama-gqa")).unwrap();
        fresh.model.layers[0].mlp_norm.weight.clone()
    });
    let after = logits(&loaded.model, &ids);
    assert!(rel_err(&after, &before) < 1e-4);
}

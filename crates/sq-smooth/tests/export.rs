//! Native W8A8 checkpoints: write, reload, run INT8 with exactly the in-memory results.

use sq_calib::{calibrate, CalibConfig};
use sq_model::{load, load_hf_dir, Logits, Model};
use sq_smooth::{
    quantize_lm_head, quantize_model, save_native, smooth_model, smoothing_groups, AlphaSpec,
    ExportInfo, LmHead, Recipe, SmoothTargets,
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

#[test]
fn native_checkpoints_reload_bit_identically() {
    let backend = sq_kernels::select_backend().unwrap();
    let (fp32, int8) = (LmHead::Fp32, LmHead::Int8);
    // (fixture, recipe, smoothed, INT8 attention, LM head)
    let cases = [
        ("llama-gqa", Recipe::CHANNEL_TOKEN, true, false, fp32),
        ("opt-prenorm", Recipe::O3, true, false, fp32),
        ("bloom", Recipe::O2, true, false, fp32),
        ("llama-tied-bf16", Recipe::O1, true, false, fp32),
        ("opt-postnorm", Recipe::O3, true, false, fp32),
        ("opt-prenorm", Recipe::CHANNEL_TOKEN, false, false, fp32),
        ("llama-gqa", Recipe::CHANNEL_TOKEN, true, true, fp32),
        ("opt-prenorm", Recipe::O3, true, true, fp32),
        ("bloom", Recipe::O2, false, true, fp32),
        // INT8 LM head: untied, and tied (the embedding then reads the head's INT8 rows).
        ("llama-gqa", Recipe::O3, true, false, int8),
        ("llama-tied-bf16", Recipe::CHANNEL_TOKEN, true, false, int8),
        ("bloom", Recipe::O1, false, true, int8),
    ];
    for (name, recipe, smooth, int8_attention, lm_head) in cases {
        let mut fp = load_hf_dir(&fixture(name)).unwrap();
        let mut ids = fp
            .tokenizer
            .encode(
                "The game began development in 2010 , carrying over a large portion of the work",
            )
            .unwrap();
        ids.truncate(48);
        let mut stats = calibrate(
            &mut fp.model,
            &ids,
            &CalibConfig {
                samples: 1,
                seq_len: 48,
                seed: 0,
            },
            |_, _| {},
        )
        .unwrap();
        if smooth {
            // Every input: BLOOM's run-time divide must survive the round trip too.
            let groups = smoothing_groups(&fp.model, SmoothTargets::All).unwrap();
            smooth_model(&mut fp.model, &groups, &mut stats, &AlphaSpec::Global(0.6)).unwrap();
        }
        let info = ExportInfo {
            scheme: if smooth { "smoothquant" } else { "naive" }.into(),
            recipe,
            record: serde_json::Map::from_iter([("alpha".to_string(), serde_json::json!(0.6))]),
            add_bos: false,
            int8_attention,
            tokenizer_json: fp.tokenizer.to_hf_json().unwrap(),
            extra_files: vec![],
            max_shard_bytes: None,
            lm_head,
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("w8a8");
        save_native(&fp.model, &fp.hf_config, Some(&stats), &info, &out, false).unwrap();
        // Deterministic bytes; refusing to overwrite without permission.
        let first = std::fs::read(out.join("model.safetensors")).unwrap();
        assert!(save_native(&fp.model, &fp.hf_config, Some(&stats), &info, &out, false).is_err());
        save_native(&fp.model, &fp.hf_config, Some(&stats), &info, &out, true).unwrap();
        assert!(
            first == std::fs::read(out.join("model.safetensors")).unwrap(),
            "{name}: re-export differs"
        );

        let reloaded = load(Some(&out), None).unwrap();
        let qc = reloaded
            .quantization
            .as_ref()
            .expect("recognised as a quantized checkpoint");
        assert_eq!(qc.scheme, info.scheme);
        assert_eq!(qc.acts, recipe.acts.name());
        assert_eq!(qc.int8_attention, int8_attention, "{name}");
        assert_eq!(reloaded.model.attention.is_int8(), int8_attention, "{name}");
        assert!(reloaded.model.layers[0]
            .linears()
            .iter()
            .all(|l| l.linear.kind().starts_with("w8a8")));
        assert_eq!(
            reloaded.tokenizer.encode("hello world").unwrap(),
            fp.tokenizer.encode("hello world").unwrap()
        );

        let runtime_divides = |m: &Model| {
            m.linears()
                .iter()
                .filter_map(|l| l.linear.as_any().downcast_ref::<sq_model::Int8Linear>())
                .filter(|l| l.input_smoothing().is_some())
                .count()
        };
        quantize_model(&mut fp.model, &recipe, Some(&stats), backend.clone()).unwrap();
        if int8_attention {
            fp.model.attention = sq_model::AttentionMode::Int8(backend.clone());
        }
        if lm_head == LmHead::Int8 {
            quantize_lm_head(&mut fp.model, backend.clone()).unwrap();
            assert!(reloaded.model.lm_head.linear.kind().starts_with("w8a8"));
        }
        assert_eq!(
            reloaded.model.embed.in_lm_head, fp.model.embed.in_lm_head,
            "{name}"
        );
        assert_eq!(
            fp.model.embed.in_lm_head, fp.model.config.tie_word_embeddings,
            "{name}: a tied model holds its table once"
        );
        let expected = if smooth && name.starts_with("bloom") {
            fp.model.layers.len()
        } else {
            0
        };
        assert_eq!(runtime_divides(&fp.model), expected, "{name}");
        assert_eq!(runtime_divides(&reloaded.model), expected, "{name}");
        assert_eq!(
            logits(&reloaded.model, &ids),
            logits(&fp.model, &ids),
            "{name}: reloaded INT8 differs"
        );
        assert_eq!(reloaded.model.weight_bytes(), fp.model.weight_bytes());
    }
}

#[test]
fn corrupted_quantized_checkpoints_are_named_errors() {
    let mut fp = load_hf_dir(&fixture("llama-gqa")).unwrap();
    let ids = fp
        .tokenizer
        .encode("The game began development in 2010")
        .unwrap();
    let stats = calibrate(
        &mut fp.model,
        &ids,
        &CalibConfig {
            samples: 1,
            seq_len: 16,
            seed: 0,
        },
        |_, _| {},
    )
    .unwrap();
    let info = ExportInfo {
        scheme: "naive".into(),
        recipe: Recipe::O3,
        record: Default::default(),
        add_bos: false,
        int8_attention: false,
        tokenizer_json: fp.tokenizer.to_hf_json().unwrap(),
        extra_files: vec![],
        max_shard_bytes: None,
        lm_head: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    save_native(&fp.model, &fp.hf_config, Some(&stats), &info, &out, false).unwrap();
    let cfg_path = out.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        original.replace("\"acts\": \"static\"", "\"acts\": \"sometimes\""),
    )
    .unwrap();
    let err = load(Some(&out), None).unwrap_err();
    assert!(err.to_string().contains("sometimes"), "{err}");
    std::fs::write(
        &cfg_path,
        original.replace("\"weights\": \"tensor\"", "\"weights\": \"channel\""),
    )
    .unwrap();
    let err = load(Some(&out), None).unwrap_err();
    assert!(err.to_string().contains("weight_scale"), "{err}");
}

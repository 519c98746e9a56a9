//! Reading a compressed-tensors W8A8 checkpoint that the compressed-tensors package wrote
//! itself (`tests/reference/make_ct_fixture.py`: llama-gqa, weights INT8 per channel, inputs
//! INT8 static per tensor, `lm_head` and `model.layers.1.mlp.down_proj` ignored), against the
//! logits transformers computes for it.

use sq_model::{load, Logits};
use sq_tensor::SafetensorsFile;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/compressed-tensors/llama-gqa-w8a8-static"
    ))
}

#[test]
fn third_party_checkpoint_runs_int8_and_matches_transformers() {
    let dir = fixture();
    let loaded = load(Some(&dir), None).unwrap();
    assert_eq!(loaded.format, "compressed-tensors");
    let qc = loaded
        .quantization
        .as_ref()
        .expect("a quantized checkpoint");
    assert_eq!(qc.scheme, "w8a8");
    assert_eq!(qc.acts, "static");
    assert_eq!(qc.weights, sq_model::WeightGranularity::Channel);
    assert_eq!(qc.extra["quantized_linears"], 13);
    let model = &loaded.model;
    for l in model.linears() {
        let float = l.name == "lm_head" || l.name == "model.layers.1.mlp.down_proj";
        assert_eq!(
            l.linear.kind().starts_with("w8a8"),
            !float,
            "{}: {}",
            l.name,
            l.linear.kind()
        );
    }

    let golden = SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
    let ids: Vec<u32> = golden
        .tensor("input_ids")
        .unwrap()
        .to_vec::<i32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let mut session = model.session(ids.len());
    let mut logits = Vec::new();
    model
        .forward(&ids, &mut session, Logits::All, &mut logits)
        .unwrap();
    let rel_err = |golden: &[f32]| {
        assert_eq!(logits.len(), golden.len());
        let scale = golden.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = logits
            .iter()
            .zip(golden)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    };
    // transformers' arithmetic with activations clamped to [-127, 127], as the sq-kernels
    // quantizers do: the INT8 GEMM reproduces it to float rounding, so every tensor was read
    // under the right name, dtype and layout.
    let clamp127 = golden
        .tensor("logits_clamp127")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let e = rel_err(&clamp127);
    assert!(e < 1e-4, "against logits_clamp127: relative error {e}");
    // transformers itself lets an activation reach -128: with llm-compressor's static scale
    // max|x| / 127.5, the calibrated minimum lands on -127.5 and rounds to -128. One such element
    // (an outlier channel, 20x the others in this fixture) at the layer-0 q/k/v input moves the
    // logits by 6.6% of their range; on real models the effect is far smaller.
    let transformers = golden.tensor("logits").unwrap().to_f32_vec().unwrap();
    let e = rel_err(&transformers);
    assert!(e < 0.1, "against transformers: relative error {e}");
}

#[test]
fn unsupported_schemes_are_refused_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "/config_groups/group_0/input_activations",
            serde_json::json!({"num_bits": 8, "strategy": "tensor", "dynamic": false, "symmetric": false}),
            "asymmetric",
        ),
        (
            "/config_groups/group_0/weights",
            serde_json::json!({"num_bits": 8, "strategy": "group", "group_size": 32}),
            "strategy `group` (group_size 32)",
        ),
        (
            "/config_groups/group_0/input_activations",
            serde_json::Value::Null,
            "weight-only",
        ),
        (
            "/kv_cache_scheme",
            serde_json::json!({"num_bits": 8, "strategy": "tensor"}),
            "kv_cache_scheme",
        ),
        (
            "/format",
            serde_json::json!("pack-quantized"),
            "pack-quantized",
        ),
        // Un-ignoring the float down_proj: it is targeted but stored in float.
        (
            "/ignore",
            serde_json::json!(["lm_head"]),
            "model.layers.1.mlp.down_proj",
        ),
    ];
    for (pointer, value, expect) in cases {
        let mut c = config.clone();
        *c["quantization_config"].pointer_mut(pointer).unwrap() = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let err = load(Some(&dir), None).unwrap_err().to_string();
        assert!(err.contains(expect), "{pointer}: {err}");
        if pointer.starts_with("/config_groups") {
            assert!(err.contains("model.layers.0.self_attn.q_proj"), "{err}");
        }
    }
    // A `re:` ignore matches as Python's re.match does: the float down_proj is ignored again.
    let mut c = config.clone();
    c["quantization_config"]["ignore"] =
        serde_json::json!(["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let loaded = load(Some(&dir), None).unwrap();
    assert_eq!(loaded.quantization.unwrap().extra["quantized_linears"], 13);
}

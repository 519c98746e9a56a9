//! Bad checkpoints give the crate's named error, never a panic.

use sq_model::{load, load_hf_dir, ModelError};
use sq_tensor::{save_safetensors, Checkpoint, Tensor};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
}

/// Copy a fixture directory so a test can break it.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrite model.safetensors with `edit` applied to the tensor list.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = {
        let ckpt = Checkpoint::open(&path).unwrap();
        ckpt.names()
            .map(|n| {
                (
                    n.to_string(),
                    ckpt.tensor(n)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .view()
                        .to_owned()
                        .unwrap(),
                )
            })
            .collect()
    };
    edit(&mut tensors);
    save_safetensors(&path, &tensors, None).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("opt-prenorm");
    edit_weights(dir.path(), |t| {
        t.retain(|(n, _)| !n.ends_with("layers.1.fc2.weight"))
    });
    let err = load_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("model.decoder.layers.1.fc2.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("bloom");
    edit_weights(dir.path(), |t| {
        let e = t
            .iter_mut()
            .find(|(n, _)| n.ends_with("h.0.self_attention.dense.weight"))
            .unwrap();
        e.1 = Tensor::from_vec(vec![0.0f32; 64 * 32], &[64, 32]).unwrap();
    });
    let err = load_hf_dir(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::TensorShape { .. }), "{err:?}");
    assert!(
        msg.contains("self_attention.dense.weight")
            && msg.contains("[64, 32]")
            && msg.contains("[64, 64]"),
        "{msg}"
    );
}

#[test]
fn nan_weight_is_named() {
    let dir = copy_fixture("opt-prenorm");
    edit_weights(dir.path(), |t| {
        let e = t
            .iter_mut()
            .find(|(n, _)| n.ends_with("layers.0.fc1.bias"))
            .unwrap();
        let mut v = e.1.to_f32_vec().unwrap();
        v[3] = f32::NAN;
        e.1 = Tensor::from_vec(v, &[e.1.numel()]).unwrap();
    });
    let err = load_hf_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::NonFinite { index: 3, .. }),
        "{err:?}"
    );
}

#[test]
fn unsupported_architecture() {
    let dir = copy_fixture("llama-gqa");
    edit_config(dir.path(), |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let err = load_hf_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("GPTNeoXForCausalLM"));
}

#[test]
fn nonsense_configs() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "llama-gqa",
            Box::new(|c| c["num_attention_heads"] = 0.into()),
            "num_attention_heads",
        ),
        (
            "llama-gqa",
            Box::new(|c| {
                c["num_attention_heads"] = 5.into();
                c.as_object_mut().unwrap().remove("head_dim");
            }),
            "not divisible",
        ),
        (
            "llama-gqa",
            Box::new(|c| c["num_key_value_heads"] = 3.into()),
            "num_key_value_heads",
        ),
        (
            "opt-prenorm",
            Box::new(|c| c["num_attention_heads"] = 3.into()),
            "not divisible",
        ),
        ("bloom", Box::new(|c| c["n_head"] = 0.into()), "is 0"),
        (
            "opt-prenorm",
            Box::new(|c| c["activation_function"] = "swishy".into()),
            "swishy",
        ),
        (
            "llama-tied-bf16",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
                c.as_object_mut().unwrap().remove("rope_parameters");
            }),
            "low_freq_factor",
        ),
        (
            "llama-gqa",
            Box::new(|c| c["hidden_size"] = "wide".into()),
            "hidden_size",
        ),
    ];
    for (fixture_name, edit, expected) in cases {
        let dir = copy_fixture(fixture_name);
        edit_config(dir.path(), |c| edit(c));
        let err = load_hf_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, ModelError::Config { .. }),
            "{fixture_name}/{expected}: {err:?}"
        );
        assert!(err.to_string().contains(expected), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}

#[test]
fn truncated_weights_file() {
    let dir = copy_fixture("opt-prenorm");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let err = load_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn missing_files_and_unknown_formats() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load(Some(&dir.path().join("nope")), None).unwrap_err(),
        ModelError::Io { .. }
    ));
    assert!(matches!(
        load(Some(dir.path()), None).unwrap_err(),
        ModelError::UnknownFormat { .. }
    ));
    let txt = dir.path().join("model.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert!(matches!(
        load(Some(&txt), None).unwrap_err(),
        ModelError::UnknownFormat { .. }
    ));
    let bin = dir.path().join("model.bin");
    std::fs::write(&bin, [0u8; 10]).unwrap();
    let err = load(Some(&bin), None).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer { .. }), "{err:?}");
    let copy = copy_fixture("opt-prenorm");
    std::fs::remove_file(copy.path().join("tokenizer.json")).unwrap();
    assert!(matches!(
        load_hf_dir(copy.path()).unwrap_err(),
        ModelError::Tokenizer { .. }
    ));
}

#[test]
fn sequence_longer_than_context_is_an_error() {
    let loaded = load_hf_dir(&fixture("llama-gqa")).unwrap();
    let mut session = loaded.model.session(1_000_000);
    assert_eq!(session.cache.capacity(), 128);
    let mut logits = Vec::new();
    let tokens = vec![5u32; 129];
    let err = loaded
        .model
        .forward(&tokens, &mut session, sq_model::Logits::Last, &mut logits)
        .unwrap_err();
    assert!(err.to_string().contains("capacity"), "{err}");
    let err = loaded
        .model
        .forward(
            &[100_000],
            &mut session,
            sq_model::Logits::Last,
            &mut logits,
        )
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
}

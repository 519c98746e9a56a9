//! `quantize --format compressed-tensors` on stories260K and the random Hugging Face fixtures:
//! the config and tensors follow the compressed-tensors `int-quantized` layout, the export
//! reloads with `--model` and evaluates exactly like the in-memory quantized model, the bytes
//! are deterministic, and what the layout cannot hold is refused.

use sq_tensor::{DType, SafetensorsFile};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smoothquant"))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn demo(file: &str) -> String {
    format!("{}/assets/demo/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hf")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `quantize` arguments for `model` (None: the embedded stories260K) and the recipe flags.
fn quantize_args<'a>(model: Option<&'a str>, recipe: &[&'a str], out: &'a str) -> Vec<&'a str> {
    let mut a = vec!["quantize"];
    if let Some(m) = model {
        a.extend(["--model", m]);
    }
    a.extend(recipe);
    a.extend([
        "--calib-data",
        "CALIB",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "64",
        "--format",
        "compressed-tensors",
        "--out",
        out,
        "--json",
    ]);
    a
}

fn with_calib<'a>(args: &[&'a str], calib: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|a| if *a == "CALIB" { calib } else { a })
        .collect()
}

/// Perplexity of one scheme row from `eval --json`.
fn eval_ppl(extra: &[&str], seq_len: &str, data: &str) -> (f64, serde_json::Value) {
    let mut a = vec![
        "eval",
        "--data",
        data,
        "--seq-len",
        seq_len,
        "--max-windows",
        "4",
        "--json",
    ];
    a.extend(extra);
    let v = json(&run(&a));
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    (rows[0]["perplexity"].as_f64().unwrap(), rows[0].clone())
}

/// Check the exported directory against the layout and return its config.json.
fn check_layout(dir: &Path, weights: &str, acts: &str) -> serde_json::Value {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["format"], "int-quantized");
    assert_eq!(qc["quantization_status"], "compressed");
    assert_eq!(qc["kv_cache_scheme"], serde_json::Value::Null);
    assert_eq!(qc["ignore"][0], "lm_head");
    let groups = qc["config_groups"].as_object().unwrap();
    assert_eq!(groups.len(), 1);
    let g = &groups["group_0"];
    assert_eq!(g["targets"], serde_json::json!(["Linear"]));
    let w = &g["weights"];
    assert_eq!(
        (&w["num_bits"], &w["type"], &w["symmetric"], &w["dynamic"]),
        (
            &serde_json::json!(8),
            &serde_json::json!("int"),
            &serde_json::json!(true),
            &serde_json::json!(false)
        )
    );
    assert_eq!(w["strategy"], weights);
    let a = &g["input_activations"];
    assert_eq!(a["num_bits"], 8);
    assert_eq!(a["type"], "int");
    assert_eq!(a["symmetric"], true);
    match acts {
        "token" => assert_eq!(
            (&a["strategy"], &a["dynamic"]),
            (&"token".into(), &true.into())
        ),
        _ => assert_eq!(
            (&a["strategy"], &a["dynamic"]),
            (&"tensor".into(), &false.into())
        ),
    }
    assert_eq!(config["torch_dtype"], "float32");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }

    let st = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let names = st.names();
    let scales: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".weight_scale"))
        .collect();
    assert!(!scales.is_empty());
    for sc in &scales {
        let linear = sc.trim_end_matches(".weight_scale");
        assert!(!linear.contains("lm_head") && !linear.contains("project_"));
        let w = st.info(&format!("{linear}.weight")).unwrap();
        assert_eq!(w.dtype, DType::I8, "{linear}");
        assert_eq!(w.shape.len(), 2);
        let si = st.info(sc).unwrap();
        assert_eq!(si.dtype, DType::F32);
        let want = if weights == "channel" {
            vec![w.shape[0], 1]
        } else {
            vec![1]
        };
        assert_eq!(si.shape, want, "{sc}");
        let input = format!("{linear}.input_scale");
        if acts == "static" {
            let ii = st.info(&input).unwrap();
            assert_eq!(
                (ii.dtype, ii.shape.clone()),
                (DType::F32, vec![1]),
                "{input}"
            );
        } else {
            assert!(!st.contains(&input), "{input}");
        }
    }
    // Everything else (embeddings, norms, biases, FP Linears) is f32; only decoder weights are
    // INT8 and every INT8 weight has its scale.
    for n in &names {
        let info = st.info(n).unwrap();
        if info.dtype == DType::I8 {
            assert!(
                st.contains(&format!("{}_scale", n)),
                "{n} is INT8 without a scale"
            );
        } else {
            assert_eq!(info.dtype, DType::F32, "{n}");
        }
    }
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(true);
    assert_eq!(st.contains("lm_head.weight"), !tied);
    config
}

#[test]
fn stories260k_export_reloads_and_matches_the_in_memory_model() {
    let calib = demo("calib.txt");
    let data = demo("eval.txt");
    let tmp = tempfile::tempdir().unwrap();
    for (recipe, weights, acts) in [
        (
            &["--weights", "channel", "--acts", "token"][..],
            "channel",
            "token",
        ),
        (&["--preset", "o3"][..], "tensor", "static"),
    ] {
        let out = tmp.path().join(acts);
        let v = json(&run(&with_calib(
            &quantize_args(None, recipe, s(&out)),
            &calib,
        )));
        assert_eq!(v["format"], "compressed-tensors");
        let config = check_layout(&out, weights, acts);
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        assert_eq!(config["smoothquant_rs"]["scheme"], "smoothquant");
        // No BOS added by the generated tokenizer, as in eval.
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["add_bos_token"], false);
        assert_eq!(tc["bos_token"], "<s>");

        let (reloaded, row) = eval_ppl(&["--model", s(&out)], "128", &data);
        assert_eq!(row["scheme"], "smoothquant");
        assert_eq!(row["weights"], weights);
        assert_eq!(row["acts"], acts);
        assert_eq!(row["alpha"], 0.5);
        let mut mem_args = vec![
            "--scheme",
            "smoothquant",
            "--calib-data",
            &calib,
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
        ];
        mem_args.extend(recipe);
        let (in_memory, _) = eval_ppl(&mem_args, "128", &data);
        assert!(
            (reloaded - in_memory).abs() <= 1e-9 * in_memory,
            "{acts}: reloaded {reloaded} vs in-memory {in_memory}"
        );
        assert!(reloaded < 10.0, "{reloaded}");
    }

    // The same command writes the same bytes.
    let again = tmp.path().join("token-again");
    json(&run(&with_calib(
        &quantize_args(
            None,
            &["--weights", "channel", "--acts", "token"],
            s(&again),
        ),
        &calib,
    )));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            std::fs::read(tmp.path().join("token").join(f)).unwrap()
                == std::fs::read(again.join(f)).unwrap(),
            "{f} differs between two runs"
        );
    }

    // generate runs it; another scheme is refused.
    let v = json(&run(&[
        "generate",
        "--model",
        s(&again),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "6",
        "--json",
    ]));
    assert!(v["text"].as_str().unwrap().starts_with(','), "{v}");
    let bad = run(&[
        "eval",
        "--model",
        s(&again),
        "--data",
        &data,
        "--scheme",
        "naive",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("runs only as it was quantized"));

    // Without our record it is a foreign W8A8 checkpoint: it still runs, as `w8a8`.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("smoothquant_rs");
    std::fs::write(again.join("config.json"), config.to_string()).unwrap();
    let (foreign, row) = eval_ppl(&["--model", s(&again)], "128", &data);
    assert_eq!(row["scheme"], "w8a8");
    let (ours, _) = eval_ppl(&["--model", s(&tmp.path().join("token"))], "128", &data);
    assert_eq!(foreign, ours);
    let bad = run(&[
        "eval",
        "--model",
        s(&again),
        "--data",
        &data,
        "--scheme",
        "smoothquant",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("drop --scheme"));

    // What the kernels cannot run is refused, naming the layer and the field.
    let layer = "model.layers.0.self_attn.q_proj";
    for (edit, expect) in [
        (
            serde_json::json!({"strategy": "group", "group_size": 16}),
            "strategy `group`",
        ),
        (serde_json::json!({"symmetric": false}), "asymmetric"),
        (serde_json::json!({"num_bits": 4}), "4-bit"),
    ] {
        let mut c = config.clone();
        let w = c["quantization_config"]["config_groups"]["group_0"]["weights"]
            .as_object_mut()
            .unwrap();
        for (k, v) in edit.as_object().unwrap() {
            w.insert(k.clone(), v.clone());
        }
        std::fs::write(again.join("config.json"), c.to_string()).unwrap();
        let bad = run(&["eval", "--model", s(&again), "--data", &data]);
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(1), "{err}");
        assert!(err.contains(layer) && err.contains(expect), "{err}");
    }
}

#[test]
fn hf_fixtures_export_reload_and_match() {
    let calib = demo("calib.txt");
    let data = demo("eval.txt");
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "opt-prenorm",
        "opt-project",
        "bloom",
        "llama-gqa",
        "llama-tied-bf16",
        "qwen2-bias",
    ] {
        let model = fixture(name);
        let out = tmp.path().join(name);
        // opt-project is post-norm: its norms cannot take smoothing, so it goes naive.
        let scheme = if name == "opt-project" {
            "naive"
        } else {
            "smoothquant"
        };
        // BLOOM's dense_4h_to_h smooths by a run-time divide under the default
        // `--smooth-targets all`, which the layout cannot hold: refused by name, then `paper`.
        let mut extra = vec!["--scheme", scheme];
        if name == "bloom" {
            let refused = run(&with_calib(
                &quantize_args(Some(s(&model)), &extra, s(&out)),
                &calib,
            ));
            assert_eq!(refused.status.code(), Some(1));
            let err = String::from_utf8_lossy(&refused.stderr);
            assert!(
                err.contains("dense_4h_to_h") && err.contains("--smooth-targets paper"),
                "{err}"
            );
            assert!(!out.exists());
            extra.extend(["--smooth-targets", "paper"]);
        }
        json(&run(&with_calib(
            &quantize_args(Some(s(&model)), &extra, s(&out)),
            &calib,
        )));
        let config = check_layout(&out, "channel", "token");
        let qc = &config["quantization_config"];
        if name == "opt-project" {
            assert_eq!(
                qc["ignore"],
                serde_json::json!([
                    "lm_head",
                    "model.decoder.project_in",
                    "model.decoder.project_out"
                ])
            );
        } else {
            assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]), "{name}");
        }
        // The original config is kept, with the quantization and dtype added.
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"], original["architectures"], "{name}");
        assert_eq!(config["hidden_size"], original["hidden_size"], "{name}");
        if original.get("dtype").is_some() {
            assert_eq!(config["dtype"], "float32", "{name}");
        }
        // Hugging Face tokenizer files are copied as they are.
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert!(
                std::fs::read(model.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
                "{name}: {f} differs from the input's"
            );
        }
        let st = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        let expected_q = match name {
            "bloom" => "transformer.h.1.self_attention.query_key_value.weight",
            n if n.starts_with("opt") => "model.decoder.layers.1.fc2.weight",
            _ => "model.layers.1.mlp.down_proj.weight",
        };
        assert_eq!(st.info(expected_q).unwrap().dtype, DType::I8, "{name}");
        if name == "qwen2-bias" {
            let b = st.info("model.layers.0.self_attn.q_proj.bias").unwrap();
            assert_eq!(b.dtype, DType::F32);
        }

        let (reloaded, row) = eval_ppl(&["--model", s(&out)], "64", &data);
        assert_eq!(row["scheme"], scheme, "{name}");
        let mut in_memory_args = vec![
            "--model",
            s(&model),
            "--scheme",
            scheme,
            "--calib-data",
            &calib,
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
        ];
        if name == "bloom" {
            in_memory_args.extend(["--smooth-targets", "paper"]);
        }
        let (in_memory, _) = eval_ppl(&in_memory_args, "64", &data);
        assert!(
            (reloaded - in_memory).abs() <= 1e-9 * in_memory,
            "{name}: reloaded {reloaded} vs in-memory {in_memory}"
        );
    }
}

#[test]
fn layouts_compressed_tensors_cannot_hold_are_refused() {
    let calib = demo("calib.txt");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o2");
    for recipe in [&["--acts", "tensor"][..], &["--preset", "o2"][..]] {
        let bad = run(&with_calib(&quantize_args(None, recipe, s(&out)), &calib));
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(1), "{err}");
        assert!(
            err.contains("dynamic per-tensor") && err.contains("--acts token"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // A non-empty output directory needs --force, as for the native format.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let bad = run(&with_calib(&quantize_args(None, &[], s(&out)), &calib));
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--force"));
    assert!(out.join("keep.txt").is_file());
}

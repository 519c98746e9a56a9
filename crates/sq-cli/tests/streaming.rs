//! Layer-by-layer (`--stream`) quantization and calibration give the same files as the
//! in-memory path, byte for byte, on stories260K and every random Hugging Face fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smoothquant"))
}

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn calib() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/demo/calib.txt"
    ))
}

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "smoothquant {}\nstderr: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file of `dir` by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn assert_same_dirs(a: &Path, b: &Path, what: &str) {
    let (fa, fb) = (files(a), files(b));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb), "{what}: different files");
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(
            x == y,
            "{what}: {name} differs ({} vs {} bytes)",
            x.len(),
            y.len()
        );
    }
}

/// (label, --model, extra options)
fn models() -> Vec<(&'static str, Option<PathBuf>)> {
    let hf = repo().join("tests/fixtures/hf");
    let mut out = vec![("stories260K", None)];
    for name in [
        "llama-gqa",
        "llama-tied-bf16",
        "llama-linear-rope",
        "qwen2-bias",
        "opt-prenorm",
        "opt-project",
        "opt-postnorm",
        "bloom",
        "bloom-bf16",
    ] {
        out.push((name, Some(hf.join(name))));
    }
    out
}

#[test]
fn streaming_quantize_is_byte_identical_to_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    let recipes: &[&[&str]] = &[
        &["--preset", "o3", "--alpha", "0.6"],
        &["--weights", "channel", "--acts", "token"],
        &["--scheme", "naive", "--preset", "o2"],
        &["--smooth-targets", "paper", "--preset", "o1"],
    ];
    for (label, model) in models() {
        for (r, recipe) in recipes.iter().enumerate() {
            // Post-norm OPT has no paper groups (its norms write the residual stream).
            if label.starts_with("opt-p") && label != "opt-prenorm" && recipe.contains(&"paper") {
                continue;
            }
            let mut outs = Vec::new();
            for stream in [false, true] {
                let out = tmp.path().join(format!("{label}-{r}-{stream}"));
                let mut args = vec!["quantize"];
                let model_str;
                if let Some(m) = &model {
                    model_str = m.to_str().unwrap().to_string();
                    args.extend(["--model", &model_str]);
                }
                args.extend([
                    "--calib-data",
                    calib.to_str().unwrap(),
                    "--calib-samples",
                    "4",
                    "--calib-seq-len",
                    "48",
                    "--out",
                    out.to_str().unwrap(),
                    "--json",
                ]);
                args.extend(recipe.iter());
                if stream {
                    args.push("--stream");
                }
                let v: serde_json::Value = serde_json::from_slice(&run(&args).stdout).unwrap();
                assert_eq!(v["stream"].is_object(), stream, "{label}: {v}");
                outs.push(out);
            }
            assert_same_dirs(&outs[0], &outs[1], &format!("{label} {recipe:?}"));
        }
    }
}

#[test]
fn streaming_quantize_from_act_scales_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    let model = repo().join("tests/fixtures/hf/llama-gqa");
    let scales = tmp.path().join("scales.safetensors");
    run(&[
        "calibrate",
        "--model",
        model.to_str().unwrap(),
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "48",
        "--out",
        scales.to_str().unwrap(),
    ]);
    let mut outs = Vec::new();
    for stream in [false, true] {
        let out = tmp.path().join(format!("q-{stream}"));
        let mut args = vec![
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--act-scales",
            scales.to_str().unwrap(),
            "--preset",
            "o3",
            "--out",
            out.to_str().unwrap(),
        ];
        if stream {
            args.push("--stream");
        }
        run(&args);
        outs.push(out);
    }
    assert_same_dirs(&outs[0], &outs[1], "llama-gqa from --act-scales");
}

#[test]
fn streaming_calibrate_writes_the_same_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    for (label, model) in models() {
        let mut outs = Vec::new();
        for stream in [false, true] {
            let out = tmp.path().join(format!("{label}-{stream}.safetensors"));
            let mut args = vec!["calibrate"];
            let model_str;
            if let Some(m) = &model {
                model_str = m.to_str().unwrap().to_string();
                args.extend(["--model", &model_str]);
            }
            args.extend([
                "--calib-data",
                calib.to_str().unwrap(),
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "48",
                "--out",
                out.to_str().unwrap(),
            ]);
            if stream {
                args.push("--stream");
            }
            run(&args);
            outs.push(std::fs::read(&out).unwrap());
        }
        assert!(outs[0] == outs[1], "{label}: statistics differ");
    }
}

#[test]
fn sequential_statistics_differ_and_the_checkpoint_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    let mut outs = Vec::new();
    for sequential in [false, true] {
        let out = tmp.path().join(format!("seq-{sequential}"));
        let mut args = vec![
            "quantize",
            "--calib-data",
            calib.to_str().unwrap(),
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
            "--preset",
            "o3",
            "--stream",
            "--out",
            out.to_str().unwrap(),
        ];
        if sequential {
            args.push("--sequential");
        }
        run(&args);
        outs.push(out);
    }
    let config = std::fs::read_to_string(outs[1].join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["quantization_config"]["calibration"]["sequential"],
        true
    );
    // Static scales of layers after the first see the quantized inputs: the weights differ.
    let (a, b) = (
        std::fs::read(outs[0].join("model.safetensors")).unwrap(),
        std::fs::read(outs[1].join("model.safetensors")).unwrap(),
    );
    assert!(a != b, "sequential statistics changed nothing");
    let v: serde_json::Value = serde_json::from_slice(
        &run(&[
            "eval",
            "--model",
            outs[1].to_str().unwrap(),
            "--data",
            calib.to_str().unwrap(),
            "--seq-len",
            "64",
            "--max-windows",
            "2",
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let ppl = v["results"][0]["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl < 20.0, "{v}");
}

#[test]
fn streaming_refusals_name_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    let out = tmp.path().join("x");
    let base = [
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stream",
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--alpha", "auto"], "--alpha auto"),
        (&["--format", "compressed-tensors"], "native layout only"),
    ];
    for (extra, want) in cases {
        let mut args = base.to_vec();
        args.extend(extra.iter());
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left an output");
    }
}

#[test]
fn sharded_output_is_identical_both_ways_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib();
    let eval = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/eval.txt"));
    let mut outs = Vec::new();
    for (name, extra) in [
        ("single", &[][..]),
        ("sharded", &["--shard-size", "200KB"][..]),
        ("sharded-stream", &["--shard-size", "200KB", "--stream"][..]),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec![
            "quantize",
            "--calib-data",
            calib.to_str().unwrap(),
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "64",
            "--preset",
            "o3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra.iter());
        run(&args);
        outs.push(out);
    }
    assert_same_dirs(&outs[1], &outs[2], "sharded, in memory and streamed");
    let index = std::fs::read_to_string(outs[1].join("model.safetensors.index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    for s in &shards {
        assert!(
            s.ends_with(&format!("-of-{:05}.safetensors", shards.len())),
            "{s}"
        );
        assert!(outs[1].join(s).is_file(), "{s}");
    }
    assert!(!outs[1].join("model.safetensors").exists());
    // The sharded checkpoint runs exactly like the single file.
    let ppl = |dir: &Path| {
        let v: serde_json::Value = serde_json::from_slice(
            &run(&[
                "eval",
                "--model",
                dir.to_str().unwrap(),
                "--data",
                eval.to_str().unwrap(),
                "--seq-len",
                "64",
                "--max-windows",
                "2",
                "--json",
            ])
            .stdout,
        )
        .unwrap();
        v["results"][0]["perplexity"].as_f64().unwrap()
    };
    assert_eq!(ppl(&outs[0]), ppl(&outs[1]));
}

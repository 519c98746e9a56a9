//! Drive the built `smoothquant` binary on the embedded model: exit codes, JSON keys, errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smoothquant"))
}

fn assets() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn keys(v: &serde_json::Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

fn has_keys(v: &serde_json::Value, want: &[&str]) {
    let k = keys(v);
    for w in want {
        assert!(k.contains(w), "missing key {w} in {k:?}");
    }
}

#[test]
fn help_lists_the_contract_subcommands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "demo",
        "inspect",
        "calibrate",
        "quantize",
        "eval",
        "generate",
        "bench",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}");
        assert!(run(&[cmd, "--help"]).status.success(), "{cmd} --help");
    }
}

#[test]
fn generate_json_and_stream() {
    let v = json(&run(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--json",
    ]));
    has_keys(&v, &["prompt", "text", "tokens", "tokens_per_s"]);
    assert!(
        v["text"]
            .as_str()
            .unwrap()
            .starts_with(", there was a little girl named Lily"),
        "{v}"
    );
    let out = run(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Once upon a time, there was"));
    // Seeded sampling is reproducible.
    let a = json(&run(&[
        "generate",
        "--prompt",
        "Once",
        "--temperature",
        "1.0",
        "--seed",
        "5",
        "--json",
    ]));
    let b = json(&run(&[
        "generate",
        "--prompt",
        "Once",
        "--temperature",
        "1.0",
        "--seed",
        "5",
        "--json",
    ]));
    assert_eq!(a["text"], b["text"]);
}

#[test]
fn calibrate_then_eval_every_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("act.safetensors");
    let calib = assets().join("calib.txt");
    let eval = assets().join("eval.txt");
    let v = json(&run(&[
        "calibrate",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "128",
        "--out",
        stats.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["linears"], 35);
    assert!(stats.is_file());
    let v = json(&run(&[
        "eval",
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "6",
        "--act-scales",
        stats.to_str().unwrap(),
        "--json",
    ]));
    has_keys(
        &v,
        &["model", "data", "seq_len", "windows", "tokens", "results"],
    );
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        has_keys(
            r,
            &[
                "scheme",
                "weights",
                "acts",
                "alpha",
                "smooth_targets",
                "perplexity",
            ],
        );
        let ppl = r["perplexity"].as_f64().unwrap();
        assert!(ppl > 1.0 && ppl < 20.0, "{r}");
    }
    assert_eq!(rows[0]["weights"], serde_json::Value::Null);
    assert_eq!(rows[1]["alpha"], serde_json::Value::Null);
    assert_eq!(rows[2]["alpha"], 0.5);
    assert_eq!(rows[2]["acts"], "token");
    assert_eq!(rows[2]["smooth_targets"], "all");
    // W8A8 stays close to fp32 on this model.
    let fp = rows[0]["perplexity"].as_f64().unwrap();
    for r in &rows[1..] {
        assert!(
            (r["perplexity"].as_f64().unwrap() / fp - 1.0).abs() < 0.05,
            "{r}"
        );
        assert!(r.get("kl_from_fp32").is_none(), "only with --kl: {r}");
    }

    // --kl: the same perplexities, plus each scheme's divergence from fp32 (zero for fp32).
    let with_kl = json(&run(&[
        "eval",
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "6",
        "--act-scales",
        stats.to_str().unwrap(),
        "--kl",
        "--json",
    ]));
    let kl_rows = with_kl["results"].as_array().unwrap();
    for (r, plain) in kl_rows.iter().zip(rows) {
        assert_eq!(r["perplexity"], plain["perplexity"]);
    }
    let kl: Vec<f64> = kl_rows
        .iter()
        .map(|r| r["kl_from_fp32"].as_f64().unwrap())
        .collect();
    assert!(kl[0].abs() < 1e-6, "{kl:?}");
    assert!(
        kl[1] > 1e-5 && kl[2] > 1e-5 && kl[1] < 0.5 && kl[2] < 0.5,
        "{kl:?}"
    );
    let text = run(&[
        "eval",
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "2",
        "--act-scales",
        stats.to_str().unwrap(),
        "--kl",
    ]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("KL from fp32"));
}

#[test]
fn inspect_and_bench_json() {
    let v = json(&run(&["inspect", "--json"]));
    has_keys(
        &v,
        &["architecture", "layers", "hidden", "params", "linears"],
    );
    assert_eq!(v["layers"], 5);
    assert_eq!(v["hidden"], 64);
    has_keys(
        &v["linears"][0],
        &[
            "name",
            "in",
            "out",
            "act_max_median_ratio",
            "act_max_median_ratio_smoothed",
        ],
    );
    assert_eq!(v["linears"][0]["name"], "model.layers.0.self_attn.q_proj");
    let v = json(&run(&[
        "bench",
        "--prompt-len",
        "32,64",
        "--gen-tokens",
        "8",
        "--scheme",
        "fp32",
        "--json",
    ]));
    has_keys(&v, &["model", "threads", "gen_tokens", "results"]);
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        has_keys(
            r,
            &[
                "scheme",
                "weights",
                "acts",
                "prompt_len",
                "prefill_tokens_per_s",
                "decode_tokens_per_s",
                "peak_rss_bytes",
                "loaded_rss_bytes",
                "model_bytes",
                "lm_head",
            ],
        );
        assert!(r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        // The loaded model is resident; the scheme's peak includes it.
        let (loaded, peak) = (
            r["loaded_rss_bytes"].as_u64().unwrap(),
            r["peak_rss_bytes"].as_u64().unwrap(),
        );
        assert!(loaded > 0 && loaded <= peak, "loaded {loaded} peak {peak}");
    }
}

/// `bench --pairs`: every scheme after the first gets one row per prompt length with the
/// median and range of its per-round speed-ups, consistent with each other.
#[test]
fn bench_pairs_reports_per_round_speedups() {
    let calib = assets().join("calib.txt");
    let v = json(&run(&[
        "bench",
        "--prompt-len",
        "16,32",
        "--gen-tokens",
        "4",
        "--scheme",
        "fp32,naive,smoothquant",
        "--calib-data",
        calib.to_str().unwrap(),
        "--pairs",
        "3",
        "--json",
    ]));
    assert_eq!(v["results"].as_array().unwrap().len(), 6);
    let rows = v["paired"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in rows {
        has_keys(
            r,
            &[
                "scheme",
                "baseline",
                "prompt_len",
                "pairs",
                "prefill_speedup",
                "prefill_speedup_min",
                "prefill_speedup_max",
                "decode_speedup",
                "decode_speedup_min",
                "decode_speedup_max",
                "prefill_tokens_per_s",
                "baseline_prefill_tokens_per_s",
            ],
        );
        assert_eq!(r["baseline"], "fp32");
        assert_eq!(r["pairs"], 3);
        assert_ne!(r["scheme"], "fp32");
        for key in ["prefill_speedup", "decode_speedup"] {
            let (lo, mid, hi) = (
                r[format!("{key}_min")].as_f64().unwrap(),
                r[key].as_f64().unwrap(),
                r[format!("{key}_max")].as_f64().unwrap(),
            );
            assert!(0.0 < lo && lo <= mid && mid <= hi, "{key}: {lo} {mid} {hi}");
        }
    }
    let lens: Vec<u64> = rows
        .iter()
        .map(|r| r["prompt_len"].as_u64().unwrap())
        .collect();
    assert_eq!(lens, [16, 16, 32, 32]);
}

#[test]
fn int8_lm_head_round_trips_and_shrinks_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let calib = assets().join("calib.txt");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--prompt-len",
            "32",
            "--gen-tokens",
            "4",
            "--scheme",
            "smoothquant",
            "--calib-data",
            calib.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&run(&args))["results"][0].clone()
    };
    let fp_head = bench(&[]);
    let int8_head = bench(&["--lm-head", "int8"]);
    assert_eq!(fp_head["lm_head"], "fp32");
    assert_eq!(int8_head["lm_head"], "int8");
    assert!(
        int8_head["model_bytes"].as_u64().unwrap() < fp_head["model_bytes"].as_u64().unwrap(),
        "{int8_head} vs {fp_head}"
    );
    let out = dir.path().join("int8-head");
    json(&run(&[
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--lm-head",
        "int8",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let reloaded = json(&run(&[
        "bench",
        "--model",
        out.to_str().unwrap(),
        "--prompt-len",
        "32",
        "--gen-tokens",
        "4",
        "--json",
    ]))["results"][0]
        .clone();
    assert_eq!(reloaded["lm_head"], "int8");
    assert_eq!(reloaded["model_bytes"], int8_head["model_bytes"]);
    // A checkpoint with an FP head cannot be asked for an INT8 one.
    let fp_out = dir.path().join("fp-head");
    json(&run(&[
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--out",
        fp_out.to_str().unwrap(),
        "--json",
    ]));
    let out = bin()
        .args([
            "eval",
            "--model",
            fp_out.to_str().unwrap(),
            "--lm-head",
            "int8",
        ])
        .args([
            "--data",
            calib.to_str().unwrap(),
            "--seq-len",
            "32",
            "--max-windows",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lm-head int8"));
}

/// An α table with `null` leaves those groups unsmoothed, and the report says so with `null`:
/// the reported table replays as `--alpha FILE`.
#[test]
fn alpha_table_null_leaves_groups_unsmoothed() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("alphas.json");
    std::fs::write(
        &table,
        r#"{"model.layers.0.self_attn.o_proj": null, "model.layers.1.mlp.down_proj": null, "model.layers.2.self_attn.q_proj": 0.7}"#,
    )
    .unwrap();
    let calib = assets().join("calib.txt");
    let out = dir.path().join("q");
    let v = json(&run(&[
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "64",
        "--alpha",
        table.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let alphas = v["alphas"].as_object().unwrap();
    assert_eq!(alphas.len(), 20, "{v}");
    assert_eq!(
        alphas["model.layers.0.self_attn.o_proj"],
        serde_json::Value::Null
    );
    assert_eq!(
        alphas["model.layers.1.mlp.down_proj"],
        serde_json::Value::Null
    );
    assert_eq!(alphas["model.layers.2.self_attn.q_proj"], 0.7);
    assert_eq!(alphas["model.layers.2.mlp.down_proj"], 0.5);
    assert_eq!(v["folds"].as_object().unwrap().len(), 18, "{v}");
}

/// `--smooth-fold runtime` divides the attention-output and last-MLP inputs at run time instead
/// of folding `1/s` into the value / up rows: reported, written to the checkpoint, reloaded with
/// the same perplexity as in memory, and refused by the compressed-tensors layout.
#[test]
fn smooth_fold_runtime_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let calib = assets().join("calib.txt");
    let eval = assets().join("eval.txt");
    let out = dir.path().join("q");
    let common = [
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "64",
        "--preset",
        "o1",
        "--smooth-fold",
        "runtime",
    ];
    let mut args = vec!["quantize", "--out", out.to_str().unwrap(), "--json"];
    args.extend(common);
    let v = json(&run(&args));
    assert_eq!(v["smooth_fold"], "runtime", "{v}");
    assert_eq!(
        v["folds"]["model.layers.2.mlp.down_proj"], "run time",
        "{v}"
    );
    assert_eq!(v["folds"]["model.layers.0.self_attn.o_proj"], "run time");
    assert_eq!(
        v["folds"]["model.layers.0.self_attn.q_proj"],
        "norm input_layernorm"
    );
    let window = [
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "2",
        "--json",
    ];
    let mut args = vec!["eval", "--model", out.to_str().unwrap()];
    args.extend(window);
    let reloaded = json(&run(&args));
    let mut args = vec!["eval", "--scheme", "smoothquant"];
    args.extend(window);
    args.extend(common);
    let in_memory = json(&run(&args));
    let row = &in_memory["results"][0];
    assert_eq!(row["smooth_fold"], "runtime", "{in_memory}");
    assert_eq!(
        reloaded["results"][0]["smooth_fold"], "runtime",
        "{reloaded}"
    );
    assert_eq!(
        reloaded["results"][0]["perplexity"], row["perplexity"],
        "{reloaded} vs {in_memory}"
    );
    // The default folds into rows, and changes the model's INT8 weights (so its perplexity).
    let mut args = vec!["eval", "--scheme", "smoothquant"];
    args.extend(window);
    args.extend(&common[..common.len() - 2]);
    let rows = json(&run(&args));
    assert_eq!(rows["results"][0]["smooth_fold"], "rows", "{rows}");
    assert_ne!(rows["results"][0]["perplexity"], row["perplexity"]);
    // compressed-tensors cannot express the divide.
    let ct = dir.path().join("ct");
    let mut args = vec![
        "quantize",
        "--out",
        ct.to_str().unwrap(),
        "--format",
        "compressed-tensors",
    ];
    args.extend(common);
    let bad = run(&args);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("o_proj") || err.contains("down_proj"), "{err}");
}

#[test]
fn quantize_reload_eval_generate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories-w8a8");
    let calib = assets().join("calib.txt");
    let eval = assets().join("eval.txt");
    let v = json(&run(&[
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "128",
        "--preset",
        "o3",
        "--alpha",
        "0.6",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["scheme"], "smoothquant");
    assert_eq!(v["acts"], "static");
    // 5 layers x 4 groups: q/k/v and gate/up after the norms, o_proj and down_proj by rows.
    assert_eq!(v["alphas"].as_object().unwrap().len(), 20);
    assert_eq!(v["smooth_targets"], "all");
    assert_eq!(
        v["folds"]["model.layers.2.mlp.down_proj"], "rows of up_proj",
        "{v}"
    );
    assert_eq!(
        v["folds"]["model.layers.0.self_attn.o_proj"],
        "rows of v_proj"
    );
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The checkpoint runs INT8 as written: its scheme is the default, others are refused.
    let v = json(&run(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "4",
        "--json",
    ]));
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["scheme"], "smoothquant");
    assert_eq!(rows[0]["acts"], "static");
    assert_eq!(rows[0]["alpha"], 0.6);
    assert!(rows[0]["perplexity"].as_f64().unwrap() < 10.0);
    let v = json(&run(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert!(v["text"].as_str().unwrap().starts_with(','), "{v}");
    let bad = run(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        eval.to_str().unwrap(),
        "--scheme",
        "fp32",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("runs only as it was quantized"));
    let no_fp = run(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        eval.to_str().unwrap(),
        "--kl",
    ]);
    assert_eq!(no_fp.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&no_fp.stderr).contains("no full-precision weights"),
        "{}",
        String::from_utf8_lossy(&no_fp.stderr)
    );
    // A non-empty output needs --force.
    let again = run(&[
        "quantize",
        "--calib-data",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn inspect_reports_outlier_ratios_before_and_after_smoothing() {
    let calib = assets().join("calib.txt");
    let v = json(&run(&[
        "inspect",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "128",
        "--json",
    ]));
    let linears = v["linears"].as_array().unwrap();
    let q0 = linears
        .iter()
        .find(|l| l["name"] == "model.layers.0.self_attn.q_proj")
        .unwrap();
    let before = q0["act_max_median_ratio"].as_f64().unwrap();
    let after = q0["act_max_median_ratio_smoothed"].as_f64().unwrap();
    assert!(before >= 1.0 && after >= 1.0 && after < before, "{q0}");
    // With the default `--smooth-targets all` the attention output and down projections are
    // smoothed too; with `paper` their inputs keep their ratio.
    let ratios = |v: &serde_json::Value, name: &str| {
        let l = v["linears"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
            .clone();
        (
            l["act_max_median_ratio"].as_f64().unwrap(),
            l["act_max_median_ratio_smoothed"].as_f64().unwrap(),
        )
    };
    for name in [
        "model.layers.0.self_attn.o_proj",
        "model.layers.3.mlp.down_proj",
    ] {
        let (before, after) = ratios(&v, name);
        assert_ne!(after, before, "{name}");
    }
    // Where the outliers are (the spikiest down_proj input), smoothing flattens them.
    let (before, after) = (0..5)
        .map(|i| ratios(&v, &format!("model.layers.{i}.mlp.down_proj")))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    assert!(after < before, "down_proj: {before} -> {after}");
    let paper = json(&run(&[
        "inspect",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "128",
        "--smooth-targets",
        "paper",
        "--json",
    ]));
    let (before, after) = ratios(&paper, "model.layers.0.self_attn.o_proj");
    assert_eq!(before, after);
    // The LM head has no ratio.
    assert_eq!(v["smoothing_groups"].as_array().unwrap().len(), 20);
    assert_eq!(paper["smoothing_groups"].as_array().unwrap().len(), 10);
    let head = linears.iter().find(|l| l["name"] == "lm_head").unwrap();
    assert!(head["act_max_median_ratio"].is_null());
    let bad = run(&[
        "inspect",
        "--calib-data",
        calib.to_str().unwrap(),
        "--alpha",
        "auto",
    ]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn inspect_plot_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("act.safetensors");
    let png = dir.path().join("outliers.png");
    let calib = assets().join("calib.txt");
    json(&run(&[
        "calibrate",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "128",
        "--out",
        stats.to_str().unwrap(),
        "--json",
    ]));
    let v = json(&run(&[
        "inspect",
        "--act-scales",
        stats.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
        "--plot-linear",
        "model.layers.1.mlp.gate_proj",
        "--json",
    ]));
    assert_eq!(v["plot"], png.to_str().unwrap());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // 1600 x 1150 pixels (IHDR width and height, big-endian).
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1600);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 1150);
    assert!(bytes.len() > 20_000, "a blank image? {} bytes", bytes.len());
}

#[test]
fn an_unusable_gpu_device_is_a_user_error() {
    // No machine has GPU 99, and a build without the `cuda` feature has no GPU at all.
    for args in [
        &["generate", "--device", "cuda:99", "--prompt", "Once"][..],
        &["eval", "--device", "cuda:99", "--data", "x.txt"][..],
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: device cuda:99: "), "{err}");
        assert!(err.contains("--device cpu"), "{err}");
        assert!(
            !err.contains("panicked") && !err.trim().contains("\n\n"),
            "{err}"
        );
    }
    let out = run(&["generate", "--device", "tpu", "--prompt", "Once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
}

#[test]
fn int8_attention_eval_quantize_reload_generate_bench() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("act.safetensors");
    let out = dir.path().join("stories-int8-attention");
    let calib = assets().join("calib.txt");
    let eval = assets().join("eval.txt");
    json(&run(&[
        "calibrate",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "128",
        "--out",
        stats.to_str().unwrap(),
        "--json",
    ]));
    let eval_rows = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec![
            "eval",
            "--data",
            eval.to_str().unwrap(),
            "--seq-len",
            "128",
            "--max-windows",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&run(&args))["results"].as_array().unwrap().clone()
    };
    let with = eval_rows(&["--act-scales", stats.to_str().unwrap(), "--int8-attention"]);
    let without = eval_rows(&["--act-scales", stats.to_str().unwrap()]);
    assert_eq!(with.len(), 3);
    // fp32 keeps f32 attention; the W8A8 schemes run INT8 attention, close to their f32-attention
    // perplexity but not equal to it.
    assert_eq!(with[0]["int8_attention"], false);
    for (w, wo) in with[1..].iter().zip(&without[1..]) {
        assert_eq!(w["int8_attention"], true, "{w}");
        assert_eq!(wo["int8_attention"], false, "{wo}");
        let (a, b) = (
            w["perplexity"].as_f64().unwrap(),
            wo["perplexity"].as_f64().unwrap(),
        );
        assert!(a != b && (a / b - 1.0).abs() < 0.05, "{a} vs {b}");
    }

    let v = json(&run(&[
        "quantize",
        "--act-scales",
        stats.to_str().unwrap(),
        "--int8-attention",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["int8_attention"], true);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["int8_attention"], true);
    // The reloaded checkpoint runs INT8 attention without the flag, with the same perplexity.
    let reloaded = eval_rows(&["--model", out.to_str().unwrap()]);
    assert_eq!(reloaded.len(), 1);
    assert_eq!(reloaded[0]["int8_attention"], true);
    assert_eq!(reloaded[0]["perplexity"], with[2]["perplexity"]);

    let v = json(&run(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert_eq!(v["int8_attention"], true);
    assert!(v["text"].as_str().unwrap().starts_with(','), "{v}");

    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "--prompt-len", "32", "--gen-tokens", "4", "--json"];
        args.extend_from_slice(extra);
        json(&run(&args))["results"][0].clone()
    };
    let int8_row = bench(&["--model", out.to_str().unwrap()]);
    let f32_row = bench(&["--scheme", "fp32"]);
    assert_eq!(int8_row["int8_attention"], true);
    assert_eq!(f32_row["int8_attention"], false);
    let (i8_bytes, f32_bytes) = (
        int8_row["kv_cache_bytes"].as_u64().unwrap(),
        f32_row["kv_cache_bytes"].as_u64().unwrap(),
    );
    // stories260K: 5 layers, 4 KV heads of 8: f32 holds 2*5*36*32*4 bytes; INT8 a byte per
    // element plus a 4-byte scale per (position, KV head).
    assert_eq!(f32_bytes, 2 * 5 * 36 * 32 * 4);
    assert_eq!(i8_bytes, 2 * 5 * 36 * (32 + 4 * 4));
    assert!(int8_row["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

//! Every error a user can cause exits 1 with one paragraph on stderr that names what is wrong
//! (the file, the option, the value) and says what to do, and never a panic. One test per error,
//! all on the embedded stories260K model so they stay fast.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn assets() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

fn calib() -> String {
    assets().join("calib.txt").display().to_string()
}

fn eval_text() -> String {
    assets().join("eval.txt").display().to_string()
}

/// A scratch directory shared by the tests of this file (kept until the process ends).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn file(name: &str, bytes: &[u8]) -> String {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// Run the binary and check the error: exit code 1, stderr starting with `error:`, containing
/// every needle, one paragraph (our own messages are one line; clap's usage errors add their
/// usage hint), and no panic.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_smoothquant"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: "),
        "{args:?}: not an error message: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{args:?}: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: expected `{n}` in: {stderr}");
    }
    let clap_usage = stderr.contains("For more information, try '--help'.");
    if !clap_usage {
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: not one paragraph: {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "{args:?}: printed a report anyway");
    stderr
}

/// A W8A8 checkpoint written once for the tests that need one.
fn quantized_dir() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = scratch().join("naive-w8a8");
        let status = Command::new(env!("CARGO_BIN_EXE_smoothquant"))
            .args([
                "quantize",
                "--scheme",
                "naive",
                "--calib-data",
                &calib(),
                "--calib-samples",
                "2",
                "--calib-seq-len",
                "64",
                "--out",
                out.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        out.display().to_string()
    })
}

// ---- models ----

#[test]
fn missing_model_file() {
    fails(
        &[
            "generate",
            "--prompt",
            "x",
            "--model",
            "/nonexistent/m.gguf",
        ],
        &["--model /nonexistent/m.gguf", "no such file", ".gguf"],
    );
}

#[test]
fn model_of_unknown_format() {
    let f = file("notes.txt", b"just text\n");
    fails(
        &["generate", "--prompt", "x", "--model", &f],
        &[
            "notes.txt",
            "unrecognised model format",
            "Hugging Face directory",
        ],
    );
}

#[test]
fn model_directory_without_config() {
    let dir = scratch().join("not-a-model");
    std::fs::create_dir_all(&dir).unwrap();
    fails(
        &["inspect", "--model", dir.to_str().unwrap()],
        &["not-a-model", "config.json"],
    );
}

#[test]
fn truncated_gguf() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(5u64.to_le_bytes());
    bytes.extend(1000u64.to_le_bytes());
    let f = file("broken.gguf", &bytes);
    fails(
        &["inspect", "--model", &f],
        &["broken.gguf", "invalid GGUF"],
    );
}

#[test]
fn llama2c_checkpoint_without_tokenizer() {
    let dir = scratch().join("bare-llama2c");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("stories260K.bin");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sq-model/assets/stories260k/stories260K.bin"
        ),
        &bin,
    )
    .unwrap();
    fails(
        &["inspect", "--model", bin.to_str().unwrap()],
        &["--tokenizer FILE"],
    );
}

// ---- data files ----

#[test]
fn missing_data_file() {
    fails(
        &[
            "eval",
            "--data",
            "/nonexistent/wiki.txt",
            "--scheme",
            "fp32",
        ],
        &["/nonexistent/wiki.txt", "--data"],
    );
}

#[test]
fn empty_data_file() {
    let f = file("empty-eval.txt", b"  \n\n");
    fails(
        &["eval", "--data", &f, "--scheme", "fp32"],
        &["empty-eval.txt", "is empty", "text file"],
    );
}

#[test]
fn empty_calibration_file() {
    let f = file("empty-calib.txt", b"\n");
    let out = scratch().join("never.safetensors");
    fails(
        &["calibrate", "--data", &f, "--out", out.to_str().unwrap()],
        &["empty-calib.txt", "--calib-data", "is empty"],
    );
}

#[test]
fn data_shorter_than_one_window() {
    let f = file("short.txt", b"Once upon a time");
    fails(
        &["eval", "--data", &f, "--scheme", "fp32", "--seq-len", "128"],
        &["--seq-len 128", "longer text"],
    );
}

#[test]
fn eval_window_longer_than_the_context() {
    // The default --seq-len 2048 exceeds stories260K's 512-token context.
    fails(
        &["eval", "--data", &eval_text(), "--scheme", "fp32"],
        &["--seq-len 2048", "context of 512", "--seq-len 512 or less"],
    );
}

#[test]
fn calibration_window_longer_than_the_context() {
    let out = scratch().join("never2.safetensors");
    fails(
        &[
            "calibrate",
            "--data",
            &calib(),
            "--calib-seq-len",
            "1024",
            "--out",
            out.to_str().unwrap(),
        ],
        &["--calib-seq-len 1024", "context of 512"],
    );
}

#[test]
fn calibrate_output_in_a_missing_directory() {
    let out = scratch().join("missing-dir").join("act.safetensors");
    fails(
        &[
            "calibrate",
            "--data",
            &calib(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["--out", "missing-dir", "does not exist"],
    );
}

#[test]
fn calibrate_output_is_a_directory() {
    fails(
        &[
            "calibrate",
            "--data",
            &calib(),
            "--out",
            scratch().to_str().unwrap(),
        ],
        &["--out", "is a directory"],
    );
}

// ---- quantization options ----

fn eval_smoothquant(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "eval",
        "--data",
        &eval_text(),
        "--seq-len",
        "128",
        "--scheme",
        "smoothquant",
        "--calib-data",
        &calib(),
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn fails_owned(args: &[String], needles: &[&str]) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&refs, needles);
}

#[test]
fn alpha_above_one() {
    fails_owned(
        &eval_smoothquant(&["--alpha", "1.5"]),
        &["--alpha 1.5", "outside [0, 1]"],
    );
}

#[test]
fn alpha_below_zero() {
    fails_owned(
        &eval_smoothquant(&["--alpha", "-0.2"]),
        &["--alpha -0.2", "outside [0, 1]"],
    );
}

#[test]
fn alpha_neither_number_nor_file() {
    fails_owned(
        &eval_smoothquant(&["--alpha", "strong"]),
        &["--alpha `strong`", "--alpha 0.5"],
    );
}

#[test]
fn alpha_table_value_out_of_range() {
    let f = file(
        "alpha-bad.json",
        br#"{"model.layers.0.self_attn.q_proj": 1.7}"#,
    );
    fails_owned(
        &eval_smoothquant(&["--alpha", &f]),
        &["alpha-bad.json", "model.layers.0.self_attn.q_proj", "1.7"],
    );
}

#[test]
fn alpha_table_not_json() {
    let f = file("alpha-notjson.json", b"q_proj = 0.8\n");
    fails_owned(
        &eval_smoothquant(&["--alpha", &f]),
        &["alpha-notjson.json", "JSON object"],
    );
}

#[test]
fn alpha_auto_without_calibration_text() {
    let stats = scratch().join("some.safetensors");
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--scheme",
            "smoothquant",
            "--act-scales",
            stats.to_str().unwrap(),
            "--alpha",
            "auto",
        ],
        &["--alpha auto", "--calib-data"],
    );
}

#[test]
fn calib_samples_zero() {
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--calib-data",
            &calib(),
            "--calib-samples",
            "0",
        ],
        &["--calib-samples", "at least 1"],
    );
}

#[test]
fn calib_seq_len_zero() {
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--calib-data",
            &calib(),
            "--calib-seq-len",
            "0",
        ],
        &["--calib-seq-len", "at least 1"],
    );
}

#[test]
fn seq_len_one() {
    fails(
        &["eval", "--data", &eval_text(), "--seq-len", "1"],
        &["--seq-len", "at least 2 tokens"],
    );
}

#[test]
fn max_windows_zero() {
    fails(
        &["eval", "--data", &eval_text(), "--max-windows", "0"],
        &["--max-windows", "at least 1"],
    );
}

#[test]
fn count_that_is_not_a_number() {
    fails(
        &["eval", "--data", &eval_text(), "--max-windows", "many"],
        &["--max-windows", "`many` is not a whole number"],
    );
}

#[test]
fn threads_zero() {
    fails(&["--threads", "0", "inspect"], &["--threads", "at least 1"]);
}

#[test]
fn unknown_scheme() {
    fails(
        &["eval", "--data", &eval_text(), "--scheme", "int4"],
        &["--scheme", "`int4`", "fp32, naive, smoothquant"],
    );
}

#[test]
fn empty_scheme_entry() {
    fails(
        &["eval", "--data", &eval_text(), "--scheme", "fp32,"],
        &["--scheme", "empty entry"],
    );
}

#[test]
fn unknown_weight_granularity() {
    fails(
        &["eval", "--data", &eval_text(), "--weights", "row"],
        &["--weights", "'row'", "channel, tensor"],
    );
}

#[test]
fn unknown_preset() {
    fails(
        &["eval", "--data", &eval_text(), "--preset", "o4"],
        &["--preset", "'o4'", "o1, o2, o3"],
    );
}

#[test]
fn unknown_option() {
    fails(&["generate", "--bogus"], &["--bogus"]);
}

#[test]
fn missing_required_option() {
    fails(&["generate"], &["--prompt"]);
}

#[test]
fn quantized_scheme_without_calibration() {
    fails(
        &["eval", "--data", &eval_text(), "--seq-len", "128"],
        &[
            "schemes naive and smoothquant",
            "--calib-data FILE",
            "--act-scales FILE",
        ],
    );
}

#[test]
fn missing_act_scales_file() {
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--seq-len",
            "128",
            "--act-scales",
            "/nonexistent/act.safetensors",
        ],
        &[
            "--act-scales /nonexistent/act.safetensors",
            "smoothquant calibrate",
        ],
    );
}

#[test]
fn act_scales_not_safetensors() {
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--seq-len",
            "128",
            "--act-scales",
            &eval_text(),
        ],
        &["eval.txt", "safetensors", "smoothquant calibrate"],
    );
}

#[test]
fn act_scales_of_another_model() {
    let header = br#"{"foo":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 8]);
    let f = file("other-model.safetensors", &bytes);
    fails(
        &[
            "eval",
            "--data",
            &eval_text(),
            "--seq-len",
            "128",
            "--max-windows",
            "1",
            "--act-scales",
            &f,
        ],
        &[
            "model.layers.0.self_attn.q_proj",
            "another model",
            "smoothquant calibrate",
        ],
    );
}

// ---- generate and bench ----

#[test]
fn negative_temperature() {
    fails(
        &["generate", "--prompt", "x", "--temperature", "-1"],
        &["temperature", "-1"],
    );
}

#[test]
fn top_p_zero() {
    fails(
        &["generate", "--prompt", "x", "--top-p", "0"],
        &["top-p", "(0, 1]"],
    );
}

#[test]
fn empty_prompt() {
    fails(&["generate", "--prompt", ""], &["--prompt is empty"]);
}

#[test]
fn generate_with_two_schemes() {
    fails(
        &[
            "generate",
            "--prompt",
            "x",
            "--scheme",
            "fp32,naive",
            "--calib-data",
            &calib(),
        ],
        &["one scheme at a time", "--scheme naive"],
    );
}

#[test]
fn bench_bad_counts() {
    fails(&["bench", "--prompt-len", "0"], &["--prompt-len"]);
    fails(
        &["bench", "--scheme", "fp32", "--pairs", "3"],
        &["--pairs", "at least two"],
    );
}

// ---- quantize and quantized checkpoints ----

#[test]
fn quantize_fp32() {
    let out = scratch().join("never-fp32");
    fails(
        &[
            "quantize",
            "--scheme",
            "fp32",
            "--calib-data",
            &calib(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["--scheme naive or --scheme smoothquant"],
    );
}

#[test]
fn quantize_without_calibration() {
    let out = scratch().join("never-uncalibrated");
    fails(
        &["quantize", "--out", out.to_str().unwrap()],
        &["--calib-data FILE", "--act-scales FILE"],
    );
}

#[test]
fn quantize_into_a_non_empty_directory() {
    let dir = quantized_dir();
    fails(
        &["quantize", "--calib-data", &calib(), "--out", dir],
        &["not empty", "--force"],
    );
}

#[test]
fn quantized_checkpoint_with_another_scheme() {
    let dir = quantized_dir();
    fails(
        &[
            "eval",
            "--model",
            dir,
            "--data",
            &eval_text(),
            "--seq-len",
            "128",
            "--scheme",
            "smoothquant",
        ],
        &["naive W8A8 checkpoint", "--scheme naive"],
    );
}

#[test]
fn quantize_a_quantized_checkpoint() {
    let dir = quantized_dir();
    let out = scratch().join("never-requantized");
    fails(
        &[
            "quantize",
            "--model",
            dir,
            "--calib-data",
            &calib(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["already quantized", "FP model"],
    );
}

// ---- inspect --plot ----

#[test]
fn plot_not_png() {
    let out = scratch().join("plot.svg");
    fails(
        &[
            "inspect",
            "--calib-data",
            &calib(),
            "--plot",
            out.to_str().unwrap(),
        ],
        &["plot.svg", ".png"],
    );
}

#[test]
fn plot_without_calibration() {
    let out = scratch().join("plot.png");
    fails(
        &["inspect", "--plot", out.to_str().unwrap()],
        &["--plot", "--calib-data FILE", "--act-scales FILE"],
    );
}

#[test]
fn plot_into_a_missing_directory() {
    let out = scratch().join("missing-dir2").join("plot.png");
    fails(
        &[
            "inspect",
            "--calib-data",
            &calib(),
            "--plot",
            out.to_str().unwrap(),
        ],
        &["missing-dir2", "does not exist"],
    );
}

#[test]
fn plot_linear_without_plot() {
    fails(
        &[
            "inspect",
            "--plot-linear",
            "model.layers.0.self_attn.q_proj",
        ],
        &["--plot-linear", "--plot"],
    );
}

#[test]
fn plot_linear_unknown() {
    let out = scratch().join("plot2.png");
    fails(
        &[
            "inspect",
            "--calib-data",
            &calib(),
            "--plot",
            out.to_str().unwrap(),
            "--plot-linear",
            "layers.0.q",
        ],
        &["`layers.0.q`", "model.layers.0.self_attn.q_proj"],
    );
}

#[test]
fn plot_linear_lm_head() {
    let out = scratch().join("plot3.png");
    fails(
        &[
            "inspect",
            "--calib-data",
            &calib(),
            "--plot",
            out.to_str().unwrap(),
            "--plot-linear",
            "lm_head",
        ],
        &["LM head", "not calibrated"],
    );
}

#[test]
fn inspect_alpha_auto() {
    fails(
        &["inspect", "--calib-data", &calib(), "--alpha", "auto"],
        &["--alpha auto", "quantize --alpha auto"],
    );
}

#[test]
fn int8_attention_with_fp32_alone() {
    fails(
        &["generate", "--prompt", "Once", "--int8-attention"],
        &["--int8-attention", "W8A8", "--scheme naive or smoothquant"],
    );
}

#[test]
fn int8_attention_on_a_gpu() {
    for cmd in [
        &["eval", "--data", "x.txt", "--scheme", "naive"][..],
        &["generate", "--prompt", "Once", "--scheme", "naive"][..],
        &["bench", "--scheme", "naive"][..],
    ] {
        let mut args = vec!["--device", "cuda"];
        args.extend_from_slice(cmd);
        args.push("--int8-attention");
        fails(&args, &["--device cuda", "CPU only", "--int8-attention"]);
    }
}

#[test]
fn int8_attention_in_compressed_tensors() {
    let out = scratch().join("ct-int8-attention");
    fails(
        &[
            "quantize",
            "--calib-data",
            &calib(),
            "--format",
            "compressed-tensors",
            "--int8-attention",
            "--out",
            out.to_str().unwrap(),
        ],
        &["compressed-tensors", "--int8-attention", "--format native"],
    );
    assert!(!out.exists());
}

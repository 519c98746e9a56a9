//! insta snapshots of what users read: every `--help`, and the human-readable reports (eval
//! table, inspect summary and outlier table, demo table, bench table) with measured numbers
//! redacted, so a change of layout or wording shows up as a reviewable diff
//! (`cargo xtask snapshots`). Numbers are checked by the JSON tests in `cli.rs`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

const SUBCOMMANDS: [&str; 7] = [
    "demo",
    "inspect",
    "calibrate",
    "quantize",
    "eval",
    "generate",
    "bench",
];

fn assets() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

/// Run the binary with a fixed help width and no terminal, and return its stdout.
fn stdout(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_smoothquant"))
        .args(args)
        .env("COLUMNS", "100")
        .env_remove("SQ_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Filters that make a report independent of the machine: the checkout path, and the given
/// measured columns.
fn settings(extra: &[(&str, &str)]) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    s.add_filter(
        &regex_escape(concat!(env!("CARGO_MANIFEST_DIR"), "/")),
        "[CRATE]/",
    );
    for (re, with) in extra {
        s.add_filter(re, *with);
    }
    s
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[test]
fn help_top_level() {
    let text = stdout(&["--help"]);
    settings(&[]).bind(|| insta::assert_snapshot!("help", text));
}

#[test]
fn help_every_subcommand() {
    for cmd in SUBCOMMANDS {
        settings(&[]).bind(|| {
            insta::assert_snapshot!(format!("help_{cmd}"), stdout(&[cmd, "--help"]));
        });
    }
}

#[test]
fn inspect_summary_without_calibration() {
    // The embedded model is fixed: the whole summary is deterministic.
    let text = stdout(&["inspect"]);
    settings(&[]).bind(|| insta::assert_snapshot!("inspect_summary", text));
}

#[test]
fn inspect_outlier_table() {
    let calib = assets().join("calib.txt");
    let text = stdout(&[
        "inspect",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "128",
    ]);
    assert!(text.contains("activation outliers"), "{text}");
    // The ratio columns are measured: redact them, keep names and shapes.
    settings(&[(r" +\d+\.\d\b", " [R]")]).bind(|| {
        insta::assert_snapshot!("inspect_outliers", text);
    });
}

#[test]
fn eval_table() {
    let calib = assets().join("calib.txt");
    let eval = assets().join("eval.txt");
    let text = stdout(&[
        "eval",
        "--data",
        eval.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-windows",
        "3",
        "--calib-data",
        calib.to_str().unwrap(),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "128",
    ]);
    settings(&[(r" +\d+\.\d{4}\b", " [PPL]")]).bind(|| {
        insta::assert_snapshot!("eval_table", text);
    });
}

#[test]
fn bench_table() {
    let text = stdout(&[
        "--threads",
        "1",
        "bench",
        "--scheme",
        "fp32",
        "--prompt-len",
        "16,32",
        "--gen-tokens",
        "4",
    ]);
    settings(&[(r" +\d+\.\d\b", " [N]")]).bind(|| {
        insta::assert_snapshot!("bench_table", text);
    });
}

/// The demo's table and samples (this is also the test that `smoothquant demo` runs).
#[test]
fn demo_table() {
    let text = stdout(&["demo"]);
    assert!(
        text.contains("fp32") && text.contains("perplexity"),
        "{text}"
    );
    settings(&[
        // perplexity, prefill and decode tok/s
        (r" +\d+\.\d{3} +\d+ +\d+ ", " [PPL] [TOK/S] [TOK/S] "),
        // the INT8 backend picked for this CPU
        (r"on the \S+ INT8 GEMM", "on the [BACKEND] INT8 GEMM"),
        // the samples' continuations
        (r"(?m)^(\S+\s+Once upon a time).*$", "$1 [...]"),
    ])
    .bind(|| {
        insta::assert_snapshot!("demo_table", text);
    });
}

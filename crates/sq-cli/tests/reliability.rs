//! Reliability of the `smoothquant` binary: interrupted runs (SIGINT, SIGTERM) leave previous
//! outputs intact and no partial ones, stale temporaries are cleaned, a non-empty output
//! directory needs `--force`, results are byte-identical across thread counts, limits are
//! clear errors, and `-v` reports peak memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smoothquant"))
}

fn demo(name: &str) -> String {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn fixture(name: &str) -> String {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
    .to_string_lossy()
    .into_owned()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A user error: exit code 1, a message containing `needle`, no panic.
fn user_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every file of a directory, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    entries(dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

fn quantize_args<'a>(out: &'a str, alpha: &'a str) -> Vec<&'a str> {
    vec![
        "quantize",
        "--calib-data",
        "CALIB",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "64",
        "--alpha",
        alpha,
        "--out",
        out,
    ]
}

fn with_calib(args: Vec<&str>, calib: &str) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            if a == "CALIB" {
                calib.to_string()
            } else {
                a.to_string()
            }
        })
        .collect()
}

#[cfg(unix)]
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -s {sig} {pid}");
}

/// Wait until `dir` has an entry starting with `prefix` (the run's temporary output).
#[cfg(unix)]
fn wait_for_temp(dir: &Path, prefix: &str, child: &mut std::process::Child) -> PathBuf {
    let start = Instant::now();
    loop {
        if let Some(e) = entries(dir).into_iter().find(|e| e.starts_with(prefix)) {
            return dir.join(e);
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the run ended ({st}) before writing its output");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no temporary output appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(unix)]
#[test]
fn interrupted_quantize_keeps_the_previous_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w8a8");
    let out_s = out.to_str().unwrap();
    let calib = demo("calib.txt");
    ok(bin()
        .args(with_calib(quantize_args(out_s, "0.5"), &calib))
        .output()
        .unwrap());
    let before = snapshot(&out);
    assert_eq!(entries(dir.path()), ["w8a8"]);

    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        // A different alpha gives different bytes; the test hook holds every commit for 60 s
        // so the signal lands when the new files are written but not yet in place.
        let mut args = with_calib(quantize_args(out_s, "0.8"), &calib);
        args.push("--force".into());
        let mut child = bin()
            .args(&args)
            .env("SQ_TEST_COMMIT_DELAY_MS", "60000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let temp = wait_for_temp(dir.path(), ".w8a8.tmp-", &mut child);
        // The model file is complete inside the temporary directory, waiting for its rename.
        let start = Instant::now();
        while !std::fs::read_dir(&temp)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            assert!(start.elapsed() < Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        signal(child.id(), sig);
        let res = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(code), "SIG{sig}: {stderr}");
        assert!(
            stderr.contains(&format!("interrupted by SIG{sig}")),
            "{stderr}"
        );
        assert!(stderr.contains("removed"), "{stderr}");
        assert_eq!(
            entries(dir.path()),
            ["w8a8"],
            "SIG{sig} left a partial output"
        );
        assert!(
            snapshot(&out) == before,
            "SIG{sig} changed the previous output"
        );
    }

    // Interrupted early (while calibrating): nothing written, nothing changed.
    let mut args = with_calib(quantize_args(out_s, "0.8"), &calib);
    args.extend(["--force".into(), "--calib-samples".into(), "512".into()]);
    let child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), "INT");
    let res = child.wait_with_output().unwrap();
    assert!(!res.status.success());
    assert_eq!(entries(dir.path()), ["w8a8"]);
    assert!(snapshot(&out) == before);

    // A finished run with --force replaces the output in one step.
    let mut args = with_calib(quantize_args(out_s, "0.8"), &calib);
    args.push("--force".into());
    ok(bin().args(&args).output().unwrap());
    assert!(snapshot(&out) != before);
    assert_eq!(entries(dir.path()), ["w8a8"]);
}

#[cfg(unix)]
#[test]
fn interrupted_calibrate_keeps_the_previous_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("act.safetensors");
    let calib = demo("calib.txt");
    let args = |samples: &str| {
        vec![
            "calibrate".to_string(),
            "--calib-data".into(),
            calib.clone(),
            "--calib-samples".into(),
            samples.into(),
            "--calib-seq-len".into(),
            "64".into(),
            "--out".into(),
            out.to_string_lossy().into_owned(),
        ]
    };
    ok(bin().args(args("4")).output().unwrap());
    let before = std::fs::read(&out).unwrap();
    for sig in ["INT", "TERM"] {
        let mut child = bin()
            .args(args("8"))
            .env("SQ_TEST_COMMIT_DELAY_MS", "60000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_temp(dir.path(), ".act.safetensors.tmp-", &mut child);
        std::thread::sleep(Duration::from_millis(100));
        signal(child.id(), sig);
        let res = child.wait_with_output().unwrap();
        assert!(!res.status.success());
        assert_eq!(entries(dir.path()), ["act.safetensors"], "SIG{sig}");
        assert_eq!(std::fs::read(&out).unwrap(), before, "SIG{sig}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn stale_temporaries_of_dead_runs_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    // A process id that has exited (and been reaped).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale_dir = dir.path().join(format!(".q.tmp-{dead}-abc123"));
    std::fs::create_dir(&stale_dir).unwrap();
    std::fs::write(stale_dir.join("model.safetensors"), b"partial").unwrap();
    // A temporary of a live process (this one) is left alone.
    let live = dir
        .path()
        .join(format!(".q.tmp-{}-xyz", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let calib = demo("calib.txt");
    ok(bin()
        .args(with_calib(
            quantize_args(out.to_str().unwrap(), "0.5"),
            &calib,
        ))
        .output()
        .unwrap());
    let names = entries(dir.path());
    assert!(
        !names.iter().any(|n| n.contains(&dead.to_string())),
        "{names:?}"
    );
    assert!(live.is_dir());
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn a_non_empty_output_directory_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    std::fs::create_dir(&out).unwrap();
    let calib = demo("calib.txt");
    let args = with_calib(quantize_args(out.to_str().unwrap(), "0.5"), &calib);
    // An empty directory is fine.
    ok(bin().args(&args).output().unwrap());
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let res = bin().args(&args).output().unwrap();
    user_error(&res, "--force");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let mut forced = args.clone();
    forced.push("--force".into());
    ok(bin().args(&forced).output().unwrap());
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn same_inputs_give_identical_bytes_with_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let calib = demo("calib.txt");
    // The embedded stories260K and an OPT fixture (another tokenizer and architecture).
    for (label, model) in [("stories", None), ("opt", Some(fixture("opt-prenorm")))] {
        let mut stats = Vec::new();
        let mut models = Vec::new();
        for threads in ["1", "2"] {
            let s = dir.path().join(format!("{label}-{threads}.safetensors"));
            let q = dir.path().join(format!("{label}-{threads}"));
            let mut common = vec![
                "--threads".to_string(),
                threads.into(),
                "--calib-data".into(),
                calib.clone(),
                "--calib-samples".into(),
                "6".into(),
                "--calib-seq-len".into(),
                "48".into(),
                "--seed".into(),
                "3".into(),
            ];
            if let Some(m) = &model {
                common.extend(["--model".to_string(), m.clone()]);
            }
            ok(bin()
                .arg("calibrate")
                .args(&common)
                .args(["--out", s.to_str().unwrap()])
                .output()
                .unwrap());
            ok(bin()
                .arg("quantize")
                .args(&common)
                .args(["--preset", "o3", "--out", q.to_str().unwrap()])
                .output()
                .unwrap());
            stats.push(std::fs::read(&s).unwrap());
            models.push(snapshot(&q));
        }
        assert!(stats[0] == stats[1], "{label}: statistics differ");
        assert!(models[0] == models[1], "{label}: checkpoints differ");
    }
}

#[test]
fn seeded_generation_is_reproducible_across_runs_and_threads() {
    let gen = |threads: &str| {
        let out = ok(run(&[
            "--threads",
            threads,
            "generate",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            "11",
            "--max-tokens",
            "40",
            "--json",
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let a = gen("1");
    assert!(!a.is_empty());
    assert_eq!(a, gen("1"));
    assert_eq!(a, gen("2"));
}

#[test]
fn limits_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, " \n\n ").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Once upon a time there was a dog.").unwrap();
    let out = dir.path().join("act.safetensors");
    let out_s = out.to_str().unwrap();
    let (empty_s, short_s) = (empty.to_str().unwrap(), short.to_str().unwrap());

    // Calibration text: empty, or shorter than one window.
    user_error(
        &run(&["calibrate", "--calib-data", empty_s, "--out", out_s]),
        "is empty",
    );
    user_error(
        &run(&["calibrate", "--calib-data", short_s, "--out", out_s]),
        "fewer than one window of 512",
    );
    user_error(
        &run(&[
            "quantize",
            "--calib-data",
            short_s,
            "--out",
            dir.path().join("q").to_str().unwrap(),
        ]),
        "fewer than one window",
    );
    // --calib-samples 0.
    let calib = demo("calib.txt");
    user_error(
        &run(&[
            "calibrate",
            "--calib-data",
            &calib,
            "--calib-samples",
            "0",
            "--out",
            out_s,
        ]),
        "--calib-samples",
    );
    user_error(
        &run(&[
            "quantize",
            "--calib-data",
            &calib,
            "--calib-samples",
            "0",
            "--out",
            dir.path().join("q").to_str().unwrap(),
        ]),
        "--calib-samples",
    );
    assert_eq!(entries(dir.path()), ["empty.txt", "short.txt"]);
    // Evaluation text shorter than one window, or empty.
    user_error(
        &run(&[
            "eval",
            "--data",
            short_s,
            "--seq-len",
            "256",
            "--scheme",
            "fp32",
        ]),
        "fewer than one window",
    );
    user_error(
        &run(&["eval", "--data", empty_s, "--scheme", "fp32"]),
        "is empty",
    );
    // A prompt longer than the context (512 tokens for stories260K): an error before any
    // output, and an empty prompt.
    let long = "Once upon a time there was a dog. ".repeat(100);
    let res = run(&["generate", "--prompt", &long, "--max-tokens", "4"]);
    user_error(&res, "context of 512 tokens");
    assert!(
        res.stdout.is_empty(),
        "the prompt was echoed before the error"
    );
    user_error(&run(&["generate", "--prompt", ""]), "--prompt is empty");
}

#[test]
fn verbose_reports_peak_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("act.safetensors");
    let calib = demo("calib.txt");
    let res = ok(run(&[
        "-v",
        "calibrate",
        "--calib-data",
        &calib,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]));
    let stderr = String::from_utf8_lossy(&res.stderr);
    if cfg!(target_os = "linux") {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("peak RSS: "))
            .unwrap_or_else(|| panic!("no peak RSS line in {stderr}"));
        let mib: f64 = line["peak RSS: ".len()..]
            .trim_end_matches(" MiB")
            .parse()
            .unwrap();
        assert!(mib > 1.0 && mib < 4096.0, "{line}");
    }
    // Without -v, no report.
    let res = ok(run(&[
        "calibrate",
        "--calib-data",
        &calib,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(!String::from_utf8_lossy(&res.stderr).contains("peak RSS"));
}

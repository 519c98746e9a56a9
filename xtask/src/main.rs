//! `cargo xtask`: project automation, kept thin (rust-analyzer style).
//!
//! - `cargo xtask ci [--no-test]`: rustfmt check, clippy with warnings denied, then the README's
//!   test command (the same one `.ci/run` runs).
//! - `cargo xtask snapshots [--accept|--reject] [CARGO TEST ARGS]`: run the tests recording
//!   insta snapshot changes (the whole workspace unless narrowed, e.g. `-p sq-cli --test
//!   snapshots`), show them, then accept or reject them.
//! - `cargo xtask bench [gemm|model|all] [--threads N] [--json]`: benchmarks.
//! - `cargo xtask fuzz [--cases N] [--seconds S] [--seed N] [--targets a,b]`: mutation
//!   fuzzing of every parser of untrusted input (tests/fuzz.rs), with cases per second.
//! - `cargo xtask bench ... --device cuda[:N]` runs the GPU GEMM suite (`sq_kernels::cuda::bench`).
//! - `cargo xtask kernels [--arch compute_XY] [--ptx DIR]`: compile the CUDA kernel sources
//!   (NVRTC or nvcc) and report errors with file and line.
//! - `cargo xtask scale [--gb N]`: streaming quantization of a synthetic N GB LLaMA-shaped
//!   checkpoint: peak RSS, throughput, time split (`xtask/src/scale.rs`).

mod cuda;
mod gemm_bench;
mod model_bench;
mod scale;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci [--no-test]                         fmt check, clippy -D warnings, then the README test command
  test-command                           print the test command written in README.md
  snapshots [--accept|--reject] [ARGS]   run the tests (ARGS narrow `cargo test`, default --workspace)
                                         and show pending insta snapshots, or accept/reject them
  bench [gemm|model|all] [--threads N] [--json] [--device cpu|cuda[:N]] [--lm-head fp32|int8]
        [--int8-attention] [--pairs N]
                                         benchmarks (see ../shared/cli-contract.md); `--device cuda`
                                         times INT8 vs FP16 GEMMs on an NVIDIA GPU; `model` runs
                                         `smoothquant bench` on ../shared's SmolLM2 (fp32 and each
                                         W8A8 preset, 1 and 2 threads), then each preset against
                                         fp32 in turn (`--pairs N` rounds, default 5; 0 skips),
                                         and draws docs/images/bench_smollm2.png
  fuzz [--cases N] [--seconds S] [--seed N] [--targets a,b]
                                         mutation-fuzz every parser (N cases each, default 10000;
                                         or S seconds each); see docs/reliability.md
  kernels [--arch compute_XY] [--ptx DIR]
                                         compile the CUDA kernels with NVRTC or nvcc
  scale [--gb N] [--windows N] [--seq-len N] [--keep] [--bin PATH]
                                         quantize a synthetic LLaMA-shaped bf16 checkpoint of about
                                         N GB (default 16; cached under the target dir) layer by
                                         layer; report peak RSS, throughput and the time split";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root, args.iter().any(|a| a == "--no-test")),
        Some("test-command") => {
            println!("{}", readme_test_command(&root)?);
            Ok(())
        }
        Some("snapshots") => snapshots(&root, &args[1..]),
        Some("bench") => bench(&root, &args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("kernels") => cuda::kernels(&root, &args[1..]),
        Some("scale") => scale::scale(&root, &args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown xtask command `{other}`\n\n{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The test command from README.md: the first fenced line that starts with `cargo test`
/// or `cargo nextest run`. CI runs exactly this.
fn readme_test_command(root: &Path) -> Result<String> {
    let readme = std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo test") || l.starts_with("cargo nextest run"))
        .map(str::to_string)
        .context("README.md has no line starting with `cargo test`")
}

/// `cargo run -q -p sq-kernels [--release] [--features F] --example NAME --`: the GEMM suites and
/// the CUDA kernel build run as examples of sq-kernels, so xtask does not link the kernels itself.
fn kernels_example(name: &str, release: bool, features: Option<&str>) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["run", "-q", "-p", "sq-kernels"]);
    if release {
        cmd.arg("--release");
    }
    if let Some(f) = features {
        cmd.args(["--features", f]);
    }
    cmd.args(["--example", name, "--"]);
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn shell(line: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line);
    cmd
}

fn ci(root: &Path, no_test: bool) -> Result<()> {
    let start = std::time::Instant::now();
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The CUDA backend type-checks (and lints) without a toolkit: cudarc loads its libraries at
    // run time.
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "cuda",
        "--",
        "-D",
        "warnings",
    ]))?;
    if !no_test {
        run(&mut shell(&readme_test_command(root)?))?;
    }
    eprintln!("xtask ci: ok in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn pending_snapshots(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && !name.to_string_lossy().starts_with('.') {
            pending_snapshots(&path, out);
        } else if path.to_string_lossy().ends_with(".snap.new") {
            out.push(path);
        }
    }
}

fn snapshots(root: &Path, args: &[String]) -> Result<()> {
    let accept = args.iter().any(|a| a == "--accept");
    let reject = args.iter().any(|a| a == "--reject");
    if !accept && !reject {
        // Record every changed snapshot as `.snap.new` without failing the run. Extra arguments
        // narrow the run (`cargo xtask snapshots -p sq-cli --test snapshots`).
        let mut test = Command::new("cargo");
        test.arg("test");
        if args.is_empty() {
            test.arg("--workspace");
        } else {
            test.args(args);
        }
        let _ = test
            .env("INSTA_UPDATE", "new")
            .env("INSTA_FORCE_PASS", "1")
            .status();
    }
    let mut pending = Vec::new();
    pending_snapshots(root, &mut pending);
    pending.sort();
    if pending.is_empty() {
        println!("no pending snapshots");
        return Ok(());
    }
    for new in &pending {
        let old = PathBuf::from(new.to_string_lossy().trim_end_matches(".new"));
        if accept {
            std::fs::rename(new, &old)?;
            println!("accepted {}", old.display());
        } else if reject {
            std::fs::remove_file(new)?;
            println!("rejected {}", new.display());
        } else {
            println!("=== {}", old.display());
            let _ = Command::new("diff")
                .args(["-u", "--label", "old", "--label", "new"])
                .arg(if old.exists() {
                    old.as_path()
                } else {
                    Path::new("/dev/null")
                })
                .arg(new)
                .status();
        }
    }
    if !accept && !reject {
        println!(
            "\n{} pending snapshot(s); `cargo xtask snapshots --accept` or `--reject`",
            pending.len()
        );
    }
    Ok(())
}

/// Runs tests/fuzz.rs with a case count (or time) per parser; the test prints the table of
/// cases, clean errors, accepted inputs, panics and cases per second.
fn fuzz(args: &[String]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "-p", "smoothquant-rs", "--test", "fuzz"]);
    let mut cases = Some("10000".to_string());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--cases" => {
                let n = value("--cases")?;
                n.parse::<usize>().with_context(|| format!("--cases {n}"))?;
                cases = Some(n);
            }
            "--seconds" => {
                let s = value("--seconds")?;
                s.parse::<f64>().with_context(|| format!("--seconds {s}"))?;
                cmd.env("SQ_FUZZ_SECONDS", s);
                cases = None;
            }
            "--seed" => {
                let s = value("--seed")?;
                s.parse::<u64>().with_context(|| format!("--seed {s}"))?;
                cmd.env("SQ_FUZZ_SEED", s);
            }
            "--targets" => {
                cmd.env("SQ_FUZZ_TARGETS", value("--targets")?);
            }
            other => bail!("unknown fuzz argument `{other}`\n\n{USAGE}"),
        }
    }
    if let Some(n) = cases {
        cmd.env("SQ_FUZZ_CASES", n);
    }
    cmd.args(["--", "--nocapture"]);
    run(&mut cmd)
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    let mut which = "all";
    let mut threads = None;
    let mut json = false;
    let mut gpu = None;
    let mut lm_head = "fp32".to_string();
    let mut int8_attention = false;
    let mut pairs = 5;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "gemm" | "model" | "all" => which = a,
            "--json" => json = true,
            "--device" => {
                let d = it.next().context("--device needs cpu or cuda[:N]")?;
                gpu = match d.as_str() {
                    "cpu" => None,
                    "cuda" => Some(0),
                    other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                        Some(Ok(n)) => Some(n),
                        _ => bail!("--device {other}: expected cpu, cuda or cuda:N"),
                    },
                };
            }
            "--int8-attention" => int8_attention = true,
            "--pairs" => {
                let n = it.next().context("--pairs needs a count")?;
                pairs = n.parse::<usize>().with_context(|| format!("--pairs {n}"))?;
            }
            "--lm-head" => {
                lm_head = it.next().context("--lm-head needs fp32 or int8")?.clone();
            }
            "--threads" => {
                let n = it.next().context("--threads needs a value")?;
                threads = Some(
                    n.parse::<usize>()
                        .with_context(|| format!("--threads {n}"))?,
                );
            }
            other => bail!("unknown bench argument `{other}`\n\n{USAGE}"),
        }
    }
    if let Some(ordinal) = gpu {
        if which != "gemm" {
            bail!(
                "`--device cuda` times the GEMMs only: run `cargo xtask bench gemm --device cuda`"
            );
        }
        return cuda::bench_gemm(ordinal, json);
    }
    let model = model_bench::Options {
        threads,
        json,
        lm_head,
        int8_attention,
        pairs,
    };
    match which {
        "gemm" => gemm_bench::run(threads, json),
        "model" => {
            let report = model_bench::run(root, &model)?;
            if json {
                println!("{report}");
            }
            Ok(())
        }
        _ => {
            if !json {
                gemm_bench::run(threads, false)?;
                model_bench::run(root, &model)?;
                return Ok(());
            }
            let gemm = gemm_bench::report(threads, true)?;
            let mut report: serde_json::Value =
                serde_json::from_str(&gemm).context("parsing the GEMM benchmark's JSON")?;
            report["model"] = model_bench::run(root, &model)?;
            println!("{report}");
            Ok(())
        }
    }
}

//! `cargo xtask bench gemm [--threads N] [--json]`: measures the machine's `vpdpbusd` and FMA
//! peaks and read bandwidth, then times the INT8 and f32 GEMMs (see `sq_kernels::bench`).
//!
//! The suite runs as sq-kernels' `gemm_bench` example built with `--release`: xtask itself is
//! built with the dev profile (debug assertions, overflow checks), which would time kernels
//! that users never run.

use anyhow::{bail, Context};
use std::process::Stdio;

/// Runs the suite and returns what it printed: the JSON report or the table.
pub fn report(threads: Option<usize>, json: bool) -> anyhow::Result<String> {
    let threads = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut cmd = crate::kernels_example("gemm_bench", true, None);
    cmd.arg("--threads").arg(threads.to_string());
    if json {
        cmd.arg("--json");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running sq-kernels' gemm_bench example")?;
    if !out.status.success() {
        bail!("the GEMM benchmark failed (its message is above)");
    }
    String::from_utf8(out.stdout).context("the GEMM benchmark printed non-UTF-8 output")
}

pub fn run(threads: Option<usize>, json: bool) -> anyhow::Result<()> {
    let text = report(threads, json)?;
    print!("{text}");
    if json && !text.ends_with('\n') {
        println!();
    }
    Ok(())
}

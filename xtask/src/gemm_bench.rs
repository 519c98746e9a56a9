//! `cargo xtask bench gemm [--threads N] [--json]`: measures the machine's `vpdpbusd` and FMA
//! peaks and read bandwidth, then times the INT8 and f32 GEMMs (see `sq_kernels::bench`).

use anyhow::Context;

pub fn run(threads: Option<usize>, json: bool) -> anyhow::Result<()> {
    let threads = match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let report =
        sq_kernels::bench::run_gemm_suite(threads).context("running the GEMM benchmark")?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

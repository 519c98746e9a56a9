//! The `cargo xtask bench gemm` suite as an example:
//! `cargo run --release -p sq-kernels --example gemm_bench -- [--threads N] [--json]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut threads = None;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--threads" => threads = Some(args.next().ok_or("--threads needs a value")?.parse()?),
            other => {
                return Err(
                    format!("unknown argument `{other}` (expected --threads N, --json)").into(),
                )
            }
        }
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = sq_kernels::bench::run_gemm_suite(threads)?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

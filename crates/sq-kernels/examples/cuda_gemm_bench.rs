//! INT8 (cuBLASLt) vs FP16 (cuBLAS) GEMM throughput on an NVIDIA GPU: the engine of
//! `cargo xtask bench gemm --device cuda[:N]`.
//!
//! `cuda_gemm_bench [--device N] [--json] [MxNxK ...]` (default: `sq_kernels::cuda::bench::SHAPES`).

use sq_kernels::cuda::{bench, CudaDevice};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut ordinal = 0usize;
    let mut json = false;
    let mut shapes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--device" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => ordinal = n,
                None => {
                    eprintln!("--device needs a GPU number");
                    return ExitCode::from(2);
                }
            },
            shape => {
                let dims: Option<Vec<usize>> = shape.split('x').map(|v| v.parse().ok()).collect();
                match dims.as_deref() {
                    Some(&[m, n, k]) if m > 0 && n > 0 && k > 0 => shapes.push((m, n, k)),
                    _ => {
                        eprintln!("expected --json, --device N or MxNxK, got `{shape}`");
                        return ExitCode::from(2);
                    }
                }
            }
        }
    }
    let device = match CudaDevice::new(ordinal) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let shapes = (!shapes.is_empty()).then_some(shapes.as_slice());
    match bench::run_gemm_suite(&device, shapes) {
        Ok(report) if json => println!("{}", report.to_json()),
        Ok(report) => print!("{}", report.to_table()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

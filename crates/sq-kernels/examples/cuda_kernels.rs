//! Compiles the CUDA kernel sources with NVRTC and prints the compiler's messages: the engine
//! of `cargo xtask kernels`. `cuda_kernels [--arch compute_XY] [--ptx DIR]` (`--ptx` writes
//! each file's PTX there, to read what the compiler made of it).
//!
//! Exit status: 0 when every file compiles, 1 when one does not, 3 when NVRTC cannot be loaded
//! (xtask then tries nvcc).

use sq_kernels::cuda::kernels::{check_sources, nvrtc_available, DEFAULT_CHECK_ARCH};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = match args.iter().position(|a| a == "--arch") {
        Some(i) => match args.get(i + 1) {
            Some(a) => a.clone(),
            None => {
                eprintln!("--arch needs a value such as compute_90");
                return ExitCode::from(2);
            }
        },
        None => DEFAULT_CHECK_ARCH.to_string(),
    };
    let ptx_dir = args
        .iter()
        .position(|a| a == "--ptx")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    if !nvrtc_available() {
        eprintln!("NVRTC (libnvrtc.so) could not be loaded");
        return ExitCode::from(3);
    }
    let checks = match check_sources(&arch) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut failed = 0;
    for check in &checks {
        match &check.result {
            Ok(ptx) => {
                println!("ok    {} ({arch}, {} bytes of PTX)", check.name, ptx.len());
                if let Some(dir) = &ptx_dir {
                    let path = dir.join(check.name.replace(".cu", ".ptx"));
                    if let Err(e) =
                        std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, ptx))
                    {
                        eprintln!("cannot write {}: {e}", path.display());
                        return ExitCode::from(1);
                    }
                }
            }
            Err(log) => {
                failed += 1;
                println!("error {} ({arch}):\n{}", check.name, log.trim_end());
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} kernel files failed to compile",
            checks.len()
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

//! The CUDA commands: `cargo xtask kernels` and `cargo xtask bench gemm --device cuda[:N]`.
//!
//! Both run an example of sq-kernels built with `--features cuda`, so xtask itself (and CI)
//! never compiles cudarc unless asked to.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "crates/sq-kernels/src/cuda/kernels";

/// Exit status of the `cuda_kernels` example when NVRTC cannot be loaded.
const NO_NVRTC: i32 = 3;

/// `cargo xtask kernels [--arch compute_XY] [--ptx DIR]`: compiles the CUDA sources with NVRTC
/// (through cudarc), or with nvcc when NVRTC cannot be loaded, and prints the compiler's
/// messages (`file.cu(line): error: ...`).
pub fn kernels(root: &Path, args: &[String]) -> Result<()> {
    let mut arch = "compute_75".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--arch" => {
                arch = it
                    .next()
                    .context("--arch needs a value such as compute_90")?
                    .clone()
            }
            "--ptx" => {
                it.next().context("--ptx needs a directory")?;
            }
            other => bail!("unknown kernels argument `{other}` (expected --arch A or --ptx DIR)"),
        }
    }
    eprintln!("compiling the CUDA kernels for {arch} with NVRTC (via cudarc)");
    let status = crate::kernels_example("cuda_kernels", false, Some("cuda"))
        .args(args)
        .status()
        .context("running the cuda_kernels example")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(NO_NVRTC) => nvcc(root, &arch),
        _ => bail!("the CUDA kernels do not compile (the compiler's messages are above)"),
    }
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nvcc")).collect())
        .unwrap_or_default();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin/nvcc"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// The fallback: each `.cu` file behind the common header, as the library hands them to NVRTC.
fn nvcc(root: &Path, arch: &str) -> Result<()> {
    let Some(nvcc) = find_nvcc() else {
        bail!(
            "cannot compile the CUDA kernels: neither NVRTC (libnvrtc.so, loaded through cudarc) \
             nor nvcc was found. Install the CUDA toolkit, or only its runtime compiler (e.g. the \
             pip package nvidia-cuda-nvrtc), then make libnvrtc.so loadable (LD_LIBRARY_PATH) or \
             nvcc reachable (PATH or CUDA_HOME)"
        );
    };
    eprintln!(
        "NVRTC could not be loaded; compiling with {}",
        nvcc.display()
    );
    let dir = root.join(KERNEL_DIR);
    let common = std::fs::read_to_string(dir.join("common.cuh"))
        .with_context(|| format!("reading {}/common.cuh", dir.display()))?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let tmp = std::env::temp_dir().join(format!("sq-kernels-nvcc-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut failed = Vec::new();
    for src in &sources {
        let name = src.file_name().unwrap().to_string_lossy().to_string();
        let code = std::fs::read_to_string(src)?;
        let program = tmp.join(&name);
        std::fs::write(
            &program,
            format!("#line 1 \"common.cuh\"\n{common}\n#line 1 \"{name}\"\n{code}"),
        )?;
        let status = Command::new(&nvcc)
            .args(["--ptx", "-std=c++17", "--fmad=false"])
            .arg(format!("--gpu-architecture={arch}"))
            .arg("-o")
            .arg(tmp.join(name.replace(".cu", ".ptx")))
            .arg(&program)
            .status()
            .with_context(|| format!("running {}", nvcc.display()))?;
        if status.success() {
            println!("ok    {name} ({arch}, nvcc)");
        } else {
            failed.push(name);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} do not compile (nvcc's messages are above)",
            failed.join(", ")
        )
    }
}

/// `cargo xtask bench gemm --device cuda[:N] [--json]`: the GPU GEMM suite
/// (`sq_kernels::cuda::bench`), built in release mode.
pub fn bench_gemm(ordinal: usize, json: bool) -> Result<()> {
    let mut cmd = crate::kernels_example("cuda_gemm_bench", true, Some("cuda"));
    cmd.arg("--device").arg(ordinal.to_string());
    if json {
        cmd.arg("--json");
    }
    let status = cmd
        .status()
        .context("running the cuda_gemm_bench example")?;
    if !status.success() {
        bail!("the GPU GEMM benchmark failed (its message is above)");
    }
    Ok(())
}

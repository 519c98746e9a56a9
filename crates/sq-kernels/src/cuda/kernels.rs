//! The CUDA C sources, embedded in the library, and their compilation with NVRTC.
//!
//! The sources live in `src/cuda/kernels/`: `common.cuh` (helpers every file uses) and one `.cu`
//! file per family. The program handed to NVRTC is the header followed by every file, each
//! behind a `#line 1 "file.cu"` directive, so compiler messages name the file and line they
//! come from. A [`super::CudaDevice`] compiles it once per GPU architecture, at its creation
//! (the PTX is cached for the process), and loads it as one module.
//!
//! `cargo xtask kernels` compiles each file on its own (with the header) through
//! [`check_sources`] and prints the compiler's messages.

use crate::error::{KernelError, Result};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// One embedded source file.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `src/cuda/kernels/`.
    pub name: &'static str,
    pub code: &'static str,
}

/// The header prepended to every file.
pub const COMMON: KernelSource = KernelSource {
    name: "common.cuh",
    code: include_str!("kernels/common.cuh"),
};

/// Every kernel file, in program order.
pub const SOURCES: [KernelSource; 4] = [
    KernelSource {
        name: "quantize.cu",
        code: include_str!("kernels/quantize.cu"),
    },
    KernelSource {
        name: "epilogue.cu",
        code: include_str!("kernels/epilogue.cu"),
    },
    KernelSource {
        name: "gemm.cu",
        code: include_str!("kernels/gemm.cu"),
    },
    KernelSource {
        name: "layers.cu",
        code: include_str!("kernels/layers.cu"),
    },
];

/// The architecture `cargo xtask kernels` checks against when no GPU names one: Turing, the
/// oldest GPU with INT8 tensor cores (and `__dp4a`), which NVRTC 12 and 13 both accept.
pub const DEFAULT_CHECK_ARCH: &str = "compute_75";

fn with_line(out: &mut String, src: &KernelSource) {
    out.push_str(&format!("#line 1 \"{}\"\n", src.name));
    out.push_str(src.code);
    if !src.code.ends_with('\n') {
        out.push('\n');
    }
}

/// The whole program: the header, then every file.
pub fn program_source() -> String {
    let mut out = String::new();
    with_line(&mut out, &COMMON);
    for src in &SOURCES {
        with_line(&mut out, src);
    }
    out
}

/// Whether the NVRTC library can be loaded (it needs no GPU).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn options(arch: &str, name: &str) -> CompileOptions {
    CompileOptions {
        // The epilogues and quantizers must round like the CPU: no contraction into FMA, IEEE
        // division and square root, subnormals kept.
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        name: Some(name.into()),
        ..Default::default()
    }
}

fn compile_error(op: &'static str, e: CompileError) -> KernelError {
    let detail = match e {
        CompileError::CompileError { log, .. } => {
            format!("NVRTC rejected the kernels:\n{}", log.to_string_lossy())
        }
        other => format!("NVRTC failed: {other:?}"),
    };
    KernelError::Cuda { op, detail }
}

fn compile_source(src: &str, arch: &str, name: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(KernelError::CudaUnavailable {
            reason: "the NVRTC library (libnvrtc.so) could not be loaded; install the CUDA \
                     runtime compiler or add its directory to LD_LIBRARY_PATH"
                .into(),
        });
    }
    cudarc::nvrtc::compile_ptx_with_opts(src, options(arch, name))
        .map_err(|e| compile_error("compile kernels", e))
}

/// The PTX of [`program_source`] for `arch` (`compute_90`, ...), compiled once per process.
pub fn program_ptx(arch: &str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<String, Ptx>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(arch) {
        return Ok(ptx.clone());
    }
    let ptx = compile_source(&program_source(), arch, "sq_kernels.cu")?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

/// The outcome of compiling one file.
#[derive(Debug)]
pub struct SourceCheck {
    pub name: &'static str,
    /// `Ok(PTX)` or the compiler's log (messages as `file.cu(line): error: ...`).
    pub result: std::result::Result<String, String>,
}

/// Compiles every file on its own (header included) for `arch` with NVRTC, for
/// `cargo xtask kernels`. Errors only when NVRTC itself cannot be loaded.
pub fn check_sources(arch: &str) -> Result<Vec<SourceCheck>> {
    let mut out = Vec::new();
    for src in &SOURCES {
        let mut program = String::new();
        with_line(&mut program, &COMMON);
        with_line(&mut program, src);
        let result = match compile_source(&program, arch, src.name) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(KernelError::Cuda { detail, .. }) => Err(detail),
            Err(other) => return Err(other),
        };
        out.push(SourceCheck {
            name: src.name,
            result,
        });
    }
    Ok(out)
}

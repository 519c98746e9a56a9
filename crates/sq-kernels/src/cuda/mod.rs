//! The CUDA backend (feature `cuda`): INT8 GEMM on NVIDIA tensor cores through cuBLASLt, the
//! quantize, epilogue and batched-matmul kernels of our own compiled at run time with NVRTC, and
//! the FP16 cuBLAS GEMM the W8A8 path is measured against.
//!
//! # Loading
//!
//! `cudarc` is built with `dynamic-loading`: `libcuda`, `libcublas`, `libcublasLt` and
//! `libnvrtc` are opened when first used, so the crate builds, type-checks and runs its CPU
//! code on machines without a CUDA toolkit or driver. [`CudaDevice::new`] checks that each
//! library loads and that the device exists before touching them, and returns
//! [`KernelError::CudaUnavailable`] with the reason otherwise: it never panics for a missing
//! driver, library or GPU.
//!
//! # Design: a GPU-resident API, and the trait on top
//!
//! [`Int8Gemm`](crate::Int8Gemm) takes host slices, which fits the CPU backends but would copy
//! every operand over PCIe on each call. The GPU API therefore works on device buffers
//! (`cudarc`'s [`CudaSlice`]) that stay on the GPU between calls:
//!
//! - [`DeviceWeights`]: INT8 weights uploaded once (at model load) with their per-column scales
//!   and bias, N and K padded to multiples of 16 with zeros (see *Layout* below);
//! - [`DeviceActs`]: quantized activations `[m, kp]` and their scales, made on the GPU by
//!   [`CudaDevice::quantize`] (dynamic per token, optionally smoothed; dynamic per tensor;
//!   static) from f32 or f16 activations, or uploaded by [`CudaDevice::upload_acts`];
//! - [`CudaDevice::gemm`]: `Y = X · Wᵀ` into INT32, f32, f16 or INT8 (the O3 requantization);
//! - [`CudaDevice::bmm`]: the batched `A · op(B)` of attention with arbitrary strides;
//! - [`CudaDevice::hgemm`]: the FP16 baseline (cuBLAS, FP32 accumulation);
//! - [`layers`]: the decoder's other operations (embedding, norms, rotary embeddings, causal
//!   attention over a KV cache, activations, residual adds, FP Linears through cuBLAS), which
//!   sq-model composes into the model forward on the GPU.
//!
//! Everything is queued on the device's one stream and runs asynchronously; reading a result
//! back ([`CudaDevice::download`]) waits for it. [`CudaBackend`] implements the `Int8Gemm`
//! trait on top: it uploads the operands, runs the GPU API and downloads the result on each
//! call, which makes it slow but lets the tests drive every GPU kernel through the same calls
//! as the CPU backends and compare them with `Reference`.
//!
//! # Layout and the GEMM paths
//!
//! The model's weights are `W [n, k]` row-major and activations `X [m, k]` row-major. In
//! cuBLAS's column-major terms `Yᵀ = W · Xᵀ`: A = W stored `k × n` and transposed, B = X stored
//! `k × m`, C = `Yᵀ` stored `n × m`, which is `Y [m, n]` row-major. That is the "TN" format, the
//! one cuBLASLt's INT8 tensor-core (IMMA) kernels accept in the plain column-major order, with
//! `CUBLAS_COMPUTE_32I`, INT8 A/B, INT32 C, and the leading dimensions and the `m` and `k` of
//! the call (our N and K) multiples of 4 on 4-byte (better 16-byte) aligned pointers. We pad N
//! and K to multiples of 16 at upload (zeros add nothing to the dot products) and every row of
//! the quantized activations to the same padded K, so any shape qualifies; the IMMA-specific
//! `COL32` orders are not needed (and are pre-Hopper only). The INT32 result `[m, np]` then
//! goes through our epilogue kernel, which applies `((acc · Δx[i]) · Δw[j]) + bias[j]` in that
//! order without FMA (the program is compiled with `--fmad=false`), so the f32 results are
//! bit-identical to the CPU backends', and requantizes for the INT8 output.
//!
//! Three paths compute the INT32 product, all exact ([`GemmPath`]):
//!
//! - `CublasLt`: the tensor-core path for prefill (`m > 16`). The algorithm comes from
//!   cuBLASLt's heuristic (with a 32 MiB workspace), falling back to cuBLASLt's own default
//!   without workspace, then to `Tiled` when cuBLASLt declines the shape; the choice is made
//!   once per shape and cached.
//! - `SmallM`: our `__dp4a` kernel for decode (`m <= 16`), where cuBLASLt's IMMA kernels are
//!   not offered (PyTorch's `_int_mm` refuses `m <= 16` for the same reason): one warp per
//!   output column streams its weight row once for up to 8 rows of X.
//! - `Tiled`: our shared-memory `__dp4a` kernel (64 × 64 tiles), also behind [`CudaDevice::bmm`].
//!
//! [`CudaDevice::gemm_with`] (and [`CudaBackend::with_path`]) forces one of them; the tests
//! run each against `Reference`.
//!
//! # Kernels
//!
//! The CUDA C sources are in `src/cuda/kernels/` ([`kernels`]), embedded with `include_str!`
//! and compiled with NVRTC for the device's architecture when a [`CudaDevice`] is created
//! (once per process and architecture). `cargo xtask kernels` compiles them without a GPU.

pub mod bench;
pub mod kernels;
pub mod layers;
mod lt;
mod ops;
mod trait_impl;

pub use cudarc;
pub use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
pub use layers::{GpuActivation, GpuAttention, MAX_HEAD_DIM};
pub use ops::{
    DeviceActQuant, DeviceActs, DeviceBatched, DeviceBmmOut, DeviceFloat, DeviceWeights, GemmOut,
};
pub use trait_impl::CudaBackend;

use crate::error::{KernelError, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use std::sync::Arc;

/// Which kernel computes the INT32 product of [`CudaDevice::gemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// `SmallM` for `m <= 16`, else `CublasLt` (which falls back to `Tiled` by itself).
    Auto,
    /// cuBLASLt's INT8 tensor-core kernels; an error if cuBLASLt declines the shape.
    CublasLt,
    /// Our `__dp4a` kernel for few rows.
    SmallM,
    /// Our shared-memory tiled `__dp4a` kernel.
    Tiled,
}

/// Rows up to which [`GemmPath::Auto`] uses the `SmallM` kernel.
pub const SMALL_M_MAX_ROWS: usize = 16;

/// Alignment (elements) N and K are padded to on the GPU.
pub const PAD: usize = 16;

/// `v` rounded up to a multiple of [`PAD`], at least `PAD`.
pub fn padded(v: usize) -> usize {
    v.div_ceil(PAD).max(1) * PAD
}

pub(crate) fn cuda_err(op: &'static str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda {
        op,
        detail: format!("{e:?}"),
    }
}

fn unavailable(reason: impl Into<String>) -> KernelError {
    KernelError::CudaUnavailable {
        reason: reason.into(),
    }
}

/// The kernels of the program, looked up once.
#[derive(Debug)]
pub(crate) struct Functions {
    pub quantize_rows_f32: CudaFunction,
    pub quantize_rows_f16: CudaFunction,
    pub absmax_f32: CudaFunction,
    pub absmax_f16: CudaFunction,
    pub quantize_tensor_f32: CudaFunction,
    pub quantize_tensor_f16: CudaFunction,
    pub epilogue_i32: CudaFunction,
    pub epilogue_f32: CudaFunction,
    pub epilogue_i8: CudaFunction,
    pub epilogue_f16: CudaFunction,
    pub gemm_small_m: CudaFunction,
    pub bmm_tiled: CudaFunction,
    pub layers: layers::LayerFunctions,
}

impl Functions {
    fn load(module: &Arc<CudaModule>) -> Result<Self> {
        let f = |name: &'static str| {
            module
                .load_function(name)
                .map_err(|e| cuda_err("load kernels", format!("{name}: {e:?}")))
        };
        Ok(Functions {
            quantize_rows_f32: f("sq_quantize_rows_f32")?,
            quantize_rows_f16: f("sq_quantize_rows_f16")?,
            absmax_f32: f("sq_absmax_f32")?,
            absmax_f16: f("sq_absmax_f16")?,
            quantize_tensor_f32: f("sq_quantize_tensor_f32")?,
            quantize_tensor_f16: f("sq_quantize_tensor_f16")?,
            epilogue_i32: f("sq_epilogue_i32")?,
            epilogue_f32: f("sq_epilogue_f32")?,
            epilogue_i8: f("sq_epilogue_i8")?,
            epilogue_f16: f("sq_epilogue_f16")?,
            gemm_small_m: f("sq_gemm_small_m")?,
            bmm_tiled: f("sq_bmm_tiled")?,
            layers: layers::LayerFunctions::load(&f)?,
        })
    }
}

/// One NVIDIA GPU: its context and stream, cuBLAS and cuBLASLt handles, and our kernels.
/// Shared as `Arc<CudaDevice>`; every operation is queued on its one stream.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub(crate) funcs: Functions,
    pub(crate) lt: lt::Lt,
    pub(crate) blas: cudarc::cublas::CudaBlas,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice(cuda:{} {}, sm_{}{})",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1
        )
    }
}

/// Whether the NVIDIA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(unavailable(
            "the NVIDIA driver library (libcuda.so) could not be loaded: no NVIDIA driver is \
             installed, or its directory is not on the library path",
        ));
    }
    guard("count CUDA devices", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| unavailable(format!("the NVIDIA driver reports no usable GPU ({e:?})")))
    })
}

/// Runs `f`, turning a panic inside cudarc (a symbol the installed library lacks, say) into an
/// error instead of unwinding through the caller.
fn guard<T>(what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(unavailable(format!("{what}: {msg}")))
    })
}

impl CudaDevice {
    /// Opens GPU `ordinal`, creates the cuBLAS/cuBLASLt handles and compiles the kernels.
    /// Fails with [`KernelError::CudaUnavailable`] (never a panic) when the driver or a CUDA
    /// library cannot be loaded or the device does not exist.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let count = device_count()?;
        if count == 0 {
            return Err(unavailable(
                "the NVIDIA driver is installed but reports no GPU",
            ));
        }
        if ordinal >= count {
            return Err(unavailable(format!(
                "there is no GPU cuda:{ordinal} (this machine has {count}: cuda:0..cuda:{})",
                count - 1
            )));
        }
        // SAFETY (both): only dlopen the libraries.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() }
            || !unsafe { cudarc::cublas::sys::is_culib_present() }
        {
            return Err(unavailable(
                "cuBLAS / cuBLASLt (libcublas.so, libcublasLt.so) could not be loaded; install \
                 the CUDA toolkit's libraries or add their directory to LD_LIBRARY_PATH",
            ));
        }
        if !kernels::nvrtc_available() {
            return Err(unavailable(
                "the NVRTC library (libnvrtc.so) could not be loaded; install the CUDA runtime \
                 compiler or add its directory to LD_LIBRARY_PATH",
            ));
        }
        guard("open the GPU", || Self::open(ordinal)).map(Arc::new)
    }

    fn open(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("open the GPU", e))?;
        // One stream, so the per-buffer events cudarc records for multi-stream safety are
        // pure overhead.
        // SAFETY: every operation of this device is queued on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(|e| cuda_err("open the GPU", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| cuda_err("open the GPU", e))?;
        if compute_capability < (6, 1) {
            return Err(unavailable(format!(
                "{name} has compute capability {}.{}; the INT8 kernels need 6.1 or newer (__dp4a)",
                compute_capability.0, compute_capability.1
            )));
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("open the GPU", e))?
            .max(1) as usize;
        let arch = format!("compute_{}{}", compute_capability.0, compute_capability.1);
        let ptx = kernels::program_ptx(&arch)?;
        let module = ctx.load_module(ptx).map_err(|e| {
            let hint = if format!("{e:?}").contains("UNSUPPORTED_PTX_VERSION") {
                " (the NVRTC library is newer than the driver: use the NVRTC of the driver's \
                 CUDA version, e.g. via LD_LIBRARY_PATH)"
            } else {
                ""
            };
            cuda_err("load kernels", format!("{e:?}{hint}"))
        })?;
        let funcs = Functions::load(&module)?;
        let lt = lt::Lt::new(&stream, compute_capability)?;
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(|e| cuda_err("create the cuBLAS handle", e))?;
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability,
            sm_count,
            ctx,
            stream,
            funcs,
            lt,
            blas,
        })
    }

    /// The device's index (`cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `(major, minor)`, e.g. `(9, 0)` for Hopper.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// The stream every operation is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("memory info", e))
    }

    /// Makes the device's context current on the calling thread (cuBLAS and cuBLASLt calls
    /// do not do it themselves).
    pub(crate) fn bind(&self, op: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| cuda_err(op, e))
    }

    /// Waits for everything queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        self.ctx.check_err().map_err(|e| cuda_err("synchronize", e))
    }

    /// Copies `data` to a new device buffer (at least one element is allocated).
    pub fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.zeros(1);
        }
        self.stream
            .clone_htod(data)
            .map_err(|e| cuda_err("upload", e))
    }

    /// A zeroed device buffer of `len` elements (at least one is allocated).
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| cuda_err("allocate", e))
    }

    /// Copies the first `out.len()` elements of `src` to the host, waiting for the queued work
    /// that produces them.
    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &impl DevicePtr<T>,
        out: &mut [T],
    ) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        if src.len() < out.len() {
            return Err(KernelError::BadLength {
                op: "download",
                operand: "src",
                shape: format!("[{}]", out.len()),
                expected: out.len(),
                actual: src.len(),
            });
        }
        self.bind("download")?;
        let (ptr, _guard) = src.device_ptr(&self.stream);
        // SAFETY: `ptr` addresses at least `out.len()` elements of T (checked above), and the
        // copy is ordered after the work queued on the stream; synchronize waits for it.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, ptr, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("download", e))?;
        self.synchronize()
    }
}

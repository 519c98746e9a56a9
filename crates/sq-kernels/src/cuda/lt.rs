//! cuBLASLt INT8 × INT8 → INT32 in the "TN" format (see the module docs of `cuda` for the
//! mapping of our row-major operands), with one cached plan per shape.

use super::cuda_err;
use crate::error::Result;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Workspace cuBLASLt may use: NVIDIA recommends 32 MiB on Hopper, 4 MiB before.
fn workspace_bytes(compute_capability: (i32, i32)) -> usize {
    if compute_capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(ty: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map(Layout)
            .map_err(|e| cuda_err("cuBLASLt layout", e))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout and destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc and destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref and destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// How a shape runs, decided on its first call.
enum Algo {
    /// Not tried yet.
    Untried,
    /// The heuristic's algorithm with the workspace.
    Heuristic(sys::cublasLtMatmulAlgo_t),
    /// cuBLASLt's default (null algorithm, no workspace), as PyTorch's `_int_mm` calls it.
    Default,
    /// cuBLASLt declined the shape: the caller runs its own kernel.
    Unsupported,
}

struct Plan {
    desc: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    algo: Algo,
}

/// The descriptors are only used under the mutex, on the device's one stream.
struct Plans(HashMap<(usize, usize, usize), Plan>);
// SAFETY: cuBLASLt descriptors are plain host memory owned by the plan; they are only touched
// while the `Mutex` is held.
unsafe impl Send for Plans {}

pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<Plans>,
}

// SAFETY: the handle is only used to enqueue work on `stream` while `plans` is locked.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(mut plans) = self.plans.lock() {
            plans.0.clear();
        }
        // SAFETY: created in `new` and destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// At most this many shapes keep a plan (prefill lengths vary); the cache is cleared beyond.
const MAX_PLANS: usize = 512;

impl Lt {
    pub fn new(stream: &Arc<CudaStream>, compute_capability: (i32, i32)) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| cuda_err("create the cuBLASLt handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(workspace_bytes(compute_capability))
            .map_err(|e| cuda_err("allocate the cuBLASLt workspace", e));
        let workspace = match workspace {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Lt {
            handle,
            workspace,
            stream: stream.clone(),
            plans: Mutex::new(Plans(HashMap::new())),
        })
    }

    fn plan(m: usize, np: usize, kp: usize) -> Result<Plan> {
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32I,
            sys::cudaDataType_t::CUDA_R_32I,
        )
        .map(Desc)
        .map_err(|e| cuda_err("cuBLASLt matmul descriptor", e))?;
        let set_op = |attr, op: cudarc::cublas::sys::cublasOperation_t| {
            let op = op as i32;
            // SAFETY: the attribute is an int32 cublasOperation_t read from `op`.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    attr,
                    (&op) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(|e| cuda_err("cuBLASLt matmul descriptor", e))
        };
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
        )?;
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        )?;
        let i8t = sys::cudaDataType_t::CUDA_R_8I;
        Ok(Plan {
            // A = W, stored kp × np (column j is weight row j), used transposed.
            a: Layout::new(i8t, kp, np, kp)?,
            // B = X, stored kp × m (column i is activation row i).
            b: Layout::new(i8t, kp, m, kp)?,
            // C = D = Yᵀ, np × m: row-major Y [m, np].
            c: Layout::new(sys::cudaDataType_t::CUDA_R_32I, np, m, np)?,
            desc,
            algo: Algo::Untried,
        })
    }

    fn heuristic(&self, plan: &Plan) -> Option<sys::cublasLtMatmulAlgo_t> {
        let pref = Pref(lt::create_matmul_pref().ok()?);
        let size = self.workspace.len();
        // SAFETY: the attribute is a size_t read from `size`.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
        }
        .ok()?;
        // SAFETY: every descriptor is alive for the call.
        let result = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                plan.desc.0,
                plan.a.0,
                plan.b.0,
                plan.c.0,
                plan.c.0,
                pref.0,
            )
        };
        result.ok().map(|h| h.algo)
    }

    /// `acc [m, np] (row-major) = x [m, kp] · w [np, kp]ᵀ` in INT32, or `Ok(false)` when
    /// cuBLASLt declines the shape (the caller then runs its own kernel).
    ///
    /// # Safety
    /// `x`, `w` and `acc` must hold at least `m·kp`, `np·kp` and `m·np` elements, with `np` and
    /// `kp` multiples of 4 (16 in practice) and 16-byte aligned buffers.
    pub unsafe fn gemm_i32(
        &self,
        x: u64,
        w: u64,
        acc: u64,
        m: usize,
        np: usize,
        kp: usize,
    ) -> Result<bool> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if plans.0.len() >= MAX_PLANS && !plans.0.contains_key(&(m, np, kp)) {
            plans.0.clear();
        }
        let plan = match plans.0.entry((m, np, kp)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Self::plan(m, np, kp)?),
        };
        if let Algo::Untried = plan.algo {
            plan.algo = match self.heuristic(plan) {
                Some(algo) => Algo::Heuristic(algo),
                None => Algo::Default,
            };
        }
        let (alpha, beta) = (1i32, 0i32);
        let (ws, _guard) = self.workspace.device_ptr(&self.stream);
        loop {
            let (algo, ws_ptr, ws_size) = match &plan.algo {
                Algo::Heuristic(a) => (
                    a as *const sys::cublasLtMatmulAlgo_t,
                    ws as *mut c_void,
                    self.workspace.len(),
                ),
                Algo::Default => (std::ptr::null(), std::ptr::null_mut(), 0),
                Algo::Unsupported => return Ok(false),
                Algo::Untried => unreachable!("decided above"),
            };
            // SAFETY: the caller guarantees the buffers; descriptors are alive; alpha and beta
            // are int32 like the scale type.
            let status = unsafe {
                lt::matmul(
                    self.handle,
                    plan.desc.0,
                    (&alpha) as *const i32 as *const c_void,
                    (&beta) as *const i32 as *const c_void,
                    w as *const c_void,
                    plan.a.0,
                    x as *const c_void,
                    plan.b.0,
                    acc as *const c_void,
                    plan.c.0,
                    acc as *mut c_void,
                    plan.c.0,
                    algo,
                    ws_ptr,
                    ws_size,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            match status {
                Ok(()) => return Ok(true),
                Err(_) => {
                    plan.algo = match plan.algo {
                        Algo::Heuristic(_) => Algo::Default,
                        _ => Algo::Unsupported,
                    };
                }
            }
        }
    }
}

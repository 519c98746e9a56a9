//! The GPU-resident operations of [`CudaDevice`]: weight upload, activation quantization, the
//! INT8 GEMM with its epilogue, the batched matmul and the FP16 baseline GEMM.

use super::{cuda_err, padded, CudaDevice, GemmPath, SMALL_M_MAX_ROWS};
use crate::error::{check_len, check_scale, checked_mul, KernelError, Result};
use crate::int8::{check_k, check_out_scale, validate_bmm_shapes, ActScales, BatchedShape};
use crate::WeightScales;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use half::f16;

/// INT8 weights `[n, k]` on the GPU, stored `[np, kp]` (both padded to multiples of 16 with
/// zeros), with one f32 scale per output column and an optional bias.
pub struct DeviceWeights {
    n: usize,
    k: usize,
    np: usize,
    kp: usize,
    w: CudaSlice<i8>,
    col_scales: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceWeights([{} x {}], padded [{} x {}], bias: {})",
            self.n,
            self.k,
            self.np,
            self.kp,
            self.bias.is_some()
        )
    }
}

impl DeviceWeights {
    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Bytes held on the GPU (padded weights, scales, bias).
    pub fn device_bytes(&self) -> usize {
        self.w.len() + 4 * (self.col_scales.len() + self.bias.as_ref().map_or(0, |b| b.len()))
    }
}

/// Quantized activations on the GPU: `q [m, kp]` (rows padded with zeros to the weights'
/// padded K) and their scales, `[m]` per token or `[1]` per tensor.
pub struct DeviceActs {
    m: usize,
    k: usize,
    kp: usize,
    q: CudaSlice<i8>,
    scales: CudaSlice<f32>,
    per_token: bool,
}

impl std::fmt::Debug for DeviceActs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceActs([{} x {}], per {})",
            self.m,
            self.k,
            if self.per_token { "token" } else { "tensor" }
        )
    }
}

impl DeviceActs {
    pub fn m(&self) -> usize {
        self.m
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// The row stride of [`q`](Self::q) (K padded to a multiple of 16).
    pub fn kp(&self) -> usize {
        self.kp
    }
    /// The INT8 values, `[m, kp]`.
    pub fn q(&self) -> &CudaSlice<i8> {
        &self.q
    }
    /// The scales: `m` of them per token, one per tensor.
    pub fn scales(&self) -> &CudaSlice<f32> {
        &self.scales
    }
    pub fn per_token(&self) -> bool {
        self.per_token
    }
}

/// How [`CudaDevice::quantize`] chooses the activation scales.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeviceActQuant {
    /// Dynamic, one scale per row.
    Token,
    /// Dynamic, one scale for the whole input (computed on the GPU, never read back).
    Tensor,
    /// Static per tensor, the calibrated scale (> 0).
    Static(f32),
}

/// Where [`CudaDevice::gemm`] writes `Y [m, n]` (dense, row-major).
pub enum GemmOut<'a> {
    /// The raw INT32 dot products (scales and bias ignored).
    I32(CudaViewMut<'a, i32>),
    /// `((acc · Δx) · Δw) + bias`.
    F32(CudaViewMut<'a, f32>),
    /// The same, rounded to f16.
    F16(CudaViewMut<'a, f16>),
    /// The same, requantized with the static `out_scale` (the O3 path).
    I8 {
        out: CudaViewMut<'a, i8>,
        out_scale: f32,
    },
}

/// A batch of INT8 matrices on the GPU, like [`crate::BatchedI8`].
#[derive(Debug)]
pub struct DeviceBatched<'a> {
    pub data: CudaView<'a, i8>,
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
}

impl DeviceBatched<'_> {
    fn shape(&self) -> BatchedShape {
        BatchedShape {
            len: self.data.len(),
            batch: self.batch,
            rows: self.rows,
            cols: self.cols,
            batch_stride: self.batch_stride,
            row_stride: self.row_stride,
        }
    }
}

/// Output of [`CudaDevice::bmm`], like [`crate::BmmOutput`].
pub enum DeviceBmmOut<'a> {
    I32 {
        data: CudaViewMut<'a, i32>,
        batch_stride: usize,
        row_stride: usize,
    },
    F32 {
        data: CudaViewMut<'a, f32>,
        batch_stride: usize,
        row_stride: usize,
        scale: f32,
    },
}

/// f32 or f16 activations.
pub trait DeviceFloat: cudarc::driver::DeviceRepr + sealed::Sealed {
    #[doc(hidden)]
    fn quantize_kernels(d: &CudaDevice) -> (&CudaFunction, &CudaFunction, &CudaFunction);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl DeviceFloat for f32 {
    fn quantize_kernels(d: &CudaDevice) -> (&CudaFunction, &CudaFunction, &CudaFunction) {
        let f = &d.funcs;
        (&f.quantize_rows_f32, &f.absmax_f32, &f.quantize_tensor_f32)
    }
}

impl DeviceFloat for f16 {
    fn quantize_kernels(d: &CudaDevice) -> (&CudaFunction, &CudaFunction, &CudaFunction) {
        let f = &d.funcs;
        (&f.quantize_rows_f16, &f.absmax_f16, &f.quantize_tensor_f16)
    }
}

const BLOCK: u32 = 256;
/// Largest grid y / z dimension.
const MAX_GRID_YZ: usize = 65_535;

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::ShapeMismatch {
        op,
        detail: format!("{what} = {v} exceeds the GPU kernels' 32-bit range"),
    })
}

fn grid_1d(total: usize, cap: u32) -> u32 {
    (total.div_ceil(BLOCK as usize)).clamp(1, cap as usize) as u32
}

fn launch_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| cuda_err(op, e)
}

/// The device pointer of a buffer, as a kernel argument.
fn ptr<T>(d: &CudaDevice, s: &impl DevicePtr<T>) -> u64 {
    // With event tracking off (one stream), the guard records nothing: the raw pointer stays
    // valid as long as the buffer, which every caller borrows across the launch.
    let (p, _guard) = s.device_ptr(d.stream());
    p
}

fn ptr_mut<T>(d: &CudaDevice, s: &mut impl DevicePtrMut<T>) -> u64 {
    let (p, _guard) = s.device_ptr_mut(d.stream());
    p
}

impl CudaDevice {
    /// Uploads `w_q [n, k]` (row-major) with its scales and bias once, padded for the GEMM.
    pub fn upload_weights(
        &self,
        w_q: &[i8],
        n: usize,
        k: usize,
        scales: &WeightScales,
        bias: Option<&[f32]>,
    ) -> Result<DeviceWeights> {
        const OP: &str = "upload_weights";
        check_k(OP, k)?;
        check_len(
            OP,
            "w_q",
            || format!("[{n}, {k}]"),
            checked_mul(OP, n, k)?,
            w_q.len(),
        )?;
        to_i32(OP, "n", n)?;
        let col_scales = match scales {
            WeightScales::PerChannel(s) => {
                check_len(OP, "weight scales", || format!("[{n}]"), n, s.len())?;
                for &v in s {
                    check_scale(OP, "a weight channel", v)?;
                }
                s.clone()
            }
            WeightScales::PerTensor(s) => {
                check_scale(OP, "the weight tensor", *s)?;
                vec![*s; n]
            }
        };
        if let Some(b) = bias {
            check_len(OP, "bias", || format!("[{n}]"), n, b.len())?;
        }
        let (np, kp) = (padded(n), padded(k));
        let mut padded_w = vec![0i8; checked_mul(OP, np, kp)?];
        if k > 0 {
            for (dst, src) in padded_w.chunks_mut(kp).zip(w_q.chunks(k)) {
                dst[..k].copy_from_slice(src);
            }
        }
        Ok(DeviceWeights {
            n,
            k,
            np,
            kp,
            w: self.upload(&padded_w)?,
            col_scales: self.upload(&col_scales)?,
            bias: bias.map(|b| self.upload(b)).transpose()?,
        })
    }

    /// Uploads host-quantized activations `x_q [m, k]` with their scales.
    pub fn upload_acts(
        &self,
        x_q: &[i8],
        m: usize,
        k: usize,
        scales: ActScales<'_>,
    ) -> Result<DeviceActs> {
        const OP: &str = "upload_acts";
        check_k(OP, k)?;
        check_len(
            OP,
            "x_q",
            || format!("[{m}, {k}]"),
            checked_mul(OP, m, k)?,
            x_q.len(),
        )?;
        let (host_scales, per_token) = match scales {
            ActScales::PerToken(s) => {
                check_len(OP, "x_scales", || format!("[{m}]"), m, s.len())?;
                for &v in s {
                    check_scale(OP, "an activation row", v)?;
                }
                (s.to_vec(), true)
            }
            ActScales::PerTensor(s) => {
                check_scale(OP, "the activation tensor", s)?;
                (vec![s], false)
            }
        };
        let kp = padded(k);
        let mut q = vec![0i8; checked_mul(OP, m, kp)?];
        if k > 0 {
            for (dst, src) in q.chunks_mut(kp).zip(x_q.chunks(k)) {
                dst[..k].copy_from_slice(src);
            }
        }
        Ok(DeviceActs {
            m,
            k,
            kp,
            q: self.upload(&q)?,
            scales: self.upload(&host_scales)?,
            per_token,
        })
    }

    /// Quantizes `x [m, k]` (row-major f32 or f16 on the GPU) to INT8, bit-identical to
    /// [`crate::quantize_per_token`] / [`crate::quantize_per_token_smoothed`] (with `factor`,
    /// per token only), [`crate::quantize_per_tensor`] and [`crate::quantize_static`] applied
    /// to the same f32 values. A row (or tensor) holding an infinite value gets an infinite
    /// scale, where the CPU functions return an error.
    pub fn quantize<T: DeviceFloat>(
        &self,
        x: &impl DevicePtr<T>,
        m: usize,
        k: usize,
        how: DeviceActQuant,
        factor: Option<&CudaSlice<f32>>,
    ) -> Result<DeviceActs> {
        const OP: &str = "quantize (cuda)";
        check_k(OP, k)?;
        let len = checked_mul(OP, m, k)?;
        if x.len() < len {
            return Err(KernelError::BadLength {
                op: OP,
                operand: "x",
                shape: format!("[{m}, {k}]"),
                expected: len,
                actual: x.len(),
            });
        }
        if let Some(f) = factor {
            if how != DeviceActQuant::Token {
                return Err(KernelError::ShapeMismatch {
                    op: OP,
                    detail: "a smoothing factor is fused only into per-token quantization".into(),
                });
            }
            check_len(OP, "factor", || format!("[{k}]"), k, f.len())?;
        }
        let m32 = to_i32(OP, "m", m)?;
        let k32 = to_i32(OP, "k", k)?;
        let kp = padded(k);
        let total = checked_mul(OP, m, kp)?;
        // SAFETY: every element (padding included) is written by the kernels below.
        let mut q: CudaSlice<i8> =
            unsafe { self.stream().alloc(total.max(1)) }.map_err(launch_err(OP))?;
        let (rows_fn, absmax_fn, tensor_fn) = T::quantize_kernels(self);
        let (ldx, ldq) = (k as i64, kp as i64);
        let x_ptr = ptr(self, x);
        let q_ptr = ptr_mut(self, &mut q);
        let per_token = how == DeviceActQuant::Token;
        let mut scales: CudaSlice<f32> = self.zeros(if per_token { m.max(1) } else { 1 })?;
        let s_ptr = ptr_mut(self, &mut scales);
        if m == 0 {
            return Ok(DeviceActs {
                m,
                k,
                kp,
                q,
                scales,
                per_token,
            });
        }
        match how {
            DeviceActQuant::Token => {
                let f_ptr = factor.map_or(0u64, |f| ptr(self, f));
                let cfg = LaunchConfig {
                    grid_dim: (m32 as u32, 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: x holds m·k elements, q m·kp, scales m; factor k (checked above).
                unsafe {
                    self.stream()
                        .launch_builder(rows_fn)
                        .arg(&x_ptr)
                        .arg(&ldx)
                        .arg(&k32)
                        .arg(&f_ptr)
                        .arg(&q_ptr)
                        .arg(&ldq)
                        .arg(&s_ptr)
                        .launch(cfg)
                }
                .map_err(launch_err(OP))?;
            }
            DeviceActQuant::Tensor | DeviceActQuant::Static(_) => {
                let mut bits: CudaSlice<u32> = self.zeros(1)?;
                let bits_ptr = ptr_mut(self, &mut bits);
                let (amax_arg, inv) = match how {
                    DeviceActQuant::Static(scale) => {
                        if !(scale.is_finite() && scale > 0.0) {
                            return Err(KernelError::InvalidScale {
                                op: OP,
                                what: "the static activation scale (must be positive)",
                                value: scale,
                            });
                        }
                        (0u64, 1.0f32 / scale)
                    }
                    _ => {
                        let cfg = LaunchConfig {
                            grid_dim: (grid_1d(len, 1024), 1, 1),
                            block_dim: (BLOCK, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: x holds m·k elements; bits one u32.
                        unsafe {
                            self.stream()
                                .launch_builder(absmax_fn)
                                .arg(&x_ptr)
                                .arg(&ldx)
                                .arg(&m32)
                                .arg(&k32)
                                .arg(&bits_ptr)
                                .launch(cfg)
                        }
                        .map_err(launch_err(OP))?;
                        (bits_ptr, 0.0f32)
                    }
                };
                let cfg = LaunchConfig {
                    grid_dim: (grid_1d(total, 4096), 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: x holds m·k elements, q m·kp, scales one; amax_arg null or one u32.
                unsafe {
                    self.stream()
                        .launch_builder(tensor_fn)
                        .arg(&x_ptr)
                        .arg(&ldx)
                        .arg(&m32)
                        .arg(&k32)
                        .arg(&amax_arg)
                        .arg(&inv)
                        .arg(&q_ptr)
                        .arg(&ldq)
                        .arg(&s_ptr)
                        .launch(cfg)
                }
                .map_err(launch_err(OP))?;
                if let DeviceActQuant::Static(scale) = how {
                    self.stream()
                        .memcpy_htod(&[scale], &mut scales)
                        .map_err(launch_err(OP))?;
                }
                // `bits` is freed in stream order, after the kernels that read it.
                drop(bits);
            }
        }
        Ok(DeviceActs {
            m,
            k,
            kp,
            q,
            scales,
            per_token,
        })
    }

    /// `Y [m, n] = X · Wᵀ` on the GPU, then the epilogue `out` asks for: exact INT32
    /// accumulation, and f32 / INT8 outputs bit-identical to the CPU backends'.
    pub fn gemm(&self, x: &DeviceActs, w: &DeviceWeights, out: GemmOut<'_>) -> Result<()> {
        self.gemm_with(x, w, out, GemmPath::Auto)
    }

    /// [`gemm`](Self::gemm) with the INT32 product computed on `path`.
    pub fn gemm_with(
        &self,
        x: &DeviceActs,
        w: &DeviceWeights,
        out: GemmOut<'_>,
        path: GemmPath,
    ) -> Result<()> {
        const OP: &str = "gemm (cuda)";
        if x.k != w.k {
            return Err(KernelError::ShapeMismatch {
                op: OP,
                detail: format!(
                    "activations are [{}, {}] but the weights are [{}, {}]",
                    x.m, x.k, w.n, w.k
                ),
            });
        }
        let (m, n, np, kp) = (x.m, w.n, w.np, w.kp);
        debug_assert_eq!(x.kp, kp, "both padded the same K");
        let need = checked_mul(OP, m, n)?;
        let out_len = match &out {
            GemmOut::I32(o) => o.len(),
            GemmOut::F32(o) => o.len(),
            GemmOut::F16(o) => o.len(),
            GemmOut::I8 { out, .. } => out.len(),
        };
        if out_len < need {
            return Err(KernelError::BadLength {
                op: OP,
                operand: "out",
                shape: format!("[{m}, {n}]"),
                expected: need,
                actual: out_len,
            });
        }
        let inv_out = match &out {
            GemmOut::I8 { out_scale, .. } => check_out_scale(OP, *out_scale)?,
            _ => 0.0,
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let acc = self.product(x, w, path)?;
        let (m32, n32) = (to_i32(OP, "m", m)?, to_i32(OP, "n", n)?);
        self.epilogue(OP, &acc, np, m32, n32, x, w, out, inv_out)
    }

    /// The INT32 products `acc [m, np]` (row-major, row stride the padded N; columns `n..np`
    /// are not meaningful) on `path`.
    pub(crate) fn product(
        &self,
        x: &DeviceActs,
        w: &DeviceWeights,
        path: GemmPath,
    ) -> Result<CudaSlice<i32>> {
        const OP: &str = "gemm (cuda)";
        self.bind(OP)?;
        let (m, n, np, kp) = (x.m, w.n, w.np, w.kp);
        let m32 = to_i32(OP, "m", m)?;
        let n32 = to_i32(OP, "n", n)?;
        let kp32 = to_i32(OP, "padded k", kp)?;
        let acc_len = checked_mul(OP, m, np)?.max(1);
        // SAFETY: each path writes every element of acc[m, np] that the epilogue reads
        // (columns < n; the others are never read).
        let mut acc: CudaSlice<i32> =
            unsafe { self.stream().alloc(acc_len) }.map_err(launch_err(OP))?;
        let acc_ptr = ptr_mut(self, &mut acc);
        let x_ptr = ptr(self, &x.q);
        let w_ptr = ptr(self, &w.w);
        let forced = path != GemmPath::Auto;
        let path = match path {
            GemmPath::Auto if m <= SMALL_M_MAX_ROWS => GemmPath::SmallM,
            GemmPath::Auto => GemmPath::CublasLt,
            forced => forced,
        };
        let tiled = match path {
            GemmPath::SmallM => {
                let blocks_y = m.div_ceil(8);
                if blocks_y > MAX_GRID_YZ {
                    return Err(KernelError::ShapeMismatch {
                        op: OP,
                        detail: format!("m = {m} is too many rows for the small-m kernel"),
                    });
                }
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(4) as u32, blocks_y as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (ld, ldacc) = (kp as i64, np as i64);
                // SAFETY: x is [m, kp], w [np, kp], acc [m, np], rows 16-byte aligned (kp is
                // a multiple of 16 and allocations are 256-byte aligned).
                unsafe {
                    self.stream()
                        .launch_builder(&self.funcs.gemm_small_m)
                        .arg(&x_ptr)
                        .arg(&ld)
                        .arg(&w_ptr)
                        .arg(&ld)
                        .arg(&m32)
                        .arg(&n32)
                        .arg(&kp32)
                        .arg(&acc_ptr)
                        .arg(&ldacc)
                        .launch(cfg)
                }
                .map_err(launch_err(OP))?;
                false
            }
            GemmPath::CublasLt => {
                // SAFETY: x is [m, kp], w [np, kp], acc [m, np]; np, kp multiples of 16.
                let done = unsafe { self.lt.gemm_i32(x_ptr, w_ptr, acc_ptr, m, np, kp) }?;
                if !done && forced {
                    return Err(KernelError::Cuda {
                        op: OP,
                        detail: format!(
                            "cuBLASLt has no INT8 kernel for m = {m}, n = {np}, k = {kp} on this GPU"
                        ),
                    });
                }
                !done
            }
            GemmPath::Tiled | GemmPath::Auto => true,
        };
        if tiled {
            self.launch_bmm(
                OP,
                x_ptr,
                (0, kp),
                w_ptr,
                (0, kp),
                true,
                (1, m, n, kp),
                BmmDst::I32(acc_ptr),
                (0, np),
            )?;
        }
        Ok(acc)
    }

    #[allow(clippy::too_many_arguments)]
    fn epilogue(
        &self,
        op: &'static str,
        acc: &CudaSlice<i32>,
        ldacc: usize,
        m: i32,
        n: i32,
        x: &DeviceActs,
        w: &DeviceWeights,
        out: GemmOut<'_>,
        inv_out: f32,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (
                (n as u32).div_ceil(BLOCK),
                (m as usize).min(MAX_GRID_YZ) as u32,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let acc_ptr = ptr(self, acc);
        let ldacc = ldacc as i64;
        let ldo = n as i64;
        let xs = ptr(self, &x.scales);
        let xs_stride: i32 = if x.per_token { 1 } else { 0 };
        let ws = ptr(self, &w.col_scales);
        let bias = w.bias.as_ref().map_or(0u64, |b| ptr(self, b));
        let f = &self.funcs;
        // SAFETY (all four): acc is [m, ldacc], out holds m·n elements (checked by `gemm`),
        // xs m (per token) or 1, ws and bias n.
        let result = match out {
            GemmOut::I32(mut o) => {
                let o = ptr_mut(self, &mut o);
                unsafe {
                    self.stream()
                        .launch_builder(&f.epilogue_i32)
                        .arg(&acc_ptr)
                        .arg(&ldacc)
                        .arg(&m)
                        .arg(&n)
                        .arg(&o)
                        .arg(&ldo)
                        .launch(cfg)
                }
            }
            GemmOut::F32(mut o) => {
                let o = ptr_mut(self, &mut o);
                unsafe {
                    self.stream()
                        .launch_builder(&f.epilogue_f32)
                        .arg(&acc_ptr)
                        .arg(&ldacc)
                        .arg(&m)
                        .arg(&n)
                        .arg(&xs)
                        .arg(&xs_stride)
                        .arg(&ws)
                        .arg(&bias)
                        .arg(&o)
                        .arg(&ldo)
                        .launch(cfg)
                }
            }
            GemmOut::F16(mut o) => {
                let o = ptr_mut(self, &mut o);
                unsafe {
                    self.stream()
                        .launch_builder(&f.epilogue_f16)
                        .arg(&acc_ptr)
                        .arg(&ldacc)
                        .arg(&m)
                        .arg(&n)
                        .arg(&xs)
                        .arg(&xs_stride)
                        .arg(&ws)
                        .arg(&bias)
                        .arg(&o)
                        .arg(&ldo)
                        .launch(cfg)
                }
            }
            GemmOut::I8 { mut out, .. } => {
                let o = ptr_mut(self, &mut out);
                unsafe {
                    self.stream()
                        .launch_builder(&f.epilogue_i8)
                        .arg(&acc_ptr)
                        .arg(&ldacc)
                        .arg(&m)
                        .arg(&n)
                        .arg(&xs)
                        .arg(&xs_stride)
                        .arg(&ws)
                        .arg(&bias)
                        .arg(&inv_out)
                        .arg(&o)
                        .arg(&ldo)
                        .launch(cfg)
                }
            }
        };
        result.map(|_| ()).map_err(launch_err(op))
    }

    /// Batched `C[b] = A[b] · op(B[b])` on the GPU, like [`crate::Int8Gemm::bmm`]: `op(B) = Bᵀ`
    /// when `b_transposed` (B is `[batch, n, k]`, e.g. Q·Kᵀ), else B is `[batch, k, n]`.
    pub fn bmm(
        &self,
        a: DeviceBatched<'_>,
        b: DeviceBatched<'_>,
        b_transposed: bool,
        out: DeviceBmmOut<'_>,
    ) -> Result<()> {
        const OP: &str = "bmm (cuda)";
        let (out_len, obs, ors, scale) = match &out {
            DeviceBmmOut::I32 {
                data,
                batch_stride,
                row_stride,
            } => (data.len(), *batch_stride, *row_stride, None),
            DeviceBmmOut::F32 {
                data,
                batch_stride,
                row_stride,
                scale,
            } => (data.len(), *batch_stride, *row_stride, Some(*scale)),
        };
        let s = validate_bmm_shapes(
            OP,
            &a.shape(),
            &b.shape(),
            b_transposed,
            (out_len, obs, ors),
            scale,
        )?;
        if s.batch == 0 || s.m == 0 || s.n == 0 {
            return Ok(());
        }
        let a_ptr = ptr(self, &a.data);
        let b_ptr = ptr(self, &b.data);
        let dst = match out {
            DeviceBmmOut::I32 { mut data, .. } => BmmDst::I32(ptr_mut(self, &mut data)),
            DeviceBmmOut::F32 {
                mut data, scale, ..
            } => BmmDst::F32(ptr_mut(self, &mut data), scale),
        };
        self.launch_bmm(
            OP,
            a_ptr,
            (a.batch_stride, a.row_stride),
            b_ptr,
            (b.batch_stride, b.row_stride),
            b_transposed,
            (s.batch, s.m, s.n, s.k),
            dst,
            (obs, ors),
        )
    }

    /// Launches `sq_bmm_tiled`; strides are `(batch, row)` in elements, `dims` is
    /// `(batch, m, n, k)`.
    #[allow(clippy::too_many_arguments)]
    fn launch_bmm(
        &self,
        op: &'static str,
        a: u64,
        a_strides: (usize, usize),
        b: u64,
        b_strides: (usize, usize),
        b_transposed: bool,
        dims: (usize, usize, usize, usize),
        dst: BmmDst,
        out_strides: (usize, usize),
    ) -> Result<()> {
        let (batch, m, n, k) = dims;
        let tiles_m = m.div_ceil(64);
        if tiles_m > MAX_GRID_YZ {
            return Err(KernelError::ShapeMismatch {
                op,
                detail: format!("m = {m} is too many rows for the tiled kernel"),
            });
        }
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(64) as u32,
                tiles_m as u32,
                batch.min(MAX_GRID_YZ) as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let l = |v: usize| v as i64;
        let (a_bs, a_rs) = (l(a_strides.0), l(a_strides.1));
        let (b_bs, b_rs) = (l(b_strides.0), l(b_strides.1));
        let (o_bs, o_rs) = (l(out_strides.0), l(out_strides.1));
        let bt: i32 = b_transposed.into();
        let (batch, m, n, k) = (
            to_i32(op, "batch", batch)?,
            to_i32(op, "m", m)?,
            to_i32(op, "n", n)?,
            to_i32(op, "k", k)?,
        );
        let (o32, of32, scale) = match dst {
            BmmDst::I32(p) => (p, 0u64, 0.0f32),
            BmmDst::F32(p, s) => (0u64, p, s),
        };
        // SAFETY: the callers validated that every addressed element is inside its buffer.
        unsafe {
            self.stream()
                .launch_builder(&self.funcs.bmm_tiled)
                .arg(&a)
                .arg(&a_bs)
                .arg(&a_rs)
                .arg(&b)
                .arg(&b_bs)
                .arg(&b_rs)
                .arg(&bt)
                .arg(&batch)
                .arg(&m)
                .arg(&n)
                .arg(&k)
                .arg(&o32)
                .arg(&of32)
                .arg(&scale)
                .arg(&o_bs)
                .arg(&o_rs)
                .launch(cfg)
        }
        .map(|_| ())
        .map_err(launch_err(op))
    }

    /// The FP16 baseline: `y [m, n] = x [m, k] · w [n, k]ᵀ` with cuBLAS (tensor cores, FP32
    /// accumulation), all row-major f16 on the GPU.
    pub fn hgemm(
        &self,
        x: &impl DevicePtr<f16>,
        m: usize,
        w: &impl DevicePtr<f16>,
        n: usize,
        k: usize,
        y: &mut impl DevicePtrMut<f16>,
    ) -> Result<()> {
        use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
        const OP: &str = "hgemm (cuda)";
        self.bind(OP)?;
        for (operand, len, need) in [
            ("x", x.len(), checked_mul(OP, m, k)?),
            ("w", w.len(), checked_mul(OP, n, k)?),
            ("y", y.len(), checked_mul(OP, m, n)?),
        ] {
            if len < need {
                return Err(KernelError::BadLength {
                    op: OP,
                    operand,
                    shape: format!("m = {m}, n = {n}, k = {k}"),
                    expected: need,
                    actual: len,
                });
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "n", n)?,
            n: to_i32(OP, "m", m)?,
            k: to_i32(OP, "k", k)?,
            alpha: f16::ONE,
            lda: to_i32(OP, "k", k.max(1))?,
            ldb: to_i32(OP, "k", k.max(1))?,
            beta: f16::ZERO,
            ldc: to_i32(OP, "n", n)?,
        };
        // SAFETY: lengths checked above; Yᵀ = W·Xᵀ in column-major terms.
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(|e| cuda_err(OP, e))
    }
}

enum BmmDst {
    I32(u64),
    F32(u64, f32),
}

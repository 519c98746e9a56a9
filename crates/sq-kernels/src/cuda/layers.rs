//! The decoder building blocks on the GPU (f32 activations, row-major), for the model forward:
//! embeddings, norms, rotary embeddings, causal attention over a KV cache, activations, residual
//! adds, and the FP GEMMs of full-precision Linears (cuBLAS: f16 weights with FP32 accumulation,
//! or f32). Every call checks its buffers' lengths against the shape it is given.

use super::{cuda_err, CudaDevice};
use crate::error::{checked_mul, KernelError, Result};
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg,
};
use half::f16;

/// The MLP activation, as the kernels number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuActivation {
    Silu,
    Relu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// GELU, erf form.
    Gelu,
}

impl GpuActivation {
    fn code(self) -> i32 {
        match self {
            GpuActivation::Silu => 0,
            GpuActivation::Relu => 1,
            GpuActivation::GeluTanh => 2,
            GpuActivation::Gelu => 3,
        }
    }
}

/// The shape of one [`CudaDevice::attention`] call (see sq-model's `AttentionShape`).
#[derive(Clone, Copy, Debug)]
pub struct GpuAttention {
    /// Query rows, at positions `pos0..pos0 + rows`.
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub pos0: usize,
    pub scale: f32,
    pub sliding_window: Option<usize>,
}

/// Largest head dimension the attention kernel holds in registers.
pub const MAX_HEAD_DIM: usize = 256;

/// The kernels of `layers.cu`.
#[derive(Debug)]
pub(crate) struct LayerFunctions {
    embed: CudaFunction,
    add_table_rows: CudaFunction,
    norm: CudaFunction,
    rope: CudaFunction,
    attention: CudaFunction,
    activate: CudaFunction,
    add: CudaFunction,
    scale: CudaFunction,
    add_bias: CudaFunction,
    to_f16: CudaFunction,
    split_qkv: CudaFunction,
}

impl LayerFunctions {
    pub(crate) fn load(
        f: &impl Fn(&'static str) -> Result<CudaFunction>,
    ) -> Result<LayerFunctions> {
        Ok(LayerFunctions {
            embed: f("sq_embed")?,
            add_table_rows: f("sq_add_table_rows")?,
            norm: f("sq_norm")?,
            rope: f("sq_rope")?,
            attention: f("sq_attention")?,
            activate: f("sq_activate")?,
            add: f("sq_add")?,
            scale: f("sq_scale")?,
            add_bias: f("sq_add_bias")?,
            to_f16: f("sq_to_f16")?,
            split_qkv: f("sq_split_qkv")?,
        })
    }
}

const BLOCK: u32 = 256;

fn need(op: &'static str, operand: &'static str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(KernelError::BadLength {
            op,
            operand,
            shape: format!("{want} elements"),
            expected: want,
            actual: have,
        });
    }
    Ok(())
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::ShapeMismatch {
        op,
        detail: format!("{what} = {v} exceeds the GPU kernels' 32-bit range"),
    })
}

fn rows_grid(op: &'static str, rows: usize, y: usize) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize || y > 65_535 {
        return Err(KernelError::ShapeMismatch {
            op,
            detail: format!("{rows} rows x {y} is too large a grid"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, y as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn flat_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 8192) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn ptr<T>(d: &CudaDevice, s: &impl DevicePtr<T>) -> u64 {
    s.device_ptr(d.stream()).0
}

fn ptr_mut<T>(d: &CudaDevice, s: &mut impl DevicePtrMut<T>) -> u64 {
    s.device_ptr_mut(d.stream()).0
}

impl CudaDevice {
    fn layer_fns(&self) -> &LayerFunctions {
        &self.funcs.layers
    }

    fn go(&self, op: &'static str, mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
        // SAFETY: every caller checked the lengths of the buffers its kernel addresses.
        unsafe { args.launch(cfg) }
            .map(drop)
            .map_err(|e| cuda_err(op, e))
    }

    /// `out [t, dim] = table [vocab, dim]` rows `tokens [t]` (ids checked by the caller).
    pub fn embed(
        &self,
        table: &impl DevicePtr<f32>,
        dim: usize,
        tokens: &impl DevicePtr<u32>,
        t: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "embed (cuda)";
        need(OP, "tokens", tokens.len(), t)?;
        need(OP, "out", out.len(), checked_mul(OP, t, dim)?)?;
        if t == 0 || dim == 0 {
            return Ok(());
        }
        let (tab, tok, o) = (ptr(self, table), ptr(self, tokens), ptr_mut(self, out));
        let dim32 = to_i32(OP, "dim", dim)?;
        let mut args = self.stream().launch_builder(&self.layer_fns().embed);
        args.arg(&tab).arg(&tok).arg(&dim32).arg(&o);
        self.go(OP, args, rows_grid(OP, t, 1)?)
    }

    /// `x [t, dim] += table rows row0..row0 + t` (learned positions).
    pub fn add_table_rows(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        t: usize,
        dim: usize,
        table: &impl DevicePtr<f32>,
        row0: usize,
    ) -> Result<()> {
        const OP: &str = "add_table_rows (cuda)";
        need(OP, "x", x.len(), checked_mul(OP, t, dim)?)?;
        need(OP, "table", table.len(), checked_mul(OP, row0 + t, dim)?)?;
        if t == 0 || dim == 0 {
            return Ok(());
        }
        let (xp, tab) = (ptr_mut(self, x), ptr(self, table));
        let (dim32, row0) = (to_i32(OP, "dim", dim)?, row0 as i64);
        let mut args = self
            .stream()
            .launch_builder(&self.layer_fns().add_table_rows);
        args.arg(&xp).arg(&tab).arg(&dim32).arg(&row0);
        self.go(OP, args, rows_grid(OP, t, 1)?)
    }

    /// RMSNorm (`layer_norm == false`) or LayerNorm of each row of `x [rows, dim]` into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn norm(
        &self,
        x: &impl DevicePtr<f32>,
        rows: usize,
        dim: usize,
        weight: &impl DevicePtr<f32>,
        bias: Option<&CudaSlice<f32>>,
        eps: f32,
        layer_norm: bool,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "norm (cuda)";
        let len = checked_mul(OP, rows, dim)?;
        need(OP, "x", x.len(), len)?;
        need(OP, "out", out.len(), len)?;
        need(OP, "weight", weight.len(), dim)?;
        if let Some(b) = bias {
            need(OP, "bias", b.len(), dim)?;
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let (xp, wp, op) = (ptr(self, x), ptr(self, weight), ptr_mut(self, out));
        let bp = bias.map_or(0u64, |b| ptr(self, b));
        let (dim32, ln) = (to_i32(OP, "dim", dim)?, i32::from(layer_norm));
        let mut args = self.stream().launch_builder(&self.layer_fns().norm);
        args.arg(&xp)
            .arg(&dim32)
            .arg(&wp)
            .arg(&bp)
            .arg(&eps)
            .arg(&ln)
            .arg(&op);
        self.go(OP, args, rows_grid(OP, rows, 1)?)
    }

    /// Rotary embedding in place on `x [rows, heads * head_dim]`, row `r` at `pos0 + r`, with
    /// `inv_freq [head_dim / 2]`.
    pub fn rope(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        pos0: usize,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        const OP: &str = "rope (cuda)";
        need(OP, "x", x.len(), checked_mul(OP, rows, heads * head_dim)?)?;
        need(OP, "inv_freq", inv_freq.len(), head_dim / 2)?;
        if rows == 0 || heads == 0 || head_dim < 2 {
            return Ok(());
        }
        let (xp, fp) = (ptr_mut(self, x), ptr(self, inv_freq));
        let (h32, hd32, pos0) = (
            to_i32(OP, "heads", heads)?,
            to_i32(OP, "head_dim", head_dim)?,
            pos0 as i64,
        );
        let mut cfg = rows_grid(OP, rows, heads)?;
        cfg.block_dim = (
            ((head_dim / 2).clamp(32, 256) as u32).next_multiple_of(32),
            1,
            1,
        );
        let mut args = self.stream().launch_builder(&self.layer_fns().rope);
        args.arg(&xp).arg(&h32).arg(&hd32).arg(&pos0).arg(&fp);
        self.go(OP, args, cfg)
    }

    /// Causal attention of `q [rows, heads * head_dim]` over `keys` / `values`
    /// (`[positions, kv_heads * head_dim]`, positions `0..pos0 + rows` filled) into `out`
    /// (like `q`). `alibi` gives one slope per head (BLOOM).
    pub fn attention(
        &self,
        q: &impl DevicePtr<f32>,
        keys: &impl DevicePtr<f32>,
        values: &impl DevicePtr<f32>,
        shape: &GpuAttention,
        alibi: Option<&CudaSlice<f32>>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "attention (cuda)";
        let s = *shape;
        if s.head_dim > MAX_HEAD_DIM || s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            return Err(KernelError::ShapeMismatch {
                op: OP,
                detail: format!(
                    "{} heads of dimension {} over {} KV heads: need head_dim <= {MAX_HEAD_DIM} and heads a multiple of KV heads",
                    s.heads, s.head_dim, s.kv_heads
                ),
            });
        }
        let q_len = checked_mul(OP, s.rows, s.heads * s.head_dim)?;
        let kv_len = checked_mul(OP, s.pos0 + s.rows, s.kv_heads * s.head_dim)?;
        need(OP, "q", q.len(), q_len)?;
        need(OP, "out", out.len(), q_len)?;
        need(OP, "keys", keys.len(), kv_len)?;
        need(OP, "values", values.len(), kv_len)?;
        if let Some(a) = alibi {
            need(OP, "alibi slopes", a.len(), s.heads)?;
        }
        if s.rows == 0 || s.heads == 0 {
            return Ok(());
        }
        let (qp, kp, vp, op) = (
            ptr(self, q),
            ptr(self, keys),
            ptr(self, values),
            ptr_mut(self, out),
        );
        let ap = alibi.map_or(0u64, |a| ptr(self, a));
        let (h32, kvh32, hd32) = (
            to_i32(OP, "heads", s.heads)?,
            to_i32(OP, "kv_heads", s.kv_heads)?,
            to_i32(OP, "head_dim", s.head_dim)?,
        );
        let (pos0, window) = (s.pos0 as i64, s.sliding_window.unwrap_or(0) as i64);
        let mut cfg = rows_grid(OP, s.rows, s.heads)?;
        cfg.block_dim = (128, 1, 1);
        let mut args = self.stream().launch_builder(&self.layer_fns().attention);
        args.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&h32)
            .arg(&kvh32)
            .arg(&hd32)
            .arg(&pos0)
            .arg(&s.scale)
            .arg(&window)
            .arg(&ap)
            .arg(&op);
        self.go(OP, args, cfg)
    }

    /// `a = act(a)`, times `u` when given (gated MLP), over `n` elements.
    pub fn activate(
        &self,
        a: &mut impl DevicePtrMut<f32>,
        u: Option<&CudaSlice<f32>>,
        n: usize,
        act: GpuActivation,
    ) -> Result<()> {
        const OP: &str = "activate (cuda)";
        need(OP, "a", a.len(), n)?;
        if let Some(u) = u {
            need(OP, "u", u.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let (ap, up) = (ptr_mut(self, a), u.map_or(0u64, |u| ptr(self, u)));
        let (n64, kind) = (n as i64, act.code());
        let mut args = self.stream().launch_builder(&self.layer_fns().activate);
        args.arg(&ap).arg(&up).arg(&n64).arg(&kind);
        self.go(OP, args, flat_grid(n))
    }

    /// `x += y` over `n` elements.
    pub fn add_assign(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        y: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "add (cuda)";
        need(OP, "x", x.len(), n)?;
        need(OP, "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp) = (ptr_mut(self, x), ptr(self, y));
        let n64 = n as i64;
        let mut args = self.stream().launch_builder(&self.layer_fns().add);
        args.arg(&xp).arg(&xp).arg(&yp).arg(&n64);
        self.go(OP, args, flat_grid(n))
    }

    /// `out = a + b` over `n` elements.
    pub fn add_into(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "add (cuda)";
        need(OP, "out", out.len(), n)?;
        need(OP, "a", a.len(), n)?;
        need(OP, "b", b.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (op, ap, bp) = (ptr_mut(self, out), ptr(self, a), ptr(self, b));
        let n64 = n as i64;
        let mut args = self.stream().launch_builder(&self.layer_fns().add);
        args.arg(&op).arg(&ap).arg(&bp).arg(&n64);
        self.go(OP, args, flat_grid(n))
    }

    /// `x *= s` over `n` elements.
    pub fn scale(&self, x: &mut impl DevicePtrMut<f32>, n: usize, s: f32) -> Result<()> {
        const OP: &str = "scale (cuda)";
        need(OP, "x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, n64) = (ptr_mut(self, x), n as i64);
        let mut args = self.stream().launch_builder(&self.layer_fns().scale);
        args.arg(&xp).arg(&n64).arg(&s);
        self.go(OP, args, flat_grid(n))
    }

    /// `y [rows, n] += bias [n]` on every row.
    pub fn add_bias(
        &self,
        y: &mut impl DevicePtrMut<f32>,
        rows: usize,
        n: usize,
        bias: &impl DevicePtr<f32>,
    ) -> Result<()> {
        const OP: &str = "add_bias (cuda)";
        let len = checked_mul(OP, rows, n)?;
        need(OP, "y", y.len(), len)?;
        need(OP, "bias", bias.len(), n)?;
        if len == 0 {
            return Ok(());
        }
        let (yp, bp) = (ptr_mut(self, y), ptr(self, bias));
        let (rows64, n32) = (rows as i64, to_i32(OP, "n", n)?);
        let mut args = self.stream().launch_builder(&self.layer_fns().add_bias);
        args.arg(&yp).arg(&bp).arg(&rows64).arg(&n32);
        self.go(OP, args, flat_grid(len))
    }

    /// `y = x` rounded to f16 (nearest even), `n` elements.
    pub fn to_f16(
        &self,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f16>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "to_f16 (cuda)";
        need(OP, "x", x.len(), n)?;
        need(OP, "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp, n64) = (ptr(self, x), ptr_mut(self, y), n as i64);
        let mut args = self.stream().launch_builder(&self.layer_fns().to_f16);
        args.arg(&xp).arg(&yp).arg(&n64);
        self.go(OP, args, flat_grid(n))
    }

    /// BLOOM's fused QKV `[rows, heads * 3 * head_dim]` (per head `[q, k, v]`) into `q`, `k`,
    /// `v` (`[rows, heads * head_dim]` each).
    #[allow(clippy::too_many_arguments)]
    pub fn split_qkv(
        &self,
        fused: &impl DevicePtr<f32>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        q: &mut impl DevicePtrMut<f32>,
        k: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "split_qkv (cuda)";
        let part = checked_mul(OP, rows, heads * head_dim)?;
        need(OP, "fused", fused.len(), 3 * part)?;
        for (name, len) in [("q", q.len()), ("k", k.len()), ("v", v.len())] {
            need(OP, name, len, part)?;
        }
        if part == 0 {
            return Ok(());
        }
        let (fp, qp, kp, vp) = (
            ptr(self, fused),
            ptr_mut(self, q),
            ptr_mut(self, k),
            ptr_mut(self, v),
        );
        let (h32, hd32) = (
            to_i32(OP, "heads", heads)?,
            to_i32(OP, "head_dim", head_dim)?,
        );
        let mut args = self.stream().launch_builder(&self.layer_fns().split_qkv);
        args.arg(&fp)
            .arg(&h32)
            .arg(&hd32)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp);
        self.go(OP, args, rows_grid(OP, rows, heads)?)
    }

    /// Copies `len` elements of `src` starting at `src_offset` to `dst` at `dst_offset`.
    pub fn copy<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        src_offset: usize,
        dst: &mut CudaSlice<T>,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        const OP: &str = "copy (cuda)";
        need(OP, "src", src.len(), src_offset + len)?;
        need(OP, "dst", dst.len(), dst_offset + len)?;
        if len == 0 {
            return Ok(());
        }
        let s = src.slice(src_offset..src_offset + len);
        let mut d = dst.slice_mut(dst_offset..dst_offset + len);
        self.stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| cuda_err(OP, e))
    }

    /// `y [m, n] (f32) = x [m, k] · w [n, k]ᵀ` with f16 operands and FP32 accumulation
    /// (cuBLAS `GemmEx`, tensor cores): the FP16 Linear of the GPU model.
    #[allow(clippy::too_many_arguments)]
    pub fn hgemm_f32_out(
        &self,
        x: &impl DevicePtr<f16>,
        m: usize,
        w: &impl DevicePtr<f16>,
        n: usize,
        k: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        const OP: &str = "hgemm (cuda)";
        need(OP, "x", x.len(), checked_mul(OP, m, k)?)?;
        need(OP, "w", w.len(), checked_mul(OP, n, k)?)?;
        need(OP, "y", y.len(), checked_mul(OP, m, n)?)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        self.bind(OP)?;
        let (xp, wp, yp) = (ptr(self, x), ptr(self, w), ptr_mut(self, y));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (m32, n32, k32) = (
            to_i32(OP, "m", m)?,
            to_i32(OP, "n", n)?,
            to_i32(OP, "k", k)?,
        );
        let ld = k32.max(1);
        // SAFETY: lengths checked above; column-major Yᵀ [n, m] = Wᵀᵀ · Xᵀ.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n32,
                m32,
                k32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cudaDataType_t::CUDA_R_16F,
                ld,
                xp as *const _,
                cudaDataType_t::CUDA_R_16F,
                ld,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                n32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err(OP, e))
    }

    /// `y [m, n] = x [m, k] · w [n, k]ᵀ` in f32 (cuBLAS SGEMM, no TF32): the FP32 Linear of the
    /// GPU model, used to check the GPU forward against the CPU closely.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        x: &impl DevicePtr<f32>,
        m: usize,
        w: &impl DevicePtr<f32>,
        n: usize,
        k: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
        const OP: &str = "sgemm (cuda)";
        need(OP, "x", x.len(), checked_mul(OP, m, k)?)?;
        need(OP, "w", w.len(), checked_mul(OP, n, k)?)?;
        need(OP, "y", y.len(), checked_mul(OP, m, n)?)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        self.bind(OP)?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "n", n)?,
            n: to_i32(OP, "m", m)?,
            k: to_i32(OP, "k", k)?,
            alpha: 1.0f32,
            lda: to_i32(OP, "k", k.max(1))?,
            ldb: to_i32(OP, "k", k.max(1))?,
            beta: 0.0f32,
            ldc: to_i32(OP, "n", n)?,
        };
        // SAFETY: lengths checked above.
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(|e| cuda_err(OP, e))
    }
}

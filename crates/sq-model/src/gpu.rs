//! The model forward on an NVIDIA GPU (feature `cuda`): the CPU [`Model`]'s weights uploaded
//! once, then the same decoder (every architecture: norms, rotary / learned / ALiBi positions,
//! GQA, sliding windows, gated and plain MLPs, pre- and post-norm) run with sq-kernels' CUDA
//! building blocks.
//!
//! - Activations, norms, attention and the KV cache are f32 on the device.
//! - A full-precision Linear runs in FP16 on the tensor cores (cuBLAS, f16 weights and
//!   inputs, FP32 accumulation and output): the baseline SmoothQuant compares with. The FP32
//!   variant ([`FpPrecision::F32`], cuBLAS SGEMM) exists to check the GPU forward against the
//!   CPU closely.
//! - A W8A8 [`Int8Linear`] keeps its INT8 weights, scales and bias, and quantizes its input on
//!   the GPU as it does on the CPU (dynamic per token, dynamic per tensor, or static), then
//!   runs the INT8 GEMM (cuBLASLt, or the decode kernel) with the dequantize epilogue fused.
//!
//! Other Linear kinds (fake-quantized, wrappers added later) are refused at upload with an
//! error naming the Linear. Logits are copied back to the host after each forward.

use crate::config::{Activation, ModelConfig, NormKind, PositionEncoding};
use crate::layers::Norm;
use crate::linear::{Linear, NamedLinear};
use crate::model::{Logits, Mlp, Model, QkvProj};
use crate::quant::{ActQuant, Int8Linear};
use crate::runner::{Forward, INT8_ATTENTION_ON_GPU};
use crate::{ModelError, Result};
use half::f16;
use sq_kernels::cuda::{
    CudaDevice, CudaSlice, DeviceActQuant, DeviceWeights, GemmOut, GpuActivation, GpuAttention,
    MAX_HEAD_DIM,
};
use std::sync::Arc;

/// How full-precision Linears run on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FpPrecision {
    /// f16 weights and inputs, FP32 accumulation (tensor cores): the FP16 baseline.
    F16,
    /// f32 throughout (cuBLAS SGEMM): slower, for checking against the CPU.
    F32,
}

enum GpuLinear {
    F16 {
        w: CudaSlice<f16>,
        bias: Option<CudaSlice<f32>>,
        n: usize,
        k: usize,
    },
    F32 {
        w: CudaSlice<f32>,
        bias: Option<CudaSlice<f32>>,
        n: usize,
        k: usize,
    },
    Int8 {
        w: DeviceWeights,
        act: DeviceActQuant,
    },
}

impl GpuLinear {
    fn n(&self) -> usize {
        match self {
            GpuLinear::F16 { n, .. } | GpuLinear::F32 { n, .. } => *n,
            GpuLinear::Int8 { w, .. } => w.n(),
        }
    }
    fn k(&self) -> usize {
        match self {
            GpuLinear::F16 { k, .. } | GpuLinear::F32 { k, .. } => *k,
            GpuLinear::Int8 { w, .. } => w.k(),
        }
    }
    fn bytes(&self) -> usize {
        let bias = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| 4 * b.len());
        match self {
            GpuLinear::F16 { w, bias: b, .. } => 2 * w.len() + bias(b),
            GpuLinear::F32 { w, bias: b, .. } => 4 * w.len() + bias(b),
            GpuLinear::Int8 { w, .. } => w.device_bytes(),
        }
    }
}

struct GpuNorm {
    weight: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    eps: f32,
    layer_norm: bool,
    dim: usize,
}

// One per layer: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum GpuQkv {
    Separate {
        q: GpuLinear,
        k: GpuLinear,
        v: GpuLinear,
    },
    Fused(GpuLinear),
}

#[allow(clippy::large_enum_variant)]
enum GpuMlp {
    Gated {
        gate: GpuLinear,
        up: GpuLinear,
        down: GpuLinear,
    },
    Plain {
        fc1: GpuLinear,
        fc2: GpuLinear,
    },
}

struct GpuBlock {
    attn_norm: GpuNorm,
    qkv: GpuQkv,
    o_proj: GpuLinear,
    mlp_norm: GpuNorm,
    mlp: GpuMlp,
}

/// A [`Model`] uploaded to a GPU.
pub struct GpuModel {
    dev: Arc<CudaDevice>,
    config: ModelConfig,
    embed: CudaSlice<f32>,
    embed_dim: usize,
    /// OPT's learned positions and the number of rows in the table.
    pos_embed: Option<(CudaSlice<f32>, usize)>,
    embed_norm: Option<GpuNorm>,
    project_in: Option<GpuLinear>,
    project_out: Option<GpuLinear>,
    layers: Vec<GpuBlock>,
    final_norm: Option<GpuNorm>,
    lm_head: GpuLinear,
    inv_freq: Option<CudaSlice<f32>>,
    alibi: Option<CudaSlice<f32>>,
    weight_bytes: usize,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuModel({:?} on {:?}, {} layers)",
            self.config.architecture,
            self.dev,
            self.layers.len()
        )
    }
}

/// Device buffers of one sequence: the KV cache and the activations, grown to the largest
/// chunk seen, then reused (decoding allocates nothing).
pub struct GpuSession {
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
    capacity: usize,
    len: usize,
    b: Buffers,
}

impl GpuSession {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

struct Buffers {
    tokens: CudaSlice<u32>,
    emb: CudaSlice<f32>,
    hidden: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    mlp_a: CudaSlice<f32>,
    mlp_b: CudaSlice<f32>,
    head_in: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    x16: CudaSlice<f16>,
}

fn device_error(dev: &CudaDevice, reason: String) -> ModelError {
    ModelError::Device {
        device: format!("cuda:{}", dev.ordinal()),
        reason,
    }
}

fn grow<T>(dev: &CudaDevice, buf: &mut CudaSlice<T>, len: usize) -> Result<()>
where
    T: sq_kernels::cuda::cudarc::driver::DeviceRepr
        + sq_kernels::cuda::cudarc::driver::ValidAsZeroBits,
{
    if buf.len() < len {
        *buf = dev.zeros(len)?;
    }
    Ok(())
}

fn activation(a: Activation) -> GpuActivation {
    match a {
        Activation::Silu => GpuActivation::Silu,
        Activation::Relu => GpuActivation::Relu,
        Activation::GeluTanh => GpuActivation::GeluTanh,
        Activation::Gelu => GpuActivation::Gelu,
    }
}

impl GpuModel {
    /// Uploads `model`'s weights to `dev`, full-precision Linears in `fp`.
    pub fn upload(model: &Model, dev: Arc<CudaDevice>, fp: FpPrecision) -> Result<Self> {
        let cfg = model.config.clone();
        if model.attention.is_int8() {
            return Err(device_error(&dev, INT8_ATTENTION_ON_GPU.into()));
        }
        if cfg.head_dim > MAX_HEAD_DIM {
            return Err(device_error(
                &dev,
                format!(
                    "head dimension {} exceeds the GPU attention kernel's {MAX_HEAD_DIM}",
                    cfg.head_dim
                ),
            ));
        }
        let d = &dev;
        let norm = |n: &Norm| -> Result<GpuNorm> {
            Ok(GpuNorm {
                weight: d.upload(&n.weight)?,
                bias: n.bias.as_ref().map(|b| d.upload(b)).transpose()?,
                eps: n.eps,
                layer_norm: n.kind == NormKind::LayerNorm,
                dim: n.weight.len(),
            })
        };
        let linear = |l: &NamedLinear| upload_linear(d, l, fp);
        let mut layers = Vec::with_capacity(model.layers.len());
        for b in &model.layers {
            layers.push(GpuBlock {
                attn_norm: norm(&b.attn_norm)?,
                qkv: match &b.qkv {
                    QkvProj::Separate { q, k, v } => GpuQkv::Separate {
                        q: linear(q)?,
                        k: linear(k)?,
                        v: linear(v)?,
                    },
                    QkvProj::BloomFused(p) => GpuQkv::Fused(linear(p)?),
                },
                o_proj: linear(&b.o_proj)?,
                mlp_norm: norm(&b.mlp_norm)?,
                mlp: match &b.mlp {
                    Mlp::Gated { gate, up, down } => GpuMlp::Gated {
                        gate: linear(gate)?,
                        up: linear(up)?,
                        down: linear(down)?,
                    },
                    Mlp::Plain { fc1, fc2 } => GpuMlp::Plain {
                        fc1: linear(fc1)?,
                        fc2: linear(fc2)?,
                    },
                },
            });
        }
        let (inv_freq, alibi) = match &cfg.positions {
            PositionEncoding::Rotary { inv_freq } => (Some(d.upload(inv_freq)?), None),
            PositionEncoding::Alibi { slopes } => (None, Some(d.upload(slopes)?)),
            PositionEncoding::Learned { .. } => (None, None),
        };
        let pos_embed = match &model.pos_embed {
            Some(p) => Some((d.upload(&p.weight)?, p.weight.len() / p.dim.max(1))),
            None => None,
        };
        let mut gpu = GpuModel {
            embed: d.upload(&model.embedding_table()?)?,
            embed_dim: model.embed.dim,
            pos_embed,
            embed_norm: model.embed_norm.as_ref().map(norm).transpose()?,
            project_in: model.project_in.as_ref().map(linear).transpose()?,
            project_out: model.project_out.as_ref().map(linear).transpose()?,
            layers,
            final_norm: model.final_norm.as_ref().map(norm).transpose()?,
            lm_head: linear(&model.lm_head)?,
            inv_freq,
            alibi,
            weight_bytes: 0,
            config: cfg,
            dev: dev.clone(),
        };
        gpu.weight_bytes = gpu.count_bytes();
        Ok(gpu)
    }

    fn count_bytes(&self) -> usize {
        let norm = |n: &GpuNorm| 4 * (n.weight.len() + n.bias.as_ref().map_or(0, |b| b.len()));
        let mut total = 4 * self.embed.len()
            + self.pos_embed.as_ref().map_or(0, |(p, _)| 4 * p.len())
            + self.embed_norm.as_ref().map_or(0, norm)
            + self.final_norm.as_ref().map_or(0, norm)
            + self.project_in.as_ref().map_or(0, GpuLinear::bytes)
            + self.project_out.as_ref().map_or(0, GpuLinear::bytes)
            + self.lm_head.bytes();
        for b in &self.layers {
            total += norm(&b.attn_norm) + norm(&b.mlp_norm) + b.o_proj.bytes();
            total += match &b.qkv {
                GpuQkv::Separate { q, k, v } => q.bytes() + k.bytes() + v.bytes(),
                GpuQkv::Fused(p) => p.bytes(),
            };
            total += match &b.mlp {
                GpuMlp::Gated { gate, up, down } => gate.bytes() + up.bytes() + down.bytes(),
                GpuMlp::Plain { fc1, fc2 } => fc1.bytes() + fc2.bytes(),
            };
        }
        total
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// Bytes of weights held on the GPU.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A session able to hold `capacity` positions (at most the model's context length).
    pub fn new_session(&self, capacity: usize) -> Result<GpuSession> {
        let cfg = &self.config;
        let capacity = capacity.min(cfg.max_position_embeddings).max(1);
        let kv = cfg.kv_dim() * capacity;
        let d = &self.dev;
        let mut keys = Vec::with_capacity(cfg.num_layers);
        let mut values = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            keys.push(d.zeros(kv)?);
            values.push(d.zeros(kv)?);
        }
        let one = || d.zeros::<f32>(1);
        Ok(GpuSession {
            keys,
            values,
            capacity,
            len: 0,
            b: Buffers {
                tokens: d.zeros(1)?,
                emb: one()?,
                hidden: one()?,
                normed: one()?,
                q: one()?,
                k: one()?,
                v: one()?,
                qkv: one()?,
                attn: one()?,
                proj: one()?,
                mlp_a: one()?,
                mlp_b: one()?,
                head_in: one()?,
                logits: one()?,
                x16: d.zeros(1)?,
            },
        })
    }

    pub fn session_len(s: &GpuSession) -> usize {
        s.len
    }
    pub fn clear_session(s: &mut GpuSession) {
        s.len = 0;
    }

    /// `y [m, n] = l(x [m, k])` (views of the first m·k / m·n elements).
    fn linear(
        &self,
        l: &GpuLinear,
        x: &CudaSlice<f32>,
        m: usize,
        y: &mut CudaSlice<f32>,
        x16: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let d = &self.dev;
        let (n, k) = (l.n(), l.k());
        grow(d, y, m * n)?;
        let xv = x.slice(..m * k);
        match l {
            GpuLinear::F16 { w, bias, .. } => {
                grow(d, x16, m * k)?;
                d.to_f16(&xv, x16, m * k)?;
                d.hgemm_f32_out(&x16.slice(..m * k), m, w, n, k, &mut y.slice_mut(..m * n))?;
                if let Some(b) = bias {
                    d.add_bias(y, m, n, b)?;
                }
            }
            GpuLinear::F32 { w, bias, .. } => {
                d.sgemm(&xv, m, w, n, k, &mut y.slice_mut(..m * n))?;
                if let Some(b) = bias {
                    d.add_bias(y, m, n, b)?;
                }
            }
            GpuLinear::Int8 { w, act } => {
                let acts = d.quantize(&xv, m, k, *act, None)?;
                d.gemm(&acts, w, GemmOut::F32(y.slice_mut(..m * n)))?;
            }
        }
        Ok(())
    }

    fn norm(
        &self,
        n: &GpuNorm,
        x: &CudaSlice<f32>,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        grow(&self.dev, out, rows * n.dim)?;
        self.dev.norm(
            &x.slice(..rows * n.dim),
            rows,
            n.dim,
            &n.weight,
            n.bias.as_ref(),
            n.eps,
            n.layer_norm,
            out,
        )?;
        Ok(())
    }

    /// Runs `tokens` at the session's next positions, like [`Model::forward`].
    pub fn forward(
        &self,
        tokens: &[u32],
        s: &mut GpuSession,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let d = &self.dev;
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Invalid("forward called with no tokens".into()));
        }
        if s.len + t > s.capacity {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds the KV cache capacity of {} positions (the model's context length or the session's limit)",
                s.len + t,
                s.capacity
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        let pos0 = s.len;
        let h = cfg.hidden_size;
        let b = &mut s.b;

        grow(d, &mut b.tokens, t)?;
        d.stream()
            .memcpy_htod(tokens, &mut b.tokens)
            .map_err(|e| device_error(d, format!("copying the tokens: {e:?}")))?;
        grow(d, &mut b.emb, t * self.embed_dim)?;
        d.embed(&self.embed, self.embed_dim, &b.tokens, t, &mut b.emb)?;
        grow(d, &mut b.hidden, t * h)?;
        match &self.project_in {
            Some(p) => self.linear(p, &b.emb, t, &mut b.hidden, &mut b.x16)?,
            None => d.copy(&b.emb, 0, &mut b.hidden, 0, t * h)?,
        }
        if let (Some((pe, rows)), PositionEncoding::Learned { offset }) =
            (&self.pos_embed, &cfg.positions)
        {
            if pos0 + t + offset > *rows {
                return Err(ModelError::Invalid(format!(
                    "position {} is beyond the {rows} learned positions",
                    pos0 + t + offset - 1
                )));
            }
            d.add_table_rows(&mut b.hidden, t, h, pe, pos0 + offset)?;
        }
        if let Some(n) = &self.embed_norm {
            self.norm(n, &b.hidden, t, &mut b.normed)?;
            d.copy(&b.normed, 0, &mut b.hidden, 0, t * h)?;
        }
        for (li, block) in self.layers.iter().enumerate() {
            self.attention_block(li, block, t, pos0, s)?;
            self.mlp_block(block, t, &mut s.b)?;
        }
        s.len += t;

        let b = &mut s.b;
        let rows = if which == Logits::All { t } else { 1 };
        let start = (t - rows) * h;
        grow(d, &mut b.normed, rows * h)?;
        match &self.final_norm {
            Some(n) => {
                // The last rows of `hidden`, normalized into `normed`.
                d.norm(
                    &b.hidden.slice(start..t * h),
                    rows,
                    h,
                    &n.weight,
                    n.bias.as_ref(),
                    n.eps,
                    n.layer_norm,
                    &mut b.normed,
                )?;
            }
            None => d.copy(&b.hidden, start, &mut b.normed, 0, rows * h)?,
        }
        let vocab = self.lm_head.n();
        match &self.project_out {
            Some(p) => {
                self.linear(p, &b.normed, rows, &mut b.head_in, &mut b.x16)?;
                self.linear(&self.lm_head, &b.head_in, rows, &mut b.logits, &mut b.x16)?;
            }
            None => self.linear(&self.lm_head, &b.normed, rows, &mut b.logits, &mut b.x16)?,
        }
        logits.resize(rows * vocab, 0.0);
        d.download(&b.logits, logits)?;
        Ok(())
    }

    fn attention_block(
        &self,
        li: usize,
        block: &GpuBlock,
        t: usize,
        pos0: usize,
        s: &mut GpuSession,
    ) -> Result<()> {
        let cfg = &self.config;
        let d = &self.dev;
        let (h, qd, kvd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let b = &mut s.b;
        if cfg.pre_norm {
            self.norm(&block.attn_norm, &b.hidden, t, &mut b.normed)?;
        }
        let input = if cfg.pre_norm { &b.normed } else { &b.hidden };
        grow(d, &mut b.q, t * qd)?;
        grow(d, &mut b.k, t * kvd)?;
        grow(d, &mut b.v, t * kvd)?;
        match &block.qkv {
            GpuQkv::Separate { q, k, v } => {
                self.linear(q, input, t, &mut b.q, &mut b.x16)?;
                self.linear(k, input, t, &mut b.k, &mut b.x16)?;
                self.linear(v, input, t, &mut b.v, &mut b.x16)?;
            }
            GpuQkv::Fused(p) => {
                self.linear(p, input, t, &mut b.qkv, &mut b.x16)?;
                d.split_qkv(
                    &b.qkv.slice(..t * 3 * qd),
                    t,
                    cfg.num_heads,
                    hd,
                    &mut b.q,
                    &mut b.k,
                    &mut b.v,
                )?;
            }
        }
        let mut scale = 1.0 / (hd as f32).sqrt();
        let mut alibi = None;
        match &cfg.positions {
            PositionEncoding::Rotary { .. } => {
                let f = self.inv_freq.as_ref().expect("uploaded with the config");
                d.rope(&mut b.q, t, cfg.num_heads, hd, pos0, f)?;
                d.rope(&mut b.k, t, cfg.num_kv_heads, hd, pos0, f)?;
            }
            PositionEncoding::Learned { .. } => {
                d.scale(&mut b.q, t * qd, scale)?;
                scale = 1.0;
            }
            PositionEncoding::Alibi { .. } => alibi = self.alibi.as_ref(),
        }
        d.copy(&b.k, 0, &mut s.keys[li], pos0 * kvd, t * kvd)?;
        d.copy(&b.v, 0, &mut s.values[li], pos0 * kvd, t * kvd)?;
        grow(d, &mut b.attn, t * qd)?;
        let shape = GpuAttention {
            rows: t,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            pos0,
            scale,
            sliding_window: cfg.sliding_window,
        };
        d.attention(&b.q, &s.keys[li], &s.values[li], &shape, alibi, &mut b.attn)?;
        grow(d, &mut b.proj, t * h)?;
        self.linear(&block.o_proj, &b.attn, t, &mut b.proj, &mut b.x16)?;
        self.finish_block(&block.attn_norm, t, b)
    }

    /// The residual add after a sub-block, as [`Model`]'s `finish_block`.
    fn finish_block(&self, norm: &GpuNorm, t: usize, b: &mut Buffers) -> Result<()> {
        let cfg = &self.config;
        let d = &self.dev;
        let n = t * cfg.hidden_size;
        if cfg.pre_norm && cfg.residual_from_norm {
            return Ok(d.add_into(&mut b.hidden, &b.normed, &b.proj, n)?);
        }
        d.add_assign(&mut b.hidden, &b.proj, n)?;
        if !cfg.pre_norm {
            self.norm(norm, &b.hidden, t, &mut b.normed)?;
            d.copy(&b.normed, 0, &mut b.hidden, 0, n)?;
        }
        Ok(())
    }

    fn mlp_block(&self, block: &GpuBlock, t: usize, b: &mut Buffers) -> Result<()> {
        let cfg = &self.config;
        let d = &self.dev;
        if cfg.pre_norm {
            self.norm(&block.mlp_norm, &b.hidden, t, &mut b.normed)?;
        }
        let input = if cfg.pre_norm { &b.normed } else { &b.hidden };
        let act = activation(cfg.activation);
        match &block.mlp {
            GpuMlp::Gated { gate, up, down } => {
                let inter = gate.n();
                self.linear(gate, input, t, &mut b.mlp_a, &mut b.x16)?;
                self.linear(up, input, t, &mut b.mlp_b, &mut b.x16)?;
                d.activate(&mut b.mlp_a, Some(&b.mlp_b), t * inter, act)?;
                self.linear(down, &b.mlp_a, t, &mut b.proj, &mut b.x16)?;
            }
            GpuMlp::Plain { fc1, fc2 } => {
                let inter = fc1.n();
                self.linear(fc1, input, t, &mut b.mlp_a, &mut b.x16)?;
                d.activate(&mut b.mlp_a, None, t * inter, act)?;
                self.linear(fc2, &b.mlp_a, t, &mut b.proj, &mut b.x16)?;
            }
        }
        self.finish_block(&block.mlp_norm, t, b)
    }
}

fn upload_linear(dev: &Arc<CudaDevice>, l: &NamedLinear, fp: FpPrecision) -> Result<GpuLinear> {
    // A run-time smoothing divide (BLOOM's dense_4h_to_h under --smooth-targets all) has no GPU
    // upload yet: refuse it by name rather than drop it.
    let runtime_divide = l.as_fp().and_then(|f| f.input_smoothing()).is_some()
        || l.linear
            .as_any()
            .downcast_ref::<Int8Linear>()
            .and_then(|q| q.input_smoothing())
            .is_some();
    if runtime_divide {
        return Err(device_error(
            dev,
            format!(
                "{}: its smoothing divides the input at run time, which the GPU path does not do \
                 yet; quantize with --smooth-targets paper or run with --device cpu",
                l.name
            ),
        ));
    }
    if let Some(f) = l.as_fp() {
        let (n, k) = (f.out_features(), f.in_features());
        let w = f.weight();
        let bias = f.bias().map(|b| dev.upload(b)).transpose()?;
        return Ok(match fp {
            FpPrecision::F16 => {
                let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                GpuLinear::F16 {
                    w: dev.upload(&w16)?,
                    bias,
                    n,
                    k,
                }
            }
            FpPrecision::F32 => GpuLinear::F32 {
                w: dev.upload(&w)?,
                bias,
                n,
                k,
            },
        });
    }
    if let Some(q) = l.linear.as_any().downcast_ref::<Int8Linear>() {
        let p = q.packed();
        let w = dev.upload_weights(&p.unpack(), p.n(), p.k(), p.scales(), p.bias())?;
        let act = match q.act_quant() {
            ActQuant::Token => DeviceActQuant::Token,
            ActQuant::Tensor => DeviceActQuant::Tensor,
            ActQuant::Static { scale } => DeviceActQuant::Static(scale),
        };
        return Ok(GpuLinear::Int8 { w, act });
    }
    Err(device_error(
        dev,
        format!(
            "{}: a {} Linear does not run on the GPU (FP and W8A8 Linears do)",
            l.name,
            l.linear.kind()
        ),
    ))
}

impl Forward for GpuModel {
    type Session = GpuSession;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_session(&self, capacity: usize) -> Result<GpuSession> {
        GpuModel::new_session(self, capacity)
    }
    fn session_len(session: &GpuSession) -> usize {
        session.len
    }
    fn clear_session(session: &mut GpuSession) {
        session.len = 0;
    }
    fn forward(
        &self,
        tokens: &[u32],
        session: &mut GpuSession,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        GpuModel::forward(self, tokens, session, which, logits)
    }
}

//! Running a model where it was asked to run: the [`Forward`] trait that generation,
//! perplexity and the benchmarks drive, implemented by the CPU [`Model`] and (feature `cuda`)
//! the GPU copy of it, and [`Runner`], which picks one from a [`Device`].

use crate::config::ModelConfig;
use crate::device::Device;
use crate::model::{Logits, Model, Session};
use crate::{ModelError, Result};

/// A decoder that runs forward passes over a per-sequence session (its KV cache).
pub trait Forward {
    type Session;
    fn config(&self) -> &ModelConfig;
    /// A session able to hold `capacity` positions (at most the model's context length).
    fn new_session(&self, capacity: usize) -> Result<Self::Session>;
    /// Positions filled so far.
    fn session_len(session: &Self::Session) -> usize;
    /// Forget every position (start a new sequence).
    fn clear_session(session: &mut Self::Session);
    /// Run `tokens` at the session's next positions; `logits` receives `[vocab]` (Last) or
    /// `[tokens, vocab]` (All).
    fn forward(
        &self,
        tokens: &[u32],
        session: &mut Self::Session,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()>;
}

impl Forward for Model {
    type Session = Session;
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn new_session(&self, capacity: usize) -> Result<Session> {
        Ok(self.session(capacity))
    }
    fn session_len(session: &Session) -> usize {
        session.cache.len()
    }
    fn clear_session(session: &mut Session) {
        session.cache.clear();
    }
    fn forward(
        &self,
        tokens: &[u32],
        session: &mut Session,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        Model::forward(self, tokens, session, which, logits)
    }
}

/// A model on the device it runs on: the CPU model itself, or its weights uploaded to a GPU.
pub enum Runner<'a> {
    Cpu(&'a Model),
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::gpu::GpuModel>),
}

/// The session of a [`Runner`] (one per sequence: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum RunnerSession {
    Cpu(Session),
    #[cfg(feature = "cuda")]
    Gpu(crate::gpu::GpuSession),
}

/// Why a model with INT8 attention does not run on a GPU.
pub const INT8_ATTENTION_ON_GPU: &str =
    "INT8 attention (--int8-attention: INT8 Q·Kᵀ, P·V and KV cache) \
     runs on the CPU only; the GPU decoder keeps f32 attention. Run it with --device cpu, or drop \
     --int8-attention (a checkpoint quantized with it records it: re-quantize without)";

impl<'a> Runner<'a> {
    /// `model` on `device`: the CPU runs it in place; a GPU gets its weights uploaded once
    /// (full-precision Linears in FP16, W8A8 Linears in INT8). Errors name the device and
    /// what is missing (no CUDA support built in, no driver or GPU, a Linear kind the GPU
    /// does not run).
    pub fn new(model: &'a Model, device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Runner::Cpu(model)),
            Device::Cuda(_) if model.attention.is_int8() => Err(ModelError::Device {
                device: device.to_string(),
                reason: INT8_ATTENTION_ON_GPU.into(),
            }),
            Device::Cuda(ordinal) => Self::gpu(model, ordinal),
        }
    }

    #[cfg(feature = "cuda")]
    fn gpu(model: &'a Model, ordinal: usize) -> Result<Self> {
        let dev = sq_kernels::cuda::CudaDevice::new(ordinal).map_err(|e| ModelError::Device {
            device: Device::Cuda(ordinal).to_string(),
            reason: e.to_string(),
        })?;
        crate::gpu::GpuModel::upload(model, dev, crate::gpu::FpPrecision::F16)
            .map(|g| Runner::Gpu(Box::new(g)))
    }

    #[cfg(not(feature = "cuda"))]
    fn gpu(_model: &'a Model, ordinal: usize) -> Result<Self> {
        // Without the feature `check` always explains what is missing.
        Err(Device::Cuda(ordinal)
            .check()
            .err()
            .unwrap_or_else(|| ModelError::Device {
                device: Device::Cuda(ordinal).to_string(),
                reason: "no CUDA support in this build".into(),
            }))
    }

    /// Where the forward passes run.
    pub fn device(&self) -> Device {
        match self {
            Runner::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => Device::Cuda(g.device().ordinal()),
        }
    }

    /// Bytes of weights as the device holds them.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Runner::Cpu(m) => m.weight_bytes(),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.weight_bytes(),
        }
    }

    /// Device memory in use (all processes) on a GPU, in bytes; `None` on the CPU.
    pub fn device_memory_used(&self) -> Option<usize> {
        match self {
            Runner::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g
                .device()
                .memory_info()
                .ok()
                .map(|(free, total)| total - free),
        }
    }
}

fn mismatch() -> ModelError {
    ModelError::Invalid("a session of one device was handed to a model on another".into())
}

impl Forward for Runner<'_> {
    type Session = RunnerSession;

    fn config(&self) -> &ModelConfig {
        match self {
            Runner::Cpu(m) => &m.config,
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => g.config(),
        }
    }

    fn new_session(&self, capacity: usize) -> Result<RunnerSession> {
        Ok(match self {
            Runner::Cpu(m) => RunnerSession::Cpu(m.session(capacity)),
            #[cfg(feature = "cuda")]
            Runner::Gpu(g) => RunnerSession::Gpu(g.new_session(capacity)?),
        })
    }

    fn session_len(session: &RunnerSession) -> usize {
        match session {
            RunnerSession::Cpu(s) => s.cache.len(),
            #[cfg(feature = "cuda")]
            RunnerSession::Gpu(s) => crate::gpu::GpuModel::session_len(s),
        }
    }

    fn clear_session(session: &mut RunnerSession) {
        match session {
            RunnerSession::Cpu(s) => s.cache.clear(),
            #[cfg(feature = "cuda")]
            RunnerSession::Gpu(s) => crate::gpu::GpuModel::clear_session(s),
        }
    }

    fn forward(
        &self,
        tokens: &[u32],
        session: &mut RunnerSession,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        match (self, session) {
            (Runner::Cpu(m), RunnerSession::Cpu(s)) => m.forward(tokens, s, which, logits),
            #[cfg(feature = "cuda")]
            (Runner::Gpu(g), RunnerSession::Gpu(s)) => g.forward(tokens, s, which, logits),
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }
}

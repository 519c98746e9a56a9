//! One decoder implementation for every architecture: the per-architecture files only map
//! configs and tensor names into these structures.

use crate::config::{Activation, Architecture, ModelConfig, PositionEncoding};
use crate::int8_attention::{
    attention_fake_quant, attention_int8, AttentionMode, Int8AttentionScratch,
};
use crate::layers::{
    activate, apply_rope_table, attention, attention_gemm, rope_table, AttentionShape, KvCache,
    LayerKv, Norm, GEMM_ATTENTION_MIN_ROWS,
};
use crate::linear::NamedLinear;
use crate::{ModelError, Result};
use std::sync::atomic::{AtomicBool, Ordering::Acquire};

/// The query/key/value projections of one layer.
#[derive(Debug)]
pub enum QkvProj {
    /// Separate `q_proj`, `k_proj`, `v_proj` (LLaMA, OPT).
    Separate {
        q: NamedLinear,
        k: NamedLinear,
        v: NamedLinear,
    },
    /// BLOOM's fused `query_key_value`, output laid out per head as `[q, k, v]`.
    BloomFused(NamedLinear),
}

/// The MLP of one layer.
#[derive(Debug)]
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))` (LLaMA).
    Gated {
        gate: NamedLinear,
        up: NamedLinear,
        down: NamedLinear,
    },
    /// `fc2(act(fc1(x)))` (OPT, BLOOM).
    Plain { fc1: NamedLinear, fc2: NamedLinear },
}

/// One decoder layer.
#[derive(Debug)]
pub struct Block {
    /// The norm feeding attention (pre-norm), or applied after the attention residual (OPT post-norm).
    pub attn_norm: Norm,
    pub qkv: QkvProj,
    pub o_proj: NamedLinear,
    /// The norm feeding the MLP (pre-norm), or applied after the MLP residual (post-norm).
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

impl Block {
    /// Every Linear of the layer, in forward order.
    pub fn linears(&self) -> Vec<&NamedLinear> {
        let mut out = Vec::with_capacity(7);
        match &self.qkv {
            QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
            QkvProj::BloomFused(qkv) => out.push(qkv),
        }
        out.push(&self.o_proj);
        match &self.mlp {
            Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
            Mlp::Plain { fc1, fc2 } => out.extend([fc1, fc2]),
        }
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut NamedLinear> {
        let mut out = Vec::with_capacity(7);
        match &mut self.qkv {
            QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
            QkvProj::BloomFused(qkv) => out.push(qkv),
        }
        out.push(&mut self.o_proj);
        match &mut self.mlp {
            Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
            Mlp::Plain { fc1, fc2 } => out.extend([fc1, fc2]),
        }
        out
    }
}

/// A token embedding table `[vocab, dim]`.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub name: String,
    /// The table, row-major; empty when `in_lm_head`.
    pub weight: Vec<f32>,
    pub dim: usize,
    /// The table is the tied LM head's weights (its only copy): lookups read the head's rows
    /// ([`Model::embedding_row`], [`Model::embedding_table`]).
    pub in_lm_head: bool,
}

/// A decoder-only causal language model.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    pub embed: Embedding,
    /// OPT's learned positions `[max_positions + offset, hidden]`.
    pub pos_embed: Option<Embedding>,
    /// BLOOM's `word_embeddings_layernorm`.
    pub embed_norm: Option<Norm>,
    /// OPT's `project_in` / `project_out` when `word_embed_proj_dim != hidden_size`.
    pub project_in: Option<NamedLinear>,
    pub project_out: Option<NamedLinear>,
    pub layers: Vec<Block>,
    pub final_norm: Option<Norm>,
    pub lm_head: NamedLinear,
    /// f32 attention, or INT8 products and KV cache (`--int8-attention`); sessions follow it.
    pub attention: AttentionMode,
}

/// Which logits a forward call produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (perplexity, parity tests).
    All,
}

/// Per-sequence state: the KV cache and reusable activation buffers (grown once, then reused,
/// so decoding allocates nothing per token).
#[derive(Debug)]
pub struct Session {
    pub cache: KvCache,
    bufs: Buffers,
}

#[derive(Debug, Default)]
struct Buffers {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    mlp_a: Vec<f32>,
    mlp_b: Vec<f32>,
    emb: Vec<f32>,
    head_in: Vec<f32>,
    int8_attention: Int8AttentionScratch,
    /// RoPE `(cos, sin)` of the current forward's positions, and the `(pos0, rows)` they are for.
    rope: Vec<f32>,
    rope_for: Option<(usize, usize)>,
}

/// Tokens from which [`Model::forward`] runs on a thread of rayon's pool.
const POOL_FORWARD_MIN_TOKENS: usize = 16;

fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl Model {
    /// A deep copy of a full-precision model (every Linear an [`crate::FpLinear`]), e.g. to try
    /// several smoothing strengths from the same weights. Quantized models are an error.
    pub fn try_clone(&self) -> Result<Model> {
        let clone_block = |b: &Block| -> Result<Block> {
            Ok(Block {
                attn_norm: b.attn_norm.clone(),
                qkv: match &b.qkv {
                    QkvProj::Separate { q, k, v } => QkvProj::Separate {
                        q: q.try_clone()?,
                        k: k.try_clone()?,
                        v: v.try_clone()?,
                    },
                    QkvProj::BloomFused(p) => QkvProj::BloomFused(p.try_clone()?),
                },
                o_proj: b.o_proj.try_clone()?,
                mlp_norm: b.mlp_norm.clone(),
                mlp: match &b.mlp {
                    Mlp::Gated { gate, up, down } => Mlp::Gated {
                        gate: gate.try_clone()?,
                        up: up.try_clone()?,
                        down: down.try_clone()?,
                    },
                    Mlp::Plain { fc1, fc2 } => Mlp::Plain {
                        fc1: fc1.try_clone()?,
                        fc2: fc2.try_clone()?,
                    },
                },
            })
        };
        Ok(Model {
            config: self.config.clone(),
            embed: self.embed.clone(),
            pos_embed: self.pos_embed.clone(),
            embed_norm: self.embed_norm.clone(),
            project_in: self
                .project_in
                .as_ref()
                .map(|l| l.try_clone())
                .transpose()?,
            project_out: self
                .project_out
                .as_ref()
                .map(|l| l.try_clone())
                .transpose()?,
            layers: self.layers.iter().map(clone_block).collect::<Result<_>>()?,
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.try_clone()?,
            attention: self.attention.clone(),
        })
    }

    /// A session able to hold `capacity` positions (at most the model's context length), its
    /// KV cache in f32 or INT8 as [`Model::attention`] says.
    pub fn session(&self, capacity: usize) -> Session {
        let c = &self.config;
        let capacity = capacity.min(c.max_position_embeddings).max(1);
        let cache = if self.attention.is_int8() {
            KvCache::new_int8(c.num_layers, c.num_kv_heads, c.head_dim, capacity)
        } else {
            KvCache::new(c.num_layers, c.kv_dim(), capacity)
        };
        Session {
            cache,
            bufs: Buffers::default(),
        }
    }

    /// Bytes of the KV cache of a session of `capacity` positions (capped like [`Model::session`]).
    pub fn kv_cache_bytes(&self, capacity: usize) -> usize {
        let c = &self.config;
        let capacity = capacity.min(c.max_position_embeddings).max(1);
        KvCache::bytes_for(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            capacity,
            self.attention.is_int8(),
        )
    }

    /// Drop the embedding table of a tied model when the LM head holds exactly the same values:
    /// lookups then read the head's rows, and the model keeps one copy instead of two (113 MB of
    /// f32 on SmolLM2-135M). A table that differs from the head (or no tie) is kept.
    pub fn share_tied_embedding(&mut self) -> Result<()> {
        let dim = self.embed.dim;
        let head = &self.lm_head.linear;
        if self.embed.in_lm_head
            || !self.config.tie_word_embeddings
            || dim == 0
            || head.in_features() != dim
            || head.out_features() * dim != self.embed.weight.len()
        {
            return Ok(());
        }
        let mut row = vec![0.0f32; dim];
        for (r, table_row) in self.embed.weight.chunks_exact(dim).enumerate() {
            if head.weight_row(r, &mut row).is_err()
                || row
                    .iter()
                    .zip(table_row)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Ok(());
            }
        }
        self.embed.weight = Vec::new();
        self.embed.in_lm_head = true;
        Ok(())
    }

    /// Number of rows (tokens) of the embedding table.
    pub fn embedding_rows(&self) -> usize {
        if self.embed.in_lm_head {
            self.lm_head.linear.out_features()
        } else {
            self.embed.weight.len() / self.embed.dim.max(1)
        }
    }

    /// The embedding of token `id` into `out` (`embed.dim` values).
    pub fn embedding_row(&self, id: usize, out: &mut [f32]) -> Result<()> {
        let dim = self.embed.dim;
        if self.embed.in_lm_head {
            return self.lm_head.linear.weight_row(id, out);
        }
        match self.embed.weight.get(id * dim..(id + 1) * dim) {
            Some(row) if out.len() == dim => {
                out.copy_from_slice(row);
                Ok(())
            }
            _ => Err(ModelError::Invalid(format!(
                "embedding row {id} of a table of {} rows into {} values",
                self.embedding_rows(),
                out.len()
            ))),
        }
    }

    /// The whole embedding table `[rows, dim]` (a copy when it lives in the LM head): export
    /// and GPU upload.
    pub fn embedding_table(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        if !self.embed.in_lm_head {
            return Ok(std::borrow::Cow::Borrowed(&self.embed.weight));
        }
        let dim = self.embed.dim;
        let mut table = vec![0.0f32; self.embedding_rows() * dim];
        for (r, row) in table.chunks_exact_mut(dim.max(1)).enumerate() {
            self.lm_head.linear.weight_row(r, row)?;
        }
        Ok(std::borrow::Cow::Owned(table))
    }

    /// Every Linear with its name, in forward order (LM head last).
    pub fn linears(&self) -> Vec<&NamedLinear> {
        let mut out: Vec<&NamedLinear> = self.project_in.iter().collect();
        for b in &self.layers {
            out.extend(b.linears());
        }
        out.extend(self.project_out.iter());
        out.push(&self.lm_head);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut NamedLinear> {
        let mut out: Vec<&mut NamedLinear> = self.project_in.iter_mut().collect();
        for b in &mut self.layers {
            out.extend(b.linears_mut());
        }
        out.extend(self.project_out.iter_mut());
        out.push(&mut self.lm_head);
        out
    }

    /// Attach `observer` to every Linear except the LM head (or detach with `None`).
    pub fn set_observer(
        &mut self,
        observer: Option<std::sync::Arc<dyn crate::linear::LinearObserver>>,
    ) {
        for l in self.linears_mut() {
            if l.name != "lm_head" {
                l.observer = observer.clone();
            }
        }
    }

    /// The Linear called `name`.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut NamedLinear> {
        self.linears_mut().into_iter().find(|l| l.name == name)
    }

    /// Every norm with its name.
    pub fn norms(&self) -> Vec<&Norm> {
        let mut out: Vec<&Norm> = self.embed_norm.iter().collect();
        for b in &self.layers {
            out.push(&b.attn_norm);
            out.push(&b.mlp_norm);
        }
        out.extend(self.final_norm.iter());
        out
    }

    pub fn norm_mut(&mut self, name: &str) -> Option<&mut Norm> {
        if self.embed_norm.as_ref().is_some_and(|n| n.name == name) {
            return self.embed_norm.as_mut();
        }
        if self.final_norm.as_ref().is_some_and(|n| n.name == name) {
            return self.final_norm.as_mut();
        }
        self.layers.iter_mut().find_map(|b| {
            if b.attn_norm.name == name {
                Some(&mut b.attn_norm)
            } else if b.mlp_norm.name == name {
                Some(&mut b.mlp_norm)
            } else {
                None
            }
        })
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        let linears: usize = self
            .linears()
            .iter()
            .filter(|l| !(self.config.tie_word_embeddings && std::ptr::eq(**l, &self.lm_head)))
            .map(|l| l.linear.in_features() * l.linear.out_features())
            .sum();
        let norms: usize = self
            .norms()
            .iter()
            .map(|n| n.weight.len() + n.bias.as_ref().map_or(0, Vec::len))
            .sum();
        linears
            + norms
            + self.embedding_rows() * self.embed.dim
            + self.pos_embed.as_ref().map_or(0, |p| p.weight.len())
    }

    /// Bytes of weights as held in memory (embeddings, norms and every Linear's representation).
    pub fn weight_bytes(&self) -> usize {
        let linears: usize = self.linears().iter().map(|l| l.linear.weight_bytes()).sum();
        let norms: usize = self
            .norms()
            .iter()
            .map(|n| 4 * (n.weight.len() + n.bias.as_ref().map_or(0, Vec::len)))
            .sum();
        linears
            + norms
            + 4 * self.embed.weight.len()
            + self.pos_embed.as_ref().map_or(0, |p| 4 * p.weight.len())
    }

    /// Run `tokens` at the session's next positions; `logits` receives `[vocab]` (Last) or
    /// `[tokens, vocab]` (All).
    pub fn forward(
        &self,
        tokens: &[u32],
        session: &mut Session,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        // A prefill chunk runs hundreds of parallel loops; from a thread outside rayon's pool each
        // would be injected into the pool and wait on a wake-up (futex) round trip, so the whole
        // pass moves onto a worker once. Decode steps stay put: they run on the spinning team.
        if tokens.len() >= POOL_FORWARD_MIN_TOKENS && rayon::current_thread_index().is_none() {
            return with_stealing_workers(|| self.forward_here(tokens, session, which, logits));
        }
        self.forward_here(tokens, session, which, logits)
    }

    fn forward_here(
        &self,
        tokens: &[u32],
        session: &mut Session,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let _span =
            tracing::debug_span!("forward", tokens = tokens.len(), pos = session.cache.len())
                .entered();
        let cfg = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Invalid("forward called with no tokens".into()));
        }
        session.cache.check_room(t)?;
        if session.cache.is_int8() != self.attention.is_int8() {
            return Err(ModelError::Invalid(format!(
                "the session's KV cache is {} but the model runs {} attention; start a new session",
                if session.cache.is_int8() {
                    "INT8"
                } else {
                    "f32"
                },
                if self.attention.is_int8() {
                    "INT8"
                } else {
                    "f32"
                },
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        let pos0 = session.cache.len();
        let h = cfg.hidden_size;
        self.embed(tokens, pos0, &mut session.bufs)?;

        for (li, block) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", index = li).entered();
            self.attention_block(li, block, t, pos0, session)?;
            self.mlp_block(block, t, &mut session.bufs)?;
        }
        session.cache.advance(t);

        // Final norm, projection, LM head.
        let b = &mut session.bufs;
        let rows = if which == Logits::All { t } else { 1 };
        let start = (t - rows) * h;
        let last = &b.hidden[start..t * h];
        let normed = grow(&mut b.normed, rows * h);
        match &self.final_norm {
            Some(n) => n.forward(last, normed),
            None => normed.copy_from_slice(last),
        }
        let head_in: &[f32] = match &self.project_out {
            Some(p) => {
                let out = grow(&mut b.head_in, rows * p.linear.out_features());
                p.forward(normed, rows, out)?;
                out
            }
            None => normed,
        };
        logits.resize(rows * cfg.vocab_size, 0.0);
        self.lm_head.forward(head_in, rows, logits)?;
        Ok(())
    }

    /// The hidden states entering the first layer (embeddings, input projection, learned
    /// positions, embedding norm) for `tokens` at positions `pos0..`, into `b.hidden`.
    fn embed(&self, tokens: &[u32], pos0: usize, b: &mut Buffers) -> Result<()> {
        let cfg = &self.config;
        let t = tokens.len();
        let h = cfg.hidden_size;
        let emb_dim = self.embed.dim;
        let emb = grow(&mut b.emb, t * emb_dim);
        for (row, &id) in emb.chunks_exact_mut(emb_dim).zip(tokens) {
            self.embedding_row(id as usize, row)?;
        }
        let hidden = grow(&mut b.hidden, t * h);
        match &self.project_in {
            Some(p) => p.forward(emb, t, hidden)?,
            None => hidden.copy_from_slice(emb),
        }
        if let (Some(pe), PositionEncoding::Learned { offset }) = (&self.pos_embed, &cfg.positions)
        {
            for (i, row) in hidden.chunks_exact_mut(h).enumerate() {
                let p = &pe.weight[(pos0 + i + offset) * h..][..h];
                for (x, y) in row.iter_mut().zip(p) {
                    *x += y;
                }
            }
        }
        if let Some(n) = &self.embed_norm {
            let normed = grow(&mut b.normed, t * h);
            n.forward(hidden, normed);
            hidden.copy_from_slice(normed);
        }
        Ok(())
    }

    /// A session for [`Model::block_forward`]: one layer's KV cache of `capacity` positions.
    pub fn layer_session(&self, capacity: usize) -> Session {
        let capacity = capacity.min(self.config.max_position_embeddings).max(1);
        Session {
            cache: KvCache::new(1, self.config.kv_dim(), capacity),
            bufs: Buffers::default(),
        }
    }

    /// The hidden states [`Model::forward`] feeds its first layer for the sequence `tokens`
    /// (positions from 0), as `[tokens, hidden]` in `out`.
    pub fn embed_sequence(
        &self,
        tokens: &[u32],
        session: &mut Session,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        if tokens.is_empty() || tokens.len() > cfg.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "a sequence of {} tokens does not fit the model's context of {} positions",
                tokens.len(),
                cfg.max_position_embeddings
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                cfg.vocab_size
            )));
        }
        self.embed(tokens, 0, &mut session.bufs)?;
        let n = tokens.len() * cfg.hidden_size;
        out.clear();
        out.extend_from_slice(&session.bufs.hidden[..n]);
        Ok(())
    }

    /// Run `block` alone, in place, over the hidden states `hidden` (`[tokens, hidden]` of one
    /// sequence at positions from 0): exactly what [`Model::forward`] computes for that layer in
    /// a fresh session, so a model can be run (calibrated, quantized) one layer at a time.
    /// `session` comes from [`Model::layer_session`].
    pub fn block_forward(
        &self,
        block: &Block,
        hidden: &mut [f32],
        session: &mut Session,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        if hidden.is_empty() || !hidden.len().is_multiple_of(h) {
            return Err(ModelError::Invalid(format!(
                "block_forward: {} values are not rows of {h} hidden channels",
                hidden.len()
            )));
        }
        let t = hidden.len() / h;
        session.cache.clear();
        session.cache.check_room(t)?;
        grow(&mut session.bufs.hidden, t * h).copy_from_slice(hidden);
        self.attention_block(0, block, t, 0, session)?;
        self.mlp_block(block, t, &mut session.bufs)?;
        hidden.copy_from_slice(&session.bufs.hidden[..t * h]);
        session.cache.clear();
        Ok(())
    }

    /// What [`Model::forward`] feeds the LM head for the last layer's hidden states `hidden`
    /// (`[tokens, hidden]`): the final norm, then OPT's `project_out`, into `out`. Run for the
    /// observers of `project_out` in a layer-by-layer calibration.
    pub fn head_input(
        &self,
        hidden: &[f32],
        session: &mut Session,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        if hidden.is_empty() || !hidden.len().is_multiple_of(h) {
            return Err(ModelError::Invalid(format!(
                "head_input: {} values are not rows of {h} hidden channels",
                hidden.len()
            )));
        }
        let rows = hidden.len() / h;
        let b = &mut session.bufs;
        let normed = grow(&mut b.normed, rows * h);
        match &self.final_norm {
            Some(n) => n.forward(hidden, normed),
            None => normed.copy_from_slice(hidden),
        }
        match &self.project_out {
            Some(p) => {
                out.resize(rows * p.linear.out_features(), 0.0);
                p.forward(normed, rows, out)?;
            }
            None => {
                out.clear();
                out.extend_from_slice(normed);
            }
        }
        Ok(())
    }

    fn attention_block(
        &self,
        li: usize,
        block: &Block,
        t: usize,
        pos0: usize,
        session: &mut Session,
    ) -> Result<()> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let b = &mut session.bufs;
        let hidden = &b.hidden[..t * h];
        let normed = grow(&mut b.normed, t * h);
        let q = grow(&mut b.q, t * qd);
        let k = grow(&mut b.k, t * kvd);
        let v = grow(&mut b.v, t * kvd);
        // Pre-norm: the norm feeds the projections (fused with their input quantization when
        // they are W8A8); its f32 output is kept only when the residual reads it (BLOOM).
        let keep_normed = cfg.residual_from_norm;
        match &block.qkv {
            QkvProj::Separate {
                q: qp,
                k: kp,
                v: vp,
            } => {
                let outs = &mut [&mut *q, &mut *k, &mut *v];
                if cfg.pre_norm {
                    crate::quant::forward_normed(
                        &block.attn_norm,
                        &[qp, kp, vp],
                        hidden,
                        t,
                        normed,
                        keep_normed,
                        outs,
                    )?;
                } else {
                    crate::quant::forward_same_input(&[qp, kp, vp], hidden, t, outs)?;
                }
            }
            QkvProj::BloomFused(p) => {
                let fused = grow(&mut b.qkv, t * 3 * h);
                if cfg.pre_norm {
                    crate::quant::forward_normed(
                        &block.attn_norm,
                        &[p],
                        hidden,
                        t,
                        normed,
                        keep_normed,
                        &mut [&mut *fused],
                    )?;
                } else {
                    p.forward(hidden, t, fused)?;
                }
                let heads = cfg.num_heads;
                for (r, row) in fused.chunks_exact(3 * h).enumerate() {
                    for hh in 0..heads {
                        let src = &row[hh * 3 * hd..];
                        q[r * qd + hh * hd..][..hd].copy_from_slice(&src[..hd]);
                        k[r * kvd + hh * hd..][..hd].copy_from_slice(&src[hd..2 * hd]);
                        v[r * kvd + hh * hd..][..hd].copy_from_slice(&src[2 * hd..3 * hd]);
                    }
                }
            }
        }
        let mut scale = 1.0 / (hd as f32).sqrt();
        let mut alibi = None;
        match &cfg.positions {
            PositionEncoding::Rotary { inv_freq } => {
                // Every layer of one forward pass has the same positions: one table for all.
                if b.rope_for != Some((pos0, t)) {
                    rope_table(pos0, t, hd, inv_freq, &mut b.rope);
                    b.rope_for = Some((pos0, t));
                }
                apply_rope_table(q, cfg.num_heads, hd, &b.rope);
                apply_rope_table(k, cfg.num_kv_heads, hd, &b.rope);
            }
            PositionEncoding::Learned { .. } => {
                // OPT scales the query projection (bias included) before attention.
                for x in q.iter_mut() {
                    *x *= scale;
                }
                scale = 1.0;
            }
            PositionEncoding::Alibi { slopes } => alibi = Some(slopes.as_slice()),
        }
        session.cache.store(li, k, v)?;
        let attn = grow(&mut b.attn, t * qd);
        let shape = AttentionShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            pos0,
            scale,
            sliding_window: cfg.sliding_window,
        };
        match (session.cache.layer(li), &self.attention) {
            (LayerKv::F32 { keys, values }, AttentionMode::F32) => {
                if t >= GEMM_ATTENTION_MIN_ROWS {
                    attention_gemm(q, keys, values, &shape, alibi, attn)?;
                } else {
                    attention(q, keys, values, &shape, alibi, attn);
                }
            }
            (LayerKv::Int8(kv), AttentionMode::Int8(backend)) => attention_int8(
                q,
                kv,
                &shape,
                alibi,
                attn,
                backend.as_ref(),
                &mut b.int8_attention,
            )?,
            (LayerKv::Int8(kv), AttentionMode::FakeQuantInt8) => {
                attention_fake_quant(q, kv, &shape, alibi, attn)?
            }
            _ => {
                return Err(ModelError::Invalid(
                    "the session's KV cache does not match the model's attention mode".into(),
                ))
            }
        }
        let proj = grow(&mut b.proj, t * h);
        block.o_proj.forward(attn, t, proj)?;
        self.finish_block(&block.attn_norm, t, b);
        Ok(())
    }

    /// Add the sub-block's output (`proj`) to the residual stream. Pre-norm: the residual is the
    /// block input, or the norm output (`normed`, still intact) for BLOOM's
    /// apply_residual_connection_post_layernorm. Post-norm (OPT-350m): add, then normalize the sum.
    fn finish_block(&self, norm: &Norm, t: usize, b: &mut Buffers) {
        let h = self.config.hidden_size;
        let hidden = &mut b.hidden[..t * h];
        let proj = &b.proj[..t * h];
        if self.config.pre_norm && self.config.residual_from_norm {
            for ((x, n), p) in hidden.iter_mut().zip(&b.normed[..t * h]).zip(proj) {
                *x = n + p;
            }
            return;
        }
        for (x, p) in hidden.iter_mut().zip(proj) {
            *x += p;
        }
        if !self.config.pre_norm {
            let normed = grow(&mut b.normed, t * h);
            norm.forward(hidden, normed);
            hidden.copy_from_slice(normed);
        }
    }

    fn mlp_block(&self, block: &Block, t: usize, b: &mut Buffers) -> Result<()> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let hidden = &b.hidden[..t * h];
        let normed = grow(&mut b.normed, t * h);
        let keep_normed = cfg.residual_from_norm;
        let norm = &block.mlp_norm;
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let inter = gate.linear.out_features();
                let a = grow(&mut b.mlp_a, t * inter);
                let u = grow(&mut b.mlp_b, t * inter);
                let outs = &mut [&mut *a, &mut *u];
                if cfg.pre_norm {
                    crate::quant::forward_normed(
                        norm,
                        &[gate, up],
                        hidden,
                        t,
                        normed,
                        keep_normed,
                        outs,
                    )?;
                } else {
                    crate::quant::forward_same_input(&[gate, up], hidden, t, outs)?;
                }
                let proj = grow(&mut b.proj, t * h);
                crate::quant::forward_gated(cfg.activation, down, a, u, t, proj)?;
            }
            Mlp::Plain { fc1, fc2 } => {
                let inter = fc1.linear.out_features();
                let a = grow(&mut b.mlp_a, t * inter);
                if cfg.pre_norm {
                    crate::quant::forward_normed(
                        norm,
                        &[fc1],
                        hidden,
                        t,
                        normed,
                        keep_normed,
                        &mut [&mut *a],
                    )?;
                } else {
                    fc1.forward(hidden, t, a)?;
                }
                activate(cfg.activation, a);
                let proj = grow(&mut b.proj, t * h);
                fc2.forward(a, t, proj)?;
            }
        }
        self.finish_block(&block.mlp_norm, t, b);
        Ok(())
    }
}

impl Architecture {
    /// The default MLP activation of the family.
    pub fn default_activation(self) -> Activation {
        match self {
            Architecture::Llama => Activation::Silu,
            Architecture::Opt => Activation::Relu,
            Architecture::Bloom => Activation::GeluTanh,
        }
    }
}

/// Runs `f` on a worker of rayon's pool while the other workers keep stealing: idle between two
/// parallel loops, a rayon worker soon sleeps, and waking it (a halted vCPU on a virtual machine)
/// cost the W8A8 prefill a quarter of the second thread's time. The stealers stop when `f`
/// returns or unwinds (a panic propagates; it never leaves them spinning with the scope waiting).
fn with_stealing_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    /// Sets the flag when dropped, on return or unwind alike.
    struct Release<'a>(&'a AtomicBool);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let driver = rayon::current_thread_index();
        let done = &done;
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| keep_stealing(done, driver));
        }
        let _release = Release(done);
        f()
    })
}

/// Runs the pool's pending jobs (stealing them from the worker driving a forward pass) until
/// `done`, spinning between them instead of sleeping. A no-op on the driving worker itself,
/// which may pop this job while it waits inside its own pass: looping there would wait forever
/// on the pass below it.
fn keep_stealing(done: &AtomicBool, driver: Option<usize>) {
    if rayon::current_thread_index() == driver {
        return;
    }
    while !done.load(Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stealers end with the pass: a normal return, and a panic, which propagates instead of
    /// leaving the scope waiting on workers that spin forever.
    #[test]
    fn stealing_workers_stop_when_the_pass_returns_or_panics() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let sum = pool.install(|| {
                with_stealing_workers(|| {
                    use rayon::prelude::*;
                    (0..10_000u64).into_par_iter().sum::<u64>()
                })
            });
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| with_stealing_workers(|| panic!("inside the pass")))
            }))
            .is_err();
            tx.send((sum, panicked)).unwrap();
        });
        let (sum, panicked) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the pass did not end: stealing workers kept the scope waiting");
        assert_eq!(sum, 10_000 * 9_999 / 2);
        assert!(panicked);
    }
}

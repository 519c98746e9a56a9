//! Building blocks shared by every architecture: norms, rotary embeddings, attention over the
//! KV cache, activations.

use crate::config::{Activation, NormKind};
use crate::int8_attention::{Int8KvLayer, Int8KvStore};
use crate::{ModelError, Result};
use rayon::prelude::*;
use sq_kernels::attention::{attend_row, Alibi, HeadKv};
use std::cell::RefCell;

/// A LayerNorm or RMSNorm with its Hugging Face name. Smoothing folds scales into `weight` and
/// `bias`, so both are public.
#[derive(Clone, Debug)]
pub struct Norm {
    pub name: String,
    pub kind: NormKind,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub eps: f32,
}

impl Norm {
    /// Normalize each row of `x` (`[rows, dim]`) into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let dim = self.weight.len();
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .with_min_len(8)
            .for_each(|(o, xr)| self.forward_row(xr, o));
    }

    #[inline]
    pub fn forward_row(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        match self.kind {
            NormKind::RmsNorm => {
                let ms = lane_sum(x, |v| v * v) / n;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(&self.weight) {
                    *o = w * (v * r);
                }
            }
            NormKind::LayerNorm => {
                let mean = lane_sum(x, |v| v) / n;
                let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
                let r = 1.0 / (var + self.eps).sqrt();
                match &self.bias {
                    Some(b) => {
                        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(&self.weight).zip(b) {
                            *o = (v - mean) * r * w + b;
                        }
                    }
                    None => {
                        for ((o, &v), &w) in out.iter_mut().zip(x).zip(&self.weight) {
                            *o = (v - mean) * r * w;
                        }
                    }
                }
            }
        }
    }
}

/// `Σ f(x)` in 16 independent partial sums (one vector register; a single running f32 sum is a
/// chain of dependent adds the compiler may not reorder), combined pairwise.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// Apply an activation in place (for gated MLPs `x` is the gate).
pub fn activate(act: Activation, x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|c| activate_serial(act, c));
}

/// [`activate`] on the calling thread (the same values, element by element).
pub fn activate_serial(act: Activation, x: &mut [f32]) {
    if act == Activation::Silu {
        return sq_kernels::math::silu_inplace(x);
    }
    for v in x {
        *v = match act {
            Activation::Silu => *v / (1.0 + (-*v).exp()),
            Activation::Relu => v.max(0.0),
            Activation::GeluTanh => {
                let x = *v;
                0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044715 * x * x)).tanh())
            }
            Activation::Gelu => {
                let x = *v as f64;
                (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
            }
        }
    }
}

/// erf with < 1.2e-7 absolute error (Numerical Recipes' erfc Chebyshev fit).
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let ans = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - ans
    } else {
        ans - 1.0
    }
}

/// The cosines and sines of every position `pos0..pos0 + rows` and frequency (`[rows, 2,
/// head_dim / 2]`: a row's cosines, then its sines) into `out`: computed once per forward pass
/// and shared by every layer's queries and keys (`sin_cos` per layer was 1.3% of a W8A8
/// prefill).
pub fn rope_table(pos0: usize, rows: usize, head_dim: usize, inv_freq: &[f32], out: &mut Vec<f32>) {
    let half = head_dim / 2;
    out.clear();
    out.resize(rows * half * 2, 0.0);
    for (t, row) in out.chunks_exact_mut(2 * half).enumerate() {
        let pos = (pos0 + t) as f32;
        let (cos, sin) = row.split_at_mut(half);
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
            // Same f32 product as PyTorch (`inv_freq @ position`), then cos/sin.
            (*s, *c) = (pos * f).sin_cos();
        }
    }
}

/// Rotate `x` (`[rows, heads * head_dim]`) in place with Hugging Face's `rotate_half`
/// convention (pairs `(i, i + head_dim/2)`), row `t` by the angles of row `t` of `table` (from
/// [`rope_table`], whose rows must cover `x`'s). Cosines and sines lie apart in the table, so
/// the loop over a head's pairs vectorizes.
pub fn apply_rope_table(x: &mut [f32], heads: usize, head_dim: usize, table: &[f32]) {
    let half = head_dim / 2;
    let width = heads * head_dim;
    if half == 0 {
        return;
    }
    x.par_chunks_mut(width)
        .zip(table.par_chunks(2 * half))
        .with_min_len(16)
        .for_each(|(row, angles)| {
            let (cos, sin) = angles.split_at(half);
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x1 * c + x0 * s;
                }
            }
        });
}

/// Keys and values of every layer, preallocated for `capacity` positions so decoding never
/// allocates. Layout per layer: `[position, kv_head, head_dim]`, in f32 or (INT8 attention) as
/// INT8 codes with one scale per position and KV head.
#[derive(Debug)]
pub struct KvCache {
    store: KvStore,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

#[derive(Debug)]
enum KvStore {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    Int8(Int8KvStore),
}

/// One layer's cached keys and values.
#[derive(Clone, Copy, Debug)]
pub enum LayerKv<'a> {
    F32 { keys: &'a [f32], values: &'a [f32] },
    Int8(Int8KvLayer<'a>),
}

impl KvCache {
    /// An f32 cache.
    pub fn new(layers: usize, kv_dim: usize, capacity: usize) -> Self {
        KvCache {
            store: KvStore::F32 {
                keys: (0..layers).map(|_| vec![0.0; kv_dim * capacity]).collect(),
                values: (0..layers).map(|_| vec![0.0; kv_dim * capacity]).collect(),
            },
            kv_dim,
            capacity,
            len: 0,
        }
    }

    /// An INT8 cache (one f32 scale per position and KV head).
    pub fn new_int8(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCache {
            store: KvStore::Int8(Int8KvStore::new(layers, kv_heads, head_dim, capacity)),
            kv_dim: kv_heads * head_dim,
            capacity,
            len: 0,
        }
    }

    /// Whether keys and values are held as INT8.
    pub fn is_int8(&self) -> bool {
        matches!(self.store, KvStore::Int8(_))
    }

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
    /// Forget every position (start a new sequence); keeps the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Drop positions past `len` (e.g. to re-run a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn check_room(&self, new_tokens: usize) -> Result<()> {
        if self.len + new_tokens > self.capacity {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds the KV cache capacity of {} positions (the model's context length or the session's limit)",
                self.len + new_tokens,
                self.capacity
            )));
        }
        Ok(())
    }

    /// Write `k` and `v` (`[tokens, kv_dim]`) at the next positions (INT8: quantized here).
    pub(crate) fn store(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        match &mut self.store {
            KvStore::F32 { keys, values } => {
                let start = self.len * self.kv_dim;
                keys[layer][start..start + k.len()].copy_from_slice(k);
                values[layer][start..start + v.len()].copy_from_slice(v);
                Ok(())
            }
            KvStore::Int8(store) => store.store(layer, self.len, k, v),
        }
    }

    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    pub(crate) fn layer(&self, layer: usize) -> LayerKv<'_> {
        match &self.store {
            KvStore::F32 { keys, values } => LayerKv::F32 {
                keys: &keys[layer],
                values: &values[layer],
            },
            KvStore::Int8(store) => LayerKv::Int8(store.layer(layer)),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStore::F32 { keys, .. } => 4 * 2 * keys.len() * self.kv_dim * self.capacity,
            KvStore::Int8(store) => store.bytes(),
        }
    }

    /// Bytes a cache of `capacity` positions holds, without allocating it: f32, or INT8 codes
    /// plus one f32 scale per position and KV head.
    pub fn bytes_for(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        int8: bool,
    ) -> usize {
        let per_position = if int8 {
            kv_heads * head_dim + 4 * kv_heads
        } else {
            4 * kv_heads * head_dim
        };
        2 * layers * capacity * per_position
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Shape of one attention call.
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Position of the first query row.
    pub pos0: usize,
    /// Multiplier of q·k (1/sqrt(head_dim), or 1 when Q is pre-scaled as in OPT).
    pub scale: f32,
    pub sliding_window: Option<usize>,
}

/// Causal attention of `q` (`[rows, heads * head_dim]`, row `t` at position `pos0 + t`) over
/// the cached keys/values of positions `0..=pos0 + t`, writing `out` like `q`. `alibi` gives a
/// per-head slope added as `slope * key_position` (BLOOM).
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        pos0,
        scale,
        sliding_window,
    } = *shape;
    let q_width = heads * head_dim;
    let kv_width = kv_heads * head_dim;
    let group = heads / kv_heads;
    // One unit per (query row, head): a decode step splits its heads across the threads when
    // the keys make that worth a fork.
    let unit = |i: usize, o_head: &mut [f32]| {
        let (t, h) = (i / heads, i % heads);
        let pos = pos0 + t;
        let first = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let n = pos + 1 - first;
        let at = first * kv_width + (h / group) * head_dim;
        let kv = HeadKv {
            keys: &keys[at..],
            values: &values[at..],
            stride: kv_width,
            n,
        };
        let q_head = &q[t * q_width + h * head_dim..][..head_dim];
        let alibi = alibi.map(|slopes| Alibi {
            slope: slopes[h],
            first,
        });
        crate::scratch::with_scratch(&SCORES, |scores| {
            if scores.len() < n {
                scores.resize(n, 0.0);
            }
            attend_row(q_head, kv, scale, alibi, &mut scores[..n], o_head);
        });
    };
    let units = out.len() / head_dim.max(1);
    let keys_seen = pos0 + units / heads.max(1);
    let work = units * keys_seen * head_dim;
    if parallel_attention(work) {
        // Decode-sized: the spinning team (rayon's wake-up costs more than a head's work).
        sq_kernels::team::run_chunks_mut(out, head_dim, rayon::current_num_threads(), &unit);
    } else {
        for (i, o) in out.chunks_exact_mut(head_dim).enumerate() {
            unit(i, o);
        }
    }
}

/// Multiply-adds of q·k and P·V below which [`attention`] stays on the calling thread.
pub const PARALLEL_ATTENTION_WORK: usize = 1 << 17;

pub(crate) fn parallel_attention(work: usize) -> bool {
    work >= PARALLEL_ATTENTION_WORK && rayon::current_num_threads() > 1
}

/// Below this many query rows, [`attention`] runs its row loop; above, the per-head GEMM path.
pub const GEMM_ATTENTION_MIN_ROWS: usize = 16;

/// Query rows per block of [`attention_gemm`]'s causal loop.
const CAUSAL_BLOCK: usize = 32;

/// One worker's scratch of [`attention_gemm`], kept between calls so a prefill allocates (and
/// page-faults) nothing per layer: a KV head's packed K and V, reused by the query heads of its
/// group that run on this worker in the same call, and one causal block's scores.
#[derive(Default)]
struct GemmAttentionScratch {
    keys: sq_kernels::PackedB,
    values: sq_kernels::PackedB,
    /// `(call, kv head)` whose K and V are packed above.
    packed_for: Option<(u64, usize)>,
    scores: Vec<f32>,
    inv_sums: Vec<f32>,
}

thread_local! {
    static GEMM_ATTENTION: RefCell<GemmAttentionScratch> = RefCell::new(GemmAttentionScratch::default());
    // The calling thread's `[heads, rows, head_dim]` output of [`attention_gemm`].
    static HEAD_MAJOR: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Numbers [`attention_gemm`] calls, so a worker's packed K and V are never taken for another
/// call's (another layer's keys can sit at the same address).
static GEMM_ATTENTION_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Causal attention for a prefill chunk on the f32 GEMM: per head, `S = scale · Q Kᵀ` and
/// `O = softmax(S) V` as two strided GEMMs (heads in parallel), with the same masking, ALiBi and
/// sliding window as [`attention`]. The softmax leaves its division to `O`'s rows (`head_dim`
/// values each instead of one per key). Scratch is per worker and kept between calls.
pub fn attention_gemm(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
) -> crate::Result<()> {
    let t = q.len() / (shape.heads * shape.head_dim).max(1);
    let len = shape.heads * t * shape.head_dim;
    let mut head_major = crate::scratch::with_scratch(&HEAD_MAJOR, std::mem::take);
    if head_major.len() < len {
        head_major.resize(len, 0.0);
    }
    let result = attention_gemm_heads(q, keys, values, shape, alibi, &mut head_major[..len]);
    if result.is_ok() {
        let (heads, head_dim) = (shape.heads, shape.head_dim);
        for (h, o) in head_major[..len].chunks_exact(t * head_dim).enumerate() {
            for (row, src) in out
                .chunks_exact_mut(heads * head_dim)
                .zip(o.chunks_exact(head_dim))
            {
                row[h * head_dim..(h + 1) * head_dim].copy_from_slice(src);
            }
        }
    }
    crate::scratch::with_scratch(&HEAD_MAJOR, |b| *b = head_major);
    result
}

/// [`attention_gemm`] into `head_major` (`[heads, rows, head_dim]`).
fn attention_gemm_heads(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    head_major: &mut [f32],
) -> crate::Result<()> {
    use sq_kernels::{sgemm_packed_serial, MatMut, MatRef, Transpose};
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        pos0,
        scale,
        sliding_window,
    } = *shape;
    let q_width = heads * head_dim;
    let kv_width = kv_heads * head_dim;
    let group = heads / kv_heads;
    let t = q.len() / q_width;
    let n_keys = pos0 + t;
    let call = GEMM_ATTENTION_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let head = |h: usize, o: &mut [f32], s: &mut GemmAttentionScratch| -> crate::Result<()> {
        let kvh = h / group;
        // K and V of the head packed once for every causal block (a block reads a prefix of
        // K's panels and a window of V's rows), and for the next heads of its group.
        if s.packed_for != Some((call, kvh)) {
            s.packed_for = None;
            for (packed, data, op) in [
                (&mut s.keys, keys, Transpose::Yes),
                (&mut s.values, values, Transpose::No),
            ] {
                let head = MatRef {
                    data: &data[kvh * head_dim..],
                    rows: n_keys,
                    cols: head_dim,
                    row_stride: kv_width,
                };
                packed.pack(head, op)?;
            }
            s.packed_for = Some((call, kvh));
        }
        let block_len = CAUSAL_BLOCK.min(t) * n_keys;
        if s.scores.len() < block_len {
            s.scores.resize(block_len, 0.0);
        }
        if s.inv_sums.len() < CAUSAL_BLOCK {
            s.inv_sums.resize(CAUSAL_BLOCK, 0.0);
        }
        // Causal: a block of query rows needs only the keys up to its last position, so
        // the masked upper triangle is never computed (half the work of a fresh prompt).
        for r0 in (0..t).step_by(CAUSAL_BLOCK) {
            let r1 = (r0 + CAUSAL_BLOCK).min(t);
            let rows = r1 - r0;
            // First key of the block, at a panel edge of the packed K (a sliding window's
            // earlier keys are masked below like the causal ones).
            let k0 = sliding_window.map_or(0, |w| (pos0 + r0 + 1).saturating_sub(w));
            let k0 = k0 - k0 % 16;
            let k1 = pos0 + r1;
            let nk = k1 - k0;
            let block = &mut s.scores[..rows * nk];
            let qv = MatRef {
                data: &q[r0 * q_width + h * head_dim..],
                rows,
                cols: head_dim,
                row_stride: q_width,
            };
            sgemm_packed_serial(scale, qv, &s.keys, 0, k0, 0.0, MatMut::new(block, rows, nk))?;
            for ((i, row), inv) in block
                .chunks_exact_mut(nk)
                .enumerate()
                .zip(s.inv_sums.iter_mut())
            {
                let pos = pos0 + r0 + i;
                let first = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                if let Some(slopes) = alibi {
                    for (j, s) in row
                        .iter_mut()
                        .enumerate()
                        .take(pos + 1 - k0)
                        .skip(first - k0)
                    {
                        *s += slopes[h] * (k0 + j) as f32;
                    }
                }
                *inv = 1.0 / sq_kernels::math::exp_sum_inplace(&mut row[first - k0..=pos - k0]);
                row[..first - k0].fill(0.0);
                row[pos + 1 - k0..].fill(0.0);
            }
            let o_block = &mut o[r0 * head_dim..r1 * head_dim];
            sgemm_packed_serial(
                1.0,
                MatRef::new(block, rows, nk),
                &s.values,
                k0,
                0,
                0.0,
                MatMut::new(o_block, rows, head_dim),
            )?;
            for (o_row, &inv) in o_block.chunks_exact_mut(head_dim).zip(&s.inv_sums) {
                for x in o_row {
                    *x *= inv;
                }
            }
        }
        Ok(())
    };
    head_major
        .par_chunks_mut(t * head_dim)
        .enumerate()
        .try_for_each(|(h, o)| crate::scratch::with_scratch(&GEMM_ATTENTION, |s| head(h, o, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode step (one query row) over many keys splits its heads across the threads: the
    /// result is bit for bit the serial one, and equals an f64 evaluation of the definition.
    #[test]
    fn threaded_decode_attention_equals_serial() {
        let (heads, kv_heads, hd) = (9, 3, 64);
        let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0;
        for (pos0, t, window, with_alibi) in [
            (700, 1, None, false),
            (900, 1, Some(300), true),
            (600, 3, None, false),
        ] {
            let n = pos0 + t;
            let q: Vec<f32> = (0..t * heads * hd).map(val).collect();
            let keys: Vec<f32> = (0..n * kv_heads * hd).map(|i| val(i + 7)).collect();
            let values: Vec<f32> = (0..n * kv_heads * hd).map(|i| val(i + 13)).collect();
            let slopes = crate::config::alibi_slopes(heads);
            let alibi = with_alibi.then_some(slopes.as_slice());
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                pos0,
                scale: 0.125,
                sliding_window: window,
            };
            assert!(t * heads * n * hd >= PARALLEL_ATTENTION_WORK);
            let mut outs = Vec::new();
            for threads in [1, 2, 4] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![f32::NAN; t * heads * hd];
                pool.install(|| attention(&q, &keys, &values, &shape, alibi, &mut out));
                outs.push(out);
            }
            for o in &outs[1..] {
                let same = o
                    .iter()
                    .zip(&outs[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "pos0 {pos0} t {t}: threaded result differs");
            }
            // The definition in f64, row 0 (position pos0) of every head.
            let kvw = kv_heads * hd;
            let first = window.map_or(0, |w| (pos0 + 1).saturating_sub(w));
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let s: Vec<f64> = (first..=pos0)
                    .map(|p| {
                        let dot: f64 = (0..hd)
                            .map(|i| q[h * hd + i] as f64 * keys[p * kvw + kvh * hd + i] as f64)
                            .sum();
                        dot * 0.125 + alibi.map_or(0.0, |a| a[h] as f64 * p as f64)
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for i in 0..hd {
                    let want: f64 = (first..=pos0)
                        .zip(&e)
                        .map(|(p, w)| w / sum * values[p * kvw + kvh * hd + i] as f64)
                        .sum();
                    let got = outs[0][h * hd + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head {h} dim {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The table and the vectorized rotation against the rotate_half definition, pair by pair
    /// (the same f32 operations, so exactly).
    #[test]
    fn rope_table_rotation_matches_the_definition() {
        let (heads, hd, rows, pos0) = (3, 10, 7, 4);
        let half = hd / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
            .collect();
        let x: Vec<f32> = (0..rows * heads * hd)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let mut table = Vec::new();
        rope_table(pos0, rows, hd, &inv_freq, &mut table);
        let mut got = x.clone();
        apply_rope_table(&mut got, heads, hd, &table);
        for t in 0..rows {
            for h in 0..heads {
                for (i, &f) in inv_freq.iter().enumerate() {
                    let (sin, cos) = ((pos0 + t) as f32 * f).sin_cos();
                    let at = t * heads * hd + h * hd + i;
                    let (a, b) = (x[at], x[at + half]);
                    assert_eq!(got[at], a * cos - b * sin, "row {t} head {h} pair {i}");
                    assert_eq!(
                        got[at + half],
                        b * cos + a * sin,
                        "row {t} head {h} pair {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn gemm_attention_equals_the_row_loop() {
        let (heads, kv_heads, hd) = (6, 2, 8);
        for (pos0, t, window, with_alibi) in [
            (0, 20, None, false),
            (5, 17, Some(7), false),
            (3, 33, None, true),
            (0, 16, Some(4), true),
            // Several causal blocks.
            (0, 150, None, false),
            (9, 131, Some(40), true),
        ] {
            let n = pos0 + t;
            let val = |i: usize| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0;
            let q: Vec<f32> = (0..t * heads * hd).map(val).collect();
            let keys: Vec<f32> = (0..n * kv_heads * hd).map(|i| val(i + 7)).collect();
            let values: Vec<f32> = (0..n * kv_heads * hd).map(|i| val(i + 13)).collect();
            let slopes = crate::config::alibi_slopes(heads);
            let alibi = with_alibi.then_some(slopes.as_slice());
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                pos0,
                scale: 0.35,
                sliding_window: window,
            };
            let mut a = vec![0.0; t * heads * hd];
            let mut b = vec![0.0; t * heads * hd];
            attention(&q, &keys, &values, &shape, alibi, &mut a);
            attention_gemm(&q, &keys, &values, &shape, alibi, &mut b).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "pos0 {pos0} t {t} window {window:?} alibi {with_alibi}: {x} vs {y}"
                );
            }
        }
    }
}

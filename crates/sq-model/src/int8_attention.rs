//! INT8 attention (`--int8-attention`): an INT8 KV cache and both attention products
//! (`Q·Kᵀ` and `P·V`) on the sq-kernels INT8 batched GEMM ([`Int8Gemm::bmm`]).
//!
//! Quantization (symmetric, dynamic, `absmax / 127`, sq-kernels' one rounding rule):
//! - K and V: one scale per (position, KV head), fixed when the position is written, so the
//!   cache never re-quantizes and a position's codes do not depend on what follows.
//! - Q: one scale per (token, head).
//! - Scores: `acc · Δq[i] · Δk[j] · scale` (+ ALiBi), a per-row × per-column epilogue.
//! - `P·V`: V's scale lies along the reduction axis, so it is folded into the probabilities:
//!   `P'[i, j] = P[i, j] · Δv[j]`, quantized per row (`P' >= 0`, codes in `[0, 127]`), and
//!   `out[i] = acc · Δp'[i]`.
//!
//! [`attention_fake_quant`] computes the same quantization grid in f32 arithmetic (quantize,
//! dequantize, float products); it exists only as the test oracle of [`attention_int8`].

use crate::layers::AttentionShape;
use crate::Result;
use rayon::prelude::*;
use sq_kernels::attention::{dot_i8_rows, scores_from_i32, weighted_sum_i8_rows, Alibi};
use sq_kernels::{quantize_per_token, quantize_softmax_row, BatchedI8, BmmOutput, Int8Gemm};
use std::sync::Arc;

/// How a model computes attention and stores its KV cache.
#[derive(Clone, Debug, Default)]
pub enum AttentionMode {
    /// f32 products and an f32 KV cache.
    #[default]
    F32,
    /// INT8 KV cache and both products on this backend's INT8 batched GEMM.
    Int8(Arc<dyn Int8Gemm>),
    /// The INT8 cache with the products quantized and dequantized in f32: the test oracle of
    /// [`AttentionMode::Int8`], not a mode to run models with.
    #[doc(hidden)]
    FakeQuantInt8,
}

impl AttentionMode {
    /// Whether the KV cache holds INT8.
    pub fn is_int8(&self) -> bool {
        !matches!(self, AttentionMode::F32)
    }
}

/// The INT8 keys and values of every layer: codes `[position, kv_head, head_dim]` and one f32
/// scale per `[position, kv_head]`, preallocated for the session's capacity.
#[derive(Debug)]
pub(crate) struct Int8KvStore {
    keys: Vec<Vec<i8>>,
    values: Vec<Vec<i8>>,
    key_scales: Vec<Vec<f32>>,
    value_scales: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
}

/// One layer's INT8 cache as the attention reads it.
#[derive(Clone, Copy, Debug)]
pub struct Int8KvLayer<'a> {
    /// `[capacity, kv_heads * head_dim]` codes.
    pub keys: &'a [i8],
    pub values: &'a [i8],
    /// `[capacity, kv_heads]` scales.
    pub key_scales: &'a [f32],
    pub value_scales: &'a [f32],
}

impl Int8KvStore {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let codes = || {
            (0..layers)
                .map(|_| vec![0i8; kv_heads * head_dim * capacity])
                .collect()
        };
        let scales = || {
            (0..layers)
                .map(|_| vec![0f32; kv_heads * capacity])
                .collect()
        };
        Int8KvStore {
            keys: codes(),
            values: codes(),
            key_scales: scales(),
            value_scales: scales(),
            kv_heads,
            head_dim,
        }
    }

    /// Quantize `k` and `v` (`[tokens, kv_heads * head_dim]`) into positions `pos0..`.
    pub(crate) fn store(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (kvh, hd) = (self.kv_heads, self.head_dim);
        let rows = k.len() / hd;
        let (c0, s0) = (pos0 * kvh * hd, pos0 * kvh);
        quantize_per_token(
            k,
            rows,
            hd,
            &mut self.keys[layer][c0..c0 + k.len()],
            &mut self.key_scales[layer][s0..s0 + rows],
        )?;
        quantize_per_token(
            v,
            rows,
            hd,
            &mut self.values[layer][c0..c0 + v.len()],
            &mut self.value_scales[layer][s0..s0 + rows],
        )?;
        Ok(())
    }

    pub(crate) fn layer(&self, layer: usize) -> Int8KvLayer<'_> {
        Int8KvLayer {
            keys: &self.keys[layer],
            values: &self.values[layer],
            key_scales: &self.key_scales[layer],
            value_scales: &self.value_scales[layer],
        }
    }

    /// Bytes held: one byte per code, four per scale.
    pub(crate) fn bytes(&self) -> usize {
        let codes: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        let scales: usize = self
            .key_scales
            .iter()
            .chain(&self.value_scales)
            .map(Vec::len)
            .sum();
        codes + 4 * scales
    }
}

/// Scratch of [`attention_int8`], grown once and reused (a session owns one, so decoding
/// allocates nothing per token).
#[derive(Debug, Default)]
pub struct Int8AttentionScratch {
    /// Q codes `[tokens, heads, head_dim]` as quantized, then head-major `[heads, tokens, head_dim]`.
    q_token_major: Vec<i8>,
    q_head_major: Vec<i8>,
    /// Q scales `[tokens, heads]`.
    q_scales: Vec<f32>,
    /// `Q·Kᵀ` accumulators `[heads, tokens, keys]`.
    scores_acc: Vec<i32>,
    /// The block's key scales (times the softmax scale) and value scales, `[kv_heads, keys]`:
    /// contiguous per KV head, so the score and fold loops vectorize.
    key_scales: Vec<f32>,
    value_scales: Vec<f32>,
    /// Score rows `[heads, tokens, keys]` (softmax work space), then the codes of `P · Δv` and
    /// their per-row scales.
    probs: Vec<f32>,
    probs_q: Vec<i8>,
    probs_scales: Vec<f32>,
    /// `P'·V` accumulators `[heads, tokens, head_dim]`.
    out_acc: Vec<i32>,
}

/// Up to this many query rows (decode, short chunks) [`attention_int8`] reads the cache rows in
/// place ([`dot_i8_rows`], [`weighted_sum_i8_rows`]) instead of packing them for the batched
/// GEMM: for one row the packing costs as much as the product.
const DIRECT_ROWS: usize = 4;

/// Query rows per causal block of [`attention_int8`].
const CAUSAL_BLOCK: usize = 64;

fn grow<T: Clone + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// The first key position row `pos` attends to.
fn first_key(pos: usize, sliding_window: Option<usize>) -> usize {
    sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// Positions `k0..k0 + keys` of a cache layer's codes as `[kv_heads, keys, head_dim]`.
fn cache_heads(
    codes: &[i8],
    k0: usize,
    keys: usize,
    kv_heads: usize,
    head_dim: usize,
) -> BatchedI8<'_> {
    let width = kv_heads * head_dim;
    BatchedI8 {
        data: &codes[k0 * width..],
        batch: kv_heads,
        rows: keys,
        cols: head_dim,
        batch_stride: head_dim,
        row_stride: width,
    }
}

/// Causal attention of `q` (`[rows, heads * head_dim]`, row `t` at position `pos0 + t`) over
/// the INT8 cache (positions `0..pos0 + rows` already stored), writing `out` like `q`; ALiBi
/// and sliding windows as [`crate::layers::attention`]. Both products run on `backend.bmm`,
/// one call each for all heads.
pub fn attention_int8(
    q: &[f32],
    kv: Int8KvLayer<'_>,
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
    backend: &dyn Int8Gemm,
    scratch: &mut Int8AttentionScratch,
) -> Result<()> {
    let (heads, hd) = (shape.heads, shape.head_dim);
    if q.len() <= DIRECT_ROWS * heads * hd {
        attention_int8_direct(q, kv, shape, alibi, out, scratch)
    } else {
        attention_int8_blocked(q, kv, shape, alibi, out, backend, scratch)
    }
}

/// [`attention_int8`] on the batched GEMM, in causal blocks of query rows.
fn attention_int8_blocked(
    q: &[f32],
    kv: Int8KvLayer<'_>,
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
    backend: &dyn Int8Gemm,
    scratch: &mut Int8AttentionScratch,
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos0,
        scale,
        sliding_window,
    } = *shape;
    let q_width = heads * hd;
    let group = heads / kv_heads;
    let t = q.len() / q_width;

    // Q per (token, head), then KV-head-major `[kv_heads, tokens, group, head_dim]`, so that the
    // `group` heads sharing a KV head over a block of tokens are one `[rows * group, head_dim]`
    // matrix.
    let q_tm = grow(&mut scratch.q_token_major, t * q_width);
    let q_scales = grow(&mut scratch.q_scales, t * heads);
    quantize_per_token(q, t * heads, hd, q_tm, q_scales)?;
    let q_hm = grow(&mut scratch.q_head_major, t * q_width);
    let gw = group * hd;
    for (g, dst) in q_hm.chunks_exact_mut(t * gw).enumerate() {
        for (i, d) in dst.chunks_exact_mut(gw).enumerate() {
            d.copy_from_slice(&q_tm[i * q_width + g * gw..][..gw]);
        }
    }
    let q_scales = &*q_scales;

    // Causal blocks of query rows: a block needs only the keys up to its last position (and
    // from its first row's window start), so the masked upper triangle of a prompt is neither
    // multiplied nor passed through the softmax. Every row sees the same values as with one
    // block for all rows (masked entries are zeros that change no row's scale).
    for r0 in (0..t).step_by(CAUSAL_BLOCK) {
        let r1 = (r0 + CAUSAL_BLOCK).min(t);
        let rows = (r1 - r0) * group;
        let k0 = first_key(pos0 + r0, sliding_window);
        let nk = pos0 + r1 - k0;
        // One KV head per batch entry: `[keys, head_dim]` rows strided by the cache's width.
        let cache = |codes| -> BatchedI8<'_> { cache_heads(codes, k0, nk, kv_heads, hd) };
        let acc = grow(&mut scratch.scores_acc, kv_heads * rows * nk);
        backend.bmm(
            BatchedI8 {
                data: &q_hm[r0 * gw..],
                batch: kv_heads,
                rows,
                cols: hd,
                batch_stride: t * gw,
                row_stride: hd,
            },
            cache(kv.keys),
            true,
            BmmOutput::i32(acc, rows, nk),
        )?;

        let key_scales = grow(&mut scratch.key_scales, kv_heads * nk);
        let value_scales = grow(&mut scratch.value_scales, kv_heads * nk);
        gather_scales(kv, k0, nk, kv_heads, scale, key_scales, value_scales);
        let (key_scales, value_scales) = (&*key_scales, &*value_scales);

        // Scores, softmax, V's scales folded into the probabilities and their quantization, one
        // fused pass per row (g, i, gi) over the keys it sees; masked keys get code 0.
        let probs = grow(&mut scratch.probs, kv_heads * rows * nk);
        let probs_q = grow(&mut scratch.probs_q, kv_heads * rows * nk);
        let probs_scales = grow(&mut scratch.probs_scales, kv_heads * rows);
        probs
            .par_chunks_mut(nk)
            .zip(probs_q.par_chunks_mut(nk))
            .zip(probs_scales.par_iter_mut())
            .zip(acc.par_chunks(nk))
            .enumerate()
            .with_min_len(4)
            .try_for_each(|(r, (((p, codes), p_scale), a))| -> Result<()> {
                let (g, rem) = (r / rows, r % rows);
                let (i, h) = (r0 + rem / group, g * group + rem % group);
                let pos = pos0 + i;
                let valid = first_key(pos, sliding_window) - k0..pos + 1 - k0;
                let keys = &key_scales[g * nk..(g + 1) * nk];
                let alibi = alibi.map(|slopes| Alibi {
                    slope: slopes[h],
                    first: k0 + valid.start,
                });
                let p = &mut p[valid.clone()];
                scores_from_i32(
                    &a[valid.clone()],
                    q_scales[i * heads + h],
                    &keys[valid.clone()],
                    alibi,
                    p,
                );
                codes[..valid.start].fill(0);
                codes[valid.end..].fill(0);
                *p_scale = quantize_softmax_row(
                    p,
                    &value_scales[g * nk..(g + 1) * nk][valid.clone()],
                    &mut codes[valid],
                )?;
                Ok(())
            })?;

        let out_acc = grow(&mut scratch.out_acc, kv_heads * rows * hd);
        backend.bmm(
            BatchedI8::contiguous(probs_q, kv_heads, rows, nk),
            cache(kv.values),
            false,
            BmmOutput::i32(out_acc, rows, hd),
        )?;
        let probs_scales = &*probs_scales;
        let out_acc = &*out_acc;
        out[r0 * q_width..r1 * q_width]
            .par_chunks_mut(q_width)
            .enumerate()
            .for_each(|(i, o_row)| {
                for (h, o) in o_row.chunks_exact_mut(hd).enumerate() {
                    let (g, gi) = (h / group, h % group);
                    let r = g * rows + i * group + gi;
                    let dp = probs_scales[r];
                    for (o, &a) in o.iter_mut().zip(&out_acc[r * hd..(r + 1) * hd]) {
                        *o = a as f32 * dp;
                    }
                }
            });
    }
    Ok(())
}

/// [`attention_int8`] for a few query rows: each (row, head) reads the cache's codes in place.
/// The integer products equal the batched GEMM's, so the result is the same bit for bit.
fn attention_int8_direct(
    q: &[f32],
    kv: Int8KvLayer<'_>,
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
    scratch: &mut Int8AttentionScratch,
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos0,
        scale,
        sliding_window,
    } = *shape;
    let q_width = heads * hd;
    let kv_width = kv_heads * hd;
    let group = heads / kv_heads;
    let t = q.len() / q_width;
    let q_codes = grow(&mut scratch.q_token_major, t * q_width);
    let q_scales = grow(&mut scratch.q_scales, t * heads);
    quantize_per_token(q, t * heads, hd, q_codes, q_scales)?;
    let (q_codes, q_scales) = (&*q_codes, &*q_scales);
    let k0 = first_key(pos0, sliding_window);
    let nk = pos0 + t - k0;
    let key_scales = grow(&mut scratch.key_scales, kv_heads * nk);
    let value_scales = grow(&mut scratch.value_scales, kv_heads * nk);
    gather_scales(kv, k0, nk, kv_heads, scale, key_scales, value_scales);
    let (key_scales, value_scales) = (&*key_scales, &*value_scales);
    // One unit per (row, head), its i32 scores, softmax row, P codes and P·V sums in this
    // thread's scratch.
    let unit = |r: usize, o: &mut [f32]| -> Result<()> {
        let (i, h) = (r / heads, r % heads);
        let g = h / group;
        let pos = pos0 + i;
        let valid = first_key(pos, sliding_window) - k0..pos + 1 - k0;
        let n = valid.len();
        crate::scratch::with_scratch(&ROW, |row| {
            let RowScratch {
                acc,
                probs,
                codes,
                out_acc,
            } = row;
            let (a, p, codes, o_acc) = (
                grow(acc, n),
                grow(probs, n),
                grow(codes, n),
                grow(out_acc, hd),
            );
            let rows = &kv.keys[(k0 + valid.start) * kv_width + g * hd..];
            dot_i8_rows(&q_codes[r * hd..(r + 1) * hd], rows, kv_width, a);
            let alibi = alibi.map(|slopes| Alibi {
                slope: slopes[h],
                first: k0 + valid.start,
            });
            let keys = &key_scales[g * nk..(g + 1) * nk];
            scores_from_i32(a, q_scales[r], &keys[valid.clone()], alibi, p);
            let values = &value_scales[g * nk..(g + 1) * nk];
            let p_scale = quantize_softmax_row(p, &values[valid.clone()], codes)?;
            let rows = &kv.values[(k0 + valid.start) * kv_width + g * hd..];
            weighted_sum_i8_rows(codes, rows, kv_width, o_acc);
            for (o, &s) in o.iter_mut().zip(o_acc.iter()) {
                *o = s as f32 * p_scale;
            }
            Ok(())
        })
    };
    let work = t * heads * nk * hd;
    if crate::layers::parallel_attention(work) {
        // The spinning team, as the f32 decode attention: a rayon fork from the calling thread
        // costs two context switches a layer, more than a head's work.
        let failed = std::sync::Mutex::new(None);
        sq_kernels::team::run_chunks_mut(out, hd, rayon::current_num_threads(), &|r, o| {
            if let Err(e) = unit(r, o) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    } else {
        out.chunks_exact_mut(hd)
            .enumerate()
            .try_for_each(|(r, o)| unit(r, o))
    }
}

/// Per-thread work space of one (row, head) of [`attention_int8_direct`].
#[derive(Default)]
struct RowScratch {
    acc: Vec<i32>,
    probs: Vec<f32>,
    codes: Vec<i8>,
    out_acc: Vec<i32>,
}

thread_local! {
    static ROW: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::default());
}

/// The scales of cache positions `k0..k0 + nk` as `[kv_heads, nk]` rows (keys times the
/// softmax scale), so the per-row loops read them contiguously.
fn gather_scales(
    kv: Int8KvLayer<'_>,
    k0: usize,
    nk: usize,
    kv_heads: usize,
    scale: f32,
    key_scales: &mut [f32],
    value_scales: &mut [f32],
) {
    let range = k0 * kv_heads..(k0 + nk) * kv_heads;
    for (j, (ks, vs)) in kv.key_scales[range.clone()]
        .chunks_exact(kv_heads)
        .zip(kv.value_scales[range].chunks_exact(kv_heads))
        .enumerate()
    {
        for g in 0..kv_heads {
            key_scales[g * nk + j] = ks[g] * scale;
            value_scales[g * nk + j] = vs[g];
        }
    }
}

/// The oracle of [`attention_int8`]: Q, K and V quantized and dequantized exactly as there,
/// `P·Δv` quantized per row the same way, every product in f32 (allocates; tests only).
#[doc(hidden)]
pub fn attention_fake_quant(
    q: &[f32],
    kv: Int8KvLayer<'_>,
    shape: &AttentionShape,
    alibi: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos0,
        scale,
        sliding_window,
    } = *shape;
    let q_width = heads * hd;
    let kv_width = kv_heads * hd;
    let group = heads / kv_heads;
    let t = q.len() / q_width;
    let n = pos0 + t;
    let mut q_codes = vec![0i8; q.len()];
    let mut q_scales = vec![0f32; t * heads];
    quantize_per_token(q, t * heads, hd, &mut q_codes, &mut q_scales)?;
    let dequant = |codes: &[i8], scales: &[f32], rows: usize| -> Vec<f32> {
        codes[..rows * hd]
            .iter()
            .enumerate()
            .map(|(e, &c)| c as f32 * scales[e / hd])
            .collect()
    };
    let q_dq = dequant(&q_codes, &q_scales, t * heads);
    let k_dq = dequant(kv.keys, kv.key_scales, n * kv_heads);
    let mut p = vec![0f32; n];
    let mut p_codes = vec![0i8; n];
    for i in 0..t {
        let pos = pos0 + i;
        for h in 0..heads {
            let g = h / group;
            let qh = &q_dq[i * q_width + h * hd..][..hd];
            for (kp, s) in p.iter_mut().enumerate() {
                let k = &k_dq[kp * kv_width + g * hd..][..hd];
                let mut v = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                if let Some(slopes) = alibi {
                    v += slopes[h] * kp as f32;
                }
                *s = v;
            }
            let valid = first_key(pos, sliding_window)..pos + 1;
            let fold: Vec<f32> = valid
                .clone()
                .map(|j| kv.value_scales[j * kv_heads + g])
                .collect();
            p_codes.fill(0);
            let p_scale = quantize_softmax_row(&mut p[valid.clone()], &fold, &mut p_codes[valid])?;
            let o = &mut out[i * q_width + h * hd..][..hd];
            o.fill(0.0);
            for (kp, &c) in p_codes.iter().enumerate() {
                let pv = c as f32 * p_scale;
                let v = &kv.values[kp * kv_width + g * hd..][..hd];
                for (o, &x) in o.iter_mut().zip(v) {
                    *o += pv * x as f32;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(i: usize) -> f32 {
        ((i.wrapping_mul(2654435761)) % 1000) as f32 / 250.0 - 2.0
    }

    /// Fills positions `0..n` of a one-layer cache and returns it.
    fn cache(kv_heads: usize, hd: usize, n: usize, chunks: &[usize]) -> Int8KvStore {
        let mut store = Int8KvStore::new(1, kv_heads, hd, n + 4);
        let kvw = kv_heads * hd;
        let keys: Vec<f32> = (0..n * kvw).map(|i| val(i + 7)).collect();
        let values: Vec<f32> = (0..n * kvw).map(|i| val(i + 13) * 3.0).collect();
        let mut pos = 0;
        for &c in chunks {
            store
                .store(
                    0,
                    pos,
                    &keys[pos * kvw..(pos + c) * kvw],
                    &values[pos * kvw..(pos + c) * kvw],
                )
                .unwrap();
            pos += c;
        }
        assert_eq!(pos, n);
        store
    }

    #[test]
    fn int8_attention_matches_the_fake_quant_oracle() {
        let backends: Vec<_> = sq_kernels::available_backends()
            .into_iter()
            .map(|name| sq_kernels::backend_by_name(name).unwrap())
            .collect();
        for (heads, kv_heads, hd) in [(6, 2, 8), (4, 4, 16), (3, 1, 12)] {
            for (pos0, t, window, with_alibi) in [
                (0, 20, None, false),
                (5, 17, Some(7), false),
                (3, 33, None, true),
                (9, 1, None, false),
                (30, 1, Some(4), true),
                // Several causal blocks of query rows.
                (0, 150, None, false),
                (9, 131, Some(40), true),
            ] {
                let n = pos0 + t;
                let store = cache(kv_heads, hd, n, &[n]);
                let q: Vec<f32> = (0..t * heads * hd).map(|i| val(i) * 1.7).collect();
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
                let mut want = vec![0.0; q.len()];
                attention_fake_quant(&q, store.layer(0), &shape, alibi, &mut want).unwrap();
                let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for backend in &backends {
                    let mut got = vec![0.0; q.len()];
                    let mut scratch = Int8AttentionScratch::default();
                    attention_int8(
                        &q,
                        store.layer(0),
                        &shape,
                        alibi,
                        &mut got,
                        backend.as_ref(),
                        &mut scratch,
                    )
                    .unwrap();
                    for (x, y) in got.iter().zip(&want) {
                        assert!(
                            (x - y).abs() <= 1e-5 * peak.max(1.0),
                            "{} heads {heads}/{kv_heads} pos0 {pos0} t {t} window {window:?}: {x} vs {y}",
                            backend.name()
                        );
                    }
                }
            }
        }
    }

    /// The direct path (a few query rows) and the batched-GEMM path give the same bits.
    #[test]
    fn direct_and_blocked_paths_agree_exactly() {
        let backend = sq_kernels::select_backend().unwrap();
        for (heads, kv_heads, hd, pos0, t, window, with_alibi) in [
            (6, 2, 8, 0, 1, None, false),
            (6, 2, 8, 11, 4, Some(5), true),
            (9, 3, 64, 40, 3, None, false),
            (4, 4, 16, 70, 1, None, true),
        ] {
            let n = pos0 + t;
            let store = cache(kv_heads, hd, n, &[n]);
            let q: Vec<f32> = (0..t * heads * hd).map(|i| val(i) * 1.3).collect();
            let slopes = crate::config::alibi_slopes(heads);
            let alibi = with_alibi.then_some(slopes.as_slice());
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                pos0,
                scale: 0.3,
                sliding_window: window,
            };
            let mut direct = vec![f32::NAN; q.len()];
            let mut blocked = vec![f32::NAN; q.len()];
            let mut scratch = Int8AttentionScratch::default();
            attention_int8_direct(&q, store.layer(0), &shape, alibi, &mut direct, &mut scratch)
                .unwrap();
            attention_int8_blocked(
                &q,
                store.layer(0),
                &shape,
                alibi,
                &mut blocked,
                backend.as_ref(),
                &mut scratch,
            )
            .unwrap();
            assert_eq!(
                direct, blocked,
                "heads {heads}/{kv_heads} pos0 {pos0} t {t}"
            );
        }
    }

    #[test]
    fn int8_attention_is_close_to_f32_attention() {
        let (heads, kv_heads, hd, n) = (4, 2, 16, 24);
        let store = cache(kv_heads, hd, n, &[n]);
        let kvw = kv_heads * hd;
        let keys: Vec<f32> = (0..n * kvw).map(|i| val(i + 7)).collect();
        let values: Vec<f32> = (0..n * kvw).map(|i| val(i + 13) * 3.0).collect();
        let q: Vec<f32> = (0..n * heads * hd).map(|i| val(i) * 0.5).collect();
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            pos0: 0,
            scale: 0.25,
            sliding_window: None,
        };
        let mut want = vec![0.0; q.len()];
        crate::layers::attention(&q, &keys, &values, &shape, None, &mut want);
        let mut got = vec![0.0; q.len()];
        let backend = sq_kernels::select_backend().unwrap();
        attention_int8(
            &q,
            store.layer(0),
            &shape,
            None,
            &mut got,
            backend.as_ref(),
            &mut Int8AttentionScratch::default(),
        )
        .unwrap();
        // INT8 error, not a wrong computation: well under the values' range of +-6.
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 0.1, "max |int8 - f32| = {worst}");
        assert!(
            worst > 0.0,
            "INT8 attention returned the f32 result exactly"
        );
    }

    #[test]
    fn cache_codes_do_not_depend_on_how_positions_arrive() {
        let whole = cache(2, 8, 12, &[12]);
        let pieces = cache(2, 8, 12, &[5, 1, 1, 5]);
        let (a, b) = (whole.layer(0), pieces.layer(0));
        assert_eq!(a.keys, b.keys);
        assert_eq!(a.values, b.values);
        assert_eq!(a.key_scales, b.key_scales);
        assert_eq!(a.value_scales, b.value_scales);
    }

    #[test]
    fn cache_bytes_are_codes_plus_scales() {
        let store = Int8KvStore::new(3, 2, 8, 10);
        assert_eq!(store.bytes(), 3 * 2 * (10 * 16 + 4 * 10 * 2));
    }
}

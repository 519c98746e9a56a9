//! How far a model's next-token distributions are from a reference model's (the full-precision
//! one): the KL divergence `KL(P_ref || Q)` per predicted token over text windows.
//!
//! Quantization choices (`--alpha auto`) are compared by this rather than by the NLL of the
//! text: the NLL scores each position by one sampled token, the divergence by the reference's
//! whole distribution, so the same windows separate candidates with less noise.
//!
//! The reference is stored compactly: per position its `top_k` most likely tokens with their
//! log-probabilities, and the rest of the vocabulary as one bucket. The divergence is then the
//! exact KL between the two distributions coarsened to those `top_k + 1` outcomes, which is a
//! lower bound of the full KL and equals it wherever the reference's mass sits in its top tokens.

use crate::generate::scored_windows;
use crate::model::Logits;
use crate::runner::Forward;
use crate::{ModelError, Result};
use rayon::prelude::*;

/// The reference model's next-token distributions on a set of text windows.
#[derive(Clone, Debug)]
pub struct ReferenceDistributions {
    seq_len: usize,
    top_k: usize,
    vocab: usize,
    /// The windows' tokens, `windows * seq_len`.
    tokens: Vec<u32>,
    /// Per predicted position (`windows * (seq_len - 1)`), `top_k` token ids.
    ids: Vec<u32>,
    /// Their reference log-probabilities.
    log_p: Vec<f32>,
    /// Per predicted position, the reference's probability outside its top tokens.
    tail_p: Vec<f64>,
}

/// A model's divergence from the reference, and its NLL on the same tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    /// Mean KL per predicted token, per window (for paired comparisons between candidates).
    pub window_kl: Vec<f64>,
    /// Mean KL per predicted token over all windows.
    pub mean_kl: f64,
    /// Mean negative log-likelihood of the text per predicted token, per window.
    pub window_nll: Vec<f64>,
    pub mean_nll: f64,
}

impl Divergence {
    /// The paired difference of mean KL, `self - other`, over the windows, and its standard
    /// error (`sd / sqrt(windows)`; 0 for one window).
    pub fn paired_difference(&self, other: &Divergence) -> Result<(f64, f64)> {
        if self.window_kl.len() != other.window_kl.len() || self.window_kl.is_empty() {
            return Err(ModelError::Invalid(format!(
                "cannot pair divergences over {} and {} windows",
                self.window_kl.len(),
                other.window_kl.len()
            )));
        }
        let n = self.window_kl.len() as f64;
        let d: Vec<f64> = self
            .window_kl
            .iter()
            .zip(&other.window_kl)
            .map(|(a, b)| a - b)
            .collect();
        let mean = d.iter().sum::<f64>() / n;
        if d.len() < 2 {
            return Ok((mean, 0.0));
        }
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Ok((mean, (var / n).sqrt()))
    }
}

/// `log sum exp(row)` and the probabilities' sum outside `excluded` (a mask over the row),
/// both relative to the row's maximum: returns `(max, sum_all, sum_outside)` with the sums of
/// `exp(l - max)`. The outside sum is accumulated on its own (not as a difference of two sums)
/// so that a tiny tail keeps its relative precision.
fn row_sums(row: &[f32], excluded: &[bool]) -> (f32, f64, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // 16 partial sums so the loop vectorizes; the terms are positive, so f32 partials of a
    // 50k-term row lose only about 1e-6 relative.
    let mut all = [0.0f32; 16];
    let mut outside = [0.0f32; 16];
    let chunks = row.chunks_exact(16).zip(excluded.chunks_exact(16));
    let rem = row.len() - row.len() % 16;
    for (ls, ex) in chunks {
        for i in 0..16 {
            let e = sq_kernels::math::exp(ls[i] - max);
            all[i] += e;
            outside[i] += if ex[i] { 0.0 } else { e };
        }
    }
    let mut sum_all: f64 = all.iter().map(|&v| v as f64).sum();
    let mut sum_out: f64 = outside.iter().map(|&v| v as f64).sum();
    for (l, &ex) in row[rem..].iter().zip(&excluded[rem..]) {
        let e = ((*l - max) as f64).exp();
        sum_all += e;
        if !ex {
            sum_out += e;
        }
    }
    (max, sum_all, sum_out)
}

impl ReferenceDistributions {
    /// Run `reference` over at most `max_windows` non-overlapping windows of `seq_len` tokens
    /// from the start of `tokens` (as [`crate::perplexity`] windows them) and keep, for every
    /// predicted position, its `top_k` most likely next tokens.
    pub fn new<M: Forward + ?Sized>(
        reference: &M,
        tokens: &[u32],
        seq_len: usize,
        max_windows: Option<usize>,
        top_k: usize,
    ) -> Result<Self> {
        let windows = scored_windows(reference, tokens.len(), seq_len, max_windows)?;
        let vocab = reference.config().vocab_size;
        if top_k == 0 || top_k >= vocab {
            return Err(ModelError::Invalid(format!(
                "the reference distributions keep top_k = {top_k} tokens of a vocabulary of {vocab}; \
                 it must be at least 1 and below the vocabulary size"
            )));
        }
        let positions = windows * (seq_len - 1);
        let mut ids = vec![0u32; positions * top_k];
        let mut log_p = vec![0.0f32; positions * top_k];
        let mut tail_p = vec![0.0f64; positions];
        let mut session = reference.new_session(seq_len)?;
        let mut logits = Vec::new();
        for w in 0..windows {
            M::clear_session(&mut session);
            reference.forward(
                &tokens[w * seq_len..(w + 1) * seq_len],
                &mut session,
                Logits::All,
                &mut logits,
            )?;
            let base = w * (seq_len - 1);
            // The last position predicts past the window: not scored.
            let rows = logits[..(seq_len - 1) * vocab].par_chunks_exact(vocab);
            ids[base * top_k..(base + seq_len - 1) * top_k]
                .par_chunks_exact_mut(top_k)
                .zip(log_p[base * top_k..(base + seq_len - 1) * top_k].par_chunks_exact_mut(top_k))
                .zip(tail_p[base..base + seq_len - 1].par_iter_mut())
                .zip(rows)
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(order, mask): &mut (Vec<u32>, Vec<bool>), (((ids, lp), tail), row)| {
                        order.clear();
                        order.extend(0..vocab as u32);
                        // Largest first; ties broken by id so the choice is deterministic.
                        let key = |&i: &u32| (std::cmp::Reverse(ordered(row[i as usize])), i);
                        order.select_nth_unstable_by_key(top_k - 1, key);
                        order[..top_k].sort_unstable_by_key(key);
                        mask.clear();
                        mask.resize(vocab, false);
                        for &i in &order[..top_k] {
                            mask[i as usize] = true;
                        }
                        let (max, sum_all, sum_out) = row_sums(row, mask);
                        let lse = max as f64 + sum_all.ln();
                        for (k, &i) in order[..top_k].iter().enumerate() {
                            ids[k] = i;
                            lp[k] = (row[i as usize] as f64 - lse) as f32;
                        }
                        *tail = sum_out / sum_all;
                    },
                );
        }
        Ok(Self {
            seq_len,
            top_k,
            vocab,
            tokens: tokens[..windows * seq_len].to_vec(),
            ids,
            log_p,
            tail_p,
        })
    }

    pub fn windows(&self) -> usize {
        self.tokens.len() / self.seq_len
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The divergence of `model` from the reference on the reference's windows.
    pub fn divergence<M: Forward + ?Sized>(&self, model: &M) -> Result<Divergence> {
        let vocab = model.config().vocab_size;
        if vocab != self.vocab {
            return Err(ModelError::Invalid(format!(
                "the model's vocabulary has {vocab} tokens, the reference distributions {}",
                self.vocab
            )));
        }
        let (k, n) = (self.top_k, self.seq_len - 1);
        let mut session = model.new_session(self.seq_len)?;
        let mut logits = Vec::new();
        let mut window_kl = Vec::with_capacity(self.windows());
        let mut window_nll = Vec::with_capacity(self.windows());
        let mut per_position = vec![(0.0f64, 0.0f64); n];
        for w in 0..self.windows() {
            let window = &self.tokens[w * self.seq_len..(w + 1) * self.seq_len];
            M::clear_session(&mut session);
            model.forward(window, &mut session, Logits::All, &mut logits)?;
            let base = w * n;
            logits[..n * vocab]
                .par_chunks_exact(vocab)
                .zip(per_position.par_iter_mut())
                .enumerate()
                .for_each_init(
                    || vec![false; vocab],
                    |mask, (pos, (row, out))| {
                        let p = base + pos;
                        let ids = &self.ids[p * k..(p + 1) * k];
                        let lp = &self.log_p[p * k..(p + 1) * k];
                        for &i in ids {
                            mask[i as usize] = true;
                        }
                        let (max, sum_all, sum_out) = row_sums(row, mask);
                        for &i in ids {
                            mask[i as usize] = false;
                        }
                        let lse = max as f64 + sum_all.ln();
                        let mut kl = 0.0f64;
                        for (&i, &l) in ids.iter().zip(lp) {
                            let l = l as f64;
                            kl += l.exp() * (l - (row[i as usize] as f64 - lse));
                        }
                        let tail = self.tail_p[p];
                        if tail > 0.0 {
                            let q_tail = (sum_out / sum_all).max(f64::MIN_POSITIVE);
                            kl += tail * (tail.ln() - q_tail.ln());
                        }
                        let target = window[pos + 1] as usize;
                        *out = (kl, lse - row[target] as f64);
                    },
                );
            // Summed in position order: the result does not depend on the thread split.
            let (kl, nll) = per_position
                .iter()
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            window_kl.push(kl / n as f64);
            window_nll.push(nll / n as f64);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Ok(Divergence {
            mean_kl: mean(&window_kl),
            mean_nll: mean(&window_nll),
            window_kl,
            window_nll,
        })
    }
}

/// A total order on logits for the top-k selection (NaN sorts lowest).
fn ordered(v: f32) -> i64 {
    if v.is_nan() {
        return i64::MIN;
    }
    let b = v.to_bits() as i32;
    // Flip the magnitude bits of negatives so the integer order is the float order.
    (if b < 0 { b ^ i32::MAX } else { b }) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_is_the_float_order() {
        let vals = [
            -f32::INFINITY,
            -3.5,
            -1.0,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(ordered(w[0]) <= ordered(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert!(ordered(f32::NAN) < ordered(-f32::INFINITY));
    }

    #[test]
    fn row_sums_split_the_mass() {
        let row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mut mask = vec![false; row.len()];
        mask[3] = true;
        mask[20] = true;
        let (max, all, out) = row_sums(&row, &mask);
        let want_all: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let want_in = ((row[3] - max) as f64).exp() + ((row[20] - max) as f64).exp();
        assert!((all - want_all).abs() < 1e-5 * want_all);
        assert!((out - (want_all - want_in)).abs() < 1e-5 * want_all);
    }
}

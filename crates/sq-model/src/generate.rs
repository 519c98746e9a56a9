//! Text generation (greedy, or temperature + top-p sampling with a seed) and perplexity.

use crate::model::Logits;
use crate::runner::Forward;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: ChaCha8Rng,
    probs: Vec<(f32, u32)>,
}

impl Sampler {
    /// Temperature 0 is greedy; otherwise softmax(logits / T) restricted to the smallest set of
    /// tokens whose probability reaches `top_p`. The same seed gives the same tokens.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Self> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(ModelError::Invalid(format!(
                "temperature must be a finite number >= 0, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ModelError::Invalid(format!(
                "top-p must be in (0, 1], got {top_p}"
            )));
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: ChaCha8Rng::seed_from_u64(seed),
            probs: Vec::new(),
        })
    }

    pub fn greedy() -> Self {
        Sampler {
            temperature: 0.0,
            top_p: 1.0,
            rng: ChaCha8Rng::seed_from_u64(0),
            probs: Vec::new(),
        }
    }

    /// Pick a token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        let mut sum = 0.0f32;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - max) / self.temperature).exp();
            sum += p;
            self.probs.push((p, i as u32));
        }
        for p in &mut self.probs {
            p.0 /= sum;
        }
        let mut total = 1.0;
        if self.top_p < 1.0 {
            self.probs
                .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut cum = 0.0;
            let mut keep = self.probs.len();
            for (i, p) in self.probs.iter().enumerate() {
                cum += p.0;
                if cum >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.probs.truncate(keep);
            total = cum.min(1.0);
        }
        let r: f32 = self.rng.random::<f32>() * total;
        let mut cum = 0.0;
        for &(p, id) in &self.probs {
            cum += p;
            if r < cum {
                return id;
            }
        }
        self.probs.last().map_or(0, |p| p.1)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// What a generation produced, with timings.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// Generated token ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Generated text (the continuation only).
    pub text: String,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl GenerateOutput {
    /// Decode speed over the tokens after the first (which comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_seconds <= 0.0 {
            0.0
        } else {
            n as f64 / self.decode_seconds
        }
    }
}

/// Generate up to `max_tokens` after `prompt` (token ids, BOS included if wanted), stopping at
/// EOS. `on_text` receives each new piece of text as soon as it is complete UTF-8.
pub fn generate<M: Forward + ?Sized>(
    model: &M,
    tokenizer: &dyn Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid(
            "the prompt is empty (no tokens)".into(),
        ));
    }
    let config = model.config();
    let capacity = (prompt.len() + max_tokens).min(config.max_position_embeddings);
    if prompt.len() >= capacity && max_tokens > 0 {
        return Err(ModelError::Invalid(format!(
            "the prompt has {} tokens, which leaves no room in the model's context of {}",
            prompt.len(),
            config.max_position_embeddings
        )));
    }
    let mut session = model.new_session(capacity)?;
    let mut logits = Vec::with_capacity(config.vocab_size);
    let eos = tokenizer.eos_id().or(config.eos_token_id);
    let mut out = Vec::with_capacity(max_tokens);
    let mut printed = String::new();
    let start = Instant::now();
    if max_tokens == 0 {
        return Ok(GenerateOutput {
            tokens: out,
            text: String::new(),
            prompt_tokens: prompt.len(),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        });
    }
    model.forward(prompt, &mut session, Logits::Last, &mut logits)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    loop {
        let next = sampler.sample(&logits);
        if Some(next) == eos {
            break;
        }
        out.push(next);
        let text = tokenizer.decode(&out)?;
        // Print only completed text: a multi-byte character may span tokens.
        if text.len() > printed.len()
            && text.starts_with(printed.as_str())
            && !text.ends_with('\u{FFFD}')
        {
            on_text(&text[printed.len()..]);
            printed = text;
        }
        if out.len() >= max_tokens || M::session_len(&session) >= capacity {
            break;
        }
        model.forward(&[next], &mut session, Logits::Last, &mut logits)?;
    }
    let text = tokenizer.decode(&out)?;
    if text.len() > printed.len() && text.starts_with(printed.as_str()) {
        on_text(&text[printed.len()..]);
    }
    Ok(GenerateOutput {
        tokens: out,
        text,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
    })
}

/// Result of a perplexity evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub windows: usize,
    /// Tokens predicted (each window's tokens but the first).
    pub predicted_tokens: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Perplexity over non-overlapping windows of `seq_len` tokens from the start of `tokens` (at
/// most `max_windows`; a last partial window is dropped). Every token of a window except the
/// first is predicted. `on_window` is called after each window (for progress).
pub fn perplexity<M: Forward + ?Sized>(
    model: &M,
    tokens: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let windows = scored_windows(model, tokens.len(), seq_len, max_windows)?;
    let vocab = model.config().vocab_size;
    let mut session = model.new_session(seq_len)?;
    let mut logits = Vec::new();
    let mut nll = 0.0f64;
    let mut count = 0usize;
    for w in 0..windows {
        let window = &tokens[w * seq_len..(w + 1) * seq_len];
        M::clear_session(&mut session);
        model.forward(window, &mut session, Logits::All, &mut logits)?;
        for (pos, &target) in window.iter().enumerate().skip(1) {
            let row = &logits[(pos - 1) * vocab..pos * vocab];
            nll += token_nll(row, target as usize);
            count += 1;
        }
        on_window(w + 1, windows);
    }
    let mean_nll = nll / count as f64;
    Ok(Perplexity {
        windows,
        predicted_tokens: count,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

/// How many windows of `seq_len` tokens a scoring pass over `n_tokens` tokens runs: every whole
/// window, at most `max_windows`; an error when the windows cannot be scored.
pub(crate) fn scored_windows<M: Forward + ?Sized>(
    model: &M,
    n_tokens: usize,
    seq_len: usize,
    max_windows: Option<usize>,
) -> Result<usize> {
    if seq_len < 2 {
        return Err(ModelError::Invalid(format!(
            "--seq-len must be at least 2, got {seq_len}"
        )));
    }
    let config = model.config();
    if seq_len > config.max_position_embeddings {
        return Err(ModelError::Invalid(format!(
            "--seq-len {seq_len} is longer than the model's context of {} tokens",
            config.max_position_embeddings
        )));
    }
    let available = n_tokens / seq_len;
    let windows = max_windows.map_or(available, |m| m.min(available));
    if windows == 0 {
        return Err(ModelError::Invalid(format!(
            "the text has {} tokens, fewer than one window of --seq-len {seq_len}; use a longer text or a smaller --seq-len",
            n_tokens
        )));
    }
    Ok(windows)
}

/// `-log softmax(logits)[target]`, in f64.
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_is_seeded_and_respects_top_p() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        assert_eq!(Sampler::greedy().sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 1.0, seed).unwrap();
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top-p small enough keeps only the most likely token.
        let mut s = Sampler::new(1.0, 0.5, 3).unwrap();
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        assert!(Sampler::new(-1.0, 1.0, 0).is_err());
        assert!(Sampler::new(1.0, 0.0, 0).is_err());
    }

    #[test]
    fn nll_matches_log_softmax() {
        let l = [0.0f32, 0.0];
        assert!((token_nll(&l, 0) - std::f64::consts::LN_2).abs() < 1e-12);
    }
}

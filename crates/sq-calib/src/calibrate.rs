//! Running the FP model over calibration text and recording every Linear input's ranges.

use crate::{ActStats, CalibError, Result, StatsTable};
use rand::{Rng, SeedableRng};
use sq_model::{LinearObserver, Logits, Model};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// How calibration windows are drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibConfig {
    /// Number of windows (`--calib-samples`).
    pub samples: usize,
    /// Tokens per window (`--calib-seq-len`).
    pub seq_len: usize,
    /// Seed of the window positions (`--seed`).
    pub seed: u64,
}

impl Default for CalibConfig {
    fn default() -> Self {
        CalibConfig {
            samples: 128,
            seq_len: 512,
            seed: 0,
        }
    }
}

/// `samples` windows of `seq_len` tokens at seeded uniform random offsets of the token stream
/// (a text shorter than one window gives one window of all of it). The same seed always gives
/// the same windows.
pub fn calibration_windows(n_tokens: usize, cfg: &CalibConfig) -> Result<Vec<Range<usize>>> {
    if cfg.samples == 0 || cfg.seq_len == 0 {
        return Err(CalibError::Config(format!(
            "calibration needs at least one window of at least one token (got {} samples of {} tokens)",
            cfg.samples, cfg.seq_len
        )));
    }
    if n_tokens < 2 {
        return Err(CalibError::Config(format!(
            "the calibration text has {n_tokens} tokens; it needs at least 2"
        )));
    }
    if n_tokens <= cfg.seq_len {
        return Ok(std::iter::once(0..n_tokens).collect());
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let last_start = n_tokens - cfg.seq_len;
    Ok((0..cfg.samples)
        .map(|_| {
            let start = rng.random_range(0..=last_start);
            start..start + cfg.seq_len
        })
        .collect())
}

/// Folds every observed Linear input into per-Linear [`ActStats`].
#[derive(Default)]
pub struct StatsObserver {
    stats: Mutex<BTreeMap<String, ActStats>>,
}

impl StatsObserver {
    /// The statistics gathered so far.
    pub fn table(&self) -> StatsTable {
        let mut table = StatsTable::default();
        for s in self
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            table.insert(s.clone());
        }
        table
    }
}

impl LinearObserver for StatsObserver {
    fn observe(&self, linear: &str, x: &[f32], rows: usize) -> std::result::Result<(), String> {
        if rows == 0 {
            return Ok(());
        }
        let channels = x.len() / rows;
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(linear.to_string())
            .or_insert_with(|| ActStats::new(linear, channels));
        entry.observe(x, rows).map_err(|e| e.to_string())
    }
}

/// Run `model` over calibration windows of `tokens` and return the statistics of every Linear
/// input (the LM head excluded). `progress(done, total)` is called after each window.
pub fn calibrate(
    model: &mut Model,
    tokens: &[u32],
    cfg: &CalibConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<StatsTable> {
    let windows = calibration_windows(tokens.len(), cfg)?;
    let longest = windows.iter().map(|w| w.len()).max().unwrap_or(1);
    if longest > model.config.max_position_embeddings {
        return Err(CalibError::Config(format!(
            "--calib-seq-len {longest} is longer than the model's context of {} tokens",
            model.config.max_position_embeddings
        )));
    }
    let observer = Arc::new(StatsObserver::default());
    model.set_observer(Some(observer.clone()));
    let result: Result<()> = (|| {
        let mut session = model.session(longest);
        let mut logits = Vec::new();
        for (i, w) in windows.iter().enumerate() {
            let _span =
                tracing::debug_span!("calibration_window", index = i, start = w.start).entered();
            session.cache.clear();
            model.forward(&tokens[w.clone()], &mut session, Logits::Last, &mut logits)?;
            progress(i + 1, windows.len());
        }
        Ok(())
    })();
    model.set_observer(None);
    result?;
    Ok(observer.table())
}

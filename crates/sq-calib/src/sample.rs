//! Keeping real input rows of chosen Linears (for searching smoothing strengths on them).

use crate::{calibration_windows, CalibConfig, Result};
use sq_model::{LinearObserver, Logits, Model};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Input rows of one Linear: `rows` rows of `data.len() / rows` channels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputSample {
    pub data: Vec<f32>,
    pub rows: usize,
}

struct Sampler {
    names: BTreeSet<String>,
    max_rows: usize,
    stride: usize,
    kept: Mutex<BTreeMap<String, (InputSample, usize)>>,
}

impl LinearObserver for Sampler {
    fn observe(&self, linear: &str, x: &[f32], rows: usize) -> std::result::Result<(), String> {
        if !self.names.contains(linear) || rows == 0 {
            return Ok(());
        }
        let k = x.len() / rows;
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (sample, seen) = kept.entry(linear.to_string()).or_default();
        for row in x.chunks_exact(k) {
            // Every `stride`-th token, so the sample spans more text than its first window.
            if *seen % self.stride == 0 && sample.rows < self.max_rows {
                sample.data.extend_from_slice(row);
                sample.rows += 1;
            }
            *seen += 1;
        }
        Ok(())
    }
}

/// Run `model` over calibration windows and keep up to `max_rows` input rows (every
/// `stride`-th token) of each Linear in `names`.
pub fn sample_inputs(
    model: &mut Model,
    tokens: &[u32],
    cfg: &CalibConfig,
    names: &[String],
    max_rows: usize,
    stride: usize,
) -> Result<BTreeMap<String, InputSample>> {
    let windows = calibration_windows(tokens.len(), cfg)?;
    let longest = windows.iter().map(|w| w.len()).max().unwrap_or(1);
    let sampler = Arc::new(Sampler {
        names: names.iter().cloned().collect(),
        max_rows,
        stride: stride.max(1),
        kept: Mutex::default(),
    });
    model.set_observer(Some(sampler.clone()));
    let result: Result<()> = (|| {
        let mut session = model.session(longest);
        let mut logits = Vec::new();
        for w in &windows {
            session.cache.clear();
            model.forward(&tokens[w.clone()], &mut session, Logits::Last, &mut logits)?;
            let full = sampler
                .kept
                .lock()
                .map(|k| {
                    k.len() == sampler.names.len() && k.values().all(|(s, _)| s.rows >= max_rows)
                })
                .unwrap_or(false);
            if full {
                break;
            }
        }
        Ok(())
    })();
    model.set_observer(None);
    result?;
    let kept = std::mem::take(&mut *sampler.kept.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(kept.into_iter().map(|(k, (s, _))| (k, s)).collect())
}

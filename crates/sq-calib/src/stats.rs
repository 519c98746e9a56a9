//! Running per-channel and per-tensor activation ranges.

use crate::{CalibError, Result};
use sq_tensor::{save_safetensors, SafetensorsFile, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Suffix of the per-tensor range entries in a statistics file.
pub const TENSOR_ABSMAX_SUFFIX: &str = ".input_absmax";

/// Running statistics of one Linear's input.
#[derive(Clone, Debug, PartialEq)]
pub struct ActStats {
    name: String,
    channel_absmax: Vec<f32>,
    tokens: u64,
}

impl ActStats {
    /// Empty statistics for the input of Linear `name` with `channels` input channels.
    pub fn new(name: impl Into<String>, channels: usize) -> Self {
        ActStats {
            name: name.into(),
            channel_absmax: vec![0.0; channels],
            tokens: 0,
        }
    }

    /// Statistics from known per-channel ranges (e.g. loaded from a file).
    pub fn from_channel_absmax(name: impl Into<String>, channel_absmax: Vec<f32>) -> Self {
        ActStats {
            name: name.into(),
            channel_absmax,
            tokens: 0,
        }
    }

    /// Fold `rows` tokens of activations (row-major `[rows, channels]`) into the ranges.
    /// Non-finite values stop calibration with an error naming the layer and position.
    pub fn observe(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let channels = self.channel_absmax.len();
        if rows.checked_mul(channels) != Some(x.len()) {
            return Err(CalibError::Shape {
                layer: self.name.clone(),
                len: x.len(),
                rows,
                channels,
            });
        }
        for (token, row) in x.chunks_exact(channels.max(1)).enumerate() {
            for (channel, (&v, m)) in row.iter().zip(&mut self.channel_absmax).enumerate() {
                if !v.is_finite() {
                    return Err(CalibError::NonFinite {
                        layer: self.name.clone(),
                        what: if v.is_nan() { "NaN" } else { "Inf" },
                        token,
                        channel,
                    });
                }
                *m = m.max(v.abs());
            }
        }
        self.tokens += rows as u64;
        Ok(())
    }

    /// Merge statistics of the same Linear gathered elsewhere (another thread or window).
    pub fn merge(&mut self, other: &ActStats) -> Result<()> {
        if other.channel_absmax.len() != self.channel_absmax.len() {
            return Err(CalibError::Shape {
                layer: self.name.clone(),
                len: other.channel_absmax.len(),
                rows: 1,
                channels: self.channel_absmax.len(),
            });
        }
        for (m, &o) in self.channel_absmax.iter_mut().zip(&other.channel_absmax) {
            *m = m.max(o);
        }
        self.tokens += other.tokens;
        Ok(())
    }

    /// Divide each channel's range by `scales` (the input after smoothing by `s` is `x / s`).
    pub fn scale_channels(&mut self, scales: &[f32]) {
        for (m, s) in self.channel_absmax.iter_mut().zip(scales) {
            *m /= s;
        }
    }

    /// The Linear this input feeds.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Per-channel `max|x_j|`, the smoothing statistic.
    pub fn channel_absmax(&self) -> &[f32] {
        &self.channel_absmax
    }

    /// Per-tensor `max|x|`, the static activation range.
    pub fn tensor_absmax(&self) -> f32 {
        self.channel_absmax.iter().copied().fold(0.0, f32::max)
    }

    /// Tokens observed.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Largest channel range over the median channel range: how much a few outlier channels
    /// dominate the per-tensor scale (1 = flat). Infinite when the median channel is all zeros.
    pub fn max_median_ratio(&self) -> f32 {
        if self.channel_absmax.is_empty() {
            return 1.0;
        }
        let mut sorted = self.channel_absmax.clone();
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        let max = sorted[n - 1];
        if max == 0.0 {
            1.0
        } else {
            max / median
        }
    }
}

/// Statistics of every Linear input of a model, keyed by Linear name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsTable {
    layers: BTreeMap<String, ActStats>,
}

impl StatsTable {
    pub fn insert(&mut self, stats: ActStats) {
        self.layers.insert(stats.name.clone(), stats);
    }

    pub fn get(&self, name: &str) -> Option<&ActStats> {
        self.layers.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut ActStats> {
        self.layers.get_mut(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ActStats> {
        self.layers.values()
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Write atomically: one tensor per Linear plus its `.input_absmax` range.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.layers.len() * 2);
        for s in self.layers.values() {
            let n = s.channel_absmax.len();
            tensors.push((s.name.clone(), Tensor::from_slice(&s.channel_absmax, &[n])?));
            tensors.push((
                format!("{}{TENSOR_ABSMAX_SUFFIX}", s.name),
                Tensor::from_vec(vec![s.tensor_absmax()], &[1])?,
            ));
        }
        let meta = BTreeMap::from([("format".to_string(), "smoothquant-act-scales".to_string())]);
        save_safetensors(path, &tensors, Some(&meta))?;
        Ok(())
    }

    /// Read a statistics file (ours, or any with one 1-D f32 tensor per Linear). Every value must
    /// be finite and non-negative.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        let bad = |name: &str, reason: String| CalibError::BadStats {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason,
        };
        let mut table = StatsTable::default();
        for name in file.names() {
            if name.ends_with(TENSOR_ABSMAX_SUFFIX) {
                continue;
            }
            let t = file.tensor(&name)?;
            if t.rank() != 1 {
                return Err(bad(
                    &name,
                    format!("expected a 1-D tensor, got shape {:?}", t.shape()),
                ));
            }
            let values = t.to_f32_vec()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return Err(bad(
                    &name,
                    format!("value {} at channel {i} is not a finite range", values[i]),
                ));
            }
            table.insert(ActStats::from_channel_absmax(name, values));
        }
        Ok(table)
    }
}

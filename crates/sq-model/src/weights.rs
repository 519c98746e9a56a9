//! Prefix-based weight loading (`w.pp("self_attn").get("q_proj.weight", &[out, in])`), with
//! shape and finiteness checks that name the tensor and the file.

use crate::linear::{FpLinear, NamedLinear};
use crate::{ModelError, Result};
use sq_tensor::{Checkpoint, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Where named tensors come from.
pub trait WeightSource {
    /// The tensor `name`, or `None` if absent.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// The file or directory the weights come from.
    fn path(&self) -> &Path;
    /// Drop mapped pages read so far from the process (layer-by-layer runs); a no-op for
    /// weights held in memory.
    fn release_pages(&self) {}
}

impl WeightSource for Checkpoint {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.contains(name) {
            return Ok(None);
        }
        Ok(Some(Checkpoint::tensor(self, name)?))
    }
    fn path(&self) -> &Path {
        Checkpoint::path(self)
    }
    fn release_pages(&self) {
        Checkpoint::release_pages(self)
    }
}

/// Owned in-memory tensors (a GGUF or llama2.c load kept for a layer-by-layer run).
pub struct OwnedTensors {
    pub tensors: BTreeMap<String, Tensor>,
    pub source: std::path::PathBuf,
}

impl WeightSource for OwnedTensors {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.tensors.get(name).cloned())
    }
    fn path(&self) -> &Path {
        &self.source
    }
}

/// In-memory tensors (GGUF and llama2.c loads), with the file they came from.
pub struct TensorMap<'a> {
    pub tensors: &'a BTreeMap<String, Tensor>,
    pub source: &'a Path,
}

impl WeightSource for TensorMap<'_> {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.tensors.get(name).cloned())
    }
    fn path(&self) -> &Path {
        self.source
    }
}

/// A view of a [`WeightSource`] under a name prefix.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    source: &'a dyn WeightSource,
    prefix: &'a str,
}

/// Owned prefix holder so `pp` can build nested prefixes.
pub struct Prefixed<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Prefixed<'a> {
    pub fn new(source: &'a dyn WeightSource, prefix: impl Into<String>) -> Self {
        Prefixed {
            source,
            prefix: prefix.into(),
        }
    }

    pub fn weights(&self) -> Weights<'_> {
        Weights {
            source: self.source,
            prefix: &self.prefix,
        }
    }

    /// A nested prefix (`model.layers.3` + `self_attn` = `model.layers.3.self_attn`).
    pub fn pp(&self, part: impl std::fmt::Display) -> Prefixed<'a> {
        Prefixed {
            source: self.source,
            prefix: join(&self.prefix, &part.to_string()),
        }
    }

    pub fn name(&self, leaf: &str) -> String {
        join(&self.prefix, leaf)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn contains(&self, leaf: &str) -> Result<bool> {
        self.weights().contains(leaf)
    }

    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.weights().get(leaf, shape)
    }

    pub fn get_opt(&self, leaf: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        self.weights().get_opt(leaf, shape)
    }

    pub fn path(&self) -> &Path {
        self.source.path()
    }

    /// The full-precision Linear `prefix.leaf` (`weight` `[out, in]`, optional `bias` `[out]`).
    pub fn linear(&self, leaf: &str, out: usize, inp: usize) -> Result<NamedLinear> {
        let lp = self.pp(leaf);
        let weight = lp.get("weight", &[out, inp])?;
        let bias = lp.get_opt("bias", &[out])?;
        Ok(NamedLinear::new(
            lp.prefix(),
            FpLinear::new(weight, out, inp, bias)?,
        ))
    }
}

fn join(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

impl Weights<'_> {
    pub fn contains(&self, leaf: &str) -> Result<bool> {
        Ok(self.source.tensor(&join(self.prefix, leaf))?.is_some())
    }

    /// The f32 values of `prefix.leaf`, which must have `shape`.
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let name = join(self.prefix, leaf);
        self.get_opt(leaf, shape)?
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.source.path().to_path_buf(),
                name,
            })
    }

    /// Like [`Weights::get`], `None` when the tensor is absent.
    pub fn get_opt(&self, leaf: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        let name = join(self.prefix, leaf);
        let Some(t) = self.source.tensor(&name)? else {
            return Ok(None);
        };
        if t.shape() != shape {
            return Err(ModelError::TensorShape {
                path: self.source.path().to_path_buf(),
                name,
                expected: shape.to_vec(),
                actual: t.shape().to_vec(),
            });
        }
        let data = t.to_f32_vec()?;
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                path: self.source.path().to_path_buf(),
                name,
                what: if data[index].is_nan() { "NaN" } else { "Inf" },
                index,
            });
        }
        Ok(Some(data))
    }
}

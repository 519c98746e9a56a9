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
    /// Start reading the tensors named `prefix...` in the background (a layer-by-layer run
    /// prefetches the next layer); a no-op for weights held in memory.
    fn prefetch_prefix(&self, prefix: &str) {
        let _ = prefix;
    }
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
    fn prefetch_prefix(&self, prefix: &str) {
        Checkpoint::prefetch_prefix(self, prefix)
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
        let bias = lp.get_opt("bias", &[out])?;
        if let Some(packed) = lp.packed_weight(out, inp)? {
            return Ok(NamedLinear::new(
                lp.prefix(),
                FpLinear::from_packed(packed, bias)?,
            ));
        }
        let weight = lp.get("weight", &[out, inp])?;
        Ok(NamedLinear::new(
            lp.prefix(),
            FpLinear::new(weight, out, inp, bias)?,
        ))
    }

    /// `prefix.weight` converted to f32 straight into the GEMM's packed layout, in parallel,
    /// when it is a contiguous bf16, f16 or f32 tensor of shape `[out, inp]` with finite values:
    /// the same values as [`Prefixed::get`] then [`FpLinear::new`], without a whole f32 copy.
    /// `None` otherwise (the caller takes the general path, which also names any bad value).
    fn packed_weight(&self, out: usize, inp: usize) -> Result<Option<sq_kernels::PackedF32>> {
        let Some(t) = self.source.tensor(&self.name("weight"))? else {
            return Ok(None);
        };
        if t.shape() != [out, inp] || !t.is_contiguous() {
            return Ok(None);
        }
        let view = t.view();
        /// Stops the packing at a non-finite value.
        struct Stop;
        impl From<sq_kernels::KernelError> for Stop {
            fn from(_: sq_kernels::KernelError) -> Stop {
                Stop
            }
        }
        fn pack<T: Copy + Sync>(
            src: &[T],
            out: usize,
            inp: usize,
            widen: impl Fn(T) -> f32 + Sync,
        ) -> std::result::Result<sq_kernels::PackedF32, Stop> {
            sq_kernels::pack_f32_rows(out, inp, |r0, rows: &mut [f32]| {
                let src = &src[r0 * inp..r0 * inp + rows.len()];
                let mut finite = true;
                for (d, &s) in rows.iter_mut().zip(src) {
                    let v = widen(s);
                    finite &= v.is_finite();
                    *d = v;
                }
                if finite {
                    Ok(())
                } else {
                    Err(Stop)
                }
            })
        }
        let packed = match t.dtype() {
            sq_tensor::DType::BF16 => match view.as_slice::<half::bf16>() {
                Ok(src) => pack(src, out, inp, half::bf16::to_f32),
                Err(_) => return Ok(None),
            },
            sq_tensor::DType::F16 => match view.as_slice::<half::f16>() {
                Ok(src) => pack(src, out, inp, half::f16::to_f32),
                Err(_) => return Ok(None),
            },
            sq_tensor::DType::F32 => match view.as_slice::<f32>() {
                Ok(src) => pack(src, out, inp, |v| v),
                Err(_) => return Ok(None),
            },
            _ => return Ok(None),
        };
        Ok(packed.ok())
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

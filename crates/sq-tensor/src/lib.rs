//! # sq-tensor
//!
//! Storage, dtypes, layouts and safetensors I/O for [smoothquant-rs](https://github.com/smoothquant-rs/smoothquant-rs).
//!
//! - [`Tensor`]: shared storage (`Arc`), owned and 64-byte aligned or a zero-copy slice of a
//!   memory-mapped file; row-major strides; [`Tensor::narrow`], [`Tensor::transpose`] and
//!   [`Tensor::reshape`] never copy.
//! - [`TensorView`]: the borrowed counterpart, over any byte slice.
//! - [`DType`]: f32, f16, bf16 (the `half` crate), i8, u8, i32, with lossless conversions.
//! - [`SafetensorsFile`] / [`Checkpoint`]: memory-mapped safetensors, single or sharded through
//!   `model.safetensors.index.json`, validated against the file's real size with errors that
//!   name the file and tensor.
//! - [`save_safetensors`]: atomic writes (temporary file, fsync, rename) with `__metadata__`.
//!
//! ```
//! use sq_tensor::{save_safetensors, DType, SafetensorsFile, Tensor};
//! use std::collections::BTreeMap;
//!
//! # fn main() -> Result<(), sq_tensor::TensorError> {
//! let weight = Tensor::from_vec((0..6).map(|i| i as f32).collect::<Vec<_>>(), &[2, 3])?;
//! let row = weight.narrow(0, 1, 1)?; // zero-copy view of the second row
//! assert_eq!(row.to_vec::<f32>()?, [3.0, 4.0, 5.0]);
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("model.safetensors");
//! let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
//! let bf16 = weight.to_dtype(DType::BF16)?;
//! save_safetensors(&path, &[("w".to_string(), &bf16)], Some(&meta))?;
//!
//! let file = SafetensorsFile::open(&path)?;
//! let loaded = file.tensor("w")?; // memory-mapped, no copy
//! assert_eq!(loaded.dtype(), DType::BF16);
//! assert_eq!(loaded.to_f32_vec()?, weight.to_f32_vec()?);
//! assert_eq!(file.user_metadata().unwrap()["format"], "pt");
//! # Ok(())
//! # }
//! ```

pub mod atomic;
mod dtype;
mod error;
mod layout;
mod safetensors;
mod storage;
mod tensor;

pub use crate::safetensors::{
    save_safetensors, save_safetensors_sharded, write_safetensors, Checkpoint, PlacedFiles,
    SafetensorsFile, StoredTensorInfo, TensorSignature, TensorSource, TensorSpill,
};
pub use dtype::{DType, Element};
pub use error::{Result, TensorError};
pub use half::{bf16, f16};
pub use layout::{checked_numel, Layout, StridedIndices};
pub use storage::ALIGNMENT;
pub use tensor::{Tensor, TensorView};

//! The tensor types: [`Tensor`] (shared, owned or memory-mapped) and [`TensorView`] (borrowed).

use crate::layout::{checked_numel, Layout};
use crate::storage::{AlignedBytes, Storage};
use crate::{DType, Element, Result, TensorError};
use half::{bf16, f16};
use std::fmt;
use std::sync::Arc;

/// A borrowed tensor: bytes plus dtype and layout. Cheap to copy; never owns data.
#[derive(Clone)]
pub struct TensorView<'a> {
    bytes: &'a [u8],
    dtype: DType,
    layout: Layout,
}

/// A tensor whose storage is shared (`Arc`): cloning, [`Tensor::narrow`] and
/// [`Tensor::transpose`] never copy data. Storage is either an aligned heap buffer or a
/// byte range of a memory-mapped safetensors file.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    dtype: DType,
    layout: Layout,
}

fn check_len(dtype: DType, shape: &[usize], len: usize) -> Result<()> {
    let expected = checked_numel(shape)
        .and_then(|n| n.checked_mul(dtype.size_in_bytes()))
        .ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        })?;
    if expected != len {
        return Err(TensorError::DataLength {
            dtype,
            shape: shape.to_vec(),
            len,
            expected,
        });
    }
    Ok(())
}

impl<'a> TensorView<'a> {
    /// A contiguous view of `bytes` (exactly `numel * dtype size` bytes long).
    pub fn from_bytes(bytes: &'a [u8], dtype: DType, shape: &[usize]) -> Result<Self> {
        check_len(dtype, shape, bytes.len())?;
        Ok(TensorView {
            bytes,
            dtype,
            layout: Layout::contiguous(shape)?,
        })
    }

    /// A contiguous view of a typed slice.
    pub fn from_slice<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), T::DTYPE, shape)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn strides(&self) -> &[usize] {
        self.layout.strides()
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Size of dimension `dim`, or an error naming the shape.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        self.shape()
            .get(dim)
            .copied()
            .ok_or_else(|| TensorError::OutOfRange {
                what: format!("dimension {dim}"),
                shape: self.shape().to_vec(),
            })
    }

    /// The bytes of a contiguous view, exactly `numel * size` long.
    pub fn contiguous_bytes(&self) -> Result<&'a [u8]> {
        if !self.is_contiguous() {
            return Err(self.not_contiguous("contiguous_bytes"));
        }
        let size = self.dtype.size_in_bytes();
        let start = self.layout.offset() * size;
        Ok(&self.bytes[start..start + self.numel() * size])
    }

    fn not_contiguous(&self, op: &'static str) -> TensorError {
        TensorError::NotContiguous {
            op,
            shape: self.shape().to_vec(),
            strides: self.strides().to_vec(),
        }
    }

    /// The elements as a typed slice, without copying. Needs the right dtype, a contiguous
    /// layout and aligned data (always true for owned tensors; mapped files may be unaligned).
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::DTypeMismatch {
                op: "as_slice",
                expected: T::DTYPE,
                actual: self.dtype,
            });
        }
        let bytes = self.contiguous_bytes()?;
        bytemuck::try_cast_slice(bytes).map_err(|_| TensorError::Misaligned {
            op: "as_slice",
            dtype: self.dtype,
            byte_offset: bytes.as_ptr() as usize % crate::storage::ALIGNMENT,
        })
    }

    /// Copy the elements in row-major order into a `Vec<T>` (same dtype; any layout or alignment).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::DTypeMismatch {
                op: "to_vec",
                expected: T::DTYPE,
                actual: self.dtype,
            });
        }
        if let Ok(slice) = self.as_slice::<T>() {
            return Ok(slice.to_vec());
        }
        let size = self.dtype.size_in_bytes();
        Ok(self
            .layout
            .indices()
            .map(|i| bytemuck::pod_read_unaligned(&self.bytes[i * size..(i + 1) * size]))
            .collect())
    }

    /// Convert every element to f32 (exact for f16, bf16, i8 and u8; i32 rounds past 2^24).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        fn widen<T: Element>(v: &TensorView<'_>) -> Result<Vec<f32>> {
            if let Ok(slice) = v.as_slice::<T>() {
                return Ok(slice.iter().map(|x| x.to_f32()).collect());
            }
            Ok(v.to_vec::<T>()?.into_iter().map(|x| x.to_f32()).collect())
        }
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(),
            DType::F16 => widen::<f16>(self),
            DType::BF16 => widen::<bf16>(self),
            DType::I8 => widen::<i8>(self),
            DType::U8 => widen::<u8>(self),
            DType::I32 => widen::<i32>(self),
        }
    }

    /// A contiguous owned copy with the same dtype.
    pub fn to_owned(&self) -> Result<Tensor> {
        let bytes = if self.is_contiguous() {
            AlignedBytes::from_bytes(self.contiguous_bytes()?)
        } else {
            let size = self.dtype.size_in_bytes();
            let mut out = AlignedBytes::zeroed(self.numel() * size);
            let dst = out.as_mut_slice();
            for (k, i) in self.layout.indices().enumerate() {
                dst[k * size..(k + 1) * size]
                    .copy_from_slice(&self.bytes[i * size..(i + 1) * size]);
            }
            out
        };
        Ok(Tensor {
            storage: Arc::new(Storage::Owned(bytes)),
            dtype: self.dtype,
            layout: Layout::contiguous(self.shape())?,
        })
    }

    /// Convert to another dtype. Allowed: anything to f32; floats to f16/bf16 (round to
    /// nearest even); integers to wider integers. Narrowing to integers is quantization and
    /// belongs to sq-kernels, so it is refused here.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return self.to_owned();
        }
        let shape = self.shape().to_vec();
        match (self.dtype, dtype) {
            (_, DType::F32) => Tensor::from_vec(self.to_f32_vec()?, &shape),
            (from, DType::F16) if from.is_float() => Tensor::from_vec(
                self.to_f32_vec()?.into_iter().map(f16::from_f32).collect(),
                &shape,
            ),
            (from, DType::BF16) if from.is_float() => Tensor::from_vec(
                self.to_f32_vec()?.into_iter().map(bf16::from_f32).collect(),
                &shape,
            ),
            (DType::I8, DType::I32) => Tensor::from_vec(
                self.to_vec::<i8>()?.into_iter().map(i32::from).collect(),
                &shape,
            ),
            (DType::U8, DType::I32) => Tensor::from_vec(
                self.to_vec::<u8>()?.into_iter().map(i32::from).collect(),
                &shape,
            ),
            (from, to) => Err(TensorError::UnsupportedConversion { from, to }),
        }
    }

    /// Restrict dimension `dim` to `start..start + len`, without copying.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView<'a>> {
        Ok(TensorView {
            bytes: self.bytes,
            dtype: self.dtype,
            layout: self.layout.narrow(dim, start, len)?,
        })
    }

    /// Swap two dimensions, without copying.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<TensorView<'a>> {
        Ok(TensorView {
            bytes: self.bytes,
            dtype: self.dtype,
            layout: self.layout.transpose(dim0, dim1)?,
        })
    }

    /// Reinterpret a contiguous view with a new shape of the same size.
    pub fn reshape(&self, shape: &[usize]) -> Result<TensorView<'a>> {
        Ok(TensorView {
            bytes: self.bytes,
            dtype: self.dtype,
            layout: self.layout.reshape(shape)?,
        })
    }
}

impl Tensor {
    /// A contiguous tensor that takes its elements from `data`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        Self::from_slice(&data, shape)
    }

    /// A contiguous tensor holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        TensorView::from_slice(data, shape)?.to_owned()
    }

    /// A contiguous tensor holding a copy of `bytes`, interpreted as `dtype`.
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        TensorView::from_bytes(bytes, dtype, shape)?.to_owned()
    }

    /// A contiguous tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let layout = Layout::contiguous(shape)?;
        let len = layout
            .numel()
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| TensorError::ShapeOverflow {
                shape: shape.to_vec(),
            })?;
        Ok(Tensor {
            storage: Arc::new(Storage::Owned(AlignedBytes::zeroed(len))),
            dtype,
            layout,
        })
    }

    /// A tensor over `len` bytes of a memory map starting at `start` (zero-copy).
    pub(crate) fn from_mapped(
        mmap: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Tensor> {
        check_len(dtype, shape, len)?;
        Ok(Tensor {
            storage: Arc::new(Storage::Mapped { mmap, start, len }),
            dtype,
            layout: Layout::contiguous(shape)?,
        })
    }

    /// A borrowed view of this tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            bytes: self.storage.as_bytes(),
            dtype: self.dtype,
            layout: self.layout.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn strides(&self) -> &[usize] {
        self.layout.strides()
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    /// Size of dimension `dim`, or an error naming the shape.
    pub fn dim(&self, dim: usize) -> Result<usize> {
        self.view().dim(dim)
    }
    /// Whether the data is a zero-copy slice of a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        self.storage.is_mapped()
    }
    /// Whether two tensors share the same storage (e.g. one is a narrowed view of the other).
    pub fn shares_storage_with(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// See [`TensorView::as_slice`].
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.view().as_slice()
    }
    /// See [`TensorView::to_vec`].
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.view().to_vec()
    }
    /// See [`TensorView::to_f32_vec`].
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.view().to_f32_vec()
    }
    /// See [`TensorView::to_dtype`].
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        self.view().to_dtype(dtype)
    }

    /// This tensor if contiguous (a cheap clone), else a contiguous copy.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            Ok(self.clone())
        } else {
            self.view().to_owned()
        }
    }

    /// Restrict dimension `dim` to `start..start + len`; shares storage.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(Tensor {
            storage: self.storage.clone(),
            dtype: self.dtype,
            layout: self.layout.narrow(dim, start, len)?,
        })
    }

    /// Swap two dimensions; shares storage.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Tensor> {
        Ok(Tensor {
            storage: self.storage.clone(),
            dtype: self.dtype,
            layout: self.layout.transpose(dim0, dim1)?,
        })
    }

    /// A new shape of the same size; shares storage (contiguous tensors only).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor {
            storage: self.storage.clone(),
            dtype: self.dtype,
            layout: self.layout.reshape(shape)?,
        })
    }
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TensorView({}, {:?})", self.dtype, self.shape())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Tensor({}, {:?}, {kind})", self.dtype, self.shape())
    }
}

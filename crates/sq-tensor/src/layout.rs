//! Shapes and row-major strides, with zero-copy views.

use crate::TensorError;

/// Where the elements of a tensor live inside its storage: shape, strides (in elements) and
/// the offset (in elements) of the first element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Number of elements of a shape, `None` on overflow.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for (stride, &dim) in strides.iter_mut().zip(shape).rev() {
        *stride = acc;
        acc = acc.saturating_mul(dim);
    }
    strides
}

impl Layout {
    /// A contiguous row-major layout for `shape`.
    pub fn contiguous(shape: &[usize]) -> Result<Layout, TensorError> {
        checked_numel(shape).ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        })?;
        Ok(Layout {
            shape: shape.to_vec(),
            strides: row_major_strides(shape),
            offset: 0,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the first element, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        // Checked at construction; narrowing only shrinks.
        self.shape.iter().product()
    }

    /// Whether elements are laid out row-major without gaps (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected *= dim;
        }
        true
    }

    /// Index one past the last element this layout can touch (0 for an empty tensor).
    pub fn storage_extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Restrict dimension `dim` to `start..start + len` without copying.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout, TensorError> {
        let size = *self.shape.get(dim).ok_or_else(|| TensorError::OutOfRange {
            what: format!("narrow: dimension {dim}"),
            shape: self.shape.clone(),
        })?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(TensorError::OutOfRange {
                what: format!(
                    "narrow: dimension {dim} range {start}..{}",
                    start.saturating_add(len)
                ),
                shape: self.shape.clone(),
            });
        }
        let mut out = self.clone();
        out.shape[dim] = len;
        if len > 0 {
            out.offset += start * self.strides[dim];
        }
        Ok(out)
    }

    /// Swap two dimensions without copying.
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Layout, TensorError> {
        if dim0 >= self.rank() || dim1 >= self.rank() {
            return Err(TensorError::OutOfRange {
                what: format!("transpose: dimensions {dim0} and {dim1}"),
                shape: self.shape.clone(),
            });
        }
        let mut out = self.clone();
        out.shape.swap(dim0, dim1);
        out.strides.swap(dim0, dim1);
        Ok(out)
    }

    /// A new shape with the same elements; only for contiguous layouts.
    pub fn reshape(&self, shape: &[usize]) -> Result<Layout, TensorError> {
        if checked_numel(shape) != Some(self.numel()) {
            return Err(TensorError::ShapeMismatch {
                op: "reshape",
                expected: self.shape.clone(),
                actual: shape.to_vec(),
            });
        }
        if !self.is_contiguous() {
            return Err(TensorError::NotContiguous {
                op: "reshape",
                shape: self.shape.clone(),
                strides: self.strides.clone(),
            });
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides: row_major_strides(shape),
            offset: self.offset,
        })
    }

    /// Storage indices of every element, in row-major logical order.
    pub fn indices(&self) -> StridedIndices<'_> {
        StridedIndices {
            layout: self,
            counter: vec![0; self.rank()],
            next: if self.numel() == 0 {
                None
            } else {
                Some(self.offset)
            },
        }
    }
}

/// Iterator over the storage index of each element of a [`Layout`].
pub struct StridedIndices<'a> {
    layout: &'a Layout,
    counter: Vec<usize>,
    next: Option<usize>,
}

impl Iterator for StridedIndices<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        let mut index = current;
        let mut dim = self.layout.rank();
        loop {
            if dim == 0 {
                self.next = None;
                break;
            }
            dim -= 1;
            self.counter[dim] += 1;
            index += self.layout.strides[dim];
            if self.counter[dim] < self.layout.shape[dim] {
                self.next = Some(index);
                break;
            }
            index -= self.layout.strides[dim] * self.counter[dim];
            self.counter[dim] = 0;
        }
        Some(current)
    }
}

//! Byte storage behind tensors: 64-byte aligned heap buffers, or a slice of a memory map.

use memmap2::Mmap;
use std::sync::Arc;

/// Alignment of owned buffers: one cache line, and one zmm register.
pub const ALIGNMENT: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; ALIGNMENT]);

/// A zero-initialised heap buffer aligned to [`ALIGNMENT`] bytes.
pub struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        AlignedBytes {
            lines: vec![Line([0; ALIGNMENT]); len.div_ceil(ALIGNMENT)],
            len,
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialised bytes, and `Line` is plain bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Where a tensor's bytes live.
pub enum Storage {
    /// Owned, aligned heap memory.
    Owned(AlignedBytes),
    /// A byte range of a read-only memory-mapped file (zero-copy loading).
    Mapped {
        mmap: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl Storage {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(bytes) => bytes.as_slice(),
            Storage::Mapped { mmap, start, len } => &mmap[*start..*start + *len],
        }
    }

    /// Whether this storage borrows a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }
}

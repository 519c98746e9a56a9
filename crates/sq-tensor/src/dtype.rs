//! Element types and their byte-level properties.

use half::{bf16, f16};
use std::fmt;

/// The element types a [`crate::Tensor`] can hold.
///
/// These are the dtypes SmoothQuant needs: f32 for compute, f16/bf16 for checkpoints,
/// i8 for quantized weights and activations, u8 for offset activations, i32 for accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    U8,
    I32,
}

impl DType {
    /// All supported dtypes, in a fixed order.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::U8,
        DType::I32,
    ];

    /// Size of one element in bytes.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    /// The name safetensors uses in its header (`"F32"`, `"BF16"`, ...).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I32 => "I32",
        }
    }

    /// Whether the dtype is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::I32 => DType::I32,
            _ => return None,
        })
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I8 => S::I8,
            DType::U8 => S::U8,
            DType::I32 => S::I32,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
        };
        f.write_str(name)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the element of one [`DType`].
///
/// Implemented for `f32`, [`half::f16`], [`half::bf16`], `i8`, `u8` and `i32`; sealed.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Copy + Send + Sync + PartialEq + fmt::Debug + 'static
{
    /// The dtype this type represents.
    const DTYPE: DType;
    /// Widen to f32 (exact for every supported type).
    fn to_f32(self) -> f32;
}

macro_rules! element {
    ($t:ty, $d:expr, |$v:ident| $to:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn to_f32(self) -> f32 {
                let $v = self;
                $to
            }
        }
    };
}

element!(f32, DType::F32, |v| v);
element!(f16, DType::F16, |v| v.to_f32());
element!(bf16, DType::BF16, |v| v.to_f32());
element!(i8, DType::I8, |v| v as f32);
element!(u8, DType::U8, |v| v as f32);
// i32 -> f32 rounds above 2^24; documented on `Tensor::to_f32_vec`.
element!(i32, DType::I32, |v| v as f32);

//! On non-x86-64 targets the VNNI backends exist as types but can never be constructed.

use super::{ActScales, BatchedI8, BmmOutput, Int8Gemm, PackedInt8, PackedLayout};
use crate::error::Result;
use std::convert::Infallible;

macro_rules! unconstructible_backend {
    ($ty:ident, $name:literal) => {
        /// Not available on this architecture: `new()` always returns `None`.
        #[derive(Clone, Copy, Debug)]
        pub struct $ty {
            never: Infallible,
        }

        impl $ty {
            pub const NAME: &'static str = $name;

            pub fn new() -> Option<Self> {
                None
            }
        }

        impl Int8Gemm for $ty {
            fn name(&self) -> &'static str {
                Self::NAME
            }
            fn layout(&self) -> PackedLayout {
                match self.never {}
            }
            fn gemm_i32_out(
                &self,
                _: &[i8],
                _: usize,
                _: &PackedInt8,
                _: &mut [i32],
            ) -> Result<()> {
                match self.never {}
            }
            fn gemm_f32_out(
                &self,
                _: &[i8],
                _: usize,
                _: ActScales<'_>,
                _: &PackedInt8,
                _: &mut [f32],
            ) -> Result<()> {
                match self.never {}
            }
            fn gemm_i8_out(
                &self,
                _: &[i8],
                _: usize,
                _: ActScales<'_>,
                _: &PackedInt8,
                _: f32,
                _: &mut [i8],
            ) -> Result<()> {
                match self.never {}
            }
            fn bmm(
                &self,
                _: BatchedI8<'_>,
                _: BatchedI8<'_>,
                _: bool,
                _: BmmOutput<'_>,
            ) -> Result<()> {
                match self.never {}
            }
        }
    };
}

unconstructible_backend!(Avx512Vnni, "avx512vnni");
unconstructible_backend!(AvxVnni, "avxvnni");

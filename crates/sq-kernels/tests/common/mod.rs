//! Deterministic inputs shared by the integration tests.
#![allow(dead_code)]

use sq_kernels::{available_backends, backend_by_name, Int8Gemm};
use std::sync::Arc;

/// xorshift64: reproducible without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform over the full i8 range, -128 included.
    pub fn i8(&mut self) -> i8 {
        (self.next_u64() >> 56) as i8
    }
    pub fn i8s(&mut self, len: usize) -> Vec<i8> {
        (0..len).map(|_| self.i8()).collect()
    }
    /// Uniform in [lo, hi).
    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    pub fn f32s(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.f32_in(lo, hi)).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Every backend this CPU runs except the reference, which the tests compare against.
pub fn optimized_backends() -> Vec<Arc<dyn Int8Gemm>> {
    available_backends()
        .into_iter()
        .filter(|&n| n != "reference")
        .map(|n| backend_by_name(n).unwrap())
        .collect()
}

//! Criterion benches: INT8 GEMM per backend, the f32 GEMM and per-token quantization.
//! `cargo bench -p sq-kernels`; the full suite with peaks is `cargo xtask bench gemm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sq_kernels::{
    available_backends, backend_by_name, f32_gemm, pack_f32, quantize_per_token, ActScales,
    WeightScales,
};
use std::hint::black_box;

const SHAPES: [(usize, usize, usize); 3] = [(1, 2048, 2048), (16, 2048, 2048), (512, 2048, 2048)];

fn data_i8(len: usize, seed: u32) -> Vec<i8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as i8)
        .collect()
}

fn int8_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("int8_gemm_f32_out");
    group.sample_size(10);
    for name in available_backends() {
        if name == "reference" {
            continue;
        }
        let backend = backend_by_name(name).expect("listed as available");
        for &(m, n, k) in &SHAPES {
            let x = data_i8(m * k, 1);
            let w = data_i8(n * k, 2);
            let scales = vec![0.01f32; m];
            let packed = backend
                .pack_weights(&w, n, k, WeightScales::PerChannel(vec![0.02; n]), None)
                .expect("valid shapes");
            let mut out = vec![0f32; m * n];
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_with_input(
                BenchmarkId::new(name, format!("{m}x{n}x{k}")),
                &m,
                |b, &m| {
                    b.iter(|| {
                        backend
                            .gemm_f32_out(
                                black_box(&x),
                                m,
                                ActScales::PerToken(&scales),
                                &packed,
                                &mut out,
                            )
                            .expect("valid shapes")
                    })
                },
            );
        }
    }
    group.finish();
}

fn f32_gemm_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("f32_gemm");
    group.sample_size(10);
    for &(m, n, k) in &SHAPES {
        let x: Vec<f32> = data_i8(m * k, 3)
            .iter()
            .map(|&v| v as f32 / 128.0)
            .collect();
        let w: Vec<f32> = data_i8(n * k, 4)
            .iter()
            .map(|&v| v as f32 / 128.0)
            .collect();
        let packed = pack_f32(&w, n, k).expect("valid shapes");
        let mut out = vec![0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(format!("{m}x{n}x{k}"), |b| {
            b.iter(|| f32_gemm(black_box(&x), m, &packed, None, &mut out).expect("valid shapes"))
        });
    }
    group.finish();
}

fn quantize(c: &mut Criterion) {
    let (m, k) = (512, 2048);
    let x: Vec<f32> = data_i8(m * k, 5).iter().map(|&v| v as f32 * 0.01).collect();
    let mut q = vec![0i8; m * k];
    let mut scales = vec![0f32; m];
    let mut group = c.benchmark_group("quantize_per_token");
    group.throughput(Throughput::Bytes((m * k * 4) as u64));
    group.bench_function(format!("{m}x{k}"), |b| {
        b.iter(|| {
            quantize_per_token(black_box(&x), m, k, &mut q, &mut scales).expect("valid shapes")
        })
    });
    group.finish();
}

criterion_group!(benches, int8_gemm, f32_gemm_bench, quantize);
criterion_main!(benches);

//! Loading cost of safetensors checkpoints: zero-copy memory map vs conversion to f32.

use criterion::{criterion_group, criterion_main, Criterion};
use smoothquant_rs::tensor::{bf16, save_safetensors, Checkpoint, Tensor};

fn bench_load(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<(String, Tensor)> = (0..8)
        .map(|i| {
            let data: Vec<bf16> = (0..1 << 20)
                .map(|j| bf16::from_f32((j % 97) as f32))
                .collect();
            (
                format!("layer.{i}.weight"),
                Tensor::from_vec(data, &[1024, 1024]).unwrap(),
            )
        })
        .collect();
    save_safetensors(dir.path().join("model.safetensors"), &tensors, None).unwrap();
    c.bench_function("open + map 8 x 1M bf16", |b| {
        b.iter(|| {
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            ckpt.tensor("layer.7.weight").unwrap().numel()
        })
    });
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    c.bench_function("bf16 -> f32, 1M elements", |b| {
        b.iter(|| {
            ckpt.tensor("layer.3.weight")
                .unwrap()
                .to_f32_vec()
                .unwrap()
                .len()
        })
    });
}

criterion_group!(benches, bench_load);
criterion_main!(benches);

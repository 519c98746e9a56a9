//! One loaded model, two generations at once from two threads: each gets exactly the text it
//! gets when run alone (sessions are per generation; the model is shared read-only).

use sq_model::{generate, load, load_hf_dir, ActQuant, Int8Linear, LoadedModel, Sampler};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
}

/// (prompt, temperature, seed) of each job.
const JOBS: [(&str, f32, u64); 2] = [
    ("Once upon a time there was a little", 0.0, 0),
    ("The cat sat on the", 0.8, 42),
];

fn one(m: &LoadedModel, (prompt, temperature, seed): (&str, f32, u64)) -> (Vec<u32>, String) {
    let mut ids = Vec::new();
    if m.add_bos {
        ids.extend(m.tokenizer.bos_id());
    }
    ids.extend(m.tokenizer.encode(prompt).unwrap());
    let mut sampler = Sampler::new(temperature, 0.95, seed).unwrap();
    let out = generate(
        &m.model,
        m.tokenizer.as_ref(),
        &ids,
        24,
        &mut sampler,
        |_| {},
    )
    .unwrap();
    (out.tokens, out.text)
}

fn check(m: &LoadedModel, label: &str) {
    let alone: Vec<_> = JOBS.iter().map(|&j| one(m, j)).collect();
    assert!(alone.iter().all(|(t, _)| !t.is_empty()), "{label}");
    for round in 0..3 {
        let together: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = JOBS.iter().map(|&j| s.spawn(move || one(m, j))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "{label}, round {round}");
    }
}

#[test]
fn two_threads_share_one_model() {
    let stories = load(None, None).unwrap();
    check(&stories, "stories260K fp32");
    check(
        &load_hf_dir(&fixture("llama-gqa")).unwrap(),
        "llama-gqa fp32",
    );

    // The same with INT8 Linears (packed weights and scratch buffers shared by both threads).
    let mut int8 = load(None, None).unwrap();
    let backend = sq_kernels::select_backend().unwrap();
    for block in &mut int8.model.layers {
        for l in block.linears_mut() {
            let fp = l.as_fp().unwrap();
            let q = Int8Linear::from_fp(
                fp,
                sq_model::WeightGranularity::Channel,
                ActQuant::Token,
                Arc::clone(&backend),
            )
            .unwrap();
            l.linear = Box::new(q);
        }
    }
    check(&int8, "stories260K W8A8");
}

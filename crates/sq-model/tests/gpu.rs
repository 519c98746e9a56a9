//! The model forward on the GPU (feature `cuda`) against transformers' golden logits and the
//! CPU: `cargo test -p sq-model --features cuda --test gpu`. Without an NVIDIA driver or GPU
//! each test prints why and checks nothing.
#![cfg(feature = "cuda")]

use sq_kernels::cuda::CudaDevice;
use sq_kernels::{Int8Gemm, KernelError};
use sq_model::gpu::{FpPrecision, GpuModel};
use sq_model::{
    load, load_hf_dir, ActQuant, Forward, Int8Linear, Logits, Model, WeightGranularity,
};
use sq_tensor::SafetensorsFile;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

fn device(test: &str) -> Option<Arc<CudaDevice>> {
    static DEVICE: OnceLock<Result<Arc<CudaDevice>, KernelError>> = OnceLock::new();
    match DEVICE.get_or_init(|| CudaDevice::new(0)) {
        Ok(d) => Some(d.clone()),
        Err(KernelError::CudaUnavailable { reason }) => {
            eprintln!("skipping {test}: no usable GPU ({reason})");
            None
        }
        Err(e) => panic!("{test}: opening the GPU failed: {e}"),
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
}

/// max |ours - want| / max(1, max |want|).
fn rel_err(ours: &[f32], want: &[f32]) -> f32 {
    assert_eq!(ours.len(), want.len());
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

const FIXTURES: [&str; 9] = [
    "bloom",
    "bloom-bf16",
    "llama-gqa",
    "llama-linear-rope",
    "llama-tied-bf16",
    "opt-postnorm",
    "opt-prenorm",
    "opt-project",
    "qwen2-bias",
];

/// Logits of every position for the whole prompt, then for half of it followed by one token
/// at a time from the KV cache (the decode path).
fn logits_both_ways<M: Forward>(model: &M, ids: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let t = ids.len();
    let mut all = Vec::new();
    let mut s = model.new_session(t).unwrap();
    model.forward(ids, &mut s, Logits::All, &mut all).unwrap();
    let split = (t / 2).max(1);
    let mut s = model.new_session(t).unwrap();
    let mut stepwise = Vec::new();
    model
        .forward(&ids[..split], &mut s, Logits::All, &mut stepwise)
        .unwrap();
    let mut last = Vec::new();
    for pos in split..t {
        model
            .forward(&ids[pos..pos + 1], &mut s, Logits::Last, &mut last)
            .unwrap();
        stepwise.extend_from_slice(&last);
    }
    (all, stepwise)
}

fn golden_prompts(dir: &std::path::Path) -> Vec<(Vec<u32>, Vec<f32>)> {
    let golden = SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
    (0..)
        .map_while(|i| {
            let ids = golden.tensor(&format!("input_ids.{i}")).ok()?;
            let ids = ids
                .to_vec::<i32>()
                .unwrap()
                .into_iter()
                .map(|x| x as u32)
                .collect();
            let logits = golden
                .tensor(&format!("logits.{i}"))
                .unwrap()
                .to_f32_vec()
                .unwrap();
            Some((ids, logits))
        })
        .collect()
}

#[test]
fn fp32_and_fp16_forwards_match_transformers() {
    let Some(dev) = device("fp32_and_fp16_forwards_match_transformers") else {
        return;
    };
    for name in FIXTURES {
        let dir = fixtures().join(name);
        let loaded = load_hf_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (precision, tol) in [(FpPrecision::F32, 2e-4), (FpPrecision::F16, 2e-2)] {
            let gpu = GpuModel::upload(&loaded.model, dev.clone(), precision)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for (i, (ids, want)) in golden_prompts(&dir).iter().enumerate() {
                let (all, stepwise) = logits_both_ways(&gpu, ids);
                let e = rel_err(&all, want);
                assert!(e < tol, "{name} {precision:?} prompt {i} prefill: {e}");
                let e = rel_err(&stepwise, want);
                assert!(e < tol, "{name} {precision:?} prompt {i} decode: {e}");
            }
        }
    }
}

/// Every Linear but the LM head as W8A8 on the best CPU backend.
fn quantize(model: &mut Model, act: ActQuant, backend: &Arc<dyn Int8Gemm>) {
    for l in model.linears_mut() {
        if l.name == "lm_head" {
            continue;
        }
        let fp = l.as_fp().expect("an FP model").clone();
        let act = match act {
            // A calibrated-looking static scale: the weights' input range is unknown here.
            ActQuant::Static { .. } => ActQuant::Static { scale: 0.05 },
            other => other,
        };
        l.linear = Box::new(
            Int8Linear::from_fp(&fp, WeightGranularity::Channel, act, backend.clone()).unwrap(),
        );
    }
}

#[test]
fn w8a8_forward_matches_the_cpu() {
    let Some(dev) = device("w8a8_forward_matches_the_cpu") else {
        return;
    };
    let backend = sq_kernels::select_backend().unwrap();
    for name in ["llama-gqa", "opt-prenorm", "bloom", "qwen2-bias"] {
        let dir = fixtures().join(name);
        for act in [
            ActQuant::Token,
            ActQuant::Tensor,
            ActQuant::Static { scale: 0.0 },
        ] {
            let mut loaded = load_hf_dir(&dir).unwrap();
            quantize(&mut loaded.model, act, &backend);
            let gpu = GpuModel::upload(&loaded.model, dev.clone(), FpPrecision::F32).unwrap();
            for (ids, _) in golden_prompts(&dir) {
                let (cpu_all, _) = logits_both_ways(&loaded.model, &ids);
                let (gpu_all, gpu_step) = logits_both_ways(&gpu, &ids);
                // The INT8 products and epilogues are exact on both; the activations they
                // quantize differ by rounding, which can move a value across a step.
                let e = rel_err(&gpu_all, &cpu_all);
                assert!(e < 2e-2, "{name} {act:?} prefill: {e}");
                let e = rel_err(&gpu_step, &cpu_all);
                assert!(e < 2e-2, "{name} {act:?} decode: {e}");
            }
        }
    }
}

#[test]
fn the_embedded_model_generates_the_same_text_on_the_gpu() {
    let Some(dev) = device("the_embedded_model_generates_the_same_text_on_the_gpu") else {
        return;
    };
    let loaded = load(None, None).unwrap();
    let gpu = GpuModel::upload(&loaded.model, dev, FpPrecision::F32).unwrap();
    let mut prompt = vec![loaded.tokenizer.bos_id().unwrap()];
    prompt.extend(loaded.tokenizer.encode("Once upon a time").unwrap());
    let tok = loaded.tokenizer.as_ref();
    let greedy = || sq_model::Sampler::greedy();
    let cpu = sq_model::generate(&loaded.model, tok, &prompt, 24, &mut greedy(), |_| {}).unwrap();
    let on_gpu = sq_model::generate(&gpu, tok, &prompt, 24, &mut greedy(), |_| {}).unwrap();
    assert_eq!(
        on_gpu.tokens, cpu.tokens,
        "{:?} vs {:?}",
        on_gpu.text, cpu.text
    );
}

#[test]
fn gpu_sessions_reject_what_the_cpu_rejects() {
    let Some(dev) = device("gpu_sessions_reject_what_the_cpu_rejects") else {
        return;
    };
    let loaded = load(None, None).unwrap();
    let gpu = GpuModel::upload(&loaded.model, dev, FpPrecision::F16).unwrap();
    let mut s = gpu.new_session(4).unwrap();
    let mut logits = Vec::new();
    let vocab = gpu.config().vocab_size as u32;
    assert!(gpu
        .forward(&[vocab], &mut s, Logits::Last, &mut logits)
        .is_err());
    assert!(gpu.forward(&[], &mut s, Logits::Last, &mut logits).is_err());
    assert!(gpu
        .forward(&[1; 5], &mut s, Logits::Last, &mut logits)
        .is_err());
    gpu.forward(&[1; 4], &mut s, Logits::Last, &mut logits)
        .unwrap();
    assert_eq!(logits.len(), vocab as usize);
    assert!(logits.iter().all(|v| v.is_finite()));
}

//! The two real models in `../shared/assets` against known facts and transformers' numbers.
//! Tests that need `../shared` print a reason and pass trivially when it is absent.

use sq_model::{generate, load, perplexity, Logits, Sampler};
use sq_tensor::SafetensorsFile;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn shared() -> Option<PathBuf> {
    let p = repo().join("../shared/assets");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent", p.display());
        None
    }
}

fn smollm2(shared: &Path) -> sq_model::LoadedModel {
    load(
        Some(&shared.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")),
        None,
    )
    .unwrap()
}

#[test]
fn stories260k_embedded_greedy_matches_llama2c() {
    let loaded = load(None, None).unwrap();
    assert_eq!(loaded.format, "llama2.c");
    assert!(loaded.add_bos);
    let golden =
        SafetensorsFile::open(repo().join("tests/fixtures/real/stories260k_golden.safetensors"))
            .unwrap();
    let input: Vec<u32> = golden
        .tensor("input_ids")
        .unwrap()
        .to_vec::<i32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let mut prompt = vec![loaded.tokenizer.bos_id().unwrap()];
    prompt.extend(loaded.tokenizer.encode("Once upon a time").unwrap());
    assert_eq!(prompt, input);

    // Logits at every position against the independent NumPy port of llama2.c.
    let expected = golden.tensor("logits").unwrap().to_f32_vec().unwrap();
    let mut session = loaded.model.session(64);
    let mut logits = Vec::new();
    loaded
        .model
        .forward(&prompt, &mut session, Logits::All, &mut logits)
        .unwrap();
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = logits
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff / scale < 1e-4, "relative error {}", diff / scale);

    let greedy: Vec<u32> = golden
        .tensor("greedy_ids")
        .unwrap()
        .to_vec::<i32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let out = generate(
        &loaded.model,
        loaded.tokenizer.as_ref(),
        &prompt,
        greedy.len(),
        &mut Sampler::greedy(),
        |_| {},
    )
    .unwrap();
    assert_eq!(out.tokens, greedy);
    assert!(
        out.text.starts_with(", there was a little girl named Lily"),
        "{:?}",
        out.text
    );
}

#[test]
fn smollm2_gguf_capital_of_france_is_paris() {
    let Some(shared) = shared() else { return };
    let loaded = smollm2(&shared);
    let golden =
        SafetensorsFile::open(repo().join("tests/fixtures/real/smollm2_golden.safetensors"))
            .unwrap();
    let ids = |n: &str| -> Vec<u32> {
        golden
            .tensor(n)
            .unwrap()
            .to_vec::<i32>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let prompt = loaded.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(prompt, ids("input_ids"));
    assert!(!loaded.add_bos);

    let mut session = loaded.model.session(32);
    let mut logits = Vec::new();
    loaded
        .model
        .forward(&prompt, &mut session, Logits::Last, &mut logits)
        .unwrap();
    let expected = golden.tensor("last_logits").unwrap().to_f32_vec().unwrap();
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = logits
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff / scale < 1e-4, "relative error {}", diff / scale);

    let greedy = ids("greedy_ids");
    let out = generate(
        &loaded.model,
        loaded.tokenizer.as_ref(),
        &prompt,
        greedy.len(),
        &mut Sampler::greedy(),
        |_| {},
    )
    .unwrap();
    assert_eq!(out.tokens, greedy);
    assert!(out.text.starts_with(" Paris"), "{:?}", out.text);
}

/// The first windows of WikiText-2 test against transformers' per-window NLL
/// (tests/reference/ppl_smollm2.py; the 40-window figure is in docs/results.md).
#[test]
fn smollm2_wikitext_perplexity_matches_transformers() {
    let Some(shared) = shared() else { return };
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/reference/results/ppl_smollm2.json")).unwrap(),
    )
    .unwrap();
    let windows = 3;
    let ref_nll: Vec<f64> = reference["window_mean_nll"].as_array().unwrap()[..windows]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let loaded = smollm2(&shared);
    let text = std::fs::read_to_string(shared.join("wikitext-2/wiki.test.txt")).unwrap();
    let tokens = loaded.tokenizer.encode(&text).unwrap();
    assert_eq!(
        tokens.len() as u64,
        reference["file_tokens"].as_u64().unwrap()
    );
    let mut per_window = Vec::new();
    for w in 0..windows {
        let p = perplexity(
            &loaded.model,
            &tokens[w * 512..(w + 1) * 512],
            512,
            None,
            |_, _| {},
        )
        .unwrap();
        per_window.push(p.mean_nll);
    }
    for (w, (ours, theirs)) in per_window.iter().zip(&ref_nll).enumerate() {
        assert!(
            (ours - theirs).abs() < 2e-3,
            "window {w}: mean NLL {ours} vs transformers {theirs}"
        );
    }
    let all = perplexity(&loaded.model, &tokens, 512, Some(windows), |_, _| {}).unwrap();
    let ref_ppl = (ref_nll.iter().sum::<f64>() / windows as f64).exp();
    assert_eq!(all.predicted_tokens, windows * 511);
    assert!(
        (all.perplexity / ref_ppl - 1.0).abs() < 0.005,
        "{} vs {ref_ppl}",
        all.perplexity
    );
}

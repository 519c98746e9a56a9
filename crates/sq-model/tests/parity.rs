//! Golden parity with Hugging Face transformers: small random OPT, BLOOM and LLaMA-family
//! models built by `tests/reference/make_fixtures.py`, logits at every position for three
//! prompts, compared for full prefill and for prefill + cached decode.

use sq_model::{load_hf_dir, Logits, Model};
use sq_tensor::SafetensorsFile;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
}

/// max |ours - golden| / max |golden|, the "relative to their scale".
fn rel_err(ours: &[f32], golden: &[f32]) -> f32 {
    assert_eq!(ours.len(), golden.len());
    let scale = golden.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(golden)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

const TOL: f32 = 1e-4;

fn check_fixture(name: &str) {
    let dir = fixtures().join(name);
    let loaded = load_hf_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model: &Model = &loaded.model;
    let vocab = model.config.vocab_size;
    let golden = SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
    let mut prompts = 0;
    for i in 0.. {
        let Ok(ids) = golden.tensor(&format!("input_ids.{i}")) else {
            break;
        };
        let ids: Vec<u32> = ids
            .to_vec::<i32>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let expected = golden
            .tensor(&format!("logits.{i}"))
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let t = ids.len();
        assert_eq!(expected.len(), t * vocab);

        // Whole prompt at once.
        let mut session = model.session(t);
        let mut logits = Vec::new();
        model
            .forward(&ids, &mut session, Logits::All, &mut logits)
            .unwrap();
        let e = rel_err(&logits, &expected);
        assert!(e < TOL, "{name} prompt {i} prefill: relative error {e}");

        // Half the prompt, then one token at a time from the cache.
        let split = (t / 2).max(1);
        let mut session = model.session(t);
        model
            .forward(&ids[..split], &mut session, Logits::All, &mut logits)
            .unwrap();
        let e = rel_err(&logits, &expected[..split * vocab]);
        assert!(
            e < TOL,
            "{name} prompt {i} partial prefill: relative error {e}"
        );
        for pos in split..t {
            model
                .forward(&ids[pos..pos + 1], &mut session, Logits::Last, &mut logits)
                .unwrap();
            let e = rel_err(&logits, &expected[pos * vocab..(pos + 1) * vocab]);
            assert!(
                e < TOL,
                "{name} prompt {i} decode at {pos}: relative error {e}"
            );
        }
        prompts += 1;
    }
    assert!(prompts >= 3, "{name}: golden file has {prompts} prompts");
}

#[test]
fn llama_gqa_sharded() {
    check_fixture("llama-gqa");
}

#[test]
fn llama_tied_bf16_llama3_rope() {
    check_fixture("llama-tied-bf16");
}

#[test]
fn llama_linear_rope() {
    check_fixture("llama-linear-rope");
}

#[test]
fn qwen2_qkv_bias() {
    check_fixture("qwen2-bias");
}

#[test]
fn opt_pre_norm() {
    check_fixture("opt-prenorm");
}

#[test]
fn opt_post_norm() {
    check_fixture("opt-postnorm");
}

#[test]
fn opt_project_in_out_bf16() {
    check_fixture("opt-project");
}

#[test]
fn bloom() {
    check_fixture("bloom");
}

#[test]
fn bloom_bf16() {
    check_fixture("bloom-bf16");
}

#[test]
fn tokenizer_json_round_trip() {
    let loaded = load_hf_dir(&fixtures().join("opt-prenorm")).unwrap();
    let ids = loaded.tokenizer.encode("The quick brown fox").unwrap();
    assert!(!ids.is_empty());
    assert_eq!(
        loaded.tokenizer.decode(&ids).unwrap(),
        "The quick brown fox"
    );
}

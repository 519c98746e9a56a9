//! Our fold against `tests/reference/smooth_reference.py`, which applies the official
//! SmoothQuant `smooth_ln_fcs` logic (written afresh) to the same fixtures and statistics.

use sq_calib::{calibrate, ActStats, CalibConfig, StatsTable};
use sq_model::load_hf_dir;
use sq_smooth::{paper_groups, smooth_model, AlphaSpec};
use sq_tensor::SafetensorsFile;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// max |a - b| / max |b|
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn reference_stats(file: &SafetensorsFile) -> StatsTable {
    let mut table = StatsTable::default();
    for name in file.names().into_iter().filter(|n| n != "input_ids") {
        table.insert(ActStats::from_channel_absmax(
            &name,
            file.tensor(&name).unwrap().to_f32_vec().unwrap(),
        ));
    }
    table
}

#[test]
fn fold_matches_the_official_algorithm() {
    for fixture in [
        "llama-gqa",
        "qwen2-bias",
        "opt-prenorm",
        "bloom",
        "llama-tied-bf16",
    ] {
        let dir = root().join("smooth").join(fixture);
        let act = SafetensorsFile::open(dir.join("act_scales.safetensors")).unwrap();

        // Our calibration observes the same maxima as the official forward hooks.
        let ids: Vec<u32> = act
            .tensor("input_ids")
            .unwrap()
            .to_vec::<i32>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        let mut loaded = load_hf_dir(&root().join("hf").join(fixture)).unwrap();
        let ours = calibrate(
            &mut loaded.model,
            &ids,
            &CalibConfig {
                samples: 1,
                seq_len: ids.len(),
                seed: 0,
            },
            |_, _| {},
        )
        .unwrap();
        let reference = reference_stats(&act);
        assert_eq!(ours.len(), reference.len(), "{fixture}");
        for s in reference.iter() {
            let e = rel(
                ours.get(s.name()).unwrap().channel_absmax(),
                s.channel_absmax(),
            );
            assert!(
                e < 1e-5,
                "{fixture} {}: activation ranges differ by {e}",
                s.name()
            );
        }

        for alpha in [0.5f32, 0.85] {
            let expected =
                SafetensorsFile::open(dir.join(format!("smoothed_alpha{alpha}.safetensors")))
                    .unwrap();
            let mut loaded = load_hf_dir(&root().join("hf").join(fixture)).unwrap();
            let mut stats = reference_stats(&act);
            let groups = paper_groups(&loaded.model).unwrap();
            let results = smooth_model(
                &mut loaded.model,
                &groups,
                &mut stats,
                &AlphaSpec::Global(alpha),
            )
            .unwrap();
            let mut checked = 0;
            for name in expected.names() {
                let want = expected.tensor(&name).unwrap().to_f32_vec().unwrap();
                let got: Vec<f32> = if let Some(group) = name.strip_prefix("scales.") {
                    results
                        .iter()
                        .find(|r| r.group.name() == group)
                        .unwrap()
                        .scales
                        .clone()
                } else if let Some(norm) = name
                    .strip_suffix(".weight")
                    .and_then(|n| loaded.model.norm_mut(n))
                {
                    norm.weight.clone()
                } else if let Some(norm) = name
                    .strip_suffix(".bias")
                    .and_then(|n| loaded.model.norm_mut(n))
                {
                    norm.bias.clone().unwrap()
                } else {
                    let linear = name.strip_suffix(".weight").unwrap();
                    loaded
                        .model
                        .linear_mut(linear)
                        .unwrap()
                        .as_fp()
                        .unwrap()
                        .weight()
                        .to_vec()
                };
                let e = rel(&got, &want);
                assert!(
                    e < 1e-5,
                    "{fixture} alpha {alpha} {name}: relative difference {e}"
                );
                checked += 1;
            }
            assert!(checked >= 13, "{fixture}: only {checked} tensors compared");
        }
    }
}

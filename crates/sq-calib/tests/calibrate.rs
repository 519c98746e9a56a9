use sq_calib::{calibrate, calibration_windows, CalibConfig, StatsTable};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf"
    ))
    .join(name)
}

#[test]
fn windows_are_seeded_and_in_range() {
    let cfg = CalibConfig {
        samples: 16,
        seq_len: 32,
        seed: 7,
    };
    let a = calibration_windows(1000, &cfg).unwrap();
    assert_eq!(a, calibration_windows(1000, &cfg).unwrap());
    assert_ne!(
        a,
        calibration_windows(
            1000,
            &CalibConfig {
                seed: 8,
                ..cfg.clone()
            }
        )
        .unwrap()
    );
    assert!(a.iter().all(|w| w.len() == 32 && w.end <= 1000));
    let whole = calibration_windows(20, &cfg).unwrap();
    assert_eq!((whole.len(), whole[0].start, whole[0].end), (1, 0, 20));
    assert!(calibration_windows(1, &cfg).is_err());
    assert!(calibration_windows(100, &CalibConfig { samples: 0, ..cfg }).is_err());
}

#[test]
fn calibration_records_every_linear_input_and_finds_outliers() {
    let mut loaded = sq_model::load_hf_dir(&fixture("llama-gqa")).unwrap();
    let text =
        "The tower is 324 metres tall, about the same height as an 81-storey building. ".repeat(20);
    let tokens = loaded.tokenizer.encode(&text).unwrap();
    let cfg = CalibConfig {
        samples: 4,
        seq_len: 64,
        seed: 0,
    };
    let mut calls = 0;
    let stats = calibrate(&mut loaded.model, &tokens, &cfg, |_, _| calls += 1).unwrap();
    assert_eq!(calls, 4);
    // Every Linear but the LM head, each with its input width.
    let linears: Vec<_> = loaded
        .model
        .linears()
        .into_iter()
        .filter(|l| l.name != "lm_head")
        .collect();
    assert_eq!(stats.len(), linears.len());
    for l in &linears {
        let s = stats
            .get(&l.name)
            .unwrap_or_else(|| panic!("{} not observed", l.name));
        assert_eq!(s.channel_absmax().len(), l.linear.in_features());
        assert_eq!(s.tokens(), 4 * 64);
        assert!(s.tensor_absmax() > 0.0);
    }
    // The fixture injects outlier channels into the residual stream (tests/fixtures/hf/summary.json).
    let q0 = stats.get("model.layers.0.self_attn.q_proj").unwrap();
    assert!(q0.max_median_ratio() > 10.0, "{}", q0.max_median_ratio());
    // q, k and v read the same input.
    assert_eq!(
        q0.channel_absmax(),
        stats
            .get("model.layers.0.self_attn.v_proj")
            .unwrap()
            .channel_absmax()
    );
    // Observers are detached afterwards.
    assert!(loaded.model.linears().iter().all(|l| l.observer.is_none()));

    // Deterministic, and the file round-trips.
    let again = calibrate(&mut loaded.model, &tokens, &cfg, |_, _| {}).unwrap();
    assert_eq!(stats, again);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("act_scales.safetensors");
    stats.save(&path).unwrap();
    let loaded_stats = StatsTable::load(&path).unwrap();
    for s in stats.iter() {
        assert_eq!(
            loaded_stats.get(s.name()).unwrap().channel_absmax(),
            s.channel_absmax()
        );
    }
    let a = std::fs::read(&path).unwrap();
    stats.save(&path).unwrap();
    assert_eq!(a, std::fs::read(&path).unwrap(), "byte-identical rewrite");
}

#[test]
fn non_finite_activations_name_the_layer() {
    let mut loaded = sq_model::load_hf_dir(&fixture("opt-prenorm")).unwrap();
    // Poison one fc1 bias: fc2's input becomes Inf after ReLU.
    let fc1 = loaded
        .model
        .linear_mut("model.decoder.layers.1.fc1")
        .unwrap();
    fc1.as_fp_mut().unwrap().bias_mut().unwrap()[0] = f32::INFINITY;
    let tokens = loaded.tokenizer.encode("Hello there, general").unwrap();
    let err = calibrate(
        &mut loaded.model,
        &tokens,
        &CalibConfig {
            samples: 1,
            seq_len: 8,
            seed: 0,
        },
        |_, _| {},
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("model.decoder.layers.1.fc2") && msg.contains("Inf"),
        "{msg}"
    );
}

use super::common::{
    check_out_file, load_model, model_label, open_layered, peak_rss_bytes, print_json, read_text,
    require_calib_window, should_stream, show_progress, token_bar,
};
use crate::args::CalibrateArgs;
use anyhow::{bail, Context, Result};
use sq_calib::{calibrate, CalibConfig};
use sq_smooth::{run_layers, LayerPlan, Recipe};
use std::time::Instant;

/// The whole model, or one read layer by layer (`--stream`).
enum Model {
    Loaded(Box<sq_model::LoadedModel>),
    Layered(Box<sq_model::LayeredModel>),
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let show = show_progress(a.json);
    check_out_file(&a.out, "--out")?;
    let text = read_text(&a.calib_data, "calibration data (--calib-data)")?;
    let stream = should_stream(&a.model, a.stream, show)?;
    let mut model = if stream {
        Model::Layered(Box::new(open_layered(&a.model, show)?))
    } else {
        Model::Loaded(Box::new(load_model(&a.model, show)?))
    };
    let (config, tokenizer, label) = match &model {
        Model::Loaded(l) => (l.model.config.clone(), l.tokenizer.clone(), model_label(l)),
        Model::Layered(l) => (
            l.shell.config.clone(),
            l.tokenizer.clone(),
            l.source.display().to_string(),
        ),
    };
    let context = config.max_position_embeddings;
    if a.calib_seq_len > context {
        bail!(
            "--calib-seq-len {} is longer than the model's context of {context} tokens; pass \
             --calib-seq-len {context} or less",
            a.calib_seq_len
        );
    }
    let tokens = tokenizer.encode(&text)?;
    let cfg = CalibConfig {
        samples: a.calib_samples,
        seq_len: a.calib_seq_len,
        seed: a.seed,
    };
    let windows = sq_calib::calibration_windows(tokens.len(), &cfg)
        .with_context(|| format!("cannot calibrate on {}", a.calib_data.display()))?;
    require_calib_window(tokens.len(), cfg.seq_len, &a.calib_data)?;
    let total_tokens: usize = windows.iter().map(|w| w.len()).sum();
    let done_tokens: Vec<u64> = windows
        .iter()
        .scan(0u64, |acc, w| {
            *acc += w.len() as u64;
            Some(*acc)
        })
        .collect();
    let _span = tracing::info_span!("calibrate", windows = windows.len()).entered();
    let pb = token_bar(total_tokens as u64, "calibrating", show);
    let start = Instant::now();
    let stats = match &mut model {
        Model::Loaded(loaded) => calibrate(&mut loaded.model, &tokens, &cfg, |done, _| {
            pb.set_position(done_tokens[done - 1])
        })
        .map_err(anyhow::Error::from),
        Model::Layered(layered) => {
            pb.set_length(layered.num_layers() as u64);
            let plan = LayerPlan {
                calibration: Some((tokens.as_slice(), windows.clone())),
                stats: None,
                smoothing: None,
                recipe: Recipe::CHANNEL_TOKEN,
                sequential: false,
                backend: None,
            };
            run_layers(layered, &plan, None, |d, _| pb.set_position(d as u64))
                .map(|o| o.calibration)
                .map_err(anyhow::Error::from)
        }
    }
    .with_context(|| format!("calibration of {label} failed"))?;
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    stats
        .save(&a.out)
        .with_context(|| format!("cannot write the statistics to {}", a.out.display()))?;
    let worst = stats
        .iter()
        .max_by(|x, y| x.max_median_ratio().total_cmp(&y.max_median_ratio()))
        .map(|s| (s.name().to_string(), s.max_median_ratio()));
    if a.json {
        return print_json(&serde_json::json!({
            "model": label,
            "data": a.calib_data.display().to_string(),
            "out": a.out.display().to_string(),
            "windows": windows.len(),
            "tokens": total_tokens,
            "seq_len": a.calib_seq_len,
            "seed": a.seed,
            "linears": stats.len(),
            "tokens_per_s": total_tokens as f64 / seconds.max(1e-9),
            "max_act_max_median_ratio": worst.as_ref().map(|w| serde_json::json!({"linear": w.0, "ratio": w.1})),
            "stream": stream,
            "peak_rss_bytes": peak_rss_bytes(),
        }));
    }
    println!(
        "calibrated {} Linear inputs on {} windows ({} tokens, {:.0} tok/s) -> {}",
        stats.len(),
        windows.len(),
        total_tokens,
        total_tokens as f64 / seconds.max(1e-9),
        a.out.display()
    );
    if let Some((name, ratio)) = worst {
        println!("largest outlier ratio (max/median channel range): {ratio:.1} at {name}");
    }
    Ok(())
}

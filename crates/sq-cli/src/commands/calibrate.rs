use super::common::{
    check_out_file, load_model, model_label, print_json, read_text, require_calib_window,
    show_progress, token_bar,
};
use crate::args::CalibrateArgs;
use anyhow::{bail, Context, Result};
use sq_calib::{calibrate, CalibConfig};
use std::time::Instant;

pub fn run(a: CalibrateArgs) -> Result<()> {
    let show = show_progress(a.json);
    check_out_file(&a.out, "--out")?;
    let text = read_text(&a.calib_data, "calibration data (--calib-data)")?;
    let mut loaded = load_model(&a.model, show)?;
    let context = loaded.model.config.max_position_embeddings;
    if a.calib_seq_len > context {
        bail!(
            "--calib-seq-len {} is longer than the model's context of {context} tokens; pass \
             --calib-seq-len {context} or less",
            a.calib_seq_len
        );
    }
    let tokens = loaded.tokenizer.encode(&text)?;
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
    let stats = calibrate(&mut loaded.model, &tokens, &cfg, |done, _| {
        pb.set_position(done_tokens[done - 1])
    })
    .with_context(|| format!("calibration of {} failed", model_label(&loaded)))?;
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
            "model": model_label(&loaded),
            "data": a.calib_data.display().to_string(),
            "out": a.out.display().to_string(),
            "windows": windows.len(),
            "tokens": total_tokens,
            "seq_len": a.calib_seq_len,
            "seed": a.seed,
            "linears": stats.len(),
            "tokens_per_s": total_tokens as f64 / seconds.max(1e-9),
            "max_act_max_median_ratio": worst.as_ref().map(|w| serde_json::json!({"linear": w.0, "ratio": w.1})),
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

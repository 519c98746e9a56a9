use super::common::{model_label, print_json, show_progress, spinner, Scheme};
use super::pipeline::{alpha, alpha_json, recipe, statistics};
use crate::args::{ExportFormat, QuantizeArgs};
use anyhow::{bail, Context, Result};
use sq_smooth::{
    save_compressed_tensors, save_native, smooth_model, smoothing_groups, ActPolicy, ExportInfo,
};

pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.format == ExportFormat::CompressedTensors && recipe(&a.quant).acts == ActPolicy::Tensor {
        bail!(
            "--format compressed-tensors stores activations dynamic per token or static per tensor; \
             dynamic per-tensor activations (--acts tensor, --preset o2) have no such layout: pass \
             --acts token or --acts static (--preset o1 or o3), or use --format native"
        );
    }
    let schemes = super::common::parse_schemes(&a.quant, &[Scheme::SmoothQuant])?;
    let scheme = match schemes.as_slice() {
        [s] if *s != Scheme::Fp32 => *s,
        _ => bail!("quantize writes one W8A8 scheme: --scheme naive or --scheme smoothquant"),
    };
    if a.quant.calib.calib_data.is_none() && a.quant.act_scales.is_none() {
        bail!("quantize needs calibration: pass --calib-data FILE (text) or --act-scales FILE (from `smoothquant calibrate`)");
    }
    if !a.force
        && a.out.is_dir()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        bail!(
            "the output directory {} is not empty; pass --force to replace it",
            a.out.display()
        );
    }
    let alpha_spec = if scheme == Scheme::SmoothQuant {
        Some(alpha(&a.quant)?)
    } else {
        None
    };
    let show = show_progress(a.json);
    let mut stats = statistics(&a.model, &a.quant, show)?;
    let mut loaded = super::common::load_model(&a.model, show)?;
    if loaded.quantization.is_some() {
        bail!(
            "{} is already quantized; quantize starts from an FP model",
            loaded.source.display()
        );
    }
    let recipe = recipe(&a.quant);
    let mut record = serde_json::Map::new();
    let mut alphas = serde_json::Map::new();
    let mut folds = serde_json::Map::new();
    let targets = sq_smooth::SmoothTargets::from(a.quant.smooth_targets);
    if let Some(spec) = &alpha_spec {
        let groups = smoothing_groups(&loaded.model, a.quant.smooth_targets.into())?;
        let (spec, groups) = if super::pipeline::is_auto(&a.quant) {
            super::pipeline::auto_alpha(&mut loaded, &groups, &stats, &recipe, &a.quant, show)?
        } else {
            (spec.clone(), groups)
        };
        let results = smooth_model(&mut loaded.model, &groups, &mut stats, &spec)?;
        for r in &results {
            alphas.insert(
                r.group.name().to_string(),
                super::pipeline::f32_json(r.alpha),
            );
            folds.insert(r.group.name().to_string(), r.group.fold.describe().into());
        }
        record.insert(
            "alpha".into(),
            if super::pipeline::is_auto(&a.quant) {
                "auto".into()
            } else {
                alpha_json(&spec)
            },
        );
        record.insert("alphas".into(), alphas.clone().into());
        record.insert("smooth_targets".into(), targets.name().into());
        record.insert("folds".into(), folds.clone().into());
    }
    record.insert(
        "calibration".into(),
        match &a.quant.act_scales {
            Some(p) => serde_json::json!({"act_scales": p.display().to_string()}),
            None => serde_json::json!({
                "data": a.quant.calib.calib_data.as_ref().map(|p| p.display().to_string()),
                "samples": a.quant.calib.calib_samples,
                "seq_len": a.quant.calib.calib_seq_len,
                "seed": a.quant.calib.seed,
            }),
        },
    );
    record.insert("source".into(), model_label(&loaded).into());
    // A Hugging Face input's tokenizer.json is copied as it is; GGUF and llama2.c tokenizers are
    // written from their metadata.
    let hf_tokenizer = loaded.source.join("tokenizer.json");
    let tokenizer_json = if loaded.format == "hf" && hf_tokenizer.is_file() {
        std::fs::read_to_string(&hf_tokenizer)
            .with_context(|| format!("cannot read {}", hf_tokenizer.display()))?
    } else {
        loaded
            .tokenizer
            .to_hf_json()
            .context("this model's tokenizer cannot be written as tokenizer.json")?
    };
    let mut extra_files = Vec::new();
    let tok_cfg = loaded.source.join("tokenizer_config.json");
    if loaded.format == "hf" && tok_cfg.is_file() {
        extra_files.push(tok_cfg);
    }
    let info = ExportInfo {
        scheme: scheme.name().into(),
        recipe,
        record,
        add_bos: loaded.add_bos,
        tokenizer_json,
        extra_files,
        lm_head: a.quant.lm_head.into(),
    };
    let pb = spinner(&format!("writing {}", a.out.display()), show);
    match a.format {
        ExportFormat::Native => save_native(
            &loaded.model,
            &loaded.hf_config,
            Some(&stats),
            &info,
            &a.out,
            a.force,
        ),
        ExportFormat::CompressedTensors => save_compressed_tensors(
            &loaded.model,
            &loaded.hf_config,
            Some(&stats),
            &info,
            &a.out,
            a.force,
        ),
    }
    .with_context(|| format!("cannot write the quantized model to {}", a.out.display()))?;
    pb.finish_and_clear();
    let format_name = match a.format {
        ExportFormat::Native => "native",
        ExportFormat::CompressedTensors => "compressed-tensors",
    };
    let bytes = std::fs::metadata(a.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    if a.json {
        return print_json(&serde_json::json!({
            "model": model_label(&loaded),
            "out": a.out.display().to_string(),
            "format": format_name,
            "scheme": scheme.name(),
            "weights": serde_json::to_value(recipe.weights)?,
            "acts": recipe.acts.name(),
            "alpha": if super::pipeline::is_auto(&a.quant) { serde_json::Value::from("auto") } else { alpha_spec.as_ref().map(alpha_json).unwrap_or_default() },
            "alphas": alphas,
            "smooth_targets": alpha_spec.as_ref().map(|_| targets.name()),
            "folds": folds,
            "checkpoint_bytes": bytes,
        }));
    }
    println!(
        "wrote {} ({} W8A8 in the {format_name} layout, weights per {}, acts {}, {:.1} MB)",
        a.out.display(),
        scheme.name(),
        serde_json::to_value(recipe.weights)?.as_str().unwrap_or(""),
        recipe.acts.name(),
        bytes as f64 / 1e6
    );
    Ok(())
}

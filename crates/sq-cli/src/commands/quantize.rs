use super::common::{
    bar, open_layered, peak_rss_bytes, print_json, read_text, require_calib_window, should_stream,
    show_progress, spinner, Scheme,
};
use super::pipeline::{alpha, alpha_json, load_act_scales, recipe, statistics};
use crate::args::{ExportFormat, QuantizeArgs};
use anyhow::{bail, Context, Result};
use sq_calib::{CalibConfig, StatsTable};
use sq_model::{LayeredModel, LoadedModel};
use sq_smooth::{
    run_layers, save_compressed_tensors, save_native, smooth_model, ActPolicy, AlphaSpec,
    ExportInfo, LayerOutcome, LayerPlan, NativeStreamWriter, Recipe,
};

/// The model quantized in memory, or layer by layer with its layers already written.
enum Output {
    InMemory {
        loaded: Box<LoadedModel>,
        stats: StatsTable,
    },
    Streamed(Box<Streamed>),
}

struct Streamed {
    model: LayeredModel,
    writer: NativeStreamWriter,
    outcome: LayerOutcome,
    started: std::time::Instant,
    /// Reading the shell (embeddings, final norm, LM head) before the layers.
    open: std::time::Duration,
}

/// Calibrate, smooth, quantize and write every decoder layer in turn (`--stream`).
fn stream_layers(
    a: &QuantizeArgs,
    scheme: Scheme,
    alpha_spec: Option<&AlphaSpec>,
    recipe: &Recipe,
    show: bool,
) -> Result<Streamed> {
    if a.format != ExportFormat::Native {
        bail!(
            "--stream writes the native layout only; quantize in memory for --format \
             compressed-tensors (leave out --stream and --sequential)"
        );
    }
    if scheme == Scheme::SmoothQuant && super::pipeline::is_auto(&a.quant) {
        bail!(
            "--alpha auto scores whole-model candidates, which needs the whole model in memory: it \
             cannot run with --stream or --sequential; pass a number (e.g. --alpha 0.5) or a JSON \
             table of per-group alphas (found by --alpha auto on a model that fits)"
        );
    }
    if a.sequential && a.quant.calib.calib_data.is_none() {
        bail!("--sequential measures statistics on calibration text: pass --calib-data FILE (not --act-scales)");
    }
    let started = std::time::Instant::now();
    let text = match (&a.quant.act_scales, &a.quant.calib.calib_data) {
        (None, Some(data)) => Some(read_text(data, "calibration data (--calib-data)")?),
        _ => None,
    };
    let given = match &a.quant.act_scales {
        Some(p) => Some(load_act_scales(p)?),
        None => None,
    };
    let opening = std::time::Instant::now();
    let mut model = open_layered(&a.model, show)?;
    let open = opening.elapsed();
    let tokens = match &text {
        Some(t) => model.tokenizer.encode(t)?,
        None => Vec::new(),
    };
    let calibration = match (&text, &a.quant.calib.calib_data) {
        (Some(_), Some(data)) => {
            let cfg = CalibConfig {
                samples: a.quant.calib.calib_samples,
                seq_len: a
                    .quant
                    .calib
                    .calib_seq_len
                    .min(model.shell.config.max_position_embeddings),
                seed: a.quant.calib.seed,
            };
            let windows = sq_calib::calibration_windows(tokens.len(), &cfg)
                .with_context(|| format!("cannot calibrate on {}", data.display()))?;
            require_calib_window(tokens.len(), cfg.seq_len, data)?;
            Some((tokens.as_slice(), windows))
        }
        _ => None,
    };
    let backend = sq_kernels::select_backend()?;
    let plan = LayerPlan {
        calibration,
        stats: given,
        smoothing: alpha_spec.map(|s| {
            (
                a.quant.smooth_targets.into(),
                a.quant.smooth_fold.map(Into::into).unwrap_or_default(),
                s.clone(),
            )
        }),
        recipe: *recipe,
        sequential: a.sequential,
        backend: Some(backend),
    };
    let mut writer = NativeStreamWriter::create(&a.out, a.force)
        .with_context(|| format!("cannot write the quantized model to {}", a.out.display()))?
        .with_layout(a.quant.lm_head.into(), Some(a.shard_size));
    let _span = tracing::info_span!("quantize_layers", layers = model.num_layers()).entered();
    let pb = bar(model.num_layers() as u64, "quantizing layer by layer", show);
    let outcome = run_layers(&mut model, &plan, Some(&mut writer), |d, _| {
        pb.set_position(d as u64)
    })
    .with_context(|| {
        format!(
            "layer-by-layer quantization of {} failed",
            model_source(&a.model)
        )
    })?;
    pb.finish_and_clear();
    Ok(Streamed {
        model,
        writer,
        outcome,
        started,
        open,
    })
}

fn model_source(m: &crate::args::ModelArgs) -> String {
    m.model
        .as_ref()
        .map_or("the embedded stories260K".into(), |p| {
            p.display().to_string()
        })
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.format == ExportFormat::CompressedTensors && a.quant.int8_attention {
        bail!(
            "--format compressed-tensors cannot record --int8-attention: its kv_cache_scheme holds \
             static or per-token scales, not the dynamic per-position, per-head scales of the INT8 \
             KV cache, and it has no field for INT8 Q·Kᵀ and P·V; use --format native (which \
             records it), or drop --int8-attention"
        );
    }
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
    let recipe = recipe(&a.quant);
    let targets = sq_smooth::SmoothTargets::from(a.quant.smooth_targets);
    let stream = should_stream(&a.model, a.stream || a.sequential, show)?;
    let mut smooth_fold = alpha_spec
        .as_ref()
        .and_then(|_| super::pipeline::reported_fold(&a.quant, None));
    let (output, results, spec) = if stream {
        let streamed = stream_layers(&a, scheme, alpha_spec.as_ref(), &recipe, show)?;
        let spec = alpha_spec.clone();
        (Output::Streamed(Box::new(streamed)), None, spec)
    } else {
        let mut stats = statistics(&a.model, &a.quant, show)?;
        let mut loaded = super::common::load_model(&a.model, show)?;
        if loaded.quantization.is_some() {
            bail!(
                "{} is already quantized; quantize starts from an FP model",
                loaded.source.display()
            );
        }
        let mut results = None;
        let mut used_spec = alpha_spec.clone();
        if let Some(spec) = &alpha_spec {
            let groups = super::pipeline::groups_for(&loaded.model, &a.quant)?;
            let (spec, groups) = if super::pipeline::is_auto(&a.quant) {
                // compressed-tensors has no field for a run-time divide: auto keeps the folds.
                let runtime_allowed = a.format == ExportFormat::Native;
                let (spec, groups, fold) = super::pipeline::auto_alpha(
                    &mut loaded,
                    &groups,
                    &stats,
                    &recipe,
                    &a.quant,
                    runtime_allowed,
                    show,
                )?;
                smooth_fold = super::pipeline::reported_fold(&a.quant, Some(fold));
                (spec, groups)
            } else {
                (spec.clone(), groups)
            };
            results = Some(smooth_model(&mut loaded.model, &groups, &mut stats, &spec)?);
            used_spec = Some(spec);
        }
        (
            Output::InMemory {
                loaded: Box::new(loaded),
                stats,
            },
            results,
            used_spec,
        )
    };
    let results = match (&output, results) {
        (Output::Streamed(s), _) => alpha_spec.as_ref().map(|_| s.outcome.smoothing.clone()),
        (_, r) => r,
    };
    let mut record = serde_json::Map::new();
    let mut alphas = serde_json::Map::new();
    let mut folds = serde_json::Map::new();
    if let (Some(results), Some(spec)) = (&results, &spec) {
        for r in results {
            alphas.insert(
                r.group.name().to_string(),
                super::pipeline::f32_json(r.alpha),
            );
            folds.insert(r.group.name().to_string(), r.group.fold.describe().into());
        }
        // Groups left unsmoothed (auto's choice or `null` in the table) are `null`, so the
        // reported table replays as `--alpha FILE`.
        for g in spec.unsmoothed() {
            alphas.insert(g.to_string(), serde_json::Value::Null);
        }
        record.insert(
            "alpha".into(),
            if super::pipeline::is_auto(&a.quant) {
                "auto".into()
            } else {
                alpha_json(spec)
            },
        );
        record.insert("alphas".into(), alphas.clone().into());
        record.insert("smooth_targets".into(), targets.name().into());
        record.insert("folds".into(), folds.clone().into());
        record.insert("smooth_fold".into(), smooth_fold.map(|f| f.name()).into());
    }
    record.insert(
        "calibration".into(),
        match &a.quant.act_scales {
            Some(p) => serde_json::json!({"act_scales": p.display().to_string()}),
            None => {
                let mut c = serde_json::json!({
                    "data": a.quant.calib.calib_data.as_ref().map(|p| p.display().to_string()),
                    "samples": a.quant.calib.calib_samples,
                    "seq_len": a.quant.calib.calib_seq_len,
                    "seed": a.quant.calib.seed,
                });
                if a.sequential {
                    // Statistics of the quantized earlier layers' outputs, not the FP model's.
                    c["sequential"] = true.into();
                }
                c
            }
        },
    );
    let (source, format, add_bos, tokenizer) = match &output {
        Output::InMemory { loaded, .. } => (
            loaded.source.clone(),
            loaded.format,
            loaded.add_bos,
            loaded.tokenizer.clone(),
        ),
        Output::Streamed(s) => (
            s.model.source.clone(),
            s.model.format,
            s.model.add_bos,
            s.model.tokenizer.clone(),
        ),
    };
    let label = source.display().to_string();
    record.insert("source".into(), label.clone().into());
    // A Hugging Face input's tokenizer.json is copied as it is; GGUF and llama2.c tokenizers are
    // written from their metadata.
    let hf_tokenizer = source.join("tokenizer.json");
    let tokenizer_json = if format == "hf" && hf_tokenizer.is_file() {
        std::fs::read_to_string(&hf_tokenizer)
            .with_context(|| format!("cannot read {}", hf_tokenizer.display()))?
    } else {
        tokenizer
            .to_hf_json()
            .context("this model's tokenizer cannot be written as tokenizer.json")?
    };
    let mut extra_files = Vec::new();
    let tok_cfg = source.join("tokenizer_config.json");
    if format == "hf" && tok_cfg.is_file() {
        extra_files.push(tok_cfg);
    }
    let info = ExportInfo {
        scheme: scheme.name().into(),
        recipe,
        record,
        add_bos,
        int8_attention: a.quant.int8_attention,
        tokenizer_json,
        extra_files,
        max_shard_bytes: Some(a.shard_size),
        lm_head: a.quant.lm_head.into(),
    };
    let pb = spinner(&format!("writing {}", a.out.display()), show);
    let mut streamed_report = None;
    match output {
        Output::InMemory { loaded, stats } => match a.format {
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
        },
        Output::Streamed(s) => {
            let Streamed {
                model,
                writer,
                outcome,
                started,
                open,
            } = *s;
            let start = std::time::Instant::now();
            let done = writer.finish(&model.shell, &model.hf_config, &info);
            let mut timings = outcome.timings;
            timings.write += start.elapsed();
            timings.read += open;
            let seconds = started.elapsed().as_secs_f64();
            streamed_report = Some(serde_json::json!({
                "layers": outcome.layers,
                "input_bytes": model.stored_bytes,
                "seconds": seconds,
                "layers_per_s": outcome.layers as f64 / seconds.max(1e-9),
                "input_gb_per_s": model.stored_bytes as f64 / 1e9 / seconds.max(1e-9),
                "read_s": timings.read.as_secs_f64(),
                "calibrate_s": timings.calibrate.as_secs_f64(),
                "smooth_s": timings.smooth.as_secs_f64(),
                "quantize_s": timings.quantize.as_secs_f64(),
                "write_s": timings.write.as_secs_f64(),
                "sequential": a.sequential,
            }));
            done
        }
    }
    .with_context(|| format!("cannot write the quantized model to {}", a.out.display()))?;
    pb.finish_and_clear();
    let format_name = match a.format {
        ExportFormat::Native => "native",
        ExportFormat::CompressedTensors => "compressed-tensors",
    };
    // One model.safetensors, or its shards.
    let bytes: u64 = std::fs::read_dir(&a.out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("model") && n.ends_with(".safetensors")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    if a.json {
        return print_json(&serde_json::json!({
            "model": label,
            "out": a.out.display().to_string(),
            "format": format_name,
            "scheme": scheme.name(),
            "weights": serde_json::to_value(recipe.weights)?,
            "acts": recipe.acts.name(),
            "alpha": if super::pipeline::is_auto(&a.quant) { serde_json::Value::from("auto") } else { alpha_spec.as_ref().map(alpha_json).unwrap_or_default() },
            "alphas": alphas,
            "smooth_targets": alpha_spec.as_ref().map(|_| targets.name()),
            "folds": folds,
            "smooth_fold": smooth_fold.map(|f| f.name()),
            "checkpoint_bytes": bytes,
            "int8_attention": a.quant.int8_attention,
            "stream": streamed_report,
            "peak_rss_bytes": peak_rss_bytes(),
        }));
    }
    println!(
        "wrote {} ({} W8A8 in the {format_name} layout, weights per {}, acts {}{}, {:.1} MB)",
        a.out.display(),
        scheme.name(),
        serde_json::to_value(recipe.weights)?.as_str().unwrap_or(""),
        recipe.acts.name(),
        if a.quant.int8_attention {
            ", INT8 attention"
        } else {
            ""
        },
        bytes as f64 / 1e6
    );
    Ok(())
}

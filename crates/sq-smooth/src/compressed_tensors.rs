//! Writing a W8A8 checkpoint in the `compressed-tensors` layout (format `int-quantized`), the one
//! that transformers (with the `compressed-tensors` package) and vLLM load, as llm-compressor
//! writes it: `config.json` with a `quantization_config`, INT8 `weight` tensors with their
//! `weight_scale` (`[out, 1]` per channel, `[1]` per tensor) and, for static activations, a
//! `[1]` `input_scale`; every other tensor (embeddings, smoothed norms, LM head, biases) in f32
//! under its Hugging Face name. `sq_model::compressed` reads it back.

use crate::{ActPolicy, ExportInfo};
use crate::{Recipe, Result, SmoothError};
use sq_calib::StatsTable;
use sq_model::{Model, WeightGranularity};
use sq_tensor::atomic::AtomicDir;
use sq_tensor::save_safetensors;
use std::collections::BTreeMap;
use std::path::Path;

/// `quantization_config.quant_method`.
pub const CT_QUANT_METHOD: &str = "compressed-tensors";
/// `quantization_config.format` (INT8 weights stored unpacked, one `int8` per value).
pub const CT_FORMAT: &str = "int-quantized";
/// The compressed-tensors release whose layout this writer follows (written as `version`).
pub const CT_VERSION: &str = "0.20.0";
/// Top-level `config.json` key holding smoothquant-rs' own record (scheme, α, calibration,
/// whether generation starts with BOS). transformers keeps it as a plain attribute and vLLM
/// ignores it; `quantization_config` itself holds only compressed-tensors fields.
pub const CT_RECORD_KEY: &str = "smoothquant_rs";

/// The `quantization_config` of a recipe, field for field as compressed-tensors'
/// `ModelCompressor.update_config` writes it. `ignore` lists the Linears kept in full precision.
pub fn ct_quantization_config(recipe: &Recipe, ignore: &[String]) -> Result<serde_json::Value> {
    let weights = serde_json::json!({
        "dynamic": false,
        "group_size": null,
        "num_bits": 8,
        "strategy": match recipe.weights {
            WeightGranularity::Channel => "channel",
            WeightGranularity::Tensor => "tensor",
        },
        "symmetric": true,
        "type": "int",
    });
    let (strategy, dynamic) = match recipe.acts {
        ActPolicy::Token => ("token", true),
        ActPolicy::Static => ("tensor", false),
        ActPolicy::Tensor => return Err(dynamic_per_tensor_error()),
    };
    let input = serde_json::json!({
        "dynamic": dynamic,
        "group_size": null,
        "num_bits": 8,
        "strategy": strategy,
        "symmetric": true,
        "type": "int",
    });
    Ok(serde_json::json!({
        "config_groups": {
            "group_0": {
                "format": CT_FORMAT,
                "input_activations": input,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": CT_FORMAT,
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "moe_sparsity_config": null,
        "quant_method": CT_QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }))
}

fn dynamic_per_tensor_error() -> SmoothError {
    SmoothError::Unsupported(
        "dynamic per-tensor activations (--acts tensor, --preset o2) have no compressed-tensors \
         layout (it stores activations dynamic per token or static per tensor): pass --acts token \
         or --acts static (--preset o1 or o3), or write --format native"
            .into(),
    )
}

/// Quantize `model` (FP; already smoothed for SmoothQuant) with `info.recipe` and write it to
/// `out` atomically in the compressed-tensors `int-quantized` layout. `stats` must describe the
/// model as it is (static scales read them). A non-empty `out` is replaced only with `overwrite`.
///
/// A Linear whose input smoothing is a run-time divide instead of a fold into a preceding
/// operation (BLOOM's `dense_4h_to_h` under `--smooth-targets all`) has no compressed-tensors
/// field: it is an error naming the layer.
pub fn save_compressed_tensors(
    model: &Model,
    hf_config: &serde_json::Value,
    stats: Option<&StatsTable>,
    info: &ExportInfo,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let recipe = info.recipe;
    if info.int8_attention {
        return Err(SmoothError::Unsupported(
            "INT8 attention quantizes K and V with a dynamic scale per position and head, which \
             compressed-tensors' kv_cache_scheme (static or per-token scales) cannot record, and \
             its Q·Kᵀ/P·V quantization has no field at all: export without --int8-attention, or \
             use --format native"
                .into(),
        ));
    }
    if recipe.acts == ActPolicy::Tensor {
        return Err(dynamic_per_tensor_error());
    }
    // The check point for smoothing folds the layout cannot express: a vector that divides a
    // Linear's input at run time would be silently lost, so refuse it by name.
    let runtime_divide = model
        .linears()
        .into_iter()
        .find(|l| l.as_fp().and_then(|f| f.input_smoothing()).is_some());
    if let Some(name) = runtime_divide.map(|l| &l.name) {
        return Err(SmoothError::Unsupported(format!(
            "`{name}` divides its input by its smoothing scales at run time (no preceding \
             operation can absorb them), which the compressed-tensors layout cannot express: \
             pass --smooth-targets paper, or write --format native"
        )));
    }
    if info.lm_head == crate::LmHead::Int8 {
        return Err(SmoothError::Unsupported(
            "an INT8 LM head (--lm-head int8) is smoothquant-rs' own extension, which the \
             compressed-tensors layout here keeps in full precision: write --format native, or \
             drop --lm-head int8"
                .into(),
        ));
    }
    let mut tensors = crate::export::float_tensors(model, crate::LmHead::Fp32)?;
    // Every Linear outside the decoder layers stays full precision and must be ignored, or
    // compressed-tensors would expect INT8 weights for it (`targets: ["Linear"]`).
    let mut ignore = vec!["lm_head".to_string()];
    ignore.extend(
        model
            .project_in
            .iter()
            .chain(model.project_out.iter())
            .map(|l| l.name.clone()),
    );
    // Run-time divides were refused above, so no `input_smoothing` is written.
    for block in &model.layers {
        for l in block.linears() {
            tensors.extend(crate::export::int8_linear_tensors(
                l,
                &recipe,
                stats,
                crate::export::ChannelScales::Column,
            )?);
        }
    }

    let mut config = hf_config.clone();
    let obj = config
        .as_object_mut()
        .ok_or_else(|| SmoothError::Config("the model's config is not a JSON object".into()))?;
    obj.insert(
        "quantization_config".into(),
        ct_quantization_config(&recipe, &ignore)?,
    );
    // Every float tensor is written in f32.
    obj.insert("torch_dtype".into(), "float32".into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), "float32".into());
    }
    let mut record = serde_json::Map::new();
    record.insert("scheme".into(), info.scheme.clone().into());
    record.insert(
        "weights".into(),
        serde_json::to_value(recipe.weights).unwrap_or_default(),
    );
    record.insert("acts".into(), recipe.acts.name().into());
    record.insert("add_bos".into(), info.add_bos.into());
    record.insert(
        "producer".into(),
        format!("smoothquant-rs {}", env!("CARGO_PKG_VERSION")).into(),
    );
    for (k, v) in &info.record {
        record.entry(k.clone()).or_insert(v.clone());
    }
    obj.insert(CT_RECORD_KEY.into(), serde_json::Value::Object(record));

    let tokenizer_config = if info
        .extra_files
        .iter()
        .any(|f| f.file_name().is_some_and(|n| n == "tokenizer_config.json"))
    {
        None
    } else {
        Some(generated_tokenizer_config(&info.tokenizer_json, hf_config)?)
    };

    let dir = AtomicDir::create(out, overwrite)?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(dir.path().join("model.safetensors"), &tensors, Some(&meta))?;
    let io = |p: &Path, e: std::io::Error| SmoothError::Config(format!("{}: {e}", p.display()));
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = dir.path().join(name);
        let text =
            serde_json::to_string_pretty(value).map_err(|e| SmoothError::Config(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| io(&path, e))
    };
    write_json("config.json", &config)?;
    if let Some(tc) = &tokenizer_config {
        write_json("tokenizer_config.json", tc)?;
    }
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, &info.tokenizer_json).map_err(|e| io(&tok_path, e))?;
    for f in &info.extra_files {
        if let Some(name) = f.file_name() {
            std::fs::copy(f, dir.path().join(name)).map_err(|e| io(f, e))?;
        }
    }
    dir.commit()?;
    Ok(())
}

/// The text of token `id` in a tokenizer.json (its added tokens, then its model's vocabulary).
fn token_text(tokenizer: &serde_json::Value, id: u64) -> Option<String> {
    let added = tokenizer.get("added_tokens").and_then(|a| a.as_array());
    if let Some(t) = added
        .into_iter()
        .flatten()
        .find(|t| t.get("id").and_then(|v| v.as_u64()) == Some(id))
    {
        return t.get("content")?.as_str().map(str::to_string);
    }
    let vocab = tokenizer.get("model")?.get("vocab")?;
    match vocab {
        serde_json::Value::Object(m) => m
            .iter()
            .find(|(_, v)| v.as_u64() == Some(id))
            .map(|(k, _)| k.clone()),
        // Unigram vocabularies are `[[piece, score], ...]` indexed by id.
        serde_json::Value::Array(a) => a.get(id as usize)?.get(0)?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A tokenizer_config.json for a tokenizer.json generated from GGUF / llama2.c metadata: the
/// plain fast tokenizer, adding no BOS or EOS (as `smoothquant eval` tokenizes).
fn generated_tokenizer_config(
    tokenizer_json: &str,
    hf_config: &serde_json::Value,
) -> Result<serde_json::Value> {
    let tok: serde_json::Value = serde_json::from_str(tokenizer_json)
        .map_err(|e| SmoothError::Config(format!("the model's tokenizer.json: {e}")))?;
    let special = |key: &str| -> serde_json::Value {
        hf_config
            .get(key)
            .and_then(|v| v.as_u64())
            .and_then(|id| token_text(&tok, id))
            .map_or(serde_json::Value::Null, serde_json::Value::from)
    };
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(n) = hf_config
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
    {
        tc["model_max_length"] = n.into();
    }
    Ok(tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_config_per_recipe() {
        let qc = ct_quantization_config(&Recipe::CHANNEL_TOKEN, &["lm_head".into()]).unwrap();
        let g = &qc["config_groups"]["group_0"];
        assert_eq!(g["weights"]["strategy"], "channel");
        assert_eq!(g["input_activations"]["strategy"], "token");
        assert_eq!(g["input_activations"]["dynamic"], true);
        assert_eq!(qc["format"], "int-quantized");
        assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]));
        let qc = ct_quantization_config(&Recipe::O3, &[]).unwrap();
        let g = &qc["config_groups"]["group_0"];
        assert_eq!(g["weights"]["strategy"], "tensor");
        assert_eq!(g["input_activations"]["strategy"], "tensor");
        assert_eq!(g["input_activations"]["dynamic"], false);
        let err = ct_quantization_config(&Recipe::O2, &[]).unwrap_err();
        assert!(err.to_string().contains("--acts tensor"), "{err}");
    }

    #[test]
    fn special_token_text() {
        let tok = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<unk>"}],
            "model": {"vocab": {"<unk>": 0, "<s>": 1, "a": 2}},
        });
        assert_eq!(token_text(&tok, 0).as_deref(), Some("<unk>"));
        assert_eq!(token_text(&tok, 1).as_deref(), Some("<s>"));
        assert_eq!(token_text(&tok, 9), None);
    }
}

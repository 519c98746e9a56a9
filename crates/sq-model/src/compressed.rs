//! Reading W8A8 checkpoints in the `compressed-tensors` layout (format `int-quantized`): the
//! directories `smoothquant quantize --format compressed-tensors` writes, and llm-compressor's
//! INT8 W8A8 checkpoints of the architectures sq-model runs. Each quantized Linear's INT8
//! `weight`, `weight_scale` and (static activations) `input_scale` are packed directly into an
//! [`Int8Linear`]: no recalibration, no dequantization.
//!
//! What runs: 8-bit symmetric integer weights per channel or per tensor; 8-bit symmetric integer
//! input activations dynamic per token, dynamic per tensor, or static per tensor. Linears that
//! the config's `ignore` list (or no config group) leaves out stay full precision. Anything else
//! the specification allows (group/block strategies, asymmetric or non-8-bit quantization,
//! weight-only schemes, quantized output activations or KV cache, a quantized LM head, sparsity
//! or transforms) is refused with an error naming the layer and the field.

use crate::config::read_config_json;
use crate::loader::{build_model, read_add_bos, LoadedModel};
use crate::native::NativeQuantConfig;
use crate::quant::{ActQuant, Int8Linear, WeightGranularity};
use crate::tokenizer::HfTokenizer;
use crate::{ModelError, Result};
use sq_kernels::{Int8Gemm, WeightScales};
use sq_tensor::{Checkpoint, DType};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// `quantization_config.quant_method` of compressed-tensors checkpoints.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The top-level config.json key where smoothquant-rs records how it made the checkpoint.
pub const RECORD_KEY: &str = "smoothquant_rs";

/// Whether `dir` holds a compressed-tensors checkpoint (whatever its format; loading refuses
/// what it cannot run).
pub fn is_compressed_tensors_dir(dir: &Path) -> bool {
    read_config_json(&dir.join("config.json"))
        .ok()
        .and_then(|c| {
            c.get("quantization_config")?
                .get("quant_method")?
                .as_str()
                .map(|m| m == QUANT_METHOD)
        })
        .unwrap_or(false)
}

/// `QuantizationArgs` of the specification (the fields that decide what runs; the rest, such
/// as `observer` or `actorder`, only describe how the checkpoint was calibrated).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
struct QuantArgs {
    #[serde(default = "eight")]
    num_bits: u32,
    #[serde(default = "int", rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    symmetric: bool,
    #[serde(default)]
    group_size: Option<i64>,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    block_structure: Option<serde_json::Value>,
    #[serde(default)]
    dynamic: serde_json::Value,
}

fn eight() -> u32 {
    8
}
fn int() -> String {
    "int".into()
}
fn yes() -> bool {
    true
}

impl QuantArgs {
    /// The strategy, inferred from `group_size` when absent, as compressed-tensors does.
    fn strategy(&self) -> String {
        match (&self.strategy, self.group_size) {
            (Some(s), _) => s.to_lowercase(),
            (None, None) => "tensor".into(),
            (None, Some(-1)) => "channel".into(),
            (None, Some(_)) => "group".into(),
        }
    }

    fn is_dynamic(&self) -> Option<bool> {
        match &self.dynamic {
            serde_json::Value::Bool(b) => Some(*b),
            serde_json::Value::Null => Some(false),
            _ => None,
        }
    }

    /// Refuse what the INT8 kernels cannot run: anything but 8-bit symmetric integers.
    fn check_int8(&self, what: &str) -> std::result::Result<(), String> {
        if !self.kind.eq_ignore_ascii_case("int") {
            return Err(format!("{what} are type `{}`, not int", self.kind));
        }
        if self.num_bits != 8 {
            return Err(format!("{what} are {}-bit, not 8-bit", self.num_bits));
        }
        if !self.symmetric {
            return Err(format!(
                "{what} are asymmetric (with a zero point); only symmetric INT8 runs here"
            ));
        }
        Ok(())
    }

    fn weight_granularity(&self) -> std::result::Result<WeightGranularity, String> {
        self.check_int8("weights")?;
        if self.is_dynamic() != Some(false) {
            return Err("weights are dynamically quantized".into());
        }
        match self.strategy().as_str() {
            "channel" => Ok(WeightGranularity::Channel),
            "tensor" => Ok(WeightGranularity::Tensor),
            other => Err(format!(
                "weights use strategy `{other}`{}; only channel or tensor run as INT8 W8A8 here",
                self.group_size
                    .filter(|g| *g > 0)
                    .map(|g| format!(" (group_size {g})"))
                    .unwrap_or_default()
            )),
        }
    }

    /// `token`, `tensor` (dynamic) or `static`.
    fn act_kind(&self) -> std::result::Result<&'static str, String> {
        self.check_int8("input activations")?;
        match (self.strategy().as_str(), self.is_dynamic()) {
            ("token", Some(true)) => Ok("token"),
            ("tensor", Some(true)) => Ok("tensor"),
            ("tensor", Some(false)) => Ok("static"),
            (s, d) => Err(format!(
                "input activations use strategy `{s}` with dynamic {}; only dynamic per token, \
                 dynamic per tensor or static per tensor run here",
                d.map_or_else(|| self.dynamic.to_string(), |b| b.to_string())
            )),
        }
    }
}

/// One entry of `config_groups`: a scheme, or a preset name mapped to its targets.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
enum GroupEntry {
    Scheme(Box<Scheme>),
    Preset(Vec<String>),
}

#[derive(Clone, Debug, serde::Deserialize)]
struct Scheme {
    targets: Vec<String>,
    #[serde(default)]
    weights: Option<QuantArgs>,
    #[serde(default)]
    input_activations: Option<QuantArgs>,
    #[serde(default)]
    output_activations: Option<serde_json::Value>,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct CtConfig {
    quant_method: String,
    #[serde(default)]
    format: Option<String>,
    config_groups: BTreeMap<String, GroupEntry>,
    #[serde(default)]
    ignore: Option<Vec<String>>,
    #[serde(default)]
    kv_cache_scheme: Option<serde_json::Value>,
    #[serde(default)]
    sparsity_config: Option<serde_json::Value>,
    #[serde(default)]
    transform_config: Option<serde_json::Value>,
}

/// The formats whose INT8 weights are stored unpacked as `weight` (int8) with `weight_scale`.
const INT8_FORMATS: [&str; 2] = ["int-quantized", "naive-quantized"];

fn is_empty_json(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Object(m)) => m.is_empty(),
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        _ => false,
    }
}

/// A `targets`/`ignore` entry: `re:` + a regex matched at the start of the module name (as
/// Python's `re.match`), the class name `Linear`, or an exact module name.
enum Target {
    Regex(fancy_regex::Regex),
    Linear,
    Name(String),
}

impl Target {
    fn parse(s: &str, path: &Path) -> Result<Target> {
        if let Some(re) = s.strip_prefix("re:") {
            let regex =
                fancy_regex::Regex::new(&format!("^(?:{re})")).map_err(|e| ModelError::Config {
                    path: path.to_path_buf(),
                    reason: format!("quantization_config: target `{s}` is not a valid regex: {e}"),
                })?;
            Ok(Target::Regex(regex))
        } else if s == "Linear" {
            Ok(Target::Linear)
        } else {
            Ok(Target::Name(s.to_string()))
        }
    }

    /// How specifically this target names the Linear `name` (compressed-tensors prefers an
    /// exact name over a regex over a class): 3, 2, 1, or 0 when it does not match.
    fn rank(&self, name: &str) -> u8 {
        match self {
            Target::Name(n) if n == name => 3,
            Target::Regex(r) if r.is_match(name).unwrap_or(false) => 2,
            Target::Linear => 1,
            _ => 0,
        }
    }
}

/// A config group ready to match Linears: its name, targets and what it asks for.
struct Group {
    name: String,
    targets: Vec<Target>,
    scheme: Scheme,
}

fn config_err(path: &Path, reason: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        reason,
    }
}

/// The preset schemes an llm-compressor config may name instead of spelling them out.
fn preset(name: &str, targets: Vec<String>) -> Option<Scheme> {
    let args = |strategy: &str, dynamic: bool| QuantArgs {
        num_bits: 8,
        kind: "int".into(),
        symmetric: true,
        group_size: None,
        strategy: Some(strategy.into()),
        block_structure: None,
        dynamic: dynamic.into(),
    };
    match name.to_ascii_uppercase().as_str() {
        "W8A8" | "INT8" => Some(Scheme {
            targets,
            weights: Some(args("channel", false)),
            input_activations: Some(args("token", true)),
            output_activations: None,
            format: None,
        }),
        _ => None,
    }
}

/// What one Linear of the checkpoint is.
enum LinearPlan {
    /// Stays full precision (ignored or targeted by no group).
    Float,
    /// INT8 with this weight granularity and activation kind (`token`, `tensor`, `static`).
    Int8 {
        weights: WeightGranularity,
        acts: &'static str,
    },
}

fn parse_config(config: &serde_json::Value, path: &Path) -> Result<(Vec<Group>, Vec<Target>)> {
    let qc: CtConfig = serde_path_to_error::deserialize(
        config
            .get("quantization_config")
            .cloned()
            .unwrap_or_default(),
    )
    .map_err(|e| config_err(path, format!("quantization_config: {e}")))?;
    if qc.quant_method != QUANT_METHOD {
        return Err(config_err(
            path,
            format!(
                "quantization_config.quant_method is `{}`, not {QUANT_METHOD}",
                qc.quant_method
            ),
        ));
    }
    let format_ok = |f: &Option<String>| f.as_deref().is_none_or(|f| INT8_FORMATS.contains(&f));
    if !(format_ok(&qc.format) || qc.format.as_deref() == Some("mixed-precision")) {
        return Err(config_err(
            path,
            format!(
                "compressed-tensors format `{}` is not supported: smoothquant-rs runs the \
                 `int-quantized` format (INT8 weights with their scales)",
                qc.format.as_deref().unwrap_or_default()
            ),
        ));
    }
    if !is_empty_json(&qc.kv_cache_scheme) {
        return Err(config_err(
            path,
            "quantization_config.kv_cache_scheme quantizes the KV cache with calibrated scales, \
             which smoothquant-rs does not read; only Linear W8A8 checkpoints run here"
                .into(),
        ));
    }
    for (field, v) in [
        ("sparsity_config", &qc.sparsity_config),
        ("transform_config", &qc.transform_config),
    ] {
        if !is_empty_json(v) {
            return Err(config_err(
                path,
                format!("quantization_config.{field} is set; sparse or transformed (rotated) checkpoints are not supported"),
            ));
        }
    }
    let mut groups = Vec::new();
    for (name, entry) in qc.config_groups {
        let scheme = match entry {
            GroupEntry::Scheme(s) => *s,
            GroupEntry::Preset(targets) => preset(&name, targets).ok_or_else(|| {
                config_err(
                    path,
                    format!("quantization_config.config_groups.{name}: preset `{name}` is not an INT8 W8A8 scheme smoothquant-rs runs"),
                )
            })?,
        };
        if !format_ok(&scheme.format) {
            return Err(config_err(
                path,
                format!(
                    "quantization_config.config_groups.{name}: format `{}` is not supported (only int-quantized)",
                    scheme.format.as_deref().unwrap_or_default()
                ),
            ));
        }
        let targets = scheme
            .targets
            .iter()
            .map(|t| Target::parse(t, path))
            .collect::<Result<Vec<_>>>()?;
        groups.push(Group {
            name,
            targets,
            scheme,
        });
    }
    let ignore = qc
        .ignore
        .unwrap_or_default()
        .iter()
        .map(|t| Target::parse(t, path))
        .collect::<Result<Vec<_>>>()?;
    Ok((groups, ignore))
}

/// The group that quantizes Linear `name`, if any: the most specific match, skipping `ignore`.
fn group_of<'g>(
    name: &str,
    groups: &'g [Group],
    ignore: &[Target],
    path: &Path,
) -> Result<Option<&'g Group>> {
    if ignore.iter().any(|t| t.rank(name) > 0) {
        return Ok(None);
    }
    let mut best: Option<(&Group, u8)> = None;
    for g in groups {
        let rank = g.targets.iter().map(|t| t.rank(name)).max().unwrap_or(0);
        if rank == 0 {
            continue;
        }
        match best {
            Some((other, r)) if r == rank => {
                return Err(config_err(
                    path,
                    format!(
                        "`{name}` is targeted by both config groups `{}` and `{}`",
                        other.name, g.name
                    ),
                ))
            }
            Some((_, r)) if r > rank => {}
            _ => best = Some((g, rank)),
        }
    }
    Ok(best.map(|(g, _)| g))
}

fn plan_for(group: &Group, name: &str, path: &Path) -> Result<LinearPlan> {
    let err = |reason: String| {
        config_err(
            path,
            format!(
                "`{name}` (config group `{}`): {reason}; refusing the checkpoint",
                group.name
            ),
        )
    };
    let s = &group.scheme;
    let weights = s
        .weights
        .as_ref()
        .ok_or_else(|| err("no weight quantization (an activation-only scheme)".into()))?
        .weight_granularity()
        .map_err(err)?;
    let acts = s
        .input_activations
        .as_ref()
        .ok_or_else(|| {
            err("weight-only quantization (no input_activations): not a W8A8 scheme".into())
        })?
        .act_kind()
        .map_err(err)?;
    if !is_empty_json(&s.output_activations) {
        return Err(err("output activations are quantized too".into()));
    }
    Ok(LinearPlan::Int8 { weights, acts })
}

/// One tensor of a quantized Linear as f32 values, checking its element count.
fn scale_values(ckpt: &Checkpoint, name: &str, expected: usize, dir: &Path) -> Result<Vec<f32>> {
    let t = ckpt.tensor(name)?;
    let v = t.to_f32_vec()?;
    if v.len() != expected {
        return Err(ModelError::TensorShape {
            path: dir.to_path_buf(),
            name: name.to_string(),
            expected: vec![expected],
            actual: t.shape().to_vec(),
        });
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite() || *x < 0.0) {
        return Err(ModelError::NonFinite {
            path: dir.to_path_buf(),
            name: name.to_string(),
            what: "a non-finite or negative scale",
            index: i,
        });
    }
    Ok(v)
}

/// Load a compressed-tensors `int-quantized` checkpoint, running its quantized Linears INT8.
/// The returned config describes it for reports: scheme `naive`/`smoothquant` when
/// smoothquant-rs wrote it, `w8a8` otherwise.
pub fn load_compressed_tensors(
    dir: &Path,
    backend: Arc<dyn Int8Gemm>,
) -> Result<(LoadedModel, NativeQuantConfig)> {
    let config_path = dir.join("config.json");
    let config = read_config_json(&config_path)?;
    let (groups, ignore) = parse_config(&config, &config_path)?;
    let ckpt = Checkpoint::open(dir)?;
    let mut model = build_model(&config, &config_path, &ckpt)?;

    // Linears outside the decoder layers must stay full precision.
    let outer: Vec<String> = model
        .project_in
        .iter()
        .chain(model.project_out.iter())
        .chain(std::iter::once(&model.lm_head))
        .map(|l| l.name.clone())
        .collect();
    for name in &outer {
        let quantized_tensor = ckpt.contains(&format!("{name}.weight_scale"));
        if let Some(g) = group_of(name, &groups, &ignore, &config_path)? {
            if quantized_tensor || name != "lm_head" || !model.config.tie_word_embeddings {
                return Err(config_err(
                    &config_path,
                    format!(
                        "`{name}` is quantized by config group `{}`; smoothquant-rs keeps it in full precision (add it to `ignore`)",
                        g.name
                    ),
                ));
            }
        }
    }

    let mut seen: Option<(WeightGranularity, &'static str)> = None;
    let mut count = 0usize;
    for block in &mut model.layers {
        for linear in block.linears_mut() {
            let name = linear.name.clone();
            let plan = match group_of(&name, &groups, &ignore, &config_path)? {
                Some(g) => plan_for(g, &name, &config_path)?,
                None => LinearPlan::Float,
            };
            let weight_name = format!("{name}.weight");
            let stored = ckpt.info(&weight_name)?.dtype;
            let (weights, acts) = match plan {
                LinearPlan::Float => {
                    if stored == DType::I8 {
                        return Err(config_err(
                            &config_path,
                            format!("`{weight_name}` is stored as INT8, but no config group quantizes `{name}` (it is ignored or untargeted)"),
                        ));
                    }
                    continue;
                }
                LinearPlan::Int8 { weights, acts } => (weights, acts),
            };
            match seen {
                None => seen = Some((weights, acts)),
                Some(s) if s == (weights, acts) => {}
                Some((w, a)) => {
                    return Err(config_err(
                        &config_path,
                        format!(
                            "`{name}` is quantized with weights per {weights:?} and acts {acts}, other Linears with weights per {w:?} and acts {a}: mixed W8A8 schemes in one checkpoint are not supported",
                        ),
                    ))
                }
            }
            let (n, k) = (linear.linear.out_features(), linear.linear.in_features());
            if stored != DType::I8 {
                return Err(ModelError::Config {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "`{weight_name}` is {stored}, expected i8 in an int-quantized checkpoint"
                    ),
                });
            }
            let w_q = ckpt.tensor(&weight_name)?.to_vec::<i8>()?;
            let scale_name = format!("{name}.weight_scale");
            let scales = match weights {
                WeightGranularity::Channel => {
                    WeightScales::PerChannel(scale_values(&ckpt, &scale_name, n, dir)?)
                }
                WeightGranularity::Tensor => {
                    WeightScales::PerTensor(scale_values(&ckpt, &scale_name, 1, dir)?[0])
                }
            };
            let zp_name = format!("{name}.weight_zero_point");
            if ckpt.contains(&zp_name)
                && ckpt
                    .tensor(&zp_name)?
                    .to_f32_vec()?
                    .iter()
                    .any(|z| *z != 0.0)
            {
                return Err(config_err(
                    dir,
                    format!("`{zp_name}` is not zero: asymmetric weights are not supported"),
                ));
            }
            let act = match acts {
                "token" => ActQuant::Token,
                "tensor" => ActQuant::Tensor,
                _ => {
                    let input_name = format!("{name}.input_scale");
                    let v = scale_values(&ckpt, &input_name, 1, dir)?[0];
                    if v <= 0.0 {
                        return Err(config_err(
                            dir,
                            format!("`{input_name}` must hold one positive number, not {v}"),
                        ));
                    }
                    ActQuant::Static { scale: v }
                }
            };
            let bias = linear.as_fp().and_then(|fp| fp.bias().map(<[f32]>::to_vec));
            linear.linear = Box::new(Int8Linear::from_quantized(
                &w_q,
                scales,
                bias.as_deref(),
                n,
                k,
                weights,
                act,
                backend.clone(),
            )?);
            count += 1;
        }
    }
    let Some((weights, acts)) = seen else {
        return Err(config_err(
            &config_path,
            "no decoder Linear is quantized by the config groups; nothing runs INT8".into(),
        ));
    };

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::Tokenizer {
            path: tok_path,
            reason: "missing: a compressed-tensors checkpoint directory needs its tokenizer.json"
                .into(),
        });
    }
    let tokenizer = HfTokenizer::from_file(&tok_path)?
        .with_special_ids(model.config.bos_token_id, model.config.eos_token_id)?;
    let record = config
        .get(RECORD_KEY)
        .and_then(|r| r.as_object())
        .cloned()
        .unwrap_or_default();
    let scheme = match record.get("scheme").and_then(|s| s.as_str()) {
        Some(s @ ("naive" | "smoothquant")) => s.to_string(),
        _ => "w8a8".to_string(),
    };
    let add_bos = record
        .get("add_bos")
        .and_then(|b| b.as_bool())
        .unwrap_or_else(|| read_add_bos(dir));
    let mut extra = record;
    for k in ["scheme", "weights", "acts", "add_bos"] {
        extra.remove(k);
    }
    extra.insert("quantized_linears".into(), count.into());
    let qc = NativeQuantConfig {
        quant_method: QUANT_METHOD.into(),
        format: config["quantization_config"]["format"]
            .as_str()
            .unwrap_or("int-quantized")
            .into(),
        version: 1,
        scheme,
        weights,
        acts: acts.into(),
        add_bos,
        int8_attention: false,
        extra,
    };
    Ok((
        LoadedModel {
            model,
            tokenizer: Arc::new(tokenizer),
            source: dir.to_path_buf(),
            format: "compressed-tensors",
            add_bos,
            hf_config: config,
            quantization: None,
        },
        qc,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: serde_json::Value) -> QuantArgs {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn what_runs_and_what_is_refused() {
        let w = args(
            serde_json::json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel", "dynamic": false}),
        );
        assert_eq!(w.weight_granularity(), Ok(WeightGranularity::Channel));
        let w = args(serde_json::json!({"group_size": -1}));
        assert_eq!(w.weight_granularity(), Ok(WeightGranularity::Channel));
        let w = args(serde_json::json!({}));
        assert_eq!(w.weight_granularity(), Ok(WeightGranularity::Tensor));
        let w = args(serde_json::json!({"strategy": "group", "group_size": 128}));
        let e = w.weight_granularity().unwrap_err();
        assert!(e.contains("group") && e.contains("128"), "{e}");
        let w = args(serde_json::json!({"num_bits": 4, "strategy": "channel"}));
        assert!(w.weight_granularity().unwrap_err().contains("4-bit"));
        let w = args(serde_json::json!({"symmetric": false, "strategy": "channel"}));
        assert!(w.weight_granularity().unwrap_err().contains("asymmetric"));
        let w = args(serde_json::json!({"type": "float", "strategy": "channel"}));
        assert!(w.weight_granularity().unwrap_err().contains("float"));

        let a = args(serde_json::json!({"strategy": "token", "dynamic": true}));
        assert_eq!(a.act_kind(), Ok("token"));
        let a = args(serde_json::json!({"strategy": "tensor", "dynamic": false}));
        assert_eq!(a.act_kind(), Ok("static"));
        let a = args(serde_json::json!({"strategy": "tensor", "dynamic": true}));
        assert_eq!(a.act_kind(), Ok("tensor"));
        let a = args(serde_json::json!({"strategy": "group", "group_size": 32, "dynamic": true}));
        assert!(a.act_kind().is_err());
    }

    #[test]
    fn targets_and_ignore() {
        let p = Path::new("config.json");
        let t = |s: &str| Target::parse(s, p).unwrap();
        assert_eq!(t("Linear").rank("model.layers.0.mlp.up_proj"), 1);
        assert_eq!(t("re:.*mlp.*").rank("model.layers.0.mlp.up_proj"), 2);
        // `re.match` anchors at the start only.
        assert_eq!(t("re:mlp").rank("model.layers.0.mlp.up_proj"), 0);
        assert_eq!(t("re:model.layers.0").rank("model.layers.0.mlp.up_proj"), 2);
        assert_eq!(t("lm_head").rank("lm_head"), 3);
        assert_eq!(t("lm_head").rank("model.lm_head"), 0);
        assert!(Target::parse("re:(", p).is_err());
    }
}

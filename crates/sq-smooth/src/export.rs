//! Writing a W8A8 checkpoint in smoothquant-rs' native layout (read back by
//! `sq_model::native::load_native`).

use crate::{LmHead, Recipe, Result, SmoothError};
use sq_calib::StatsTable;
use sq_model::quant::quantize_weight;
use sq_model::{Block, Linear, Model, WeightGranularity};
use sq_tensor::atomic::AtomicDir;
use sq_tensor::{
    save_safetensors_sharded, DType, PlacedFiles, Tensor, TensorSignature, TensorSpill,
};
use std::collections::BTreeMap;
use std::path::Path;

/// What the checkpoint records about how it was made.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// `naive` or `smoothquant`.
    pub scheme: String,
    pub recipe: Recipe,
    /// Free-form record: alpha, per-group alphas, smooth targets, calibration settings.
    pub record: serde_json::Map<String, serde_json::Value>,
    /// Whether generation should start with BOS.
    pub add_bos: bool,
    /// The model runs INT8 attention (INT8 Q·Kᵀ, P·V and KV cache; `--int8-attention`).
    pub int8_attention: bool,
    /// The tokenizer.json content.
    pub tokenizer_json: String,
    /// Files copied beside it (e.g. tokenizer_config.json of a Hugging Face input).
    pub extra_files: Vec<std::path::PathBuf>,
    /// Largest weights file (native layout): larger checkpoints are written as Hugging Face
    /// shards with an index. `None`: one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// The LM head's representation (INT8 only in the native layout).
    pub lm_head: LmHead,
}

fn tensor(data: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_slice(data, shape)?)
}

/// The tensors every export writes in f32: embeddings, norms, and the Linears that stay full
/// precision (OPT's `project_in`/`project_out`, the LM head unless tied to the embeddings or
/// written in INT8 by [`int8_head_tensors`]).
pub(crate) fn float_tensors(model: &Model, lm_head: LmHead) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = outer_float_tensors(model, lm_head)?;
    for block in &model.layers {
        tensors.extend(norm_tensors(&[&block.attn_norm, &block.mlp_norm])?);
    }
    Ok(tensors)
}

fn norm_tensors(norms: &[&sq_model::layers::Norm]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for norm in norms {
        let n = norm.weight.len();
        tensors.push((format!("{}.weight", norm.name), tensor(&norm.weight, &[n])?));
        if let Some(b) = &norm.bias {
            tensors.push((format!("{}.bias", norm.name), tensor(b, &[n])?));
        }
    }
    Ok(tensors)
}

/// The f32 tensors outside the decoder layers: embeddings, the embedding and final norms, the
/// full-precision Linears.
fn outer_float_tensors(model: &Model, lm_head: LmHead) -> Result<Vec<(String, Tensor)>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let e = &model.embed;
    if !(lm_head == LmHead::Int8 && model.config.tie_word_embeddings) {
        tensors.push((
            format!("{}.weight", e.name),
            tensor(&model.embedding_table()?, &[model.embedding_rows(), e.dim])?,
        ));
    }
    if let Some(p) = &model.pos_embed {
        tensors.push((
            format!("{}.weight", p.name),
            tensor(&p.weight, &[p.weight.len() / p.dim, p.dim])?,
        ));
    }
    let outer_norms: Vec<&sq_model::layers::Norm> = model
        .embed_norm
        .iter()
        .chain(model.final_norm.iter())
        .collect();
    tensors.extend(norm_tensors(&outer_norms)?);
    let fp_linears = model.project_in.iter().chain(model.project_out.iter());
    let fp_head = !model.config.tie_word_embeddings && lm_head == LmHead::Fp32;
    for l in fp_linears.chain(fp_head.then_some(&model.lm_head)) {
        let fp = l
            .as_fp()
            .ok_or_else(|| SmoothError::Config(format!("`{}` must stay full precision", l.name)))?;
        tensors.push((
            format!("{}.weight", l.name),
            tensor(&fp.weight(), &[fp.out_features(), fp.in_features()])?,
        ));
        if let Some(b) = fp.bias() {
            tensors.push((format!("{}.bias", l.name), tensor(b, &[b.len()])?));
        }
    }
    Ok(tensors)
}

/// One decoder layer in the native layout: its norms (f32) and every Linear quantized with
/// `recipe` (INT8 weight, its scales, bias, run-time smoothing divide, static input scale).
/// `stats` must describe the layer as it is (static scales read them).
pub fn native_layer_tensors(
    block: &Block,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = norm_tensors(&[&block.attn_norm, &block.mlp_norm])?;
    for l in block.linears() {
        tensors.extend(int8_linear_tensors(
            l,
            recipe,
            stats,
            ChannelScales::Vector,
        )?);
    }
    Ok(tensors)
}

/// The shape of per-output-channel weight scales in a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChannelScales {
    /// `[out_features]` (native).
    Vector,
    /// `[out_features, 1]` (compressed-tensors).
    Column,
}

/// One FP Linear quantized with `recipe` for export: `weight` (INT8), `weight_scale`, `bias`,
/// the run-time smoothing divide `input_smoothing` where it has one, and the static
/// `input_scale` where the recipe has one (read from `stats`).
pub(crate) fn int8_linear_tensors(
    l: &sq_model::NamedLinear,
    recipe: &Recipe,
    stats: Option<&StatsTable>,
    channel_scales: ChannelScales,
) -> Result<Vec<(String, Tensor)>> {
    let fp = l.as_fp().ok_or_else(|| {
        SmoothError::Config(format!(
            "`{}` is already quantized; export starts from the FP model",
            l.name
        ))
    })?;
    let (n, k) = (fp.out_features(), fp.in_features());
    let (w_q, scales) = quantize_weight(fp, recipe.weights)?;
    let mut tensors = vec![(
        format!("{}.weight", l.name),
        Tensor::from_vec(w_q, &[n, k])?,
    )];
    let scale = match (scales, channel_scales) {
        (sq_kernels::WeightScales::PerChannel(s), ChannelScales::Vector) => {
            Tensor::from_vec(s, &[n])?
        }
        (sq_kernels::WeightScales::PerChannel(s), ChannelScales::Column) => {
            Tensor::from_vec(s, &[n, 1])?
        }
        (sq_kernels::WeightScales::PerTensor(s), _) => Tensor::from_vec(vec![s], &[1])?,
    };
    tensors.push((format!("{}.weight_scale", l.name), scale));
    if let Some(b) = fp.bias() {
        tensors.push((format!("{}.bias", l.name), tensor(b, &[n])?));
    }
    if let Some(f) = fp.input_smoothing() {
        tensors.push((format!("{}.input_smoothing", l.name), tensor(f, &[k])?));
    }
    if let sq_model::ActQuant::Static { scale } = recipe.act_quant(&l.name, stats)? {
        tensors.push((
            format!("{}.input_scale", l.name),
            Tensor::from_vec(vec![scale], &[1])?,
        ));
    }
    Ok(tensors)
}

/// Everything the native layout holds outside the decoder layers: the f32 tensors and, with
/// `LmHead::Int8`, the INT8 head.
fn outer_native_tensors(model: &Model, lm_head: LmHead) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = outer_float_tensors(model, lm_head)?;
    if lm_head == LmHead::Int8 {
        tensors.extend(int8_head_tensors(model)?);
    }
    Ok(tensors)
}

/// The INT8 LM head: weights per channel under `lm_head.weight` (or, tied, under the
/// embedding's name, which the loader then reads as the head's rows) and `lm_head.weight_scale`.
fn int8_head_tensors(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let head = &model.lm_head;
    let fp = head.as_fp().ok_or_else(|| {
        SmoothError::Config(format!(
            "`{}` is already quantized; export starts from the FP model",
            head.name
        ))
    })?;
    let (n, k) = (fp.out_features(), fp.in_features());
    let (w_q, scales) = quantize_weight(fp, WeightGranularity::Channel)?;
    let sq_kernels::WeightScales::PerChannel(scales) = scales else {
        unreachable!("per-channel quantization returns per-channel scales")
    };
    let weight_name = if model.config.tie_word_embeddings {
        format!("{}.weight", model.embed.name)
    } else {
        format!("{}.weight", head.name)
    };
    let mut out = vec![
        (weight_name, Tensor::from_vec(w_q, &[n, k])?),
        (
            format!("{}.weight_scale", head.name),
            Tensor::from_vec(scales, &[n])?,
        ),
    ];
    if let Some(b) = fp.bias() {
        out.push((format!("{}.bias", head.name), tensor(b, &[n])?));
    }
    Ok(out)
}

/// Quantize `model` (FP; already smoothed for SmoothQuant) with `info.recipe` and write the
/// checkpoint to `out` atomically. `stats` must describe the model as it is (static scales read
/// them). A non-empty `out` is replaced only with `overwrite`.
pub fn save_native(
    model: &Model,
    hf_config: &serde_json::Value,
    stats: Option<&StatsTable>,
    info: &ExportInfo,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let mut tensors = outer_native_tensors(model, info.lm_head)?;
    let mut count = 0;
    for block in &model.layers {
        tensors.extend(native_layer_tensors(block, &info.recipe, stats)?);
        count += block.linears().len();
    }
    let dir = AtomicDir::create(out, overwrite)?;
    save_safetensors_sharded(
        dir.path(),
        &tensors,
        Some(&file_metadata()),
        info.max_shard_bytes.unwrap_or(u64::MAX),
    )?;
    finish_native_dir(dir, hf_config, info, count)
}

fn file_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "producer".to_string(),
            format!("smoothquant-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ])
}

/// Write config.json (with the `quantization_config`), the tokenizer and the extra files beside
/// the weights, then move the directory into place.
fn finish_native_dir(
    dir: AtomicDir,
    hf_config: &serde_json::Value,
    info: &ExportInfo,
    count: usize,
) -> Result<()> {
    let mut qc = serde_json::Map::new();
    qc.insert("quant_method".into(), sq_model::native::QUANT_METHOD.into());
    qc.insert("format".into(), "native".into());
    qc.insert("version".into(), 1.into());
    qc.insert("scheme".into(), info.scheme.clone().into());
    qc.insert(
        "weights".into(),
        match info.recipe.weights {
            WeightGranularity::Channel => "channel",
            WeightGranularity::Tensor => "tensor",
        }
        .into(),
    );
    qc.insert("acts".into(), info.recipe.acts.name().into());
    qc.insert("add_bos".into(), info.add_bos.into());
    qc.insert("int8_attention".into(), info.int8_attention.into());
    qc.insert("quantized_linears".into(), count.into());
    qc.insert("lm_head".into(), info.lm_head.name().into());
    for (k, v) in &info.record {
        qc.entry(k.clone()).or_insert(v.clone());
    }
    let mut config = hf_config.clone();
    let obj = config
        .as_object_mut()
        .ok_or_else(|| SmoothError::Config("the model's config is not a JSON object".into()))?;
    obj.insert("quantization_config".into(), serde_json::Value::Object(qc));
    obj.insert("torch_dtype".into(), "float32".into());

    let io = |p: &Path, e: std::io::Error| SmoothError::Config(format!("{}: {e}", p.display()));
    let cfg_path = dir.path().join("config.json");
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| SmoothError::Config(e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| io(&cfg_path, e))?;
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

/// The native checkpoint written one decoder layer at a time: [`NativeStreamWriter::write`]
/// takes each layer's tensors ([`native_layer_tensors`]) as soon as they exist, and
/// [`NativeStreamWriter::finish`] adds the tensors outside the layers, lays the file out and
/// moves the directory into place. The result is byte for byte what [`save_native`] writes for
/// the same model held in memory.
pub struct NativeStreamWriter {
    dir: AtomicDir,
    spill: TensorSpill,
    /// The final files, laid out in advance ([`NativeStreamWriter::plan_layers`]): tensors
    /// that fit their planned place are written there once, with no scratch copy.
    placed: Option<PlacedFiles>,
    /// The LM head and shard size the export will have ([`NativeStreamWriter::with_layout`]):
    /// what a plan needs.
    layout: Option<(LmHead, u64)>,
    /// The LM head and shard size the layout was planned for.
    planned_for: Option<(LmHead, u64)>,
    quantized_linears: usize,
}

/// The names, dtypes and shapes [`outer_native_tensors`] gives, without computing any data.
fn outer_native_signatures(model: &Model, lm_head: LmHead) -> Vec<(String, TensorSignature)> {
    let sig = |dtype, shape: &[usize]| TensorSignature {
        dtype,
        shape: shape.to_vec(),
    };
    let mut out = Vec::new();
    let e = &model.embed;
    let tied = model.config.tie_word_embeddings;
    if !(lm_head == LmHead::Int8 && tied) {
        out.push((
            format!("{}.weight", e.name),
            sig(DType::F32, &[model.embedding_rows(), e.dim]),
        ));
    }
    if let Some(p) = &model.pos_embed {
        out.push((
            format!("{}.weight", p.name),
            sig(DType::F32, &[p.weight.len() / p.dim.max(1), p.dim]),
        ));
    }
    for norm in model.embed_norm.iter().chain(model.final_norm.iter()) {
        let n = norm.weight.len();
        out.push((format!("{}.weight", norm.name), sig(DType::F32, &[n])));
        if norm.bias.is_some() {
            out.push((format!("{}.bias", norm.name), sig(DType::F32, &[n])));
        }
    }
    let fp_head = !tied && lm_head == LmHead::Fp32;
    let fp_linears = model.project_in.iter().chain(model.project_out.iter());
    for l in fp_linears.chain(fp_head.then_some(&model.lm_head)) {
        let (n, k) = (l.linear.out_features(), l.linear.in_features());
        out.push((format!("{}.weight", l.name), sig(DType::F32, &[n, k])));
        if let Some(b) = l.as_fp().and_then(|f| f.bias()) {
            out.push((format!("{}.bias", l.name), sig(DType::F32, &[b.len()])));
        }
    }
    if lm_head == LmHead::Int8 {
        let head = &model.lm_head;
        let (n, k) = (head.linear.out_features(), head.linear.in_features());
        let weight_name = if tied {
            format!("{}.weight", model.embed.name)
        } else {
            format!("{}.weight", head.name)
        };
        out.push((weight_name, sig(DType::I8, &[n, k])));
        out.push((format!("{}.weight_scale", head.name), sig(DType::F32, &[n])));
        if head.as_fp().and_then(|f| f.bias()).is_some() {
            out.push((format!("{}.bias", head.name), sig(DType::F32, &[n])));
        }
    }
    out
}

impl NativeStreamWriter {
    /// Start writing `out` (atomically: nothing appears there before `finish`).
    pub fn create(out: &Path, overwrite: bool) -> Result<Self> {
        let dir = AtomicDir::create(out, overwrite)?;
        let spill = TensorSpill::create(dir.path().join(".layers.spill"))?;
        Ok(NativeStreamWriter {
            dir,
            spill,
            placed: None,
            layout: None,
            planned_for: None,
            quantized_linears: 0,
        })
    }

    /// Say which LM head and shard size [`NativeStreamWriter::finish`] will be given, so that
    /// [`NativeStreamWriter::plan_layers`] can lay the final files out in advance.
    pub fn with_layout(mut self, lm_head: LmHead, max_shard_bytes: Option<u64>) -> Self {
        self.layout = Some((lm_head, max_shard_bytes.unwrap_or(u64::MAX)));
        self
    }

    /// Lay the final files out before anything is written, predicting every layer's tensors
    /// from the first one's (`first`, the tensors of layer 0 under `<layer_prefix>.0.`; layers
    /// of one model have the same tensors) and the tensors outside the layers from `shell`,
    /// for the export given to [`NativeStreamWriter::with_layout`]. Tensors that then fit their
    /// place are written once; the first that does not (or a different head or shard size at
    /// [`NativeStreamWriter::finish`]) turns the writer back to the scratch file, with the same
    /// result. Does nothing without a layout or once tensors were written.
    pub fn plan_layers(
        &mut self,
        first: &[(String, Tensor)],
        layer_prefix: &str,
        layers: usize,
        shell: &Model,
    ) -> Result<()> {
        let Some((lm_head, max_shard_bytes)) = self.layout else {
            return Ok(());
        };
        if self.placed.is_some() || self.spill.bytes() > 0 || self.spill.names().next().is_some() {
            return Ok(());
        }
        let zero = format!("{layer_prefix}.0.");
        let mut plan = outer_native_signatures(shell, lm_head);
        for j in 0..layers {
            let at = format!("{layer_prefix}.{j}.");
            for (name, t) in first {
                let Some(rest) = name.strip_prefix(&zero) else {
                    return Ok(());
                };
                plan.push((
                    format!("{at}{rest}"),
                    TensorSignature {
                        dtype: t.dtype(),
                        shape: t.shape().to_vec(),
                    },
                ));
            }
        }
        let mut names: Vec<&str> = plan.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Ok(());
        }
        self.placed = Some(PlacedFiles::create(
            self.dir.path(),
            &plan,
            Some(&file_metadata()),
            max_shard_bytes,
        )?);
        self.planned_for = Some((lm_head, max_shard_bytes));
        Ok(())
    }

    /// Append one layer's tensors (from [`native_layer_tensors`]), holding
    /// `quantized_linears` quantized Linears.
    pub fn write(&mut self, tensors: &[(String, Tensor)], quantized_linears: usize) -> Result<()> {
        if self.write_placed(tensors)? {
            self.quantized_linears += quantized_linears;
            return Ok(());
        }
        for (name, t) in tensors {
            self.spill.push(name, t)?;
        }
        self.quantized_linears += quantized_linears;
        Ok(())
    }

    /// Write `tensors` to their planned places when they all have one (true); otherwise give
    /// the plan up, keeping what it holds for the scratch path (false).
    fn write_placed(&mut self, tensors: &[(String, Tensor)]) -> Result<bool> {
        let Some(placed) = self.placed.as_mut() else {
            return Ok(false);
        };
        if tensors
            .iter()
            .all(|(n, t)| placed.fits(n, t.dtype(), t.shape()))
        {
            for (name, t) in tensors {
                placed.write(name, t)?;
            }
            return Ok(true);
        }
        tracing::debug!(
            "the layer's tensors differ from the planned layout: writing via the scratch file"
        );
        let placed = self.placed.take().expect("checked above");
        self.spill.adopt(placed)?;
        Ok(false)
    }

    /// Add the tensors of `shell` outside the decoder layers, write the weights file, config and
    /// tokenizer, and move the directory into place.
    pub fn finish(
        mut self,
        shell: &Model,
        hf_config: &serde_json::Value,
        info: &ExportInfo,
    ) -> Result<()> {
        let outer = outer_native_tensors(shell, info.lm_head)?;
        let max_shard_bytes = info.max_shard_bytes.unwrap_or(u64::MAX);
        if self.planned_for != Some((info.lm_head, max_shard_bytes)) {
            if let Some(placed) = self.placed.take() {
                self.spill.adopt(placed)?;
            }
        }
        let outer_written = self.write_placed(&outer)?;
        if let Some(placed) = self.placed.take() {
            if placed.complete() {
                placed.finish()?;
                let NativeStreamWriter {
                    dir,
                    spill,
                    quantized_linears,
                    ..
                } = self;
                spill.discard()?;
                return finish_native_dir(dir, hf_config, info, quantized_linears);
            }
            self.spill.adopt(placed)?;
        }
        if !outer_written {
            for (name, t) in &outer {
                self.spill.push(name, t)?;
            }
        }
        let NativeStreamWriter {
            dir,
            spill,
            quantized_linears,
            ..
        } = self;
        spill.finish(dir.path(), Some(&file_metadata()), max_shard_bytes)?;
        finish_native_dir(dir, hf_config, info, quantized_linears)
    }
}

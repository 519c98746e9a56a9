//! Calibration, smoothing and quantization one decoder layer at a time, so a model larger than
//! memory can be quantized: the calibration windows' hidden states go through layer `i` (its
//! input statistics are recorded on the way), the layer is smoothed, quantized and written, then
//! dropped, and its outputs are the next layer's inputs. Every step is the in-memory code run on
//! a model holding one layer, so the result is the same, byte for byte.

use crate::export::{native_layer_tensors, NativeStreamWriter};
use crate::{
    quantize_model, smooth_model, smoothing_groups, AlphaSpec, BeyondFold, GroupResult, Recipe,
    Result, SmoothError, SmoothTargets,
};
use sq_calib::{StatsObserver, StatsTable};
use sq_kernels::Int8Gemm;
use sq_model::{LayeredModel, LinearObserver};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a layer-by-layer run does.
pub struct LayerPlan<'a> {
    /// Calibration: the token stream and its windows ([`sq_calib::calibration_windows`]).
    /// `None` when `stats` are given and nothing needs to run.
    pub calibration: Option<(&'a [u32], Vec<Range<usize>>)>,
    /// Statistics computed before (`--act-scales`); calibration replaces each layer's entries.
    pub stats: Option<StatsTable>,
    /// Smoothing (SmoothQuant): which inputs, where `1/s` goes for those after no norm, and α;
    /// or none (naive W8A8).
    pub smoothing: Option<(SmoothTargets, BeyondFold, AlphaSpec)>,
    pub recipe: Recipe,
    /// Calibrate each layer on the outputs of the earlier layers as quantized (`--sequential`)
    /// rather than on the full-precision model's: each layer sees the inputs the quantized model
    /// will give it. Needs `backend`.
    pub sequential: bool,
    pub backend: Option<Arc<dyn Int8Gemm>>,
}

/// Where the time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimings {
    /// Reading the layers' weights (and converting them to f32).
    pub read: Duration,
    /// Running the calibration windows through the layers.
    pub calibrate: Duration,
    pub smooth: Duration,
    /// Quantizing the weights (and, with `sequential`, packing them to run the windows).
    pub quantize: Duration,
    pub write: Duration,
}

/// What a layer-by-layer run produced.
#[derive(Debug)]
pub struct LayerOutcome {
    /// The calibration statistics as recorded (before smoothing): what `calibrate` saves.
    pub calibration: StatsTable,
    /// The statistics after smoothing (static activation scales read them).
    pub stats: StatsTable,
    pub smoothing: Vec<GroupResult>,
    pub timings: LayerTimings,
    pub layers: usize,
}

/// Run `plan` over `model` one layer at a time, writing each quantized layer to `writer` (none:
/// calibrate only). `progress(done, total)` is called after each layer.
pub fn run_layers(
    model: &mut LayeredModel,
    plan: &LayerPlan<'_>,
    mut writer: Option<&mut NativeStreamWriter>,
    mut progress: impl FnMut(usize, usize),
) -> Result<LayerOutcome> {
    if plan.sequential && plan.calibration.is_none() {
        return Err(SmoothError::Config(
            "sequential statistics are measured on calibration text: they need calibration windows"
                .into(),
        ));
    }
    let backend = match (&plan.backend, plan.sequential) {
        (Some(b), _) => Some(b.clone()),
        (None, true) => {
            return Err(SmoothError::Config(
                "sequential statistics run the quantized layers: they need an INT8 backend".into(),
            ))
        }
        (None, false) => None,
    };
    let mut timings = LayerTimings::default();
    let total = model.num_layers();
    let mut stats = plan.stats.clone().unwrap_or_default();
    let mut calibration = StatsTable::default();
    let mut smoothing = Vec::new();
    let quantizing = writer.is_some() || plan.sequential;

    // The hidden states of every calibration window, entering the next layer.
    let mut hidden: Vec<Vec<f32>> = Vec::new();
    let mut session = None;
    // Linears outside the layers (OPT's project_in / project_out) are calibrated too, as the
    // in-memory calibration does.
    let outer = Arc::new(StatsObserver::default());
    let outer_dyn: Arc<dyn LinearObserver> = outer.clone();
    if let Some((tokens, windows)) = &plan.calibration {
        let longest = windows.iter().map(|w| w.len()).max().unwrap_or(1);
        let mut s = model.shell.layer_session(longest);
        let start = Instant::now();
        if let Some(p) = model.shell.project_in.as_mut() {
            p.observer = Some(outer_dyn.clone());
        }
        for w in windows {
            let tokens = tokens.get(w.clone()).ok_or_else(|| {
                SmoothError::Config(format!(
                    "calibration window {w:?} is outside the {} tokens of the text",
                    tokens.len()
                ))
            })?;
            let mut h = Vec::new();
            model.shell.embed_sequence(tokens, &mut s, &mut h)?;
            hidden.push(h);
        }
        if let Some(p) = model.shell.project_in.as_mut() {
            p.observer = None;
        }
        timings.calibrate += start.elapsed();
        session = Some(s);
    }
    let mut scratch = Vec::new();
    for i in 0..total {
        let _span = tracing::info_span!("layer", index = i).entered();
        let start = Instant::now();
        let mut block = model.block(i)?;
        timings.read += start.elapsed();

        if let Some(session) = session.as_mut() {
            let start = Instant::now();
            let observer = Arc::new(StatsObserver::default());
            let shared: Arc<dyn LinearObserver> = observer.clone();
            for l in block.linears_mut() {
                l.observer = Some(shared.clone());
            }
            for h in hidden.iter_mut() {
                if plan.sequential {
                    // Only the statistics: the next layer's input comes from this layer quantized.
                    scratch.clear();
                    scratch.extend_from_slice(h);
                    model.shell.block_forward(&block, &mut scratch, session)?;
                } else {
                    model.shell.block_forward(&block, h, session)?;
                }
            }
            for l in block.linears_mut() {
                l.observer = None;
            }
            drop(shared);
            for s in observer.table().iter() {
                calibration.insert(s.clone());
                stats.insert(s.clone());
            }
            timings.calibrate += start.elapsed();
        }

        if quantizing {
            let shell = &mut model.shell;
            shell.layers.push(block);
            let start = Instant::now();
            if let Some((targets, fold, alpha)) = &plan.smoothing {
                let groups = fold.apply(&smoothing_groups(shell, *targets)?);
                smoothing.extend(smooth_model(shell, &groups, &mut stats, alpha)?);
            }
            timings.smooth += start.elapsed();
            if let Some(w) = writer.as_deref_mut() {
                let start = Instant::now();
                let tensors = native_layer_tensors(&shell.layers[0], &plan.recipe, Some(&stats))?;
                timings.quantize += start.elapsed();
                let start = Instant::now();
                if i == 0 {
                    // Layer 0 lives under `<prefix>.0.` (`model.layers.0.input_layernorm`).
                    let prefix = shell.layers[0]
                        .attn_norm
                        .name
                        .rsplit_once('.')
                        .and_then(|(p, _)| p.strip_suffix(".0"));
                    if let Some(prefix) = prefix {
                        w.plan_layers(&tensors, prefix, total, shell)?;
                    }
                }
                w.write(&tensors, shell.layers[0].linears().len())?;
                timings.write += start.elapsed();
            }
            if let (true, Some(backend), Some(session)) =
                (plan.sequential, backend.as_ref(), session.as_mut())
            {
                let start = Instant::now();
                quantize_model(shell, &plan.recipe, Some(&stats), backend.clone())?;
                timings.quantize += start.elapsed();
                let start = Instant::now();
                for h in hidden.iter_mut() {
                    shell.block_forward(&shell.layers[0], h, session)?;
                }
                timings.calibrate += start.elapsed();
            }
            shell.layers.clear();
        }
        model.release_pages();
        progress(i + 1, total);
    }
    if let (Some(session), Some(_)) = (session.as_mut(), model.shell.project_out.as_ref()) {
        let start = Instant::now();
        if let Some(p) = model.shell.project_out.as_mut() {
            p.observer = Some(outer_dyn.clone());
        }
        // Calibration asks for the last position's logits only: project_out sees that row.
        let width = model.shell.config.hidden_size;
        let result: Result<()> = hidden.iter().try_for_each(|h| {
            let last = &h[h.len().saturating_sub(width)..];
            Ok(model.shell.head_input(last, session, &mut scratch)?)
        });
        if let Some(p) = model.shell.project_out.as_mut() {
            p.observer = None;
        }
        result?;
        timings.calibrate += start.elapsed();
    }
    drop(outer_dyn);
    for s in outer.table().iter() {
        calibration.insert(s.clone());
        stats.insert(s.clone());
    }
    Ok(LayerOutcome {
        calibration,
        stats,
        smoothing,
        timings,
        layers: total,
    })
}

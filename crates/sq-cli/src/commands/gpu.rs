//! `--device` for the commands that run the model forward (eval, generate, bench).

use anyhow::{Context, Result};
use sq_model::{Device, Model, Runner};

/// `model` on `device`: in place on the CPU, or uploaded once to the GPU (full-precision
/// Linears in FP16, W8A8 Linears in INT8), saying so on stderr.
pub fn runner(model: &Model, device: Device, show: bool) -> Result<Runner<'_>> {
    let runner =
        Runner::new(model, device).with_context(|| format!("cannot run the model on {device}"))?;
    if device != Device::Cpu && show {
        eprintln!(
            "running on {device}: full-precision Linears in FP16 (cuBLAS), W8A8 Linears in INT8 (cuBLASLt), {:.1} MB of weights on the GPU",
            runner.weight_bytes() as f64 / 1e6
        );
    }
    Ok(runner)
}

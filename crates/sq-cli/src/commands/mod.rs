//! Subcommand implementations.

mod bench;
mod calibrate;
mod common;
mod demo;
mod eval;
mod generate;
mod gpu;
mod inspect;
mod pipeline;
mod plot;
mod quantize;

pub use common::peak_rss_bytes;

use crate::args::Command;
use anyhow::{bail, Result};
use sq_model::Device;

/// `--int8-attention` runs on the CPU only: refused with a GPU before anything else is checked.
pub fn check_int8_attention_device(command: &Command, device: Device) -> Result<()> {
    let quant = match command {
        Command::Eval(a) => &a.quant,
        Command::Generate(a) => &a.quant,
        Command::Bench(a) => &a.quant,
        _ => return Ok(()),
    };
    if quant.int8_attention && device != Device::Cpu {
        bail!(
            "--device {device}: {}",
            sq_model::runner::INT8_ATTENTION_ON_GPU
        );
    }
    Ok(())
}

pub fn run(command: Command, device: Device) -> Result<()> {
    let cpu_only = |name: &str| -> Result<()> {
        if device != Device::Cpu {
            bail!("`{name}` runs on the CPU only (calibration and quantization observe and rewrite the model in host memory); drop --device {device}");
        }
        Ok(())
    };
    match &command {
        Command::Demo(_) => cpu_only("demo")?,
        Command::Inspect(_) => cpu_only("inspect")?,
        Command::Calibrate(_) => cpu_only("calibrate")?,
        Command::Quantize(_) => cpu_only("quantize")?,
        Command::Eval(_) | Command::Generate(_) | Command::Bench(_) => {}
    }
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Eval(a) => eval::run(a, device),
        Command::Generate(a) => generate::run(a, device),
        Command::Bench(a) => bench::run(a, device),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Quantize(a) => quantize::run(a),
    }
}

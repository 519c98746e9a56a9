//! Subcommand implementations.

mod bench;
mod calibrate;
mod common;
mod demo;
mod eval;
mod generate;
mod inspect;

use crate::args::Command;
use anyhow::{bail, Result};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Quantize(_) => bail!(
            "`quantize` arrives with the SmoothQuant pipeline (sq-smooth); this build runs FP32 models only"
        ),
    }
}

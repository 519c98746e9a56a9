//! Subcommand implementations.

mod bench;
mod calibrate;
mod common;
mod demo;
mod eval;
mod generate;
mod inspect;
mod pipeline;
mod plot;
mod quantize;

pub use common::peak_rss_bytes;

use crate::args::Command;
use anyhow::Result;

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Quantize(a) => quantize::run(a),
    }
}

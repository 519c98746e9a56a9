//! Subcommand implementations.

use crate::args::Command;
use anyhow::{bail, Result};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(_) => bail!(
            "the demo needs the model layer (sq-model), which is not in this build yet: \
             there is no model to run"
        ),
        other => bail!(
            "`{}` needs the model layer (sq-model), which is not in this build yet",
            name(&other)
        ),
    }
}

fn name(command: &Command) -> &'static str {
    match command {
        Command::Demo(_) => "demo",
        Command::Inspect(_) => "inspect",
        Command::Calibrate(_) => "calibrate",
        Command::Quantize(_) => "quantize",
        Command::Eval(_) => "eval",
        Command::Generate(_) => "generate",
        Command::Bench(_) => "bench",
    }
}

//! `smoothquant`: the command line of smoothquant-rs. See `shared/cli-contract.md` and
//! `docs/usage.md`.

mod args;
mod commands;
mod signals;

use args::Cli;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread starts: interruption removes unfinished outputs.
    signals::install();
    // `smoothquant inspect | head` closes stdout early: end quietly as other Unix tools do,
    // instead of failing to print (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A panic is a bug, never the way a user error is reported: say so plainly.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("internal error (a bug in smoothquant, please report it): {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.verbose);
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(1);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::from(1);
        }
    }
    // A GPU that cannot be used is a user error, reported before any work.
    if let Err(e) = commands::check_int8_attention_device(&cli.command, cli.device)
        .and_then(|()| cli.device.check().map_err(Into::into))
    {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let verbose = cli.verbose;
    let result = commands::run(cli.command, cli.device);
    if verbose > 0 {
        // VmHWM: the most memory this process held resident at once (Linux; 0 elsewhere).
        let peak = commands::peak_rss_bytes();
        if peak > 0 {
            eprintln!("peak RSS: {:.1} MiB", peak as f64 / (1024.0 * 1024.0));
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::fmt::format::FmtSpan;
    // -v: one timed span per phase (load, calibrate, smooth, quantize, eval); -vv: also every
    // forward, calibration window, α-search group, and each decoder layer and quantized Linear.
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug,sq_model=trace,sq_smooth=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let spans = if verbose > 0 {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .try_init();
}

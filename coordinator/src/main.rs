//! `strata`: parses the command line and hands off to the library.

use std::process::ExitCode;

use clap::Parser;
use strata_coordinator::cli::{self, Cli, Command};
use strata_telemetry::{LogWriter, TraceArgs};

fn main() -> ExitCode {
    strata_platform::memory::keep_freed_buffers();
    let cli = parse_args();
    // Before anything else runs: this sizes the compute pool through the environment.
    cli::set_compute_threads(cli.threads);
    // Spans are exported only where requests cross processes: the coordinator of a
    // cluster, and the pipeline benchmark (what tracing costs is measured there).
    let trace = match &cli.command {
        Command::Serve(args) => args.trace.clone(),
        Command::Bench(args) => args.trace.clone(),
        _ => TraceArgs::default(),
    };
    let telemetry = match strata_telemetry::init("strata", "warn", LogWriter::Stderr, &trace) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Model(command) => cli::model::run(command),
        Command::Bench(args) => cli::bench::run(args),
        Command::Perplexity(args) => cli::perplexity::run(args),
        Command::ServeLocal(args) => cli::serve_local::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Token(args) => cli::trust::token(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Status(args) => cli::admin::status(args),
        Command::Top(args) => cli::top::top(args),
        Command::Drain(args) => cli::admin::drain(args),
        Command::Undrain(args) => cli::admin::undrain(args),
        Command::Node(command) => cli::admin::node(command),
        Command::GpuCheck(args) => cli::gpu_check::run(args),
    };
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the causes joined by `: `, and no backtrace: the messages
            // name the problem (anyhow's `Debug`, what returning the error from
            // `main` prints, spreads the causes over lines).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, or exit: a flag with a bad value (`--coordinator
/// http://box/v1`) on one line, which already names the flag, the value and the
/// problem, without clap's "For more information, try '--help'" tip below it.
fn parse_args() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        if e.kind() == clap::error::ErrorKind::ValueValidation {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or_default());
            std::process::exit(e.exit_code());
        }
        e.exit()
    })
}

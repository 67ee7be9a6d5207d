//! `strata`: parses the command line and hands off to the library.

use std::process::ExitCode;

use clap::Parser;
use strata_coordinator::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = parse_args();
    // Before anything else runs: this sizes the compute pool through the environment.
    cli::set_compute_threads(cli.threads);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
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

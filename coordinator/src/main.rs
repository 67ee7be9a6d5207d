//! `strata`: parses the command line and hands off to the library.

use clap::Parser;
use strata_coordinator::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before anything else runs: this sizes the compute pool through the environment.
    cli::set_compute_threads(cli.threads);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Generate(args) => cli::generate::run(args),
        Command::Model(command) => cli::model::run(command),
        Command::Bench(args) => cli::bench::run(args),
        Command::ServeLocal(args) => cli::serve_local::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Status(args) => cli::admin::status(args),
        Command::Drain(args) => cli::admin::drain(args),
        Command::Undrain(args) => cli::admin::undrain(args),
    }
}

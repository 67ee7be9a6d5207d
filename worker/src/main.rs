//! `strata-worker`: parses the command line, binds the listener and runs the worker
//! until SIGINT or SIGTERM; `strata-worker devices` prints what it would offer;
//! `strata-worker drain` / `undrain` reach the worker running on this machine.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use strata_proto::v1::{self, worker_client::WorkerClient};
use strata_worker::config::DevicesArgs;
use strata_worker::profile::Profile;
use strata_worker::self_bench::BenchMode;
use strata_worker::{Cli, Command, WorkerArgs, WorkerConfig};

fn main() -> ExitCode {
    let cli = parse_args();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Devices(args)) => devices(args),
        Some(Command::Drain(args)) => set_draining(&args.address, true),
        Some(Command::Undrain(args)) => set_draining(&args.address, false),
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

/// The command line, or exit: a flag with a bad value (`--join http://box/v1`) on
/// one line, which already names the flag, the value and the problem, without
/// clap's "For more information, try '--help'" tip below it.
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

/// `strata-worker drain` / `undrain`: tells the local worker; the coordinator sees
/// it in the next heartbeat and moves the layers.
fn set_draining(address: &str, draining: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let response = runtime.block_on(request_drain_state(address, draining))?;
    let what = if draining { "draining" } else { "back in service" };
    if response.changed {
        println!("the worker at {address} is {what}; the coordinator moves its layers within a second");
    } else {
        println!("the worker at {address} already was {what}");
    }
    Ok(())
}

/// Sets up the process for `args`; call it before any thread exists.
fn prepare(args: &WorkerArgs) {
    // This sizes candle's compute pool through the environment.
    if let Some(n) = args.threads.filter(|&n| n > 0) {
        for key in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            std::env::set_var(key, n.to_string());
        }
    }
    // Workers that share cores take turns computing; candle's pool threads spin for
    // a while after each operation before they sleep, and a spinner left behind by
    // the last turn slows the next worker's. A shorter spin (candle's default is
    // 25000) measured best on a 2-core box with three workers.
    if args.compute_lock.is_some() && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "10000");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    prepare(&args);
    let mut config = WorkerConfig::from_args(args, &|k| std::env::var(k).ok())?;
    // Before binding and before the runtime: a refused offer stops the worker here,
    // and the benchmark is not run on a reactor thread.
    config.profile = Some(Arc::new(Profile::probe(&config)?));
    // Networking only: the model runs on its own thread, so one reactor thread is
    // enough and leaves the cores to compute.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let local = listener.local_addr()?;
        // Scripts and tests wait for this line.
        println!("worker listening grpc={}", strata_worker::advertised_address(local));
        strata_worker::run(listener, config, strata_platform::stop::requested()).await?;
        Ok(())
    })
}

async fn request_drain_state(address: &str, draining: bool) -> anyhow::Result<v1::SetDrainingResponse> {
    let endpoint = strata_proto::transport::endpoint(address).with_context(|| format!("bad address {address:?}"))?;
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the worker at {address}: {} (is strata-worker running? --address / STRATA_WORKER_ADDRESS)",
            strata_proto::address::unreachable_reason(&e)
        )
    })?;
    let response = WorkerClient::new(channel)
        .set_draining(v1::SetDrainingRequest { draining })
        .await
        .map_err(|s| anyhow::anyhow!("the worker refused: {}", s.message()))?;
    Ok(response.into_inner())
}

fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    prepare(&args.worker);
    let config = WorkerConfig::from_args(args.worker, &|k| std::env::var(k).ok())?;
    let mut profile = Profile::detect(&config, true)?;
    if args.bench {
        profile.bench(&config, BenchMode::Rerun)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
    } else {
        print!("{}", profile.report(args.bench));
    }
    Ok(())
}


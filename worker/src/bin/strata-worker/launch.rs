//! From flags to a serving worker, as `strata-worker` and the Windows service both
//! run it: the process-wide set-up, the probe before binding, and the runtime.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use strata_telemetry::{LogWriter, Telemetry, TraceArgs};
use strata_worker::profile::Profile;
use strata_worker::{WorkerArgs, WorkerConfig};

/// A log past this size is set aside (as `worker.log.old`) when the worker starts.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// Where the log goes.
pub enum LogTo<'a> {
    Stderr,
    /// Appended to this file (a service has no console).
    #[cfg_attr(not(windows), allow(dead_code))]
    File(&'a Path),
}

/// Sets up the process for `args`; call it before any thread exists. `trace` says
/// where spans go; shut the result down once the worker has stopped.
pub fn prepare(args: &WorkerArgs, log: LogTo<'_>, trace: &TraceArgs) -> anyhow::Result<Telemetry> {
    // This sizes the compute pool (and candle's) through the environment.
    if let Some(n) = args.threads.filter(|&n| n > 0) {
        for key in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            std::env::set_var(key, n.to_string());
        }
    }
    // Workers that share cores take turns computing; pool threads spin for a while
    // after each operation before they sleep, and a spinner left behind by the last
    // turn slows the next worker's. A shorter spin (the default is 25000) measured
    // best on a 2-core box with three workers, with candle's pool; ours keeps it, and
    // candle's, which runs what stays on candle's kernels, too.
    if args.compute_lock.is_some() {
        for spin_limit in [strata_model::compute_pool::SPIN_LIMIT_ENV, "CANDLE_BARRIER_POOL_SPIN_LIMIT"] {
            if std::env::var_os(spin_limit).is_none() {
                std::env::set_var(spin_limit, "10000");
            }
        }
    }
    let writer = match log {
        LogTo::Stderr => LogWriter::Stderr,
        LogTo::File(path) => {
            LogWriter::File(open_log(path).with_context(|| format!("cannot open the log {}", path.display()))?)
        }
    };
    Ok(strata_telemetry::init("strata-worker", "info", writer, trace)?)
}

/// Opens `path` to append, first setting a large one aside.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        std::fs::rename(path, path.with_extension("log.old"))?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(file)?;
    Ok(file)
}

/// Serves until `shutdown` completes; prints `worker listening grpc=ADDR` once
/// bound. `env` is the process environment, as the service sees it.
pub fn serve(
    args: WorkerArgs,
    env: &dyn Fn(&str) -> Option<String>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = WorkerConfig::from_args(args, env)?;
    // Before binding and before the runtime: a refused offer stops the worker here,
    // and the benchmark is not run on a reactor thread.
    let profile = Arc::new(Profile::probe(&config)?);
    // Networking only: the model runs on its own thread, so one reactor thread is
    // enough and leaves the cores to compute.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let local = listener.local_addr()?;
        // Scripts and tests wait for this line.
        println!("worker listening grpc={}", strata_worker::advertised_address(local));
        tracing::info!(grpc = %local, "worker listening");
        strata_worker::run(listener, config, Some(profile), shutdown).await?;
        Ok(())
    })
}

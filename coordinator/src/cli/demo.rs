//! `strata demo`: a whole cluster on this machine. Fetches the bundled model if
//! needed, starts three workers and a coordinator as child processes on loopback
//! ports they pick, shows which worker holds which layers, streams the answer to a
//! prompt through the HTTP API, and stops everything.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::children::{start_local_worker, Children, Process};

const DEFAULT_PROMPT: &str = "What is the capital of France? Answer in one sentence.";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// What to ask the model.
    #[arg(default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// A GGUF file, or a known model name.
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// Workers to start.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Compute threads per worker (default: a share of this machine's cores; see
    /// `threads_per_worker`).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
}

/// Compute threads for each of `workers` workers on a machine with `cores` cores.
///
/// In a pipeline one stage computes at a time for any single request, so each
/// worker may use every core. When many requests keep all stages busy, the workers
/// take turns through a shared compute lock (`--compute-lock`) instead of running
/// all their threads at once on the same cores.
pub fn threads_per_worker(cores: usize, _workers: usize) -> usize {
    cores.max(1)
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let path = crate::model_store::resolve(&args.model)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut children = Children::secured()?;
    let result = runtime.block_on(async {
        tokio::select! {
            r = demo(&args, &path, &mut children) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\ninterrupted; stopping the cluster");
                Ok(())
            }
        }
    });
    runtime.block_on(children.stop_all());
    result
}

async fn demo(
    args: &DemoArgs,
    path: &std::path::Path,
    children: &mut Children,
) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .worker_threads
        .unwrap_or_else(|| threads_per_worker(cores, args.workers));
    let strata_bin = std::env::current_exe().context("cannot find the strata binary")?;
    let log = std::env::var("STRATA_LOG").unwrap_or_else(|_| "warn".into());
    let started = Instant::now();
    println!("model {}", path.display());
    println!(
        "starting {} workers ({threads} compute threads each, {cores} cores here)",
        args.workers
    );
    let lock_dir = tempfile::tempdir()?;
    let lock = lock_dir.path().join("compute.lock");
    let mut addresses = Vec::new();
    for i in 0..args.workers {
        let address =
            start_local_worker(children, &format!("worker-{i}"), path, threads, Some(&lock))
                .await?;
        addresses.push(address);
    }
    let mut serve_args: Vec<String> = vec![
        "--threads".into(),
        "1".into(),
        "serve".into(),
        "--model".into(),
        path.display().to_string(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--model-id".into(),
        args.model.clone(),
        // Show the pipeline: every worker holds layers, even where one could
        // hold them all.
        "--placement".into(),
        "spread".into(),
        // Everything runs on loopback and the workers are named below.
        "--no-mdns".into(),
    ];
    // The cluster's CA, made for this demo; the workers hold its token.
    if let Some(trust) = &children.trust {
        serve_args.extend(["--state-dir".into(), trust.state_dir().display().to_string()]);
    }
    for a in &addresses {
        serve_args.push("--worker".into());
        serve_args.push(a.clone());
    }
    let mut coordinator = Process::spawn(
        "coordinator",
        &strata_bin,
        &serve_args,
        &[("STRATA_LOG", log.clone())],
    )?;
    let ready = coordinator
        .wait_for_line("listening http=", Duration::from_secs(120), |line| {
            // `stage N layers A..B on ADDR (worker-i), ...`: which worker holds what.
            if line.starts_with("stage ") {
                println!("  {line}");
            }
        })
        .await?;
    coordinator.drain_output();
    children.processes.push(coordinator);
    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    println!(
        "cluster ready in {:.1}s; API at http://{http}/v1",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("> {}", args.prompt);

    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let t = Instant::now();
    let mut pieces = 0usize;
    let mut stdout = std::io::stdout();
    super::http::post_events(&http, "/v1/chat/completions", &body, |event| {
        if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
            if !text.is_empty() {
                pieces += 1;
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
            }
        }
    })
    .await
    .context("the request failed")?;
    let secs = t.elapsed().as_secs_f64();
    println!();
    println!();
    println!("({pieces} chunks in {secs:.1}s; stopping the cluster)");
    Ok(())
}

//! The API serves while the first pipeline loads (issue 9): a first load of a large
//! model pulls gigabytes over the LAN for minutes, and `strata status` must show
//! it (each worker's pull), requests must wait for the pipeline rather than hang on
//! a listener nobody accepts on, and SIGTERM must still end the coordinator at once.
//!
//! Likewise while it waits for `--min-workers`.
//!
//! On loopback, with the tiny synthetic model and a worker without the model file
//! whose pull the coordinator paces (`STRATA_TEST_PULL_BYTES_PER_SECOND`) so that it
//! lasts a few seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::children::{LocalTrust, Process};
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::admin::{node, status, wait_for_status};
use strata_tests::{binary, until_serving, READY_TIMEOUT};

/// The weight stream's pace: the single worker's shard (the whole ~190 kB model)
/// takes about 4 s.
const PULL_BYTES_PER_SECOND: &str = "50000";

/// A coordinator over `model` waiting for `min_workers`, its pulls paced; returned
/// with its gRPC and HTTP addresses from its first line.
async fn coordinator(
    model: &Path,
    tmp: &Path,
    min_workers: usize,
    trust: &LocalTrust,
) -> anyhow::Result<(Process, String, String)> {
    let min_workers = min_workers.to_string();
    let args: Vec<String> = [
        "--threads",
        "1",
        "serve",
        "--model",
        &model.display().to_string(),
        "--model-id",
        "test-model",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--min-workers",
        &min_workers,
        "--no-mdns",
        "--state-dir",
        &trust.state_dir().display().to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let envs = [
        ("STRATA_LOG", "warn".to_string()),
        ("STRATA_TEST_PULL_BYTES_PER_SECOND", PULL_BYTES_PER_SECOND.into()),
        // Its shard files go into the test's folder, removed whatever happens to it.
        ("TMPDIR", tmp.display().to_string()),
    ];
    let mut p = Process::spawn("coordinator", &binary("strata")?, &args, &envs)?;
    let line = p.wait_for_line("coordinator grpc=", READY_TIMEOUT, |_| {}).await?;
    let grpc = Process::field(&line, "grpc").context("no grpc= in the coordinator's first line")?;
    let http = Process::field(&line, "http").context("no http= in the coordinator's first line")?;
    Ok((p, grpc, http))
}

/// A worker without the model file that joins `grpc` (so it pulls its layers).
async fn worker(grpc: &str, cache: &Path, trust: &LocalTrust) -> anyhow::Result<Process> {
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--name",
        "w1",
        "--cache-dir",
        &cache.display().to_string(),
        "--no-bench",
        "--no-mdns",
        "--join",
        grpc,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let env = [("STRATA_LOG", "warn".into()), ("STRATA_TOKEN", trust.token())];
    let mut p = Process::spawn("w1", &binary("strata-worker")?, &args, &env)?;
    p.wait_for_line("worker listening", READY_TIMEOUT, |_| {}).await?;
    p.drain_output();
    Ok(p)
}

fn pulling(s: &Value) -> bool {
    node(s, "w1").is_ok_and(|n| n["pulls"].as_array().is_some_and(|p| !p.is_empty()))
}

#[tokio::test]
async fn status_shows_the_first_loads_pull_and_requests_wait_for_its_pipeline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel::tiny().write_to(dir.path())?;
    let trust = LocalTrust::new()?;
    let (mut coordinator, grpc, http) = coordinator(&model, dir.path(), 1, &trust).await?;
    let _w1 = worker(&grpc, &dir.path().join("cache"), &trust).await?;

    // Served before the first pipeline exists: the pull shows, and there is no plan yet.
    let s = wait_for_status(&http, "w1's pull in the status", pulling).await?;
    anyhow::ensure!(s["pipeline_id"].is_null(), "the pipeline is there before the pull ended: {s}");
    eprintln!("during the first load: w1 pulls {}", node(&s, "w1")?["pulls"]);

    // A request sent now waits for the pipeline, then completes.
    let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0});
    let sent = Instant::now();
    let request = tokio::spawn({
        let http = http.clone();
        async move { http::request(&http, "POST", "/v1/completions", Some(&body)).await }
    });
    let (_, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    anyhow::ensure!(stages.len() == 1 && stages[0].contains("pulled"), "{stages:?}");
    let reply = tokio::time::timeout(Duration::from_secs(30), request).await.context("the request hung")???;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    let usage = &reply.json()?["usage"];
    anyhow::ensure!(usage["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{}", reply.body);
    eprintln!("a request sent during the first load completed after {:?}", sent.elapsed());
    // The pulled bytes are counted (`strata:weight_pull_bytes_total`).
    let s = status(&http).await?;
    anyhow::ensure!(s["weight_pull_bytes"].as_u64().is_some_and(|b| b > 0), "the pull is not counted: {s}");
    coordinator.stop(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test]
async fn sigterm_during_the_first_load_ends_the_coordinator_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel::tiny().write_to(dir.path())?;
    let trust = LocalTrust::new()?;
    let (mut coordinator, grpc, http) = coordinator(&model, dir.path(), 1, &trust).await?;
    let _w1 = worker(&grpc, &dir.path().join("cache"), &trust).await?;
    wait_for_status(&http, "w1's pull in the status", pulling).await?;
    let asked = Instant::now();
    coordinator.terminate();
    anyhow::ensure!(
        coordinator.exited_within(Duration::from_secs(3)).await,
        "the coordinator still runs 3 s after SIGTERM during its first load"
    );
    eprintln!("the coordinator exited {:?} after SIGTERM during its first load", asked.elapsed());
    Ok(())
}

#[tokio::test]
async fn status_serves_while_the_coordinator_waits_for_workers_and_sigterm_ends_the_wait() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel::tiny().write_to(dir.path())?;
    let trust = LocalTrust::new()?;
    let (mut coordinator, _, http) = coordinator(&model, dir.path(), 2, &trust).await?;
    let s = tokio::time::timeout(Duration::from_secs(10), status(&http))
        .await
        .context("no status while waiting for workers")??;
    anyhow::ensure!(s["pipeline_id"].is_null() && s["nodes"].as_array().is_some_and(Vec::is_empty), "{s}");
    let asked = Instant::now();
    coordinator.terminate();
    anyhow::ensure!(
        coordinator.exited_within(Duration::from_secs(3)).await,
        "the coordinator still runs 3 s after SIGTERM while waiting for workers"
    );
    eprintln!("the coordinator exited {:?} after SIGTERM while waiting for workers", asked.elapsed());
    Ok(())
}

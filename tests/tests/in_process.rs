//! A coordinator run in-process with `strata_coordinator::run` over listeners the
//! test binds, driving real worker processes: it serves, answers right, and stops
//! when its shutdown future completes (issue 9).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_coordinator::cluster::ServedModel;
use strata_coordinator::server::{ConfigError, ServeError};
use strata_model::synthetic::SyntheticModel;
use strata_tests::in_process::{listeners, serve_config, InProcessCoordinator};
use strata_tests::{reference_tokens, ClusterOptions, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_runs_in_process_answers_right_and_stops_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = SyntheticModel { layers: 4, context_length: 256, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    // The coordinator runs in this test process, which has no identity: plain TCP.
    let options = ClusterOptions { workers: 2, insecure: true, ..ClusterOptions::default() };
    let workers = TestCluster::workers(&path, &options).await?;
    let model = Arc::new(ServedModel::open(&path, "test-model".into())?);
    // Ready once the status names a pipeline (the API answers only once the
    // first plan was tried; until then connections wait in the backlog).
    let coordinator = InProcessCoordinator::start(serve_config(model, workers.workers.clone())).await?;
    let http_addr = coordinator.http.clone();

    let prompt = [1u32, 2, 3, 4];
    let want = reference_tokens(&path, &prompt, 8)?;
    let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let reply = http::request(&http_addr, "POST", "/v1/completions", Some(&body)).await?;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    assert_eq!(reply.json()?["usage"]["completion_tokens"].as_u64(), Some(want.len() as u64), "{}", reply.body);

    let asked = Instant::now();
    coordinator.stop(Duration::from_secs(5)).await.context("run did not end cleanly within 5 s")?;
    eprintln!("stopped {:?} after it was asked", asked.elapsed());
    workers.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_setting_that_cannot_work_is_refused_before_anything_runs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = SyntheticModel::tiny().write_to(dir.path())?;
    let model = Arc::new(ServedModel::open(&path, "test-model".into())?);
    let mut bad = serve_config(model, vec!["127.0.0.1:1".into()]);
    bad.plan.sequences = 0;
    let refused = strata_coordinator::run(listeners().await?, bad, std::future::pending()).await;
    assert!(matches!(refused, Err(ServeError::Config(ConfigError::ZeroSequences))), "{refused:?}");
    Ok(())
}

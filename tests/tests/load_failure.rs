//! A pipeline that cannot load does not stop `strata serve`: it keeps serving,
//! says why per node in `strata status`, retries with backoff, and requests get an
//! error in time rather than a hang (issue 9).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::{binary, ClusterOptions, TestCluster};

async fn status(addr: &str) -> anyhow::Result<Value> {
    let reply = http::request(addr, "GET", "/admin/status", None).await?;
    anyhow::ensure!(reply.status == 200, "status: HTTP {}: {}", reply.status, reply.body);
    Ok(reply.json()?)
}

#[tokio::test]
async fn a_pipeline_that_cannot_load_keeps_the_coordinator_serving_and_says_why() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 4, context_length: 256, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    // The workers have no model file and are told to pull from an address where
    // nothing listens: every load fails, as it did for workers on other hosts told
    // to pull from the coordinator's loopback.
    let options = ClusterOptions {
        workers: 2,
        workers_have_model: false,
        serve_args: ["--grpc-advertise", "127.0.0.1:1", "--queue-timeout", "2"].map(String::from).to_vec(),
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(&model, &options).await?;
    let addr = cluster.http().to_string();
    assert!(cluster.stage_lines.is_empty(), "nothing can have loaded: {:?}", cluster.stage_lines);

    let health = http::request(&addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 200, "{}", health.body);

    // Each node says its load failed and why, and the cluster says requests wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = status(&addr).await?;
        let nodes = s["nodes"].as_array().context("no nodes")?;
        let explained = nodes.len() == 2
            && nodes.iter().all(|n| n["reason"].as_str().is_some_and(|r| r.contains("loading failed")));
        if explained {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "no per-node load failure in the status after 30 s: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = s["nodes"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("127.0.0.1:1"), "the reason names the address it could not pull from: {reason}");

    let out = tokio::process::Command::new(binary("strata")?).args(["status", "--coordinator", &addr]).output().await?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("loading failed"), "{table}");

    // A request waits for capacity, then fails with an error body: no hang.
    let started = Instant::now();
    let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0});
    let reply =
        tokio::time::timeout(Duration::from_secs(30), http::request(&addr, "POST", "/v1/completions", Some(&body)))
            .await
            .context("a request to a cluster without a pipeline hung")??;
    assert_ne!(reply.status, 200, "{}", reply.body);
    assert!(reply.json()?["error"]["message"].is_string(), "{}", reply.body);
    eprintln!("refused after {:?}: HTTP {} {}", started.elapsed(), reply.status, reply.body);

    // And the coordinator is still there.
    let health = http::request(&addr, "GET", "/health", None).await?;
    assert_eq!(health.status, 200, "{}", health.body);
    cluster.stop().await;
    Ok(())
}

//! `strata status` shows each node's measured tokens/s and time per step next to
//! the planner's prediction, from the heartbeats of a running cluster, and the
//! plan's limits on sequences and context, which requests are checked against.

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

/// Every node holding layers has measured something and has a prediction.
fn measured_everywhere(s: &Value) -> bool {
    let nodes = s["nodes"].as_array().map(Vec::as_slice).unwrap_or_default();
    !nodes.is_empty()
        && nodes.iter().all(|n| {
            n["measured_tokens_per_second"].as_f64().is_some_and(|t| t > 0.0)
                && n["measured_step_ms"].as_f64().is_some_and(|t| t > 0.0)
                && n["predicted_step_ms"].as_f64().is_some_and(|t| t > 0.0)
        })
}

#[tokio::test]
async fn status_shows_each_nodes_measured_speed_next_to_the_prediction() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, context_length: 512, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    // Planned for less than the model's 512 tokens of context (issue 9).
    let options = ClusterOptions { serve_args: vec!["--context".into(), "256".into()], ..ClusterOptions::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    let addr = cluster.http().to_string();
    let before = status(&addr).await?;
    let admission = &before["admission"];
    assert_eq!((&admission["sequences"], &admission["context"]), (&json!(8), &json!(256)), "{before}");
    // What clients read: the context a request may fill, and the plan (`/v1/models`);
    // the sequences served at once (llama.cpp's `/props`).
    let models = http::request(&addr, "GET", "/v1/models", None).await?.json()?;
    let served = &models["data"][0];
    assert_eq!((&served["context_length"], &served["meta"]["n_ctx_train"]), (&json!(256), &json!(512)), "{models}");
    let plan = served["plan"].as_array().context("no plan in /v1/models")?;
    let stages: Vec<(&str, u64, u64)> = plan
        .iter()
        .filter_map(|s| Some((s["node"].as_str()?, s["layers"][0].as_u64()?, s["layers"][1].as_u64()?)))
        .collect();
    assert_eq!(stages.len(), 3, "{models}");
    assert_eq!((stages[0].1, stages[2].2), (0, 6), "the plan covers every layer: {models}");
    assert!(stages.windows(2).all(|w| w[0].2 == w[1].1), "contiguous: {models}");
    let props = http::request(&addr, "GET", "/props", None).await?.json()?;
    assert_eq!((&props["total_slots"], &props["default_generation_settings"]["n_ctx"]), (&json!(8), &json!(256)));
    // A request beyond the planned context is refused at once, naming both numbers.
    let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 300});
    let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 400, "{}", reply.body);
    let refusal = "prompt (3 tokens) plus max_tokens (300) exceeds the context of 256 tokens";
    assert!(reply.body.contains(refusal), "{}", reply.body);
    let idle = before["nodes"].as_array().context("no nodes")?;
    assert!(idle.iter().all(|n| n["measured_tokens_per_second"] == 0.0), "nothing ran yet: {before}");

    // Keep the cluster busy until every node's rate shows in the status.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 64, "temperature": 0});
        let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
        anyhow::ensure!(reply.status == 200, "{}", reply.body);
        let s = status(&addr).await?;
        if measured_everywhere(&s) {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "no per-node measurement after 60 s: {s}");
    };
    eprintln!("{s}");

    let out = tokio::process::Command::new(binary("strata")?)
        .args(["status", "--coordinator", &addr])
        .output()
        .await?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("TOK/S") && table.contains("STEP (PREDICTED)"), "{table}");
    assert!(table.lines().filter(|l| l.starts_with("worker-") && l.contains("s (")).count() == 3, "{table}");

    // The same, refreshing: `strata top` (frames one after another into a pipe).
    let out = tokio::process::Command::new(binary("strata")?)
        .args(["top", "--coordinator", &addr, "--iterations", "2", "--interval", "0.1"])
        .output()
        .await?;
    let frames = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{frames}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(frames.matches("STEP (PREDICTED)").count(), 2, "{frames}");
    assert_eq!(frames.matches("layers 0..6 |").count(), 2, "{frames}");
    assert!(frames.contains("0 worker-0  1 worker-1  2 worker-2"), "{frames}");
    cluster.stop().await;
    Ok(())
}

//! `GET /metrics` of a running cluster: the API's counters as vLLM names them and
//! what only a pipeline has (each node, its stage's measured and predicted step),
//! moving as requests run, a node is drained and another killed; and the text is
//! what `promtool check metrics` accepts (Debian's `prometheus` package; the test
//! says SKIPPED for that part when promtool is missing, and `.ci/run` installs it).

use std::io::Write as _;

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::admin::{admin, wait_for_status};
use strata_tests::{ClusterOptions, TestCluster};

async fn metrics(addr: &str) -> anyhow::Result<String> {
    let reply = http::request(addr, "GET", "/metrics", None).await?;
    anyhow::ensure!(reply.status == 200, "metrics: HTTP {}: {}", reply.status, reply.body);
    Ok(reply.body)
}

/// The value of the sample `series` (name and labels as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// `promtool check metrics` on `text`: its complaints, or `None` without promtool.
fn promtool(text: &str) -> anyhow::Result<Option<String>> {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    child.stdin.take().context("promtool's stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(Some(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
}

#[tokio::test]
async fn metrics_move_with_requests_a_drain_and_a_kill_and_pass_promtool() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let mut cluster = TestCluster::start(&model, &ClusterOptions::default()).await?;
    let addr = cluster.http().to_string();
    let up = |node: &str, state: &str| format!("strata:node_up{{node=\"{node}\",state=\"{state}\"}}");
    let before = metrics(&addr).await?;
    for w in ["worker-0", "worker-1", "worker-2"] {
        assert_eq!(sample(&before, &up(w, "ready")), Some(1.0), "{before}");
    }
    let generated = "strata:generation_tokens_total{model_name=\"test-model\"}";
    assert_eq!(sample(&before, generated), Some(0.0), "{before}");

    for _ in 0..3 {
        let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0});
        let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
        anyhow::ensure!(reply.status == 200, "{}", reply.body);
    }
    // Each stage's link to the next, from the workers' heartbeats: bytes and a round trip.
    wait_for_status(&addr, "worker-0's link to worker-1 measured", |s| {
        s["nodes"].as_array().into_iter().flatten().filter(|n| n["name"] == "worker-0").any(|n| {
            n["links"].as_array().into_iter().flatten().any(|l| {
                l["to"] == "worker-1" && l["rtt_ms"].is_number() && l["bytes_sent"].as_u64().is_some_and(|b| b > 0)
            })
        })
    })
    .await?;
    let served = metrics(&addr).await?;
    let link = "{from=\"worker-0\",to=\"worker-1\"}";
    assert!(sample(&served, &format!("strata:link_bytes_sent_total{link}")).is_some_and(|b| b > 0.0), "{served}");
    let rtt = sample(&served, &format!("strata:link_round_trip_seconds{link}"));
    assert!(rtt.is_some_and(|s| s > 0.0 && s < 1.0), "{served}");
    // Both workers on this machine: the frames go over a Unix socket.
    assert_eq!(sample(&served, &format!("strata:link_local_lane{link}")), Some(1.0), "{served}");
    // So are the coordinator and the workers: their events too.
    let events = "strata:node_events_local_lane{node=\"worker-0\",stage=\"0\"}";
    assert_eq!(sample(&served, events), Some(1.0), "{served}");
    assert!(sample(&served, generated).is_some_and(|n| n >= 3.0), "{served}");
    assert_eq!(sample(&served, "strata:e2e_request_latency_seconds_count"), Some(3.0), "{served}");
    assert!(served.contains("strata:stage_predicted_step_seconds{node=\"worker-0\",stage=\"0\"}"), "{served}");
    // Each stage's queue: frames computed, and the seconds they waited, summed.
    for w in ["worker-0", "worker-1", "worker-2"] {
        let frames = sample(&served, &format!("strata:stage_frames_total{{node=\"{w}\"}}"));
        assert!(frames.is_some_and(|n| n >= 3.0), "{served}");
        let queued = sample(&served, &format!("strata:stage_queue_seconds_total{{node=\"{w}\"}}"));
        assert!(queued.is_some_and(|s| s >= 0.0), "{served}");
    }
    assert_eq!(sample(&served, "strata:weight_pull_bytes_total"), Some(0.0), "nothing was pulled: {served}");

    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    let drained = metrics(&addr).await?;
    assert_eq!(sample(&drained, &up("worker-1", "draining")), Some(0.0), "{drained}");
    let changes = "strata:membership_changes_total";
    assert!(sample(&drained, changes) > sample(&served, changes), "{drained}");
    let drains = "strata:drain_duration_seconds_count";
    assert_eq!(sample(&drained, drains), Some(1.0), "{drained}");
    assert!(sample(&drained, "strata:drain_duration_seconds_sum").is_some_and(|s| s > 0.0), "{drained}");
    let switches = "strata:pipeline_switches_total";
    assert!(sample(&drained, switches) > sample(&served, switches), "the drain switched pipelines: {drained}");

    cluster.kill_worker(2).await?;
    wait_for_status(&addr, "worker-2 gone", |s| {
        s["nodes"].as_array().into_iter().flatten().any(|n| n["name"] == "worker-2" && n["state"] == "gone")
    })
    .await?;
    let killed = metrics(&addr).await?;
    assert_eq!(sample(&killed, &up("worker-2", "gone")), Some(0.0), "{killed}");

    match promtool(&killed)? {
        None => eprintln!("SKIPPED: promtool check metrics: promtool is not installed (apt-get install prometheus)"),
        Some(complaints) => {
            // Colons in names are what vLLM's dashboards read; promtool lints them
            // ("metric names should not contain ':'"), and nothing else may show.
            let other: Vec<&str> =
                complaints.lines().filter(|l| !l.trim().is_empty() && !l.ends_with("should not contain ':'")).collect();
            assert!(other.is_empty(), "promtool: {complaints}");
        }
    }
    cluster.stop().await;
    Ok(())
}

//! One trace per request across the processes of a cluster, received by a real
//! OTLP collector on loopback (`tests/otlp/receiver.py`: a gRPC TraceService built
//! from the `grpcio` and `opentelemetry-proto` packages, which `.ci/run` installs;
//! the test says SKIPPED without them).
//!
//! - A request through 3 workers is one trace: the coordinator's `request` span
//!   (a child of the API's `completion` span, with its `queue`, `prefill` and
//!   `decode` phases) and one `stage` span from each worker process, each a child of
//!   the request span.
//! - The receiver stopped mid-run loses spans but no request, and slows none.
//! - With sampling at 0, nothing is exported.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::{python, python_path, ClusterOptions, TestCluster, READY_TIMEOUT};

/// How long the spans of a finished request may take to arrive (they are sent
/// every 100 ms here).
const SPANS_TIMEOUT: Duration = Duration::from_secs(30);

/// The receiver, and the spans it printed so far.
struct Receiver {
    process: Process,
    spans: Vec<Value>,
}

impl Receiver {
    /// Started, with its endpoint; `None` (said SKIPPED) without its packages.
    async fn start(test: &str) -> anyhow::Result<Option<(Self, String)>> {
        let imports = "import grpc; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc";
        if !python().args(["-c", imports]).status().is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED {test}: the grpcio and opentelemetry-proto Python packages are missing (.ci/run installs them)");
            return Ok(None);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/otlp/receiver.py");
        let mut process = Process::spawn(
            "otlp-receiver",
            std::path::Path::new("python3"),
            &[script.to_string()],
            &[("PYTHONPATH", python_path())],
        )?;
        let line = process.wait_for_line("otlp receiver listening", READY_TIMEOUT, |_| {}).await?;
        let port = Process::field(&line, "port").ok_or_else(|| anyhow::anyhow!("no port= in {line}"))?;
        Ok(Some((Self { process, spans: Vec::new() }, format!("http://127.0.0.1:{port}"))))
    }

    /// Reads spans until `done` holds for those received.
    async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + SPANS_TIMEOUT;
        while !done(&self.spans) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .process
                .wait_for_line("{", left, |_| {})
                .await
                .map_err(|e| anyhow::anyhow!("waiting for {what}: {e:#}; spans so far: {:#?}", self.spans))?;
            self.spans.push(serde_json::from_str(&line)?);
        }
        Ok(())
    }

    /// Stops it and returns every span it received.
    async fn stop(mut self) -> Vec<Value> {
        self.process.terminate();
        // Every line until its output ends (no line starts with a NUL).
        let spans = &mut self.spans;
        let _ = self
            .process
            .wait_for_line("\0", READY_TIMEOUT, |line| spans.extend(serde_json::from_str::<Value>(line).ok()))
            .await;
        self.spans
    }
}

fn otlp_options(endpoint: &str, extra: &[&str]) -> ClusterOptions {
    let mut flags = vec!["--otlp-endpoint".to_string(), endpoint.to_string()];
    flags.extend(extra.iter().map(|s| s.to_string()));
    ClusterOptions {
        serve_args: flags.clone(),
        worker_args: vec![flags; 3],
        // Spans go out every 100 ms rather than every 5 s.
        env: vec![("OTEL_BSP_SCHEDULE_DELAY", "100".into())],
        ..ClusterOptions::default()
    }
}

/// Completes a short prompt; how long it took.
async fn complete(addr: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let body = json!({"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0});
    let reply = http::request(addr, "POST", "/v1/completions", Some(&body)).await?;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    Ok(started.elapsed())
}

fn named<'a>(spans: &'a [Value], name: &'a str) -> impl Iterator<Item = &'a Value> {
    spans.iter().filter(move |s| s["name"] == name)
}

/// The first request span, and the stage spans that are its children.
fn trace_of_first_request(spans: &[Value]) -> Option<(&Value, Vec<&Value>)> {
    let request = named(spans, "request").next()?;
    let stages = named(spans, "stage").filter(|s| s["parent_span_id"] == request["span_id"]).collect();
    Some((request, stages))
}

#[tokio::test]
async fn a_request_through_three_workers_is_one_trace_and_a_stopped_receiver_costs_no_request() -> anyhow::Result<()> {
    let test = "a_request_through_three_workers_is_one_trace_and_a_stopped_receiver_costs_no_request";
    let Some((mut receiver, endpoint)) = Receiver::start(test).await? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let cluster = TestCluster::start(&model, &otlp_options(&endpoint, &[])).await?;
    let addr = cluster.http().to_string();
    let workers: HashSet<u64> =
        cluster.pids().into_iter().filter(|(name, _)| name.starts_with("worker-")).map(|(_, pid)| pid as u64).collect();
    assert_eq!(workers.len(), 3);

    let mut with_receiver = vec![complete(&addr).await?];
    receiver
        .until("the request's span, its parent and a stage span from each worker", |spans| {
            trace_of_first_request(spans).is_some_and(|(request, stages)| {
                stages.len() == 3 && spans.iter().any(|s| s["span_id"] == request["parent_span_id"])
            })
        })
        .await?;
    let (request, stages) = trace_of_first_request(&receiver.spans).expect("waited for");
    assert_eq!(request["service"], "strata", "{request}");
    assert!(request["attributes"]["generated_tokens"].as_i64().is_some_and(|n| n > 0), "{request}");
    assert_eq!(request["attributes"]["prompt_tokens"], 3, "{request}");
    assert_eq!(request["attributes"]["finish_reason"], "length", "{request}");
    let trace = &request["trace_id"];
    // The API's span is the request's parent, in the same trace.
    let completion = named(&receiver.spans, "completion").find(|s| s["span_id"] == request["parent_span_id"]);
    assert!(completion.is_some_and(|c| c["trace_id"] == *trace), "{:#?}", receiver.spans);
    for phase in ["queue", "prefill", "decode"] {
        assert!(
            named(&receiver.spans, phase).any(|p| p["parent_span_id"] == request["span_id"]),
            "no {phase} span under the request: {:#?}",
            receiver.spans
        );
    }
    // One stage span from each worker process, all in the request's trace.
    let pids: HashSet<u64> = stages.iter().filter_map(|s| s["pid"].as_u64()).collect();
    assert_eq!(pids, workers, "{stages:#?}");
    let mut indices: Vec<i64> = stages.iter().filter_map(|s| s["attributes"]["stage"].as_i64()).collect();
    indices.sort();
    assert_eq!(indices, [0, 1, 2], "{stages:#?}");
    for s in &stages {
        assert_eq!(s["service"], "strata-worker", "{s}");
        assert_eq!(s["trace_id"], *trace, "{s}");
        assert!(s["attributes"]["frames"].as_i64().is_some_and(|n| n > 0), "{s}");
        assert!(s["attributes"]["compute_seconds"].as_f64().is_some_and(|t| t > 0.0), "{s}");
    }

    // The receiver goes away: requests go on, no slower.
    with_receiver.push(complete(&addr).await?);
    receiver.process.kill().await;
    let mut without = Vec::new();
    for _ in 0..3 {
        without.push(complete(&addr).await?);
    }
    let slowest_with = with_receiver.iter().max().copied().unwrap_or_default();
    let slowest_without = without.iter().max().copied().unwrap_or_default();
    assert!(
        slowest_without < slowest_with * 2 + Duration::from_secs(1),
        "with the receiver: {with_receiver:?}; without: {without:?}"
    );
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn with_sampling_at_zero_nothing_is_exported() -> anyhow::Result<()> {
    let test = "with_sampling_at_zero_nothing_is_exported";
    let Some((receiver, endpoint)) = Receiver::start(test).await? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let cluster = TestCluster::start(&model, &otlp_options(&endpoint, &["--trace-sample-ratio", "0"])).await?;
    let addr = cluster.http().to_string();
    for _ in 0..2 {
        complete(&addr).await?;
    }
    // Every process sends what it holds as it stops, before it exits.
    cluster.stop().await;
    let spans = receiver.stop().await;
    assert!(spans.is_empty(), "{spans:#?}");
    Ok(())
}

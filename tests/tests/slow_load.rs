//! A slow load never holds up the control plane (issue 9), across hosts made of
//! network namespaces: the coordinator in host 1, workers w2 and w4 holding the
//! model file (a synthetic one of about 900 MB the test writes), and w3 without
//! it, which joins a serving cluster and must pull its third (about 300 MB)
//! through a weight stream held to 10 MB/s (`STRATA_TEST_PULL_BYTES_PER_SECOND`):
//! more than half a minute. While it pulls:
//!
//! * `GET /admin/status`, asked every 50 ms for the whole pull, answers quickly
//!   every time (p50 and p99 printed);
//! * w3's link is cut: within 2 s the coordinator plans without it and serves a
//!   completion; with the link back, w3 is taken in again and its pull goes on
//!   from the bytes it already had;
//! * w4 is SIGKILLed: status shows it gone within 2 s (the load that involved it
//!   is abandoned and planned again);
//! * SIGTERM to the coordinator: it exits within 3 s.
//!
//! Needs root (prints `SKIPPED: ...` and passes otherwise).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_model::{ModelFile, Tokenizer};
use strata_tests::admin::{node, status, wait_for_status};
use strata_tests::netns::{log_level, Hosts};
use strata_tests::{binary, reference_completion, until_serving, READY_TIMEOUT};

const GRPC_PORT: u16 = 7070;

/// The weight stream's pace: w3's third of the model takes over 30 s.
const PULL_BYTES_PER_SECOND: &str = "10000000";

/// How long the status is watched while w3 pulls.
const WATCHED_FOR: Duration = Duration::from_secs(30);

/// About 900 MB: 56 layers of 16 MB (Q8_0), so that a third of it takes over
/// 30 s at the pace above. Narrow enough that a few tokens are quick on a CPU.
fn write_model(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let model = SyntheticModel {
        layers: 56,
        hidden: 1024,
        heads: 8,
        kv_heads: 4,
        feed_forward: 4096,
        context_length: 256,
        ..SyntheticModel::tiny()
    };
    Ok(model.write_to(dir)?)
}

/// A worker in `host` that joins the coordinator in host 1, with the model file
/// or without it (then it pulls its layers).
async fn start_worker(
    hosts: &Hosts,
    host: usize,
    name: &str,
    model: Option<&Path>,
    cache: &Path,
) -> anyhow::Result<Process> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("{}:{GRPC_PORT}", hosts.address(host)),
        "--join".into(),
        format!("{}:7100", hosts.address(1)),
        "--no-mdns".into(),
    ];
    if let Some(model) = model {
        args.extend(["--model".into(), model.display().to_string()]);
    }
    hosts.start_worker(host, name, cache, &args).await
}

/// The layers of the shard w3 pulls, and the bytes it holds of it, if it pulls one.
fn pull_of(s: &Value) -> Option<(String, u64)> {
    let pull = node(s, "w3").ok()?["pulls"].as_array()?.first()?;
    Some((pull["layers"].to_string(), pull["bytes_done"].as_u64()?))
}

fn pulled_bytes(s: &Value) -> Option<u64> {
    pull_of(s).map(|(_, bytes)| bytes)
}

fn gone(s: &Value, name: &str) -> bool {
    node(s, name).is_ok_and(|n| n["state"] == "gone")
}

/// Polls the status until `check` holds, for at most `within`; how long it took.
async fn noticed_within(
    http: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let s = status(http).await?;
        if check(&s) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < within, "{what} not seen within {within:?}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pull_never_holds_up_the_control_plane() -> anyhow::Result<()> {
    let test = "a_slow_pull_never_holds_up_the_control_plane";
    let Some(hosts) = Hosts::for_test(test, 4)? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let written = Instant::now();
    let model = write_model(dir.path())?;
    eprintln!("wrote a {} MB model in {:?}", std::fs::metadata(&model)?.len() / 1_000_000, written.elapsed());
    let serve: Vec<String> = [
        "--threads",
        "1",
        "serve",
        "--model",
        &model.display().to_string(),
        "--model-id",
        "test-model",
        "--grpc-listen",
        "0.0.0.0:7100",
        "--http-listen",
        &format!("{}:8000", hosts.address(1)),
        "--min-workers",
        "2",
        // Every worker holds layers, so the one that joins must pull.
        "--placement",
        "spread",
        "--no-mdns",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let envs = [("STRATA_LOG", log_level()), ("STRATA_TEST_PULL_BYTES_PER_SECOND", PULL_BYTES_PER_SECOND.into())];
    let serve = [serve, hosts.trust_args()].concat();
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &envs)?;
    coordinator.wait_for_line("coordinator grpc=", READY_TIMEOUT, |_| {}).await?;
    let _w2 = start_worker(&hosts, 2, "w2", Some(&model), dir.path()).await?;
    let w4 = start_worker(&hosts, 4, "w4", Some(&model), dir.path()).await?;
    let (ready, _) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    let _w3 = start_worker(&hosts, 3, "w3", None, dir.path()).await?;

    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model)?.metadata())?;
    let (want, _) = reference_completion(&model, &tokenizer.encode("The capital of France is")?, 4)?;
    let body = json!({"model": "test-model", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});

    tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            let s = wait_for_status(&http, "w3 pulling its layers", |s| pulled_bytes(s).is_some()).await?;
            eprintln!("w3 pulls: {}", node(&s, "w3")?["pulls"]);

            // Status is asked every 50 ms for as long as w3 pulls, beside all
            // that follows.
            let pull_started = Instant::now();
            let (stop_watching, mut stopped) = tokio::sync::watch::channel(false);
            let watcher = tokio::spawn({
                let http = http.to_string();
                async move {
                    let mut latencies = Vec::new();
                    while !*stopped.borrow_and_update() {
                        let asked = Instant::now();
                        status(&http).await?;
                        latencies.push(asked.elapsed());
                        let _ = tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
                    }
                    anyhow::Ok(latencies)
                }
            });

            // The pulling worker cut off: plans without it within 2 s, and serves.
            let before = status(&http).await?;
            let (range, before_cut) = pull_of(&before).context("w3 pulls nothing")?;
            hosts.set_link(3, false)?;
            let replanned = noticed_within(&http, Duration::from_secs(3), "a pipeline without w3", |s| {
                gone(s, "w3") && !s["pipeline_id"].is_null() && node(s, "w2").is_ok_and(|n| !n["layers"].is_null())
            })
            .await?;
            eprintln!("w3 cut off after {before_cut} bytes of layers {range}: planned without it after {replanned:?}");
            anyhow::ensure!(replanned < Duration::from_secs(2), "planned without w3 only after {replanned:?}");
            let reply = http::request(&http, "POST", "/v1/completions", Some(&body)).await?;
            anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
            anyhow::ensure!(reply.json()?["choices"][0]["text"].as_str() == Some(want.as_str()), "{}", reply.body);

            // Cut long enough that the pull's own connection fails (HTTP/2 keepalive:
            // a ping every 2 s, answered within 5 s): the worker must then resume
            // from its partial file, not carry on with the same stream.
            let cut_for = strata_proto::transport::KEEPALIVE_INTERVAL + strata_proto::transport::KEEPALIVE_TIMEOUT;
            tokio::time::sleep((cut_for + Duration::from_secs(1)).saturating_sub(replanned)).await;

            // Back: taken in again (the same plan), and its pull goes on from what it had.
            hosts.set_link(3, true)?;
            let s = wait_for_status(&http, "w3 pulling again", |s| {
                !gone(s, "w3") && pull_of(s).is_some_and(|(r, _)| r == range)
            })
            .await?;
            let (_, resumed_at) = pull_of(&s).context("w3 pulls nothing")?;
            eprintln!("w3 back: its pull of layers {range} went on at {resumed_at} bytes (it had {before_cut})");
            anyhow::ensure!(resumed_at >= before_cut && before_cut > 0, "the pull started over: {s}");

            // Watched for the whole pull: it is still going after half a minute.
            tokio::time::sleep(WATCHED_FOR.saturating_sub(pull_started.elapsed())).await;
            let s = status(&http).await?;
            let (_, now_at) = pull_of(&s).context("the pull ended before 30 s (lower the pace)")?;
            eprintln!("w3 still pulling after {:?}: {now_at} bytes", pull_started.elapsed());
            let _ = stop_watching.send(true);
            let mut latencies = watcher.await??;
            latencies.sort();
            let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
            eprintln!(
                "status during the pull ({} asks over {:?}): p50 {p50:?}, p99 {p99:?}, slowest {:?}",
                latencies.len(),
                pull_started.elapsed(),
                latencies[latencies.len() - 1]
            );
            anyhow::ensure!(p99 < Duration::from_millis(200), "status p99 {p99:?} during a load");

            // A crash elsewhere is noticed at once, not after the load.
            w4.kill_now();
            let noticed = noticed_within(&http, Duration::from_secs(2), "w4 gone", |s| gone(s, "w4")).await?;
            eprintln!("w4 killed: gone in the status after {noticed:?}");
            anyhow::Ok(())
        })
    })??;

    // Stopping mid-load: the coordinator exits within 3 s.
    let asked = Instant::now();
    coordinator.terminate();
    anyhow::ensure!(
        coordinator.exited_within(Duration::from_secs(3)).await,
        "the coordinator still runs 3 s after SIGTERM"
    );
    eprintln!("the coordinator exited {:?} after SIGTERM", asked.elapsed());
    Ok(())
}

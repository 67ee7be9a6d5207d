//! A worker cut off from the network mid-generation, across hosts made of network
//! namespaces (`strata_tests::netns`): the coordinator in host 1, three workers in
//! hosts 2 to 4, named to it by address (no mDNS, so only the link is tested).
//! While eight streaming greedy requests run, the link of the middle stage's host is
//! set down at the switch: nothing closes or fails, packets just stop. The
//! heartbeats on the Events stream must notice within 2 s, the requests move to the
//! two workers left and end exactly as an undisturbed run does, and their clients
//! see a pause, not an error. When the link comes back, the worker (still holding
//! its shard of the pipeline it was cut from) is cleaned up and holds layers again.
//!
//! Needs root (prints `SKIPPED: ...` and passes otherwise).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_tests::admin::{holds_layers, node, pipeline_id, pipelines_held, status, wait_for_status};
use strata_tests::netns::{log_level, Hosts};
use strata_tests::streams::{synthetic_model, Streams};
use strata_tests::{binary, reference_completion, until_serving};

const GRPC_PORT: u16 = 7070;

/// The hosts of the workers; worker-i runs in `WORKER_HOSTS[i]`.
const WORKER_HOSTS: [usize; 3] = [2, 3, 4];

/// How long the whole disturbed run may take before the test calls it a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// A worker in `host`, holding the model file, listening on the host's address.
async fn start_worker(hosts: &Hosts, host: usize, name: &str, model: &Path, cache: &Path) -> anyhow::Result<Process> {
    let args: Vec<String> = vec![
        "--listen".into(),
        format!("{}:{GRPC_PORT}", hosts.address(host)),
        "--model".into(),
        model.display().to_string(),
        "--no-mdns".into(),
    ];
    hosts.start_worker(host, name, cache, &args).await
}

/// The coordinator in host 1 over the workers, by address; its HTTP address.
async fn start_coordinator(hosts: &Hosts, model: &Path) -> anyhow::Result<(Process, String)> {
    let mut args: Vec<String> = [
        "--threads",
        "1",
        "serve",
        "--model",
        &model.display().to_string(),
        "--model-id",
        "test-model",
        "--grpc-listen",
        &format!("{}:7100", hosts.address(1)),
        "--http-listen",
        &format!("{}:8000", hosts.address(1)),
        // Every worker holds layers, though one could hold them all.
        "--placement",
        "spread",
        "--queue-timeout",
        "60",
        "--no-mdns",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for host in WORKER_HOSTS {
        args.extend(["--worker".into(), format!("{}:{GRPC_PORT}", hosts.address(host))]);
    }
    args.extend(hosts.trust_args());
    let mut p = hosts.spawn(1, "coordinator", &binary("strata")?, &args, &[("STRATA_LOG", log_level())])?;
    let (ready, stages) = until_serving(&mut p).await?;
    p.drain_output();
    anyhow::ensure!(stages.len() == 3, "not one stage per worker: {stages:?}");
    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    Ok((p, http))
}

/// What the disturbed run measured.
#[derive(Debug)]
struct Measured {
    cut: String,
    noticed: Duration,
    longest_pause: Duration,
    slowest_status: Duration,
    back: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_mid_generation_is_noticed_replaced_and_taken_back() -> anyhow::Result<()> {
    let test = "a_worker_cut_off_mid_generation_is_noticed_replaced_and_taken_back";
    let Some(hosts) = Hosts::for_test(test, 4)? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let mut workers = Vec::new();
    for (i, host) in WORKER_HOSTS.into_iter().enumerate() {
        workers.push(start_worker(&hosts, host, &format!("worker-{i}"), &model, dir.path()).await?);
    }
    let (coordinator, http) = start_coordinator(&hosts, &model).await?;

    // The coordinator's address exists only in host 1: every request goes from there.
    let measured = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            tokio::time::timeout(RUN_TIMEOUT, cut_and_restore(&hosts, &http, &model)).await.context("the run hung")?
        })
    })??;
    eprintln!(
        "{}: noticed after {:?}, longest client pause {:?}, slowest status while cut off {:?}, \
         holding layers again {:?} after its link came back",
        measured.cut, measured.noticed, measured.longest_pause, measured.slowest_status, measured.back
    );
    coordinator.stop(Duration::from_secs(10)).await;
    for w in workers {
        w.stop(Duration::from_secs(10)).await;
    }
    Ok(())
}

async fn cut_and_restore(hosts: &Hosts, http: &str, model: &Path) -> anyhow::Result<Measured> {
    let before = status(http).await?;
    let middle = middle_stage(&before)?;
    let host = WORKER_HOSTS[middle.trim_start_matches("worker-").parse::<usize>()?];

    let streams = Streams::start(http);
    streams.wait_until_running().await?;
    hosts.set_link(host, false)?;
    let cut = Instant::now();
    let s = wait_for_status(http, "the cut-off worker to be noticed", |s| {
        node(s, &middle).is_ok_and(|n| n["state"] == "gone")
    })
    .await?;
    let noticed = cut.elapsed();
    assert!(noticed < Duration::from_secs(2), "noticed after {noticed:?}: {s}");
    let checked = streams.check(model).await?;
    // A pause of about the detection time, and the replay: not a hang on a
    // connection to the cut-off worker.
    assert!(checked.longest_pause < Duration::from_secs(5), "a client waited {:?}", checked.longest_pause);
    let s = status(http).await?;
    assert!(!holds_layers(&s, &middle), "{s}");
    for name in ["worker-0", "worker-1", "worker-2"].into_iter().filter(|&n| n != middle) {
        assert!(holds_layers(&s, name), "{name} holds no layers after the re-plan: {s}");
    }

    // While it stays unreachable, the coordinator keeps answering at once: asking
    // whether the worker is back must not hold it up.
    let mut slowest = Duration::ZERO;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        status(http).await?;
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(slowest < Duration::from_millis(500), "a status took {slowest:?} while {middle} was cut off");

    hosts.set_link(host, true)?;
    let up = Instant::now();
    wait_for_status(http, "the worker to be taken in again", |s| {
        node(s, &middle).is_ok_and(|n| n["state"] == "ready") && holds_layers(s, &middle)
    })
    .await?;
    let back = up.elapsed();
    // The pipeline it is back in works.
    let prompt = [5u32, 6, 7];
    let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let reply = http::request(http, "POST", "/v1/completions", Some(&body)).await?;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    let (want, _) = reference_completion(model, &prompt, 8)?;
    assert_eq!(reply.json()?["choices"][0]["text"].as_str(), Some(want.as_str()));
    // Nothing of the pipeline it was cut from is left on it: its heartbeats list the
    // shards it holds, and that is the current pipeline's alone.
    let current = pipeline_id(http).await?;
    let address = format!("{}:{GRPC_PORT}", hosts.address(host));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = pipelines_held(hosts.transport(), &address).await?;
        if held == [current] {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{middle} holds pipelines {held:?}, the current one is {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Measured { cut: middle, noticed, longest_pause: checked.longest_pause, slowest_status: slowest, back })
}

/// The name of the worker holding stage 1.
fn middle_stage(status: &Value) -> anyhow::Result<String> {
    let nodes = status["nodes"].as_array().context("no nodes")?;
    let middle = nodes.iter().find(|n| n["stage"] == 1).with_context(|| format!("no stage 1: {status}"))?;
    Ok(middle["name"].as_str().context("a node without a name")?.to_string())
}

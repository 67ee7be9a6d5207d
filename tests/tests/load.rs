//! Issue 9's load test, bounded in count and time and on loopback only: 64 clients
//! stream greedy completions for 60 s against three workers, while the middle worker
//! is drained (at 20 s) and brought back (at 40 s). The coordinator runs 16 of them
//! at once and queues the rest; a request still in line after the queue timeout gets
//! a 429, the only error allowed (and one the clients meet often: the timeout is
//! about as long as the line). Every completed output must equal the undisturbed
//! one for its prompt, the queue must be empty at the end, and the peak memory of
//! every process is printed and bounded.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::http::HttpError;
use strata_tests::admin::{admin, holds_layers, node, status, wait_for_status, wait_until_sequences_at_most};
use strata_tests::streams::{completion_body, prompts, stream_completion, synthetic_model, StreamSpec};
use strata_tests::{reference_completion, ClusterOptions, TestCluster};

/// Clients, each with one request open at a time.
const CLIENTS: usize = 64;
/// Requests the coordinator runs at once: a quarter of the clients, so most of them
/// spend time in line.
const SEQUENCES: usize = 16;
/// Seconds a request may wait in line before its 429. About the wait a request in
/// line sees here (48 ahead of it, 16 running; at most 1.6 s measured with a
/// timeout of 20 s, on two cores), so that the load ends both ways — completions
/// and 429s — and neither may hide an error of the other.
const QUEUE_TIMEOUT_S: u64 = 1;
/// Clients start new requests until then.
const LOAD: Duration = Duration::from_secs(60);
const DRAIN_AT: Duration = Duration::from_secs(20);
const UNDRAIN_AT: Duration = Duration::from_secs(40);
/// The whole load phase, the requests still running at `LOAD` included, ends by then
/// (`LOAD` + a full wait in line + their generation, with room for a slow machine).
const TIME_LIMIT: Duration = Duration::from_secs(150);
/// Tokens a request generates: few, so that many requests complete in a minute, and
/// enough that every drain and undrain finds requests mid-generation.
const MAX_TOKENS: usize = 64;
/// The synthetic model is 6 MiB and every process peaks at about 40 MiB; one holding
/// more than this keeps something per request (thousands of them) or the KV caches
/// of sequences that moved: a leak of 70 KiB a request would pass 256 MiB.
const PEAK_RSS_LIMIT: u64 = 256 << 20;

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Completed {
        text: String,
        tokens: Option<u64>,
    },
    /// Still in line after the queue timeout.
    RateLimited,
    Failed(String),
}

/// One request, as its client saw it.
#[derive(Debug)]
struct Record {
    prompt: usize,
    /// Since the load began.
    started: Duration,
    ended: Duration,
    outcome: Outcome,
}

/// A client: one request after another, prompts in turn, until `LOAD` has passed.
async fn client(addr: String, index: usize, begin: Instant) -> Vec<Record> {
    let prompts = prompts();
    let spec = StreamSpec { max_tokens: MAX_TOKENS, ..StreamSpec::default() };
    let mut records = Vec::new();
    for round in 0.. {
        let started = begin.elapsed();
        if started >= LOAD {
            break;
        }
        // Clients start on different prompts, so every prompt runs beside others
        // of other lengths.
        let prompt = (index + round) % prompts.len();
        let mut body = completion_body(&prompts[prompt], &spec, 0);
        // The usage chunk says how many tokens were generated, for the tokens/s.
        body["stream_options"] = json!({"include_usage": true});
        let outcome = match stream_completion(&addr, &body, || {}).await {
            Ok(seen) if seen.errors.is_empty() => {
                Outcome::Completed { text: seen.text, tokens: seen.completion_tokens }
            }
            Ok(seen) => Outcome::Failed(format!("error events {:?} after {:?}", seen.errors, seen.text)),
            Err(HttpError::Status { status: 429, body }) if body.contains("rate_limit_exceeded") => {
                Outcome::RateLimited
            }
            Err(e) => Outcome::Failed(e.to_string()),
        };
        records.push(Record { prompt, started, ended: begin.elapsed(), outcome });
    }
    records
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// What the status says about admission: (requests in line, requests admitted).
fn admission(s: &Value) -> (usize, usize) {
    let queued = s["admission"]["queue"].as_array().map_or(usize::MAX, Vec::len);
    (queued, s["in_flight"].as_u64().map_or(usize::MAX, |n| n as usize))
}

/// Drains worker 1 at `DRAIN_AT` and brings it back at `UNDRAIN_AT`; how long each
/// took (the drain waits until the worker holds nothing, the undrain until it holds
/// layers again).
async fn drain_and_undrain(addr: &str, begin: Instant) -> anyhow::Result<(Duration, Duration)> {
    tokio::time::sleep_until((begin + DRAIN_AT).into()).await;
    let t = Instant::now();
    let (code, report) = admin(addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    anyhow::ensure!(code == 200 && report["finished"] == true, "drain: HTTP {code}: {report}");
    let drained = t.elapsed();
    eprintln!(
        "{:5.1} s drain took {:.1} s: {}",
        begin.elapsed().as_secs_f64(),
        drained.as_secs_f64(),
        report["message"]
    );
    let s = status(addr).await?;
    anyhow::ensure!(!holds_layers(&s, "worker-1"), "the drained worker still holds layers: {s}");

    tokio::time::sleep_until((begin + UNDRAIN_AT).into()).await;
    let t = Instant::now();
    let (code, reply) = admin(addr, "/admin/undrain", json!({"node": "worker-1"})).await?;
    anyhow::ensure!(code == 200, "undrain: HTTP {code}: {reply}");
    wait_for_status(addr, "the undrained worker to hold layers again", |s| {
        ["worker-0", "worker-1", "worker-2"].iter().all(|n| holds_layers(s, n))
    })
    .await?;
    let undrained = t.elapsed();
    eprintln!("{:5.1} s undrain took {:.1} s", begin.elapsed().as_secs_f64(), undrained.as_secs_f64());
    Ok((drained, undrained))
}

/// What the status showed while the load ran.
#[derive(Debug, Default)]
struct Watched {
    most_admitted: usize,
    longest_line: usize,
    /// The longest any request had waited in line.
    longest_wait_s: f64,
}

/// Polls the status until `stop`.
async fn watch_admission(addr: String, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Watched> {
    let mut watched = Watched::default();
    while !*stop.borrow() {
        let s = status(&addr).await?;
        let (queued, admitted) = admission(&s);
        watched.longest_line = watched.longest_line.max(queued);
        watched.most_admitted = watched.most_admitted.max(admitted);
        let waits =
            s["admission"]["queue"].as_array().into_iter().flatten().filter_map(|q| q["waited_seconds"].as_f64());
        watched.longest_wait_s = waits.fold(watched.longest_wait_s, f64::max);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(watched)
}

#[tokio::test]
async fn sixty_four_clients_through_a_drain_and_an_undrain() -> anyhow::Result<()> {
    let test_began = Instant::now();
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    // The undisturbed outputs, computed before the load: computing one blocks this
    // thread, which the clients share.
    let references =
        prompts().iter().map(|p| reference_completion(&model, p, MAX_TOKENS)).collect::<anyhow::Result<Vec<_>>>()?;

    let serve_args = ["--queue-timeout".to_string(), QUEUE_TIMEOUT_S.to_string()].to_vec();
    let options = ClusterOptions { sequences: SEQUENCES, serve_args, ..ClusterOptions::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);
    let addr = cluster.http().to_string();
    assert_eq!(status(&addr).await?["admission"]["sequences"], SEQUENCES, "the flag given is the limit");

    // Each process's peak so far, to show what the load added.
    let started_at: Vec<u64> = cluster.pids().iter().map(|&(_, pid)| peak_rss(pid)).collect::<anyhow::Result<_>>()?;

    let begin = Instant::now();
    let (stop_watching, watching) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch_admission(addr.clone(), watching));
    let clients: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(client(addr.clone(), i, begin))).collect();
    let run = async {
        let (drained, undrained) = drain_and_undrain(&addr, begin).await?;
        let mut records = Vec::new();
        for c in clients {
            records.extend(c.await?);
        }
        anyhow::Ok((records, drained, undrained))
    };
    let (records, drained, undrained) = tokio::time::timeout(TIME_LIMIT, run)
        .await
        .with_context(|| format!("the load did not end within {TIME_LIMIT:?}"))??;
    let load_took = begin.elapsed();
    stop_watching.send(true)?;
    let watched = watcher.await??;

    // Every request is accounted for: completed with the undisturbed text, or refused
    // with a 429 after waiting in line.
    let failed: Vec<String> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed(e) => Some(format!("prompt {} started at {:.1} s: {e}", r.prompt, r.started.as_secs_f64())),
            _ => None,
        })
        .collect();
    let rate_limited = records.iter().filter(|r| matches!(r.outcome, Outcome::RateLimited)).count();
    let mut completed = 0;
    let mut tokens = 0;
    // Completions that ended before the drain, while worker 1 was away, and after.
    let mut by_phase = [0usize; 3];
    for r in &records {
        let Outcome::Completed { text, tokens: counted } = &r.outcome else {
            continue;
        };
        let (reference, reference_tokens) = &references[r.prompt];
        assert_eq!(text, reference, "prompt {} (started at {:?})", r.prompt, r.started);
        assert_eq!(*counted, Some(*reference_tokens), "prompt {}: usage", r.prompt);
        completed += 1;
        tokens += reference_tokens;
        by_phase[usize::from(r.ended >= DRAIN_AT) + usize::from(r.ended >= UNDRAIN_AT)] += 1;
    }
    let longest = records.iter().map(|r| r.ended - r.started).max().unwrap_or_default();
    eprintln!(
        "{} requests in {:.1} s: {completed} completed ({} before the drain, {} while drained, {} after), \
         {rate_limited} got 429, {} failed; {tokens} tokens, {:.1} tokens/s; longest request {:.1} s; \
         at most {} admitted and {} in line, the longest wait in line {:.1} s; drain {:.1} s, undrain {:.1} s",
        records.len(),
        load_took.as_secs_f64(),
        by_phase[0],
        by_phase[1],
        by_phase[2],
        failed.len(),
        tokens as f64 / load_took.as_secs_f64(),
        longest.as_secs_f64(),
        watched.most_admitted,
        watched.longest_line,
        watched.longest_wait_s,
        drained.as_secs_f64(),
        undrained.as_secs_f64(),
    );
    assert!(failed.is_empty(), "{} requests failed, the first: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let most = watched.most_admitted;
    assert!(most <= SEQUENCES, "{most} requests ran at once, beyond --sequences {SEQUENCES}");
    assert!(by_phase.iter().all(|&n| n > 0), "some phase completed nothing: {by_phase:?}");

    // The queue drains: nothing in line and nothing admitted once the clients are done.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = status(&addr).await?;
        if admission(&s) == (0, 0) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "requests left behind after the load: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = status(&addr).await?;
    assert!(node(&s, "worker-1").is_ok_and(|n| n["state"] == "ready"), "{s}");
    // And no worker keeps the KV caches of requests that ended beyond the planned
    // sequences (the prefix cache keeps finished ones in those no request uses).
    let most = SEQUENCES as u32;
    tokio::time::timeout(Duration::from_secs(5), wait_until_sequences_at_most(cluster.transport(), &cluster.workers, most))
        .await
        .context("workers hold more sequences than planned after the load")??;

    // Peak memory of every process over the whole run.
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    for ((name, pid), before) in cluster.pids().into_iter().zip(started_at) {
        let peak = peak_rss(pid)?;
        eprintln!("{name:12} peak RSS {:5.1} MiB ({:5.1} MiB before the load)", mib(peak), mib(before));
        assert!(peak < PEAK_RSS_LIMIT, "{name} peaked at {peak} bytes");
    }
    cluster.stop().await;
    eprintln!("the test took {:.1} s", test_began.elapsed().as_secs_f64());
    Ok(())
}

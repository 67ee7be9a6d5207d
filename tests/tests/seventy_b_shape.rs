//! Issue 9's 70B-shaped run: a model shaped like Llama 3 70B (hidden 8192, 64 query
//! and 8 KV heads, feed-forward 28672, a 128256-token vocabulary, Q4_0) but with
//! only 3 layers (2.6 GB, written by the test), served by a coordinator in host 1
//! over 3 workers in hosts 2–4 that have no model file and pull their layers from
//! it, every link limited to 1 Gbit/s each way.
//!
//! It prints what an operator would want to see: each worker's pull as it goes
//! (from `GET /admin/status`, which serves while the first pipeline loads), each
//! pull's time, and the decode speed of a greedy completion next to the planner's
//! prediction. It asserts that every worker pulled and holds a stage, that the
//! completion has the tokens asked for, and that there is a positive prediction.
//!
//! Needs root (prints `SKIPPED: ...` and passes otherwise) and about 8 GB of disk
//! under the temp folder (the model, the coordinator's shard files and the
//! workers' caches, all removed at the end); takes a minute or two on 2 cores.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::admin::format_status;
use strata_coordinator::cli::http;
use strata_coordinator::cluster::ClusterStatus;
use strata_model::synthetic::SyntheticModel;
use strata_tests::admin::{node, status};
use strata_tests::netns::{log_level, Hosts};
use strata_tests::{binary, until_serving, READY_TIMEOUT};

const GRPC_PORT: u16 = 7070;
const WORKERS: [(usize, &str); 3] = [(2, "w2"), (3, "w3"), (4, "w4")];
const LINK: &str = "1gbit";
const LINK_BYTES_PER_SECOND: f64 = 125e6;
/// Tokens of the greedy completion whose decode speed is measured.
const MAX_TOKENS: u64 = 16;
/// How long the first load (shard cuts, pulls, loads) may take.
const FIRST_LOAD_LIMIT: Duration = Duration::from_secs(300);

const MB: f64 = 1e6;
/// The model, the coordinator's shard files and the workers' caches (2.6 GB each),
/// with room to spare.
const DISK_NEEDED: u64 = 10_000_000_000;

/// A pull as the status showed it, from its first sighting to its last.
#[derive(Debug)]
struct Pull {
    layers: String,
    first_seen: Instant,
    /// Bytes it held when first seen.
    first_done: u64,
    last_seen: Instant,
    bytes_done: u64,
    bytes_total: u64,
}

impl Pull {
    /// Its speed between the sightings (those a quarter-second apart know neither
    /// its start nor its end better), and so its whole time.
    fn rate_and_seconds(&self) -> (f64, f64) {
        let seen = (self.last_seen - self.first_seen).as_secs_f64();
        let rate = if seen > 0.0 && self.bytes_done > self.first_done {
            (self.bytes_done - self.first_done) as f64 / seen
        } else {
            self.bytes_total as f64 / seen.max(1e-3)
        };
        (rate, self.bytes_total as f64 / rate)
    }
}

/// Polls the status every 250 ms until the first pipeline serves, printing each
/// worker's pull once a second; returns every worker's pull and the final status.
async fn watch_first_load(http: &str, began: Instant) -> anyhow::Result<(BTreeMap<String, Pull>, Value)> {
    let mut pulls: BTreeMap<String, Pull> = BTreeMap::new();
    let mut printed: Option<Instant> = None;
    loop {
        let s = status(http).await?;
        let now = Instant::now();
        for n in s["nodes"].as_array().context("no nodes")? {
            let (Some(name), Some(p)) = (n["name"].as_str(), n["pulls"].as_array().and_then(|p| p.first())) else {
                continue;
            };
            let (done, total) = (p["bytes_done"].as_u64().unwrap_or(0), p["bytes_total"].as_u64().unwrap_or(0));
            let layers = p["layers"].as_array().map_or(String::new(), |l| format!("{}..{}", l[0], l[1]));
            let pull = pulls.entry(name.to_string()).or_insert(Pull {
                layers,
                first_seen: now,
                first_done: done,
                last_seen: now,
                bytes_done: 0,
                bytes_total: total,
            });
            (pull.last_seen, pull.bytes_done, pull.bytes_total) = (now, done, total);
        }
        if printed.is_none_or(|p| now - p >= Duration::from_secs(1)) {
            printed = Some(now);
            for n in s["nodes"].as_array().context("no nodes")? {
                let name = n["name"].as_str().unwrap_or("?");
                let line = match n["pulls"].as_array().and_then(|p| p.first()) {
                    Some(p) => {
                        let (done, total) = (p["bytes_done"].as_f64().unwrap_or(0.0), p["bytes_total"].as_f64());
                        let total = total.unwrap_or(0.0).max(1.0);
                        format!(
                            "layers {}: {:>6.0} of {:>6.0} MB ({:>3.0}%), {:>5.1} MB/s",
                            pulls.get(name).map_or("?", |p| p.layers.as_str()),
                            done / MB,
                            total / MB,
                            100.0 * done / total,
                            p["bytes_per_second"].as_f64().unwrap_or(0.0) / MB
                        )
                    }
                    None if pulls.contains_key(name) => "pulled; loading or loaded".into(),
                    None => "waiting for its shard".into(),
                };
                eprintln!("{:>6.1}s  {name:<3} {line}", began.elapsed().as_secs_f64());
            }
        }
        if !s["pipeline_id"].is_null() {
            return Ok((pulls, s));
        }
        anyhow::ensure!(began.elapsed() < FIRST_LOAD_LIMIT, "no pipeline after {FIRST_LOAD_LIMIT:?}: {s}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A greedy streamed completion of `max_tokens`: its token count, and its decode
/// speed (tokens after the first over the time since the first).
async fn timed_completion(http: &str, max_tokens: u64) -> anyhow::Result<(u64, f64, Duration)> {
    let body = json!({
        "model": "test-model",
        "prompt": "The capital of France is",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let sent = Instant::now();
    let mut token_times = Vec::new();
    let mut completion_tokens = None;
    let mut errors = Vec::new();
    http::post_events(http, "/v1/completions", &body, |e| {
        if e["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            token_times.push(Instant::now());
        }
        if let Some(n) = e["usage"]["completion_tokens"].as_u64() {
            completion_tokens = Some(n);
        }
        if !e["error"].is_null() {
            errors.push(e["error"].to_string());
        }
    })
    .await?;
    anyhow::ensure!(errors.is_empty(), "the completion failed: {errors:?}");
    let n = completion_tokens.context("no usage in the stream")?;
    let (first, last) = (token_times.first().context("no tokens")?, token_times.last().context("no tokens")?);
    let decode = (token_times.len() - 1) as f64 / (*last - *first).as_secs_f64().max(1e-9);
    Ok((n, decode, sent.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seventy_b_shaped_model_pulled_over_gigabit_links() -> anyhow::Result<()> {
    let test = "a_seventy_b_shaped_model_pulled_over_gigabit_links";
    let began = Instant::now();
    // Made before the hosts so it is removed after their processes are gone.
    let dir = tempfile::tempdir()?;
    if let Some(free) = free_bytes(dir.path()).filter(|&f| f < DISK_NEEDED) {
        eprintln!(
            "SKIPPED: {test}: {:.1} GB free in the temp folder, needs {:.0}",
            free as f64 / 1e9,
            DISK_NEEDED as f64 / 1e9
        );
        return Ok(());
    }
    let Some(hosts) = Hosts::for_test(test, 4)? else { return Ok(()) };
    for host in 1..=4 {
        hosts.limit_rate(host, LINK)?;
    }
    let spec = SyntheticModel::seventy_b_shaped(3);
    let model = tokio::task::block_in_place(|| spec.write_to(dir.path()))?;
    let model_bytes = std::fs::metadata(&model)?.len();
    eprintln!(
        "model: {}: {:.2} GB, written in {:.1}s",
        spec.describe(),
        model_bytes as f64 / 1e9,
        began.elapsed().as_secs_f64()
    );

    let http = format!("{}:8000", hosts.address(1));
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
        &http,
        "--min-workers",
        "3",
        // Every worker holds layers: one each.
        "--placement",
        "spread",
        "--no-mdns",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Its shard files (as large as the model) go into the test's folder, removed
    // however the coordinator ends.
    let envs = [("STRATA_LOG", log_level()), ("TMPDIR", dir.path().display().to_string())];
    let serve = [serve, hosts.trust_args()].concat();
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &envs)?;
    coordinator.wait_for_line("coordinator grpc=", READY_TIMEOUT, |_| {}).await?;
    eprintln!("coordinator up (the model hashed) at {:.1}s", began.elapsed().as_secs_f64());
    let cache = dir.path().join("caches");
    let mut workers = Vec::new();
    for (host, name) in WORKERS {
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("{}:{GRPC_PORT}", hosts.address(host)),
            "--join".into(),
            format!("{}:7100", hosts.address(1)),
            "--no-mdns".into(),
        ];
        // Measured, so that the planner predicts from this machine's speed.
        workers.push(hosts.start_measured_worker(host, name, &cache, &args).await?);
    }
    let joined = Instant::now();
    eprintln!("3 workers joined at {:.1}s; the first load:", began.elapsed().as_secs_f64());

    let (pulls, loaded) = tokio::task::block_in_place(|| hosts.block_on(1, watch_first_load(&http, joined)))??;
    let (_, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    eprintln!("serving at {:.1}s", began.elapsed().as_secs_f64());
    for line in &stages {
        eprintln!("  {line}");
    }
    for (_, name) in WORKERS {
        let pull = pulls.get(name).with_context(|| format!("{name} was never seen pulling: {loaded}"))?;
        let (rate, seconds) = pull.rate_and_seconds();
        eprintln!(
            "{name}: pulled layers {} ({:.0} MB) in {seconds:.1}s ({:.0} MB/s), begun {:.1}s after all joined (its shard cut)",
            pull.layers,
            pull.bytes_total as f64 / MB,
            rate / MB,
            (pull.first_seen - joined).as_secs_f64()
        );
        anyhow::ensure!(pull.bytes_total > 0, "{name}'s pull has no size: {pull:?}");
        let n = node(&loaded, name)?;
        anyhow::ensure!(!n["layers"].is_null() && !n["stage"].is_null(), "{name} holds no stage: {loaded}");
    }
    anyhow::ensure!(
        stages.len() == 3 && stages.iter().all(|l| l.contains("pulled")),
        "one stage on each worker, its weights pulled: {stages:?}"
    );
    let total: u64 = pulls.values().map(|p| p.bytes_total).sum();
    let seconds = (pulls.values().map(|p| p.last_seen).max().context("no pulls")?
        - pulls.values().map(|p| p.first_seen).min().context("no pulls")?)
    .as_secs_f64();
    let rate = total as f64 / seconds.max(1e-3);
    eprintln!(
        "all pulls: {:.0} MB in {seconds:.1}s, {:.0} MB/s out of the coordinator's {LINK} link",
        total as f64 / MB,
        rate / MB
    );
    // The pulls share the coordinator's link: together they cannot beat it (20% for
    // the status's quarter-second sightings), or the limit is not in force.
    anyhow::ensure!(rate < 1.2 * LINK_BYTES_PER_SECOND, "{:.0} MB/s through a {LINK} link", rate / MB);

    let (tokens, measured, elapsed, after) = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            // The first request pays for first touches (caches, connections): time the second.
            timed_completion(&http, 4).await?;
            let (tokens, measured, elapsed) = timed_completion(&http, MAX_TOKENS).await?;
            anyhow::Ok((tokens, measured, elapsed, status(&http).await?))
        })
    })??;
    anyhow::ensure!(tokens == MAX_TOKENS, "{tokens} tokens came back, not {MAX_TOKENS}");
    let predicted = after["predicted_tokens_per_second"].as_f64().context("no prediction in the status")?;
    anyhow::ensure!(predicted > 0.0 && predicted.is_finite(), "prediction {predicted}");
    eprintln!(
        "greedy completion of {tokens} tokens in {:.2}s: decode {measured:.2} tokens/s measured, {predicted:.2} predicted by the planner ({:.0}%)",
        elapsed.as_secs_f64(),
        100.0 * measured / predicted
    );
    let table: ClusterStatus = serde_json::from_value(after)?;
    eprint!("{}", format_status(&table));

    coordinator.stop(Duration::from_secs(5)).await;
    drop(workers);
    drop(hosts);
    eprintln!("done in {:.1}s", began.elapsed().as_secs_f64());
    Ok(())
}

/// Bytes free to an unprivileged writer on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value of it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` is a valid statvfs to write into.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

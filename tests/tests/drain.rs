//! Any worker can leave mid-generation and no request is lost: eight streaming
//! greedy requests are in flight across three workers while one is drained, killed,
//! or drained and brought back; every request completes with exactly the tokens
//! an undisturbed run gives. Drains run with each way of moving requests forced
//! (`--move-sequences transfer` and `replay`), and seeded sampled requests moved
//! with their KV caches continue exactly too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_model::SamplingParams;
use strata_tests::{reference_completion_sampled, ClusterOptions, TestCluster};

/// Wide enough that a few hundred tokens take a while, so the requests are still
/// running when the worker leaves.
fn model(dir: &Path) -> PathBuf {
    SyntheticModel { layers: 6, hidden: 256, feed_forward: 1024, context_length: 512, ..SyntheticModel::tiny() }
        .write_to(dir)
        .unwrap()
}

const MAX_TOKENS: usize = 160;

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32).map(|i| (0..(3 + i)).map(|j| (i * 31 + j * 7) % 250 + 1).collect()).collect()
}

/// The text an undisturbed single process gives, decoded as the API streams it.
fn expected(model: &Path, prompt: &[u32], sampling: &SamplingParams) -> anyhow::Result<String> {
    Ok(reference_completion_sampled(model, prompt, MAX_TOKENS, sampling)?.0)
}

/// Seeded sampling with a repetition penalty (which looks back over the whole
/// history), as the API fields and as the sampler's parameters.
fn sampled() -> (Value, SamplingParams) {
    let fields = json!({"temperature": 0.8, "top_k": 40, "repetition_penalty": 1.3, "seed": 7});
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(40),
        repetition_penalty: 1.3,
        seed: 7,
        ..SamplingParams::greedy()
    };
    (fields, params)
}

/// Eight streaming requests, each counting the events it has received.
struct Streams {
    received: Vec<Arc<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<String>>>,
    sampling: SamplingParams,
}

impl Streams {
    fn start(addr: &str) -> Self {
        Self::start_sampling(addr, (json!({"temperature": 0}), SamplingParams::greedy()))
    }

    /// Streams with the API's sampling `fields`, which the sampler reads as `params`.
    fn start_sampling(addr: &str, (fields, params): (Value, SamplingParams)) -> Self {
        let mut received = Vec::new();
        let mut tasks = Vec::new();
        for prompt in prompts() {
            let count = Arc::new(AtomicUsize::new(0));
            received.push(count.clone());
            let addr = addr.to_string();
            let mut body = json!({"model": "test-model", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": true});
            if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
                body.extend(fields.clone());
            }
            tasks.push(tokio::spawn(async move {
                let mut text = String::new();
                http::post_events(&addr, "/v1/completions", &body, |e| {
                    text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
                    count.fetch_add(1, Ordering::Relaxed);
                })
                .await?;
                Ok(text)
            }));
        }
        Self { received, tasks, sampling: params }
    }

    /// Waits until every stream has had a few events (or ended).
    async fn wait_until_running(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.received.iter().zip(&self.tasks).any(|(c, t)| c.load(Ordering::Relaxed) < 3 && !t.is_finished()) {
            anyhow::ensure!(Instant::now() < deadline, "the streams did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Every stream's text equals the undisturbed run's.
    async fn check(self, model: &Path) -> anyhow::Result<()> {
        for (prompt, task) in prompts().iter().zip(self.tasks) {
            let text = tokio::time::timeout(Duration::from_secs(120), task).await.context("a stream hung")???;
            assert_eq!(text, expected(model, prompt, &self.sampling)?, "prompt {prompt:?}");
        }
        Ok(())
    }
}

async fn admin(addr: &str, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let reply = http::request(addr, "POST", path, Some(&body)).await?;
    Ok((reply.status, reply.json()?))
}

async fn status(addr: &str) -> anyhow::Result<Value> {
    let reply = http::request(addr, "GET", "/admin/status", None).await?;
    anyhow::ensure!(reply.status == 200, "status: HTTP {}: {}", reply.status, reply.body);
    Ok(reply.json()?)
}

fn node<'a>(status: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    status["nodes"].as_array().context("no nodes")?.iter().find(|n| n["name"] == name).context("node not listed")
}

/// Polls the status until `check` holds for it.
async fn wait_for_status(addr: &str, what: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(addr).await?;
        if check(&s) {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn holds_layers(s: &Value, name: &str) -> bool {
    node(s, name).is_ok_and(|n| !n["layers"].is_null())
}

async fn start(model: &Path) -> anyhow::Result<TestCluster> {
    start_moving(model, "auto").await
}

/// A cluster that moves requests to a new pipeline as `how` says (`--move-sequences`).
async fn start_moving(model: &Path, how: &str) -> anyhow::Result<TestCluster> {
    let serve_args = ["--queue-timeout", "60", "--move-sequences", how].map(String::from).to_vec();
    let options = ClusterOptions { serve_args, ..ClusterOptions::default() };
    let cluster = TestCluster::start(model, &options).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);
    Ok(cluster)
}

/// How a drain report says the requests moved: (with their KV caches, replayed).
fn moved(report: &Value) -> (u64, u64) {
    let count = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(count("sequences_moved"), count("sequences_transferred") + count("sequences_replayed"), "{report}");
    (count("sequences_transferred"), count("sequences_replayed"))
}

#[tokio::test]
async fn draining_the_middle_worker_loses_nothing_and_frees_its_memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["finished"], true, "{report}");
    assert!(report["memory_freed_bytes"].as_u64().unwrap_or(0) > 0, "{report}");
    // Every request had generated tokens: each moved with its KV cache.
    let (transferred, replayed) = moved(&report);
    assert!(transferred > 0 && replayed == 0, "{report}");
    eprintln!("drain: {}", report["message"]);
    streams.check(&model).await?;
    let s = wait_for_status(&addr, "the drained worker to hold nothing", |s| {
        node(s, "worker-1")
            .is_ok_and(|n| n["state"] == "draining" && n["layers"].is_null() && n["memory_used_bytes"] == 0)
    })
    .await?;
    assert!(holds_layers(&s, "worker-0") && holds_layers(&s, "worker-2"), "{s}");
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn killing_a_worker_mid_generation_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let mut cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let killed = Instant::now();
    cluster.kill_worker(1).await?;
    wait_for_status(&addr, "the killed worker to be noticed", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "gone")
    })
    .await?;
    let noticed = killed.elapsed();
    assert!(noticed < Duration::from_secs(2), "noticed after {noticed:?}");
    streams.check(&model).await?;
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_then_undrain_rebalances_without_losing_anything() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert!(moved(&report).0 > 0, "{report}");
    let (code, reply) = admin(&addr, "/admin/undrain", json!({"node": "worker-1"})).await?;
    assert_eq!(code, 200, "{reply}");
    streams.check(&model).await?;
    let s = status(&addr).await?;
    for name in ["worker-0", "worker-1", "worker-2"] {
        assert!(holds_layers(&s, name), "{name} holds no layers after the undrain: {s}");
    }
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_drains_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let before = status(&addr).await?;

    let (code, e) = admin(&addr, "/admin/drain", json!({"node": "nobody"})).await?;
    assert_eq!(code, 404, "{e}");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("worker-0"), "{e}");
    let (code, e) = admin(&addr, "/admin/drain", json!({"nod": "worker-0"})).await?;
    assert_eq!(code, 400, "{e}");
    let (code, e) = admin(&addr, "/admin/undrain", json!({"node": "worker-0"})).await?;
    assert_eq!(code, 409, "{e}");
    assert_eq!(status(&addr).await?["pipeline_id"], before["pipeline_id"], "a refused command re-planned");

    assert_eq!(admin(&addr, "/admin/drain", json!({"node": "worker-2", "wait": true})).await?.0, 200);
    let (code, e) = admin(&addr, "/admin/drain", json!({"node": "worker-2"})).await?;
    assert_eq!(code, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("already draining"), "{e}");
    assert_eq!(admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?.0, 200);
    // worker-0 is the last one holding layers.
    let pipeline = status(&addr).await?["pipeline_id"].clone();
    let (code, e) = admin(&addr, "/admin/drain", json!({"node": "worker-0"})).await?;
    assert_eq!(code, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("last worker"), "{e}");
    let s = status(&addr).await?;
    assert_eq!(s["pipeline_id"], pipeline);
    assert!(holds_layers(&s, "worker-0"), "{s}");

    // Forced, requests wait with a clear status, and run once a worker is back.
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-0", "force": true, "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["requests_wait"], true, "{report}");
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move {
            let body = json!({"model": "test-model", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0});
            http::request(&addr, "POST", "/v1/completions", Some(&body)).await
        }
    });
    let s = wait_for_status(&addr, "the request to wait", |s| s["waiting"] == 1).await?;
    assert!(s["waiting_reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");
    assert_eq!(admin(&addr, "/admin/undrain", json!({"node": "worker-2"})).await?.0, 200);
    let reply = tokio::time::timeout(Duration::from_secs(60), waiting).await???;
    assert_eq!(reply.status, 200, "{}", reply.body);
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_worker_drains_and_undrains_itself_from_its_own_machine() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let worker = strata_tests::binary("strata-worker")?;
    let run = |verb: &str| {
        std::process::Command::new(&worker).args([verb, "--address", &cluster.workers[1]]).output()
    };
    let out = run("drain")?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = wait_for_status(&addr, "the self-drained worker to hold nothing", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "draining" && n["layers"].is_null())
    })
    .await?;
    assert!(holds_layers(&s, "worker-0") && holds_layers(&s, "worker-2"), "{s}");
    let out = run("undrain")?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_status(&addr, "the worker to hold layers again", |s| holds_layers(s, "worker-1")).await?;
    let prompt = [5u32, 6, 7];
    let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn with_replay_forced_a_drain_replays_every_request_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start_moving(&model, "replay").await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    let (transferred, replayed) = moved(&report);
    assert!(transferred == 0 && replayed > 0, "{report}");
    eprintln!("drain: {}", report["message"]);
    streams.check(&model).await?;
    cluster.stop().await;
    Ok(())
}

/// Sampling is stateless per position, but the repetition penalty reads the whole
/// history: after a KV move the new last stage must know every token, not just the
/// one in the frame that resumes the request.
#[tokio::test]
async fn seeded_sampled_requests_moved_with_their_kv_continue_exactly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start_sampling(&addr, sampled());
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert!(moved(&report).0 > 0, "{report}");
    let (code, reply) = admin(&addr, "/admin/undrain", json!({"node": "worker-1"})).await?;
    assert_eq!(code, 200, "{reply}");
    streams.check(&model).await?;
    cluster.stop().await;
    Ok(())
}

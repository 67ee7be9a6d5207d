//! A worker started with `--yield-to-processes` gives the machine back to its owner:
//! when the watched program starts mid-generation the worker drains itself, its
//! layers move away and its memory is freed, every request still completes with the
//! undisturbed tokens; once the program has exited for `--yield-idle` the worker
//! comes back and holds layers again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::{reference_completion, ClusterOptions, TestCluster};

/// The name the worker yields to: longer than the 15 bytes Linux keeps of a process
/// name, so the worker must find it by its executable.
const GAME: &str = "strata-fake-game";

/// As in drain.rs: wide enough that the requests are still running when the game
/// starts.
fn model(dir: &Path) -> PathBuf {
    SyntheticModel { layers: 6, hidden: 256, feed_forward: 1024, context_length: 512, ..SyntheticModel::tiny() }
        .write_to(dir)
        .unwrap()
}

/// Three times drain.rs's: the worker notices the game within a poll (1 s), and the
/// requests must still be running then (the context holds 512).
const MAX_TOKENS: usize = 480;

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32).map(|i| (0..(3 + i)).map(|j| (i * 31 + j * 7) % 250 + 1).collect()).collect()
}

/// Eight streaming requests, each counting the events it has received.
struct Streams {
    received: Vec<Arc<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<String>>>,
}

impl Streams {
    fn start(addr: &str) -> Self {
        let mut received = Vec::new();
        let mut tasks = Vec::new();
        for prompt in prompts() {
            let count = Arc::new(AtomicUsize::new(0));
            received.push(count.clone());
            let addr = addr.to_string();
            tasks.push(tokio::spawn(async move {
                let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true});
                let mut text = String::new();
                http::post_events(&addr, "/v1/completions", &body, |e| {
                    text.push_str(e["choices"][0]["text"].as_str().unwrap_or(""));
                    count.fetch_add(1, Ordering::Relaxed);
                })
                .await?;
                Ok(text)
            }));
        }
        Self { received, tasks }
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

    fn running(&self) -> usize {
        self.tasks.iter().filter(|t| !t.is_finished()).count()
    }

    /// Every stream's text equals the undisturbed run's.
    async fn check(self, model: &Path) -> anyhow::Result<()> {
        for (prompt, task) in prompts().iter().zip(self.tasks) {
            let text = tokio::time::timeout(Duration::from_secs(120), task).await.context("a stream hung")???;
            assert_eq!(text, reference_completion(model, prompt, MAX_TOKENS)?.0, "prompt {prompt:?}");
        }
        Ok(())
    }
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
    // Generous: the machine running the tests may be busy with others.
    let deadline = Instant::now() + Duration::from_secs(60);
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

/// The "game": a copy of `sleep` under the watched name, killed on drop.
struct FakeGame(Child);

impl FakeGame {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(GAME);
        std::fs::copy("/bin/sleep", &path).context("copying /bin/sleep")?;
        Ok(Self(Command::new(&path).arg("600").spawn().context("starting the fake game")?))
    }

    fn quit(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for FakeGame {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn the_worker_yields_to_a_game_mid_generation_and_comes_back_after_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = model(dir.path());
    let options = ClusterOptions {
        serve_args: vec!["--queue-timeout".into(), "60".into()],
        worker_args: vec![
            vec![],
            vec!["--yield-to-processes".into(), format!("steam.exe,{GAME}.exe"), "--yield-idle".into(), "1s".into()],
        ],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(&model, &options).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);
    let addr = cluster.http().to_string();
    assert!(holds_layers(&status(&addr).await?, "worker-1"));

    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let game = FakeGame::start(dir.path())?;
    wait_for_status(&addr, "the worker to yield", |s| node(s, "worker-1").is_ok_and(|n| n["state"] == "draining"))
        .await?;
    let running = streams.running();
    anyhow::ensure!(
        running > 0,
        "every request had finished before the worker yielded, so none moved mid-generation: raise MAX_TOKENS"
    );
    let s = wait_for_status(&addr, "the yielded worker to hold nothing", |s| {
        node(s, "worker-1")
            .is_ok_and(|n| n["state"] == "draining" && n["layers"].is_null() && n["memory_used_bytes"] == 0)
    })
    .await?;
    eprintln!("yielded with {running} of 8 requests running");
    let reason = node(&s, "worker-1")?["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with(&format!("yielding to {GAME} (pid ")), "{s}");
    assert!(holds_layers(&s, "worker-0") && holds_layers(&s, "worker-2"), "{s}");
    streams.check(&model).await?;

    game.quit();
    let s = wait_for_status(&addr, "the worker to come back and hold layers", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "ready") && holds_layers(s, "worker-1")
    })
    .await?;
    assert!(node(&s, "worker-1")?["reason"].is_null(), "{s}");
    let prompt = [5u32, 6, 7];
    let body = json!({"model": "test-model", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let reply = http::request(&addr, "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    cluster.stop().await;
    Ok(())
}

//! A worker started with `--yield-to-processes` gives the machine back to its owner:
//! when the watched program starts mid-generation the worker drains itself, its
//! layers move away and its memory is freed, every request still completes with the
//! undisturbed tokens; once the program has exited for `--yield-idle` the worker
//! comes back and holds layers again.

use std::path::Path;
use std::process::{Child, Command};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::http;
use strata_tests::admin::{admin, holds_layers, node, status, wait_for_status};
use strata_tests::streams::{synthetic_model, StreamSpec, Streams, MAX_TOKENS};
use strata_tests::{ClusterOptions, TestCluster};

/// The name the worker yields to: longer than the 15 bytes Linux keeps of a process
/// name, so the worker must find it by its executable.
const GAME: &str = "strata-fake-game";

/// `--yield-poll`: well within the requests' time, which local lanes shortened to
/// well under the default second.
const POLL: &str = "50ms";

/// Three times the drain tests': the worker notices the game within a poll
/// ([`POLL`]), and the requests must still be running then (the context holds 512).
const STREAMS: StreamSpec = StreamSpec { max_tokens: 3 * MAX_TOKENS, temperature: None, ..StreamSpec::DEFAULT };

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
    let model = synthetic_model(dir.path())?;
    let options = ClusterOptions {
        serve_args: vec!["--queue-timeout".into(), "60".into()],
        worker_args: vec![
            vec![],
            vec![
                "--yield-to-processes".into(),
                format!("steam.exe,{GAME}.exe"),
                "--yield-idle".into(),
                "1s".into(),
                "--yield-poll".into(),
                POLL.into(),
            ],
        ],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(&model, &options).await?;
    assert_eq!(cluster.stage_lines.len(), 3, "{:?}", cluster.stage_lines);
    let addr = cluster.http().to_string();
    assert!(holds_layers(&status(&addr).await?, "worker-1"));

    let streams = Streams::start_with(&addr, STREAMS);
    streams.wait_until_running().await?;
    let game = FakeGame::start(dir.path())?;
    wait_for_status(&addr, "the worker to yield", |s| node(s, "worker-1").is_ok_and(|n| n["state"] == "draining"))
        .await?;
    let running = streams.running();
    anyhow::ensure!(
        running > 0,
        "every request had finished before the worker yielded, so none moved mid-generation: raise STREAMS.max_tokens"
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

    // `strata drain` while it yields is taken as asked: it stays drained after the
    // game, until undrained.
    let game = FakeGame::start(dir.path())?;
    wait_for_status(&addr, "the worker to yield again", |s| node(s, "worker-1").is_ok_and(|n| n["state"] == "draining"))
        .await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1"})).await?;
    assert_eq!(code, 200, "{report}");
    assert!(report["message"].as_str().unwrap_or_default().contains("stays drained"), "{report}");
    game.quit();
    wait_for_status(&addr, "the yield to end", |s| {
        node(s, "worker-1").is_ok_and(|n| !n["reason"].as_str().unwrap_or_default().contains(GAME))
    })
    .await?;
    let s = status(&addr).await?;
    assert_eq!(node(&s, "worker-1")?["state"], "draining", "the asked drain outlived the game: {s}");
    let (code, reply) = admin(&addr, "/admin/undrain", json!({"node": "worker-1"})).await?;
    assert_eq!(code, 200, "{reply}");
    wait_for_status(&addr, "the undrained worker to hold layers", |s| holds_layers(s, "worker-1")).await?;
    cluster.stop().await;
    Ok(())
}

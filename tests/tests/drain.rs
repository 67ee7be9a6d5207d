//! Any worker can leave mid-generation and no request is lost: eight streaming
//! greedy requests are in flight across three workers while one is drained, killed,
//! or drained and brought back; every request completes with exactly the tokens
//! an undisturbed run gives (greedy, and sampled with a seed). Drains run with each
//! way of moving requests forced (`--move-sequences transfer` and `replay`), and
//! output constrained to a JSON schema moves as exactly as free text.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::http;
use strata_model::{ModelFile, TensorSizes};
use strata_proto::v1;
use strata_tests::admin::{admin, holds_layers, node, status, wait_for_status};
use strata_tests::streams::{prompts, synthetic_model, StreamSpec, Streams, MAX_TOKENS};
use strata_tests::{reference_completion, start_moving, TestCluster};

async fn start(model: &Path) -> anyhow::Result<TestCluster> {
    start_moving(model, "auto").await
}

fn layers_of(status: &Value, name: &str) -> anyhow::Result<Range<usize>> {
    let layers = &node(status, name)?["layers"];
    let bound = |i: usize| layers[i].as_u64().map(|v| v as usize).context("no layers");
    Ok(bound(0)?..bound(1)?)
}

/// The Stats of the worker at `address` (`reset` starts a new window).
async fn worker_stats(cluster: &TestCluster, address: &str, reset: bool) -> anyhow::Result<v1::StatsResponse> {
    Ok(cluster.worker_client(address).await?.stats(v1::StatsRequest { reset }).await?.into_inner())
}

/// Starts a new Stats window on every worker.
async fn reset_stats(cluster: &TestCluster) -> anyhow::Result<()> {
    for worker in &cluster.workers {
        worker_stats(cluster, worker, true).await?;
    }
    Ok(())
}

/// Workers 0 and 2, which survived worker 1 leaving (`before` → `after` statuses),
/// each read only the layers it took over, and its weights peaked at its new stage:
/// never old and new in full.
async fn survivors_loaded_only_what_they_took_over(
    cluster: &TestCluster,
    sizes: &TensorSizes,
    before: &Value,
    after: &Value,
) -> anyhow::Result<()> {
    for (i, name) in [(0, "worker-0"), (2, "worker-2")] {
        let (old, new) = (layers_of(before, name)?, layers_of(after, name)?);
        assert!(new.start <= old.start && old.end <= new.end, "{name}: {old:?} -> {new:?}");
        let added: u64 = new.clone().filter(|l| !old.contains(l)).map(|l| sizes.layers[l]).sum();
        let stats = worker_stats(cluster, &cluster.workers[i], false).await?;
        assert_eq!(stats.weight_loaded_bytes, added, "{name}: {old:?} -> {new:?}");
        assert_eq!(stats.weight_peak_bytes, sizes.stage_bytes(new.clone()), "{name}: {old:?} -> {new:?}");
        assert!(added < sizes.stage_bytes(new), "{name} loaded its whole new range");
    }
    Ok(())
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
    let model = synthetic_model(dir.path())?;
    let sizes = ModelFile::open(&model)?.sizes().clone();
    let cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let before = status(&addr).await?;
    reset_stats(&cluster).await?;
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["finished"], true, "{report}");
    let drained = sizes.stage_bytes(layers_of(&before, "worker-1")?);
    assert!(report["memory_freed_bytes"].as_u64().unwrap_or(0) >= drained, "{report}");
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
    // The survivors kept their layers while the new plan loaded beside the old one:
    // each loaded only the layers it took over, and held the union of its old and
    // new ranges at most, never both in full.
    survivors_loaded_only_what_they_took_over(&cluster, &sizes, &before, &s).await?;
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn killing_a_worker_mid_generation_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let sizes = ModelFile::open(&model)?.sizes().clone();
    let mut cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let before = status(&addr).await?;
    reset_stats(&cluster).await?;
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
    let checked = streams.check(&model).await?;
    eprintln!("kill: longest pause a client saw {:.0} ms", checked.longest_pause.as_secs_f64() * 1e3);
    let s = wait_for_status(&addr, "the survivors to hold every layer", |s| {
        holds_layers(s, "worker-0") && holds_layers(s, "worker-2")
    })
    .await?;
    // The survivors kept their old shards while the new pipeline loaded beside them
    // (the broken one only stopped): each read only the layers it took over.
    survivors_loaded_only_what_they_took_over(&cluster, &sizes, &before, &s).await?;
    cluster.stop().await;
    Ok(())
}

/// `systemctl stop` on a worker mid-generation: it says it is draining at once, the
/// cluster moves off it before it unloads, and every request finishes unchanged.
#[tokio::test]
async fn stopping_a_worker_cleanly_mid_generation_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let mut cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let streams = Streams::start(&addr);
    streams.wait_until_running().await?;
    cluster.terminate_worker(1)?;
    let checked = streams.check(&model).await?;
    eprintln!("longest pause a client saw: {:?}", checked.longest_pause);
    let s = wait_for_status(&addr, "the others to hold the layers", |s| {
        holds_layers(s, "worker-0") && holds_layers(s, "worker-2") && !holds_layers(s, "worker-1")
    })
    .await?;
    eprintln!("{s}");
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_then_undrain_rebalances_without_losing_anything() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
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
    let model = synthetic_model(dir.path())?;
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
    let model = synthetic_model(dir.path())?;
    let cluster = start(&model).await?;
    let addr = cluster.http().to_string();
    let worker = strata_tests::binary("strata-worker")?;
    // With the worker's own certificate, found in its cache folder: it takes this
    // call from itself or the coordinator only.
    let cache = cluster.worker_cache(1).display().to_string();
    let run = |verb: &str| {
        std::process::Command::new(&worker).args([verb, "--address", &cluster.workers[1], "--cache-dir", &cache]).output()
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
    let model = synthetic_model(dir.path())?;
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

/// Sampled outputs with a seed continue exactly across a drain (moved with their KV
/// caches) and a killed worker (replayed): the sampler is a pure function of the
/// seed, the position and the history, all of which travel with the request. The
/// repetition penalty reads the whole history, so after a KV move the new last
/// stage must know every token, not just the one in the frame that resumes it.
#[tokio::test]
async fn seeded_sampled_outputs_survive_a_drain_and_a_kill_unchanged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let mut cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let sampled = StreamSpec { temperature: Some(0.9), repetition_penalty: Some(1.3), ..StreamSpec::default() };

    let undisturbed = Streams::start_with(&addr, sampled).finish().await?.texts;
    let greedy = reference_completion(&model, &prompts()[0], MAX_TOKENS)?.0;
    assert_ne!(undisturbed[0], greedy, "the requests are sampled, not greedy");

    unchanged_after_a_drain_and_a_kill(&mut cluster, sampled, &undisturbed).await?;
    cluster.stop().await;
    Ok(())
}

/// Eight streams as `spec` says give `undisturbed` while worker-1 is drained (each
/// request moved with its KV cache), and again while worker-2 is killed (replayed).
async fn unchanged_after_a_drain_and_a_kill(
    cluster: &mut TestCluster,
    spec: StreamSpec,
    undisturbed: &[String],
) -> anyhow::Result<()> {
    let addr = cluster.http().to_string();
    let streams = Streams::start_with(&addr, spec);
    streams.wait_until_running().await?;
    let (code, report) = admin(&addr, "/admin/drain", json!({"node": "worker-1", "wait": true})).await?;
    assert_eq!(code, 200, "{report}");
    assert!(moved(&report).0 > 0, "{report}");
    assert_eq!(streams.finish().await?.texts, undisturbed, "after a drain");

    let streams = Streams::start_with(&addr, spec);
    streams.wait_until_running().await?;
    cluster.kill_worker(2).await?;
    assert_eq!(streams.finish().await?.texts, undisturbed, "after a killed worker");
    Ok(())
}

/// Documents long enough to be mid-generation when the cluster is disturbed: a note
/// of 100 to 110 letters and spaces, and a digit.
const LONG_DOCUMENT: &str = r#"{"type": "json_schema", "json_schema": {"name": "note", "strict": true, "schema": {
    "type": "object",
    "properties": {
        "note": {"type": "string", "pattern": "^[a-z ]{100,110}$"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}
    },
    "required": ["note", "n"],
    "additionalProperties": false
}}}"#;

/// Output constrained to a JSON schema continues exactly across a drain (moved with
/// its KV cache) and a killed worker (replayed): the new last stage's parser catches
/// up on the tokens generated so far, so it masks exactly as the old one would have.
#[tokio::test]
async fn constrained_outputs_survive_a_drain_and_a_kill_unchanged_and_valid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synthetic_model(dir.path())?;
    let mut cluster = start_moving(&model, "transfer").await?;
    let addr = cluster.http().to_string();
    let spec = StreamSpec { temperature: Some(1.0), response_format: Some(LONG_DOCUMENT), ..StreamSpec::default() };

    let undisturbed = Streams::start_with(&addr, spec).finish().await?.texts;
    for text in &undisturbed {
        let document: Value = serde_json::from_str(text).with_context(|| format!("not JSON: {text:?}"))?;
        let note = document["note"].as_str().context("no note")?;
        assert!(
            (100..=110).contains(&note.len()) && note.bytes().all(|b| b == b' ' || b.is_ascii_lowercase()),
            "{text}"
        );
        assert!(document["n"].as_u64().is_some_and(|n| n <= 9), "{text}");
        assert_eq!(document.as_object().map(|o| o.len()), Some(2), "{text}");
    }

    unchanged_after_a_drain_and_a_kill(&mut cluster, spec, &undisturbed).await?;
    cluster.stop().await;
    Ok(())
}

//! The dashboard at `/`, driven in headless Chromium (Debian's `chromium`, which
//! `.ci/run` installs; SKIPPED where it is missing) by `tests/dashboard/drive.py`
//! over the DevTools protocol: a 3-worker cluster with an admin key; the page asks
//! for the key, shows the 3 nodes and the layer map; a click on one node's drain
//! button drains it and the layer map changes; the chat box streams an answer; the
//! page fits a phone's width. The screenshots go to `STRATA_SCREENSHOT_DIR` when it
//! is set (the README's come from there).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_tests::{ClusterOptions, TestCluster};

const ADMIN_KEY: &str = "dashboard-test-admin-key";
const LAYERS: u64 = 6;

fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STRATA_CHROMIUM") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The segments of a layer map as the driver read them: (node, start, end).
fn segments(map: &Value) -> Vec<(String, u64, u64)> {
    map.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s[0].as_str()?.to_string(), s[1].as_u64()?, s[2].as_u64()?)))
        .collect()
}

/// Whether the segments cover layers 0 to LAYERS, one after another.
fn covers_every_layer(segments: &[(String, u64, u64)]) -> bool {
    let mut next = 0;
    segments.iter().all(|(_, start, end)| {
        let contiguous = *start == next;
        next = *end;
        contiguous
    }) && next == LAYERS
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 10_000)
}

#[tokio::test]
async fn the_dashboard_shows_the_cluster_drains_a_node_on_a_click_and_streams_a_chat() -> anyhow::Result<()> {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED: the dashboard in headless Chromium: no chromium on PATH (apt-get install chromium)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: LAYERS as usize, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let options = ClusterOptions { serve_args: vec!["--admin-key".into(), ADMIN_KEY.into()], ..Default::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    let addr = cluster.http().to_string();

    // The page itself needs no key; what it shows does.
    let page = http::request(&addr, "GET", "/", None).await?;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("/dashboard.js"), "{}", page.body);

    let out = match std::env::var_os("STRATA_SCREENSHOT_DIR") {
        Some(d) => PathBuf::from(d),
        None => dir.path().to_path_buf(),
    };
    std::fs::create_dir_all(&out)?;
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/drive.py");
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(&driver)
        .arg(&chromium)
        .arg(format!("http://{addr}/"))
        .args(["--key", ADMIN_KEY, "--drain", "worker-1", "--out"])
        .arg(&out)
        .kill_on_drop(true);
    let run = tokio::time::timeout(std::time::Duration::from_secs(240), command.output())
        .await
        .context("the dashboard driver ran over 4 minutes")??;
    let stderr = String::from_utf8_lossy(&run.stderr);
    anyhow::ensure!(run.status.success(), "drive.py failed: {stderr}");
    let seen: Value = serde_json::from_slice(&run.stdout).with_context(|| format!("drive.py printed: {stderr}"))?;

    assert!(seen["asked_for_key"].as_str().is_some_and(|why| !why.is_empty()), "{seen}");
    let nodes: Vec<(String, String)> = serde_json::from_value(seen["nodes"].clone())?;
    assert_eq!(nodes.len(), 3, "{seen}");
    assert!(nodes.iter().all(|(_, state)| state == "ready"), "{seen}");

    let links = seen["links"].as_array().map_or(0, Vec::len);
    assert!(links >= 2, "each stage's link to the next: {seen}");
    let before = segments(&seen["map_before"]);
    assert_eq!(before.len(), 3, "a segment per worker: {seen}");
    assert!(covers_every_layer(&before), "{seen}");
    let after = segments(&seen["map_after"]);
    assert!(covers_every_layer(&after), "{seen}");
    assert!(after.iter().all(|(node, _, _)| node != "worker-1"), "{seen}");
    assert_ne!(before, after, "{seen}");

    assert_eq!(seen["chat"], "done", "{seen}");
    assert!(seen["answer_chunks"].as_u64().is_some_and(|n| n >= 2), "the answer came in pieces: {seen}");
    assert!(seen["phone_overflow_px"].as_i64().is_some_and(|px| px <= 0), "nothing wider than a phone: {seen}");
    for shot in ["dashboard-desktop.png", "dashboard-phone.png"] {
        assert!(is_png(&out.join(shot)), "{shot}");
    }

    // The click went through the admin API: the coordinator says so too.
    let status = http::request_with_key(&addr, "GET", "/admin/status", None, Some(ADMIN_KEY)).await?.json()?;
    let drained = status["nodes"].as_array().into_iter().flatten().find(|n| n["name"] == "worker-1");
    assert_eq!(drained.map(|n| n["state"].clone()), Some("draining".into()), "{status}");
    cluster.stop().await;
    Ok(())
}

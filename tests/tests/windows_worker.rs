//! The Windows worker, built by `scripts/windows-check` and run under Wine beside
//! Linux processes on 127.0.0.1: its commands answer, it serves a pipeline stage of
//! a Linux coordinator with exactly the tokens of one process, `strata-worker
//! drain` typed at the "Windows machine" reaches it, it yields to a Windows "game",
//! and it installs, runs and stops as a service under Wine's service manager.
//!
//! They need Wine and the Windows build (`scripts/windows-check` makes both; CI runs
//! it first) and print `SKIPPED: ...` and pass without them. The tests share one
//! Wine prefix, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use anyhow::Context;
use strata_model::synthetic::SyntheticModel;
use strata_tests::admin::{holds_layers, node, status, wait_for_status};
use strata_tests::streams::{synthetic_model, StreamSpec, Streams, MAX_TOKENS};
use strata_tests::wine::Wine;
use strata_tests::{complete, reference_completion, ClusterOptions, TestCluster};

/// One Wine prefix, one test at a time: its processes and its service manager are
/// shared.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn wine_or_skip(test: &str) -> Option<Wine> {
    match Wine::find() {
        Ok(wine) => Some(wine),
        Err(why) => {
            eprintln!("SKIPPED: {test}: {why}");
            None
        }
    }
}

/// The model: the real one the test script fetches, else a small random one.
fn model(dir: &Path) -> anyhow::Result<PathBuf> {
    match std::env::var_os("STRATA_TEST_MODEL") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir)?),
    }
}

/// Runs the Windows worker with `args`; its stdout, or an error with both outputs.
fn run_ok(wine: &Wine, args: &[&str]) -> anyhow::Result<String> {
    let output = wine.run_worker(args)?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(
        output.status.success(),
        "strata-worker.exe {args:?}: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// Worker 1 of a two-worker cluster runs under Wine.
fn with_windows_worker(wine: &Wine, flags: Vec<String>) -> ClusterOptions {
    ClusterOptions {
        workers: 2,
        worker_args: vec![vec![], flags],
        worker_launchers: vec![None, Some(wine.worker_launcher())],
        ..ClusterOptions::default()
    }
}

#[tokio::test]
async fn the_windows_worker_serves_a_stage_of_a_linux_coordinator_and_drains_from_its_console() -> anyhow::Result<()> {
    let test = "the_windows_worker_serves_a_stage_of_a_linux_coordinator_and_drains_from_its_console";
    let Some(wine) = wine_or_skip(test) else { return Ok(()) };
    let _turn = ONE_AT_A_TIME.lock().await;

    let help = run_ok(&wine, &["--help"])?;
    for expected in ["strata-worker", "service", "--yield-to-fullscreen", "--yield-to-processes"] {
        assert!(help.contains(expected), "--help lacks {expected}: {help}");
    }
    let devices: serde_json::Value = serde_json::from_str(&run_ok(&wine, &["devices", "--json", "--no-bench"])?)?;
    assert_eq!(devices["device"]["device"], "cpu", "{devices}");
    assert!(devices["offer"]["offered_bytes"].as_u64().unwrap_or(0) > 0, "{devices}");

    let dir = tempfile::tempdir()?;
    let model = model(dir.path())?;
    let cluster = TestCluster::start(&model, &with_windows_worker(&wine, vec![])).await?;
    let addr = cluster.http().to_string();
    let s = status(&addr).await?;
    assert!(holds_layers(&s, "worker-0") && holds_layers(&s, "worker-1"), "{s}");
    let prompt = [1u32, 422, 3575, 282, 4649, 314];
    let expected = reference_completion(&model, &prompt, 16)?;
    assert_eq!(complete(&addr, &prompt, 16).await?, expected, "through the Windows stage");

    // Typed at the Windows machine: its worker leaves, the Linux one takes over.
    let windows_worker = cluster.workers[1].clone();
    // With the worker's own certificate, kept in its cache folder.
    let cache = cluster.worker_cache(1).display().to_string();
    let said = run_ok(&wine, &["drain", "--address", &windows_worker, "--cache-dir", &cache])?;
    assert!(said.contains("is draining"), "{said}");
    wait_for_status(&addr, "the Windows worker to hold nothing", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "draining" && n["layers"].is_null())
    })
    .await?;
    assert_eq!(complete(&addr, &prompt, 16).await?, expected, "on the Linux worker alone");
    let said = run_ok(&wine, &["undrain", "--address", &windows_worker, "--cache-dir", &cache])?;
    assert!(said.contains("back in service"), "{said}");
    wait_for_status(&addr, "the Windows worker to hold layers again", |s| holds_layers(s, "worker-1")).await?;
    assert_eq!(complete(&addr, &prompt, 16).await?, expected, "through the Windows stage again");
    cluster.stop().await;
    Ok(())
}

/// A Windows program under Wine (a stand-in game), killed on drop.
struct WindowsProgram(Child);

impl WindowsProgram {
    fn start(wine: &Wine, exe: &Path) -> anyhow::Result<Self> {
        let child = wine.command(exe, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Self(child))
    }
}

impl Drop for WindowsProgram {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_windows_worker_yields_to_a_windows_game_and_comes_back() -> anyhow::Result<()> {
    let test = "the_windows_worker_yields_to_a_windows_game_and_comes_back";
    let Some(wine) = wine_or_skip(test) else { return Ok(()) };
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    let game = wine.build_sleeper(dir.path(), "game.exe")?;
    let model = synthetic_model(dir.path())?;
    let flags = vec!["--yield-to-processes".into(), "Game.exe".into(), "--yield-idle".into(), "2s".into()];
    let mut options = with_windows_worker(&wine, flags);
    options.serve_args = vec!["--queue-timeout".into(), "60".into()];
    let cluster = TestCluster::start(&model, &options).await?;
    let addr = cluster.http().to_string();
    assert!(holds_layers(&status(&addr).await?, "worker-1"));

    let spec = StreamSpec { max_tokens: 3 * MAX_TOKENS, temperature: None, ..StreamSpec::DEFAULT };
    let streams = Streams::start_with(&addr, spec);
    streams.wait_until_running().await?;
    let playing = WindowsProgram::start(&wine, &game)?;
    let s = wait_for_status(&addr, "the Windows worker to yield and hold nothing", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "draining" && n["layers"].is_null())
    })
    .await?;
    let reason = node(&s, "worker-1")?["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("yielding to game.exe (pid "), "{s}");
    streams.check(&model).await?;

    drop(playing);
    let s = wait_for_status(&addr, "the Windows worker to come back and hold layers", |s| {
        node(s, "worker-1").is_ok_and(|n| n["state"] == "ready") && holds_layers(s, "worker-1")
    })
    .await?;
    assert!(node(&s, "worker-1")?["reason"].is_null(), "{s}");
    Streams::start_with(&addr, spec).check(&model).await?;
    cluster.stop().await;
    Ok(())
}

/// Uninstalls the service however the test ends.
struct Installed<'a>(&'a Wine);

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = self.0.run_worker(&["service", "uninstall"]);
    }
}

#[tokio::test]
async fn the_windows_worker_installs_runs_and_stops_as_a_service() -> anyhow::Result<()> {
    let test = "the_windows_worker_installs_runs_and_stops_as_a_service";
    let Some(wine) = wine_or_skip(test) else { return Ok(()) };
    let _turn = ONE_AT_A_TIME.lock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    // No coordinator here to enrol it: plain TCP, so `drain` reaches it without a
    // certificate.
    let flags = ["--listen", &listen, "--no-mdns", "--no-bench", "--threads", "1", "--name", "gaming-pc", "--insecure"];

    let bad = wine.run_worker(&["service", "install", "--threads", "0"])?;
    assert!(!bad.status.success(), "bad flags were stored");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--threads"), "{bad:?}");

    let mut install = vec!["service", "install"];
    install.extend(flags);
    let said = run_ok(&wine, &install)?;
    let _installed = Installed(&wine);
    assert!(said.contains("installed the service strata-worker"), "{said}");
    let said = run_ok(&wine, &["service", "start"])?;
    assert!(said.contains("is running"), "{said}");

    // `drain` with no address finds the service's port in its stored flags.
    let said = run_ok(&wine, &["drain"])?;
    assert!(said.contains(&format!("the worker at 127.0.0.1:{port} is draining")), "{said}");
    let said = run_ok(&wine, &["undrain"])?;
    assert!(said.contains("back in service"), "{said}");

    // (Whether it then stays stopped Wine cannot show: it ends its services with
    // its server a few seconds after the last other Windows process, and starts the
    // automatic ones again with the next command. The log shows the stop.)
    let said = run_ok(&wine, &["service", "stop"])?;
    assert!(said.contains("is stopped"), "{said}");

    let log = wine.prefix.join("drive_c/ProgramData/strata/logs/worker.log");
    let text = std::fs::read_to_string(&log).with_context(|| format!("no log at {}", log.display()))?;
    for expected in ["the strata-worker service starts", "worker listening", "the service manager asks the worker to stop"] {
        assert!(text.contains(expected), "the log lacks {expected:?}:\n{text}");
    }
    let said = run_ok(&wine, &["service", "uninstall"])?;
    assert!(said.contains("removed the service strata-worker"), "{said}");
    let gone = wine.run_worker(&["service", "start"])?;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is not installed"), "{gone:?}");
    Ok(())
}

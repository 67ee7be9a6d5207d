//! mDNS discovery across hosts made of network namespaces (`strata_tests::netns`):
//! a cluster that forms with no address given, a worker's advertisement as
//! avahi-browse sees it, and workers and coordinators beside avahi-daemon.
//!
//! These tests need root (they print `SKIPPED: ...` and pass otherwise); the avahi
//! ones need avahi-daemon, avahi-utils and dbus (`.ci/run` installs them).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_discovery::{
    Advertisement, Advertiser, AdvertiserOptions, Browser, BrowserOptions, ClusterTag, DeviceSummary, Error, Event,
    NodeState,
};
use strata_model::{ModelFile, Tokenizer};
use strata_tests::netns::{avahi_missing, log_level, AvahiOptions, Hosts};
use strata_tests::{binary, real_model, reference_completion, until_serving};

const GRPC_PORT: u16 = 7070;

/// A worker in `host` of the mDNS cluster `cluster`, listening on every address
/// (so it advertises the host's).
async fn start_worker(
    hosts: &Hosts,
    host: usize,
    name: &str,
    port: u16,
    cluster: &str,
    cache: &Path,
    extra: &[&str],
) -> anyhow::Result<Process> {
    let mut args: Vec<String> =
        vec!["--listen".into(), format!("0.0.0.0:{port}"), "--cluster".into(), cluster.into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    hosts.start_worker(host, name, cache, &args).await
}

/// Hosts for a test that runs avahi-daemon; `None` after a `SKIPPED` line when
/// avahi is not installed or namespaces cannot be made.
fn hosts_with_avahi(test: &str, count: usize) -> anyhow::Result<Option<Hosts>> {
    if let Some(missing) = avahi_missing() {
        eprintln!("SKIPPED: {test}: {missing} not installed (apt-get install avahi-daemon avahi-utils dbus)");
        return Ok(None);
    }
    Hosts::for_test(test, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_found_over_mdns_form_a_cluster_and_a_stopped_one_is_noticed() -> anyhow::Result<()> {
    let test = "workers_found_over_mdns_form_a_cluster_and_a_stopped_one_is_noticed";
    let Some(model) = real_model() else { return Ok(()) };
    let Some(hosts) = Hosts::for_test(test, 3)? else { return Ok(()) };
    let cache = tempfile::tempdir()?;
    let cluster = "mdns-test";
    let http_listen = format!("{}:8000", hosts.address(1));
    let serve: Vec<String> = [
        "--threads",
        "1",
        "serve",
        "--model",
        &model.display().to_string(),
        "--model-id",
        "test-model",
        "--min-workers",
        "2",
        "--grpc-listen",
        "0.0.0.0:7100",
        "--http-listen",
        &http_listen,
        "--cluster",
        cluster,
        // Both workers hold layers, though one could hold them all.
        "--placement",
        "spread",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let serve = [serve, hosts.trust_args()].concat();
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &[("STRATA_LOG", log_level())])?;
    // w2 is also told the coordinator's address: found over mDNS and joined, it
    // must still be one node.
    let coordinator_grpc = format!("{}:7100", hosts.address(1));
    let model_arg = model.display().to_string();
    let w2_args = ["--model", &model_arg, "--join", &coordinator_grpc];
    let _w2 = start_worker(&hosts, 2, "w2", GRPC_PORT, cluster, cache.path(), &w2_args).await?;
    let w3 = start_worker(&hosts, 3, "w3", GRPC_PORT, cluster, cache.path(), &["--model", &model_arg]).await?;
    // Beside w3, a worker of another cluster that the coordinator must not take.
    let _other = start_worker(&hosts, 3, "other", GRPC_PORT + 1, "another-cluster", cache.path(), &[]).await?;

    let (ready, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    let placed: BTreeSet<String> =
        stages.iter().filter_map(|l| l.split_whitespace().nth(5).map(str::to_string)).collect();
    let expected: BTreeSet<String> = [2, 3].iter().map(|&h| format!("{}:{GRPC_PORT}", hosts.address(h))).collect();
    assert_eq!(placed, expected, "{stages:?}");

    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model)?.metadata())?;
    let prompt = tokenizer.encode("The capital of France is")?;
    let (want, _) = reference_completion(&model, &prompt, 12)?;
    let body = json!({"model": "test-model", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    // The coordinator's address exists only in host 1: ask from there.
    let reply = tokio::task::block_in_place(|| {
        hosts.block_on(1, http::request(&http, "POST", "/v1/completions", Some(&body)))
    })??;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    assert_eq!(reply.json()?["choices"][0]["text"].as_str(), Some(want.as_str()));

    // A worker that stops is noticed within a few seconds, in `GET /admin/status`
    // (the lead's contract: `{"nodes":[{"name", "address", "state", ...}]}`, a live
    // worker "ready" or "serving"; a stopped one is left out or in another state).
    let w3_address = format!("{}:{GRPC_PORT}", hosts.address(3));
    let w3_live = move |status: &serde_json::Value| -> anyhow::Result<bool> {
        let nodes = status["nodes"].as_array().context("no nodes in /admin/status")?;
        Ok(nodes.iter().any(|n| {
            (n["address"] == w3_address.as_str() || n["name"] == "w3")
                && (n["state"] == "ready" || n["state"] == "serving")
        }))
    };
    let status = |http: String| async move {
        let reply = http::request(&http, "GET", "/admin/status", None).await?;
        anyhow::ensure!(reply.status == 200, "GET /admin/status: HTTP {}: {}", reply.status, reply.body);
        anyhow::Ok(reply.json()?)
    };
    let before = tokio::task::block_in_place(|| hosts.block_on(1, status(http.clone())))??;
    anyhow::ensure!(w3_live(&before)?, "w3 is not live before it stops: {before}");
    let names: Vec<&str> =
        before["nodes"].as_array().context("no nodes")?.iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["w2", "w3"], "each worker is listed once: {before}");
    w3.stop(Duration::from_secs(10)).await;
    let stopped = Instant::now();
    let noticed = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            loop {
                let now = status(http.clone()).await?;
                if !w3_live(&now)? {
                    return anyhow::Ok(stopped.elapsed());
                }
                anyhow::ensure!(
                    stopped.elapsed() < Duration::from_secs(5),
                    "w3 still live 5 s after it stopped: {now}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })??;
    eprintln!("the stopped worker was noticed after {noticed:?}");
    Ok(())
}

/// The README's multi-host flow exactly as it is written, with default flags
/// (issue 9): a coordinator bound to every address (`--grpc-listen` left at
/// `0.0.0.0:7100`), two workers on other hosts given no address and no model file.
/// They are found over mDNS, pull their layers from the coordinator at an address
/// they can reach (not its loopback), and a completion comes back right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_multi_host_flow_works_with_default_flags() -> anyhow::Result<()> {
    let test = "the_readme_multi_host_flow_works_with_default_flags";
    let Some(model) = real_model() else { return Ok(()) };
    let Some(hosts) = Hosts::for_test(test, 3)? else { return Ok(()) };
    let cache = tempfile::tempdir()?;
    let model_arg = model.display().to_string();
    // `strata serve --model M --http-listen 0.0.0.0:8000 --min-workers 2`, with one
    // compute thread (this machine's 2 cores are shared by three processes).
    let serve: Vec<String> =
        ["--threads", "1", "serve", "--model", &model_arg, "--http-listen", "0.0.0.0:8000", "--min-workers", "2"]
            .into_iter()
            .map(String::from)
            .collect();
    let serve = [serve, hosts.trust_args()].concat();
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &[("STRATA_LOG", log_level())])?;
    // `strata-worker` with no address and no model (the helper adds only a name,
    // one thread, a cache folder of its own and no start-up benchmark).
    let default_cluster = strata_discovery::DEFAULT_CLUSTER;
    let _w2 = start_worker(&hosts, 2, "w2", GRPC_PORT, default_cluster, cache.path(), &[]).await?;
    let _w3 = start_worker(&hosts, 3, "w3", GRPC_PORT, default_cluster, cache.path(), &[]).await?;

    let (ready, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    anyhow::ensure!(!stages.is_empty(), "no stage loaded: {ready}");
    for line in &stages {
        anyhow::ensure!(line.contains("weights pulled"), "every stage pulls its layers: {stages:?}");
        anyhow::ensure!(!line.contains("127.0.0.1"), "a stage on another host: {stages:?}");
    }
    let http = format!("{}:8000", hosts.address(1));
    let tokenizer = Tokenizer::from_gguf(ModelFile::open(&model)?.metadata())?;
    let prompt = tokenizer.encode("The capital of France is")?;
    let (want, _) = reference_completion(&model, &prompt, 12)?;
    let reply = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            let models = http::request(&http, "GET", "/v1/models", None).await?.json()?;
            let id = models["data"][0]["id"].as_str().context("no model in /v1/models")?.to_string();
            let body = json!({"model": id, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
            anyhow::Ok(http::request(&http, "POST", "/v1/completions", Some(&body)).await?)
        })
    })??;
    anyhow::ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
    assert_eq!(reply.json()?["choices"][0]["text"].as_str(), Some(want.as_str()));
    eprintln!("stages: {stages:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avahi_browse_sees_a_worker_advertisement() -> anyhow::Result<()> {
    let Some(hosts) = hosts_with_avahi("avahi_browse_sees_a_worker_advertisement", 2)? else { return Ok(()) };
    let cache = tempfile::tempdir()?;
    let avahi = hosts.start_avahi(1, AvahiOptions::default())?;
    let _worker = start_worker(&hosts, 2, "wb", GRPC_PORT, "lab", cache.path(), &[]).await?;

    // `avahi-browse -p` prints resolved services as
    // `=;IFACE;IPv4;NAME;TYPE;DOMAIN;HOST;ADDRESS;PORT;"k=v" "k=v" ...`.
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let out = hosts
            .command(1, Path::new("avahi-browse"), &["--resolve", "--terminate", "--parsable", "_strata._tcp"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", avahi.bus_address())
            .output()
            .context("running avahi-browse")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = stdout.lines().find(|l| l.starts_with("=;") && l.split(';').nth(3) == Some("wb")) {
            break line.to_string();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "avahi-browse never resolved the worker: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let fields: Vec<&str> = line.splitn(10, ';').collect();
    assert_eq!(fields[4], "_strata._tcp", "{line}");
    assert!(fields[6].starts_with("strata-") && fields[6].ends_with(".local"), "our own host name: {line}");
    assert_eq!(fields[7], hosts.address(2).to_string(), "{line}");
    assert_eq!(fields[8], GRPC_PORT.to_string(), "{line}");
    let txt = fields[9];
    for pair in [format!("cluster={}", ClusterTag::of("lab")), "state=idle".into(), format!("port={GRPC_PORT}")] {
        assert!(txt.contains(&format!("\"{pair}\"")), "{pair} in {txt}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_browsers_beside_avahi_still_find_each_other() -> anyhow::Result<()> {
    let Some(hosts) = hosts_with_avahi("workers_and_browsers_beside_avahi_still_find_each_other", 3)? else {
        return Ok(());
    };
    let cache = tempfile::tempdir()?;
    // avahi first everywhere, so ours is the second stack to bind port 5353.
    let _avahi1 = hosts.start_avahi(1, AvahiOptions::default())?;
    let _avahi2 = hosts.start_avahi(2, AvahiOptions::default())?;
    let _avahi3 = hosts.start_avahi(3, AvahiOptions { exclusive: true })?;
    let _worker = start_worker(&hosts, 2, "w2", GRPC_PORT, "lab", cache.path(), &[]).await?;

    // A browser beside avahi in host 1 finds the worker beside avahi in host 2.
    let options = BrowserOptions { cluster: ClusterTag::of("lab"), interfaces: Vec::new(), ipv6: false };
    let found = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            let mut browser = Browser::start(options.clone())?;
            let event = tokio::time::timeout(Duration::from_secs(30), browser.next()).await;
            browser.shutdown().await?;
            anyhow::Ok(event)
        })
    })??;
    let Ok(Some(event @ Event::Resolved { .. })) = found else {
        anyhow::bail!("the worker was not resolved within 30 s: {found:?}");
    };
    assert_eq!(event.instance(), "w2");
    assert_eq!(event.grpc_address(), Some((hosts.address(2), GRPC_PORT).into()));

    // An avahi that holds the port alone is named, not silently talked past.
    let advertisement = advertisement("n3", NodeState::Idle);
    let (advertiser, browser) = tokio::task::block_in_place(|| {
        hosts.block_on(3, async {
            let instance = AdvertiserOptions { instance: "w3".into(), ..Default::default() };
            (Advertiser::start(instance, advertisement).map(drop), Browser::start(options).map(drop))
        })
    })?;
    for result in [advertiser, browser] {
        match result {
            Err(Error::PortTaken { port: 5353, .. }) => {}
            other => anyhow::bail!("expected the mDNS port to be reported taken, got {other:?}"),
        }
    }
    Ok(())
}

/// What a worker advertises in the tests that run an [`Advertiser`] in-process.
fn advertisement(node_id: &str, state: NodeState) -> Advertisement {
    Advertisement {
        protocol_version: strata_proto::PROTOCOL_VERSION,
        node_id: node_id.into(),
        grpc_port: GRPC_PORT,
        devices: DeviceSummary::default(),
        memory_offered_bytes: 0,
        speed: 0,
        state,
        cluster: ClusterTag::of("lab"),
    }
}

/// Regression: an update sent while the name was still being probed reached the
/// probe through multicast loop and renamed the instance `w2 (2)`, `w2 (3)`, ...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_right_after_start_keeps_the_instance_name() -> anyhow::Result<()> {
    let Some(hosts) = Hosts::for_test("an_update_right_after_start_keeps_the_instance_name", 2)? else {
        return Ok(());
    };
    let options = BrowserOptions { cluster: ClusterTag::of("lab"), interfaces: Vec::new(), ipv6: false };
    // Both sides wait on what is checked, not on fixed windows (a loaded CI machine
    // once let the whole advertisement pass before the browser heard it): the
    // advertiser stays up until the browser has seen it ready, and the browser
    // listens a while longer for a renamed twin.
    let seen_ready = AtomicBool::new(false);
    let (advertised, events) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let browsing = scope.spawn(|| {
                hosts.block_on(1, async {
                    let mut browser = Browser::start(options)?;
                    let mut events = Vec::new();
                    let mut until = tokio::time::Instant::now() + Duration::from_secs(15);
                    while let Ok(Some(event)) = tokio::time::timeout_at(until, browser.next()).await {
                        let ready = matches!(&event, Event::Resolved { advertisement, .. }
                            if advertisement.state == NodeState::Ready);
                        if ready && !seen_ready.swap(true, Ordering::SeqCst) {
                            until = tokio::time::Instant::now() + Duration::from_secs(2);
                        }
                        events.push(event);
                    }
                    seen_ready.store(true, Ordering::SeqCst);
                    browser.shutdown().await?;
                    anyhow::Ok(events)
                })
            });
            let advertising = hosts.block_on(2, async {
                let options = AdvertiserOptions { instance: "w2".into(), ..Default::default() };
                let mut advertiser = Advertiser::start(options, advertisement("n2", NodeState::Idle))?;
                // What a worker does when a shard starts loading at once: update at
                // every turn until the update goes out.
                let started = Instant::now();
                for state in [NodeState::Loading, NodeState::Ready] {
                    while !advertiser.update(advertisement("n2", state))? {
                        anyhow::ensure!(started.elapsed() < Duration::from_secs(3), "never announced");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                while !seen_ready.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                advertiser.shutdown().await?;
                anyhow::Ok(())
            });
            let events = browsing.join().map_err(|_| anyhow::anyhow!("the browsing thread panicked"));
            (advertising, events)
        })
    });
    advertised??;
    let events = events???;
    let names: BTreeSet<&str> = events.iter().map(Event::instance).collect();
    assert_eq!(names, BTreeSet::from(["w2"]), "{events:?}");
    let last_state = events.iter().rev().find_map(|e| match e {
        Event::Resolved { advertisement, .. } => Some(advertisement.state),
        Event::Removed { .. } => None,
    });
    assert_eq!(last_state, Some(NodeState::Ready), "{events:?}");
    Ok(())
}

//! Who may talk to a cluster, across hosts made of network namespaces
//! (`strata_tests::netns`): the coordinator in host 1 finds its workers in hosts 2
//! and 3 over mDNS; host 4 is a stranger on the same segment. Its worker, started
//! with a guessed token, advertises itself in the cluster and joins: both are
//! refused, and a coordinator told to dial it refuses to start. From host 4, a
//! client without a certificate gets nothing from a worker or the coordinator; one
//! with a valid certificate but in no pipeline cannot steer a worker or inject
//! frames, and is refused at its next call once revoked; a captured token does not
//! take over a node's name. The same cases on loopback are in `trust.rs`.
//!
//! Needs root (prints `SKIPPED: ...` and passes otherwise).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use strata_coordinator::cli::children::Process;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_tests::admin::{layer_holders, node_names, status, wait_for_status};
use strata_tests::intruder::{
    enrolled, export_refused, guessed_token, injection_refused, join, serve_nothing, stranger, weights_refused,
    worker_serves_nothing,
};
use strata_tests::netns::{log_level, Hosts};
use strata_tests::{binary, until_serving};
use strata_trust::{Dial, JoinToken, Transport};
use tonic::Code;

const GRPC_PORT: u16 = 7070;
const CLUSTER: &str = "trust-test";
const INTRUDER: usize = 4;
/// The node id of the enrolled node in no pipeline.
const OUTSIDER: &str = "0123456789abcdef";

/// `strata` in host 1 with `args`, run to its end (at most a minute): its exit
/// status and what it printed on stdout and stderr.
async fn strata_in_host_1(hosts: &Hosts, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut command = hosts.command(1, &binary("strata")?, args);
    command.env("STRATA_LOG", log_level());
    let run = tokio::task::spawn_blocking(move || command.output());
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.context("strata ran for a minute")???;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Why the worker at `address` was refused, by the status `s`.
fn refusals<'a>(s: &'a Value, address: &str) -> Vec<&'a str> {
    let all = s["refused"].as_array().into_iter().flatten();
    all.filter(|r| r["address"] == address).filter_map(|r| r["reason"].as_str()).collect()
}

/// Everything the stranger in host 4 tries, on a runtime in host 4: each must fail.
/// `second_stage` is the address of stage 1 of pipeline `pipeline`, `victim` a
/// pipeline worker's node id.
async fn stranger_tries(
    hosts: &Hosts,
    dir: &Path,
    http: &str,
    second_stage: &str,
    victim: &str,
    pipeline: u64,
) -> anyhow::Result<()> {
    let grpc = format!("{}:7100", hosts.address(1));
    let w2 = format!("{}:{GRPC_PORT}", hosts.address(2));
    let here = IpAddr::V4(hosts.address(INTRUDER));
    let token = JoinToken::parse(&hosts.token())?;
    // Right CA, no certificate of its own; and a client speaking plain TCP.
    let (_, anonymous) = stranger(&dir.join("anonymous"), "00000000000000aa", &token)?;
    for (how, transport) in [("no certificate", &anonymous), ("plain TCP", &Transport::Insecure)] {
        worker_serves_nothing(transport, &w2, how).await?;
    }
    let pull = weights_refused(&grpc, &anonymous).await?;
    anyhow::ensure!(pull.code() == Code::Unauthenticated, "{pull:?}");

    // The token and a pipeline worker's node id, a key of its own.
    let (_, impostor) = stranger(&dir.join("impostor"), victim, &token)?;
    let address = serve_nothing(&impostor, here)?;
    let taken = join(&grpc, &impostor, victim, &address).await?;
    anyhow::ensure!(taken.code() == Code::PermissionDenied, "{taken:?}");
    anyhow::ensure!(taken.message().contains("already enrolled with another key"), "{taken:?}");

    // A certificate of the cluster, in no pipeline.
    let outsider = enrolled(&dir.join("outsider"), OUTSIDER, hosts.trust())?;
    let mut client = WorkerClient::new(outsider.connect(second_stage, Dial::Worker).await?);
    client.describe(v1::DescribeRequest {}).await?;
    let load = client.load_shard(v1::LoadShardRequest::default()).await.err().context("LoadShard answered")?;
    anyhow::ensure!(load.code() == Code::PermissionDenied, "{load:?}");
    let export = export_refused(&mut client, pipeline).await?;
    anyhow::ensure!(export.code() == Code::PermissionDenied && export.message().contains("granted none"), "{export:?}");
    // Only stage 0 sends stage 1 frames.
    let injected = injection_refused(&mut client, pipeline).await?;
    anyhow::ensure!(injected.code() == Code::PermissionDenied, "{injected:?}");
    anyhow::ensure!(injected.message().contains("not the stage before"), "{injected:?}");
    let (ok, said) = strata_in_host_1(hosts, &["node", "revoke", OUTSIDER, "--coordinator", http]).await?;
    anyhow::ensure!(ok && said.contains("revoked"), "{said}");
    // The very next call, on the connection it already had.
    let after = client.describe(v1::DescribeRequest {}).await.err().context("a revoked node was answered")?;
    anyhow::ensure!(after.code() == Code::PermissionDenied && after.message().contains("revoked"), "{after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_segment_cannot_join_read_or_steer() -> anyhow::Result<()> {
    let test = "a_stranger_on_the_segment_cannot_join_read_or_steer";
    let Some(hosts) = Hosts::for_test(test, 4)? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir.path())?;
    let cache = dir.path().join("cache");
    let model_arg = model.display().to_string();
    let (coordinator_grpc, http_listen) = (format!("{}:7100", hosts.address(1)), format!("{}:8000", hosts.address(1)));

    // Host 4: a worker with a guessed token, advertised in the cluster and joining it.
    let guessed = guessed_token(hosts.trust())?.to_string();
    let intruder_args: Vec<String> = ["--listen", "0.0.0.0:7070", "--cluster", CLUSTER, "--token", &guessed]
        .into_iter()
        .chain(["--join", &coordinator_grpc])
        .map(String::from)
        .collect();
    let _intruder = hosts.start_worker(INTRUDER, "intruder", &cache, &intruder_args).await?;
    let intruder_address = format!("{}:{GRPC_PORT}", hosts.address(INTRUDER));

    // Told to dial it, a coordinator refuses to start.
    let mut dial_it: Vec<&str> = vec!["--threads", "1", "serve", "--model", &model_arg, "--no-mdns"];
    let (other_grpc, other_http) = (format!("{}:7101", hosts.address(1)), format!("{}:8001", hosts.address(1)));
    dial_it.extend(["--grpc-listen", &other_grpc, "--http-listen", &other_http, "--worker", &intruder_address]);
    let trust_args = hosts.trust_args();
    dial_it.extend(trust_args.iter().map(String::as_str));
    let (started, said) = strata_in_host_1(&hosts, &dial_it).await?;
    assert!(!started, "a coordinator served with a worker that does not hold the token: {said}");
    assert!(said.contains("does not hold this cluster's join token"), "{said}");

    // The cluster, formed over mDNS.
    let serve: Vec<String> = ["--threads", "1", "serve", "--model", &model_arg, "--model-id", "test-model"]
        .into_iter()
        .chain(["--min-workers", "2", "--placement", "spread", "--cluster", CLUSTER])
        .chain(["--grpc-listen", "0.0.0.0:7100", "--http-listen", &http_listen])
        .map(String::from)
        .chain(trust_args.iter().cloned())
        .collect();
    let mut coordinator = hosts.spawn(1, "coordinator", &binary("strata")?, &serve, &[("STRATA_LOG", log_level())])?;
    let mut workers = Vec::new();
    for (host, name) in [(2, "w2"), (3, "w3")] {
        let args: Vec<String> = ["--listen", "0.0.0.0:7070", "--cluster", CLUSTER].map(String::from).to_vec();
        workers.push(hosts.start_worker(host, name, &cache, &args).await?);
    }
    let (ready, stages) = until_serving(&mut coordinator).await?;
    coordinator.drain_output();
    let http = Process::field(&ready, "http").context("no http= in the coordinator's line")?;
    anyhow::ensure!(stages.len() == 2, "a stage a worker: {stages:?}");
    // `stage 1 layers 3..6 on ADDRESS (NAME), ...`
    let second = stages[1].split_whitespace().collect::<Vec<_>>();
    let (second_address, second_name) =
        (second[5].to_string(), second[6].trim_matches(&['(', ')', ','][..]).to_string());
    let first_name = if second_name == "w2" { "w3" } else { "w2" };

    // Its advertisement and its Join were both refused, and said so in the status.
    let s = tokio::task::block_in_place(|| {
        hosts.block_on(
            1,
            wait_for_status(&http, "the intruder refused twice", |s| {
                let why = refusals(s, &intruder_address);
                let token = |r: &&str| r.contains("does not hold this cluster's join token");
                let found = |r: &&str| r.contains("found over mDNS");
                why.iter().any(|r| token(r) && found(r)) && why.iter().any(|r| token(r) && !found(r))
            }),
        )
    })??;
    let mut taken = node_names(&s);
    taken.sort();
    assert_eq!(taken, ["w2", "w3"], "{s}");
    let victim = s["nodes"][0]["node_id"].as_str().context("no node id in the status")?.to_string();
    let pipeline = s["pipeline_id"].as_u64().context("no pipeline")?;

    tokio::task::block_in_place(|| {
        hosts.block_on(INTRUDER, stranger_tries(&hosts, dir.path(), &http, &second_address, &victim, pipeline))
    })??;

    // A worker of the pipeline, revoked: the cluster goes on without it.
    let (ok, said) = strata_in_host_1(&hosts, &["node", "revoke", &second_name, "--coordinator", &http]).await?;
    assert!(ok, "{said}");
    let body = json!({"model": "test-model", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0});
    let (reply, s) = tokio::task::block_in_place(|| {
        hosts.block_on(1, async {
            let reply = http::request(&http, "POST", "/v1/completions", Some(&body)).await?;
            anyhow::Ok((reply, status(&http).await?))
        })
    })??;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(layer_holders(&s), [first_name], "{s}");
    coordinator.stop(Duration::from_secs(10)).await;
    for worker in workers {
        worker.stop(Duration::from_secs(10)).await;
    }
    Ok(())
}

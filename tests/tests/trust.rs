//! Who may talk to a cluster (strata-trust): a stranger on the network cannot join,
//! gets nothing from a worker without a certificate, an enrolled worker cannot
//! steer others or inject frames into a pipeline it is not in, a revoked node is
//! refused at its next call, and a captured token cannot take over a node's name.
//! Everything on loopback; the same across hosts made of network namespaces is in
//! `trust_netns.rs`, and the capture of their traffic in `capture_netns.rs`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::children::LocalTrust;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_tests::admin::{layer_holders, node_names, status};
use strata_tests::intruder::{
    enrolled, export_refused, guessing_stranger, injection_refused, join, serve_nothing, stranger, weights_refused,
    worker_serves_nothing,
};
use strata_tests::{binary, ClusterOptions, TestCluster};
use strata_trust::{Dial, JoinToken, Transport};
use tonic::Code;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn cluster(dir: &Path) -> anyhow::Result<TestCluster> {
    let model = SyntheticModel { layers: 6, ..SyntheticModel::tiny() }.write_to(dir)?;
    let options = ClusterOptions { workers: 2, workers_have_model: false, ..ClusterOptions::default() };
    let cluster = TestCluster::start(&model, &options).await?;
    anyhow::ensure!(cluster.stage_lines.len() == 2, "{:?}", cluster.stage_lines);
    Ok(cluster)
}

fn trust(cluster: &TestCluster) -> anyhow::Result<&LocalTrust> {
    cluster.trust().context("the cluster has a CA")
}

/// `strata node revoke NODE` against the cluster's coordinator: what it printed.
fn revoke(cluster: &TestCluster, node: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary("strata")?)
        .args(["node", "revoke", node, "--coordinator", cluster.http()])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn grpc(cluster: &TestCluster) -> anyhow::Result<String> {
    cluster.grpc.clone().context("the coordinator's gRPC address")
}

#[tokio::test]
async fn a_worker_without_the_token_is_not_taken() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = cluster(dir.path()).await?;
    let intruder = guessing_stranger(&dir.path().join("intruder"), "0123456789abcdef", trust(&cluster)?)?;
    let address = serve_nothing(&intruder, LOOPBACK)?;
    let refused = join(&grpc(&cluster)?, &intruder, "0123456789abcdef", &address).await?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("does not hold this cluster's join token"), "{refused:?}");
    // A worker of another cluster cannot even reach it: its token names another CA.
    let other = LocalTrust::new()?;
    let (_, outsider) = stranger(&dir.path().join("outsider"), "fedcba9876543210", &JoinToken::parse(&other.token())?)?;
    assert!(join(&grpc(&cluster)?, &outsider, "fedcba9876543210", &address).await.is_err());
    let s = status(cluster.http()).await?;
    let refusals = s["refused"].as_array().context("no refusals in the status")?;
    assert!(refusals.iter().any(|r| r["address"] == address.as_str()), "{s}");
    assert_eq!(node_names(&s), ["worker-0", "worker-1"], "{s}");
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn without_a_certificate_nothing_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = cluster(dir.path()).await?;
    let token = JoinToken::parse(&trust(&cluster)?.token())?;
    // Right CA, no certificate of its own; and a client speaking plain TCP.
    let (_, anonymous) = stranger(dir.path(), "0123456789abcdef", &token)?;
    for (how, transport) in [("no certificate", &anonymous), ("plain TCP", &Transport::Insecure)] {
        worker_serves_nothing(transport, &cluster.workers[0], how).await?;
    }
    // The coordinator's weights, without a certificate.
    let refused = weights_refused(&grpc(&cluster)?, &anonymous).await?;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_enrolled_worker_cannot_steer_or_inject_and_is_refused_once_revoked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = cluster(dir.path()).await?;
    let intruder = enrolled(&dir.path().join("intruder"), "0123456789abcdef", trust(&cluster)?)?;
    let pipeline = status(cluster.http()).await?["pipeline_id"].as_u64().context("no pipeline")?;
    let mut client = WorkerClient::new(intruder.connect(&cluster.workers[1], Dial::Worker).await?);
    // It is of the cluster: it may ask how a worker is.
    client.describe(v1::DescribeRequest {}).await?;
    let load = client.load_shard(v1::LoadShardRequest::default()).await.err().context("LoadShard answered")?;
    assert_eq!(load.code(), Code::PermissionDenied, "{load:?}");
    // Nor pull a sequence's KV (a prompt) without the coordinator's grant.
    let export = export_refused(&mut client, pipeline).await?;
    assert_eq!(export.code(), Code::PermissionDenied, "{export:?}");
    assert!(export.message().contains("granted none"), "{export:?}");
    // Frames into stage 1 of the pipeline: only stage 0 sends those.
    let injected = injection_refused(&mut client, pipeline).await?;
    assert_eq!(injected.code(), Code::PermissionDenied, "{injected:?}");
    assert!(injected.message().contains("not the stage before"), "{injected:?}");

    let said = revoke(&cluster, "0123456789abcdef")?;
    assert!(said.contains("revoked"), "{said}");
    // The very next call, on the connection it already had.
    let after = client.describe(v1::DescribeRequest {}).await.err().context("a revoked node was answered")?;
    assert_eq!(after.code(), Code::PermissionDenied, "{after:?}");
    assert!(after.message().contains("revoked"), "{after:?}");
    // And a worker of the pipeline, revoked: the cluster goes on without it.
    revoke(&cluster, "worker-1")?;
    let body = json!({"model": "test-model", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0});
    let reply = http::request(cluster.http(), "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let s = status(cluster.http()).await?;
    assert_eq!(layer_holders(&s), ["worker-0"], "{s}");
    cluster.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_captured_token_cannot_take_over_an_existing_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = cluster(dir.path()).await?;
    let token = JoinToken::parse(&trust(&cluster)?.token())?;
    let victim =
        status(cluster.http()).await?["nodes"][0]["node_id"].as_str().context("no node id in the status")?.to_string();
    // The token, and worker-0's node id; a key of its own.
    let (_, impostor) = stranger(&dir.path().join("impostor"), &victim, &token)?;
    let address = serve_nothing(&impostor, LOOPBACK)?;
    let refused = join(&grpc(&cluster)?, &impostor, &victim, &address).await?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("already enrolled with another key"), "{refused:?}");
    let s = status(cluster.http()).await?;
    assert_eq!(node_names(&s), ["worker-0", "worker-1"], "{s}");
    cluster.stop().await;
    Ok(())
}

//! Who may talk to a cluster (strata-trust): a stranger on the network cannot join,
//! gets nothing from a worker without a certificate, an enrolled worker cannot
//! steer others or inject frames into a pipeline it is not in, a revoked node is
//! refused at its next call, and a captured token cannot take over a node's name.
//! Everything on loopback; the network-namespace capture is in `capture_netns.rs`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use strata_coordinator::cli::children::LocalTrust;
use strata_coordinator::cli::http;
use strata_model::synthetic::SyntheticModel;
use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self, stage_message, StageMessage};
use strata_proto::{NodeId, PROTOCOL_VERSION};
use strata_tests::admin::status;
use strata_tests::{binary, ClusterOptions, TestCluster};
use strata_trust::{Dial, JoinToken, NodeIdentity, Own, Transport};
use tonic::Code;

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

/// A node holding `token` (or what passes for one) with a key of its own, not
/// enrolled: it presents no certificate as a client.
fn stranger(dir: &Path, node: &str, token: &JoinToken) -> anyhow::Result<(Arc<NodeIdentity>, Transport)> {
    let identity = Arc::new(NodeIdentity::open(dir, NodeId::new(node).context("a node id")?, token)?);
    let transport = Transport::tls(token.ca_sha256, Own::Node(identity.clone()));
    Ok((identity, transport))
}

/// A node enrolled by the cluster's CA as the coordinator would enrol it: a valid
/// worker certificate, in no pipeline.
fn enrolled(dir: &Path, node: &str, trust: &LocalTrust) -> anyhow::Result<Transport> {
    let token = JoinToken::parse(&trust.token())?;
    let (identity, transport) = stranger(dir, node, &token)?;
    let enrolment = trust.authority().enrol(&identity.presented_certificate())?;
    identity.install(&enrolment.certificate_der, trust.authority().ca_der())?;
    Ok(transport)
}

/// A TLS server presenting `transport`'s certificate and serving nothing: enough
/// for the coordinator to dial it and look at its certificate.
fn serve_nothing(transport: &Transport) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    listener.set_nonblocking(true)?;
    let incoming = strata_trust::incoming(transport, tokio::net::TcpListener::from_std(listener)?);
    tokio::spawn(
        tonic::transport::Server::builder().add_routes(tonic::service::Routes::default()).serve_with_incoming(incoming),
    );
    Ok(address)
}

/// A Join announcing `node` at `address`, sent by `transport`.
async fn join(
    cluster: &TestCluster,
    transport: &Transport,
    node: &str,
    address: &str,
) -> anyhow::Result<tonic::Status> {
    let grpc = cluster.grpc.clone().context("the coordinator's gRPC address")?;
    let worker = v1::WorkerDescription {
        protocol_version: PROTOCOL_VERSION,
        grpc_address: address.to_string(),
        name: "intruder".into(),
        node_id: node.into(),
        ..Default::default()
    };
    let mut client = CoordinatorClient::new(transport.connect(&grpc, Dial::Coordinator).await?);
    match client.join(v1::JoinRequest { worker: Some(worker) }).await {
        Ok(_) => anyhow::bail!("the coordinator took {node}"),
        Err(status) => Ok(status),
    }
}

fn names(s: &serde_json::Value) -> Vec<String> {
    s["nodes"].as_array().into_iter().flatten().filter_map(|n| n["name"].as_str().map(str::to_string)).collect()
}

#[tokio::test]
async fn a_worker_without_the_token_is_not_taken() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = cluster(dir.path()).await?;
    let real = JoinToken::parse(&trust(&cluster)?.token())?;
    // It knows the CA's hash (that much crosses the network) but not the secret.
    let guessed = JoinToken::new(real.ca_sha256, [7; strata_trust::TOKEN_SECRET_BYTES]);
    let (_, intruder) = stranger(&dir.path().join("intruder"), "0123456789abcdef", &guessed)?;
    let address = serve_nothing(&intruder)?;
    let refused = join(&cluster, &intruder, "0123456789abcdef", &address).await?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("does not hold this cluster's join token"), "{refused:?}");
    // A worker of another cluster cannot even reach it: its token names another CA.
    let other = LocalTrust::new()?;
    let (_, outsider) = stranger(&dir.path().join("outsider"), "fedcba9876543210", &JoinToken::parse(&other.token())?)?;
    assert!(join(&cluster, &outsider, "fedcba9876543210", &address).await.is_err());
    let s = status(cluster.http()).await?;
    assert_eq!(names(&s), ["worker-0", "worker-1"], "{s}");
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
    let worker = &cluster.workers[0];
    for (how, transport) in [("no certificate", &anonymous), ("plain TCP", &Transport::Insecure)] {
        let Ok(channel) = transport.connect(worker, Dial::Worker).await else { continue };
        let mut client = WorkerClient::new(channel);
        let load = client.load_shard(v1::LoadShardRequest::default()).await;
        assert!(load.is_err(), "{how}: LoadShard answered");
        let export = client.export_kv(v1::ExportKvRequest { pipeline_id: 1, seq_id: 1, ..Default::default() }).await;
        assert!(export.is_err(), "{how}: ExportKv answered");
        let frames =
            futures::stream::iter([StageMessage { kind: Some(stage_message::Kind::Release(Default::default())) }]);
        assert!(client.forward(frames).await.is_err(), "{how}: Forward took a frame");
    }
    // The coordinator's weights, without a certificate.
    let grpc = cluster.grpc.clone().context("the coordinator's address")?;
    let mut coordinator = CoordinatorClient::new(anonymous.connect(&grpc, Dial::Coordinator).await?);
    let pull = coordinator.fetch_weights(v1::FetchWeightsRequest::default()).await;
    let refused = pull.err().context("FetchWeights answered a client without a certificate")?;
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
    // Frames into stage 1 of the pipeline: only stage 0 sends those.
    let frames = futures::stream::iter([StageMessage { kind: Some(stage_message::Kind::Release(Default::default())) }]);
    let injected = client.forward(strata_proto::with_pipeline(frames, pipeline)).await;
    let injected = injected.err().context("the stage took frames from a worker outside its pipeline")?;
    assert_eq!(injected.code(), Code::PermissionDenied, "{injected:?}");
    assert!(injected.message().contains("not the stage before"), "{injected:?}");

    let strata = binary("strata")?;
    let revoke = std::process::Command::new(&strata)
        .args(["node", "revoke", "0123456789abcdef", "--coordinator", cluster.http()])
        .output()?;
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    assert!(String::from_utf8_lossy(&revoke.stdout).contains("revoked"), "{revoke:?}");
    // The very next call, on the connection it already had.
    let after = client.describe(v1::DescribeRequest {}).await.err().context("a revoked node was answered")?;
    assert_eq!(after.code(), Code::PermissionDenied, "{after:?}");
    assert!(after.message().contains("revoked"), "{after:?}");
    // And a worker of the pipeline, revoked: the cluster goes on without it.
    let revoke = std::process::Command::new(&strata)
        .args(["node", "revoke", "worker-1", "--coordinator", cluster.http()])
        .output()?;
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    let body = json!({"model": "test-model", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0});
    let reply = http::request(cluster.http(), "POST", "/v1/completions", Some(&body)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let s = status(cluster.http()).await?;
    let holders: Vec<&str> = s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| !n["layers"].is_null())
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(holders, ["worker-0"], "{s}");
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
    let address = serve_nothing(&impostor)?;
    let refused = join(&cluster, &impostor, &victim, &address).await?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("already enrolled with another key"), "{refused:?}");
    let s = status(cluster.http()).await?;
    assert_eq!(names(&s), ["worker-0", "worker-1"], "{s}");
    cluster.stop().await;
    Ok(())
}

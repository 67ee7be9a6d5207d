//! Strangers and half-trusted nodes for the tests of who may talk to a cluster
//! (`trust.rs` on loopback, `trust_netns.rs` across hosts): a node holding a
//! token (or what passes for one) but no certificate, a node enrolled by the
//! cluster's CA but in no pipeline, a TLS server that only shows its
//! certificate, and a Join sent on its behalf.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use strata_coordinator::cli::children::LocalTrust;
use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self, stage_message, StageMessage};
use strata_proto::{NodeId, PROTOCOL_VERSION};
use strata_trust::{Dial, JoinToken, NodeIdentity, Own, Transport};

/// A node holding `token` with a key of its own, not enrolled: it presents no
/// certificate as a client.
pub fn stranger(dir: &Path, node: &str, token: &JoinToken) -> anyhow::Result<(Arc<NodeIdentity>, Transport)> {
    let identity = Arc::new(NodeIdentity::open(dir, NodeId::new(node).context("a node id")?, token)?);
    let transport = Transport::tls(token.ca_sha256, Own::Node(identity.clone()));
    Ok((identity, transport))
}

/// What a stranger can make of the cluster's token: the CA's hash (that much
/// crosses the network) and a secret of its own.
pub fn guessed_token(trust: &LocalTrust) -> anyhow::Result<JoinToken> {
    let real = JoinToken::parse(&trust.token())?;
    Ok(JoinToken::new(real.ca_sha256, [7; strata_trust::TOKEN_SECRET_BYTES]))
}

/// A node holding a [`guessed_token`].
pub fn guessing_stranger(dir: &Path, node: &str, trust: &LocalTrust) -> anyhow::Result<Transport> {
    Ok(stranger(dir, node, &guessed_token(trust)?)?.1)
}

/// A node enrolled by the cluster's CA as the coordinator would enrol it: a valid
/// worker certificate, in no pipeline.
pub fn enrolled(dir: &Path, node: &str, trust: &LocalTrust) -> anyhow::Result<Transport> {
    let token = JoinToken::parse(&trust.token())?;
    let (identity, transport) = stranger(dir, node, &token)?;
    let enrolment = trust.authority().enrol(&identity.presented_certificate())?;
    identity.install(&enrolment.certificate_der, trust.authority().ca_der())?;
    Ok(transport)
}

/// A TLS server on `ip` presenting `transport`'s certificate and serving nothing,
/// on the current runtime: enough for a coordinator to dial it and look at its
/// certificate. Its address.
pub fn serve_nothing(transport: &Transport, ip: IpAddr) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
    let address = listener.local_addr()?.to_string();
    listener.set_nonblocking(true)?;
    let incoming = strata_trust::incoming(transport, tokio::net::TcpListener::from_std(listener)?);
    tokio::spawn(
        tonic::transport::Server::builder().add_routes(tonic::service::Routes::default()).serve_with_incoming(incoming),
    );
    Ok(address)
}

/// A Join to the coordinator at `grpc` announcing `node` at `address`, sent by
/// `transport`: the refusal (it fails if the coordinator takes the node).
pub async fn join(grpc: &str, transport: &Transport, node: &str, address: &str) -> anyhow::Result<tonic::Status> {
    let worker = v1::WorkerDescription {
        protocol_version: PROTOCOL_VERSION,
        grpc_address: address.to_string(),
        name: "intruder".into(),
        node_id: node.into(),
        ..Default::default()
    };
    let mut client = CoordinatorClient::new(transport.connect(grpc, Dial::Coordinator).await?);
    match client.join(v1::JoinRequest { worker: Some(worker) }).await {
        Ok(_) => anyhow::bail!("the coordinator took {node}"),
        Err(status) => Ok(status),
    }
}

/// One frame that asks nothing of a stage (a Release): what an injector sends.
pub fn a_frame() -> StageMessage {
    StageMessage { kind: Some(stage_message::Kind::Release(Default::default())) }
}

/// Checks that a client dialling the worker at `worker` with `transport` (`how` it
/// does, for the messages) gets nothing: no LoadShard, no ExportKv, no frame taken
/// by Forward. A connection refused outright passes too.
pub async fn worker_serves_nothing(transport: &Transport, worker: &str, how: &str) -> anyhow::Result<()> {
    let Ok(channel) = transport.connect(worker, Dial::Worker).await else { return Ok(()) };
    let mut client = WorkerClient::new(channel);
    anyhow::ensure!(client.load_shard(v1::LoadShardRequest::default()).await.is_err(), "{how}: LoadShard answered");
    let export = client.export_kv(v1::ExportKvRequest { pipeline_id: 1, seq_id: 1, ..Default::default() }).await;
    anyhow::ensure!(export.is_err(), "{how}: ExportKv answered");
    let forward = client.forward(futures::stream::iter([a_frame()])).await;
    anyhow::ensure!(forward.is_err(), "{how}: Forward took a frame");
    Ok(())
}

/// A weight pull from the coordinator at `grpc` by `transport`: the refusal.
pub async fn weights_refused(grpc: &str, transport: &Transport) -> anyhow::Result<tonic::Status> {
    let mut coordinator = CoordinatorClient::new(transport.connect(grpc, Dial::Coordinator).await?);
    let pull = coordinator.fetch_weights(v1::FetchWeightsRequest::default()).await;
    pull.err().context("FetchWeights answered a client without a certificate")
}

/// Frames sent by `client` into pipeline `pipeline` at the stage it reaches: the
/// refusal.
pub async fn injection_refused(
    client: &mut WorkerClient<tonic::transport::Channel>,
    pipeline: u64,
) -> anyhow::Result<tonic::Status> {
    let frames = futures::stream::iter([a_frame()]);
    let injected = client.forward(strata_proto::with_pipeline(frames, pipeline)).await;
    injected.err().context("the stage took frames from a worker outside its pipeline")
}

/// A KV pull by `client` of a sequence of pipeline `pipeline` with no grant from
/// the coordinator: the refusal.
pub async fn export_refused(
    client: &mut WorkerClient<tonic::transport::Channel>,
    pipeline: u64,
) -> anyhow::Result<tonic::Status> {
    let request =
        v1::ExportKvRequest { pipeline_id: pipeline, seq_id: 1, layer_end: 1, positions: 1, ..Default::default() };
    client.export_kv(request).await.err().context("a stage exported KV to a worker the coordinator did not name")
}

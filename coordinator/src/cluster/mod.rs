//! The coordinator's side of a cluster: who the workers are, which layers each one
//! holds, and the streams that carry every request through them.
//!
//! * [`service`]: the Coordinator gRPC service (Join, FetchWeights, Health);
//! * [`membership`]: static `--worker`s and joined workers;
//! * [`discovery`]: workers found over mDNS;
//! * [`plan`]: cutting the layers into stages;
//! * [`model`]: the served model, its hash and the shard files cut for pulling;
//! * [`engine`]: the scheduler behind the [`crate::engine::Engine`] trait.
//!
//! [`Cluster::start`] waits for the workers, loads the plan on all of them at once,
//! subscribes to every worker's Events and opens the Forward stream to stage 0.

pub mod discovery;
pub mod engine;
pub mod membership;
pub mod model;
pub mod plan;
pub mod service;

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use strata_proto::v1::coordinator_server::CoordinatorServer;
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self, worker_event, ModelRef, ShardSpec, WireDtype};
use strata_proto::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

pub use engine::{ClusterEngine, HopSamples, ReturnPath};
use engine::{Scheduler, SchedulerMsg};
pub use membership::{Member, Membership};
pub use model::ServedModel;
pub use plan::plan_even;
pub use service::CoordinatorService;

/// A worker that sends nothing for this long (heartbeats come every 500 ms) is
/// considered gone.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("worker {address}: {message}")]
    Worker { address: String, message: String },
    #[error("{found} of the {wanted} workers needed are known after waiting {waited:?}")]
    NotEnoughWorkers { found: usize, wanted: usize, waited: Duration },
    #[error("stage {stage} (layers {start}..{end}) on {address}: {message}")]
    Load { stage: usize, start: usize, end: usize, address: String, message: String },
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Workers given on the command line, in pipeline order.
    pub workers: Vec<String>,
    /// Workers to wait for (static and joined together) before planning.
    pub min_workers: usize,
    pub worker_wait: Duration,
    pub wire_dtype: WireDtype,
    pub return_path: ReturnPath,
    /// The coordinator's gRPC address as workers reach it, to pull weights from.
    pub weights_source: String,
}

/// Where a stage of the plan runs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub stage: usize,
    pub layers: Range<usize>,
    pub address: String,
    pub name: String,
    pub weights_were_local: bool,
    pub load_seconds: f64,
}

/// A running pipeline.
pub struct Cluster {
    pub engine: Arc<ClusterEngine>,
    pub placements: Vec<Placement>,
    /// Latency of the last hop, last stage to coordinator (TokenSampled events).
    pub token_hops: Arc<HopSamples>,
    clients: Vec<WorkerClient<Channel>>,
    tasks: Vec<JoinHandle<()>>,
}

fn client(channel: Channel) -> WorkerClient<Channel> {
    WorkerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn connect(address: &str) -> Result<WorkerClient<Channel>, ClusterError> {
    let worker = |message: String| ClusterError::Worker { address: address.to_string(), message };
    let endpoint = strata_proto::transport::endpoint(address).map_err(|e| worker(e.to_string()))?;
    Ok(client(endpoint.connect().await.map_err(|e| worker(format!("cannot connect: {e}")))?))
}

impl Cluster {
    /// Waits for the workers, loads the plan and connects the streams.
    pub async fn start(
        config: &ClusterConfig,
        model: Arc<ServedModel>,
        membership: Arc<Membership>,
    ) -> Result<Self, ClusterError> {
        let described = join_all(config.workers.iter().map(|a| membership::describe(a, config.worker_wait))).await;
        for member in described {
            membership.add(member?);
        }
        let wanted = config.min_workers.max(config.workers.len()).max(1);
        let members = membership.wait_for(wanted, config.worker_wait).await?;
        let layers = model.layers();
        let ranges = plan_even(layers, members.len());
        let members = &members[..ranges.len()];
        let pipeline_id =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let specs: Vec<ShardSpec> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| ShardSpec {
                model: Some(ModelRef { model_id: model.card.id.clone(), content_hash: model.content_hash.clone() }),
                layer_start: r.start as u32,
                layer_end: r.end as u32,
                total_layers: layers as u32,
                wire_dtype: config.wire_dtype as i32,
                next_stage_address: members.get(i + 1).map(|m| m.address.clone()).unwrap_or_default(),
                weights_source: config.weights_source.clone(),
                stage_index: i as u32,
                pipeline_id,
                first_stage_address: if i + 1 == ranges.len() { members[0].address.clone() } else { String::new() },
            })
            .collect();
        let mut clients = Vec::new();
        for m in members {
            clients.push(connect(&m.address).await?);
        }
        // Every stage loads at once; a stage connects to its (already serving) next
        // stage during its load.
        let loads = join_all(clients.iter().zip(&specs).map(|(c, spec)| {
            let mut c = c.clone();
            let spec = spec.clone();
            async move { c.load_shard(v1::LoadShardRequest { shard: Some(spec) }).await }
        }))
        .await;
        let mut placements = Vec::new();
        for (i, result) in loads.into_iter().enumerate() {
            let r = &ranges[i];
            let response = result.map_err(|s| ClusterError::Load {
                stage: i,
                start: r.start,
                end: r.end,
                address: members[i].address.clone(),
                message: format!("{:?}: {}", s.code(), s.message()),
            })?;
            let response = response.into_inner();
            placements.push(Placement {
                stage: i,
                layers: r.clone(),
                address: members[i].address.clone(),
                name: members[i].description.name.clone(),
                weights_were_local: response.weights_were_local,
                load_seconds: response.load_seconds,
            });
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let token_hops = Arc::new(HopSamples::default());
        let mut tasks = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            // Awaiting the call means the worker has registered the subscription, so
            // no event sent from now on is missed.
            let stream = c.events(v1::EventsRequest {}).await.map_err(|s| ClusterError::Worker {
                address: members[i].address.clone(),
                message: format!("cannot subscribe to events: {}", s.message()),
            })?;
            tasks.push(tokio::spawn(pump_events(i, stream.into_inner(), tx.clone(), token_hops.clone())));
        }
        let (stage0, frames) = mpsc::unbounded_channel();
        let mut c0 = clients[0].clone();
        let lost = tx.clone();
        tasks.push(tokio::spawn(async move {
            let reason = match c0.forward(UnboundedReceiverStream::new(frames)).await {
                Ok(_) => "the stream to stage 0 closed".to_string(),
                Err(s) => format!("the stream to stage 0 broke: {}", s.message()),
            };
            let _ = lost.send(SchedulerMsg::StageLost { stage: 0, reason });
        }));
        let broken = Arc::new(AtomicBool::new(false));
        let info = model.file.info();
        let scheduler = Scheduler::new(stage0, model.card.clone(), info.hidden, broken.clone());
        tasks.push(tokio::spawn(scheduler.run(rx)));
        let engine = Arc::new(ClusterEngine {
            card: model.card.clone(),
            vocab_size: info.vocab_size,
            tx,
            next_seq: AtomicU64::new(1),
            return_path: config.return_path,
            broken,
        });
        Ok(Self { engine, placements, token_hops, clients, tasks })
    }

    /// Every stage's counters, in stage order.
    pub async fn stats(&self, reset: bool) -> Result<Vec<v1::StatsResponse>, tonic::Status> {
        let mut out = Vec::new();
        for c in &self.clients {
            out.push(c.clone().stats(v1::StatsRequest { reset }).await?.into_inner());
        }
        Ok(out)
    }

    /// Ends what is in flight, stops the streams and unloads every stage.
    pub async fn shutdown(self) {
        self.engine.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        let unloads = self.clients.iter().map(|c| {
            let mut c = c.clone();
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.unload_shard(v1::UnloadShardRequest {})).await;
            }
        });
        join_all(unloads).await;
    }
}

/// Forwards one worker's events to the scheduler; a silent or closed stream means
/// the worker is gone.
async fn pump_events(
    stage: usize,
    mut stream: tonic::Streaming<v1::WorkerEvent>,
    tx: mpsc::UnboundedSender<SchedulerMsg>,
    token_hops: Arc<HopSamples>,
) {
    let reason = loop {
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(event))) => {
                if let Some(worker_event::Kind::Token(t)) = &event.kind {
                    token_hops.record(t.sent_unix_nanos);
                }
                if tx.send(SchedulerMsg::Event { stage, event }).is_err() {
                    return;
                }
            }
            Ok(Ok(None)) => break "its event stream ended".to_string(),
            Ok(Err(s)) => break format!("its event stream failed: {}", s.message()),
            Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
        }
    };
    let _ = tx.send(SchedulerMsg::StageLost { stage, reason });
}

/// Serves the Coordinator gRPC service on `listener` until `shutdown` completes.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    service: CoordinatorService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClusterError> {
    strata_proto::transport::server()
        .add_service(
            CoordinatorServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(strata_proto::transport::incoming(listener), shutdown)
        .await?;
    Ok(())
}

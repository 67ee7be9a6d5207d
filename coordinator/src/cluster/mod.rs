//! The coordinator's side of a cluster: who the workers are, which layers each one
//! holds, and the streams that carry every request through them.
//!
//! * [`service`]: the Coordinator gRPC service (Join, FetchWeights, Health);
//! * [`membership`]: the workers known, static, joined or discovered;
//! * [`discovery`]: workers found over mDNS;
//! * [`placement`]: from the workers to a plan, through the planner;
//! * [`pipeline`]: a plan loaded on the workers, and its stream into stage 0;
//! * [`controller`]: re-plans when workers come, go, drain or fail;
//! * [`scheduler`]: runs requests on the current pipeline and moves them to the next;
//! * [`moves`]: replay or KV transfer, and the cost model that picks one per request;
//! * [`engine`]: the [`crate::engine::Engine`] handle on the scheduler;
//! * [`model`]: the served model, its hash and the shard files cut for pulling;
//! * [`report`]: what `strata status` and `strata drain` answer;
//! * [`switch_memory`]: whether a worker holds a new stage beside its old one.
//!
//! [`Cluster::start`] waits for the workers and loads the first plan; from then on
//! the controller keeps the pipeline in line with the workers there are.

pub mod controller;
pub mod discovery;
pub mod engine;
pub mod membership;
pub mod model;
pub mod moves;
pub mod pipeline;
pub mod placement;
pub mod rates;
pub mod report;
pub mod scheduler;
pub mod service;
pub mod switch_memory;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use strata_proto::v1::coordinator_server::CoordinatorServer;
use strata_proto::v1::{self, WireDtype};
use strata_proto::MAX_MESSAGE_BYTES;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use controller::{Control, Controller, ControllerSpec};
pub use engine::{ClusterEngine, HopSamples, ReturnPath};
pub use membership::{Member, Membership, NodeStatus};
pub use model::ServedModel;
pub use pipeline::Placement;
pub use placement::PlacementPolicy;
pub use report::{AdminError, AdmissionReport, ClusterStatus, DrainReport, NodeReport, QueuedRequest};
pub use moves::{MoveCost, MovePolicy};
use scheduler::{AdmissionSettings, MoveSettings, Scheduler};
pub use service::CoordinatorService;

use crate::engine::{ContextSource, Limits, ModelCard};

/// A worker that sends nothing for this long (heartbeats come every 300 ms) is
/// considered gone.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

pub(crate) type WorkerClient = strata_proto::v1::worker_client::WorkerClient<Channel>;

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
    /// Workers given on the command line.
    pub workers: Vec<String>,
    /// Workers to wait for (static and joined together) before planning.
    pub min_workers: usize,
    pub worker_wait: Duration,
    pub wire_dtype: WireDtype,
    pub return_path: ReturnPath,
    /// The coordinator's gRPC address as workers reach it, to pull weights from.
    pub weights_source: String,
    pub placement: PlacementPolicy,
    pub plan: crate::planner::PlanOptions,
    /// How long a request may wait for capacity before it fails.
    pub queue_timeout: Duration,
    /// How requests move to a new pipeline while the old one still works.
    pub move_sequences: MovePolicy,
}

impl ClusterConfig {
    /// What a request may fill: the context the plan sized every KV cache for, or
    /// the model's own where that is less.
    pub fn limits(&self, card: &ModelCard) -> Limits {
        if self.plan.context < card.context_length {
            Limits { context: self.plan.context.max(1), context_source: ContextSource::Plan }
        } else {
            Limits::of_model(card)
        }
    }
}

/// A running cluster: the engine requests go to, and the controller that keeps
/// its pipeline in line with the workers.
pub struct Cluster {
    pub engine: Arc<ClusterEngine>,
    /// The stages of the first pipeline.
    pub placements: Vec<Placement>,
    /// Latency of the last hop, last stage to coordinator (TokenSampled events).
    pub token_hops: Arc<HopSamples>,
    admin: ClusterAdmin,
    tasks: Vec<JoinHandle<()>>,
}

fn client(channel: Channel) -> WorkerClient {
    WorkerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn connect(address: &str) -> Result<WorkerClient, ClusterError> {
    let worker = |message: String| ClusterError::Worker { address: address.to_string(), message };
    let endpoint = strata_proto::transport::endpoint(address).map_err(|e| worker(e.to_string()))?;
    Ok(client(endpoint.connect().await.map_err(|e| worker(format!("cannot connect: {e}")))?))
}

impl Cluster {
    /// Waits for the workers, loads the first plan and starts the controller.
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
        membership.wait_for(wanted, config.worker_wait).await?;

        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (scheduler_tx, scheduler_rx) = mpsc::unbounded_channel();
        let token_hops = Arc::new(HopSamples::default());
        let info = model.file.info();
        let moves = MoveSettings {
            policy: config.move_sequences,
            cost: MoveCost::default(),
            kv_bytes_per_position: info.kv_bytes_per_token_per_layer() * info.layers as u64,
        };
        let limits = config.limits(&model.card);
        let admission = AdmissionSettings {
            sequences: config.plan.sequences,
            context: limits.context,
            queue_timeout: config.queue_timeout,
        };
        let scheduler = Scheduler::new(model.card.clone(), info.hidden, admission, control_tx.clone(), moves);
        let mut tasks = vec![tokio::spawn(scheduler.run(scheduler_rx))];
        let spec = ControllerSpec {
            model: model.clone(),
            membership,
            policy: config.placement.clone(),
            options: config.plan.clone(),
            wire_dtype: config.wire_dtype,
            weights_source: config.weights_source.clone(),
            scheduler: scheduler_tx.clone(),
            token_hops: token_hops.clone(),
        };
        let mut controller = Controller::new(spec, control_tx.clone());
        let placements = match controller.start().await {
            Ok(p) => p,
            Err(e) => {
                for t in &tasks {
                    t.abort();
                }
                return Err(e);
            }
        };
        tasks.push(tokio::spawn(controller.run(control_rx)));
        let engine = Arc::new(ClusterEngine {
            card: model.card.clone(),
            limits,
            vocab_size: info.vocab_size,
            tx: scheduler_tx,
            next_request: AtomicU64::new(1),
            return_path: config.return_path,
        });
        Ok(Self { engine, placements, token_hops, admin: ClusterAdmin { control: control_tx }, tasks })
    }

    /// The handle the admin API uses.
    pub fn admin(&self) -> ClusterAdmin {
        self.admin.clone()
    }

    /// The stages of the current pipeline.
    pub async fn placements(&self) -> Vec<Placement> {
        self.admin.ask(|reply| Control::Placements { reply }).await.unwrap_or_default()
    }

    /// Every stage's counters, in stage order.
    pub async fn stats(&self, reset: bool) -> Result<Vec<v1::StatsResponse>, ClusterError> {
        let mut out = Vec::new();
        for p in self.placements().await {
            let mut c = connect(&p.address).await?;
            let stats = c
                .stats(v1::StatsRequest { reset })
                .await
                .map_err(|s| ClusterError::Worker { address: p.address.clone(), message: s.message().to_string() })?;
            out.push(stats.into_inner());
        }
        Ok(out)
    }

    /// Ends what is in flight, stops the controller and unloads every stage.
    pub async fn shutdown(self) {
        self.engine.shutdown().await;
        let _ = self.admin.ask(|done| Control::Shutdown { done }).await;
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Status, drain and undrain, for the admin API. Cheap to clone.
#[derive(Clone)]
pub struct ClusterAdmin {
    control: mpsc::UnboundedSender<Control>,
}

impl ClusterAdmin {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, AdminError> {
        let (reply, answer) = oneshot::channel();
        self.control.send(make(reply)).map_err(|_| AdminError::ShuttingDown)?;
        answer.await.map_err(|_| AdminError::ShuttingDown)
    }

    pub async fn status(&self) -> Result<ClusterStatus, AdminError> {
        self.ask(|reply| Control::Status { reply }).await
    }

    pub async fn drain(&self, node: String, force: bool, wait: bool) -> Result<DrainReport, AdminError> {
        self.ask(|reply| Control::Drain { node, force, wait, reply }).await?
    }

    pub async fn undrain(&self, node: String) -> Result<String, AdminError> {
        self.ask(|reply| Control::Undrain { node, reply }).await?
    }
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

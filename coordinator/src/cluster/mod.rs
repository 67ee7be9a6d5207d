//! The coordinator's side of a cluster: who the workers are, which layers each one
//! holds, and the streams that carry every request through them.
//!
//! * [`service`]: the Coordinator gRPC service (Join, FetchWeights, Health);
//! * [`membership`]: the workers known, static, joined or discovered;
//! * [`discovery`]: workers found over mDNS;
//! * [`placement`]: from the workers to a plan, through the planner;
//! * [`pipeline`]: a plan loaded on the workers, and its stream into stage 0;
//! * [`controller`]: re-plans when workers come, go, drain or fail: a decision
//!   core (events in, actions out), an executor that never waits, and the
//!   pipeline keeper that loads one plan at a time;
//! * [`scheduler`]: runs requests on the current pipeline and moves them to the next;
//! * [`moves`]: replay or KV transfer, and the cost model that picks one per request;
//! * [`engine`]: the [`crate::engine::Engine`] handle on the scheduler;
//! * [`model`]: the served model, its hash and the shard files cut for pulling;
//! * [`report`]: what `strata status` and `strata drain` answer;
//! * [`switch_memory`]: whether a worker holds a new stage beside its old one;
//! * [`messages`]: what the controller, the scheduler and the pipelines send each
//!   other (a leaf: none of them imports another);
//! * [`status_view`]: what status reads, so it never waits on the controller;
//! * [`decision`]: which plan to load and how, as pure functions (unit-tested on
//!   scripted cluster states), apart from carrying it out;
//! * [`backoff`]: workers whose loads failed, left out for a while;
//! * [`weights_source`]: the address each worker pulls weights from.
//!
//! [`Cluster::launch`] starts the scheduler and the controller, which waits for the
//! workers and loads the first plan in the background (so status and the API can
//! serve while a first pull takes minutes); [`Cluster::start`] also waits for that
//! first plan. From then on the controller keeps the pipeline in line with the
//! workers there are.

pub mod backoff;
pub mod controller;
pub mod decision;
pub mod discovery;
pub mod engine;
#[cfg(test)]
mod fixtures;
pub mod membership;
pub mod messages;
pub mod model;
pub mod moves;
pub mod pipeline;
pub mod placement;
mod prefix;
pub mod rates;
pub mod report;
mod request_trace;
pub mod scheduler;
pub mod service;
pub mod status_view;
pub mod switch_memory;
pub mod weights_source;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use strata_proto::v1::coordinator_server::CoordinatorServer;
use strata_proto::v1::{self, WireDtype};
use strata_proto::{NodeId, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use controller::{Controller, ControllerSpec};
use messages::{Control, SchedulerMsg, SchedulerStatus};
pub use engine::{ClusterEngine, HopSamples, ReturnPath};
pub use membership::{Member, Membership, NodeStatus};
pub use model::ServedModel;
pub use moves::{MoveCost, MovePolicy};
pub use messages::Placement;
pub use placement::PlacementPolicy;
pub use report::{
    AdminError, AdmissionReport, ClusterStatus, DrainReport, LinkReport, NodeReport, QueuedRequest, RefusalReport,
};
use scheduler::{AdmissionSettings, MoveSettings, Scheduler};
pub use service::CoordinatorService;
use status_view::StatusView;
pub use weights_source::WeightsSource;

pub use strata_proto::timing::HEARTBEAT_TIMEOUT;

use crate::engine::{ContextSource, Limits, ModelCard};

pub(crate) type WorkerClient = strata_proto::v1::worker_client::WorkerClient<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("worker {address}: {message}")]
    Worker { address: String, message: String },
    /// It answered, but is not to be trusted (see [`membership::Refusal`]).
    #[error("refused the worker at {address}: {reason}")]
    Refused { address: String, reason: String },
    #[error("{found} of the {wanted} workers needed are known after waiting {waited:?}")]
    NotEnoughWorkers { found: usize, wanted: usize, waited: Duration },
    #[error("stage {stage} (layers {start}..{end}) on {address}: {error}")]
    Load { stage: usize, start: usize, end: usize, address: String, error: strata_proto::CallError },
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("no pipeline could be loaded: {0}")]
    NoPipeline(String),
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
    pub weights_source: WeightsSource,
    pub placement: PlacementPolicy,
    pub plan: crate::planner::PlanOptions,
    /// How long a request may wait for capacity before it fails.
    pub queue_timeout: Duration,
    /// How requests move to a new pipeline while the old one still works.
    pub move_sequences: MovePolicy,
    /// Keep finished requests' sequences for their conversation's next turn to
    /// start from (the prefix cache).
    pub prefix_cache: bool,
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
    /// The stages of the first pipeline; empty when it could not be loaded (or
    /// [`Cluster::first_plan`] was not awaited) yet.
    pub placements: Vec<Placement>,
    /// Why there is no pipeline yet, when there is none.
    pub waiting_reason: Option<String>,
    /// The first plan's outcome, until [`Cluster::first_plan`] takes it.
    first_plan: Option<oneshot::Receiver<Result<Vec<Placement>, String>>>,
    /// Latency of the last hop, last stage to coordinator (TokenSampled events).
    pub token_hops: Arc<HopSamples>,
    admin: ClusterAdmin,
    /// Set on shutdown: the controller abandons a load in progress.
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn client(channel: Channel) -> WorkerClient {
    WorkerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A connection to the worker at `address`, checked to be its node (mutual TLS) once
/// the node is known.
async fn connect(address: &str) -> Result<WorkerClient, ClusterError> {
    let worker = |message: String| ClusterError::Worker { address: address.to_string(), message };
    let channel = strata_trust::transport()
        .connect(address, strata_trust::Dial::Worker)
        .await
        .map_err(|e| worker(format!("cannot connect: {e}")))?;
    Ok(client(channel))
}

impl Cluster {
    /// Waits for the workers, loads the first plan and starts the controller:
    /// [`Cluster::launch`], then [`Cluster::first_plan`].
    pub async fn start(
        config: &ClusterConfig,
        model: Arc<ServedModel>,
        membership: Arc<Membership>,
    ) -> Result<Self, ClusterError> {
        let mut cluster = Self::launch(config, model, membership).await?;
        cluster.first_plan().await;
        Ok(cluster)
    }

    /// Describes the workers named in `config` and starts the scheduler and the
    /// controller, which waits for `min_workers` and loads the first plan in the
    /// background: the engine and the admin handle work at once (requests wait for
    /// the pipeline, status shows the load and its pulls).
    pub async fn launch(
        config: &ClusterConfig,
        model: Arc<ServedModel>,
        membership: Arc<Membership>,
    ) -> Result<Self, ClusterError> {
        let described = join_all(config.workers.iter().map(|a| membership::describe(a, config.worker_wait))).await;
        for member in described {
            membership.add(member?);
        }
        let wanted = config.min_workers.max(config.workers.len()).max(1);
        let worker_wait = config.worker_wait;

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
            keep_finished: config.prefix_cache,
        };
        // The prompt goes in frames within the message size, of the chunk the plan sized
        // the stages' scratch for.
        let frame_tokens = engine::frame_tokens(info.hidden).min(config.plan.prefill_chunk.max(1));
        let scheduler = Scheduler::new(model.card.clone(), frame_tokens, admission, control_tx.clone(), moves);
        let view = Arc::new(StatusView::new(model.card.id.clone(), model.layers()));
        let mut tasks = vec![
            tokio::spawn(scheduler.run(scheduler_rx)),
            tokio::spawn(sample_rates(view.clone(), membership.clone(), scheduler_tx.clone())),
        ];
        let admin = ClusterAdmin {
            control: control_tx.clone(),
            view: view.clone(),
            membership: membership.clone(),
            scheduler: scheduler_tx.clone(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let spec = ControllerSpec {
            model: model.clone(),
            stop: stop_rx,
            view,
            membership: membership.clone(),
            policy: config.placement.clone(),
            options: config.plan.clone(),
            wire_dtype: config.wire_dtype,
            weights_source: config.weights_source.clone(),
            scheduler: scheduler_tx.clone(),
            token_hops: token_hops.clone(),
        };
        let mut controller = Controller::new(spec, control_tx.clone());
        let (first_tx, first_plan) = oneshot::channel();
        let mut stopping = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                waited = membership.wait_for(wanted, worker_wait) => if let Err(e) = waited {
                    // Not a reason to stop: the controller plans with the workers there
                    // are, and again whenever one comes; requests wait meanwhile.
                    tracing::warn!("{e}; planning with the workers there are");
                },
                // Shut down while waiting: nothing to plan, and nothing to wait for
                // (a first load in progress watches the stop itself).
                _ = stopping.wait_for(|s| *s) => return,
            }
            let first = controller.start().await;
            if let Err(reason) = &first {
                tracing::warn!(%reason, "no pipeline yet; requests wait while the controller retries");
            }
            let _ = first_tx.send(first);
            // Control messages sent meanwhile (a drain, a stage's trouble) waited in
            // the channel; the controller takes them now.
            controller.run(control_rx).await;
        }));
        let engine = Arc::new(ClusterEngine {
            card: model.card.clone(),
            limits,
            vocab_size: info.vocab_size,
            tx: scheduler_tx,
            next_request: AtomicU64::new(1),
            return_path: config.return_path,
        });
        Ok(Self {
            engine,
            placements: Vec::new(),
            waiting_reason: None,
            first_plan: Some(first_plan),
            token_hops,
            admin,
            stop,
            tasks,
        })
    }

    /// Waits until the first plan is loaded, or has failed once (the controller
    /// then retries), and sets [`Cluster::placements`] or [`Cluster::waiting_reason`].
    /// Returns at once after the first call.
    pub async fn first_plan(&mut self) {
        let Some(outcome) = self.first_plan.take() else { return };
        match outcome.await {
            Ok(Ok(placements)) => self.placements = placements,
            Ok(Err(reason)) => self.waiting_reason = Some(reason),
            Err(_) => self.waiting_reason = Some("the controller stopped before its first plan".into()),
        }
    }

    /// This cluster if its first pipeline loaded; otherwise it is shut down and the
    /// error says why (for benchmarks and tests, which have nothing to wait for).
    pub async fn loaded(mut self) -> Result<Self, ClusterError> {
        self.first_plan().await;
        match self.waiting_reason.clone() {
            None => Ok(self),
            Some(reason) => {
                self.shutdown().await;
                Err(ClusterError::NoPipeline(reason))
            }
        }
    }

    /// The handle the admin API uses.
    pub fn admin(&self) -> ClusterAdmin {
        self.admin.clone()
    }

    /// The stages of the current pipeline.
    pub async fn placements(&self) -> Vec<Placement> {
        self.admin.view.placements()
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
        let _ = self.stop.send(true);
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
    /// Status reads these, never the controller's pipeline keeper, which may be
    /// busy with a load.
    view: Arc<StatusView>,
    membership: Arc<Membership>,
    scheduler: mpsc::UnboundedSender<SchedulerMsg>,
}

impl ClusterAdmin {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, AdminError> {
        let (reply, answer) = oneshot::channel();
        self.control.send(make(reply)).map_err(|_| AdminError::ShuttingDown)?;
        answer.await.map_err(|_| AdminError::ShuttingDown)
    }

    pub async fn status(&self) -> Result<ClusterStatus, AdminError> {
        let scheduler = scheduler_status(&self.scheduler).await.ok_or(AdminError::ShuttingDown)?;
        let (generation, members) = self.membership.snapshot();
        let mut status = self.view.report((generation, &members), scheduler);
        status.refused = self
            .membership
            .refusals()
            .into_iter()
            .map(|r| RefusalReport { address: r.address, reason: r.reason, seconds_ago: r.at.elapsed().as_secs_f64() })
            .collect();
        status.weight_pull_bytes = self.membership.weights_served();
        Ok(status)
    }

    pub async fn drain(&self, node: String, force: bool, wait: bool) -> Result<DrainReport, AdminError> {
        self.ask(|reply| Control::Drain { node, force, wait, reply }).await?
    }

    pub async fn undrain(&self, node: String) -> Result<String, AdminError> {
        self.ask(|reply| Control::Undrain { node, reply }).await?
    }

    /// Revokes `node` (a worker's name, address or node id; a node id also when it
    /// is not a member now): its certificate is refused from the next call on, here
    /// and by every worker, it is never enrolled again, and a member holding layers
    /// is lost to the cluster (its requests replay on the others).
    pub async fn revoke(&self, node: String) -> Result<String, AdminError> {
        let transport = strata_trust::transport();
        let authority = transport.authority().ok_or(AdminError::Insecure)?;
        let member = self.membership.find(&node);
        let id = match member.as_ref().and_then(|m| m.description.node()) {
            Some(id) => id,
            None if strata_trust::names::valid_node_id(&node) => NodeId::new(&node).ok_or(AdminError::Insecure)?,
            None => {
                let known = self.membership.members().iter().map(|m| m.name().to_string()).collect::<Vec<_>>();
                return Err(AdminError::UnknownNode { node, known: known.join(", ") });
            }
        };
        let fresh = authority.revoke(&id).map_err(|e| AdminError::Revocation(e.to_string()))?;
        transport.revoke([id.clone()]);
        let others: Vec<Member> =
            self.membership.members().into_iter().filter(|m| m.description.node().as_ref() != Some(&id)).collect();
        let told = join_all(others.iter().map(|m| {
            let request = v1::RevokeRequest { node_ids: vec![id.to_string()] };
            async move {
                let call = async { connect(&m.address).await.ok()?.revoke(request).await.ok() };
                tokio::time::timeout(Duration::from_secs(5), call).await.ok().flatten().is_some()
            }
        }))
        .await;
        let missed: Vec<&str> = others.iter().zip(&told).filter(|(_, ok)| !**ok).map(|(m, _)| m.name()).collect();
        if let Some(m) = &member {
            let _ = self.control.send(Control::Revoked { address: m.address.clone() });
        }
        let name = member.as_ref().map_or(id.to_string(), |m| format!("{} ({id})", m.name()));
        let mut message = if fresh {
            format!("revoked {name}: its certificate is refused from now on, and it is never enrolled again")
        } else {
            format!("{name} was already revoked; the workers were told again")
        };
        if !missed.is_empty() {
            // They refuse it at their next enrolment-time list, or when it is
            // revoked again; the coordinator refuses it already.
            message.push_str(&format!(" (not reached: {}; run this again once they are back)", missed.join(", ")));
        }
        Ok(message)
    }
}

/// What the scheduler says of itself; `None` once it has stopped.
async fn scheduler_status(scheduler: &mpsc::UnboundedSender<SchedulerMsg>) -> Option<SchedulerStatus> {
    let (reply, status) = oneshot::channel();
    scheduler.send(SchedulerMsg::Status { reply }).ok()?;
    status.await.ok()
}

/// Samples the cluster's and every worker's counters once a second, for the rates
/// status shows; ends with the scheduler.
async fn sample_rates(
    view: Arc<StatusView>,
    membership: Arc<Membership>,
    scheduler: mpsc::UnboundedSender<SchedulerMsg>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(status) = scheduler_status(&scheduler).await else { return };
        let members: Vec<Member> = membership.members();
        view.sample(std::time::Instant::now(), &status, &members);
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
        .serve_with_incoming_shutdown(strata_trust::incoming(strata_trust::transport(), listener), shutdown)
        .await?;
    Ok(())
}

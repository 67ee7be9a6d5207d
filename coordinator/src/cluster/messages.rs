//! The messages the cluster's actors exchange — the controller, the scheduler,
//! the pipelines' stream tasks and the admin handle — in one leaf module that none
//! of them owns, so that no actor imports another: each depends on this, and on
//! the plain modules below it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::{StageMessage, WorkerEvent};
use strata_proto::PipelineId;
use tokio::sync::{mpsc, oneshot};

use super::moves::LinkStage;
use super::report::{AdminError, AdmissionReport, DrainReport};
use crate::engine::{GenerateEvent, GenerateRequest};

/// To the controller.
pub(crate) enum Control {
    /// Something in the pipeline failed (a broken stream, a sequence error that
    /// points at a worker): check the workers.
    Trouble {
        reason: String,
    },
    Drain {
        node: String,
        force: bool,
        wait: bool,
        reply: oneshot::Sender<Result<DrainReport, AdminError>>,
    },
    Undrain {
        node: String,
        reply: oneshot::Sender<Result<String, AdminError>>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    /// The worker at `address` was revoked: it is lost to the cluster (its requests
    /// are replayed on the others).
    Revoked {
        address: String,
    },
}

/// A request to the cluster's engine, for as long as it runs (across the
/// sequences it runs under as it is moved or replayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where requests go now.
#[derive(Debug, Clone)]
pub struct PipelineLink {
    pub id: PipelineId,
    pub stage0: mpsc::UnboundedSender<StageMessage>,
    /// Its stages in order, for moving sequences' KV caches onto or off it.
    pub stages: Arc<Vec<LinkStage>>,
}

/// How the requests of one switch moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Replayed on the new pipeline (transfers that failed included).
    pub replayed: usize,
    /// Moved with their KV caches.
    pub transferred: usize,
    /// Transfers that failed and were replayed instead.
    pub fell_back: usize,
}

impl Moved {
    pub fn total(&self) -> usize {
        self.replayed + self.transferred
    }
}

/// How long the requests moved by a switch waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumed {
    /// The longest gap between two tokens a client saw.
    pub longest_pause: Duration,
    /// The longest time from the switch to a moved request's next token: the pause
    /// less the time its last token came before the switch (while the new pipeline
    /// loaded, the old one served).
    pub longest_resume: Duration,
}

/// What the scheduler reports about itself.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStatus {
    /// Requests admitted.
    pub in_flight: usize,
    /// Admitted requests waiting for a pipeline (new, or parked by a failure).
    pub waiting: usize,
    pub waiting_reason: Option<String>,
    /// The limits, and the requests in line for admission.
    pub admission: AdmissionReport,
    pub tokens_generated: u64,
    /// Prompt positions copied from another sequence's KV instead of computed.
    pub prefix_positions: u64,
    pub moves: MoveTotals,
}

/// Pipeline switches and the moves of requests they made, since the coordinator
/// started (counters: they only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MoveTotals {
    /// Times the requests were put on a new pipeline.
    pub switches: u64,
    /// Requests moved with their KV cache (transfers started).
    pub transferred: u64,
    /// Of those, transfers that failed (the request was replayed instead).
    pub transfers_failed: u64,
    /// Requests moved by replay, fallbacks included.
    pub replayed: u64,
    /// Drains finished, and their durations added up (from the command to the
    /// node's memory being free).
    #[serde(default)]
    pub drains: u64,
    #[serde(default)]
    pub drain_seconds: f64,
}

/// To the scheduler.
pub(crate) enum SchedulerMsg {
    Start {
        id: RequestId,
        request: GenerateRequest,
        direct: bool,
        ignore_eos: bool,
        events: mpsc::Sender<GenerateEvent>,
        /// The span the request arrived in (the API's): its trace's parent.
        parent: tracing::Span,
    },
    Event {
        event: WorkerEvent,
    },
    /// Run everything on `pipeline` from now on (`None`: park everything, because of
    /// `reason`). `old_alive`: the pipeline it replaces still works, so requests may
    /// move with their KV caches. Replies, once every transfer has settled, with how
    /// the requests were moved.
    Switch {
        pipeline: Option<PipelineLink>,
        reason: String,
        old_alive: bool,
        done: oneshot::Sender<Moved>,
    },
    /// Replies, once every request moved by the last switch has produced a token
    /// again (or ended), with the longest pause a client saw.
    AwaitResumed {
        reply: oneshot::Sender<Resumed>,
    },
    /// A drain finished in this many seconds (for the totals).
    DrainFinished {
        seconds: f64,
    },
    Status {
        reply: oneshot::Sender<SchedulerStatus>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
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

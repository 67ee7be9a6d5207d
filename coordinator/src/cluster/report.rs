//! What the cluster tells its operators: `strata status`, `strata drain` and
//! `strata undrain` answers, as the HTTP admin API returns them.

use serde::{Deserialize, Serialize};
use strata_proto::v1;

/// One worker, as `strata status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    pub name: String,
    pub address: String,
    pub node_id: String,
    /// `ready`, `draining` or `gone`.
    pub state: String,
    /// Devices as `NAME (MEMORY)`.
    pub devices: Vec<String>,
    pub memory_offered_bytes: u64,
    pub memory_used_bytes: u64,
    /// Of that, the KV caches (the rest is weights).
    #[serde(default)]
    pub kv_cache_bytes: u64,
    /// Measured weight bytes the device reads per second (0: not measured).
    pub bandwidth_bytes_per_second: f64,
    /// The layers it holds in the current pipeline.
    pub layers: Option<[usize; 2]>,
    pub stage: Option<usize>,
    pub sequences: u32,
    /// Token positions its layers computed per second over the last few seconds
    /// (prompt tokens included).
    #[serde(default)]
    pub measured_tokens_per_second: f64,
    /// Its measured compute time per forward step over the last few seconds, next
    /// to the planner's prediction for one stream's step (a batched step reads the
    /// weights once for every sequence in it, so under load it costs about the
    /// same).
    #[serde(default)]
    pub measured_step_ms: Option<f64>,
    #[serde(default)]
    pub predicted_step_ms: Option<f64>,
    /// Why it is gone, or why it drains by itself (`yielding to game.exe (pid 4)`).
    pub reason: Option<String>,
    /// Shards it is pulling from the coordinator right now.
    #[serde(default)]
    pub pulls: Vec<PullReport>,
    /// Its links to the workers it streams frames to.
    #[serde(default)]
    pub links: Vec<LinkReport>,
    /// Since the worker started: frames its stages computed, and the seconds they
    /// waited in its queue before their forward began, summed.
    #[serde(default)]
    pub frames_computed: u64,
    #[serde(default)]
    pub queue_seconds: f64,
    /// Its tokens and errors come to the coordinator over a Unix socket (the
    /// coordinator runs on its machine).
    #[serde(default)]
    pub events_local_lane: bool,
}

/// A node's link to a worker it streams frames to, as its heartbeats report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkReport {
    /// The worker at the other end: its name where the coordinator knows the
    /// address, else the address.
    pub to: String,
    pub address: String,
    /// Since the sending worker started.
    pub bytes_sent: u64,
    /// The last round trip of a small call over the link (none measured yet).
    pub rtt_ms: Option<f64>,
    /// Its frames go over a Unix socket (both workers on one machine).
    #[serde(default)]
    pub local_lane: bool,
}

/// A shard a worker is pulling, as its heartbeats report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PullReport {
    /// The shard's layers, end exclusive.
    pub layers: [usize; 2],
    /// Bytes of the shard file the worker holds (those kept from a cut pull
    /// included), and the file's size.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Received over the last few seconds.
    pub bytes_per_second: f64,
}

impl From<&v1::PullProgress> for PullReport {
    fn from(p: &v1::PullProgress) -> Self {
        Self {
            layers: [p.layer_start as usize, p.layer_end as usize],
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            bytes_per_second: p.bytes_per_second,
        }
    }
}

/// The cluster, as `strata status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub model: String,
    pub layers: usize,
    pub pipeline_id: Option<u64>,
    pub nodes: Vec<NodeReport>,
    /// Requests admitted (each holds one of the planned sequences), and those of
    /// them waiting for capacity (a pipeline).
    pub in_flight: usize,
    pub waiting: usize,
    /// Why there is no pipeline, while there is none.
    pub waiting_reason: Option<String>,
    /// The plan's limits, and the requests queued beyond them.
    #[serde(default)]
    pub admission: AdmissionReport,
    /// The planner's prediction for one stream on the current pipeline.
    pub predicted_tokens_per_second: Option<f64>,
    /// Tokens per second the cluster delivered over the last few seconds.
    pub measured_tokens_per_second: f64,
    /// How many times the membership has changed: two statuses with the same
    /// generation saw the same workers in the same states.
    #[serde(default)]
    pub membership_generation: u64,
    /// Between the nodes: `mutual TLS`, or `insecure` (`--insecure`: plain TCP).
    #[serde(default)]
    pub transport: String,
    /// Workers that reached the coordinator and were not taken, newest last.
    #[serde(default)]
    pub refused: Vec<RefusalReport>,
    /// Pipeline switches and request moves since the coordinator started.
    #[serde(default)]
    pub moves: super::messages::MoveTotals,
    /// Bytes of shard files the workers pulled from the coordinator since it
    /// started.
    #[serde(default)]
    pub weight_pull_bytes: u64,
    /// Prompt positions the stages copied from another sequence's KV instead of
    /// computing them (choices of one request, later turns of a conversation),
    /// since the coordinator started.
    #[serde(default)]
    pub prefix_positions: u64,
}

/// A worker refused (see `membership::Refusal`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefusalReport {
    pub address: String,
    pub reason: String,
    pub seconds_ago: f64,
}

/// Admission: at most `sequences` requests run at once (the plan sized every KV
/// cache for that many); the rest wait in line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdmissionReport {
    /// Sequences the plan sized the KV caches for.
    pub sequences: usize,
    /// Tokens of context each of them may reach (`--context`, at most the model's).
    pub context: usize,
    /// Requests waiting for a sequence, first in line first.
    pub queue: Vec<QueuedRequest>,
    /// Why they wait (`4 of 4 planned sequences running`), while any do.
    pub reason: Option<String>,
}

/// A request waiting for admission.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueuedRequest {
    /// 1 for the next to be admitted.
    pub position: usize,
    /// The coordinator's id of the request (as its logs name it).
    pub request: u64,
    pub waited_seconds: f64,
}

/// What a drain did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DrainReport {
    pub node: String,
    /// False when the command returned as soon as the drain began (no `--wait`).
    pub finished: bool,
    pub sequences_moved: usize,
    /// Of those, moved with their KV caches, and replayed.
    #[serde(default)]
    pub sequences_transferred: usize,
    #[serde(default)]
    pub sequences_replayed: usize,
    pub memory_freed_bytes: u64,
    /// From the command to the node's memory being free.
    pub seconds: f64,
    /// The longest gap between two tokens a client saw while its request moved.
    pub longest_pause_seconds: f64,
    /// The longest time from the switch to a moved request's next token (the pause
    /// less what came before the switch: the old pipeline serves while the new loads).
    #[serde(default)]
    pub longest_resume_seconds: f64,
    /// With `--force` and too little left: new requests wait for capacity.
    pub requests_wait: bool,
    pub message: String,
}

/// Why a drain or undrain was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no worker is named `{node}` (known: {known})")]
    UnknownNode { node: String, known: String },
    #[error("`{0}` is already draining")]
    AlreadyDraining(String),
    #[error("`{0}` is not draining")]
    NotDraining(String),
    #[error("`{node}` is gone ({reason}); there is nothing to drain")]
    Gone { node: String, reason: String },
    #[error("draining `{node}` would leave too little to hold the model: {reason}; `--force` drains it anyway and new requests wait until capacity returns")]
    WouldNotFit { node: String, reason: String },
    #[error("the cluster is shutting down")]
    ShuttingDown,
    #[error("this coordinator runs --insecure: there are no certificates to revoke")]
    Insecure,
    #[error("cannot record the revocation: {0}")]
    Revocation(String),
}

impl AdminError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            AdminError::UnknownNode { .. } => 404,
            AdminError::AlreadyDraining(_) | AdminError::NotDraining(_) | AdminError::Gone { .. } => 409,
            AdminError::WouldNotFit { .. } => 409,
            AdminError::ShuttingDown => 503,
            AdminError::Insecure => 409,
            AdminError::Revocation(_) => 500,
        }
    }
}

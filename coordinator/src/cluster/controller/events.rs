//! What the controller's parts exchange — the decision core, the executor and
//! the pipeline keeper: events in, actions out, the keeper's jobs. A leaf that
//! none of them owns, so none imports another.

use std::collections::HashMap;

use strata_proto::v1::WorkerState;
use strata_proto::{CallError, PipelineId};

use super::super::membership::{Member, NodeStatus};
use super::super::messages::Moved;
use super::super::report::{AdminError, DrainReport};

/// One job of the pipeline keeper, numbered in the order asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

/// Someone waiting for an answer: an admin call or the shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaiterId(pub u64);

/// What the pipeline keeper does, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Bring the pipeline in line with the best plan for the workers there are.
    /// `park_first`: a worker of the pipeline is broken; its requests wait at
    /// once rather than when the new plan is made.
    Reconcile { why: String, park_first: bool },
    /// Something failed but no worker is broken: run the requests that were
    /// parked again on the pipeline serving.
    Resume,
    /// Retry loads whose backoff has run out (or load a pipeline if none serves
    /// and one fits), and unload shards of pipelines no longer served.
    Housekeeping,
    /// The coordinator stops: unload every stage.
    Retire,
}

/// What a finished job left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Switched {
    pub moved: Moved,
    /// Bytes each worker freed when the old pipeline was unloaded, by address.
    pub freed: HashMap<String, u64>,
}

/// The pipeline serving: its id and its stages' addresses, first to last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub pipeline: PipelineId,
    pub addresses: Vec<String>,
}

/// A job the keeper finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDone {
    pub id: JobId,
    /// The pipeline serving now, if one is.
    pub serving: Option<Serving>,
    pub switched: Switched,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The membership changed: a worker joined, was forgotten, or changed its
    /// status.
    MembersChanged,
    /// A worker stopped answering (its event stream broke, a call did not get
    /// through).
    Lost {
        address: String,
        reason: String,
    },
    /// A gone worker answered a probe.
    Answered {
        member: Member,
    },
    /// A probe of a gone worker got no answer.
    ProbeEnded {
        address: String,
    },
    /// A worker that answered again was asked to drop its stale shards.
    Cleaned {
        member: Member,
        result: Result<(), CallError>,
    },
    Drain {
        node: String,
        force: bool,
        wait: bool,
        waiter: WaiterId,
    },
    Undrain {
        node: String,
        waiter: WaiterId,
    },
    /// The worker was told (or could not be told) its drain state.
    DrainStateSent {
        address: String,
        draining: bool,
    },
    /// Something in the pipeline failed: a broken stream, a sequence error that
    /// points at a worker.
    Trouble {
        reason: String,
    },
    /// The states the pipeline's workers answered with after [`Event::Trouble`]
    /// (`None`: no answer).
    Health {
        reason: String,
        states: Vec<(String, Option<WorkerState>)>,
    },
    JobDone(JobDone),
    /// Once a second.
    Tick,
    Shutdown {
        waiter: WaiterId,
    },
}

/// An answer to a waiter.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Drain(Result<DrainReport, AdminError>),
    Undrain(Result<String, AdminError>),
    Done,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect to a worker and follow its events.
    Follow(String),
    /// Stop following a worker and forget its connection.
    Unfollow(String),
    SetStatus(String, NodeStatus),
    /// Tell the worker its drain state; [`Event::DrainStateSent`] follows.
    TellDraining {
        address: String,
        draining: bool,
    },
    /// Ask the pipeline's workers their state as far as it is concerned;
    /// [`Event::Health`] follows.
    CheckHealth {
        reason: String,
        serving: Serving,
    },
    /// Ask a gone worker whether it is back: [`Event::Answered`] or
    /// [`Event::ProbeEnded`] follows.
    Probe(String),
    /// Have a worker that is back drop its stale shards; [`Event::Cleaned`] follows.
    Clean(Member),
    /// Take a worker (back) into the membership.
    Admit(Member),
    /// Give the pipeline keeper a job; [`Event::JobDone`] follows.
    Run(JobId, Job),
    Reply(WaiterId, Reply),
    /// A drain is done: log it, and answer its waiter (if it waits) once the moved
    /// requests run again.
    FinishDrain {
        waiter: Option<WaiterId>,
        report: DrainReport,
    },
    /// Stop what runs beside the keeper (links, probes): the coordinator stops.
    Stop,
    /// The controller's work is done.
    Exit,
}

//! The controller: decides where the layers live, and never waits while deciding.
//!
//! * [`decision_core`]: the decisions — state, one event in, the actions out; no I/O.
//! * this module, the executor: turns what happens (admin calls, the membership
//!   changing, a tick, a task finishing) into events for the core, and carries
//!   out its actions. Each slow one (connecting to and following a worker,
//!   telling it its drain state, probing a gone one, cleaning one that is back,
//!   checking the pipeline's health) runs in a task of its own and reports back
//!   as an event, so a worker cut off from the network holds up nothing.
//! * [`keeper`]: the one task that changes the pipeline serving, one job at a
//!   time (a load can take minutes: meanwhile drains, losses and shutdown are
//!   decided as they come).
//! * [`events`]: what they exchange; [`follow`]: following one worker's events,
//!   over a local lane ([`event_lane`]) where it runs on this machine;
//!   [`clients`]: the connections.

mod clients;
mod decision_core;
mod event_lane;
mod events;
mod follow;
mod keeper;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::{self, WireDtype};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::clients::Clients;
use self::decision_core::{ControlCore, Snapshot};
use self::events::{Action, Event, Job, JobId, Reply, WaiterId};
use self::keeper::PipelineKeeper;
use super::membership::{self, Membership};
use super::messages::{Control, Placement, SchedulerMsg};
use super::model::ServedModel;
use super::placement::PlacementPolicy;
use super::report::{AdminError, DrainReport};
use super::status_view::StatusView;
use super::{HopSamples, WorkerClient};
use crate::planner::{ModelSpec, PlanOptions};

/// How often gone workers are asked whether they are back, and failed loads
/// retried when due.
const TICK: Duration = Duration::from_secs(1);

/// How long a worker that answered again may take to drop its stale shards.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a worker may take to take in its drain state.
const SET_DRAINING_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a drain waits for the moved requests to produce a token again before
/// it reports.
const RESUME_WAIT: Duration = Duration::from_secs(30);

/// What the controller is started with.
pub(super) struct ControllerSpec {
    pub model: Arc<ServedModel>,
    pub membership: Arc<Membership>,
    pub policy: PlacementPolicy,
    pub options: PlanOptions,
    pub wire_dtype: WireDtype,
    pub weights_source: super::WeightsSource,
    pub scheduler: mpsc::UnboundedSender<SchedulerMsg>,
    pub token_hops: Arc<HopSamples>,
    /// Set when the coordinator stops: a load in progress is abandoned.
    pub stop: watch::Receiver<bool>,
    /// Where status reads the pipeline and the load failures from.
    pub view: Arc<StatusView>,
}

/// Who waits for an answer, by the id the core knows them by.
enum Waiter {
    Drain(oneshot::Sender<Result<DrainReport, AdminError>>),
    Undrain(oneshot::Sender<Result<String, AdminError>>),
    Done(oneshot::Sender<()>),
}

pub(super) struct Controller {
    spec: Arc<ControllerSpec>,
    model_spec: ModelSpec,
    core: ControlCore,
    clients: Arc<Clients>,
    /// Until [`Self::run`] starts it in a task of its own.
    keeper: Option<PipelineKeeper>,
    jobs: mpsc::UnboundedSender<(JobId, Job)>,
    jobs_rx: Option<mpsc::UnboundedReceiver<(JobId, Job)>>,
    /// Events the executor's tasks and the keeper report.
    events: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// The tasks following workers, by address.
    links: HashMap<String, JoinHandle<()>>,
    /// Tasks probing or cleaning a gone worker, by address.
    probes: HashMap<String, JoinHandle<()>>,
    waiters: HashMap<WaiterId, Waiter>,
    next_waiter: u64,
}

impl Controller {
    pub fn new(spec: ControllerSpec, control: mpsc::UnboundedSender<Control>) -> Self {
        let spec = Arc::new(spec);
        let model_spec = ModelSpec::from_gguf(spec.model.card.id.clone(), &spec.model.file);
        let clients = Arc::new(Clients::default());
        let (events, events_rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let keeper = PipelineKeeper::new(spec.clone(), model_spec.clone(), clients.clone(), control, events.clone());
        let core =
            ControlCore::new(model_spec.clone(), spec.policy.clone(), spec.options.clone(), None, Vec::new());
        Self {
            spec,
            model_spec,
            core,
            clients,
            keeper: Some(keeper),
            jobs,
            jobs_rx: Some(jobs_rx),
            events,
            events_rx,
            links: HashMap::new(),
            probes: HashMap::new(),
            waiters: HashMap::new(),
            next_waiter: 1,
        }
    }

    /// Follows the workers there are, then plans and loads the first pipeline:
    /// its stages, or why none could be built yet. Either way the controller goes
    /// on ([`Self::run`]): it retries failed loads with backoff and plans without a
    /// worker that keeps failing, and requests wait meanwhile.
    pub async fn start(&mut self) -> Result<Vec<Placement>, String> {
        let members = self.spec.membership.members();
        let live: Vec<String> = members
            .iter()
            .filter(|m| !matches!(m.status, membership::NodeStatus::Gone { .. }))
            .map(|m| m.address.clone())
            .collect();
        for address in &live {
            self.follow(address.clone());
        }
        let Some(keeper) = self.keeper.as_mut() else { return Err("the controller has started already".into()) };
        keeper.perform(Job::Reconcile { why: "the cluster starts".into(), park_first: false }).await;
        let (serving, placements) = (keeper.serving(), keeper.placements());
        self.core = ControlCore::new(
            self.model_spec.clone(),
            self.spec.policy.clone(),
            self.spec.options.clone(),
            serving,
            live,
        );
        match placements {
            Some(p) => Ok(p),
            None => Err(keeper.waiting_reason()),
        }
    }

    pub async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        if let (Some(keeper), Some(jobs)) = (self.keeper.take(), self.jobs_rx.take()) {
            tokio::spawn(keeper.run(jobs));
        }
        let mut changes = self.spec.membership.changes();
        let mut tick = tokio::time::interval(TICK);
        // Whatever changed while the first pipeline loaded.
        let mut next = Some(Event::MembersChanged);
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    msg = control.recv() => match msg {
                        Some(msg) => self.event_of(msg),
                        None => break,
                    },
                    Some(event) = self.events_rx.recv() => event,
                    change = changes.recv() => match change {
                        // Fell behind: the core reads the whole list anyway.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => Event::MembersChanged,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tick.tick() => Event::Tick,
                },
            };
            let (generation, members) = self.spec.membership.snapshot();
            let failed = self.spec.view.load_failures();
            let snapshot = Snapshot { generation, members: &members, failed: &failed, now: Instant::now() };
            for action in self.core.on(event, &snapshot) {
                if !self.execute(action) {
                    return;
                }
            }
        }
    }

    /// The event a message is, its reply channel kept under a waiter id.
    fn event_of(&mut self, msg: Control) -> Event {
        match msg {
            Control::Trouble { reason } => Event::Trouble { reason },
            Control::Drain { node, force, wait, reply } => {
                Event::Drain { node, force, wait, waiter: self.wait_with(Waiter::Drain(reply)) }
            }
            Control::Undrain { node, reply } => Event::Undrain { node, waiter: self.wait_with(Waiter::Undrain(reply)) },
            Control::Shutdown { done } => Event::Shutdown { waiter: self.wait_with(Waiter::Done(done)) },
            Control::Revoked { address } => Event::Lost { address, reason: "its certificate was revoked".into() },
        }
    }

    fn wait_with(&mut self, waiter: Waiter) -> WaiterId {
        let id = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        self.waiters.insert(id, waiter);
        id
    }

    /// Carries out one action, never waiting on a worker; false to stop.
    fn execute(&mut self, action: Action) -> bool {
        match action {
            Action::Follow(address) => self.follow(address),
            Action::Unfollow(address) => {
                if let Some(link) = self.links.remove(&address) {
                    link.abort();
                }
                self.clients.forget(&address);
            }
            Action::SetStatus(address, status) => {
                if let membership::NodeStatus::Gone { reason, .. } = &status {
                    tracing::warn!(%address, %reason, "worker gone");
                }
                self.spec.membership.set_status(&address, status);
            }
            Action::TellDraining { address, draining } => self.tell_draining(address, draining),
            Action::CheckHealth { reason, serving } => {
                let (clients, events) = (self.clients.clone(), self.events.clone());
                tokio::spawn(async move {
                    let states = clients.health(&serving.addresses, Some(serving.pipeline)).await;
                    let states = serving.addresses.into_iter().zip(states).collect();
                    let _ = events.send(Event::Health { reason, states });
                });
            }
            Action::Probe(address) => self.probe(address),
            Action::Clean(member) => self.clean(member),
            Action::Admit(member) => {
                tracing::info!(address = %member.address, name = %member.name(), "worker is back");
                self.spec.membership.add(member);
            }
            Action::Run(id, job) => {
                if self.jobs.send((id, job)).is_err() {
                    tracing::error!("the pipeline keeper has stopped");
                    return false;
                }
            }
            Action::Reply(waiter, reply) => self.reply(waiter, reply),
            Action::FinishDrain { waiter, report } => {
                let waiter = waiter.and_then(|w| self.waiters.remove(&w));
                finish_drain(report, waiter, self.spec.scheduler.clone());
            }
            Action::Stop => {
                for (_, task) in self.links.drain().chain(self.probes.drain()) {
                    task.abort();
                }
            }
            Action::Exit => return false,
        }
        true
    }

    fn reply(&mut self, waiter: WaiterId, reply: Reply) {
        match (self.waiters.remove(&waiter), reply) {
            (Some(Waiter::Drain(tx)), Reply::Drain(r)) => {
                let _ = tx.send(r);
            }
            (Some(Waiter::Undrain(tx)), Reply::Undrain(r)) => {
                let _ = tx.send(r);
            }
            (Some(Waiter::Done(tx)), Reply::Done) => {
                let _ = tx.send(());
            }
            (None, _) => {}
            (Some(_), reply) => tracing::error!(?waiter, ?reply, "an answer of the wrong kind; dropped"),
        }
    }

    /// Connects to a worker and follows its events in a task of its own; a
    /// connection that fails reports the worker lost.
    fn follow(&mut self, address: String) {
        if self.links.get(&address).is_some_and(|l| !l.is_finished()) {
            return;
        }
        let (clients, events, spec) = (self.clients.clone(), self.events.clone(), self.spec.clone());
        let task_address = address.clone();
        let task = tokio::spawn(async move {
            let address = task_address;
            match clients.get(&address).await {
                Ok(client) => {
                    let (scheduler, membership, hops) =
                        (spec.scheduler.clone(), spec.membership.clone(), spec.token_hops.clone());
                    follow::follow_worker(address, client, scheduler, events, membership, hops).await;
                }
                Err(e) => {
                    let _ = events.send(Event::Lost { address, reason: e.to_string() });
                }
            }
        });
        self.links.insert(address, task);
    }

    fn tell_draining(&self, address: String, draining: bool) {
        let (clients, events) = (self.clients.clone(), self.events.clone());
        tokio::spawn(async move {
            let set = |mut c: WorkerClient| async move { c.set_draining(v1::SetDrainingRequest { draining }).await };
            if let Err(e) = clients.call(&address, SET_DRAINING_TIMEOUT, set).await {
                // Not fatal: the membership holds the drain state the plan uses; a
                // worker that missed it says so in its heartbeats, and one that
                // did not get the call is soon found gone.
                tracing::warn!(%address, error = %e, kind = ?e.kind(), "could not tell the worker its drain state");
            }
            let _ = events.send(Event::DrainStateSent { address, draining });
        });
    }

    /// Asks a gone worker whether it is back, in a task of its own (a worker cut
    /// off from the network answers nothing).
    fn probe(&mut self, address: String) {
        let events = self.events.clone();
        let task_address = address.clone();
        let task = tokio::spawn(async move {
            let address = task_address;
            let described = tokio::time::timeout(TICK, membership::describe_once(&address)).await;
            let event = match described {
                Ok(Ok(member)) => Event::Answered { member },
                _ => Event::ProbeEnded { address },
            };
            let _ = events.send(event);
        });
        self.probes.insert(address, task);
    }

    /// A gone worker answers again: its stages died with the pipeline it was cut
    /// from, so whatever it holds is stale and is unloaded before it is taken in.
    fn clean(&mut self, member: membership::Member) {
        let (clients, events) = (self.clients.clone(), self.events.clone());
        let address = member.address.clone();
        let task = tokio::spawn(async move {
            let unload_all = |mut c: WorkerClient| async move { c.unload_shard(v1::UnloadShardRequest::all()).await };
            let result = clients.call(&member.address, CLEANUP_TIMEOUT, unload_all).await.map(|_| ());
            if let Err(e) = &result {
                tracing::warn!(address = %member.address, error = %e, "a worker that answered again could not unload");
            }
            let _ = events.send(Event::Cleaned { member, result });
        });
        self.probes.insert(address, task);
    }
}

/// Logs a finished drain and, if someone waits for it, answers once the moved
/// requests produce a token again (up to [`RESUME_WAIT`], in a task of its own).
fn finish_drain(mut report: DrainReport, waiter: Option<Waiter>, scheduler: mpsc::UnboundedSender<SchedulerMsg>) {
    tracing::info!(
        node = %report.node,
        transferred = report.sequences_transferred,
        replayed = report.sequences_replayed,
        freed_bytes = report.memory_freed_bytes,
        "drained in {:.2}s",
        report.seconds
    );
    let _ = scheduler.send(SchedulerMsg::DrainFinished { seconds: report.seconds });
    let Some(Waiter::Drain(reply)) = waiter else { return };
    tokio::spawn(async move {
        let mut resumed_in_time = true;
        if report.sequences_moved > 0 {
            let (tx, rx) = oneshot::channel();
            if scheduler.send(SchedulerMsg::AwaitResumed { reply: tx }).is_ok() {
                match tokio::time::timeout(RESUME_WAIT, rx).await {
                    Ok(Ok(resumed)) => {
                        report.longest_pause_seconds = resumed.longest_pause.as_secs_f64();
                        report.longest_resume_seconds = resumed.longest_resume.as_secs_f64();
                    }
                    _ => resumed_in_time = false,
                }
            }
        }
        report.finished = true;
        let pause = if resumed_in_time {
            format!("longest pause a client saw {:.0} ms", report.longest_pause_seconds * 1e3)
        } else {
            format!("not every moved request had resumed after {}s", RESUME_WAIT.as_secs())
        };
        report.message = format!(
            "{} drained in {:.2}s: {} freed, {} sequence(s) moved ({} with their KV cache, {} replayed), {pause}{}",
            report.node,
            report.seconds,
            crate::planner::format_bytes(report.memory_freed_bytes),
            report.sequences_moved,
            report.sequences_transferred,
            report.sequences_replayed,
            if report.requests_wait {
                "; what is left cannot hold the model: new requests wait for capacity"
            } else {
                ""
            }
        );
        let _ = reply.send(Ok(report));
    });
}

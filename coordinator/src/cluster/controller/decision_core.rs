//! The controller's decision core: its state, one event in, the actions to take
//! out. No I/O and no waiting, so a load that takes minutes never holds up a
//! drain, a lost worker or a shutdown, and every case is unit-tested on scripted
//! sequences of events.
//!
//! The slow work is the executor's ([`super`]): following a worker, telling it
//! its drain state, probing a gone one, cleaning one that came back and checking
//! the pipeline's health each run concurrently in tasks of their own, and report
//! back as events. What changes the pipeline serving (loading a plan, parking or
//! resuming the requests, unloading) is a [`Job`] for the pipeline keeper
//! ([`super::keeper`]), which runs one job at a time — there is one pipeline —
//! while the core goes on deciding. Jobs asked for while one runs wait in a queue,
//! where re-plans merge into one; a `drain --wait` or an undrain registers a
//! waiter that is answered when the job covering it is done.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use strata_proto::v1::WorkerState;

use super::super::backoff::LoadFailures;
use super::super::decision;
use super::super::membership::{Member, NodeStatus};
use super::super::placement::{self, PlacementError, PlacementPolicy};
use super::super::report::{AdminError, DrainReport};
use super::events::{Action, Event, Job, JobDone, JobId, Reply, Serving, WaiterId};
use crate::planner::{ModelSpec, PlanOptions};

/// What an event is decided on, besides the core's own state.
pub struct Snapshot<'a> {
    /// The membership's generation: how many changes `members` has seen.
    pub generation: u64,
    pub members: &'a [Member],
    /// Workers whose loads failed, by address.
    pub failed: &'a LoadFailures,
    pub now: Instant,
}

impl Snapshot<'_> {
    fn member(&self, address: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.address == address)
    }

    fn is_gone(&self, address: &str) -> bool {
        self.member(address).is_some_and(|m| matches!(m.status, NodeStatus::Gone { .. }))
    }
}

/// What a waiter waits for.
#[derive(Debug)]
enum Awaited {
    Drain { waiter: Option<WaiterId>, name: String, address: String, started: Instant, requests_wait: bool },
    Undrain { waiter: WaiterId, name: String, started: Instant },
    Shutdown { waiter: WaiterId },
}

/// An undrain whose worker is being told it may take layers again.
#[derive(Debug)]
struct PendingUndrain {
    waiter: WaiterId,
    name: String,
    started: Instant,
}

pub struct ControlCore {
    model: ModelSpec,
    policy: PlacementPolicy,
    options: PlanOptions,
    /// Workers whose events are followed, by address.
    followed: BTreeSet<String>,
    /// Gone workers being asked whether they are back (or cleaned), by address.
    probing: BTreeSet<String>,
    /// The pipeline serving, if one is.
    serving: Option<Serving>,
    running: Option<JobId>,
    queued: VecDeque<(JobId, Job)>,
    /// Waiters answered when the job `.0` is done.
    awaiting: Vec<(JobId, Awaited)>,
    undrains: HashMap<String, PendingUndrain>,
    stopping: bool,
    next_job: u64,
    /// The membership's generation the last re-plan was asked for at.
    generation: u64,
}

impl ControlCore {
    /// `serving`: the pipeline the first load left (none if it failed);
    /// `followed`: the workers followed already.
    pub fn new(
        model: ModelSpec,
        policy: PlacementPolicy,
        options: PlanOptions,
        serving: Option<Serving>,
        followed: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            model,
            policy,
            options,
            followed: followed.into_iter().collect(),
            probing: BTreeSet::new(),
            serving,
            running: None,
            queued: VecDeque::new(),
            awaiting: Vec::new(),
            undrains: HashMap::new(),
            stopping: false,
            next_job: 1,
            generation: 0,
        }
    }

    pub fn on(&mut self, event: Event, snap: &Snapshot<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::MembersChanged => self.members_changed(snap, &mut out),
            Event::Lost { address, reason } => self.lost(&address, &reason, snap, &mut out),
            Event::Answered { member } => {
                if !self.stopping && snap.is_gone(&member.address) {
                    out.push(Action::Clean(member));
                } else {
                    self.probing.remove(&member.address);
                }
            }
            Event::ProbeEnded { address } => {
                self.probing.remove(&address);
            }
            Event::Cleaned { member, result } => {
                self.probing.remove(&member.address);
                // One that could not drop them stays gone, and is asked again (over a
                // new connection if the call did not get through).
                if result.is_ok() && !self.stopping {
                    out.push(Action::Admit(member));
                }
            }
            Event::Drain { node, force, wait, waiter } => self.drain(&node, force, wait, waiter, snap, &mut out),
            Event::Undrain { node, waiter } => self.undrain(&node, waiter, snap, &mut out),
            Event::DrainStateSent { address, draining } => {
                if let (false, Some(u)) = (draining, self.undrains.remove(&address)) {
                    out.push(Action::SetStatus(address, NodeStatus::Ready));
                    let job = self.reconcile(format!("{} is back", u.name), false, &mut out);
                    self.awaiting.push((job, Awaited::Undrain { waiter: u.waiter, name: u.name, started: u.started }));
                }
            }
            Event::Trouble { reason } => {
                if let Some(serving) = self.serving.clone().filter(|_| !self.stopping) {
                    out.push(Action::CheckHealth { reason, serving });
                }
            }
            Event::Health { reason, states } => self.health(&reason, states, snap, &mut out),
            Event::JobDone(done) => self.job_done(done, snap, &mut out),
            Event::Tick => self.tick(snap, &mut out),
            Event::Shutdown { waiter } => self.shutdown(waiter, &mut out),
        }
        out
    }

    /// Asks the keeper for `job`: now if it is idle, else after what it has. A
    /// re-plan asked while one waits in the queue merges into it. The job that
    /// will cover the request.
    fn schedule(&mut self, job: Job, out: &mut Vec<Action>) -> JobId {
        if let Job::Reconcile { park_first, .. } = &job {
            let queued = self.queued.iter_mut().find(|(_, j)| matches!(j, Job::Reconcile { .. }));
            if let Some((id, Job::Reconcile { park_first: queued_park, .. })) = queued {
                *queued_park |= *park_first;
                return *id;
            }
        }
        if job == Job::Resume || job == Job::Housekeeping {
            if let Some((id, _)) = self.queued.iter().find(|(_, j)| *j == job) {
                return *id;
            }
        }
        let id = JobId(self.next_job);
        self.next_job += 1;
        if self.running.is_none() {
            self.running = Some(id);
            out.push(Action::Run(id, job));
        } else {
            self.queued.push_back((id, job));
        }
        id
    }

    fn reconcile(&mut self, why: String, park_first: bool, out: &mut Vec<Action>) -> JobId {
        self.schedule(Job::Reconcile { why, park_first }, out)
    }

    fn members_changed(&mut self, snap: &Snapshot<'_>, out: &mut Vec<Action>) {
        // Changes come one event each, but each reads the whole list: one that
        // read a later list already covered this one.
        if self.stopping || snap.generation <= self.generation {
            return;
        }
        self.generation = snap.generation;
        // Forgotten (an mDNS goodbye): nothing to follow any more.
        let forgotten: Vec<String> = self.followed.iter().filter(|a| snap.member(a).is_none()).cloned().collect();
        for address in forgotten {
            self.followed.remove(&address);
            out.push(Action::Unfollow(address));
        }
        for m in snap.members {
            if !matches!(m.status, NodeStatus::Gone { .. }) && self.followed.insert(m.address.clone()) {
                out.push(Action::Follow(m.address.clone()));
            }
        }
        self.reconcile("the workers changed".into(), false, out);
    }

    fn lost(&mut self, address: &str, reason: &str, snap: &Snapshot<'_>, out: &mut Vec<Action>) {
        let followed = self.followed.remove(address);
        let Some(member) = snap.member(address) else {
            // Forgotten meanwhile (an mDNS goodbye): only its link is left.
            if followed {
                out.push(Action::Unfollow(address.to_string()));
            }
            return;
        };
        let gone = matches!(member.status, NodeStatus::Gone { .. });
        if gone && !followed {
            // Already handled: the follower and a failed call both report it.
            return;
        }
        out.push(Action::Unfollow(address.to_string()));
        if !gone {
            out.push(Action::SetStatus(
                address.to_string(),
                NodeStatus::Gone { since: snap.now, reason: reason.to_string() },
            ));
        }
        if !self.stopping {
            self.reconcile(format!("{address} is gone: {reason}"), false, out);
        }
    }

    fn find<'a>(&self, node: &str, snap: &'a Snapshot<'_>) -> Result<&'a Member, AdminError> {
        if self.stopping {
            return Err(AdminError::ShuttingDown);
        }
        snap.members.iter().find(|m| m.is(node)).ok_or_else(|| {
            let names: Vec<&str> = snap.members.iter().map(|m| m.name()).collect();
            AdminError::UnknownNode {
                node: node.to_string(),
                known: if names.is_empty() { "none".into() } else { names.join(", ") },
            }
        })
    }

    fn drain(
        &mut self,
        node: &str,
        force: bool,
        wait: bool,
        waiter: WaiterId,
        snap: &Snapshot<'_>,
        out: &mut Vec<Action>,
    ) {
        let refuse = |out: &mut Vec<Action>, e: AdminError| out.push(Action::Reply(waiter, Reply::Drain(Err(e))));
        let member = match self.find(node, snap) {
            Ok(m) => m,
            Err(e) => return refuse(out, e),
        };
        let name = member.name().to_string();
        match &member.status {
            NodeStatus::Draining if !member.heartbeat.drain_reason.is_empty() => {
                // It drained itself (yielding to a game); the ask is recorded on the
                // worker so it stays drained when the game ends.
                out.push(Action::TellDraining { address: member.address.clone(), draining: true });
                let message = format!(
                    "{name} was already draining ({}); it now stays drained after that, until `strata undrain {name}`",
                    member.heartbeat.drain_reason
                );
                let report = DrainReport { node: name, finished: true, message, ..DrainReport::default() };
                out.push(Action::Reply(waiter, Reply::Drain(Ok(report))));
                return;
            }
            NodeStatus::Draining => return refuse(out, AdminError::AlreadyDraining(name)),
            NodeStatus::Gone { reason, .. } => {
                return refuse(out, AdminError::Gone { node: name, reason: reason.clone() })
            }
            NodeStatus::Ready => {}
        }
        let others: Vec<Member> = decision::eligible(snap.members, snap.failed, snap.now)
            .into_iter()
            .filter(|m| m.address != member.address)
            .collect();
        let requests_wait = match placement::place(&self.model, &others, &self.policy, &self.options) {
            Ok(_) => false,
            Err(e) => {
                let reason = match e {
                    PlacementError::NoWorkers => "it is the last worker that can hold layers".to_string(),
                    other => other.to_string(),
                };
                if !force {
                    return refuse(out, AdminError::WouldNotFit { node: name, reason });
                }
                tracing::warn!(node = %name, %reason, "forced drain: requests will wait for capacity");
                true
            }
        };
        let address = member.address.clone();
        out.push(Action::TellDraining { address: address.clone(), draining: true });
        out.push(Action::SetStatus(address.clone(), NodeStatus::Draining));
        let job = self.reconcile(format!("draining {name}"), false, out);
        let waiter = if wait {
            Some(waiter)
        } else {
            let report = DrainReport {
                node: name.clone(),
                requests_wait,
                message: format!("draining {name}; `strata status` shows when it holds no layers"),
                ..DrainReport::default()
            };
            out.push(Action::Reply(waiter, Reply::Drain(Ok(report))));
            None
        };
        self.awaiting.push((job, Awaited::Drain { waiter, name, address, started: snap.now, requests_wait }));
    }

    fn undrain(&mut self, node: &str, waiter: WaiterId, snap: &Snapshot<'_>, out: &mut Vec<Action>) {
        let member = match self.find(node, snap) {
            Ok(m) => m,
            Err(e) => return out.push(Action::Reply(waiter, Reply::Undrain(Err(e)))),
        };
        if member.status != NodeStatus::Draining || self.undrains.contains_key(&member.address) {
            return out.push(Action::Reply(waiter, Reply::Undrain(Err(AdminError::NotDraining(member.name().into())))));
        }
        // A draining worker refuses loads: it is told first, and re-planned for once
        // it has been ([`Event::DrainStateSent`]).
        out.push(Action::TellDraining { address: member.address.clone(), draining: false });
        let pending = PendingUndrain { waiter, name: member.name().to_string(), started: snap.now };
        self.undrains.insert(member.address.clone(), pending);
    }

    fn health(
        &mut self,
        reason: &str,
        states: Vec<(String, Option<WorkerState>)>,
        snap: &Snapshot<'_>,
        out: &mut Vec<Action>,
    ) {
        if self.stopping {
            return;
        }
        let (mut broken, mut draining) = (false, false);
        for (address, state) in states {
            match state {
                None => {
                    self.followed.remove(&address);
                    out.push(Action::Unfollow(address.clone()));
                    if !snap.is_gone(&address) {
                        let status = NodeStatus::Gone { since: snap.now, reason: reason.to_string() };
                        out.push(Action::SetStatus(address, status));
                    }
                    broken = true;
                }
                // It holds no shard at all: restarted since it was loaded.
                Some(WorkerState::Idle) => {
                    tracing::warn!(%address, %reason, "a worker of the pipeline lost its shard");
                    broken = true;
                }
                // Stopping (SIGTERM) or drained at its machine: its heartbeat says so
                // within 300 ms, but the requests should not wait for it.
                Some(WorkerState::Draining) => {
                    if snap.member(&address).is_some_and(|m| m.status == NodeStatus::Ready) {
                        out.push(Action::SetStatus(address, NodeStatus::Draining));
                        draining = true;
                    }
                }
                Some(_) => {}
            }
        }
        if broken || draining {
            self.reconcile(reason.to_string(), broken, out);
        } else {
            self.schedule(Job::Resume, out);
        }
    }

    fn job_done(&mut self, done: JobDone, snap: &Snapshot<'_>, out: &mut Vec<Action>) {
        if self.running == Some(done.id) {
            self.running = None;
        }
        self.serving = done.serving;
        let (answered, left): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.awaiting).into_iter().partition(|(job, _)| *job == done.id);
        self.awaiting = left;
        for (_, awaited) in answered {
            match awaited {
                Awaited::Drain { waiter, name, address, started, requests_wait } => {
                    let moved = done.switched.moved;
                    let report = DrainReport {
                        node: name,
                        requests_wait,
                        seconds: snap.now.saturating_duration_since(started).as_secs_f64(),
                        sequences_moved: moved.total(),
                        sequences_transferred: moved.transferred,
                        sequences_replayed: moved.replayed,
                        memory_freed_bytes: done.switched.freed.get(&address).copied().unwrap_or(0),
                        ..DrainReport::default()
                    };
                    out.push(Action::FinishDrain { waiter, report });
                }
                Awaited::Undrain { waiter, name, started } => {
                    let moved = done.switched.moved;
                    let message = format!(
                        "{name} is back in service; re-planned in {:.2}s, {} sequence(s) moved ({} with their KV cache, {} replayed)",
                        snap.now.saturating_duration_since(started).as_secs_f64(),
                        moved.total(),
                        moved.transferred,
                        moved.replayed
                    );
                    out.push(Action::Reply(waiter, Reply::Undrain(Ok(message))));
                }
                Awaited::Shutdown { waiter } => {
                    out.push(Action::Reply(waiter, Reply::Done));
                    out.push(Action::Exit);
                    return;
                }
            }
        }
        if let Some((id, job)) = self.queued.pop_front() {
            self.running = Some(id);
            out.push(Action::Run(id, job));
        }
    }

    fn tick(&mut self, snap: &Snapshot<'_>, out: &mut Vec<Action>) {
        if self.stopping {
            return;
        }
        for m in snap.members {
            if matches!(m.status, NodeStatus::Gone { .. }) && self.probing.insert(m.address.clone()) {
                out.push(Action::Probe(m.address.clone()));
            }
        }
        if self.running.is_none() && self.queued.is_empty() {
            self.schedule(Job::Housekeeping, out);
        }
    }

    fn shutdown(&mut self, waiter: WaiterId, out: &mut Vec<Action>) {
        self.stopping = true;
        out.push(Action::Stop);
        // What waits in the queue will not run; its waiters hear why.
        let dropped: Vec<JobId> = self.queued.drain(..).map(|(id, _)| id).collect();
        let (answered, left): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.awaiting).into_iter().partition(|(job, _)| dropped.contains(job));
        self.awaiting = left;
        let waiters = answered.into_iter().map(|(_, a)| a);
        let undrains =
            self.undrains.drain().map(|(_, u)| Awaited::Undrain { waiter: u.waiter, name: u.name, started: u.started });
        for awaited in waiters.chain(undrains) {
            match awaited {
                Awaited::Drain { waiter: Some(w), .. } => {
                    out.push(Action::Reply(w, Reply::Drain(Err(AdminError::ShuttingDown))))
                }
                Awaited::Undrain { waiter, .. } => {
                    out.push(Action::Reply(waiter, Reply::Undrain(Err(AdminError::ShuttingDown))))
                }
                Awaited::Shutdown { waiter } => out.push(Action::Reply(waiter, Reply::Done)),
                Awaited::Drain { waiter: None, .. } => {}
            }
        }
        let job = self.schedule(Job::Retire, out);
        self.awaiting.push((job, Awaited::Shutdown { waiter }));
    }
}

#[cfg(test)]
mod tests;

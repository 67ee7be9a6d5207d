//! The decision core on scripted sequences of events: each step asserts exactly
//! the actions decided.

use std::time::Duration;

use super::*;
use crate::cluster::backoff::LoadBackoff;
use crate::cluster::controller::events::Switched;
use crate::cluster::fixtures::{member, model, GIB};
use crate::cluster::messages::Moved;
use strata_proto::{CallError, PipelineId};

/// A cluster as the executor would show it to the core, moved step by step.
struct Script {
    core: ControlCore,
    members: Vec<Member>,
    failed: LoadFailures,
    now: Instant,
    /// Counts every step, as if each changed the membership.
    generation: u64,
}

impl Script {
    /// Workers `names` (8 GiB each, all followed) and `serving` the stages of the
    /// pipeline loaded at start.
    fn new(names: &[&str], serving: &[&str]) -> Self {
        let members: Vec<Member> = names.iter().map(|n| member(n, 8 * GIB)).collect();
        let options = PlanOptions { context: 256, sequences: 1, headroom: 0, ..PlanOptions::default() };
        let core = ControlCore::new(
            model(),
            PlacementPolicy::Spread,
            options,
            pipeline(1, serving),
            members.iter().map(|m| m.address.clone()),
        );
        Self { core, members, failed: HashMap::new(), now: Instant::now(), generation: 0 }
    }

    fn on(&mut self, event: Event) -> Vec<Action> {
        self.now += Duration::from_millis(100);
        self.generation += 1;
        let snap =
            Snapshot { generation: self.generation, members: &self.members, failed: &self.failed, now: self.now };
        let actions = self.core.on(event, &snap);
        // The executor applies what changes the membership before the next event.
        for a in &actions {
            match a {
                Action::SetStatus(address, status) => self.set(address, status.clone()),
                Action::Admit(member) => match self.members.iter_mut().find(|m| m.address == member.address) {
                    Some(m) => *m = member.clone(),
                    None => self.members.push(member.clone()),
                },
                _ => {}
            }
        }
        actions
    }

    fn set(&mut self, address: &str, status: NodeStatus) {
        if let Some(m) = self.members.iter_mut().find(|m| m.address == address) {
            m.status = status;
        }
    }

    /// Job `id` done, leaving the stages `serving` (a pipeline numbered after the job).
    fn done(&mut self, id: u64, serving: &[&str], moved: Moved) -> Vec<Action> {
        let serving = pipeline(id + 1, serving);
        self.on(Event::JobDone(JobDone { id: JobId(id), serving, switched: Switched { moved, freed: HashMap::new() } }))
    }
}

/// Pipeline `id` on the workers `names` (none without workers).
fn pipeline(id: u64, names: &[&str]) -> Option<Serving> {
    let pipeline = PipelineId::new(id)?;
    (!names.is_empty()).then(|| Serving { pipeline, addresses: names.iter().map(|n| address(n)).collect() })
}

fn address(name: &str) -> String {
    format!("{name}:7070")
}

fn gone(reason: &str) -> NodeStatus {
    NodeStatus::Gone { since: Instant::now(), reason: reason.into() }
}

fn reconcile(id: u64, why: &str) -> Action {
    Action::Run(JobId(id), Job::Reconcile { why: why.into(), park_first: false })
}

/// The variant names of `actions`, for the assertions that need no more.
fn kinds(actions: &[Action]) -> Vec<String> {
    actions.iter().map(|a| format!("{a:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string()).collect()
}

#[test]
fn a_join_is_followed_and_planned_for() {
    let mut s = Script::new(&["a", "b"], &["a", "b"]);
    s.members.push(member("c", 8 * GIB));
    let actions = s.on(Event::MembersChanged);
    assert_eq!(actions, [Action::Follow(address("c")), reconcile(1, "the workers changed")]);
    // Another change while that job runs waits for it, merged into one re-plan.
    s.members.push(member("d", 8 * GIB));
    assert_eq!(s.on(Event::MembersChanged), [Action::Follow(address("d"))]);
    s.members.push(member("e", 8 * GIB));
    assert_eq!(s.on(Event::MembersChanged), [Action::Follow(address("e"))]);
    assert_eq!(s.done(1, &["a", "b", "c"], Moved::default()), [reconcile(2, "the workers changed")]);
    assert_eq!(s.done(2, &["a", "b", "c", "d", "e"], Moved::default()), []);
}

#[test]
fn a_worker_that_leaves_is_unfollowed_and_planned_without() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b", "c"]);
    let actions = s.on(Event::Lost { address: address("b"), reason: "no heartbeat for 1.5s".into() });
    assert_eq!(kinds(&actions), ["Unfollow", "SetStatus", "Run"]);
    assert!(matches!(&actions[1], Action::SetStatus(a, NodeStatus::Gone { .. }) if *a == address("b")));
    assert_eq!(actions[2], reconcile(1, "b:7070 is gone: no heartbeat for 1.5s"));
    // A second report of the same loss (the failed call, after the follower) is
    // already handled.
    assert_eq!(s.on(Event::Lost { address: address("b"), reason: "cannot connect".into() }), []);
    // Once a second it is asked whether it is back, one probe at a time.
    assert_eq!(s.on(Event::Tick), [Action::Probe(address("b"))]);
    assert_eq!(s.done(1, &["a", "c"], Moved::default()), []);
    assert_eq!(s.on(Event::Tick), [Action::Run(JobId(2), Job::Housekeeping)]);
    assert_eq!(s.on(Event::ProbeEnded { address: address("b") }), []);
    assert_eq!(s.on(Event::Tick), [Action::Probe(address("b"))]);
}

#[test]
fn a_drain_tells_the_worker_replans_and_reports_when_the_job_is_done() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b", "c"]);
    let actions = s.on(Event::Drain { node: "b".into(), force: false, wait: true, waiter: WaiterId(7) });
    assert_eq!(
        actions,
        [
            Action::TellDraining { address: address("b"), draining: true },
            Action::SetStatus(address("b"), NodeStatus::Draining),
            reconcile(1, "draining b"),
        ]
    );
    let moved = Moved { replayed: 1, transferred: 2, fell_back: 0 };
    let actions = s.done(1, &["a", "c"], moved);
    let [Action::FinishDrain { waiter: Some(WaiterId(7)), report }] = actions.as_slice() else { panic!("{actions:?}") };
    assert_eq!((report.node.as_str(), report.sequences_moved, report.sequences_transferred), ("b", 3, 2));
    assert!(report.seconds > 0.0 && !report.requests_wait, "{report:?}");
    // Draining again, and undraining what is not drained, are refused at once.
    let again = s.on(Event::Drain { node: "b".into(), force: false, wait: false, waiter: WaiterId(8) });
    assert_eq!(again, [Action::Reply(WaiterId(8), Reply::Drain(Err(AdminError::AlreadyDraining("b".into()))))]);
    let not = s.on(Event::Undrain { node: "a".into(), waiter: WaiterId(9) });
    assert_eq!(not, [Action::Reply(WaiterId(9), Reply::Undrain(Err(AdminError::NotDraining("a".into()))))]);
    let unknown = s.on(Event::Drain { node: "zz".into(), force: false, wait: false, waiter: WaiterId(10) });
    assert!(
        matches!(&unknown[..], [Action::Reply(_, Reply::Drain(Err(AdminError::UnknownNode { known, .. })))] if known == "a, b, c")
    );
}

#[test]
fn a_drain_that_leaves_too_little_is_refused_unless_forced() {
    // One worker left: what is left cannot hold the model.
    let mut s = Script::new(&["a"], &["a"]);
    let refused = s.on(Event::Drain { node: "a".into(), force: false, wait: false, waiter: WaiterId(1) });
    assert!(
        matches!(&refused[..], [Action::Reply(_, Reply::Drain(Err(AdminError::WouldNotFit { .. })))]),
        "{refused:?}"
    );
    let forced = s.on(Event::Drain { node: "a".into(), force: true, wait: false, waiter: WaiterId(2) });
    assert_eq!(kinds(&forced), ["TellDraining", "SetStatus", "Run", "Reply"]);
    assert!(matches!(&forced[3], Action::Reply(_, Reply::Drain(Ok(r))) if r.requests_wait));
}

#[test]
fn an_undrain_during_a_drain_waits_for_the_worker_then_replans_after_the_drain() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b", "c"]);
    s.on(Event::Drain { node: "b".into(), force: false, wait: true, waiter: WaiterId(1) });
    // The drain's job (1) runs; the undrain first tells the worker, which
    // refuses loads while it drains.
    let actions = s.on(Event::Undrain { node: "b".into(), waiter: WaiterId(2) });
    assert_eq!(actions, [Action::TellDraining { address: address("b"), draining: false }]);
    // Undrained twice before the worker answered: the second is refused.
    let twice = s.on(Event::Undrain { node: "b".into(), waiter: WaiterId(3) });
    assert!(matches!(&twice[..], [Action::Reply(WaiterId(3), Reply::Undrain(Err(AdminError::NotDraining(_))))]));
    let told = s.on(Event::DrainStateSent { address: address("b"), draining: false });
    assert_eq!(told, [Action::SetStatus(address("b"), NodeStatus::Ready)], "its re-plan waits behind the drain's");
    // The drain's job ends: the drain reports and the undrain's re-plan runs.
    let actions = s.done(1, &["a", "c"], Moved::default());
    assert_eq!(kinds(&actions), ["FinishDrain", "Run"]);
    assert_eq!(actions[1], reconcile(2, "b is back"));
    let actions = s.done(2, &["a", "b", "c"], Moved { replayed: 0, transferred: 4, fell_back: 0 });
    let [Action::Reply(WaiterId(2), Reply::Undrain(Ok(message)))] = actions.as_slice() else { panic!("{actions:?}") };
    assert!(message.starts_with("b is back in service") && message.contains("4 sequence(s) moved"), "{message}");
}

#[test]
fn a_worker_whose_load_failed_is_left_out_of_drains_and_retried_on_the_tick() {
    let mut s = Script::new(&["a", "b"], &["a", "b"]);
    s.on(Event::MembersChanged);
    // The job's load failed on b, which still answers: the keeper left it out.
    s.failed.insert(s.members[1].key(), LoadBackoff::after(None, "pull failed".into(), s.now));
    assert_eq!(s.done(1, &["a", "b"], Moved::default()), []);
    // With b left out, nothing could take a's layers.
    let refused = s.on(Event::Drain { node: "a".into(), force: false, wait: false, waiter: WaiterId(1) });
    assert!(
        matches!(&refused[..], [Action::Reply(_, Reply::Drain(Err(AdminError::WouldNotFit { .. })))]),
        "{refused:?}"
    );
    // The tick has the keeper retry the load once its backoff has run out.
    assert_eq!(s.on(Event::Tick), [Action::Run(JobId(2), Job::Housekeeping)]);
    assert_eq!(s.on(Event::Tick), [], "one housekeeping job at a time");
}

#[test]
fn a_kill_during_a_load_replans_once_the_abandoned_load_returns() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b"]);
    assert_eq!(s.on(Event::MembersChanged), [reconcile(1, "the workers changed")]);
    // c is killed while job 1 loads onto it: its follower marked it gone (which
    // the load watches, and abandons itself), then reported it.
    s.set(&address("c"), gone("its event stream ended"));
    let actions = s.on(Event::Lost { address: address("c"), reason: "its event stream ended".into() });
    assert_eq!(actions, [Action::Unfollow(address("c"))], "the re-plan queues behind the load");
    assert_eq!(s.done(1, &["a", "b"], Moved::default()), [reconcile(2, "c:7070 is gone: its event stream ended")]);
}

#[test]
fn trouble_checks_the_pipeline_and_replans_only_when_a_worker_is_broken() {
    let mut s = Script::new(&["a", "b"], &["a", "b"]);
    let actions = s.on(Event::Trouble { reason: "stream broke".into() });
    let serving = pipeline(1, &["a", "b"]).expect("a pipeline");
    assert_eq!(actions, [Action::CheckHealth { reason: "stream broke".into(), serving }]);
    let healthy = vec![(address("a"), Some(WorkerState::Serving)), (address("b"), Some(WorkerState::Serving))];
    let actions = s.on(Event::Health { reason: "stream broke".into(), states: healthy });
    assert_eq!(actions, [Action::Run(JobId(1), Job::Resume)]);
    s.done(1, &["a", "b"], Moved::default());
    let broken = vec![(address("a"), Some(WorkerState::Serving)), (address("b"), None)];
    let actions = s.on(Event::Health { reason: "stream broke".into(), states: broken });
    assert_eq!(kinds(&actions), ["Unfollow", "SetStatus", "Run"]);
    assert_eq!(actions[2], Action::Run(JobId(2), Job::Reconcile { why: "stream broke".into(), park_first: true }));
}

#[test]
fn a_worker_back_at_another_address_is_cleaned_then_admitted_and_followed_there() {
    let mut s = Script::new(&["a", "b"], &["a", "b"]);
    s.set(&address("b"), gone("no heartbeat"));
    s.on(Event::Lost { address: address("b"), reason: "no heartbeat".into() });
    s.done(1, &["a"], Moved::default());
    // It answers a probe at its old address: its stale shards go first.
    assert_eq!(s.on(Event::Tick), [Action::Probe(address("b")), Action::Run(JobId(2), Job::Housekeeping)]);
    let back = member("b", 8 * GIB);
    assert_eq!(s.on(Event::Answered { member: back.clone() }), [Action::Clean(back.clone())]);
    // The unload did not get through: it stays gone and is asked again.
    let cut = CallError { code: tonic::Code::Unavailable, message: "connection reset".into() };
    assert_eq!(s.on(Event::Cleaned { member: back.clone(), result: Err(cut) }), []);
    assert_eq!(s.on(Event::Tick), [Action::Probe(address("b"))]);
    assert_eq!(s.on(Event::Answered { member: back.clone() }), [Action::Clean(back.clone())]);
    assert_eq!(s.on(Event::Cleaned { member: back.clone(), result: Ok(()) }), [Action::Admit(back)]);
    // Later it is gone again and comes back through mDNS at a new DHCP lease: the
    // membership moves it (same node id); it is followed there and planned for.
    s.set(&address("b"), gone("no heartbeat"));
    s.on(Event::Lost { address: address("b"), reason: "no heartbeat".into() });
    s.members[1].address = "b2:7070".into();
    s.members[1].status = NodeStatus::Ready;
    let actions = s.on(Event::MembersChanged);
    assert_eq!(actions, [Action::Follow("b2:7070".into())], "planned once the running job is done");
    // A probe of the old address that answers finds nothing gone there.
    let stale = member("b", 8 * GIB);
    assert_eq!(s.on(Event::Answered { member: stale }), []);
}

#[test]
fn shutdown_stops_everything_answers_waiters_and_retires_after_the_running_job() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b", "c"]);
    s.on(Event::MembersChanged);
    s.on(Event::Drain { node: "b".into(), force: false, wait: true, waiter: WaiterId(1) });
    let actions = s.on(Event::Shutdown { waiter: WaiterId(2) });
    assert_eq!(
        actions,
        [Action::Stop, Action::Reply(WaiterId(1), Reply::Drain(Err(AdminError::ShuttingDown)))],
        "the drain's queued re-plan will not run"
    );
    let late = s.on(Event::Undrain { node: "b".into(), waiter: WaiterId(3) });
    assert_eq!(late, [Action::Reply(WaiterId(3), Reply::Undrain(Err(AdminError::ShuttingDown)))]);
    assert_eq!(s.on(Event::Tick), []);
    assert_eq!(s.done(1, &["a", "b", "c"], Moved::default()), [Action::Run(JobId(3), Job::Retire)]);
    assert_eq!(s.done(3, &[], Moved::default()), [Action::Reply(WaiterId(2), Reply::Done), Action::Exit]);
}

#[test]
fn a_forgotten_worker_is_unfollowed_and_a_change_already_seen_is_not_planned_for_twice() {
    let mut s = Script::new(&["a", "b", "c"], &["a", "b", "c"]);
    // An mDNS goodbye: c is removed from the membership.
    s.members.retain(|m| m.name() != "c");
    assert_eq!(s.on(Event::MembersChanged), [Action::Unfollow(address("c")), reconcile(1, "the workers changed")]);
    // The events of changes the list it read already had carry nothing new.
    let seen = s.generation;
    let snap = Snapshot { generation: seen, members: &s.members, failed: &s.failed, now: s.now };
    assert_eq!(s.core.on(Event::MembersChanged, &snap), []);
}

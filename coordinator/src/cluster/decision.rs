//! The controller's decisions, apart from its I/O: from what is known now (the
//! workers, the loads that failed, the pipeline serving, the shards a stopped one
//! left) to what to do — keep the pipeline, park the requests, or load a plan, and
//! whether beside the old pipeline or after stopping it. Pure functions of their
//! inputs, so every case is unit-tested on scripted sequences of cluster states;
//! the controller ([`super::controller`]) only carries the decisions out.

use std::ops::Range;
use std::time::Instant;

use strata_proto::FailureKind;

use super::backoff::LoadFailures;
use super::membership::{Member, NodeStatus};
use super::placement::{self, PlacementPolicy, StagePlan};
use super::switch_memory;
use crate::planner::{self, ModelSpec, PlanOptions};

/// Stages as `(worker address, layers)`, in pipeline order.
pub type Stages = [(String, Range<usize>)];

/// What a plan is decided from.
pub struct PlanInputs<'a> {
    pub model: &'a ModelSpec,
    pub policy: &'a PlacementPolicy,
    pub options: &'a PlanOptions,
    pub members: &'a [Member],
    /// Workers whose loads failed, by address.
    pub backoff: &'a LoadFailures,
    pub now: Instant,
    /// The pipeline serving now.
    pub current: Option<&'a Stages>,
    /// A stopped pipeline whose shards survivors still hold (they share weights
    /// with a new stage, so keeping them saves reading those layers again).
    pub stale: Option<&'a Stages>,
}

/// A plan to load.
#[derive(Debug)]
pub struct Load {
    pub stages: Vec<StagePlan>,
    pub plan: planner::Plan,
    /// The current pipeline works and every worker holds its new stage beside its
    /// old one: load beside it and switch the requests over (none waits).
    /// Otherwise the current pipeline stops first and its requests wait.
    pub make_before_break: bool,
    /// For each stage: its worker keeps its other shards while this one loads.
    pub keep_others: Vec<bool>,
}

/// What to do about the pipeline.
#[derive(Debug)]
pub enum PlanDecision {
    /// The pipeline serving is the best plan.
    Keep,
    /// Nothing fits now (a worker that failed to load is left out), but the
    /// pipeline serving is whole and ready: it goes on.
    KeepForNow {
        reason: String,
    },
    /// Nothing can hold the model: requests wait, with the reason.
    Park {
        reason: String,
    },
    Load(Load),
}

/// Workers that may hold layers now, in the order they became known: ready, and
/// not left out after a failed load.
pub fn eligible(members: &[Member], backoff: &LoadFailures, now: Instant) -> Vec<Member> {
    members
        .iter()
        .filter(|m| m.status == NodeStatus::Ready)
        .filter(|m| backoff.get(&m.key()).is_none_or(|b| !b.excludes(now)))
        .cloned()
        .collect()
}

/// Whether every stage of `stages` has a worker whose status passes `ok`.
fn all_stages(stages: Option<&Stages>, members: &[Member], ok: impl Fn(&NodeStatus) -> bool) -> bool {
    stages.is_some_and(|stages| {
        stages.iter().all(|(address, _)| members.iter().any(|m| &m.address == address && ok(&m.status)))
    })
}

pub fn decide_plan(inputs: &PlanInputs<'_>) -> PlanDecision {
    let members = inputs.members;
    // A draining worker still serves; it must only be moved off.
    let working = all_stages(inputs.current, members, |s| !matches!(s, NodeStatus::Gone { .. }));
    let current_ok = all_stages(inputs.current, members, |s| *s == NodeStatus::Ready);
    let eligible = eligible(members, inputs.backoff, inputs.now);
    let (stages, plan) = match placement::place(inputs.model, &eligible, inputs.policy, inputs.options) {
        Ok(x) => x,
        // Only a pipeline of ready workers goes on: one whose workers were asked to
        // drain (`--force`, the last ones) stops, and requests wait for capacity.
        Err(e) if current_ok => return PlanDecision::KeepForNow { reason: e.to_string() },
        Err(e) => return PlanDecision::Park { reason: e.to_string() },
    };
    let same = inputs.current.is_some_and(|current| {
        current.len() == stages.len()
            && current.iter().zip(&stages).all(|((address, layers), s)| *address == s.address && *layers == s.layers)
    });
    if same && current_ok {
        return PlanDecision::Keep;
    }
    let old: &Stages = inputs.current.or(inputs.stale).unwrap_or_default();
    let fits: Vec<bool> = stages
        .iter()
        .map(|s| {
            let held: Vec<Range<usize>> = old.iter().filter(|(a, _)| *a == s.address).map(|(_, r)| r.clone()).collect();
            // A worker the membership no longer knows offers nothing.
            let offered = members.iter().find(|m| m.address == s.address).map_or(0, placement::offered_memory);
            switch_memory::during_switch(inputs.model, inputs.options, &held, &s.layers, offered).fits()
        })
        .collect();
    let make_before_break = working && fits.iter().all(|f| *f);
    let keep_others = if make_before_break {
        vec![true; stages.len()]
    } else {
        // A survivor keeps its old shard while the new one loads where both fit:
        // the layers they share are then not read again.
        stages.iter().zip(&fits).map(|(s, &fits)| fits && old.iter().any(|(a, _)| *a == s.address)).collect()
    };
    PlanDecision::Load(Load { stages, plan, make_before_break, keep_others })
}

/// Why a load in progress must be abandoned, if it must: a worker it involves
/// (`watched`) is gone, or the coordinator stops.
pub fn load_interrupted(members: &[Member], watched: &[String], stopping: bool) -> Option<String> {
    if stopping {
        return Some("the coordinator is stopping".into());
    }
    members.iter().find_map(|m| match &m.status {
        NodeStatus::Gone { reason, .. } if watched.contains(&m.address) => {
            Some(format!("{} is gone: {reason}", m.name()))
        }
        _ => None,
    })
}

/// What to do about a worker whose stage failed to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFailure {
    /// The call did not get through: ask the worker's health; gone if it does
    /// not answer, left out for a while if it does.
    AskHealth,
    /// It answered, so it is alive: leave it out for a while.
    LeaveOut,
    /// As [`LoadFailure::LeaveOut`], and report it: one side has a fault.
    LeaveOutAndReport,
}

pub fn on_load_failure(kind: FailureKind) -> LoadFailure {
    match kind {
        FailureKind::Unreachable => LoadFailure::AskHealth,
        FailureKind::Busy | FailureKind::Refused => LoadFailure::LeaveOut,
        FailureKind::Fault => LoadFailure::LeaveOutAndReport,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::fixtures::{description, member, model, GIB};
    use crate::cluster::backoff::LoadBackoff;
    use crate::cluster::membership::NodeKey;

    /// The key of the fixture worker `name` (its node id).
    fn key(name: &str) -> NodeKey {
        member(name, GIB).key()
    }
    use crate::cluster::membership::{Added, Membership};

    /// A cluster's state as the controller would hold it, moved step by step.
    struct Script {
        model: ModelSpec,
        options: PlanOptions,
        members: Vec<Member>,
        backoff: LoadFailures,
        current: Option<Vec<(String, Range<usize>)>>,
        now: Instant,
    }

    impl Script {
        fn new(members: Vec<Member>) -> Self {
            let options = PlanOptions { context: 256, sequences: 1, headroom: 0, ..PlanOptions::default() };
            Self { model: model(), options, members, backoff: LoadFailures::new(), current: None, now: Instant::now() }
        }

        fn decide(&self) -> PlanDecision {
            decide_plan(&PlanInputs {
                model: &self.model,
                policy: &PlacementPolicy::Spread,
                options: &self.options,
                members: &self.members,
                backoff: &self.backoff,
                now: self.now,
                current: self.current.as_deref(),
                stale: None,
            })
        }

        /// Decides, expects a load, and takes it as the pipeline serving.
        fn load(&mut self) -> Load {
            match self.decide() {
                PlanDecision::Load(load) => {
                    self.current = Some(load.stages.iter().map(|s| (s.address.clone(), s.layers.clone())).collect());
                    load
                }
                other => panic!("expected a load, got {other:?}"),
            }
        }

        fn set(&mut self, name: &str, status: NodeStatus) {
            let m = self.members.iter_mut().find(|m| m.name() == name).expect("a member of the script");
            m.status = status;
        }

        fn holders(&self) -> Vec<String> {
            self.current.iter().flatten().map(|(a, _)| a.trim_end_matches(":7070").to_string()).collect()
        }
    }

    fn gone(reason: &str) -> NodeStatus {
        NodeStatus::Gone { since: Instant::now(), reason: reason.into() }
    }

    #[test]
    fn a_join_loads_a_wider_plan_beside_the_working_one() {
        let mut s = Script::new(vec![member("a", 8 * GIB), member("b", 8 * GIB)]);
        let first = s.load();
        assert!(!first.make_before_break, "nothing serves yet: {first:?}");
        assert_eq!(s.holders(), ["a", "b"]);
        assert!(matches!(s.decide(), PlanDecision::Keep), "nothing changed");

        s.members.push(member("c", 8 * GIB));
        let joined = s.load();
        assert!(joined.make_before_break && joined.keep_others.iter().all(|k| *k), "{joined:?}");
        assert_eq!(s.holders(), ["a", "b", "c"]);
    }

    #[test]
    fn a_worker_that_leaves_stops_the_pipeline_first_and_survivors_keep_their_shards() {
        let mut s = Script::new(vec![member("a", 8 * GIB), member("b", 8 * GIB), member("c", 8 * GIB)]);
        s.load();
        s.set("b", gone("no heartbeat for 1.5s"));
        let after = s.load();
        assert!(!after.make_before_break, "the pipeline is broken: {after:?}");
        assert_eq!(s.holders(), ["a", "c"]);
        assert_eq!(after.keep_others, [true, true], "survivors share their old layers");
    }

    #[test]
    fn a_drain_moves_off_beside_the_working_pipeline_and_an_undrain_during_it_moves_back() {
        let mut s = Script::new(vec![member("a", 8 * GIB), member("b", 8 * GIB), member("c", 8 * GIB)]);
        s.load();
        s.set("b", NodeStatus::Draining);
        let drained = s.load();
        assert!(drained.make_before_break, "a draining worker still serves: {drained:?}");
        assert_eq!(s.holders(), ["a", "c"]);
        // Undrained before the next plan was even loaded: back to all three.
        s.set("b", NodeStatus::Ready);
        let back = s.load();
        assert!(back.make_before_break);
        assert_eq!(s.holders(), ["a", "b", "c"]);
    }

    #[test]
    fn a_forced_drain_of_the_last_worker_parks_but_a_failed_retry_keeps_what_serves() {
        let mut s = Script::new(vec![member("a", 8 * GIB)]);
        s.load();
        // Left out after a failed load while its pipeline is whole: keep serving.
        s.backoff.insert(key("a"), LoadBackoff::after(None, "busy".into(), s.now));
        assert!(matches!(s.decide(), PlanDecision::KeepForNow { .. }));
        s.backoff.clear();
        // `strata drain a --force`: requests wait for capacity.
        s.set("a", NodeStatus::Draining);
        match s.decide() {
            PlanDecision::Park { reason } => assert!(reason.contains("no worker"), "{reason}"),
            other => panic!("expected park, got {other:?}"),
        }
    }

    #[test]
    fn a_worker_whose_load_failed_is_left_out_then_tried_again() {
        let mut s = Script::new(vec![member("a", 8 * GIB), member("b", 8 * GIB)]);
        let failed = LoadBackoff::after(None, "model is not available (NotFound)".into(), s.now);
        assert_eq!(on_load_failure(FailureKind::Refused), LoadFailure::LeaveOut);
        s.backoff.insert(key("b"), failed.clone());
        s.load();
        assert_eq!(s.holders(), ["a"], "planned without the worker that failed");
        s.now = failed.until + Duration::from_millis(1);
        let retried = s.load();
        assert!(retried.make_before_break);
        assert_eq!(s.holders(), ["a", "b"], "tried again once its time is up");
    }

    #[test]
    fn a_kill_during_a_load_abandons_it_and_the_next_plan_goes_without_the_dead() {
        let mut s = Script::new(vec![member("a", 8 * GIB), member("b", 8 * GIB)]);
        s.load();
        s.members.push(member("c", 8 * GIB));
        let loading = s.load();
        let watched: Vec<String> = loading.stages.iter().map(|st| st.address.clone()).collect();
        assert_eq!(load_interrupted(&s.members, &watched, false), None, "nothing happened yet");
        s.set("a", gone("its event stream failed"));
        let why = load_interrupted(&s.members, &watched, false).expect("a worker of the load is gone");
        assert!(why.starts_with("a is gone"), "{why}");
        // The old pipeline had a as well: it is broken, so the next plan stops it first.
        s.current = Some(vec![("a:7070".into(), 0..4), ("b:7070".into(), 4..8)]);
        let next = s.load();
        assert!(!next.make_before_break);
        assert_eq!(s.holders(), ["b", "c"]);
        assert_eq!(load_interrupted(&s.members, &[], true).as_deref(), Some("the coordinator is stopping"));
    }

    #[test]
    fn a_worker_back_at_another_address_is_one_node_and_is_planned_at_the_new_one() {
        let membership = Membership::default();
        assert_eq!(
            membership.add(Member::new("10.0.0.5:7070".into(), description("pc", "id-pc", 8 * GIB))),
            Added::New
        );
        membership.set_status("10.0.0.5:7070", gone("cut off"));
        // Back on a new DHCP lease: the same node id at another address.
        let back = Member::new("10.0.0.9:7070".into(), description("pc", "id-pc", 8 * GIB));
        assert_eq!(membership.add(back), Added::Updated);
        let members = membership.members();
        assert_eq!(members.len(), 1, "one node, not two");
        let mut s = Script::new(members);
        s.load();
        assert_eq!(s.current.as_deref().map(|c| c[0].0.as_str()), Some("10.0.0.9:7070"));
    }

    #[test]
    fn every_failure_kind_has_a_response() {
        assert_eq!(on_load_failure(FailureKind::Unreachable), LoadFailure::AskHealth);
        assert_eq!(on_load_failure(FailureKind::Busy), LoadFailure::LeaveOut);
        assert_eq!(on_load_failure(FailureKind::Fault), LoadFailure::LeaveOutAndReport);
    }
}

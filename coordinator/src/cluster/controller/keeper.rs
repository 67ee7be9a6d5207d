//! The pipeline keeper: the one task that changes the pipeline serving. It runs
//! the decision core's [`Job`]s one at a time — loading a plan (beside the old
//! pipeline and switching the requests over, or after stopping it), parking and
//! resuming the requests, retrying failed loads, unloading stale shards — and
//! reports each as [`Event::JobDone`]. A load can take minutes; the core goes on
//! deciding meanwhile, and the load itself is abandoned the moment a worker it
//! involves is gone or the coordinator stops.
//!
//! How a plan is carried out:
//!
//! * a worker joins, comes back, is undrained, or drains: the new pipeline is
//!   loaded *beside* the old one, requests switch between two steps, then the old
//!   shards are unloaded (make before break; no request waits on a load), if every
//!   worker holds both stages at once ([`switch_memory`]); otherwise as below;
//! * a worker of the pipeline is lost: requests are parked at once and the broken
//!   pipeline's stream stops; a survivor keeps its old shard while it loads the new
//!   one where both fit (they share weights, so it reads only the layers it lacks),
//!   and drops it first where they do not; requests are replayed, then the old
//!   shards are unloaded;
//! * nothing left can hold the model: requests wait (with the reason) until a
//!   worker returns or the queue timeout passes.
//!
//! [`switch_memory`]: super::super::switch_memory

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use strata_proto::{v1, PipelineId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::super::backoff::{LoadBackoff, LoadFailures};
use super::super::decision::{self, Load, LoadFailure, PlanDecision, PlanInputs};
use super::super::membership::{Member, NodeKey, NodeStatus};
use super::super::messages::{Control, Moved, PipelineLink, SchedulerMsg};
use super::super::pipeline::{self, BuildSpec, Pipeline};
use super::super::placement::{self, StagePlan};
use super::super::status_view::ServingPipeline;
use super::super::WorkerClient;
use super::clients::Clients;
use super::events::{Event, Job, JobDone, JobId, Serving, Switched};
use super::ControllerSpec;
use crate::planner::ModelSpec;

/// How long a worker may take to drop shards of a pipeline no longer served.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a worker may take to unload the shards of a pipeline replaced.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A pipeline stopped before its successor loaded, whose shards some survivors
/// keep meanwhile.
struct Stale {
    id: PipelineId,
    /// The stages still loaded, by address.
    stages: Vec<(String, Range<usize>)>,
    /// Bytes already freed by unloading it on the other workers.
    freed: HashMap<String, u64>,
}

impl Stale {
    fn addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self.stages.iter().map(|(a, _)| a.clone()).collect();
        addresses.dedup();
        addresses
    }
}

pub(super) struct PipelineKeeper {
    spec: Arc<ControllerSpec>,
    model_spec: ModelSpec,
    clients: Arc<Clients>,
    /// Where the stages' streams report trouble.
    control: mpsc::UnboundedSender<Control>,
    /// Where the keeper reports workers it found gone.
    events: mpsc::UnboundedSender<Event>,
    current: Option<Pipeline>,
    /// Workers whose loads failed, left out for a while, by address.
    backoff: LoadFailures,
    /// Unloads of stale shards running, one at a time for each worker.
    sweeps: HashMap<String, JoinHandle<()>>,
    next_pipeline: u64,
}

impl PipelineKeeper {
    pub fn new(
        spec: Arc<ControllerSpec>,
        model_spec: ModelSpec,
        clients: Arc<Clients>,
        control: mpsc::UnboundedSender<Control>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        // Pipeline ids differ across coordinator restarts, so a worker never takes
        // a stale shard for one of the new pipeline.
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Self {
            spec,
            model_spec,
            clients,
            control,
            events,
            current: None,
            backoff: HashMap::new(),
            sweeps: HashMap::new(),
            next_pipeline: seed.max(1),
        }
    }

    /// A pipeline id not used before (by this coordinator or, likely, an earlier one).
    fn next_pipeline_id(&mut self) -> PipelineId {
        let id = PipelineId::new(self.next_pipeline).unwrap_or(PipelineId::FIRST);
        self.next_pipeline = id.get().wrapping_add(1);
        id
    }

    /// Runs the jobs it is given, in order, each reported when done.
    pub async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<(JobId, Job)>) {
        while let Some((id, job)) = jobs.recv().await {
            let switched = self.perform(job).await;
            let _ = self.events.send(Event::JobDone(JobDone { id, serving: self.serving(), switched }));
        }
    }

    /// The current pipeline and its stages' addresses.
    pub fn serving(&self) -> Option<Serving> {
        self.current.as_ref().map(|p| Serving {
            pipeline: p.id,
            addresses: p.placements.iter().map(|s| s.address.clone()).collect(),
        })
    }

    pub fn placements(&self) -> Option<Vec<super::super::messages::Placement>> {
        self.current.as_ref().map(|p| p.placements.clone())
    }

    pub async fn perform(&mut self, job: Job) -> Switched {
        match job {
            Job::Reconcile { why, park_first } => {
                if park_first {
                    self.park(format!("re-planning: {why}")).await;
                }
                self.reconcile(&why).await
            }
            Job::Resume => {
                if let Some(link) = self.current.as_ref().map(|p| p.link.clone()) {
                    self.scheduler_switch(Some(link), String::new(), false).await;
                }
                Switched::default()
            }
            Job::Housekeeping => {
                self.retry_failed_loads().await;
                self.sweep_stale_shards();
                Switched::default()
            }
            Job::Retire => {
                for (_, task) in self.sweeps.drain() {
                    task.abort();
                }
                if let Some(old) = self.current.take() {
                    self.spec.view.set_pipeline(None);
                    self.retire(old).await;
                }
                Switched::default()
            }
        }
    }

    /// Why no pipeline serves: what the plan lacks, and the loads that failed.
    pub fn waiting_reason(&self) -> String {
        let members = self.spec.membership.members();
        let eligible = self.eligible(&members);
        let now = Instant::now();
        let failed: Vec<String> = members
            .iter()
            .filter_map(|m| self.backoff.get(&m.key()).map(|b| format!("{}: {}", m.name(), b.describe(now))))
            .collect();
        let why = match placement::place(&self.model_spec, &eligible, &self.spec.policy, &self.spec.options) {
            Ok(_) => "a new pipeline is being loaded".into(),
            Err(e) => e.to_string(),
        };
        if failed.is_empty() {
            why
        } else {
            format!("{why} ({})", failed.join("; "))
        }
    }

    /// Re-plans when a worker whose load failed may be tried again, or when there
    /// is no pipeline and the workers there are could hold one: a load that failed
    /// at start-up (or after a crash) is retried rather than given up.
    async fn retry_failed_loads(&mut self) {
        let now = Instant::now();
        let due: Vec<NodeKey> =
            self.backoff.iter().filter(|(_, b)| !b.retried && !b.excludes(now)).map(|(k, _)| k.clone()).collect();
        for key in &due {
            if let Some(b) = self.backoff.get_mut(key) {
                b.retried = true;
            }
        }
        if !due.is_empty() {
            self.reconcile("retrying a worker whose load failed").await;
            // A worker tried again that failed again has a fresh entry; one the new
            // plan did not need is not failing any more.
            self.backoff.retain(|_, b| !b.retried);
            self.spec.view.set_load_failures(&self.backoff);
            return;
        }
        if self.current.is_none() {
            let eligible = self.eligible(&self.spec.membership.members());
            if placement::place(&self.model_spec, &eligible, &self.spec.policy, &self.spec.options).is_ok() {
                self.reconcile("no pipeline is loaded").await;
            }
        }
    }

    /// Workers that may hold layers now, in the order they became known.
    fn eligible(&self, members: &[Member]) -> Vec<Member> {
        decision::eligible(members, &self.backoff, Instant::now())
    }

    /// Brings the pipeline in line with the best plan for the workers there are now.
    async fn reconcile(&mut self, why: &str) -> Switched {
        let mut stale = None;
        let mut switched = self.replan(why, &mut stale).await;
        // The stopped pipeline's shards that survivors kept while the new one loaded
        // (sharing their weights) go once the requests have switched, or once no
        // attempt is left.
        if let Some(stale) = stale {
            for (address, bytes) in self.unload_pipeline(stale.id, &stale.addresses()).await {
                *switched.freed.entry(address).or_default() += bytes;
            }
            for (address, bytes) in stale.freed {
                *switched.freed.entry(address).or_default() += bytes;
            }
        }
        switched
    }

    /// [`Self::reconcile`], but a pipeline stopped before its successor loads is left
    /// in `stale` where survivors keep its shards.
    async fn replan(&mut self, why: &str, stale: &mut Option<Stale>) -> Switched {
        let members = self.spec.membership.members();
        for _attempt in 0..members.len().max(1) {
            let members = self.spec.membership.members();
            let current: Option<Vec<(String, Range<usize>)>> = self
                .current
                .as_ref()
                .map(|p| p.placements.iter().map(|p| (p.address.clone(), p.layers.clone())).collect());
            let inputs = PlanInputs {
                model: &self.model_spec,
                policy: &self.spec.policy,
                options: &self.spec.options,
                members: &members,
                backoff: &self.backoff,
                now: Instant::now(),
                current: current.as_deref(),
                stale: stale.as_ref().map(|s| s.stages.as_slice()),
            };
            let Load { stages, plan, make_before_break, keep_others: keep } = match decision::decide_plan(&inputs) {
                PlanDecision::Keep => return Switched::default(),
                PlanDecision::KeepForNow { reason } => {
                    tracing::warn!(error = %reason, "no better plan; keeping the current pipeline");
                    return Switched::default();
                }
                PlanDecision::Park { reason } => {
                    self.park(reason).await;
                    return Switched::default();
                }
                PlanDecision::Load(load) => load,
            };
            tracing::info!(why, stages = ?stages.iter().map(|s| format!("{}:{}..{}", s.name, s.layers.start, s.layers.end)).collect::<Vec<_>>(), "re-planning");
            let mut clients = Vec::new();
            let mut unreachable = None;
            for s in &stages {
                match self.clients.get(&s.address).await {
                    Ok(c) => clients.push(c),
                    Err(e) => {
                        unreachable = Some((s.address.clone(), e.to_string()));
                        break;
                    }
                }
            }
            if let Some((address, reason)) = unreachable {
                self.mark_gone(&address, &reason);
                continue;
            }
            let old = current.clone().or_else(|| stale.as_ref().map(|s| s.stages.clone())).unwrap_or_default();
            if !make_before_break {
                if self.current.is_some() {
                    tracing::warn!(
                        why,
                        "the old pipeline stops first (it is broken, or the new plan does not fit beside it)"
                    );
                }
                self.stop_for(why, stale).await;
                self.unload_stale_except(stale, &stages, &keep).await;
            }
            let id = self.next_pipeline_id();
            let spec = BuildSpec {
                id,
                model: &self.spec.model,
                wire_dtype: self.spec.wire_dtype,
                weights_source: &self.spec.weights_source,
                keep_others: &keep,
            };
            // A load can take minutes (a stage of a large model pulled over 1 GbE).
            // It is abandoned the moment a worker it involves is gone, or the
            // coordinator stops: the plan is made again with the workers there are.
            let watched = self.live_addresses(stages.iter().map(|s| &s.address).chain(old.iter().map(|(a, _)| a)));
            let outcome = tokio::select! {
                built = pipeline::build(spec, &stages, &clients, self.control.clone()) => Ok(built),
                why = self.interrupted(&watched) => Err(why),
            };
            let built = match outcome {
                Ok(built) => built,
                Err(why) => {
                    tracing::warn!(reason = %why, "loading the new pipeline is abandoned");
                    self.abandon(id, &stages);
                    if *self.spec.stop.borrow() {
                        return Switched::default();
                    }
                    if make_before_break && !self.current_still_works() {
                        // The old pipeline broke meanwhile: its requests wait.
                        self.park(format!("re-planning: {why}")).await;
                    }
                    continue;
                }
            };
            match built {
                Ok(new) => {
                    let loaded: Vec<NodeKey> = stages.iter().map(|s| self.spec.membership.key_of(&s.address)).collect();
                    self.backoff.retain(|k, _| !loaded.contains(k));
                    self.spec.view.set_load_failures(&self.backoff);
                    let predicted = (
                        plan.tokens_per_second(),
                        stages.iter().map(|s| (s.address.clone(), s.predicted_seconds_per_token)).collect(),
                    );
                    return self.switch_to(new, make_before_break, predicted).await;
                }
                Err(failed) => {
                    tracing::warn!(address = %failed.address, error = %failed.error, "a stage failed to load");
                    // A worker that answered with a refusal is alive; only a call that
                    // did not get through says nothing, so only then is it asked.
                    let alive = match decision::on_load_failure(failed.kind()) {
                        LoadFailure::AskHealth => self.healthy(&failed.address).await,
                        LoadFailure::LeaveOut => true,
                        LoadFailure::LeaveOutAndReport => {
                            tracing::error!(address = %failed.address, error = %failed.error, "a worker failed a load");
                            true
                        }
                    };
                    if !alive {
                        self.mark_gone(&failed.address, &failed.error.to_string());
                    } else {
                        let key = self.spec.membership.key_of(&failed.address);
                        let backoff =
                            LoadBackoff::after(self.backoff.get(&key), failed.error.to_string(), Instant::now());
                        tracing::warn!(
                            address = %failed.address,
                            failures = backoff.failures,
                            "left out of plans for {:?}",
                            backoff.until.saturating_duration_since(Instant::now())
                        );
                        self.backoff.insert(key, backoff);
                        self.spec.view.set_load_failures(&self.backoff);
                    }
                    // Shards of the failed attempt that did load are dropped.
                    self.unload_pipeline(id, &stages.iter().map(|s| s.address.clone()).collect::<Vec<_>>()).await;
                    if make_before_break {
                        return Switched::default();
                    }
                }
            }
        }
        if self.current.is_none() {
            // Every attempt failed: requests wait, and say why.
            let reason = self.waiting_reason();
            self.park(reason).await;
        }
        Switched::default()
    }

    /// Completes when a worker at one of `addresses` is gone, or the coordinator
    /// stops: why.
    async fn interrupted(&self, addresses: &[String]) -> String {
        let mut members = self.spec.membership.subscribe();
        let mut stop = self.spec.stop.clone();
        loop {
            let stopping = *stop.borrow_and_update();
            if let Some(why) = decision::load_interrupted(&members.borrow_and_update(), addresses, stopping) {
                return why;
            }
            tokio::select! {
                changed = members.changed() => if changed.is_err() { std::future::pending::<()>().await },
                changed = stop.changed() => if changed.is_err() { std::future::pending::<()>().await },
            }
        }
    }

    /// Those of `addresses` whose workers are not gone, once each.
    fn live_addresses<'a>(&self, addresses: impl Iterator<Item = &'a String>) -> Vec<String> {
        let members = self.spec.membership.members();
        let mut live: Vec<String> = addresses
            .filter(|a| members.iter().any(|m| &m.address == *a && !matches!(m.status, NodeStatus::Gone { .. })))
            .cloned()
            .collect();
        live.sort();
        live.dedup();
        live
    }

    /// Whether every stage of the current pipeline still answers.
    fn current_still_works(&self) -> bool {
        let members = self.spec.membership.members();
        self.current.as_ref().is_some_and(|p| {
            p.placements
                .iter()
                .all(|s| members.iter().any(|m| m.address == s.address && !matches!(m.status, NodeStatus::Gone { .. })))
        })
    }

    /// Drops what an abandoned load of pipeline `id` loaded, in a task of its own
    /// (a worker that is gone answers nothing; the sweep of stale shards catches
    /// what this misses).
    fn abandon(&self, id: PipelineId, stages: &[StagePlan]) {
        let members = self.spec.membership.members();
        let targets: Vec<String> = stages
            .iter()
            .filter(|s| members.iter().any(|m| m.address == s.address && !matches!(m.status, NodeStatus::Gone { .. })))
            .map(|s| s.address.clone())
            .collect();
        let clients = self.clients.clone();
        tokio::spawn(async move {
            for address in targets {
                let unload = |mut c: WorkerClient| async move { c.unload_shard(v1::UnloadShardRequest::of(id)).await };
                if let Err(e) = clients.call(&address, CLEANUP_TIMEOUT, unload).await {
                    tracing::debug!(%address, pipeline_id = %id, error = %e, "an abandoned shard did not unload; the sweep will");
                }
            }
        });
    }

    /// Stops the current pipeline for a switch that cannot wait for the new one: its
    /// stream into stage 0 closes and its requests wait (replayed on the next
    /// pipeline), but its shards stay, in `stale`, until the new pipeline is loaded.
    async fn stop_for(&mut self, why: &str, stale: &mut Option<Stale>) {
        let Some(old) = self.current.take() else { return };
        self.spec.view.set_pipeline(None);
        let stages = old.placements.iter().map(|p| (p.address.clone(), p.layers.clone())).collect();
        *stale = Some(Stale { id: old.id, stages, freed: HashMap::new() });
        // Dropping the pipeline aborts its stream into stage 0.
        drop(old);
        self.scheduler_switch(None, format!("re-planning: {why}"), false).await;
    }

    /// Unloads the stale pipeline's shards at once on every worker but those whose
    /// new stage (`keep[i]` for `stages[i]`) loads beside its old one.
    async fn unload_stale_except(&mut self, stale: &mut Option<Stale>, stages: &[StagePlan], keep: &[bool]) {
        let Some(s) = stale.as_mut() else { return };
        let kept = |a: &str| stages.iter().zip(keep).any(|(st, &k)| k && st.address == a);
        let now: Vec<String> = s.addresses().into_iter().filter(|a| !kept(a)).collect();
        if now.is_empty() {
            return;
        }
        let id = s.id;
        let freed = self.unload_pipeline(id, &now).await;
        if let Some(s) = stale.as_mut() {
            s.stages.retain(|(a, _)| !now.contains(a));
            for (address, bytes) in freed {
                *s.freed.entry(address).or_default() += bytes;
            }
        }
    }

    /// Moves every request to `new` and unloads the pipeline it replaces (only once
    /// the requests moving with their KV caches have read them: the scheduler
    /// answers after that). `old_alive`: that pipeline still works.
    async fn switch_to(&mut self, new: Pipeline, old_alive: bool, predicted: (f64, HashMap<String, f64>)) -> Switched {
        let link = new.link.clone();
        let moved = self.scheduler_switch(Some(link), String::new(), old_alive).await;
        self.spec.view.set_pipeline(Some(ServingPipeline {
            id: new.id.get(),
            placements: new.placements.clone(),
            predicted_tokens_per_second: predicted.0,
            predicted_stage_seconds: predicted.1,
        }));
        for p in &new.placements {
            tracing::info!(
                stage = p.stage,
                layers = ?p.layers,
                address = %p.address,
                name = %p.name,
                "stage loaded in {:.2}s",
                p.load_seconds
            );
        }
        let freed = match self.current.replace(new) {
            Some(old) => self.retire(old).await,
            None => HashMap::new(),
        };
        Switched { moved, freed }
    }

    /// Stops a pipeline's stream into stage 0 and unloads its shards; bytes freed
    /// by each worker.
    async fn retire(&mut self, old: Pipeline) -> HashMap<String, u64> {
        let addresses: Vec<String> = old.placements.iter().map(|p| p.address.clone()).collect();
        let id = old.id;
        drop(old);
        self.unload_pipeline(id, &addresses).await
    }

    /// Parks every request (no pipeline) with `reason`.
    async fn park(&mut self, reason: String) {
        let old = self.current.take();
        self.spec.view.set_pipeline(None);
        self.scheduler_switch(None, reason, false).await;
        if let Some(old) = old {
            self.retire(old).await;
        }
    }

    async fn scheduler_switch(&self, pipeline: Option<PipelineLink>, reason: String, old_alive: bool) -> Moved {
        let (done, moved) = oneshot::channel();
        if self.spec.scheduler.send(SchedulerMsg::Switch { pipeline, reason, old_alive, done }).is_err() {
            return Moved::default();
        }
        moved.await.unwrap_or_default()
    }

    /// Unloads pipeline `id` from the workers that answer; bytes freed by each.
    async fn unload_pipeline(&mut self, id: PipelineId, addresses: &[String]) -> HashMap<String, u64> {
        let members = self.spec.membership.members();
        let live = addresses
            .iter()
            .filter(|a| !members.iter().any(|m| &m.address == *a && matches!(m.status, NodeStatus::Gone { .. })));
        let clients = &self.clients;
        let results = join_all(live.map(|address| async move {
            let unload = |mut c: WorkerClient| async move { c.unload_shard(v1::UnloadShardRequest::of(id)).await };
            (address.clone(), clients.call(address, UNLOAD_TIMEOUT, unload).await)
        }))
        .await;
        let mut freed = HashMap::new();
        for (address, result) in results {
            match result {
                Ok(r) => {
                    freed.insert(address, r.freed_bytes);
                }
                // It holds no shard of that pipeline (it restarted, or an abandoned
                // load never reached it): nothing to free.
                Err(e) if e.code == tonic::Code::NotFound => {
                    tracing::debug!(%address, pipeline_id = %id, "nothing to unload");
                }
                Err(e) => tracing::warn!(%address, error = %e, kind = ?e.kind(), "unloading the old pipeline failed"),
            }
        }
        freed
    }

    async fn healthy(&mut self, address: &str) -> bool {
        self.clients.health(&[address.to_string()], None).await[0].is_some()
    }

    /// A worker a call of the keeper could not reach is gone: marked so at once
    /// (the next attempt plans without it), and reported to the core, which stops
    /// following it and asks it again later.
    fn mark_gone(&mut self, address: &str, reason: &str) {
        tracing::warn!(%address, %reason, "worker gone");
        self.clients.forget(address);
        self.spec
            .membership
            .set_status(address, NodeStatus::Gone { since: Instant::now(), reason: reason.to_string() });
        let _ = self.events.send(Event::Lost { address: address.to_string(), reason: reason.to_string() });
    }

    /// Unloads shards that live workers still hold for pipelines that are no longer
    /// served: a worker cut off mid-switch, or back through a Join or mDNS before
    /// its probe cleaned it, may hold one. Between two jobs no pipeline is half
    /// built (the keeper builds within one job), so only the current pipeline's
    /// shards are wanted. Each unload runs in a task of its own, so a worker slow
    /// to answer never holds up the keeper.
    fn sweep_stale_shards(&mut self) {
        self.sweeps.retain(|_, task| !task.is_finished());
        let current = self.current.as_ref().map(|p| p.id);
        for m in self.spec.membership.members() {
            if matches!(m.status, NodeStatus::Gone { .. }) || self.sweeps.contains_key(&m.address) {
                continue;
            }
            let stale: Vec<u64> =
                m.heartbeat.pipelines.iter().copied().filter(|&p| Some(p) != current.map(PipelineId::get)).collect();
            if stale.is_empty() {
                continue;
            }
            let (clients, address) = (self.clients.clone(), m.address.clone());
            let task = tokio::spawn(async move {
                for pipeline_id in stale {
                    let unload = |mut c: WorkerClient| async move {
                        c.unload_shard(v1::UnloadShardRequest { pipeline_id }).await
                    };
                    match clients.call(&address, CLEANUP_TIMEOUT, unload).await {
                        Ok(r) => {
                            tracing::info!(%address, pipeline_id, freed_bytes = r.freed_bytes, "unloaded a stale shard")
                        }
                        Err(e) => {
                            tracing::debug!(%address, pipeline_id, error = %e, "a stale shard did not unload; asked again later")
                        }
                    }
                }
            });
            self.sweeps.insert(m.address, task);
        }
    }
}

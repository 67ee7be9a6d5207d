//! The controller: one task that decides where the layers live.
//!
//! It watches the membership (joins, mDNS, heartbeats that say a worker drains
//! itself), follows every worker's Events stream (a silent or broken stream means
//! the worker is gone), and whenever the best plan changes it builds the new
//! pipeline and has the scheduler move every request onto it:
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
//! Gone workers are asked again every second, so a worker that comes back is taken
//! in again (its stale shards unloaded first). The asking runs in tasks of its own:
//! a worker cut off from the network answers nothing, and waiting on it here would
//! hold up everything else the controller does.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use strata_proto::v1::{self, worker_event, WireDtype, WorkerState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::backoff::LoadBackoff;
use super::decision::{self, Load, LoadFailure, PlanDecision, PlanInputs};
use super::membership::{self, Heartbeat, Member, Membership, NodeStatus};
use super::model::ServedModel;
use super::messages::{Control, Moved, PipelineLink, Placement, SchedulerMsg};
use super::pipeline::{self, BuildSpec, Pipeline};
use super::placement::{self, PlacementPolicy, StagePlan};
use super::report::{AdminError, DrainReport};
use super::status_view::{ServingPipeline, StatusView};
use super::{connect, HopSamples, WorkerClient, HEARTBEAT_TIMEOUT};
use crate::planner::{ModelSpec, PlanOptions};

/// How long a worker may take to answer Health before it counts as gone.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// How often gone workers are asked whether they are back.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How long a worker that answered again may take to drop its stale shards.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A pipeline stopped before its successor loaded, whose shards some survivors
/// keep meanwhile.
struct Stale {
    id: u64,
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

/// The outcome of one re-plan.
#[derive(Default)]
struct Switched {
    moved: Moved,
    /// Bytes each worker freed when the old pipeline was unloaded.
    freed: HashMap<String, u64>,
}

pub(super) struct Controller {
    spec: ControllerSpec,
    model_spec: ModelSpec,
    control: mpsc::UnboundedSender<Control>,
    links: HashMap<String, JoinHandle<()>>,
    clients: HashMap<String, WorkerClient>,
    current: Option<Pipeline>,
    /// Workers whose loads failed, left out for a while, by address.
    backoff: HashMap<String, LoadBackoff>,
    /// Tasks talking to a worker off the controller's turn (asking a gone worker
    /// whether it is back, unloading stale shards), one at a time for each worker.
    probes: HashMap<String, JoinHandle<()>>,
    next_pipeline: u64,
}

impl Controller {
    pub fn new(spec: ControllerSpec, control: mpsc::UnboundedSender<Control>) -> Self {
        let model_spec = ModelSpec::from_gguf(spec.model.card.id.clone(), &spec.model.file);
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Self {
            spec,
            model_spec,
            control,
            links: HashMap::new(),
            clients: HashMap::new(),
            current: None,
            backoff: HashMap::new(),
            probes: HashMap::new(),
            next_pipeline: seed.max(1),
        }
    }

    /// Plans and loads the first pipeline: its stages, or why none could be built
    /// yet. Either way the controller goes on ([`Self::run`]): it retries failed
    /// loads with backoff and plans without a worker that keeps failing, and
    /// requests wait meanwhile.
    pub async fn start(&mut self) -> Result<Vec<Placement>, String> {
        self.reconcile("the cluster starts").await;
        match &self.current {
            Some(p) => Ok(p.placements.clone()),
            None => Err(self.waiting_reason()),
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Control>) {
        let mut members = self.spec.membership.subscribe();
        members.mark_unchanged();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    if !self.handle(msg).await {
                        break;
                    }
                }
                changed = members.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    members.mark_unchanged();
                    self.reconcile("the workers changed").await;
                }
                _ = retry.tick() => {
                    self.retry_failed_loads().await;
                    self.retry_gone();
                    self.sweep_stale_shards().await;
                }
            }
        }
    }

    /// Handles one message; false to stop.
    async fn handle(&mut self, msg: Control) -> bool {
        match msg {
            Control::Trouble { reason } => self.trouble(&reason).await,
            Control::Lost { address, reason } => self.lost(&address, &reason).await,
            Control::Back { member } => self.back(*member).await,
            Control::Drain { node, force, wait, reply } => self.drain(&node, force, wait, reply).await,
            Control::Undrain { node, reply } => {
                let result = self.undrain(&node).await;
                let _ = reply.send(result);
            }
            Control::Shutdown { done } => {
                self.shutdown().await;
                let _ = done.send(());
                return false;
            }
        }
        true
    }

    fn waiting_reason(&self) -> String {
        let members = self.spec.membership.members();
        let eligible = self.eligible(&members);
        let now = Instant::now();
        let failed: Vec<String> = members
            .iter()
            .filter_map(|m| self.backoff.get(&m.address).map(|b| format!("{}: {}", m.name(), b.describe(now))))
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
        let due: Vec<String> =
            self.backoff.iter().filter(|(_, b)| !b.retried && !b.excludes(now)).map(|(a, _)| a.clone()).collect();
        for address in &due {
            if let Some(b) = self.backoff.get_mut(address) {
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

    async fn client(&mut self, address: &str) -> Result<WorkerClient, super::ClusterError> {
        if let Some(c) = self.clients.get(address) {
            return Ok(c.clone());
        }
        let c = connect(address).await?;
        self.clients.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// Starts following the Events of every worker not followed yet.
    async fn follow(&mut self, members: &[Member]) {
        for m in members {
            if matches!(m.status, NodeStatus::Gone { .. }) {
                continue;
            }
            if self.links.get(&m.address).is_some_and(|l| !l.is_finished()) {
                continue;
            }
            match self.client(&m.address).await {
                Ok(client) => {
                    let task = tokio::spawn(follow_worker(
                        m.address.clone(),
                        client,
                        self.spec.scheduler.clone(),
                        self.control.clone(),
                        self.spec.membership.clone(),
                        self.spec.token_hops.clone(),
                    ));
                    self.links.insert(m.address.clone(), task);
                }
                Err(e) => {
                    let _ = self.control.send(Control::Lost { address: m.address.clone(), reason: e.to_string() });
                }
            }
        }
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
        self.follow(&members).await;
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
                match self.client(&s.address).await {
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
                    tracing::warn!(why, "the old pipeline stops first (it is broken, or the new plan does not fit beside it)");
                }
                self.stop_for(why, stale).await;
                self.unload_stale_except(stale, &stages, &keep).await;
            }
            let id = self.next_pipeline;
            self.next_pipeline += 1;
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
                    self.backoff.retain(|a, _| !stages.iter().any(|s| &s.address == a));
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
                        let backoff = LoadBackoff::after(
                            self.backoff.get(&failed.address),
                            failed.error.to_string(),
                            Instant::now(),
                        );
                        tracing::warn!(
                            address = %failed.address,
                            failures = backoff.failures,
                            "left out of plans for {:?}",
                            backoff.until.saturating_duration_since(Instant::now())
                        );
                        self.backoff.insert(failed.address.clone(), backoff);
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
    fn abandon(&self, id: u64, stages: &[StagePlan]) {
        let members = self.spec.membership.members();
        let targets: Vec<(String, WorkerClient)> = stages
            .iter()
            .filter(|s| members.iter().any(|m| m.address == s.address && !matches!(m.status, NodeStatus::Gone { .. })))
            .filter_map(|s| self.clients.get(&s.address).map(|c| (s.address.clone(), c.clone())))
            .collect();
        tokio::spawn(async move {
            for (address, mut client) in targets {
                let unload = client.unload_shard(v1::UnloadShardRequest { pipeline_id: id });
                if tokio::time::timeout(CLEANUP_TIMEOUT, unload).await.is_err() {
                    tracing::debug!(%address, pipeline_id = id, "an abandoned shard did not unload; the sweep will");
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
            id: new.id,
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
    async fn unload_pipeline(&mut self, id: u64, addresses: &[String]) -> HashMap<String, u64> {
        let members = self.spec.membership.members();
        let mut targets = Vec::new();
        for a in addresses {
            let gone = members.iter().any(|m| &m.address == a && matches!(m.status, NodeStatus::Gone { .. }));
            if !gone {
                if let Ok(c) = self.client(a).await {
                    targets.push((a.clone(), c));
                }
            }
        }
        let results = join_all(targets.into_iter().map(|(address, mut c)| async move {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                c.unload_shard(v1::UnloadShardRequest { pipeline_id: id }),
            )
            .await;
            (address, r)
        }))
        .await;
        let mut freed = HashMap::new();
        for (address, r) in results {
            match r {
                Ok(Ok(r)) => {
                    freed.insert(address, r.into_inner().freed_bytes);
                }
                Ok(Err(s)) => {
                    tracing::warn!(%address, error = %s.message(), "unloading the old pipeline failed")
                }
                Err(_) => tracing::warn!(%address, "unloading the old pipeline timed out"),
            }
        }
        freed
    }

    async fn healthy(&mut self, address: &str) -> bool {
        self.health(&[address.to_string()]).await[0].is_some()
    }

    /// Each worker's state, asked of all at once: `None` for one that does not
    /// answer within [`HEALTH_TIMEOUT`]. Connecting counts too: to a worker cut off
    /// from the network it would take the whole connect timeout.
    async fn health(&self, addresses: &[String]) -> Vec<Option<WorkerState>> {
        join_all(addresses.iter().map(|address| {
            let cached = self.clients.get(address).cloned();
            async move {
                let check = async {
                    let mut c = match cached {
                        Some(c) => c,
                        None => connect(address).await.ok()?,
                    };
                    let state = c.health(v1::HealthRequest {}).await.ok()?.into_inner().state;
                    Some(WorkerState::try_from(state).unwrap_or(WorkerState::Unspecified))
                };
                tokio::time::timeout(HEALTH_TIMEOUT, check).await.ok().flatten()
            }
        }))
        .await
    }

    fn mark_gone(&mut self, address: &str, reason: &str) {
        tracing::warn!(%address, %reason, "worker gone");
        self.clients.remove(address);
        if let Some(link) = self.links.remove(address) {
            link.abort();
        }
        let already = self
            .spec
            .membership
            .members()
            .iter()
            .any(|m| m.address == address && matches!(m.status, NodeStatus::Gone { .. }));
        if !already {
            self.spec
                .membership
                .set_status(address, NodeStatus::Gone { since: Instant::now(), reason: reason.to_string() });
        }
    }

    async fn lost(&mut self, address: &str, reason: &str) {
        let known = self.spec.membership.members().into_iter().find(|m| m.address == address);
        let Some(known) = known else { return };
        // Its event follower marks it gone at once (a load in progress watches for
        // that); the rest of the bookkeeping is done here.
        let marked_by_follower = matches!(&known.status, NodeStatus::Gone { .. });
        if marked_by_follower && !self.links.contains_key(address) && !self.clients.contains_key(address) {
            return;
        }
        self.mark_gone(address, reason);
        // The membership watch re-plans too; doing it now saves a turn.
        self.reconcile(&format!("{address} is gone: {reason}")).await;
    }

    /// A stream broke or a stage reported trouble: find out whether a worker of the
    /// pipeline is gone; if none is, run the parked requests again.
    async fn trouble(&mut self, reason: &str) {
        let Some(addresses) =
            self.current.as_ref().map(|p| p.placements.iter().map(|s| s.address.clone()).collect::<Vec<_>>())
        else {
            return;
        };
        let mut broken = false;
        let mut draining = false;
        let states = self.health(&addresses).await;
        for (a, state) in addresses.into_iter().zip(states) {
            match state {
                None => {
                    self.mark_gone(&a, reason);
                    broken = true;
                }
                // It holds no shard at all: restarted since it was loaded.
                Some(WorkerState::Idle) => {
                    tracing::warn!(address = %a, %reason, "a worker of the pipeline lost its shard");
                    broken = true;
                }
                // Stopping (SIGTERM) or drained at its machine: its heartbeat says so
                // within 300 ms, but the requests should not wait for it.
                Some(WorkerState::Draining) => {
                    draining |= self.spec.membership.set_status(&a, NodeStatus::Draining);
                }
                Some(_) => {}
            }
        }
        if broken {
            self.park(format!("re-planning: {reason}")).await;
            self.reconcile(reason).await;
        } else if draining {
            self.reconcile(reason).await;
        } else if let Some(link) = self.current.as_ref().map(|p| p.link.clone()) {
            self.scheduler_switch(Some(link), String::new(), false).await;
        }
    }

    /// Asks every gone worker whether it is back, each in a task of its own that
    /// reports [`Control::Back`].
    fn retry_gone(&mut self) {
        self.probes.retain(|_, probe| !probe.is_finished());
        for m in self.spec.membership.members() {
            if !matches!(m.status, NodeStatus::Gone { .. }) || self.probes.contains_key(&m.address) {
                continue;
            }
            let control = self.control.clone();
            let address = m.address.clone();
            let probe = tokio::spawn(async move {
                let described = tokio::time::timeout(RETRY_INTERVAL, membership::describe_once(&address)).await;
                if let Ok(Ok(member)) = described {
                    let _ = control.send(Control::Back { member: Box::new(member) });
                }
            });
            self.probes.insert(m.address, probe);
        }
    }

    /// A gone worker answers again: its stages died with the pipeline it was cut
    /// from, so whatever it holds is stale and is unloaded before it is taken in.
    /// If that fails it stays gone, and is asked again.
    async fn back(&mut self, member: Member) {
        let gone = self
            .spec
            .membership
            .members()
            .into_iter()
            .any(|m| m.address == member.address && matches!(m.status, NodeStatus::Gone { .. }));
        if !gone {
            return;
        }
        let cleanup = async {
            let mut c = self.client(&member.address).await.map_err(|e| e.to_string())?;
            c.unload_shard(v1::UnloadShardRequest::all()).await.map_err(|s| s.message().to_string())
        };
        let failed = match tokio::time::timeout(CLEANUP_TIMEOUT, cleanup).await {
            Ok(Ok(_)) => {
                tracing::info!(address = %member.address, name = %member.name(), "worker is back");
                self.spec.membership.add(member);
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {CLEANUP_TIMEOUT:?}"),
        };
        tracing::warn!(address = %member.address, error = %failed, "a worker that answered again could not unload");
        // Its connection may be the broken part: the next attempt makes a new one.
        self.clients.remove(&member.address);
    }

    /// Unloads shards that live workers still hold for pipelines that are no longer
    /// served: a worker cut off mid-switch, or back through a Join or mDNS before
    /// its probe cleaned it, may hold one. Between two ticks no pipeline is half
    /// built (the controller builds within one turn), so only the current pipeline's
    /// shards are wanted. Each unload runs in a task of its own, so a worker slow
    /// to answer never holds up the controller.
    async fn sweep_stale_shards(&mut self) {
        let current = self.current.as_ref().map(|p| p.id);
        for m in self.spec.membership.members() {
            if matches!(m.status, NodeStatus::Gone { .. }) || self.probes.contains_key(&m.address) {
                continue;
            }
            let stale: Vec<u64> = m.heartbeat.pipelines.iter().copied().filter(|&p| Some(p) != current).collect();
            if stale.is_empty() {
                continue;
            }
            let Ok(mut client) = self.client(&m.address).await else { continue };
            let address = m.address.clone();
            let task = tokio::spawn(async move {
                for pipeline_id in stale {
                    let unload = client.unload_shard(v1::UnloadShardRequest { pipeline_id });
                    match tokio::time::timeout(CLEANUP_TIMEOUT, unload).await {
                        Ok(Ok(r)) => tracing::info!(
                            %address,
                            pipeline_id,
                            freed_bytes = r.into_inner().freed_bytes,
                            "unloaded a stale shard"
                        ),
                        _ => tracing::debug!(%address, pipeline_id, "a stale shard did not unload; asked again later"),
                    }
                }
            });
            self.probes.insert(m.address, task);
        }
    }

    fn find(&self, node: &str) -> Result<Member, AdminError> {
        self.spec.membership.find(node).ok_or_else(|| AdminError::UnknownNode {
            node: node.to_string(),
            known: {
                let names: Vec<String> = self.spec.membership.members().iter().map(|m| m.name().to_string()).collect();
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            },
        })
    }

    async fn set_worker_draining(&mut self, address: &str, draining: bool) {
        if let Ok(mut c) = self.client(address).await {
            let call = c.set_draining(v1::SetDrainingRequest { draining });
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), call)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|s| s.message().to_string()))
            {
                tracing::warn!(%address, error = %e, "could not tell the worker its drain state");
            }
        }
    }

    async fn drain(
        &mut self,
        node: &str,
        force: bool,
        wait: bool,
        reply: oneshot::Sender<Result<DrainReport, AdminError>>,
    ) {
        let started = Instant::now();
        let member = match self.find(node) {
            Ok(m) => m,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        match &member.status {
            NodeStatus::Draining if !member.heartbeat.drain_reason.is_empty() => {
                // It drained itself (yielding to a game); the ask is recorded on the
                // worker so it stays drained when the game ends.
                self.set_worker_draining(&member.address, true).await;
                let name = member.name().to_string();
                let message = format!(
                    "{name} was already draining ({}); it now stays drained after that, until `strata undrain {name}`",
                    member.heartbeat.drain_reason
                );
                let _ = reply.send(Ok(DrainReport {
                    node: name,
                    finished: true,
                    seconds: started.elapsed().as_secs_f64(),
                    message,
                    ..DrainReport::default()
                }));
                return;
            }
            NodeStatus::Draining => {
                let _ = reply.send(Err(AdminError::AlreadyDraining(member.name().to_string())));
                return;
            }
            NodeStatus::Gone { reason, .. } => {
                let _ = reply.send(Err(AdminError::Gone { node: member.name().to_string(), reason: reason.clone() }));
                return;
            }
            NodeStatus::Ready => {}
        }
        let others: Vec<Member> = self
            .eligible(&self.spec.membership.members())
            .into_iter()
            .filter(|m| m.address != member.address)
            .collect();
        let fits = placement::place(&self.model_spec, &others, &self.spec.policy, &self.spec.options).map(|_| ());
        if let Err(e) = &fits {
            let reason = match e {
                placement::PlacementError::NoWorkers => "it is the last worker that can hold layers".to_string(),
                other => other.to_string(),
            };
            if !force {
                let _ = reply.send(Err(AdminError::WouldNotFit { node: member.name().to_string(), reason }));
                return;
            }
            tracing::warn!(node = %member.name(), %reason, "forced drain: requests will wait for capacity");
        }
        self.set_worker_draining(&member.address, true).await;
        self.spec.membership.set_status(&member.address, NodeStatus::Draining);
        let mut report =
            DrainReport { node: member.name().to_string(), requests_wait: fits.is_err(), ..DrainReport::default() };
        let reply = if wait {
            Some(reply)
        } else {
            report.message = format!("draining {}; `strata status` shows when it holds no layers", member.name());
            let _ = reply.send(Ok(report.clone()));
            None
        };
        let switched = self.reconcile(&format!("draining {}", member.name())).await;
        let freed_here = switched.freed.get(&member.address).copied().unwrap_or(0);
        report.seconds = started.elapsed().as_secs_f64();
        report.sequences_moved = switched.moved.total();
        report.sequences_transferred = switched.moved.transferred;
        report.sequences_replayed = switched.moved.replayed;
        report.memory_freed_bytes = freed_here;
        tracing::info!(
            node = %member.name(),
            transferred = switched.moved.transferred,
            replayed = switched.moved.replayed,
            fell_back = switched.moved.fell_back,
            freed_bytes = freed_here,
            "drained in {:.2}s",
            report.seconds
        );
        let Some(reply) = reply else { return };
        // Waiting for the moved requests to run again takes up to RESUME_WAIT: the
        // answer is sent from a task of its own, so the controller goes on meanwhile.
        let scheduler = self.spec.scheduler.clone();
        let name = member.name().to_string();
        tokio::spawn(async move {
            let mut resumed_in_time = true;
            if switched.moved.total() > 0 {
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
                "{name} drained in {:.2}s: {} freed, {} sequence(s) moved ({} with their KV cache, {} replayed), {pause}{}",
                report.seconds,
                crate::planner::format_bytes(freed_here),
                switched.moved.total(),
                switched.moved.transferred,
                switched.moved.replayed,
                if report.requests_wait {
                    "; what is left cannot hold the model: new requests wait for capacity"
                } else {
                    ""
                }
            );
            let _ = reply.send(Ok(report));
        });
    }

    async fn undrain(&mut self, node: &str) -> Result<String, AdminError> {
        let member = self.find(node)?;
        if member.status != NodeStatus::Draining {
            return Err(AdminError::NotDraining(member.name().to_string()));
        }
        self.set_worker_draining(&member.address, false).await;
        self.spec.membership.set_status(&member.address, NodeStatus::Ready);
        let started = Instant::now();
        let switched = self.reconcile(&format!("{} is back", member.name())).await;
        Ok(format!(
            "{} is back in service; re-planned in {:.2}s, {} sequence(s) moved ({} with their KV cache, {} replayed)",
            member.name(),
            started.elapsed().as_secs_f64(),
            switched.moved.total(),
            switched.moved.transferred,
            switched.moved.replayed
        ))
    }

    async fn shutdown(&mut self) {
        for (_, task) in self.links.drain().chain(self.probes.drain()) {
            task.abort();
        }
        if let Some(old) = self.current.take() {
            self.retire(old).await;
        }
    }
}

/// Follows one worker's Events: tokens and errors go to the scheduler, heartbeats
/// to the membership; a silent or closed stream means the worker is gone.
async fn follow_worker(
    address: String,
    mut client: WorkerClient,
    scheduler: mpsc::UnboundedSender<SchedulerMsg>,
    control: mpsc::UnboundedSender<Control>,
    membership: Arc<Membership>,
    token_hops: Arc<HopSamples>,
) {
    let reason = match client.events(v1::EventsRequest {}).await {
        Err(s) => format!("cannot subscribe to its events: {}", s.message()),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(event))) => match &event.kind {
                        Some(worker_event::Kind::Heartbeat(h)) => {
                            let state = WorkerState::try_from(h.state).unwrap_or(WorkerState::Unspecified);
                            let beat = Heartbeat {
                                memory_used_bytes: h.memory_used_bytes,
                                sequences: h.sequences,
                                pipelines: h.pipelines.clone(),
                                tokens_computed: h.tokens_computed,
                                batches: h.batches,
                                busy_seconds: h.busy_seconds,
                                drain_reason: h.drain_reason.clone(),
                                pulls: h.pulls.iter().map(Into::into).collect(),
                            };
                            membership.heartbeat(&address, state, beat);
                        }
                        Some(worker_event::Kind::Token(t)) => {
                            token_hops.record(t.sent_unix_nanos);
                            if scheduler.send(SchedulerMsg::Event { event }).is_err() {
                                return;
                            }
                        }
                        _ => {
                            if scheduler.send(SchedulerMsg::Event { event }).is_err() {
                                return;
                            }
                        }
                    },
                    Ok(Ok(None)) => break "its event stream ended".to_string(),
                    Ok(Err(s)) => break format!("its event stream failed: {}", s.message()),
                    Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
                }
            }
        }
    };
    // Marked here, not only by the controller: it may be busy with a load that
    // must notice this at once (and status shows it).
    membership.set_status(&address, NodeStatus::Gone { since: Instant::now(), reason: reason.clone() });
    let _ = control.send(Control::Lost { address, reason });
}

//! What `strata status` reads, kept apart from the controller: the controller
//! publishes its pipeline, predictions and load failures here as they change, and
//! a sampler adds the measured rates once a second. A status call reads this and
//! the membership and asks the scheduler, so it never waits on the controller,
//! which may be busy loading a stage for minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::backoff::LoadFailures;
use super::membership::{Member, NodeKey, NodeStatus};
use super::messages::{Placement, SchedulerStatus};
use super::rates::CounterWindow;
use super::report::{ClusterStatus, LinkReport, NodeReport};
use crate::planner::format_bytes;

/// Window of the measured tokens per second.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The pipeline serving now, as status shows it.
#[derive(Debug, Clone, Default)]
pub struct ServingPipeline {
    pub id: u64,
    pub placements: Vec<Placement>,
    /// The planner's tokens per second for one stream.
    pub predicted_tokens_per_second: f64,
    /// The planner's compute time per token of each stage's worker, by address.
    pub predicted_stage_seconds: HashMap<String, f64>,
}

#[derive(Debug)]
struct ViewState {
    pipeline: Option<ServingPipeline>,
    load_failures: LoadFailures,
    /// Tokens the cluster generated, for its measured rate.
    rate: CounterWindow<1>,
    /// Each worker's [tokens computed, batches, busy seconds], by worker.
    node_rates: HashMap<NodeKey, CounterWindow<3>>,
}

/// Shared between the controller (writer), the sampler and status calls.
#[derive(Debug)]
pub struct StatusView {
    model: String,
    layers: usize,
    state: Mutex<ViewState>,
}

impl StatusView {
    pub fn new(model: String, layers: usize) -> Self {
        let state = ViewState {
            pipeline: None,
            load_failures: HashMap::new(),
            rate: CounterWindow::new(RATE_WINDOW),
            node_rates: HashMap::new(),
        };
        Self { model, layers, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        // Nothing panics while holding it; a poisoned lock still holds good figures.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pipeline requests run on now (`None`: none, they wait).
    pub fn set_pipeline(&self, pipeline: Option<ServingPipeline>) {
        self.lock().pipeline = pipeline;
    }

    pub fn set_load_failures(&self, failures: &LoadFailures) {
        self.lock().load_failures = failures.clone();
    }

    /// Workers whose loads failed, by address (the controller's decisions leave
    /// those still backing off out of what a drain may move to).
    pub fn load_failures(&self) -> LoadFailures {
        self.lock().load_failures.clone()
    }

    /// The stages of the pipeline serving now.
    pub fn placements(&self) -> Vec<Placement> {
        self.lock().pipeline.as_ref().map(|p| p.placements.clone()).unwrap_or_default()
    }

    /// Adds one sample of the cluster's and the workers' counters.
    pub fn sample(&self, now: Instant, scheduler: &SchedulerStatus, members: &[Member]) {
        let mut state = self.lock();
        state.rate.push(now, [scheduler.tokens_generated as f64]);
        state.node_rates.retain(|k, _| members.iter().any(|m| m.key() == *k));
        for m in members {
            let h = &m.heartbeat;
            let counters = [h.tokens_computed as f64, h.batches as f64, h.busy_seconds];
            state
                .node_rates
                .entry(m.key())
                .or_insert_with(|| CounterWindow::new(RATE_WINDOW))
                .push(now, counters);
        }
    }

    /// What `strata status` answers.
    pub fn report(&self, (generation, members): (u64, &[Member]), scheduler: SchedulerStatus) -> ClusterStatus {
        let state = self.lock();
        let now = Instant::now();
        let placements = state.pipeline.as_ref().map(|p| p.placements.as_slice()).unwrap_or_default();
        let nodes = members
            .iter()
            .map(|m| {
                let stage = placements.iter().find(|p| p.address == m.address);
                let rates = state.node_rates.get(&m.key());
                let d = &m.description;
                NodeReport {
                    name: m.name().to_string(),
                    address: m.address.clone(),
                    node_id: d.node_id.clone(),
                    state: m.status.label().to_string(),
                    devices: d
                        .devices
                        .iter()
                        .map(|x| format!("{} ({})", x.name, format_bytes(x.total_memory_bytes)))
                        .collect(),
                    memory_offered_bytes: d.memory_offered_bytes,
                    memory_used_bytes: m.heartbeat.memory_used_bytes,
                    kv_cache_bytes: m.heartbeat.kv_cache_bytes,
                    bandwidth_bytes_per_second: d.devices.first().map_or(0.0, |x| x.memory_bandwidth_bytes_per_second),
                    layers: stage.map(|s| [s.layers.start, s.layers.end]),
                    stage: stage.map(|s| s.stage),
                    sequences: m.heartbeat.sequences,
                    measured_tokens_per_second: rates.map_or(0.0, |r| r.per_second(0)),
                    measured_step_ms: rates.and_then(|r| r.ratio(2, 1)).map(|s| s * 1e3),
                    predicted_step_ms: stage
                        .and_then(|_| state.pipeline.as_ref()?.predicted_stage_seconds.get(&m.address))
                        .map(|s| s * 1e3),
                    reason: match &m.status {
                        NodeStatus::Gone { reason, since } => {
                            Some(format!("{reason} ({:.0}s ago)", since.elapsed().as_secs_f64()))
                        }
                        NodeStatus::Draining if !m.heartbeat.drain_reason.is_empty() => {
                            Some(m.heartbeat.drain_reason.clone())
                        }
                        NodeStatus::Ready => state.load_failures.get(&m.key()).map(|b| b.describe(now)),
                        _ => None,
                    },
                    pulls: m.heartbeat.pulls.clone(),
                    links: m.heartbeat.links.iter().map(|l| link_report(l, members)).collect(),
                    frames_computed: m.heartbeat.frames,
                    queue_seconds: m.heartbeat.queue_seconds,
                    events_local_lane: m.events_local_lane,
                }
            })
            .collect();
        ClusterStatus {
            model: self.model.clone(),
            layers: self.layers,
            pipeline_id: state.pipeline.as_ref().map(|p| p.id),
            nodes,
            in_flight: scheduler.in_flight,
            waiting: scheduler.waiting,
            waiting_reason: scheduler.waiting_reason,
            admission: scheduler.admission,
            predicted_tokens_per_second: state.pipeline.as_ref().map(|p| p.predicted_tokens_per_second),
            measured_tokens_per_second: state.rate.per_second(0),
            membership_generation: generation,
            transport: if strata_trust::transport().secure() { "mutual TLS" } else { "insecure" }.into(),
            // The membership's to fill (see `ClusterAdmin::status`).
            refused: Vec::new(),
            moves: scheduler.moves,
            prefix_positions: scheduler.prefix_positions,
            weight_pull_bytes: 0,
        }
    }
}

/// A link as a heartbeat reports it, the worker at its end named.
fn link_report(link: &strata_proto::v1::LinkReport, members: &[Member]) -> LinkReport {
    let to = members.iter().find(|m| m.address == link.address).map_or(link.address.as_str(), |m| m.name());
    LinkReport {
        to: to.to_string(),
        address: link.address.clone(),
        bytes_sent: link.bytes_sent,
        rtt_ms: (link.rtt_seconds > 0.0).then_some(link.rtt_seconds * 1e3),
        local_lane: link.local_lane,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::backoff::LoadBackoff;
    use strata_proto::v1::WorkerDescription;

    fn member(address: &str, name: &str) -> Member {
        Member::new(address.into(), WorkerDescription { name: name.into(), ..WorkerDescription::default() })
    }

    #[test]
    fn a_report_shows_the_published_pipeline_and_each_load_failure() {
        let view = StatusView::new("m".into(), 4);
        let members = [member("a:1", "a"), member("b:1", "b")];
        let placement = Placement {
            stage: 0,
            layers: 0..4,
            address: "a:1".into(),
            name: "a".into(),
            weights_were_local: true,
            load_seconds: 0.1,
        };
        view.set_pipeline(Some(ServingPipeline {
            id: 7,
            placements: vec![placement],
            predicted_tokens_per_second: 10.0,
            predicted_stage_seconds: HashMap::from([("a:1".to_string(), 0.1)]),
        }));
        let failed = LoadBackoff::after(None, "pulling from 127.0.0.1:1: refused".into(), Instant::now());
        view.set_load_failures(&LoadFailures::from([(members[1].key(), failed)]));
        let s = view.report((0, &members), SchedulerStatus::default());
        assert_eq!(s.pipeline_id, Some(7));
        assert_eq!(s.nodes[0].layers, Some([0, 4]));
        assert_eq!(s.nodes[0].predicted_step_ms, Some(100.0));
        assert!(s.nodes[0].reason.is_none());
        assert!(s.nodes[1].reason.as_deref().is_some_and(|r| r.contains("loading failed once")), "{:?}", s.nodes[1]);
        view.set_pipeline(None);
        assert_eq!(view.report((0, &members), SchedulerStatus::default()).pipeline_id, None);
    }
}

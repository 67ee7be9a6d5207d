//! `GET /metrics`: the API's figures in Prometheus' text format, named as vLLM
//! names them (with `strata:` for `vllm:`), so dashboards made for it read these:
//! requests running and waiting, prompt and generated tokens, requests finished
//! by reason, and histograms of the time to the first token, the time per output
//! token and the whole request. For a cluster, what `strata status` knows of each
//! node and of the pipeline follows, labelled by node.
//!
//! Written by hand: a few counters and fixed-bucket histograms of atomics, read at
//! scrape time; nothing is computed on a request's path but an add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::cluster::ClusterStatus;

/// vLLM's buckets for the time to the first token, in seconds.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for the time between two output tokens.
const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// vLLM's buckets for a whole request.
const E2E_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0];

/// Counts of observations at or under each bound, and their sum.
struct Histogram {
    bounds: &'static [f64],
    /// One a bound, then the `+Inf` one.
    counts: Vec<AtomicU64>,
    /// The sum, in microseconds (atomics hold integers).
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let bucket = self.bounds.iter().position(|b| s <= *b).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Why a request ended, as vLLM's `finished_reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Stop,
    Length,
    Failed,
    Cancelled,
}

/// The API's figures since it started.
pub struct ApiMetrics {
    waiting: AtomicU64,
    running: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// By [`Ended`], in its order.
    ended: [AtomicU64; 4],
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            ended: Default::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl ApiMetrics {
    /// A request of `prompt_tokens` was handed to the engine; it waits for a
    /// sequence until [`Self::admitted`].
    pub fn started(&self, prompt_tokens: usize) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }

    pub fn admitted(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    /// A token came `since` after the one before it, or (the `first`) after the
    /// request began.
    pub fn token(&self, first: bool, since: Duration) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
        if first {
            self.ttft.observe(since);
        } else {
            self.tpot.observe(since);
        }
    }

    /// The request ended after `took`; `admitted` says which gauge it leaves.
    pub fn ended(&self, how: Ended, admitted: bool, took: Duration) {
        let gauge = if admitted { &self.running } else { &self.waiting };
        gauge.fetch_sub(1, Ordering::Relaxed);
        self.ended[how as usize].fetch_add(1, Ordering::Relaxed);
        if matches!(how, Ended::Stop | Ended::Length) {
            self.e2e.observe(took);
        }
    }

    /// The text Prometheus scrapes; `cluster` adds what the coordinator knows of
    /// the nodes and the pipeline.
    pub fn render(&self, model: &str, cluster: Option<&ClusterStatus>) -> String {
        let mut out = String::new();
        let model = escape(model);
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {value}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(&mut out, "strata:num_requests_running", "Requests generating.", load(&self.running) as f64);
        gauge(&mut out, "strata:num_requests_waiting", "Requests waiting for a sequence.", load(&self.waiting) as f64);
        counter(
            &mut out,
            "strata:prompt_tokens_total",
            "Prompt tokens of the requests started.",
            load(&self.prompt_tokens),
        );
        counter(&mut out, "strata:generation_tokens_total", "Tokens generated.", load(&self.generation_tokens));
        let name = "strata:request_success_total";
        family(&mut out, name, "counter", "Requests ended, by why.");
        for (reason, i) in
            [("stop", Ended::Stop), ("length", Ended::Length), ("error", Ended::Failed), ("abort", Ended::Cancelled)]
        {
            let _ = writeln!(
                out,
                "{name}{{model_name=\"{model}\",finished_reason=\"{reason}\"}} {}",
                load(&self.ended[i as usize])
            );
        }
        self.ttft.write(&mut out, "strata:time_to_first_token_seconds", "Time from the request to its first token.");
        self.tpot.write(
            &mut out,
            "strata:time_per_output_token_seconds",
            "Time between two output tokens of a request.",
        );
        self.e2e.write(&mut out, "strata:e2e_request_latency_seconds", "Time from the request to its last token.");
        if let Some(s) = cluster {
            write_cluster(&mut out, s);
        }
        out
    }
}

/// What only a pipeline has: each node's memory, sequences and step time measured
/// beside the planner's prediction, and the pipeline's speeds.
fn write_cluster(out: &mut String, s: &ClusterStatus) {
    family(out, "strata:node_up", "gauge", "1 for a node that may hold layers (ready), 0 draining or gone.");
    for n in &s.nodes {
        let _ = writeln!(
            out,
            "strata:node_up{{node=\"{}\",state=\"{}\"}} {}",
            escape(&n.name),
            n.state,
            u8::from(n.state == "ready")
        );
    }
    let per_node: [(&str, &str, fn(&crate::cluster::NodeReport) -> Option<f64>); 7] = [
        ("strata:node_memory_used_bytes", "Memory the node's shards use.", |n| Some(n.memory_used_bytes as f64)),
        ("strata:node_kv_cache_bytes", "Of the memory the node's shards use, the KV caches.", |n| {
            Some(n.kv_cache_bytes as f64)
        }),
        ("strata:node_memory_offered_bytes", "Memory the node offers.", |n| Some(n.memory_offered_bytes as f64)),
        ("strata:node_sequences", "Sequences the node holds KV for.", |n| Some(f64::from(n.sequences))),
        ("strata:stage_step_seconds", "A stage's compute time per step, measured.", |n| {
            n.measured_step_ms.map(|ms| ms / 1e3)
        }),
        ("strata:stage_predicted_step_seconds", "A stage's step time as the planner predicted it.", |n| {
            n.predicted_step_ms.map(|ms| ms / 1e3)
        }),
        ("strata:node_events_local_lane", "1 where a node's events come over a Unix socket on one machine.", |n| {
            Some(f64::from(u8::from(n.events_local_lane)))
        }),
    ];
    for (name, help, value) in per_node {
        family(out, name, "gauge", help);
        for n in &s.nodes {
            if let Some(v) = value(n) {
                let stage = n.stage.map_or(String::new(), |s| format!(",stage=\"{s}\""));
                let _ = writeln!(out, "{name}{{node=\"{}\"{stage}}} {v}", escape(&n.name));
            }
        }
    }
    // Counters: the queueing time per frame is the rate of one over the other.
    let per_node_totals: [(&str, &str, fn(&crate::cluster::NodeReport) -> f64); 2] = [
        ("strata:stage_frames_total", "Frames a node's stages computed.", |n| n.frames_computed as f64),
        (
            "strata:stage_queue_seconds_total",
            "Seconds frames waited in a node's queue before their forward began, summed.",
            |n| n.queue_seconds,
        ),
    ];
    for (name, help, value) in per_node_totals {
        family(out, name, "counter", help);
        for n in s.nodes.iter().filter(|n| n.state != "gone") {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", escape(&n.name), value(n));
        }
    }
    // Each link, labelled by the nodes at its ends.
    let links = || {
        s.nodes.iter().flat_map(|n| {
            n.links.iter().map(move |l| (format!("from=\"{}\",to=\"{}\"", escape(&n.name), escape(&l.to)), l))
        })
    };
    family(out, "strata:link_bytes_sent_total", "counter", "Bytes a node streamed to another over their link.");
    for (labels, l) in links() {
        let _ = writeln!(out, "strata:link_bytes_sent_total{{{labels}}} {}", l.bytes_sent);
    }
    family(out, "strata:link_round_trip_seconds", "gauge", "The last round trip of a small call over a link.");
    for (labels, l) in links() {
        if let Some(ms) = l.rtt_ms {
            let _ = writeln!(out, "strata:link_round_trip_seconds{{{labels}}} {}", ms / 1e3);
        }
    }
    family(out, "strata:link_local_lane", "gauge", "1 where a link's frames go over a Unix socket on one machine.");
    for (labels, l) in links() {
        let _ = writeln!(out, "strata:link_local_lane{{{labels}}} {}", u8::from(l.local_lane));
    }
    family(out, "strata:pipeline_tokens_per_second", "gauge", "Tokens a second the cluster delivered lately.");
    let _ = writeln!(out, "strata:pipeline_tokens_per_second {}", s.measured_tokens_per_second);
    if let Some(p) = s.predicted_tokens_per_second {
        family(out, "strata:pipeline_predicted_tokens_per_second", "gauge", "The planner's prediction for one stream.");
        let _ = writeln!(out, "strata:pipeline_predicted_tokens_per_second {p}");
    }
    family(out, "strata:pipeline_switches_total", "counter", "Times the requests were put on a new pipeline.");
    let _ = writeln!(out, "strata:pipeline_switches_total {}", s.moves.switches);
    family(out, "strata:sequence_moves_total", "counter", "Requests moved to a new pipeline, by how.");
    let _ = writeln!(out, "strata:sequence_moves_total{{how=\"transfer\"}} {}", s.moves.transferred);
    let _ = writeln!(out, "strata:sequence_moves_total{{how=\"replay\"}} {}", s.moves.replayed);
    family(out, "strata:kv_transfer_failures_total", "counter", "KV transfers that failed (the request was replayed).");
    let _ = writeln!(out, "strata:kv_transfer_failures_total {}", s.moves.transfers_failed);
    family(out, "strata:drain_duration_seconds", "summary", "Drains, from the command to the node's memory being free.");
    let _ = writeln!(out, "strata:drain_duration_seconds_sum {}", s.moves.drain_seconds);
    let _ = writeln!(out, "strata:drain_duration_seconds_count {}", s.moves.drains);
    let help = "Bytes of shard files workers pulled from the coordinator.";
    family(out, "strata:weight_pull_bytes_total", "counter", help);
    let _ = writeln!(out, "strata:weight_pull_bytes_total {}", s.weight_pull_bytes);
    let help = "Prompt positions copied from another sequence's KV instead of computed.";
    family(out, "strata:prefix_positions_total", "counter", help);
    let _ = writeln!(out, "strata:prefix_positions_total {}", s.prefix_positions);
    family(out, "strata:membership_changes_total", "counter", "Changes to the set of workers and their states.");
    let _ = writeln!(out, "strata:membership_changes_total {}", s.membership_generation);
}

/// The `# HELP` and `# TYPE` lines that declare the family `name` of `kind`.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

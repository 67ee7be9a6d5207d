//! The scheduler: one task that owns every request in flight and runs it through
//! the current pipeline, and moves it to the next pipeline when the cluster
//! re-plans.
//!
//! A request is sent as OpenSequence and its prompt in frames of at most
//! [`frame_tokens`] tokens; then one frame per sampled token (on the coordinator
//! return path; on the direct path the last stage feeds stage 0 itself) until a
//! stop token, `max_tokens` or the context's end; then ReleaseSequence, which every
//! stage forwards, freeing the KV caches.
//!
//! Every token a request has produced is kept, so a request survives any change of
//! pipeline: it is *replayed* on the new one under a new sequence id — the prompt in
//! the same frames as the first time, then each generated token as its own
//! one-token frame, exactly the steps the original run took. The stages compute a
//! one-token step and a prompt chunk in different (equally valid) summation orders,
//! so replaying the same steps is what makes the replayed sequence bit-identical;
//! the frames go out back to back, so this costs one pipeline pass per token but no
//! round trips. Sampling is a pure function of (seed, position, history), so sampled
//! outputs continue exactly too. Tokens of the old sequence id that arrive late are
//! ignored, and a token is accepted only at the position the request expects.
//!
//! With no pipeline (the cluster lost more than it can spare), requests wait, up
//! to the queue timeout, and then fail with the reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strata_model::generate::FinishReason;
use strata_proto::v1::{self, stage_message, worker_event, ErrorCode, StageMessage, WorkerEvent};
use tokio::sync::{mpsc, oneshot};

use super::controller::Control;
use super::engine::{frame_tokens, sampling_to_proto};
use crate::engine::{EngineError, GenerateEvent, GenerateRequest, ModelCard};

/// How often the scheduler looks for requests whose client went away, or that
/// waited too long for capacity.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// A request that hits pipeline trouble more often than this fails.
const MAX_RETRIES: u32 = 8;

/// Where requests go now.
#[derive(Debug, Clone)]
pub struct PipelineLink {
    pub id: u64,
    pub stage0: mpsc::UnboundedSender<StageMessage>,
}

/// What the scheduler reports about itself.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStatus {
    pub in_flight: usize,
    /// Requests waiting for a pipeline (new, or parked by a failure).
    pub waiting: usize,
    pub waiting_reason: Option<String>,
    pub tokens_generated: u64,
}

pub(super) enum SchedulerMsg {
    Start {
        id: u64,
        request: GenerateRequest,
        direct: bool,
        ignore_eos: bool,
        events: mpsc::Sender<GenerateEvent>,
    },
    Event {
        event: WorkerEvent,
    },
    /// Run everything on `pipeline` from now on (`None`: park everything, because of
    /// `reason`). Replies with how many requests were moved.
    Switch {
        pipeline: Option<PipelineLink>,
        reason: String,
        done: oneshot::Sender<usize>,
    },
    /// Replies, once every request moved by the last switch has produced a token
    /// again (or ended), with the longest pause a client saw.
    AwaitResumed {
        reply: oneshot::Sender<Duration>,
    },
    Status {
        reply: oneshot::Sender<SchedulerStatus>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// A request in flight.
struct Request {
    prompt: Vec<u32>,
    sampling: v1::SamplingParams,
    generated: Vec<u32>,
    events: mpsc::Sender<GenerateEvent>,
    /// No token is generated at or beyond this position.
    end_position: usize,
    direct: bool,
    ignore_eos: bool,
    /// (pipeline, sequence id) it runs under; `None` while it waits for a pipeline.
    running: Option<(u64, u64)>,
    /// When it last produced a token (or started).
    last_token: Instant,
    /// Since when it has waited for a pipeline.
    waiting_since: Option<Instant>,
    /// Moved by the last switch and not yet heard from since.
    moved: bool,
    retries: u32,
}

pub(super) struct Scheduler {
    card: ModelCard,
    hidden: usize,
    queue_timeout: Duration,
    control: mpsc::UnboundedSender<Control>,
    pipeline: Option<PipelineLink>,
    waiting_reason: String,
    requests: HashMap<u64, Request>,
    /// Sequence id on the wire → request id.
    wire: HashMap<u64, u64>,
    next_seq: u64,
    longest_pause: Duration,
    resumed_waiters: Vec<oneshot::Sender<Duration>>,
    tokens_generated: u64,
}

fn message(kind: stage_message::Kind) -> StageMessage {
    StageMessage { kind: Some(kind) }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Scheduler {
    pub fn new(
        card: ModelCard,
        hidden: usize,
        queue_timeout: Duration,
        control: mpsc::UnboundedSender<Control>,
    ) -> Self {
        Self {
            card,
            hidden,
            queue_timeout,
            control,
            pipeline: None,
            waiting_reason: "the cluster is starting".into(),
            requests: HashMap::new(),
            wire: HashMap::new(),
            next_seq: 1,
            longest_pause: Duration::ZERO,
            resumed_waiters: Vec::new(),
            tokens_generated: 0,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SchedulerMsg>) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = sweep.tick() => {
                    self.sweep();
                    continue;
                }
            };
            match msg {
                SchedulerMsg::Start { id, request, direct, ignore_eos, events } => {
                    self.start(id, request, direct, ignore_eos, events)
                }
                SchedulerMsg::Event { event } => self.on_event(event),
                SchedulerMsg::Switch { pipeline, reason, done } => {
                    let moved = self.switch(pipeline, reason);
                    let _ = done.send(moved);
                }
                SchedulerMsg::AwaitResumed { reply } => {
                    self.resumed_waiters.push(reply);
                    self.check_resumed();
                }
                SchedulerMsg::Status { reply } => {
                    let _ = reply.send(SchedulerStatus {
                        in_flight: self.requests.len(),
                        waiting: self.requests.values().filter(|r| r.running.is_none()).count(),
                        waiting_reason: self.pipeline.is_none().then(|| self.waiting_reason.clone()),
                        tokens_generated: self.tokens_generated,
                    });
                }
                SchedulerMsg::Shutdown { done } => {
                    for id in self.requests.keys().copied().collect::<Vec<_>>() {
                        self.finish(id, Some(GenerateEvent::Failed(EngineError::ShuttingDown)));
                    }
                    let _ = done.send(());
                    break;
                }
            }
        }
    }

    fn send(&self, pipeline: u64, m: StageMessage) {
        // A closed stage-0 stream is reported to the controller by its task.
        if let Some(p) = self.pipeline.as_ref().filter(|p| p.id == pipeline) {
            let _ = p.stage0.send(m);
        }
    }

    fn start(
        &mut self,
        id: u64,
        request: GenerateRequest,
        direct: bool,
        ignore_eos: bool,
        events: mpsc::Sender<GenerateEvent>,
    ) {
        let end_position = (request.prompt_tokens.len() + request.max_tokens).min(self.card.context_length);
        let now = Instant::now();
        self.requests.insert(
            id,
            Request {
                prompt: request.prompt_tokens,
                sampling: sampling_to_proto(&request.sampling),
                generated: Vec::new(),
                events,
                end_position,
                direct,
                ignore_eos,
                running: None,
                last_token: now,
                waiting_since: Some(now),
                moved: false,
                retries: 0,
            },
        );
        if let Some(pipeline) = self.pipeline.clone() {
            self.launch(id, &pipeline);
        } else {
            tracing::info!(request = id, reason = %self.waiting_reason, "request waits for capacity");
        }
    }

    /// Sends request `id` — prompt and every token generated so far — to `pipeline`
    /// under a fresh sequence id.
    fn launch(&mut self, id: u64, pipeline: &PipelineLink) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let chunk = frame_tokens(self.hidden);
        let stop_tokens = self.card.tokenizer.eos_tokens().to_vec();
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        if let Some((_, old)) = r.running.replace((pipeline.id, seq)) {
            self.wire.remove(&old);
        }
        self.wire.insert(seq, id);
        r.waiting_since = None;
        let mut out = vec![message(stage_message::Kind::Open(v1::OpenSequence {
            seq_id: seq,
            sampling: Some(r.sampling),
            direct_return: r.direct,
            end_position: r.end_position as u32,
            stop_tokens: if r.ignore_eos { Vec::new() } else { stop_tokens },
        }))];
        let chunks = r.prompt.len().div_ceil(chunk);
        let sent = unix_nanos();
        for (i, tokens) in r.prompt.chunks(chunk).enumerate() {
            out.push(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq,
                position: (i * chunk) as u32,
                tokens: tokens.to_vec(),
                hidden: None,
                sample: i + 1 == chunks && r.generated.is_empty(),
                sent_unix_nanos: sent,
            })));
        }
        let base = r.prompt.len();
        for (k, &token) in r.generated.iter().enumerate() {
            out.push(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq,
                position: (base + k) as u32,
                tokens: vec![token],
                hidden: None,
                sample: k + 1 == r.generated.len(),
                sent_unix_nanos: sent,
            })));
        }
        for m in out {
            let _ = pipeline.stage0.send(m);
        }
    }

    fn finish(&mut self, id: u64, event: Option<GenerateEvent>) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        if let Some(event) = event {
            let _ = r.events.try_send(event);
        }
        if let Some((pipeline, seq)) = r.running {
            self.wire.remove(&seq);
            self.send(pipeline, message(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: seq })));
        }
        self.check_resumed();
    }

    fn on_event(&mut self, event: WorkerEvent) {
        match event.kind {
            Some(worker_event::Kind::Token(t)) => self.on_token(t),
            Some(worker_event::Kind::Error(e)) => self.on_error(e),
            _ => {}
        }
    }

    fn on_token(&mut self, t: v1::TokenSampled) {
        // Tokens of a sequence id no longer in use (a finished request, or the
        // pipeline before a switch) are moot.
        let Some(&id) = self.wire.get(&t.seq_id) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let position = t.position as usize;
        if position != r.prompt.len() + r.generated.len() {
            return;
        }
        if r.events.is_closed() {
            return self.finish(id, None);
        }
        let now = Instant::now();
        if r.moved {
            r.moved = false;
            self.longest_pause = self.longest_pause.max(now - r.last_token);
        }
        r.last_token = now;
        r.retries = 0;
        self.tokens_generated += 1;
        if !r.ignore_eos && self.card.tokenizer.is_eos(t.token) {
            return self.finish(id, Some(GenerateEvent::Finished(FinishReason::Stop)));
        }
        r.generated.push(t.token);
        let _ = r.events.try_send(GenerateEvent::Token(t.token));
        if position + 1 >= r.end_position {
            return self.finish(id, Some(GenerateEvent::Finished(FinishReason::Length)));
        }
        if !r.direct {
            let Some((pipeline, seq)) = r.running else {
                return;
            };
            self.send(
                pipeline,
                message(stage_message::Kind::Frame(v1::ActivationFrame {
                    seq_id: seq,
                    position: t.position,
                    tokens: vec![t.token],
                    hidden: None,
                    sample: true,
                    sent_unix_nanos: unix_nanos(),
                })),
            );
        }
        self.check_resumed();
    }

    fn on_error(&mut self, e: v1::SequenceError) {
        let Some(&id) = self.wire.get(&e.seq_id) else {
            return;
        };
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
        // A stage that cannot reach the next one, or that lost the sequence, is the
        // pipeline's trouble, not the request's: it waits and the controller checks
        // the workers (and re-plans if one is gone).
        let pipeline_trouble = matches!(
            code,
            ErrorCode::NextStageUnreachable
                | ErrorCode::NoShard
                | ErrorCode::UnknownSequence
                | ErrorCode::PositionMismatch
        );
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        if pipeline_trouble && r.retries < MAX_RETRIES {
            tracing::warn!(request = id, stage = e.stage_index, ?code, message = %e.message, "pipeline trouble; the request waits");
            r.retries += 1;
            if let Some((_, seq)) = r.running.take() {
                self.wire.remove(&seq);
            }
            r.waiting_since = Some(Instant::now());
            r.moved = true;
            let _ = self.control.send(Control::Trouble { reason: format!("stage {}: {}", e.stage_index, e.message) });
            return;
        }
        tracing::warn!(request = id, stage = e.stage_index, ?code, message = %e.message, "sequence failed");
        let reason = format!("stage {}: {}", e.stage_index, e.message);
        self.finish(id, Some(GenerateEvent::Failed(EngineError::Internal(reason))));
    }

    /// Runs every request on `pipeline`, replaying those that ran elsewhere (or
    /// nowhere); returns how many were moved.
    fn switch(&mut self, pipeline: Option<PipelineLink>, reason: String) -> usize {
        self.pipeline = pipeline.clone();
        self.waiting_reason = reason;
        let now = Instant::now();
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        let mut moved = 0;
        for id in ids {
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            let current = matches!((&pipeline, r.running), (Some(p), Some((on, _))) if p.id == on);
            if current {
                continue;
            }
            if r.running.is_some() || !r.generated.is_empty() {
                r.moved = true;
                moved += 1;
            }
            match &pipeline {
                Some(p) => self.launch(id, p),
                None => {
                    if let Some((_, seq)) = r.running.take() {
                        self.wire.remove(&seq);
                    }
                    r.waiting_since.get_or_insert(now);
                }
            }
        }
        if let Some(p) = &pipeline {
            tracing::info!(pipeline = p.id, moved, "requests run on the new pipeline");
        } else {
            tracing::warn!(reason = %self.waiting_reason, parked = self.requests.len(), "no pipeline: requests wait");
        }
        moved
    }

    fn check_resumed(&mut self) {
        if self.resumed_waiters.is_empty() || self.requests.values().any(|r| r.moved) {
            return;
        }
        let pause = std::mem::take(&mut self.longest_pause);
        for w in self.resumed_waiters.drain(..) {
            let _ = w.send(pause);
        }
    }

    /// Releases requests whose client has gone, and fails those that waited for a
    /// pipeline longer than the queue timeout.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut expired = Vec::new();
        for (&id, r) in &self.requests {
            if r.events.is_closed() {
                gone.push(id);
            } else if r.waiting_since.is_some_and(|t| now - t >= self.queue_timeout) {
                expired.push(id);
            }
        }
        for id in gone {
            tracing::debug!(request = id, "client went away; releasing");
            self.finish(id, None);
        }
        for id in expired {
            let reason = format!(
                "waited {}s for the cluster to have capacity: {}",
                self.queue_timeout.as_secs(),
                self.waiting_reason
            );
            self.finish(id, Some(GenerateEvent::Failed(EngineError::Unavailable(reason))));
        }
        self.check_resumed();
    }
}

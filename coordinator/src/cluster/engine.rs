//! The cluster as an [`Engine`]: a scheduler task that feeds sequences into stage 0
//! and turns the last stage's sampled tokens into [`GenerateEvent`]s.
//!
//! One task owns every live sequence, so no locks are involved: requests, worker
//! events and a periodic sweep for abandoned requests all arrive on its channel or
//! timer. For each request it sends OpenSequence and the prompt in frames of at most
//! [`frame_tokens`] tokens, then (on the coordinator return path) one frame per
//! sampled token until a stop token, `max_tokens` or the context's end, and finally
//! ReleaseSequence, which every stage forwards, freeing the KV caches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_model::generate::FinishReason;
use strata_model::SamplingParams;
use strata_proto::v1::{self, stage_message, worker_event, StageMessage, WorkerEvent};
use strata_proto::FRAME_TARGET_BYTES;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineError, GenerateEvent, GenerateRequest, ModelCard};

/// Most prompt tokens in one frame. Equal to the stages' prefill chunk, so a
/// pipeline computes a long prompt in exactly the chunks one process would.
pub const MAX_FRAME_TOKENS: usize = 512;

/// How often the scheduler looks for requests whose client went away.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Tokens per prompt frame for a model of width `hidden`, so that the hidden states
/// the stages pass on stay within [`FRAME_TARGET_BYTES`].
pub fn frame_tokens(hidden: usize) -> usize {
    (FRAME_TARGET_BYTES / (hidden.max(1) * std::mem::size_of::<f32>())).clamp(1, MAX_FRAME_TOKENS)
}

/// How sampled tokens get back to stage 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPath {
    /// The last stage reports the token; the coordinator sends the next frame.
    Coordinator,
    /// The last stage sends the next frame to stage 0 itself.
    Direct,
}

pub(super) enum SchedulerMsg {
    Start { seq: u64, request: GenerateRequest, direct: bool, ignore_eos: bool, events: mpsc::Sender<GenerateEvent> },
    Event { stage: usize, event: WorkerEvent },
    StageLost { stage: usize, reason: String },
    Shutdown { done: oneshot::Sender<()> },
}

/// One latency sample list, shared by the event pumps.
#[derive(Debug, Default)]
pub struct HopSamples(Mutex<Vec<u32>>);

impl HopSamples {
    pub fn record(&self, sent_unix_nanos: u64) {
        if sent_unix_nanos == 0 {
            return;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let micros = (now.saturating_sub(sent_unix_nanos) / 1_000).min(u32::MAX as u64) as u32;
        let mut samples = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < 100_000 {
            samples.push(micros);
        }
    }

    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The Engine half of a cluster: cheap to share, sends work to the scheduler.
pub struct ClusterEngine {
    pub(super) card: ModelCard,
    pub(super) vocab_size: usize,
    pub(super) tx: mpsc::UnboundedSender<SchedulerMsg>,
    pub(super) next_seq: AtomicU64,
    pub(super) return_path: ReturnPath,
    pub(super) broken: Arc<AtomicBool>,
}

impl ClusterEngine {
    /// Like [`Engine::generate`], choosing the return path for this request.
    pub fn generate_via(
        &self,
        request: GenerateRequest,
        path: ReturnPath,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        self.start(request, path, false)
    }

    /// For benchmarks: generates exactly `max_tokens`, going on past end-of-generation
    /// tokens, so every run decodes the same number of tokens.
    pub fn generate_ignoring_eos(
        &self,
        request: GenerateRequest,
        path: ReturnPath,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        self.start(request, path, true)
    }

    fn start(
        &self,
        request: GenerateRequest,
        path: ReturnPath,
        ignore_eos: bool,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        request.validate(self.vocab_size, self.card.context_length)?;
        if self.broken.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("a worker of the pipeline is gone".into()));
        }
        // Room for every event the request can produce: the scheduler never waits on
        // a slow client.
        let (events, receiver) = mpsc::channel(request.max_tokens + 1);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let direct = path == ReturnPath::Direct;
        self.tx
            .send(SchedulerMsg::Start { seq, request, direct, ignore_eos, events })
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(receiver)
    }

    pub fn return_path(&self) -> ReturnPath {
        self.return_path
    }

    /// Fails what is in flight, releases it on the workers and stops the scheduler.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(SchedulerMsg::Shutdown { done }).is_ok() {
            let _ = wait.await;
        }
    }
}

impl Engine for ClusterEngine {
    fn model(&self) -> &ModelCard {
        &self.card
    }

    fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        self.generate_via(request, self.return_path)
    }
}

/// A request in flight.
struct Live {
    events: mpsc::Sender<GenerateEvent>,
    /// No token is generated at or beyond this position.
    end_position: usize,
    direct: bool,
    ignore_eos: bool,
}

pub(super) struct Scheduler {
    pub stage0: mpsc::UnboundedSender<StageMessage>,
    pub card: ModelCard,
    pub hidden: usize,
    pub broken: Arc<AtomicBool>,
    live: HashMap<u64, Live>,
}

fn message(kind: stage_message::Kind) -> StageMessage {
    StageMessage { kind: Some(kind) }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

pub fn sampling_to_proto(p: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k.map(|k| k.min(u32::MAX as usize) as u32),
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        repeat_last_n: p.repeat_last_n.min(u32::MAX as usize) as u32,
        seed: p.seed,
    }
}

impl Scheduler {
    pub fn new(
        stage0: mpsc::UnboundedSender<StageMessage>,
        card: ModelCard,
        hidden: usize,
        broken: Arc<AtomicBool>,
    ) -> Self {
        Self { stage0, card, hidden, broken, live: HashMap::new() }
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
                SchedulerMsg::Start { seq, request, direct, ignore_eos, events } => {
                    self.start(seq, request, direct, ignore_eos, events)
                }
                SchedulerMsg::Event { stage, event } => self.on_event(stage, event),
                SchedulerMsg::StageLost { stage, reason } => self.stage_lost(stage, &reason),
                SchedulerMsg::Shutdown { done } => {
                    for (seq, live) in std::mem::take(&mut self.live) {
                        let _ = live.events.try_send(GenerateEvent::Failed(EngineError::ShuttingDown));
                        self.send(message(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: seq })));
                    }
                    self.broken.store(true, Ordering::Release);
                    let _ = done.send(());
                    break;
                }
            }
        }
    }

    fn send(&self, m: StageMessage) {
        // A closed stage-0 stream is reported by its task as a lost stage.
        let _ = self.stage0.send(m);
    }

    fn start(
        &mut self,
        seq: u64,
        request: GenerateRequest,
        direct: bool,
        ignore_eos: bool,
        events: mpsc::Sender<GenerateEvent>,
    ) {
        if self.broken.load(Ordering::Acquire) {
            let _ = events
                .try_send(GenerateEvent::Failed(EngineError::Unavailable("a worker of the pipeline is gone".into())));
            return;
        }
        let prompt = request.prompt_tokens;
        let end_position = (prompt.len() + request.max_tokens).min(self.card.context_length);
        self.send(message(stage_message::Kind::Open(v1::OpenSequence {
            seq_id: seq,
            sampling: Some(sampling_to_proto(&request.sampling)),
            direct_return: direct,
            end_position: end_position as u32,
            stop_tokens: if ignore_eos { Vec::new() } else { self.card.tokenizer.eos_tokens().to_vec() },
        })));
        let chunk = frame_tokens(self.hidden);
        let chunks = prompt.len().div_ceil(chunk);
        for (i, tokens) in prompt.chunks(chunk).enumerate() {
            self.send(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq,
                position: (i * chunk) as u32,
                tokens: tokens.to_vec(),
                hidden: None,
                sample: i + 1 == chunks,
                sent_unix_nanos: unix_nanos(),
            })));
        }
        self.live.insert(seq, Live { events, end_position, direct, ignore_eos });
    }

    fn finish(&mut self, seq: u64, event: Option<GenerateEvent>) {
        if let Some(live) = self.live.remove(&seq) {
            if let Some(event) = event {
                let _ = live.events.try_send(event);
            }
            self.send(message(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: seq })));
        }
    }

    fn on_event(&mut self, stage: usize, event: WorkerEvent) {
        match event.kind {
            Some(worker_event::Kind::Token(t)) => self.on_token(t),
            // Errors for sequences no longer live (a late frame of a finished one) are moot.
            Some(worker_event::Kind::Error(e)) if self.live.contains_key(&e.seq_id) => {
                tracing::warn!(seq = e.seq_id, stage, code = e.code, message = %e.message, "sequence failed");
                let reason = format!("stage {}: {}", e.stage_index, e.message);
                self.finish(e.seq_id, Some(GenerateEvent::Failed(EngineError::Internal(reason))));
            }
            _ => {}
        }
    }

    fn on_token(&mut self, t: v1::TokenSampled) {
        let seq = t.seq_id;
        let Some(live) = self.live.get(&seq) else { return };
        let position = t.position as usize;
        if live.events.is_closed() {
            return self.finish(seq, None);
        }
        if !live.ignore_eos && self.card.tokenizer.is_eos(t.token) {
            return self.finish(seq, Some(GenerateEvent::Finished(FinishReason::Stop)));
        }
        let _ = live.events.try_send(GenerateEvent::Token(t.token));
        if position + 1 >= live.end_position {
            return self.finish(seq, Some(GenerateEvent::Finished(FinishReason::Length)));
        }
        if !live.direct {
            self.send(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq,
                position: t.position,
                tokens: vec![t.token],
                hidden: None,
                sample: true,
                sent_unix_nanos: unix_nanos(),
            })));
        }
    }

    /// Releases requests whose client has gone (noticed here even mid-prompt).
    fn sweep(&mut self) {
        let gone: Vec<u64> = self.live.iter().filter(|(_, l)| l.events.is_closed()).map(|(s, _)| *s).collect();
        for seq in gone {
            tracing::debug!(seq, "client went away; releasing");
            self.finish(seq, None);
        }
    }

    fn stage_lost(&mut self, stage: usize, reason: &str) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(stage, %reason, "lost a stage; failing what is in flight");
        for (_, live) in std::mem::take(&mut self.live) {
            let _ = live
                .events
                .try_send(GenerateEvent::Failed(EngineError::Unavailable(format!("stage {stage}: {reason}"))));
        }
    }
}

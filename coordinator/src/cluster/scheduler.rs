//! The scheduler: one task that owns every request in flight and runs it through
//! the current pipeline, and moves it to the next pipeline when the cluster
//! re-plans.
//!
//! A request is sent as OpenSequence and its prompt in frames of at most
//! [`super::engine::frame_tokens`] tokens; then one frame per sampled token (on the coordinator
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
//! When the old pipeline still works (a drain, an undrain, a worker joining), a
//! request that has generated tokens can instead move with its KV cache (see
//! [`super::moves`]): under its new sequence id it waits while the new stages pull
//! the KV of positions `[0, n)` from the old ones, then goes on with one frame at
//! position `n` carrying its last token; the old sequence is released once its KV
//! has been read. [`MovePolicy`] and the cost model choose per request; a transfer
//! that fails becomes a replay. The switch is answered once every transfer has
//! settled, so the controller unloads the old pipeline only after that.
//!
//! With no pipeline (the cluster lost more than it can spare), requests wait, up
//! to the queue timeout, and then fail with the reason.
//!
//! A request whose prompt starts like another open sequence's opens with a copy of
//! that one's KV and sends only the rest of its frames (see [`super::prefix`]): the
//! choices of one request, and the next turn of a conversation, whose earlier turn's
//! prompt is kept (a copy of its KV) after it finishes while a planned sequence is
//! free for it.
//!
//! Admission: the plan sized every stage's KV cache for `--sequences` sequences of
//! `--context` tokens, so at most that many requests are admitted at once; the rest
//! wait in line, first come first, and are admitted as others end. An admitted
//! request keeps its sequence while it moves or waits for a pipeline, so no
//! pipeline ever holds more sequences than planned. One that waits in line longer
//! than the queue timeout fails with [`EngineError::QueueTimeout`] (HTTP 429).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use strata_model::generate::FinishReason;
use strata_proto::v1::{self, stage_message, worker_event, ErrorCode, StageMessage, WorkerEvent};
use strata_proto::{PipelineId, SeqId};
use tokio::sync::{mpsc, oneshot};

use super::engine::sampling_to_proto;
use super::moves::{self, MoveCost, MovePolicy, TransferSpec, Transferred};
use super::prefix::{best_prefix, PrefixSource, PromptFrames, Retained, RetainedSequences};
use super::messages::{Control, MoveTotals, Moved, PipelineLink, RequestId, Resumed, SchedulerMsg, SchedulerStatus};
use super::report::{AdmissionReport, QueuedRequest};
use super::request_trace::RequestTrace;
use crate::engine::{EngineError, GenerateEvent, GenerateRequest, ModelCard, TokenLogprob};

/// How often the scheduler looks for requests whose client went away, or that
/// waited too long for capacity.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// A request that hits pipeline trouble more often than this fails.
const MAX_RETRIES: u32 = 8;

/// How the scheduler moves requests, and what it needs to estimate the cost.
#[derive(Debug, Clone)]
pub struct MoveSettings {
    pub policy: MovePolicy,
    pub cost: MoveCost,
    /// KV bytes of one position over all layers.
    pub kv_bytes_per_position: u64,
}

/// What the plan sized the pipelines for, and how long a request may wait.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionSettings {
    /// Sequences every stage holds KV caches for: at most this many run at once.
    pub sequences: usize,
    /// Tokens one sequence may reach (the planned context, at most the model's).
    pub context: usize,
    /// How long a request may wait, for admission or for a pipeline, before it fails.
    pub queue_timeout: Duration,
    /// Keep a copy of finished requests' prompt KV in planned sequences no request
    /// uses, for the next turn of their conversation to start from (the prefix cache).
    pub keep_finished: bool,
}

/// A request in flight.
struct Request {
    prompt: Vec<u32>,
    /// How its prompt is sent: the same frames at every launch.
    frames: PromptFrames,
    /// A stage could not copy the prefix it was opened with: it computes its whole
    /// prompt from then on.
    no_prefix: bool,
    sampling: v1::SamplingParams,
    generated: Vec<u32>,
    events: mpsc::Sender<GenerateEvent>,
    /// No token is generated at or beyond this position.
    end_position: usize,
    direct: bool,
    ignore_eos: bool,
    /// Holds one of the planned sequences; false while it waits in line.
    admitted: bool,
    /// (pipeline, sequence id) it runs under; `None` while it waits for admission
    /// or a pipeline.
    running: Option<(PipelineId, SeqId)>,
    /// When it last produced a token (or started).
    last_token: Instant,
    /// When the last stage sampled its last token, by that worker's clock (0
    /// before the first).
    last_sampled_unix_nanos: u64,
    /// Since when it has waited for admission or a pipeline.
    waiting_since: Option<Instant>,
    /// Moved by the last switch and not yet heard from since.
    moved: bool,
    /// When it was last moved.
    moved_at: Instant,
    retries: u32,
    /// Its prompt's scores while they come in (requests with `prompt_logprobs`).
    scoring: Option<PromptScoring>,
    /// Its span, the root of its trace.
    trace: RequestTrace,
    /// Report each token's log-probability with this many most likely tokens.
    logprobs: Option<usize>,
    /// The grammar its output follows, as every opening of it carries it.
    constraint: Option<v1::OutputConstraint>,
}

/// A prompt being scored: position `p` (0-based, `p + 1 < prompt.len()`) scores prompt
/// token `p + 1`. Frames are resent whole on a replay; scores already in are kept.
struct PromptScoring {
    top: u32,
    scores: Vec<Option<TokenLogprob>>,
    missing: usize,
}

/// Prompt tokens per frame while scoring: the last stage holds every row's logits of a
/// frame at once (`vocab` floats each), so scored frames stay short.
const SCORED_FRAME_TOKENS: usize = 32;

/// A request whose KV cache is being moved.
struct Transfer {
    /// Its sequence on the new pipeline (opened by the imports).
    seq: SeqId,
    pipeline: PipelineId,
    /// Its sequence on the old pipeline, released once the imports are done.
    old_pipeline: PipelineId,
    old_seq: SeqId,
}

/// A transfer task's outcome.
struct TransferDone {
    request: RequestId,
    seq: SeqId,
    result: Result<Transferred, String>,
}

pub(super) struct Scheduler {
    card: ModelCard,
    /// Prompt tokens per frame (scored prompts' frames are shorter).
    frame_tokens: usize,
    admission: AdmissionSettings,
    control: mpsc::UnboundedSender<Control>,
    pipeline: Option<PipelineLink>,
    waiting_reason: String,
    /// Every request, admitted or in line.
    requests: HashMap<RequestId, Request>,
    /// Requests waiting for admission, first in line first.
    queue: VecDeque<RequestId>,
    /// Sequence id on the wire → request id.
    wire: HashMap<SeqId, RequestId>,
    next_seq: u64,
    longest_pause: Duration,
    longest_resume: Duration,
    resumed_waiters: Vec<oneshot::Sender<Resumed>>,
    tokens_generated: u64,
    move_totals: MoveTotals,
    moves: MoveSettings,
    /// Transfers under way, by request.
    transfers: HashMap<RequestId, Transfer>,
    /// The switch that started them: its reply, and what it moved so far.
    switching: Option<(oneshot::Sender<Moved>, Moved)>,
    /// Pipelines replaced by that switch, kept to release the old sequences.
    old_links: Vec<PipelineLink>,
    transfer_tx: mpsc::UnboundedSender<TransferDone>,
    transfer_rx: Option<mpsc::UnboundedReceiver<TransferDone>>,
    /// Finished requests' sequences kept as prefix sources.
    retained: RetainedSequences,
    /// Prompt positions copied from another sequence rather than computed.
    prefix_positions: u64,
}

fn message(kind: stage_message::Kind) -> StageMessage {
    StageMessage { kind: Some(kind) }
}

fn release(seq: SeqId) -> StageMessage {
    message(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: seq.get() }))
}

/// A position's score as a stage reports it, as the engine's events carry it.
fn token_logprob(score: v1::PositionScore) -> TokenLogprob {
    TokenLogprob { logprob: score.logprob, top: score.top.into_iter().map(|t| (t.token, t.logprob)).collect() }
}

/// How request `r` is opened as sequence `seq`.
fn open_sequence(r: &Request, seq: SeqId, stop_tokens: Vec<u32>) -> v1::OpenSequence {
    v1::OpenSequence {
        seq_id: seq.get(),
        sampling: Some(r.sampling),
        direct_return: r.direct,
        end_position: r.end_position as u32,
        stop_tokens: if r.ignore_eos { Vec::new() } else { stop_tokens },
        traceparent: r.trace.traceparent(),
        logprobs_top: r.logprobs.map(|top| top as u32),
        constraint: r.constraint.clone(),
        prefix: None,
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Scheduler {
    pub fn new(
        card: ModelCard,
        frame_tokens: usize,
        admission: AdmissionSettings,
        control: mpsc::UnboundedSender<Control>,
        moves: MoveSettings,
    ) -> Self {
        let (transfer_tx, transfer_rx) = mpsc::unbounded_channel();
        Self {
            card,
            frame_tokens: frame_tokens.max(1),
            // Zero sequences would admit nothing, ever.
            admission: AdmissionSettings { sequences: admission.sequences.max(1), ..admission },
            control,
            pipeline: None,
            waiting_reason: "the cluster is starting".into(),
            requests: HashMap::new(),
            queue: VecDeque::new(),
            wire: HashMap::new(),
            next_seq: 1,
            longest_pause: Duration::ZERO,
            longest_resume: Duration::ZERO,
            resumed_waiters: Vec::new(),
            tokens_generated: 0,
            move_totals: MoveTotals::default(),
            moves,
            transfers: HashMap::new(),
            switching: None,
            old_links: Vec::new(),
            transfer_tx,
            transfer_rx: Some(transfer_rx),
            retained: RetainedSequences::default(),
            prefix_positions: 0,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SchedulerMsg>) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let Some(mut transfers) = self.transfer_rx.take() else {
            return;
        };
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                // The scheduler holds a sender, so this never ends.
                Some(done) = transfers.recv() => {
                    self.on_transfer_done(done);
                    continue;
                }
                _ = sweep.tick() => {
                    self.sweep();
                    continue;
                }
            };
            match msg {
                SchedulerMsg::Start { id, request, direct, ignore_eos, events, parent } => {
                    self.start(id, request, direct, ignore_eos, events, &parent)
                }
                SchedulerMsg::Event { event } => self.on_event(event),
                SchedulerMsg::Switch { pipeline, reason, old_alive, done } => {
                    // Switches come one at a time (the controller waits for each);
                    // should one overlap, the earlier one is answered now.
                    if let Some((earlier, moved)) = self.switching.take() {
                        let _ = earlier.send(moved);
                    }
                    let moved = self.switch(pipeline, reason, old_alive);
                    if self.transfers.is_empty() {
                        self.old_links.clear();
                        let _ = done.send(moved);
                    } else {
                        self.switching = Some((done, moved));
                    }
                }
                SchedulerMsg::AwaitResumed { reply } => {
                    self.resumed_waiters.push(reply);
                    self.check_resumed();
                }
                SchedulerMsg::DrainFinished { seconds } => {
                    self.move_totals.drains += 1;
                    self.move_totals.drain_seconds += seconds;
                }
                SchedulerMsg::Status { reply } => {
                    let _ = reply.send(SchedulerStatus {
                        in_flight: self.admitted(),
                        waiting: self.requests.values().filter(|r| r.admitted && r.running.is_none()).count(),
                        waiting_reason: self.pipeline.is_none().then(|| self.waiting_reason.clone()),
                        admission: self.admission_report(),
                        tokens_generated: self.tokens_generated,
                        prefix_positions: self.prefix_positions,
                        moves: self.move_totals,
                    });
                }
                SchedulerMsg::Shutdown { done } => {
                    // Those in line first, so that none is admitted as the others end.
                    let ids: Vec<RequestId> = self.queue.iter().chain(self.requests.keys()).copied().collect();
                    for id in ids {
                        self.finish(id, Some(GenerateEvent::Failed(EngineError::ShuttingDown)));
                    }
                    let _ = done.send(());
                    break;
                }
            }
        }
    }

    /// A sequence id not used before.
    fn next_sequence(&mut self) -> SeqId {
        let seq = SeqId::new(self.next_seq);
        self.next_seq += 1;
        seq
    }

    fn send(&self, pipeline: PipelineId, m: StageMessage) {
        // A closed stage-0 stream is reported to the controller by its task.
        if let Some(p) = self.pipeline.as_ref().filter(|p| p.id == pipeline) {
            let _ = p.stage0.send(m);
        }
    }

    fn start(
        &mut self,
        id: RequestId,
        request: GenerateRequest,
        direct: bool,
        ignore_eos: bool,
        events: mpsc::Sender<GenerateEvent>,
        parent: &tracing::Span,
    ) {
        // The engine refused requests beyond the context; this is a second guard for
        // the KV caches, which hold no more.
        let end_position = (request.prompt_tokens.len() + request.max_tokens).min(self.admission.context);
        let now = Instant::now();
        let scoring = request.prompt_logprobs.map(|top| {
            let positions = request.prompt_tokens.len().saturating_sub(1);
            PromptScoring { top: top as u32, scores: vec![None; positions], missing: positions }
        });
        if scoring.as_ref().is_some_and(|s| s.missing == 0) && request.max_tokens == 0 {
            // A one-token prompt has nothing to score and nothing to generate.
            let _ = events.try_send(GenerateEvent::PromptLogprobs(Vec::new()));
            let _ = events.try_send(GenerateEvent::Finished(FinishReason::Length));
            return;
        }
        let trace = RequestTrace::start(parent, id, request.prompt_tokens.len(), request.max_tokens);
        // Scored frames stay short: the last stage holds all their rows' logits.
        let chunk = self.frame_tokens;
        let chunk = if scoring.is_some() { chunk.min(SCORED_FRAME_TOKENS) } else { chunk };
        let frames = PromptFrames::new(request.prompt_tokens.len(), chunk, request.shared_prompt);
        self.requests.insert(
            id,
            Request {
                frames,
                no_prefix: false,
                trace,
                logprobs: request.logprobs,
                constraint: request.constraint.map(|grammar| v1::OutputConstraint {
                    grammar: grammar.as_wire().to_owned(),
                    prompt_tokens: request.prompt_tokens.len() as u32,
                }),
                prompt: request.prompt_tokens,
                sampling: sampling_to_proto(&request.sampling),
                generated: Vec::new(),
                events,
                end_position,
                direct,
                ignore_eos,
                admitted: false,
                running: None,
                last_token: now,
                last_sampled_unix_nanos: 0,
                waiting_since: Some(now),
                moved: false,
                moved_at: now,
                retries: 0,
                scoring,
            },
        );
        self.queue.push_back(id);
        self.admit();
        if self.queue.back() == Some(&id) {
            tracing::info!(request = %id, position = self.queue.len(), reason = %self.queue_reason(), "request waits for admission");
        }
    }

    /// Requests holding one of the planned sequences.
    fn admitted(&self) -> usize {
        self.requests.len().saturating_sub(self.queue.len())
    }

    /// Why requests wait in line.
    fn queue_reason(&self) -> String {
        format!("{} of {} planned sequences running", self.admitted(), self.admission.sequences)
    }

    /// Admits requests in line, first come first, while fewer than the planned
    /// sequences are taken, and runs them on the pipeline if there is one.
    fn admit(&mut self) {
        while self.admitted() < self.admission.sequences {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            r.admitted = true;
            // The channel has room for this beside every token (see the engine).
            let _ = r.events.try_send(GenerateEvent::Admitted);
            match self.pipeline.clone() {
                Some(pipeline) => self.launch(id, &pipeline),
                None => tracing::info!(request = %id, reason = %self.waiting_reason, "request waits for capacity"),
            }
        }
        self.trim_retained();
    }

    /// Gives back kept sequences that admitted requests need the room of, oldest
    /// first. (After the launches: a request launched just now may start from one,
    /// and its opening is ahead of the release on the stream.)
    fn trim_retained(&mut self) {
        while self.admitted() + self.retained.len() > self.admission.sequences {
            let Some((pipeline, seq)) = self.retained.pop_oldest() else {
                break;
            };
            self.send(pipeline, release(seq));
        }
    }

    /// Gives back every kept sequence (the pipeline they are on is being replaced).
    fn release_retained(&mut self) {
        for (pipeline, seq) in self.retained.take_all() {
            self.send(pipeline, release(seq));
        }
    }

    /// The open sequence on `pipeline` sharing most of request `id`'s prompt, and how
    /// many positions it shares: a running request's, or a kept one. None for a
    /// request that has generated (it is replayed as it ran) or scores its prompt
    /// (every position is to be scored).
    fn prefix_for(&self, id: RequestId, pipeline: PipelineId) -> Option<(SeqId, usize)> {
        let r = self.requests.get(&id)?;
        if r.no_prefix || !r.generated.is_empty() || r.scoring.is_some() {
            return None;
        }
        let running = self
            .requests
            .iter()
            .filter(|(other, _)| **other != id && !self.transfers.contains_key(other))
            .filter_map(|(_, o)| match o.running {
                Some((on, seq)) if on == pipeline => Some(PrefixSource { seq, prompt: &o.prompt, frames: &o.frames }),
                _ => None,
            });
        let kept = self.retained.on(pipeline).map(Retained::source);
        best_prefix(&r.prompt, &r.frames, running.chain(kept))
    }

    fn admission_report(&self) -> AdmissionReport {
        let now = Instant::now();
        let queue = self
            .queue
            .iter()
            .enumerate()
            .filter_map(|(i, &id)| {
                let since = self.requests.get(&id)?.waiting_since;
                let waited_seconds = since.map_or(0.0, |t| (now - t).as_secs_f64());
                Some(QueuedRequest { position: i + 1, request: id.0, waited_seconds })
            })
            .collect();
        AdmissionReport {
            sequences: self.admission.sequences,
            context: self.admission.context,
            queue,
            reason: (!self.queue.is_empty()).then(|| self.queue_reason()),
        }
    }

    /// Sends request `id` — prompt and every token generated so far — to `pipeline`
    /// under a fresh sequence id: one yet to generate opens with a copy of the prompt
    /// start another open sequence shares with it, and sends the frames after it.
    fn launch(&mut self, id: RequestId, pipeline: &PipelineLink) {
        let seq = self.next_sequence();
        let stop_tokens = self.card.tokenizer.eos_tokens().to_vec();
        let prefix = self.prefix_for(id, pipeline.id);
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        if let Some((_, old)) = r.running.replace((pipeline.id, seq)) {
            self.wire.remove(&old);
        }
        self.wire.insert(seq, id);
        r.waiting_since = None;
        r.trace.launched(pipeline.id);
        let mut open = open_sequence(r, seq, stop_tokens);
        let shared = prefix.map_or(0, |(_, positions)| positions);
        open.prefix = prefix.map(|(from, positions)| v1::SequencePrefix { seq_id: from.get(), positions: positions as u32 });
        let mut out = vec![message(stage_message::Kind::Open(open))];
        let score_top = r.scoring.as_ref().filter(|s| s.missing > 0).map(|s| s.top);
        // The last prompt frame samples the first token, unless nothing is to be
        // generated (a prompt only scored).
        let generates = r.end_position > r.prompt.len();
        let sent = unix_nanos();
        for frame in r.frames.frames().filter(|f| f.start >= shared) {
            out.push(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq.get(),
                position: frame.start as u32,
                tokens: r.prompt[frame.clone()].to_vec(),
                hidden: None,
                sample: frame.end == r.prompt.len() && r.generated.is_empty() && generates,
                sent_unix_nanos: sent,
                score: score_top.is_some(),
                next_token: score_top.and_then(|_| r.prompt.get(frame.end).copied()),
                score_top: score_top.unwrap_or(0),
                batch_continues: false,
            })));
        }
        let base = r.prompt.len();
        for (k, &token) in r.generated.iter().enumerate() {
            out.push(message(stage_message::Kind::Frame(v1::ActivationFrame {
                seq_id: seq.get(),
                position: (base + k) as u32,
                tokens: vec![token],
                hidden: None,
                sample: k + 1 == r.generated.len(),
                sent_unix_nanos: sent,
                ..Default::default()
            })));
        }
        for m in out {
            let _ = pipeline.stage0.send(m);
        }
        if let Some((from, positions)) = prefix {
            self.retained.touch(from);
            self.prefix_positions += positions as u64;
            tracing::debug!(request = %id, from = from.get(), positions, "the prompt starts from a copy of another sequence's");
        }
    }

    fn finish(&mut self, id: RequestId, event: Option<GenerateEvent>) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        if !r.admitted {
            self.queue.retain(|&queued| queued != id);
        }
        // A sequence that ran to its end holds its prompt's KV for the next turn of the
        // conversation. (One cut short may still be generating on the stages.)
        let keep = self.admission.keep_finished
            && matches!(event, Some(GenerateEvent::Finished(_)))
            && r.scoring.is_none()
            && !self.transfers.contains_key(&id);
        let reason = match &event {
            Some(GenerateEvent::Finished(FinishReason::Stop)) => "stop",
            Some(GenerateEvent::Finished(FinishReason::Length)) => "length",
            Some(GenerateEvent::Failed(_)) => "error",
            _ => "abort",
        };
        r.trace.finish(reason);
        if let Some(event) = event {
            let _ = r.events.try_send(event);
        }
        if let Some((pipeline, seq)) = r.running {
            self.wire.remove(&seq);
            if keep && self.pipeline.as_ref().is_some_and(|p| p.id == pipeline) {
                // What is kept is a copy of the prompt's positions under an id of its
                // own, opened before the request's sequence is released: the request's
                // sequence ends now (its spans on the stages with it), and the copy
                // holds no generated positions, which no prompt is cut to share.
                let copy = self.next_sequence();
                let positions = r.prompt.len() as u32;
                let open = v1::OpenSequence {
                    seq_id: copy.get(),
                    prefix: Some(v1::SequencePrefix { seq_id: seq.get(), positions }),
                    ..Default::default()
                };
                self.send(pipeline, message(stage_message::Kind::Open(open)));
                self.send(pipeline, release(seq));
                self.retained.keep(Retained { pipeline, seq: copy, prompt: r.prompt, frames: r.frames });
            } else {
                self.send(pipeline, release(seq));
            }
        }
        // Its sequence is free; the release went out first on the same stream, so a
        // stage never holds more sequences than planned.
        self.admit();
        self.check_resumed();
    }

    fn on_event(&mut self, event: WorkerEvent) {
        match event.kind {
            Some(worker_event::Kind::Token(t)) => self.on_token(t),
            Some(worker_event::Kind::Error(e)) => self.on_error(e),
            Some(worker_event::Kind::Scores(s)) => self.on_scores(s),
            _ => {}
        }
    }

    /// Scores of a frame of a prompt being scored; once every position has its
    /// score the request gets them, and one that generates nothing is done.
    fn on_scores(&mut self, s: v1::PromptScores) {
        let Some(&id) = self.wire.get(&SeqId::new(s.seq_id)) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let Some(scoring) = r.scoring.as_mut() else {
            return;
        };
        for (j, score) in s.scores.into_iter().enumerate() {
            let Some(slot) = scoring.scores.get_mut(s.position as usize + j) else {
                break;
            };
            if slot.is_none() {
                scoring.missing -= 1;
                *slot = Some(token_logprob(score));
            }
        }
        if scoring.missing > 0 {
            return;
        }
        let scores = scoring.scores.drain(..).flatten().collect();
        let _ = r.events.try_send(GenerateEvent::PromptLogprobs(scores));
        r.last_token = Instant::now();
        let only_scored = r.end_position <= r.prompt.len();
        if only_scored {
            self.finish(id, Some(GenerateEvent::Finished(FinishReason::Length)));
        }
    }

    fn on_token(&mut self, t: v1::TokenSampled) {
        // Tokens of a sequence id no longer in use (a finished request, or the
        // pipeline before a switch) are moot.
        let Some(&id) = self.wire.get(&SeqId::new(t.seq_id)) else {
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
            self.longest_resume = self.longest_resume.max(now - r.moved_at);
        } else if !r.generated.is_empty() && r.last_sampled_unix_nanos != 0 {
            // A decode step: what a replayed token costs. Timed by the last stage,
            // which samples them: the direct path's last stage reports tokens a
            // few at a time (`strata_worker::held_tokens`), so their arrivals here
            // are not a step apart. Both times are that one worker's clock (a
            // move, which may change the worker, skips one).
            let step = t.sent_unix_nanos.saturating_sub(r.last_sampled_unix_nanos);
            self.moves.cost.observe_step(Duration::from_nanos(step));
        }
        r.last_token = now;
        r.last_sampled_unix_nanos = t.sent_unix_nanos;
        r.retries = 0;
        r.trace.token();
        self.tokens_generated += 1;
        if !r.ignore_eos && self.card.tokenizer.is_eos(t.token) {
            return self.finish(id, Some(GenerateEvent::Finished(FinishReason::Stop)));
        }
        r.generated.push(t.token);
        let _ = r.events.try_send(GenerateEvent::Token(t.token, t.score.map(token_logprob)));
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
                    seq_id: seq.get(),
                    position: t.position,
                    tokens: vec![t.token],
                    hidden: None,
                    sample: true,
                    sent_unix_nanos: unix_nanos(),
                    ..Default::default()
                })),
            );
        }
        self.check_resumed();
    }

    fn on_error(&mut self, e: v1::SequenceError) {
        let Some(&id) = self.wire.get(&SeqId::new(e.seq_id)) else {
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
        if code == ErrorCode::PrefixUnavailable {
            // The sequence it was to start from is gone from a stage (released, or
            // lost with a worker): it computes its whole prompt instead.
            tracing::info!(request = %id, stage = e.stage_index, message = %e.message, "prompt computed whole: its prefix was not there");
            r.no_prefix = true;
            let running = r.running;
            if let Some((pipeline, seq)) = running {
                self.send(pipeline, release(seq));
            }
            if let Some(p) = self.pipeline.clone().filter(|p| running.is_some_and(|(on, _)| on == p.id)) {
                self.launch(id, &p);
            }
            return;
        }
        if pipeline_trouble && r.retries < MAX_RETRIES {
            tracing::warn!(request = %id, stage = e.stage_index, ?code, message = %e.message, "pipeline trouble; the request waits");
            r.retries += 1;
            if let Some((_, seq)) = r.running.take() {
                self.wire.remove(&seq);
            }
            r.waiting_since = Some(Instant::now());
            r.trace.waits(&e.message);
            r.moved = true;
            r.moved_at = Instant::now();
            let _ = self.control.send(Control::Trouble { reason: format!("stage {}: {}", e.stage_index, e.message) });
            return;
        }
        tracing::warn!(request = %id, stage = e.stage_index, ?code, message = %e.message, "sequence failed");
        let reason = format!("stage {}: {}", e.stage_index, e.message);
        self.finish(id, Some(GenerateEvent::Failed(EngineError::Internal(reason))));
    }

    /// Runs every request on `pipeline`: those on the old pipeline, when it still
    /// works, move with their KV cache where the policy says so (see
    /// [`Self::transfer`]); the rest, and those that ran nowhere, are replayed.
    fn switch(&mut self, pipeline: Option<PipelineLink>, reason: String, old_alive: bool) -> Moved {
        self.release_retained();
        let old = std::mem::replace(&mut self.pipeline, pipeline.clone()).filter(|_| old_alive);
        self.waiting_reason = reason;
        let now = Instant::now();
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        let mut moved = Moved::default();
        for id in ids {
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            let current = matches!((&pipeline, r.running), (Some(p), Some((on, _))) if p.id == on);
            // Requests in line run nowhere yet: admission launches them.
            if current || !r.admitted {
                continue;
            }
            let counted = r.running.is_some() || !r.generated.is_empty();
            if counted {
                r.moved = true;
                r.moved_at = now;
            }
            let on_old = old.as_ref().filter(|o| r.running.is_some_and(|(on, _)| on == o.id));
            match &pipeline {
                Some(p) => {
                    let transferring = match on_old {
                        Some(from) if self.should_transfer(id) => self.transfer(id, from, p),
                        _ => false,
                    };
                    if transferring {
                        moved.transferred += 1;
                    } else {
                        self.launch(id, p);
                        moved.replayed += usize::from(counted);
                    }
                }
                None => {
                    if let Some((_, seq)) = r.running.take() {
                        self.wire.remove(&seq);
                    }
                    r.waiting_since.get_or_insert(now);
                    r.trace.waits(&self.waiting_reason);
                }
            }
        }
        if !self.transfers.is_empty() {
            self.old_links.extend(old);
        }
        if let Some(p) = &pipeline {
            self.move_totals.switches += 1;
            self.move_totals.transferred += moved.transferred as u64;
            self.move_totals.replayed += moved.replayed as u64;
            tracing::info!(
                pipeline = %p.id,
                replayed = moved.replayed,
                transferring = moved.transferred,
                "requests run on the new pipeline"
            );
        } else {
            tracing::warn!(reason = %self.waiting_reason, parked = self.requests.len(), "no pipeline: requests wait");
        }
        moved
    }

    /// Whether request `id`, running on a pipeline that still works, should move
    /// with its KV cache rather than be replayed.
    fn should_transfer(&self, id: RequestId) -> bool {
        let Some(r) = self.requests.get(&id) else {
            return false;
        };
        // With nothing generated, the prompt alone is replayed: no KV is final yet
        // that the new pipeline could not compute as cheaply.
        if r.generated.is_empty() {
            return false;
        }
        let estimate = self.moves.cost.estimate(r.prompt.len(), r.generated.len(), self.moves.kv_bytes_per_position);
        let transfer = match self.moves.policy {
            MovePolicy::Replay => false,
            MovePolicy::Transfer => true,
            MovePolicy::Auto => estimate.transfer_is_faster(),
        };
        tracing::info!(
            request = %id,
            policy = ?self.moves.policy,
            prompt = r.prompt.len(),
            generated = r.generated.len(),
            replay_ms = estimate.replay_seconds * 1e3,
            transfer_ms = estimate.transfer_seconds * 1e3,
            chosen = if transfer { "transfer" } else { "replay" },
            "moving a request"
        );
        transfer
    }

    /// Moves request `id` from `from` (where it runs and which still works) to `to`
    /// with its KV cache: a new sequence id at once (late tokens of the old one are
    /// ignored), the imports in a task; [`Self::on_transfer_done`] resumes it. False
    /// when there is nothing to move (it is not running, or generated nothing).
    fn transfer(&mut self, id: RequestId, from: &PipelineLink, to: &PipelineLink) -> bool {
        let seq = self.next_sequence();
        let stop_tokens = self.card.tokenizer.eos_tokens().to_vec();
        let Some(r) = self.requests.get_mut(&id) else {
            return false;
        };
        let (Some((old_pipeline, old_seq)), Some((_, before_last))) = (r.running, r.generated.split_last()) else {
            return false;
        };
        r.running = Some((to.id, seq));
        self.wire.remove(&old_seq);
        self.wire.insert(seq, id);
        r.waiting_since = None;
        // Every old stage has final KV for [0, n): the last generated token has not
        // necessarily been run yet, so it goes in the frame that resumes the request.
        let tokens: Vec<u32> = r.prompt.iter().chain(before_last).copied().collect();
        let spec = TransferSpec {
            old: from.stages.clone(),
            old_pipeline,
            old_seq,
            new: to.stages.clone(),
            new_pipeline: to.id,
            open: open_sequence(r, seq, stop_tokens),
            tokens,
        };
        self.transfers.insert(id, Transfer { seq, pipeline: to.id, old_pipeline, old_seq });
        let done = self.transfer_tx.clone();
        tokio::spawn(async move {
            let result = moves::transfer(spec).await;
            let _ = done.send(TransferDone { request: id, seq, result });
        });
        true
    }

    fn on_transfer_done(&mut self, done: TransferDone) {
        let Some(t) = self.transfers.remove(&done.request).filter(|t| t.seq == done.seq) else {
            return;
        };
        // The old sequence's KV has been read (or will not be): it can stop.
        if let Some(old) = self.old_links.iter().find(|l| l.id == t.old_pipeline) {
            let _ = old.stage0.send(release(t.old_seq));
        }
        let release_new = release(t.seq);
        match (self.requests.get_mut(&done.request).filter(|r| r.running == Some((t.pipeline, t.seq))), done.result) {
            (Some(r), Ok(moved)) => {
                r.trace.transferred(t.pipeline, moved.bytes, moved.seconds);
                let position = (r.prompt.len() + r.generated.len() - 1) as u32;
                let token = r.generated[r.generated.len() - 1];
                tracing::info!(
                    request = %done.request,
                    positions = position,
                    bytes = moved.bytes,
                    ms = moved.seconds * 1e3,
                    "request moved with its KV cache"
                );
                self.moves.cost.observe_transfer(moved.bytes, moved.seconds);
                self.send(
                    t.pipeline,
                    message(stage_message::Kind::Frame(v1::ActivationFrame {
                        seq_id: t.seq.get(),
                        position,
                        tokens: vec![token],
                        hidden: None,
                        sample: true,
                        sent_unix_nanos: unix_nanos(),
                        ..Default::default()
                    })),
                );
            }
            (Some(_), Err(e)) => {
                tracing::warn!(request = %done.request, error = %e, "KV transfer failed; replaying the request");
                self.move_totals.transfers_failed += 1;
                self.move_totals.replayed += 1;
                // Stages whose import did succeed drop it.
                self.send(t.pipeline, release_new);
                if let Some((_, moved)) = &mut self.switching {
                    moved.transferred -= 1;
                    moved.replayed += 1;
                    moved.fell_back += 1;
                }
                if let Some(p) = self.pipeline.clone().filter(|p| p.id == t.pipeline) {
                    self.launch(done.request, &p);
                } else if let Some(r) = self.requests.get_mut(&done.request) {
                    // The pipeline changed meanwhile: the request waits for the next.
                    if let Some((_, seq)) = r.running.take() {
                        self.wire.remove(&seq);
                    }
                    r.waiting_since.get_or_insert(Instant::now());
                }
            }
            // Finished, or moved again, while its KV travelled: whatever was imported
            // goes.
            (None, _) => self.send(t.pipeline, release_new),
        }
        if self.transfers.is_empty() {
            self.old_links.clear();
            if let Some((reply, moved)) = self.switching.take() {
                let _ = reply.send(moved);
            }
        }
    }

    fn check_resumed(&mut self) {
        if self.resumed_waiters.is_empty() || self.requests.values().any(|r| r.moved) {
            return;
        }
        let resumed = Resumed {
            longest_pause: std::mem::take(&mut self.longest_pause),
            longest_resume: std::mem::take(&mut self.longest_resume),
        };
        for w in self.resumed_waiters.drain(..) {
            let _ = w.send(resumed);
        }
    }

    /// Releases requests whose client has gone, and fails those that waited longer
    /// than the queue timeout: in line for admission while a pipeline runs, with
    /// [`EngineError::QueueTimeout`] (the client should come back later); for a
    /// pipeline, with [`EngineError::Unavailable`] (the cluster lacks capacity).
    fn sweep(&mut self) {
        let now = Instant::now();
        let timeout = self.admission.queue_timeout;
        let expired_at = |r: &Request| r.waiting_since.is_some_and(|t| now - t >= timeout);
        let mut gone = Vec::new();
        let mut expired = Vec::new();
        for (&id, r) in &self.requests {
            if r.events.is_closed() {
                gone.push(id);
            } else if expired_at(r) {
                expired.push((r.admitted, id));
            }
        }
        for id in gone {
            tracing::debug!(request = %id, "client went away; releasing");
            self.finish(id, None);
        }
        // Those in line first, in line order, so a sequence freed by an expired
        // admitted request is not handed to one about to fail.
        let position = |id: RequestId| self.queue.iter().position(|&q| q == id);
        expired.sort_by_key(|&(admitted, id)| (admitted, position(id)));
        for (_, id) in expired {
            // Finishing another may have admitted and launched this one.
            let Some(r) = self.requests.get(&id).filter(|r| expired_at(r)) else {
                continue;
            };
            let error = if !r.admitted && self.pipeline.is_some() {
                EngineError::QueueTimeout { waited_s: timeout.as_secs(), reason: self.queue_reason() }
            } else {
                EngineError::Unavailable(format!(
                    "waited {}s for the cluster to have capacity: {}",
                    timeout.as_secs(),
                    self.waiting_reason
                ))
            };
            tracing::info!(request = %id, error = %error, "request waited too long");
            self.finish(id, Some(GenerateEvent::Failed(error)));
        }
        self.check_resumed();
    }
}

#[cfg(test)]
mod tests {
    use strata_model::synthetic::SyntheticModel;
    use strata_model::SamplingParams;

    use std::sync::Arc;

    use super::*;
    use crate::cluster::moves::LinkStage;
    use crate::cluster::{ServedModel, WorkerClient};

    /// A pipeline whose stage-0 stream the test reads, on a worker that is not there.
    fn link(id: u64) -> (PipelineLink, mpsc::UnboundedReceiver<StageMessage>) {
        let id = PipelineId::new(id).expect("test pipelines are not 0");
        let (stage0, frames) = mpsc::unbounded_channel();
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let stage = LinkStage { address: "127.0.0.1:1".into(), layers: 0..4, client: WorkerClient::new(channel) };
        (PipelineLink { id, stage0, stages: Arc::new(vec![stage]) }, frames)
    }

    fn kinds(frames: &mut mpsc::UnboundedReceiver<StageMessage>) -> Vec<stage_message::Kind> {
        std::iter::from_fn(|| frames.try_recv().ok()).filter_map(|m| m.kind).collect()
    }

    fn token(seq_id: u64, position: u32, token: u32) -> SchedulerMsg {
        let t = v1::TokenSampled { seq_id, position, token, sent_unix_nanos: 0, score: None };
        SchedulerMsg::Event { event: WorkerEvent { kind: Some(worker_event::Kind::Token(t)) } }
    }

    /// Sends `msg` and waits until the scheduler has handled it (a status round trip).
    async fn handled(tx: &mpsc::UnboundedSender<SchedulerMsg>, msg: SchedulerMsg) {
        tx.send(msg).unwrap();
        let (reply, status) = oneshot::channel();
        tx.send(SchedulerMsg::Status { reply }).unwrap();
        status.await.unwrap();
    }

    /// The old holder is gone by the time its KV is pulled: the request is replayed on
    /// the new pipeline instead, every step of it, and the old sequence released.
    #[tokio::test]
    async fn a_failed_transfer_falls_back_to_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let model = ServedModel::open(&path, "test".into()).unwrap();
        let (control, _control) = mpsc::unbounded_channel();
        let moves = MoveSettings { policy: MovePolicy::Transfer, cost: MoveCost::default(), kv_bytes_per_position: 1 };
        let admission = AdmissionSettings { sequences: 4, context: 256, queue_timeout: Duration::from_secs(60), keep_finished: true };
        let scheduler = Scheduler::new(model.card.clone(), 64, admission, control, moves);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(scheduler.run(rx));
        let (old, mut old_frames) = link(1);
        let (new, mut new_frames) = link(2);
        let (done, moved) = oneshot::channel();
        handled(&tx, SchedulerMsg::Switch { pipeline: Some(old), reason: String::new(), old_alive: false, done }).await;
        assert_eq!(moved.await.unwrap(), Moved::default());

        let (events, mut client) = mpsc::channel(16);
        let sampling = SamplingParams::greedy();
        let request = GenerateRequest {
            prompt_tokens: vec![5, 6, 7],
            max_tokens: 8,
            sampling,
            prompt_logprobs: None,
            logprobs: None,
            constraint: None,
            shared_prompt: false,
        };
        let start = SchedulerMsg::Start {
            id: RequestId(1),
            request,
            direct: false,
            ignore_eos: true,
            events,
            parent: tracing::Span::none(),
        };
        handled(&tx, start).await;
        handled(&tx, token(1, 3, 40)).await;
        handled(&tx, token(1, 4, 41)).await;
        assert_eq!(kinds(&mut old_frames).len(), 4, "open, the prompt and two steps");

        let (done, moved) = oneshot::channel();
        tx.send(SchedulerMsg::Switch { pipeline: Some(new), reason: String::new(), old_alive: true, done }).unwrap();
        let moved = tokio::time::timeout(Duration::from_secs(30), moved).await.unwrap().unwrap();
        assert_eq!(moved, Moved { replayed: 1, transferred: 0, fell_back: 1 });
        // The old sequence is released; on the new pipeline the imports that did work
        // are dropped, then the request is replayed under a third id.
        assert!(matches!(&kinds(&mut old_frames)[..], [stage_message::Kind::Release(r)] if r.seq_id == 1));
        let replay = kinds(&mut new_frames);
        let frames = frames_of(&replay);
        assert!(matches!(&replay[..2], [stage_message::Kind::Release(r), stage_message::Kind::Open(o)]
            if r.seq_id == 2 && o.seq_id == 3));
        assert_eq!(frames, [(3, 0, vec![5, 6, 7], false), (3, 3, vec![40], false), (3, 4, vec![41], true)]);
        handled(&tx, token(3, 5, 42)).await;
        let got: Vec<u32> = std::iter::from_fn(|| client.try_recv().ok())
            .filter_map(|e| match e {
                GenerateEvent::Token(t, _) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(got, [40, 41, 42]);
    }

    /// A scheduler over the tiny model that admits `sequences` requests at once.
    fn started(sequences: usize, queue_timeout: Duration) -> (tempfile::TempDir, mpsc::UnboundedSender<SchedulerMsg>) {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let model = ServedModel::open(&path, "test".into()).unwrap();
        // Pipeline trouble is not tested here: what the controller is told is dropped.
        let (control, _) = mpsc::unbounded_channel();
        let moves = MoveSettings { policy: MovePolicy::Replay, cost: MoveCost::default(), kv_bytes_per_position: 1 };
        let admission = AdmissionSettings { sequences, context: 256, queue_timeout, keep_finished: false };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Scheduler::new(model.card.clone(), 64, admission, control, moves).run(rx));
        (dir, tx)
    }

    async fn switch_to(tx: &mpsc::UnboundedSender<SchedulerMsg>, pipeline: PipelineLink) -> Moved {
        let (done, moved) = oneshot::channel();
        tx.send(SchedulerMsg::Switch { pipeline: Some(pipeline), reason: String::new(), old_alive: false, done })
            .unwrap();
        moved.await.unwrap()
    }

    async fn status(tx: &mpsc::UnboundedSender<SchedulerMsg>) -> SchedulerStatus {
        let (reply, status) = oneshot::channel();
        tx.send(SchedulerMsg::Status { reply }).unwrap();
        status.await.unwrap()
    }

    /// Request `id`: a three-token prompt and one token to generate.
    fn one_token(id: u64, events: mpsc::Sender<GenerateEvent>) -> SchedulerMsg {
        let request = GenerateRequest {
            prompt_tokens: vec![5, 6, 7],
            max_tokens: 1,
            sampling: SamplingParams::greedy(),
            prompt_logprobs: None,
            logprobs: None,
            constraint: None,
            shared_prompt: false,
        };
        let parent = tracing::Span::none();
        SchedulerMsg::Start { id: RequestId(id), request, direct: false, ignore_eos: true, events, parent }
    }

    fn opened(frames: &mut mpsc::UnboundedReceiver<StageMessage>) -> Vec<u64> {
        kinds(frames)
            .iter()
            .filter_map(|k| match k {
                stage_message::Kind::Open(o) => Some(o.seq_id),
                _ => None,
            })
            .collect()
    }

    fn line(s: &SchedulerStatus) -> Vec<(usize, u64)> {
        s.admission.queue.iter().map(|q| (q.position, q.request)).collect()
    }

    /// At most the planned sequences run, on any pipeline; the rest wait in line,
    /// first come first, each knowing its place, and start as others end.
    #[tokio::test]
    async fn requests_beyond_the_planned_sequences_wait_in_line() {
        let (_dir, tx) = started(2, Duration::from_secs(60));
        let (pipeline, mut frames) = link(1);
        switch_to(&tx, pipeline).await;
        let mut clients = Vec::new();
        for id in 1..=4 {
            let (events, client) = mpsc::channel(16);
            handled(&tx, one_token(id, events)).await;
            clients.push(client);
        }
        assert_eq!(opened(&mut frames), [1, 2]);
        let s = status(&tx).await;
        assert_eq!((s.in_flight, s.waiting, s.admission.sequences), (2, 0, 2));
        assert_eq!(line(&s), [(1, 3), (2, 4)]);
        assert_eq!(s.admission.reason.as_deref(), Some("2 of 2 planned sequences running"));
        assert!(matches!(clients[0].try_recv(), Ok(GenerateEvent::Admitted)));
        assert!(clients[2].try_recv().is_err(), "not admitted yet");

        // A new pipeline runs the admitted requests again, not those in line.
        let (pipeline, mut frames) = link(2);
        assert_eq!(switch_to(&tx, pipeline).await.replayed, 2);
        assert_eq!(opened(&mut frames), [3, 4]);

        // The request on sequence 4 ends with its token: the first in line takes its
        // place, after its release on the same stream.
        handled(&tx, token(4, 3, 40)).await;
        let after = kinds(&mut frames);
        assert!(
            matches!(&after[..2], [stage_message::Kind::Release(r), stage_message::Kind::Open(o)]
            if r.seq_id == 4 && o.seq_id == 5),
            "{after:?}"
        );
        assert!(matches!(clients[2].try_recv(), Ok(GenerateEvent::Admitted)));
        let s = status(&tx).await;
        assert_eq!((s.in_flight, line(&s)), (2, vec![(1, 4)]));

        // A client that leaves the line frees its place without ever running.
        drop(clients.pop());
        tokio::time::sleep(SWEEP_INTERVAL * 2).await;
        let s = status(&tx).await;
        assert_eq!((s.in_flight, line(&s), s.admission.reason), (2, vec![], None));
    }

    /// Frames as (sequence, position, tokens, sample).
    fn frames_of(kinds: &[stage_message::Kind]) -> Vec<(u64, u32, Vec<u32>, bool)> {
        kinds
            .iter()
            .filter_map(|k| match k {
                stage_message::Kind::Frame(f) => Some((f.seq_id, f.position, f.tokens.clone(), f.sample)),
                _ => None,
            })
            .collect()
    }

    fn prefix_of(kinds: &[stage_message::Kind]) -> Vec<(u64, Option<(u64, u32)>)> {
        kinds
            .iter()
            .filter_map(|k| match k {
                stage_message::Kind::Open(o) => Some((o.seq_id, o.prefix.as_ref().map(|p| (p.seq_id, p.positions)))),
                _ => None,
            })
            .collect()
    }

    /// Choices of one prompt compute all of it but the last token once; a finished
    /// request's sequence is kept while a planned sequence is free, and the next turn
    /// of its conversation copies its prompt's whole frames; the oldest kept one
    /// makes room for a new request; a stage that cannot copy makes the request
    /// compute its whole prompt.
    #[tokio::test]
    async fn prompts_start_from_copies_of_open_sequences_sharing_their_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = SyntheticModel::tiny().write_to(dir.path()).unwrap();
        let model = ServedModel::open(&path, "test".into()).unwrap();
        let (control, _control) = mpsc::unbounded_channel();
        let moves = MoveSettings { policy: MovePolicy::Replay, cost: MoveCost::default(), kv_bytes_per_position: 1 };
        let admission = AdmissionSettings { sequences: 2, context: 256, queue_timeout: Duration::from_secs(60), keep_finished: true };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Scheduler::new(model.card.clone(), 4, admission, control, moves).run(rx));
        let (pipeline, mut frames) = link(1);
        switch_to(&tx, pipeline).await;
        let turn: Vec<u32> = (0..10).collect();
        let start = |id: u64, prompt: &[u32], shared_prompt: bool| {
            let (events, client) = mpsc::channel(16);
            let request = GenerateRequest { prompt_tokens: prompt.to_vec(), max_tokens: 1, shared_prompt, ..Default::default() };
            let parent = tracing::Span::none();
            (SchedulerMsg::Start { id: RequestId(id), request, direct: false, ignore_eos: true, events, parent }, client)
        };
        let (first, _c1) = start(1, &turn, true);
        handled(&tx, first).await;
        let (second, _c2) = start(2, &turn, true);
        handled(&tx, second).await;
        let sent = kinds(&mut frames);
        assert_eq!(prefix_of(&sent), [(1, None), (2, Some((1, 9)))]);
        let chunks = [(1, 0, vec![0, 1, 2, 3], false), (1, 4, vec![4, 5, 6, 7], false), (1, 8, vec![8], false)];
        let mut expected = chunks.to_vec();
        expected.extend([(1, 9, vec![9], true), (2, 9, vec![9], true)]);
        assert_eq!(frames_of(&sent), expected);
        // Both end: each is released once a copy of its prompt is kept.
        handled(&tx, token(1, 10, 40)).await;
        handled(&tx, token(2, 10, 41)).await;
        let sent = kinds(&mut frames);
        assert_eq!(prefix_of(&sent), [(3, Some((1, 10))), (4, Some((2, 10)))]);
        let released: Vec<u64> = sent
            .iter()
            .filter_map(|k| match k {
                stage_message::Kind::Release(r) => Some(r.seq_id),
                _ => None,
            })
            .collect();
        assert_eq!(released, [1, 2]);

        // The next turn: its frames of 4 from the start share the first two with both
        // copies; the older copy then makes room for it.
        let next: Vec<u32> = turn.iter().copied().chain(50..60).collect();
        let (third, _c3) = start(3, &next, false);
        handled(&tx, third).await;
        let sent = kinds(&mut frames);
        assert_eq!(prefix_of(&sent), [(5, Some((4, 8)))]);
        assert_eq!(frames_of(&sent).iter().map(|f| f.1).collect::<Vec<_>>(), [8, 12, 16]);
        assert!(matches!(sent.last(), Some(stage_message::Kind::Release(r)) if r.seq_id == 3), "{sent:?}");
        assert_eq!(status(&tx).await.prefix_positions, 9 + 8);

        // A stage could not copy: released, and sent again whole.
        let e = v1::SequenceError { seq_id: 5, code: ErrorCode::PrefixUnavailable as i32, message: "gone".into(), stage_index: 1 };
        handled(&tx, SchedulerMsg::Event { event: WorkerEvent { kind: Some(worker_event::Kind::Error(e)) } }).await;
        let sent = kinds(&mut frames);
        assert!(matches!(sent.first(), Some(stage_message::Kind::Release(r)) if r.seq_id == 5), "{sent:?}");
        assert_eq!(prefix_of(&sent), [(6, None)]);
        assert_eq!(frames_of(&sent).iter().map(|f| f.1).collect::<Vec<_>>(), [0, 4, 8, 12, 16]);
    }

    /// A request still in line when the queue timeout passes fails with
    /// `QueueTimeout`; the one running is untouched.
    #[tokio::test]
    async fn a_request_in_line_past_the_queue_timeout_fails() {
        // Short, on the real clock: the sweep looks every 250 ms.
        let timeout = Duration::from_millis(600);
        let (_dir, tx) = started(1, timeout);
        let (pipeline, _frames) = link(1);
        switch_to(&tx, pipeline).await;
        let (events, mut running) = mpsc::channel(16);
        handled(&tx, one_token(1, events)).await;
        let (events, mut queued) = mpsc::channel(16);
        handled(&tx, one_token(2, events)).await;
        let start = Instant::now();
        let failed = tokio::time::timeout(Duration::from_secs(10), queued.recv()).await.unwrap();
        assert!(
            matches!(&failed, Some(GenerateEvent::Failed(EngineError::QueueTimeout { reason, .. }))
                if reason == "1 of 1 planned sequences running"),
            "{failed:?}"
        );
        assert!(start.elapsed() >= timeout);
        let s = status(&tx).await;
        assert_eq!((s.in_flight, s.admission.queue.len()), (1, 0));
        assert!(matches!(running.try_recv(), Ok(GenerateEvent::Admitted)));
        assert!(running.try_recv().is_err(), "the running request goes on");
    }
}

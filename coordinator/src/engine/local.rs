//! An engine in this one process: a single stage holding every layer, driven by a
//! dedicated compute thread that serves many requests at once.
//!
//! Requests reach the thread over a bounded channel; when it is full, callers are
//! told the engine is busy rather than queued without limit. Each round the thread
//! takes one step of every live sequence (a decode token, or the next chunk of a
//! prompt) and runs them as one batched [`Stage::forward`], then samples each
//! sequence on its own. Batching is exact: a sequence produces the same tokens as it
//! would alone. A sequence whose receiver is gone is dropped before the next round
//! and its KV cache released.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};

use strata_grammar::Constraint;
use strata_model::generate::FinishReason;
use strata_model::perplexity::score_row;
use strata_model::stage::StageOptions;
use strata_model::{
    ChatTemplate, Device, ModelFile, Sampler, SeqId, Stage, StageInput, StageOutput, StageStep, Tokenizer,
};
use tokio::sync::mpsc;

use super::{Engine, EngineError, GenerateEvent, GenerateRequest, ModelCard};

/// How much a local engine takes on at once.
#[derive(Debug, Clone)]
pub struct LocalEngineConfig {
    /// Sequences generating at the same time; more wait in the queue.
    pub max_sequences: usize,
    /// Requests waiting for a free sequence slot before new ones are refused.
    pub queue: usize,
    /// Tokens one batched forward computes at most. Decode steps take one each and
    /// go first; prompts are fed in chunks from what is left, so a long prompt does
    /// not stall the decoding of everyone else.
    pub max_batch_tokens: usize,
}

impl Default for LocalEngineConfig {
    fn default() -> Self {
        Self { max_sequences: 32, queue: 64, max_batch_tokens: 512 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalEngineError {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("cannot start the compute thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What the compute thread holds right now, published after every round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Sequences holding a KV cache.
    pub sequences: usize,
    pub cache_bytes: u64,
    /// Requests stopped because their receiver was dropped, since the start.
    pub cancelled: u64,
}

#[derive(Debug, Default)]
struct SharedOccupancy {
    sequences: AtomicUsize,
    cache_bytes: AtomicU64,
    cancelled: AtomicU64,
}

/// A request on its way to the compute thread.
struct Job {
    seq: SeqId,
    request: GenerateRequest,
    sampler: Sampler,
    constraint: Option<Constraint>,
    events: mpsc::Sender<GenerateEvent>,
}

pub struct LocalEngine {
    card: ModelCard,
    jobs: std_mpsc::SyncSender<Job>,
    next_seq: AtomicU64,
    vocab_size: usize,
    occupancy: Arc<SharedOccupancy>,
}

impl LocalEngine {
    /// Loads every layer of `file` onto `device` and starts the compute thread.
    pub fn start(file: &ModelFile, device: &Device, model_id: String) -> Result<Self, LocalEngineError> {
        Self::start_with(file, device, model_id, LocalEngineConfig::default())
    }

    pub fn start_with(
        file: &ModelFile,
        device: &Device,
        model_id: String,
        config: LocalEngineConfig,
    ) -> Result<Self, LocalEngineError> {
        if config.max_sequences == 0 || config.queue == 0 || config.max_batch_tokens == 0 {
            return Err(LocalEngineError::Config(format!("every limit must be at least 1, got {config:?}")));
        }
        // Every live sequence's decode step fits in one batch with room to spare, so
        // none waits a round and prompts always move.
        if config.max_batch_tokens <= config.max_sequences {
            return Err(LocalEngineError::Config(format!(
                "max_batch_tokens ({}) must exceed max_sequences ({})",
                config.max_batch_tokens, config.max_sequences
            )));
        }
        let tokenizer = Arc::new(Tokenizer::from_gguf(file.metadata()).map_err(strata_model::Error::from)?);
        let chat_template = Arc::new(ChatTemplate::from_gguf(file.metadata()).map_err(strata_model::Error::from)?);
        // The thread never hands the stage more than `max_batch_tokens` of one
        // sequence, so the stage need not cut them again.
        let options = StageOptions { prefill_chunk: config.max_batch_tokens };
        let stage = Stage::load(file, 0..file.info().layers, device, options)?;
        let card = ModelCard::new(model_id, file.info().context_length, tokenizer.clone(), chat_template);
        let (jobs, inbox) = std_mpsc::sync_channel(config.queue);
        let occupancy = Arc::new(SharedOccupancy::default());
        let worker = Worker {
            stage,
            tokenizer,
            config,
            inbox,
            occupancy: occupancy.clone(),
            active: Vec::new(),
            disconnected: false,
        };
        // Detached: the thread ends by itself once every handle is gone and the
        // sequences it still holds are finished.
        std::thread::Builder::new().name("strata-local-engine".into()).spawn(move || worker.run())?;
        Ok(Self { card, jobs, next_seq: AtomicU64::new(0), vocab_size: file.info().vocab_size, occupancy })
    }

    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            sequences: self.occupancy.sequences.load(Ordering::Acquire),
            cache_bytes: self.occupancy.cache_bytes.load(Ordering::Acquire),
            cancelled: self.occupancy.cancelled.load(Ordering::Acquire),
        }
    }
}

impl Engine for LocalEngine {
    fn model(&self) -> &ModelCard {
        &self.card
    }

    fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        request.validate(self.vocab_size, self.card.context_length)?;
        if request.prompt_logprobs.is_some() {
            return Err(EngineError::InvalidRequest(
                "prompt logprobs are served by a cluster (strata serve); `strata perplexity -m` scores a text in one process"
                    .into(),
            ));
        }
        let sampler = Sampler::new(&request.sampling).map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let constraint = match &request.constraint {
            Some(grammar) => Some(
                self.card
                    .vocabulary
                    .get()
                    .and_then(|v| v.constrain(grammar, request.prompt_tokens.len()))
                    .map_err(|e| EngineError::InvalidRequest(e.to_string()))?,
            ),
            None => None,
        };
        // Room for every event the request can produce, so the compute thread never
        // waits on a slow reader and never has to drop a token.
        let (events, receiver) = mpsc::channel(request.max_tokens + 1);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(Job { seq, request, sampler, constraint, events }) {
            Ok(()) => Ok(receiver),
            Err(std_mpsc::TrySendError::Full(_)) => Err(EngineError::Unavailable("the request queue is full".into())),
            Err(std_mpsc::TrySendError::Disconnected(_)) => {
                Err(EngineError::Unavailable("the compute thread has stopped".into()))
            }
        }
    }
}

/// A request the compute thread is serving.
struct Sequence {
    seq: SeqId,
    events: mpsc::Sender<GenerateEvent>,
    sampler: Sampler,
    /// Prompt and generated tokens.
    history: Vec<u32>,
    /// Positions already in the KV cache.
    cached: usize,
    generated: usize,
    max_tokens: usize,
    /// Report each token's log-probability with this many most likely tokens.
    logprobs: Option<usize>,
    /// The grammar its output follows.
    constraint: Option<Constraint>,
}

impl Sequence {
    fn is_prefilling(&self) -> bool {
        self.history.len() - self.cached > 1
    }
}

/// What became of a sequence after a round.
enum Outcome {
    Continue,
    Done(GenerateEvent),
    Cancelled,
}

struct Worker {
    stage: Stage,
    tokenizer: Arc<Tokenizer>,
    config: LocalEngineConfig,
    inbox: std_mpsc::Receiver<Job>,
    occupancy: Arc<SharedOccupancy>,
    /// In the order they were admitted: prompts are fed first come, first served.
    active: Vec<Sequence>,
    disconnected: bool,
}

impl Worker {
    fn run(mut self) {
        loop {
            self.admit();
            if self.active.is_empty() {
                if self.disconnected {
                    break;
                }
                continue;
            }
            self.drop_cancelled();
            self.round();
            self.publish();
        }
        tracing::debug!("local engine stopped");
    }

    /// Takes new requests while there is room; blocks only when there is nothing
    /// else to do.
    fn admit(&mut self) {
        while self.active.len() < self.config.max_sequences && !self.disconnected {
            let job = if self.active.is_empty() {
                match self.inbox.recv() {
                    Ok(job) => job,
                    Err(std_mpsc::RecvError) => {
                        self.disconnected = true;
                        break;
                    }
                }
            } else {
                match self.inbox.try_recv() {
                    Ok(job) => job,
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.disconnected = true;
                        break;
                    }
                }
            };
            if job.events.is_closed() {
                self.occupancy.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.active.push(Sequence {
                seq: job.seq,
                events: job.events,
                sampler: job.sampler,
                history: job.request.prompt_tokens,
                cached: 0,
                generated: 0,
                max_tokens: job.request.max_tokens,
                logprobs: job.request.logprobs,
                constraint: job.constraint,
            });
        }
    }

    fn drop_cancelled(&mut self) {
        let stage = &mut self.stage;
        let cancelled = &self.occupancy.cancelled;
        self.active.retain(|s| {
            if s.events.is_closed() {
                stage.release(s.seq);
                cancelled.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            true
        });
    }

    /// One batched forward over a step of every sequence the token budget allows,
    /// then sampling where a sequence's whole history is cached.
    fn round(&mut self) {
        let mut budget = self.config.max_batch_tokens;
        let mut lens = vec![0usize; self.active.len()];
        // Decode steps first: they are one token each and someone is waiting on them.
        for (len, s) in lens.iter_mut().zip(&self.active) {
            if !s.is_prefilling() && budget > 0 {
                *len = 1;
                budget -= 1;
            }
        }
        for (len, s) in lens.iter_mut().zip(&self.active) {
            if s.is_prefilling() && budget > 0 {
                *len = (s.history.len() - s.cached).min(budget);
                budget -= *len;
            }
        }
        let picked: Vec<usize> = (0..self.active.len()).filter(|&i| lens[i] > 0).collect();
        let steps: Vec<StageStep> = picked
            .iter()
            .map(|&i| {
                let s = &self.active[i];
                StageStep {
                    seq: s.seq,
                    position: s.cached,
                    input: StageInput::Tokens(s.history[s.cached..s.cached + lens[i]].to_vec()),
                }
            })
            .collect();
        let outputs = match self.stage.forward(&steps) {
            Ok(outputs) if outputs.len() == steps.len() => outputs,
            Ok(outputs) => {
                let e = format!("the stage returned {} outputs for {} steps", outputs.len(), steps.len());
                return self.fail(&picked, e);
            }
            Err(e) => return self.fail(&picked, e.to_string()),
        };
        let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(picked.len());
        for (&i, output) in picked.iter().zip(outputs) {
            let s = &mut self.active[i];
            s.cached += lens[i];
            if s.cached < s.history.len() {
                continue;
            }
            let outcome = match output {
                StageOutput::Logits(logits) => {
                    step_sequence(s, &self.tokenizer, self.stage.info().context_length, &logits)
                }
                StageOutput::Hidden(_) => Outcome::Done(GenerateEvent::Failed(EngineError::Internal(
                    "a full stage must return logits".into(),
                ))),
            };
            outcomes.push((i, outcome));
        }
        // Back to front, so the indices still to visit stay valid.
        for (i, outcome) in outcomes.into_iter().rev() {
            match outcome {
                Outcome::Continue => {}
                Outcome::Done(event) => {
                    let s = self.active.remove(i);
                    self.stage.release(s.seq);
                    // The channel has room for every event; a closed one means the
                    // caller has gone and no longer cares.
                    let _ = s.events.try_send(event);
                }
                Outcome::Cancelled => {
                    let s = self.active.remove(i);
                    self.stage.release(s.seq);
                    self.occupancy.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Ends the sequences of a batch that failed as a whole.
    fn fail(&mut self, picked: &[usize], reason: String) {
        tracing::error!(sequences = picked.len(), error = %reason, "batched forward failed");
        for &i in picked.iter().rev() {
            let s = self.active.remove(i);
            self.stage.release(s.seq);
            let _ = s.events.try_send(GenerateEvent::Failed(EngineError::Internal(reason.clone())));
        }
    }

    fn publish(&self) {
        self.occupancy.sequences.store(self.stage.sequence_count(), Ordering::Release);
        self.occupancy.cache_bytes.store(self.stage.cache_bytes(), Ordering::Release);
    }
}

/// Samples the next token of a sequence whose whole history is cached, and reports it.
fn step_sequence(s: &mut Sequence, tokenizer: &Tokenizer, context: usize, logits: &strata_model::Tensor) -> Outcome {
    let logits = match logits.to_vec1::<f32>() {
        Ok(l) => l,
        Err(e) => return Outcome::Done(GenerateEvent::Failed(EngineError::Internal(e.to_string()))),
    };
    let next = match strata_grammar::sample(&s.sampler, s.constraint.as_mut(), &logits, &s.history) {
        Ok(t) => t,
        Err(e) => return Outcome::Done(GenerateEvent::Failed(EngineError::Internal(e.to_string()))),
    };
    if tokenizer.is_eos(next) {
        return Outcome::Done(GenerateEvent::Finished(FinishReason::Stop));
    }
    s.history.push(next);
    s.generated += 1;
    let logprob = s.logprobs.and_then(|top| score_row(&logits, next, top));
    if s.events.try_send(GenerateEvent::Token(next, logprob)).is_err() {
        return Outcome::Cancelled;
    }
    if s.generated >= s.max_tokens || s.history.len() >= context {
        return Outcome::Done(GenerateEvent::Finished(FinishReason::Length));
    }
    Outcome::Continue
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant};

    use strata_model::synthetic::SyntheticModel;
    use strata_model::SamplingParams;

    use super::*;

    pub(crate) fn synthetic(spec: &SyntheticModel) -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = spec.write_to(dir.path()).unwrap();
        let file = ModelFile::open(path).unwrap();
        (dir, file)
    }

    fn request(prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
        GenerateRequest {
            prompt_tokens: prompt.to_vec(),
            max_tokens,
            sampling,
            prompt_logprobs: None,
            logprobs: None,
            constraint: None,
            shared_prompt: false,
        }
    }

    /// The reference: the same loop as `Generator`, on a private stage.
    fn alone(
        file: &ModelFile,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingParams,
    ) -> (Vec<u32>, FinishReason) {
        let mut generator = strata_model::Generator::load(file, &Device::Cpu, StageOptions::default()).unwrap();
        let generation = generator.generate(prompt, max_tokens, sampling, |_, _| true).unwrap();
        (generation.tokens, generation.finish)
    }

    async fn collect(mut events: mpsc::Receiver<GenerateEvent>) -> (Vec<u32>, GenerateEvent) {
        let mut tokens = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("engine is stuck") {
                Some(GenerateEvent::Token(t, _)) => tokens.push(t),
                Some(end) => return (tokens, end),
                None => panic!("the channel closed without a final event"),
            }
        }
    }

    /// Polls `engine` until its occupancy satisfies `what` (30 s at most). Shared with
    /// the API tests, which watch caches being freed when a client goes away.
    pub(crate) async fn wait_for(engine: &LocalEngine, what: impl Fn(Occupancy) -> bool) -> Occupancy {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = engine.occupancy();
            if what(now) {
                return now;
            }
            assert!(Instant::now() < deadline, "occupancy never got there: {now:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn concurrent_requests_match_single_runs_token_for_token() {
        let (_dir, file) = synthetic(&SyntheticModel::tiny());
        let engine = LocalEngine::start(&file, &Device::Cpu, "tiny".into()).unwrap();
        let random = |seed| SamplingParams { temperature: 0.8, top_k: Some(40), seed, ..SamplingParams::greedy() };
        let cases: Vec<(Vec<u32>, usize, SamplingParams)> = vec![
            (vec![1, 2, 3], 40, SamplingParams::greedy()),
            (vec![9, 8, 7, 6, 5, 4, 3, 2, 1], 25, SamplingParams::greedy()),
            (vec![200], 60, SamplingParams::greedy()),
            ((0..90).map(|i| (i * 31 % 250) as u32).collect(), 30, SamplingParams::greedy()),
            (vec![42, 17], 50, random(3)),
            (vec![42, 17], 50, SamplingParams { repetition_penalty: 1.3, ..random(4) }),
        ];
        let receivers: Vec<_> =
            cases.iter().map(|(p, n, s)| engine.generate(request(p, *n, s.clone())).unwrap()).collect();
        let results = futures::future::join_all(receivers.into_iter().map(collect)).await;
        for ((prompt, max_tokens, sampling), (tokens, end)) in cases.iter().zip(results) {
            let (expected, finish) = alone(&file, prompt, *max_tokens, sampling);
            assert_eq!(tokens, expected, "prompt {prompt:?}");
            assert_eq!(end, GenerateEvent::Finished(finish), "prompt {prompt:?}");
        }
        let now = wait_for(&engine, |o| o.sequences == 0).await;
        assert_eq!(now.cache_bytes, 0);
    }

    #[tokio::test]
    async fn long_prompts_are_fed_in_chunks_beside_decodes() {
        let (_dir, file) = synthetic(&SyntheticModel::tiny());
        let config = LocalEngineConfig { max_batch_tokens: 16, max_sequences: 4, ..LocalEngineConfig::default() };
        let engine = LocalEngine::start_with(&file, &Device::Cpu, "tiny".into(), config).unwrap();
        let short = engine.generate(request(&[5, 6], 30, SamplingParams::greedy())).unwrap();
        let prompt: Vec<u32> = (0..70).map(|i| (i * 7 % 250) as u32).collect();
        let long = engine.generate(request(&prompt, 10, SamplingParams::greedy())).unwrap();
        let (tokens, _) = collect(short).await;
        assert_eq!(tokens, alone(&file, &[5, 6], 30, &SamplingParams::greedy()).0);
        let (tokens, end) = collect(long).await;
        // Chunked prefill is not bit-exact, so only the shape is compared.
        assert!(matches!(end, GenerateEvent::Finished(_)), "{end:?}");
        assert!(!tokens.is_empty() && tokens.len() <= 10);
    }

    #[tokio::test]
    async fn generation_stops_at_max_tokens_and_the_context_end() {
        let (_dir, file) = synthetic(&SyntheticModel { context_length: 40, ..SyntheticModel::tiny() });
        let engine = LocalEngine::start(&file, &Device::Cpu, "tiny".into()).unwrap();
        let (tokens, end) = collect(engine.generate(request(&[1, 2], 3, SamplingParams::greedy())).unwrap()).await;
        let (expected, finish) = alone(&file, &[1, 2], 3, &SamplingParams::greedy());
        assert_eq!((tokens, end), (expected, GenerateEvent::Finished(finish)));
        // Exactly filling the context is allowed; one more token is not.
        let prompt: Vec<u32> = (0..30).collect();
        let (tokens, end) = collect(engine.generate(request(&prompt, 10, SamplingParams::greedy())).unwrap()).await;
        let (expected, finish) = alone(&file, &prompt, 10, &SamplingParams::greedy());
        assert_eq!((tokens, end), (expected, GenerateEvent::Finished(finish)));
        let err = engine.generate(request(&prompt, 11, SamplingParams::greedy())).unwrap_err();
        assert_eq!(err, EngineError::ContextOverflow { tokens: 30, needed: 41, context: 40 });
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_they_are_queued() {
        let (_dir, file) = synthetic(&SyntheticModel::tiny());
        let engine = LocalEngine::start(&file, &Device::Cpu, "tiny".into()).unwrap();
        let vocab = SyntheticModel::tiny().vocab_size as u32;
        let cases = [
            (request(&[], 5, SamplingParams::greedy()), "no tokens"),
            (request(&[vocab], 5, SamplingParams::greedy()), "outside the vocabulary"),
            (request(&[1], 0, SamplingParams::greedy()), "max_tokens"),
            (request(&[1], 5, SamplingParams { temperature: -1.0, ..SamplingParams::greedy() }), "temperature"),
        ];
        for (req, expected) in cases {
            match engine.generate(req) {
                Err(EngineError::InvalidRequest(m)) => assert!(m.contains(expected), "{m} should mention {expected}"),
                other => panic!("expected an invalid request, got {:?}", other.map(|_| ())),
            }
        }
    }

    #[tokio::test]
    async fn a_dropped_receiver_cancels_and_frees_the_cache() {
        // A long context, and prompts the tiny model greedily repeats a token after
        // without ever ending, so the generations still run when the receivers go.
        let (_dir, file) = synthetic(&SyntheticModel { context_length: 4096, ..SyntheticModel::tiny() });
        let engine = LocalEngine::start(&file, &Device::Cpu, "tiny".into()).unwrap();
        let mut events = engine.generate(request(&[1, 2, 3], 4000, SamplingParams::greedy())).unwrap();
        let mut other = engine.generate(request(&[1], 4000, SamplingParams::greedy())).unwrap();
        for _ in 0..3 {
            assert!(matches!(events.recv().await, Some(GenerateEvent::Token(..))));
        }
        assert!(matches!(other.recv().await, Some(GenerateEvent::Token(..))));
        assert!(engine.occupancy().sequences >= 1);
        drop(events);
        drop(other);
        let now = wait_for(&engine, |o| o.sequences == 0).await;
        assert_eq!(now.cache_bytes, 0);
        assert_eq!(now.cancelled, 2);
        // The engine goes on serving.
        let (tokens, _) = collect(engine.generate(request(&[1], 4, SamplingParams::greedy())).unwrap()).await;
        assert!(!tokens.is_empty());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let (_dir, file) = synthetic(&SyntheticModel::tiny());
        let d = LocalEngineConfig::default;
        for config in [
            LocalEngineConfig { max_sequences: 0, ..d() },
            LocalEngineConfig { queue: 0, ..d() },
            LocalEngineConfig { max_batch_tokens: 32, max_sequences: 32, ..d() },
        ] {
            let result = LocalEngine::start_with(&file, &Device::Cpu, "tiny".into(), config);
            assert!(matches!(result, Err(LocalEngineError::Config(_))));
        }
    }

    #[tokio::test]
    async fn a_full_queue_is_reported_as_unavailable() {
        let (_dir, file) = synthetic(&SyntheticModel { context_length: 4096, ..SyntheticModel::tiny() });
        let config = LocalEngineConfig { max_sequences: 1, queue: 1, ..LocalEngineConfig::default() };
        let engine = LocalEngine::start_with(&file, &Device::Cpu, "tiny".into(), config).unwrap();
        // The tiny model never ends this one by itself (see above).
        let sampling = SamplingParams::greedy();
        let mut busy = engine.generate(request(&[1], 4000, sampling.clone())).unwrap();
        assert!(matches!(busy.recv().await, Some(GenerateEvent::Token(..))));
        // One waits in the queue; the next finds it full.
        let _queued = engine.generate(request(&[1], 4000, sampling.clone())).unwrap();
        let err = engine.generate(request(&[1], 4000, sampling)).unwrap_err();
        assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
    }
}

//! The compute thread: the one place a worker's [`Stage`] lives and runs.
//!
//! The thread is fed by a bounded channel of [`StageMessage`]s from every upstream
//! Forward stream. Each round it takes everything that is ready, applies opens and
//! releases in arrival order, and runs the frames as one batched forward, at most one
//! frame per sequence (a sequence's later frames wait for the next round, so its
//! positions stay in order). Outputs go to unbounded queues drained by forwarder
//! tasks, so the thread never waits on the network while it has work, or, to a
//! worker on the same machine, straight onto a local lane's socket ([`Route`]).
//!
//! A bad frame becomes a SequenceError event for its sequence only; the rest of the
//! batch runs.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use strata_grammar::{Constraint, Grammar, LazyVocabulary};
use strata_model::pool_rest::PoolBell;
use strata_model::shard_file::ShardOrigin;
use strata_model::stage::{LayerKv, StageOptions, WeightSources};
use strata_model::{
    Device, LogitRows, ModelFile, Sampler, SamplingParams, Stage, StageInput, StageOutput, StageStep, Tensor,
    Tokenizer, WeightStore,
};
use strata_proto::v1::{self, stage_message, worker_event, ErrorCode, StageMessage, WireDtype};
use strata_proto::WorkerError;
use tokio::sync::{mpsc, oneshot};

use crate::events::{unix_nanos, EventHub, Stats};
use crate::held_tokens::HeldTokens;
use crate::inbox::{Inbound, Inbox};
use crate::route::Route;
use crate::stage_trace::StageTrace;
use crate::weights::WeightFile;

/// Frames and controls queued for the compute thread before upstream streams feel
/// backpressure.
pub const QUEUE_DEPTH: usize = 4096;

/// How long the compute pool sleeps while the stage waits for a frame (see
/// [`Compute::next_message`]); a longer wait goes on with the pool spinning, then
/// asleep as between any operations. Bounded so that a second stage of this process
/// that starts meanwhile soon has the pool's threads for its own operations.
const POOL_REST_LIMIT: Duration = Duration::from_millis(50);

/// How long stage 0 under a compute lock waits for the rest of its sequences'
/// frames before a round (see [`Compute::gather`]): longer than a round of the
/// later stages at many streams, so groups merge; short enough that a sequence that
/// ended without word yet (its release is on its way) costs little.
const GATHER_LIMIT: Duration = Duration::from_millis(20);

/// Compute threads alive in this process. The pool rests only under a lone stage:
/// with two pipelines side by side, one stage's rest would take the pool's threads
/// from the other's steps.
static LIVE_STAGES: AtomicUsize = AtomicUsize::new(0);

/// Counts a compute thread as alive for as long as it is held.
struct LiveStage;

impl LiveStage {
    fn new() -> Self {
        LIVE_STAGES.fetch_add(1, Ordering::Relaxed);
        LiveStage
    }
}

impl Drop for LiveStage {
    fn drop(&mut self) {
        LIVE_STAGES.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A message for the compute thread, stamped when it was queued: the stage's
/// queueing time runs from then to the start of the forward that takes it.
pub struct Queued {
    pub message: StageMessage,
    pub at: Instant,
}

impl From<StageMessage> for Queued {
    fn from(message: StageMessage) -> Self {
        Self { message, at: Instant::now() }
    }
}

/// Live numbers the heartbeat reports.
#[derive(Debug, Default)]
pub struct Gauges {
    pub sequences: AtomicU32,
    /// The KV caches of this shard's sequences. Its weights are counted worker-wide,
    /// by the [`WeightStore`], since shards share them.
    pub cache_bytes: AtomicU64,
}

/// What a compute thread is started with.
pub struct ComputeSpec {
    /// Where to read the parts of the stage that `weights` does not hold yet.
    pub files: Vec<WeightFile>,
    /// The worker's weights, shared by its shards.
    pub weights: Arc<WeightStore>,
    /// The model's content hash: what the shards share weights by.
    pub model_hash: String,
    pub layers: Range<usize>,
    /// The layer count the coordinator planned with.
    pub total_layers: usize,
    pub stage_index: u32,
    pub wire_dtype: WireDtype,
    pub device: Device,
    /// See [`crate::config::WorkerArgs::compute_lock`].
    pub compute_lock: Option<PathBuf>,
}

/// Where a stage's outputs go.
#[derive(Default)]
pub struct Outputs {
    /// To the next stage (all but the last stage).
    pub next: Option<Route>,
    /// To stage 0, for direct-return tokens (the last stage).
    pub first: Option<Route>,
}

/// The running compute thread. Dropping it closes the queue; the thread finishes
/// its round and exits, freeing the stage.
pub struct ComputeHandle {
    pub tx: mpsc::Sender<Inbound>,
    /// Bytes of weights the stage computes with, shared with other shards or not.
    pub weight_bytes: u64,
    /// Bytes of those the load read itself (the rest were held for other shards).
    pub loaded_bytes: u64,
    pub layers: Range<usize>,
    pub is_last: bool,
    /// KV cache work beside the frames (see [`ComputeHandle::kv_job`]).
    kv: mpsc::UnboundedSender<KvJob>,
    pub kv_shape: KvShape,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set by the thread when it caught a panic, before it reports its sequences
    /// failed: from then on the shard is not served (see [`ComputeHandle::is_running`]).
    failed: Arc<AtomicBool>,
}

impl ComputeHandle {
    /// Whether the stage still computes: false once its thread caught a panic (it
    /// ends on its own for no other reason while the queue is open).
    pub fn is_running(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && self.thread.as_ref().is_some_and(|thread| !thread.is_finished())
    }

    /// Closes the queue and waits for the thread to exit (blocking).
    pub fn stop(self) {
        let Self { tx, thread, .. } = self;
        drop(tx);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Starts the compute thread and waits until it has loaded its stage.
pub async fn start(
    spec: ComputeSpec,
    outputs: Outputs,
    hub: Arc<EventHub>,
    stats: Arc<Stats>,
    gauges: Arc<Gauges>,
) -> Result<ComputeHandle, WorkerError> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (kv_tx, kv_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let failed = Arc::new(AtomicBool::new(false));
    let failed_in_thread = failed.clone();
    let thread = std::thread::Builder::new()
        .name(format!("strata-stage-{}", spec.stage_index))
        .spawn(move || {
            let _alive = LiveStage::new();
            let inbox = match Inbox::new(rx) {
                Ok(inbox) => inbox,
                Err(e) => {
                    let _ = ready_tx.send(Err(WorkerError::Internal(format!("cannot wait for messages: {e}"))));
                    return;
                }
            };
            let loaded = load(&spec).and_then(|(stage, tokenizer)| {
                let lock = match &spec.compute_lock {
                    Some(path) => Some(ComputeLock::open(path).map_err(|e| {
                        WorkerError::Internal(format!(
                            "cannot open the compute lock {}: {e}",
                            path.display()
                        ))
                    })?),
                    None => None,
                };
                Ok((stage, lock, tokenizer))
            });
            let (stage, lock, tokenizer) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let bytes = (stage.weight_bytes(), stage.loaded_weight_bytes());
            let (layers, is_last) = (stage.layers(), stage.is_last());
            let info = stage.info();
            let kv_shape = KvShape { kv_heads: info.kv_heads, head_dim: info.head_dim, context: info.context_length };
            if ready_tx.send(Ok((bytes, layers, is_last, kv_shape))).is_err() {
                return;
            }
            if lock.is_some() && spec.device.is_cpu() {
                pin_compute_threads(spec.stage_index);
            }
            let hidden = stage.info().hidden;
            let mut compute = Compute {
                stage,
                inbox,
                lock,
                hidden,
                stage_index: spec.stage_index,
                layers: spec.layers.clone(),
                wire_dtype: spec.wire_dtype,
                sequences: HashMap::new(),
                vocabulary: LazyVocabulary::new(tokenizer),
                own: Vec::new(),
                outbox: Vec::new(),
                held: HeldTokens::default(),
                awaited: HashSet::new(),
                round: Vec::new(),
                outputs,
                hub,
                stats,
                gauges: gauges.clone(),
            };
            // A panic (a bug) must not leave the sequences in flight waiting forever
            // for frames this stage will never send, nor lose them: the shard stops
            // being served (the worker's health then says it holds none), and each
            // sequence is failed as the pipeline's trouble (`NoShard`), so the
            // coordinator asks the workers, re-plans and replays them. A request that
            // panics a stage at the same step every time fails once its retries run out.
            let mut pending = VecDeque::new();
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute.run(&mut pending, kv_rx)));
            if let Err(panic) = run {
                failed_in_thread.store(true, Ordering::Release);
                compute.fail_all(&panic_text(panic.as_ref()), pending);
            }
            gauges.sequences.store(0, Ordering::Relaxed);
            gauges.cache_bytes.store(0, Ordering::Relaxed);
        })
        .map_err(|e| WorkerError::Internal(format!("cannot start the compute thread: {e}")))?;
    match ready_rx.await {
        Ok(Ok(((weight_bytes, loaded_bytes), layers, is_last, kv_shape))) => Ok(ComputeHandle {
            tx,
            weight_bytes,
            loaded_bytes,
            layers,
            is_last,
            kv: kv_tx,
            kv_shape,
            thread: Some(thread),
            failed,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(WorkerError::Internal(
            "the compute thread died while loading".into(),
        )),
    }
}

/// What a message settles for a stage waiting on its sequence: its frame came, or
/// it was released.
fn settles(queued: &Queued) -> Option<u64> {
    match &queued.message.kind {
        Some(stage_message::Kind::Frame(f)) => Some(f.seq_id),
        Some(stage_message::Kind::Release(r)) => Some(r.seq_id),
        _ => None,
    }
}

/// The sequences of `awaited` that `pending` settles nothing for.
fn missing_frames(awaited: &HashSet<u64>, pending: &VecDeque<Queued>) -> HashSet<u64> {
    let mut missing = awaited.clone();
    for seq in pending.iter().filter_map(settles) {
        missing.remove(&seq);
    }
    missing
}

/// Takes messages from `inbox` into `pending` until each sequence of `missing` has its
/// frame or release there, or `limit` has passed.
fn gather_frames(
    mut missing: HashSet<u64>,
    inbox: &mut Inbox,
    pending: &mut VecDeque<Queued>,
    limit: Duration,
) {
    if missing.is_empty() {
        return;
    }
    take_until(inbox, pending, limit, |queued| {
        if let Some(seq) = settles(queued) {
            missing.remove(&seq);
        }
        missing.is_empty()
    });
}

/// Takes messages from `inbox` into `pending` until one for which `last` says the wait
/// is over has come (it goes into `pending` too), or `limit` has passed.
fn take_until(
    inbox: &mut Inbox,
    pending: &mut VecDeque<Queued>,
    limit: Duration,
    mut last: impl FnMut(&Queued) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(Some(queued)) = inbox.recv_within(Some(left), None) else {
            return;
        };
        let over = last(&queued);
        pending.push_back(queued);
        if over {
            return;
        }
    }
}

/// What stage [`Compute::gather`] waits for.
enum Awaited {
    /// Stage 0: the frames (or releases) of these sequences.
    Sequences(HashSet<u64>),
    /// A later stage: the frame that ends the batch its queued frames came in.
    RestOfBatch,
}

/// Marks every frame to the next stage among a batch's `outputs` but the last as
/// followed by more of its batch (`batch_continues`).
fn mark_batch(outputs: &mut [Outgoing]) {
    let mut frames = outputs.iter_mut().filter_map(|out| match out {
        Outgoing::Next { message: StageMessage { kind: Some(stage_message::Kind::Frame(frame)) }, .. } => Some(frame),
        _ => None,
    });
    let mut previous = frames.next();
    for frame in frames {
        if let Some(previous) = previous.replace(frame) {
            previous.batch_continues = true;
        }
    }
}

/// Whether the last frame queued says more of its batch follow.
fn batch_incomplete(pending: &VecDeque<Queued>) -> bool {
    let last_frame = pending.iter().rev().find_map(|queued| match &queued.message.kind {
        Some(stage_message::Kind::Frame(frame)) => Some(frame),
        _ => None,
    });
    last_frame.is_some_and(|frame| frame.batch_continues)
}

/// Takes messages from `inbox` into `pending` until a frame that ends its batch has
/// come, or `limit` has passed.
fn complete_batch(inbox: &mut Inbox, pending: &mut VecDeque<Queued>, limit: Duration) {
    take_until(inbox, pending, limit, ends_batch);
}

/// Whether `queued` is a frame no more of its batch follow.
fn ends_batch(queued: &Queued) -> bool {
    matches!(&queued.message.kind, Some(stage_message::Kind::Frame(frame)) if !frame.batch_continues)
}

/// Pins this compute thread and the pool's threads each to a core of its own (see
/// [`strata_model::core_pinning`]): workers that take turns under a compute lock
/// share the cores one at a time. Where that is not possible they run unpinned.
fn pin_compute_threads(stage_index: u32) {
    match strata_model::core_pinning::pin_compute_threads() {
        Ok(cores) => tracing::debug!(stage = stage_index, ?cores, "compute threads pinned, one to a core"),
        Err(e) => tracing::info!(stage = stage_index, "compute threads left unpinned: {e}"),
    }
}

/// Names the stage and position at which a test has a compute thread panic:
/// `STAGE:POSITION`. Only the tests of what a panic leaves set it.
const PANIC_AT_ENV: &str = "STRATA_TEST_PANIC_AT";

/// Panics (once per process) if [`PANIC_AT_ENV`] names this stage and the position
/// one of `ready` starts at: the way a test makes a compute thread fail as a bug would.
fn panic_if_asked(stage: u32, ready: &[Ready]) {
    static AT: OnceLock<Option<(u32, usize)>> = OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);
    let at = AT.get_or_init(|| {
        let text = std::env::var(PANIC_AT_ENV).ok()?;
        let (stage, position) = text.split_once(':')?;
        Some((stage.parse().ok()?, position.parse().ok()?))
    });
    let Some((at_stage, at_position)) = *at else { return };
    if at_stage == stage && ready.iter().any(|r| r.position == at_position) && !FIRED.swap(true, Ordering::Relaxed) {
        panic!("{PANIC_AT_ENV}: stage {stage} at position {at_position}");
    }
}

/// What a panic said, for the errors it causes.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (_, Some(text)) => text.clone(),
        _ => "a panic".to_string(),
    }
}

/// The stage, and on a last stage the model's tokenizer (for constrained sampling).
fn load(spec: &ComputeSpec) -> Result<(Stage, Option<Arc<Tokenizer>>), WorkerError> {
    let files = spec
        .files
        .iter()
        .map(|f| ModelFile::open(&f.path).map_err(|e| WorkerError::ModelUnavailable(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    // With no file, every part is held already, and so is the model's description.
    let layers = match files.first() {
        Some(file) => file.info().layers,
        None => spec.weights.model_info(&spec.model_hash).map(|info| info.layers).ok_or_else(|| {
            WorkerError::Internal("no weights file, and the worker holds no part of the model".into())
        })?,
    };
    if spec.layers.end > layers {
        return Err(WorkerError::ShardOutOfRange {
            start: spec.layers.start as u32,
            end: spec.layers.end as u32,
            layers: layers as u32,
        });
    }
    if spec.total_layers != layers {
        return Err(WorkerError::InvalidShard(format!(
            "the shard spec says the model has {} layers, the model file has {layers}",
            spec.total_layers
        )));
    }
    for (file, wanted) in files.iter().zip(&spec.files) {
        let Some(expected) = &wanted.pulled else {
            continue;
        };
        match ShardOrigin::of(file) {
            Some(origin) if origin.source_hash != spec.model_hash => {
                return Err(WorkerError::ModelHashMismatch {
                    expected: spec.model_hash.clone(),
                    got: origin.source_hash,
                })
            }
            Some(origin) if origin.layers != *expected => {
                return Err(WorkerError::InvalidShard(format!(
                    "the pulled shard holds layers {:?}, not {:?}",
                    origin.layers, expected
                )))
            }
            Some(_) => {}
            None => {
                return Err(WorkerError::InvalidShard(
                    "the pulled file is not a strata shard".into(),
                ))
            }
        }
    }
    let files: Vec<&ModelFile> = files.iter().collect();
    let sources = WeightSources {
        store: &spec.weights,
        model: &spec.model_hash,
        files: &files,
    };
    let stage = Stage::load_from(sources, spec.layers.clone(), &spec.device, StageOptions::default()).map_err(
        |e| match e {
            strata_model::Error::LayerRange { start, end, layers } => WorkerError::ShardOutOfRange {
                start: start as u32,
                end: end as u32,
                layers: layers as u32,
            },
            other => WorkerError::Internal(format!("loading layers {:?}: {other}", spec.layers)),
        },
    )?;
    let tokenizer = stage.is_last().then(|| last_stage_tokenizer(spec, files.first().copied())).flatten();
    Ok((stage, tokenizer))
}

/// The model's tokenizer, from the file a last stage loads from or, without one,
/// as the store remembers it from an earlier stage. A file whose tokenizer cannot be
/// read still serves unconstrained sequences: constrained ones fail, saying why.
fn last_stage_tokenizer(spec: &ComputeSpec, file: Option<&ModelFile>) -> Option<Arc<Tokenizer>> {
    let Some(file) = file else {
        return spec.weights.tokenizer(&spec.model_hash);
    };
    match Tokenizer::from_gguf(file.metadata()) {
        Ok(tokenizer) => {
            let tokenizer = Arc::new(tokenizer);
            spec.weights.remember_tokenizer(&spec.model_hash, tokenizer.clone());
            Some(tokenizer)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the model's tokenizer cannot be read: constrained sampling is unavailable");
            None
        }
    }
}

/// What a stage remembers of an open sequence.
struct Sequence {
    /// Last stage only: how to pick tokens, and every token so far (for the
    /// repetition penalty).
    sampler: Option<Sampler>,
    history: Vec<u32>,
    direct: Option<DirectReturn>,
    /// Last stage only: report each sampled token's log-probability with this many
    /// most likely tokens (`OpenSequence.logprobs_top`).
    logprobs_top: Option<usize>,
    /// Its span on this stage, when the request is traced.
    trace: Option<StageTrace>,
    /// Last stage only: the grammar its output follows (`OpenSequence.constraint`).
    constraint: Option<Constraint>,
    /// Last stage only: a token of it was reported (its first goes at once, see
    /// [`crate::held_tokens`]).
    reported: bool,
}

struct DirectReturn {
    end_position: usize,
    stop_tokens: Vec<u32>,
}

/// A frame that passed its checks, waiting for the batch to run.
struct Ready {
    seq: u64,
    /// When the frame was queued for the compute thread.
    queued_at: Instant,
    position: usize,
    tokens: Vec<u32>,
    sample: bool,
    score: Option<ScoreRequest>,
}

/// A frame's request to score its rows (see `ActivationFrame.score`).
#[derive(Clone, Copy)]
struct ScoreRequest {
    next_token: Option<u32>,
    top: usize,
}

/// The scores a scored frame reports: row `j` predicts `tokens[j + 1]`, the last row
/// `next_token` when the frame names it.
fn score_rows(r: &Ready, rows: &[Vec<f32>], request: ScoreRequest) -> Result<v1::PromptScores, String> {
    let targets = r.tokens.iter().skip(1).copied().chain(request.next_token);
    let scores = rows
        .iter()
        .zip(targets)
        .map(|(logits, target)| {
            token_score(logits, target, request.top).ok_or_else(|| format!("token {target} is outside the vocabulary"))
        })
        .collect::<Result<_, String>>()?;
    Ok(v1::PromptScores { seq_id: r.seq, position: r.position as u32, scores })
}

struct Compute {
    stage: Stage,
    inbox: Inbox,
    lock: Option<ComputeLock>,
    hidden: usize,
    stage_index: u32,
    /// The model layers it holds, for its spans.
    layers: Range<usize>,
    wire_dtype: WireDtype,
    sequences: HashMap<u64, Sequence>,
    /// Last stage only: what constrained sequences' parsers are compiled against,
    /// built when the first one opens.
    vocabulary: LazyVocabulary,
    /// Direct-return frames of a stage that is both first and last: they go back
    /// into its own queue.
    own: Vec<Queued>,
    /// What the last round produced, sent once the round is over (see
    /// [`Compute::next_message`]).
    outbox: Vec<Outgoing>,
    /// Token reports of direct-return sequences waiting to go with others.
    held: HeldTokens,
    /// Only where it gathers ([`Compute::gathers`]): sequences whose frame it sent
    /// on and whose next frame (the token) has not come back yet.
    awaited: HashSet<u64>,
    /// The sequences of the round being taken and computed: a panic's handling
    /// fails them too, whether or not they were opened by then.
    round: Vec<u64>,
    outputs: Outputs,
    hub: Arc<EventHub>,
    stats: Arc<Stats>,
    gauges: Arc<Gauges>,
}

/// The most likely tokens a sequence asks to be told with each sampled token.
fn logprobs_top(open: &v1::OpenSequence) -> Option<usize> {
    open.logprobs_top.map(|top| top.min(strata_proto::MAX_SCORE_TOP) as usize)
}

/// `token`'s log-probability under `logits` and the `top` most likely tokens.
fn token_score(logits: &[f32], token: u32, top: usize) -> Option<v1::PositionScore> {
    let score = strata_model::perplexity::score_row(logits, token, top)?;
    Some(v1::PositionScore {
        logprob: score.logprob,
        top: score.top.into_iter().map(|(token, logprob)| v1::TokenLogprob { token, logprob }).collect(),
    })
}

fn seq_of(message: &StageMessage) -> Option<u64> {
    match message.kind.as_ref()? {
        stage_message::Kind::Open(o) => Some(o.seq_id),
        stage_message::Kind::Frame(f) => Some(f.seq_id),
        stage_message::Kind::Release(r) => Some(r.seq_id),
    }
}

impl Compute {
    /// Runs until the stage is stopped. `pending` holds what came but is not computed
    /// yet: the caller's, so that a panic's handling sees it too.
    fn run(&mut self, pending: &mut VecDeque<Queued>, mut kv: mpsc::UnboundedReceiver<KvJob>) {
        loop {
            if pending.is_empty() {
                match self.next_message() {
                    Some(message) => pending.push_back(message),
                    None => {
                        self.release_held();
                        self.flush_outbox();
                        return;
                    }
                }
            }
            // More work came before the round's outputs went: they go now.
            self.flush_outbox();
            while let Some(message) = self.inbox.try_recv() {
                pending.push_back(message);
            }
            self.run_kv_jobs(&mut kv);
            self.gather(pending);
            let (steps, ready) = self.take_round(pending);
            if !steps.is_empty() {
                self.run_batch(steps, ready);
            }
            if self.held.due(Instant::now()) {
                self.release_held();
            }
            pending.extend(self.own.drain(..));
            self.gauges
                .sequences
                .store(self.sequences.len() as u32, Ordering::Relaxed);
            self.gauges
                .cache_bytes
                .store(self.stage.cache_bytes(), Ordering::Relaxed);
        }
    }

    /// Waits for the next message; `None` once the stage is stopped. For the first
    /// [`POOL_REST_LIMIT`] of the wait the compute pool of a lone stage sleeps rather
    /// than spins, so an idle stage leaves the cores to the stages of other workers
    /// computing meanwhile (three workers on two cores: each stage's step 6% shorter,
    /// 11 of 12 alternating runs, 2026-12-05).
    ///
    /// The last round's outputs are sent once the pool sleeps, just before this
    /// thread does ([`Inbox::send_then_recv_within`]): sending wakes the next stage,
    /// which may take this thread's core at once, and a pool still spinning
    /// meanwhile would hold the other core from it (a scheduler trace showed 0.3 ms
    /// of it a step). What is sent should not use the pool: its threads are resting
    /// and the work would fall to this thread alone.
    ///
    /// While token reports are held back, the wait lasts until they are due; then
    /// they go, and the wait goes on.
    fn next_message(&mut self) -> Option<Queued> {
        let mut outbox = std::mem::take(&mut self.outbox);
        if let Some(left) = self.held.left(Instant::now()) {
            if let Some(message) = self.send_and_wait(outbox, Some(left)) {
                return message;
            }
            // Nothing came while token reports were held: they go now.
            outbox = self.held.take().into_iter().map(Outgoing::Event).collect();
        }
        loop {
            if let Some(message) = self.send_and_wait(outbox, None) {
                return message;
            }
            outbox = Vec::new();
        }
    }

    /// Sends `outbox` (see [`Compute::next_message`]) and waits up to `limit`
    /// (forever where `None`) for the next message: `None` if none came,
    /// `Some(None)` once the stage is stopped.
    fn send_and_wait(&mut self, outbox: Vec<Outgoing>, limit: Option<Duration>) -> Option<Option<Queued>> {
        if LIVE_STAGES.load(Ordering::Relaxed) > 1 {
            let (outputs, hub, stage_index) = (&mut self.outputs, &self.hub, self.stage_index);
            let send = || post(outputs, hub, stage_index, outbox);
            return self.inbox.send_then_recv_within(limit, None, send);
        }
        let started = Instant::now();
        let rest_limit = limit.map_or(POOL_REST_LIMIT, |limit| limit.min(POOL_REST_LIMIT));
        // With lanes to read, the pool also watches them: the sender's write wakes
        // it beside this thread.
        let pool_rest = self.inbox.pool_rest();
        let (outputs, hub, stage_index, inbox) = (&mut self.outputs, &self.hub, self.stage_index, &mut self.inbox);
        let wait = |pool_bell: &PoolBell| {
            let send = || post(outputs, hub, stage_index, outbox);
            inbox.send_then_recv_within(Some(rest_limit), Some(pool_bell), send)
        };
        let rested = match pool_rest {
            Some(rest) => strata_model::pool_rest::wait_with_pool_resting(rest, wait),
            None => strata_model::pool_rest::wait_with_pool_asleep(wait),
        };
        if rested.is_some() {
            return rested;
        }
        match limit.map(|limit| limit.saturating_sub(started.elapsed())) {
            Some(left) if left.is_zero() => None,
            left => self.inbox.recv_within(left, None),
        }
    }

    /// Stage 0 of a pipeline whose workers take turns under a compute lock waits, up
    /// to [`GATHER_LIMIT`], until the frames of all the sequences it sent on are
    /// back, so they go round as one batch. The stages share the cores, so
    /// pipelining groups of sequences buys nothing, while every group costs each
    /// stage a step: with 16 streams the groups had settled at about 5 sequences
    /// each (`strata bench --workers 3`, 2026-12-06). The other stages compute
    /// meanwhile; where stages have cores of their own (no lock), nothing waits.
    /// The later stages wait, as long at most, for the rest of a batch whose first
    /// frames have come (see [`mark_batch`]): a stage woken by the first frame of
    /// sixteen had taken 13 a step on average.
    fn gather(&mut self, pending: &mut VecDeque<Queued>) {
        let awaited = if self.gathers() {
            // Released ones come back no more.
            self.awaited.retain(|seq| self.sequences.contains_key(seq));
            let missing = missing_frames(&self.awaited, pending);
            if missing.is_empty() {
                return;
            }
            Awaited::Sequences(missing)
        } else if self.completes_batches() && batch_incomplete(pending) {
            Awaited::RestOfBatch
        } else {
            return;
        };
        // Its pool wakes when the wait ends, not at the first frame back: woken
        // earlier, it would spin on a core the other stages compute on meanwhile.
        let inbox = &mut self.inbox;
        let wait = |_: &PoolBell| match awaited {
            Awaited::Sequences(missing) => gather_frames(missing, inbox, pending, GATHER_LIMIT),
            Awaited::RestOfBatch => complete_batch(inbox, pending, GATHER_LIMIT),
        };
        // As in `next_message`: the pool sleeps rather than spins while this waits.
        if LIVE_STAGES.load(Ordering::Relaxed) > 1 {
            wait(&PoolBell::default());
        } else {
            strata_model::pool_rest::wait_with_pool_asleep(wait);
        }
    }

    /// Whether this stage gathers its sequences (see [`Compute::gather`]).
    fn gathers(&self) -> bool {
        self.lock.is_some() && self.stage_index == 0 && !self.stage.is_last()
    }

    /// Whether this stage waits for the rest of a batch (see [`Compute::gather`]).
    fn completes_batches(&self) -> bool {
        self.lock.is_some() && self.stage_index > 0
    }

    /// Token reports held back go with the round's outputs.
    fn release_held(&mut self) {
        self.outbox.extend(self.held.take().into_iter().map(Outgoing::Event));
    }

    /// Sends what the last round produced (see [`post`]).
    fn flush_outbox(&mut self) {
        post(&mut self.outputs, &self.hub, self.stage_index, std::mem::take(&mut self.outbox));
    }

    /// Fails every sequence this stage holds or has a message of (its round,
    /// `pending`, and what waits in its queue): the compute thread stops after `reason`.
    fn fail_all(&mut self, reason: &str, pending: VecDeque<Queued>) {
        tracing::error!(stage = self.stage_index, reason, "the compute thread failed");
        // Closed first: a message sent from now on is refused at once (its sender
        // hears NoShard), not queued here to be dropped unanswered.
        self.inbox.close();
        let mut known: BTreeSet<u64> = self.sequences.keys().copied().collect();
        known.extend(self.round.iter().copied());
        known.extend(pending.iter().filter_map(|queued| seq_of(&queued.message)));
        self.fail_each(&known, reason);
        // Then those only queued: reading a lane admits its messages, and the known
        // ones have been told by then whatever that does.
        let queued: BTreeSet<u64> = std::iter::from_fn(|| self.inbox.try_recv())
            .filter_map(|queued| seq_of(&queued.message))
            .filter(|seq| !known.contains(seq))
            .collect();
        self.fail_each(&queued, reason);
    }

    fn fail_each(&mut self, seqs: &BTreeSet<u64>, reason: &str) {
        for &seq in seqs {
            let message = format!("stage {} stopped computing: {reason}", self.stage_index);
            self.fail_sequence(seq, ErrorCode::NoShard, message);
        }
    }

    /// Reports that `seq` failed, after the token reports held back (see
    /// [`crate::held_tokens`]): the coordinator hears of its tokens first.
    fn fail_sequence(&mut self, seq: u64, code: ErrorCode, message: String) {
        for report in self.held.take() {
            self.hub.emit(report);
        }
        self.hub.sequence_error(seq, code, message, self.stage_index);
    }

    /// Applies the controls and checks the frames that can go in this round; what
    /// must wait (a sequence's second frame, and anything behind it) stays queued.
    fn take_round(&mut self, pending: &mut VecDeque<Queued>) -> (Vec<StageStep>, Vec<Ready>) {
        let mut steps = Vec::new();
        let mut ready = Vec::new();
        let mut busy: HashSet<u64> = HashSet::new();
        let mut waiting = VecDeque::new();
        self.round.clear();
        self.round.extend(pending.iter().filter_map(|queued| seq_of(&queued.message)));
        for queued in pending.drain(..) {
            let Some(seq) = seq_of(&queued.message) else {
                continue;
            };
            // A sequence copied from another waits for the source's frame in this
            // round: it must copy what that frame computes.
            let source_busy = match &queued.message.kind {
                Some(stage_message::Kind::Open(open)) => open.prefix.as_ref().is_some_and(|p| busy.contains(&p.seq_id)),
                _ => false,
            };
            if busy.contains(&seq) || source_busy {
                // What follows it waits too.
                busy.insert(seq);
                waiting.push_back(queued);
                continue;
            }
            self.awaited.remove(&seq);
            match queued.message.kind {
                Some(stage_message::Kind::Open(open)) => self.open(open),
                Some(stage_message::Kind::Release(release)) => self.release(release),
                Some(stage_message::Kind::Frame(frame)) => match self.check(frame, queued.at) {
                    Ok((step, r)) => {
                        busy.insert(seq);
                        steps.push(step);
                        ready.push(r);
                    }
                    Err((code, message)) => self.fail_sequence(seq, code, message),
                },
                None => {}
            }
        }
        *pending = waiting;
        (steps, ready)
    }

    fn open(&mut self, open: v1::OpenSequence) {
        let seq = open.seq_id;
        let sampler = if self.stage.is_last() {
            match sampling_from_proto(open.sampling.as_ref())
                .and_then(|p| Sampler::new(&p).map_err(|e| e.to_string()))
            {
                Ok(s) => Some(s),
                Err(message) => {
                    self.fail_sequence(seq, ErrorCode::BadFrame, message);
                    return;
                }
            }
        } else {
            None
        };
        let constraint = match self.constraint_of(&open) {
            Ok(c) => c,
            Err(message) => {
                self.fail_sequence(seq, ErrorCode::BadFrame, message);
                return;
            }
        };
        // Opening again restarts the sequence.
        self.stage.release(seq);
        // A shared start: this stage's layers of the source's first positions, and on
        // the last stage the tokens they hold (the repetition penalty's history).
        let history = match &open.prefix {
            Some(prefix) => match self.fork(prefix, seq) {
                Ok(history) => history,
                Err(message) => {
                    self.fail_sequence(seq, ErrorCode::PrefixUnavailable, message);
                    return;
                }
            },
            None => Vec::new(),
        };
        let direct = open.direct_return.then(|| DirectReturn {
            end_position: open.end_position as usize,
            stop_tokens: open.stop_tokens.clone(),
        });
        let trace = StageTrace::open(&open.traceparent, seq, self.stage_index, &self.layers);
        self.sequences.insert(
            seq,
            Sequence {
                sampler,
                history,
                direct,
                logprobs_top: logprobs_top(&open),
                trace,
                constraint,
                reported: false,
            },
        );
        // Forwarded at once, not with the round's outputs: the next stage opens the
        // sequence while this one computes.
        if !self.stage.is_last() {
            let message = StageMessage { kind: Some(stage_message::Kind::Open(open)) };
            post(&mut self.outputs, &self.hub, self.stage_index, vec![Outgoing::Next { seq, message }]);
        }
    }

    /// Opens `seq` on the stage with the first `prefix.positions` positions of
    /// `prefix.seq_id`, and returns the tokens of those positions as the last stage
    /// knows them (other stages keep no tokens).
    fn fork(&mut self, prefix: &v1::SequencePrefix, seq: u64) -> Result<Vec<u32>, String> {
        let (from, positions) = (prefix.seq_id, prefix.positions as usize);
        let source = self.sequences.get(&from).ok_or_else(|| {
            format!("sequence {seq}: its prefix sequence {from} is not open on stage {}", self.stage_index)
        })?;
        let history = if self.stage.is_last() {
            source.history.get(..positions).map(<[u32]>::to_vec).ok_or_else(|| {
                format!("sequence {seq}: {positions} positions of sequence {from} asked, {} held", source.history.len())
            })?
        } else {
            Vec::new()
        };
        self.stage.fork(from, seq, positions).map_err(|e| format!("sequence {seq}: cannot copy its prefix: {e}"))?;
        Ok(history)
    }

    /// The parser of a constrained sequence, on the last stage (the only one that
    /// samples).
    fn constraint_of(&mut self, open: &v1::OpenSequence) -> Result<Option<Constraint>, String> {
        match &open.constraint {
            Some(c) if self.stage.is_last() => {
                let grammar = Grammar::from_wire(c.grammar.clone());
                self.vocabulary.get().and_then(|v| v.constrain(&grammar, c.prompt_tokens as usize)).map(Some)
            }
            _ => Ok(None),
        }
        .map_err(|e| e.to_string())
    }

    fn release(&mut self, release: v1::ReleaseSequence) {
        self.stage.release(release.seq_id);
        self.sequences.remove(&release.seq_id);
        let seq = release.seq_id;
        if let Some(next) = &mut self.outputs.next {
            let _ = next.send(StageMessage {
                kind: Some(stage_message::Kind::Release(release)),
            });
        } else if !self.stage.is_last() {
            tracing::debug!(seq, "release not forwarded: no next stage");
        }
    }

    fn check(&self, frame: v1::ActivationFrame, queued_at: Instant) -> Result<(StageStep, Ready), (ErrorCode, String)> {
        let seq = frame.seq_id;
        if !self.sequences.contains_key(&seq) {
            return Err((
                ErrorCode::UnknownSequence,
                format!(
                    "sequence {seq} was never opened on stage {}",
                    self.stage_index
                ),
            ));
        }
        if frame.tokens.is_empty() {
            return Err((
                ErrorCode::BadFrame,
                format!("sequence {seq}: the frame carries no token ids"),
            ));
        }
        let input = if self.stage.is_first() {
            if frame.hidden.is_some() {
                return Err((
                    ErrorCode::BadFrame,
                    "hidden states sent to the first stage, which takes token ids".into(),
                ));
            }
            StageInput::Tokens(frame.tokens.clone())
        } else {
            let rows = frame.tokens.len();
            let values = strata_proto::decode_hidden(frame.hidden.as_ref(), rows, self.hidden)
                .map_err(|e| (ErrorCode::BadFrame, format!("sequence {seq}: {e}")))?;
            let t = Tensor::from_vec(values, (rows, self.hidden), &Device::Cpu)
                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
            StageInput::Hidden(t)
        };
        if frame.score_top > strata_proto::MAX_SCORE_TOP {
            return Err((
                ErrorCode::BadFrame,
                format!("sequence {seq}: score_top {} is above {}", frame.score_top, strata_proto::MAX_SCORE_TOP),
            ));
        }
        let score = frame.score.then(|| ScoreRequest {
            next_token: frame.next_token,
            top: frame.score_top.max(1) as usize,
        });
        let step = StageStep {
            seq,
            position: frame.position as usize,
            input,
        };
        self.stage.check(&step).map_err(|e| {
            let code = match e {
                strata_model::Error::PositionMismatch { .. } | strata_model::Error::UnknownSequence(_) => {
                    ErrorCode::PositionMismatch
                }
                strata_model::Error::ContextOverflow { .. } => ErrorCode::ContextOverflow,
                strata_model::Error::BadInput(_) => ErrorCode::BadFrame,
                _ => ErrorCode::Internal,
            };
            let message = match e {
                strata_model::Error::UnknownSequence(_) => format!(
                    "sequence {seq}: stage {} holds no positions of it yet; expected position 0, got {}",
                    self.stage_index, frame.position
                ),
                other => other.to_string(),
            };
            (code, message)
        })?;
        Ok((
            step,
            Ready {
                seq,
                queued_at,
                position: frame.position as usize,
                tokens: frame.tokens,
                sample: frame.sample,
                score,
            },
        ))
    }

    fn run_batch(&mut self, steps: Vec<StageStep>, ready: Vec<Ready>) {
        let _span = tracing::trace_span!("batch", frames = steps.len()).entered();
        panic_if_asked(self.stage_index, &ready);
        let guard = self.lock.as_ref().map(ComputeLock::acquire);
        // Busy time starts once the cores are ours.
        let started = Instant::now();
        let tokens: usize = steps.iter().map(|s| s.input.len().unwrap_or(0)).sum();
        // Scored frames need every row's logits on the last stage; the rest only the last.
        let rows: Vec<LogitRows> = ready
            .iter()
            .map(|r| if r.score.is_some() && self.stage.is_last() { LogitRows::Every } else { LogitRows::Last })
            .collect();
        let result = self.stage.forward_rows(&steps, &rows);
        drop(guard);
        let computed = started.elapsed();
        let queued: Duration = ready.iter().map(|r| started.saturating_duration_since(r.queued_at)).sum();
        for (r, step) in ready.iter().zip(&steps) {
            if let Some(trace) = self.sequences.get_mut(&r.seq).and_then(|s| s.trace.as_mut()) {
                trace.frame(step.input.len().unwrap_or(0), started.saturating_duration_since(r.queued_at), computed);
            }
        }
        match result {
            Ok(outputs) => {
                let first_out = self.outbox.len();
                for (r, output) in ready.into_iter().zip(outputs) {
                    let seq = r.seq;
                    if let Err(message) = self.deliver(r, output) {
                        self.fail_sequence(seq, ErrorCode::Internal, message);
                    }
                }
                mark_batch(&mut self.outbox[first_out..]);
            }
            Err(e) => {
                for r in &ready {
                    self.fail_sequence(r.seq, ErrorCode::Internal, format!("forward failed: {e}"));
                }
            }
        }
        self.stats.record_batch(steps.len(), tokens, computed, queued);
    }

    fn deliver(&mut self, r: Ready, output: StageOutput) -> Result<(), String> {
        match output {
            StageOutput::Hidden(h) => {
                // Straight from the tensor's memory into the message.
                let (rows, hidden, dtype) = (r.tokens.len(), self.hidden, self.wire_dtype);
                let hidden = strata_model::with_f32_values(&h, |values| {
                    strata_proto::encode_hidden(values, rows, hidden, dtype)
                })
                .map_err(|e| e.to_string())?;
                let frame = v1::ActivationFrame {
                    seq_id: r.seq,
                    position: r.position as u32,
                    tokens: r.tokens,
                    hidden: Some(hidden),
                    sample: r.sample,
                    sent_unix_nanos: unix_nanos(),
                    score: r.score.is_some(),
                    next_token: r.score.and_then(|s| s.next_token),
                    score_top: r.score.map_or(0, |s| s.top as u32),
                    batch_continues: false,
                };
                if !self.stage.is_last() {
                    let message = StageMessage { kind: Some(stage_message::Kind::Frame(frame)) };
                    self.outbox.push(Outgoing::Next { seq: r.seq, message });
                    if self.gathers() {
                        self.awaited.insert(r.seq);
                    }
                }
                Ok(())
            }
            StageOutput::Logits(logits) => {
                let Some(sequence) = self.sequences.get_mut(&r.seq) else {
                    return Ok(());
                };
                sequence.history.truncate(r.position);
                sequence.history.extend_from_slice(&r.tokens);
                let last_row = match r.score {
                    Some(request) => {
                        let rows = logits.to_vec2::<f32>().map_err(|e| e.to_string())?;
                        self.hub.emit(worker_event::Kind::Scores(score_rows(&r, &rows, request)?));
                        Some(rows.into_iter().last().ok_or("a scored frame gave no logits")?)
                    }
                    None => None,
                };
                if !r.sample {
                    return Ok(());
                }
                let Some(sequence) = self.sequences.get_mut(&r.seq) else {
                    return Ok(());
                };
                let Some(sampler) = &sequence.sampler else {
                    return Err("no sampler for the sequence".into());
                };
                let position = sequence.history.len();
                let logprobs_top = sequence.logprobs_top;
                let mut sample = |logits: &[f32]| -> Result<(u32, Option<v1::PositionScore>), String> {
                    let token = strata_grammar::sample(sampler, sequence.constraint.as_mut(), logits, &sequence.history)
                        .map_err(|e| e.to_string())?;
                    Ok((token, logprobs_top.and_then(|top| token_score(logits, token, top))))
                };
                // Where the logits lie: copying a vocabulary of floats first took
                // ~20 µs of the last stage's hand-over (SmolLM2, 2026-12-06).
                let (token, score) = match &last_row {
                    Some(row) => sample(row)?,
                    None => strata_model::with_f32_values(&logits, sample).map_err(|e| e.to_string())??,
                };
                let sent_unix_nanos = unix_nanos();
                let feed_back = sequence.direct.as_ref().is_some_and(|d| {
                    !d.stop_tokens.contains(&token) && position + 1 < d.end_position
                });
                if feed_back {
                    let frame = v1::ActivationFrame {
                        seq_id: r.seq,
                        position: position as u32,
                        tokens: vec![token],
                        hidden: None,
                        sample: true,
                        sent_unix_nanos,
                        ..Default::default()
                    };
                    let message = StageMessage {
                        kind: Some(stage_message::Kind::Frame(frame)),
                    };
                    if self.stage.is_first() {
                        self.own.push(message.into());
                    } else {
                        self.outbox.push(Outgoing::First { seq: r.seq, message });
                    }
                }
                // After the feed-back frame: the next step is on the critical path,
                // the report to the coordinator is not.
                let report = worker_event::Kind::Token(v1::TokenSampled {
                    seq_id: r.seq,
                    position: position as u32,
                    token,
                    sent_unix_nanos,
                    score,
                });
                // Fed back here, the token's report can wait for others (see
                // `held_tokens`); the first and the last go at once, and with them
                // whatever was held.
                let may_wait = feed_back && sequence.reported;
                sequence.reported = true;
                let go = self.held.report(report, may_wait, Instant::now());
                self.outbox.extend(go.into_iter().map(Outgoing::Event));
                Ok(())
            }
        }
    }
}

/// A message a round produced, held until the round is over.
enum Outgoing {
    /// To the next stage.
    Next { seq: u64, message: StageMessage },
    /// Back to stage 0 (direct return).
    First { seq: u64, message: StageMessage },
    /// To the coordinator.
    Event(worker_event::Kind),
}

/// Sends a round's outputs: first the frames, in the order they were produced,
/// then what goes to the coordinator (tokens, and a failure for each sequence
/// whose frame found no way on), also in order. The frames first: they are the
/// next stage's work, while an event wakes this worker's runtime thread, which on
/// a machine with few cores can take this thread's core before a frame is out.
/// Only channel sends and socket writes: this runs while the compute pool is held
/// asleep.
fn post(outputs: &mut Outputs, hub: &EventHub, stage_index: u32, outbox: Vec<Outgoing>) {
    let mut to_coordinator = Vec::with_capacity(outbox.len());
    for outgoing in outbox {
        let (seq, unreachable) = match outgoing {
            Outgoing::Next { seq, message } => {
                let sent = outputs.next.as_mut().is_some_and(|next| next.send(message));
                (seq, (!sent).then(|| format!("stage {stage_index} has no connection to the next stage")))
            }
            Outgoing::First { seq, message } => {
                let sent = outputs.first.as_mut().is_some_and(|first| first.send(message));
                (seq, (!sent).then(|| "direct return: stage 0 is not connected".to_string()))
            }
            Outgoing::Event(kind) => {
                to_coordinator.push(kind);
                continue;
            }
        };
        if let Some(message) = unreachable {
            to_coordinator.push(crate::events::sequence_error(seq, ErrorCode::NextStageUnreachable, message, stage_index));
        }
    }
    for kind in to_coordinator {
        hub.emit(kind);
    }
}

/// An exclusive lock on a file that the workers of one machine share (`flock` on
/// Unix, `LockFileEx` on Windows, through the standard library's `File::lock`).
pub(crate) struct ComputeLock {
    file: std::fs::File,
}

pub(crate) struct ComputeLockGuard<'a>(&'a ComputeLock);

impl ComputeLock {
    pub(crate) fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        Ok(Self { file })
    }

    pub(crate) fn acquire(&self) -> ComputeLockGuard<'_> {
        // A failure (an interruption aside, which is retried) only means computing
        // unserialized, which stays correct.
        loop {
            match self.file.lock() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "the compute lock is not available; computing unserialized");
                    break;
                }
                Ok(()) => break,
            }
        }
        ComputeLockGuard(self)
    }
}

impl Drop for ComputeLockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.file.unlock();
    }
}

/// The wire's sampling parameters as the runtime's; absent fields mean greedy.
pub fn sampling_from_proto(p: Option<&v1::SamplingParams>) -> Result<SamplingParams, String> {
    let Some(p) = p else {
        return Ok(SamplingParams::greedy());
    };
    Ok(SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k.map(|k| k as usize),
        top_p: p.top_p,
        min_p: p.min_p,
        // proto3 sends an unset float as 0, which would be an invalid penalty.
        repetition_penalty: if p.repetition_penalty == 0.0 {
            1.0
        } else {
            p.repetition_penalty
        },
        repeat_last_n: p.repeat_last_n as usize,
        seed: p.seed,
    })
}

// ---------------------------------------------------------------- KV cache moves

/// What one position of one layer of a stage's KV cache holds: K and V of
/// `kv_heads` x `head_dim` f32 each; and how many positions a sequence may reach
/// (the model's context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context: usize,
}

/// Work on the KV caches of a stage's sequences, for moving sequences between
/// pipelines. Jobs travel on a channel of their own beside the frames, and the
/// compute thread runs them between batches: a job sees each sequence between two of
/// its steps, never in the middle of one.
pub enum KvJob {
    /// Copies of the KV of `layers` for the positions `[0, positions)` of `seq`.
    Export {
        seq: u64,
        layers: Range<usize>,
        positions: usize,
        reply: oneshot::Sender<Result<Vec<LayerKv>, WorkerError>>,
    },
    /// Opens `open.seq_id` (not forwarded: every stage imports for itself) with
    /// `layers` as its KV cache and `tokens` as its history.
    Import {
        open: v1::OpenSequence,
        tokens: Vec<u32>,
        layers: Vec<LayerKv>,
        reply: oneshot::Sender<Result<(), WorkerError>>,
    },
}

impl ComputeHandle {
    /// Hands `job` to the compute thread; its answer comes on the job's reply.
    pub fn kv_job(&self, job: KvJob) -> Result<(), WorkerError> {
        self.kv
            .send(job)
            .map_err(|_| WorkerError::Internal("the stage's compute thread has stopped".into()))?;
        // Wakes the thread if it waits for frames (a message without a kind is
        // skipped). A full queue means it has work, and it looks at its jobs every
        // round anyway.
        let _ = self.tx.try_send(StageMessage { kind: None }.into());
        Ok(())
    }
}

/// A runtime refusal of a KV move, as the worker reports it.
fn kv_error(e: strata_model::Error) -> WorkerError {
    match e {
        strata_model::Error::UnknownSequence(seq) => WorkerError::UnknownSequence(seq),
        e @ (strata_model::Error::KvPositions { .. } | strata_model::Error::KvLayers { .. }) => {
            WorkerError::KvUnavailable(e.to_string())
        }
        e @ (strata_model::Error::KvShape(_) | strata_model::Error::ContextOverflow { .. }) => {
            WorkerError::BadKv(e.to_string())
        }
        e => WorkerError::Internal(e.to_string()),
    }
}

impl Compute {
    fn run_kv_jobs(&mut self, jobs: &mut mpsc::UnboundedReceiver<KvJob>) {
        while let Ok(job) = jobs.try_recv() {
            match job {
                KvJob::Export { seq, layers, positions, reply } => {
                    let _span = tracing::debug_span!("kv_export", seq, positions).entered();
                    let _ = reply.send(self.stage.export_kv(seq, layers, positions).map_err(kv_error));
                }
                KvJob::Import { open, tokens, layers, reply } => {
                    let _span = tracing::debug_span!("kv_import", seq = open.seq_id).entered();
                    let _ = reply.send(self.import(open, tokens, layers));
                }
            }
        }
    }

    fn import(&mut self, open: v1::OpenSequence, tokens: Vec<u32>, layers: Vec<LayerKv>) -> Result<(), WorkerError> {
        let seq = open.seq_id;
        let sampler = if self.stage.is_last() {
            let params = sampling_from_proto(open.sampling.as_ref()).map_err(WorkerError::BadFrame)?;
            Some(Sampler::new(&params).map_err(|e| WorkerError::BadFrame(e.to_string()))?)
        } else {
            None
        };
        let constraint = self.constraint_of(&open).map_err(WorkerError::BadFrame)?;
        self.stage.import_kv(seq, layers).map_err(kv_error)?;
        let trace = StageTrace::open(&open.traceparent, seq, self.stage_index, &self.layers);
        let logprobs_top = logprobs_top(&open);
        let direct = open
            .direct_return
            .then_some(DirectReturn { end_position: open.end_position as usize, stop_tokens: open.stop_tokens });
        // The whole history, not just the next frame's token: the last stage samples
        // position `history.len()`, with a repetition penalty over all of it.
        let sequence = Sequence { sampler, history: tokens, direct, logprobs_top, trace, constraint, reported: false };
        self.sequences.insert(seq, sequence);
        self.gauges.sequences.store(self.sequences.len() as u32, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_compute_lock_has_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("compute.lock");
        let (a, b) = (ComputeLock::open(&path).expect("opened"), ComputeLock::open(&path).expect("opened"));
        let held = a.acquire();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _turn = b.acquire();
                let _ = tx.send(());
            });
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "taken while held");
            drop(held);
            assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok(), "not taken once let go");
        });
    }

    fn frame(seq: u64, position: u32) -> StageMessage {
        let frame = v1::ActivationFrame { seq_id: seq, position, ..Default::default() };
        StageMessage { kind: Some(stage_message::Kind::Frame(frame)) }
    }

    fn position(message: StageMessage) -> Option<u32> {
        match message.kind {
            Some(stage_message::Kind::Frame(f)) => Some(f.position),
            _ => None,
        }
    }

    fn queued(message: StageMessage) -> Queued {
        Queued { message, at: Instant::now() }
    }

    fn continues(message: &StageMessage) -> Option<bool> {
        match &message.kind {
            Some(stage_message::Kind::Frame(f)) => Some(f.batch_continues),
            _ => None,
        }
    }

    #[test]
    fn a_batch_marks_all_its_frames_to_the_next_stage_but_the_last() {
        let next = |seq| Outgoing::Next { seq, message: frame(seq, 9) };
        let token = || Outgoing::Event(worker_event::Kind::Token(Default::default()));
        let mut outputs = vec![next(1), token(), next(2), Outgoing::First { seq: 5, message: frame(5, 9) }, next(3)];
        mark_batch(&mut outputs);
        let marks: Vec<Option<bool>> = outputs
            .iter()
            .map(|out| match out {
                Outgoing::Next { message, .. } => continues(message),
                _ => None,
            })
            .collect();
        assert_eq!(marks, [Some(true), None, Some(true), None, Some(false)]);
        // Back to stage 0 (the direct return) stays unmarked: stage 0 gathers by sequence.
        let Outgoing::First { message, .. } = &outputs[3] else { unreachable!() };
        assert_eq!(continues(message), Some(false));

        let mut alone = vec![next(7)];
        mark_batch(&mut alone);
        let Outgoing::Next { message, .. } = &alone[0] else { unreachable!() };
        assert_eq!(continues(message), Some(false));
    }

    #[test]
    fn a_later_stage_waits_for_the_frame_that_ends_the_batch_or_the_limit() {
        let marked = |seq, more| {
            let mut message = frame(seq, 5);
            if let Some(stage_message::Kind::Frame(f)) = message.kind.as_mut() {
                f.batch_continues = more;
            }
            queued(message)
        };
        let mut pending: VecDeque<Queued> = [marked(1, true)].into();
        assert!(batch_incomplete(&pending));
        let (tx, rx) = mpsc::channel::<Inbound>(16);
        let mut inbox = Inbox::new(rx).unwrap();
        for message in [marked(2, true), marked(3, false), marked(4, true)] {
            tx.try_send(message.into()).expect("room in the channel");
        }
        complete_batch(&mut inbox, &mut pending, Duration::from_secs(60));
        let seqs: Vec<u64> = pending.iter().filter_map(|q| seq_of(&q.message)).collect();
        assert_eq!(seqs, [1, 2, 3], "up to the batch's last frame; the next batch's stays queued");
        assert!(!batch_incomplete(&pending));

        // Sequence 4's batch never ends: the wait ends at the limit.
        let mut pending = VecDeque::new();
        let started = Instant::now();
        complete_batch(&mut inbox, &mut pending, Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(batch_incomplete(&pending));
    }

    #[test]
    fn gathering_ends_once_every_awaited_sequence_has_a_frame_or_its_release_or_at_the_limit() {
        let awaited: HashSet<u64> = [1, 2, 3].into();
        let (tx, rx) = mpsc::channel::<Inbound>(16);
        let mut inbox = Inbox::new(rx).unwrap();
        let mut pending: VecDeque<Queued> = [queued(frame(1, 5))].into();
        let release = StageMessage { kind: Some(stage_message::Kind::Release(v1::ReleaseSequence { seq_id: 3 })) };
        let sender = std::thread::spawn(move || {
            for message in [frame(7, 1), release, frame(2, 5), frame(9, 1)] {
                tx.blocking_send(message.into()).expect("the gatherer listens");
            }
            tx
        });
        let missing = missing_frames(&awaited, &pending);
        assert_eq!(missing, [2, 3].into());
        let started = Instant::now();
        gather_frames(missing, &mut inbox, &mut pending, Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(30), "it did not wait for the limit");
        // Up to sequence 2's frame, which was the last one awaited; what comes later
        // stays in the channel.
        let seqs: Vec<u64> = pending.iter().filter_map(|q| seq_of(&q.message)).collect();
        assert_eq!(seqs, [1, 7, 3, 2]);
        let _tx = sender.join().expect("the sender ends");

        // Sequence 4 never comes: the wait ends at the limit.
        let started = Instant::now();
        gather_frames([4].into(), &mut inbox, &mut pending, Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(pending.back().and_then(|q| seq_of(&q.message)), Some(9));
    }

    #[test]
    fn a_rounds_outputs_go_in_order_and_an_unreachable_stage_fails_its_sequence() {
        let (next, mut to_next) = mpsc::unbounded_channel();
        let mut outputs = Outputs { next: Some(Route::forwarder(next)), first: None };
        let hub = EventHub::default();
        let mut events = hub.subscribe();
        let token = v1::TokenSampled { seq_id: 3, position: 9, token: 42, ..Default::default() };
        let outbox = vec![
            Outgoing::Next { seq: 1, message: frame(1, 5) },
            Outgoing::Event(worker_event::Kind::Token(token)),
            Outgoing::Next { seq: 2, message: frame(2, 7) },
            // No connection back to stage 0.
            Outgoing::First { seq: 3, message: frame(3, 9) },
        ];
        post(&mut outputs, &hub, 2, outbox);
        assert_eq!(position(to_next.try_recv().expect("first frame")), Some(5));
        assert_eq!(position(to_next.try_recv().expect("second frame")), Some(7));
        assert!(to_next.try_recv().is_err());
        match events.try_recv().expect("the token").kind {
            Some(worker_event::Kind::Token(t)) => assert_eq!((t.seq_id, t.token), (3, 42)),
            other => panic!("expected the token, got {other:?}"),
        }
        match events.try_recv().expect("the failure").kind {
            Some(worker_event::Kind::Error(e)) => {
                assert_eq!(e.seq_id, 3);
                assert_eq!(e.code, ErrorCode::NextStageUnreachable as i32);
            }
            other => panic!("expected a sequence error, got {other:?}"),
        }
    }
}

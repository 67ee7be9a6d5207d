//! The cluster as an [`Engine`]: a cheap handle that hands requests to the
//! [`super::scheduler`] task, which runs them through whatever pipeline is current.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use strata_model::SamplingParams;
use strata_proto::v1;
use strata_proto::FRAME_TARGET_BYTES;
use tokio::sync::{mpsc, oneshot};

use super::messages::{RequestId, SchedulerMsg};
use crate::engine::{Engine, EngineError, GenerateEvent, GenerateRequest, Limits, ModelCard};

/// Most prompt tokens in one frame. Equal to the stages' prefill chunk, so a
/// pipeline computes a long prompt in exactly the chunks one process would.
pub const MAX_FRAME_TOKENS: usize = strata_proto::timing::PREFILL_CHUNK_TOKENS;

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
    /// The planned context: every stage's KV cache holds no more.
    pub(super) limits: Limits,
    pub(super) vocab_size: usize,
    pub(super) tx: mpsc::UnboundedSender<SchedulerMsg>,
    pub(super) next_request: AtomicU64,
    pub(super) return_path: ReturnPath,
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
        request.validate(self.vocab_size, self.limits.context)?;
        // Room for every event the request can produce (admitted, the prompt's scores,
        // its tokens, the end): the scheduler never waits on a slow client.
        let (events, receiver) = mpsc::channel(request.max_tokens + 3);
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let direct = path == ReturnPath::Direct;
        self.tx
            .send(SchedulerMsg::Start {
                id: RequestId(id),
                request,
                direct,
                ignore_eos,
                events,
                parent: tracing::Span::current(),
            })
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

    fn limits(&self) -> Limits {
        self.limits
    }

    fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        self.generate_via(request, self.return_path)
    }
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

//! What serves generations: the seam between the user-facing API and whatever
//! computes tokens (a local single-process engine, or a cluster of workers).
//!
//! An engine takes a tokenized request and streams events back on a channel. Dropping
//! the receiver cancels the request: the engine notices and frees its KV caches.

pub mod local;

use std::sync::Arc;

use strata_grammar::{Grammar, LazyVocabulary};
use strata_model::generate::FinishReason;
use strata_model::{ChatTemplate, SamplingParams, Tokenizer};
use tokio::sync::mpsc;

/// A tokenized generation request.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    /// 0 only when the request scores its prompt (`prompt_logprobs`) and generates nothing.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Score the prompt: report each prompt token's log-probability given the tokens
    /// before it, with this many most likely tokens per position (1 to
    /// [`MAX_TOP_LOGPROBS`]), in one [`GenerateEvent::PromptLogprobs`] before any token.
    pub prompt_logprobs: Option<usize>,
    /// Report each generated token's log-probability with this many most likely
    /// tokens (0 to [`MAX_TOP_LOGPROBS`]; the argmax comes whatever the number).
    pub logprobs: Option<usize>,
    /// The grammar the generated tokens follow (a response_format), already checked
    /// against the model's vocabulary.
    pub constraint: Option<Grammar>,
    /// Several requests sample from this same prompt (the choices of one API
    /// request): the cluster computes the prompt's last token apart from the rest,
    /// which it computes once for all of them.
    pub shared_prompt: bool,
}

/// The most likely tokens a scored position reports at most (OpenAI's limit, which
/// the stages enforce too).
pub const MAX_TOP_LOGPROBS: usize = strata_proto::MAX_SCORE_TOP as usize;

impl GenerateRequest {
    /// Checks what every engine needs before it queues anything: a non-empty prompt of
    /// known tokens, room in the context, and valid sampling parameters.
    pub fn validate(&self, vocab_size: usize, context: usize) -> Result<(), EngineError> {
        let tokens = self.prompt_tokens.len();
        if tokens == 0 {
            return Err(EngineError::InvalidRequest("the prompt has no tokens".into()));
        }
        if let Some(bad) = self.prompt_tokens.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary of {vocab_size}")));
        }
        if self.max_tokens == 0 && self.prompt_logprobs.is_none() {
            return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if let Some(top) = self.prompt_logprobs.filter(|t| !(1..=MAX_TOP_LOGPROBS).contains(t)) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt logprobs report 1 to {MAX_TOP_LOGPROBS} most likely tokens, not {top}"
            )));
        }
        if let Some(top) = self.logprobs.filter(|&t| t > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidRequest(format!(
                "logprobs report at most {MAX_TOP_LOGPROBS} most likely tokens, not {top}"
            )));
        }
        let needed = tokens.saturating_add(self.max_tokens);
        if needed > context {
            return Err(EngineError::ContextOverflow { tokens, needed, context });
        }
        self.sampling.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }
}

/// What an engine reports for a request, in order: tokens, then one `Finished` or
/// one `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The request holds one of the sequences the engine was sized for: no refusal
    /// for want of capacity follows. An engine that admits every request it accepts
    /// may leave this out.
    Admitted,
    /// The prompt's scores (requests with `prompt_logprobs`): entry `i` is for prompt
    /// token `i + 1` (the first token has no context to score it).
    PromptLogprobs(Vec<TokenLogprob>),
    /// A generated token, with its log-probability when the request asked.
    Token(u32, Option<TokenLogprob>),
    Finished(FinishReason),
    Failed(EngineError),
}

/// One token's log-probability given what precedes it, and the most likely tokens at
/// its position with theirs (the most likely first): a position scored as the model
/// scores it (`strata_model::perplexity::score_row`).
pub use strata_model::perplexity::RowScore as TokenLogprob;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the request is invalid: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {tokens} tokens; with max_tokens the request needs {needed}, the context holds {context}")]
    ContextOverflow { tokens: usize, needed: usize, context: usize },
    #[error("no capacity to serve the request: {0}")]
    Unavailable(String),
    /// Every sequence the engine was sized for stayed busy for the queue timeout.
    #[error("the request waited {waited_s}s in the queue and was not admitted ({reason}); retry later")]
    QueueTimeout { waited_s: u64, reason: String },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The model an engine serves, as the API needs it.
#[derive(Clone)]
pub struct ModelCard {
    /// The id clients name in requests (`"model": ...`).
    pub id: String,
    pub context_length: usize,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Arc<ChatTemplate>,
    /// The tokenizer's vocabulary for constrained output, built on first use.
    pub vocabulary: Arc<LazyVocabulary>,
}

impl ModelCard {
    pub fn new(id: String, context_length: usize, tokenizer: Arc<Tokenizer>, chat_template: Arc<ChatTemplate>) -> Self {
        let vocabulary = Arc::new(LazyVocabulary::new(Some(tokenizer.clone())));
        Self { id, context_length, tokenizer, chat_template, vocabulary }
    }
}

/// What set an engine's context limit, for the errors that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSource {
    /// The context the model was trained for.
    Model,
    /// The context the cluster's plan sized every KV cache for (`--context`).
    Plan,
}

/// What an engine was sized for: a request that does not fit is refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens one request may fill, prompt and output together.
    pub context: usize,
    pub context_source: ContextSource,
}

impl Limits {
    /// The model's own context: an engine that sizes its caches per request.
    pub fn of_model(card: &ModelCard) -> Self {
        Self { context: card.context_length, context_source: ContextSource::Model }
    }

    /// The context as an error message names it.
    pub fn describe_context(&self) -> String {
        match self.context_source {
            ContextSource::Model => format!("the model's context of {} tokens", self.context),
            ContextSource::Plan => {
                format!("the context of {} tokens this cluster was planned for (--context)", self.context)
            }
        }
    }
}

/// A source of generations.
pub trait Engine: Send + Sync + 'static {
    fn model(&self) -> &ModelCard;

    /// The limits every request is checked against before it is queued.
    fn limits(&self) -> Limits {
        Limits::of_model(self.model())
    }

    /// Starts a generation. Events arrive on the returned channel; dropping it cancels
    /// the request.
    fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError>;
}

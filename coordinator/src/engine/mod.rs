//! What serves generations: the seam between the user-facing API and whatever
//! computes tokens (a local single-process engine, or a cluster of workers).
//!
//! An engine takes a tokenized request and streams events back on a channel. Dropping
//! the receiver cancels the request: the engine notices and frees its KV caches.

pub mod local;

use std::sync::Arc;

use strata_model::generate::FinishReason;
use strata_model::{ChatTemplate, SamplingParams, Tokenizer};
use tokio::sync::mpsc;

/// A tokenized generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
}

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
        if self.max_tokens == 0 {
            return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
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
    Token(u32),
    Finished(FinishReason),
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the request is invalid: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {tokens} tokens; with max_tokens the request needs {needed}, the context holds {context}")]
    ContextOverflow { tokens: usize, needed: usize, context: usize },
    #[error("no capacity to serve the request: {0}")]
    Unavailable(String),
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
}

/// A source of generations.
pub trait Engine: Send + Sync + 'static {
    fn model(&self) -> &ModelCard;

    /// Starts a generation. Events arrive on the returned channel; dropping it cancels
    /// the request.
    fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError>;
}

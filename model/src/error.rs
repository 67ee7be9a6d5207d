//! The runtime's one error type: every failure a caller may want to tell apart.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open model file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },

    #[error("{path} is not a GGUF file (bad magic or version)")]
    NotGguf { path: PathBuf },

    #[error("{path} is truncated or corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("unsupported architecture `{0}` (supported: llama, qwen2, qwen3, gemma3, qwen3moe, glm4moe)")]
    UnsupportedArchitecture(String),

    #[error("unsupported tensor type: {0}")]
    UnsupportedTensorType(String),

    #[error("metadata key `{key}` is missing or has the wrong type")]
    Metadata { key: String },

    #[error("invalid model: {0}")]
    InvalidModel(String),

    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),

    #[error("no weights file holds {0}")]
    MissingPart(crate::weight_store::Part),

    #[error("layer range {start}..{end} is outside the model's {layers} layers")]
    LayerRange { start: usize, end: usize, layers: usize },

    #[error("sequence {0} is unknown on this stage")]
    UnknownSequence(u64),

    #[error("sequence {seq}: expected position {expected}, got {got}")]
    PositionMismatch { seq: u64, expected: usize, got: usize },

    #[error("sequence {seq}: {tokens} tokens exceed the context length of {context}")]
    ContextOverflow { seq: u64, tokens: usize, context: usize },

    #[error("sequence {seq}: positions 0..{asked} asked, {cached} cached")]
    KvPositions { seq: u64, asked: usize, cached: usize },

    #[error("layers {start}..{end} are not all held by this stage (it holds {held_start}..{held_end})")]
    KvLayers { start: usize, end: usize, held_start: usize, held_end: usize },

    #[error("bad KV cache data: {0}")]
    KvShape(String),

    #[error("bad stage input: {0}")]
    BadInput(String),

    #[error("{path}: {reason}")]
    LogitsFile { path: PathBuf, reason: String },

    #[error("the text is {tokens} tokens; scoring it with a context of {context} needs at least {needed}")]
    TextTooShort { tokens: usize, context: usize, needed: usize },

    #[error("bad sampling parameters: {0}")]
    BadSampling(String),

    #[error("unknown device `{0}` (expected cpu or cuda:N)")]
    UnknownDevice(String),

    #[error("device {0} is not available: {1}")]
    DeviceUnavailable(String, String),

    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    #[error(transparent)]
    ChatTemplate(#[from] crate::chat_template::ChatTemplateError),

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

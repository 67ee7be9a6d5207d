//! Chat templates from `tokenizer.chat_template` (contract stub; being implemented).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template is invalid: {0}")]
    Invalid(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

pub struct ChatTemplate {
    _private: (),
}

impl ChatTemplate {
    /// The file's template, or ChatML when the file has none.
    pub fn from_gguf(_metadata: &HashMap<String, Value>) -> Result<Self, ChatTemplateError> {
        unimplemented!()
    }
    pub fn render(&self, _messages: &[ChatMessage], _add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        unimplemented!()
    }
}

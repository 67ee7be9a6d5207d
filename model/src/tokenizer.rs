//! Tokenizer built from GGUF metadata (contract stub; being implemented).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownToken(u32),
    #[error("tokenization failed: {0}")]
    Failed(String),
}

/// Encodes and decodes text with the vocabulary stored in a GGUF file.
pub struct Tokenizer {
    _private: (),
}

/// The state of an incremental decode: feed it one token at a time.
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl Tokenizer {
    pub fn from_gguf(_metadata: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        Err(TokenizerError::Unsupported("not implemented yet".into()))
    }
    /// Token ids of `text`; special tokens written in the text are recognised, and a
    /// BOS is prepended only where the file asks for it.
    pub fn encode(&self, _text: &str) -> Result<Vec<u32>, TokenizerError> {
        unimplemented!()
    }
    pub fn decode(&self, _ids: &[u32]) -> Result<String, TokenizerError> {
        unimplemented!()
    }
    /// The text that `id` adds to what `stream` has produced so far (None while a
    /// multi-byte character is still incomplete).
    pub fn decode_next(&self, stream: &mut DecodeStream, id: u32) -> Result<Option<String>, TokenizerError> {
        let _ = (&stream.ids, stream.emitted, id);
        unimplemented!()
    }
    pub fn bos_token(&self) -> Option<u32> {
        unimplemented!()
    }
    pub fn is_eos(&self, _id: u32) -> bool {
        unimplemented!()
    }
    pub fn eos_tokens(&self) -> &[u32] {
        unimplemented!()
    }
    pub fn vocab_size(&self) -> usize {
        unimplemented!()
    }
    /// The text of one token (special tokens included), for display and stop checks.
    pub fn token_text(&self, _id: u32) -> Option<&str> {
        unimplemented!()
    }
}

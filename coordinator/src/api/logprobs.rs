//! Log-probabilities of generated tokens as the chat API shows them (`logprobs:
//! true`, `top_logprobs: N`): per token its text, bytes and log-probability under the
//! model's distribution, with the N most likely tokens at its position. The legacy
//! shape of `/v1/completions` is built in `completions`.

use serde::Serialize;
use strata_model::Tokenizer;

use super::errors::ApiError;
use super::generation::SampledLogprob;
use super::params::Fields;
use crate::engine::MAX_TOP_LOGPROBS;

#[derive(Serialize, Debug, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// OpenAI's field for refusals, which strata never makes.
    pub refusal: Option<()>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct ChatTokenLogprob {
    #[serde(flatten)]
    pub token: TokenEntry,
    pub top_logprobs: Vec<TokenEntry>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct TokenEntry {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// `logprobs` and `top_logprobs` of a chat request: how many most likely tokens
/// each generated token reports, or `None` when no logprobs are asked for.
pub fn chat_request(fields: &Fields) -> Result<Option<usize>, ApiError> {
    let wanted = fields.get::<bool>("logprobs")?.unwrap_or(false);
    let top = top_count(fields, "top_logprobs")?;
    match (wanted, top) {
        (false, Some(_)) => Err(ApiError::invalid("top_logprobs", "top_logprobs needs `logprobs: true`")),
        (false, None) => Ok(None),
        (true, top) => Ok(Some(top.unwrap_or(0))),
    }
}

/// The field `name`: how many most likely tokens a position reports (0 to
/// [`MAX_TOP_LOGPROBS`]), chat's `top_logprobs` or the legacy `logprobs`.
pub fn top_count(fields: &Fields, name: &str) -> Result<Option<usize>, ApiError> {
    match fields.get::<i64>(name)? {
        None => Ok(None),
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid(name, format!("{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"))),
    }
}

/// A token as logprobs name it: its text, or for a token that is part of a
/// character, its bytes as `bytes:\xNN...` (the text is in the `bytes` of the
/// tokens together).
pub fn token_string(tokenizer: &Tokenizer, token: u32) -> String {
    let bytes = tokenizer.token_bytes(token).unwrap_or_default();
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => bytes.iter().fold(String::from("bytes:"), |mut s, b| {
            s.push_str(&format!("\\x{b:02x}"));
            s
        }),
    }
}

fn entry(tokenizer: &Tokenizer, token: u32, logprob: f64) -> TokenEntry {
    TokenEntry {
        token: token_string(tokenizer, token),
        logprob,
        bytes: tokenizer.token_bytes(token).unwrap_or_default().to_vec(),
    }
}

/// The chat `logprobs` object of `tokens`, with `top` most likely tokens each.
pub fn chat(tokenizer: &Tokenizer, tokens: &[SampledLogprob], top: usize) -> ChatLogprobs {
    let content = tokens
        .iter()
        .map(|t| ChatTokenLogprob {
            token: entry(tokenizer, t.token, t.logprob.logprob),
            top_logprobs: t.logprob.top.iter().take(top).map(|&(id, lp)| entry(tokenizer, id, lp)).collect(),
        })
        .collect();
    ChatLogprobs { content, refusal: None }
}

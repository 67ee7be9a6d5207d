//! `POST /v1/completions`: continue a raw prompt.
//!
//! The prompt is a string, an array of token ids, or a one-element array of either.
//!
//! `echo` puts the prompt before the generated text. With `logprobs: N` (0 to 20) and
//! `max_tokens: 0` it scores the prompt, as evaluation harnesses and `strata
//! perplexity --coordinator` ask: each prompt token's log-probability given the ones
//! before it, and the `N` most likely tokens at each position, computed on the
//! pipeline's last stage. `return_tokens_as_token_ids` (vLLM's extension) names tokens
//! `token_id:ID` instead of by text, which is unambiguous. Without `echo`, `logprobs: N`
//! reports each generated token's log-probability and the `N` most likely tokens at
//! its position, streamed too.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use strata_model::Tokenizer;

use super::errors::{ApiError, ApiJson};
use crate::engine::TokenLogprob;
use super::generation::{Collected, Finish, SampledLogprob};
use super::logprobs;
use super::params::{self, Fields};
use super::sse::{self, Chunks, Usage};
use super::{begin, Begun, off_reactor, start, start_choices, to_json, unix_now, AppState};

/// OpenAI's default for this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;

/// A prompt as the request gave it.
#[derive(Debug, PartialEq)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

fn prompt(fields: &Fields) -> Result<Prompt, ApiError> {
    let value =
        fields.raw("prompt").ok_or_else(|| ApiError::invalid("prompt", "missing required parameter `prompt`"))?;
    let shape = || {
        ApiError::invalid("prompt", "prompt must be a string, an array of token ids, or an array holding one of those")
    };
    match value {
        Value::String(text) => Ok(Prompt::Text(text.clone())),
        Value::Array(items) => match items.as_slice() {
            [] => Err(ApiError::invalid("prompt", "the prompt is empty")),
            [Value::String(text)] => Ok(Prompt::Text(text.clone())),
            [Value::Array(ids)] => token_ids(ids).map(Prompt::Tokens),
            [Value::String(_) | Value::Array(_), ..] => {
                Err(ApiError::unsupported("prompt", "only one prompt per request is supported"))
            }
            ids => token_ids(ids).map(Prompt::Tokens).map_err(|_| shape()),
        },
        _ => Err(shape()),
    }
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|item| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| ApiError::invalid("prompt", format!("{item} is not a token id")))
        })
        .collect()
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    /// Borrowed in a stream's chunk, owned in a whole answer.
    text: Cow<'a, str>,
    logprobs: Option<Logprobs>,
    finish_reason: Option<Finish>,
}

/// OpenAI's legacy completion logprobs: one entry per token; the first token has no
/// context, so its logprob and top entries are null.
#[derive(Serialize, Debug, PartialEq)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f64>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    /// Characters of text its tokens name.
    fn text_length(&self) -> usize {
        self.tokens.iter().map(|n| n.chars().count()).sum()
    }

    /// `more`'s entries after these (its offsets already counted from their end).
    fn append(&mut self, more: Logprobs) {
        self.tokens.extend(more.tokens);
        self.token_logprobs.extend(more.token_logprobs);
        self.top_logprobs.extend(more.top_logprobs);
        self.text_offset.extend(more.text_offset);
    }
}

/// What a completion request asks besides the continuation: its prompt echoed (and
/// scored), and logprobs of what it generates.
struct Extras {
    /// `echo`, and with `logprobs` the top tokens per scored prompt position.
    echo: Option<Option<usize>>,
    /// `logprobs`: the top tokens per generated token.
    generated_logprobs: Option<usize>,
    token_ids: bool,
}

impl Extras {
    /// Top tokens per position when the prompt is scored.
    fn scoring(&self) -> Option<usize> {
        self.echo.flatten()
    }
}

fn extras(fields: &Fields, stream: bool) -> Result<Extras, ApiError> {
    let logprobs = logprobs::top_count(fields, "logprobs")?;
    let echo = fields.get::<bool>("echo")?.unwrap_or(false);
    if echo && stream {
        return Err(ApiError::unsupported("echo", "echo is not supported with stream"));
    }
    let token_ids = fields.get::<bool>("return_tokens_as_token_ids")?.unwrap_or(false);
    Ok(Extras {
        echo: echo.then_some(logprobs),
        generated_logprobs: logprobs,
        token_ids,
    })
}

/// How a token is named in the legacy logprobs: its text (see
/// [`logprobs::token_string`]), or `token_id:ID`.
fn token_name(tokenizer: &strata_model::Tokenizer, id: u32, token_ids: bool) -> String {
    if token_ids {
        format!("token_id:{id}")
    } else {
        logprobs::token_string(tokenizer, id)
    }
}

/// Where each of `names` starts (in characters), the first at `start`.
fn text_offsets(names: &[String], start: usize) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(names.len());
    let mut offset = start;
    for n in names {
        offsets.push(offset);
        offset += n.chars().count();
    }
    offsets
}

/// The `top` most likely tokens of a position, by name.
fn top_map(
    tokenizer: &strata_model::Tokenizer,
    score: &TokenLogprob,
    top: usize,
    token_ids: bool,
) -> Map<String, Value> {
    score.top.iter().take(top).map(|&(id, lp)| (token_name(tokenizer, id, token_ids), Value::from(lp))).collect()
}

/// The legacy `logprobs` object of generated tokens, their text offsets counted
/// from `start`.
fn generated_logprobs(
    tokenizer: &strata_model::Tokenizer,
    tokens: &[SampledLogprob],
    top: usize,
    token_ids: bool,
    start: usize,
) -> Logprobs {
    let names: Vec<String> = tokens.iter().map(|t| token_name(tokenizer, t.token, token_ids)).collect();
    let text_offset = text_offsets(&names, start);
    Logprobs {
        tokens: names,
        token_logprobs: tokens.iter().map(|t| Some(t.logprob.logprob)).collect(),
        top_logprobs: tokens.iter().map(|t| Some(top_map(tokenizer, &t.logprob, top, token_ids))).collect(),
        text_offset,
    }
}

/// The prompt's `logprobs` object from its tokens and their scores (`scores[i]` is for
/// token `i + 1`), with `top` entries per position.
fn prompt_logprobs(
    tokenizer: &strata_model::Tokenizer,
    tokens: &[u32],
    scores: &[TokenLogprob],
    top: usize,
    token_ids: bool,
) -> Logprobs {
    let names: Vec<String> = tokens.iter().map(|&id| token_name(tokenizer, id, token_ids)).collect();
    let text_offset = text_offsets(&names, 0);
    let token_logprobs = std::iter::once(None).chain(scores.iter().map(|s| Some(s.logprob))).collect();
    let top_logprobs =
        std::iter::once(None).chain(scores.iter().map(|s| Some(top_map(tokenizer, s, top, token_ids)))).collect();
    Logprobs { tokens: names, token_logprobs, top_logprobs, text_offset }
}

#[derive(Serialize)]
struct UsageChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [(); 0],
    usage: Usage,
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    /// Top tokens per generated token, when the request asked for logprobs.
    logprobs: Option<usize>,
    token_ids: bool,
    /// Where the next chunk's tokens start in the completion's text (characters).
    offset: Cell<usize>,
    /// The choice's place among the request's (`n`).
    index: u32,
}

impl CompletionChunks {
    fn chunk(&self, text: &str, finish: Option<Finish>, tokens: &[SampledLogprob]) -> String {
        let logprobs = self.logprobs.map(|top| {
            let logprobs = generated_logprobs(&self.tokenizer, tokens, top, self.token_ids, self.offset.get());
            self.offset.set(self.offset.get() + logprobs.text_length());
            logprobs
        });
        let chunk = Completion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: vec![Choice { index: self.index, text: text.into(), logprobs, finish_reason: finish }],
            usage: None,
        };
        to_json(&chunk)
    }
}

impl Chunks for CompletionChunks {
    fn opening(&self) -> Option<String> {
        None
    }

    fn text(&self, text: &str, logprobs: &[SampledLogprob]) -> String {
        self.chunk(text, None, logprobs)
    }

    fn finish(&self, text: &str, finish: Finish, logprobs: &[SampledLogprob]) -> String {
        self.chunk(text, Some(finish), logprobs)
    }

    fn usage(&self, usage: Usage) -> String {
        let chunk = UsageChunk {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: [],
            usage,
        };
        to_json(&chunk)
    }
}

#[tracing::instrument(name = "completion", skip_all, fields(request_id, model))]
pub(super) async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    let Begun { request_id, fields, card, options } = begin(&state, body, &["echo", "logprobs"]).await?;
    let extras = extras(&fields, options.stream)?;
    let scoring = extras.scoring();
    // A scored prompt may generate nothing: max_tokens 0 asks for that (what
    // evaluation harnesses send).
    let requested = params::max_tokens_from(&fields, "max_tokens", if scoring.is_some() { 0 } else { 1 })?;
    let prompt = prompt(&fields)?;
    let echoed = extras.echo.is_some();
    let (prompt_tokens, prompt_text) = off_reactor(&card, move |card| match prompt {
        Prompt::Text(text) => card
            .tokenizer
            .encode(&text)
            .map(|ids| (ids, text))
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}"))),
        Prompt::Tokens(ids) => {
            // Only an echo shows the prompt's text.
            let text = if echoed { card.tokenizer.decode(&ids).unwrap_or_default() } else { String::new() };
            Ok((ids, text))
        }
    })
    .await?;
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let vocab = card.tokenizer.vocab_size();
    if let Some(bad) = prompt_tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let max_tokens = params::fit_in_context(
        prompt_tokens.len(),
        requested.map(|n| ("max_tokens", n)),
        DEFAULT_MAX_TOKENS,
        &state.engine.limits(),
        "prompt",
    )?;
    let scored_tokens = scoring.map(|_| prompt_tokens.clone());
    if options.choices > 1 && echoed {
        return Err(ApiError::unsupported("echo", "echo cannot be combined with n > 1"));
    }
    let mut generations = if options.choices > 1 {
        start_choices(&state, &request_id, &prompt_tokens, max_tokens, &options, extras.generated_logprobs)?
    } else {
        let prompt_logprobs = scoring.map(|n| n.max(1));
        vec![start(&state, &request_id, prompt_tokens, max_tokens, &options, prompt_logprobs, extras.generated_logprobs)?]
    };
    let id = format!("cmpl-{request_id}");
    let created = unix_now();
    let chunks_of = |index: u32| CompletionChunks {
        id: id.clone(),
        created,
        model: card.id.clone(),
        tokenizer: card.tokenizer.clone(),
        logprobs: extras.generated_logprobs,
        token_ids: extras.token_ids,
        offset: Cell::new(0),
        index,
    };
    if options.stream {
        return sse::choices_response(generations, chunks_of, options.include_usage).await;
    }
    let mut choices = Vec::with_capacity(generations.len());
    for (index, generation) in generations.iter_mut().enumerate() {
        let Collected { mut text, finish, logprobs: sampled } = generation.collect().await?;
        let mut logprobs = extras
            .generated_logprobs
            .map(|top| generated_logprobs(&card.tokenizer, &sampled, top, extras.token_ids, 0));
        if extras.echo.is_some() {
            text.insert_str(0, &prompt_text);
            if let (Some(top), Some(tokens)) = (scoring, &scored_tokens) {
                let scores = generation
                    .take_prompt_logprobs()
                    .ok_or_else(|| ApiError::internal("the engine finished without the prompt's scores"))?;
                let mut echoed = prompt_logprobs(&card.tokenizer, tokens, &scores, top, extras.token_ids);
                // The generated tokens' entries follow the prompt's, their offsets in
                // the echoed text.
                let start = echoed.text_length();
                echoed.append(generated_logprobs(&card.tokenizer, &sampled, top, extras.token_ids, start));
                logprobs = Some(echoed);
            }
        }
        choices.push(Choice { index: index as u32, text: text.into(), logprobs, finish_reason: Some(finish) });
    }
    let body = Completion {
        id: &id,
        object: "text_completion",
        created,
        model: &card.id,
        choices,
        usage: Some(Usage::of_all(&generations)),
    };
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn prompt_of(value: Value) -> Result<Prompt, ApiError> {
        let mut map = Map::new();
        map.insert("prompt".into(), value);
        prompt(&Fields::new(map))
    }

    #[test]
    fn prompts_come_in_four_shapes() {
        assert_eq!(prompt_of(json!("hi")).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(prompt_of(json!(["hi"])).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(prompt_of(json!([1, 2, 3])).unwrap(), Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(prompt_of(json!([[4, 5]])).unwrap(), Prompt::Tokens(vec![4, 5]));
        for bad in
            [json!(["a", "b"]), json!([]), json!(5), json!([1, -1]), json!([1, "a"]), json!([[1, 2.5]]), json!({})]
        {
            let err = prompt_of(bad.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("prompt"), "{bad}");
        }
    }
}

//! `POST /v1/completions`: continue a raw prompt.
//!
//! The prompt is a string, an array of token ids, or a one-element array of either.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::{ApiError, ApiJson};
use super::generation::Finish;
use super::params::{self, Fields};
use super::sse::{self, Chunks, Usage};
use super::{begin, Begun, off_reactor, start, to_json, unix_now, AppState};

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
    choices: [Choice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<Finish>,
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
}

impl CompletionChunks {
    fn chunk(&self, text: &str, finish: Option<Finish>) -> String {
        let chunk = Completion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: [Choice { index: 0, text, logprobs: None, finish_reason: finish }],
            usage: None,
        };
        to_json(&chunk)
    }
}

impl Chunks for CompletionChunks {
    fn opening(&self) -> Option<String> {
        None
    }

    fn text(&self, text: &str) -> String {
        self.chunk(text, None)
    }

    fn finish(&self, text: &str, finish: Finish) -> String {
        self.chunk(text, Some(finish))
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
    let Begun { request_id, fields, card, options } = begin(&state, body)?;
    let requested = params::max_tokens(&fields, "max_tokens")?;
    let prompt = prompt(&fields)?;
    let prompt_tokens = off_reactor(&card, move |card| match prompt {
        Prompt::Text(text) => card
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}"))),
        Prompt::Tokens(ids) => Ok(ids),
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
    let mut generation = start(state.engine.as_ref(), &request_id, prompt_tokens, max_tokens, &options)?;
    let id = format!("cmpl-{request_id}");
    let created = unix_now();
    if options.stream {
        // Headers wait for admission: a refusal then still gets its own status.
        generation.admitted().await?;
        let chunks = CompletionChunks { id, created, model: card.id.clone() };
        return Ok(sse::response(generation, chunks, options.include_usage));
    }
    let (text, finish) = generation.collect().await?;
    let body = Completion {
        id: &id,
        object: "text_completion",
        created,
        model: &card.id,
        choices: [Choice { index: 0, text: &text, logprobs: None, finish_reason: Some(finish) }],
        usage: Some(Usage::of(&generation)),
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

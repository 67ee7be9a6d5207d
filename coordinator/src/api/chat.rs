//! `POST /v1/chat/completions`: answer a conversation.
//!
//! The messages are rendered with the model's chat template, opening the
//! assistant's turn, and tokenized with the special tokens the template writes
//! recognised as such.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use strata_model::chat_template::Role;
use strata_model::{ChatMessage, Tokenizer};

use super::errors::{ApiError, ApiJson};
use super::generation::{Collected, Finish, SampledLogprob};
use super::logprobs::{self, ChatLogprobs};
use super::params::{self, Fields};
use super::sse::{self, Chunks, Usage};
use super::{begin, Begun, off_reactor, start, to_json, unix_now, AppState};

fn messages(fields: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match fields.raw("messages") {
        None => return Err(ApiError::invalid("messages", "missing required parameter `messages`")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("messages", "messages must hold at least one message"))
        }
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("messages", "messages must be an array of messages")),
    };
    items.iter().enumerate().map(|(i, item)| message(i, item)).collect()
}

fn message(i: usize, item: &Value) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(item) = item else {
        return Err(ApiError::invalid(format!("messages[{i}]"), format!("messages[{i}] must be an object")));
    };
    let role = match item.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        Some(other) => {
            return Err(ApiError::invalid(
                at("role"),
                format!("unknown role `{other}` (expected system, developer, user, assistant or tool)"),
            ))
        }
        None => return Err(ApiError::invalid(at("role"), format!("{} must be a string", at("role")))),
    };
    let content = match item.get("content") {
        // Assistant turns that only called tools have no content.
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .map(|part| {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(ApiError::unsupported(&at("content"), "only text content parts are supported")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            texts.join("\n")
        }
        Some(_) => {
            return Err(ApiError::invalid(
                at("content"),
                format!("{} must be a string or an array of parts", at("content")),
            ))
        }
    };
    Ok(ChatMessage::new(role, content))
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Finish,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<Finish>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    /// Most likely tokens per generated token, when the request asked for logprobs.
    logprobs: Option<usize>,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Usage>) -> String {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage,
        };
        to_json(&chunk)
    }

    fn choice<'a>(&self, delta: Delta<'a>, finish: Option<Finish>, tokens: &[SampledLogprob]) -> Vec<ChunkChoice<'a>> {
        let logprobs = self.logprobs.map(|top| logprobs::chat(&self.tokenizer, tokens, top));
        vec![ChunkChoice { index: 0, delta, logprobs, finish_reason: finish }]
    }
}

impl Chunks for ChatChunks {
    fn opening(&self) -> Option<String> {
        let delta = Delta { role: Some("assistant"), content: Some("") };
        Some(self.chunk(self.choice(delta, None, &[]), None))
    }

    fn text(&self, text: &str, logprobs: &[SampledLogprob]) -> String {
        self.chunk(self.choice(Delta { role: None, content: Some(text) }, None, logprobs), None)
    }

    fn finish(&self, text: &str, finish: Finish, logprobs: &[SampledLogprob]) -> String {
        let delta = Delta { role: None, content: (!text.is_empty()).then_some(text) };
        self.chunk(self.choice(delta, Some(finish), logprobs), None)
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}

#[tracing::instrument(name = "chat_completion", skip_all, fields(request_id, model))]
pub(super) async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    let Begun { request_id, fields, card, options } = begin(&state, body, &["logprobs", "top_logprobs"]).await?;
    let top_logprobs = logprobs::chat_request(&fields)?;
    // `max_completion_tokens` replaced `max_tokens` in OpenAI's chat API; the newer wins.
    let requested = match params::max_tokens(&fields, "max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => params::max_tokens(&fields, "max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let messages = messages(&fields)?;
    let prompt_tokens = off_reactor(&card, move |card| {
        let text = card
            .chat_template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid("messages", format!("cannot apply the chat template: {e}")))?;
        card.tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize the conversation: {e}")))
    })
    .await?;
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid("messages", "the conversation renders to an empty prompt"));
    }
    // Without a limit, the answer may fill the context.
    let max_tokens =
        params::fit_in_context(prompt_tokens.len(), requested, usize::MAX, &state.engine.limits(), "messages")?;
    let mut generation = start(&state, &request_id, prompt_tokens, max_tokens, &options, None, top_logprobs)?;
    let id = format!("chatcmpl-{request_id}");
    let created = unix_now();
    if options.stream {
        // Headers wait for admission: a refusal then still gets its own status.
        generation.admitted().await?;
        let chunks = ChatChunks {
            id,
            created,
            model: card.id.clone(),
            tokenizer: card.tokenizer.clone(),
            logprobs: top_logprobs,
        };
        return Ok(sse::response(generation, chunks, options.include_usage));
    }
    let Collected { text, finish, logprobs: sampled } = generation.collect().await?;
    let body = ChatCompletion {
        id: &id,
        object: "chat.completion",
        created,
        model: &card.id,
        choices: [Choice {
            index: 0,
            message: Message { role: "assistant", content: &text },
            logprobs: top_logprobs.map(|top| logprobs::chat(&card.tokenizer, &sampled, top)),
            finish_reason: finish,
        }],
        usage: Usage::of(&generation),
    };
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(messages_value: Value) -> Result<Vec<ChatMessage>, ApiError> {
        let mut map = Map::new();
        map.insert("messages".into(), messages_value);
        messages(&Fields::new(map))
    }

    #[test]
    fn messages_are_read_with_text_parts_and_openai_roles() {
        let got = parse(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "x"},
        ]))
        .unwrap();
        assert_eq!(
            got,
            [
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "a\nb"),
                ChatMessage::new(Role::Assistant, ""),
                ChatMessage::new(Role::Tool, "42"),
            ]
        );
    }

    #[test]
    fn bad_messages_name_the_field() {
        for (value, param) in [
            (json!([]), "messages"),
            (json!("hi"), "messages"),
            (json!([{"role": "user", "content": "a"}, 3]), "messages[1]"),
            (json!([{"role": "robot", "content": "a"}]), "messages[0].role"),
            (json!([{"content": "a"}]), "messages[0].role"),
            (json!([{"role": "user", "content": 5}]), "messages[0].content"),
            (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "messages[0].content"),
        ] {
            let err = parse(value.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{value}: {err:?}");
        }
    }
}

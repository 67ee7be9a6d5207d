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
use super::generation::{Collected, Finish, Generation, SampledLogprob};
use super::logprobs::{self, ChatLogprobs};
use super::params::{self, Fields};
use super::sse::{self, Chunks, Usage};
use super::tools::{self, CallFormat, Tools};
use super::{begin, Begun, off_reactor, start, start_choices, to_json, unix_now, AppState};
use crate::engine::ModelCard;

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
    let mut message = ChatMessage::new(role, content);
    if role == Role::Assistant {
        if let Some(calls) = item.get("tool_calls").filter(|c| !c.is_null()) {
            message.tool_calls = tools::history_calls(i, calls)?;
        }
    }
    if role == Role::Tool {
        message.tool_call_id = match item.get("tool_call_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => {
                return Err(ApiError::invalid(at("tool_call_id"), format!("{} must be a string", at("tool_call_id"))))
            }
        };
    }
    Ok(message)
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice<'a>>,
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
    /// `null` when the answer is only tool calls.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    /// Most likely tokens per generated token, when the request asked for logprobs.
    logprobs: Option<usize>,
    /// The choice's place among the request's (`n`).
    index: u32,
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
        vec![ChunkChoice { index: self.index, delta, logprobs, finish_reason: finish }]
    }
}

impl Chunks for ChatChunks {
    fn opening(&self) -> Option<String> {
        let delta = Delta { role: Some("assistant"), content: Some(""), ..Delta::default() };
        Some(self.chunk(self.choice(delta, None, &[]), None))
    }

    fn text(&self, text: &str, logprobs: &[SampledLogprob]) -> String {
        self.chunk(self.choice(Delta { content: Some(text), ..Delta::default() }, None, logprobs), None)
    }

    fn finish(&self, text: &str, finish: Finish, logprobs: &[SampledLogprob]) -> String {
        let delta = Delta { content: (!text.is_empty()).then_some(text), ..Delta::default() };
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
    let Begun { request_id, fields, card, mut options } =
        begin(&state, body, &["logprobs", "top_logprobs", "tools"]).await?;
    let top_logprobs = logprobs::chat_request(&fields)?;
    let tools = tools::tools(&fields)?;
    if let Some(tools) = &tools {
        if options.constraint.is_some() {
            return Err(ApiError::unsupported("response_format", "response_format cannot be combined with tools"));
        }
        if top_logprobs.is_some() {
            return Err(ApiError::unsupported("logprobs", "logprobs cannot be combined with tools"));
        }
        if options.choices > 1 {
            return Err(ApiError::unsupported("n", "n > 1 cannot be combined with tools"));
        }
        options.constraint = Some(tools_grammar(&card, tools).await?);
    }
    // `max_completion_tokens` replaced `max_tokens` in OpenAI's chat API; the newer wins.
    let requested = match params::max_tokens(&fields, "max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => params::max_tokens(&fields, "max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let messages = messages(&fields)?;
    tools::check_history(&messages)?;
    let format = tools.as_ref().map(|t| CallFormat::of(&card.chat_template, &t.choice));
    if format.is_some_and(|f| f != CallFormat::Json) {
        // The model's own format, free: no grammar.
        options.constraint = None;
    }
    let rendering = tools.clone();
    let prompt_tokens = off_reactor(&card, move |card| {
        let template = &card.chat_template;
        let rendered = match (&rendering, format) {
            (Some(tools), Some(CallFormat::Json)) => {
                template.render(&tools::json_protocol_messages(&messages, tools), true)
            }
            (Some(tools), Some(_)) => template.render_with_tools(&messages, Some(&tools.list), true),
            _ => template.render(&messages, true),
        };
        let text =
            rendered.map_err(|e| ApiError::invalid("messages", format!("cannot apply the chat template: {e}")))?;
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
    let id = format!("chatcmpl-{request_id}");
    let created = unix_now();
    let chunks_of = |index: u32| ChatChunks {
        id: id.clone(),
        created,
        model: card.id.clone(),
        tokenizer: card.tokenizer.clone(),
        logprobs: top_logprobs,
        index,
    };
    if let Some(format) = format {
        // Calls are known only once the answer is whole: it is read, then sent.
        let mut generation = start(&state, &request_id, prompt_tokens, max_tokens, &options, None, None)?;
        return answer_with_tools(&mut generation, format, &request_id, &chunks_of(0), &options).await;
    }
    let mut generations = start_choices(&state, &request_id, &prompt_tokens, max_tokens, &options, top_logprobs)?;
    if options.stream {
        return sse::choices_response(generations, chunks_of, options.include_usage).await;
    }
    let mut collected = Vec::with_capacity(generations.len());
    for generation in &mut generations {
        collected.push(generation.collect().await?);
    }
    let choices = collected
        .iter()
        .enumerate()
        .map(|(i, Collected { text, finish, logprobs: sampled })| Choice {
            index: i as u32,
            message: Message { role: "assistant", content: Some(text), tool_calls: Vec::new() },
            logprobs: top_logprobs.map(|top| logprobs::chat(&card.tokenizer, sampled, top)),
            finish_reason: *finish,
        })
        .collect();
    let body = ChatCompletion {
        id: &id,
        object: "chat.completion",
        created,
        model: &card.id,
        choices,
        usage: Usage::of_all(&generations),
    };
    Ok(Json(body).into_response())
}

/// The grammar of a tools request in strata's JSON protocol, checked against the
/// vocabulary (a function's `parameters` may be a schema that does not compile).
async fn tools_grammar(card: &ModelCard, tools: &Tools) -> Result<strata_grammar::Grammar, ApiError> {
    let grammar = tools::json_protocol_grammar(tools)?;
    let checked = grammar.clone();
    off_reactor(card, move |card| {
        card.vocabulary
            .get()
            .and_then(|v| v.check(&checked))
            .map_err(|e| ApiError::invalid("tools", format!("a function's parameters do not compile: {e}")))
    })
    .await?;
    Ok(grammar)
}

/// The answer of a request with tools: read whole, then sent as one body or as
/// a stream of OpenAI-style deltas (the calls' chunks, then the finish).
async fn answer_with_tools(
    generation: &mut Generation,
    format: CallFormat,
    request_id: &str,
    chunks: &ChatChunks,
    options: &params::Options,
) -> Result<Response, ApiError> {
    let Collected { text, finish, .. } = generation.collect().await?;
    let answer = tools::parse(format, &text);
    let calls: Vec<Value> = answer
        .calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            serde_json::json!({
                "id": format!("call_{request_id}_{i}"),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            })
        })
        .collect();
    let finish = if calls.is_empty() { finish } else { Finish::ToolCalls };
    let usage = Usage::of(generation);
    if options.stream {
        let mut stream = Vec::new();
        stream.extend(chunks.opening());
        if let Some(content) = answer.content.as_deref() {
            stream.push(chunks.text(content, &[]));
        }
        for (i, call) in calls.iter().enumerate() {
            let mut call = call.clone();
            call["index"] = Value::from(i);
            let delta = Delta { tool_calls: vec![call], ..Delta::default() };
            stream.push(chunks.chunk(chunks.choice(delta, None, &[]), None));
        }
        stream.push(chunks.chunk(chunks.choice(Delta::default(), Some(finish), &[]), None));
        if options.include_usage {
            stream.push(chunks.usage(usage));
        }
        return Ok(sse::prepared(stream));
    }
    let body = ChatCompletion {
        id: &chunks.id,
        object: "chat.completion",
        created: chunks.created,
        model: &chunks.model,
        choices: vec![Choice {
            index: 0,
            message: Message { role: "assistant", content: answer.content.as_deref(), tool_calls: calls },
            logprobs: None,
            finish_reason: finish,
        }],
        usage,
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
                ChatMessage { tool_call_id: Some("x".into()), ..ChatMessage::new(Role::Tool, "42") },
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

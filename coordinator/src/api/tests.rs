//! The API end to end over a local engine on a tiny synthetic model, and over a fake
//! engine for the failures a real one will not produce on demand.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use strata_model::chat_template::Role;
use strata_model::stage::StageOptions;
use strata_model::synthetic::SyntheticModel;
use strata_model::{ChatMessage, ChatTemplate, Device, Generator, ModelFile, SamplingParams, Tokenizer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower::ServiceExt;

use super::*;
use crate::engine::local::tests::wait_for;
use crate::engine::local::LocalEngine;
use crate::engine::{ContextSource, EngineError, GenerateEvent, Limits};

const MODEL: &str = "tiny";

struct Harness {
    _dir: tempfile::TempDir,
    file: ModelFile,
    engine: Arc<LocalEngine>,
    router: Router,
}

fn harness_with(spec: SyntheticModel) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let file = ModelFile::open(spec.write_to(dir.path()).unwrap()).unwrap();
    let engine = Arc::new(LocalEngine::start(&file, &Device::Cpu, MODEL.into()).unwrap());
    let router = router(engine.clone(), None, ApiKeys::default());
    Harness { _dir: dir, file, engine, router }
}

fn harness() -> Harness {
    harness_with(SyntheticModel::tiny())
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not json ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        assert!(self.content_type.starts_with("text/event-stream"), "{}", self.content_type);
        self.body
            .split("\n\n")
            .filter_map(|event| {
                let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                (!data.is_empty()).then(|| data.join("\n"))
            })
            .collect()
    }

    /// The JSON chunks of a stream, checked to end with `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        let mut events = self.events();
        assert_eq!(events.pop().as_deref(), Some("[DONE]"), "{}", self.body);
        events.iter().map(|e| serde_json::from_str(e).unwrap()).collect()
    }

    /// Checks the body is an OpenAI error with this status and param.
    fn assert_error(&self, status: StatusCode, param: Option<&str>) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(self.content_type.starts_with("application/json"), "{}", self.content_type);
        let body = self.json();
        let error = &body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        let kind = match status {
            StatusCode::TOO_MANY_REQUESTS => "requests",
            _ if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        assert_eq!(error["type"], kind, "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
        assert!(error.as_object().unwrap().contains_key("code"), "{body}");
        error.clone()
    }
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type =
        response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply { status, content_type, body: String::from_utf8(bytes.to_vec()).unwrap() }
}

async fn post(router: &Router, uri: &str, body: Value) -> Reply {
    post_raw(router, uri, &body.to_string()).await
}

async fn post_raw(router: &Router, uri: &str, body: &str) -> Reply {
    let request = Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_owned()));
    send(router, request.unwrap()).await
}

async fn get(router: &Router, uri: &str) -> Reply {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

/// What greedy decoding gives in a single-sequence loop, as text the API would show.
fn reference(file: &ModelFile, prompt: &[u32], max_tokens: usize) -> (String, usize, &'static str) {
    let mut generator = Generator::load(file, &Device::Cpu, StageOptions::default()).unwrap();
    let generation = generator.generate(prompt, max_tokens, &SamplingParams::greedy(), |_, _| true).unwrap();
    let text = generator.tokenizer().decode_skipping_special(&generation.tokens).unwrap();
    let finish = match generation.finish {
        strata_model::generate::FinishReason::Length => "length",
        _ => "stop",
    };
    (text, generation.tokens.len(), finish)
}

fn tokenizer(file: &ModelFile) -> Tokenizer {
    Tokenizer::from_gguf(file.metadata()).unwrap()
}

fn chat_prompt(file: &ModelFile, content: &str) -> Vec<u32> {
    let template = ChatTemplate::from_gguf(file.metadata()).unwrap();
    let text = template.render(&[ChatMessage::new(Role::User, content)], true).unwrap();
    tokenizer(file).encode(&text).unwrap()
}

fn stream_text(chunks: &[Value], field: impl Fn(&Value) -> Option<&str>) -> String {
    chunks.iter().filter_map(|c| c["choices"].get(0).and_then(&field)).collect()
}

#[tokio::test]
async fn a_completion_matches_greedy_decoding() {
    let h = harness();
    let prompt = tokenizer(&h.file).encode("hello there").unwrap();
    let (text, tokens, finish) = reference(&h.file, &prompt, 12);
    let reply = post(
        &h.router,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hello there", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["text"], text.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], finish);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": tokens, "total_tokens": prompt.len() + tokens})
    );
}

#[tokio::test]
async fn every_prompt_shape_gives_the_same_completion() {
    let h = harness();
    let ids = tokenizer(&h.file).encode("the cat").unwrap();
    let mut texts = Vec::new();
    for prompt in [json!("the cat"), json!(["the cat"]), json!(ids), json!([ids])] {
        let reply = post(
            &h.router,
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        texts.push(reply.json()["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "{texts:?}");
}

#[tokio::test]
async fn completions_default_to_sixteen_tokens() {
    let h = harness();
    let reply = post(&h.router, "/v1/completions", json!({"model": MODEL, "prompt": [1], "temperature": 0})).await;
    assert_eq!(reply.json()["usage"]["completion_tokens"], 16, "{}", reply.body);
}

#[tokio::test]
async fn a_streamed_completion_sends_the_same_text_then_done() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 12, "temperature": 0});
    let whole = post(&h.router, "/v1/completions", request.clone()).await.json();
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let reply = post(&h.router, "/v1/completions", streaming).await;
    assert_eq!(reply.status, StatusCode::OK);
    let chunks = reply.chunks();
    assert!(chunks.len() >= 2, "{}", reply.body);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["model"], MODEL);
        assert!(chunk["id"].as_str().unwrap().starts_with("cmpl-"));
    }
    assert_eq!(stream_text(&chunks, |c| c["text"].as_str()), whole["choices"][0]["text"].as_str().unwrap());
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert!(rest.iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));

    streaming = request;
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let chunks = post(&h.router, "/v1/completions", streaming).await.chunks();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
}

#[tokio::test]
async fn a_chat_completion_renders_the_template_and_matches_greedy_decoding() {
    let h = harness();
    let prompt = chat_prompt(&h.file, "hi there");
    let (text, tokens, finish) = reference(&h.file, &prompt, 10);
    let request = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
        "max_completion_tokens": 10, "temperature": 0
    });
    let reply = post(&h.router, "/v1/chat/completions", request.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": text}));
    assert_eq!(body["choices"][0]["finish_reason"], finish);
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(body["usage"]["completion_tokens"], tokens);
    // `max_tokens` works too.
    let mut older = request.clone();
    older.as_object_mut().unwrap().remove("max_completion_tokens");
    older["max_tokens"] = json!(10);
    assert_eq!(post(&h.router, "/v1/chat/completions", older).await.json()["choices"], body["choices"]);

    let mut streaming = request;
    streaming["stream"] = json!(true);
    let reply = post(&h.router, "/v1/chat/completions", streaming).await;
    let chunks = reply.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{}", reply.body);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(stream_text(&chunks, |c| c["delta"]["content"].as_str()), text);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], finish);
}

#[tokio::test]
async fn a_chat_without_a_limit_may_fill_the_context() {
    let h = harness_with(SyntheticModel { context_length: 48, ..SyntheticModel::tiny() });
    let prompt = chat_prompt(&h.file, "hi");
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0});
    let body = post(&h.router, "/v1/chat/completions", request).await.json();
    let (text, tokens, finish) = reference(&h.file, &prompt, 48 - prompt.len());
    assert_eq!(body["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(body["usage"]["completion_tokens"], tokens);
    assert_eq!(body["choices"][0]["finish_reason"], finish);
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 30, "temperature": 0});
    let whole = post(&h.router, "/v1/completions", request.clone()).await.json();
    let full = whole["choices"][0]["text"].as_str().unwrap().to_owned();
    // A stop string the model will write: two characters from the middle of its text.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "the model wrote too little to test with: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut stopping = request.clone();
        stopping["stop"] = json!(["never written, surely", stop]);
        stopping["stream"] = json!(stream);
        let reply = post(&h.router, "/v1/completions", stopping).await;
        let (text, finish) = if stream {
            let chunks = reply.chunks();
            (
                stream_text(&chunks, |c| c["text"].as_str()),
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let body = reply.json();
            (body["choices"][0]["text"].as_str().unwrap().to_owned(), body["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, expected, "stream: {stream}, stop {stop:?}");
        assert_eq!(finish, "stop");
    }
    // The generation stopped early, so its cache is gone as soon as it ends.
    wait_for(&h.engine, |o| o.sequences == 0).await;
}

#[tokio::test]
async fn sampling_with_a_seed_is_repeatable() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": "a", "max_tokens": 20, "temperature": 1.2, "top_k": 50, "top_p": 0.95, "seed": 9});
    let a = post(&h.router, "/v1/completions", request.clone()).await.json();
    let b = post(&h.router, "/v1/completions", request).await.json();
    assert_eq!(a["choices"], b["choices"]);
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let h = harness();
    let completion = |extra: Value| {
        let mut body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let long_prompt: Vec<u32> = vec![5; 256];
    let cases = [
        (completion(json!({"model": null})), StatusCode::BAD_REQUEST, Some("model")),
        (json!({"prompt": "hi"}), StatusCode::BAD_REQUEST, Some("model")),
        (json!({"model": MODEL}), StatusCode::BAD_REQUEST, Some("prompt")),
        (completion(json!({"model": "gpt-4"})), StatusCode::NOT_FOUND, Some("model")),
        (completion(json!({"temperature": 2.5})), StatusCode::BAD_REQUEST, Some("temperature")),
        (completion(json!({"temperature": -1})), StatusCode::BAD_REQUEST, Some("temperature")),
        (completion(json!({"top_p": 0})), StatusCode::BAD_REQUEST, Some("top_p")),
        (completion(json!({"top_p": 1.01})), StatusCode::BAD_REQUEST, Some("top_p")),
        (completion(json!({"max_tokens": 0})), StatusCode::BAD_REQUEST, Some("max_tokens")),
        (completion(json!({"max_tokens": 300})), StatusCode::BAD_REQUEST, Some("max_tokens")),
        (completion(json!({"max_tokens": "many"})), StatusCode::BAD_REQUEST, Some("max_tokens")),
        (completion(json!({"prompt": long_prompt})), StatusCode::BAD_REQUEST, Some("prompt")),
        (completion(json!({"prompt": [100_000]})), StatusCode::BAD_REQUEST, Some("prompt")),
        (completion(json!({"prompt": ""})), StatusCode::BAD_REQUEST, Some("prompt")),
        (completion(json!({"n": 17})), StatusCode::BAD_REQUEST, Some("n")),
        (completion(json!({"frequency_penalty": 0.5})), StatusCode::BAD_REQUEST, Some("frequency_penalty")),
        (completion(json!({"presence_penalty": 1})), StatusCode::BAD_REQUEST, Some("presence_penalty")),
        (completion(json!({"stop": 3})), StatusCode::BAD_REQUEST, Some("stop")),
        (completion(json!({"logprobs": 21})), StatusCode::BAD_REQUEST, Some("logprobs")),
    ];
    for (body, status, param) in cases {
        let reply = post(&h.router, "/v1/completions", body.clone()).await;
        let error = reply.assert_error(status, param);
        if param == Some("max_tokens") && body["max_tokens"] == 300
            || param == Some("prompt") && body["prompt"] == json!(long_prompt)
        {
            assert_eq!(error["code"], "context_length_exceeded", "{body}");
        }
    }
    let error = post(&h.router, "/v1/completions", completion(json!({"model": "gpt-4"})))
        .await
        .assert_error(StatusCode::NOT_FOUND, Some("model"));
    assert_eq!(error["code"], "model_not_found");

    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let long = "x ".repeat(400);
    let cases = [
        (json!({"model": MODEL}), StatusCode::BAD_REQUEST, Some("messages")),
        (chat(json!({"messages": []})), StatusCode::BAD_REQUEST, Some("messages")),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
        ),
        (chat(json!({"model": "other"})), StatusCode::NOT_FOUND, Some("model")),
        (chat(json!({"max_completion_tokens": 0})), StatusCode::BAD_REQUEST, Some("max_completion_tokens")),
        (chat(json!({"max_tokens": 1000})), StatusCode::BAD_REQUEST, Some("max_tokens")),
        (chat(json!({"messages": [{"role": "user", "content": long}]})), StatusCode::BAD_REQUEST, Some("messages")),
        (chat(json!({"temperature": 9})), StatusCode::BAD_REQUEST, Some("temperature")),
        (chat(json!({"n": 0, "stream": true})), StatusCode::BAD_REQUEST, Some("n")),
        (chat(json!({"logprobs": true, "top_logprobs": 21})), StatusCode::BAD_REQUEST, Some("top_logprobs")),
        (chat(json!({"top_logprobs": 2})), StatusCode::BAD_REQUEST, Some("top_logprobs")),
        (chat(json!({"logprobs": "yes"})), StatusCode::BAD_REQUEST, Some("logprobs")),
    ];
    for (body, status, param) in cases {
        post(&h.router, "/v1/chat/completions", body).await.assert_error(status, param);
    }
    // Nothing was started by any of them.
    assert_eq!(h.engine.occupancy().sequences, 0);
}

#[tokio::test]
async fn bodies_axum_cannot_parse_get_openai_errors() {
    let h = harness();
    for uri in ["/v1/completions", "/v1/chat/completions"] {
        for body in ["{\"model\": ", "not json", "{\"model\": \"tiny\",}"] {
            let error = post_raw(&h.router, uri, body).await.assert_error(StatusCode::BAD_REQUEST, None);
            assert_eq!(error["code"], "invalid_json");
        }
        for body in ["[1, 2]", "\"text\"", "null"] {
            post_raw(&h.router, uri, body).await.assert_error(StatusCode::BAD_REQUEST, None);
        }
        let request = Request::post(uri).body(Body::from(json!({"model": MODEL}).to_string())).unwrap();
        send(&h.router, request).await.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_get_openai_errors() {
    let h = harness();
    let error = get(&h.router, "/v1/engines").await.assert_error(StatusCode::NOT_FOUND, None);
    assert!(error["message"].as_str().unwrap().contains("/v1/engines"));
    post(&h.router, "/v2/completions", json!({})).await.assert_error(StatusCode::NOT_FOUND, None);
    get(&h.router, "/v1/completions").await.assert_error(StatusCode::METHOD_NOT_ALLOWED, None);
    let request = Request::builder().method(Method::DELETE).uri("/v1/models").body(Body::empty()).unwrap();
    send(&h.router, request).await.assert_error(StatusCode::METHOD_NOT_ALLOWED, None);
}

#[tokio::test]
async fn models_and_health() {
    let h = harness();
    let reply = get(&h.router, "/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "strata");
    assert_eq!(data[0]["context_length"], 256);
    assert!(data[0]["created"].as_u64().is_some());
    assert_eq!(data[0]["meta"]["n_ctx_train"], 256);
    assert!(data[0]["meta"]["n_vocab"].as_u64().is_some_and(|n| n > 0));
    assert!(data[0].get("plan").is_none(), "one process has no plan: {}", data[0]);
    assert_eq!(get(&h.router, "/v1/models/tiny").await.json(), data[0]);
    get(&h.router, "/v1/models/nope").await.assert_error(StatusCode::NOT_FOUND, Some("model"));
    let reply = get(&h.router, "/health").await;
    assert_eq!((reply.status, reply.json()), (StatusCode::OK, json!({"status": "ok"})));
}

/// Checks one token's chat logprob entry: its own logprob first among the `top`
/// most likely under greedy decoding, the list sorted, every logprob at most 0.
fn check_greedy_entry(entry: &Value, top: usize) {
    let logprob = entry["logprob"].as_f64().unwrap();
    assert!(logprob <= 0.0, "{entry}");
    let tops = entry["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), top, "{entry}");
    assert_eq!((&tops[0]["token"], &tops[0]["logprob"]), (&entry["token"], &entry["logprob"]), "greedy: {entry}");
    assert!(tops.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{entry}");
    let bytes = bytes_of(&entry["bytes"]);
    match std::str::from_utf8(&bytes) {
        Ok(text) => assert_eq!(text, entry["token"].as_str().unwrap(), "{entry}"),
        // Part of a character: named by its bytes.
        Err(_) => assert!(entry["token"].as_str().unwrap().starts_with("bytes:\\x"), "{entry}"),
    }
}

fn bytes_of(list: &Value) -> Vec<u8> {
    list.as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect()
}

#[tokio::test]
async fn generated_tokens_come_with_their_logprobs_on_chat_and_completions_streamed_or_not() {
    let h = harness();
    let body = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
        "logprobs": true, "top_logprobs": 3,
    });
    let reply = post(&h.router, "/v1/chat/completions", body.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let done = reply.json();
    let content = done["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert!(!content.is_empty(), "{done}");
    for entry in &content {
        check_greedy_entry(entry, 3);
    }
    // The tokens' bytes together are the answer.
    let joined: Vec<u8> = content.iter().flat_map(|e| bytes_of(&e["bytes"])).collect();
    assert_eq!(String::from_utf8_lossy(&joined), done["choices"][0]["message"]["content"].as_str().unwrap(), "{done}");
    // Streamed: the same entries, spread over the chunks that carry their text.
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let chunks = post(&h.router, "/v1/chat/completions", streamed_body).await.chunks();
    let streamed: Vec<Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().cloned().collect();
    assert_eq!(streamed, content);
    // Without asking, none.
    let plain = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    assert!(post(&h.router, "/v1/chat/completions", plain).await.json()["choices"][0]["logprobs"].is_null());

    // /v1/completions, the legacy shape: a logprob per token, the top ones by name.
    let body = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let done = post(&h.router, "/v1/completions", body.clone()).await.json();
    let logprobs = &done["choices"][0]["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    // Control tokens (chat markers) count as generated but are not part of the text.
    assert!(tokens.len() as u64 <= done["usage"]["completion_tokens"].as_u64().unwrap(), "{done}");
    if !tokens.iter().any(|t| t.starts_with("bytes:")) {
        assert_eq!(tokens.concat(), done["choices"][0]["text"].as_str().unwrap(), "{done}");
    }
    for (i, token) in tokens.iter().enumerate() {
        let top = logprobs["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 2 && top.contains_key(*token), "greedy: {done}");
        assert_eq!(top[*token], logprobs["token_logprobs"][i], "{done}");
    }
    let offsets: Vec<u64> = logprobs["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{done}");
    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let chunks = post(&h.router, "/v1/completions", streamed_body).await.chunks();
    // Streamed: the same figures, the offsets running on across the chunks.
    let streamed = |field: &str| -> Vec<Value> {
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"][field].as_array()).flatten().cloned().collect()
    };
    assert_eq!(&streamed("token_logprobs"), logprobs["token_logprobs"].as_array().unwrap());
    assert_eq!(&streamed("text_offset"), logprobs["text_offset"].as_array().unwrap());
}

#[tokio::test]
async fn tokenize_detokenize_and_props_speak_llama_cpps_shapes() {
    let h = harness();
    let tokenizer = Tokenizer::from_gguf(h.file.metadata()).unwrap();
    let text = "hello world";
    let ids = tokenizer.encode_text(text).unwrap();
    let reply = post(&h.router, "/tokenize", json!({"content": text})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json(), json!({"tokens": ids}));
    // add_special: what a prompt is encoded with (the model's BOS where it asks).
    let special = post(&h.router, "/tokenize", json!({"content": text, "add_special": true})).await.json();
    assert_eq!(special["tokens"], json!(tokenizer.encode(text).unwrap()));
    let pieces = post(&h.router, "/tokenize", json!({"content": text, "with_pieces": true})).await.json();
    let pieces = pieces["tokens"].as_array().unwrap().clone();
    assert_eq!(pieces.len(), ids.len());
    let joined: String = pieces.iter().map(|p| p["piece"].as_str().unwrap_or_default()).collect();
    assert_eq!(joined, tokenizer.decode(&ids).unwrap());
    assert_eq!(pieces[0]["id"], ids[0]);

    let back = post(&h.router, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(back.json(), json!({"content": tokenizer.decode(&ids).unwrap()}));

    // Bad input: a 400 naming the parameter.
    post(&h.router, "/tokenize", json!({})).await.assert_error(StatusCode::BAD_REQUEST, Some("content"));
    post(&h.router, "/tokenize", json!({"content": 5})).await.assert_error(StatusCode::BAD_REQUEST, Some("content"));
    let refused = json!({"content": text, "parse_special": false});
    post(&h.router, "/tokenize", refused).await.assert_error(StatusCode::BAD_REQUEST, Some("parse_special"));
    let unknown = json!({"tokens": [u32::MAX]});
    post(&h.router, "/detokenize", unknown).await.assert_error(StatusCode::BAD_REQUEST, Some("tokens"));
    let negative = json!({"tokens": [-1]});
    post(&h.router, "/detokenize", negative).await.assert_error(StatusCode::BAD_REQUEST, Some("tokens"));

    let props = get(&h.router, "/props").await;
    assert_eq!(props.status, StatusCode::OK, "{}", props.body);
    let props = props.json();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 256);
    assert_eq!(props["model_alias"], MODEL);
    assert!(props["chat_template"].as_str().is_some_and(|t| !t.is_empty()), "{props}");
    assert!(props["total_slots"].is_null(), "one process: {props}");
}

#[tokio::test]
async fn dropping_a_stream_cancels_the_generation_and_frees_the_cache() {
    // A long context, and a prompt the tiny model greedily repeats a token after
    // without ever ending: the generation is still running when the stream goes.
    let h = harness_with(SyntheticModel { context_length: 4096, ..SyntheticModel::tiny() });
    let request = json!({"model": MODEL, "prompt": [1], "max_tokens": 4000, "temperature": 0, "stream": true});
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(request.to_string()))
        .unwrap();
    let response = h.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    assert_eq!(h.engine.occupancy().sequences, 1);
    drop(body);
    let now = wait_for(&h.engine, |o| o.sequences == 0).await;
    assert_eq!((now.cache_bytes, now.cancelled), (0, 1));
}

/// Sends one HTTP/1.1 request over a fresh connection and reads the reply head and
/// as much of the body as `until` needs.
async fn raw_http(
    addr: std::net::SocketAddr,
    request: &str,
    until: impl Fn(&str) -> bool,
) -> (tokio::net::TcpStream, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !until(&String::from_utf8_lossy(&seen)) {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    (stream, String::from_utf8_lossy(&seen).into_owned())
}

fn http_post(path: &str, body: &Value) -> String {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_served_api_answers_notices_disconnects_and_shuts_down() {
    let h = harness_with(SyntheticModel { context_length: 4096, ..SyntheticModel::tiny() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, h.engine.clone(), None, ApiKeys::default(), async {
        let _ = stopped.await;
    }));

    let (_, reply) = raw_http(addr, "GET /health HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n", |_| false).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("{\"status\":\"ok\"}"), "{reply}");

    let request = json!({"model": MODEL, "prompt": [1], "max_tokens": 4000, "temperature": 0, "stream": true});
    let (connection, reply) =
        raw_http(addr, &http_post("/v1/completions", &request), |s| s.matches("data: ").count() >= 3).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(h.engine.occupancy().sequences, 1);
    drop(connection);
    let now = wait_for(&h.engine, |o| o.sequences == 0).await;
    assert_eq!(now.cancelled, 1);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
}

/// An engine that answers from a script, for failures a real one will not produce
/// on demand.
struct FakeEngine {
    card: ModelCard,
    limits: Limits,
    answer: Result<Vec<GenerateEvent>, EngineError>,
}

impl Engine for FakeEngine {
    fn model(&self) -> &ModelCard {
        &self.card
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn generate(&self, _: GenerateRequest) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        let events = self.answer.clone()?;
        let (tx, rx) = mpsc::channel(events.len() + 1);
        for event in events {
            tx.try_send(event).unwrap();
        }
        Ok(rx)
    }
}

/// A router over a fake engine; `answer` may use the tokenizer to script tokens.
fn fake(answer: impl FnOnce(&Tokenizer) -> Result<Vec<GenerateEvent>, EngineError>) -> (tempfile::TempDir, Router) {
    fake_limited(None, answer)
}

/// Like [`fake`], with `limits` in place of the model's own context.
fn fake_limited(
    limits: Option<Limits>,
    answer: impl FnOnce(&Tokenizer) -> Result<Vec<GenerateEvent>, EngineError>,
) -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let file = ModelFile::open(SyntheticModel::tiny().write_to(dir.path()).unwrap()).unwrap();
    let answer = answer(&tokenizer(&file));
    let card = ModelCard::new(
        MODEL.into(),
        256,
        Arc::new(tokenizer(&file)),
        Arc::new(ChatTemplate::from_gguf(file.metadata()).unwrap()),
    );
    let limits = limits.unwrap_or_else(|| Limits::of_model(&card));
    (dir, router(Arc::new(FakeEngine { card, limits, answer }), None, ApiKeys::default()))
}

/// A request that waited out the queue timeout for one of the planned sequences
/// answers 429 with OpenAI's rate-limit body, streamed or not: a stream's headers
/// wait for admission.
#[tokio::test]
async fn a_request_that_timed_out_in_the_queue_answers_429() {
    let reason = "4 of 4 planned sequences running";
    let (_dir, router) =
        fake(|_| Ok(vec![GenerateEvent::Failed(EngineError::QueueTimeout { waited_s: 120, reason: reason.into() })]));
    for stream in [false, true] {
        let request = json!({"model": MODEL, "prompt": "hi", "stream": stream});
        let error = post(&router, "/v1/completions", request).await.assert_error(StatusCode::TOO_MANY_REQUESTS, None);
        assert_eq!(error["code"], "rate_limit_exceeded");
        assert!(error["message"].as_str().unwrap().contains(reason), "{error}");
    }
    // Admitted, a stream goes on as usual.
    let (_dir, router) = fake(|t| {
        let end = GenerateEvent::Finished(strata_model::generate::FinishReason::Length);
        Ok(vec![GenerateEvent::Admitted, GenerateEvent::Token(token(t, "a"), None), end])
    });
    let chunks =
        post(&router, "/v1/completions", json!({"model": MODEL, "prompt": "hi", "stream": true})).await.chunks();
    assert_eq!(chunks[0]["choices"][0]["text"], "a");
}

/// A cluster planned for less context than the model's refuses at once a request
/// that does not fit, naming both numbers; without max_tokens the output is cut
/// to what fits.
#[tokio::test]
async fn a_request_beyond_the_planned_context_is_refused_with_both_numbers() {
    let limits = Limits { context: 64, context_source: ContextSource::Plan };
    let (_dir, router) = fake_limited(Some(limits), |t| {
        let end = GenerateEvent::Finished(strata_model::generate::FinishReason::Length);
        Ok(vec![GenerateEvent::Token(token(t, "a"), None), end])
    });
    let prompt: Vec<u32> = vec![5; 40];
    let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 30});
    let error =
        post(&router, "/v1/completions", request).await.assert_error(StatusCode::BAD_REQUEST, Some("max_tokens"));
    assert_eq!(error["code"], "context_length_exceeded");
    assert_eq!(
        error["message"],
        "prompt (40 tokens) plus max_tokens (30) exceeds the context of 64 tokens this cluster was planned for (--context)"
    );
    let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24});
    assert_eq!(post(&router, "/v1/completions", request).await.status, StatusCode::OK);
    let request = json!({"model": MODEL, "prompt": vec![5; 64]});
    post(&router, "/v1/completions", request).await.assert_error(StatusCode::BAD_REQUEST, Some("prompt"));
    assert_eq!(get(&router, "/v1/models").await.json()["data"][0]["context_length"], 64);
}

#[tokio::test]
async fn an_unavailable_engine_answers_503() {
    for refusal in [EngineError::Unavailable("all workers are gone".into()), EngineError::ShuttingDown] {
        let (_dir, router) = fake(|_| Err(refusal));
        for stream in [false, true] {
            let request = json!({"model": MODEL, "prompt": "hi", "stream": stream});
            post(&router, "/v1/completions", request).await.assert_error(StatusCode::SERVICE_UNAVAILABLE, None);
        }
    }
}

#[tokio::test]
async fn a_failure_mid_generation_is_reported() {
    let (_dir, router) = fake(|t| {
        Ok(vec![
            GenerateEvent::Token(token(t, "a"), None),
            GenerateEvent::Failed(EngineError::Internal("worker 2 lost".into())),
        ])
    });
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let error = post(&router, "/v1/chat/completions", request.clone())
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, None);
    assert!(error["message"].as_str().unwrap().contains("worker 2 lost"));
    let mut streaming = request;
    streaming["stream"] = json!(true);
    let chunks = post(&router, "/v1/chat/completions", streaming).await.chunks();
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "a");
    assert_eq!(chunks.last().unwrap()["error"]["type"], "server_error");
}

#[tokio::test]
async fn an_engine_that_vanishes_is_an_error_not_a_hang() {
    let (_dir, router) = fake(|t| Ok(vec![GenerateEvent::Token(token(t, "a"), None)]));
    let request = json!({"model": MODEL, "prompt": "hi"});
    post(&router, "/v1/completions", request).await.assert_error(StatusCode::INTERNAL_SERVER_ERROR, None);
}

fn token(tokenizer: &Tokenizer, text: &str) -> u32 {
    match tokenizer.encode(text).unwrap()[..] {
        [id] => id,
        ref ids => panic!("{text:?} is not one token: {ids:?}"),
    }
}

/// Hyper notices the closed connection while the handler still waits on the engine.
#[tokio::test]
async fn hanging_up_on_a_non_streaming_request_cancels_it() {
    let h = harness_with(SyntheticModel { context_length: 4096, ..SyntheticModel::tiny() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(serve(listener, h.engine.clone(), None, ApiKeys::default(), std::future::pending()));
    let request = json!({"model": MODEL, "prompt": [1], "max_tokens": 4000, "temperature": 0});
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(http_post("/v1/completions", &request).as_bytes()).await.unwrap();
    wait_for(&h.engine, |o| o.sequences == 1).await;
    drop(stream);
    let now = wait_for(&h.engine, |o| o.sequences == 0).await;
    assert_eq!(now.cancelled, 1);
}

#[tokio::test]
async fn with_api_keys_only_health_is_open_and_the_admin_routes_need_the_admin_key() {
    let h = harness();
    let keys = ApiKeys::new(&["client-key".into()], &["admin-key".into()]).unwrap();
    let router = router(h.engine.clone(), None, keys);
    let request = |method: Method, uri: &str, key: Option<&str>| {
        let mut builder = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        builder.body(Body::from(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}).to_string())).unwrap()
    };
    let routes = [
        (Method::GET, "/v1/models"),
        (Method::GET, "/v1/models/tiny"),
        (Method::POST, "/v1/completions"),
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/tokenize"),
        (Method::POST, "/detokenize"),
        (Method::GET, "/props"),
        (Method::GET, "/admin/status"),
        (Method::POST, "/admin/drain"),
        (Method::POST, "/admin/undrain"),
        (Method::GET, "/v1/engines"),
    ];
    for (method, uri) in routes {
        let missing = send(&router, request(method.clone(), uri, None)).await;
        assert_eq!(missing.assert_error(StatusCode::UNAUTHORIZED, None)["code"], "missing_api_key", "{uri}");
        let wrong = send(&router, request(method, uri, Some("guess"))).await;
        assert_eq!(wrong.assert_error(StatusCode::UNAUTHORIZED, None)["code"], "invalid_api_key", "{uri}");
    }
    let health = send(&router, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(health.status, StatusCode::OK);
    for key in ["client-key", "admin-key"] {
        let models = send(&router, request(Method::GET, "/v1/models", Some(key))).await;
        assert_eq!(models.status, StatusCode::OK, "{key}: {}", models.body);
    }
    let completion = send(&router, request(Method::POST, "/v1/completions", Some("client-key"))).await;
    assert_eq!(completion.status, StatusCode::OK, "{}", completion.body);
    let status = send(&router, request(Method::GET, "/admin/status", Some("client-key"))).await;
    assert_eq!(status.assert_error(StatusCode::UNAUTHORIZED, None)["code"], "admin_key_required");
    let status = send(&router, request(Method::GET, "/admin/status", Some("admin-key"))).await;
    assert_ne!(status.status, StatusCode::UNAUTHORIZED, "{}", status.body);
}

/// The value of the sample `name{labels}` in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
    let line = line.unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_times_as_vllm_names_them() {
    let h = harness();
    let before = get(&h.router, "/metrics").await;
    assert_eq!(before.status, StatusCode::OK);
    assert!(before.content_type.starts_with("text/plain; version=0.0.4"), "{}", before.content_type);
    let model = format!("{{model_name=\"{MODEL}\"}}");
    assert_eq!(sample(&before.body, &format!("strata:generation_tokens_total{model}")), 0.0);
    for stream in [false, true] {
        let body = json!({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "stream": stream});
        assert_eq!(post(&h.router, "/v1/completions", body).await.status, StatusCode::OK);
    }
    let after = get(&h.router, "/metrics").await.body;
    assert_eq!(sample(&after, &format!("strata:prompt_tokens_total{model}")), 6.0);
    let generated = sample(&after, &format!("strata:generation_tokens_total{model}"));
    assert!((2.0..=8.0).contains(&generated), "{after}");
    assert_eq!(sample(&after, &format!("strata:num_requests_running{model}")), 0.0);
    assert_eq!(sample(&after, &format!("strata:num_requests_waiting{model}")), 0.0);
    let ended: f64 = ["stop", "length"]
        .iter()
        .map(|r| sample(&after, &format!("strata:request_success_total{{model_name=\"{MODEL}\",finished_reason=\"{r}\"}}")))
        .sum();
    assert_eq!(ended, 2.0, "{after}");
    assert_eq!(sample(&after, "strata:time_to_first_token_seconds_count"), 2.0);
    assert_eq!(sample(&after, "strata:e2e_request_latency_seconds_count"), 2.0);
    assert_eq!(sample(&after, "strata:time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 2.0);
    assert_eq!(sample(&after, "strata:time_per_output_token_seconds_count"), generated - 2.0);
    // Every family is declared once, before its samples.
    let mut declared = std::collections::HashSet::new();
    for line in after.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(declared.insert(line.split(' ').nth(2).unwrap().to_string()), "declared twice: {line}");
    }
}

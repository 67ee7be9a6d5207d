//! Property tests: whatever a client sends to the generation routes — any JSON,
//! fields of the wrong type, huge or negative numbers, nesting, or bytes that are
//! not JSON at all — the answer is a success or an OpenAI-style 4xx, never a
//! panic, a 5xx or a hang (issue 13: hostile input, bounded).

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use proptest::prelude::*;
use serde_json::{json, Value};
use strata_model::synthetic::SyntheticModel;
use strata_model::{Device, ModelFile};
use tower::ServiceExt;

use super::{router, ApiKeys};
use crate::engine::local::LocalEngine;

const MODEL: &str = "tiny";
const ROUTES: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

/// The fields the routes read, so that generated bodies reach past the first check.
const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "n",
    "echo",
    "logprobs",
    "repetition_penalty",
    "return_tokens_as_token_ids",
    "role",
    "content",
    "stream_options",
    "include_usage",
    "max_completion_tokens",
    "presence_penalty",
    "tokens",
    "add_special",
    "with_pieces",
    "parse_special",
];

/// llama.cpp's utility routes, sent the same treatment.
const TOKEN_ROUTES: [&str; 2] = ["/tokenize", "/detokenize"];

/// One router over a tiny model for every case: starting an engine per case
/// would make the test slow, and a shared one also shows that no bad request
/// leaves it in a bad state.
fn shared() -> &'static (tokio::runtime::Runtime, Router) {
    static SHARED: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp folder");
        let file = ModelFile::open(SyntheticModel::tiny().write_to(dir.path()).expect("the model is written"))
            .expect("the model opens");
        let engine = Arc::new(LocalEngine::start(&file, &Device::Cpu, MODEL.into()).expect("the engine starts"));
        // The engine holds what it needs; the file may go.
        drop(dir);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime");
        (runtime, router(engine, None, ApiKeys::default()))
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(FIELDS).prop_map(str::to_string),
        1 => proptest::collection::vec(any::<char>(), 0..6).prop_map(|c| c.into_iter().collect()),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0i64..300).prop_map(|n| json!(n)),
        prop_oneof![Just(u64::MAX), Just(1u64 << 53), any::<u64>()].prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("JSON numbers are finite", |f| f.is_finite().then(|| json!(f))),
        (-2.0f64..3.0).prop_map(|f| json!(f)),
        proptest::collection::vec(any::<char>(), 0..10).prop_map(|c| Value::String(c.into_iter().collect())),
        Just(json!(MODEL)),
        Just(json!("user")),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Chat messages, often well formed: roles real and made up, contents of every type.
fn messages() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        3 => proptest::sample::select(&["user", "assistant", "system"][..]).prop_map(|r| json!(r)),
        1 => value(),
    ];
    let content = prop_oneof![3 => "[a-z ]{0,12}".prop_map(|t| json!(t)), 1 => value()];
    proptest::collection::vec((role, content), 0..4).prop_map(|m| {
        Value::Array(m.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect())
    })
}

/// A valid request for `route`, then up to three fields set to anything: most
/// requests get past the first checks, and many generate.
fn body(chat: bool) -> impl Strategy<Value = Value> {
    let base = if chat {
        messages().prop_map(|m| json!({"model": MODEL, "messages": m, "max_tokens": 4})).boxed()
    } else {
        prop_oneof![
            "[a-z ]{0,16}".prop_map(|p| json!(p)),
            proptest::collection::vec(0u32..300, 0..6).prop_map(|p| json!(p)),
            value(),
        ]
        .prop_map(|p| json!({"model": MODEL, "prompt": p, "max_tokens": 4}))
        .boxed()
    };
    let format = proptest::option::weighted(0.3, response_format());
    (base, format, proptest::collection::vec((key(), value()), 0..3)).prop_map(|(mut body, format, changes)| {
        if let Some(format) = format {
            body["response_format"] = format;
        }
        for (k, v) in changes {
            body[k] = v;
        }
        body
    })
}

/// A `response_format`, mostly a JSON schema of random parts: the grammar compiler
/// must refuse it or follow it, never fail otherwise.
fn response_format() -> impl Strategy<Value = Value> {
    const TYPES: &[&str] = &["object", "string", "integer", "number", "array", "boolean", "null", "nonsense"];
    const KEYWORDS: &str = "properties items required enum minimum maximum minLength maxLength pattern minItems \
                            maxItems additionalProperties anyOf $ref const format";
    let keyword = proptest::sample::select(KEYWORDS.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    let schema = (proptest::sample::select(TYPES), proptest::collection::vec((keyword, value()), 0..4)).prop_map(
        |(kind, keywords)| {
            let mut schema = json!({ "type": kind });
            for (k, v) in keywords {
                schema[k] = v;
            }
            schema
        },
    );
    prop_oneof![
        1 => Just(json!({"type": "json_object"})),
        4 => schema.prop_map(|s| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}})),
        1 => value().prop_map(|s| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}})),
    ]
}

/// Sends `bytes` to `route`; the status and the body, read to the end.
fn post(route: &str, bytes: Vec<u8>) -> (StatusCode, String) {
    let (runtime, router) = shared();
    runtime.block_on(async {
        let request = Request::post(route).header(header::CONTENT_TYPE, "application/json").body(Body::from(bytes));
        let response = router.clone().oneshot(request.expect("a request")).await.expect("axum answers");
        let status = response.status();
        let read = axum::body::to_bytes(response.into_body(), 1 << 24);
        let bytes = tokio::time::timeout(std::time::Duration::from_secs(60), read)
            .await
            .expect("the body ends within a minute")
            .expect("the body reads");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    })
}

fn assert_answered(route: &str, sent: &str, status: StatusCode, body: &str) {
    assert!(status.is_success() || status.is_client_error(), "{route} {sent}: {status} {body}");
    if status.is_client_error() {
        let error: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{route} {sent}: not JSON ({e}): {body}"));
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{route} {sent}: {body}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_json_body_gets_a_success_or_an_openai_error((chat, body) in any::<bool>().prop_flat_map(|c| (Just(c), body(c)))) {
        let route = ROUTES[usize::from(chat)];
        let sent = body.to_string();
        let (status, reply) = post(route, sent.clone().into_bytes());
        assert_answered(route, &sent, status, &reply);
    }

    #[test]
    fn the_token_routes_answer_any_json_with_a_success_or_an_openai_error(
        detokenize in any::<bool>(),
        base in prop_oneof![
            "[a-z ]{0,16}".prop_map(|t| json!({"content": t})),
            proptest::collection::vec(0u32..300, 0..6).prop_map(|t| json!({"tokens": t})),
        ],
        changes in proptest::collection::vec((key(), value()), 0..3),
    ) {
        let route = TOKEN_ROUTES[usize::from(detokenize)];
        let mut body = base;
        for (k, v) in changes {
            body[k] = v;
        }
        let sent = body.to_string();
        let (status, reply) = post(route, sent.clone().into_bytes());
        assert_answered(route, &sent, status, &reply);
    }

    #[test]
    fn bytes_that_are_not_json_get_a_400(bytes in proptest::collection::vec(any::<u8>(), 0..64), chat in any::<bool>()) {
        prop_assume!(serde_json::from_slice::<Value>(&bytes).is_err());
        let route = ROUTES[usize::from(chat)];
        let (status, reply) = post(route, bytes.clone());
        prop_assert!(status.is_client_error(), "{route} {bytes:?}: {status} {reply}");
        assert_answered(route, &format!("{bytes:?}"), status, &reply);
    }
}

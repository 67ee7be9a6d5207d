//! The OpenAI-compatible HTTP API over any [`Engine`].
//!
//! `POST /v1/completions`, `POST /v1/chat/completions` (both also as server-sent
//! event streams), `GET /v1/models`, `GET /v1/models/{id}`, llama.cpp's `POST
//! /tokenize`, `POST /detokenize` and `GET /props`, `GET /health`, `GET /metrics`, the [`dashboard`] at `/`, and for a cluster the admin endpoints of
//! [`admin`], behind the API keys of [`auth`]. Every
//! failure answers with OpenAI's error body. Handlers only check requests, turn them
//! into tokens and follow the engine's events: tokenizing and rendering templates
//! run on the blocking pool, generating on whatever the engine uses, never on the
//! reactor. Prompts are not logged; request ids and token counts are.

mod admin;
mod auth;
mod chat;
mod completions;
mod dashboard;
mod errors;
mod generation;
mod logprobs;
mod metrics;
mod models;
mod params;
mod sse;
mod tokens;
mod tools;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use strata_grammar::GrammarError;

pub use auth::{ApiKeys, KeyError};
pub use errors::ApiError;

use crate::cluster::ClusterAdmin;
use crate::engine::{Engine, GenerateRequest, ModelCard};
use generation::Generation;
use params::Options;

/// How long in-flight requests may run on after shutdown begins.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    engine: Arc<dyn Engine>,
    /// The cluster's admin handle; `None` for a single process.
    admin: Option<ClusterAdmin>,
    /// When this API started: the `created` time of the model it lists.
    started: u64,
    metrics: Arc<metrics::ApiMetrics>,
}

pub fn router(engine: Arc<dyn Engine>, admin: Option<ClusterAdmin>, keys: ApiKeys) -> Router {
    let state = AppState { engine, admin, started: unix_now(), metrics: Arc::default() };
    Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(models::list))
        // Model ids may contain slashes (`org/name`).
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/props", get(models::props))
        .route("/health", get(health))
        .route("/metrics", get(prometheus_metrics))
        .route("/admin/status", get(admin::status))
        .route("/admin/drain", post(admin::drain))
        .route("/admin/undrain", post(admin::undrain))
        .route("/admin/revoke", post(admin::revoke))
        .merge(dashboard::routes())
        .fallback(errors::no_route)
        .method_not_allowed_fallback(errors::wrong_method)
        .with_state(state)
        // Outermost, so that unknown routes and bodies are not looked at either.
        .layer(axum::middleware::from_fn_with_state(keys, auth::require_key))
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting and
/// lets requests in flight finish for up to [`DRAIN_GRACE`]; those still running
/// are dropped, which cancels their generations.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<dyn Engine>,
    admin: Option<ClusterAdmin>,
    keys: ApiKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_grace(listener, engine, admin, keys, shutdown, DRAIN_GRACE).await
}

pub async fn serve_with_grace(
    listener: tokio::net::TcpListener,
    engine: Arc<dyn Engine>,
    admin: Option<ClusterAdmin>,
    keys: ApiKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (began, shutdown_began) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining requests");
        let _ = began.send(());
    };
    let server = axum::serve(listener, router(engine, admin, keys)).with_graceful_shutdown(shutdown).into_future();
    let deadline = async move {
        // An error means the server ended first and dropped the sender.
        if shutdown_began.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!(grace_s = grace.as_secs(), "requests still running after the grace period are dropped");
            Ok(())
        }
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics` (see [`metrics`]), behind the API keys like every route but
/// `/health` (Prometheus sends one as `authorization: {credentials: KEY}`).
async fn prometheus_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let cluster = match &state.admin {
        Some(admin) => admin.status().await.ok(),
        None => None,
    };
    let text = state.metrics.render(&state.engine.model().id, cluster.as_ref());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn to_json(value: &impl serde::Serialize) -> String {
    // Our response types hold only strings, numbers and options: they serialize.
    serde_json::to_string(value).unwrap_or_default()
}

fn new_request_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

/// What every generation handler starts with: a request id on the handler's span, the
/// body's fields, and the served model, checked against the one the body names.
/// `accepted`: parameters other endpoints refuse that this one handles (see
/// `params::options`).
async fn begin(
    state: &AppState,
    body: serde_json::Map<String, serde_json::Value>,
    accepted: &[&str],
) -> Result<Begun, ApiError> {
    let request_id = new_request_id();
    let card = state.engine.model().clone();
    let span = tracing::Span::current();
    span.record("request_id", request_id.as_str());
    span.record("model", card.id.as_str());
    let fields = params::Fields::new(body);
    params::check_model(&fields, &card)?;
    let options = params::options(&fields, accepted)?;
    if let Some(grammar) = options.constraint.clone() {
        // Compiling a schema (and, the first time, the vocabulary) is CPU work.
        off_reactor(&card, move |card| {
            card.vocabulary.get().and_then(|v| v.check(&grammar)).map_err(|e| match e {
                GrammarError::Invalid(message) => {
                    ApiError::invalid("response_format", format!("invalid response_format schema: {message}"))
                }
                other => ApiError::internal(other.to_string()),
            })
        })
        .await?;
    }
    Ok(Begun { request_id, fields, card, options })
}

struct Begun {
    request_id: String,
    fields: params::Fields,
    card: crate::engine::ModelCard,
    options: params::Options,
}

/// Runs tokenizer and template work on the blocking pool: a long prompt takes
/// longer to encode than the reactor may be held.
async fn off_reactor<T: Send + 'static>(
    card: &ModelCard,
    work: impl FnOnce(&ModelCard) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let card = card.clone();
    tokio::task::spawn_blocking(move || work(&card))
        .await
        .map_err(|e| ApiError::internal(format!("tokenization did not complete: {e}")))?
}

/// The `options.choices` generations of a request, each its own sequence: choice
/// `i` samples with seed `seed + i`, so a seeded request gives the same choices
/// every time. Several choices share the prompt (`GenerateRequest::shared_prompt`):
/// a cluster computes it once.
fn start_choices(
    state: &AppState,
    request_id: &str,
    prompt_tokens: &[u32],
    max_tokens: usize,
    options: &Options,
    logprobs: Option<usize>,
) -> Result<Vec<Generation>, ApiError> {
    (0..options.choices)
        .map(|i| {
            let mut choice = options.clone();
            choice.sampling.seed = options.sampling.seed.wrapping_add(i as u64);
            start(state, request_id, prompt_tokens.to_vec(), max_tokens, &choice, None, logprobs)
        })
        .collect()
}

/// Hands a checked, tokenized request to the engine; `prompt_logprobs` asks for the
/// prompt's scores with that many most likely tokens per position, `logprobs` for
/// each generated token's.
fn start(
    state: &AppState,
    request_id: &str,
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    options: &Options,
    prompt_logprobs: Option<usize>,
    logprobs: Option<usize>,
) -> Result<Generation, ApiError> {
    let prompt_len = prompt_tokens.len();
    tracing::info!(request_id, prompt_tokens = prompt_len, max_tokens, stream = options.stream, "generation starts");
    let request = GenerateRequest {
        prompt_tokens,
        max_tokens,
        sampling: options.sampling.clone(),
        prompt_logprobs,
        logprobs,
        constraint: options.constraint.clone(),
        shared_prompt: options.choices > 1,
    };
    let engine = state.engine.as_ref();
    let events = engine.generate(request)?;
    Ok(Generation::new(
        events,
        engine.model().tokenizer.clone(),
        options.stop.clone(),
        request_id.to_owned(),
        engine.model().id.clone(),
        prompt_len,
        state.metrics.clone(),
    ))
}

#[cfg(test)]
mod hostile_bodies;
#[cfg(test)]
mod tests;

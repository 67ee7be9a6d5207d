//! The one model this server serves: `GET /v1/models`, `GET /v1/models/{id}`, and
//! llama.cpp's `GET /props`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::AppState;
use crate::engine::Engine;

#[derive(Serialize)]
pub(super) struct Model {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// Not in OpenAI's schema; vLLM reports it as well, and clients size prompts by it.
    context_length: usize,
    /// Not in OpenAI's schema either: what llama.cpp's server reports of the model.
    meta: Meta,
    /// On a cluster: which node holds which layers now.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<Vec<PlannedStage>>,
}

#[derive(Serialize)]
struct Meta {
    n_vocab: usize,
    /// The context the model was trained for (`context_length` may be less).
    n_ctx_train: usize,
}

#[derive(Serialize)]
struct PlannedStage {
    stage: usize,
    node: String,
    /// First layer, and one past the last.
    layers: [usize; 2],
}

#[derive(Serialize)]
pub(super) struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

/// `context_length` is what a request may fill here: on a cluster the context its
/// plan sized the KV caches for, which may be less than the model's.
async fn model(state: &AppState) -> Model {
    let engine: &dyn Engine = state.engine.as_ref();
    let card = engine.model();
    Model {
        id: card.id.clone(),
        object: "model",
        created: state.started,
        owned_by: "strata",
        context_length: engine.limits().context,
        meta: Meta { n_vocab: card.tokenizer.vocab_size(), n_ctx_train: card.context_length },
        plan: plan(state).await,
    }
}

/// The stages of the cluster's pipeline, first to last (none for one process, or
/// while no pipeline serves).
async fn plan(state: &AppState) -> Option<Vec<PlannedStage>> {
    let status = state.admin.as_ref()?.status().await.ok()?;
    let mut stages: Vec<PlannedStage> = status
        .nodes
        .iter()
        .filter_map(|n| Some(PlannedStage { stage: n.stage?, node: n.name.clone(), layers: n.layers? }))
        .collect();
    stages.sort_by_key(|s| s.stage);
    Some(stages)
}

pub(super) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: vec![model(&state).await] })
}

pub(super) async fn retrieve(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Model>, ApiError> {
    let Path(id) =
        id.map_err(|e| ApiError::invalid("model", format!("bad model id: {}", e.body_text().to_lowercase())))?;
    let card = state.engine.model();
    if id != card.id {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model(&state).await))
}

/// `GET /props`, as llama.cpp's server answers it (the fields its clients read):
/// the context a request may fill, the sequences served at once on a cluster, the
/// chat template and its special tokens.
pub(super) async fn props(State(state): State<AppState>) -> Json<Value> {
    let card = state.engine.model();
    let context = state.engine.limits().context;
    let slots = match &state.admin {
        Some(admin) => admin.status().await.ok().map(|s| s.admission.sequences),
        None => None,
    };
    let tokenizer = &card.tokenizer;
    let special = |id: Option<u32>| id.and_then(|id| tokenizer.token_text(id)).unwrap_or_default().to_string();
    Json(json!({
        "default_generation_settings": {"n_ctx": context, "model": card.id},
        "total_slots": slots,
        "model_alias": card.id,
        "chat_template": card.chat_template.source(),
        "bos_token": special(tokenizer.bos_token()),
        "eos_token": special(tokenizer.eos_tokens().first().copied()),
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("strata {}", env!("CARGO_PKG_VERSION")),
    }))
}

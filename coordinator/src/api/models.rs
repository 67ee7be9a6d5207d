//! `GET /v1/models` and `GET /v1/models/{id}`: the one model this server serves.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

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
}

#[derive(Serialize)]
pub(super) struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

/// `context_length` is what a request may fill here: on a cluster the context its
/// plan sized the KV caches for, which may be less than the model's.
fn model(engine: &dyn Engine, created: u64) -> Model {
    let card = engine.model();
    Model { id: card.id.clone(), object: "model", created, owned_by: "strata", context_length: engine.limits().context }
}

pub(super) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: vec![model(state.engine.as_ref(), state.started)] })
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
    Ok(Json(model(state.engine.as_ref(), state.started)))
}

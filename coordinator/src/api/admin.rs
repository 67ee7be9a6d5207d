//! The cluster's admin endpoints, which `strata status`, `strata drain`,
//! `strata undrain` and `strata node revoke` call: `GET /admin/status`, `POST
//! /admin/drain`, `POST /admin/undrain`, `POST /admin/revoke`. Errors use the same OpenAI-style body as the rest of the
//! API. A single-process server has no cluster and answers 404.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::cluster::{AdminError, ClusterAdmin, ClusterStatus, DrainReport};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    pub node: String,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub wait: bool,
}

/// The body of `/admin/undrain` and `/admin/revoke`: which node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndrainBody {
    pub node: String,
}

fn admin(state: &AppState) -> Result<&ClusterAdmin, ApiError> {
    state.admin.as_ref().ok_or_else(|| {
        ApiError::not_found("this server runs the model in one process; it has no cluster to administer")
    })
}

fn refused(e: AdminError) -> ApiError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::CONFLICT);
    ApiError::new(status, e.to_string()).with_param("node")
}

/// The body, parsed, or a 400 naming what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not valid: {e}")))
}

pub async fn status(State(state): State<AppState>) -> Result<Json<ClusterStatus>, ApiError> {
    admin(&state)?.status().await.map(Json).map_err(refused)
}

pub async fn drain(State(state): State<AppState>, body: String) -> Result<Json<DrainReport>, ApiError> {
    let admin = admin(&state)?;
    let body: DrainBody = parse(&body)?;
    admin.drain(body.node, body.force, body.wait).await.map(Json).map_err(refused)
}

pub async fn revoke(State(state): State<AppState>, body: String) -> Result<Json<Value>, ApiError> {
    let admin = admin(&state)?;
    let body: UndrainBody = parse(&body)?;
    let message = admin.revoke(body.node).await.map_err(refused)?;
    Ok(Json(json!({ "message": message })))
}

pub async fn undrain(State(state): State<AppState>, body: String) -> Result<Json<Value>, ApiError> {
    let admin = admin(&state)?;
    let body: UndrainBody = parse(&body)?;
    let message = admin.undrain(body.node).await.map_err(refused)?;
    Ok(Json(json!({ "message": message })))
}

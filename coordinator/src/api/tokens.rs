//! `POST /tokenize` and `POST /detokenize`, in the shapes of llama.cpp's server, which
//! scripts and clients (token counters, prompt builders) already speak.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::{ApiError, ApiJson};
use super::params::Fields;
use super::{off_reactor, AppState};

/// A token of `/tokenize` with `with_pieces`: its text, or its bytes where they are
/// not UTF-8 on their own (part of a character).
#[derive(Serialize)]
#[serde(untagged)]
enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Serialize)]
struct TokenWithPiece {
    id: u32,
    piece: Piece,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Tokens {
    Ids(Vec<u32>),
    WithPieces(Vec<TokenWithPiece>),
}

#[derive(Serialize)]
pub(super) struct Tokenized {
    tokens: Tokens,
}

/// `{"content": TEXT, "add_special": false, "with_pieces": false}`: the token ids of
/// the text (special tokens written in it recognised), with the model's BOS/EOS only
/// when `add_special` asks; with `with_pieces`, each id with its text.
pub(super) async fn tokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<Tokenized>, ApiError> {
    let fields = Fields::new(body);
    let content: String = fields.require("content")?;
    let add_special = fields.get::<bool>("add_special")?.unwrap_or(false);
    let with_pieces = fields.get::<bool>("with_pieces")?.unwrap_or(false);
    if fields.get::<bool>("parse_special")? == Some(false) {
        return Err(ApiError::unsupported(
            "parse_special",
            "special tokens written in the text are always recognised here (parse_special: true)",
        ));
    }
    let card = state.engine.model().clone();
    off_reactor(&card, move |card| {
        let tokenizer = &card.tokenizer;
        let ids = if add_special { tokenizer.encode(&content) } else { tokenizer.encode_text(&content) }
            .map_err(|e| ApiError::invalid("content", format!("cannot tokenize the content: {e}")))?;
        let tokens = if with_pieces {
            Tokens::WithPieces(
                ids.into_iter()
                    .map(|id| {
                        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                        let piece = match std::str::from_utf8(bytes) {
                            Ok(text) => Piece::Text(text.to_string()),
                            Err(_) => Piece::Bytes(bytes.to_vec()),
                        };
                        TokenWithPiece { id, piece }
                    })
                    .collect(),
            )
        } else {
            Tokens::Ids(ids)
        };
        Ok(Json(Tokenized { tokens }))
    })
    .await
}

#[derive(Serialize)]
pub(super) struct Detokenized {
    content: String,
}

/// `{"tokens": [IDS]}`: their text, special tokens included.
pub(super) async fn detokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<Json<Detokenized>, ApiError> {
    let fields = Fields::new(body);
    let ids: Vec<u32> = fields.require("tokens")?;
    let card = state.engine.model().clone();
    off_reactor(&card, move |card| {
        let content = card.tokenizer.decode(&ids).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        Ok(Json(Detokenized { content }))
    })
    .await
}

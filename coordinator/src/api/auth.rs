//! API keys: who may use the HTTP API.
//!
//! Clients send `Authorization: Bearer KEY`, as OpenAI's clients do with `api_key=`.
//! With no key configured everything is open, as on the loopback address the API
//! listens on by default. With keys, every route but `/health` needs one: a client
//! key (or an admin key) for the OpenAI routes, an admin key for `/admin/*` (status,
//! drain, undrain), so a key handed to an application cannot take machines out of
//! the cluster. A refusal is a 401 with OpenAI's error body.
//!
//! Keys are compared by their SHA-256 digests, byte by byte without stopping early,
//! and every configured key is compared: how long a check takes says nothing about
//! how much of a guess was right, nor about the keys' lengths.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::ApiError;

/// The keys the API accepts; the default accepts anyone.
#[derive(Clone, Default)]
pub struct ApiKeys {
    client: Vec<[u8; 32]>,
    admin: Vec<[u8; 32]>,
}

/// A key that cannot be one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("an API key may not be empty")]
    Empty,
    #[error("an API key may not contain spaces or control characters")]
    BadCharacter,
}

impl std::fmt::Debug for ApiKeys {
    // Never the digests, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys {{ client: {}, admin: {} }}", self.client.len(), self.admin.len())
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Client,
    Admin,
}

impl ApiKeys {
    pub fn new(client: &[String], admin: &[String]) -> Result<Self, KeyError> {
        let digests =
            |keys: &[String]| keys.iter().map(|k| check(k).map(|()| digest(k))).collect::<Result<Vec<_>, _>>();
        Ok(Self { client: digests(client)?, admin: digests(admin)? })
    }

    /// No key is needed anywhere.
    pub fn is_open(&self) -> bool {
        self.client.is_empty() && self.admin.is_empty()
    }

    /// Whether the OpenAI routes need a key.
    pub fn guards_clients(&self) -> bool {
        !self.client.is_empty()
    }

    fn need(&self, path: &str) -> Need {
        if path == "/health" || super::dashboard::PATHS.contains(&path) || self.is_open() {
            Need::Nothing
        } else if path == "/admin" || path.starts_with("/admin/") {
            Need::Admin
        } else if self.guards_clients() {
            Need::Client
        } else {
            Need::Nothing
        }
    }

    /// Whether a request with `headers` may use `path`; the 401 if not.
    fn admit(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let need = self.need(path);
        if need == Need::Nothing {
            return Ok(());
        }
        let Some(presented) = bearer(headers) else {
            return Err(unauthorized(
                "You didn't provide an API key: send it as `Authorization: Bearer KEY` (the `api_key` of OpenAI's clients).",
                "missing_api_key",
            ));
        };
        let presented = digest(presented);
        let is_admin = matches_any(&self.admin, &presented);
        let is_client = matches_any(&self.client, &presented);
        match need {
            Need::Admin if is_admin => Ok(()),
            Need::Admin if is_client => Err(unauthorized(
                "This route needs an admin key (`strata serve --admin-key`); the key sent is a client key.",
                "admin_key_required",
            )),
            Need::Client if is_client || is_admin => Ok(()),
            _ => Err(unauthorized("Incorrect API key provided.", "invalid_api_key")),
        }
    }
}

/// The middleware: lets a request through or answers 401.
pub async fn require_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    match keys.admit(request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn check(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        Err(KeyError::Empty)
    } else if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(KeyError::BadCharacter)
    } else {
        Ok(())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares `presented` with every key, each byte of each, without an early exit.
fn matches_any(keys: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    keys.iter().fold(false, |found, key| {
        let difference = key.iter().zip(presented).fold(0u8, |d, (a, b)| d | (a ^ b));
        found | (difference == 0)
    })
}

/// The key of an `Authorization: Bearer KEY` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim()).filter(|k| !k.is_empty())
}

fn unauthorized(message: &str, code: &'static str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message).with_code(code)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = authorization {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn keys() -> ApiKeys {
        ApiKeys::new(&["client-1".into(), "client-2".into()], &["admin-1".into()]).unwrap()
    }

    #[test]
    fn without_keys_everything_is_open() {
        let open = ApiKeys::default();
        assert!(open.is_open());
        for path in ["/v1/models", "/admin/drain", "/health"] {
            assert_eq!(open.admit(path, &headers(None)), Ok(()));
        }
    }

    #[test]
    fn client_routes_take_either_key_and_admin_routes_only_the_admin_key() {
        let k = keys();
        let code = |path: &str, auth: Option<&str>| k.admit(path, &headers(auth)).err().and_then(|e| e.code);
        assert_eq!(code("/health", None), None);
        for page in ["/", "/dashboard.js", "/dashboard.css"] {
            assert_eq!(code(page, None), None, "the dashboard's files hold no data: {page}");
        }
        assert_eq!(code("/v1/chat/completions", None), Some("missing_api_key"));
        assert_eq!(code("/v1/chat/completions", Some("Bearer nope")), Some("invalid_api_key"));
        assert_eq!(code("/v1/chat/completions", Some("Bearer client-2")), None);
        assert_eq!(code("/v1/models", Some("bearer  admin-1")), None, "scheme in any case, spaces trimmed");
        assert_eq!(code("/v1/models", Some("Basic client-1")), Some("missing_api_key"));
        assert_eq!(code("/admin/drain", Some("Bearer client-1")), Some("admin_key_required"));
        assert_eq!(code("/admin/status", Some("Bearer admin-1")), None);
        assert_eq!(code("/admin/status", None), Some("missing_api_key"));
        assert_eq!(code("/no/such/route", None), Some("missing_api_key"), "a stranger learns nothing of the routes");
        assert_eq!(k.admit("/v1/models", &headers(None)).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn an_admin_key_alone_guards_only_the_admin_routes() {
        let k = ApiKeys::new(&[], &["admin-1".into()]).unwrap();
        assert!(!k.guards_clients());
        assert_eq!(k.admit("/v1/models", &headers(None)), Ok(()));
        assert!(k.admit("/admin/undrain", &headers(None)).is_err());
    }

    #[test]
    fn empty_or_spaced_keys_are_refused() {
        assert_eq!(ApiKeys::new(&["".into()], &[]).unwrap_err(), KeyError::Empty);
        assert_eq!(ApiKeys::new(&[], &["a b".into()]).unwrap_err(), KeyError::BadCharacter);
        assert!(format!("{:?}", keys()).contains("client: 2"));
    }

    #[test]
    fn a_key_matches_only_itself() {
        let stored = [digest("secret"), digest("other")];
        assert!(matches_any(&stored, &digest("other")));
        assert!(!matches_any(&stored, &digest("secre")));
        assert!(!matches_any(&[], &digest("secret")));
    }
}

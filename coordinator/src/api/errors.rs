//! Errors as OpenAI clients expect them: a status code and
//! `{"error": {"message", "type", "param", "code"}}`, for every failure the API can
//! report, including bodies axum could not parse and routes that do not exist.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;

/// A failed request, ready to be written as a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, as OpenAI names it (`"temperature"`, `"messages[1].role"`).
    pub param: Option<String>,
    /// A machine-readable reason where clients commonly match on one.
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None }
    }

    /// A 400 caused by one request field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).with_param(param)
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(param, message).with_code("unsupported_parameter")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message).with_code("not_found")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("the model `{model}` does not exist"))
            .with_param("model")
            .with_code("model_not_found")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// A 429 as OpenAI sends it when a client must slow down: here, the queue for
    /// the planned sequences did not move within the queue timeout.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, message).with_code("rate_limit_exceeded")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's `type`: the client's fault or ours, or (429) which limit was hit:
    /// OpenAI names it `requests` for a limit on requests.
    pub fn kind(&self) -> &'static str {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            "requests"
        } else if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        }
    }

    /// The JSON body, also sent as an event when a stream fails after it started.
    pub fn body(&self) -> String {
        let body = Body {
            error: Detail { message: &self.message, kind: self.kind(), param: self.param.as_deref(), code: self.code },
        };
        // A struct of strings always serializes.
        serde_json::to_string(&body).unwrap_or_else(|_| String::from(r#"{"error":{}}"#))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "request refused");
        }
        let headers = [(axum::http::header::CONTENT_TYPE, "application/json")];
        (self.status, headers, self.body()).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::InvalidRequest(_) => Self::new(StatusCode::BAD_REQUEST, message),
            EngineError::ContextOverflow { .. } => {
                Self::new(StatusCode::BAD_REQUEST, message).with_code("context_length_exceeded")
            }
            EngineError::Unavailable(_) | EngineError::ShuttingDown => Self::unavailable(message),
            EngineError::QueueTimeout { .. } => Self::rate_limited(message),
            EngineError::Internal(_) => Self::internal(message),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // The rejection's own text is a fixed sentence; what serde said is its source.
        let detail = std::error::Error::source(&rejection).map(ToString::to_string).unwrap_or_default();
        match rejection {
            JsonRejection::JsonSyntaxError(_) => {
                Self::invalid_json(format!("the request body is not valid json: {detail}"))
            }
            JsonRejection::JsonDataError(_) => {
                Self::invalid_json(format!("the request body must be a json object: {detail}"))
            }
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request needs the header `content-type: application/json`",
            ),
            other => {
                Self::new(other.status(), format!("cannot read the request body: {}", other.body_text().to_lowercase()))
            }
        }
    }
}

impl ApiError {
    fn invalid_json(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).with_code("invalid_json")
    }
}

/// `axum::Json`, failing with an [`ApiError`] rather than axum's plain-text rejection.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// What unknown routes answer.
pub async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// What known routes answer to a method they do not serve.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not accept {method}", uri.path()))
        .with_code("method_not_allowed")
}

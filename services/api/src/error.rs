//! API errors and the one place they become HTTP status codes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use piecework_core::FlowError;
use piecework_runtime::RuntimeError;
use piecework_store::StoreError;
use serde_json::{Value, json};

/// An error answered as `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    InvalidFlow { message: String, details: Value },
    #[error("{0}")]
    InvalidConnection(String),
    #[error("{0}")]
    InvalidBundle(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing, wrong or revoked API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("too many webhook calls: retry in {}s", retry_after.as_secs().max(1))]
    TooManyRequests { retry_after: std::time::Duration },
    /// The caller took too long to send its request (or the request to be answered).
    #[error("{0}")]
    RequestTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A piece asked on the caller's behalf answered with an error.
    #[error("{0}")]
    PieceFailed(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidFlow { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_flow"),
            ApiError::InvalidConnection(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_connection")
            }
            ApiError::InvalidBundle(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_bundle"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::PieceFailed(_) => (StatusCode::BAD_GATEWAY, "piece_failed"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut error = json!({ "code": code, "message": self.to_string() });
        match &self {
            ApiError::InvalidFlow { details, .. } => error["details"] = details.clone(),
            ApiError::Internal(message) => tracing::error!(error = %message, "request failed"),
            _ => {}
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        if let ApiError::TooManyRequests { retry_after } = &self {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0).to_string();
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds) {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(message) => ApiError::Unavailable(message),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<FlowError> for ApiError {
    fn from(err: FlowError) -> Self {
        match &err {
            FlowError::Parse { .. } => ApiError::BadRequest(err.to_string()),
            FlowError::Invalid { issues, .. } => ApiError::InvalidFlow {
                details: json!({ "issues": issues }),
                message: err.to_string(),
            },
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(err: RuntimeError) -> Self {
        match err {
            RuntimeError::Store(err) => err.into(),
            RuntimeError::Flow(err) => err.into(),
            RuntimeError::Bus(err) => ApiError::Unavailable(err.to_string()),
            RuntimeError::Http(err) => ApiError::Internal(err.to_string()),
            RuntimeError::NoSuchRun(id) => ApiError::NotFound(format!("no run `{id}`")),
            RuntimeError::Conflict(message) => ApiError::Conflict(message),
            RuntimeError::NoSuchConnection(name) => {
                ApiError::NotFound(format!("no connection `{name}`"))
            }
            RuntimeError::InvalidConnection(message) => ApiError::InvalidConnection(message),
            RuntimeError::Secrets(err) => ApiError::Unavailable(err.to_string()),
            RuntimeError::InvalidBundle(message) => ApiError::InvalidBundle(message),
            RuntimeError::NoSuchPiece(what) => ApiError::NotFound(format!("no piece `{what}`")),
            RuntimeError::NoSuchFlow(id) => ApiError::NotFound(format!("no flow `{id}`")),
            RuntimeError::NoSuchApiKey(name) => ApiError::NotFound(format!("no API key `{name}`")),
            RuntimeError::Invalid(message) => ApiError::BadRequest(message),
            RuntimeError::Unavailable(message) => ApiError::Unavailable(message),
            RuntimeError::PieceFailed(message) => ApiError::PieceFailed(message),
            err @ RuntimeError::StaleAdmission(_) => ApiError::Unavailable(err.to_string()),
            RuntimeError::Registry(err) => match err {
                piecework_bus::pieces::RegistryError::Conflict(message) => {
                    ApiError::Conflict(message)
                }
                other => ApiError::Unavailable(other.to_string()),
            },
        }
    }
}

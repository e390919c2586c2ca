//! Errors a piece returns, and whether the engine should try again.
//!
//! The engine retries only what can succeed on a later attempt: network failures, timeouts,
//! 5xx and 429 responses. Validation errors, 4xx responses and bad credentials fail the step at
//! once, because retrying them only delays the same answer.

use std::fmt;
use std::time::Duration;

/// Whether a failed attempt is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A later attempt may succeed (network, timeout, 5xx, 429).
    Retryable,
    /// Repeating cannot help (validation, 4xx, auth, a bug in the input).
    Fatal,
}

/// The error type of every action and trigger.
///
/// Messages end up in run state, `pw:results` and the API: never put a secret in one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceError {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

impl PieceError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Fatal,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Classifies an HTTP status the way the engine expects: 408, 425, 429 and 5xx are
    /// retryable, every other non-success status is fatal.
    pub fn from_status(status: u16, detail: impl fmt::Display) -> Self {
        let message = format!("HTTP {status}: {detail}");
        if matches!(status, 408 | 425 | 429) || status >= 500 {
            Self::retryable(message)
        } else {
            Self::fatal(message)
        }
    }

    /// Asks the engine to wait at least this long before the next attempt (e.g. a 429's
    /// `Retry-After`). The retry policy's own delay still applies when it is longer.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Retryable
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Prefixes the message with where the error happened, keeping its kind.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for PieceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PieceError {}

impl From<crate::prop::PropError> for PieceError {
    fn from(err: crate::prop::PropError) -> Self {
        Self::fatal(err.to_string())
    }
}

impl From<reqwest::Error> for PieceError {
    /// Network failures and timeouts are retryable, a destination the egress policy refuses
    /// (found at resolution or on a redirect) is fatal; the URL is stripped from the message
    /// because query strings often carry tokens.
    fn from(err: reqwest::Error) -> Self {
        if let Some(denied) = crate::egress::denial_in(&err) {
            return Self::fatal(denied.message());
        }
        let retryable = err.is_timeout() || err.is_connect() || err.is_request() || err.is_body();
        if let Some(status) = err.status() {
            return Self::from_status(status.as_u16(), err.without_url());
        }
        let message = format!("http request failed: {}", error_chain(&err.without_url()));
        if retryable {
            Self::retryable(message)
        } else {
            Self::fatal(message)
        }
    }
}

/// Renders an error with its sources, which reqwest keeps the useful part in.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(PieceError::from_status(503, "down").is_retryable());
        assert!(PieceError::from_status(429, "slow down").is_retryable());
        assert!(PieceError::from_status(408, "timeout").is_retryable());
        assert!(!PieceError::from_status(404, "missing").is_retryable());
        assert!(!PieceError::from_status(401, "who are you").is_retryable());
        assert_eq!(
            PieceError::from_status(400, "bad").to_string(),
            "HTTP 400: bad"
        );
    }
}

//! The HTTP client handed to pieces.
//!
//! It is one shared `reqwest` client (rustls, certificate validation always on) wrapped with the
//! installation's egress policy, so an operator decides which hosts pieces may reach and whether
//! plain HTTP is allowed, instead of every piece author deciding for themselves.

use std::sync::{Arc, Once};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, Url};
use serde::{Deserialize, Serialize};

use crate::error::PieceError;

/// Which hosts pieces may call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressPolicy {
    /// Hosts pieces may call; empty means any. `*.example.com` matches subdomains.
    pub allow_hosts: Vec<String>,
    /// Hosts pieces may never call, checked before `allow_hosts`.
    pub deny_hosts: Vec<String>,
    /// Refuse plain `http://` URLs (the guide: "use HTTPS for all API calls").
    pub https_only: bool,
}

impl EgressPolicy {
    /// Checks a URL against the policy; the error names the host, never the full URL.
    pub fn check(&self, url: &Url) -> Result<(), PieceError> {
        let host = url.host_str().unwrap_or_default();
        if self.https_only && url.scheme() != "https" {
            return Err(PieceError::fatal(format!(
                "egress policy: plain {} to {host} is not allowed (https_only)",
                url.scheme()
            )));
        }
        if self.deny_hosts.iter().any(|p| host_matches(p, host)) {
            return Err(PieceError::fatal(format!(
                "egress policy: host {host} is denied"
            )));
        }
        if !self.allow_hosts.is_empty() && !self.allow_hosts.iter().any(|p| host_matches(p, host)) {
            return Err(PieceError::fatal(format!(
                "egress policy: host {host} is not in allow_hosts"
            )));
        }
        Ok(())
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host[..host.len() - suffix.len()].ends_with('.')
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The HTTP client of a piece's context. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
}

/// rustls needs one process-wide crypto provider; piecework uses `ring` (no C toolchain
/// beyond what `ring` needs, no OpenSSL).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl HttpClient {
    pub fn new(egress: EgressPolicy) -> Result<Self, PieceError> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("piecework/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| PieceError::fatal(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            client,
            egress: Arc::new(egress),
        })
    }

    /// Starts a request after checking the URL against the egress policy.
    pub fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, PieceError> {
        let url = Url::parse(url).map_err(|e| PieceError::fatal(format!("invalid URL: {e}")))?;
        self.egress.check(&url)?;
        Ok(self.client.request(method, url))
    }

    pub fn get(&self, url: &str) -> Result<RequestBuilder, PieceError> {
        self.request(Method::GET, url)
    }

    pub fn post(&self, url: &str) -> Result<RequestBuilder, PieceError> {
        self.request(Method::POST, url)
    }

    /// Sends and classifies failures: network errors, 5xx and 429 are retryable (with the
    /// server's `Retry-After` honoured), other non-success statuses are fatal.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, PieceError> {
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(&response);
        let body = response.text().await.unwrap_or_default();
        let err = PieceError::from_status(status.as_u16(), truncate(&body, 512));
        Err(match retry_after {
            Some(delay) => err.with_retry_after(delay),
            None => err,
        })
    }

    /// Sends and parses a JSON body.
    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: RequestBuilder,
    ) -> Result<T, PieceError> {
        let response = self.send(request).await?;
        response.json().await.map_err(|e| {
            PieceError::fatal(format!(
                "response is not the expected JSON: {}",
                e.without_url()
            ))
        })
    }
}

fn retry_after(response: &Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_policy_checks_hosts_and_scheme() {
        let policy = EgressPolicy {
            allow_hosts: vec!["*.corp.example".into(), "api.example.com".into()],
            deny_hosts: vec!["secret.corp.example".into()],
            https_only: true,
        };
        let ok = |u: &str| policy.check(&Url::parse(u).unwrap()).is_ok();
        assert!(ok("https://tickets.corp.example/v1"));
        assert!(ok("https://api.example.com/"));
        assert!(!ok("https://corp.example/"));
        assert!(!ok("https://evilcorp.example/"));
        assert!(!ok("https://secret.corp.example/"));
        assert!(!ok("http://api.example.com/"));
        let err = policy
            .check(&Url::parse("https://x.org/?token=abc").unwrap())
            .unwrap_err();
        assert!(!err.to_string().contains("abc"), "{err}");
    }
}

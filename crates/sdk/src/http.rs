//! The HTTP client handed to pieces.
//!
//! It is one shared `reqwest` client (rustls, certificate validation always on) wrapped with the
//! installation's egress policy, so an operator decides which hosts pieces may reach and whether
//! plain HTTP is allowed, instead of every piece author deciding for themselves.

use std::sync::{Arc, Once};
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, ResponseBuilderExt as _, Url};

pub use crate::egress::EgressPolicy;
use crate::egress::{EgressGuard, GuardedResolver};
use crate::error::PieceError;

/// Redirects followed before a request fails, as browsers and reqwest's default do.
const MAX_REDIRECTS: usize = 10;
/// How much of an error response's body is read for the error message.
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// The HTTP client of a piece's context. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    guard: Arc<EgressGuard>,
    max_response_bytes: u64,
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
    /// A client held to `egress`: every URL (redirects included) is checked, every name is
    /// resolved by the guard, proxies from the environment are not used (they would resolve
    /// the destination out of the guard's sight).
    pub fn new(egress: EgressPolicy) -> Result<Self, PieceError> {
        install_crypto_provider();
        let guard = Arc::new(
            egress
                .compile()
                .map_err(|e| PieceError::fatal(format!("egress policy: {e}")))?,
        );
        let redirects = guard.clone();
        let client = reqwest::Client::builder()
            .user_agent(concat!("piecework/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .dns_resolver(GuardedResolver::new(guard.clone()))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(denied) => attempt.error(denied),
                }
            }))
            .build()
            .map_err(|e| PieceError::fatal(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            client,
            guard,
            max_response_bytes: egress.max_response_bytes,
        })
    }

    /// The same client reading responses up to `max` bytes (a step's own limit).
    pub fn with_max_response_bytes(&self, max: u64) -> Self {
        Self {
            max_response_bytes: max.max(1),
            ..self.clone()
        }
    }

    /// The largest response body [`HttpClient::send`] and [`HttpClient::fetch`] read.
    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes
    }

    /// Starts a request after checking the URL against the egress policy.
    pub fn request(&self, method: Method, url: &str) -> Result<RequestBuilder, PieceError> {
        let url = Url::parse(url).map_err(|e| PieceError::fatal(format!("invalid URL: {e}")))?;
        self.guard.check_url(&url)?;
        Ok(self.client.request(method, url))
    }

    pub fn get(&self, url: &str) -> Result<RequestBuilder, PieceError> {
        self.request(Method::GET, url)
    }

    pub fn post(&self, url: &str) -> Result<RequestBuilder, PieceError> {
        self.request(Method::POST, url)
    }

    /// Sends, reads the body (up to the response limit) and classifies failures: network
    /// errors, 5xx and 429 are retryable (with the server's `Retry-After` honoured), other
    /// non-success statuses are fatal, and so is a body over the limit.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, PieceError> {
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            return self.buffered(response).await;
        }
        let retry_after = retry_after(&response);
        let (body, _) = read_prefix(response, ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&body);
        let err = PieceError::from_status(status.as_u16(), truncate(&body, 512));
        Err(match retry_after {
            Some(delay) => err.with_retry_after(delay),
            None => err,
        })
    }

    /// Sends and reads the body (up to the response limit) whatever the status: for callers
    /// that treat error statuses as answers. Network errors are retryable, a body over the
    /// limit is fatal.
    pub async fn fetch(&self, request: RequestBuilder) -> Result<Response, PieceError> {
        let response = request.send().await?;
        self.buffered(response).await
    }

    /// Reads the whole body within the limit and hands back a response that holds it, so
    /// `text()`, `json()` and `bytes()` work as usual but cannot be made to buffer more.
    async fn buffered(&self, response: Response) -> Result<Response, PieceError> {
        let (status, version, url) = (
            response.status(),
            response.version(),
            response.url().clone(),
        );
        let headers = response.headers().clone();
        let host = url.host_str().unwrap_or_default().to_owned();
        let too_large = || {
            PieceError::fatal(format!(
                "the response from {host} is larger than {} bytes (max_response_bytes)",
                self.max_response_bytes
            ))
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_response_bytes)
        {
            return Err(too_large());
        }
        let (body, complete) = read_prefix(response, self.max_response_bytes).await?;
        if !complete {
            return Err(too_large());
        }
        let mut rebuilt = http::Response::builder()
            .status(status)
            .version(version)
            .url(url);
        if let Some(map) = rebuilt.headers_mut() {
            *map = headers;
        }
        let rebuilt = rebuilt
            .body(body)
            .map_err(|e| PieceError::fatal(format!("cannot rebuild the response: {e}")))?;
        Ok(Response::from(rebuilt))
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

/// Reads the body up to `max` bytes; the flag says whether that was all of it.
async fn read_prefix(mut response: Response, max: u64) -> Result<(Vec<u8>, bool), PieceError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = usize::try_from(max).unwrap_or(usize::MAX) - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
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

//! The HTTP API (axum): the pieces catalog and registry, flows, runs, webhooks, the audit
//! trail, and the health endpoints.
//!
//! Routes live in `routes` (and the piece routes in `pieces`), errors and their status codes
//! in [`error`]. Every mutation is
//! audited. With an API key configured, `/v1/*` requires `Authorization: Bearer <key>` except
//! webhooks, which are addressed by flow id and meant to be called by other systems.

pub mod error;
mod pieces;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use piecework_runtime::Runtime;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use routes::router;

/// How the API serves.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// When set, `/v1/*` (except webhooks) requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How long `POST /v1/webhooks/{flow}/sync` waits for the run to finish.
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
    /// Largest bundle `POST /v1/pieces` accepts, in bytes.
    pub max_bundle_bytes: usize,
}

impl std::fmt::Debug for ApiConfig {
    /// Keeps the API key out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("sync_timeout", &self.sync_timeout)
            .field("max_bundle_bytes", &self.max_bundle_bytes)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            sync_timeout: Duration::from_secs(30),
            max_bundle_bytes: 128 << 20,
        }
    }
}

impl ApiConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(key) = &self.api_key
            && key.len() < 16
        {
            return Err("api_key: must be at least 16 characters".into());
        }
        if self.sync_timeout.is_zero() {
            return Err("sync_timeout: must be greater than zero".into());
        }
        if self.max_bundle_bytes < 1024 {
            return Err("max_bundle_bytes: must be at least 1024".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServiceError {
    #[error("invalid api config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// Binds the listener (so the caller can learn the port before serving).
pub async fn bind(config: &ApiConfig) -> Result<TcpListener, ApiServiceError> {
    config.validate().map_err(ApiServiceError::Config)?;
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiServiceError::Bind {
            addr: config.listen,
            source,
        })
}

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes open requests.
pub async fn serve(
    listener: TcpListener,
    config: ApiConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), ApiServiceError> {
    let app = router(runtime, config);
    tracing::info!(addr = %listener.local_addr().map_err(ApiServiceError::Serve)?, "api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ApiServiceError::Serve)
}

/// Binds and serves: the whole service.
pub async fn run(
    config: ApiConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), ApiServiceError> {
    let listener = bind(&config).await?;
    serve(listener, config, runtime, shutdown).await
}

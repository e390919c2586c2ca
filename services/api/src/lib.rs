//! The HTTP API (axum): the pieces catalog and registry, flows, runs, webhooks, API keys, the
//! audit trail, the health endpoints, the web console (`console`, at `/`) and the API's
//! OpenAPI document ([`openapi`], at `/openapi.json`).
//!
//! Routes live in `routes` (and the piece routes in `pieces`), each with its access policy
//! ([`access`]): `/v1/*` needs `Authorization: Bearer <key>` of a role that may do what the
//! route does, except webhooks, which are addressed by flow id and meant to be called by
//! other systems. Errors and their status codes are in [`error`]; the bodies the handlers
//! answer with are the types of [`answers`], which the OpenAPI document describes. Every
//! mutation is audited, with the key's name as the actor.

pub mod access;
pub mod answers;
mod console;
pub mod error;
pub mod limits;
pub mod openapi;
mod pieces;
mod routes;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use piecework_runtime::Runtime;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::{Access, RouteInfo, route_table};
pub use routes::{encode_metrics, router};

/// How the API serves.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The bootstrap admin key (from `PW_API_KEY` or `api_key_file`): it works besides the
    /// named keys in the store, under the name `bootstrap`.
    pub api_key: Option<String>,
    /// A file holding the bootstrap admin key (`PW_API_KEY_FILE`), for secrets mounted as
    /// files; read at start.
    pub api_key_file: Option<std::path::PathBuf>,
    /// Serve without keys, everyone an admin: only `piecework dev` on loopback sets it.
    #[serde(skip)]
    pub open: bool,
    /// How long `POST /v1/webhooks/{flow}/sync` waits for the run to finish.
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
    /// Largest bundle `POST /v1/pieces` accepts, in bytes.
    pub max_bundle_bytes: usize,
    /// Largest webhook body accepted, in bytes (larger: 413).
    pub max_webhook_bytes: usize,
    /// Webhook calls this process accepts in all (`10000/s`; `0` for no limit), checked
    /// before anything else: beyond it, 429 with `Retry-After`.
    pub webhook_rate: limits::Rate,
    /// Webhook calls this process accepts per flow (`1000/s`), once a call is admitted.
    pub webhook_rate_per_flow: limits::Rate,
    /// How long a client may take to send a request's headers (idle keep-alive connections
    /// count too): a slow client's connection is closed after it.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a request may take, its body included: 408 after it. Longer than
    /// `sync_timeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// On shutdown, how long open requests may take before their connections are dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The API's address as callers outside reach it (`PW_PUBLIC_URL`), for the resume URLs
    /// of webhook waits (default: `http://` and `listen`).
    pub public_url: Option<String>,
}

impl std::fmt::Debug for ApiConfig {
    /// Keeps the API key out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_file", &self.api_key_file)
            .field("open", &self.open)
            .field("sync_timeout", &self.sync_timeout)
            .field("max_bundle_bytes", &self.max_bundle_bytes)
            .field("max_webhook_bytes", &self.max_webhook_bytes)
            .field("webhook_rate", &self.webhook_rate)
            .field("webhook_rate_per_flow", &self.webhook_rate_per_flow)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("public_url", &self.public_url)
            .finish()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            api_key_file: None,
            open: false,
            sync_timeout: Duration::from_secs(30),
            max_bundle_bytes: 128 << 20,
            max_webhook_bytes: 1 << 20,
            webhook_rate: limits::Rate::per_second(10_000),
            webhook_rate_per_flow: limits::Rate::per_second(1_000),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            public_url: None,
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
        if self.max_webhook_bytes < 1024 {
            return Err("max_webhook_bytes: must be at least 1024".into());
        }
        if self.header_read_timeout < Duration::from_secs(1) {
            return Err("header_read_timeout: must be at least 1s".into());
        }
        if self.request_timeout <= self.sync_timeout {
            return Err(format!(
                "request_timeout: must be longer than sync_timeout ({})",
                humantime::format_duration(self.sync_timeout)
            ));
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
    let timeouts = server::Timeouts {
        header_read: config.header_read_timeout,
        request: config.request_timeout,
        shutdown_grace: config.shutdown_grace,
    };
    // Runs this api recorded but could not hand to the bus (it was away) go out from here
    // once it is back, even with no scheduler running.
    let relay = {
        let (runtime, shutdown) = (runtime.clone(), shutdown.clone());
        tokio::spawn(async move { runtime.relay_outbox_until(shutdown).await })
    };
    let app = router(runtime, config);
    tracing::info!(addr = %listener.local_addr().map_err(ApiServiceError::Serve)?, "api listening");
    server::serve(listener, app, timeouts, shutdown).await;
    relay.abort();
    Ok(())
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

//! `/healthz`, `/readyz` and `/metrics` for the worker and the scheduler, on their own small
//! port (the API serves the same paths on its own).
//!
//! `/healthz` answers while the process runs; `/readyz` only while its dependencies answer
//! and (for a worker) every queue is being consumed, so an orchestrator restarts or stops
//! routing to a process that is up but useless. `/metrics` is the Prometheus scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// What `/readyz` checks: `Err` with the reasons when not ready.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What `/metrics` answers: the exposition, refreshed as the process needs.
pub type MetricsSource = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Binds `addr` and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    ready: ReadyCheck,
    metrics: MetricsSource,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for health checks (set --health-listen)")
    })?;
    tracing::info!(addr = %listener.local_addr()?, "health endpoints listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (StatusCode::OK, "ready".to_owned()),
                        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, reasons),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            piecework_telemetry::metrics::CONTENT_TYPE,
                        )],
                        metrics().await,
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("health server")
}

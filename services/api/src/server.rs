//! The connection loop: the router on hyper's HTTP/1 connections, with the timeouts that
//! `axum::serve` does not offer.
//!
//! A client that dribbles its headers a byte at a time (slowloris) would hold a connection —
//! and a task — for as long as it likes: `header_read_timeout` closes it. A client that sends
//! its body slowly, or a request that takes too long to answer, is answered 408 after
//! `request_timeout` (routes that wait on purpose, like synchronous webhooks, finish well
//! within it: `sync_timeout` must be shorter). On shutdown the listener closes, open
//! connections finish the request they are on and close, and whatever is still open after
//! `shutdown_grace` is dropped.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// How long a connection may take, and how long shutdown waits for open ones.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub request: Duration,
    pub shutdown_grace: Duration,
}

/// Answers 408 when a request (its body included) is not handled within `limit`.
pub async fn limit_request_time(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(format!(
            "the request was not finished within {} (the api's request_timeout)",
            humantime::format_duration(limit)
        ))
        .into_response(),
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(timeouts.header_read))
        .keep_alive(true);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // wait a little instead of spinning, as axum::serve does.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(timeouts.shutdown_grace) => {
            tracing::warn!(grace = ?timeouts.shutdown_grace, "connections still open at shutdown were dropped");
        }
    }
}

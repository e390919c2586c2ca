//! Baselines besides raw JetStream: what a bare HTTP server answers on this machine, under the
//! load client the synchronous webhook scenario uses.
//!
//! The server is this harness itself, re-started as its own process with
//! `--serve-bare-http ADDR`: one axum route answering fixed JSON, nothing else — the ceiling
//! for any HTTP service here, piecework's api included.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use piecework_testkit::free_port;

use crate::scenarios::{WebhookLoad, load};

/// Serves `POST /json` (and `GET /healthz`) with fixed answers until killed.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route(
            "/json",
            axum::routing::post(|| async {
                axum::Json(serde_json::json!({ "greeting": "hello, ada" }))
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// The bare server's requests per second and latencies at each client count.
pub async fn bare_http(levels: &[usize], duration: Duration) -> anyhow::Result<Vec<WebhookLoad>> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let server = Server(
        Command::new(std::env::current_exe()?)
            .args(["--serve-bare-http", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the bare HTTP server")?,
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("http://{addr}/json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .is_err()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the bare HTTP server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut loads = Vec::new();
    for &clients in levels {
        loads.push(load(&http, &url, clients, duration).await?);
    }
    drop(server);
    Ok(loads)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

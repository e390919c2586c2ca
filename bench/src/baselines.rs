//! Baselines besides raw JetStream: what a bare HTTP server answers on this machine, under the
//! load client the synchronous webhook scenario uses, and what a bare HTTP client holds in
//! memory per request in flight.
//!
//! Both are this harness itself, re-started as its own process: with `--serve-bare-http ADDR`,
//! one axum route answering fixed JSON, nothing else — the ceiling for any HTTP service here,
//! piecework's api included; with `--hold-url URL --hold-count N`, a reqwest client (rustls, as
//! pieces get) sending N requests at once, each in its own task — the floor under a worker's
//! memory per in-flight HTTP step.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use piecework_testkit::free_port;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::fleet::rss_bytes;
use crate::scenarios::{Hold, WebhookLoad, load};

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

/// The held-requests client: says `ready` once its client is built, then on a line from stdin
/// sends `count` GETs to `url` at once, each in its own task, and waits for their answers.
pub async fn hold_client(url: &str, count: usize) -> anyhow::Result<()> {
    piecework_sdk::http::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build()?;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(b"ready\n").await?;
    stdout.flush().await?;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let requests: Vec<_> = (0..count)
        .map(|_| tokio::spawn(client.get(url).send()))
        .collect();
    for request in requests {
        request.await??;
    }
    Ok(())
}

/// Resident memory a bare HTTP client takes per request held open by the server, in KiB.
pub async fn held_request_kib(count: usize) -> anyhow::Result<f64> {
    let hold = Hold::start().await?;
    let mut client = Server(
        Command::new(std::env::current_exe()?)
            .args([
                "--hold-url",
                &format!("{}/hold", hold.url),
                "--hold-count",
                &count.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the held-requests client")?,
    );
    let pid = client.0.id();
    let stdout = client.0.stdout.take().context("no stdout")?;
    let mut stdin = client.0.stdin.take().context("no stdin")?;
    let mut ready = String::new();
    tokio::task::spawn_blocking(move || {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)
    })
    .await??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_bytes(pid)?;
    std::io::Write::write_all(&mut stdin, b"go\n")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hold.waiting() < count {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} of {count} held requests arrived",
            hold.waiting()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loaded = rss_bytes(pid)?;
    hold.release();
    drop(client);
    Ok(loaded.saturating_sub(idle) as f64 / 1024.0 / count as f64)
}

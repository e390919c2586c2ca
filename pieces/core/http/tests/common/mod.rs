//! A local HTTP responder and the helpers the `http` piece's tests share.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use piecework_sdk::{Context, EgressPolicy, HttpClient, MemoryKv, Owner, RunInfo, ScopedStore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The requests a responder saw, in order.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Answers each connection on 127.0.0.1 with the next canned response and keeps the requests
/// it saw.
pub async fn responder(responses: Vec<&'static str>) -> (String, Seen) {
    responder_on(
        "127.0.0.1",
        responses.into_iter().map(str::to_owned).collect(),
    )
    .await
}

/// [`responder`] on `ip` (any loopback address), with responses made at run time.
pub async fn responder_on(ip: &str, responses: Vec<String>) -> (String, Seen) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for response in responses {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 16 * 1024];
            let n = socket.read(&mut buf).await.unwrap();
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.ok();
        }
    });
    (format!("http://{addr}"), seen)
}

/// A step's context whose HTTP client is held to `egress`.
pub fn context(egress: EgressPolicy) -> Context {
    Context::new(
        RunInfo::new("run-1", "flow", 1, "call", 1),
        Owner::default(),
        ScopedStore::new(Arc::new(MemoryKv::default()), "flow"),
        HttpClient::new(egress).unwrap(),
    )
}

/// Runs `send_request` with `input`.
pub async fn send(ctx: &Context, input: Value) -> Result<Value, piecework_sdk::PieceError> {
    let piece = piecework_piece_http::piece().unwrap();
    piece
        .action("send_request")
        .unwrap()
        .run_json(ctx, input)
        .await
}

//! `send_request` against a local HTTP responder: outputs, error classification, egress.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use piecework_sdk::{Context, EgressPolicy, HttpClient, MemoryKv, Owner, RunInfo, ScopedStore};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Answers each connection with the next canned response and keeps the requests it saw.
async fn responder(responses: Vec<&'static str>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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

fn context(egress: EgressPolicy) -> Context {
    Context::new(
        RunInfo::new("run-1", "flow", 1, "call", 1),
        Owner::default(),
        ScopedStore::new(Arc::new(MemoryKv::default()), "flow"),
        HttpClient::new(egress).unwrap(),
    )
}

async fn send(ctx: &Context, input: Value) -> Result<Value, piecework_sdk::PieceError> {
    let piece = piecework_piece_http::piece().unwrap();
    piece
        .action("send_request")
        .unwrap()
        .run_json(ctx, input)
        .await
}

#[tokio::test]
async fn a_json_response_becomes_the_output_and_the_request_carries_the_idempotency_key() {
    let (base, seen) = responder(vec![
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
    ])
    .await;
    let input = json!({"method": "POST", "url": format!("{base}/tickets"), "query": {"team": "ops"}, "body": {"title": "t"}});
    let output = send(&context(EgressPolicy::default()), input)
        .await
        .unwrap();
    assert_eq!(output["status"], 200);
    assert_eq!(output["body"], json!({"ok": true}));
    let request = seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(request.starts_with("post /tickets?team=ops "), "{request}");
    assert!(request.contains("idempotency-key: run-1:call"), "{request}");
}

#[tokio::test]
async fn server_errors_are_retryable_and_honour_retry_after() {
    let (base, _) =
        responder(vec!["HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndown"])
            .await;
    let err = send(&context(EgressPolicy::default()), json!({"url": base}))
        .await
        .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(err.to_string(), "HTTP 503: down");
}

#[tokio::test]
async fn client_errors_are_fatal_unless_fail_on_error_is_off() {
    let not_found =
        "HTTP/1.1 404 Not Found\r\ncontent-length: 7\r\nconnection: close\r\n\r\nmissing";
    let (base, _) = responder(vec![not_found, not_found]).await;
    let err = send(&context(EgressPolicy::default()), json!({"url": base}))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let output = send(
        &context(EgressPolicy::default()),
        json!({"url": base, "fail_on_error": false}),
    )
    .await
    .unwrap();
    assert_eq!(output["status"], 404);
    assert_eq!(output["body"], "missing");
}

#[tokio::test]
async fn unreachable_hosts_are_retryable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = send(
        &context(EgressPolicy::default()),
        json!({"url": format!("http://{addr}/")}),
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn the_egress_policy_is_enforced_before_any_request() {
    let policy = EgressPolicy {
        https_only: true,
        ..EgressPolicy::default()
    };
    let err = send(
        &context(policy),
        json!({"url": "http://127.0.0.1:9/?token=s3cret"}),
    )
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("https_only"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let err = send(
        &context(EgressPolicy::default()),
        json!({"url": "http://x", "method": "FETCH"}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("prop `method`"), "{err}");
}

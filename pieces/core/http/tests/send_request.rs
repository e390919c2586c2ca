//! `send_request` against a local HTTP responder: outputs, error classification.

mod common;

use std::time::Duration;

use common::{context, responder, send};
use piecework_sdk::EgressPolicy;
use serde_json::json;
use tokio::net::TcpListener;

#[tokio::test]
async fn a_json_response_becomes_the_output_and_the_request_carries_the_idempotency_key() {
    let (base, seen) = responder(vec![
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
    ])
    .await;
    let input = json!({"method": "POST", "url": format!("{base}/tickets"), "query": {"team": "ops"}, "body": {"title": "t"}});
    let output = send(&context(EgressPolicy::allowing_loopback()), input)
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
    let err = send(
        &context(EgressPolicy::allowing_loopback()),
        json!({"url": base}),
    )
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
    let err = send(
        &context(EgressPolicy::allowing_loopback()),
        json!({"url": base}),
    )
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    let output = send(
        &context(EgressPolicy::allowing_loopback()),
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
        &context(EgressPolicy::allowing_loopback()),
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
        &context(EgressPolicy::allowing_loopback()),
        json!({"url": "http://x", "method": "FETCH"}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("prop `method`"), "{err}");
}

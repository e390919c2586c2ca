//! The egress guard as a piece meets it: every loopback spelling, redirects to denied
//! addresses and oversized responses, against real sockets on loopback. (Other internal
//! ranges are covered at the guard's level, in `piecework_sdk::egress`, without traffic.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{context, responder, responder_on, send};
use piecework_sdk::EgressPolicy;
use serde_json::json;
use tokio::net::TcpListener;

/// A listener on `ip` that counts the connections made to it and answers none.
async fn counting_listener(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, count)
}

#[tokio::test]
async fn every_loopback_spelling_is_refused_before_a_connection() {
    let (port, connections) = counting_listener("127.0.0.1").await;
    let ctx = context(EgressPolicy::default());
    for host in [
        "127.0.0.1",
        "localhost",
        "LOCALHOST",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[64:ff9b::7f00:1]",
        "0.0.0.0",
        "[::]",
    ] {
        let url = format!("http://{host}:{port}/admin?token=s3cret");
        let err = send(&ctx, json!({"url": url})).await.unwrap_err();
        assert!(!err.is_retryable(), "{host}: {err}");
        let message = err.to_string();
        assert!(message.starts_with("egress policy: "), "{host}: {message}");
        assert!(!message.contains("s3cret"), "{message}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn redirects_are_checked_at_every_hop() {
    // Only 127.0.0.1 is allowed: a redirect to another loopback address (or the same one
    // spelled as mapped IPv6) is refused before it is followed.
    let policy = EgressPolicy {
        allow: vec!["127.0.0.1/32".into()],
        ..EgressPolicy::default()
    };
    let (target_port, connections) = counting_listener("127.0.0.2").await;
    for location in [
        format!("http://127.0.0.2:{target_port}/"),
        format!("http://[::ffff:127.0.0.2]:{target_port}/"),
    ] {
        let (redirector, seen) = responder_on(
            "127.0.0.1",
            vec![format!(
                "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )],
        )
        .await;
        let err = send(&context(policy.clone()), json!({"url": redirector}))
            .await
            .unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), 1, "the redirector was called");
        assert!(!err.is_retryable(), "{location}: {err}");
        assert!(
            err.to_string().contains("egress policy"),
            "{location}: {err}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0);

    // An allowed hop is followed.
    let (target, _) = responder(vec![
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    ])
    .await;
    let (redirector, _) = responder_on(
        "127.0.0.1",
        vec![format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}/next\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )],
    )
    .await;
    let output = send(&context(policy), json!({"url": redirector}))
        .await
        .unwrap();
    assert_eq!(output["body"], "ok");
}

#[tokio::test]
async fn responses_over_the_limit_fail_the_step() {
    let policy = EgressPolicy {
        max_response_bytes: 1000,
        ..EgressPolicy::allowing_loopback()
    };
    let big = "x".repeat(1001);
    let exact = "y".repeat(1000);
    let (base, _) = responder_on(
        "127.0.0.1",
        vec![
            // Refused from its length alone.
            format!("HTTP/1.1 200 OK\r\ncontent-length: 1001\r\nconnection: close\r\n\r\n{big}"),
            // No length: refused once the limit is passed.
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{big}"),
            // Error statuses read as answers are held to the limit too.
            format!("HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\n{big}"),
            // Exactly the limit is fine.
            format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{exact}"),
        ],
    )
    .await;
    let ctx = context(policy);
    for input in [
        json!({"url": base}),
        json!({"url": base}),
        json!({"url": base, "fail_on_error": false}),
    ] {
        let err = send(&ctx, input).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(
            err.to_string()
                .contains("is larger than 1000 bytes (max_response_bytes)"),
            "{err}"
        );
    }
    let output = send(&ctx, json!({"url": base})).await.unwrap();
    assert_eq!(output["body"], exact);

    // A step's own limit replaces the installation's.
    let (base, _) = responder(vec![
        "HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
    ])
    .await;
    let mut ctx = context(EgressPolicy::allowing_loopback());
    ctx.http = ctx.http.with_max_response_bytes(10);
    let err = send(&ctx, json!({"url": base})).await.unwrap_err();
    assert!(err.to_string().contains("larger than 10 bytes"), "{err}");
}

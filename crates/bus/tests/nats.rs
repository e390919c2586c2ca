//! The JetStream adapter against a real nats-server (testkit), including a restart.

use std::time::{Duration, Instant};

use bytes::Bytes;
use piecework_bus::nats::{NatsBus, NatsConfig};
use piecework_bus::{Bus, ConsumeOptions, Consumer, Delivery, Message, subject};
use piecework_testkit::NatsServer;

async fn bus(server: &NatsServer) -> NatsBus {
    let config = NatsConfig {
        url: server.url(),
        ..NatsConfig::default()
    };
    NatsBus::connect(config)
        .await
        .expect("connects and creates the stream")
}

fn job(queue: &str, id: &str, payload: &'static str) -> Message {
    Message {
        subject: subject::step(queue),
        msg_id: id.into(),
        headers: vec![(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        )],
        payload: Bytes::from_static(payload.as_bytes()),
    }
}

fn options(ack_wait: Duration) -> ConsumeOptions {
    ConsumeOptions {
        max_ack_pending: 100,
        ack_wait,
    }
}

async fn one(consumer: &mut Box<dyn Consumer>, wait: Duration) -> Option<Delivery> {
    let mut batch = consumer.fetch(1, wait).await.expect("fetch works");
    assert!(batch.len() <= 1);
    batch.pop()
}

#[tokio::test]
async fn publishes_are_deduplicated_and_acks_remove_the_job() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    assert!(
        !bus.publish(job("default", "run-1:a", "1"))
            .await
            .unwrap()
            .duplicate
    );
    assert!(
        bus.publish(job("default", "run-1:a", "1"))
            .await
            .unwrap()
            .duplicate
    );
    // Connecting again (another process starting) leaves the stream as it is.
    let other = self::bus(&server).await;

    let mut consumer = other
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    let delivery = one(&mut consumer, Duration::from_secs(5))
        .await
        .expect("the job");
    assert_eq!(delivery.delivered, 1);
    assert_eq!(delivery.subject, "pw.jobs.default.step");
    assert_eq!(delivery.payload, Bytes::from_static(b"1"));
    assert!(
        delivery
            .header("traceparent")
            .unwrap()
            .starts_with("00-4bf9")
    );
    delivery.ack().await.unwrap();
    assert!(
        one(&mut consumer, Duration::from_millis(500))
            .await
            .is_none(),
        "only one copy was stored"
    );
    assert_eq!(
        bus.queue_stats("default").await.unwrap(),
        piecework_bus::QueueStats::default()
    );
}

#[tokio::test]
async fn nak_with_delay_redelivers_later_and_term_never_again() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    bus.publish(job("default", "a", "retry me")).await.unwrap();

    let first = one(&mut consumer, Duration::from_secs(5)).await.unwrap();
    let nakked_at = Instant::now();
    first.nak(Duration::from_millis(700)).await.unwrap();
    let second = one(&mut consumer, Duration::from_secs(10))
        .await
        .expect("redelivered");
    assert!(
        nakked_at.elapsed() >= Duration::from_millis(700),
        "not before the delay"
    );
    assert_eq!(second.delivered, 2);
    second.term().await.unwrap();
    assert!(
        one(&mut consumer, Duration::from_secs(2)).await.is_none(),
        "terminated for good"
    );
}

#[tokio::test]
async fn an_unacked_job_comes_back_after_the_ack_wait_and_a_dropped_one_at_once() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(1)))
        .await
        .unwrap();
    bus.publish(job("default", "a", "x")).await.unwrap();

    // A worker that dies holding the job: nothing settles it.
    let lost = one(&mut consumer, Duration::from_secs(5)).await.unwrap();
    std::mem::forget(lost);
    let again = one(&mut consumer, Duration::from_secs(10))
        .await
        .expect("redelivered after the ack wait");
    assert_eq!(again.delivered, 2);
    // A task aborted while holding it: dropping the delivery naks it.
    drop(again);
    let third = one(&mut consumer, Duration::from_secs(10))
        .await
        .expect("redelivered after the drop");
    assert_eq!(third.delivered, 3);
    third.ack().await.unwrap();
}

#[tokio::test]
async fn workers_share_a_queue_and_queues_are_separate() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut a = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    let mut b = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    let mut vpn = bus
        .consume("vpn", options(Duration::from_secs(30)))
        .await
        .unwrap();
    for i in 0..10 {
        bus.publish(job("default", &format!("d{i}"), "d"))
            .await
            .unwrap();
    }
    bus.publish(job("vpn", "v", "v")).await.unwrap();

    let mut seen = 0;
    for consumer in [&mut a, &mut b] {
        for delivery in consumer.fetch(5, Duration::from_secs(5)).await.unwrap() {
            assert_eq!(delivery.payload, Bytes::from_static(b"d"));
            delivery.ack().await.unwrap();
            seen += 1;
        }
    }
    assert_eq!(seen, 10, "each job went to exactly one worker");
    assert_eq!(
        one(&mut vpn, Duration::from_secs(5)).await.unwrap().payload,
        Bytes::from_static(b"v")
    );
}

#[tokio::test]
async fn an_idle_fetch_waits_then_returns_as_soon_as_a_job_arrives() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        consumer
            .fetch(10, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // The job arrives seconds into the poll, after any idle heartbeat would have (a job after
    // a heartbeat was once stranded until the ack wait; see fetch_unbounded).
    let publisher = bus.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(6)).await;
        publisher
            .publish(job("default", "late", "x"))
            .await
            .unwrap();
    });
    let started = Instant::now();
    let got = consumer.fetch(10, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered on arrival, not at the end of the 20s wait"
    );
}

#[tokio::test]
async fn jobs_survive_a_server_restart_and_the_client_reconnects() {
    let mut server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    bus.publish(job("default", "before", "kept")).await.unwrap();

    server.restart().await.unwrap();
    // Fetches fail while the client reconnects; then the stored job is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let delivery = loop {
        assert!(Instant::now() < deadline, "no delivery after the restart");
        match consumer.fetch(1, Duration::from_secs(2)).await {
            Ok(mut batch) if !batch.is_empty() => break batch.pop().unwrap(),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(delivery.payload, Bytes::from_static(b"kept"));
    delivery.ack().await.unwrap();
    bus.ready().await.expect("ready again");
    assert!(
        !bus.publish(job("default", "after", "x"))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn a_fetch_while_the_server_is_down_fails_instead_of_hanging() {
    let mut server = NatsServer::start().await.unwrap();
    let bus = bus(&server).await;
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    server.stop().await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.fetch(1, Duration::from_secs(1)),
    )
    .await
    .expect("the fetch gave up by itself");
    assert!(outcome.is_err() || outcome.unwrap().is_empty());
    assert!(
        bus.ready().await.is_err(),
        "not ready while the server is down"
    );
    server.restart().await.unwrap();
}

#[tokio::test]
async fn a_server_with_tls_and_a_password_is_reached_with_its_ca_and_credentials() {
    let server = NatsServer::start_with(piecework_testkit::Options {
        tls: true,
        password: Some("nats-pass-123".into()),
    })
    .await
    .unwrap();
    let ca = server.tls().unwrap().ca.clone();
    let url = server.url();
    assert!(url.starts_with("tls://piecework:nats-pass-123@"), "{url}");
    let config = NatsConfig {
        url: url.clone(),
        tls_ca_file: Some(ca.clone()),
        connect_timeout: Duration::from_secs(2),
        ..NatsConfig::default()
    };
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    bus.publish(job("default", "tls-1", "over tls"))
        .await
        .unwrap();
    let mut consumer = bus
        .consume("default", options(Duration::from_secs(30)))
        .await
        .unwrap();
    let delivery = one(&mut consumer, Duration::from_secs(5)).await.unwrap();
    assert_eq!(delivery.payload, Bytes::from_static(b"over tls"));
    delivery.ack().await.unwrap();

    // Without the CA the server's certificate is not trusted; with a wrong password the
    // server refuses. Both say so, without the password.
    let untrusted = NatsBus::connect(NatsConfig {
        tls_ca_file: None,
        ..config.clone()
    })
    .await
    .err()
    .expect("an untrusted certificate is refused")
    .to_string();
    assert!(!untrusted.contains("nats-pass-123"), "{untrusted}");
    let wrong = NatsBus::connect(NatsConfig {
        url: url.replace("nats-pass-123", "wrong-pass"),
        ..config
    })
    .await
    .err()
    .expect("a wrong password is refused")
    .to_string();
    assert!(!wrong.contains("wrong-pass"), "{wrong}");
}

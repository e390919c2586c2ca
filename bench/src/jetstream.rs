//! The raw JetStream baseline: what NATS alone moves on this machine. A work-queue stream on
//! file storage like `PW_JOBS`, pipelined publishes with message ids, and one pull consumer
//! fetching in batches and acking every message, running at the same time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

/// Publishes still waiting for their ack at any time.
const WINDOW: usize = 512;

/// Moves `count` messages through a fresh stream; returns the time from the first publish to
/// the last ack.
pub async fn run(url: &str, count: usize) -> anyhow::Result<Duration> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(client);
    let consumer = work_queue(&js, "BENCH_RAW", "bench.raw.>", "bench", 10_000).await?;
    let payload = bytes_payload();
    let started = Instant::now();
    let publisher = {
        let js = js.clone();
        async move {
            let mut pending = FuturesUnordered::new();
            for n in 0..count {
                let message = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("m{n}"));
                let ack = js.send_publish("bench.raw.job", message).await?;
                pending.push(ack.into_future());
                while pending.len() >= WINDOW {
                    pending.next().await.expect("not empty")?;
                }
            }
            while let Some(ack) = pending.next().await {
                ack?;
            }
            anyhow::Ok(())
        }
    };
    let subscriber = async move {
        let mut received = 0;
        while received < count {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                received += 1;
            }
        }
        anyhow::Ok(())
    };
    tokio::try_join!(publisher, subscriber)?;
    let elapsed = started.elapsed();
    let _ = js.delete_stream("BENCH_RAW").await;
    Ok(elapsed)
}

/// A fresh work-queue stream `name` on file storage, like `PW_JOBS`, taking `subjects`, and
/// its durable pull consumer acking explicitly.
async fn work_queue(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    durable: &str,
    max_ack_pending: i64,
) -> anyhow::Result<consumer::PullConsumer> {
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending,
            ..Default::default()
        })
        .await
        .context("creating the consumer")
}

/// About the size of an encoded `StepJob`.
fn bytes_payload() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; 96])
}

/// The JetStream request/reply baseline: one message at a time published to a work-queue
/// stream (waiting for its stored ack), pulled by a consumer that acks it and answers on a core
/// NATS subject. The round trip — publish, store, deliver, reply — is the least a step hop
/// through JetStream can cost; returns its latencies.
pub async fn request_reply(url: &str, count: usize) -> anyhow::Result<crate::stats::Latency> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(client.clone());
    let default_pending = consumer::pull::Config::default().max_ack_pending;
    let consumer = work_queue(&js, "BENCH_RR", "bench.rr.>", "bench-rr", default_pending).await?;
    let mut replies = client.subscribe("bench.rr-reply").await?;
    let responder = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut messages = consumer.messages().await?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                client
                    .publish("bench.rr-reply", message.payload.clone())
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let payload = bytes_payload();
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let sent = Instant::now();
        let message = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("rr{n}"));
        js.send_publish("bench.rr.job", message)
            .await?
            .await
            .context("publish ack")?;
        tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .context("no reply within 10s")?
            .context("the reply subscription ended")?;
        latencies.push(sent.elapsed());
    }
    responder.abort();
    let _ = js.delete_stream("BENCH_RR").await;
    Ok(crate::stats::Latency::of(latencies))
}

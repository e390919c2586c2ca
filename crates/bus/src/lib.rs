//! The job bus: how the scheduler, the API and workers hand jobs to each other.
//!
//! The contract ([`Bus`], [`Delivery`]) follows NATS JetStream, the production adapter: a
//! publish carries a message id that makes it idempotent within a dedupe window; each queue has
//! one consumer shared by all workers serving it; a delivery is settled exactly once by `ack`,
//! `nak` with a delay (a retry), or `term` (never again), and reports how often it has been
//! delivered. [`memory::MemoryBus`] implements the same semantics in-process for `piecework dev`
//! and tests.
//!
//! Subjects: `pw.jobs.<queue>.poll` carries a `PollJob`, `pw.jobs.<queue>.step` a `StepJob`
//! ([`subject`]).
//!
//! The same broker holds the piece registry ([`pieces`]): published bundles and their index.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub mod jobs;
pub mod memory;
pub mod nats;
pub mod pieces;

pub use jobs::{JobKind, subject};

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subject: String,
    /// Publishing the same id twice within the dedupe window stores the message once.
    pub msg_id: String,
    /// Tracing context and the like; never secrets.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// What the broker said about a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishAck {
    /// The message id was seen before: nothing new was stored.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus is not reachable: {0}")]
    Unavailable(String),
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("consumer for queue {queue} failed: {message}")]
    Consume { queue: String, message: String },
    #[error("settling a delivery failed: {0}")]
    Settle(String),
}

/// What the broker knows of a queue's shared consumer, for metrics and `doctor`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs stored and not yet delivered.
    pub pending: u64,
    /// Jobs delivered and not yet settled, across all workers.
    pub ack_pending: u64,
    /// Jobs currently redelivered at least once.
    pub redelivered: u64,
}

/// How a worker consumes a queue.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Most deliveries handed out and not yet settled, across all workers of the queue.
    pub max_ack_pending: usize,
    /// How long a delivery may stay unsettled before the broker redelivers it; workers send
    /// progress for longer steps.
    pub ack_wait: Duration,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self {
            max_ack_pending: 1000,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// The broker.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    async fn publish(&self, message: Message) -> Result<PublishAck, BusError>;

    /// Joins the queue's shared consumer (poll and step subjects), creating it if needed.
    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Consumer>, BusError>;

    /// Whether the bus is connected and serving, for `/readyz`.
    async fn ready(&self) -> Result<(), BusError>;

    /// Whether the connection to the broker is up right now, without asking it: a publisher
    /// that sees it down leaves its jobs in the store's outbox rather than wait for a publish
    /// that cannot be acknowledged.
    fn connected(&self) -> bool {
        true
    }

    /// The queue's backlog, from its shared consumer.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError>;

    /// `messaging.system` of publish and receive spans.
    fn system(&self) -> &'static str;

    /// The piece registry that lives beside the jobs (JetStream key-value and object store).
    fn pieces(&self) -> std::sync::Arc<dyn pieces::PieceRegistry>;
}

/// One worker's handle on a queue's shared consumer.
///
/// Jobs are pulled, never pushed: a worker asks for as many as it has free slots, so it never
/// holds more than it can run, and an idle worker costs one long-poll request per `wait`.
#[async_trait]
pub trait Consumer: Send {
    /// Returns up to `max` deliveries as soon as at least one is available, or none once
    /// `wait` has passed.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;
}

/// Settles a delivery; implemented by each adapter.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn ack(&self) -> Result<(), BusError>;
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    async fn term(&self) -> Result<(), BusError>;
    /// Tells the broker the job is still being worked on (resets the ack wait).
    async fn progress(&self) -> Result<(), BusError>;
}

/// A message handed to a worker. Dropping it unsettled returns it to the queue.
pub struct Delivery {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// 1 on the first delivery; redeliveries (after a nak or a lost worker) count up.
    pub delivered: u32,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("delivered", &self.delivered)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(
        subject: String,
        headers: Vec<(String, String)>,
        payload: Bytes,
        delivered: u32,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            subject,
            headers,
            payload,
            delivered,
            settle,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Done: never deliver again.
    pub async fn ack(self) -> Result<(), BusError> {
        self.settle.ack().await
    }

    /// Deliver again after `delay` (a retry).
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.settle.nak(delay).await
    }

    /// Give up: never deliver again (poison or exhausted).
    pub async fn term(self) -> Result<(), BusError> {
        self.settle.term().await
    }

    pub async fn progress(&self) -> Result<(), BusError> {
        self.settle.progress().await
    }
}

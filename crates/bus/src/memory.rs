//! The in-memory bus behind `piecework dev` and the in-process tests.
//!
//! It keeps JetStream's semantics where the rest of the system relies on them: message ids are
//! deduplicated within a window, a queue's deliveries are shared by all its consumers, at most
//! `max_ack_pending` deliveries are out at once, `nak` redelivers after a delay with the delivery
//! count increased, and a delivery dropped without being settled (a worker task that was
//! aborted) is redelivered at once. Nothing survives the process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::{
    Bus, BusError, ConsumeOptions, Consumer, Delivery, Message, PublishAck, QueueStats, Settle,
    subject,
};

/// JetStream's default duplicate window.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Clone)]
struct Envelope {
    subject: String,
    headers: Vec<(String, String)>,
    payload: Bytes,
    delivered: u32,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Envelope>,
    notify: Arc<Notify>,
    /// Created by the first consumer, sized by its `max_ack_pending`.
    pending: Option<Arc<Semaphore>>,
}

struct Inner {
    queues: Mutex<HashMap<String, Queue>>,
    seen: Mutex<Dedupe>,
}

#[derive(Default)]
struct Dedupe {
    window: Duration,
    ids: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Dedupe {
    /// Records `id`; returns false if it was seen within the window.
    fn insert(&mut self, id: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.ids.remove(&old);
        }
        if self.ids.contains_key(id) {
            return false;
        }
        self.ids.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        true
    }
}

/// An in-process [`Bus`]. Cheap to clone; clones share the queues.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
    pieces: Arc<crate::pieces::memory::MemoryPieces>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::with_dedupe_window(DEFAULT_DEDUPE_WINDOW)
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_dedupe_window(window: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                seen: Mutex::new(Dedupe {
                    window,
                    ..Dedupe::default()
                }),
            }),
            pieces: Arc::default(),
        }
    }

    /// Jobs waiting in a queue (not counting those handed out), for tests and metrics.
    pub fn queued(&self, queue: &str) -> usize {
        self.inner
            .queues
            .lock()
            .unwrap()
            .get(queue)
            .map_or(0, |q| q.ready.len())
    }
}

impl Inner {
    fn enqueue(&self, queue: &str, envelope: Envelope) {
        let mut queues = self.queues.lock().unwrap();
        let q = queues.entry(queue.to_owned()).or_default();
        q.ready.push_back(envelope);
        q.notify.notify_one();
    }

    fn wake(&self, queue: &str) {
        if let Some(q) = self.queues.lock().unwrap().get(queue) {
            q.notify.notify_one();
        }
    }

    fn take(&self, queue: &str) -> Option<Envelope> {
        self.queues
            .lock()
            .unwrap()
            .get_mut(queue)?
            .ready
            .pop_front()
    }

    fn take_notify(&self, queue: &str) -> Arc<Notify> {
        self.queues
            .lock()
            .unwrap()
            .entry(queue.to_owned())
            .or_default()
            .notify
            .clone()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, message: Message) -> Result<PublishAck, BusError> {
        let Some((queue, _)) = subject::parse(&message.subject) else {
            return Err(BusError::Publish {
                subject: message.subject,
                message: "not a job subject (pw.jobs.<queue>.poll|step)".into(),
            });
        };
        if !self
            .inner
            .seen
            .lock()
            .unwrap()
            .insert(&message.msg_id, Instant::now())
        {
            return Ok(PublishAck { duplicate: true });
        }
        let envelope = Envelope {
            subject: message.subject.clone(),
            headers: message.headers,
            payload: message.payload,
            delivered: 0,
        };
        self.inner.enqueue(queue, envelope);
        Ok(PublishAck { duplicate: false })
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Consumer>, BusError> {
        let pending = {
            let mut queues = self.inner.queues.lock().unwrap();
            let q = queues.entry(queue.to_owned()).or_default();
            q.pending
                .get_or_insert_with(|| Arc::new(Semaphore::new(options.max_ack_pending.max(1))))
                .clone()
        };
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            queue: queue.to_owned(),
            pending,
        }))
    }

    async fn ready(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Only `pending` is tracked in memory.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        Ok(QueueStats {
            pending: u64::try_from(self.queued(queue)).unwrap_or(u64::MAX),
            ..QueueStats::default()
        })
    }

    fn system(&self) -> &'static str {
        "piecework-memory"
    }

    fn pieces(&self) -> Arc<dyn crate::pieces::PieceRegistry> {
        self.pieces.clone()
    }
}

struct MemoryConsumer {
    inner: Arc<Inner>,
    queue: String,
    /// Shared by every consumer of the queue: `max_ack_pending`.
    pending: Arc<Semaphore>,
}

impl MemoryConsumer {
    /// Takes up to `max` ready jobs that `max_ack_pending` allows.
    fn take_ready(&self, max: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < max {
            let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                break;
            };
            let Some(envelope) = self.inner.take(&self.queue) else {
                break;
            };
            out.push(deliver(&self.inner, &self.queue, envelope, permit));
        }
        out
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let deadline = Instant::now() + wait;
        let notify = self.inner.take_notify(&self.queue);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a publish or a settle in between is not missed.
            notified.as_mut().enable();
            let ready = self.take_ready(max.max(1));
            if !ready.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(ready);
            }
        }
    }
}

fn deliver(
    inner: &Arc<Inner>,
    queue: &str,
    mut envelope: Envelope,
    permit: OwnedSemaphorePermit,
) -> Delivery {
    envelope.delivered += 1;
    let settle = MemorySettle {
        inner: inner.clone(),
        queue: queue.to_owned(),
        envelope: envelope.clone(),
        settled: AtomicBool::new(false),
        permit: Mutex::new(Some(permit)),
    };
    Delivery::new(
        envelope.subject,
        envelope.headers,
        envelope.payload,
        envelope.delivered,
        Box::new(settle),
    )
}

struct MemorySettle {
    inner: Arc<Inner>,
    queue: String,
    envelope: Envelope,
    settled: AtomicBool,
    /// Released when the delivery is settled or dropped: frees a `max_ack_pending` slot.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl MemorySettle {
    fn settle_once(&self) -> Result<(), BusError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Err(BusError::Settle("delivery was already settled".into()));
        }
        self.release();
        Ok(())
    }

    /// Frees the `max_ack_pending` slot and wakes a consumer that may be waiting for it.
    fn release(&self) {
        if self.permit.lock().unwrap().take().is_some() {
            self.inner.wake(&self.queue);
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&self) -> Result<(), BusError> {
        self.settle_once()
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.settle_once()?;
        let inner = self.inner.clone();
        let queue = self.queue.clone();
        let envelope = self.envelope.clone();
        if delay.is_zero() {
            inner.enqueue(&queue, envelope);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                inner.enqueue(&queue, envelope);
            });
        }
        Ok(())
    }

    async fn term(&self) -> Result<(), BusError> {
        self.settle_once()
    }

    async fn progress(&self) -> Result<(), BusError> {
        Ok(())
    }
}

impl Drop for MemorySettle {
    /// A delivery nobody settled (its task was aborted) goes back to the queue, as JetStream
    /// redelivers after the ack wait.
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst) {
            self.release();
            self.inner.enqueue(&self.queue, self.envelope.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject;

    fn message(id: &str, payload: &'static str) -> Message {
        Message {
            subject: subject::step("default"),
            msg_id: id.into(),
            headers: vec![("traceparent".into(), "00-abc".into())],
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
        let mut batch = consumer
            .fetch(1, Duration::from_secs(600))
            .await
            .expect("no error");
        assert_eq!(batch.len(), 1, "a delivery in time");
        batch.pop().unwrap()
    }

    #[tokio::test]
    async fn duplicate_ids_are_stored_once() {
        let bus = MemoryBus::new();
        assert!(!bus.publish(message("a", "1")).await.unwrap().duplicate);
        assert!(bus.publish(message("a", "1")).await.unwrap().duplicate);
        assert_eq!(bus.queued("default"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_window_expires() {
        let bus = MemoryBus::with_dedupe_window(Duration::from_secs(10));
        bus.publish(message("a", "1")).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!bus.publish(message("a", "1")).await.unwrap().duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn nak_redelivers_after_the_delay_with_a_higher_count() {
        let bus = MemoryBus::new();
        let mut stream = bus
            .consume("default", ConsumeOptions::default())
            .await
            .unwrap();
        bus.publish(message("a", "1")).await.unwrap();
        let first = next(&mut stream).await;
        assert_eq!(first.delivered, 1);
        assert_eq!(first.header("TraceParent"), Some("00-abc"));
        let start = Instant::now();
        first.nak(Duration::from_secs(5)).await.unwrap();
        let second = next(&mut stream).await;
        assert_eq!(second.delivered, 2);
        assert!(start.elapsed() >= Duration::from_secs(5));
        second.ack().await.unwrap();
        assert_eq!(bus.queued("default"), 0);
    }

    #[tokio::test]
    async fn dropped_deliveries_come_back_and_term_is_final() {
        let bus = MemoryBus::new();
        let mut stream = bus
            .consume("default", ConsumeOptions::default())
            .await
            .unwrap();
        bus.publish(message("a", "1")).await.unwrap();
        drop(next(&mut stream).await);
        let again = next(&mut stream).await;
        assert_eq!(again.delivered, 2);
        again.term().await.unwrap();
        assert_eq!(bus.queued("default"), 0);
    }

    #[tokio::test]
    async fn max_ack_pending_bounds_deliveries_in_flight() {
        let bus = MemoryBus::new();
        let options = ConsumeOptions {
            max_ack_pending: 1,
            ..ConsumeOptions::default()
        };
        let mut stream = bus.consume("default", options).await.unwrap();
        bus.publish(message("a", "1")).await.unwrap();
        bus.publish(message("b", "2")).await.unwrap();
        let first = next(&mut stream).await;
        let blocked = stream.fetch(1, Duration::from_millis(50)).await.unwrap();
        assert!(blocked.is_empty(), "a second delivery while one is pending");
        first.ack().await.unwrap();
        assert_eq!(next(&mut stream).await.payload, Bytes::from_static(b"2"));
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_returns_up_to_max_at_once_and_nothing_after_the_wait() {
        let bus = MemoryBus::new();
        let mut consumer = bus
            .consume("default", ConsumeOptions::default())
            .await
            .unwrap();
        for id in ["a", "b", "c"] {
            bus.publish(message(id, "x")).await.unwrap();
        }
        let first = consumer.fetch(2, Duration::from_secs(1)).await.unwrap();
        assert_eq!(first.len(), 2);
        let second = consumer.fetch(5, Duration::from_secs(1)).await.unwrap();
        assert_eq!(second.len(), 1);
        let started = Instant::now();
        assert!(
            consumer
                .fetch(5, Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn queues_are_separate_and_bad_subjects_are_refused() {
        let bus = MemoryBus::new();
        let mut other = message("x", "1");
        other.subject = subject::poll("vpn");
        bus.publish(other).await.unwrap();
        assert_eq!(bus.queued("default"), 0);
        assert_eq!(bus.queued("vpn"), 1);
        let mut bad = message("y", "1");
        bad.subject = "pw.other".into();
        assert!(bus.publish(bad).await.is_err());
    }
}

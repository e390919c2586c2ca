//! The worker: pulls jobs from its queues and executes them.
//!
//! - A **poll job** runs a flow's trigger once: a polling trigger's items are deduplicated
//!   against the flow's cursor and each new item starts one run with a deterministic id; a
//!   schedule tick starts one run.
//! - A **step job** drives a run forward from its step: render and validate the input, run the
//!   action under its timeout, journal the attempt (one store round trip, shared with other
//!   steps finishing at once), and run the next step inline when it is on the same queue —
//!   else publish its job — then ack, nak with the retry policy's delay, or terminate after the
//!   last attempt, as `piecework_core::lifecycle` decides.
//!
//! Workers hold no state between jobs, so any number can serve a queue. [`run`] is the whole
//! service: it stops pulling on shutdown, lets in-flight jobs finish within a grace period, and
//! returns what is left to the queue.

mod config;
mod handler;
mod health;

use std::sync::Arc;
use std::time::Duration;

use piecework_bus::{ConsumeOptions, Consumer, Delivery};
use piecework_runtime::Runtime;
use piecework_telemetry::metrics::QueueLabels;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;
use handler::Handler;
pub use health::Health;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error(transparent)]
    Bus(#[from] piecework_bus::BusError),
    #[error(transparent)]
    Runtime(#[from] piecework_runtime::RuntimeError),
}

/// How long one fetch waits for a job: an idle worker makes one request per queue this often.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// Most jobs asked for in one fetch.
const MAX_FETCH: usize = 64;

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    run_with_health(config, runtime, shutdown, Health::default()).await
}

/// [`run`], reporting whether each queue is being consumed to `health` (for `/readyz`).
pub async fn run_with_health(
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
    health: Health,
) -> Result<(), WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    let options = ConsumeOptions {
        max_ack_pending: config.max_ack_pending,
        ack_wait: config.ack_wait,
    };
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let (jobs_tx, mut jobs) = mpsc::channel::<(Delivery, OwnedSemaphorePermit)>(config.concurrency);
    let stop_pulling = shutdown.child_token();
    let mut pullers = JoinSet::new();
    for queue in &config.queues {
        let consumer = runtime.consume(queue, options.clone()).await?;
        health.consumed(queue);
        let puller = Puller {
            queue: queue.clone(),
            consumer,
            slots: slots.clone(),
            jobs: jobs_tx.clone(),
            health: health.clone(),
        };
        pullers.spawn(puller.run(stop_pulling.clone()));
    }
    drop(jobs_tx);
    // Runs this worker starts (polled items, sub-flows) whose first job it could not publish.
    let relay = {
        let (runtime, shutdown) = (runtime.clone(), shutdown.clone());
        tokio::spawn(async move { runtime.relay_outbox_until(shutdown).await })
    };
    let handler = Arc::new(Handler::new(config.clone(), runtime, shutdown.clone()));
    let mut tasks = JoinSet::new();
    tracing::info!(worker = %config.id, queues = ?config.queues, concurrency = config.concurrency, "worker started");

    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some((delivery, slot)) = job else { break };
                let handler = handler.clone();
                tasks.spawn(async move {
                    handler.handle(delivery).await;
                    drop(slot);
                });
            }
            () = shutdown.cancelled() => break,
        }
        while tasks.try_join_next().is_some() {}
    }

    stop_pulling.cancel();
    while pullers.join_next().await.is_some() {}
    // Jobs fetched but not started go straight back to the queue.
    jobs.close();
    while let Some((delivery, _)) = jobs.recv().await {
        if let Err(err) = delivery.nak(Duration::ZERO).await {
            tracing::debug!(error = %err, "returning an unstarted job failed; it will be redelivered");
        }
    }
    drain(&mut tasks, config.shutdown_grace).await;
    relay.abort();
    tracing::info!(worker = %config.id, "worker stopped");
    Ok(())
}

/// Pulls one queue: waits for a free slot, fetches as many jobs as there are free slots, and
/// hands each over with its slot, so the worker never holds more jobs than it can run.
struct Puller {
    queue: String,
    consumer: Box<dyn Consumer>,
    slots: Arc<Semaphore>,
    jobs: mpsc::Sender<(Delivery, OwnedSemaphorePermit)>,
    health: Health,
}

impl Puller {
    async fn run(mut self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                slot = self.slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                () = stop.cancelled() => return,
            };
            let mut slots = vec![first];
            while slots.len() < MAX_FETCH {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => slots.push(slot),
                    Err(_) => break,
                }
            }
            let fetched = tokio::select! {
                fetched = self.consumer.fetch(slots.len(), FETCH_WAIT) => fetched,
                () = stop.cancelled() => return,
            };
            match fetched {
                Ok(deliveries) => {
                    failures = 0;
                    self.health.consumed(&self.queue);
                    for (delivery, slot) in deliveries.into_iter().zip(slots) {
                        if self.jobs.send((delivery, slot)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => {
                    failures += 1;
                    self.health.failed(&self.queue);
                    let delay = Duration::from_millis(250 * 2u64.pow(failures.min(7)));
                    tracing::warn!(queue = %self.queue, error = %err, retry_in = ?delay, "fetching jobs failed");
                    drop(slots);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Copies each queue's backlog from the broker into the queue gauges; called before a scrape.
/// A queue whose consumer cannot be read keeps its last values (and the failure is logged).
pub async fn refresh_queue_metrics(runtime: &Runtime, queues: &[String]) {
    let metrics = &runtime.metrics;
    for queue in queues {
        match runtime.queue_stats(queue).await {
            Ok(stats) => {
                let labels = QueueLabels {
                    queue: queue.clone(),
                };
                let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                metrics
                    .queue_pending
                    .get_or_create(&labels)
                    .set(gauge(stats.pending));
                metrics
                    .queue_ack_pending
                    .get_or_create(&labels)
                    .set(gauge(stats.ack_pending));
                metrics
                    .queue_redelivered
                    .get_or_create(&labels)
                    .set(gauge(stats.redelivered));
            }
            Err(err) => {
                tracing::warn!(queue = %queue, error = %err, "could not read the queue's consumer for /metrics");
            }
        }
    }
}

/// Lets in-flight jobs finish within `grace`; aborts the rest, whose deliveries go back to
/// the queue for another worker.
async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    if tasks.is_empty() {
        return;
    }
    tracing::info!(in_flight = tasks.len(), grace = ?grace, "draining in-flight jobs");
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return },
            () = &mut deadline => {
                tracing::warn!(abandoned = tasks.len(), "grace period over; returning unfinished jobs to the queue");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return;
            }
        }
    }
}

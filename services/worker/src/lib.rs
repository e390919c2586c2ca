//! The worker: pulls jobs from its queues and executes them.
//!
//! - A **poll job** runs a flow's trigger once: a polling trigger's items are deduplicated
//!   against the flow's cursor and each new item starts one run with a deterministic id; a
//!   schedule tick starts one run.
//! - A **step job** runs one step of a run: render and validate the input, run the action under
//!   its timeout, record the attempt (one store round trip), then publish the next step and ack,
//!   nak with the retry policy's delay, or terminate after the last attempt.
//!
//! Workers hold no state between jobs, so any number can serve a queue. [`run`] is the whole
//! service: it stops pulling on shutdown, lets in-flight jobs finish within a grace period, and
//! returns what is left to the queue.

mod config;
mod handler;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::select_all;
use piecework_bus::ConsumeOptions;
use piecework_runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;
use handler::Handler;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error(transparent)]
    Bus(#[from] piecework_bus::BusError),
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    let options = ConsumeOptions {
        max_ack_pending: config.max_ack_pending,
        ack_wait: config.ack_wait,
    };
    let mut streams = Vec::with_capacity(config.queues.len());
    for queue in &config.queues {
        streams.push(runtime.bus.consume(queue, options.clone()).await?);
    }
    let mut deliveries = select_all(streams);
    let handler = Arc::new(Handler::new(config.clone(), runtime));
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    tracing::info!(worker = %config.id, queues = ?config.queues, concurrency = config.concurrency, "worker started");

    loop {
        // Take a slot before pulling, so the worker never holds more jobs than it can run.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let next = tokio::select! {
            next = deliveries.next() => next,
            () = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(delivery)) => {
                let handler = handler.clone();
                tasks.spawn(async move {
                    handler.handle(delivery).await;
                    drop(slot);
                });
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "receiving jobs failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            None => break,
        }
        while tasks.try_join_next().is_some() {}
    }

    drain(&mut tasks, config.shutdown_grace).await;
    tracing::info!(worker = %config.id, "worker stopped");
    Ok(())
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

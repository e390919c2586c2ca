//! Handling one delivery: decode it, run what it asks, settle it.
//!
//! - `mod.rs` (this file) takes a delivery, dispatches it by job kind and settles it: ack when
//!   done, nak with a delay to retry, term when it can never succeed — after everything the job
//!   decided is recorded, so a worker that dies in between causes a redelivery that finds the
//!   record and only finishes the hand-over;
//! - [`step`] drives a run forward from the job's step: it runs that step and, while the run
//!   lifecycle says so, the ones after it in the same delivery, journaling each attempt first;
//! - [`poll`] runs a flow's trigger and starts a run per new item;
//! - [`observe`] puts attempts into logs, spans and metrics.
//!
//! What happens next to a run is decided by `piecework_core::lifecycle`, never here.

mod observe;
mod poll;
mod step;

use std::sync::Arc;
use std::time::{Duration, Instant};

use piecework_bus::{Delivery, JobKind, subject};
use piecework_core::flow::FlowVersion;
use piecework_core::lifecycle::{Settle, Termination};
use piecework_proto::Message as _;
use piecework_proto::v1::{PollJob, StepJob};
use piecework_runtime::{Actor, Runtime, RuntimeError};
use piecework_sdk::{Piece, PieceError};
use piecework_telemetry::metrics::{self, JobLabels, QueueLabels, TermLabels, TermReason};
use tokio_util::sync::CancellationToken;

use crate::WorkerConfig;

/// Retries of a poll that failed with a retryable error.
const POLL_ATTEMPTS: u32 = 3;
/// Delay before retrying a job whose bookkeeping failed (store or bus unreachable) the first
/// time; it doubles with each delivery up to [`INFRA_RETRY_MAX_DELAY`].
const INFRA_RETRY_DELAY: Duration = Duration::from_secs(2);
const INFRA_RETRY_MAX_DELAY: Duration = Duration::from_secs(60);
/// How long an attempt waits at least when its pinned piece is not on this worker yet: the
/// default scan interval of a pieces directory.
const PIECE_NOT_HERE_YET: Duration = Duration::from_secs(2);

/// How long to wait before delivery `delivered + 1` of a job whose bookkeeping failed.
fn infra_retry_delay(delivered: u32) -> Duration {
    let doublings = delivered.saturating_sub(1).min(6);
    (INFRA_RETRY_DELAY * 2u32.pow(doublings)).min(INFRA_RETRY_MAX_DELAY)
}

pub(crate) struct Handler {
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    actor: Actor,
    /// Cancelled when the worker begins to stop: the step in flight finishes, the steps after
    /// it are handed to other workers instead of run inline.
    stopping: CancellationToken,
}

impl Handler {
    pub(crate) fn new(
        config: WorkerConfig,
        runtime: Arc<Runtime>,
        stopping: CancellationToken,
    ) -> Self {
        let actor = Actor::worker(&config.id);
        Self {
            config,
            runtime,
            actor,
            stopping,
        }
    }

    pub(crate) async fn handle(&self, delivery: Delivery) {
        let parsed = subject::parse(&delivery.subject);
        let kind = parsed.map(|(_, kind)| kind);
        let queue = parsed.map_or("unknown", |(queue, _)| queue).to_owned();
        let metrics = &self.runtime.metrics;
        let job_labels = JobLabels {
            queue: queue.clone(),
            kind: match kind {
                Some(JobKind::Step) => metrics::JobKind::step,
                Some(JobKind::Poll) => metrics::JobKind::poll,
                None => metrics::JobKind::unknown,
            },
        };
        metrics.jobs_received.get_or_create(&job_labels).inc();
        let in_flight = metrics
            .jobs_in_flight
            .get_or_create(&QueueLabels {
                queue: queue.clone(),
            })
            .clone();
        in_flight.inc();
        let settle = match kind {
            Some(JobKind::Step) => match StepJob::decode(delivery.payload.as_ref()) {
                Ok(job) => self.step(job, &delivery, &queue).await,
                Err(err) => {
                    self.poison(&delivery, &format!("not a StepJob: {err}"))
                        .await
                }
            },
            Some(JobKind::Poll) => match PollJob::decode(delivery.payload.as_ref()) {
                Ok(job) => self.poll(job, &delivery).await,
                Err(err) => {
                    self.poison(&delivery, &format!("not a PollJob: {err}"))
                        .await
                }
            },
            None => self.poison(&delivery, "not a job subject").await,
        };
        let settled = match settle {
            Ok(Settle::Ack) => delivery.ack().await,
            Ok(Settle::Nak(delay)) => delivery.nak(delay).await,
            Ok(Settle::Term(termination)) => {
                let reason = match termination {
                    Termination::Failed => TermReason::failed,
                    Termination::Poison => TermReason::poison,
                    Termination::GaveUp => TermReason::gave_up,
                };
                metrics
                    .jobs_terminated
                    .get_or_create(&TermLabels { queue, reason })
                    .inc();
                delivery.term().await
            }
            Err(err) => {
                metrics.jobs_infra_retries.get_or_create(&job_labels).inc();
                let polls_left = POLL_ATTEMPTS + self.config.max_infra_retries;
                if kind == Some(JobKind::Poll) && delivery.delivered >= polls_left {
                    // The next tick polls again: dropping this one loses nothing.
                    tracing::warn!(error = %err, subject = %delivery.subject, deliveries = delivery.delivered, "poll bookkeeping keeps failing; dropping this poll");
                    metrics
                        .jobs_terminated
                        .get_or_create(&TermLabels {
                            queue,
                            reason: TermReason::gave_up,
                        })
                        .inc();
                    delivery.term().await
                } else {
                    let delay = infra_retry_delay(delivery.delivered);
                    tracing::warn!(error = %err, subject = %delivery.subject, deliveries = delivery.delivered, retry_in = ?delay, "job bookkeeping failed; it will be redelivered");
                    delivery.nak(delay).await
                }
            }
        };
        in_flight.dec();
        if let Err(err) = settled {
            tracing::warn!(error = %err, "settling a job failed; the broker will redeliver it");
        }
    }

    /// A message that can never be processed: terminate it and record why.
    async fn poison(&self, delivery: &Delivery, why: &str) -> Result<Settle, RuntimeError> {
        tracing::warn!(subject = %delivery.subject, bytes = delivery.payload.len(), reason = why, "terminating a malformed job");
        let error = format!("malformed job on {}: {why}", delivery.subject);
        self.runtime
            .audit(
                &self.actor,
                "job.reject",
                &delivery.subject,
                Instant::now(),
                Some(&error),
            )
            .await;
        Ok(Settle::Term(Termination::Poison))
    }

    /// The decrypted values of a connection, if one is named. `Err(RuntimeError)` is an outage
    /// (the job is retried); `Ok(Err(message))` a problem no retry fixes.
    async fn connection_for(
        &self,
        connection: Option<&str>,
        piece: &str,
    ) -> Result<Result<Option<serde_json::Value>, String>, RuntimeError> {
        let Some(name) = connection else {
            return Ok(Ok(None));
        };
        match self.runtime.connection_values(name, piece).await {
            Ok(values) => Ok(Ok(Some(values))),
            Err(RuntimeError::Store(err)) => Err(RuntimeError::Store(err)),
            Err(err) => Ok(Err(err.to_string())),
        }
    }

    /// The version the flow pinned — from this worker's catalog, or fetched from the registry
    /// on first use — else the newest one here in the flow's range (a fleet in the middle of
    /// rolling out a built-in piece keeps running; the attempt records which version ran). A
    /// worker that has neither refuses: retryably when the flow pinned a version (the api
    /// has it, so it is on its way here — a pieces directory not scanned yet, a rollout),
    /// fatally when nothing was pinned.
    async fn resolve_piece(
        &self,
        flow: &FlowVersion,
        key: &str,
        name: &str,
        range: Option<&piecework_sdk::semver::VersionReq>,
    ) -> Result<Piece, PieceError> {
        let pinned = flow.resolved.get(key);
        if let Some(pinned) = pinned {
            match self.runtime.catalog().get_or_fetch(name, pinned).await {
                Ok(Some(piece)) => return Ok(piece),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(piece = name, version = %pinned, error, "cannot fetch the pinned version");
                }
            }
        }
        let registry = self.runtime.pieces();
        let range = range
            .cloned()
            .unwrap_or(piecework_sdk::semver::VersionReq::STAR);
        if let Some(piece) = registry.resolve(name, &range) {
            return Ok(piece.clone());
        }
        let have: Vec<String> = registry
            .versions(name)
            .iter()
            .map(ToString::to_string)
            .collect();
        let have = if have.is_empty() {
            "none".to_owned()
        } else {
            have.join(", ")
        };
        Err(match pinned {
            Some(pinned) => PieceError::retryable(format!(
                "this worker cannot serve piece `{name}` {pinned} yet (it has: {have})"
            ))
            .with_retry_after(PIECE_NOT_HERE_YET),
            None => PieceError::fatal(format!(
                "this worker cannot serve piece `{name}` {range} (it has: {have})"
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_retries_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|d| infra_retry_delay(d).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60, 60]);
    }
}

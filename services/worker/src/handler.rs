//! Handling one delivery: decode it, run the poll or the step, settle it.
//!
//! Settling follows the wire contract: ack when done, nak with the retry policy's delay for a
//! retryable failure, term after the last attempt or for a message that can never succeed
//! (poison). Every outcome is recorded before the delivery is settled, so a worker that dies in
//! between causes a redelivery that finds the recorded result and only finishes the hand-off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use piecework_bus::{Delivery, JobKind, subject};
use piecework_core::engine::{self, StepOutcome};
use piecework_core::flow::{FlowVersion, OnFailure, StepDef};
use piecework_core::run::{Attempt, deterministic_run_id};
use piecework_core::{Run, RunStatus, StepState, StepStatus};
use piecework_proto::Message as _;
use piecework_proto::v1::{self, PollJob, StepJob, StepResult};
use piecework_runtime::{Actor, Runtime, RuntimeError, audit_event};
use piecework_sdk::mask::Secrets;
use piecework_sdk::polling::{self, DedupeStrategy};
use piecework_sdk::{DynAction, Piece, PieceError, RunInfo, TriggerHandle, TriggerKind};
use piecework_store::{RunUpdate, StepUpdate};
use piecework_telemetry::metrics::{
    self, FlowLabels, HealthCheckLabels, HealthLabels, JobLabels, PollLabels, PollOutcome,
    QueueLabels, RunOutcome, TermLabels, TermReason,
};
use piecework_telemetry::propagation;
use serde_json::json;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::WorkerConfig;

/// Retries of a poll that failed with a retryable error, and the delay between them.
const POLL_ATTEMPTS: u32 = 3;
const POLL_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Delay before retrying a job whose bookkeeping failed (store or bus unreachable) the first
/// time; it doubles with each delivery up to [`INFRA_RETRY_MAX_DELAY`].
const INFRA_RETRY_DELAY: Duration = Duration::from_secs(2);
const INFRA_RETRY_MAX_DELAY: Duration = Duration::from_secs(60);

/// How long to wait before delivery `delivered + 1` of a job whose bookkeeping failed.
fn infra_retry_delay(delivered: u32) -> Duration {
    let doublings = delivered.saturating_sub(1).min(6);
    (INFRA_RETRY_DELAY * 2u32.pow(doublings)).min(INFRA_RETRY_MAX_DELAY)
}
/// A poll lease outlives the poll's timeout by this much before it lapses.
const POLL_LEASE_MARGIN: Duration = Duration::from_secs(30);

pub(crate) struct Handler {
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    actor: Actor,
}

/// One attempt as executed, for recording.
struct Attempted {
    /// The recorded attempt number (continuing across manual retries).
    number: u32,
    started: DateTime<Utc>,
    execution: engine::Execution,
    /// The piece and action that ran; `None` when they could not be resolved.
    executed: Option<(Piece, Arc<dyn DynAction>)>,
}

/// How a job ended, before the delivery is settled.
/// How long an attempt waits at least when its pinned piece is not on this worker yet: the
/// default scan interval of a pieces directory.
const PIECE_NOT_HERE_YET: Duration = Duration::from_secs(2);

enum Settle {
    Ack,
    Nak(Duration),
    Term(TermReason),
}

impl Handler {
    pub(crate) fn new(config: WorkerConfig, runtime: Arc<Runtime>) -> Self {
        let actor = Actor::worker(&config.id);
        Self {
            config,
            runtime,
            actor,
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
        let in_flight = metrics
            .jobs_in_flight
            .get_or_create(&QueueLabels {
                queue: queue.clone(),
            })
            .clone();
        metrics.jobs_received.get_or_create(&job_labels).inc();
        in_flight.inc();
        let settle = match kind {
            Some(JobKind::Step) => match StepJob::decode(delivery.payload.as_ref()) {
                Ok(job) => self.step(job, &delivery).await,
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
            Ok(Settle::Term(reason)) => {
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
        Ok(Settle::Term(TermReason::poison))
    }

    async fn step(&self, job: StepJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
        let Some(run) = self.runtime.store.get_run(&job.run_id).await? else {
            return self
                .poison(delivery, &format!("run {} does not exist", job.run_id))
                .await;
        };
        let span = self.step_span(&job, delivery, &run);
        self.run_step(job, delivery, run).instrument(span).await
    }

    /// The span of one step delivery: a child of the run's span (wherever the run started),
    /// linked to the `publish` span that sent the job.
    fn step_span(&self, job: &StepJob, delivery: &Delivery, run: &Run) -> tracing::Span {
        let queue = subject::parse(&delivery.subject).map_or("", |(queue, _)| queue);
        let span = tracing::info_span!(
            "step",
            otel.name = %format_args!("step {}", job.step),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            messaging.system = self.runtime.bus.system(),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %delivery.subject,
            messaging.consumer.group.name = %format_args!("pw-{queue}"),
            messaging.message.id = delivery.header("Nats-Msg-Id").unwrap_or_default(),
            piecework.run.id = %run.id,
            piecework.flow.id = %job.flow_id,
            piecework.flow.version = job.flow_version,
            piecework.step = %job.step,
            piecework.piece = Empty,
            piecework.action = Empty,
            piecework.piece.version = Empty,
            piecework.attempt = Empty,
            piecework.outcome = Empty,
            piecework.delivery = delivery.delivered,
            piecework.worker = %self.config.id,
        );
        let under_run = run
            .trace
            .as_deref()
            .is_some_and(|traceparent| propagation::set_parent_traceparent(&span, traceparent));
        if !under_run {
            propagation::set_parent(&span, &delivery.headers);
        }
        propagation::add_link(&span, &delivery.headers);
        span
    }

    async fn run_step(
        &self,
        job: StepJob,
        delivery: &Delivery,
        run: Run,
    ) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        if run.status.is_terminal() {
            tracing::debug!(run_id = %run.id, step = %job.step, status = run.status.as_str(), "run already finished; dropping step");
            return Ok(Settle::Ack);
        }
        let Some(flow) = runtime.flow_version(&job.flow_id, job.flow_version).await? else {
            let error = format!(
                "flow {} version {} does not exist",
                job.flow_id, job.flow_version
            );
            self.fail_run(&run, error).await?;
            return Ok(Settle::Term(TermReason::poison));
        };
        let Some(step) = flow.definition.step(&job.step) else {
            let error = format!(
                "flow {} version {} has no step `{}`",
                flow.flow_id, flow.version, job.step
            );
            self.fail_run(&run, error).await?;
            return Ok(Settle::Term(TermReason::poison));
        };
        let span = tracing::Span::current();
        span.record("piecework.piece", step.piece.as_str());
        span.record("piecework.action", step.action.as_str());
        // A redelivery after the attempt was recorded (the worker died before settling):
        // finish the hand-off without running the step again. (A manual retry resets the
        // failed step before publishing, so it is not mistaken for this.)
        if let Some(done) = run
            .step(&step.name)
            .filter(|s| s.status != StepStatus::Retrying)
        {
            return self
                .hand_off(&flow, &run, step, done.status, job.epoch)
                .await;
        }

        // Attempts within this epoch drive the retry policy; the recorded number continues
        // after the attempts of earlier epochs (a manual retry starts a new epoch).
        let attempt = delivery.delivered.max(1);
        let number = job.epoch + attempt;
        if let Some(refusal) = self.over_delivery_budget(step, attempt) {
            let attempted = Attempted {
                number,
                started: Utc::now(),
                execution: refusal,
                executed: None,
            };
            return self
                .finish_attempt(&flow, &run, step, &job, attempted)
                .await;
        }
        let resolved = self.resolve_action(&flow, step).await;
        let auth = self
            .connection_for(step.connection.as_deref(), &step.piece)
            .await?;
        let started = Utc::now();
        let mut execution = match (&resolved, &auth) {
            (Err(error), _) => engine::Execution::refused(error.clone(), step, attempt),
            (Ok(_), Err(error)) => engine::Execution::failed(error.clone()),
            (Ok((_, action)), Ok(auth)) => {
                let run_info =
                    RunInfo::new(&run.id, &flow.flow_id, flow.version, &step.name, number)
                        .started_by(run.started_by.clone());
                let mut ctx = runtime.context(run_info, &flow, auth.clone());
                if let Some(max) = step.max_response_bytes {
                    ctx.http = ctx.http.with_max_response_bytes(max);
                }
                let work = engine::execute(action.as_ref(), step, &run, &ctx, attempt);
                self.with_progress(delivery, work).await
            }
        };
        // Whatever leaves the step — output, error, the recorded input — may echo the
        // connection's secrets (an upstream quoting the Authorization header): masked before
        // it is recorded, logged, traced, audited or answered.
        if let (Ok((piece, _)), Ok(Some(values))) = (&resolved, &auth) {
            execution.mask(&Secrets::of(piece.auth(), values));
        }
        execution.limit(self.config.max_output_bytes);
        let attempted = Attempted {
            number,
            started,
            execution,
            executed: resolved.ok(),
        };
        self.finish_attempt(&flow, &run, step, &job, attempted)
            .await
    }

    /// A step delivered more often than its retry policy's attempts plus the infrastructure
    /// allowance had its results lost to store or bus errors each time: it is not run again
    /// (its effects so far are bounded), only failed — retried until that is recorded.
    fn over_delivery_budget(&self, step: &StepDef, delivered: u32) -> Option<engine::Execution> {
        let budget = step
            .retry_policy()
            .max_attempts
            .saturating_add(self.config.max_infra_retries);
        (delivered > budget).then(|| {
            tracing::warn!(step = %step.name, deliveries = delivered, "step delivered past its budget; failing it without running it");
            engine::Execution::failed(format!(
                "gave up after {delivered} deliveries: the results of earlier attempts could not be recorded (store or bus errors, see the worker log)"
            ))
        })
    }

    /// The decrypted values of the step's connection, if it names one. `Err(RuntimeError)` is
    /// an outage (the job is retried); `Ok(Err(message))` a problem no retry fixes.
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

    /// Runs `work` while telling the broker, every third of the ack wait, that the job is alive.
    async fn with_progress<T>(&self, delivery: &Delivery, work: impl Future<Output = T>) -> T {
        let mut ticks = tokio::time::interval(self.config.ack_wait / 3);
        ticks.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = ticks.tick() => {
                    if let Err(err) = delivery.progress().await {
                        tracing::debug!(error = %err, "progress ack failed");
                    }
                }
            }
        }
    }

    async fn resolve_action(
        &self,
        flow: &FlowVersion,
        step: &StepDef,
    ) -> Result<(Piece, Arc<dyn DynAction>), PieceError> {
        let piece = self
            .resolve_piece(flow, &step.name, &step.piece, step.version.as_ref())
            .await?;
        let action = piece.action(&step.action).cloned().ok_or_else(|| {
            PieceError::fatal(format!(
                "piece `{}` {} has no action `{}`",
                piece.name(),
                piece.version(),
                step.action
            ))
        })?;
        Ok((piece, action))
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

    async fn finish_attempt(
        &self,
        flow: &FlowVersion,
        run: &Run,
        step: &StepDef,
        job: &StepJob,
        attempted: Attempted,
    ) -> Result<Settle, RuntimeError> {
        let Attempted {
            number: attempt,
            started,
            execution,
            executed,
        } = attempted;
        let engine::Execution {
            outcome,
            recorded_input,
            duration,
        } = execution;
        let (status, output, error, settle) = match &outcome {
            StepOutcome::Succeeded { output } => (
                StepStatus::Succeeded,
                Some(output.clone()),
                None,
                Settle::Ack,
            ),
            StepOutcome::Retry { error, delay } => (
                StepStatus::Retrying,
                None,
                Some(error.clone()),
                Settle::Nak(*delay),
            ),
            StepOutcome::Failed { error } => (
                StepStatus::Failed,
                None,
                Some(error.clone()),
                Settle::Term(TermReason::failed),
            ),
        };
        let version = executed
            .as_ref()
            .map(|(piece, _)| piece.version().to_string())
            .or_else(|| flow.step_version(&step.name).map(ToString::to_string))
            .unwrap_or_default();
        let mut attempts = run
            .step(&step.name)
            .map(|s| s.attempts.clone())
            .unwrap_or_default();
        attempts.push(Attempt {
            attempt,
            status,
            started_at: started,
            duration_ms: millis(duration),
            error: error.clone(),
            worker: self.config.id.clone(),
        });
        let state = StepState {
            name: step.name.clone(),
            piece: step.piece.clone(),
            action: step.action.clone(),
            version: version.clone(),
            status,
            input: recorded_input,
            output: output.clone(),
            error: error.clone(),
            attempts,
        };
        let next = flow.definition.next_step(Some(&step.name));
        let continues = status == StepStatus::Succeeded
            || (status == StepStatus::Failed && step.on_failure == OnFailure::Continue);
        let run_update = match status {
            StepStatus::Retrying => None,
            _ if continues && next.is_some() => None,
            _ if continues => Some(finished(RunStatus::Succeeded, None)),
            _ => Some(finished(
                RunStatus::Failed,
                Some(format!(
                    "step `{}` failed: {}",
                    step.name,
                    error.clone().unwrap_or_default()
                )),
            )),
        };
        let run_status = run_update.as_ref().map_or(RunStatus::Running, |u| u.status);
        let response = match (&executed, &output) {
            (Some((_, action)), Some(output)) if action.spec().webhook_response => {
                Some(output.clone())
            }
            _ => None,
        };
        log_attempt(run, step, attempt, status, duration, error.as_deref());
        self.observe_attempt(step, &version, attempt, status, duration, error.as_deref());
        let result = StepResult {
            run_id: run.id.clone(),
            flow_id: flow.flow_id.clone(),
            flow_version: flow.version,
            step: step.name.clone(),
            piece: step.piece.clone(),
            action: step.action.clone(),
            version,
            attempt,
            status: proto_step_status(status) as i32,
            duration_ms: millis(duration),
            error: error.clone().unwrap_or_default(),
            run_status: proto_run_status(run_status) as i32,
            finished_unix_ms: Utc::now().timestamp_millis(),
        };
        if let (Some((piece, action)), Some(output)) = (&executed, &output)
            && action.spec().health_check
        {
            self.observe_health(piece.name(), &flow.flow_id, output);
        }
        if let Some(update) = &run_update {
            self.runtime
                .metrics
                .run_finished(&flow.flow_id, run_outcome(update.status));
        }
        let audit = audit_event(
            &self.actor,
            "step.execute",
            &format!("run/{}/step/{}", run.id, step.name),
            duration,
            error.as_ref().filter(|_| status != StepStatus::Succeeded),
        );
        self.runtime
            .store
            .record_step(StepUpdate {
                run_id: run.id.clone(),
                step: state,
                result,
                response,
                run: run_update,
                audit: Some(audit),
            })
            .await?;
        if continues && let Some(next) = next {
            self.runtime
                .publish_step(flow, &run.id, &next.name, job.epoch)
                .await?;
        }
        Ok(settle)
    }

    /// Completes what follows an attempt that was recorded before its worker died.
    async fn hand_off(
        &self,
        flow: &FlowVersion,
        run: &Run,
        step: &StepDef,
        status: StepStatus,
        epoch: u32,
    ) -> Result<Settle, RuntimeError> {
        let continues = status == StepStatus::Succeeded || step.on_failure == OnFailure::Continue;
        if continues && let Some(next) = flow.definition.next_step(Some(&step.name)) {
            self.runtime
                .publish_step(flow, &run.id, &next.name, epoch)
                .await?;
        }
        tracing::debug!(run_id = %run.id, step = %step.name, "step already recorded; handed off");
        Ok(Settle::Ack)
    }

    async fn fail_run(&self, run: &Run, error: String) -> Result<(), RuntimeError> {
        tracing::warn!(run_id = %run.id, error = %error, "run failed");
        self.runtime
            .store
            .update_run(&run.id, finished(RunStatus::Failed, Some(error)))
            .await?;
        self.runtime
            .metrics
            .run_finished(&run.flow_id, RunOutcome::failed);
        Ok(())
    }

    /// Puts an attempt on the step's span and into the step metrics.
    fn observe_attempt(
        &self,
        step: &StepDef,
        version: &str,
        attempt: u32,
        status: StepStatus,
        duration: Duration,
        error: Option<&str>,
    ) {
        let outcome = match status {
            StepStatus::Succeeded => metrics::StepOutcome::succeeded,
            StepStatus::Retrying => metrics::StepOutcome::retrying,
            StepStatus::Failed => metrics::StepOutcome::failed,
        };
        let span = tracing::Span::current();
        span.record("piecework.piece.version", version);
        span.record("piecework.attempt", attempt);
        span.record("piecework.outcome", status.as_str());
        if let Some(error) = error {
            // The recorded error: connection values are already redacted from it.
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", error);
        }
        self.runtime.metrics.step_attempted(
            &step.piece,
            &step.action,
            version,
            outcome,
            duration.as_secs_f64(),
        );
    }

    /// Exports a health check action's verdict: `status: healthy` (or `healthy: true`) is
    /// healthy, anything else is not.
    fn observe_health(&self, piece: &str, flow: &str, output: &serde_json::Value) {
        let healthy = output.get("status").and_then(|s| s.as_str()) == Some("healthy")
            || output.get("healthy").and_then(serde_json::Value::as_bool) == Some(true);
        let metrics = &self.runtime.metrics;
        metrics
            .piece_healthy
            .get_or_create(&HealthLabels {
                piece: piece.to_owned(),
                flow: flow.to_owned(),
            })
            .set(i64::from(healthy));
        metrics
            .health_checks
            .get_or_create(&HealthCheckLabels {
                piece: piece.to_owned(),
                healthy,
            })
            .inc();
    }

    async fn poll(&self, job: PollJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
        let span = tracing::info_span!(
            "poll",
            otel.name = %format_args!("poll {}", job.flow_id),
            otel.kind = "consumer",
            otel.status_code = Empty,
            messaging.system = self.runtime.bus.system(),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %delivery.subject,
            messaging.message.id = delivery.header("Nats-Msg-Id").unwrap_or_default(),
            piecework.flow.id = %job.flow_id,
            piecework.flow.version = job.flow_version,
            piecework.tick_unix_ms = job.tick_unix_ms,
            piecework.items = Empty,
            piecework.new_items = Empty,
            piecework.delivery = delivery.delivered,
            piecework.worker = %self.config.id,
        );
        propagation::set_parent(&span, &delivery.headers);
        self.run_poll(job, delivery).instrument(span).await
    }

    async fn run_poll(&self, job: PollJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        let Some(flow) = runtime.flow_version(&job.flow_id, job.flow_version).await? else {
            return self
                .poison(
                    delivery,
                    &format!(
                        "flow {} version {} does not exist",
                        job.flow_id, job.flow_version
                    ),
                )
                .await;
        };
        let enabled = runtime
            .store
            .get_flow(&flow.flow_id)
            .await?
            .is_some_and(|f| f.enabled);
        if !enabled {
            return Ok(Settle::Ack);
        }
        let trigger = &flow.definition.trigger;
        let piece = match self
            .resolve_piece(&flow, "trigger", &trigger.piece, trigger.version.as_ref())
            .await
        {
            Ok(piece) => piece,
            Err(error) => return self.poll_failed(&flow, &error.to_string()).await,
        };
        match piece.trigger(&trigger.trigger).cloned() {
            Some(TriggerHandle::Schedule(_)) => {
                let tick =
                    DateTime::from_timestamp_millis(job.tick_unix_ms).unwrap_or_else(Utc::now);
                let item = json!({ "scheduled_at": tick, "fired_at": Utc::now() });
                let run_id =
                    deterministic_run_id(&flow.flow_id, &format!("tick:{}", job.tick_unix_ms));
                runtime
                    .start_run(&flow, run_id, item, metrics::TriggerKind::schedule)
                    .await?;
                Ok(Settle::Ack)
            }
            Some(TriggerHandle::Polling(polling)) => {
                let strategy = match polling.spec().kind {
                    TriggerKind::Polling { strategy, .. } => strategy,
                    _ => DedupeStrategy::TimeBased,
                };
                // One poll of a flow at a time across the fleet: a slow poll and the next tick
                // must not both advance the cursor. A tick that finds the lease taken is skipped;
                // the poll in progress will see the same new items.
                let lease = format!("poll:{}", flow.flow_id);
                let holder = format!("{}:{}", self.config.id, job.tick_unix_ms);
                let ttl = self.config.poll_timeout + POLL_LEASE_MARGIN;
                if !runtime.store.acquire_lease(&lease, &holder, ttl).await? {
                    tracing::debug!(flow = %flow.flow_id, "another worker is polling this flow; skipping the tick");
                    self.count_poll(&flow.flow_id, PollOutcome::skipped);
                    return Ok(Settle::Ack);
                }
                let polled = self
                    .poll_once(&flow, &piece, polling.as_ref(), strategy, &job, delivery)
                    .await;
                if let Err(err) = runtime.store.release_lease(&lease, &holder).await {
                    tracing::debug!(error = %err, "could not release the poll lease; it will lapse");
                }
                polled
            }
            Some(TriggerHandle::Webhook(_)) => {
                self.poison(
                    delivery,
                    &format!(
                        "flow {} has a webhook trigger, which is not polled",
                        flow.flow_id
                    ),
                )
                .await
            }
            None => {
                self.poll_failed(
                    &flow,
                    &format!(
                        "piece `{}` has no trigger `{}`",
                        trigger.piece, trigger.trigger
                    ),
                )
                .await
            }
        }
    }

    /// Polls once and starts a run per new item; the caller holds the flow's poll lease.
    async fn poll_once(
        &self,
        flow: &FlowVersion,
        piece: &Piece,
        polling: &dyn piecework_sdk::trigger::DynPolling,
        strategy: DedupeStrategy,
        job: &PollJob,
        delivery: &Delivery,
    ) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        let trigger = &flow.definition.trigger;
        let started = Instant::now();
        let run_info = RunInfo::new(
            &format!("poll:{}", job.tick_unix_ms),
            &flow.flow_id,
            flow.version,
            "trigger",
            delivery.delivered,
        )
        .started_by(piecework_sdk::Principal::new("schedule", None));
        let auth = match self
            .connection_for(trigger.connection.as_deref(), &trigger.piece)
            .await?
        {
            Ok(auth) => auth,
            Err(error) => return self.poll_failed(flow, &error).await,
        };
        // What the source answers may echo the connection's secrets: never into a run.
        let secrets = auth
            .as_ref()
            .map(|values| Secrets::of(piece.auth(), values))
            .unwrap_or_default();
        let ctx = runtime.context(run_info, flow, auth);
        let input = serde_json::Value::Object(trigger.input.clone());
        let polled =
            match tokio::time::timeout(self.config.poll_timeout, polling.poll_json(&ctx, input))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(piecework_sdk::PieceError::retryable("poll timed out")),
            };
        let items = match polled {
            Ok(items) => items,
            Err(err) if err.is_retryable() && delivery.delivered < POLL_ATTEMPTS => {
                let error = secrets.mask(&err.to_string()).into_owned();
                tracing::warn!(flow = %flow.flow_id, error, "poll failed; retrying");
                self.count_poll(&flow.flow_id, PollOutcome::retrying);
                return Ok(Settle::Nak(err.retry_after().unwrap_or(POLL_RETRY_DELAY)));
            }
            Err(err) => {
                let error = secrets.mask(&err.to_string()).into_owned();
                return self.poll_failed(flow, &error).await;
            }
        };
        let polled_items = items.len();
        let previous = runtime.store.trigger_state(&flow.flow_id).await?;
        let outcome =
            match polling::dedupe(strategy, previous, items, self.config.max_items_per_poll) {
                Ok(outcome) => outcome,
                Err(err) => return self.poll_failed(flow, &err.to_string()).await,
            };
        let new_items = outcome.new_items.len();
        for mut item in outcome.new_items {
            let run_id = deterministic_run_id(&flow.flow_id, &item.dedupe_key());
            secrets.mask_value(&mut item.data);
            runtime
                .start_run(flow, run_id, item.data, metrics::TriggerKind::polling)
                .await?;
        }
        // The cursor moves only after every run exists: a crash before this line
        // repeats the poll, and deterministic run ids keep the runs single.
        runtime
            .store
            .put_trigger_state(&flow.flow_id, &outcome.state)
            .await?;
        tracing::debug!(flow = %flow.flow_id, new_items, elapsed = ?started.elapsed(), "polled");
        let span = tracing::Span::current();
        span.record("piecework.items", polled_items);
        span.record("piecework.new_items", new_items);
        self.count_poll(&flow.flow_id, PollOutcome::succeeded);
        let metrics = &runtime.metrics;
        let labels = FlowLabels {
            flow: flow.flow_id.clone(),
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        metrics
            .poll_items
            .get_or_create(&labels)
            .inc_by(count(polled_items));
        metrics
            .poll_dedupe_dropped
            .get_or_create(&labels)
            .inc_by(count(
                polled_items.saturating_sub(new_items + outcome.deferred),
            ));
        Ok(Settle::Ack)
    }

    fn count_poll(&self, flow: &str, outcome: PollOutcome) {
        self.runtime
            .metrics
            .polls
            .get_or_create(&PollLabels {
                flow: flow.to_owned(),
                outcome,
            })
            .inc();
    }

    async fn poll_failed(&self, flow: &FlowVersion, error: &str) -> Result<Settle, RuntimeError> {
        tracing::warn!(flow = %flow.flow_id, error, "poll failed");
        self.count_poll(&flow.flow_id, PollOutcome::failed);
        tracing::Span::current().record("otel.status_code", "ERROR");
        let resource = format!("flow/{}", flow.flow_id);
        self.runtime
            .audit(
                &self.actor,
                "trigger.poll",
                &resource,
                Instant::now(),
                Some(&error),
            )
            .await;
        Ok(Settle::Term(TermReason::failed))
    }
}

fn run_outcome(status: RunStatus) -> RunOutcome {
    match status {
        RunStatus::Failed => RunOutcome::failed,
        RunStatus::Cancelled => RunOutcome::cancelled,
        RunStatus::Running | RunStatus::Succeeded => RunOutcome::succeeded,
    }
}

fn finished(status: RunStatus, error: Option<String>) -> RunUpdate {
    RunUpdate {
        status,
        error,
        finished_at: Some(Utc::now()),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn log_attempt(
    run: &Run,
    step: &StepDef,
    attempt: u32,
    status: StepStatus,
    duration: Duration,
    error: Option<&str>,
) {
    match status {
        // Successes are the bulk of the traffic and are already in `pw:results`, the metrics
        // and the trace: logged at debug. Failures stay visible at warn.
        StepStatus::Succeeded => {
            tracing::debug!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, ?duration, "step succeeded")
        }
        StepStatus::Retrying => {
            tracing::warn!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, error, "step failed; will retry")
        }
        StepStatus::Failed => {
            tracing::warn!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, error, "step failed")
        }
    }
}

pub(crate) fn proto_step_status(status: StepStatus) -> v1::StepStatus {
    match status {
        StepStatus::Succeeded => v1::StepStatus::Succeeded,
        StepStatus::Retrying => v1::StepStatus::Retrying,
        StepStatus::Failed => v1::StepStatus::Failed,
    }
}

pub(crate) fn proto_run_status(status: RunStatus) -> v1::RunStatus {
    match status {
        RunStatus::Running => v1::RunStatus::Running,
        RunStatus::Succeeded => v1::RunStatus::Succeeded,
        RunStatus::Failed => v1::RunStatus::Failed,
        RunStatus::Cancelled => v1::RunStatus::Cancelled,
    }
}

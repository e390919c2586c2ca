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
use piecework_sdk::polling::{self, DedupeStrategy};
use piecework_sdk::{DynAction, Piece, RunInfo, TriggerHandle, TriggerKind};
use piecework_store::{RunUpdate, StepUpdate};
use serde_json::json;

use crate::WorkerConfig;

/// Retries of a poll that failed with a retryable error, and the delay between them.
const POLL_ATTEMPTS: u32 = 3;
const POLL_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Delay before retrying a job whose bookkeeping failed (store or bus unreachable).
const INFRA_RETRY_DELAY: Duration = Duration::from_secs(2);
/// A poll lease outlives the poll's timeout by this much before it lapses.
const POLL_LEASE_MARGIN: Duration = Duration::from_secs(30);

pub(crate) struct Handler {
    config: WorkerConfig,
    runtime: Arc<Runtime>,
    actor: Actor,
}

/// One attempt as executed, for recording.
struct Attempted<'a> {
    /// The recorded attempt number (continuing across manual retries).
    number: u32,
    started: DateTime<Utc>,
    execution: engine::Execution,
    /// The piece and action that ran; `None` when they could not be resolved.
    executed: Option<(&'a Piece, &'a Arc<dyn DynAction>)>,
}

/// How a job ended, before the delivery is settled.
enum Settle {
    Ack,
    Nak(Duration),
    Term,
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
        let kind = subject::parse(&delivery.subject).map(|(_, kind)| kind);
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
            Ok(Settle::Term) => delivery.term().await,
            Err(err) => {
                tracing::warn!(error = %err, subject = %delivery.subject, "job bookkeeping failed; it will be redelivered");
                delivery.nak(INFRA_RETRY_DELAY).await
            }
        };
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
        Ok(Settle::Term)
    }

    async fn step(&self, job: StepJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        let Some(run) = runtime.store.get_run(&job.run_id).await? else {
            return self
                .poison(delivery, &format!("run {} does not exist", job.run_id))
                .await;
        };
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
            return Ok(Settle::Term);
        };
        let Some(step) = flow.definition.step(&job.step) else {
            let error = format!(
                "flow {} version {} has no step `{}`",
                flow.flow_id, flow.version, job.step
            );
            self.fail_run(&run, error).await?;
            return Ok(Settle::Term);
        };
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
        let resolved = self.resolve_action(&flow, step);
        let auth = self
            .connection_for(step.connection.as_deref(), &step.piece)
            .await?;
        let started = Utc::now();
        let execution = match (&resolved, &auth) {
            (Err(error), _) | (Ok(_), Err(error)) => engine::Execution::failed(error.clone()),
            (Ok((_, action)), Ok(auth)) => {
                let run_info =
                    RunInfo::new(&run.id, &flow.flow_id, flow.version, &step.name, number);
                let ctx = runtime.context(run_info, &flow, auth.clone());
                let work = engine::execute(action.as_ref(), step, &run, &ctx, attempt);
                self.with_progress(delivery, work).await
            }
        };
        let attempted = Attempted {
            number,
            started,
            execution,
            executed: resolved.ok(),
        };
        self.finish_attempt(&flow, &run, step, &job, attempted)
            .await
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

    fn resolve_action(
        &self,
        flow: &FlowVersion,
        step: &StepDef,
    ) -> Result<(&Piece, &Arc<dyn DynAction>), String> {
        let piece = self.resolve_piece(flow, &step.name, &step.piece, step.version.as_ref())?;
        let action = piece.action(&step.action).ok_or_else(|| {
            format!(
                "piece `{}` {} has no action `{}`",
                piece.name(),
                piece.version(),
                step.action
            )
        })?;
        Ok((piece, action))
    }

    /// The pinned version if registered here, else the newest one in the flow's range; a
    /// worker that has neither refuses with a clear error (never retried).
    fn resolve_piece(
        &self,
        flow: &FlowVersion,
        key: &str,
        name: &str,
        range: Option<&piecework_sdk::semver::VersionReq>,
    ) -> Result<&Piece, String> {
        let registry = &self.runtime.registry;
        if let Some(pinned) = flow.resolved.get(key)
            && let Some(piece) = registry.get(name, pinned)
        {
            return Ok(piece);
        }
        let range = range
            .cloned()
            .unwrap_or(piecework_sdk::semver::VersionReq::STAR);
        registry.resolve(name, &range).ok_or_else(|| {
            let have: Vec<String> = registry
                .versions(name)
                .iter()
                .map(ToString::to_string)
                .collect();
            format!(
                "this worker cannot serve piece `{name}` {range} (it has: {})",
                if have.is_empty() {
                    "none".to_owned()
                } else {
                    have.join(", ")
                }
            )
        })
    }

    async fn finish_attempt(
        &self,
        flow: &FlowVersion,
        run: &Run,
        step: &StepDef,
        job: &StepJob,
        attempted: Attempted<'_>,
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
            StepOutcome::Failed { error } => {
                (StepStatus::Failed, None, Some(error.clone()), Settle::Term)
            }
        };
        let version = executed
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
        let response = match (executed, &output) {
            (Some((_, action)), Some(output)) if action.spec().webhook_response => {
                Some(output.clone())
            }
            _ => None,
        };
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
        log_attempt(run, step, attempt, status, duration, error.as_deref());
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
        Ok(())
    }

    async fn poll(&self, job: PollJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
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
        let handle =
            match self.resolve_piece(&flow, "trigger", &trigger.piece, trigger.version.as_ref()) {
                Ok(piece) => piece.trigger(&trigger.trigger).cloned(),
                Err(error) => return self.poll_failed(&flow, &error).await,
            };
        match handle {
            Some(TriggerHandle::Schedule(_)) => {
                let tick =
                    DateTime::from_timestamp_millis(job.tick_unix_ms).unwrap_or_else(Utc::now);
                let item = json!({ "scheduled_at": tick, "fired_at": Utc::now() });
                let run_id =
                    deterministic_run_id(&flow.flow_id, &format!("tick:{}", job.tick_unix_ms));
                runtime.start_run(&flow, run_id, item).await?;
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
                    return Ok(Settle::Ack);
                }
                let polled = self
                    .poll_once(&flow, polling.as_ref(), strategy, &job, delivery)
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
        );
        let auth = match self
            .connection_for(trigger.connection.as_deref(), &trigger.piece)
            .await?
        {
            Ok(auth) => auth,
            Err(error) => return self.poll_failed(flow, &error).await,
        };
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
                tracing::warn!(flow = %flow.flow_id, error = %err, "poll failed; retrying");
                return Ok(Settle::Nak(err.retry_after().unwrap_or(POLL_RETRY_DELAY)));
            }
            Err(err) => return self.poll_failed(flow, &err.to_string()).await,
        };
        let previous = runtime.store.trigger_state(&flow.flow_id).await?;
        let outcome =
            match polling::dedupe(strategy, previous, items, self.config.max_items_per_poll) {
                Ok(outcome) => outcome,
                Err(err) => return self.poll_failed(flow, &err.to_string()).await,
            };
        let new_items = outcome.new_items.len();
        for item in outcome.new_items {
            let run_id = deterministic_run_id(&flow.flow_id, &item.dedupe_key());
            runtime.start_run(flow, run_id, item.data).await?;
        }
        // The cursor moves only after every run exists: a crash before this line
        // repeats the poll, and deterministic run ids keep the runs single.
        runtime
            .store
            .put_trigger_state(&flow.flow_id, &outcome.state)
            .await?;
        tracing::debug!(flow = %flow.flow_id, new_items, elapsed = ?started.elapsed(), "polled");
        Ok(Settle::Ack)
    }

    async fn poll_failed(&self, flow: &FlowVersion, error: &str) -> Result<Settle, RuntimeError> {
        tracing::warn!(flow = %flow.flow_id, error, "poll failed");
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
        Ok(Settle::Term)
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
        StepStatus::Succeeded => {
            tracing::info!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, ?duration, "step succeeded")
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

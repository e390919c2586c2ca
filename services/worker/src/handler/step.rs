//! Step jobs: drive a run forward from the job's step.
//!
//! The job's step runs first. After each attempt the lifecycle says what follows: the next
//! step *inline* (same queue, within `[worker] max_steps_per_delivery`), a new job for it (another
//! queue, a retry that must wait, the budget spent), or the end. Each attempt is journaled in
//! the store before the next begins, and the run is kept in memory between inline steps, so a
//! run of consecutive steps costs one delivery and one read of the run. A redelivered job
//! resumes from the journal (`lifecycle::on_delivery`): a step recorded as done never runs
//! again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use piecework_bus::Delivery;
use piecework_core::engine::{self, StepOutcome};
use piecework_core::flow::{FlowVersion, StepDef, StepKind};
use piecework_core::lifecycle::{
    self, AfterAttempt, At, Delivered, Join, Next, Position, Resume, Settle, Termination,
};
use piecework_core::run::{Attempt, InFlight};
use piecework_core::{Run, RunStatus, StepState, StepStatus};
use piecework_proto::v1::{StepJob, StepResult};
use piecework_runtime::{RuntimeError, audit_event};
use piecework_sdk::mask::Secrets;
use piecework_sdk::{DynAction, Piece, PieceError, RunInfo};
use piecework_store::{Pause, RunUpdate, StepUpdate, Timer};
use piecework_telemetry::propagation;
use serde_json::Value;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::Handler;
use super::observe::{self, millis};

/// How long a run that found its flow's run slots all taken waits before trying again.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// How long a step runs before its worker watches for the run's end (a cancel, the flow's
/// timeout, a failure in another lane) to stop the step when it comes: most steps end sooner
/// and pay nothing for it.
const WATCH_RUN_AFTER: Duration = Duration::from_secs(1);

/// One attempt as executed, before it is recorded.
struct Attempted {
    started: DateTime<Utc>,
    execution: engine::Execution,
    /// The piece and action that ran; `None` when they could not be resolved.
    executed: Option<(Piece, Arc<dyn DynAction>)>,
    /// The run ended while the action ran, which was stopped.
    stopped: bool,
    /// The attempt was marked in flight (it ran a while), or one before it was found lost:
    /// the record clears the mark.
    unmark: bool,
}

/// How one step of a chain ends.
enum Then<'f> {
    /// The delivery is done: settle it so.
    Settle(Settle),
    /// Run this step next, inline.
    Inline(At<'f>),
    /// The last lane of a loop whose items run side by side ended: close the loop, in
    /// `run` as it now is (with every lane's items).
    Close { around: &'f StepDef, run: Box<Run> },
}

/// Where the chain of a delivery is.
struct Chain<'a> {
    job: &'a StepJob,
    delivery: &'a Delivery,
    queue: &'a str,
    flow: &'a FlowVersion,
}

impl Handler {
    pub(super) async fn step(
        &self,
        job: StepJob,
        delivery: &Delivery,
        queue: &str,
    ) -> Result<Settle, RuntimeError> {
        let Some(mut run) = self.runtime.run(&job.run_id).await? else {
            return self
                .poison(delivery, &format!("run {} does not exist", job.run_id))
                .await;
        };
        let Some(flow) = self
            .runtime
            .flow_version(&job.flow_id, job.flow_version)
            .await?
        else {
            let error = format!(
                "flow {} version {} does not exist",
                job.flow_id, job.flow_version
            );
            self.fail_run(&run, error).await?;
            return Ok(Settle::Term(Termination::Poison));
        };
        if flow.definition.uses_resume_url() {
            run.resume_url = self.runtime.resume_url(&run.id);
        }
        let delivered = Delivered {
            step: &job.step,
            delivered: delivery.delivered,
            epoch: job.epoch,
            delay: (job.delay_ms > 0).then(|| Duration::from_millis(job.delay_ms)),
            now: self.runtime.now(),
        };
        let resume = lifecycle::on_delivery(
            &flow.definition,
            &run,
            delivered,
            self.config.max_infra_retries,
        );
        let chain = Chain {
            job: &job,
            delivery,
            queue,
            flow: &flow,
        };
        match resume {
            Resume::Finished => {
                tracing::debug!(run_id = %run.id, step = %job.step, status = run.status.as_str(), "run already finished; dropping step");
                if run
                    .step(&job.step)
                    .is_some_and(|s| s.status == StepStatus::Waiting)
                {
                    // Cancelled while it waited: its timer goes too.
                    self.runtime.drop_timer(&timer_of(&job, &run)).await?;
                }
                Ok(Settle::Ack)
            }
            Resume::Wake(step) => {
                if !self.runtime.claim_wake(&timer_of(&job, &run)).await? {
                    tracing::debug!(run_id = %run.id, step = %job.step, "woken by someone else; dropping");
                    return Ok(Settle::Ack);
                }
                let mut run = run;
                run.status = RunStatus::Running;
                let woke = match run.step(&step.name()) {
                    Some(state) if step.step.kind() == StepKind::Subflow => {
                        Some(Box::pin(self.child_result(step.step, state)).await?)
                    }
                    Some(state) => Some(engine::wake(step.step, state)),
                    None => None,
                };
                self.drive(&chain, run, step, woke, self.inline_budget())
                    .await
            }
            Resume::Poison(why) => {
                let error = format!("flow {} version {}: {why}", flow.flow_id, flow.version);
                self.fail_run(&run, error).await?;
                Ok(Settle::Term(Termination::Poison))
            }
            Resume::Wait(delay) => Ok(Settle::Nak(delay)),
            Resume::HandOff(next) => self.hand_off(&chain, run, next, &[]).await,
            Resume::Fork { next, forks } => self.hand_off(&chain, run, next, &forks).await,
            Resume::GiveUp { step, deliveries } => {
                tracing::warn!(run_id = %run.id, step = %job.step, deliveries, "step delivered past its budget; failing it without running it");
                let refused = engine::Execution::failed(format!(
                    "gave up after {deliveries} deliveries: the results of earlier attempts could not be recorded (store or bus errors, see the worker log)"
                ));
                let settle = self
                    .drive(&chain, run, step, Some(refused), self.inline_budget())
                    .await?;
                Ok(match settle {
                    Settle::Term(Termination::Failed) => Settle::Term(Termination::GaveUp),
                    other => other,
                })
            }
            Resume::Run { step, .. } => {
                if let Some(max) = flow.definition.max_concurrent_runs
                    && run.steps.is_empty()
                    && !self
                        .runtime
                        .acquire_run_slot(&flow.flow_id, &run.id, max)
                        .await?
                {
                    // All slots taken: the run waits, unstarted, in a job of its own.
                    tracing::debug!(run_id = %run.id, flow = %flow.flow_id, max, "flow at max_concurrent_runs; run waits");
                    self.runtime
                        .requeue_step(&flow, &run.id, &job.step, SLOT_WAIT)
                        .await?;
                    return Ok(Settle::Ack);
                }
                self.drive(&chain, run, step, None, self.inline_budget())
                    .await
            }
        }
    }

    /// How many steps a delivery may run inline after its own.
    fn inline_budget(&self) -> u32 {
        self.config.max_steps_per_delivery.saturating_sub(1)
    }

    /// Finishes the hand-over of a delivery that died after recording: publishes `next`
    /// and the lanes it never started (`forks`), or joins the lane it ended.
    async fn hand_off<'f>(
        &self,
        chain: &Chain<'f>,
        run: Run,
        next: Next<'f>,
        forks: &[At<'f>],
    ) -> Result<Settle, RuntimeError> {
        tracing::debug!(run_id = %run.id, step = %chain.job.step, "step already recorded; handing over");
        for fork in forks {
            self.runtime
                .publish_step(chain.flow, &run.id, &fork.name(), chain.job.epoch)
                .await?;
        }
        match next {
            Next::Publish(step) => {
                self.runtime
                    .publish_step(chain.flow, &run.id, &step.name(), chain.job.epoch)
                    .await?;
                Ok(Settle::Ack)
            }
            Next::Join(join) => match self.join(&run, join).await? {
                Some(Then::Close { around, run }) => {
                    let closing = closing(&run, around);
                    self.drive(chain, *run, At::top(around), Some(closing), 0)
                        .await
                }
                _ => Ok(Settle::Ack),
            },
            Next::Done | Next::Inline(_) => Ok(Settle::Ack),
        }
    }

    /// Counts the end of a lane in the store; once every lane of the loop ended, the loop is
    /// to be closed (`Then::Close`) in the run as it now is.
    async fn join<'f>(&self, run: &Run, join: Join<'f>) -> Result<Option<Then<'f>>, RuntimeError> {
        let around = join.around;
        if !self
            .runtime
            .join_lane(&run.id, &around.name, join.lane, join.lanes)
            .await?
        {
            tracing::debug!(run_id = %run.id, step = %around.name, lane = join.lane, "lane ended; others still run");
            return Ok(None);
        }
        let Some(run) = self.runtime.run(&run.id).await? else {
            return Ok(None);
        };
        Ok(Some(Then::Close {
            around,
            run: Box::new(run),
        }))
    }

    /// Runs `first` and, while the lifecycle says so, the steps after it; returns how to
    /// settle the delivery. `refused` stands in for `first`'s execution when it must not run.
    async fn drive<'f>(
        &self,
        chain: &Chain<'f>,
        mut run: Run,
        first: At<'f>,
        mut refused: Option<engine::Execution>,
        mut budget: u32,
    ) -> Result<Settle, RuntimeError> {
        let mut step = first;
        let mut own_step = true;
        loop {
            let position = Position {
                queue: chain.queue,
                own_step,
                inline_budget: budget,
            };
            let span = self.step_span(chain, &run, step, own_step);
            let next = self
                .step_once(chain, &mut run, step, position, refused.take())
                .instrument(span)
                .await?;
            match next {
                Then::Settle(settle) => return Ok(settle),
                Then::Inline(inline) => {
                    step = inline;
                    own_step = false;
                    budget = budget.saturating_sub(1);
                }
                Then::Close { around, run: now } => {
                    refused = Some(closing(&now, around));
                    run = *now;
                    step = At::top(around);
                    own_step = false;
                    // What follows the loop gets a job of its own (see `Next::Join`).
                    budget = 0;
                }
            }
        }
    }

    /// One step of the chain, in its span: attempt, record, and hand over when the chain
    /// ends here.
    async fn step_once<'f>(
        &self,
        chain: &Chain<'f>,
        run: &mut Run,
        step: At<'f>,
        position: Position<'_>,
        refused: Option<engine::Execution>,
    ) -> Result<Then<'f>, RuntimeError> {
        let lost = run.in_flight(&step.name()).cloned();
        if let Some(lost) = &lost {
            self.note_lost(chain, run, step, lost);
        }
        let mut attempted = self
            .attempt(chain, run, step, position.own_step, refused)
            .await?;
        attempted.unmark |= lost.is_some();
        // A worker that began to stop while the step ran hands the next step over instead of
        // running it.
        let position = Position {
            inline_budget: if self.stopping.is_cancelled() {
                0
            } else {
                position.inline_budget
            },
            ..position
        };
        let (after, status) = self.record(chain, run, step, position, attempted).await?;
        if status.is_terminal() && after.run_end.is_none() {
            // Cancelled while the step ran: nothing after it runs.
            tracing::debug!(run_id = %run.id, step = %step.name(), "run ended; stopping");
            return Ok(Then::Settle(Settle::Ack));
        }
        // The other lanes of a loop this step started, each in a job of its own.
        for fork in &after.forks {
            self.runtime
                .publish_step(chain.flow, &run.id, &fork.name(), chain.job.epoch)
                .await?;
        }
        match after.next {
            Next::Done => Ok(Then::Settle(after.settle)),
            Next::Inline(next) => Ok(Then::Inline(next)),
            Next::Publish(next) => {
                // A retry handed over carries its wait; a next step runs at once.
                let delay = after.retry_in.unwrap_or_default();
                self.runtime
                    .publish_step_after(chain.flow, &run.id, &next.name(), chain.job.epoch, delay)
                    .await?;
                Ok(Then::Settle(after.settle))
            }
            Next::Join(join) => Ok(self
                .join(run, join)
                .await?
                .unwrap_or(Then::Settle(after.settle))),
        }
    }

    /// Puts the attempt `lost` describes into the step's record, as one that failed: its
    /// worker marked it in flight and stopped before recording it (killed, lost its node). It
    /// is written with the attempt that follows, and counts against the step's attempts.
    fn note_lost(&self, chain: &Chain<'_>, run: &mut Run, at: At<'_>, lost: &InFlight) {
        let name = at.name();
        let error = format!(
            "worker {} lost during attempt {}",
            lost.worker, lost.attempt
        );
        tracing::warn!(run_id = %run.id, step = %name, worker = %lost.worker, attempt = lost.attempt, "a worker was lost during this step; running it again");
        self.runtime
            .metrics
            .attempts_lost
            .get_or_create(&piecework_telemetry::metrics::FlowLabels {
                flow: run.flow_id.clone(),
            })
            .inc();
        let attempt = Attempt {
            attempt: lost.attempt,
            status: StepStatus::Retrying,
            started_at: lost.started_at,
            duration_ms: u64::try_from((Utc::now() - lost.started_at).num_milliseconds())
                .unwrap_or_default(),
            error: Some(error.clone()),
            worker: lost.worker.clone(),
        };
        let mut state = run.step(&name).cloned().unwrap_or_else(|| StepState {
            name: name.clone(),
            piece: at.step.piece.clone(),
            action: at.step.action.clone(),
            version: chain
                .flow
                .step_version(&at.step.name)
                .map(ToString::to_string)
                .unwrap_or_default(),
            status: StepStatus::Retrying,
            input: Value::Null,
            output: None,
            error: None,
            attempts: Vec::new(),
            retry_at: None,
            epoch: 0,
            branch: None,
        });
        state.status = StepStatus::Retrying;
        state.error = Some(error);
        state.attempts.push(attempt);
        run.upsert_step(state);
        run.in_flight.retain(|m| m.step != name);
    }

    /// The span of one step: a child of the run's span (wherever the run started), linked to
    /// the `publish` span that sent the job.
    fn step_span(&self, chain: &Chain<'_>, run: &Run, at: At<'_>, own: bool) -> tracing::Span {
        let (step, name) = (at.step, at.name());
        let delivery = chain.delivery;
        let span = tracing::info_span!(
            "step",
            otel.name = %format_args!("step {name}"),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            messaging.system = self.runtime.messaging_system(),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %delivery.subject,
            messaging.consumer.group.name = %format_args!("pw-{}", chain.queue),
            messaging.message.id = delivery.header("Nats-Msg-Id").unwrap_or_default(),
            piecework.run.id = %run.id,
            piecework.flow.id = %run.flow_id,
            piecework.flow.version = run.flow_version,
            piecework.step = %name,
            piecework.piece = %step.piece,
            piecework.action = %step.action,
            piecework.piece.version = Empty,
            piecework.attempt = Empty,
            piecework.outcome = Empty,
            piecework.inline = !own,
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
        if own {
            propagation::add_link(&span, &delivery.headers);
        }
        span
    }

    /// Executes one attempt of `step` against the run as it stands (or takes `refused`):
    /// render, validate, run under the timeout, then mask the connection's secrets and keep
    /// what is recorded within the limits.
    async fn attempt(
        &self,
        chain: &Chain<'_>,
        run: &Run,
        at: At<'_>,
        own_step: bool,
        refused: Option<engine::Execution>,
    ) -> Result<Attempted, RuntimeError> {
        let (step, name) = (at.step, at.name());
        let iteration = at.iteration(&chain.flow.definition);
        let mut started = Utc::now();
        if let Some(execution) = refused {
            return Ok(Attempted {
                started,
                execution,
                executed: None,
                stopped: false,
                unmark: false,
            });
        }
        let control = match step.kind() {
            StepKind::Action => None,
            StepKind::Branch => Some(engine::choose_branch(step, run, iteration)),
            StepKind::Delay | StepKind::Wait => Some(engine::start_pause(
                step,
                run,
                iteration,
                self.runtime.now(),
            )),
            StepKind::Loop => Some(engine::start_loop(step, run)),
            // Boxed, as the rarer paths below: the future of every step in flight is sized
            // for its largest path.
            StepKind::Subflow => Some(Box::pin(self.start_child(run, at, iteration)).await?),
        };
        if let Some(execution) = control {
            return Ok(Attempted {
                started,
                execution,
                executed: None,
                stopped: false,
                unmark: false,
            });
        }
        let flow = chain.flow;
        let epoch = if own_step { chain.job.epoch } else { 0 };
        let attempt = lifecycle::attempt_in_epoch(run.step(&name), epoch);
        let number = recorded_attempts(run, &name) + 1;
        let resolved = self.resolve_action(flow, step).await;
        let auth = self
            .connection_for(step.connection.as_deref(), &step.piece)
            .await?;
        if let Some(rate) = step.rate
            && resolved.is_ok()
        {
            // Fleet-wide: the store spaces the starts of every worker. Waiting spends no
            // attempt; the delivery is kept alive meanwhile.
            let wait = self
                .runtime
                .reserve_rate(&step.rate_key(), rate.interval())
                .await?;
            if !wait.is_zero() {
                tracing::debug!(run_id = %run.id, step = %name, ?wait, key = %step.rate_key(), "rate limited; waiting");
                self.with_progress(chain.delivery, tokio::time::sleep(wait))
                    .await;
                started = Utc::now();
            }
        }
        let in_flight = match step.max_in_flight {
            Some(max) if resolved.is_ok() => {
                let holder = format!("{}:{name}:{number}", run.id);
                Box::pin(self.take_in_flight(chain, step, &holder, max)).await?;
                started = Utc::now();
                Some(holder)
            }
            _ => None,
        };
        let mut stopped = false;
        let mut marked = false;
        let mut execution = match (&resolved, &auth) {
            (Err(error), _) => engine::Execution::refused(error.clone(), step, attempt),
            (Ok(_), Err(error)) => engine::Execution::failed(error.clone()),
            (Ok((_, action)), Ok(auth)) => {
                let run_info = RunInfo::new(&run.id, &flow.flow_id, flow.version, &name, number)
                    .started_by(run.started_by.clone());
                let mut ctx = self.runtime.context(run_info, flow, auth.clone());
                if let Some(max) = step.max_response_bytes {
                    ctx.http = ctx.http.with_max_response_bytes(max);
                }
                let began = tokio::time::Instant::now();
                let work = engine::execute(action.as_ref(), step, run, iteration, &ctx, attempt);
                let marker = InFlight {
                    step: name.clone(),
                    worker: self.config.id.clone(),
                    attempt: number,
                    delivery: chain.delivery.delivered,
                    started_at: started,
                };
                let limit = step.timeout() + WATCH_RUN_AFTER;
                let work = self.watch_long_step(&run.id, marker, limit, work, &mut marked);
                match self.with_progress(chain.delivery, work).await {
                    Ok(execution) => execution,
                    Err(status) => {
                        tracing::info!(run_id = %run.id, step = %name, status = status.as_str(), "run ended while the step ran; stopped it");
                        stopped = true;
                        let mut execution = engine::Execution::failed(format!(
                            "stopped: the run was {} while the step ran",
                            status.as_str()
                        ));
                        execution.duration = began.elapsed();
                        execution
                    }
                }
            }
        };
        if let Some(holder) = &in_flight
            && let Err(err) = self
                .runtime
                .release_in_flight(&step.rate_key(), holder)
                .await
        {
            // Its lease lapses by itself.
            tracing::warn!(step = %name, error = %err, "could not give back an in-flight place");
        }
        // Whatever leaves the step — output, error, the recorded input — may echo the
        // connection's secrets (an upstream quoting the Authorization header): masked before
        // it is recorded, logged, traced, audited or answered.
        if let (Ok((piece, _)), Ok(Some(values))) = (&resolved, &auth) {
            execution.mask(&Secrets::of(piece.auth(), values));
        }
        execution.limit(self.config.max_output_bytes);
        Ok(Attempted {
            started,
            execution,
            executed: resolved.ok(),
            stopped,
            unmark: marked,
        })
    }

    /// Runs `work`, the attempt `marker` describes; once it has run for [`WATCH_RUN_AFTER`]
    /// (most steps are done sooner and pay nothing), marks it in flight in the run (so a
    /// redelivery after this worker dies records the lost attempt; `marked` says so) and
    /// watches the run, for at most `limit`: when the run ends first (cancelled, failed by
    /// its flow's timeout or another lane), `work` is dropped at once — a piece process gets
    /// `cancel` for its call, an in-binary action stops at its next `.await` — and the run's
    /// status is returned.
    async fn watch_long_step<T>(
        &self,
        run_id: &str,
        marker: InFlight,
        limit: Duration,
        work: impl Future<Output = T>,
        marked: &mut bool,
    ) -> Result<T, RunStatus> {
        tokio::pin!(work);
        tokio::select! {
            out = &mut work => return Ok(out),
            () = tokio::time::sleep(WATCH_RUN_AFTER) => {}
        }
        // The step lives long: what follows is boxed, so that the many steps that end sooner
        // carry none of it in their futures.
        Box::pin(self.watch_run_during(run_id, &marker, limit, work, marked)).await
    }

    /// The rest of [`Handler::watch_long_step`], once the step has run a while: mark it in
    /// flight, then run it unless its run ends first.
    async fn watch_run_during<T>(
        &self,
        run_id: &str,
        marker: &InFlight,
        limit: Duration,
        mut work: std::pin::Pin<&mut impl Future<Output = T>>,
        marked: &mut bool,
    ) -> Result<T, RunStatus> {
        match self.runtime.mark_in_flight(run_id, marker).await {
            Ok(()) => *marked = true,
            Err(err) => {
                tracing::debug!(run_id, step = %marker.step, error = %err, "cannot mark the step in flight");
            }
        }
        let ended = async {
            let watch = self.runtime.watch_run(run_id).await?;
            Ok::<_, RuntimeError>(watch.ended(limit).await?)
        };
        tokio::select! {
            out = &mut work => Ok(out),
            ended = ended => match ended {
                Ok(Some(ended)) => Err(ended.status),
                Ok(None) => Ok(work.await),
                Err(err) => {
                    tracing::debug!(run_id, error = %err, "cannot watch the run; the step runs to its end");
                    Ok(work.await)
                }
            },
        }
    }

    /// Runs a sub-flow step: starts the other flow's run (once, whatever the deliveries) with
    /// the rendered input as its trigger output; with `wait` (the default) the step then
    /// waits for it, looking again when the run ends (it brings the step's timer forward) or,
    /// failing that, on a backing-off timer.
    async fn start_child(
        &self,
        run: &Run,
        at: At<'_>,
        iteration: Option<piecework_core::run::Iteration<'_>>,
    ) -> Result<engine::Execution, RuntimeError> {
        let step = at.step;
        let child = step.subflow.as_deref().unwrap_or_default();
        let trigger = match engine::render_input(step, run, iteration) {
            Ok(trigger) => trigger,
            Err(err) => return Ok(engine::Execution::failed(err.to_string())),
        };
        let wait = step.wait.unwrap_or(true);
        let started = self
            .runtime
            .start_subflow(run, &at.name(), child, trigger.clone(), wait)
            .await;
        let child_id = match started {
            Ok(id) => id,
            Err(RuntimeError::Invalid(why)) => return Ok(engine::Execution::failed(why)),
            Err(RuntimeError::NoSuchFlow(flow)) => {
                return Ok(engine::Execution::failed(format!(
                    "no flow `{flow}` to start"
                )));
            }
            Err(err) => return Err(err),
        };
        let now = self.runtime.now();
        let mut execution = engine::Execution::failed(String::new());
        if wait {
            let until = step
                .timeout
                .and_then(|t| chrono::Duration::from_std(t).ok())
                .map(|t| now + t);
            execution.outcome = StepOutcome::Succeeded {
                output: Value::Null,
            };
            execution.recorded_input = serde_json::json!({
                "waiting_for": "subflow",
                "flow": child,
                "run_id": child_id,
                "input": trigger,
                "until": until,
            });
            execution.pause = Some(Some(now + subflow_poll(1)));
        } else {
            execution.outcome = StepOutcome::Succeeded {
                output: serde_json::json!({ "run_id": child_id }),
            };
            execution.recorded_input =
                serde_json::json!({ "flow": child, "run_id": child_id, "input": trigger });
        }
        Ok(execution)
    }

    /// What a waiting sub-flow step makes of its run, when woken: the run's output once it
    /// succeeded, a failure naming it once it failed or was cancelled, a timeout past the
    /// step's `timeout`, and otherwise another wait.
    async fn child_result(
        &self,
        step: &StepDef,
        state: &StepState,
    ) -> Result<engine::Execution, RuntimeError> {
        let child_id = state.input["run_id"].as_str().unwrap_or_default();
        let now = self.runtime.now();
        let mut execution = engine::Execution::failed(String::new());
        execution.recorded_input = state.input.clone();
        let Some(child) = self.runtime.run(child_id).await? else {
            execution.outcome = StepOutcome::Failed {
                error: format!("sub-flow run {child_id} no longer exists"),
            };
            return Ok(execution);
        };
        let until = state.input["until"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        execution.outcome = match child.status {
            RunStatus::Succeeded => StepOutcome::Succeeded {
                output: child
                    .steps
                    .last()
                    .and_then(|s| s.output.clone())
                    .unwrap_or(Value::Null),
            },
            RunStatus::Failed | RunStatus::Cancelled => StepOutcome::Failed {
                error: format!(
                    "sub-flow run {} of `{}` {}: {}",
                    child.id,
                    child.flow_id,
                    child.status.as_str(),
                    child.error.as_deref().unwrap_or("no error recorded")
                ),
            },
            RunStatus::Running | RunStatus::Waiting if until.is_some_and(|u| u <= now) => {
                StepOutcome::Failed {
                    error: format!(
                        "timed out waiting for sub-flow run {} of `{}` ({})",
                        child.id,
                        child.flow_id,
                        humantime_duration(step.timeout.unwrap_or_default())
                    ),
                }
            }
            RunStatus::Running | RunStatus::Waiting => {
                let looks = u32::try_from(state.attempts.len()).unwrap_or(u32::MAX);
                let next = now + subflow_poll(looks + 1);
                execution.pause = Some(Some(until.map_or(next, |u| next.min(u))));
                StepOutcome::Succeeded {
                    output: Value::Null,
                }
            }
        };
        Ok(execution)
    }

    /// Waits for one of the `max` fleet-wide in-flight places of the step's limit, retrying
    /// with backoff while the delivery is kept alive: waiting spends no attempt. The place is
    /// leased for the step's timeout and a minute, so a worker that dies holding it frees it.
    async fn take_in_flight(
        &self,
        chain: &Chain<'_>,
        step: &StepDef,
        holder: &str,
        max: u32,
    ) -> Result<(), RuntimeError> {
        let key = step.rate_key();
        let lease = step.timeout() + Duration::from_secs(60);
        let mut pause = Duration::from_millis(20);
        while !self
            .runtime
            .acquire_in_flight(&key, holder, max, lease)
            .await?
        {
            self.with_progress(chain.delivery, tokio::time::sleep(pause))
                .await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Runs `work` while telling the broker, every third of the ack wait, that the job is alive.
    async fn with_progress<T>(&self, delivery: &Delivery, work: impl Future<Output = T>) -> T {
        // Starting a period from now, not with the immediate first tick of `interval`: that
        // tick is a timer due now, which tokio's millisecond wheel fires up to 1 ms later —
        // a millisecond added to every step.
        let period = self.config.ack_wait / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
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

    /// Journals an attempt as the lifecycle decides (its step state, `pw:results`, the audit
    /// entry, the run's end) and applies it to the run in memory; returns the decision and
    /// the run's status after the write.
    async fn record<'f>(
        &self,
        chain: &Chain<'f>,
        run: &mut Run,
        at: At<'f>,
        position: Position<'_>,
        attempted: Attempted,
    ) -> Result<(AfterAttempt<'f>, RunStatus), RuntimeError> {
        let flow = chain.flow;
        let (step, name) = (at.step, at.name());
        let Attempted {
            started,
            execution,
            executed,
            stopped,
            unmark,
        } = attempted;
        let engine::Execution {
            outcome,
            recorded_input,
            duration,
            branch,
            pause,
        } = execution;
        if step.kind() == StepKind::Loop && branch.is_some() {
            // A loop starting: the lifecycle counts its lanes from the items this attempt
            // records. (The state is replaced by the one recorded below; should the write
            // fail, this copy of the run goes with the delivery.)
            let earlier = run.step(&name);
            let attempts = earlier.map(|s| s.attempts.clone()).unwrap_or_default();
            let epoch = earlier.map_or(0, |s| s.epoch);
            run.upsert_step(StepState {
                name: name.clone(),
                piece: String::new(),
                action: String::new(),
                version: String::new(),
                status: StepStatus::Running,
                input: recorded_input.clone(),
                output: None,
                error: None,
                attempts,
                retry_at: None,
                epoch,
                branch: branch.clone(),
            });
        }
        let after = match pause {
            _ if stopped => lifecycle::stopped(),
            Some(until) => lifecycle::start_wait(until),
            None => lifecycle::after_attempt(
                &flow.definition,
                run,
                at,
                &outcome,
                branch.as_deref(),
                position,
                Utc::now(),
            ),
        };
        let (output, error) = match outcome {
            StepOutcome::Succeeded { output } => (Some(output), None),
            StepOutcome::Retry { error, .. } | StepOutcome::Failed { error } => (None, Some(error)),
        };
        let version = executed
            .as_ref()
            .map(|(piece, _)| piece.version().to_string())
            .or_else(|| flow.step_version(&step.name).map(ToString::to_string))
            .unwrap_or_default();
        let previous = run.step(&name);
        // A loop whose lanes all ended is closed, not attempted again.
        let closing = step.kind() == StepKind::Loop
            && previous.is_some_and(|s| s.status == StepStatus::Running)
            && branch.is_none();
        let number = recorded_attempts(run, &name) + u32::from(!closing);
        let mut attempts = previous.map(|s| s.attempts.clone()).unwrap_or_default();
        if !closing {
            attempts.push(Attempt {
                attempt: number,
                status: after.status,
                started_at: started,
                duration_ms: millis(duration),
                error: error.clone(),
                worker: self.config.id.clone(),
            });
        }
        let epoch = previous.map_or(0, |s| s.epoch);
        let state = StepState {
            name: name.clone(),
            piece: step.piece.clone(),
            action: step.action.clone(),
            version: version.clone(),
            status: after.status,
            input: recorded_input,
            output,
            error: error.clone(),
            attempts,
            retry_at: after.retry_at,
            epoch,
            branch: branch.or_else(|| after.branch.map(str::to_owned)),
        };
        let closed = closed_states(run, &state, &after.closed);
        let run_update = after.run_end.as_ref().map(|end| RunUpdate {
            status: end.status,
            error: end.error.clone(),
            finished_at: Some(Utc::now()),
        });
        let pause = pause.map(|until| Pause {
            timer: until.map(|due| Timer {
                run_id: run.id.clone(),
                flow_id: flow.flow_id.clone(),
                flow_version: flow.version,
                step: name.clone(),
                due,
            }),
        });
        let run_status = match (&run_update, &pause) {
            (Some(update), _) => update.status,
            (None, Some(_)) => RunStatus::Waiting,
            (None, None) => RunStatus::Running,
        };
        let response = match (&executed, &state.output) {
            (Some((_, action)), Some(output)) if action.spec().webhook_response => {
                Some(output.clone())
            }
            _ => None,
        };
        observe::log_attempt(run, step, number, after.status, duration, error.as_deref());
        self.observe_attempt(
            step,
            &version,
            number,
            after.status,
            duration,
            error.as_deref(),
        );
        if let (Some((piece, action)), Some(output)) = (&executed, &state.output)
            && action.spec().health_check
        {
            self.observe_health(piece.name(), &flow.flow_id, output);
        }
        if let Some(update) = &run_update {
            self.runtime
                .metrics
                .run_finished(&flow.flow_id, observe::run_outcome(update.status));
        }
        let result = StepResult {
            run_id: run.id.clone(),
            flow_id: flow.flow_id.clone(),
            flow_version: flow.version,
            step: name.clone(),
            piece: step.piece.clone(),
            action: step.action.clone(),
            version,
            attempt: number,
            status: observe::proto_step_status(after.status) as i32,
            duration_ms: millis(duration),
            error: error.clone().unwrap_or_default(),
            run_status: observe::proto_run_status(run_status) as i32,
            finished_unix_ms: Utc::now().timestamp_millis(),
            branch: state.branch.clone().unwrap_or_default(),
        };
        let audit = audit_event(
            &self.actor,
            "step.execute",
            &format!("run/{}/step/{name}", run.id),
            duration,
            error
                .as_ref()
                .filter(|_| after.status != StepStatus::Succeeded),
        );
        let status = self
            .runtime
            .record_attempt(StepUpdate {
                run_id: run.id.clone(),
                step: state.clone(),
                closed: closed.clone(),
                result,
                response: response.clone(),
                run: run_update.clone(),
                pause,
                wake: run_update
                    .as_ref()
                    .and(run.parent.as_ref())
                    .map(|parent| Timer {
                        run_id: parent.run_id.clone(),
                        flow_id: parent.flow_id.clone(),
                        flow_version: parent.flow_version,
                        step: parent.step.clone(),
                        due: self.runtime.now(),
                    }),
                audit: Some(audit),
                unmark,
            })
            .await?;
        run.upsert_step(state);
        for closed in closed {
            run.upsert_step(closed);
        }
        if response.is_some() {
            run.response = response;
        }
        if let Some(update) = run_update {
            run.status = update.status;
            run.error = update.error;
            run.finished_at = update.finished_at;
        }
        Ok((after, status))
    }

    /// Ends a run that cannot go on (its flow version or step vanished).
    async fn fail_run(&self, run: &Run, error: String) -> Result<(), RuntimeError> {
        tracing::warn!(run_id = %run.id, error = %error, "run failed");
        self.runtime
            .end_run(
                &run.id,
                RunUpdate {
                    status: RunStatus::Failed,
                    error: Some(error),
                    finished_at: Some(Utc::now()),
                },
            )
            .await?;
        self.runtime
            .metrics
            .run_finished(&run.flow_id, observe::run_outcome(RunStatus::Failed));
        Ok(())
    }
}

/// The records of the steps whose branch or loop the attempt recorded as `state` ended
/// (`closed`, innermost first): a branch step takes the output of what ended it, a loop the
/// list of its items' last outputs and is done.
fn closed_states(run: &Run, state: &StepState, closed: &[At<'_>]) -> Vec<StepState> {
    if closed.is_empty() {
        return Vec::new();
    }
    // Outputs written by this attempt, which `run` does not hold yet.
    let mut written: HashMap<String, Option<Value>> = HashMap::new();
    written.insert(state.name.clone(), state.output.clone());
    let mut last = state.output.clone();
    let mut records = Vec::with_capacity(closed.len());
    for around in closed {
        let around_name = around.name();
        let Some(mut record) = run.step(&around_name).cloned() else {
            continue;
        };
        if around.step.kind() == StepKind::Loop {
            record.status = StepStatus::Succeeded;
            last = Some(run.loop_output(around.step, |item| written.get(item).cloned()));
        }
        record.output.clone_from(&last);
        written.insert(around_name, last.clone());
        records.push(record);
    }
    records
}

/// What closing `around`, a loop whose lanes all ended, records as its attempt: its items'
/// outputs, its input as it was.
fn closing(run: &Run, around: &StepDef) -> engine::Execution {
    let mut execution = engine::Execution::failed(String::new());
    execution.outcome = StepOutcome::Succeeded {
        output: run.loop_output(around, |_| None),
    };
    execution.recorded_input = run
        .step(&around.name)
        .map_or(Value::Null, |s| s.input.clone());
    execution
}

/// How long a sub-flow step waits before its `look`-th look at its run when the run's end
/// does not wake it first: 5 s, doubling, at most 5 minutes.
fn subflow_poll(look: u32) -> chrono::Duration {
    let seconds = 5_i64.saturating_mul(1 << look.saturating_sub(1).min(6));
    chrono::Duration::seconds(seconds.min(300))
}

fn humantime_duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// The timer of the step `job` names, in `run`.
fn timer_of(job: &StepJob, run: &Run) -> Timer {
    Timer {
        run_id: job.run_id.clone(),
        flow_id: job.flow_id.clone(),
        flow_version: job.flow_version,
        step: job.step.clone(),
        due: run
            .step(&job.step)
            .and_then(|s| s.retry_at)
            .unwrap_or_default(),
    }
}

/// How many attempts of `step` the run has recorded.
fn recorded_attempts(run: &Run, step: &str) -> u32 {
    run.step(step)
        .map_or(0, |s| u32::try_from(s.attempts.len()).unwrap_or(u32::MAX))
}

//! The run lifecycle: what happens next to a run, decided in one place.
//!
//! Everything that moves a run forward asks this module — the worker when a step job is
//! delivered ([`on_delivery`]) and after each attempt ([`after_attempt`]), the api and the
//! scheduler when they start a run ([`first_step`]), a person retrying or cancelling one
//! ([`retry`], [`cancel`]). It looks only at the flow version and the run's recorded state,
//! never at the store or the bus: the callers record, publish and settle as it says, so the
//! rules are written once and tested here without infrastructure.
//!
//! How a run moves: a step job (`run`, `step`) asks a worker to drive the run forward from
//! that step. The worker runs it, records the attempt, and — when the next step is on the same
//! queue and the delivery's step budget allows — runs that one too, *inline*, recording each
//! attempt before the next begins. A step on another queue, a retry that must wait, or the end
//! of the budget hands over to a new job. A redelivered job (its worker died) resumes from what
//! was recorded: a step recorded as done is never run again.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::engine::StepOutcome;
use crate::flow::{
    CATCH, FlowDefinition, OnFailure, StepDef, StepKind, instance_name, split_instance,
};
use crate::run::{Iteration, Run, RunStatus, StepState, StepStatus};

/// A step as it runs: the step, and in the steps of a loop, the item it runs for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct At<'a> {
    pub step: &'a StepDef,
    pub item: Option<u32>,
}

impl<'a> At<'a> {
    /// A step outside any loop.
    pub fn top(step: &'a StepDef) -> Self {
        Self { step, item: None }
    }

    /// The name its state is recorded under, and its job names: `double[3]` for item 3.
    pub fn name(&self) -> String {
        instance_name(&self.step.name, self.item)
    }

    /// The step a recorded name (`double[3]`) stands for in `flow`: an item only for a step
    /// of a loop, and no item for any other.
    pub fn parse(flow: &'a FlowDefinition, name: &str) -> Option<Self> {
        let (base, item) = split_instance(name);
        let step = flow.step(base)?;
        let in_loop = flow.enclosing_loop(base).is_some();
        (in_loop == item.is_some()).then_some(Self { step, item })
    }

    /// The loop and item it runs in, for its templates.
    pub fn iteration(&self, flow: &'a FlowDefinition) -> Option<Iteration<'a>> {
        let index = self.item?;
        let around = flow.enclosing_loop(&self.step.name)?;
        Some(Iteration {
            loop_step: &around.name,
            index,
        })
    }
}

/// Where the next step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next<'a> {
    /// Nothing follows: the run ended, or the step waits for its retry.
    Done,
    /// Run this step now, in the same delivery.
    Inline(At<'a>),
    /// Hand this step to a new job on its queue.
    Publish(At<'a>),
    /// A lane of a loop running items side by side ended: the loop goes on only once every
    /// lane has ended, which the store counts. The caller that completes the count closes
    /// the loop: an attempt of the loop with its items' outputs, after which the next step
    /// gets a job of its own (two callers may both see the count complete, one of them a
    /// redelivery; the job's message id drops the second).
    Join(Join<'a>),
}

/// The end of one lane of a loop whose items run side by side (`parallelism` above 1): item
/// `i` runs in lane `i % lanes`, each lane taking its items in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Join<'a> {
    /// The loop.
    pub around: &'a StepDef,
    /// The lane that ended.
    pub lane: u32,
    /// How many lanes the loop runs.
    pub lanes: u32,
}

/// Why a delivery is terminated rather than acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// A step failed for good and so did the run.
    Failed,
    /// The job names something that does not exist.
    Poison,
    /// Its results kept getting lost to store or bus errors.
    GaveUp,
}

/// How to settle the delivery being handled, once everything it decided is recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Settle {
    Ack,
    /// Put the job back, to be delivered again after the delay.
    Nak(Duration),
    Term(Termination),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub error: Option<String>,
}

/// Where an attempt ran: the delivery's own step, or one run inline after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'q> {
    /// The queue the delivery came from.
    pub queue: &'q str,
    /// Whether the step is the one the job names (a retry of it puts the job back) or one run
    /// inline after it (a retry of it hands over to a job of its own).
    pub own_step: bool,
    /// How many more steps this delivery may run inline.
    pub inline_budget: u32,
}

/// What follows a recorded attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AfterAttempt<'a> {
    /// The step's status as recorded.
    pub status: StepStatus,
    /// When the step's next attempt may start (a retry), for the record.
    pub retry_at: Option<DateTime<Utc>>,
    /// How long the next attempt waits (a retry): with [`Next::Publish`] of the step itself,
    /// its job carries the wait.
    pub retry_in: Option<Duration>,
    /// The run's end, when this attempt ended it.
    pub run_end: Option<RunEnd>,
    pub next: Next<'a>,
    pub settle: Settle,
    /// The steps around this one whose branch or loop this attempt ended (innermost first):
    /// a branch step is recorded with this step's output as its own, a loop with the list of
    /// its items' outputs.
    pub closed: Vec<At<'a>>,
    /// The block the lifecycle entered by itself: `catch`, when the step failed for good
    /// and says `on_failure: branch`.
    pub branch: Option<&'static str>,
    /// Steps that start besides `next`, each in a job of its own: the first steps of the
    /// other lanes of a loop this attempt started.
    pub forks: Vec<At<'a>>,
}

/// The first step of a run of `flow`, if it has any.
pub fn first_step(flow: &FlowDefinition) -> Option<&StepDef> {
    flow.steps.first()
}

/// What follows a step that is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Advance<'a> {
    /// The next step to run; `None` at the end of the flow.
    pub next: Option<At<'a>>,
    /// The steps around it whose branch or loop it ended, innermost first.
    pub closed: Vec<At<'a>>,
    /// Steps that start besides `next`: entering a loop whose items run side by side, the
    /// first step of each lane but the first.
    pub forks: Vec<At<'a>>,
    /// Instead of a next step: the lane of a loop whose items run side by side ended.
    pub join: Option<Join<'a>>,
}

/// Decides what follows an attempt of `at` in `run` that ended with `outcome` at `now` (for
/// a branch step, having chosen `branch`; for a loop that has items, `each`).
pub fn after_attempt<'a>(
    flow: &'a FlowDefinition,
    run: &Run,
    at: At<'a>,
    outcome: &StepOutcome,
    branch: Option<&str>,
    position: Position<'_>,
    now: DateTime<Utc>,
) -> AfterAttempt<'a> {
    let step = at.step;
    let (status, error) = match outcome {
        StepOutcome::Succeeded { .. } if step.kind() == StepKind::Loop && branch.is_some() => {
            (StepStatus::Running, None)
        }
        StepOutcome::Succeeded { .. } => (StepStatus::Succeeded, None),
        StepOutcome::Failed { error } => (StepStatus::Failed, Some(error.as_str())),
        StepOutcome::Retry { delay, .. } => {
            // The same job waits out the delay; an inline step hands over to a job of its
            // own, whose first delivery waits out what is left of it.
            let (next, settle) = if position.own_step {
                (Next::Done, Settle::Nak(*delay))
            } else {
                (Next::Publish(at), Settle::Ack)
            };
            return AfterAttempt {
                status: StepStatus::Retrying,
                retry_at: Some(now + chrono_duration(*delay)),
                retry_in: Some(*delay),
                run_end: None,
                next,
                settle,
                closed: Vec::new(),
                branch: None,
                forks: Vec::new(),
            };
        }
    };
    let goes_on = status != StepStatus::Failed || step.on_failure != OnFailure::Stop;
    // A step that failed for good with `on_failure: branch` goes into its `catch` steps.
    let caught =
        (status == StepStatus::Failed && step.on_failure == OnFailure::Branch).then_some(CATCH);
    let branch = branch.or(caught);
    if !goes_on {
        return AfterAttempt {
            status,
            retry_at: None,
            retry_in: None,
            run_end: Some(RunEnd {
                status: RunStatus::Failed,
                error: Some(format!(
                    "step `{}` failed: {}",
                    step.name,
                    error.unwrap_or_default()
                )),
            }),
            next: Next::Done,
            settle: Settle::Term(Termination::Failed),
            closed: Vec::new(),
            branch: None,
            forks: Vec::new(),
        };
    }
    let Advance {
        next,
        closed,
        forks,
        join,
    } = advance(flow, run, at, branch);
    match (next, join) {
        (None, Some(join)) => AfterAttempt {
            status,
            retry_at: None,
            retry_in: None,
            run_end: None,
            next: Next::Join(join),
            settle: Settle::Ack,
            closed,
            branch: caught,
            forks,
        },
        (None, None) => AfterAttempt {
            status,
            retry_at: None,
            retry_in: None,
            run_end: Some(RunEnd {
                status: RunStatus::Succeeded,
                error: None,
            }),
            next: Next::Done,
            settle: Settle::Ack,
            closed,
            branch: caught,
            forks,
        },
        (Some(next), _) => AfterAttempt {
            status,
            retry_at: None,
            retry_in: None,
            run_end: None,
            // A branch step runs anywhere: it only evaluates its conditions.
            next: if (next.step.is_control() || next.step.queue() == position.queue)
                && position.inline_budget > 0
            {
                Next::Inline(next)
            } else {
                Next::Publish(next)
            },
            settle: Settle::Ack,
            closed,
            branch: caught,
            forks,
        },
    }
}

/// What starting a delay or wait records: the step waits (until `until`, when it has a
/// timer), the run pauses, and the delivery is done — a waiting run holds no job.
pub fn start_wait(until: Option<DateTime<Utc>>) -> AfterAttempt<'static> {
    AfterAttempt {
        status: StepStatus::Waiting,
        retry_at: until,
        retry_in: None,
        run_end: None,
        next: Next::Done,
        settle: Settle::Ack,
        closed: Vec::new(),
        branch: None,
        forks: Vec::new(),
    }
}

/// What an attempt stopped because its run ended meanwhile (cancelled, or failed by its
/// flow's timeout or by another lane) records: the step stopped, and nothing follows — the
/// run's end is recorded already. A retry of the run runs it again.
pub fn stopped() -> AfterAttempt<'static> {
    AfterAttempt {
        status: StepStatus::Stopped,
        retry_at: None,
        retry_in: None,
        run_end: None,
        next: Next::Done,
        settle: Settle::Ack,
        closed: Vec::new(),
        branch: None,
        forks: Vec::new(),
    }
}

/// How early a job for a waiting step may come and still wake it: the clocks of the
/// scheduler that fired its timer and of the worker may differ by this much.
pub const WAKE_TOLERANCE: Duration = Duration::from_secs(1);

/// What a delivered step job should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume<'a> {
    /// The run waits on `step` and its time has come (a delay ended, a wait timed out):
    /// wake it, if no one else did first.
    Wake(At<'a>),
    /// The run is over (finished or cancelled): drop the job.
    Finished,
    /// Run `step` now, as attempt `attempt` of its current retry budget (1 for the first).
    Run { step: At<'a>, attempt: u32 },
    /// The job carries a retry's wait: put it back for this long.
    Wait(Duration),
    /// The job's step was recorded by a delivery that died before handing over: continue
    /// with `next` in a job of its own (or nothing, when the run has nowhere to go).
    HandOff(Next<'a>),
    /// As [`Resume::HandOff`], and the delivery also died before starting the other lanes
    /// of a loop it entered: start `forks` too.
    Fork { next: Next<'a>, forks: Vec<At<'a>> },
    /// The step was delivered more often than its attempts and the infrastructure allowance
    /// allow: the results of its attempts keep getting lost. Fail it without running it.
    GiveUp { step: At<'a>, deliveries: u32 },
    /// The job names a step the flow does not have.
    Poison(String),
}

/// A delivered step job, as the lifecycle needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered<'j> {
    /// The step the job names.
    pub step: &'j str,
    /// How often this job has been delivered (1 the first time).
    pub delivered: u32,
    /// The job's retry epoch: attempts recorded before a manual retry.
    pub epoch: u32,
    /// How long its first delivery waits before the attempt (a handed-over retry).
    pub delay: Option<Duration>,
    /// When it was delivered.
    pub now: DateTime<Utc>,
}

/// Decides what a delivery of `job` does, from what `run` recorded. `infra_allowance` is how
/// many deliveries beyond the step's attempts may end in infrastructure errors before it is
/// given up.
pub fn on_delivery<'a>(
    flow: &'a FlowDefinition,
    run: &Run,
    job: Delivered<'_>,
    infra_allowance: u32,
) -> Resume<'a> {
    let (step_name, epoch) = (job.step, job.epoch);
    if run.status.is_terminal() {
        return Resume::Finished;
    }
    let Some(at) = At::parse(flow, step_name) else {
        return Resume::Poison(format!("the flow has no step `{step_name}`"));
    };
    let step = at.step;
    // Follow what was recorded, from the job's step on, to the first step still to run.
    // (A run's end is recorded with its last step, so "all recorded, still running" and "a
    // step failed for good, still running" only arise if that write was lost: nothing is
    // left to run then.)
    let mut current = at;
    // Lanes of a loop passed on the way that never started.
    let mut forks = Vec::new();
    let hand_off = |next, forks: Vec<At<'a>>| {
        if forks.is_empty() {
            Resume::HandOff(next)
        } else {
            Resume::Fork { next, forks }
        }
    };
    while let Some(state) = run.step(&current.name()) {
        match state.status {
            // To run again: a retry, or an attempt stopped by the run's end (the run was
            // retried since).
            StepStatus::Retrying | StepStatus::Stopped => break,
            StepStatus::Waiting => {
                // Only a job for the waiting step, once its timer is due, wakes the run;
                // anything else leaves it to the timer (or to whoever resumes it).
                // A sub-flow step may look early: the run it waits on ended and brought its
                // timer forward.
                let due = current.step.kind() == StepKind::Subflow
                    || state
                        .retry_at
                        .is_some_and(|at| at <= job.now + chrono_duration(WAKE_TOLERANCE));
                return if current == at && due {
                    Resume::Wake(current)
                } else {
                    hand_off(Next::Done, forks)
                };
            }
            StepStatus::Failed if current.step.on_failure == OnFailure::Stop => {
                return hand_off(Next::Done, forks);
            }
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Running => {
                let advance = advance(flow, run, current, state.branch.as_deref());
                forks.extend(
                    advance
                        .forks
                        .into_iter()
                        .filter(|fork| run.step(&fork.name()).is_none()),
                );
                match (advance.next, advance.join) {
                    (Some(next), _) => current = next,
                    (None, Some(join)) => return hand_off(Next::Join(join), forks),
                    (None, None) => return hand_off(Next::Done, forks),
                }
            }
        }
    }
    if current != at {
        return hand_off(Next::Publish(current), forks);
    }
    // A job handed a retry that must wait: its first delivery only waits (on the broker's
    // clock, not this machine's).
    if let Some(delay) = job.delay.filter(|d| !d.is_zero())
        && job.delivered <= 1
    {
        return Resume::Wait(delay);
    }
    let state = run.step(&at.name());
    let waited = u32::from(job.delay.is_some_and(|d| !d.is_zero()));
    let budget = step
        .retry_policy()
        .max_attempts
        .saturating_add(infra_allowance)
        .saturating_add(waited);
    let delivered = job.delivered;
    if delivered > budget {
        return Resume::GiveUp {
            step: at,
            deliveries: delivered,
        };
    }
    Resume::Run {
        step: at,
        attempt: attempt_in_epoch(state, epoch),
    }
}

/// The number of the next attempt of a step within its current retry budget: one more than
/// the attempts recorded since the last manual retry.
pub fn attempt_in_epoch(state: Option<&StepState>, job_epoch: u32) -> u32 {
    let Some(state) = state else { return 1 };
    let epoch = state.epoch.max(job_epoch);
    let recorded = u32::try_from(state.attempts.len()).unwrap_or(u32::MAX);
    recorded.saturating_sub(epoch).saturating_add(1)
}

/// What follows `at` in `run` once it is done: for a branch step that chose a branch with
/// steps, that branch's first step; for a loop with items, the first item's first step;
/// otherwise the next step of its block — or, at the end of a loop's steps, the next item's
/// first step, and at the end of a block, what follows the step around it, which it closes.
pub fn advance<'a>(
    flow: &'a FlowDefinition,
    run: &Run,
    at: At<'a>,
    branch: Option<&str>,
) -> Advance<'a> {
    let first = branch
        .and_then(|name| at.step.branch(name))
        .and_then(<[StepDef]>::first);
    if let Some(first) = first {
        if at.step.kind() == StepKind::Loop {
            let lanes = lanes(at.step, run);
            return Advance {
                next: Some(At {
                    step: first,
                    item: Some(0),
                }),
                closed: Vec::new(),
                forks: (1..lanes)
                    .map(|lane| At {
                        step: first,
                        item: Some(lane),
                    })
                    .collect(),
                join: None,
            };
        }
        return Advance {
            next: Some(At {
                step: first,
                item: at.item,
            }),
            closed: Vec::new(),
            forks: Vec::new(),
            join: None,
        };
    }
    let mut closed = Vec::new();
    let mut item = at.item;
    let ended = |closed| Advance {
        next: None,
        closed,
        forks: Vec::new(),
        join: None,
    };
    let Some(mut path) = flow.locate(&at.step.name) else {
        return ended(closed);
    };
    while let Some((block, index)) = path.pop() {
        if let Some(next) = block.get(index + 1) {
            return Advance {
                next: Some(At { step: next, item }),
                closed,
                forks: Vec::new(),
                join: None,
            };
        }
        let Some(&(outer, position)) = path.last() else {
            break;
        };
        let around = &outer[position];
        if around.kind() == StepKind::Loop {
            // The next item of this item's lane.
            let lanes = lanes(around, run).max(1);
            let this = item.unwrap_or_default();
            let next_item = this.saturating_add(lanes);
            let count = run.loop_items(&around.name).map_or(0, Vec::len);
            if let Some(first) = around.steps.first()
                && (next_item as usize) < count
            {
                return Advance {
                    next: Some(At {
                        step: first,
                        item: Some(next_item),
                    }),
                    closed,
                    forks: Vec::new(),
                    join: None,
                };
            }
            if lanes > 1 {
                return Advance {
                    next: None,
                    closed,
                    forks: Vec::new(),
                    join: Some(Join {
                        around,
                        lane: this % lanes,
                        lanes,
                    }),
                };
            }
            // Loops do not nest: the loop itself is outside any.
            item = None;
        }
        closed.push(At { step: around, item });
    }
    ended(closed)
}

/// How many lanes `around`, a loop, runs in `run`: its `parallelism`, or fewer when it has
/// fewer items.
fn lanes(around: &StepDef, run: &Run) -> u32 {
    let count = run.loop_items(&around.name).map_or(0, Vec::len);
    around
        .parallelism
        .unwrap_or(1)
        .min(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Why a run cannot be retried or cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("run `{run}` is {status}; only failed runs can be retried")]
    NotFailed { run: String, status: &'static str },
    #[error("run `{0}` failed before any step ran; start a new run instead")]
    NothingToRetry(String),
    #[error("run `{0}` is not running")]
    NotRunning(String),
    #[error("the flow of run `{run}` has no step `{step}`")]
    NoSuchStep { run: String, step: String },
    #[error("step `{step}` is not a wait step (`wait_for`): only waits are resumed by hand")]
    NotAWait { step: String },
    #[error("run `{run}` is not waiting on step `{step}` ({now})")]
    NotWaitingOn {
        run: String,
        step: String,
        now: String,
    },
}

/// A manual retry: the failed step, reset to run again with a fresh retry budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// The step's state as it is recorded when the run resumes.
    pub step: StepState,
    /// The job's retry epoch: attempts recorded before this retry.
    pub epoch: u32,
    /// When the step runs in a lane of a loop whose items run side by side: the first steps
    /// of the other lanes (`first[2]`), which stopped when the run failed. A job for each
    /// follows what its lane recorded to where it stopped.
    pub lanes: Vec<String>,
}

/// Plans a manual retry of a failed run of `flow`: its last failed step runs again, its
/// attempts numbered after the earlier ones.
pub fn retry(flow: &FlowDefinition, run: &Run) -> Result<Retry, Refusal> {
    if run.status != RunStatus::Failed {
        return Err(Refusal::NotFailed {
            run: run.id.clone(),
            status: run.status.as_str(),
        });
    }
    // The step whose failure ended the run; else (the run timed out) one it stopped.
    let last = |status| run.steps.iter().rev().find(|s| s.status == status);
    let failed = last(StepStatus::Failed)
        .or_else(|| last(StepStatus::Stopped))
        .ok_or_else(|| Refusal::NothingToRetry(run.id.clone()))?;
    let epoch = u32::try_from(failed.attempts.len()).unwrap_or(u32::MAX);
    let mut step = failed.clone();
    step.status = StepStatus::Retrying;
    step.epoch = epoch;
    step.retry_at = None;
    let lanes = At::parse(flow, &failed.name)
        .and_then(|at| Some((at.item?, flow.enclosing_loop(&at.step.name)?)))
        .map(|(item, around)| {
            let lanes = lanes(around, run).max(1);
            let first = around.steps.first().map_or("", |s| s.name.as_str());
            (0..lanes)
                .filter(|lane| *lane != item % lanes)
                .map(|lane| instance_name(first, Some(lane)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Retry { step, epoch, lanes })
}

/// Plans resuming run `run` by hand at its wait step `step`: the step's waiting state, and
/// when its timer is due (if it has one).
pub fn resume(
    flow: &FlowDefinition,
    run: &Run,
    step: &str,
) -> Result<(StepState, Option<DateTime<Utc>>), Refusal> {
    let Some(def) = flow.step(split_instance(step).0) else {
        return Err(Refusal::NoSuchStep {
            run: run.id.clone(),
            step: step.to_owned(),
        });
    };
    if def.kind() != StepKind::Wait {
        return Err(Refusal::NotAWait {
            step: step.to_owned(),
        });
    }
    let waiting = run.steps.iter().find(|s| s.status == StepStatus::Waiting);
    match waiting {
        Some(state) if run.status == RunStatus::Waiting && state.name == step => {
            Ok((state.clone(), state.retry_at))
        }
        _ => {
            let now = match waiting {
                Some(other) if run.status == RunStatus::Waiting => {
                    format!("it waits on `{}`", other.name)
                }
                _ => format!("it is {}", run.status.as_str()),
            };
            Err(Refusal::NotWaitingOn {
                run: run.id.clone(),
                step: step.to_owned(),
                now,
            })
        }
    }
}

/// Checks that a run may be cancelled: while it runs or waits. Nothing after the step in
/// flight runs; that step is [`stopped`] by its worker.
pub fn cancel(run: &Run) -> Result<(), Refusal> {
    if run.status.is_terminal() {
        return Err(Refusal::NotRunning(run.id.clone()));
    }
    Ok(())
}

fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Format;
    use crate::run::Attempt;
    use serde_json::json;

    fn flow(steps: &str) -> FlowDefinition {
        FlowDefinition::parse(
            &format!(
                "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: {{piece: p, trigger: t}}\nsteps:\n{steps}"
            ),
            Format::Yaml,
        )
        .unwrap()
    }

    fn three() -> FlowDefinition {
        flow(
            "  - {name: a, piece: p, action: x}\n  - {name: b, piece: p, action: x}\n  - {name: c, piece: p, action: x, queue: vpn}\n",
        )
    }

    const OWN: Position<'static> = Position {
        queue: "default",
        own_step: true,
        inline_budget: 8,
    };
    const INLINE: Position<'static> = Position {
        queue: "default",
        own_step: false,
        inline_budget: 8,
    };

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn succeeded() -> StepOutcome {
        StepOutcome::Succeeded { output: json!(1) }
    }

    fn failed() -> StepOutcome {
        StepOutcome::Failed {
            error: "HTTP 400: no".into(),
        }
    }

    fn retry_in(secs: u64) -> StepOutcome {
        StepOutcome::Retry {
            error: "HTTP 503".into(),
            delay: Duration::from_secs(secs),
        }
    }

    fn state(name: &str, status: StepStatus, attempts: usize) -> StepState {
        StepState {
            name: name.into(),
            piece: "p".into(),
            action: "x".into(),
            version: "1.0.0".into(),
            status,
            input: json!({}),
            output: None,
            error: None,
            attempts: (1..=attempts)
                .map(|n| Attempt {
                    attempt: u32::try_from(n).unwrap(),
                    status,
                    started_at: now(),
                    duration_ms: 1,
                    error: None,
                    worker: "w".into(),
                })
                .collect(),
            retry_at: None,
            epoch: 0,
            branch: None,
        }
    }

    fn job(step: &str, delivered: u32) -> Delivered<'_> {
        Delivered {
            step,
            delivered,
            epoch: 0,
            delay: None,
            now: now(),
        }
    }

    fn run_with(steps: Vec<StepState>) -> Run {
        let mut run = Run::new("r".into(), "f", 1, json!({}));
        run.steps = steps;
        run
    }

    #[test]
    fn a_success_runs_the_next_step_inline_on_the_same_queue_and_hands_over_across_queues() {
        let flow = three();
        let (a, b) = (flow.step("a").unwrap(), flow.step("b").unwrap());
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(a),
            &succeeded(),
            None,
            OWN,
            now(),
        );
        assert_eq!(after.status, StepStatus::Succeeded);
        assert_eq!(after.next, Next::Inline(At::top(b)));
        assert_eq!((after.run_end, after.settle), (None, Settle::Ack));
        // `c` is on another queue: a job of its own.
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(b),
            &succeeded(),
            None,
            INLINE,
            now(),
        );
        assert_eq!(after.next, Next::Publish(At::top(flow.step("c").unwrap())));
        assert_eq!(after.settle, Settle::Ack);
    }

    #[test]
    fn the_inline_budget_hands_over_to_a_new_job() {
        let flow = three();
        let spent = Position {
            inline_budget: 0,
            ..OWN
        };
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(flow.step("a").unwrap()),
            &succeeded(),
            None,
            spent,
            now(),
        );
        assert_eq!(after.next, Next::Publish(At::top(flow.step("b").unwrap())));
    }

    #[test]
    fn the_last_success_ends_the_run() {
        let flow = three();
        let c = flow.step("c").unwrap();
        let vpn = Position {
            queue: "vpn",
            ..OWN
        };
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(c),
            &succeeded(),
            None,
            vpn,
            now(),
        );
        assert_eq!(
            after.run_end,
            Some(RunEnd {
                status: RunStatus::Succeeded,
                error: None
            })
        );
        assert_eq!((after.next, after.settle), (Next::Done, Settle::Ack));
    }

    #[test]
    fn a_failure_ends_the_run_unless_the_step_says_continue() {
        let flow = flow(
            "  - {name: a, piece: p, action: x, on_failure: continue}\n  - {name: b, piece: p, action: x}\n",
        );
        let (a, b) = (flow.step("a").unwrap(), flow.step("b").unwrap());
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(a),
            &failed(),
            None,
            OWN,
            now(),
        );
        assert_eq!(after.status, StepStatus::Failed);
        assert_eq!(after.next, Next::Inline(At::top(b)));
        assert_eq!((after.run_end, after.settle), (None, Settle::Ack));
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(b),
            &failed(),
            None,
            INLINE,
            now(),
        );
        assert_eq!(after.status, StepStatus::Failed);
        assert_eq!(
            after.run_end,
            Some(RunEnd {
                status: RunStatus::Failed,
                error: Some("step `b` failed: HTTP 400: no".into())
            })
        );
        assert_eq!(after.next, Next::Done);
        assert_eq!(after.settle, Settle::Term(Termination::Failed));
    }

    #[test]
    fn a_continued_failure_of_the_last_step_ends_the_run_as_succeeded() {
        let flow = flow("  - {name: a, piece: p, action: x, on_failure: continue}\n");
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(flow.step("a").unwrap()),
            &failed(),
            None,
            OWN,
            now(),
        );
        assert_eq!(after.run_end.unwrap().status, RunStatus::Succeeded);
    }

    #[test]
    fn a_retry_of_the_own_step_puts_the_job_back_and_of_an_inline_step_hands_over() {
        let flow = three();
        let b = flow.step("b").unwrap();
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(b),
            &retry_in(4),
            None,
            OWN,
            now(),
        );
        assert_eq!(after.status, StepStatus::Retrying);
        assert_eq!(after.settle, Settle::Nak(Duration::from_secs(4)));
        assert_eq!(after.next, Next::Done);
        assert_eq!(after.retry_at, Some(now() + chrono::Duration::seconds(4)));
        assert_eq!(after.run_end, None);
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(b),
            &retry_in(4),
            None,
            INLINE,
            now(),
        );
        assert_eq!(
            (after.next, after.settle),
            (Next::Publish(At::top(b)), Settle::Ack)
        );
        assert_eq!(after.retry_at, Some(now() + chrono::Duration::seconds(4)));
    }

    #[test]
    fn a_new_job_runs_its_step_as_the_first_attempt() {
        let flow = three();
        let run = run_with(vec![]);
        assert_eq!(
            on_delivery(&flow, &run, job("a", 1), 10),
            Resume::Run {
                step: At::top(flow.step("a").unwrap()),
                attempt: 1
            }
        );
    }

    #[test]
    fn a_finished_or_cancelled_run_drops_its_jobs() {
        let flow = three();
        for status in [
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ] {
            let mut run = run_with(vec![]);
            run.status = status;
            assert_eq!(on_delivery(&flow, &run, job("a", 1), 10), Resume::Finished);
        }
    }

    #[test]
    fn an_unknown_step_is_poison() {
        let flow = three();
        assert!(matches!(
            on_delivery(&flow, &run_with(vec![]), job("zz", 1), 10),
            Resume::Poison(why) if why.contains("`zz`")
        ));
    }

    #[test]
    fn a_redelivery_resumes_after_what_was_recorded_and_never_reruns_a_step() {
        let flow = three();
        // `a` and `b` were recorded (b inline), the worker died before `c` was handed over.
        let run = run_with(vec![
            state("a", StepStatus::Succeeded, 1),
            state("b", StepStatus::Succeeded, 1),
        ]);
        assert_eq!(
            on_delivery(&flow, &run, job("a", 2), 10),
            Resume::HandOff(Next::Publish(At::top(flow.step("c").unwrap())))
        );
        // Only `a` recorded: `b` (interrupted inline) gets a job of its own.
        let run = run_with(vec![state("a", StepStatus::Succeeded, 1)]);
        assert_eq!(
            on_delivery(&flow, &run, job("a", 2), 10),
            Resume::HandOff(Next::Publish(At::top(flow.step("b").unwrap())))
        );
        // Everything recorded but the run's end: nothing to run.
        let run = run_with(vec![
            state("a", StepStatus::Succeeded, 1),
            state("b", StepStatus::Succeeded, 1),
            state("c", StepStatus::Succeeded, 1),
        ]);
        assert_eq!(
            on_delivery(&flow, &run, job("a", 2), 10),
            Resume::HandOff(Next::Done)
        );
    }

    #[test]
    fn a_recorded_failure_that_stops_the_run_is_not_passed() {
        let flow = three();
        let run = run_with(vec![state("a", StepStatus::Failed, 1)]);
        // A step that failed for good runs again only through a manual retry.
        assert_eq!(
            on_delivery(&flow, &run, job("a", 2), 10),
            Resume::HandOff(Next::Done)
        );
    }

    #[test]
    fn a_handed_over_retry_waits_on_its_first_delivery_then_runs_its_next_attempt() {
        let flow = three();
        let b = state("b", StepStatus::Retrying, 1);
        let run = run_with(vec![state("a", StepStatus::Succeeded, 1), b]);
        let delayed = |delivered| Delivered {
            delay: Some(Duration::from_secs(3)),
            ..job("b", delivered)
        };
        assert_eq!(
            on_delivery(&flow, &run, delayed(1), 10),
            Resume::Wait(Duration::from_secs(3))
        );
        assert_eq!(
            on_delivery(&flow, &run, delayed(2), 10),
            Resume::Run {
                step: At::top(flow.step("b").unwrap()),
                attempt: 2
            }
        );
        // The wait does not count against the step's deliveries.
        let three_attempts = flow_one_step_with_attempts(1);
        let run = run_with(vec![]);
        assert!(matches!(
            on_delivery(
                &three_attempts,
                &run,
                Delivered {
                    delay: Some(Duration::from_secs(1)),
                    ..job("a", 2)
                },
                0
            ),
            Resume::Run { .. }
        ));
        // A redelivery of `a`'s job finds `b` waiting: `b` is handed to its own job.
        let run = run_with(vec![
            state("a", StepStatus::Succeeded, 1),
            state("b", StepStatus::Retrying, 1),
        ]);
        assert_eq!(
            on_delivery(&flow, &run, job("a", 2), 10),
            Resume::HandOff(Next::Publish(At::top(flow.step("b").unwrap())))
        );
    }

    fn flow_one_step_with_attempts(max: u32) -> FlowDefinition {
        flow(&format!(
            "  - {{name: a, piece: p, action: x, retry: {{max_attempts: {max}}}}}\n"
        ))
    }

    #[test]
    fn deliveries_beyond_the_attempts_and_the_allowance_give_up() {
        let flow = flow_one_step_with_attempts(2);
        let run = run_with(vec![]);
        assert!(matches!(
            on_delivery(&flow, &run, job("a", 3), 1),
            Resume::Run { .. }
        ));
        assert_eq!(
            on_delivery(&flow, &run, job("a", 4), 1),
            Resume::GiveUp {
                step: At::top(flow.step("a").unwrap()),
                deliveries: 4
            }
        );
    }

    #[test]
    fn attempts_are_numbered_from_the_record_within_the_retry_epoch() {
        assert_eq!(attempt_in_epoch(None, 0), 1);
        let mut s = state("a", StepStatus::Retrying, 2);
        assert_eq!(attempt_in_epoch(Some(&s), 0), 3);
        // A manual retry after 3 failed attempts: a fresh budget.
        s.attempts = state("a", StepStatus::Failed, 3).attempts;
        s.epoch = 3;
        assert_eq!(attempt_in_epoch(Some(&s), 0), 1);
        // Older jobs carry the epoch themselves.
        s.epoch = 0;
        assert_eq!(attempt_in_epoch(Some(&s), 3), 1);
    }

    #[test]
    fn only_failed_runs_are_retried_from_their_last_failed_step() {
        let mut run = run_with(vec![
            state("a", StepStatus::Succeeded, 1),
            state("b", StepStatus::Failed, 3),
        ]);
        let flow = three();
        assert!(matches!(retry(&flow, &run), Err(Refusal::NotFailed { .. })));
        run.status = RunStatus::Failed;
        let plan = retry(&flow, &run).unwrap();
        assert_eq!(plan.epoch, 3);
        assert_eq!(plan.step.name, "b");
        assert_eq!(plan.step.status, StepStatus::Retrying);
        assert_eq!(plan.step.epoch, 3);
        let empty = Run {
            status: RunStatus::Failed,
            ..run_with(vec![])
        };
        assert!(plan.lanes.is_empty());
        assert_eq!(
            retry(&flow, &empty),
            Err(Refusal::NothingToRetry("r".into()))
        );
    }

    #[test]
    fn only_running_runs_are_cancelled() {
        let mut run = run_with(vec![]);
        assert_eq!(cancel(&run), Ok(()));
        run.status = RunStatus::Succeeded;
        assert_eq!(cancel(&run), Err(Refusal::NotRunning("r".into())));
    }

    #[test]
    fn the_first_step_is_the_first_declared() {
        assert_eq!(first_step(&three()).unwrap().name, "a");
    }

    #[test]
    fn a_waiting_run_wakes_only_from_a_due_job_for_its_waiting_step() {
        let flow = flow(concat!(
            "  - {name: a, piece: p, action: x}\n",
            "  - {name: pause, delay: 1h}\n",
            "  - {name: z, piece: p, action: x}\n",
        ));
        let pause = flow.step("pause").unwrap();
        let after = start_wait(Some(now()));
        assert_eq!(
            (after.status, after.next, after.settle),
            (StepStatus::Waiting, Next::Done, Settle::Ack)
        );
        let mut waiting = state("pause", StepStatus::Waiting, 1);
        waiting.retry_at = Some(now() + chrono::Duration::seconds(30));
        let mut run = run_with(vec![state("a", StepStatus::Succeeded, 1), waiting.clone()]);
        run.status = RunStatus::Waiting;
        let at = |step, secs| Delivered {
            now: now() + chrono::Duration::seconds(secs),
            ..job(step, 1)
        };
        // Early (a redelivered job from before the wait): the timer will come.
        assert_eq!(
            on_delivery(&flow, &run, at("pause", 0), 10),
            Resume::HandOff(Next::Done)
        );
        // Due, or within the clocks' tolerance of due: wake.
        assert_eq!(
            on_delivery(&flow, &run, at("pause", 29), 10),
            Resume::Wake(At::top(pause))
        );
        assert_eq!(
            on_delivery(&flow, &run, at("pause", 90), 10),
            Resume::Wake(At::top(pause))
        );
        // A redelivery of the job before the wait leaves the run to its timer.
        assert_eq!(
            on_delivery(&flow, &run, at("a", 90), 10),
            Resume::HandOff(Next::Done)
        );
        // A wait with no timeout is woken by nobody but whoever resumes it.
        waiting.retry_at = None;
        let run = run_with(vec![state("a", StepStatus::Succeeded, 1), waiting]);
        assert_eq!(
            on_delivery(&flow, &run, at("pause", 90), 10),
            Resume::HandOff(Next::Done)
        );
        // Once woken (recorded as done), the run goes on after it.
        let run = run_with(vec![
            state("a", StepStatus::Succeeded, 1),
            state("pause", StepStatus::Succeeded, 1),
        ]);
        assert_eq!(
            on_delivery(&flow, &run, at("pause", 90), 10),
            Resume::HandOff(Next::Publish(At::top(flow.step("z").unwrap())))
        );
    }

    /// `gate` chooses `then` (a, on queue vpn, then b) or `else` (nothing); `z` follows.
    fn branching() -> FlowDefinition {
        flow(concat!(
            "  - name: gate\n",
            "    if: \"{{ trigger.go }}\"\n",
            "    then:\n",
            "      - {name: a, piece: p, action: x}\n",
            "      - {name: b, piece: p, action: x, queue: vpn}\n",
            "  - {name: z, piece: p, action: x}\n",
        ))
    }

    #[test]
    fn a_branch_step_goes_into_the_branch_it_chose_and_its_end_closes_the_branch() {
        let flow = branching();
        let step = |name| flow.step(name).unwrap();
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(step("gate")),
            &succeeded(),
            Some("then"),
            OWN,
            now(),
        );
        assert_eq!(after.next, Next::Inline(At::top(step("a"))));
        assert!(after.closed.is_empty());
        // The branch's last step ends it: `gate` takes its output, `z` follows.
        let vpn = Position {
            queue: "vpn",
            ..OWN
        };
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(step("b")),
            &succeeded(),
            None,
            vpn,
            now(),
        );
        assert_eq!(after.next, Next::Publish(At::top(step("z"))));
        assert_eq!(after.closed, vec![At::top(step("gate"))]);
        // An empty branch goes straight on.
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(step("gate")),
            &succeeded(),
            Some("else"),
            OWN,
            now(),
        );
        assert_eq!(after.next, Next::Inline(At::top(step("z"))));
        // The branch's first step is on another queue than the delivery: a job of its own.
        // A condition that failed for good fails the run like any step.
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(step("gate")),
            &succeeded(),
            Some("then"),
            vpn,
            now(),
        );
        assert_eq!(after.next, Next::Publish(At::top(step("a"))));
        let after = after_attempt(
            &flow,
            &run_with(vec![]),
            At::top(step("gate")),
            &failed(),
            None,
            OWN,
            now(),
        );
        assert_eq!(after.settle, Settle::Term(Termination::Failed));
        assert!(after.closed.is_empty());
    }

    #[test]
    fn a_redelivery_follows_the_recorded_branch() {
        let flow = branching();
        let step = |name| flow.step(name).unwrap();
        let mut gate = state("gate", StepStatus::Succeeded, 1);
        gate.branch = Some("then".into());
        let run = run_with(vec![gate.clone()]);
        assert_eq!(
            on_delivery(&flow, &run, job("gate", 2), 10),
            Resume::HandOff(Next::Publish(At::top(step("a"))))
        );
        let run = run_with(vec![gate.clone(), state("a", StepStatus::Succeeded, 1)]);
        assert_eq!(
            on_delivery(&flow, &run, job("gate", 2), 10),
            Resume::HandOff(Next::Publish(At::top(step("b"))))
        );
        gate.branch = Some("else".into());
        assert_eq!(
            on_delivery(&flow, &run_with(vec![gate]), job("gate", 2), 10),
            Resume::HandOff(Next::Publish(At::top(step("z"))))
        );
    }

    #[test]
    fn a_loop_walks_its_items_in_order_and_a_redelivery_resumes_at_the_first_unrecorded_one() {
        let flow = flow(concat!(
            "  - name: each\n",
            "    for_each: \"{{ trigger.items }}\"\n",
            "    steps:\n",
            "      - {name: a, piece: p, action: x}\n",
            "      - {name: b, piece: p, action: x}\n",
            "  - {name: z, piece: p, action: x}\n",
        ));
        let step = |name| flow.step(name).unwrap();
        let item = |name, i| At {
            step: step(name),
            item: Some(i),
        };
        let mut each = state("each", StepStatus::Running, 1);
        each.input = json!({"items": ["x", "y"]});
        each.branch = Some("each".into());
        let run = run_with(vec![each.clone()]);
        // Starting: the first item's first step, inline.
        let after = after_attempt(
            &flow,
            &run,
            At::top(step("each")),
            &succeeded(),
            Some("each"),
            OWN,
            now(),
        );
        assert_eq!(after.status, StepStatus::Running);
        assert_eq!(after.next, Next::Inline(item("a", 0)));
        // The end of an item's steps: the next item.
        let after = after_attempt(&flow, &run, item("b", 0), &succeeded(), None, INLINE, now());
        assert_eq!(after.next, Next::Inline(item("a", 1)));
        assert!(after.closed.is_empty());
        // The end of the last item closes the loop and goes on after it.
        let after = after_attempt(&flow, &run, item("b", 1), &succeeded(), None, INLINE, now());
        assert_eq!(after.next, Next::Inline(At::top(step("z"))));
        assert_eq!(after.closed, vec![At::top(step("each"))]);
        // A redelivered job for the loop resumes at the first item step not recorded.
        let run = run_with(vec![
            each,
            state("a[0]", StepStatus::Succeeded, 1),
            state("b[0]", StepStatus::Succeeded, 1),
            state("a[1]", StepStatus::Succeeded, 1),
        ]);
        assert_eq!(
            on_delivery(&flow, &run, job("each", 2), 10),
            Resume::HandOff(Next::Publish(item("b", 1)))
        );
        // A job names an item step as recorded; a name that does not fit the flow is poison.
        assert_eq!(At::parse(&flow, "b[1]"), Some(item("b", 1)));
        assert_eq!(At::parse(&flow, "b"), None, "a loop's step needs its item");
        assert_eq!(
            At::parse(&flow, "z[1]"),
            None,
            "only a loop's steps have items"
        );
        assert!(matches!(
            on_delivery(&flow, &run, job("z[1]", 1), 10),
            Resume::Poison(_)
        ));
    }

    fn parallel() -> FlowDefinition {
        flow(concat!(
            "  - name: each\n",
            "    for_each: \"{{ trigger.items }}\"\n",
            "    parallelism: 2\n",
            "    steps:\n",
            "      - {name: a, piece: p, action: x}\n",
            "      - {name: b, piece: p, action: x}\n",
            "  - {name: z, piece: p, action: x}\n",
        ))
    }

    fn started(items: serde_json::Value) -> StepState {
        let mut each = state("each", StepStatus::Running, 1);
        each.input = json!({ "items": items });
        each.branch = Some("each".into());
        each
    }

    #[test]
    fn a_parallel_loop_starts_its_lanes_and_each_lane_takes_every_nth_item() {
        let flow = parallel();
        let step = |name| flow.step(name).unwrap();
        let item = |name, i| At {
            step: step(name),
            item: Some(i),
        };
        let run = run_with(vec![started(json!([1, 2, 3, 4, 5]))]);
        let after = after_attempt(
            &flow,
            &run,
            At::top(step("each")),
            &succeeded(),
            Some("each"),
            OWN,
            now(),
        );
        assert_eq!(after.next, Next::Inline(item("a", 0)));
        assert_eq!(after.forks, vec![item("a", 1)]);
        // Lane 1 takes items 1 and 3, then ends: the loop waits for lane 0.
        let after = after_attempt(&flow, &run, item("b", 1), &succeeded(), None, INLINE, now());
        assert_eq!(after.next, Next::Inline(item("a", 3)));
        let after = after_attempt(&flow, &run, item("b", 3), &succeeded(), None, INLINE, now());
        let join = Join {
            around: step("each"),
            lane: 1,
            lanes: 2,
        };
        assert_eq!(after.next, Next::Join(join));
        assert_eq!((after.run_end, after.settle), (None, Settle::Ack));
        assert!(after.closed.is_empty(), "the loop closes only at the join");
        // Fewer items than lanes: as many lanes as items.
        let two = run_with(vec![started(json!([1, 2]))]);
        let after = after_attempt(&flow, &two, item("b", 0), &succeeded(), None, INLINE, now());
        assert_eq!(after.next, Next::Join(Join { lane: 0, ..join }));
        // Closing: the loop's output in item order, what follows in a job of its own.
        let mut done = vec![started(json!([1, 2]))];
        for i in 0..2 {
            let mut b = state(&format!("b[{i}]"), StepStatus::Succeeded, 1);
            b.output = Some(json!(i * 10));
            done.push(b);
        }
        let done = run_with(done);
        let closing = StepOutcome::Succeeded {
            output: done.loop_output(step("each"), |_| None),
        };
        assert_eq!(
            closing,
            StepOutcome::Succeeded {
                output: json!([0, 10])
            }
        );
        // The worker closes it with no inline budget: two workers may both see the count
        // complete (one a redelivery), and the next job's message id drops the second.
        let joined = Position {
            inline_budget: 0,
            ..INLINE
        };
        let after = after_attempt(
            &flow,
            &done,
            At::top(step("each")),
            &closing,
            None,
            joined,
            now(),
        );
        assert_eq!(after.status, StepStatus::Succeeded);
        assert_eq!(after.next, Next::Publish(At::top(step("z"))));
        let one = Run {
            steps: vec![started(json!([1]))],
            ..run_with(vec![])
        };
        let sequential =
            after_attempt(&flow, &one, item("b", 0), &succeeded(), None, INLINE, now());
        assert_eq!(
            sequential.next,
            Next::Inline(At::top(step("z"))),
            "one item, one lane: the loop closes as a sequential one does"
        );
    }

    #[test]
    fn a_redelivered_loop_start_starts_the_lanes_that_never_started_and_joins_its_own() {
        let flow = parallel();
        let step = |name| flow.step(name).unwrap();
        let item = |name, i| At {
            step: step(name),
            item: Some(i),
        };
        // The worker died after recording the loop's start: lane 1 never got its job.
        let run = run_with(vec![started(json!([1, 2, 3]))]);
        assert_eq!(
            on_delivery(&flow, &run, job("each", 2), 10),
            Resume::Fork {
                next: Next::Publish(item("a", 0)),
                forks: vec![item("a", 1)],
            }
        );
        // Lane 1 started; lane 0 ran to its end but died before counting it.
        let mut steps = vec![
            started(json!([1, 2, 3])),
            state("a[1]", StepStatus::Succeeded, 1),
        ];
        for name in ["a[0]", "b[0]", "a[2]", "b[2]"] {
            steps.push(state(name, StepStatus::Succeeded, 1));
        }
        let run = run_with(steps);
        assert_eq!(
            on_delivery(&flow, &run, job("each", 3), 10),
            Resume::HandOff(Next::Join(Join {
                around: step("each"),
                lane: 0,
                lanes: 2,
            }))
        );
        // A job for lane 1's first step follows its lane.
        assert_eq!(
            on_delivery(&flow, &run, job("a[1]", 2), 10),
            Resume::HandOff(Next::Publish(item("b", 1)))
        );
    }

    #[test]
    fn retrying_a_run_failed_in_a_lane_restarts_the_other_lanes_where_they_stopped() {
        let flow = parallel();
        let mut run = run_with(vec![
            started(json!([1, 2, 3, 4, 5])),
            state("a[0]", StepStatus::Succeeded, 1),
            state("a[1]", StepStatus::Succeeded, 1),
            state("b[1]", StepStatus::Failed, 2),
        ]);
        run.status = RunStatus::Failed;
        let plan = retry(&flow, &run).unwrap();
        assert_eq!(plan.step.name, "b[1]");
        assert_eq!(plan.lanes, vec!["a[0]".to_owned()]);
        // Lane 0's job goes on from what it recorded.
        run.status = RunStatus::Running;
        assert_eq!(
            on_delivery(&flow, &run, job("a[0]", 1), 10),
            Resume::HandOff(Next::Publish(At {
                step: flow.step("b").unwrap(),
                item: Some(0)
            }))
        );
    }
}

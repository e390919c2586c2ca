//! Executing one step attempt: render the input, validate it, run the action under a timeout,
//! and classify the result against the retry policy.
//!
//! This is pure with respect to infrastructure: the worker decides what to do with the
//! [`StepOutcome`] (record, ack, nak with delay, publish the next step).

use std::time::{Duration, Instant};

use piecework_sdk::mask::Secrets;
use piecework_sdk::prop::redact_secrets;
use piecework_sdk::{Context, DynAction, PieceError};
use serde_json::Value;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::flow::{DEFAULT_MAX_ITEMS, EACH, StepDef, StepKind, TIMEOUT_BRANCH, WaitFor};
use crate::run::{Iteration, Run, StepState};
use crate::template;

/// What happened to one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Succeeded {
        output: Value,
    },
    /// Failed with a retryable error and the policy allows another attempt after `delay`.
    Retry {
        error: String,
        delay: Duration,
    },
    /// Failed for good: a fatal error, or the last attempt.
    Failed {
        error: String,
    },
}

/// The result of [`execute`]: the outcome plus what to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub outcome: StepOutcome,
    /// The rendered input with secrets redacted (`Null` if rendering failed); for a branch
    /// step, the conditions it evaluated.
    pub recorded_input: Value,
    pub duration: Duration,
    /// The branch a branch step chose.
    pub branch: Option<String>,
    /// A delay or wait step that pauses the run: until when (`None`: until resumed).
    pub pause: Option<Option<DateTime<Utc>>>,
}

impl Execution {
    /// An attempt that failed before the action could run (unknown action, missing
    /// connection): fatal, nothing recorded as input.
    pub fn failed(error: String) -> Self {
        Self {
            outcome: StepOutcome::Failed { error },
            recorded_input: Value::Null,
            duration: Duration::ZERO,
            branch: None,
            pause: None,
        }
    }

    /// Masks `secrets` in everything this attempt records: output, error, input.
    pub fn mask(&mut self, secrets: &Secrets) {
        if secrets.is_empty() {
            return;
        }
        secrets.mask_value(&mut self.recorded_input);
        match &mut self.outcome {
            StepOutcome::Succeeded { output } => secrets.mask_value(output),
            StepOutcome::Retry { error, .. } | StepOutcome::Failed { error } => {
                *error = secrets.mask(error).into_owned();
            }
        }
    }

    /// Keeps what this attempt records within `max` bytes of JSON: an output over it fails the
    /// attempt for good (the same input would make the same output), a longer error is cut
    /// to [`MAX_ERROR_BYTES`], a recorded input over it is replaced by a note of its size.
    pub fn limit(&mut self, max: usize) {
        if let StepOutcome::Succeeded { output } = &self.outcome {
            let size = json_size(output);
            if size > max {
                self.outcome = StepOutcome::Failed {
                    error: format!(
                        "the step's output is {size} bytes, more than the {max} a step may record ([worker] max_output_bytes): return less, or keep large data elsewhere and pass a reference"
                    ),
                };
            }
        }
        if let StepOutcome::Retry { error, .. } | StepOutcome::Failed { error } = &mut self.outcome
        {
            cut(error, MAX_ERROR_BYTES.min(max));
        }
        let size = json_size(&self.recorded_input);
        if size > max {
            self.recorded_input = Value::String(format!(
                "(not recorded: the input was {size} bytes, more than {max})"
            ));
        }
    }

    /// Attempt `attempt` of `step` that could not start (its piece is not here): retried as
    /// the step's policy says when the error is retryable.
    pub fn refused(error: PieceError, step: &StepDef, attempt: u32) -> Self {
        Self {
            outcome: classify(Err(error), step, attempt),
            recorded_input: Value::Null,
            duration: Duration::ZERO,
            branch: None,
            pause: None,
        }
    }
}

/// The longest step error recorded; the rest is cut (an upstream quoting a whole page).
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// The length of `value` as compact JSON, counted without building the text.
pub fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("JSON values serialize");
    count.0
}

/// Cuts `text` to at most `max` bytes on a character boundary, saying so.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let total = text.len();
    text.truncate(end);
    text.push_str(&format!("… (cut from {total} bytes)"));
}

/// Renders the step's input against the run so far. An input without templates is taken as
/// it is: building the templates' view of the run (every earlier output) is the costly part.
pub fn render_input(
    step: &StepDef,
    run: &Run,
    iteration: Option<Iteration<'_>>,
) -> Result<Value, PieceError> {
    let input = Value::Object(step.input.clone());
    if !template::has_templates(&input) {
        return Ok(input);
    }
    template::render(&input, &run.template_context_in(iteration))
        .map_err(|e| PieceError::fatal(format!("template error at {}: {}", e.path, e.message)))
}

/// Runs attempt number `attempt` (1-based) of `step`.
pub async fn execute(
    action: &dyn DynAction,
    step: &StepDef,
    run: &Run,
    iteration: Option<Iteration<'_>>,
    ctx: &Context,
    attempt: u32,
) -> Execution {
    let started = Instant::now();
    let (result, recorded_input) = match render_input(step, run, iteration) {
        Err(err) => (Err(err), Value::Null),
        Ok(input) => {
            let mut recorded = input.clone();
            redact_secrets(&action.spec().props, &mut recorded);
            let timeout = step.timeout();
            let result = match tokio::time::timeout(timeout, action.run_json(ctx, input)).await {
                Ok(result) => result,
                Err(_) => Err(PieceError::retryable(format!(
                    "step timed out after {}",
                    humantime_duration(timeout)
                ))),
            };
            (result, recorded)
        }
    };
    let outcome = classify(result, step, attempt);
    Execution {
        outcome,
        recorded_input,
        duration: started.elapsed(),
        branch: None,
        pause: None,
    }
}

/// Runs a branch step: evaluates its conditions against the run in order, and the first that
/// is true chooses its branch (the fallback, `else` or `default`, when none is). Records the
/// conditions evaluated, by branch, as the step's input: why the branch ran. A condition that
/// cannot be evaluated, or is not a boolean, fails the step for good.
pub fn choose_branch(step: &StepDef, run: &Run, iteration: Option<Iteration<'_>>) -> Execution {
    let started = Instant::now();
    let context = run.template_context_in(iteration);
    let mut evaluated = serde_json::Map::new();
    let mut chosen = None;
    let mut error = None;
    for branch in step.branches() {
        let Some(when) = branch.when else {
            chosen = Some(branch.name);
            break;
        };
        match template::condition(when, &context) {
            Ok(value) => {
                evaluated.insert(branch.name.to_owned(), Value::Bool(value));
                if value {
                    chosen = Some(branch.name);
                    break;
                }
            }
            Err(message) => {
                error = Some(format!("condition of branch `{}`: {message}", branch.name));
                break;
            }
        }
    }
    let outcome = match error {
        Some(error) => StepOutcome::Failed { error },
        None => StepOutcome::Succeeded {
            output: Value::Null,
        },
    };
    Execution {
        branch: chosen
            .filter(|_| matches!(outcome, StepOutcome::Succeeded { .. }))
            .map(str::to_owned),
        outcome,
        recorded_input: Value::Object(evaluated),
        duration: started.elapsed(),
        pause: None,
    }
}

/// Starts a delay or wait step at `now`: the run pauses until the delay's end or the wait's
/// timeout (a wait without one pauses until it is resumed). A delay whose instant has passed
/// does not pause; an `until` that does not render to an RFC 3339 instant fails the step for
/// good. Records what it waits for and until when as the step's input.
pub fn start_pause(
    step: &StepDef,
    run: &Run,
    iteration: Option<Iteration<'_>>,
    now: DateTime<Utc>,
) -> Execution {
    let started = Instant::now();
    let (waiting_for, until) = match step.kind() {
        StepKind::Wait => (
            step.wait_for.map_or("resume", WaitFor::as_str),
            Ok(step.timeout.map(|t| now + chrono_duration(t))),
        ),
        _ => ("delay", delay_end(step, run, iteration, now).map(Some)),
    };
    let mut execution = Execution {
        outcome: StepOutcome::Succeeded {
            output: Value::Null,
        },
        recorded_input: Value::Null,
        duration: Duration::ZERO,
        branch: None,
        pause: None,
    };
    match until {
        Err(error) => execution.outcome = StepOutcome::Failed { error },
        Ok(until) => {
            execution.recorded_input = json!({ "waiting_for": waiting_for, "until": until });
            if step.kind() == StepKind::Delay && until.is_some_and(|at| at <= now) {
                execution.outcome = StepOutcome::Succeeded {
                    output: json!({ "waited_until": until }),
                };
            } else {
                execution.pause = Some(until);
            }
        }
    }
    execution.duration = started.elapsed();
    execution
}

/// When a delay step that starts at `now` ends.
fn delay_end(
    step: &StepDef,
    run: &Run,
    iteration: Option<Iteration<'_>>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    if let Some(delay) = step.delay {
        return Ok(now + chrono_duration(delay));
    }
    let until = step.until.as_deref().unwrap_or_default();
    let context = run.template_context_in(iteration);
    let rendered = template::render(&Value::String(until.to_owned()), &context)
        .map_err(|e| format!("template error in until: {}", e.message))?;
    let text = rendered.as_str().unwrap_or_default();
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|e| format!("until rendered to {rendered}, not an RFC 3339 instant: {e}"))
}

/// Starts a loop step: renders its list (recorded as the step's input, `{"items": […]}`, so
/// every item reads the list as it was) and enters its steps for the first item — or, for an
/// empty list, succeeds with `[]`. Anything but a list, or more items than `max_items`, fails
/// the step for good.
pub fn start_loop(step: &StepDef, run: &Run) -> Execution {
    let started = Instant::now();
    let list = step.for_each.as_deref().unwrap_or_default();
    let rendered = template::render(&Value::String(list.to_owned()), &run.template_context());
    let max = step.max_items.unwrap_or(DEFAULT_MAX_ITEMS);
    let (outcome, recorded_input, branch) = match rendered {
        Err(err) => (
            StepOutcome::Failed {
                error: format!("template error in for_each: {}", err.message),
            },
            Value::Null,
            None,
        ),
        Ok(Value::Array(items)) if items.len() > max as usize => (
            StepOutcome::Failed {
                error: format!(
                    "for_each gave {} items, more than max_items ({max})",
                    items.len()
                ),
            },
            Value::Null,
            None,
        ),
        Ok(Value::Array(items)) if items.is_empty() => (
            StepOutcome::Succeeded { output: json!([]) },
            json!({ "items": [] }),
            None,
        ),
        Ok(Value::Array(items)) => (
            StepOutcome::Succeeded {
                output: Value::Null,
            },
            json!({ "items": items }),
            Some(EACH.to_owned()),
        ),
        Ok(other) => (
            StepOutcome::Failed {
                error: format!("for_each gave {other}, not a list"),
            },
            Value::Null,
            None,
        ),
    };
    Execution {
        outcome,
        recorded_input,
        duration: started.elapsed(),
        branch,
        pause: None,
    }
}

/// Wakes a delay or wait step whose timer came due: a delay succeeds; a wait has timed out,
/// and runs its `on_timeout` steps or, without them, fails for good.
pub fn wake(step: &StepDef, state: &StepState) -> Execution {
    let until = state.retry_at;
    let (outcome, branch) = match step.kind() {
        StepKind::Wait if !step.on_timeout.is_empty() => (
            StepOutcome::Succeeded {
                output: Value::Null,
            },
            Some(TIMEOUT_BRANCH.to_owned()),
        ),
        StepKind::Wait => (
            StepOutcome::Failed {
                error: format!(
                    "timed out: not resumed within {}",
                    humantime_duration(step.timeout.unwrap_or_default())
                ),
            },
            None,
        ),
        _ => (
            StepOutcome::Succeeded {
                output: json!({ "waited_until": until }),
            },
            None,
        ),
    };
    Execution {
        outcome,
        recorded_input: state.input.clone(),
        duration: Duration::ZERO,
        branch,
        pause: None,
    }
}

fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// Applies the retry policy to an attempt's result.
pub fn classify(result: Result<Value, PieceError>, step: &StepDef, attempt: u32) -> StepOutcome {
    match result {
        Ok(output) => StepOutcome::Succeeded { output },
        Err(err) => {
            let policy = step.retry_policy();
            if err.is_retryable() && policy.allows_retry_after(attempt) {
                let delay = policy
                    .delay_after(attempt)
                    .max(err.retry_after().unwrap_or_default());
                StepOutcome::Retry {
                    error: err.to_string(),
                    delay,
                }
            } else if err.is_retryable() {
                StepOutcome::Failed {
                    error: format!("{err} (gave up after {attempt} attempts)"),
                }
            } else {
                StepOutcome::Failed {
                    error: err.to_string(),
                }
            }
        }
    }
}

fn humantime_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 1.0 {
        format!("{secs}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FlowDefinition, Format};
    use crate::retry::RetryPolicy;
    use serde_json::json;

    fn step(max_attempts: u32) -> StepDef {
        let mut def = FlowDefinition::parse(
            "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: {piece: p, trigger: t}\nsteps:\n  - {name: s, piece: p, action: a, input: {v: '{{ trigger.n }}'}}\n",
            Format::Yaml,
        )
        .unwrap();
        let mut step = def.steps.remove(0);
        step.retry = Some(RetryPolicy {
            max_attempts,
            jitter: 0.0,
            ..RetryPolicy::default()
        });
        step
    }

    #[test]
    fn retryable_errors_retry_until_attempts_run_out() {
        let s = step(3);
        let err = || Err(PieceError::retryable("503"));
        assert_eq!(
            classify(err(), &s, 1),
            StepOutcome::Retry {
                error: "503".into(),
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            classify(err(), &s, 2),
            StepOutcome::Retry {
                error: "503".into(),
                delay: Duration::from_secs(2)
            }
        );
        assert_eq!(
            classify(err(), &s, 3),
            StepOutcome::Failed {
                error: "503 (gave up after 3 attempts)".into()
            }
        );
    }

    #[test]
    fn fatal_errors_fail_at_once_and_retry_after_is_honoured() {
        let s = step(3);
        assert_eq!(
            classify(Err(PieceError::fatal("400")), &s, 1),
            StepOutcome::Failed {
                error: "400".into()
            }
        );
        let slow_down = PieceError::retryable("429").with_retry_after(Duration::from_secs(30));
        assert_eq!(
            classify(Err(slow_down), &s, 1),
            StepOutcome::Retry {
                error: "429".into(),
                delay: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn what_an_attempt_records_is_kept_within_the_limit() {
        let big = json!({"rows": "x".repeat(5000)});
        let mut execution = Execution {
            outcome: StepOutcome::Succeeded {
                output: big.clone(),
            },
            recorded_input: big.clone(),
            duration: Duration::ZERO,
            branch: None,
            pause: None,
        };
        execution.limit(6000);
        assert!(matches!(execution.outcome, StepOutcome::Succeeded { .. }));
        assert_eq!(execution.recorded_input, big);
        execution.limit(4000);
        let StepOutcome::Failed { error } = &execution.outcome else {
            panic!("{:?}", execution.outcome)
        };
        assert!(
            error.starts_with("the step's output is 5011 bytes, more than the 4000"),
            "{error}"
        );
        assert_eq!(
            execution.recorded_input,
            "(not recorded: the input was 5011 bytes, more than 4000)"
        );
        let mut execution = Execution::failed("é".repeat(10_000));
        execution.limit(1_000_000);
        let StepOutcome::Failed { error } = &execution.outcome else {
            unreachable!()
        };
        assert!(error.len() < MAX_ERROR_BYTES + 40, "{}", error.len());
        assert!(error.ends_with("… (cut from 20000 bytes)"), "{error}");
        assert_eq!(json_size(&json!({"a": [1, "b"]})), r#"{"a":[1,"b"]}"#.len());
    }

    #[test]
    fn inputs_render_against_the_run() {
        let run = Run::new("r".into(), "f", 1, json!({"n": 7}));
        assert_eq!(render_input(&step(1), &run, None).unwrap(), json!({"v": 7}));
        let run = Run::new("r".into(), "f", 1, json!({}));
        let err = render_input(&step(1), &run, None).unwrap_err();
        assert!(
            err.to_string().starts_with("template error at input.v"),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_branch_step_takes_the_first_true_condition_and_records_why() {
        let def = FlowDefinition::parse(
            concat!(
                "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: {piece: p, trigger: t}\nsteps:\n",
                "  - name: route\n    router:\n",
                "      - {name: low, when: \"{{ trigger.n < 3 }}\", steps: []}\n",
                "      - {name: mid, when: \"{{ trigger.n < 10 }}\", steps: []}\n",
                "      - {name: odd, when: \"{{ trigger.n }}\", steps: []}\n",
            ),
            Format::Yaml,
        )
        .unwrap();
        let step = &def.steps[0];
        let chosen = |trigger: Value| {
            let execution = choose_branch(step, &Run::new("r".into(), "f", 1, trigger), None);
            (
                execution.branch,
                execution.recorded_input,
                execution.outcome,
            )
        };
        let (branch, why, outcome) = chosen(json!({"n": 5}));
        assert_eq!(branch.as_deref(), Some("mid"));
        assert_eq!(why, json!({"low": false, "mid": true}));
        assert_eq!(
            outcome,
            StepOutcome::Succeeded {
                output: Value::Null
            }
        );
        // Not a boolean: the step fails for good, naming the branch; no branch is taken.
        let (branch, _, outcome) = chosen(json!({"n": 50}));
        assert_eq!(branch, None);
        let StepOutcome::Failed { error } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            error.starts_with("condition of branch `odd`: evaluated to 50, not true or false"),
            "{error}"
        );
        // A condition that cannot be evaluated fails the same way.
        let (branch, _, outcome) = chosen(json!({}));
        assert_eq!(branch, None);
        assert!(
            matches!(outcome, StepOutcome::Failed { error } if error.starts_with("condition of branch `low`"))
        );
    }
}

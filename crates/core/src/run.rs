//! Runs: one execution of a flow version, step by step.
//!
//! A run pins the flow version it started on. Each step keeps its (redacted) input, output or
//! error, and every attempt with its timing, so `GET /v1/runs/{id}` can explain what happened.

use chrono::{DateTime, Utc};
use piecework_sdk::Principal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::flow::{StepDef, instance_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Paused at a delay or wait step, until its timer fires or it is resumed.
    Waiting,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Waiting)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Waiting => "waiting",
        }
    }
}

impl std::str::FromStr for RunStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.to_owned())).map_err(|_| {
            format!("unknown run status {s:?} (running, waiting, succeeded, failed, cancelled)")
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Failed with a retryable error; another attempt is scheduled.
    Retrying,
    Succeeded,
    Failed,
    /// A delay or wait step the run is waiting on; `retry_at` is when its timer fires.
    Waiting,
    /// A loop step whose items are running.
    Running,
    /// Stopped mid-attempt: the run ended while it ran (cancelled, past the flow's timeout,
    /// failed in another lane). A retry of the run runs it again.
    Stopped,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Retrying => "retrying",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Waiting => "waiting",
            StepStatus::Running => "running",
            StepStatus::Stopped => "stopped",
        }
    }
}

/// One attempt of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attempt {
    pub attempt: u32,
    pub status: StepStatus,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which worker ran it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker: String,
}

/// The state of one step in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepState {
    pub name: String,
    /// Empty for a branch step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub piece: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    pub status: StepStatus,
    /// The rendered input, secrets replaced by `"***"`.
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub attempts: Vec<Attempt>,
    /// While retrying: when the next attempt may start; while waiting: when the delay ends or
    /// the wait times out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    /// Attempts recorded before the last manual retry: the retry policy counts from here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
    /// A branch step: the branch it chose (its `input` holds the conditions it evaluated,
    /// its `output` is the output of the branch's last step once the branch ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One execution of a flow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Run {
    pub id: String,
    pub flow_id: String,
    pub flow_version: u32,
    pub status: RunStatus,
    /// What the trigger produced: the webhook request, the polled item, the schedule tick.
    pub trigger: Value,
    /// Steps in the order they ran.
    pub steps: Vec<StepState>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The response for a synchronous webhook call, set by an action that declares
    /// `webhook_response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// W3C `traceparent` of the run's span when traces are exported: every step's span is its
    /// child, wherever it runs, and operators find the run's trace by its trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Who started the run (an API key, a webhook, the scheduler); pieces see it in
    /// `ctx.run.started_by`.
    #[serde(default, skip_serializing_if = "is_nobody")]
    pub started_by: Principal,
    /// When the run is failed as timed out if it has not ended (the flow's `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The URL that resumes its webhook waits, for templates (`run.resume_url`): derived by
    /// the worker, never stored.
    #[serde(skip)]
    pub resume_url: Option<String>,
    /// For a run started by a sub-flow step: that step, which waits for this run's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentStep>,
    /// How many sub-flow steps started the runs above this one (0 for a run started by its
    /// trigger).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub depth: u32,
    /// Steps running for a while (a second or more) whose attempt has not been recorded yet:
    /// where, since when. A redelivered step finds here the attempt its worker lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<InFlight>,
}

/// An attempt in flight, as its worker marks it once it has run for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InFlight {
    /// The step's recorded name.
    pub step: String,
    pub worker: String,
    pub attempt: u32,
    /// The delivery of its job that runs it (1 the first time).
    pub delivery: u32,
    pub started_at: DateTime<Utc>,
}

/// The sub-flow step a run was started by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ParentStep {
    pub run_id: String,
    pub flow_id: String,
    pub flow_version: u32,
    /// The step's recorded name (`start_child[2]` in a loop).
    pub step: String,
}

fn is_nobody(principal: &Principal) -> bool {
    principal.name.is_empty()
}

/// Namespace of deterministic run ids (UUID v5).
const RUN_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_3c2a_9b7e_4f10_8a55_2c6e_0d4b_91a7);

/// A run id derived from the flow and the item, so the same polled item or schedule tick always
/// maps to the same run, however often its poll job is delivered.
pub fn deterministic_run_id(flow_id: &str, item_key: &str) -> String {
    Uuid::new_v5(&RUN_NAMESPACE, format!("{flow_id}\n{item_key}").as_bytes()).to_string()
}

/// A fresh, time-ordered run id (UUID v7) for runs started by a request.
pub fn new_run_id() -> String {
    Uuid::now_v7().to_string()
}

impl Run {
    pub fn new(id: String, flow_id: &str, flow_version: u32, trigger: Value) -> Self {
        Self {
            id,
            flow_id: flow_id.to_owned(),
            flow_version,
            status: RunStatus::Running,
            trigger,
            steps: Vec::new(),
            created_at: Utc::now(),
            finished_at: None,
            error: None,
            response: None,
            trace: None,
            started_by: Principal::default(),
            deadline: None,
            resume_url: None,
            parent: None,
            depth: 0,
            in_flight: Vec::new(),
        }
    }

    /// The attempt of `step` marked in flight, if any.
    pub fn in_flight(&self, step: &str) -> Option<&InFlight> {
        self.in_flight.iter().find(|m| m.step == step)
    }

    /// The run's trace id, from [`Run::trace`].
    pub fn trace_id(&self) -> Option<&str> {
        self.trace.as_deref()?.split('-').nth(1)
    }

    pub fn step(&self, name: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Replaces or appends a step's state.
    pub fn upsert_step(&mut self, state: StepState) {
        match self.steps.iter_mut().find(|s| s.name == state.name) {
            Some(existing) => *existing = state,
            None => self.steps.push(state),
        }
    }

    /// What templates see: `trigger`, `steps.<name>.{output,status,error,branch}`, `run`, `flow`.
    pub fn template_context(&self) -> minijinja::Value {
        self.template_context_in(None)
    }

    /// What templates see in the steps of a loop's item, besides [`Run::template_context`]:
    /// `item` and `loop.{index0,index,length,first,last}`, and `steps.<name>` of the loop's
    /// steps are this item's.
    pub fn template_context_in(&self, iteration: Option<Iteration<'_>>) -> minijinja::Value {
        let steps: serde_json::Map<String, Value> = self
            .steps
            .iter()
            .filter_map(|s| {
                let (name, item) = crate::flow::split_instance(&s.name);
                if item.is_some() && item != iteration.map(|i| i.index) {
                    return None;
                }
                let view = json!({
                    "output": s.output.clone().unwrap_or(Value::Null),
                    "status": s.status.as_str(),
                    "error": s.error,
                    "branch": s.branch,
                });
                Some((name.to_owned(), view))
            })
            .collect();
        let mut context = json!({
            "trigger": self.trigger,
            "steps": steps,
            "run": { "id": self.id, "created_at": self.created_at },
            "flow": { "id": self.flow_id, "version": self.flow_version },
        });
        if let Some(url) = &self.resume_url {
            context["run"]["resume_url"] = Value::String(url.clone());
        }
        if let Some(iteration) = iteration {
            let items = self.loop_items(iteration.loop_step);
            let length = items.map_or(0, Vec::len);
            let index = iteration.index as usize;
            context["item"] = items
                .and_then(|items| items.get(index))
                .cloned()
                .unwrap_or(Value::Null);
            context["loop"] = json!({
                "index0": index,
                "index": index + 1,
                "length": length,
                "first": index == 0,
                "last": index + 1 == length,
            });
        }
        minijinja::Value::from(minijinja::value::Serde(context))
    }

    /// The items of loop step `name`, as it recorded them when it started.
    pub fn loop_items(&self, name: &str) -> Option<&Vec<Value>> {
        self.step(name)?.input.get("items")?.as_array()
    }

    /// The output of `around`, a loop: the last output of its block for each item, in item
    /// order (`null` for an item without one). `written` gives outputs written but not yet
    /// in the run (`Some` for a step it knows of).
    pub fn loop_output(
        &self,
        around: &StepDef,
        written: impl Fn(&str) -> Option<Option<Value>>,
    ) -> Value {
        let block_end = around.steps.last().map_or("", |s| s.name.as_str());
        let count = self.loop_items(&around.name).map_or(0, Vec::len);
        (0..count)
            .map(|i| {
                let item = instance_name(block_end, u32::try_from(i).ok());
                written(&item)
                    .unwrap_or_else(|| self.step(&item).and_then(|s| s.output.clone()))
                    .unwrap_or(Value::Null)
            })
            .collect()
    }
}

/// Where a step runs inside a loop: the loop step, and the index of the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iteration<'a> {
    pub loop_step: &'a str,
    pub index: u32,
}

/// A summary row for run listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunSummary {
    pub id: String,
    pub flow_id: String,
    pub flow_version: u32,
    pub status: RunStatus,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who or what started it (`webhook:FLOW`, `schedule`, `api:KEY`, `flow:PARENT`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_by: String,
}

impl From<&Run> for RunSummary {
    fn from(run: &Run) -> Self {
        Self {
            id: run.id.clone(),
            flow_id: run.flow_id.clone(),
            flow_version: run.flow_version,
            status: run.status,
            created_at: run.created_at,
            finished_at: run.finished_at,
            error: run.error.clone(),
            started_by: run.started_by.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_ids_depend_on_flow_and_item() {
        assert_eq!(
            deterministic_run_id("f", "id:1"),
            deterministic_run_id("f", "id:1")
        );
        assert_ne!(
            deterministic_run_id("f", "id:1"),
            deterministic_run_id("g", "id:1")
        );
        assert_ne!(
            deterministic_run_id("f", "id:1"),
            deterministic_run_id("f", "id:2")
        );
    }
}

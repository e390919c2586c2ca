//! Flows: a trigger, then named steps, declared in YAML or JSON.
//!
//! ```yaml
//! apiVersion: piecework/v1
//! kind: Flow
//! name: greet
//! trigger: { piece: webhook, trigger: catch }
//! steps:
//!   - name: hello
//!     piece: data@^0.1          # or `piece: data` with `version: "^0.1"`
//!     action: set
//!     input: { value: "hello, {{ trigger.body.name }}" }
//!     retry: { max_attempts: 5, initial_interval: 1s }
//!     timeout: 30s
//!     on_failure: stop
//! ```
//!
//! [`FlowDefinition::parse`] reads a document, [`validate`] checks it against the registry and
//! returns every problem at once with its location; a valid flow becomes an immutable
//! [`FlowVersion`] whose piece ranges are resolved to exact versions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use piecework_sdk::prop::{Check, check_props};
use piecework_sdk::{TriggerHandle, TriggerKind};
use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::template::{self, LOOP_ROOTS, ROOTS};

pub const API_VERSION: &str = "piecework/v1";
pub const KIND: &str = "Flow";
pub const DEFAULT_QUEUE: &str = "default";

/// A flow as written by its author.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowDefinition {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    /// The flow's id: lowercase letters, digits, `-` and `_`.
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Who owns the flow; pieces see it for permission checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Whether the flow runs once applied: a new flow is enabled unless this says `false`.
    /// For a flow that exists, only a changed definition that says so changes whether it is
    /// enabled; re-applying leaves what an operator set with enable/disable alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    pub trigger: TriggerDef,
    pub steps: Vec<StepDef>,
    /// The longest a run may take, waits included: a run still going after it is failed
    /// ("timed out") by the schedulers.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    /// At most this many runs of the flow running or waiting at once, across the fleet;
    /// more wait, unstarted, for a free slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    /// Debounce trigger items: a run starts only once no new item (of the same
    /// `debounce_key`) has come for this long, with the last item; the ones it replaced start
    /// no run.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub debounce: Option<Duration>,
    /// With `debounce`: a template over `trigger` whose value groups items (one pending run
    /// per value, such as a ticket id); without it, all the flow's items are one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_key: Option<String>,
    /// With `debounce`: the longest a group's first item waits for its run, however often
    /// new items come (default ten times `debounce`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub debounce_max: Option<Duration>,
}

/// The longest `debounce` and `debounce_max` may be.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What starts the flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerDef {
    pub piece: String,
    /// A semver range; the newest registered version matching it is used. Default: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub version: Option<VersionReq>,
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub input: Map<String, Value>,
    /// For polling triggers: how often to poll (default: the trigger's own).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub poll_interval: Option<Duration>,
    /// The queue poll jobs are routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Webhook triggers only: how callers prove they may start the flow. Validation fills in
    /// the default, `hmac`, so a stored webhook flow always says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<WebhookAuth>,
    /// With `auth: token`: the header that carries the token (default `x-piecework-token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_header: Option<String>,
}

/// How a webhook flow's callers prove they may start it, with the flow's secret (generated
/// when the flow is first applied).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WebhookAuth {
    /// `x-piecework-timestamp: <unix seconds>` and `x-piecework-signature: sha256=<hex
    /// HMAC-SHA256 of "<timestamp>.<body>">`, at most 5 minutes old (GitHub and Stripe style).
    #[default]
    Hmac,
    /// The secret itself in a header.
    Token,
    /// Anyone who knows the flow's name; must be written out.
    None,
}

impl WebhookAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookAuth::Hmac => "hmac",
            WebhookAuth::Token => "token",
            WebhookAuth::None => "none",
        }
    }

    /// Whether the flow has a secret.
    pub fn needs_secret(self) -> bool {
        self != WebhookAuth::None
    }
}

/// The header of `auth: token` when the flow names none.
pub const DEFAULT_TOKEN_HEADER: &str = "x-piecework-token";

/// What to do when a step fails for good.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails.
    #[default]
    Stop,
    /// The step is marked failed and the run goes on with the next step.
    Continue,
    /// The step is marked failed, its `catch` steps run (they see its `error`), and the run
    /// goes on after the step.
    Branch,
}

/// One step: a piece's action with its input, or a branch step (`if` with `then`/`else`, or a
/// `router` with a `default`) whose branches are blocks of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub name: String,
    /// The piece whose action the step runs; empty for a branch step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub piece: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub version: Option<VersionReq>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub input: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Per attempt; default 5 minutes.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Routes the step to workers serving this queue (e.g. workers inside a VPN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The largest HTTP response body the step's piece reads (default: the installation's
    /// `[egress] max_response_bytes`, 10 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// At most this many starts of the step's action per period across the whole fleet
    /// (`10/s`, `600/m`, `5000/h`), shared by every step with the same [`StepDef::rate_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// The name of the limit `rate` and `max_in_flight` count against (default: the step's
    /// connection, or its piece when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_key: Option<String>,
    /// At most this many calls of the step's action in flight at once across the whole
    /// fleet, shared by every step with the same [`StepDef::rate_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// A branch step: a template that evaluates to `true` (the `then` steps run) or `false`
    /// (the `else` steps run).
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<StepDef>,
    #[serde(rename = "else", default, skip_serializing_if = "Vec::is_empty")]
    pub otherwise: Vec<StepDef>,
    /// A branch step with named branches: the first whose `when` is true runs, or `default`
    /// when none is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub router: Vec<Branch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<StepDef>,
    /// A delay step: how long the run pauses (`30s`, `2h`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub delay: Option<Duration>,
    /// A delay step: the instant the run pauses until, a template that renders to RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// A wait step: what resumes the run. Its `timeout` is how long it waits at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for: Option<WaitFor>,
    /// A wait step: the steps that run when the wait times out (without them, the step fails).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_timeout: Vec<StepDef>,
    /// A loop step: a template that renders to a list; `steps` run once per item, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// A loop step: how many items run at once (default 1: one after another; at most
    /// [`MAX_PARALLELISM`]). With more, item `i` runs in lane `i % parallelism`, each lane
    /// taking its items in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// A loop step: the most items it takes (default 1000); a longer list fails the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u32>,
    /// A loop step's block: the steps run for each item.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepDef>,
    /// With `on_failure: branch`: the steps that run when this step fails for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catch: Vec<StepDef>,
    /// A sub-flow step: the flow whose run it starts, with its rendered `input` as the run's
    /// trigger output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subflow: Option<String>,
    /// A sub-flow step: whether it waits for the run to end and takes its output (default);
    /// `false` starts it and goes on at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

/// How deep sub-flows may nest: a run started by a sub-flow step of a run … this many times.
pub const MAX_SUBFLOW_DEPTH: u32 = 8;

/// Items a loop takes unless it says otherwise, and the most it may say.
pub const DEFAULT_MAX_ITEMS: u32 = 1000;
pub const MAX_ITEMS: u32 = 10_000;
/// The most items of a loop that may run at once.
pub const MAX_PARALLELISM: u32 = 64;
/// The name of a loop step's one block, as a branch.
pub const EACH: &str = "each";
/// The name of the block `on_failure: branch` runs.
pub const CATCH: &str = "catch";

/// The recorded name of step `name` for item `index` of its loop: `double[3]`.
pub fn instance_name(name: &str, item: Option<u32>) -> String {
    match item {
        Some(index) => format!("{name}[{index}]"),
        None => name.to_owned(),
    }
}

/// Splits a recorded step name into the step and its item: `double[3]` → (`double`, 3).
pub fn split_instance(name: &str) -> (&str, Option<u32>) {
    if let Some(open) = name.find('[')
        && let Some(index) = name[open + 1..].strip_suffix(']')
        && let Ok(index) = index.parse()
    {
        return (&name[..open], Some(index));
    }
    (name, None)
}

/// A rate: `count` starts per `period`, written `10/s`, `600/m` or `5000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(with = "String")]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    /// The time between two starts: the limit spaces them evenly, so no window of one period
    /// ever holds more than `count`.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a rate: write a count per s, m or h, like `10/s`");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if !(1..=1_000_000).contains(&count) {
            return Err(format!("{text:?}: the count must be between 1 and 1000000"));
        }
        Ok(Self { count, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What resumes a wait step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// Someone with the operator role: `POST /v1/runs/{id}/resume` with `{"step", "payload"}`.
    Approval,
    /// Whoever holds the run's resume URL (`{{ run.resume_url }}`): `POST` to it, the body
    /// is the payload.
    Webhook,
}

impl WaitFor {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitFor::Approval => "approval",
            WaitFor::Webhook => "webhook",
        }
    }
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Runs a piece's action.
    Action,
    /// Chooses a branch (`if` or `router`).
    Branch,
    /// Pauses the run for a time (`delay` or `until`).
    Delay,
    /// Pauses the run until it is resumed (`wait_for`), or times out.
    Wait,
    /// Runs its block once per item of a list (`for_each`).
    Loop,
    /// Starts a run of another flow and (by default) waits for it (`subflow`).
    Subflow,
}

/// The longest a delay or wait step may pause a run.
pub const MAX_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);
/// The name of a wait step's timeout branch.
pub const TIMEOUT_BRANCH: &str = "timeout";

/// One named branch of a `router` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    pub name: String,
    /// A template that evaluates to `true` or `false`.
    pub when: String,
    #[serde(default)]
    pub steps: Vec<StepDef>,
}

/// A branch of a branch step as it is tried: `when` is `None` for the fallback (`else`,
/// `default`), which runs when no condition before it is true.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BranchRef<'a> {
    pub name: &'a str,
    pub when: Option<&'a str>,
    pub steps: &'a [StepDef],
}

/// The names of the fallback branches.
pub const ELSE: &str = "else";
pub const DEFAULT_BRANCH: &str = "default";

pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a step attempt may run (long steps report progress to keep their job).
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Steps per flow, and the longest step name: runs, keys and metrics labels stay bounded.
pub const MAX_STEPS: usize = 200;
pub const MAX_STEP_NAME: usize = 64;
/// The largest `max_response_bytes` a step may ask for.
pub const MAX_RESPONSE_BYTES: u64 = 1024 * 1024 * 1024;

impl StepDef {
    /// What the step does, from the fields it has (validation refuses mixtures).
    pub fn kind(&self) -> StepKind {
        if self.condition.is_some() || !self.router.is_empty() {
            StepKind::Branch
        } else if self.delay.is_some() || self.until.is_some() {
            StepKind::Delay
        } else if self.wait_for.is_some() {
            StepKind::Wait
        } else if self.for_each.is_some() {
            StepKind::Loop
        } else if self.subflow.is_some() {
            StepKind::Subflow
        } else {
            StepKind::Action
        }
    }

    /// Whether this is a branch step (`if` or `router`).
    pub fn is_branch(&self) -> bool {
        self.kind() == StepKind::Branch
    }

    /// Whether the step runs no piece (a branch, delay or wait step): it runs on whichever
    /// worker reaches it.
    pub fn is_control(&self) -> bool {
        self.kind() != StepKind::Action
    }

    /// A branch step's branches in the order they are tried, the fallback last; a wait
    /// step's timeout branch; none for other steps.
    pub fn branches(&self) -> Vec<BranchRef<'_>> {
        let mut branches = self.own_branches();
        if !self.catch.is_empty() {
            // Last, so no condition or fallback ever chooses it.
            branches.push(BranchRef {
                name: CATCH,
                when: None,
                steps: &self.catch,
            });
        }
        branches
    }

    fn own_branches(&self) -> Vec<BranchRef<'_>> {
        if self.for_each.is_some() {
            return vec![BranchRef {
                name: EACH,
                when: None,
                steps: &self.steps,
            }];
        }
        if self.wait_for.is_some() && !self.on_timeout.is_empty() {
            return vec![BranchRef {
                name: TIMEOUT_BRANCH,
                when: None,
                steps: &self.on_timeout,
            }];
        }
        if let Some(condition) = &self.condition {
            vec![
                BranchRef {
                    name: "then",
                    when: Some(condition),
                    steps: &self.then,
                },
                BranchRef {
                    name: ELSE,
                    when: None,
                    steps: &self.otherwise,
                },
            ]
        } else if !self.router.is_empty() {
            let named = self.router.iter().map(|b| BranchRef {
                name: &b.name,
                when: Some(&b.when),
                steps: &b.steps,
            });
            named
                .chain(std::iter::once(BranchRef {
                    name: DEFAULT_BRANCH,
                    when: None,
                    steps: &self.default,
                }))
                .collect()
        } else {
            Vec::new()
        }
    }

    /// The steps of branch `name`.
    pub fn branch(&self, name: &str) -> Option<&[StepDef]> {
        self.branches()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.steps)
    }

    /// The limit `rate` counts against: `rate_key`, else `connection:NAME`, else
    /// `piece:NAME`.
    pub fn rate_key(&self) -> String {
        match (&self.rate_key, &self.connection) {
            (Some(key), _) => key.clone(),
            (None, Some(connection)) => format!("connection:{connection}"),
            (None, None) => format!("piece:{}", self.piece),
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry.unwrap_or_default()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT)
    }

    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
}

impl TriggerDef {
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// The header `auth: token` reads.
    pub fn token_header(&self) -> &str {
        self.token_header.as_deref().unwrap_or(DEFAULT_TOKEN_HEADER)
    }
}

/// The document format of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// A flow that cannot be parsed or is not valid; every problem is listed with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("flow is not valid {format}: {message}")]
    Parse {
        format: &'static str,
        message: String,
    },
    #[error("flow `{flow}` is invalid:\n{}", issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid { flow: String, issues: Vec<Issue> },
}

/// One problem in a flow, located by a path like `steps[1] (assign).input.title`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl FlowDefinition {
    /// Parses a YAML or JSON document. Unknown fields are errors, so a typo such as `inptu`
    /// is reported instead of silently ignored. A piece may carry its range after an `@`
    /// (`piece: my-company-api@^1.2`); it is split into `piece` and `version` here.
    pub fn parse(text: &str, format: Format) -> Result<Self, FlowError> {
        let mut definition: Self = match format {
            Format::Json => serde_json::from_str(text).map_err(|e| FlowError::Parse {
                format: "JSON",
                message: e.to_string(),
            }),
            Format::Yaml => serde_norway::from_str(text).map_err(|e| FlowError::Parse {
                format: "YAML",
                message: e.to_string(),
            }),
        }?;
        definition.split_piece_ranges()?;
        Ok(definition)
    }

    /// `piece: name@range` → `piece: name` and `version: range`.
    fn split_piece_ranges(&mut self) -> Result<(), FlowError> {
        let mut issues = Vec::new();
        let mut split = |path: String, piece: &mut String, version: &mut Option<VersionReq>| {
            let Some((name, range)) = piece.split_once('@') else {
                return;
            };
            let parsed = match VersionReq::parse(range) {
                Ok(parsed) => parsed,
                Err(err) => {
                    issues.push(Issue {
                        path,
                        message: format!("{range:?} after `@` is not a semver range: {err}"),
                    });
                    return;
                }
            };
            if version.is_some() {
                issues.push(Issue {
                    path,
                    message: format!("gives a range twice: `{piece}` and `version`; keep one"),
                });
                return;
            }
            *version = Some(parsed);
            *piece = name.to_owned();
        };
        let trigger = &mut self.trigger;
        split(
            "trigger.piece".into(),
            &mut trigger.piece,
            &mut trigger.version,
        );
        self.visit_steps_mut(&mut |at, step| {
            split(format!("{at}.piece"), &mut step.piece, &mut step.version);
        });
        if issues.is_empty() {
            Ok(())
        } else {
            Err(FlowError::Invalid {
                flow: self.name.clone(),
                issues,
            })
        }
    }

    /// Every step, depth first: a branch step comes before the steps of its branches.
    pub fn all_steps(&self) -> Vec<&StepDef> {
        fn walk<'a>(steps: &'a [StepDef], out: &mut Vec<&'a StepDef>) {
            for step in steps {
                out.push(step);
                for branch in step.branches() {
                    walk(branch.steps, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, &mut out);
        out
    }

    /// Calls `f` on every step, depth first, with where it is (`steps[0] (triage).then[1] (page)`),
    /// to change it in place.
    pub fn visit_steps_mut(&mut self, f: &mut impl FnMut(&str, &mut StepDef)) {
        fn walk(steps: &mut [StepDef], prefix: &str, f: &mut impl FnMut(&str, &mut StepDef)) {
            for (i, step) in steps.iter_mut().enumerate() {
                let at = format!("{prefix}[{i}] ({})", step.name);
                f(&at, step);
                walk(&mut step.then, &format!("{at}.then"), f);
                walk(&mut step.otherwise, &format!("{at}.else"), f);
                for (j, branch) in step.router.iter_mut().enumerate() {
                    let prefix = format!("{at}.router[{j}] ({}).steps", branch.name);
                    walk(&mut branch.steps, &prefix, f);
                }
                walk(&mut step.default, &format!("{at}.default"), f);
                walk(&mut step.on_timeout, &format!("{at}.on_timeout"), f);
                walk(&mut step.steps, &format!("{at}.steps"), f);
                walk(&mut step.catch, &format!("{at}.catch"), f);
            }
        }
        walk(&mut self.steps, "steps", f);
    }

    /// The step named `name`, at any depth.
    pub fn step(&self, name: &str) -> Option<&StepDef> {
        fn find<'a>(steps: &'a [StepDef], name: &str) -> Option<&'a StepDef> {
            steps.iter().find_map(|step| {
                if step.name == name {
                    return Some(step);
                }
                step.branches()
                    .into_iter()
                    .find_map(|branch| find(branch.steps, name))
            })
        }
        find(&self.steps, name)
    }

    /// Where step `name` is: the block it is in and its index there, after the same for each
    /// step around it (branch, loop, wait), outermost first.
    pub fn locate(&self, name: &str) -> Option<Vec<(&[StepDef], usize)>> {
        fn locate<'a>(
            steps: &'a [StepDef],
            name: &str,
            path: &mut Vec<(&'a [StepDef], usize)>,
        ) -> bool {
            for (i, step) in steps.iter().enumerate() {
                path.push((steps, i));
                if step.name == name
                    || step
                        .branches()
                        .into_iter()
                        .any(|branch| locate(branch.steps, name, path))
                {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        locate(&self.steps, name, &mut path).then_some(path)
    }

    /// Whether a template of the flow reads `run.resume_url` (so runs need it computed).
    pub fn uses_resume_url(&self) -> bool {
        fn mentions(value: &Value) -> bool {
            match value {
                Value::String(text) => text.contains("resume_url"),
                Value::Array(items) => items.iter().any(mentions),
                Value::Object(map) => map.values().any(mentions),
                _ => false,
            }
        }
        self.all_steps()
            .iter()
            .any(|s| s.input.values().any(mentions))
    }

    /// The loop step whose block step `name` is in, if any.
    pub fn enclosing_loop(&self, name: &str) -> Option<&StepDef> {
        let path = self.locate(name)?;
        path.iter()
            .rev()
            .skip(1)
            .map(|(block, index)| &block[*index])
            .find(|step| step.kind() == StepKind::Loop)
    }
}
/// Checks `debounce`, `debounce_key` and `debounce_max`.
fn check_debounce(definition: &FlowDefinition, issue: &mut impl FnMut(String, String)) {
    let bounds = Duration::from_secs(1)..=MAX_DEBOUNCE;
    let Some(debounce) = definition.debounce else {
        for (field, given) in [
            ("debounce_key", definition.debounce_key.is_some()),
            ("debounce_max", definition.debounce_max.is_some()),
        ] {
            if given {
                issue(field.into(), "is only used with `debounce`".into());
            }
        }
        return;
    };
    if !bounds.contains(&debounce) {
        issue(
            "debounce".into(),
            "must be at least 1s and at most 7 days".into(),
        );
    }
    if let Some(max) = definition.debounce_max
        && (max < debounce || max > MAX_DEBOUNCE)
    {
        issue(
            "debounce_max".into(),
            "must be at least `debounce` and at most 7 days".into(),
        );
    }
    let Some(key) = &definition.debounce_key else {
        return;
    };
    let key = Value::String(key.clone());
    if !template::is_template(&key) {
        issue(
            "debounce_key".into(),
            format!(
                "{key} is not a template: write what groups items, such as \"{{{{ trigger.body.ticket_id }}}}\""
            ),
        );
        return;
    }
    match template::analyze(&key) {
        Err(err) => issue("debounce_key".into(), err.message),
        Ok(refs) => {
            for variable in refs.iter().flat_map(|r| &r.variables) {
                let root = variable.split('.').next().unwrap_or_default();
                if root != "trigger" {
                    issue(
                        "debounce_key".into(),
                        format!("refers to `{root}`: a debounce key sees only `trigger`, the item"),
                    );
                }
            }
        }
    }
}

/// An immutable, validated version of a flow, with piece versions resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FlowVersion {
    pub flow_id: String,
    pub version: u32,
    pub definition: FlowDefinition,
    /// Exact piece version per step name, and for the trigger under the key `trigger`.
    pub resolved: BTreeMap<String, Version>,
    pub created_at: DateTime<Utc>,
}

impl FlowVersion {
    pub fn trigger_version(&self) -> Option<&Version> {
        self.resolved.get("trigger")
    }

    pub fn step_version(&self, step: &str) -> Option<&Version> {
        self.resolved.get(step)
    }
}

/// A definition that passed validation, with its resolved versions; the store numbers it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidFlow {
    pub definition: FlowDefinition,
    pub resolved: BTreeMap<String, Version>,
}

fn is_flow_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 100
}

fn is_header_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Checks a definition against the registry and resolves piece versions. Returns every
/// problem found, not just the first.
///
/// Asynchronous because a schedule trigger's input is checked by the trigger itself, which may
/// run in a piece process.
pub async fn validate(
    definition: FlowDefinition,
    registry: &Registry,
) -> Result<ValidFlow, FlowError> {
    let mut issues = Vec::new();
    let mut schedule_check = None;
    let mut issue = |path: String, message: String| issues.push(Issue { path, message });
    let mut resolved = BTreeMap::new();

    if definition.api_version != API_VERSION {
        issue(
            "apiVersion".into(),
            format!("must be {API_VERSION:?}, got {:?}", definition.api_version),
        );
    }
    if definition.kind != KIND {
        issue(
            "kind".into(),
            format!("must be {KIND:?}, got {:?}", definition.kind),
        );
    }
    if !is_flow_name(&definition.name) {
        issue(
            "name".into(),
            format!(
                "{:?} must be 1-100 lowercase letters, digits, '-' or '_'",
                definition.name
            ),
        );
    }

    // Trigger.
    let mut webhook = false;
    let trigger = &definition.trigger;
    let range = trigger.version.clone().unwrap_or(VersionReq::STAR);
    match resolve(registry, &trigger.piece, &range) {
        Err(message) => issue("trigger.piece".into(), message),
        Ok(piece) => {
            resolved.insert("trigger".to_owned(), piece.version().clone());
            match piece.trigger(&trigger.trigger) {
                None => issue(
                    "trigger.trigger".into(),
                    unknown(
                        "trigger",
                        &trigger.trigger,
                        &trigger.piece,
                        piece.triggers().map(|t| t.spec().name.as_str()),
                    ),
                ),
                Some(handle) => {
                    let spec = handle.spec();
                    if trigger.connection.is_some() && !piece.auth().is_required() {
                        issue(
                            "trigger.connection".into(),
                            format!(
                                "piece `{}` takes no connection: remove `connection`",
                                trigger.piece
                            ),
                        );
                    }
                    for err in check_props(&spec.props, &trigger.input, Check::Runtime) {
                        issue(format!("trigger.input.{}", err.prop), err.problem);
                    }
                    if spec.require_auth && trigger.connection.is_none() {
                        issue(
                            "trigger.connection".into(),
                            format!("trigger `{}` needs a connection", spec.name),
                        );
                    }
                    webhook = matches!(spec.kind, TriggerKind::Webhook);
                    if !webhook && (trigger.auth.is_some() || trigger.token_header.is_some()) {
                        issue(
                            "trigger.auth".into(),
                            "only webhook triggers take `auth` and `token_header`".into(),
                        );
                    }
                    if let Some(header) = &trigger.token_header {
                        if trigger.auth != Some(WebhookAuth::Token) {
                            issue(
                                "trigger.token_header".into(),
                                "is for `auth: token` only".into(),
                            );
                        } else if !is_header_name(header) {
                            issue(
                                "trigger.token_header".into(),
                                format!("{header:?} is not a lowercase HTTP header name"),
                            );
                        }
                    }
                    let polling = matches!(spec.kind, TriggerKind::Polling { .. });
                    match trigger.poll_interval {
                        Some(_) if !polling => issue(
                            "trigger.poll_interval".into(),
                            "only polling triggers take a poll_interval".into(),
                        ),
                        Some(interval) if interval < piecework_sdk::schedule::MIN_INTERVAL => {
                            issue("trigger.poll_interval".into(), "must be at least 1s".into())
                        }
                        _ => {}
                    }
                    if let TriggerHandle::Schedule(schedule) = handle {
                        schedule_check = Some(schedule.clone());
                    }
                }
            }
        }
    }
    if let Some(queue) = &trigger.queue
        && !is_queue_name(queue)
    {
        issue(
            "trigger.queue".into(),
            format!("{queue:?} must be lowercase letters, digits, '-' or '_'"),
        );
    }

    if let Some(schedule) = schedule_check
        && let Err(err) = schedule
            .schedule_json(Value::Object(trigger.input.clone()))
            .await
    {
        issues.push(Issue {
            path: "trigger.input".into(),
            message: err.to_string(),
        });
    }
    let mut issue = |path: String, message: String| issues.push(Issue { path, message });

    if let Some(max) = definition.max_concurrent_runs
        && !(1..=100_000).contains(&max)
    {
        issue(
            "max_concurrent_runs".into(),
            "must be between 1 and 100000".into(),
        );
    }
    if let Some(timeout) = definition.timeout
        && (timeout < Duration::from_secs(1) || timeout > MAX_WAIT)
    {
        issue(
            "timeout".into(),
            "must be at least 1s and at most 366 days".into(),
        );
    }
    check_debounce(&definition, &mut issue);

    // Steps.
    if definition.steps.is_empty() {
        issue("steps".into(), "a flow needs at least one step".into());
    }
    let count = definition.all_steps().len();
    if count > MAX_STEPS {
        issue(
            "steps".into(),
            format!(
                "a flow has at most {MAX_STEPS} steps (branches included), this one has {count}"
            ),
        );
    }
    let mut steps = StepChecker {
        registry,
        scope: Scope::of(&definition),
        seen: HashSet::new(),
        resolved: &mut resolved,
        issues: &mut issues,
        in_loop: false,
        in_parallel_loop: false,
    };
    steps.block(&definition.steps, "steps", &HashSet::new());
    if issues.is_empty() {
        let mut definition = definition;
        if webhook {
            definition.trigger.auth.get_or_insert(WebhookAuth::Hmac);
        }
        Ok(ValidFlow {
            definition,
            resolved,
        })
    } else {
        Err(FlowError::Invalid {
            flow: definition.name,
            issues,
        })
    }
}

/// Where each step sits, for reference checks: its depth-first position and the branch steps
/// around it (outermost first).
struct Scope<'d> {
    index: HashMap<&'d str, usize>,
    enclosing: HashMap<&'d str, Vec<&'d str>>,
    /// The loop steps.
    loops: HashSet<&'d str>,
}

impl<'d> Scope<'d> {
    fn of(definition: &'d FlowDefinition) -> Self {
        fn walk<'d>(steps: &'d [StepDef], around: &mut Vec<&'d str>, scope: &mut Scope<'d>) {
            for step in steps {
                let next = scope.index.len();
                scope.index.entry(&step.name).or_insert(next);
                scope
                    .enclosing
                    .entry(&step.name)
                    .or_insert_with(|| around.clone());
                if step.kind() == StepKind::Loop {
                    scope.loops.insert(&step.name);
                }
                around.push(&step.name);
                for branch in step.branches() {
                    walk(branch.steps, around, scope);
                }
                around.pop();
            }
        }
        let mut scope = Scope {
            index: HashMap::new(),
            enclosing: HashMap::new(),
            loops: HashSet::new(),
        };
        walk(&definition.steps, &mut Vec::new(), &mut scope);
        scope
    }

    /// Why `step` may not refer to `target`, which it cannot see.
    fn unreachable(&self, step: &str, target: &str) -> String {
        let around = |name: &str| self.enclosing.get(name).cloned().unwrap_or_default();
        if around(step).contains(&target) {
            return format!(
                "refers to step `{target}`, which this step is part of: its output is known only when it ends"
            );
        }
        match (self.index.get(step), self.index.get(target)) {
            (_, None) => format!("refers to step `{target}`, which does not exist"),
            (Some(here), Some(there)) if there > here => {
                format!("refers to step `{target}`, which runs after this step")
            }
            _ => {
                let mine = around(step);
                let outer = around(target)
                    .into_iter()
                    .find(|name| !mine.contains(name))
                    .unwrap_or(target);
                if self.loops.contains(outer) {
                    format!(
                        "refers to step `{target}`, inside the loop `{outer}`: refer to `steps.{outer}.output`, the list of each item's last output"
                    )
                } else {
                    format!(
                        "refers to step `{target}`, inside a branch of `{outer}` that may not have run: refer to `steps.{outer}.output` (the output of the branch that ran) or `steps.{outer}.branch`"
                    )
                }
            }
        }
    }
}

/// Checks the steps of a flow, block by block.
struct StepChecker<'d, 'r> {
    registry: &'r Registry,
    scope: Scope<'d>,
    /// Step names met so far, anywhere in the flow.
    seen: HashSet<&'d str>,
    resolved: &'r mut BTreeMap<String, Version>,
    issues: &'r mut Vec<Issue>,
    /// Whether the block being checked is a loop's, where `item` and `loop` are defined.
    in_loop: bool,
    /// Whether that loop runs items side by side (`parallelism` above 1).
    in_parallel_loop: bool,
}

impl<'d> StepChecker<'d, '_> {
    fn issue(&mut self, path: String, message: String) {
        self.issues.push(Issue { path, message });
    }

    /// Checks a block of steps at `prefix`, whose templates may refer to `visible` steps and
    /// to the block's earlier steps.
    fn block(&mut self, steps: &'d [StepDef], prefix: &str, visible: &HashSet<&'d str>) {
        let mut visible = visible.clone();
        for (i, step) in steps.iter().enumerate() {
            let at = format!("{prefix}[{i}] ({})", step.name);
            if !piecework_sdk::piece::is_identifier(&step.name) || step.name.len() > MAX_STEP_NAME {
                self.issue(
                    format!("{prefix}[{i}].name"),
                    format!(
                        "{:?} must be snake_case (a-z, 0-9, _), at most {MAX_STEP_NAME} characters",
                        step.name
                    ),
                );
            }
            if step.name == "trigger" {
                self.issue(
                    format!("{prefix}[{i}].name"),
                    "`trigger` is reserved".into(),
                );
            }
            if !self.seen.insert(&step.name) {
                self.issue(
                    format!("{prefix}[{i}].name"),
                    format!("step `{}` is defined twice", step.name),
                );
            }
            let kinds = [
                (
                    "`if`/`router`",
                    step.condition.is_some() || !step.router.is_empty(),
                ),
                (
                    "`delay`/`until`",
                    step.delay.is_some() || step.until.is_some(),
                ),
                ("`wait_for`", step.wait_for.is_some()),
                ("`for_each`", step.for_each.is_some()),
                ("`subflow`", step.subflow.is_some()),
            ];
            let given: Vec<&str> = kinds.iter().filter(|k| k.1).map(|k| k.0).collect();
            if given.len() > 1 {
                self.issue(
                    at.clone(),
                    format!(
                        "has {}: a step is an action, a branch, a delay or a wait, one at a time",
                        given.join(" and ")
                    ),
                );
            }
            let pauses = matches!(step.kind(), StepKind::Delay | StepKind::Wait)
                || (step.kind() == StepKind::Subflow && step.wait != Some(false));
            if self.in_parallel_loop && pauses {
                self.issue(
                    at.clone(),
                    "a loop with `parallelism` above 1 cannot pause its items (delays, waits, sub-flows that wait): run them one after another, or start the sub-flow with `wait: false`".into(),
                );
            }
            match step.kind() {
                StepKind::Action => self.action_step(step, &at, &visible),
                StepKind::Branch => self.branch_step(step, &at, &visible),
                StepKind::Delay => self.delay_step(step, &at, &visible),
                StepKind::Wait => self.wait_step(step, &at, &visible),
                StepKind::Loop => self.loop_step(step, &at, &visible),
                StepKind::Subflow => self.subflow_step(step, &at, &visible),
            }
            if step.wait.is_some() && step.kind() != StepKind::Subflow {
                self.issue(
                    format!("{at}.wait"),
                    "is for sub-flow steps (`subflow`)".into(),
                );
            }
            if step.kind() != StepKind::Loop {
                let loop_only = [
                    ("steps", !step.steps.is_empty()),
                    ("parallelism", step.parallelism.is_some()),
                    ("max_items", step.max_items.is_some()),
                ];
                for (field, present) in loop_only {
                    if present {
                        self.issue(
                            format!("{at}.{field}"),
                            "is for loop steps (`for_each`)".into(),
                        );
                    }
                }
            }
            match (step.on_failure, step.catch.is_empty()) {
                (OnFailure::Branch, true) => self.issue(
                    format!("{at}.catch"),
                    "`on_failure: branch` needs the `catch` steps to run when the step fails"
                        .into(),
                ),
                (OnFailure::Branch, false) => {
                    // The catch steps see the failed step (its `error`).
                    let mut seen = visible.clone();
                    seen.insert(&step.name);
                    self.block(&step.catch, &format!("{at}.catch"), &seen);
                }
                (_, false) => self.issue(
                    format!("{at}.catch"),
                    "goes with `on_failure: branch`".into(),
                ),
                (_, true) => {}
            }
            visible.insert(&step.name);
        }
    }

    /// Refuses the fields of action steps on a step that runs no piece (but `timeout` on a
    /// wait step), saying what the step does instead.
    fn no_action_fields(&mut self, step: &StepDef, at: &str, does: &str) {
        let action_only = [
            ("piece", !step.piece.is_empty()),
            ("version", step.version.is_some()),
            ("action", !step.action.is_empty()),
            ("connection", step.connection.is_some()),
            ("input", !step.input.is_empty()),
            ("retry", step.retry.is_some()),
            (
                "timeout",
                step.timeout.is_some() && step.kind() != StepKind::Wait,
            ),
            ("queue", step.queue.is_some()),
            ("max_response_bytes", step.max_response_bytes.is_some()),
            ("rate", step.rate.is_some()),
            ("rate_key", step.rate_key.is_some()),
            ("max_in_flight", step.max_in_flight.is_some()),
        ];
        for (field, present) in action_only {
            if present {
                self.issue(
                    format!("{at}.{field}"),
                    format!("is for action steps; a {does}"),
                );
            }
        }
        if step.kind() != StepKind::Wait && !step.on_timeout.is_empty() {
            self.issue(
                format!("{at}.on_timeout"),
                "is for wait steps (`wait_for`)".into(),
            );
        }
    }

    fn delay_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        self.no_action_fields(step, at, "delay step only pauses the run");
        self.no_branches(step, at);
        match (step.delay, &step.until) {
            (Some(_), Some(_)) => self.issue(
                format!("{at}.until"),
                "a delay step takes `delay` (a duration) or `until` (an instant), not both".into(),
            ),
            (Some(delay), None) if delay.is_zero() || delay > MAX_WAIT => self.issue(
                format!("{at}.delay"),
                "must be more than zero and at most 366 days".into(),
            ),
            (None, Some(until)) => {
                if !template::is_template(&Value::String(until.clone()))
                    && DateTime::parse_from_rfc3339(until).is_err()
                {
                    self.issue(
                        format!("{at}.until"),
                        format!(
                            "{until:?} is neither an RFC 3339 instant (2026-12-24T18:00:00Z) nor a template that renders to one"
                        ),
                    );
                }
                let templates = Value::Object(Map::from_iter([(
                    "until".to_owned(),
                    Value::String(until.clone()),
                )]));
                self.references(step, &templates, "input.", at, visible);
            }
            _ => {}
        }
    }

    fn wait_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        self.no_action_fields(
            step,
            at,
            "wait step only pauses the run until it is resumed",
        );
        match step.timeout {
            Some(t) if t.is_zero() || t > MAX_WAIT => self.issue(
                format!("{at}.timeout"),
                "must be more than zero and at most 366 days".into(),
            ),
            None if !step.on_timeout.is_empty() => self.issue(
                format!("{at}.on_timeout"),
                "needs a `timeout`: without one the step waits until it is resumed or cancelled"
                    .into(),
            ),
            _ => {}
        }
        if !step.then.is_empty() || !step.otherwise.is_empty() || !step.default.is_empty() {
            self.issue(
                format!("{at}.then"),
                "a wait step's only branch is `on_timeout`".into(),
            );
        }
        self.block(&step.on_timeout, &format!("{at}.on_timeout"), visible);
    }

    fn loop_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        self.no_action_fields(step, at, "loop step only runs its `steps` for each item");
        self.no_branches(step, at);
        let list = step.for_each.clone().unwrap_or_default();
        if !template::is_template(&Value::String(list.clone())) {
            self.issue(
                format!("{at}.for_each"),
                format!(
                    "{list:?} is not a template: write the list to loop over, such as \"{{{{ trigger.body.items }}}}\""
                ),
            );
        }
        let templates = Value::Object(Map::from_iter([(
            "for_each".to_owned(),
            Value::String(list),
        )]));
        self.references(step, &templates, "input.", at, visible);
        if step.steps.is_empty() {
            self.issue(
                format!("{at}.steps"),
                "a loop needs steps to run for each item".into(),
            );
        }
        if let Some(parallelism) = step.parallelism
            && !(1..=MAX_PARALLELISM).contains(&parallelism)
        {
            self.issue(
                format!("{at}.parallelism"),
                format!("must be between 1 and {MAX_PARALLELISM}"),
            );
        }
        if let Some(max) = step.max_items
            && !(1..=MAX_ITEMS).contains(&max)
        {
            self.issue(
                format!("{at}.max_items"),
                format!("must be between 1 and {MAX_ITEMS}"),
            );
        }
        if self.in_loop {
            self.issue(
                format!("{at}.for_each"),
                "a loop inside a loop is not supported: move the inner loop into a sub-flow, or flatten the list".into(),
            );
            return;
        }
        self.in_loop = true;
        self.in_parallel_loop = step.parallelism.is_some_and(|p| p > 1);
        self.block(&step.steps, &format!("{at}.steps"), visible);
        self.in_loop = false;
        self.in_parallel_loop = false;
    }

    fn subflow_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        let action_only = [
            ("piece", !step.piece.is_empty()),
            ("version", step.version.is_some()),
            ("action", !step.action.is_empty()),
            ("connection", step.connection.is_some()),
            ("retry", step.retry.is_some()),
            ("max_response_bytes", step.max_response_bytes.is_some()),
            ("rate", step.rate.is_some()),
            ("max_in_flight", step.max_in_flight.is_some()),
        ];
        for (field, present) in action_only {
            if present {
                self.issue(
                    format!("{at}.{field}"),
                    "is for action steps; a sub-flow step starts a run of another flow".into(),
                );
            }
        }
        self.no_branches(step, at);
        let name = step.subflow.as_deref().unwrap_or_default();
        if !is_flow_name(name) {
            self.issue(
                format!("{at}.subflow"),
                format!("{name:?} is not a flow name (lowercase letters, digits, '-' or '_')"),
            );
        }
        match step.timeout {
            Some(t) if t.is_zero() || t > MAX_WAIT => self.issue(
                format!("{at}.timeout"),
                "must be more than zero and at most 366 days".into(),
            ),
            Some(_) if step.wait == Some(false) => self.issue(
                format!("{at}.timeout"),
                "is how long the step waits for the run: it needs `wait` (the default)".into(),
            ),
            _ => {}
        }
        if let Some(queue) = &step.queue
            && !is_queue_name(queue)
        {
            self.issue(
                format!("{at}.queue"),
                format!("{queue:?} must be lowercase letters, digits, '-' or '_'"),
            );
        }
        let input = Value::Object(step.input.clone());
        self.references(step, &input, "", at, visible);
    }

    /// Refuses branches on a step that has none.
    fn no_branches(&mut self, step: &StepDef, at: &str) {
        if !step.then.is_empty() || !step.otherwise.is_empty() {
            self.issue(
                format!("{at}.then"),
                "`then` and `else` need an `if`".into(),
            );
        }
        if !step.default.is_empty() {
            self.issue(format!("{at}.default"), "`default` needs a `router`".into());
        }
    }

    fn branch_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        self.no_action_fields(step, at, "branch step only chooses which steps run");
        let mut conditions = Map::new();
        if let Some(condition) = &step.condition {
            if !step.router.is_empty() || !step.default.is_empty() {
                self.issue(
                    format!("{at}.router"),
                    "a step has either `if` (with `then`/`else`) or `router` (with `default`), not both".into(),
                );
            }
            if step.then.is_empty() && step.otherwise.is_empty() {
                self.issue(
                    format!("{at}.then"),
                    "an `if` step needs steps in `then`, `else` or both".into(),
                );
            }
            conditions.insert("if".to_owned(), Value::String(condition.clone()));
        } else {
            if !step.then.is_empty() || !step.otherwise.is_empty() {
                self.issue(
                    format!("{at}.then"),
                    "`then` and `else` go with `if`, not `router` (whose fallback is `default`)"
                        .into(),
                );
            }
            let mut names = HashSet::new();
            for (j, branch) in step.router.iter().enumerate() {
                let name_ok = piecework_sdk::piece::is_identifier(&branch.name)
                    && branch.name.len() <= MAX_STEP_NAME
                    && branch.name != DEFAULT_BRANCH;
                if !name_ok {
                    self.issue(
                        format!("{at}.router[{j}].name"),
                        format!(
                            "{:?} must be snake_case (a-z, 0-9, _), at most {MAX_STEP_NAME} characters, and not `{DEFAULT_BRANCH}`",
                            branch.name
                        ),
                    );
                }
                if !names.insert(branch.name.as_str()) {
                    self.issue(
                        format!("{at}.router[{j}].name"),
                        format!("branch `{}` is defined twice", branch.name),
                    );
                }
                conditions.insert(
                    format!("router[{j}].when"),
                    Value::String(branch.when.clone()),
                );
            }
        }
        for (path, condition) in &conditions {
            if !template::is_template(condition) {
                self.issue(
                    format!("{at}.{path}"),
                    format!(
                        "{condition} is not a template: write a condition such as \"{{{{ trigger.body.priority == 'critical' }}}}\""
                    ),
                );
            }
        }
        self.references(step, &Value::Object(conditions), "input.", at, visible);
        let locations: Vec<String> = if step.condition.is_some() {
            vec![format!("{at}.then"), format!("{at}.else")]
        } else {
            let named = step
                .router
                .iter()
                .enumerate()
                .map(|(j, b)| format!("{at}.router[{j}] ({}).steps", b.name));
            named
                .chain(std::iter::once(format!("{at}.default")))
                .collect()
        };
        for (branch, location) in step.branches().into_iter().zip(locations) {
            self.block(branch.steps, &location, visible);
        }
    }

    fn action_step(&mut self, step: &'d StepDef, at: &str, visible: &HashSet<&'d str>) {
        self.no_branches(step, at);
        if !step.on_timeout.is_empty() {
            self.issue(
                format!("{at}.on_timeout"),
                "is for wait steps (`wait_for`)".into(),
            );
        }
        if step.piece.is_empty() || step.action.is_empty() {
            self.issue(
                at.to_owned(),
                "an action step needs `piece` and `action` (other steps: `if`/`router`, `delay`/`until` or `wait_for`)"
                    .into(),
            );
        } else {
            self.piece_and_action(step, at);
        }
        let input = Value::Object(step.input.clone());
        self.references(step, &input, "", at, visible);
        if let Some(policy) = &step.retry
            && let Err(message) = policy.validate()
        {
            self.issue(format!("{at}.retry"), message);
        }
        match step.timeout {
            Some(t) if t.is_zero() => {
                self.issue(format!("{at}.timeout"), "must be greater than zero".into());
            }
            Some(t) if t > MAX_STEP_TIMEOUT => {
                self.issue(format!("{at}.timeout"), "must be at most 24h".into());
            }
            _ => {}
        }
        if let Some(max) = step.max_response_bytes
            && !(1..=MAX_RESPONSE_BYTES).contains(&max)
        {
            self.issue(
                format!("{at}.max_response_bytes"),
                format!("must be between 1 and {MAX_RESPONSE_BYTES} (1 GiB)"),
            );
        }
        if let Some(queue) = &step.queue
            && !is_queue_name(queue)
        {
            self.issue(
                format!("{at}.queue"),
                format!("{queue:?} must be lowercase letters, digits, '-' or '_'"),
            );
        }
        if let Some(max) = step.max_in_flight
            && !(1..=100_000).contains(&max)
        {
            self.issue(
                format!("{at}.max_in_flight"),
                "must be between 1 and 100000".into(),
            );
        }
        if let Some(key) = &step.rate_key {
            if step.rate.is_none() && step.max_in_flight.is_none() {
                self.issue(
                    format!("{at}.rate_key"),
                    "goes with `rate` or `max_in_flight`".into(),
                );
            } else if !is_queue_name(key) {
                self.issue(
                    format!("{at}.rate_key"),
                    format!("{key:?} must be lowercase letters, digits, '-' or '_'"),
                );
            }
        }
    }

    /// Resolves the step's piece and checks its action, connection and input.
    fn piece_and_action(&mut self, step: &StepDef, at: &str) {
        let range = step.version.clone().unwrap_or(VersionReq::STAR);
        let piece = match resolve(self.registry, &step.piece, &range) {
            Err(message) => return self.issue(format!("{at}.piece"), message),
            Ok(piece) => piece,
        };
        self.resolved
            .insert(step.name.clone(), piece.version().clone());
        if step.connection.is_some() && !piece.auth().is_required() {
            self.issue(
                format!("{at}.connection"),
                format!(
                    "piece `{}` takes no connection: remove `connection`",
                    step.piece
                ),
            );
        }
        let Some(action) = piece.action(&step.action) else {
            let message = unknown(
                "action",
                &step.action,
                &step.piece,
                piece.actions().map(|a| a.spec().name.as_str()),
            );
            return self.issue(format!("{at}.action"), message);
        };
        let spec = action.spec();
        let check = Check::Static {
            deferred: template::is_template,
        };
        for err in check_props(&spec.props, &step.input, check) {
            self.issue(format!("{at}.input.{}", err.prop), err.problem);
        }
        if spec.require_auth && step.connection.is_none() {
            self.issue(
                format!("{at}.connection"),
                format!("action `{}` needs a connection", spec.name),
            );
        }
    }

    /// Checks the templates in `templates` (the step's input, or a branch step's conditions,
    /// whose paths lose the leading `strip`): they parse, and read only roots that exist and
    /// steps the step can see.
    fn references(
        &mut self,
        step: &StepDef,
        templates: &Value,
        strip: &str,
        at: &str,
        visible: &HashSet<&'d str>,
    ) {
        let located = |path: &str| format!("{at}.{}", path.strip_prefix(strip).unwrap_or(path));
        let refs = match template::analyze(templates) {
            Ok(refs) => refs,
            Err(err) => {
                return self.issue(
                    located(&err.path),
                    format!("template error: {}", err.message),
                );
            }
        };
        for template_ref in refs {
            for variable in &template_ref.variables {
                let mut parts = variable.split('.');
                let root = parts.next().unwrap_or_default();
                if self.in_loop && LOOP_ROOTS.contains(&root) {
                    continue;
                }
                if LOOP_ROOTS.contains(&root) {
                    self.issue(
                        located(&template_ref.path),
                        format!("`{root}` is defined only in the steps of a `for_each` loop"),
                    );
                    continue;
                }
                if !ROOTS.contains(&root) {
                    self.issue(
                        located(&template_ref.path),
                        format!(
                            "unknown variable `{root}` (templates can use {})",
                            ROOTS.join(", ")
                        ),
                    );
                    continue;
                }
                if root != "steps" {
                    continue;
                }
                let Some(target) = parts.next() else { continue };
                if target == step.name {
                    self.issue(
                        located(&template_ref.path),
                        format!("step `{target}` cannot refer to its own output"),
                    );
                } else if !visible.contains(target) {
                    let why = self.scope.unreachable(&step.name, target);
                    self.issue(located(&template_ref.path), why);
                }
            }
        }
    }
}

fn resolve<'r>(
    registry: &'r Registry,
    name: &str,
    range: &VersionReq,
) -> Result<&'r piecework_sdk::Piece, String> {
    if !registry.contains(name) {
        let known: Vec<&str> = registry.names().collect();
        return Err(format!(
            "unknown piece `{name}` (registered: {})",
            known.join(", ")
        ));
    }
    registry.resolve(name, range).ok_or_else(|| {
        let versions: Vec<String> = registry
            .versions(name)
            .iter()
            .map(ToString::to_string)
            .collect();
        format!(
            "no registered version of `{name}` matches {range} (registered: {})",
            versions.join(", ")
        )
    })
}

fn unknown<'a>(
    what: &str,
    name: &str,
    piece: &str,
    known: impl Iterator<Item = &'a str>,
) -> String {
    let known: Vec<&str> = known.collect();
    format!(
        "piece `{piece}` has no {what} `{name}` (it has: {})",
        known.join(", ")
    )
}

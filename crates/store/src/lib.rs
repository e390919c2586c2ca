//! The state store: flows and their versions, runs, trigger cursors, the piece key-value
//! store, and the two event streams (`pw:results`, one entry per step attempt; `pw:audit`, one
//! per audited operation).
//!
//! [`Store`] is the contract; it is shaped for Redis, the production adapter (one pipelined
//! round trip per step update, streams with a capped length, blocking reads instead of
//! polling). [`memory::MemoryStore`] implements it in-process for `piecework dev` and tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use piecework_core::run::InFlight;
use piecework_core::{FlowVersion, Run, RunStatus, RunSummary, StepState, ValidFlow};
use piecework_proto::v1::{AuditEvent, StepResult};
use piecework_sdk::{KvStore, PollState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long a finished run is kept unless configured otherwise.
pub const DEFAULT_RUN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

pub mod audit;
mod connection;
mod group_commit;
pub mod memory;
pub mod redis;
mod run_done;

/// A run status as Redis answers `HGET pw:run:{id} status`.
fn run_status_of(value: &::redis::Value) -> Result<RunStatus, StoreError> {
    let text: Option<String> = ::redis::from_redis_value_ref(value).map_err(|e| {
        StoreError::Unavailable(format!("redis: unexpected answer for a run's status: {e}"))
    })?;
    let text = text.ok_or_else(|| StoreError::Conflict("the run does not exist".into()))?;
    text.parse::<RunStatus>().map_err(|e| StoreError::Corrupt {
        key: "pw:run:*".into(),
        message: e,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is not reachable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt at {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Conflict(String),
}

/// A flow's current state; its definitions live in its versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FlowRecord {
    pub id: String,
    pub latest_version: u32,
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What applying a flow did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub record: FlowRecord,
    pub version: u32,
    /// False when the definition equals the latest version's: applying is idempotent.
    pub created: bool,
}

/// Filters for listing runs, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    pub flow_id: Option<String>,
    pub status: Option<RunStatus>,
    /// Created at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Created before this.
    pub until: Option<DateTime<Utc>>,
    /// What started them: the kind before the `:` of `started_by` — `webhook`, `schedule`
    /// (polls and ticks), `api` (by hand), `flow` (a sub-flow step).
    pub started_by: Option<String>,
    /// Only the runs after this one in the listing's order (newest first): the last row of
    /// the page before.
    pub after: Option<RunCursor>,
    /// At most this many (at least one); ignored by counts.
    pub limit: usize,
}

impl RunQuery {
    /// Whether a run that started with `started_by` passes the `started_by` filter.
    pub fn started_by_matches(&self, started_by: &str) -> bool {
        self.started_by
            .as_deref()
            .is_none_or(|kind| started_by.split_once(':').map_or(started_by, |(k, _)| k) == kind)
    }
}

/// A place in the listing of runs (newest first, ties by id descending), as the API's opaque
/// `next` token: `<created ms>.<run id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    pub created_ms: i64,
    pub id: String,
}

impl RunCursor {
    /// The cursor just after `run`.
    pub fn after(run: &RunSummary) -> Self {
        Self {
            created_ms: run.created_at.timestamp_millis(),
            id: run.id.clone(),
        }
    }

    /// Whether a run created at `created_ms` with id `id` comes after this cursor.
    pub fn precedes(&self, created_ms: i64, id: &str) -> bool {
        created_ms < self.created_ms || (created_ms == self.created_ms && id < self.id.as_str())
    }
}

impl std::fmt::Display for RunCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_ms, self.id)
    }
}

impl std::str::FromStr for RunCursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a cursor of this listing (use `next` as given)");
        let (ms, id) = text.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            created_ms: ms.parse().map_err(|_| bad())?,
            id: id.to_owned(),
        })
    }
}

/// How many runs are in each status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunStats {
    pub counts: std::collections::BTreeMap<String, u64>,
    pub total: u64,
}

impl RunStats {
    pub fn add(&mut self, status: RunStatus) {
        *self.counts.entry(status.as_str().to_owned()).or_default() += 1;
        self.total += 1;
    }
}

/// How a run ended, as a caller waiting for it needs it: carried by the run-finished
/// notification itself, so answering a synchronous webhook takes no read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunEnded {
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The flow's response: the output of an action that declares `webhook_response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// The last recorded step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

impl RunEnded {
    /// How `run` ended, when it has.
    pub fn of(run: &Run) -> Option<Self> {
        run.status.is_terminal().then(|| Self {
            status: run.status,
            error: run.error.clone(),
            response: run.response.clone(),
            output: run.steps.last().and_then(|s| s.output.clone()),
        })
    }
}

/// Interest in one run's end, registered before the run is created (or can finish), so the
/// end cannot be missed and no read is needed to learn of it.
#[async_trait]
pub trait RunWatch: Send {
    /// How the run ended, or `None` if it has not within `timeout`.
    async fn ended(self: Box<Self>, timeout: Duration) -> Result<Option<RunEnded>, StoreError>;
}

/// What [`Store::create_admitted_run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The run was created (and the audit entry written).
    Created,
    /// A run with its id exists already: nothing was written.
    Exists,
    /// The flow is no longer enabled at the run's version (disabled, re-applied, deleted):
    /// nothing was written; admit the call again from the flow's current record.
    Stale,
}

/// A change to a run that ends or alters it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunUpdate {
    pub status: RunStatus,
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Everything one step attempt changes, written in one round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct StepUpdate {
    pub run_id: String,
    pub step: StepState,
    /// The branch steps whose branch this attempt ended, with its output as theirs.
    pub closed: Vec<StepState>,
    /// The entry for `pw:results`.
    pub result: StepResult,
    /// The entry for `pw:audit` (the step execution), written in the same round trip.
    pub audit: Option<AuditEvent>,
    /// Set when the attempt produced the flow's webhook response.
    pub response: Option<Value>,
    /// Set when the attempt ended the run; ignored if the run is no longer running (it was
    /// cancelled meanwhile).
    pub run: Option<RunUpdate>,
    /// Set when the attempt started a delay or wait: the run waits (unless it is no longer
    /// running), with a timer when the step has one.
    pub pause: Option<Pause>,
    /// A timer to set (or bring forward) with this write: the sub-flow step waiting on a run
    /// this attempt ended.
    pub wake: Option<Timer>,
    /// The attempt was marked in flight ([`Store::mark_in_flight`]): clear the mark.
    pub unmark: bool,
}

/// A run starting to wait on a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    /// When the run is woken, if it is not resumed first.
    pub timer: Option<Timer>,
}

/// When a waiting run's step is to be woken, or (with an empty `step`) when a run that has
/// not ended is failed as timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub run_id: String,
    pub flow_id: String,
    pub flow_version: u32,
    pub step: String,
    pub due: DateTime<Utc>,
}

/// A step job the store holds until the bus has it (the outbox): written with the state
/// change that calls for it — a run's creation, its retry — so that change is never recorded
/// without its job eventually going out. Whoever publishes it takes it out
/// ([`Store::outbox_sent`]); a relay publishes those left behind ([`Store::outbox`]), and the
/// job's message id keeps a second publish single.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxJob {
    pub run_id: String,
    pub flow_id: String,
    pub flow_version: u32,
    /// The step's recorded name (`double[3]` in a loop).
    pub step: String,
    /// The retry epoch the job carries.
    pub epoch: u32,
}

/// Whether a flow is enabled after a definition is applied to it: a new flow unless the
/// definition says `enabled: false`; an existing one as an operator left it, unless a
/// changed definition says otherwise explicitly.
pub(crate) fn enabled_after_apply(
    record: Option<&FlowRecord>,
    definition: &piecework_core::FlowDefinition,
    unchanged: bool,
) -> bool {
    match (record, definition.enabled) {
        (None, explicit) => explicit.unwrap_or(true),
        (Some(_), Some(explicit)) if !unchanged => explicit,
        (Some(record), _) => record.enabled,
    }
}

/// The `step` of a timer that starts a debounced group's run (its `run_id` is the group's
/// slot, its `flow_version` 0).
pub const DEBOUNCE_STEP: &str = "#debounce";

/// A trigger item a flow's `debounce` holds back, as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub flow_id: String,
    /// The group: one pending run per flow and debounce key.
    pub slot: String,
    /// The item's own id (a polled item's), so the same item held twice changes nothing.
    pub item_id: Option<String>,
    pub item: Value,
    /// What the run is started with when the group is due.
    pub meta: HeldMeta,
    /// The group's run starts this long after its last item …
    pub period: Duration,
    /// … but no later than this long after its first.
    pub max: Duration,
    /// When it arrived (the caller's clock).
    pub now: DateTime<Utc>,
}

/// What a debounced group's run is started with, besides its item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeldMeta {
    /// The flow version the last item came to.
    pub flow_version: u32,
    /// The debounce key's value.
    pub key: String,
    /// `webhook`, `polling` or `schedule`.
    pub trigger: String,
    pub started_by: piecework_sdk::Principal,
}

/// A debounced group waiting for its run.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The last item.
    pub item: Value,
    pub meta: HeldMeta,
    /// How many items the group took (each new item bumps it).
    pub seq: u64,
    pub first: DateTime<Utc>,
    pub due: DateTime<Utc>,
}

/// A stored connection. `secret` is the sealed value, opaque to the store: only the worker
/// (and the API, to validate) hold the key to open it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConnectionRecord {
    pub name: String,
    pub piece: String,
    /// Id of the key that sealed it, to find connections a key rotation must re-save.
    pub key_id: String,
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A named API key. Only the keyed hash of its secret is stored; the key itself is shown
/// once, when it is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiKeyRecord {
    pub name: String,
    pub role: piecework_core::access::Role,
    /// HMAC-SHA256 of the secret (hex), keyed by a key derived from the encryption key `key_id`.
    pub hash: String,
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    /// The audit actor that created it.
    pub created_by: String,
}

/// An entry read back from a stream, with its stream id.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    pub id: String,
    pub event: T,
}

/// The state store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a validated flow as a new version unless it equals the latest one, and sets
    /// `enabled` from the definition. Never touches the flow's trigger cursor.
    async fn apply_flow(&self, flow: ValidFlow) -> Result<Applied, StoreError>;
    async fn get_flow(&self, id: &str) -> Result<Option<FlowRecord>, StoreError>;
    /// A number that changes whenever a flow is applied, enabled or disabled: readers of the
    /// whole flow list (the scheduler) reload it only when this moved.
    async fn flows_revision(&self) -> Result<u64, StoreError>;
    async fn list_flows(&self) -> Result<Vec<FlowRecord>, StoreError>;
    async fn get_flow_version(
        &self,
        id: &str,
        version: u32,
    ) -> Result<Option<FlowVersion>, StoreError>;
    /// Returns the updated record, or `None` for an unknown flow.
    async fn set_flow_enabled(
        &self,
        id: &str,
        enabled: bool,
    ) -> Result<Option<FlowRecord>, StoreError>;

    /// Creates a run unless one with its id exists; returns whether it was created. This is
    /// what makes deterministic run ids deduplicate redelivered poll jobs.
    async fn create_run(&self, run: &Run) -> Result<bool, StoreError> {
        self.create_run_queued(run, &[]).await
    }
    /// [`Store::create_run`], putting `jobs` (its first step's) in the outbox in the same
    /// write: a created run's jobs are never lost to a publisher that dies or a bus that is
    /// away. Nothing is queued for a run that existed.
    async fn create_run_queued(&self, run: &Run, jobs: &[OutboxJob]) -> Result<bool, StoreError>;
    /// Creates a webhook's run in one round trip: only while its flow is still enabled at the
    /// run's version (the caller may have admitted the call on a cached record), with the
    /// call's audit entry, if given, and `jobs` in the outbox.
    async fn create_admitted_run(
        &self,
        run: &Run,
        audit: Option<&AuditEvent>,
        jobs: &[OutboxJob],
    ) -> Result<Admission, StoreError>;
    /// Jobs put in the outbox before `before` that are still there — their publisher died,
    /// or could not reach the bus — oldest first, at most `limit`.
    async fn outbox(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxJob>, StoreError>;
    /// Takes published jobs out of the outbox.
    async fn outbox_sent(&self, jobs: &[OutboxJob]) -> Result<(), StoreError>;
    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError>;
    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<RunSummary>, StoreError>;
    /// How many runs `query` finds (all pages) in each status; its `status`, `after` and
    /// `limit` are ignored.
    async fn run_stats(&self, query: &RunQuery) -> Result<RunStats, StoreError>;
    /// Records a step attempt (and the run's end, if it ended it); returns the run's status
    /// after the write — `cancelled` tells a worker running steps inline to stop.
    async fn record_step(&self, update: StepUpdate) -> Result<RunStatus, StoreError>;
    /// Ends or alters a run outside a step (cancel, a flow version that vanished).
    async fn update_run(&self, run_id: &str, update: RunUpdate) -> Result<(), StoreError>;
    /// Cancels a running run: `None` if there is no such run, `Some(false)` if it was not
    /// running. Steps already executing finish; nothing after them runs.
    async fn cancel_run(&self, run_id: &str, at: DateTime<Utc>)
    -> Result<Option<bool>, StoreError>;
    /// Sets a failed run running again with `step` (its failed step, marked `retrying`) to be
    /// executed anew: `None` if there is no such run, `Some(false)` if it was not failed.
    /// `jobs` (the retried step's and lanes') go in the outbox in the same write.
    async fn resume_run(
        &self,
        run_id: &str,
        step: &StepState,
        jobs: &[OutboxJob],
    ) -> Result<Option<bool>, StoreError>;
    /// Wakes a run waiting on `timer.step` (its timer came due): the run is running again
    /// and the timer is gone. `true` to the one caller that may go on with the run:
    /// the run was waiting, or a wake of this step was claimed before but its step not yet
    /// recorded (a worker died between the two). `false` when the run was resumed, cancelled
    /// or woken and recorded by someone else.
    async fn claim_wake(&self, timer: &Timer) -> Result<bool, StoreError>;
    /// Fails the run of deadline timer `timer` (its `step` is empty) with `error` if it has
    /// not ended, and drops the timer: `true` if it ended it.
    async fn expire_run(&self, timer: &Timer, error: &str) -> Result<bool, StoreError>;
    /// Forgets a timer whose run no longer waits on it (cancelled meanwhile).
    async fn drop_timer(&self, timer: &Timer) -> Result<(), StoreError>;
    /// Resumes a run waiting on `timer.step` by hand: records `step` (done, with the resume's
    /// payload), its `pw:results` entry, and the run as running again, and drops the timer,
    /// only if the run is waiting on that step. `None` if there is no such run, `Some(false)` if it was not
    /// waiting on it.
    async fn resume_waiting(
        &self,
        timer: &Timer,
        step: &StepState,
        result: &StepResult,
    ) -> Result<Option<bool>, StoreError>;
    /// Timers due at `now`, at most `limit`, earliest first. Each is pushed back by
    /// `again_after` rather than removed: it fires again unless the wake it causes is
    /// recorded first (which removes it), so a lost wake-up is retried, and schedulers taking
    /// timers at the same moment do not take the same ones.
    async fn take_due_timers(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        again_after: Duration,
    ) -> Result<Vec<Timer>, StoreError>;
    /// Takes one of the `max` run slots of flow `flow_id` for run `run_id` (kept if it holds
    /// one already), counting only runs still running or waiting — a slot frees itself when
    /// its run ends. `false` when all are taken.
    async fn acquire_run_slot(
        &self,
        flow_id: &str,
        run_id: &str,
        max: u32,
    ) -> Result<bool, StoreError>;
    /// Holds `held` as the last item of its debounce group (creating the group with its
    /// first item) and sets the group's timer ([`DEBOUNCE_STEP`]) to when its run starts:
    /// `period` after this item, at most `max` after the first; returns that time. An item
    /// whose `item_id` is the group's last changes nothing.
    async fn hold_item(&self, held: &Held) -> Result<DateTime<Utc>, StoreError>;
    /// The group `slot` of `flow_id`, if it holds an item.
    async fn pending_item(&self, flow_id: &str, slot: &str) -> Result<Option<Pending>, StoreError>;
    /// Ends group `slot` once its run started with its item `seq`, with its timer; a group
    /// that took another item meanwhile is kept (its timer fires again).
    async fn release_item(&self, flow_id: &str, slot: &str, seq: u64) -> Result<(), StoreError>;
    /// Marks an attempt of a step of run `run_id` as in flight (until its attempt is
    /// recorded, which clears the mark); nothing for a run that no longer exists.
    async fn mark_in_flight(&self, run_id: &str, marker: &InFlight) -> Result<(), StoreError>;
    /// Counts the end of lane `lane` of `around`, a loop of run `run_id` running its items in
    /// `lanes` lanes; `true` once every lane has ended (again `true` for a lane counted
    /// twice then). `false` for a run that no longer exists.
    async fn join_lane(
        &self,
        run_id: &str,
        around: &str,
        lane: u32,
        lanes: u32,
    ) -> Result<bool, StoreError>;
    /// Takes one of the `max` in-flight places of limit `key` for `holder` (kept if it holds
    /// one already) until `lease` passes — places of holders that never released them lapse
    /// then. `false` when all are taken.
    async fn acquire_in_flight(
        &self,
        key: &str,
        holder: &str,
        max: u32,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Gives back `holder`'s in-flight place of limit `key`.
    async fn release_in_flight(&self, key: &str, holder: &str) -> Result<(), StoreError>;
    /// Reserves the next start under the rate limit `key`, whose starts are spaced `interval`
    /// apart across every caller of every process: returns how long this caller waits before
    /// its start. The limit's clock is the store's, so callers' clocks need not agree.
    async fn reserve_rate(&self, key: &str, interval: Duration) -> Result<Duration, StoreError>;
    /// When the earliest timer is due, if there is any.
    async fn next_timer(&self) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// A signal that moves whenever a timer is added, for schedulers sleeping until the next
    /// one. Best effort: callers also look every so often.
    async fn watch_timers(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError>;
    /// Watches for the end of run `run_id`, which may not exist yet: register first, then
    /// create the run, then await [`RunWatch::ended`].
    async fn watch_run(&self, run_id: &str) -> Result<Box<dyn RunWatch>, StoreError>;

    /// Waits until the run is finished, up to `timeout`; returns its state then (finished or
    /// not), or `None` if there is no such run.
    async fn wait_run_finished(
        &self,
        run_id: &str,
        timeout: Duration,
    ) -> Result<Option<Run>, StoreError>;

    async fn trigger_state(&self, flow_id: &str) -> Result<Option<PollState>, StoreError>;
    async fn put_trigger_state(&self, flow_id: &str, state: &PollState) -> Result<(), StoreError>;

    /// Takes the lease `name` for `holder` unless another holder has it; it lapses after `ttl`
    /// if never released (its holder died). Returns whether it was taken.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Gives the lease back if `holder` still has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Creates or replaces a connection.
    async fn put_connection(&self, connection: &ConnectionRecord) -> Result<(), StoreError>;
    async fn get_connection(&self, name: &str) -> Result<Option<ConnectionRecord>, StoreError>;
    /// Every connection, by name.
    async fn list_connections(&self) -> Result<Vec<ConnectionRecord>, StoreError>;
    /// Returns whether it existed.
    async fn delete_connection(&self, name: &str) -> Result<bool, StoreError>;
    /// Records that connection `name` was used at `at` (kept when later than what is there).
    async fn touch_connection(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// When each connection was last used, by name (never-used ones are absent).
    async fn connections_used(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError>;

    /// Replaces a connection by `resealed` unless its sealed values are no longer those of
    /// `current` (someone saved it meanwhile): how key rotation writes without losing a
    /// concurrent save. Returns whether it was replaced.
    async fn reseal_connection(
        &self,
        current: &ConnectionRecord,
        resealed: &ConnectionRecord,
    ) -> Result<bool, StoreError>;

    /// Stores a webhook flow's sealed secret unless it has one (`replace`: always); returns
    /// whether it was written.
    async fn put_webhook_secret(
        &self,
        flow_id: &str,
        sealed: &str,
        replace: bool,
    ) -> Result<bool, StoreError>;
    async fn get_webhook_secret(&self, flow_id: &str) -> Result<Option<String>, StoreError>;
    /// Replaces a webhook flow's sealed secret by `resealed` unless it is no longer `current`.
    async fn reseal_webhook_secret(
        &self,
        flow_id: &str,
        current: &str,
        resealed: &str,
    ) -> Result<bool, StoreError>;

    /// Stores a new API key; `false` (and nothing changed) when the name is taken.
    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<bool, StoreError>;
    async fn get_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every API key, by name.
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Returns whether it existed.
    async fn delete_api_key(&self, name: &str) -> Result<bool, StoreError>;
    /// Replaces an API key's record by `rehashed` (its hash under another encryption key)
    /// unless the stored hash is no longer `current`'s (revoked, or re-created meanwhile).
    async fn rehash_api_key(
        &self,
        current: &ApiKeyRecord,
        rehashed: &ApiKeyRecord,
    ) -> Result<bool, StoreError>;

    /// The key-value store behind pieces' `ctx.store`.
    fn kv(&self) -> Arc<dyn KvStore>;

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;
    /// Reads `pw:results` after `after` (from the start if `None`; `"$"` with a `block` means
    /// only entries appended from now on), waiting up to `block` for new entries when there are
    /// none.
    async fn read_results(
        &self,
        after: Option<&str>,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Entry<StepResult>>, StoreError>;
    /// A `pw:results` cursor just before the entries recorded at or after `time_ms` (`None`:
    /// the start of the stream), for [`Store::read_results`].
    async fn results_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError>;
    /// Reads `pw:audit` after `after`, oldest first. [`audit::query`] filters it.
    async fn read_audit(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry<AuditEvent>>, StoreError>;
    /// A `pw:audit` cursor just before the entries recorded at or after `time_ms` (`None`:
    /// the start of the stream).
    async fn audit_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError>;

    /// Whether the store is connected, for `/readyz`.
    async fn ready(&self) -> Result<(), StoreError>;
}

//! The in-memory store behind `piecework dev` and the in-process tests. Streams are capped like
//! their Redis counterparts; nothing survives the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use piecework_core::{FlowVersion, Run, RunStatus, RunSummary, ValidFlow};
use piecework_proto::v1::{AuditEvent, StepResult};
use piecework_sdk::{KvStore, MemoryKv, PollState};
use tokio::sync::Notify;

use crate::{
    Admission, ApiKeyRecord, Applied, ConnectionRecord, DEBOUNCE_STEP, Entry, FlowRecord, Held,
    OutboxJob, Pending, RunEnded, RunQuery, RunStats, RunUpdate, RunWatch, StepUpdate, Store,
    StoreError, Timer,
};

/// How many finished runs the in-memory store keeps unless told otherwise: enough to look
/// back on while developing, bounded so `piecework dev` under load holds a flat footprint.
pub const DEFAULT_MAX_FINISHED_RUNS: usize = 5_000;

/// Default cap of each stream, as Redis' `MAXLEN ~`.
pub const DEFAULT_STREAM_MAXLEN: usize = 100_000;

struct Stream<T> {
    entries: VecDeque<(u64, T)>,
    next_id: u64,
    maxlen: usize,
}

impl<T: Clone> Stream<T> {
    fn new(maxlen: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            next_id: 1,
            maxlen,
        }
    }

    fn push(&mut self, event: T) {
        self.entries.push_back((self.next_id, event));
        self.next_id += 1;
        while self.entries.len() > self.maxlen {
            self.entries.pop_front();
        }
    }

    fn after(&self, after: Option<&str>, limit: usize) -> Vec<Entry<T>> {
        let after: u64 = after.and_then(|a| a.parse().ok()).unwrap_or(0);
        self.entries
            .iter()
            .filter(|(id, _)| *id > after)
            .take(limit)
            .map(|(id, event)| Entry {
                id: id.to_string(),
                event: event.clone(),
            })
            .collect()
    }

    fn last_id(&self) -> String {
        (self.next_id - 1).to_string()
    }
}

struct State {
    flows: HashMap<String, FlowRecord>,
    versions: HashMap<(String, u32), FlowVersion>,
    runs: HashMap<String, Run>,
    triggers: HashMap<String, PollState>,
    leases: HashMap<String, (String, tokio::time::Instant)>,
    connections: HashMap<String, ConnectionRecord>,
    connections_used: HashMap<String, DateTime<Utc>>,
    api_keys: std::collections::BTreeMap<String, ApiKeyRecord>,
    webhook_secrets: HashMap<String, String>,
    results: Stream<StepResult>,
    audit: Stream<AuditEvent>,
    /// How long a finished run is kept (zero: forever).
    run_retention: Duration,
    /// How many finished runs are kept at most: the oldest to finish go first.
    max_finished_runs: usize,
    /// Ids of runs in the order they finished (a run retried and finished again may be in
    /// it twice), for evicting the oldest beyond `max_finished_runs`.
    finished: VecDeque<String>,
    /// When expired runs were last swept out.
    swept_at: std::time::Instant,
    /// Incremented by every apply, enable and disable.
    flows_revision: u64,
    /// Timers of waiting runs, by run and step.
    timers: HashMap<(String, String), Timer>,
    /// The next free start of each rate limit.
    rates: HashMap<String, tokio::time::Instant>,
    /// Run slots taken, by flow.
    slots: HashMap<String, Vec<String>>,
    /// Debounced groups waiting for their run, by flow and slot, with their last item's id.
    held: HashMap<(String, String), (Pending, Option<String>)>,
    /// The lanes of loops whose items run side by side that ended, by run and loop.
    lanes: HashMap<(String, String), std::collections::BTreeSet<u32>>,
    /// In-flight places taken, by limit: holders and when their lease lapses.
    in_flight: HashMap<String, HashMap<String, tokio::time::Instant>>,
    /// Jobs not known to be published, with when they were recorded.
    outbox: HashMap<OutboxJob, chrono::DateTime<Utc>>,
}

impl State {
    /// Puts `jobs` in the outbox, recorded at `at`.
    fn queue(&mut self, jobs: &[OutboxJob], at: chrono::DateTime<Utc>) {
        for job in jobs {
            self.outbox.entry(job.clone()).or_insert(at);
        }
    }

    /// Whether `run` finished longer than the retention ago.
    fn expired(&self, run: &Run, now: chrono::DateTime<Utc>) -> bool {
        !self.run_retention.is_zero()
            && run.finished_at.is_some_and(|finished| {
                (now - finished).to_std().unwrap_or_default() > self.run_retention
            })
    }

    /// Notes that run `id` finished, and evicts the runs that finished longest ago beyond
    /// `max_finished_runs`.
    fn finished(&mut self, id: &str) {
        self.finished.push_back(id.to_owned());
        while self.finished.len() > self.max_finished_runs {
            let Some(oldest) = self.finished.pop_front() else {
                break;
            };
            if self
                .runs
                .get(&oldest)
                .is_some_and(|r| r.status.is_terminal())
            {
                self.runs.remove(&oldest);
                self.lanes.retain(|(run, _), _| run != &oldest);
            }
        }
    }

    /// Drops expired runs, at most once a second (a scan of every run).
    fn sweep(&mut self) {
        if self.swept_at.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.swept_at = std::time::Instant::now();
        let now = Utc::now();
        let expired: Vec<String> = self
            .runs
            .values()
            .filter(|run| self.expired(run, now))
            .map(|run| run.id.clone())
            .collect();
        for id in &expired {
            self.runs.remove(id);
        }
        if !expired.is_empty() {
            self.lanes.retain(|(run, _), _| self.runs.contains_key(run));
        }
    }
}

/// Whether `run` is of the query's flow, time and starter (status and cursor aside).
fn in_query(query: &RunQuery, run: &Run) -> bool {
    query.flow_id.as_deref().is_none_or(|f| run.flow_id == f)
        && query.since.is_none_or(|since| run.created_at >= since)
        && query.until.is_none_or(|until| run.created_at < until)
        && query.started_by_matches(&run.started_by.name)
}

/// Waits for a run's end by watching the store's change notifications.
struct MemoryRunWatch {
    store: MemoryStore,
    run_id: String,
}

#[async_trait]
impl RunWatch for MemoryRunWatch {
    async fn ended(self: Box<Self>, timeout: Duration) -> Result<Option<RunEnded>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.store.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ended = {
                let state = self.store.state.lock().unwrap();
                state.runs.get(&self.run_id).and_then(RunEnded::of)
            };
            if ended.is_some() {
                return Ok(ended);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// An in-process [`Store`]. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    kv: Arc<MemoryKv>,
    /// Woken whenever a run changes or a result is appended.
    changed: Arc<Notify>,
    /// Bumped whenever a timer is added.
    timers_added: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_stream_maxlen(DEFAULT_STREAM_MAXLEN)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The deadline timer of a new run with one (its step is empty).
    fn add_deadline(&self, state: &mut State, run: &Run) {
        if let Some(due) = run.deadline {
            let timer = Timer {
                run_id: run.id.clone(),
                flow_id: run.flow_id.clone(),
                flow_version: run.flow_version,
                step: String::new(),
                due,
            };
            state.timers.insert((run.id.clone(), String::new()), timer);
            self.timers_added.send_modify(|n| *n += 1);
        }
    }

    pub fn with_stream_maxlen(maxlen: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                flows: HashMap::new(),
                versions: HashMap::new(),
                runs: HashMap::new(),
                triggers: HashMap::new(),
                leases: HashMap::new(),
                connections: HashMap::new(),
                connections_used: HashMap::new(),
                api_keys: Default::default(),
                webhook_secrets: HashMap::new(),
                results: Stream::new(maxlen),
                audit: Stream::new(maxlen),
                run_retention: crate::DEFAULT_RUN_RETENTION,
                max_finished_runs: DEFAULT_MAX_FINISHED_RUNS,
                finished: VecDeque::new(),
                swept_at: std::time::Instant::now(),
                flows_revision: 0,
                timers: HashMap::new(),
                rates: HashMap::new(),
                slots: HashMap::new(),
                lanes: HashMap::new(),
                held: HashMap::new(),
                in_flight: HashMap::new(),
                outbox: HashMap::new(),
            })),
            timers_added: Arc::new(tokio::sync::watch::channel(0).0),
            kv: Arc::new(MemoryKv::default()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Keeps finished runs for `retention` (zero: forever), as Redis does with
    /// `run_retention`.
    pub fn with_max_finished_runs(self, max: usize) -> Self {
        self.state.lock().unwrap().max_finished_runs = max.max(1);
        self
    }

    pub fn with_run_retention(self, retention: Duration) -> Self {
        self.state.lock().unwrap().run_retention = retention;
        self
    }

    /// The id of the newest `pw:results` entry ("0" if none), to tail from now on.
    pub fn results_tail(&self) -> String {
        self.state.lock().unwrap().results.last_id()
    }
}

/// Two definitions are the same version if they differ at most in `enabled`, which is state
/// of the flow rather than part of a version.

#[async_trait]
impl Store for MemoryStore {
    async fn apply_flow(&self, flow: ValidFlow) -> Result<Applied, StoreError> {
        let now = Utc::now();
        let mut state = self.state.lock().unwrap();
        state.flows_revision += 1;
        let id = flow.definition.name.clone();
        let latest = state.flows.get(&id).map(|r| r.latest_version).unwrap_or(0);
        let unchanged = state
            .versions
            .get(&(id.clone(), latest))
            .is_some_and(|v| v.definition == flow.definition && v.resolved == flow.resolved);
        let version = if unchanged { latest } else { latest + 1 };
        let enabled = crate::enabled_after_apply(state.flows.get(&id), &flow.definition, unchanged);
        if !unchanged {
            let stored = FlowVersion {
                flow_id: id.clone(),
                version,
                definition: flow.definition.clone(),
                resolved: flow.resolved,
                created_at: now,
            };
            state.versions.insert((id.clone(), version), stored);
        }
        let record = state.flows.entry(id.clone()).or_insert_with(|| FlowRecord {
            id: id.clone(),
            latest_version: version,
            enabled,
            owner: None,
            description: String::new(),
            created_at: now,
            updated_at: now,
        });
        record.latest_version = version;
        record.enabled = enabled;
        record.owner = flow.definition.owner.clone();
        record.description = flow.definition.description.clone();
        record.updated_at = now;
        Ok(Applied {
            record: record.clone(),
            version,
            created: !unchanged,
        })
    }

    async fn get_flow(&self, id: &str) -> Result<Option<FlowRecord>, StoreError> {
        Ok(self.state.lock().unwrap().flows.get(id).cloned())
    }

    async fn flows_revision(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().unwrap().flows_revision)
    }

    async fn list_flows(&self) -> Result<Vec<FlowRecord>, StoreError> {
        let mut flows: Vec<FlowRecord> =
            self.state.lock().unwrap().flows.values().cloned().collect();
        flows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(flows)
    }

    async fn get_flow_version(
        &self,
        id: &str,
        version: u32,
    ) -> Result<Option<FlowVersion>, StoreError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .versions
            .get(&(id.to_owned(), version))
            .cloned())
    }

    async fn set_flow_enabled(
        &self,
        id: &str,
        enabled: bool,
    ) -> Result<Option<FlowRecord>, StoreError> {
        let mut state = self.state.lock().unwrap();
        state.flows_revision += 1;
        Ok(state.flows.get_mut(id).map(|record| {
            record.enabled = enabled;
            record.updated_at = Utc::now();
            record.clone()
        }))
    }

    async fn create_run_queued(&self, run: &Run, jobs: &[OutboxJob]) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        state.sweep();
        if state.runs.contains_key(&run.id) {
            return Ok(false);
        }
        state.runs.insert(run.id.clone(), run.clone());
        self.add_deadline(&mut state, run);
        state.queue(jobs, run.created_at);
        Ok(true)
    }

    async fn create_admitted_run(
        &self,
        run: &Run,
        audit: Option<&AuditEvent>,
        jobs: &[OutboxJob],
    ) -> Result<Admission, StoreError> {
        let mut state = self.state.lock().unwrap();
        let admitted = state
            .flows
            .get(&run.flow_id)
            .is_some_and(|f| f.enabled && f.latest_version == run.flow_version);
        if !admitted {
            return Ok(Admission::Stale);
        }
        state.sweep();
        if state.runs.contains_key(&run.id) {
            return Ok(Admission::Exists);
        }
        state.runs.insert(run.id.clone(), run.clone());
        self.add_deadline(&mut state, run);
        state.queue(jobs, run.created_at);
        if let Some(event) = audit {
            state.audit.push(event.clone());
        }
        Ok(Admission::Created)
    }

    async fn outbox(
        &self,
        before: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxJob>, StoreError> {
        let state = self.state.lock().unwrap();
        let mut due: Vec<_> = state
            .outbox
            .iter()
            .filter(|(_, at)| **at < before)
            .collect();
        due.sort_by_key(|(_, at)| **at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|(job, _)| job.clone())
            .collect())
    }

    async fn outbox_sent(&self, jobs: &[OutboxJob]) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        for job in jobs {
            state.outbox.remove(job);
        }
        Ok(())
    }

    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let state = self.state.lock().unwrap();
        let now = Utc::now();
        Ok(state
            .runs
            .get(id)
            .filter(|run| !state.expired(run, now))
            .cloned()
            .map(|mut run| {
                // A run that ended has no attempt in flight left to speak of.
                if run.status.is_terminal() {
                    run.in_flight.clear();
                }
                run
            }))
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<RunSummary>, StoreError> {
        let state = self.state.lock().unwrap();
        let now = Utc::now();
        let mut runs: Vec<RunSummary> = state
            .runs
            .values()
            .filter(|r| !state.expired(r, now) && in_query(query, r))
            .filter(|r| query.status.is_none_or(|s| r.status == s))
            .filter(|r| {
                query
                    .after
                    .as_ref()
                    .is_none_or(|after| after.precedes(r.created_at.timestamp_millis(), &r.id))
            })
            .map(RunSummary::from)
            .collect();
        runs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        runs.truncate(query.limit.max(1));
        Ok(runs)
    }

    async fn run_stats(&self, query: &RunQuery) -> Result<RunStats, StoreError> {
        let state = self.state.lock().unwrap();
        let now = Utc::now();
        let mut stats = RunStats::default();
        for run in state.runs.values() {
            if !state.expired(run, now) && in_query(query, run) {
                stats.add(run.status);
            }
        }
        Ok(stats)
    }

    async fn record_step(&self, update: StepUpdate) -> Result<RunStatus, StoreError> {
        let mut state_timers = Vec::new();
        let status = {
            let mut state = self.state.lock().unwrap();
            let run = state.runs.get_mut(&update.run_id).ok_or_else(|| {
                StoreError::Conflict(format!("run {} does not exist", update.run_id))
            })?;
            if let Some(pause) = update.pause
                && run.status == piecework_core::RunStatus::Running
            {
                run.status = piecework_core::RunStatus::Waiting;
                if let Some(timer) = pause.timer {
                    let key = (timer.run_id.clone(), timer.step.clone());
                    state_timers.push((key, timer));
                }
            }
            if let Some(timer) = update.wake {
                let key = (timer.run_id.clone(), timer.step.clone());
                state_timers.push((key, timer));
            }
            if update.unmark {
                run.in_flight.retain(|m| m.step != update.step.name);
            }
            run.upsert_step(update.step);
            for closed in update.closed {
                run.upsert_step(closed);
            }
            if update.response.is_some() {
                run.response = update.response;
            }
            let ends = update.run.is_some();
            if let Some(change) = update.run {
                apply_run_update(run, change);
            }
            let status = run.status;
            if ends && status.is_terminal() {
                state.finished(&update.run_id);
            }
            state.results.push(update.result);
            if let Some(event) = update.audit {
                state.audit.push(event);
            }
            let added = !state_timers.is_empty();
            state.timers.extend(state_timers);
            if added {
                self.timers_added.send_modify(|n| *n += 1);
            }
            status
        };
        self.changed.notify_waiters();
        Ok(status)
    }

    async fn update_run(&self, run_id: &str, update: RunUpdate) -> Result<(), StoreError> {
        {
            let mut state = self.state.lock().unwrap();
            let run = state
                .runs
                .get_mut(run_id)
                .ok_or_else(|| StoreError::Conflict(format!("run {run_id} does not exist")))?;
            apply_run_update(run, update);
            if run.status.is_terminal() {
                state.finished(run_id);
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn cancel_run(
        &self,
        run_id: &str,
        at: chrono::DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError> {
        let changed = {
            let mut state = self.state.lock().unwrap();
            let Some(run) = state.runs.get_mut(run_id) else {
                return Ok(None);
            };
            if run.status.is_terminal() {
                return Ok(Some(false));
            }
            run.status = piecework_core::RunStatus::Cancelled;
            run.finished_at = Some(at);
            state.finished(run_id);
            true
        };
        self.changed.notify_waiters();
        Ok(Some(changed))
    }

    async fn resume_run(
        &self,
        run_id: &str,
        step: &piecework_core::StepState,
        jobs: &[OutboxJob],
    ) -> Result<Option<bool>, StoreError> {
        let mut state = self.state.lock().unwrap();
        let Some(run) = state.runs.get_mut(run_id) else {
            return Ok(None);
        };
        if run.status != piecework_core::RunStatus::Failed {
            return Ok(Some(false));
        }
        run.status = piecework_core::RunStatus::Running;
        run.error = None;
        run.finished_at = None;
        run.upsert_step(step.clone());
        state.queue(jobs, Utc::now());
        Ok(Some(true))
    }

    async fn claim_wake(&self, timer: &Timer) -> Result<bool, StoreError> {
        use piecework_core::{RunStatus, StepStatus};
        let mut state = self.state.lock().unwrap();
        let Some(run) = state.runs.get_mut(&timer.run_id) else {
            return Ok(false);
        };
        let step_waits = run
            .step(&timer.step)
            .is_some_and(|s| s.status == StepStatus::Waiting);
        let claimed =
            run.status == RunStatus::Waiting || (run.status == RunStatus::Running && step_waits);
        if claimed {
            run.status = RunStatus::Running;
            state
                .timers
                .remove(&(timer.run_id.clone(), timer.step.clone()));
        }
        Ok(claimed)
    }

    async fn expire_run(&self, timer: &Timer, error: &str) -> Result<bool, StoreError> {
        let ended = {
            let mut state = self.state.lock().unwrap();
            state
                .timers
                .remove(&(timer.run_id.clone(), timer.step.clone()));
            match state.runs.get_mut(&timer.run_id) {
                Some(run) if !run.status.is_terminal() => {
                    run.status = piecework_core::RunStatus::Failed;
                    run.error = Some(error.to_owned());
                    run.finished_at = Some(Utc::now());
                    state.finished(&timer.run_id);
                    true
                }
                _ => false,
            }
        };
        self.changed.notify_waiters();
        Ok(ended)
    }

    async fn drop_timer(&self, timer: &Timer) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        state
            .timers
            .remove(&(timer.run_id.clone(), timer.step.clone()));
        Ok(())
    }

    async fn resume_waiting(
        &self,
        timer: &Timer,
        step: &piecework_core::StepState,
        result: &StepResult,
    ) -> Result<Option<bool>, StoreError> {
        use piecework_core::{RunStatus, StepStatus};
        {
            let mut state = self.state.lock().unwrap();
            let Some(run) = state.runs.get_mut(&timer.run_id) else {
                return Ok(None);
            };
            let step_waits = run
                .step(&timer.step)
                .is_some_and(|s| s.status == StepStatus::Waiting);
            if run.status != RunStatus::Waiting || !step_waits {
                return Ok(Some(false));
            }
            run.status = RunStatus::Running;
            run.upsert_step(step.clone());
            state
                .timers
                .remove(&(timer.run_id.clone(), timer.step.clone()));
            state.results.push(result.clone());
        }
        self.changed.notify_waiters();
        Ok(Some(true))
    }

    async fn take_due_timers(
        &self,
        now: chrono::DateTime<Utc>,
        limit: usize,
        again_after: Duration,
    ) -> Result<Vec<Timer>, StoreError> {
        let mut state = self.state.lock().unwrap();
        let mut due: Vec<Timer> = state
            .timers
            .values()
            .filter(|t| t.due <= now)
            .cloned()
            .collect();
        due.sort_by_key(|t| t.due);
        due.truncate(limit);
        let again = now + chrono::Duration::from_std(again_after).unwrap_or(chrono::Duration::MAX);
        for timer in &due {
            if let Some(kept) = state
                .timers
                .get_mut(&(timer.run_id.clone(), timer.step.clone()))
            {
                kept.due = again;
            }
        }
        Ok(due)
    }

    async fn acquire_run_slot(
        &self,
        flow_id: &str,
        run_id: &str,
        max: u32,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        let State { slots, runs, .. } = &mut *state;
        let held = slots.entry(flow_id.to_owned()).or_default();
        if held.iter().any(|r| r == run_id) {
            return Ok(true);
        }
        held.retain(|r| runs.get(r).is_some_and(|run| !run.status.is_terminal()));
        if held.len() >= max as usize {
            return Ok(false);
        }
        held.push(run_id.to_owned());
        Ok(true)
    }

    async fn mark_in_flight(
        &self,
        run_id: &str,
        marker: &piecework_core::run::InFlight,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        if let Some(run) = state.runs.get_mut(run_id) {
            run.in_flight.retain(|m| m.step != marker.step);
            run.in_flight.push(marker.clone());
        }
        Ok(())
    }

    async fn hold_item(&self, held: &Held) -> Result<chrono::DateTime<Utc>, StoreError> {
        let due = {
            let mut state = self.state.lock().unwrap();
            let group = (held.flow_id.clone(), held.slot.clone());
            let earlier = state.held.get(&group);
            if let Some((pending, last)) = earlier
                && held.item_id.is_some()
                && *last == held.item_id
            {
                return Ok(pending.due);
            }
            let first = earlier.map_or(held.now, |(p, _)| p.first);
            let seq = earlier.map_or(0, |(p, _)| p.seq) + 1;
            let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            let due = (held.now + span(held.period)).min(first + span(held.max));
            let pending = Pending {
                item: held.item.clone(),
                meta: held.meta.clone(),
                seq,
                first,
                due,
            };
            state.held.insert(group, (pending, held.item_id.clone()));
            state.timers.insert(
                (held.slot.clone(), DEBOUNCE_STEP.to_owned()),
                Timer {
                    run_id: held.slot.clone(),
                    flow_id: held.flow_id.clone(),
                    flow_version: 0,
                    step: DEBOUNCE_STEP.to_owned(),
                    due,
                },
            );
            due
        };
        self.timers_added.send_modify(|n| *n += 1);
        Ok(due)
    }

    async fn pending_item(&self, flow_id: &str, slot: &str) -> Result<Option<Pending>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .held
            .get(&(flow_id.to_owned(), slot.to_owned()))
            .map(|(pending, _)| pending.clone()))
    }

    async fn release_item(&self, flow_id: &str, slot: &str, seq: u64) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        let group = (flow_id.to_owned(), slot.to_owned());
        let taken = state.held.get(&group).is_none_or(|(p, _)| p.seq == seq);
        if taken {
            state.held.remove(&group);
            state
                .timers
                .remove(&(slot.to_owned(), DEBOUNCE_STEP.to_owned()));
        }
        Ok(())
    }

    async fn join_lane(
        &self,
        run_id: &str,
        around: &str,
        lane: u32,
        lanes: u32,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        if !state.runs.contains_key(run_id) {
            return Ok(false);
        }
        let ended = state
            .lanes
            .entry((run_id.to_owned(), around.to_owned()))
            .or_default();
        ended.insert(lane);
        Ok(ended.range(..lanes).count() >= lanes as usize)
    }

    async fn acquire_in_flight(
        &self,
        key: &str,
        holder: &str,
        max: u32,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock().unwrap();
        let holders = state.in_flight.entry(key.to_owned()).or_default();
        holders.retain(|_, until| *until > now);
        if !holders.contains_key(holder) && holders.len() >= max as usize {
            return Ok(false);
        }
        holders.insert(holder.to_owned(), now + lease);
        Ok(true)
    }

    async fn release_in_flight(&self, key: &str, holder: &str) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        if let Some(holders) = state.in_flight.get_mut(key) {
            holders.remove(holder);
        }
        Ok(())
    }

    async fn reserve_rate(&self, key: &str, interval: Duration) -> Result<Duration, StoreError> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock().unwrap();
        let next = state.rates.entry(key.to_owned()).or_insert(now);
        let start = (*next).max(now);
        *next = start + interval;
        Ok(start - now)
    }

    async fn next_timer(&self) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(state.timers.values().map(|t| t.due).min())
    }

    async fn watch_timers(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        Ok(self.timers_added.subscribe())
    }

    async fn watch_run(&self, run_id: &str) -> Result<Box<dyn RunWatch>, StoreError> {
        Ok(Box::new(MemoryRunWatch {
            store: self.clone(),
            run_id: run_id.to_owned(),
        }))
    }

    async fn wait_run_finished(
        &self,
        run_id: &str,
        timeout: Duration,
    ) -> Result<Option<Run>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let run = self.get_run(run_id).await?;
            match &run {
                None => return Ok(None),
                Some(r) if r.status.is_terminal() => return Ok(run),
                Some(_) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(run);
            }
        }
    }

    async fn trigger_state(&self, flow_id: &str) -> Result<Option<PollState>, StoreError> {
        Ok(self.state.lock().unwrap().triggers.get(flow_id).cloned())
    }

    async fn put_trigger_state(
        &self,
        flow_id: &str,
        poll_state: &PollState,
    ) -> Result<(), StoreError> {
        self.state
            .lock()
            .unwrap()
            .triggers
            .insert(flow_id.to_owned(), poll_state.clone());
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock().unwrap();
        match state.leases.get(name) {
            Some((_, expires)) if *expires > now => Ok(false),
            _ => {
                state
                    .leases
                    .insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        if state.leases.get(name).is_some_and(|(h, _)| h == holder) {
            state.leases.remove(name);
        }
        Ok(())
    }

    async fn put_connection(&self, connection: &ConnectionRecord) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        state
            .connections
            .insert(connection.name.clone(), connection.clone());
        Ok(())
    }

    async fn reseal_connection(
        &self,
        current: &ConnectionRecord,
        resealed: &ConnectionRecord,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        match state.connections.get_mut(&current.name) {
            Some(stored) if stored.secret == current.secret => {
                *stored = resealed.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn get_connection(&self, name: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        Ok(self.state.lock().unwrap().connections.get(name).cloned())
    }

    async fn list_connections(&self) -> Result<Vec<ConnectionRecord>, StoreError> {
        let mut all: Vec<ConnectionRecord> = self
            .state
            .lock()
            .unwrap()
            .connections
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn delete_connection(&self, name: &str) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        state.connections_used.remove(name);
        Ok(state.connections.remove(name).is_some())
    }

    async fn put_webhook_secret(
        &self,
        flow_id: &str,
        sealed: &str,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        if !replace && state.webhook_secrets.contains_key(flow_id) {
            return Ok(false);
        }
        state
            .webhook_secrets
            .insert(flow_id.to_owned(), sealed.to_owned());
        Ok(true)
    }

    async fn get_webhook_secret(&self, flow_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .webhook_secrets
            .get(flow_id)
            .cloned())
    }

    async fn reseal_webhook_secret(
        &self,
        flow_id: &str,
        current: &str,
        resealed: &str,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        match state.webhook_secrets.get_mut(flow_id) {
            Some(stored) if stored == current => {
                *stored = resealed.to_owned();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn rehash_api_key(
        &self,
        current: &ApiKeyRecord,
        rehashed: &ApiKeyRecord,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        match state.api_keys.get_mut(&current.name) {
            Some(stored) if stored.hash == current.hash => {
                *stored = rehashed.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        if state.api_keys.contains_key(&key.name) {
            return Ok(false);
        }
        state.api_keys.insert(key.name.clone(), key.clone());
        Ok(true)
    }

    async fn get_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self.state.lock().unwrap().api_keys.get(name).cloned())
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .api_keys
            .values()
            .cloned()
            .collect())
    }

    async fn delete_api_key(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.state.lock().unwrap().api_keys.remove(name).is_some())
    }

    fn kv(&self) -> Arc<dyn KvStore> {
        self.kv.clone()
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.state.lock().unwrap().audit.push(event);
        Ok(())
    }

    async fn read_results(
        &self,
        after: Option<&str>,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Entry<StepResult>>, StoreError> {
        let deadline = tokio::time::Instant::now() + block;
        let tail;
        let after = match after {
            Some("$") => {
                tail = self.results_tail();
                Some(tail.as_str())
            }
            other => other,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let entries = self.state.lock().unwrap().results.after(after, limit);
            if !entries.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(entries);
            }
        }
    }

    async fn read_audit(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry<AuditEvent>>, StoreError> {
        Ok(self.state.lock().unwrap().audit.after(after, limit))
    }

    async fn audit_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .audit
            .entries
            .iter()
            .take_while(|(_, event)| event.time_unix_ms < time_ms)
            .last()
            .map(|(id, _)| id.to_string()))
    }

    async fn touch_connection(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        if !state.connections.contains_key(name) {
            return Ok(());
        }
        let used = state.connections_used.entry(name.to_owned()).or_insert(at);
        *used = (*used).max(at);
        Ok(())
    }

    async fn connections_used(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
        Ok(self.state.lock().unwrap().connections_used.clone())
    }

    async fn results_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .results
            .entries
            .iter()
            .take_while(|(_, result)| result.finished_unix_ms < time_ms)
            .last()
            .map(|(id, _)| id.to_string()))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Ends a run only while it is running, so a cancel is never overwritten by the step that was
/// in flight.
fn apply_run_update(run: &mut Run, update: RunUpdate) {
    if run.status != piecework_core::RunStatus::Running {
        return;
    }
    run.status = update.status;
    run.error = update.error;
    run.finished_at = update.finished_at;
}

#[cfg(test)]
mod tests {
    use super::*;
    use piecework_core::{FlowDefinition, Format, RunStatus};
    use std::collections::BTreeMap;

    fn flow(description: &str, enabled: bool) -> ValidFlow {
        let text = format!(
            "apiVersion: piecework/v1\nkind: Flow\nname: f\ndescription: {description}\nenabled: {enabled}\ntrigger: {{piece: p, trigger: t}}\nsteps: []\n"
        );
        ValidFlow {
            definition: FlowDefinition::parse(&text, Format::Yaml).unwrap(),
            resolved: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn applying_creates_versions_only_for_changes() {
        let store = MemoryStore::new();
        let first = store.apply_flow(flow("a", true)).await.unwrap();
        assert_eq!((first.version, first.created), (1, true));
        let same = store.apply_flow(flow("a", true)).await.unwrap();
        assert_eq!((same.version, same.created), (1, false));
        let paused = store.apply_flow(flow("a", false)).await.unwrap();
        assert_eq!(
            (paused.version, paused.created, paused.record.enabled),
            (2, true, false),
            "`enabled` is part of the definition"
        );
        let changed = store.apply_flow(flow("b", true)).await.unwrap();
        assert_eq!((changed.version, changed.created), (3, true));
        let v1 = store.get_flow_version("f", 1).await.unwrap().unwrap();
        assert_eq!(v1.definition.description, "a", "versions are immutable");
    }

    /// `piecework dev` under endless load: 200,000 runs through the store, which keeps only
    /// the newest finished ones (and every one still going).
    #[tokio::test]
    async fn finished_runs_beyond_the_bound_are_evicted_oldest_first() {
        let store = MemoryStore::new().with_max_finished_runs(1_000);
        let done = |status| RunUpdate {
            status,
            error: None,
            finished_at: Some(Utc::now()),
        };
        for i in 0..200_000_u32 {
            let id = format!("r{i}");
            store
                .create_run(&Run::new(id.clone(), "f", 1, serde_json::json!({ "i": i })))
                .await
                .unwrap();
            if i % 1000 == 0 {
                continue; // still running
            }
            let status = if i % 7 == 0 {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            };
            store.update_run(&id, done(status)).await.unwrap();
        }
        let state = store.state.lock().unwrap();
        assert_eq!(state.runs.len(), 1_000 + 200, "1000 finished, 200 running");
        assert!(state.finished.len() <= 1_000);
        assert!(state.runs.contains_key("r199999"), "the newest stays");
        assert!(!state.runs.contains_key("r1"), "the oldest finished went");
        assert!(
            state.runs.contains_key("r0"),
            "a run still going is never evicted"
        );
    }

    #[tokio::test]
    async fn applying_keeps_the_trigger_cursor() {
        let store = MemoryStore::new();
        store.apply_flow(flow("a", true)).await.unwrap();
        let cursor = PollState {
            recent_ids: ["7".to_owned()].into(),
            ..PollState::default()
        };
        store.put_trigger_state("f", &cursor).await.unwrap();
        store.apply_flow(flow("b", true)).await.unwrap();
        store.set_flow_enabled("f", false).await.unwrap();
        store.set_flow_enabled("f", true).await.unwrap();
        assert_eq!(store.trigger_state("f").await.unwrap(), Some(cursor));
    }

    #[tokio::test]
    async fn runs_are_created_once() {
        let store = MemoryStore::new();
        let run = Run::new("r1".into(), "f", 1, serde_json::json!({}));
        assert!(store.create_run(&run).await.unwrap());
        assert!(!store.create_run(&run).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_run_returns_when_it_finishes_or_times_out() {
        let store = MemoryStore::new();
        store
            .create_run(&Run::new("r1".into(), "f", 1, serde_json::json!({})))
            .await
            .unwrap();
        let pending = store
            .wait_run_finished("r1", Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pending.status, RunStatus::Running);
        let waiter = {
            let store = store.clone();
            tokio::spawn(
                async move { store.wait_run_finished("r1", Duration::from_secs(60)).await },
            )
        };
        tokio::task::yield_now().await;
        let done = RunUpdate {
            status: RunStatus::Succeeded,
            error: None,
            finished_at: Some(Utc::now()),
        };
        store.update_run("r1", done).await.unwrap();
        let finished = waiter.await.unwrap().unwrap().unwrap();
        assert_eq!(finished.status, RunStatus::Succeeded);
        assert!(
            store
                .wait_run_finished("nope", Duration::from_secs(1))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn streams_are_capped_and_read_in_order() {
        let store = MemoryStore::with_stream_maxlen(3);
        for i in 0..5 {
            let event = AuditEvent {
                action: format!("a{i}"),
                ..AuditEvent::default()
            };
            store.append_audit(event).await.unwrap();
        }
        let all = store.read_audit(None, 10).await.unwrap();
        let actions: Vec<_> = all.iter().map(|e| e.event.action.as_str()).collect();
        assert_eq!(actions, ["a2", "a3", "a4"]);
        let after = store.read_audit(Some(&all[0].id), 10).await.unwrap();
        assert_eq!(after.len(), 2);
    }
}

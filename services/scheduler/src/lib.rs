//! The scheduler: publishes a poll job for every tick of every enabled flow whose trigger is
//! polling or scheduled.
//!
//! Ticks are pure functions of the clock and the flow, and a poll job's message id is
//! `<flow>:<tick>`, so several schedulers publish the same ids and the broker keeps one:
//! schedulers run active-active with no leader. A scheduler that was down does not catch up on
//! missed ticks; it resumes at the next one.
//!
//! - **Schedule triggers** tick as written: an interval's ticks are multiples of it since the
//!   Unix epoch (every 5m at :00, :05, …), a cron's are its matches.
//! - **Polling triggers** tick at their interval too, each flow at its own phase within it
//!   (from a hash of the flow's id, the same on every scheduler), so a hundred thousand flows
//!   polling every minute spread over the minute instead of all firing at :00.
//!
//! Due ticks are kept in time order and published many at once. The flow list is re-read only
//! when the store's flows revision moved (every apply, enable and disable moves it), checked
//! every `refresh_interval` with one cheap read, and in full every `full_refresh`.
//!
//! Beside the ticks it fires the timers of waiting runs and, as every process does, relays the
//! store's outbox: step jobs recorded with a run's start or retry that their publisher could
//! not hand to the bus.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use piecework_core::FlowVersion;
use piecework_proto::v1::PollJob;
use piecework_runtime::{Runtime, RuntimeError};
use piecework_sdk::{Schedule, TriggerHandle, TriggerKind};
use piecework_telemetry::metrics::{TickLabels, TickOutcome};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use piecework_runtime::Clock;

/// Poll jobs published at once when many ticks are due together.
const PUBLISHES_IN_FLIGHT: usize = 256;

/// How the scheduler works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often the flows revision is checked (one small read); the flow list is re-read
    /// when it moved.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// How often the flow list is re-read whatever the revision says (a trigger's piece that
    /// arrived since, for example).
    #[serde(with = "humantime_serde")]
    pub full_refresh: Duration,
    /// How often the timers of waiting runs are looked at when no new one is announced (a
    /// new timer is announced at once; this bounds a lost announcement).
    #[serde(with = "humantime_serde")]
    pub timer_poll: Duration,
    /// How long after firing a timer fires again if the wake-up it caused was not recorded
    /// (its job lost, its worker gone).
    #[serde(with = "humantime_serde")]
    pub timer_retry: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(5),
            full_refresh: Duration::from_secs(300),
            timer_poll: Duration::from_secs(30),
            timer_retry: Duration::from_secs(60),
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.refresh_interval < Duration::from_millis(100) {
            return Err("refresh_interval: must be at least 100ms".into());
        }
        if self.full_refresh < self.refresh_interval {
            return Err("full_refresh: must not be shorter than refresh_interval".into());
        }
        if self.timer_poll < Duration::from_millis(100) || self.timer_retry < Duration::from_secs(1)
        {
            return Err("timer_poll: must be at least 100ms, timer_retry at least 1s".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    Config(String),
}

/// One scheduled flow.
struct Entry {
    version: u32,
    queue: String,
    schedule: Schedule,
    /// Where this flow's ticks sit within the schedule's interval (polling triggers).
    phase: chrono::Duration,
    next: DateTime<Utc>,
}

impl Entry {
    /// The first tick strictly after `after`.
    fn tick_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .next_after(after - self.phase)
            .map(|tick| tick + self.phase)
    }
}

/// What the scheduler holds: the entries by flow, and their next ticks in time order.
#[derive(Default)]
struct Timetable {
    entries: HashMap<String, Entry>,
    due: BTreeSet<(DateTime<Utc>, String)>,
}

impl Timetable {
    fn insert(&mut self, flow_id: String, entry: Entry) {
        self.due.insert((entry.next, flow_id.clone()));
        self.entries.insert(flow_id, entry);
    }

    /// Takes every flow whose tick is at or before `now`, in time order.
    fn take_due(&mut self, now: DateTime<Utc>) -> Vec<(String, Entry)> {
        let mut taken = Vec::new();
        while let Some((tick, _)) = self.due.first()
            && *tick <= now
        {
            let (_, flow_id) = self.due.pop_first().expect("not empty");
            if let Some(entry) = self.entries.remove(&flow_id) {
                taken.push((flow_id, entry));
            }
        }
        taken
    }

    fn first_tick(&self) -> Option<DateTime<Utc>> {
        self.due.first().map(|(tick, _)| *tick)
    }

    /// Takes on a new plan: flows whose version did not change keep their next tick, new or
    /// changed ones start at their first tick after `now`, the rest are dropped.
    fn apply(&mut self, plan: Plan, now: DateTime<Utc>) {
        let mut previous = std::mem::take(&mut self.entries);
        self.due.clear();
        for (flow_id, planned) in plan.flows {
            if let Some(entry) = previous
                .remove(&flow_id)
                .filter(|e| e.version == planned.version)
            {
                self.insert(flow_id, entry);
                continue;
            }
            let mut entry = Entry {
                version: planned.version,
                queue: planned.queue,
                schedule: planned.schedule,
                phase: planned.phase,
                next: now,
            };
            let Some(next) = entry.tick_after(now) else {
                continue;
            };
            entry.next = next;
            tracing::debug!(flow = %flow_id, version = entry.version, first_tick = %next, "scheduling flow");
            self.insert(flow_id, entry);
        }
    }
}

/// Every enabled flow that can be scheduled, as the refresher found them.
struct Plan {
    flows: HashMap<String, Planned>,
}

/// How one flow ticks.
struct Planned {
    version: u32,
    queue: String,
    schedule: Schedule,
    phase: chrono::Duration,
}

/// Runs the scheduler until `shutdown` is cancelled.
pub async fn run(
    config: SchedulerConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    config.validate().map_err(SchedulerError::Config)?;
    let clock = Clock::new();
    let mut table = Timetable::default();
    // Reading the flow list happens beside the ticks, so a big list or a slow store never
    // holds up a due tick.
    let (plans, mut planned) = tokio::sync::mpsc::channel(1);
    let refreshing = tokio::spawn(refresher(
        runtime.clone(),
        config.clone(),
        plans,
        shutdown.clone(),
    ));
    let waking = tokio::spawn(timers(runtime.clone(), config.clone(), shutdown.clone()));
    let relaying = {
        let (runtime, shutdown) = (runtime.clone(), shutdown.clone());
        tokio::spawn(async move { runtime.relay_outbox_until(shutdown).await })
    };
    tracing::info!("scheduler started");
    loop {
        let now = clock.now();
        let due = table.take_due(now);
        if !due.is_empty() {
            let runtime = &runtime;
            let published: Vec<(String, Entry)> = futures::stream::iter(due)
                .map(|(flow_id, entry)| async move {
                    publish_tick(runtime, &flow_id, &entry).await;
                    (flow_id, entry)
                })
                .buffer_unordered(PUBLISHES_IN_FLIGHT)
                .collect()
                .await;
            for (flow_id, mut entry) in published {
                let Some(next) = entry.tick_after(now.max(entry.next)) else {
                    continue;
                };
                entry.next = next;
                table.insert(flow_id, entry);
            }
            continue;
        }
        let until_tick = table.first_tick().map_or(config.refresh_interval, |tick| {
            (tick - clock.now()).to_std().unwrap_or_default()
        });
        tokio::select! {
            () = tokio::time::sleep(until_tick) => {}
            plan = planned.recv() => match plan {
                Some(plan) => {
                    table.apply(plan, clock.now());
                    runtime
                        .metrics
                        .scheduled_flows
                        .set(i64::try_from(table.entries.len()).unwrap_or(i64::MAX));
                }
                None => break,
            },
            () = shutdown.cancelled() => break,
        }
    }
    refreshing.abort();
    waking.abort();
    relaying.abort();
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Timers fired at once.
const TIMERS_AT_ONCE: usize = 256;

/// Wakes waiting runs as their timers come due: sleeps until the earliest timer, a new one is
/// announced, or `timer_poll` passes. Several schedulers take different timers (a taken timer
/// is pushed back by `timer_retry`), and a wake-up job's message id makes a duplicate harmless.
async fn timers(runtime: Arc<Runtime>, config: SchedulerConfig, shutdown: CancellationToken) {
    let mut added = loop {
        match runtime.watch_timers().await {
            Ok(added) => break added,
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch timers; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    loop {
        let wait = match fire_timers(&runtime, &config).await {
            Ok(Some(next)) => (next - runtime.now())
                .to_std()
                .unwrap_or_default()
                .min(config.timer_poll),
            Ok(None) => config.timer_poll,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read timers");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = added.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Fires every due timer; returns when the next one is due.
async fn fire_timers(
    runtime: &Runtime,
    config: &SchedulerConfig,
) -> Result<Option<DateTime<Utc>>, RuntimeError> {
    loop {
        let fired = runtime
            .fire_due_timers(runtime.now(), TIMERS_AT_ONCE, config.timer_retry)
            .await?;
        if fired < TIMERS_AT_ONCE {
            break;
        }
    }
    runtime.next_timer().await
}

/// Checks the flows revision every `refresh_interval` and hands the tick loop a new plan when
/// it moved (or every `full_refresh`, or while some flow could not be scheduled).
async fn refresher(
    runtime: Arc<Runtime>,
    config: SchedulerConfig,
    plans: tokio::sync::mpsc::Sender<Plan>,
    shutdown: CancellationToken,
) {
    let mut known = None;
    let mut next_full = Instant::now();
    let mut unschedulable = 0;
    loop {
        let full = Instant::now() >= next_full || unschedulable > 0;
        match plan(&runtime, known, full).await {
            Ok(Some((revision, plan, failed))) => {
                known = Some(revision);
                unschedulable = failed;
                next_full = Instant::now() + config.full_refresh;
                if plans.send(plan).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(error = %err, "could not refresh the flow list; keeping the previous one");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.refresh_interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Reads the flow list and plans every enabled flow when `full` or when the flows revision
/// moved past `known`; returns the revision, the plan and how many flows could not be
/// scheduled. Flow versions load concurrently (and stay cached).
async fn plan(
    runtime: &Runtime,
    known: Option<u64>,
    full: bool,
) -> Result<Option<(u64, Plan, usize)>, RuntimeError> {
    let revision = runtime.flows_revision().await?;
    if !full && known == Some(revision) {
        return Ok(None);
    }
    let records = runtime.flow_records().await?;
    let planned: Vec<(String, Result<Option<Planned>, String>)> =
        futures::stream::iter(records.into_iter().filter(|f| f.enabled))
            .map(|record| async move {
                let planned = plan_flow(runtime, &record.id, record.latest_version).await;
                (record.id, planned)
            })
            .buffer_unordered(64)
            .collect()
            .await;
    let mut flows = HashMap::with_capacity(planned.len());
    let mut unschedulable = 0;
    for (flow_id, planned) in planned {
        match planned {
            Ok(Some(planned)) => {
                flows.insert(flow_id, planned);
            }
            Ok(None) => {}
            Err(error) => {
                unschedulable += 1;
                tracing::warn!(flow = %flow_id, error, "flow cannot be scheduled");
            }
        }
    }
    Ok(Some((revision, Plan { flows }, unschedulable)))
}

/// How one flow ticks, or `None` for a flow nothing schedules (a webhook).
async fn plan_flow(
    runtime: &Runtime,
    flow_id: &str,
    version: u32,
) -> Result<Option<Planned>, String> {
    let flow = runtime
        .flow_version(flow_id, version)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("version {version} does not exist"))?;
    let Some((schedule, polling)) = schedule_of(runtime, &flow).await? else {
        return Ok(None);
    };
    let phase = if polling {
        phase_of(flow_id, &schedule)
    } else {
        chrono::Duration::zero()
    };
    Ok(Some(Planned {
        version: flow.version,
        queue: flow.definition.trigger.queue().to_owned(),
        schedule,
        phase,
    }))
}

/// Publishes one tick's poll job, in a span that starts the tick's trace.
async fn publish_tick(runtime: &Runtime, flow_id: &str, entry: &Entry) {
    let job = PollJob {
        flow_id: flow_id.to_owned(),
        flow_version: entry.version,
        tick_unix_ms: entry.next.timestamp_millis(),
    };
    let span = tracing::info_span!(
        parent: None,
        "tick",
        otel.name = %format_args!("tick {flow_id}"),
        piecework.flow.id = flow_id,
        piecework.flow.version = entry.version,
        piecework.tick_unix_ms = job.tick_unix_ms,
        piecework.duplicate = tracing::field::Empty,
    );
    let published = runtime
        .publish_poll(&entry.queue, &job)
        .instrument(span.clone())
        .await;
    let outcome = match published {
        Ok(ack) => {
            span.record("piecework.duplicate", ack.duplicate);
            tracing::debug!(flow = flow_id, tick = %entry.next, duplicate = ack.duplicate, "published poll job");
            if ack.duplicate {
                TickOutcome::duplicate
            } else {
                TickOutcome::published
            }
        }
        Err(err) => {
            tracing::warn!(flow = flow_id, tick = %entry.next, error = %err, "could not publish poll job");
            TickOutcome::failed
        }
    };
    runtime
        .metrics
        .scheduler_ticks
        .get_or_create(&TickLabels { outcome })
        .inc();
}

/// Where a polling flow's ticks sit within its interval: a hash of its id (FNV-1a, the same on
/// every scheduler and every release), so flows spread over the interval.
fn phase_of(flow_id: &str, schedule: &Schedule) -> chrono::Duration {
    let Schedule::Every(interval) = schedule else {
        return chrono::Duration::zero();
    };
    let step = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let hash = flow_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    chrono::Duration::milliseconds(i64::try_from(hash % step).unwrap_or(0))
}

/// The schedule of a flow's trigger — its poll interval, its cron, or none (webhooks) — and
/// whether it polls.
async fn schedule_of(
    runtime: &Runtime,
    flow: &FlowVersion,
) -> Result<Option<(Schedule, bool)>, String> {
    let trigger = &flow.definition.trigger;
    let missing = || {
        format!(
            "piece `{}` is not registered in this scheduler",
            trigger.piece
        )
    };
    let version = flow.trigger_version().ok_or_else(missing)?;
    let piece = runtime
        .catalog()
        .get_or_fetch(&trigger.piece, version)
        .await?
        .ok_or_else(missing)?;
    let handle = piece.trigger(&trigger.trigger).ok_or_else(|| {
        format!(
            "piece `{}` has no trigger `{}`",
            trigger.piece, trigger.trigger
        )
    })?;
    match handle {
        TriggerHandle::Webhook(_) => Ok(None),
        TriggerHandle::Polling(polling) => {
            let default_interval = match polling.spec().kind {
                TriggerKind::Polling {
                    default_interval, ..
                } => default_interval,
                _ => Duration::from_secs(60),
            };
            let interval = trigger.poll_interval.unwrap_or(default_interval);
            Schedule::every(interval)
                .map(|s| Some((s, true)))
                .map_err(|e| e.to_string())
        }
        TriggerHandle::Schedule(schedule) => schedule
            .schedule_json(serde_json::Value::Object(trigger.input.clone()))
            .await
            .map(|s| Some((s, false)))
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_phases_are_stable_and_spread_over_the_interval() {
        let every = Schedule::every(Duration::from_secs(60)).unwrap();
        assert_eq!(phase_of("tickets", &every), phase_of("tickets", &every));
        let phases: std::collections::BTreeSet<i64> = (0..1000)
            .map(|i| phase_of(&format!("flow-{i}"), &every).num_seconds())
            .collect();
        assert!(phases.len() > 55, "spread over the minute: {phases:?}");
        assert!(phases.iter().all(|p| (0..60).contains(p)));
        let cron = Schedule::cron("* * * * *").unwrap();
        assert_eq!(phase_of("tickets", &cron), chrono::Duration::zero());
    }

    #[test]
    fn a_phased_entry_ticks_at_its_phase_each_interval() {
        let entry = Entry {
            version: 1,
            queue: "default".into(),
            schedule: Schedule::every(Duration::from_secs(60)).unwrap(),
            phase: chrono::Duration::seconds(17),
            next: DateTime::UNIX_EPOCH,
        };
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        assert_eq!(entry.tick_after(at(120)), Some(at(137)));
        assert_eq!(entry.tick_after(at(137)), Some(at(197)));
        assert_eq!(entry.tick_after(at(136)), Some(at(137)));
    }
}

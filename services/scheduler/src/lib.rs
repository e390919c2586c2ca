//! The scheduler: publishes a poll job for every tick of every enabled flow whose trigger is
//! polling or scheduled.
//!
//! Ticks are pure functions of the clock and the flow (intervals are aligned to the epoch, cron
//! ticks are its matches), and a poll job's message id is `<flow>:<tick>`, so several schedulers
//! publish the same ids and the broker keeps one: schedulers run active-active with no leader.
//! A scheduler that was down does not catch up on missed ticks; it resumes at the next one.
//!
//! The scheduler re-reads the flow list every `refresh_interval`: one cheap store read, no
//! busy polling.

mod clock;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use piecework_core::FlowVersion;
use piecework_proto::v1::PollJob;
use piecework_runtime::{Runtime, RuntimeError};
use piecework_sdk::{Schedule, TriggerHandle, TriggerKind};
use piecework_telemetry::metrics::{TickLabels, TickOutcome};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use clock::Clock;

/// How the scheduler works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often the list of enabled flows is re-read.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(5),
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.refresh_interval < Duration::from_millis(100) {
            return Err("refresh_interval: must be at least 100ms".into());
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
    next: DateTime<Utc>,
}

/// Runs the scheduler until `shutdown` is cancelled.
pub async fn run(
    config: SchedulerConfig,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    config.validate().map_err(SchedulerError::Config)?;
    let clock = Clock::new();
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut next_refresh = clock.now();
    tracing::info!("scheduler started");
    loop {
        let now = clock.now();
        if now >= next_refresh {
            if let Err(err) = refresh(&runtime, &mut entries, now).await {
                tracing::warn!(error = %err, "could not refresh the flow list; keeping the previous one");
            }
            next_refresh = now + config.refresh_interval;
        }
        for (flow_id, entry) in entries.iter_mut().filter(|(_, e)| e.next <= now) {
            publish_tick(&runtime, flow_id, entry).await;
            match entry.schedule.next_after(now.max(entry.next)) {
                Some(next) => entry.next = next,
                None => entry.next = DateTime::<Utc>::MAX_UTC,
            }
        }
        let wake = entries
            .values()
            .map(|e| e.next)
            .fold(next_refresh, DateTime::min);
        let sleep = (wake - clock.now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tracing::info!("scheduler stopped");
    Ok(())
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

/// Brings `entries` in line with the enabled flows, keeping the next tick of flows whose
/// version did not change.
async fn refresh(
    runtime: &Runtime,
    entries: &mut HashMap<String, Entry>,
    now: DateTime<Utc>,
) -> Result<(), RuntimeError> {
    let flows = runtime.flow_records().await?;
    let mut wanted = HashMap::new();
    for record in flows.into_iter().filter(|f| f.enabled) {
        if let Some(entry) = entries
            .remove(&record.id)
            .filter(|e| e.version == record.latest_version)
        {
            wanted.insert(record.id, entry);
            continue;
        }
        let Some(flow) = runtime
            .flow_version(&record.id, record.latest_version)
            .await?
        else {
            continue;
        };
        match schedule_of(runtime, &flow).await {
            Ok(Some(schedule)) => {
                let Some(next) = schedule.next_after(now) else {
                    continue;
                };
                let queue = flow.definition.trigger.queue().to_owned();
                tracing::info!(flow = %record.id, version = flow.version, first_tick = %next, "scheduling flow");
                wanted.insert(
                    record.id,
                    Entry {
                        version: flow.version,
                        queue,
                        schedule,
                        next,
                    },
                );
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(flow = %record.id, error, "flow cannot be scheduled"),
        }
    }
    *entries = wanted;
    runtime
        .metrics
        .scheduled_flows
        .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
    Ok(())
}

/// The schedule of a flow's trigger: its poll interval, its cron, or none (webhooks).
async fn schedule_of(runtime: &Runtime, flow: &FlowVersion) -> Result<Option<Schedule>, String> {
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
                .map(Some)
                .map_err(|e| e.to_string())
        }
        TriggerHandle::Schedule(schedule) => schedule
            .schedule_json(serde_json::Value::Object(trigger.input.clone()))
            .await
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

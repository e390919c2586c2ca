//! Execution counts, error rates and latencies per flow and per piece over a recent window,
//! read from `pw:results` — every step attempt of the whole fleet, the data the workers'
//! step metrics count — for the console's overview (`GET /v1/stats`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use piecework_proto::v1::StepStatus;
use serde::Serialize;

use crate::{Runtime, RuntimeError};

/// At most this many attempts are read for one answer; the answer says when it stopped there.
pub const MAX_ATTEMPTS_READ: usize = 50_000;
const PAGE: usize = 1_000;

/// What the fleet did since `since`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Stats {
    pub since: DateTime<Utc>,
    /// Step attempts read.
    pub attempts: usize,
    /// True when the window held more than [`MAX_ATTEMPTS_READ`] attempts: the figures
    /// cover its oldest ones.
    pub truncated: bool,
    pub flows: Vec<Figures>,
    pub pieces: Vec<Figures>,
    /// The last verdict of every health-check step of an enabled flow.
    pub health: Vec<HealthCheck>,
}

/// What a piece's health check last said: the newest finished run of an enabled flow that
/// runs it (docs/private-pieces.md §10), read from the run itself, so the whole fleet's.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct HealthCheck {
    pub piece: String,
    pub flow: String,
    pub step: String,
    /// The check's `status` output was `healthy`.
    pub healthy: bool,
    /// Its `status` output (`healthy`, `unhealthy`, …), or the step's error.
    pub status: String,
    pub checked_at: Option<DateTime<Utc>>,
}

/// How many of a health-check flow's newest runs are looked at for one that ran the check.
const HEALTH_RUNS_READ: usize = 5;

/// The figures of one flow or one piece.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Figures {
    /// The flow's id or the piece's name.
    pub name: String,
    pub attempts: u64,
    pub failed: u64,
    /// `failed / attempts`.
    pub error_rate: f64,
    /// Attempts after the first (retries).
    pub retries: u64,
    /// Runs that ended in this window (flows only), by their final status.
    pub runs_succeeded: u64,
    pub runs_failed: u64,
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
}

#[derive(Default)]
struct Tally {
    figures: Figures,
    durations: Vec<u64>,
}

impl Tally {
    fn add(&mut self, result: &piecework_proto::v1::StepResult) {
        let figures = &mut self.figures;
        figures.attempts += 1;
        if result.status() == StepStatus::Failed {
            figures.failed += 1;
        }
        if result.attempt > 1 {
            figures.retries += 1;
        }
        self.durations.push(result.duration_ms);
    }

    fn finish(mut self, name: String) -> Figures {
        self.durations.sort_unstable();
        let at = |q: f64| {
            let last = self.durations.len().saturating_sub(1);
            self.durations
                .get(((last as f64) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let mut figures = self.figures;
        figures.name = name;
        figures.error_rate = if figures.attempts == 0 {
            0.0
        } else {
            figures.failed as f64 / figures.attempts as f64
        };
        figures.p50_ms = at(0.50);
        figures.p95_ms = at(0.95);
        figures.p99_ms = at(0.99);
        figures
    }
}

impl Runtime {
    /// The figures of every flow and piece since `since`.
    pub async fn stats(&self, since: DateTime<Utc>) -> Result<Stats, RuntimeError> {
        let mut cursor = self
            .store
            .results_cursor_at(since.timestamp_millis())
            .await?;
        let mut flows: BTreeMap<String, Tally> = BTreeMap::new();
        let mut pieces: BTreeMap<String, Tally> = BTreeMap::new();
        let mut attempts = 0;
        let truncated = loop {
            let page = self
                .store
                .read_results(cursor.as_deref(), PAGE, std::time::Duration::ZERO)
                .await?;
            for entry in &page {
                let result = &entry.event;
                let flow = flows.entry(result.flow_id.clone()).or_default();
                flow.add(result);
                match result.run_status() {
                    piecework_proto::v1::RunStatus::Succeeded => flow.figures.runs_succeeded += 1,
                    piecework_proto::v1::RunStatus::Failed => flow.figures.runs_failed += 1,
                    _ => {}
                }
                pieces.entry(result.piece.clone()).or_default().add(result);
            }
            attempts += page.len();
            let Some(last) = page.last() else {
                break false;
            };
            cursor = Some(last.id.clone());
            if page.len() < PAGE {
                break false;
            }
            if attempts >= MAX_ATTEMPTS_READ {
                break true;
            }
        };
        let finish = |tallies: BTreeMap<String, Tally>| {
            tallies
                .into_iter()
                .map(|(name, tally)| tally.finish(name))
                .collect()
        };
        Ok(Stats {
            since,
            attempts,
            truncated,
            flows: finish(flows),
            pieces: finish(pieces),
            health: self.health_checks().await?,
        })
    }

    /// The last verdict of every health-check step of the enabled flows.
    pub async fn health_checks(&self) -> Result<Vec<HealthCheck>, RuntimeError> {
        let registry = self.pieces();
        let mut checks = Vec::new();
        for record in self.flow_records().await?.iter().filter(|r| r.enabled) {
            let Some(flow) = self.flow_version(&record.id, record.latest_version).await? else {
                continue;
            };
            let steps: Vec<&piecework_core::flow::StepDef> = flow
                .definition
                .all_steps()
                .into_iter()
                .filter(|step| {
                    flow.step_version(&step.name)
                        .and_then(|version| registry.get(&step.piece, version))
                        .and_then(|piece| piece.action(&step.action))
                        .is_some_and(|action| action.spec().health_check)
                })
                .collect();
            if steps.is_empty() {
                continue;
            }
            let query = piecework_store::RunQuery {
                flow_id: Some(record.id.clone()),
                limit: HEALTH_RUNS_READ,
                ..Default::default()
            };
            let mut runs = Vec::new();
            for summary in self.runs(&query).await? {
                if let Some(run) = self.run(&summary.id).await? {
                    runs.push(run);
                }
            }
            for step in steps {
                let verdict = runs.iter().find_map(|run| {
                    let state = run.step(&step.name)?;
                    let status = match (&state.output, &state.error) {
                        (Some(output), _) => output.get("status")?.as_str()?.to_owned(),
                        (None, Some(error)) => error.clone(),
                        (None, None) => return None,
                    };
                    Some((status, run.finished_at))
                });
                let Some((status, checked_at)) = verdict else {
                    continue;
                };
                checks.push(HealthCheck {
                    piece: step.piece.clone(),
                    flow: record.id.clone(),
                    step: step.name.clone(),
                    healthy: status == "healthy",
                    status,
                    checked_at,
                });
            }
        }
        Ok(checks)
    }
}

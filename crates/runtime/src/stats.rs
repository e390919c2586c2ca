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
}

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
        })
    }
}

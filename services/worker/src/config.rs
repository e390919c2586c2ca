//! The worker's configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a worker consumes and runs jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name in logs, audit entries and attempt records; defaults to the host name and pid.
    pub id: String,
    /// Queues this worker serves: a step with `queue: internal` runs only on workers serving
    /// `internal`.
    pub queues: Vec<String>,
    /// Jobs run at once by this worker; it pulls no more than that.
    pub concurrency: usize,
    /// Unsettled jobs allowed per queue across all workers (the broker's `max_ack_pending`).
    pub max_ack_pending: usize,
    /// How long the broker waits for an ack before redelivering; long steps send progress.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// On shutdown, how long in-flight jobs may take before they go back to the queue.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most new items one poll turns into runs; the rest come with the next poll.
    pub max_items_per_poll: usize,
    /// Longest a trigger's poll may take.
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// The largest step output (as JSON) that is recorded; a larger one fails the step. Step
    /// errors and recorded inputs are cut to fit as well.
    pub max_output_bytes: usize,
    /// Steps one delivery runs: the job's step, then the steps after it on the same queue,
    /// inline, each journaled before the next. Beyond it, the next step gets a job of its own.
    pub max_steps_per_delivery: u32,
    /// Deliveries of one job beyond its retry policy's attempts that end in an
    /// infrastructure error (store or bus unreachable) before the worker stops running it:
    /// then it only records the failure, and once that is recorded drops the job.
    pub max_infra_retries: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: default_id(),
            queues: vec!["default".into()],
            concurrency: 16,
            max_ack_pending: 1000,
            // Short, so the step of a worker that died comes back within seconds: steps
            // longer than a third of it send progress.
            ack_wait: Duration::from_secs(6),
            shutdown_grace: Duration::from_secs(30),
            max_items_per_poll: 100,
            poll_timeout: Duration::from_secs(60),
            max_output_bytes: 2 * 1024 * 1024,
            max_steps_per_delivery: 32,
            max_infra_retries: 10,
        }
    }
}

fn default_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl WorkerConfig {
    /// Checks every value; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.queues.is_empty() {
            return Err("queues: serve at least one queue".into());
        }
        for queue in &self.queues {
            let ok = !queue.is_empty()
                && queue
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                return Err(format!(
                    "queues: {queue:?} must be lowercase letters, digits, '-' or '_'"
                ));
            }
        }
        if self.concurrency == 0 {
            return Err("concurrency: must be at least 1".into());
        }
        if self.max_ack_pending < self.concurrency {
            return Err("max_ack_pending: must be at least concurrency".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return Err("ack_wait: must be at least 1s".into());
        }
        if self.max_items_per_poll == 0 {
            return Err("max_items_per_poll: must be at least 1".into());
        }
        if self.poll_timeout.is_zero() {
            return Err("poll_timeout: must be greater than zero".into());
        }
        if self.max_steps_per_delivery == 0 {
            return Err("max_steps_per_delivery: must be at least 1".into());
        }
        if self.max_output_bytes < 1024 {
            return Err("max_output_bytes: must be at least 1024".into());
        }
        Ok(())
    }
}

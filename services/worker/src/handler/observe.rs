//! What an attempt leaves in logs, spans and metrics.

use std::time::Duration;

use piecework_core::flow::StepDef;
use piecework_core::{Run, RunStatus, StepStatus};
use piecework_proto::v1;
use piecework_telemetry::metrics::{self, HealthCheckLabels, HealthLabels, RunOutcome};

use super::Handler;

impl Handler {
    /// Puts an attempt on the step's span and into the step metrics.
    pub(super) fn observe_attempt(
        &self,
        step: &StepDef,
        version: &str,
        attempt: u32,
        status: StepStatus,
        duration: Duration,
        error: Option<&str>,
    ) {
        let span = tracing::Span::current();
        span.record("piecework.piece.version", version);
        span.record("piecework.attempt", attempt);
        span.record("piecework.outcome", status.as_str());
        if let Some(error) = error {
            // The recorded error: connection values are already masked in it.
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", error);
        }
        let outcome = match status {
            StepStatus::Succeeded => metrics::StepOutcome::succeeded,
            StepStatus::Retrying => metrics::StepOutcome::retrying,
            StepStatus::Failed => metrics::StepOutcome::failed,
            StepStatus::Stopped => metrics::StepOutcome::stopped,
            // Not a piece call's outcome.
            StepStatus::Waiting | StepStatus::Running => return,
        };
        if step.is_control() {
            // Not a piece call: the run's record and trace say what the step decided.
            return;
        }
        self.runtime.metrics.step_attempted(
            &step.piece,
            &step.action,
            version,
            outcome,
            duration.as_secs_f64(),
        );
    }

    /// Exports a health check action's verdict: `status: healthy` (or `healthy: true`) is
    /// healthy, anything else is not.
    pub(super) fn observe_health(&self, piece: &str, flow: &str, output: &serde_json::Value) {
        let healthy = output.get("status").and_then(|s| s.as_str()) == Some("healthy")
            || output.get("healthy").and_then(serde_json::Value::as_bool) == Some(true);
        let metrics = &self.runtime.metrics;
        metrics
            .piece_healthy
            .get_or_create(&HealthLabels {
                piece: piece.to_owned(),
                flow: flow.to_owned(),
            })
            .set(i64::from(healthy));
        metrics
            .health_checks
            .get_or_create(&HealthCheckLabels {
                piece: piece.to_owned(),
                healthy,
            })
            .inc();
    }
}

pub(super) fn log_attempt(
    run: &Run,
    step: &StepDef,
    attempt: u32,
    status: StepStatus,
    duration: Duration,
    error: Option<&str>,
) {
    match status {
        // Successes are the bulk of the traffic and are already in `pw:results`, the metrics
        // and the trace: logged at debug. Failures stay visible at warn.
        StepStatus::Succeeded => {
            tracing::debug!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, ?duration, "step succeeded")
        }
        StepStatus::Retrying => {
            tracing::warn!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, error, "step failed; will retry")
        }
        StepStatus::Failed => {
            tracing::warn!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, error, "step failed")
        }
        StepStatus::Waiting => {
            tracing::debug!(run_id = %run.id, flow = %run.flow_id, step = %step.name, "run waits")
        }
        StepStatus::Running => {
            tracing::debug!(run_id = %run.id, flow = %run.flow_id, step = %step.name, "loop started")
        }
        StepStatus::Stopped => {
            tracing::info!(run_id = %run.id, flow = %run.flow_id, step = %step.name, attempt, "step stopped: the run ended")
        }
    }
}

pub(super) fn run_outcome(status: RunStatus) -> RunOutcome {
    match status {
        RunStatus::Failed => RunOutcome::failed,
        RunStatus::Cancelled => RunOutcome::cancelled,
        RunStatus::Running | RunStatus::Waiting | RunStatus::Succeeded => RunOutcome::succeeded,
    }
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn proto_step_status(status: StepStatus) -> v1::StepStatus {
    match status {
        StepStatus::Succeeded => v1::StepStatus::Succeeded,
        StepStatus::Retrying => v1::StepStatus::Retrying,
        StepStatus::Failed => v1::StepStatus::Failed,
        StepStatus::Waiting => v1::StepStatus::Waiting,
        StepStatus::Running => v1::StepStatus::Running,
        StepStatus::Stopped => v1::StepStatus::Stopped,
    }
}

pub(super) fn proto_run_status(status: RunStatus) -> v1::RunStatus {
    match status {
        RunStatus::Running => v1::RunStatus::Running,
        RunStatus::Succeeded => v1::RunStatus::Succeeded,
        RunStatus::Failed => v1::RunStatus::Failed,
        RunStatus::Cancelled => v1::RunStatus::Cancelled,
        RunStatus::Waiting => v1::RunStatus::Waiting,
    }
}

//! The live feed of `piecework dev`: one line per step attempt and per finished run, read from
//! the `pw:results` stream (so it shows exactly what was recorded).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Local};
use piecework_proto::v1::{RunStatus, StepResult, StepStatus};
use piecework_runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Prints results appended after `after` until `shutdown`.
pub async fn run(runtime: Arc<Runtime>, after: Option<String>, shutdown: CancellationToken) {
    let color = std::io::stdout().is_terminal();
    let mut cursor = after;
    loop {
        let read = tokio::select! {
            read = runtime.read_results(cursor.as_deref(), 100, Duration::from_secs(5)) => read,
            () = shutdown.cancelled() => return,
        };
        match read {
            Ok(entries) => {
                let mut out = std::io::stdout().lock();
                for entry in entries {
                    let _ = writeln!(out, "{}", line(&entry.event, color));
                    if let Some(run_line) = run_line(&entry.event, color) {
                        let _ = writeln!(out, "{run_line}");
                    }
                    cursor = Some(entry.id);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "feed cannot read results");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn paint(text: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn time(result: &StepResult) -> String {
    DateTime::from_timestamp_millis(result.finished_unix_ms)
        .map(|t| t.with_timezone(&Local).format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

fn short(run_id: &str) -> &str {
    run_id.get(..8).unwrap_or(run_id)
}

/// `12:00:01.123  heartbeat  3f2a9c1e  bump       ✓ succeeded   1ms`
pub fn line(result: &StepResult, color: bool) -> String {
    let (mark, status, code) = match result.status() {
        StepStatus::Succeeded => ("✓", "succeeded", "32"),
        StepStatus::Retrying => ("↻", "retrying", "33"),
        StepStatus::Failed => ("✗", "failed", "31"),
        StepStatus::Waiting => ("⏸", "waiting", "36"),
        StepStatus::Running => ("↺", "looping", "36"),
        StepStatus::Stopped => ("■", "stopped", "35"),
        StepStatus::Skipped | StepStatus::Unspecified => ("·", "skipped", "2"),
    };
    let attempt = if result.attempt > 1 {
        format!(" (attempt {})", result.attempt)
    } else {
        String::new()
    };
    let branch = if result.branch.is_empty() {
        String::new()
    } else {
        format!(" → {}", result.branch)
    };
    let error = if result.error.is_empty() {
        String::new()
    } else {
        format!("  {}", paint(&result.error, "31", color))
    };
    format!(
        "{}  {:<12} {}  {:<12} {} {:<10} {:>5}ms{attempt}{branch}{error}",
        paint(&time(result), "2", color),
        result.flow_id,
        paint(short(&result.run_id), "36", color),
        result.step,
        paint(mark, code, color),
        status,
        result.duration_ms,
    )
}

/// A line for the run when this attempt finished it.
fn run_line(result: &StepResult, color: bool) -> Option<String> {
    let (text, code) = match result.run_status() {
        RunStatus::Succeeded => ("run succeeded", "1;32"),
        RunStatus::Failed => ("run failed", "1;31"),
        RunStatus::Cancelled => ("run cancelled", "1;33"),
        RunStatus::Waiting => ("run waiting", "1;36"),
        RunStatus::Running | RunStatus::Unspecified => return None,
    };
    Some(format!(
        "{}  {:<12} {}  {}",
        paint(&time(result), "2", color),
        result.flow_id,
        paint(short(&result.run_id), "36", color),
        paint(text, code, color)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_step_status_duration_and_error() {
        let result = StepResult {
            run_id: "3f2a9c1e-0000".into(),
            flow_id: "heartbeat".into(),
            step: "bump".into(),
            attempt: 2,
            status: StepStatus::Failed as i32,
            duration_ms: 12,
            error: "HTTP 503: down".into(),
            run_status: RunStatus::Failed as i32,
            ..StepResult::default()
        };
        let text = line(&result, false);
        assert!(text.contains("heartbeat"), "{text}");
        assert!(text.contains("3f2a9c1e  bump"), "{text}");
        assert!(text.contains("✗ failed"), "{text}");
        assert!(text.contains("12ms (attempt 2)  HTTP 503: down"), "{text}");
        assert!(run_line(&result, false).unwrap().ends_with("run failed"));
        let chose = StepResult {
            step: "triage".into(),
            status: StepStatus::Succeeded as i32,
            branch: "else".into(),
            ..StepResult::default()
        };
        let text = line(&chose, false);
        assert!(text.ends_with("0ms → else"), "{text}");
    }
}

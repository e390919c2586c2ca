//! Subjects and message ids of the wire contract, and typed publishing of jobs.
//!
//! Every publish runs in a `publish <subject>` producer span (OpenTelemetry `messaging.*`
//! conventions) whose trace context travels in the message headers, so the worker that
//! receives the job can link to it.

use bytes::Bytes;
use piecework_proto::Message as _;
use piecework_proto::v1::{PollJob, StepJob};
use piecework_telemetry::propagation;
use tracing::Instrument as _;

use crate::{Bus, BusError, Message, PublishAck};

/// Which job a subject carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Poll,
    Step,
}

/// Subject names: `pw.jobs.<queue>.poll` and `pw.jobs.<queue>.step`.
pub mod subject {
    use super::JobKind;

    pub const PREFIX: &str = "pw.jobs";

    pub fn poll(queue: &str) -> String {
        format!("{PREFIX}.{queue}.poll")
    }

    pub fn step(queue: &str) -> String {
        format!("{PREFIX}.{queue}.step")
    }

    /// All subjects of a queue, as a consumer filter.
    pub fn queue_filter(queue: &str) -> String {
        format!("{PREFIX}.{queue}.*")
    }

    /// Splits a subject into its queue and job kind.
    pub fn parse(subject: &str) -> Option<(&str, JobKind)> {
        let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
        let (queue, kind) = rest.rsplit_once('.')?;
        let kind = match kind {
            "poll" => JobKind::Poll,
            "step" => JobKind::Step,
            _ => return None,
        };
        (!queue.is_empty() && !queue.contains('.')).then_some((queue, kind))
    }
}

/// `<flow>:<tick>`: every scheduler computes the same id for the same tick.
pub fn poll_msg_id(job: &PollJob) -> String {
    format!("{}:{}", job.flow_id, job.tick_unix_ms)
}

/// `<run>:<step>`, plus the retry epoch once a run has been retried by hand, or `:wake:<ms>`
/// for a job that wakes a waiting step.
pub fn step_msg_id(job: &StepJob) -> String {
    if job.wake_ms > 0 {
        format!("{}:{}:wake:{}", job.run_id, job.step, job.wake_ms)
    } else if job.epoch == 0 {
        format!("{}:{}", job.run_id, job.step)
    } else {
        format!("{}:{}:{}", job.run_id, job.step, job.epoch)
    }
}

pub async fn publish_poll(
    bus: &dyn Bus,
    queue: &str,
    job: &PollJob,
) -> Result<PublishAck, BusError> {
    publish(
        bus,
        subject::poll(queue),
        poll_msg_id(job),
        job.encode_to_vec(),
    )
    .await
}

pub async fn publish_step(
    bus: &dyn Bus,
    queue: &str,
    job: &StepJob,
) -> Result<PublishAck, BusError> {
    publish(
        bus,
        subject::step(queue),
        step_msg_id(job),
        job.encode_to_vec(),
    )
    .await
}

/// Publishes in a producer span whose context rides along in the headers.
async fn publish(
    bus: &dyn Bus,
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
) -> Result<PublishAck, BusError> {
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {subject}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = bus.system(),
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %subject,
        messaging.message.id = %msg_id,
        messaging.message.body.size = payload.len(),
    );
    let message = Message {
        headers: propagation::headers_of(&span),
        subject,
        msg_id,
        payload: Bytes::from(payload),
    };
    let published = bus.publish(message).instrument(span.clone()).await;
    if published.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    published
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        assert_eq!(
            subject::parse(&subject::poll("default")),
            Some(("default", JobKind::Poll))
        );
        assert_eq!(
            subject::parse(&subject::step("vpn-a")),
            Some(("vpn-a", JobKind::Step))
        );
        assert_eq!(subject::parse("pw.jobs.default.other"), None);
        assert_eq!(subject::parse("pw.jobs..step"), None);
        assert_eq!(subject::parse("other.default.step"), None);
    }

    #[test]
    fn message_ids_follow_the_contract() {
        let poll = PollJob {
            flow_id: "f".into(),
            flow_version: 3,
            tick_unix_ms: 1000,
        };
        assert_eq!(poll_msg_id(&poll), "f:1000");
        let mut step = StepJob {
            run_id: "r".into(),
            flow_id: "f".into(),
            flow_version: 1,
            step: "s".into(),
            epoch: 0,
            delay_ms: 0,
            wake_ms: 0,
        };
        assert_eq!(step_msg_id(&step), "r:s");
        step.epoch = 2;
        assert_eq!(step_msg_id(&step), "r:s:2");
        step.wake_ms = 1_800_000_000_000;
        assert_eq!(step_msg_id(&step), "r:s:wake:1800000000000");
    }
}

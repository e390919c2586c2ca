//! Property tests of the wire messages: whatever bytes arrive on a job subject, decoding
//! answers (a job or an error) and never panics, and every job survives a round trip.
//! `PROPTEST_CASES` sets how many cases run (`just fuzz` runs millions).

use piecework_proto::Message as _;
use piecework_proto::v1::{AuditEvent, PollJob, StepJob, StepResult};
use proptest::prelude::*;

fn step_job() -> impl Strategy<Value = StepJob> {
    (
        ".{0,40}",
        "[a-z0-9-]{0,20}",
        any::<u32>(),
        ".{0,30}",
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(run_id, flow_id, flow_version, step, epoch, delay_ms, wake_ms)| StepJob {
                run_id,
                flow_id,
                flow_version,
                step,
                epoch,
                delay_ms,
                wake_ms,
            },
        )
}

proptest! {
    #[test]
    fn any_bytes_decode_to_a_job_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = StepJob::decode(bytes.as_slice());
        let _ = PollJob::decode(bytes.as_slice());
        let _ = StepResult::decode(bytes.as_slice());
        let _ = AuditEvent::decode(bytes.as_slice());
    }

    #[test]
    fn step_jobs_round_trip(job in step_job()) {
        let bytes = job.encode_to_vec();
        prop_assert_eq!(StepJob::decode(bytes.as_slice()).unwrap(), job);
    }

    #[test]
    fn a_cut_or_altered_step_job_never_panics(
        job in step_job(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = job.encode_to_vec();
        if !bytes.is_empty() {
            let at = flip.index(bytes.len());
            bytes[at] = byte;
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        // Either an error or some job: the worker terminates what it cannot use.
        let _ = StepJob::decode(bytes.as_slice());
    }

    #[test]
    fn poll_jobs_round_trip(flow_id in ".{0,40}", flow_version in any::<u32>(), tick in any::<i64>()) {
        let job = PollJob { flow_id, flow_version, tick_unix_ms: tick };
        prop_assert_eq!(PollJob::decode(job.encode_to_vec().as_slice()).unwrap(), job);
    }
}

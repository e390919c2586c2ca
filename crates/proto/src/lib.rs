//! The protobuf messages of piecework's wire contract.
//!
//! `jobs.proto` holds what travels on NATS (`PollJob`, `StepJob`); `events.proto` what is
//! recorded in the store's streams (`StepResult` for `pw:results`, `AuditEvent` for
//! `pw:audit`). The sources live in `proto/piecework/v1/` at the workspace root and are compiled
//! by `build.rs` with protox, so no system `protoc` is needed.

/// Version 1 of the contract. Fields are only added, never renumbered.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/piecework.v1.rs"));
}

pub use prost::Message;

//! The pieces framework: what a piece author writes against.
//!
//! A piece is built with [`Piece::builder`] the way the guide's `createPiece` does it: metadata
//! (name, version, auth, categories, …), then actions and triggers. Actions implement
//! [`Action`] with typed input and output; the framework validates the input against the
//! declared [`Prop`]s before `run`, so errors name the prop at fault. Triggers are polling
//! (deduplicated here, in [`polling`]), webhook or schedule.
//!
//! A piece runs either inside a piecework process (the built-in pieces) or as its own program:
//! `fn main() { piecework_sdk::serve(piece()) }` makes the same [`Piece`] an executable that
//! speaks piece protocol v1 ([`protocol`]) with the worker that starts it, and `piecework piece
//! build` packs that executable into a deployable bundle.
//!
//! Layout: `piece` (the builder and metadata), `action`, `trigger`, `prop`, `auth`,
//! `context` (what `run` receives: auth, store, HTTP client, run info), `egress` (the guard that checks
//! destinations by address), `http` (the egress-aware client), `mask` (secrets kept out of text), `polling` (dedupe strategies), `schedule`
//! (interval and cron ticks), `error`,
//! `protocol` (the wire types of piece protocol v1) and `serve` (the piece's end of it).

pub mod action;
pub mod auth;
pub mod context;
pub mod egress;
pub mod error;
pub mod http;
pub mod mask;
pub mod piece;
pub mod polling;
pub mod prop;
pub mod protocol;
pub mod schedule;
pub mod serve;
pub mod trigger;

pub use action::{Action, ActionSpec, DynAction};
pub use auth::{PieceAuth, ValidateAuth};
pub use context::{
    Context, KvStore, MemoryKv, Owner, Principal, ProgressSink, RunInfo, Scope, ScopedKv,
    ScopedStore,
};
pub use error::{ErrorKind, PieceError};
pub use http::{EgressPolicy, HttpClient};
pub use piece::{Piece, PieceBuilder, PieceDefinitionError, PieceMetadata, category};
pub use polling::{DedupeStrategy, PollCursor, PollState, PolledItem};
pub use prop::{DropdownOption, DropdownOptions, Prop, PropError, PropKind};
pub use schedule::Schedule;
pub use serve::serve;
pub use trigger::{
    PollingTrigger, ScheduleTrigger, TriggerHandle, TriggerHook, TriggerKind, TriggerSpec,
    WebhookRequest, WebhookTrigger,
};

/// Re-exported so pieces need not depend on these directly.
pub use {chrono, reqwest, semver, serde, serde_json};

/// Everything a piece module usually needs.
pub mod prelude {
    pub use crate::{
        Action, ActionSpec, Context, DedupeStrategy, DropdownOptions, Piece, PieceAuth, PieceError,
        PolledItem, PollingTrigger, Prop, PropKind, Schedule, ScheduleTrigger, Scope, TriggerSpec,
        ValidateAuth, WebhookRequest, WebhookTrigger, category,
    };
}

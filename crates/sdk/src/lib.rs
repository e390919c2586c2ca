//! The pieces framework: what a piece author writes against.
//!
//! A piece is built with [`Piece::builder`] the way the guide's `createPiece` does it: metadata
//! (name, version, auth, categories, …), then actions and triggers. Actions implement
//! [`Action`] with typed input and output; the framework validates the input against the
//! declared [`Prop`]s before `run`, so errors name the prop at fault. Triggers are polling
//! (deduplicated here, in [`polling`]), webhook or schedule.
//!
//! Layout: `piece` (the builder and metadata), `action`, `trigger`, `prop`, `auth`,
//! `context` (what `run` receives: auth, store, HTTP client, run info), `http` (the egress-aware
//! client), `polling` (dedupe strategies), `schedule` (interval and cron ticks), `error`.

pub mod action;
pub mod auth;
pub mod context;
pub mod error;
pub mod http;
pub mod piece;
pub mod polling;
pub mod prop;
pub mod schedule;
pub mod trigger;

pub use action::{Action, ActionSpec, DynAction};
pub use auth::{PieceAuth, ValidateAuth};
pub use context::{Context, KvStore, MemoryKv, Owner, RunInfo, Scope, ScopedStore};
pub use error::{ErrorKind, PieceError};
pub use http::{EgressPolicy, HttpClient};
pub use piece::{Piece, PieceBuilder, PieceDefinitionError, PieceMetadata, category};
pub use polling::{DedupeStrategy, PollState, PolledItem};
pub use prop::{DropdownOption, Prop, PropError, PropKind};
pub use schedule::Schedule;
pub use trigger::{
    PollingTrigger, ScheduleTrigger, TriggerHandle, TriggerKind, TriggerSpec, WebhookRequest,
    WebhookTrigger,
};

/// Re-exported so pieces need not depend on these directly.
pub use {chrono, reqwest, semver, serde, serde_json};

/// Everything a piece module usually needs.
pub mod prelude {
    pub use crate::{
        Action, ActionSpec, Context, DedupeStrategy, Piece, PieceAuth, PieceError, PolledItem,
        PollingTrigger, Prop, PropKind, Schedule, ScheduleTrigger, Scope, TriggerSpec,
        ValidateAuth, WebhookRequest, WebhookTrigger, category,
    };
}

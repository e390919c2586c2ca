//! The core of piecework, free of infrastructure: who may do what ([`access`]), the flow model and its validation
//! ([`flow`]), templates in step inputs ([`template`]), the retry policy ([`retry`]), the
//! registry of pieces ([`registry`]), runs ([`run`]), the execution of one step attempt
//! ([`engine`]) and what happens next to a run ([`lifecycle`]).
//!
//! Services combine these with a bus and a store; everything here is testable without either.

pub mod access;
pub mod docs;
pub mod engine;
pub mod flow;
pub mod lifecycle;
pub mod registry;
pub mod retry;
pub mod run;
pub mod template;
pub mod versioning;

pub use flow::{
    FlowDefinition, FlowError, FlowVersion, Format, OnFailure, StepDef, TriggerDef, ValidFlow,
    WebhookAuth,
};
pub use registry::{Catalog, Registry};
pub use retry::RetryPolicy;
pub use run::{Run, RunStatus, RunSummary, StepState, StepStatus};

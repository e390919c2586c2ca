//! What the API answers: one type per response body. The handlers build these, and the
//! OpenAPI document ([`crate::openapi`]) describes them from the same definitions, so the
//! contract cannot drift from what is sent.

use chrono::{DateTime, Utc};
use piecework_core::registry::Origin;
use piecework_core::run::{Run, RunStatus};
use piecework_core::{FlowVersion, WebhookAuth};
use piecework_runtime::ConnectionInfo;
use piecework_runtime::access::ApiKeyInfo;
use piecework_sdk::PieceMetadata;
use piecework_store::FlowRecord;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"error": {…}}`: every error the API answers.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `not_found`, `bad_request`, `invalid_flow`, `unauthorized`,
    /// `forbidden`, `conflict`, `rate_limited`, `piece_failed`, `run_failed`, …
    pub code: String,
    /// What went wrong, for people; never holds a secret.
    pub message: String,
    /// `invalid_flow`: every problem with its location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// `run_failed` (a synchronous webhook call): the run that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Flows {
    pub flows: Vec<FlowRecord>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FlowDetail<'a> {
    pub flow: FlowRecord,
    /// The flow's latest version (what runs start on).
    pub latest: Option<&'a FlowVersion>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FlowVersionDetail<'a> {
    pub version: &'a FlowVersion,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FlowState {
    pub flow: FlowRecord,
}

/// What applying a flow did.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AppliedFlow {
    pub flow: FlowRecord,
    pub version: u32,
    /// False when the definition equals the latest version's: nothing new was made.
    pub created: bool,
    /// For a webhook flow: how callers prove themselves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WebhookInfo {
    pub auth: WebhookAuth,
    /// A new flow's secret, shown this once (admins read it again at
    /// `/v1/flows/{id}/webhook-secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct WebhookSecret {
    pub flow: String,
    pub secret: String,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Runs {
    pub runs: Vec<piecework_core::run::RunSummary>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunDetail {
    pub run: Run,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunStarted {
    pub run_id: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunResumed {
    pub run_id: String,
    pub status: RunStatus,
}

/// A webhook call taken: the runs it started.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WebhookAccepted {
    /// The first run (`null` when the flow debounces: the run starts later).
    pub run_id: Option<String>,
    pub run_ids: Vec<String>,
    /// A debouncing flow: when the run starts unless more calls come.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_until: Option<DateTime<Utc>>,
    /// The call's trace, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A synchronous call whose run outlasted `sync_timeout`: where to follow it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StillRunning {
    pub run_id: String,
    pub run_ids: Vec<String>,
    pub status: RunStatus,
    /// `/v1/runs/{id}` (needs a key with the viewer role).
    pub status_url: String,
    pub message: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditEntries {
    pub entries: Vec<AuditEntry>,
    /// Set when the page stopped early: pass as `after` for more.
    pub next: Option<String>,
    /// The last entry looked at: where a tail resumes.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditEntry {
    pub id: String,
    /// `api:NAME`, `worker:ID`, `webhook`, `scheduler:ID`, …
    pub actor: String,
    pub action: String,
    pub resource: String,
    /// `success` or `failure`.
    pub outcome: String,
    pub time: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Connections {
    pub connections: Vec<ConnectionInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ConnectionDetail {
    pub connection: ConnectionInfo,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ApiKeys {
    pub api_keys: Vec<ApiKeyInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ApiKeyCreated {
    pub api_key: ApiKeyInfo,
    /// The key itself: shown this once, stored only hashed.
    pub key: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Pieces<'a> {
    /// The newest version of each piece.
    pub pieces: Vec<&'a PieceMetadata>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PieceDetail<'a> {
    pub piece: &'a PieceMetadata,
    /// Where this process loaded it from.
    pub origin: Option<Origin>,
    /// Every version this process serves, newest first.
    pub versions: Vec<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PieceVersion<'a> {
    pub piece: &'a PieceMetadata,
    pub origin: Origin,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PieceVersions {
    pub piece: String,
    pub versions: Vec<piecework_runtime::pieces::VersionInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PiecePublished {
    pub piece: PublishedBundle,
    /// False when this exact bundle was already published.
    pub created: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PublishedBundle {
    pub name: String,
    #[schemars(with = "String")]
    pub version: semver::Version,
    /// `sha256:…`
    pub digest: String,
    pub size: u64,
    pub publisher: String,
    pub published_at: DateTime<Utc>,
    /// The id of the key that signed it.
    pub signed_by: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PieceYanked {
    pub yanked: YankedBundle,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct YankedBundle {
    pub name: String,
    #[schemars(with = "String")]
    pub version: semver::Version,
    pub digest: String,
}

/// Who is calling.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WhoAmI {
    /// The key's name (`anonymous` on an open API: `piecework dev` on loopback).
    pub name: String,
    pub role: piecework_core::access::Role,
    /// What the role may do (the console offers only these).
    pub permissions: Vec<piecework_core::access::Permission>,
}

/// `/readyz`: `ok`, or what is wrong with each backend.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Readiness {
    pub store: String,
    pub bus: String,
}

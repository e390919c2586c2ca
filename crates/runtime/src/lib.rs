//! What the api, scheduler and worker share: a [`Runtime`] holding the store, the bus, the
//! catalog of pieces and the host that runs bundles, with the operations more than one
//! service performs — applying a flow, starting a run, publishing a step, cancelling or
//! retrying a run, saving and opening connections (sealed by the keyring in [`secrets`],
//! re-sealed under a new key by [`rotation`]),
//! publishing and yanking pieces ([`pieces`]), named API keys ([`access`]), running a
//! trigger's enable and disable hooks when its flow starts or stops listening
//! (`trigger_hooks`), the figures the console shows ([`stats`]), recording an audit event.
//!
//! `piecework dev` builds one `Runtime` on the in-memory adapters and hands it to all three
//! services; the separate processes each build their own on NATS and Redis.

pub mod access;
mod clock;
pub mod pieces;
pub mod rotation;
pub mod secrets;
pub mod stats;
mod trigger_hooks;
pub mod upgrade;
pub mod webhooks;

pub use clock::Clock;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use piecework_bus::Bus;
use piecework_bus::jobs;
use piecework_core::flow::{self, FlowDefinition, FlowVersion};
use piecework_core::{Catalog, FlowError, Registry, Run, RunStatus, StepStatus, lifecycle, run};
use piecework_proto::v1::{AuditEvent, StepJob, StepResult};
use piecework_sdk::{
    Context, DropdownOptions, EgressPolicy, HttpClient, Owner, Piece, PieceError, RunInfo,
    ScopedStore,
};
use piecework_store::{Applied, ConnectionRecord, OutboxJob, StepUpdate, Store, StoreError, Timer};
use piecework_telemetry::Metrics;
use piecework_telemetry::metrics::{QueueLabels, TriggerKind};
use piecework_telemetry::propagation;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument as _;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] piecework_bus::BusError),
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error("cannot build the HTTP client for pieces: {0}")]
    Http(PieceError),
    #[error("no run `{0}`")]
    NoSuchRun(String),
    #[error("no connection `{0}`")]
    NoSuchConnection(String),
    #[error("{0}")]
    InvalidConnection(String),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error("{0}")]
    Conflict(String),
    #[error("the bundle is refused: {0}")]
    InvalidBundle(String),
    #[error("no piece `{0}`")]
    NoSuchPiece(String),
    #[error("no flow `{0}`")]
    NoSuchFlow(String),
    #[error(transparent)]
    Registry(#[from] piecework_bus::pieces::RegistryError),
    #[error("no API key `{0}`")]
    NoSuchApiKey(String),
    /// A request that names something invalid.
    #[error("{0}")]
    Invalid(String),
    /// A webhook call admitted on a flow record that changed since (disabled, re-applied):
    /// admit it again from the current record.
    #[error("flow `{0}` changed while the call was admitted")]
    StaleAdmission(String),
    /// Something the operation needs is not answering; trying again later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A piece asked for something (dropdown options) answered with an error.
    #[error("{0}")]
    PieceFailed(String),
}

/// What the API shows of a connection: never its values.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ConnectionInfo {
    pub name: String,
    pub piece: String,
    pub key_id: String,
    pub created_at: chrono::DateTime<Utc>,
    pub updated_at: chrono::DateTime<Utc>,
    /// When a step or a trigger last used it (to the minute; `null`: not since it was made).
    pub last_used_at: Option<chrono::DateTime<Utc>>,
}

impl From<&ConnectionRecord> for ConnectionInfo {
    fn from(record: &ConnectionRecord) -> Self {
        Self {
            name: record.name.clone(),
            piece: record.piece.clone(),
            key_id: record.key_id.clone(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            last_used_at: None,
        }
    }
}

/// How often one process records that a connection was used: "last used" is to the minute,
/// and a busy worker writes it once a minute per connection, not once per step.
const CONNECTION_USE_EVERY: Duration = Duration::from_secs(60);

/// How connections are bound now: to their name and their piece (1). Connections sealed
/// before were bound to their name alone (0) and are re-sealed by `piecework key rotate`.
pub(crate) const CONNECTION_BINDING: u8 = 1;

/// The associated data of a connection's sealed values. Names and pieces never contain `@`,
/// so the two forms cannot collide.
/// How long a piece may take to load a dropdown's options.
pub const OPTIONS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a job may sit in the outbox before the relay publishes it for its publisher, and
/// how often the relay looks.
pub const OUTBOX_GRACE: Duration = Duration::from_secs(2);

/// How often a relay looks at the outbox when its process left nothing there.
pub const OUTBOX_SWEEP: Duration = Duration::from_secs(30);

/// Outbox jobs the relay reads at once.
const OUTBOX_BATCH: usize = 256;

/// The queue serving step `step` (a recorded name) of `flow`.
fn queue_of<'f>(flow: &'f FlowVersion, step: &str) -> &'f str {
    flow.definition
        .step(flow::split_instance(step).0)
        .map_or(flow::DEFAULT_QUEUE, |s| s.queue())
}

/// The outbox job of a new run's first step (none for a flow without steps).
fn first_job(flow: &FlowVersion, run_id: &str) -> Vec<OutboxJob> {
    lifecycle::first_step(&flow.definition)
        .map(|first| OutboxJob {
            run_id: run_id.to_owned(),
            flow_id: flow.flow_id.clone(),
            flow_version: flow.version,
            step: first.name.clone(),
            epoch: 0,
        })
        .into_iter()
        .collect()
}

/// What [`Runtime::prop_options`] loads.
#[derive(Debug, Clone)]
pub struct OptionsQuery<'a> {
    pub piece: &'a str,
    /// The piece's version; the newest when absent.
    pub version: Option<&'a str>,
    pub action: Option<&'a str>,
    pub trigger: Option<&'a str>,
    pub prop: &'a str,
    pub connection: Option<&'a str>,
    /// The values of the member's props given so far.
    pub input: Value,
}

/// The member of a piece whose dropdown's options are loaded.
enum OptionsMember<'p> {
    Action(&'p Arc<dyn piecework_sdk::DynAction>),
    Trigger(&'p Arc<dyn piecework_sdk::trigger::DynPolling>),
}

/// Finds the member of `piece` that declares dynamic dropdown `prop`: the one named, or the
/// only one with such a prop.
fn options_member<'p>(
    piece: &'p Piece,
    action: Option<&str>,
    trigger: Option<&str>,
    prop: &str,
) -> Result<OptionsMember<'p>, RuntimeError> {
    let has_dropdown = |props: &[piecework_sdk::Prop]| {
        props.iter().any(|p| {
            p.name == prop && matches!(p.kind, piecework_sdk::PropKind::DynamicDropdown { .. })
        })
    };
    let name = piece.name();
    match (action, trigger) {
        (Some(_), Some(_)) => Err(RuntimeError::Invalid(
            "name an action or a trigger, not both".into(),
        )),
        (Some(action), None) => piece
            .action(action)
            .map(OptionsMember::Action)
            .ok_or_else(|| {
                RuntimeError::Invalid(format!("piece `{name}` has no action `{action}`"))
            }),
        (None, Some(trigger)) => match piece.trigger(trigger) {
            Some(piecework_sdk::TriggerHandle::Polling(polling)) => {
                Ok(OptionsMember::Trigger(polling))
            }
            Some(_) => Err(RuntimeError::Invalid(format!(
                "trigger `{trigger}` of `{name}` is not a polling trigger: only actions and polling triggers load options"
            ))),
            None => Err(RuntimeError::Invalid(format!(
                "piece `{name}` has no trigger `{trigger}`"
            ))),
        },
        (None, None) => {
            let mut found = piece
                .actions()
                .filter(|a| has_dropdown(&a.spec().props))
                .map(OptionsMember::Action)
                .chain(piece.triggers().filter_map(|t| match t {
                    piecework_sdk::TriggerHandle::Polling(p) if has_dropdown(&p.spec().props) => {
                        Some(OptionsMember::Trigger(p))
                    }
                    _ => None,
                }));
            match (found.next(), found.next()) {
                (Some(member), None) => Ok(member),
                (None, _) => Err(RuntimeError::Invalid(format!(
                    "piece `{name}` has no dynamic dropdown `{prop}`"
                ))),
                (Some(_), Some(_)) => Err(RuntimeError::Invalid(format!(
                    "several members of `{name}` have a dropdown `{prop}`: say which with `action` or `trigger`"
                ))),
            }
        }
    }
}

fn connection_context(name: &str, piece: &str, binding: u8) -> String {
    match binding {
        0 => name.to_owned(),
        _ => format!("{name}@{piece}"),
    }
}

fn is_connection_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// What applying a flow did, and for a webhook flow how callers authenticate — with the
/// secret when this apply created it (it is never shown again, except to admins).
#[derive(Debug, Clone)]
pub struct AppliedFlow {
    pub applied: Applied,
    pub webhook_auth: Option<piecework_core::WebhookAuth>,
    pub webhook_secret: Option<String>,
}

/// Who did something, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub fn api(principal: &str) -> Self {
        Self(format!("api:{principal}"))
    }

    pub fn worker(id: &str) -> Self {
        Self(format!("worker:{id}"))
    }

    /// A webhook call: unauthenticated, addressed by flow.
    pub fn webhook() -> Self {
        Self("webhook".to_owned())
    }
}

/// Shared state and operations of the services. Cheap to share behind an `Arc`.
///
/// The only way to the store and the bus: every service goes through its operations, so the
/// rules (auditing, the run lifecycle, masking) cannot be walked around.
pub struct Runtime {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    /// The pieces this process can run: built in, and bundles as they come and go.
    catalog: Arc<Catalog>,
    /// This process's metrics, served at `/metrics`.
    pub metrics: Arc<Metrics>,
    http: HttpClient,
    /// Seals and opens connection values; `None` in processes that never touch them.
    keyring: Option<secrets::Keyring>,
    /// Flow versions are immutable, so they are cached forever (per process).
    versions: Mutex<HashMap<(String, u32), Arc<FlowVersion>>>,
    /// Flow records as webhook admission last read them. A stale one is harmless: creating
    /// the run checks the record in the store, and a refusal sends the call back for a fresh
    /// read ([`webhooks`]).
    admissions: Mutex<HashMap<String, piecework_store::FlowRecord>>,
    /// When this process last recorded each connection's use.
    connections_touched: Mutex<HashMap<String, std::time::Instant>>,
    /// Set when this process left jobs in the outbox (a publish failed): its relay looks again
    /// soon instead of at its next sweep.
    outbox_pending: std::sync::atomic::AtomicBool,
    /// Runs this process's bundles; `None` where none run (some CLI tools).
    host: Option<Arc<piecework_host::PieceHost>>,
    /// The time as this process sees it: wall time advancing with the runtime's monotonic
    /// clock, so tests with a paused clock drive delays and timers.
    clock: Clock,
    /// The API as callers outside reach it, for resume URLs.
    public_url: String,
}

impl Runtime {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        catalog: Arc<Catalog>,
        egress: EgressPolicy,
    ) -> Result<Self, RuntimeError> {
        Ok(Self {
            clock: Clock::new(),
            public_url: "http://127.0.0.1:8080".into(),
            store,
            bus,
            catalog,
            metrics: Arc::new(Metrics::new()),
            http: HttpClient::new(egress).map_err(RuntimeError::Http)?,
            keyring: None,
            versions: Mutex::new(HashMap::new()),
            admissions: Mutex::new(HashMap::new()),
            connections_touched: Mutex::new(HashMap::new()),
            outbox_pending: std::sync::atomic::AtomicBool::new(false),
            host: None,
        })
    }

    /// Gives the runtime the host that runs this process's bundles.
    pub fn with_host(mut self, host: Arc<piecework_host::PieceHost>) -> Self {
        self.host = Some(host);
        self
    }

    pub fn host(&self) -> Option<&Arc<piecework_host::PieceHost>> {
        self.host.as_ref()
    }

    /// The HTTP client of in-process pieces and connection checks, held to the installation's
    /// egress policy.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The pieces as they are now. A snapshot: hold it for one operation, not forever.
    pub fn pieces(&self) -> Arc<Registry> {
        self.catalog.snapshot()
    }

    /// The live catalog, for what adds and removes pieces and fetches unknown versions.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Gives the runtime the keys that seal and open connection values.
    pub fn with_keyring(mut self, keyring: secrets::Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    fn keyring(&self) -> Result<&secrets::Keyring, RuntimeError> {
        self.keyring
            .as_ref()
            .ok_or(RuntimeError::Secrets(secrets::SecretsError::NoKey))
    }

    /// Creates or replaces a connection: checks its values against the piece's auth, seals
    /// them and stores them. The values are never returned, logged or audited.
    pub async fn save_connection(
        &self,
        name: &str,
        piece: &str,
        values: Value,
        actor: &Actor,
    ) -> Result<ConnectionInfo, RuntimeError> {
        self.audited(
            actor,
            "connection.save",
            &format!("connection/{name}"),
            self.seal_connection(name, piece, values),
        )
        .await
    }

    async fn seal_connection(
        &self,
        name: &str,
        piece: &str,
        values: Value,
    ) -> Result<ConnectionInfo, RuntimeError> {
        if !is_connection_name(name) {
            return Err(RuntimeError::InvalidConnection(format!(
                "connection name {name:?} must be 1-100 lowercase letters, digits, '-' or '_'"
            )));
        }
        let pieces = self.pieces();
        let Some(definition) = pieces.newest(piece) else {
            return Err(RuntimeError::InvalidConnection(format!(
                "unknown piece `{piece}`"
            )));
        };
        let auth = definition.auth();
        if !auth.is_required() {
            return Err(RuntimeError::InvalidConnection(format!(
                "piece `{piece}` takes no connection"
            )));
        }
        auth.check_value(&values).map_err(|e| {
            RuntimeError::InvalidConnection(format!("connection values for `{piece}`: {e}"))
        })?;
        let ctx = Context::new(
            RunInfo::new("validate", "", 0, "auth", 1),
            Owner::default(),
            ScopedStore::new(self.store.kv(), ""),
            self.http.clone(),
        )
        .with_auth(Some(values.clone()));
        definition.validate_auth(&ctx).await.map_err(|e| {
            // The system's answer may quote what it was sent: the key itself.
            let secrets = piecework_sdk::mask::Secrets::of(auth, &values);
            RuntimeError::InvalidConnection(format!(
                "connection `{name}` was refused by `{piece}`: {}",
                secrets.mask(&e.to_string())
            ))
        })?;
        let plaintext = serde_json::to_vec(&values).expect("JSON values serialize");
        let sealed = self.seal_connection_values(&plaintext, name, piece)?;
        let now = Utc::now();
        let created_at = self
            .store
            .get_connection(name)
            .await?
            .map_or(now, |c| c.created_at);
        let record = ConnectionRecord {
            name: name.to_owned(),
            piece: piece.to_owned(),
            key_id: sealed.key_id.clone(),
            secret: serde_json::to_string(&sealed).expect("sealed values serialize"),
            created_at,
            updated_at: now,
        };
        self.store.put_connection(&record).await?;
        Ok(ConnectionInfo::from(&record))
    }

    /// Loads the options of dynamic dropdown `prop` through its piece, as someone writing a
    /// flow asks for them: from the member that declares it (`action` or `trigger`; either
    /// may be left out when only one member of the piece has a dynamic dropdown of that
    /// name), with `connection`'s values as the piece's auth, on `version` (default the
    /// newest). The piece's answer is masked for the connection's secrets; it gets
    /// [`OPTIONS_TIMEOUT`] at most and calls out through the egress guard like any step.
    pub async fn prop_options(
        &self,
        query: OptionsQuery<'_>,
    ) -> Result<DropdownOptions, RuntimeError> {
        let registry = self.pieces();
        let piece = match query.version {
            None => registry.newest(query.piece),
            Some(version) => {
                let version = semver::Version::parse(version).map_err(|e| {
                    RuntimeError::Invalid(format!(
                        "version {version:?} is not a semantic version: {e}"
                    ))
                })?;
                registry.get(query.piece, &version)
            }
        }
        .ok_or_else(|| {
            RuntimeError::NoSuchPiece(match query.version {
                Some(version) => format!("{}@{version}", query.piece),
                None => query.piece.to_owned(),
            })
        })?;
        let member = options_member(piece, query.action, query.trigger, query.prop)?;
        let (member_name, props) = match &member {
            OptionsMember::Action(action) => (&action.spec().name, &action.spec().props),
            OptionsMember::Trigger(trigger) => (&trigger.spec().name, &trigger.spec().props),
        };
        piecework_sdk::prop::dynamic_dropdown(props, member_name, query.prop)
            .map_err(|e| RuntimeError::Invalid(e.message().to_owned()))?;
        let auth = match query.connection {
            Some(name) => Some(self.connection_values(name, piece.name()).await?),
            None => None,
        };
        let secrets = auth
            .as_ref()
            .map(|values| piecework_sdk::mask::Secrets::of(piece.auth(), values))
            .unwrap_or_default();
        let ctx = Context::new(
            RunInfo::new("options", "", 0, query.prop, 1),
            Owner::default(),
            ScopedStore::new(self.store.kv(), ""),
            self.http.clone(),
        )
        .with_auth(auth);
        let input = query.input;
        let load = async {
            match member {
                OptionsMember::Action(action) => action.options_json(&ctx, query.prop, input).await,
                OptionsMember::Trigger(trigger) => {
                    trigger.options_json(&ctx, query.prop, input).await
                }
            }
        };
        let loaded = tokio::time::timeout(OPTIONS_TIMEOUT, load)
            .await
            .map_err(|_| {
                RuntimeError::PieceFailed(format!(
                    "`{}` did not load the options of `{}` within {}s",
                    piece.name(),
                    query.prop,
                    OPTIONS_TIMEOUT.as_secs()
                ))
            })?;
        match loaded {
            Ok(mut options) => {
                if !secrets.is_empty() {
                    let mut value = serde_json::to_value(&options).expect("options serialize");
                    secrets.mask_value(&mut value);
                    options = serde_json::from_value(value).expect("masked options deserialize");
                }
                Ok(options)
            }
            Err(err) => Err(RuntimeError::PieceFailed(format!(
                "`{}` could not load the options of `{}`: {}",
                piece.name(),
                query.prop,
                secrets.mask(err.message())
            ))),
        }
    }

    /// The decrypted values of connection `name` for a step of `piece`.
    pub async fn connection_values(&self, name: &str, piece: &str) -> Result<Value, RuntimeError> {
        let record = self
            .store
            .get_connection(name)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchConnection(name.to_owned()))?;
        if record.piece != piece {
            return Err(RuntimeError::InvalidConnection(format!(
                "connection `{name}` belongs to piece `{}`, not `{piece}`",
                record.piece
            )));
        }
        let values = self.open_connection(&record)?;
        self.note_connection_use(name);
        Ok(values)
    }

    /// Records the use of connection `name`, at most once a minute from this process; a
    /// failure to record it is logged, never fails the step.
    fn note_connection_use(&self, name: &str) {
        let now = std::time::Instant::now();
        {
            let mut touched = self.connections_touched.lock().unwrap();
            match touched.get(name) {
                Some(at) if now.duration_since(*at) < CONNECTION_USE_EVERY => return,
                _ => touched.insert(name.to_owned(), now),
            };
        }
        // Off the step's path: the step does not wait for this write.
        let (store, name, now) = (self.store.clone(), name.to_owned(), self.now());
        tokio::spawn(async move {
            if let Err(error) = store.touch_connection(&name, now).await {
                tracing::debug!(connection = %name, %error, "could not record the connection's use");
            }
        });
    }

    /// Seals a connection's values under the current key, bound to its name and its piece.
    pub(crate) fn seal_connection_values(
        &self,
        plaintext: &[u8],
        name: &str,
        piece: &str,
    ) -> Result<secrets::Sealed, RuntimeError> {
        let mut sealed = self.keyring()?.seal(
            plaintext,
            &connection_context(name, piece, CONNECTION_BINDING),
        );
        sealed.binding = CONNECTION_BINDING;
        Ok(sealed)
    }

    /// Decrypts a stored connection (what a worker does before a step, and `doctor` checks).
    pub fn open_connection(&self, record: &ConnectionRecord) -> Result<Value, RuntimeError> {
        let plaintext = self.open_connection_bytes(record)?;
        serde_json::from_slice(&plaintext).map_err(|_| {
            RuntimeError::InvalidConnection(format!(
                "connection `{}` does not decrypt to JSON",
                record.name
            ))
        })
    }

    pub(crate) fn open_connection_bytes(
        &self,
        record: &ConnectionRecord,
    ) -> Result<Vec<u8>, RuntimeError> {
        let what = format!("connection `{}`", record.name);
        let sealed: secrets::Sealed = serde_json::from_str(&record.secret).map_err(|_| {
            RuntimeError::InvalidConnection(format!("{what} is stored in an unreadable form"))
        })?;
        let context = connection_context(&record.name, &record.piece, sealed.binding);
        Ok(self.keyring()?.open(&sealed, &context, &what)?)
    }

    /// What the API shows of one connection, if it exists.
    pub async fn connection_info(
        &self,
        name: &str,
    ) -> Result<Option<ConnectionInfo>, RuntimeError> {
        let Some(record) = self.store.get_connection(name).await? else {
            return Ok(None);
        };
        let used = self.store.connections_used().await?;
        Ok(Some(ConnectionInfo {
            last_used_at: used.get(name).copied(),
            ..ConnectionInfo::from(&record)
        }))
    }

    pub async fn list_connections(&self) -> Result<Vec<ConnectionInfo>, RuntimeError> {
        let used = self.store.connections_used().await?;
        Ok(self
            .store
            .list_connections()
            .await?
            .iter()
            .map(|record| ConnectionInfo {
                last_used_at: used.get(&record.name).copied(),
                ..ConnectionInfo::from(record)
            })
            .collect())
    }

    pub async fn delete_connection(&self, name: &str, actor: &Actor) -> Result<(), RuntimeError> {
        let delete = async {
            match self.store.delete_connection(name).await? {
                true => Ok(()),
                false => Err(RuntimeError::NoSuchConnection(name.to_owned())),
            }
        };
        self.audited(
            actor,
            "connection.delete",
            &format!("connection/{name}"),
            delete,
        )
        .await
    }

    /// A flow version, from the cache or the store.
    pub async fn flow_version(
        &self,
        flow_id: &str,
        version: u32,
    ) -> Result<Option<Arc<FlowVersion>>, RuntimeError> {
        let key = (flow_id.to_owned(), version);
        if let Some(found) = self.versions.lock().unwrap().get(&key) {
            return Ok(Some(found.clone()));
        }
        let Some(loaded) = self.store.get_flow_version(flow_id, version).await? else {
            return Ok(None);
        };
        let loaded = Arc::new(loaded);
        self.versions.lock().unwrap().insert(key, loaded.clone());
        Ok(Some(loaded))
    }

    /// Validates a flow against this process's registry, stores it, audits it.
    pub async fn apply_flow(
        &self,
        definition: FlowDefinition,
        actor: &Actor,
    ) -> Result<AppliedFlow, RuntimeError> {
        let resource = format!("flow/{}", definition.name);
        let apply = async {
            let valid = flow::validate(definition, &self.pieces()).await?;
            let trigger = valid.definition.trigger.clone();
            let before = self.store.get_flow(&valid.definition.name).await?;
            let applied = self.store.apply_flow(valid).await?;
            let webhook_secret = self
                .ensure_webhook_secret(&applied.record.id, &trigger)
                .await?;
            let listening = trigger_hooks::Listening {
                before: before.filter(|r| r.enabled).map(|r| r.latest_version),
                after: applied.record.enabled.then_some(applied.version),
            };
            self.run_trigger_hooks(&applied.record.id, listening, actor)
                .await?;
            Ok(AppliedFlow {
                applied,
                webhook_auth: trigger.auth,
                webhook_secret,
            })
        };
        self.audited(actor, "flow.apply", &resource, apply).await
    }

    /// Creates a run and publishes its first step. Idempotent: for an existing run that has not
    /// recorded a step yet (its creator died before publishing), the first step is published
    /// again, and the broker's message-id dedupe keeps it single. Returns whether the run was
    /// new.
    ///
    /// The run gets a span (a child of the caller's: the webhook request or the poll) whose
    /// `traceparent` is stored with it; every step's span becomes its child.
    pub async fn start_run(
        &self,
        flow: &FlowVersion,
        run_id: String,
        trigger: Value,
        kind: TriggerKind,
    ) -> Result<bool, RuntimeError> {
        let started_by = match kind {
            TriggerKind::webhook => format!("webhook:{}", flow.flow_id),
            TriggerKind::polling | TriggerKind::schedule => "schedule".to_owned(),
            TriggerKind::manual => "api".to_owned(),
        };
        let principal = piecework_sdk::Principal::new(started_by, None);
        self.start_run_as(flow, run_id, trigger, kind, principal)
            .await
    }

    /// What a trigger item of `flow` starts: run `run_id` at once, or, when the flow
    /// debounces, its group's run later ([`Runtime::hold_item`], `item_id` naming the item).
    pub async fn start_or_hold(
        &self,
        flow: &FlowVersion,
        run_id: String,
        item: Value,
        kind: TriggerKind,
        item_id: &str,
    ) -> Result<(), RuntimeError> {
        if flow.definition.debounce.is_some() {
            let started_by = piecework_sdk::Principal::new("schedule", None);
            self.hold_item(flow, item, kind, started_by, Some(item_id.to_owned()))
                .await?;
        } else {
            self.start_run(flow, run_id, item, kind).await?;
        }
        Ok(())
    }

    /// [`Runtime::start_run`], saying who started it.
    pub async fn start_run_as(
        &self,
        flow: &FlowVersion,
        run_id: String,
        trigger: Value,
        kind: TriggerKind,
        started_by: piecework_sdk::Principal,
    ) -> Result<bool, RuntimeError> {
        let (run, span) = new_run(flow, run_id, trigger, kind, started_by);
        self.create_run(flow, run, kind)
            .instrument(span.clone())
            .await
            .inspect(|created| {
                span.record("piecework.run.created", created);
            })
    }

    async fn create_run(
        &self,
        flow: &FlowVersion,
        run: Run,
        kind: TriggerKind,
    ) -> Result<bool, RuntimeError> {
        let first = first_job(flow, &run.id);
        let created = self.store.create_run_queued(&run, &first).await?;
        if created {
            self.metrics.run_started(&flow.flow_id, kind);
            self.publish_queued(flow, &first).await;
        } else {
            self.republish_first(flow, &run.id, &first).await?;
        }
        Ok(created)
    }

    /// For a run that existed already (a retried call, a redelivered poll): publishes its
    /// first job again unless a step ran, in case the creator's publish was lost; the message
    /// id keeps it single.
    pub(crate) async fn republish_first(
        &self,
        flow: &FlowVersion,
        run_id: &str,
        first: &[OutboxJob],
    ) -> Result<(), RuntimeError> {
        let fresh = self
            .store
            .get_run(run_id)
            .await?
            .is_some_and(|r| !r.status.is_terminal() && r.steps.is_empty());
        if fresh {
            self.publish_queued(flow, first).await;
        }
        Ok(())
    }

    /// Publishes jobs the store holds in its outbox (written with the run change that called
    /// for them), then takes them out. A publish that fails — or is not tried, with the bus
    /// away — is logged and counted and leaves them to the relay ([`Runtime::relay_outbox`]):
    /// the change is recorded, so its caller has been answered truly.
    pub(crate) async fn publish_queued(&self, flow: &FlowVersion, jobs: &[OutboxJob]) {
        if jobs.is_empty() {
            return;
        }
        for job in jobs {
            let failure = if self.bus.connected() {
                match self
                    .publish_job(flow, &job.run_id, &job.step, job.epoch, Duration::ZERO, 0)
                    .await
                {
                    Ok(()) => continue,
                    Err(err) => err.to_string(),
                }
            } else {
                "the bus is not connected".to_owned()
            };
            tracing::warn!(
                run = %job.run_id,
                step = %job.step,
                error = %failure,
                "could not publish a step job; it waits in the outbox for the relay"
            );
            self.metrics
                .job_publish_failures
                .get_or_create(&QueueLabels {
                    queue: queue_of(flow, &job.step).to_owned(),
                })
                .inc();
            self.outbox_pending
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        if let Err(err) = self.store.outbox_sent(jobs).await {
            // Published: the relay finds them still there and publishes them again, which the
            // message ids make harmless.
            tracing::debug!(error = %err, "could not take published jobs out of the outbox");
        }
    }

    /// Publishes the jobs left in the outbox for longer than `grace` — their publisher died
    /// between recording and publishing, or could not reach the bus — and takes them out;
    /// jobs of runs that ended or vanished are dropped. Returns how many it published. Safe
    /// to run in several processes at once: a job's message id keeps it single.
    pub async fn relay_outbox(&self, grace: Duration) -> Result<usize, RuntimeError> {
        if !self.bus.connected() {
            return Ok(0);
        }
        let before = self.now() - chrono::Duration::from_std(grace).unwrap_or_default();
        let mut relayed = 0;
        loop {
            let jobs = self.store.outbox(before, OUTBOX_BATCH).await?;
            let batch = jobs.len();
            for job in jobs {
                let live = self
                    .store
                    .get_run(&job.run_id)
                    .await?
                    .is_some_and(|run| !run.status.is_terminal());
                let flow = if live {
                    self.flow_version(&job.flow_id, job.flow_version).await?
                } else {
                    None
                };
                if let Some(flow) = flow {
                    self.publish_job(&flow, &job.run_id, &job.step, job.epoch, Duration::ZERO, 0)
                        .await?;
                    self.metrics
                        .outbox_relayed
                        .get_or_create(&QueueLabels {
                            queue: queue_of(&flow, &job.step).to_owned(),
                        })
                        .inc();
                    tracing::info!(run = %job.run_id, step = %job.step, "relayed a step job from the outbox");
                    relayed += 1;
                }
                self.store.outbox_sent(std::slice::from_ref(&job)).await?;
            }
            if batch < OUTBOX_BATCH {
                return Ok(relayed);
            }
        }
    }

    /// Relays the outbox ([`Runtime::relay_outbox`]) until `shutdown` is cancelled: every
    /// [`OUTBOX_GRACE`] while this process knows of jobs left there (its publish failed, or
    /// the last look found some), else every [`OUTBOX_SWEEP`] — for publishers that died
    /// between recording a job and publishing it — so an idle fleet leaves Redis alone.
    pub async fn relay_outbox_until(&self, shutdown: tokio_util::sync::CancellationToken) {
        use std::sync::atomic::Ordering;
        let mut swept = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(OUTBOX_GRACE) => {}
                () = shutdown.cancelled() => return,
            }
            let pending = self.outbox_pending.swap(false, Ordering::Relaxed);
            if !pending && swept.elapsed() < OUTBOX_SWEEP {
                continue;
            }
            swept = tokio::time::Instant::now();
            let still = match self.relay_outbox(OUTBOX_GRACE).await {
                // Looked while the bus is away: nothing could go; look again soon.
                Ok(_) if !self.bus.connected() => pending,
                // Relayed some (there may be more), or this process left jobs that are not
                // due yet: look again soon.
                Ok(relayed) => {
                    relayed > 0
                        || (pending
                            && self
                                .store
                                .outbox(self.now() + chrono::Duration::hours(1), 1)
                                .await
                                .map_or(true, |left| !left.is_empty()))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot relay the outbox; trying again");
                    true
                }
            };
            if still {
                self.outbox_pending.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Holds trigger item `item` of `flow`, which debounces (`debounce`), in its group — the
    /// value of `debounce_key` for it — instead of starting a run: the group's run starts,
    /// with its last item, once no new item has come for `debounce` (at most `debounce_max`
    /// after its first). `item_id` (a polled item's) makes holding the same item again
    /// change nothing. Returns when the group's run is due.
    pub async fn hold_item(
        &self,
        flow: &FlowVersion,
        item: Value,
        kind: TriggerKind,
        started_by: piecework_sdk::Principal,
        item_id: Option<String>,
    ) -> Result<DateTime<Utc>, RuntimeError> {
        let definition = &flow.definition;
        let Some(period) = definition.debounce else {
            return Err(RuntimeError::Invalid(format!(
                "flow `{}` does not debounce its items",
                flow.flow_id
            )));
        };
        let key = match &definition.debounce_key {
            None => String::new(),
            Some(template) => {
                let context = Run::new(String::new(), &flow.flow_id, flow.version, item.clone())
                    .template_context();
                match piecework_core::template::render(&Value::String(template.clone()), &context) {
                    Ok(Value::String(key)) => key,
                    Ok(other) => other.to_string(),
                    Err(err) => {
                        return Err(RuntimeError::Invalid(format!(
                            "debounce_key of flow `{}`: {}",
                            flow.flow_id, err.message
                        )));
                    }
                }
            }
        };
        let held = piecework_store::Held {
            flow_id: flow.flow_id.clone(),
            slot: run::deterministic_run_id(&flow.flow_id, &format!("debounce:{key}")),
            item_id,
            item,
            meta: piecework_store::HeldMeta {
                flow_version: flow.version,
                key,
                trigger: kind.as_str().to_owned(),
                started_by,
            },
            period,
            max: definition.debounce_max.unwrap_or(period * 10).max(period),
            now: self.now(),
        };
        let due = self.store.hold_item(&held).await?;
        self.metrics
            .trigger_items_held
            .get_or_create(&piecework_telemetry::metrics::FlowLabels {
                flow: flow.flow_id.clone(),
            })
            .inc();
        tracing::debug!(flow = %flow.flow_id, key = %held.meta.key, %due, "trigger item held by debounce");
        Ok(due)
    }

    /// Starts the run of the debounced group whose timer fired, with the group's last item,
    /// and ends the group. The run's id is the group's and item count's, so a timer that
    /// fires twice (a scheduler died in between) starts one run.
    async fn start_held(&self, timer: &Timer) -> Result<(), RuntimeError> {
        let (flow_id, slot) = (&timer.flow_id, &timer.run_id);
        let Some(pending) = self.store.pending_item(flow_id, slot).await? else {
            // Started already: only its timer was left.
            return Ok(self.store.release_item(flow_id, slot, 0).await?);
        };
        let version = pending.meta.flow_version;
        let Some(flow) = self.flow_version(flow_id, version).await? else {
            tracing::warn!(flow = %flow_id, version, "a debounced item's flow version is gone; dropping it");
            return Ok(self.store.release_item(flow_id, slot, pending.seq).await?);
        };
        let run_id = run::deterministic_run_id(
            flow_id,
            &format!(
                "debounce:{slot}:{}:{}",
                pending.first.timestamp_millis(),
                pending.seq
            ),
        );
        let kind = TriggerKind::parse(&pending.meta.trigger).unwrap_or(TriggerKind::webhook);
        self.start_run_as(&flow, run_id, pending.item, kind, pending.meta.started_by)
            .await?;
        Ok(self.store.release_item(flow_id, slot, pending.seq).await?)
    }

    /// Starts the run of flow `child` that sub-flow step `step` (its recorded name) of run
    /// `parent` asks for, with `trigger` as its trigger output, and returns its id. The id is
    /// derived from the parent run and step, so a step that runs again starts no second run.
    /// When `wait`, the run records its parent step, whose wait its end brings forward.
    pub async fn start_subflow(
        &self,
        parent: &Run,
        step: &str,
        child: &str,
        trigger: Value,
        wait: bool,
    ) -> Result<String, RuntimeError> {
        let depth = parent.depth + 1;
        if depth > flow::MAX_SUBFLOW_DEPTH {
            return Err(RuntimeError::Invalid(format!(
                "sub-flows nest deeper than {}: run `{}` is already {} levels down",
                flow::MAX_SUBFLOW_DEPTH,
                parent.id,
                parent.depth
            )));
        }
        let record = self
            .store
            .get_flow(child)
            .await?
            .ok_or_else(|| RuntimeError::Invalid(format!("no flow `{child}` to start")))?;
        if !record.enabled {
            return Err(RuntimeError::Invalid(format!("flow `{child}` is disabled")));
        }
        let flow = self
            .flow_version(child, record.latest_version)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchFlow(child.to_owned()))?;
        let run_id = run::deterministic_run_id(&parent.id, &format!("subflow:{step}"));
        let started_by = piecework_sdk::Principal::new(format!("flow:{}", parent.flow_id), None);
        let (mut run, span) = new_run(
            &flow,
            run_id.clone(),
            trigger,
            TriggerKind::manual,
            started_by,
        );
        run.depth = depth;
        if wait {
            run.parent = Some(run::ParentStep {
                run_id: parent.id.clone(),
                flow_id: parent.flow_id.clone(),
                flow_version: parent.flow_version,
                step: step.to_owned(),
            });
        }
        self.create_run(&flow, run, TriggerKind::manual)
            .instrument(span)
            .await?;
        Ok(run_id)
    }

    /// Cancels a running or waiting run. Nothing after its step in flight runs, and workers
    /// stop that step (see the worker's `unless_run_ends`). Audited as
    /// `run.cancel`.
    pub async fn cancel_run(&self, run_id: &str, actor: &Actor) -> Result<Run, RuntimeError> {
        let cancel = async {
            let run = self
                .store
                .get_run(run_id)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))?;
            lifecycle::cancel(&run)
                .map_err(|refusal| RuntimeError::Conflict(refusal.to_string()))?;
            match self.store.cancel_run(run_id, Utc::now()).await? {
                None => Err(RuntimeError::NoSuchRun(run_id.to_owned())),
                Some(false) => Err(RuntimeError::Conflict(format!(
                    "run `{run_id}` is not running"
                ))),
                Some(true) => Ok(()),
            }
        };
        self.audited(actor, "run.cancel", &format!("run/{run_id}"), cancel)
            .await?;
        self.store
            .get_run(run_id)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))
    }

    /// Resumes a failed run from its failed step, on the flow version it pinned. The retried
    /// step's attempts are numbered after the earlier ones and get a fresh retry budget.
    /// Audited as `run.retry`.
    pub async fn retry_run(&self, run_id: &str, actor: &Actor) -> Result<Run, RuntimeError> {
        self.audited(
            actor,
            "run.retry",
            &format!("run/{run_id}"),
            self.resume(run_id),
        )
        .await
    }

    async fn resume(&self, run_id: &str) -> Result<Run, RuntimeError> {
        let run = self
            .store
            .get_run(run_id)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))?;
        let flow = self
            .flow_version(&run.flow_id, run.flow_version)
            .await?
            .ok_or_else(|| {
                RuntimeError::Conflict(format!(
                    "flow `{}` version {} no longer exists",
                    run.flow_id, run.flow_version
                ))
            })?;
        let plan = lifecycle::retry(&flow.definition, &run)
            .map_err(|refusal| RuntimeError::Conflict(refusal.to_string()))?;
        let jobs: Vec<OutboxJob> = std::iter::once(&plan.step.name)
            .chain(&plan.lanes)
            .map(|step| OutboxJob {
                run_id: run_id.to_owned(),
                flow_id: flow.flow_id.clone(),
                flow_version: flow.version,
                step: step.clone(),
                epoch: plan.epoch,
            })
            .collect();
        match self.store.resume_run(run_id, &plan.step, &jobs).await? {
            Some(true) => {}
            Some(false) => {
                return Err(RuntimeError::Conflict(format!(
                    "run `{run_id}` is no longer failed"
                )));
            }
            None => return Err(RuntimeError::NoSuchRun(run_id.to_owned())),
        }
        self.publish_queued(&flow, &jobs).await;
        self.store
            .get_run(run_id)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))
    }

    /// Publishes the job for one step of a run to the step's queue.
    pub async fn publish_step(
        &self,
        flow: &FlowVersion,
        run_id: &str,
        step: &str,
        epoch: u32,
    ) -> Result<(), RuntimeError> {
        self.publish_step_after(flow, run_id, step, epoch, std::time::Duration::ZERO)
            .await
    }

    /// Publishes the job for one step whose attempt must wait `delay` (a retry handed over
    /// by a worker that ran the step inline): its first delivery only waits.
    pub async fn publish_step_after(
        &self,
        flow: &FlowVersion,
        run_id: &str,
        step: &str,
        epoch: u32,
        delay: std::time::Duration,
    ) -> Result<(), RuntimeError> {
        self.publish_job(flow, run_id, step, epoch, delay, 0).await
    }

    /// Publishes a `StepJob` for step `step` (a recorded name, `double[3]` in a loop) of run
    /// `run_id` on the step's queue. `wake_ms`, when not 0, makes it a fresh message (a
    /// wake-up or a requeue) rather than the step's first job.
    async fn publish_job(
        &self,
        flow: &FlowVersion,
        run_id: &str,
        step: &str,
        epoch: u32,
        delay: std::time::Duration,
        wake_ms: u64,
    ) -> Result<(), RuntimeError> {
        let queue = queue_of(flow, step);
        let job = StepJob {
            run_id: run_id.to_owned(),
            flow_id: flow.flow_id.clone(),
            flow_version: flow.version,
            step: step.to_owned(),
            epoch,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            wake_ms,
        };
        jobs::publish_step(self.bus.as_ref(), queue, &job).await?;
        Ok(())
    }

    /// Publishes the job that wakes the run of `timer`, waiting on its step, at `at`.
    async fn publish_wake(&self, timer: &Timer, at: DateTime<Utc>) -> Result<(), RuntimeError> {
        let Some(flow) = self
            .flow_version(&timer.flow_id, timer.flow_version)
            .await?
        else {
            return Err(RuntimeError::Conflict(format!(
                "flow `{}` version {} no longer exists",
                timer.flow_id, timer.flow_version
            )));
        };
        let wake_ms = u64::try_from(at.timestamp_millis()).unwrap_or_default();
        self.publish_job(
            &flow,
            &timer.run_id,
            &timer.step,
            0,
            std::time::Duration::ZERO,
            wake_ms,
        )
        .await
    }

    /// Publishes a wake-up job for every waiting step whose timer is due at `now` (at most
    /// `limit`); a timer whose wake is not recorded within `again_after` fires again. Returns
    /// how many fired.
    pub async fn fire_due_timers(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        again_after: std::time::Duration,
    ) -> Result<usize, RuntimeError> {
        let due = self.store.take_due_timers(now, limit, again_after).await?;
        for timer in &due {
            if timer.step.is_empty() {
                self.expire(timer).await;
                continue;
            }
            if timer.step == piecework_store::DEBOUNCE_STEP {
                if let Err(err) = self.start_held(timer).await {
                    tracing::warn!(flow = %timer.flow_id, error = %err, "could not start a debounced run; its timer fires again");
                }
                continue;
            }
            if let Err(err) = self.publish_wake(timer, timer.due).await {
                tracing::warn!(run_id = %timer.run_id, step = %timer.step, error = %err, "could not wake a waiting run; its timer fires again");
            }
        }
        Ok(due.len())
    }

    /// Sets the API's address as callers outside reach it (`[api] public_url`).
    pub fn with_public_url(mut self, url: String) -> Self {
        self.public_url = url.trim_end_matches('/').to_owned();
        self
    }

    /// The URL that resumes run `run_id` where it waits for a call (`wait_for: webhook`):
    /// `<public url>/v1/resume/<run>.<signature>`, signed with the encryption keyring so only
    /// the URL's holder can resume the run. `None` in processes without the keyring.
    pub fn resume_url(&self, run_id: &str) -> Option<String> {
        let keyring = self.keyring.as_ref()?;
        let signature = keyring.sign(resume_message(run_id).as_bytes());
        Some(format!(
            "{}/v1/resume/{run_id}.{signature}",
            self.public_url
        ))
    }

    /// Resumes the run a resume URL's token names, at the webhook wait it waits on, with
    /// `payload`; refuses a token that is not genuine as [`RuntimeError::NoSuchRun`], so a
    /// caller without a real URL learns nothing.
    pub async fn resume_by_token(&self, token: &str, payload: Value) -> Result<Run, RuntimeError> {
        let unknown = || RuntimeError::NoSuchRun("(resume URL)".into());
        let (run_id, signature) = token.split_once('.').ok_or_else(unknown)?;
        let keyring = self.keyring.as_ref().ok_or_else(unknown)?;
        if !keyring.verify(resume_message(run_id).as_bytes(), signature) {
            return Err(unknown());
        }
        let run = self.store.get_run(run_id).await?.ok_or_else(unknown)?;
        let flow = self.flow_version(&run.flow_id, run.flow_version).await?;
        let waiting = run.steps.iter().find(|s| {
            s.status == StepStatus::Waiting
                && flow.as_ref().is_some_and(|flow| {
                    flow.definition
                        .step(flow::split_instance(&s.name).0)
                        .is_some_and(|d| d.wait_for == Some(flow::WaitFor::Webhook))
                })
        });
        let Some(step) = waiting.map(|s| s.name.clone()) else {
            return Err(RuntimeError::Conflict(format!(
                "run `{run_id}` is {}, not waiting for a resume call",
                run.status.as_str()
            )));
        };
        self.resume_waiting_run(run_id, &step, payload, &Actor("resume-url".into()))
            .await
    }

    /// The time now, for delays and timers: [`Clock`].
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Takes a run slot of flow `flow_id` (at most `max` runs running or waiting) for
    /// `run_id`: `false` when all are taken.
    pub async fn acquire_run_slot(
        &self,
        flow_id: &str,
        run_id: &str,
        max: u32,
    ) -> Result<bool, RuntimeError> {
        Ok(self.store.acquire_run_slot(flow_id, run_id, max).await?)
    }

    /// Marks an attempt in flight in its run (see [`piecework_core::run::InFlight`]).
    pub async fn mark_in_flight(
        &self,
        run_id: &str,
        marker: &piecework_core::run::InFlight,
    ) -> Result<(), RuntimeError> {
        Ok(self.store.mark_in_flight(run_id, marker).await?)
    }

    /// Registers interest in run `run_id`'s end (see [`piecework_store::RunWatch`]).
    pub async fn watch_run(
        &self,
        run_id: &str,
    ) -> Result<Box<dyn piecework_store::RunWatch>, RuntimeError> {
        Ok(self.store.watch_run(run_id).await?)
    }

    /// Counts the end of lane `lane` of loop `around` in run `run_id`; `true` once all
    /// `lanes` ended.
    pub async fn join_lane(
        &self,
        run_id: &str,
        around: &str,
        lane: u32,
        lanes: u32,
    ) -> Result<bool, RuntimeError> {
        Ok(self.store.join_lane(run_id, around, lane, lanes).await?)
    }

    /// Hands step `step` of run `run_id` to a new job whose first delivery waits `delay` (a
    /// run waiting for a slot): a fresh message, so waiting spends none of the step's
    /// deliveries.
    pub async fn requeue_step(
        &self,
        flow: &FlowVersion,
        run_id: &str,
        step: &str,
        delay: std::time::Duration,
    ) -> Result<(), RuntimeError> {
        let wake_ms = u64::try_from(self.now().timestamp_millis()).unwrap_or_default();
        self.publish_job(flow, run_id, step, 0, delay, wake_ms)
            .await
    }

    /// Takes one of the `max` fleet-wide in-flight places of limit `key` for `holder`, leased
    /// for `lease`: `false` when all are taken.
    pub async fn acquire_in_flight(
        &self,
        key: &str,
        holder: &str,
        max: u32,
        lease: std::time::Duration,
    ) -> Result<bool, RuntimeError> {
        Ok(self
            .store
            .acquire_in_flight(key, holder, max, lease)
            .await?)
    }

    /// Gives back an in-flight place.
    pub async fn release_in_flight(&self, key: &str, holder: &str) -> Result<(), RuntimeError> {
        Ok(self.store.release_in_flight(key, holder).await?)
    }

    /// Reserves the next start under the fleet-wide rate limit `key` (starts spaced
    /// `interval` apart); returns how long to wait before starting.
    pub async fn reserve_rate(
        &self,
        key: &str,
        interval: std::time::Duration,
    ) -> Result<std::time::Duration, RuntimeError> {
        Ok(self.store.reserve_rate(key, interval).await?)
    }

    /// Fails a run whose deadline passed, if it has not ended: its flow's `timeout`.
    async fn expire(&self, timer: &Timer) {
        let timeout = self
            .flow_version(&timer.flow_id, timer.flow_version)
            .await
            .ok()
            .flatten()
            .and_then(|flow| flow.definition.timeout)
            .map(|t| humantime::format_duration(t).to_string())
            .unwrap_or_else(|| "its timeout".into());
        let error = format!("timed out: the run did not end within the flow's timeout ({timeout})");
        match self.store.expire_run(timer, &error).await {
            // Ended in time: the deadline changes nothing.
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(run_id = %timer.run_id, flow = %timer.flow_id, "run timed out");
                self.metrics.run_finished(
                    &timer.flow_id,
                    piecework_telemetry::metrics::RunOutcome::failed,
                );
                let actor = Actor("scheduler".into());
                let resource = format!("run/{}", timer.run_id);
                let timed_out = async { Ok::<_, RuntimeError>(()) };
                if let Err(err) = self
                    .audited(&actor, "run.timeout", &resource, timed_out)
                    .await
                {
                    tracing::warn!(run_id = %timer.run_id, error = %err, "could not audit a run's timeout");
                }
            }
            Err(err) => {
                tracing::warn!(run_id = %timer.run_id, error = %err, "could not time out a run; its timer fires again");
            }
        }
    }

    /// When the earliest timer of a waiting run is due.
    pub async fn next_timer(&self) -> Result<Option<DateTime<Utc>>, RuntimeError> {
        Ok(self.store.next_timer().await?)
    }

    /// A signal that moves whenever a run starts waiting with a timer.
    pub async fn watch_timers(&self) -> Result<tokio::sync::watch::Receiver<u64>, RuntimeError> {
        Ok(self.store.watch_timers().await?)
    }

    /// Claims the wake of a waiting run whose timer came due: `false` if it was resumed,
    /// cancelled or woken by someone else.
    pub async fn claim_wake(&self, timer: &Timer) -> Result<bool, RuntimeError> {
        Ok(self.store.claim_wake(timer).await?)
    }

    /// Forgets the timer of a run that no longer waits on it.
    pub async fn drop_timer(&self, timer: &Timer) -> Result<(), RuntimeError> {
        Ok(self.store.drop_timer(timer).await?)
    }

    /// Resumes a run waiting on its wait step `step` with `payload` as the step's output,
    /// and publishes the job that takes it on. Audited as `run.resume`.
    pub async fn resume_waiting_run(
        &self,
        run_id: &str,
        step: &str,
        payload: Value,
        actor: &Actor,
    ) -> Result<Run, RuntimeError> {
        let resume = async {
            let run = self
                .store
                .get_run(run_id)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))?;
            let flow = self
                .flow_version(&run.flow_id, run.flow_version)
                .await?
                .ok_or_else(|| {
                    RuntimeError::Conflict(format!(
                        "flow `{}` version {} no longer exists",
                        run.flow_id, run.flow_version
                    ))
                })?;
            let (state, timer) = lifecycle::resume(&flow.definition, &run, step).map_err(
                |refusal| match refusal {
                    lifecycle::Refusal::NoSuchStep { .. } | lifecycle::Refusal::NotAWait { .. } => {
                        RuntimeError::Invalid(refusal.to_string())
                    }
                    _ => RuntimeError::Conflict(refusal.to_string()),
                },
            )?;
            let mut state = state;
            let now = Utc::now();
            let number = u32::try_from(state.attempts.len()).unwrap_or(u32::MAX) + 1;
            state.status = StepStatus::Succeeded;
            state.output = Some(payload);
            state.retry_at = None;
            state.attempts.push(piecework_core::run::Attempt {
                attempt: number,
                status: StepStatus::Succeeded,
                started_at: now,
                duration_ms: 0,
                error: None,
                worker: actor.0.clone(),
            });
            let timer = Timer {
                run_id: run.id.clone(),
                flow_id: run.flow_id.clone(),
                flow_version: run.flow_version,
                step: step.to_owned(),
                due: timer.unwrap_or(now),
            };
            let result = StepResult {
                run_id: run.id.clone(),
                flow_id: run.flow_id.clone(),
                flow_version: run.flow_version,
                step: step.to_owned(),
                attempt: number,
                status: piecework_proto::v1::StepStatus::Succeeded as i32,
                run_status: piecework_proto::v1::RunStatus::Running as i32,
                finished_unix_ms: now.timestamp_millis(),
                ..StepResult::default()
            };
            match self.store.resume_waiting(&timer, &state, &result).await? {
                None => return Err(RuntimeError::NoSuchRun(run_id.to_owned())),
                Some(false) => {
                    return Err(RuntimeError::Conflict(format!(
                        "run `{run_id}` is no longer waiting on step `{step}`"
                    )));
                }
                Some(true) => {}
            }
            self.publish_wake(&timer, now).await
        };
        self.audited(
            actor,
            "run.resume",
            &format!("run/{run_id}/step/{step}"),
            resume,
        )
        .await?;
        self.store
            .get_run(run_id)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchRun(run_id.to_owned()))
    }

    /// A run as recorded.
    pub async fn run(&self, id: &str) -> Result<Option<Run>, RuntimeError> {
        Ok(self.store.get_run(id).await?)
    }

    /// Runs, newest first, as `query` filters them.
    pub async fn runs(
        &self,
        query: &piecework_store::RunQuery,
    ) -> Result<Vec<piecework_core::RunSummary>, RuntimeError> {
        Ok(self.store.list_runs(query).await?)
    }

    /// Journals one step attempt (and the run's end, when it ended it) before anything
    /// follows; returns the run's status after the write (`cancelled` stops a worker's inline
    /// steps).
    /// How many runs `query` finds in each status.
    pub async fn run_stats(
        &self,
        query: &piecework_store::RunQuery,
    ) -> Result<piecework_store::RunStats, RuntimeError> {
        Ok(self.store.run_stats(query).await?)
    }

    pub async fn record_attempt(&self, update: StepUpdate) -> Result<RunStatus, RuntimeError> {
        Ok(self.store.record_step(update).await?)
    }

    /// Ends a run outside a step (a flow version that vanished, a poisoned job).
    pub async fn end_run(
        &self,
        run_id: &str,
        update: piecework_store::RunUpdate,
    ) -> Result<(), RuntimeError> {
        Ok(self.store.update_run(run_id, update).await?)
    }

    /// Waits until a run finishes, up to `timeout`; its state then, or `None` if unknown.
    pub async fn wait_run_finished(
        &self,
        run_id: &str,
        timeout: std::time::Duration,
    ) -> Result<Option<Run>, RuntimeError> {
        Ok(self.store.wait_run_finished(run_id, timeout).await?)
    }

    /// Enables or disables a flow; `None` for an unknown flow. Audited as `flow.enable` /
    /// `flow.disable`.
    pub async fn set_flow_enabled(
        &self,
        flow_id: &str,
        enabled: bool,
        actor: &Actor,
    ) -> Result<piecework_store::FlowRecord, RuntimeError> {
        let action = if enabled {
            "flow.enable"
        } else {
            "flow.disable"
        };
        let change = async {
            let before = self
                .store
                .get_flow(flow_id)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
            let version = before.latest_version;
            let listening = trigger_hooks::Listening {
                before: before.enabled.then_some(version),
                after: enabled.then_some(version),
            };
            if enabled && !before.enabled {
                // The trigger is enabled before any call is let in; a refusal leaves it off.
                self.run_trigger_hooks(flow_id, listening, actor).await?;
            }
            let record = self
                .store
                .set_flow_enabled(flow_id, enabled)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
            if !enabled && before.enabled {
                // Calls are refused from here; then the trigger undoes its registration.
                self.run_trigger_hooks(flow_id, listening, actor).await?;
            }
            Ok(record)
        };
        self.audited(actor, action, &format!("flow/{flow_id}"), change)
            .await
    }

    /// A page of the audit trail, filtered.
    pub async fn query_audit(
        &self,
        query: &piecework_store::audit::AuditQuery,
    ) -> Result<piecework_store::audit::AuditPage, RuntimeError> {
        Ok(piecework_store::audit::query(self.store.as_ref(), query).await?)
    }

    /// Step results after `after` (`"$"`: only new ones), waiting up to `block` for some.
    pub async fn read_results(
        &self,
        after: Option<&str>,
        limit: usize,
        block: std::time::Duration,
    ) -> Result<Vec<piecework_store::Entry<piecework_proto::v1::StepResult>>, RuntimeError> {
        Ok(self.store.read_results(after, limit, block).await?)
    }

    /// Every stored connection, sealed (for `doctor`, which opens each to check it).
    pub async fn connection_records(&self) -> Result<Vec<ConnectionRecord>, RuntimeError> {
        Ok(self.store.list_connections().await?)
    }

    /// The store of a flow's pieces (`ctx.store`), outside any run (connection checks).
    pub fn piece_store(&self, flow_id: &str) -> ScopedStore {
        ScopedStore::new(self.store.kv(), flow_id)
    }

    /// Publishes a poll job (the scheduler's tick).
    pub async fn publish_poll(
        &self,
        queue: &str,
        job: &piecework_proto::v1::PollJob,
    ) -> Result<piecework_bus::PublishAck, RuntimeError> {
        Ok(jobs::publish_poll(self.bus.as_ref(), queue, job).await?)
    }

    /// Whether a flow exists and is enabled.
    pub async fn flow_enabled(&self, flow_id: &str) -> Result<bool, RuntimeError> {
        Ok(self
            .store
            .get_flow(flow_id)
            .await?
            .is_some_and(|f| f.enabled))
    }

    /// A flow's record (its latest version, whether it is enabled).
    pub async fn flow_record(
        &self,
        flow_id: &str,
    ) -> Result<Option<piecework_store::FlowRecord>, RuntimeError> {
        Ok(self.store.get_flow(flow_id).await?)
    }

    /// A number that moves whenever a flow is applied, enabled or disabled.
    pub async fn flows_revision(&self) -> Result<u64, RuntimeError> {
        Ok(self.store.flows_revision().await?)
    }

    /// Every flow's record.
    pub async fn flow_records(&self) -> Result<Vec<piecework_store::FlowRecord>, RuntimeError> {
        Ok(self.store.list_flows().await?)
    }

    /// Takes a fleet-wide lease (one poll of a flow at a time); see [`Store::acquire_lease`].
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, RuntimeError> {
        Ok(self.store.acquire_lease(name, holder, ttl).await?)
    }

    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), RuntimeError> {
        Ok(self.store.release_lease(name, holder).await?)
    }

    /// A polling flow's dedupe cursor.
    pub async fn trigger_state(
        &self,
        flow_id: &str,
    ) -> Result<Option<piecework_sdk::PollState>, RuntimeError> {
        Ok(self.store.trigger_state(flow_id).await?)
    }

    pub async fn put_trigger_state(
        &self,
        flow_id: &str,
        state: &piecework_sdk::PollState,
    ) -> Result<(), RuntimeError> {
        Ok(self.store.put_trigger_state(flow_id, state).await?)
    }

    /// `messaging.system` of spans about this process's jobs.
    pub fn messaging_system(&self) -> &'static str {
        self.bus.system()
    }

    /// Joins a queue's shared consumer.
    pub async fn consume(
        &self,
        queue: &str,
        options: piecework_bus::ConsumeOptions,
    ) -> Result<Box<dyn piecework_bus::Consumer>, RuntimeError> {
        Ok(self.bus.consume(queue, options).await?)
    }

    /// A queue's backlog.
    pub async fn queue_stats(
        &self,
        queue: &str,
    ) -> Result<piecework_bus::QueueStats, RuntimeError> {
        Ok(self.bus.queue_stats(queue).await?)
    }

    /// What is wrong with the store and with the bus, each `None` when it answers.
    pub async fn readiness(&self) -> (Option<String>, Option<String>) {
        let store = self.store.ready().await.err().map(|e| e.to_string());
        let bus = self.bus.ready().await.err().map(|e| e.to_string());
        (store, bus)
    }

    /// Whether the bus and the store answer, for `/readyz`: the reasons when not.
    pub async fn ready(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if let Err(err) = self.bus.ready().await {
            reasons.push(format!("bus: {err}"));
        }
        if let Err(err) = self.store.ready().await {
            reasons.push(format!("store: {err}"));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Sets the adoption metric: how many enabled flows use each piece (as trigger or step).
    pub async fn refresh_adoption(&self) -> Result<(), RuntimeError> {
        let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
        for record in self.store.list_flows().await?.iter().filter(|f| f.enabled) {
            let Some(flow) = self.flow_version(&record.id, record.latest_version).await? else {
                continue;
            };
            let definition = &flow.definition;
            let mut pieces: Vec<&str> = std::iter::once(definition.trigger.piece.as_str())
                .chain(definition.all_steps().into_iter().map(|s| s.piece.as_str()))
                .filter(|piece| !piece.is_empty())
                .collect();
            pieces.sort_unstable();
            pieces.dedup();
            for piece in pieces {
                *counts.entry(piece.to_owned()).or_default() += 1;
            }
        }
        let gauge = &self.metrics.flows_enabled;
        gauge.clear();
        for (piece, count) in counts {
            gauge
                .get_or_create(&piecework_telemetry::metrics::PieceLabels { piece })
                .set(count);
        }
        Ok(())
    }

    /// The context handed to an action or trigger.
    pub fn context(&self, run: RunInfo, flow: &FlowVersion, auth: Option<Value>) -> Context {
        let owner = Owner {
            id: flow.definition.owner.clone().unwrap_or_default(),
        };
        let store = ScopedStore::new(self.store.kv(), flow.flow_id.clone());
        Context::new(run, owner, store, self.http.clone()).with_auth(auth)
    }

    /// Appends to `pw:audit`. A failure to audit is logged, never fails the operation.
    /// Runs `operation` and records it in the audit trail with its outcome and duration.
    pub async fn audited<T, E: ToString>(
        &self,
        actor: &Actor,
        action: &str,
        resource: &str,
        operation: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = operation.await;
        self.audit(actor, action, resource, started, result.as_ref().err())
            .await;
        result
    }

    pub async fn audit(
        &self,
        actor: &Actor,
        action: &str,
        resource: &str,
        started: Instant,
        error: Option<&impl ToString>,
    ) {
        let event = audit_event(actor, action, resource, started.elapsed(), error);
        if let Err(err) = self.store.append_audit(event).await {
            tracing::warn!(error = %err, action, resource, "could not append to the audit stream");
        }
    }
}

/// An audit entry: who did what to which resource, how it went and how long it took.
pub fn audit_event(
    actor: &Actor,
    action: &str,
    resource: &str,
    duration: std::time::Duration,
    error: Option<&impl ToString>,
) -> AuditEvent {
    AuditEvent {
        actor: actor.0.clone(),
        action: action.to_owned(),
        resource: resource.to_owned(),
        outcome: if error.is_some() {
            "failure"
        } else {
            "success"
        }
        .to_owned(),
        time_unix_ms: Utc::now().timestamp_millis(),
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        error: error.map(ToString::to_string).unwrap_or_default(),
    }
}

/// What a resume URL signs.
fn resume_message(run_id: &str) -> String {
    format!("piecework resume\n{run_id}")
}

/// A new run of `flow` and its span (a child of the caller's: the webhook request, the poll,
/// the sub-flow step), whose `traceparent` the run carries so that every step's span becomes
/// its child.
pub(crate) fn new_run(
    flow: &FlowVersion,
    run_id: String,
    trigger: Value,
    kind: TriggerKind,
    started_by: piecework_sdk::Principal,
) -> (Run, tracing::Span) {
    let span = tracing::info_span!(
        "run",
        otel.name = %format_args!("run {}", flow.flow_id),
        piecework.run.id = %run_id,
        piecework.flow.id = %flow.flow_id,
        piecework.flow.version = flow.version,
        piecework.trigger = ?kind,
        piecework.run.created = tracing::field::Empty,
    );
    let mut run = Run::new(run_id, &flow.flow_id, flow.version, trigger);
    run.trace = propagation::traceparent_of(&span);
    run.started_by = started_by;
    run.deadline = flow
        .definition
        .timeout
        .and_then(|timeout| chrono::Duration::from_std(timeout).ok())
        .map(|timeout| run.created_at + timeout);
    (run, span)
}

//! What an action or trigger receives besides its input: who and what is running, the
//! connection, a key-value store scoped to the flow, and an HTTP client.

use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::PieceError;
use crate::http::HttpClient;

/// Identifies the execution. `idempotency_key` is the same for every attempt of a step, so an
/// action can pass it to an API that deduplicates (e.g. an `Idempotency-Key` header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub flow_id: String,
    pub flow_version: u32,
    pub step: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub idempotency_key: String,
    /// Who started the run.
    #[serde(default)]
    pub started_by: Principal,
}

/// Who started a run, for permission checks inside a piece: an API key (`api:NAME`, with its
/// role), a webhook (`webhook:FLOW`), the scheduler (`schedule`: scheduled and polling flows).
/// Empty where nothing started a run (a connection check, `piece test`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Principal {
    pub name: String,
    /// The API key's role (`admin`, `developer`, `operator`, `viewer`); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Principal {
    pub fn new(name: impl Into<String>, role: Option<String>) -> Self {
        Self {
            name: name.into(),
            role,
        }
    }
}

impl RunInfo {
    pub fn new(run_id: &str, flow_id: &str, flow_version: u32, step: &str, attempt: u32) -> Self {
        Self {
            run_id: run_id.to_owned(),
            flow_id: flow_id.to_owned(),
            flow_version,
            step: step.to_owned(),
            attempt,
            idempotency_key: format!("{run_id}:{step}"),
            started_by: Principal::default(),
        }
    }

    /// Says who started the run.
    pub fn started_by(mut self, principal: Principal) -> Self {
        self.started_by = principal;
        self
    }
}

/// The flow's owner, for permission checks inside a piece (the guide's role-based access).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Owner {
    pub id: String,
}

/// Storage behind [`ScopedStore`]. Implemented by the store adapters (in-memory, Redis).
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Value>, PieceError>;
    async fn put(&self, key: &str, value: Value) -> Result<(), PieceError>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, PieceError>;
}

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Private to one flow (all its versions and runs).
    #[default]
    Flow,
    /// Shared by every flow of the installation.
    Global,
}

/// Storage addressed by scope and key: what a [`ScopedStore`] reads and writes through. The
/// store adapters are wrapped in one per flow ([`ScopedStore::new`]); a piece running in a
/// child process gets one that asks its host, which alone decides which flow the keys belong
/// to.
#[async_trait]
pub trait ScopedKv: Send + Sync + 'static {
    async fn get(&self, scope: Scope, key: &str) -> Result<Option<Value>, PieceError>;
    async fn put(&self, scope: Scope, key: &str, value: Value) -> Result<(), PieceError>;
    async fn delete(&self, scope: Scope, key: &str) -> Result<bool, PieceError>;
}

/// A key-value store whose keys are confined to a scope, so flows cannot read each other's
/// data by accident.
#[derive(Clone)]
pub struct ScopedStore {
    inner: Arc<dyn ScopedKv>,
}

/// [`ScopedKv`] over a flat [`KvStore`]: flow keys are prefixed with the flow's id.
struct FlowScoped {
    inner: Arc<dyn KvStore>,
    flow_id: String,
}

impl FlowScoped {
    fn key(&self, scope: Scope, key: &str) -> String {
        match scope {
            Scope::Flow => format!("flow:{}:{key}", self.flow_id),
            Scope::Global => format!("global:{key}"),
        }
    }
}

#[async_trait]
impl ScopedKv for FlowScoped {
    async fn get(&self, scope: Scope, key: &str) -> Result<Option<Value>, PieceError> {
        self.inner.get(&self.key(scope, key)).await
    }

    async fn put(&self, scope: Scope, key: &str, value: Value) -> Result<(), PieceError> {
        self.inner.put(&self.key(scope, key), value).await
    }

    async fn delete(&self, scope: Scope, key: &str) -> Result<bool, PieceError> {
        self.inner.delete(&self.key(scope, key)).await
    }
}

impl ScopedStore {
    /// The store of flow `flow_id` over `inner`.
    pub fn new(inner: Arc<dyn KvStore>, flow_id: impl Into<String>) -> Self {
        Self::from_scoped(Arc::new(FlowScoped {
            inner,
            flow_id: flow_id.into(),
        }))
    }

    /// A store whose scoping `inner` does itself.
    pub fn from_scoped(inner: Arc<dyn ScopedKv>) -> Self {
        Self { inner }
    }

    pub async fn get(&self, scope: Scope, key: &str) -> Result<Option<Value>, PieceError> {
        self.inner.get(scope, key).await
    }

    pub async fn put(&self, scope: Scope, key: &str, value: Value) -> Result<(), PieceError> {
        self.inner.put(scope, key, value).await
    }

    pub async fn delete(&self, scope: Scope, key: &str) -> Result<bool, PieceError> {
        self.inner.delete(scope, key).await
    }
}

/// Receives what [`Context::progress`] reports.
pub type ProgressSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything an action or trigger gets besides its input.
#[derive(Clone)]
pub struct Context {
    pub run: RunInfo,
    pub owner: Owner,
    pub store: ScopedStore,
    pub http: HttpClient,
    auth: Option<Value>,
    progress: Option<ProgressSink>,
    poll_cursor: Option<crate::polling::PollCursor>,
    webhook_url: Option<String>,
    trial: bool,
}

impl Context {
    pub fn new(run: RunInfo, owner: Owner, store: ScopedStore, http: HttpClient) -> Self {
        Self {
            run,
            owner,
            store,
            http,
            auth: None,
            progress: None,
            poll_cursor: None,
            webhook_url: None,
            trial: false,
        }
    }

    /// Marks a trial call (`piecework piece test`): nothing depends on its outcome.
    pub fn trial(mut self) -> Self {
        self.trial = true;
        self
    }

    /// Whether this is a trial call. A polling trigger keeping its own state (as triggers of
    /// the Activepieces framework do) should answer with the source's recent items and
    /// leave its state alone.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// Tells a webhook trigger the public URL its flow's calls arrive at.
    pub fn with_webhook_url(mut self, url: Option<String>) -> Self {
        self.webhook_url = url;
        self
    }

    /// For a webhook trigger (in its call and its enable and disable hooks): the public URL
    /// the flow's webhook calls arrive at, to register with the system that sends them.
    /// `None` when the installation has no public URL (`[api] public_url`).
    pub fn webhook_url(&self) -> Option<&str> {
        self.webhook_url.as_deref()
    }

    /// Tells a polling trigger how far its flow has read the source.
    pub fn with_poll_cursor(mut self, cursor: Option<crate::polling::PollCursor>) -> Self {
        self.poll_cursor = cursor;
        self
    }

    /// In a poll: how far the flow has read the source before (`None` on its first poll). A
    /// trigger that reads pages reads older ones until one [reaches] it.
    ///
    /// [reaches]: crate::polling::PollCursor::reaches
    pub fn poll_cursor(&self) -> Option<&crate::polling::PollCursor> {
        self.poll_cursor.as_ref()
    }

    /// Attaches the decrypted connection values.
    pub fn with_auth(mut self, auth: Option<Value>) -> Self {
        self.auth = auth;
        self
    }

    /// Sends what [`Context::progress`] reports to `sink` (the piece host does this).
    pub fn with_progress(mut self, sink: ProgressSink) -> Self {
        self.progress = Some(sink);
        self
    }

    /// Reports how a long action is getting on (`"exported 400 of 1000 rows"`). It is logged
    /// with the run's fields; never put a secret in it.
    pub fn progress(&self, message: &str) {
        match &self.progress {
            Some(sink) => sink(message),
            None => {
                tracing::debug!(run_id = %self.run.run_id, step = %self.run.step, message, "progress")
            }
        }
    }

    /// The connection values, deserialized into the piece's auth type.
    pub fn auth<T: DeserializeOwned>(&self) -> Result<T, PieceError> {
        let value = self
            .auth
            .as_ref()
            .ok_or_else(|| PieceError::fatal("this step needs a connection, and none is set"))?;
        // The serde error names the field, never echoes the value.
        T::deserialize(value).map_err(|e| PieceError::fatal(format!("connection values: {e}")))
    }

    pub fn auth_value(&self) -> Option<&Value> {
        self.auth.as_ref()
    }

    /// A copy without the connection values, for what outlives the call's need for them.
    pub fn without_auth(&self) -> Context {
        Context {
            run: self.run.clone(),
            owner: self.owner.clone(),
            store: self.store.clone(),
            http: self.http.clone(),
            auth: None,
            progress: self.progress.clone(),
            poll_cursor: self.poll_cursor.clone(),
            webhook_url: self.webhook_url.clone(),
            trial: self.trial,
        }
    }
}

impl std::fmt::Debug for Context {
    /// Leaves out the connection values, so a `?ctx` in a log line cannot leak them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("run", &self.run)
            .field("owner", &self.owner)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// An in-process [`KvStore`], for unit tests of pieces and the embedded default.
#[derive(Default)]
pub struct MemoryKv {
    map: std::sync::Mutex<std::collections::HashMap<String, Value>>,
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<Value>, PieceError> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }

    async fn put(&self, key: &str, value: Value) -> Result<(), PieceError> {
        self.map.lock().unwrap().insert(key.to_owned(), value);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, PieceError> {
        Ok(self.map.lock().unwrap().remove(key).is_some())
    }
}

impl Context {
    /// A context for unit-testing a piece: in-memory store, an HTTP client that may also reach
    /// loopback (where a test's mock API listens).
    pub fn for_test(step: &str) -> Self {
        Context::new(
            RunInfo::new("test-run", "test-flow", 1, step, 1),
            Owner {
                id: "tester".into(),
            },
            ScopedStore::new(Arc::new(MemoryKv::default()), "test-flow"),
            HttpClient::new(crate::egress::EgressPolicy::allowing_loopback())
                .expect("the default HTTP client builds"),
        )
    }
}

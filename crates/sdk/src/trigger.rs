//! Triggers: what starts a run.
//!
//! Three kinds, each its own trait because each is driven differently:
//! - [`PollingTrigger`]: the scheduler asks at an interval, the framework dedupes the items;
//! - [`WebhookTrigger`]: the API receives a request and turns it into items;
//! - [`ScheduleTrigger`]: the scheduler fires at the times the trigger's input describes.
//!
//! Each item a trigger produces starts one run.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::action::typed_input;
use crate::context::Context;
use crate::error::PieceError;
use crate::polling::{DedupeStrategy, PolledItem};
use crate::prop::{DropdownOptions, Prop, dynamic_dropdown};
use crate::schedule::Schedule;

/// How a trigger is driven, as shown in the metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TriggerKind {
    Polling {
        strategy: DedupeStrategy,
        /// Used when the flow sets no `poll_interval`.
        #[serde(with = "humantime_secs")]
        #[schemars(with = "String")]
        default_interval: Duration,
    },
    Webhook,
    Schedule,
}

/// Which of a trigger's lifecycle hooks runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerHook {
    /// The flow starts listening (`on_enable`).
    Enable,
    /// The flow stops listening (`on_disable`).
    Disable,
}

/// A trigger's metadata: the guide's `createTrigger` fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TriggerSpec {
    pub name: String,
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub props: Vec<Prop>,
    #[serde(default)]
    pub require_auth: bool,
    #[serde(flatten)]
    pub kind: TriggerKind,
}

impl TriggerSpec {
    fn new(name: impl Into<String>, display_name: impl Into<String>, kind: TriggerKind) -> Self {
        Self {
            name: name.into(),
            display_name: display_name.into(),
            description: String::new(),
            props: Vec::new(),
            require_auth: false,
            kind,
        }
    }

    /// A polling trigger, polled every minute unless the flow says otherwise.
    pub fn polling(
        name: impl Into<String>,
        display_name: impl Into<String>,
        strategy: DedupeStrategy,
    ) -> Self {
        let kind = TriggerKind::Polling {
            strategy,
            default_interval: Duration::from_secs(60),
        };
        Self::new(name, display_name, kind)
    }

    pub fn webhook(name: impl Into<String>, display_name: impl Into<String>) -> Self {
        Self::new(name, display_name, TriggerKind::Webhook)
    }

    pub fn schedule(name: impl Into<String>, display_name: impl Into<String>) -> Self {
        Self::new(name, display_name, TriggerKind::Schedule)
    }

    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub fn prop(mut self, prop: Prop) -> Self {
        self.props.push(prop);
        self
    }

    pub fn require_auth(mut self) -> Self {
        self.require_auth = true;
        self
    }

    pub fn default_interval(mut self, interval: Duration) -> Self {
        if let TriggerKind::Polling {
            default_interval, ..
        } = &mut self.kind
        {
            *default_interval = interval;
        }
        self
    }
}

mod humantime_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A trigger that fetches recent items from a source at an interval.
pub trait PollingTrigger: Send + Sync + 'static {
    type Input: DeserializeOwned + Send;

    fn spec(&self) -> TriggerSpec;

    /// Returns the source's current items (for `LastItem`, newest first). The framework
    /// decides which are new.
    fn poll(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<Vec<PolledItem>, PieceError>> + Send;

    /// Loads the options of the dynamic dropdown `prop`, as [`crate::Action::options`] does.
    fn options(
        &self,
        ctx: &Context,
        prop: &str,
        input: Value,
    ) -> impl Future<Output = Result<DropdownOptions, PieceError>> + Send {
        let _ = (ctx, input);
        let none = PieceError::fatal(format!(
            "the trigger loads no options for `{prop}` (it does not implement `PollingTrigger::options`)"
        ));
        async move { Err(none) }
    }

    /// Runs when the flow starts listening: it was enabled, or applied enabled with a new
    /// trigger. The place to register with the source (`ctx.webhook_url()`) and keep what
    /// undoing it needs in `ctx.store`. An error refuses the enable.
    fn on_enable(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<(), PieceError>> + Send {
        let _ = (ctx, input);
        std::future::ready(Ok(()))
    }

    /// Runs when the flow stops listening: it was disabled, or its trigger replaced. An
    /// error is logged; the flow is disabled all the same.
    fn on_disable(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<(), PieceError>> + Send {
        let _ = (ctx, input);
        std::future::ready(Ok(()))
    }
}

/// An incoming webhook request, as the webhook trigger sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookRequest {
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
    pub body: Value,
}

/// Headers that carry credentials: never stored in a run.
const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
];

impl WebhookRequest {
    /// The request as a run's trigger output, without credential headers.
    pub fn to_item(&self) -> Value {
        let headers: BTreeMap<&String, &String> = self
            .headers
            .iter()
            .filter(|(k, _)| !SENSITIVE_HEADERS.contains(&k.to_ascii_lowercase().as_str()))
            .collect();
        json!({
            "method": self.method,
            "headers": headers,
            "query": self.query,
            "body": self.body,
        })
    }
}

/// A trigger fed by HTTP requests to `/v1/webhooks/{flow}`.
pub trait WebhookTrigger: Send + Sync + 'static {
    type Input: DeserializeOwned + Send;

    fn spec(&self) -> TriggerSpec;

    /// Turns a request into the items that start runs (usually exactly one).
    fn handle(
        &self,
        input: Self::Input,
        request: &WebhookRequest,
    ) -> Result<Vec<Value>, PieceError> {
        let _ = input;
        Ok(vec![request.to_item()])
    }

    /// Runs when the flow starts listening: it was enabled, or applied enabled with a new
    /// trigger. The place to register with the source (`ctx.webhook_url()`) and keep what
    /// undoing it needs in `ctx.store`. An error refuses the enable.
    fn on_enable(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<(), PieceError>> + Send {
        let _ = (ctx, input);
        std::future::ready(Ok(()))
    }

    /// Runs when the flow stops listening: it was disabled, or its trigger replaced. An
    /// error is logged; the flow is disabled all the same.
    fn on_disable(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<(), PieceError>> + Send {
        let _ = (ctx, input);
        std::future::ready(Ok(()))
    }
}

/// A trigger that fires on a schedule its input describes.
pub trait ScheduleTrigger: Send + Sync + 'static {
    type Input: DeserializeOwned + Send;

    fn spec(&self) -> TriggerSpec;

    fn schedule(&self, input: Self::Input) -> Result<Schedule, PieceError>;
}

/// The object-safe forms the engine calls, one per kind.
pub trait DynPolling: Send + Sync {
    fn spec(&self) -> &TriggerSpec;
    fn poll_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Vec<PolledItem>, PieceError>>;
    /// Loads the options of dynamic dropdown `prop`; a prop that is not one is refused.
    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>>;
    /// Runs the trigger's `on_enable` or `on_disable`.
    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>>;
}

/// Asynchronous, unlike [`WebhookTrigger::handle`], because a host may run the trigger in
/// another process.
pub trait DynWebhook: Send + Sync {
    fn spec(&self) -> &TriggerSpec;
    fn handle_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
        request: &'a WebhookRequest,
    ) -> BoxFuture<'a, Result<Vec<Value>, PieceError>>;
    /// Runs the trigger's `on_enable` or `on_disable`.
    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>>;
}

/// Asynchronous for the same reason as [`DynWebhook`].
pub trait DynSchedule: Send + Sync {
    fn spec(&self) -> &TriggerSpec;
    fn schedule_json(&self, input: Value) -> BoxFuture<'_, Result<Schedule, PieceError>>;
}

/// A registered trigger of any kind.
#[derive(Clone)]
pub enum TriggerHandle {
    Polling(Arc<dyn DynPolling>),
    Webhook(Arc<dyn DynWebhook>),
    Schedule(Arc<dyn DynSchedule>),
}

impl TriggerHandle {
    pub fn spec(&self) -> &TriggerSpec {
        match self {
            TriggerHandle::Polling(t) => t.spec(),
            TriggerHandle::Webhook(t) => t.spec(),
            TriggerHandle::Schedule(t) => t.spec(),
        }
    }
}

pub(crate) struct Erased<T> {
    spec: TriggerSpec,
    trigger: T,
}

impl<T: PollingTrigger> DynPolling for Erased<T> {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn poll_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Vec<PolledItem>, PieceError>> {
        Box::pin(async move {
            let input = typed_input(&self.spec.props, &input)?;
            self.trigger.poll(ctx, input).await
        })
    }

    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>> {
        Box::pin(async move {
            dynamic_dropdown(&self.spec.props, &self.spec.name, prop)?;
            self.trigger.options(ctx, prop, input).await
        })
    }

    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>> {
        Box::pin(async move {
            let input = typed_input(&self.spec.props, &input)?;
            match hook {
                TriggerHook::Enable => self.trigger.on_enable(ctx, input).await,
                TriggerHook::Disable => self.trigger.on_disable(ctx, input).await,
            }
        })
    }
}

impl<T: WebhookTrigger> DynWebhook for Erased<T> {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn handle_json<'a>(
        &'a self,
        _ctx: &'a Context,
        input: Value,
        request: &'a WebhookRequest,
    ) -> BoxFuture<'a, Result<Vec<Value>, PieceError>> {
        let handled = typed_input(&self.spec.props, &input)
            .and_then(|input| self.trigger.handle(input, request));
        Box::pin(std::future::ready(handled))
    }

    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>> {
        Box::pin(async move {
            let input = typed_input(&self.spec.props, &input)?;
            match hook {
                TriggerHook::Enable => self.trigger.on_enable(ctx, input).await,
                TriggerHook::Disable => self.trigger.on_disable(ctx, input).await,
            }
        })
    }
}

impl<T: ScheduleTrigger> DynSchedule for Erased<T> {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn schedule_json(&self, input: Value) -> BoxFuture<'_, Result<Schedule, PieceError>> {
        let schedule =
            typed_input(&self.spec.props, &input).and_then(|input| self.trigger.schedule(input));
        Box::pin(std::future::ready(schedule))
    }
}

pub(crate) fn polling<T: PollingTrigger>(trigger: T) -> TriggerHandle {
    TriggerHandle::Polling(Arc::new(Erased {
        spec: trigger.spec(),
        trigger,
    }))
}

pub(crate) fn webhook<T: WebhookTrigger>(trigger: T) -> TriggerHandle {
    TriggerHandle::Webhook(Arc::new(Erased {
        spec: trigger.spec(),
        trigger,
    }))
}

pub(crate) fn schedule<T: ScheduleTrigger>(trigger: T) -> TriggerHandle {
    TriggerHandle::Schedule(Arc::new(Erased {
        spec: trigger.spec(),
        trigger,
    }))
}

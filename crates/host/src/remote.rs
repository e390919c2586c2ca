//! Stand-ins for a bundle's actions, triggers and auth check: the engine calls them like any
//! piece's, and each call goes to the bundle's pool over the protocol.
//!
//! Inputs are validated against the props here, before anything is sent, with the same
//! errors an in-process piece gives, whatever language the piece is written in.

use std::borrow::Cow;
use std::sync::Arc;

use futures::future::BoxFuture;
use piecework_sdk::action::{ActionSpec, DynAction};
use piecework_sdk::auth::DynValidateAuth;
use piecework_sdk::mask::Secrets;
use piecework_sdk::prop::{DropdownOptions, dynamic_dropdown, validate_props};
use piecework_sdk::protocol::{self, CallContext, method};
use piecework_sdk::trigger::{
    DynPolling, DynSchedule, DynWebhook, TriggerHandle, TriggerHook, TriggerSpec,
};
use piecework_sdk::{
    Context, Piece, PieceAuth, PieceDefinitionError, PieceError, PieceMetadata, PolledItem,
    Schedule, TriggerKind, WebhookRequest,
};
use serde_json::Value;

use crate::pool::Pool;
use crate::process::CallScope;

/// A piece whose every member calls `pool`.
pub fn piece(metadata: PieceMetadata, pool: Arc<Pool>) -> Result<Piece, PieceDefinitionError> {
    let auth = Arc::new(metadata.auth.clone());
    let actions = metadata
        .actions
        .iter()
        .map(|spec| {
            Arc::new(RemoteAction {
                spec: spec.clone(),
                pool: pool.clone(),
                auth: auth.clone(),
            }) as Arc<dyn DynAction>
        })
        .collect();
    let triggers = metadata
        .triggers
        .iter()
        .map(|spec| {
            let remote = Arc::new(RemoteTrigger {
                spec: spec.clone(),
                pool: pool.clone(),
                auth: auth.clone(),
            });
            match spec.kind {
                TriggerKind::Polling { .. } => TriggerHandle::Polling(remote),
                TriggerKind::Webhook => TriggerHandle::Webhook(remote),
                TriggerKind::Schedule => TriggerHandle::Schedule(remote),
            }
        })
        .collect();
    let validator = auth.is_required().then(|| {
        Arc::new(RemoteAuth {
            pool: pool.clone(),
            auth: auth.clone(),
        }) as Arc<dyn DynValidateAuth>
    });
    Piece::assemble(metadata, actions, triggers, validator)
}

fn call_context(ctx: &Context) -> CallContext<'_> {
    CallContext {
        run: Cow::Borrowed(&ctx.run),
        owner: Cow::Borrowed(&ctx.owner),
        auth: ctx.auth_value().map(Cow::Borrowed),
        limits: protocol::CallLimits {
            max_response_bytes: Some(ctx.http.max_response_bytes()),
        },
    }
}

/// The call's scope: its context (for the store and progress) and the secrets to mask.
fn scope(ctx: &Context, auth: &PieceAuth) -> CallScope {
    let secrets = ctx
        .auth_value()
        .map(|value| Secrets::of(auth, value))
        .unwrap_or_default();
    CallScope::of(ctx, secrets)
}

/// The member of a piece whose dropdown's options are loaded.
#[derive(Clone, Copy)]
enum Member<'a> {
    Action(&'a str),
    Trigger(&'a str),
}

/// Asks the piece for the options of `member`'s dynamic dropdown `prop`, after checking it is
/// one.
async fn load_options(
    pool: &Pool,
    auth: &PieceAuth,
    ctx: &Context,
    member: Member<'_>,
    props: &[piecework_sdk::Prop],
    prop: &str,
    input: Value,
) -> Result<DropdownOptions, PieceError> {
    let (action, trigger, name) = match member {
        Member::Action(name) => (Some(Cow::Borrowed(name)), None, name),
        Member::Trigger(name) => (None, Some(Cow::Borrowed(name)), name),
    };
    dynamic_dropdown(props, name, prop)?;
    let params = protocol::OptionsOf {
        action,
        trigger,
        prop: Cow::Borrowed(prop),
        input,
        context: call_context(ctx),
    };
    pool.call(method::OPTIONS, &params, Some(scope(ctx, auth)))
        .await
}

struct RemoteAction {
    spec: ActionSpec,
    pool: Arc<Pool>,
    auth: Arc<PieceAuth>,
}

impl DynAction for RemoteAction {
    fn spec(&self) -> &ActionSpec {
        &self.spec
    }

    fn run_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, PieceError>> {
        Box::pin(async move {
            let input = validate_props(&self.spec.props, &input)?;
            let params = protocol::RunAction {
                action: Cow::Borrowed(&self.spec.name),
                input: Value::Object(input),
                context: call_context(ctx),
            };
            self.pool
                .call(method::RUN_ACTION, &params, Some(scope(ctx, &self.auth)))
                .await
        })
    }

    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>> {
        let member = Member::Action(&self.spec.name);
        Box::pin(load_options(
            &self.pool,
            &self.auth,
            ctx,
            member,
            &self.spec.props,
            prop,
            input,
        ))
    }
}

/// One type for the three trigger kinds: the handle says which it is.
struct RemoteTrigger {
    spec: TriggerSpec,
    pool: Arc<Pool>,
    auth: Arc<PieceAuth>,
}

impl RemoteTrigger {
    fn input(&self, input: &Value) -> Result<Value, PieceError> {
        Ok(Value::Object(validate_props(&self.spec.props, input)?))
    }

    /// Sends `enable` or `disable`; a piece older than protocol 1.3 has no hooks to run.
    async fn hook(&self, ctx: &Context, hook: TriggerHook, input: Value) -> Result<(), PieceError> {
        let process = self.pool.process().await?;
        if !process.speaks(HOOKS_MINOR) {
            return Ok(());
        }
        let params = protocol::TriggerHookOf {
            trigger: Cow::Borrowed(&self.spec.name),
            input: self.input(&input)?,
            context: call_context(ctx),
            webhook_url: ctx.webhook_url().map(Cow::Borrowed),
        };
        let name = match hook {
            TriggerHook::Enable => method::ENABLE,
            TriggerHook::Disable => method::DISABLE,
        };
        let scope = Some(scope(ctx, &self.auth));
        process
            .call::<Option<Value>>(name, &params, scope)
            .await
            .map(drop)
    }
}

/// The protocol minor that brought `enable` and `disable`.
const HOOKS_MINOR: u64 = 3;

impl DynPolling for RemoteTrigger {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn poll_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Vec<PolledItem>, PieceError>> {
        Box::pin(async move {
            let params = protocol::Poll {
                trigger: Cow::Borrowed(&self.spec.name),
                input: self.input(&input)?,
                context: call_context(ctx),
                cursor: ctx.poll_cursor().map(Cow::Borrowed),
                trial: ctx.is_trial(),
            };
            self.pool
                .call(method::POLL, &params, Some(scope(ctx, &self.auth)))
                .await
        })
    }

    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>> {
        let member = Member::Trigger(&self.spec.name);
        Box::pin(load_options(
            &self.pool,
            &self.auth,
            ctx,
            member,
            &self.spec.props,
            prop,
            input,
        ))
    }

    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>> {
        Box::pin(self.hook(ctx, hook, input))
    }
}

impl DynWebhook for RemoteTrigger {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn handle_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
        request: &'a WebhookRequest,
    ) -> BoxFuture<'a, Result<Vec<Value>, PieceError>> {
        Box::pin(async move {
            let params = protocol::Webhook {
                trigger: Cow::Borrowed(&self.spec.name),
                input: self.input(&input)?,
                request: Cow::Borrowed(request),
                context: Some(call_context(ctx)),
                webhook_url: ctx.webhook_url().map(Cow::Borrowed),
            };
            let scope = Some(scope(ctx, &self.auth));
            self.pool.call(method::WEBHOOK, &params, scope).await
        })
    }

    fn hook_json<'a>(
        &'a self,
        ctx: &'a Context,
        hook: TriggerHook,
        input: Value,
    ) -> BoxFuture<'a, Result<(), PieceError>> {
        Box::pin(self.hook(ctx, hook, input))
    }
}

impl DynSchedule for RemoteTrigger {
    fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    fn schedule_json(&self, input: Value) -> BoxFuture<'_, Result<Schedule, PieceError>> {
        Box::pin(async move {
            let params = protocol::ScheduleOf {
                trigger: Cow::Borrowed(&self.spec.name),
                input: self.input(&input)?,
            };
            self.pool.call(method::SCHEDULE, &params, None).await
        })
    }
}

struct RemoteAuth {
    pool: Arc<Pool>,
    auth: Arc<PieceAuth>,
}

impl DynValidateAuth for RemoteAuth {
    fn validate<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<(), PieceError>> {
        Box::pin(async move {
            let params = protocol::ValidateAuth {
                context: call_context(ctx),
            };
            self.pool
                .call::<Option<Value>>(method::VALIDATE_AUTH, &params, Some(scope(ctx, &self.auth)))
                .await
                .map(drop)
        })
    }
}

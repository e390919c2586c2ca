//! A trigger's enable and disable hooks: what lets a webhook trigger register itself with the
//! system that calls it (and remove the registration), or a polling trigger set up its state.
//!
//! They run in the process that changes whether a flow listens — the api, on apply, enable
//! and disable — when the flow's *trigger* starts or stops listening: enabling a flow, a
//! flow applied enabled for the first time, applying an enabled flow whose trigger changed
//! (the old one is disabled first, then the new one enabled: both keep what they registered
//! in the flow's store), disabling it. Re-applying an enabled flow with the same trigger runs
//! nothing, so a registration and a trigger's cursor outlive edits to the steps.
//!
//! A failed enable refuses the change; a failed disable is logged and the flow is disabled
//! all the same (the source may keep calling: the calls are refused, as for any disabled
//! flow).

use std::time::Duration;

use piecework_core::FlowVersion;
use piecework_core::retry::RetryPolicy;
use piecework_sdk::mask::Secrets;
use piecework_sdk::{PieceError, Principal, RunInfo, TriggerHandle, TriggerHook};
use serde_json::Value;

use crate::{Actor, Runtime, RuntimeError};

/// How long a hook may take, retries included: it usually makes one call to a third party,
/// and a re-apply may run two hooks within the api's request timeout (60 s).
const HOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// What a flow's listening was before and is after a change: its enabled version, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Listening {
    pub before: Option<u32>,
    pub after: Option<u32>,
}

impl Runtime {
    /// The public URL a flow's webhook calls arrive at, as a trigger registers it.
    pub fn webhook_url(&self, flow_id: &str) -> String {
        format!("{}/v1/webhooks/{flow_id}", self.public_url)
    }

    /// Runs the hooks a change of `flow_id`'s listening calls for (see the module's docs).
    /// On a failed enable the flow is disabled and the error says so.
    pub(crate) async fn run_trigger_hooks(
        &self,
        flow_id: &str,
        listening: Listening,
        actor: &Actor,
    ) -> Result<(), RuntimeError> {
        let before = match listening.before {
            Some(version) => self.flow_version(flow_id, version).await?,
            None => None,
        };
        let after = match listening.after {
            Some(version) => self.flow_version(flow_id, version).await?,
            None => None,
        };
        let same_trigger = match (&before, &after) {
            (Some(old), Some(new)) => {
                old.definition.trigger == new.definition.trigger
                    && old.trigger_version() == new.trigger_version()
            }
            _ => false,
        };
        if same_trigger {
            return Ok(());
        }
        if let Some(old) = &before
            && let Err(error) = self.trigger_hook(old, TriggerHook::Disable, actor).await
        {
            tracing::warn!(flow = flow_id, version = old.version, %error, "the trigger's disable hook failed; the flow stops listening all the same");
        }
        let Some(new) = &after else {
            return Ok(());
        };
        if let Err(error) = self.trigger_hook(new, TriggerHook::Enable, actor).await {
            self.store.set_flow_enabled(flow_id, false).await?;
            return Err(RuntimeError::PieceFailed(format!(
                "flow `{flow_id}` version {} is disabled: its trigger's enable hook failed: {error}",
                new.version
            )));
        }
        Ok(())
    }

    /// Runs `hook` of `flow`'s trigger, if it is a polling or webhook trigger, with the
    /// trigger's connection and the flow's store; `actor` made the change (the context's
    /// `started_by`).
    pub async fn trigger_hook(
        &self,
        flow: &FlowVersion,
        hook: TriggerHook,
        actor: &Actor,
    ) -> Result<(), RuntimeError> {
        let trigger = &flow.definition.trigger;
        let Some(version) = flow.trigger_version() else {
            return Ok(());
        };
        let piece = self
            .catalog()
            .get_or_fetch(&trigger.piece, version)
            .await
            .map_err(RuntimeError::Unavailable)?
            .ok_or_else(|| RuntimeError::NoSuchPiece(format!("{}@{version}", trigger.piece)))?;
        // A flow may be applied before its connection is saved: hooks that need it say so.
        let mut missing = None;
        let (auth, secrets) = match &trigger.connection {
            Some(name) => match self.trigger_connection(flow, name).await {
                Err(RuntimeError::NoSuchConnection(name)) => {
                    missing = Some(name);
                    (None, Secrets::default())
                }
                found => found?,
            },
            None => (None, Secrets::default()),
        };
        let name = match hook {
            TriggerHook::Enable => "enable",
            TriggerHook::Disable => "disable",
        };
        let run = RunInfo::new(name, &flow.flow_id, flow.version, "trigger", 1)
            .started_by(Principal::new(actor.0.clone(), None));
        let ctx = self
            .context(run, flow, auth)
            .with_webhook_url(Some(self.webhook_url(&flow.flow_id)));
        let input = Value::Object(trigger.input.clone());
        let once = || async {
            match piece.trigger(&trigger.trigger) {
                Some(TriggerHandle::Polling(polling)) => {
                    polling.hook_json(&ctx, hook, input.clone()).await
                }
                Some(TriggerHandle::Webhook(webhook)) => {
                    webhook.hook_json(&ctx, hook, input.clone()).await
                }
                _ => Ok(()),
            }
        };
        // A retryable failure (the piece's process starting, the source answering 503) is
        // tried again while the hook's time lasts; the last failure is the answer.
        let deadline = tokio::time::Instant::now() + HOOK_TIMEOUT;
        let policy = RetryPolicy {
            initial_interval: Duration::from_millis(500),
            max_interval: Duration::from_secs(8),
            ..RetryPolicy::default()
        };
        let mut attempt = 0;
        let error = loop {
            attempt += 1;
            let error = match tokio::time::timeout_at(deadline, once()).await {
                Ok(Ok(())) => {
                    tracing::info!(flow = %flow.flow_id, version = flow.version, trigger = %trigger.trigger, hook = name, "trigger hook ran");
                    return Ok(());
                }
                Ok(Err(error)) => error,
                Err(_) => PieceError::retryable(format!(
                    "it did not finish within {}",
                    humantime::format_duration(HOOK_TIMEOUT)
                )),
            };
            let delay = error
                .retry_after()
                .unwrap_or_else(|| policy.delay_after(attempt));
            if !error.is_retryable() || tokio::time::Instant::now() + delay >= deadline {
                break secrets.mask(error.message()).into_owned();
            }
            tracing::debug!(flow = %flow.flow_id, error = %secrets.mask(error.message()), ?delay, "trigger hook failed; trying again");
            tokio::time::sleep(delay).await;
        };
        let hint = missing
            .map(|name| format!(" (its connection `{name}` does not exist yet)"))
            .unwrap_or_default();
        Err(RuntimeError::PieceFailed(format!(
            "trigger `{}` of piece `{}`: {error}{hint}",
            trigger.trigger, trigger.piece
        )))
    }
}

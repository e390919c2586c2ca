//! `piecework piece test`: runs one action or trigger of a piece locally, exactly as a worker
//! would (input validated against the props, the connection's values as `ctx.auth()`; a
//! bundle in its own process over the protocol), and prints what it returns. The guide's
//! "test locally", without deploying anything.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use piecework_sdk::{
    Context, EgressPolicy, HttpClient, MemoryKv, Owner, RunInfo, ScopedStore, TriggerHandle,
    WebhookRequest,
};
use serde_json::Value;

use crate::cli::ConfigArgs;
use crate::config::Config;
use crate::infra::{self, Infra};

/// What a piece run on the author's machine may reach: what a deployed worker may, plus
/// loopback (a local mock of the API being integrated) and `PW_EGRESS_ALLOW`.
pub fn local_egress() -> EgressPolicy {
    let mut policy = EgressPolicy::allowing_loopback();
    if let Ok(allow) = std::env::var("PW_EGRESS_ALLOW") {
        policy.extend_allow(&allow);
    }
    policy
}

pub async fn run(
    piece: &str,
    name: &str,
    input: &str,
    auth: Option<&str>,
    connection: Option<&str>,
    owner: &str,
) -> anyhow::Result<()> {
    let input = read_json("--input", input)?;
    let opened = crate::bundles::open(piece, pieces_dir().as_deref()).await?;
    let found = opened.piece.clone();
    let piece = found.name().to_owned();
    let result = run_member(&found, name, input, auth, connection, owner).await;
    opened.close().await;
    let output = result?;
    match output {
        Ok(value) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Err(err) => {
            let kind = if err.is_retryable() {
                "retryable"
            } else {
                "fatal"
            };
            bail!("{piece}/{name} failed ({kind}): {err}")
        }
    }
}

fn pieces_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PW_PIECES_DIR")
        .filter(|d| !d.is_empty())
        .map(Into::into)
}

async fn run_member(
    found: &piecework_sdk::Piece,
    name: &str,
    input: Value,
    auth: Option<&str>,
    connection: Option<&str>,
    owner: &str,
) -> anyhow::Result<Result<Value, piecework_sdk::PieceError>> {
    let piece = found.name();
    let auth = match (auth, connection) {
        (Some(source), _) => Some(read_json("--auth", source)?),
        (None, Some(connection)) => Some(stored_connection(connection, piece).await?),
        (None, None) => None,
    };
    let ctx = Context::new(
        RunInfo::new("local-test", "local", 0, name, 1),
        Owner {
            id: owner.to_owned(),
        },
        ScopedStore::new(Arc::new(MemoryKv::default()), "local"),
        HttpClient::new(local_egress())?,
    )
    .with_auth(auth)
    .with_webhook_url(Some("http://127.0.0.1:8080/v1/webhooks/local".into()))
    .trial();

    let output = if let Some(action) = found.action(name) {
        action.run_json(&ctx, input).await
    } else {
        match found.trigger(name) {
            Some(TriggerHandle::Polling(trigger)) => trigger
                .poll_json(&ctx, input)
                .await
                .map(|items| serde_json::to_value(items).expect("items serialize")),
            Some(TriggerHandle::Webhook(trigger)) => {
                let request = WebhookRequest {
                    method: "POST".into(),
                    body: input,
                    ..WebhookRequest::default()
                };
                trigger
                    .handle_json(&ctx, Value::Object(Default::default()), &request)
                    .await
                    .map(Value::Array)
            }
            Some(TriggerHandle::Schedule(trigger)) => {
                trigger.schedule_json(input).await.map(|schedule| {
                    let mut ticks = Vec::new();
                    let mut at = chrono::Utc::now();
                    for _ in 0..5 {
                        let Some(next) = schedule.next_after(at) else {
                            break;
                        };
                        ticks.push(Value::String(next.to_rfc3339()));
                        at = next;
                    }
                    serde_json::json!({ "next_ticks": ticks })
                })
            }
            None => {
                let actions: Vec<&str> = found.actions().map(|a| a.spec().name.as_str()).collect();
                let triggers: Vec<&str> =
                    found.triggers().map(|t| t.spec().name.as_str()).collect();
                bail!(
                    "piece `{piece}` has no action or trigger `{name}` (actions: {}; triggers: {})",
                    actions.join(", "),
                    triggers.join(", ")
                );
            }
        }
    };
    Ok(output)
}

/// JSON from an argument: inline, `@FILE`, or `-` for standard input.
fn read_json(flag: &str, source: &str) -> anyhow::Result<Value> {
    let text = match source {
        "-" => std::io::read_to_string(std::io::stdin())
            .with_context(|| format!("{flag}: cannot read standard input"))?,
        path if path.starts_with('@') => std::fs::read_to_string(&path[1..])
            .with_context(|| format!("{flag}: cannot read {}", &path[1..]))?,
        inline => inline.to_owned(),
    };
    // Never echo the text: --auth carries secrets.
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{flag} is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// Opens a stored connection the way a worker does.
async fn stored_connection(name: &str, piece: &str) -> anyhow::Result<Value> {
    let common = ConfigArgs {
        config: std::env::var_os("PW_CONFIG").map(Into::into),
        nats_url: None,
        redis_url: std::env::var("PW_REDIS_URL").ok(),
        encryption_key: std::env::var("PW_ENCRYPTION_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        pieces_dir: None,
        trusted_keys: None,
        pieces_cache: None,
    };
    let config = Config::load(&common, |_| {})?;
    let keyring = infra::keyring(&common, true)?;
    let (runtime, _) = infra::runtime(
        &config,
        crate::registry::pieces()?,
        Infra {
            nats: false,
            redis: true,
        },
        keyring,
    )
    .await?;
    Ok(runtime.connection_values(name, piece).await?)
}

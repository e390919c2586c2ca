//! `probe`: a piece that does what tests of a piece host need — answer, wait, hang, crash,
//! allocate, dump its environment or its context, use the store, log, fail on demand — served
//! over piece protocol v1. Its version is read from `version.txt` in its working directory
//! (the unpacked bundle; default `1.0.0`), so one build packs as any number of versions of one
//! piece. Never deploy it: `env` prints its environment.

use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use piecework_sdk::prelude::*;
use piecework_sdk::{PolledItem, WebhookRequest};
use serde::Deserialize;
use serde_json::{Value, json};

static VERSION: LazyLock<String> = LazyLock::new(|| {
    std::fs::read_to_string("version.txt")
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "1.0.0".to_owned())
});

fn main() -> ExitCode {
    piecework_sdk::serve(piece())
}

fn piece() -> Result<Piece, piecework_sdk::PieceDefinitionError> {
    Piece::builder("probe", "Probe")
        .description("Test double for piece hosts")
        .version(VERSION.as_str())
        .auth(PieceAuth::custom(
            "Probe key",
            [
                Prop::secret_text("key", "Key").required(),
                Prop::short_text("region", "Region"),
            ],
        ))
        .validate_auth(CheckKey)
        .action(Echo)
        .action(Noop)
        .action(Sleep)
        .action(Hang)
        .action(Crash)
        .action(Env)
        .action(Whoami)
        .action(Store)
        .action(Log)
        .action(Fail)
        .action(Alloc)
        .action(Big)
        .polling_trigger(Ticks)
        .webhook_trigger(Hook)
        .schedule_trigger(Every)
        .build()
}

struct CheckKey;

impl ValidateAuth for CheckKey {
    async fn validate(&self, ctx: &Context) -> Result<(), PieceError> {
        let auth: Value = ctx.auth()?;
        match auth["key"].as_str() {
            Some(key) if key.starts_with("good") => Ok(()),
            _ => Err(PieceError::fatal("the key was refused")),
        }
    }
}

macro_rules! action {
    ($ty:ident, $name:literal, $input:ty, |$ctx:ident, $in:ident| $body:expr, $($prop:expr),* $(,)?) => {
        struct $ty;
        impl Action for $ty {
            type Input = $input;
            type Output = Value;
            fn spec(&self) -> ActionSpec {
                ActionSpec::new($name, $name)$(.prop($prop))*
            }
            async fn run(&self, $ctx: &Context, $in: $input) -> Result<Value, PieceError> {
                $body
            }
        }
    };
}

#[derive(Deserialize)]
struct EchoIn {
    value: Value,
}

action!(
    Echo,
    "echo",
    EchoIn,
    |ctx, input| Ok(json!({
        "value": input.value,
        "version": *VERSION,
        "pid": std::process::id(),
        "run": ctx.run.run_id,
        "attempt": ctx.run.attempt,
        "owner": ctx.owner.id,
    })),
    Prop::json("value", "Value").required()
);

// Returns its input's value, as the built-in `data.set` does: the benchmark's no-op.
action!(
    Noop,
    "noop",
    EchoIn,
    |_ctx, input| Ok(input.value),
    Prop::json("value", "Value").required()
);

#[derive(Deserialize)]
struct Millis {
    ms: u64,
}

/// Says on stderr when a long sleep starts, and when a sleep is stopped early (the host's
/// `cancel` drops it).
struct Sleeping {
    ms: u64,
    since: std::time::Instant,
    done: bool,
}

impl Drop for Sleeping {
    fn drop(&mut self) {
        if !self.done {
            eprintln!(
                "probe: sleep of {} ms stopped after {} ms",
                self.ms,
                self.since.elapsed().as_millis()
            );
        }
    }
}

action!(
    Sleep,
    "sleep",
    Millis,
    |_ctx, input| {
        if input.ms >= 10_000 {
            eprintln!("probe: sleeping {} ms", input.ms);
        }
        let mut sleeping = Sleeping {
            ms: input.ms,
            since: std::time::Instant::now(),
            done: false,
        };
        tokio::time::sleep(Duration::from_millis(input.ms)).await;
        sleeping.done = true;
        Ok(json!({ "slept_ms": input.ms, "version": *VERSION }))
    },
    Prop::number("ms", "Milliseconds").required()
);

// Blocks its thread: a cancel cannot stop it.
action!(
    Hang,
    "hang",
    Millis,
    |_ctx, input| {
        std::thread::sleep(Duration::from_millis(input.ms));
        Ok(json!({ "hung_ms": input.ms }))
    },
    Prop::number("ms", "Milliseconds").required()
);

#[derive(Deserialize)]
struct Nothing {}

action!(Crash, "crash", Nothing, |_ctx, _input| {
    eprintln!("probe: crashing on purpose");
    std::process::abort()
},);

action!(Env, "env", Nothing, |_ctx, _input| {
    let vars: serde_json::Map<String, Value> = std::env::vars()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(
        json!({ "env": vars, "cwd": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default() }),
    )
},);

action!(Whoami, "whoami", Nothing, |ctx, _input| {
    Ok(json!({ "run": ctx.run, "owner": ctx.owner }))
},);

#[derive(Deserialize)]
struct StoreIn {
    key: String,
    value: Value,
    #[serde(default)]
    global: bool,
}

action!(
    Store,
    "store",
    StoreIn,
    |ctx, input| {
        let scope = if input.global {
            Scope::Global
        } else {
            Scope::Flow
        };
        let before = ctx.store.get(scope, &input.key).await?;
        ctx.store.put(scope, &input.key, input.value).await?;
        let after = ctx.store.get(scope, &input.key).await?;
        Ok(json!({ "before": before, "after": after }))
    },
    Prop::short_text("key", "Key").required(),
    Prop::json("value", "Value").required(),
    Prop::checkbox("global", "Global")
);

#[derive(Deserialize)]
struct LogIn {
    message: String,
}

// Logs three ways, the connection's key included: hosts must mask it.
action!(
    Log,
    "log",
    LogIn,
    |ctx, input| {
        let key = ctx
            .auth_value()
            .and_then(|a| a["key"].as_str())
            .unwrap_or("")
            .to_owned();
        tracing::info!(detail = %key, "probe says {} with key {key}", input.message);
        eprintln!("probe stderr: {} with key {key}", input.message);
        ctx.progress(&format!("{} half done", input.message));
        Ok(json!({ "logged": input.message }))
    },
    Prop::short_text("message", "Message").required()
);

#[derive(Deserialize)]
struct FailIn {
    retryable: bool,
    message: String,
}

action!(
    Fail,
    "fail",
    FailIn,
    |_ctx, input| Err(if input.retryable {
        PieceError::retryable(input.message).with_retry_after(Duration::from_millis(1500))
    } else {
        PieceError::fatal(input.message)
    }),
    Prop::checkbox("retryable", "Retryable").required(),
    Prop::short_text("message", "Message").required()
);

#[derive(Deserialize)]
struct AllocIn {
    mb: usize,
}

action!(
    Alloc,
    "alloc",
    AllocIn,
    |_ctx, input| {
        let mut block = vec![0u8; input.mb << 20];
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        Ok(
            json!({ "allocated_mb": input.mb, "touched": block.iter().filter(|b| **b == 1).count() }),
        )
    },
    Prop::number("mb", "MiB").required()
);

#[derive(Deserialize)]
struct BigIn {
    bytes: usize,
}

action!(
    Big,
    "big",
    BigIn,
    |_ctx, input| Ok(json!({ "text": "x".repeat(input.bytes) })),
    Prop::number("bytes", "Bytes").required()
);

struct Ticks;

#[derive(Deserialize)]
struct TicksIn {
    #[serde(default)]
    items: Vec<String>,
}

impl PollingTrigger for Ticks {
    type Input = TicksIn;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::polling("ticks", "Ticks", DedupeStrategy::LastItem)
            .prop(Prop::array("items", "Items"))
    }

    async fn poll(&self, ctx: &Context, input: TicksIn) -> Result<Vec<PolledItem>, PieceError> {
        let mut items = input.items;
        if let Some(Value::Array(stored)) = ctx.store.get(Scope::Flow, "ticks").await? {
            items.extend(stored.iter().filter_map(|v| v.as_str().map(str::to_owned)));
        }
        Ok(items
            .into_iter()
            .rev()
            .map(|id| PolledItem::new(json!({ "id": id, "version": *VERSION })).id(id))
            .collect())
    }
}

struct Hook;

#[derive(Deserialize)]
struct HookIn {}

impl WebhookTrigger for Hook {
    type Input = HookIn;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("hook", "Hook")
    }

    fn handle(&self, _input: HookIn, request: &WebhookRequest) -> Result<Vec<Value>, PieceError> {
        match &request.body {
            Value::Array(items) => Ok(items.clone()),
            other => Ok(vec![json!({ "body": other, "version": *VERSION })]),
        }
    }

    /// "Registers" the flow's webhook URL, with the connection's key, in the flow's store.
    async fn on_enable(&self, ctx: &Context, _input: HookIn) -> Result<(), PieceError> {
        let key = ctx.auth_value().and_then(|a| a.get("key")).cloned();
        let registration = json!({ "url": ctx.webhook_url(), "has_key": key.is_some() });
        ctx.store
            .put(Scope::Flow, "registration", registration)
            .await
    }

    async fn on_disable(&self, ctx: &Context, _input: HookIn) -> Result<(), PieceError> {
        ctx.store
            .delete(Scope::Flow, "registration")
            .await
            .map(drop)
    }
}

struct Every;

#[derive(Deserialize)]
struct EveryIn {
    every: String,
}

impl ScheduleTrigger for Every {
    type Input = EveryIn;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::schedule("every", "Every")
            .prop(Prop::short_text("every", "Interval").required())
    }

    fn schedule(&self, input: EveryIn) -> Result<Schedule, PieceError> {
        Schedule::parse_interval(&input.every)
    }
}

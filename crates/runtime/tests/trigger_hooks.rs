//! When a trigger's enable and disable hooks run, through the runtime's own operations —
//! apply, enable, disable, upgrade — with an in-process piece whose hooks write down each
//! call (the memory store and bus: what is under test is the sequencing).

use std::sync::{Arc, Mutex};

use piecework_bus::memory::MemoryBus;
use piecework_core::flow::{FlowDefinition, Format};
use piecework_core::{Catalog, Registry};
use piecework_runtime::{Actor, Runtime, RuntimeError};
use piecework_sdk::prelude::*;
use piecework_sdk::{EgressPolicy, WebhookRequest};
use piecework_store::memory::MemoryStore;
use serde::Deserialize;
use serde_json::Value;

type Log = Arc<Mutex<Vec<String>>>;

/// A webhook trigger of version `version` that logs `enable 1.0.0 v3 <url>` per hook call
/// and refuses to enable when its input says so.
struct Listen {
    version: &'static str,
    log: Log,
    /// Enables to fail as retryable (a source answering 503) before one goes through.
    unavailable: std::sync::atomic::AtomicU32,
}

#[derive(Deserialize)]
struct ListenIn {
    #[serde(default)]
    refuse: bool,
}

impl Listen {
    fn note(&self, ctx: &Context, hook: &str) {
        let url = ctx.webhook_url().unwrap_or("-");
        self.log.lock().unwrap().push(format!(
            "{hook} {} v{} {url}",
            self.version, ctx.run.flow_version
        ));
    }
}

impl WebhookTrigger for Listen {
    type Input = ListenIn;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("listen", "Listen").prop(Prop::checkbox("refuse", "Refuse"))
    }

    fn handle(&self, _input: ListenIn, request: &WebhookRequest) -> Result<Vec<Value>, PieceError> {
        Ok(vec![request.to_item()])
    }

    async fn on_enable(&self, ctx: &Context, input: ListenIn) -> Result<(), PieceError> {
        if input.refuse {
            return Err(PieceError::fatal("the source refused the registration"));
        }
        let left = &self.unavailable;
        if left.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            self.note(ctx, "unavailable");
            return Err(PieceError::retryable("HTTP 503: the source is restarting"));
        }
        self.note(ctx, "enable");
        Ok(())
    }

    async fn on_disable(&self, ctx: &Context, _input: ListenIn) -> Result<(), PieceError> {
        self.note(ctx, "disable");
        Ok(())
    }
}

fn hooked(version: &'static str, log: &Log) -> Piece {
    hooked_unavailable(version, log, 0)
}

/// [`hooked`], whose first `unavailable` enables fail as retryable.
fn hooked_unavailable(version: &'static str, log: &Log, unavailable: u32) -> Piece {
    Piece::builder("hooked", "Hooked")
        .version(version)
        .webhook_trigger(Listen {
            version,
            log: log.clone(),
            unavailable: unavailable.into(),
        })
        .build()
        .unwrap()
}

fn flow(input: &str, step: &str) -> FlowDefinition {
    let text = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: listening\ntrigger: {{ piece: hooked, trigger: listen, auth: none, input: {{ {input} }} }}\nsteps:\n  - {{ name: {step}, piece: data, action: set }}\n"
    );
    FlowDefinition::parse(&text, Format::Yaml).unwrap()
}

fn taken(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

#[tokio::test]
async fn hooks_run_when_the_trigger_starts_or_stops_listening_and_only_then() {
    let log: Log = Arc::default();
    let mut registry = Registry::default();
    registry.register(hooked("1.0.0", &log)).unwrap();
    registry.register(steps()).unwrap();
    let catalog = Arc::new(Catalog::new(registry));
    let runtime = Runtime::new(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryBus::new()),
        catalog.clone(),
        EgressPolicy::default(),
    )
    .unwrap()
    .with_public_url("https://pw.example".into());
    let actor = Actor("api:test".into());
    let url = "https://pw.example/v1/webhooks/listening";

    // First apply: enabled, so the trigger starts listening.
    runtime.apply_flow(flow("", "a"), &actor).await.unwrap();
    assert_eq!(taken(&log), [format!("enable 1.0.0 v1 {url}")]);
    // The same trigger, other steps: nothing runs.
    runtime.apply_flow(flow("", "b"), &actor).await.unwrap();
    assert!(taken(&log).is_empty());
    // Disable, disable again, enable.
    runtime
        .set_flow_enabled("listening", false, &actor)
        .await
        .unwrap();
    runtime
        .set_flow_enabled("listening", false, &actor)
        .await
        .unwrap();
    runtime
        .set_flow_enabled("listening", true, &actor)
        .await
        .unwrap();
    assert_eq!(
        taken(&log),
        [
            format!("disable 1.0.0 v2 {url}"),
            format!("enable 1.0.0 v2 {url}")
        ]
    );

    // An upgrade that moves the trigger to a new piece version: old off, then new on — the
    // new one's source is unavailable twice, and the hook is tried again until it answers.
    catalog
        .update(|registry| registry.register(hooked_unavailable("1.1.0", &log, 2)))
        .unwrap();
    let upgraded = runtime
        .upgrade_flow("listening", "hooked", None, false, &actor)
        .await
        .unwrap();
    assert!(upgraded.created);
    assert_eq!(
        taken(&log),
        [
            format!("disable 1.0.0 v2 {url}"),
            format!("unavailable 1.1.0 v3 {url}"),
            format!("unavailable 1.1.0 v3 {url}"),
            format!("enable 1.1.0 v3 {url}")
        ]
    );

    // A changed trigger that refuses: the old one is off, the flow is left disabled, and the
    // error says so.
    let refused = runtime
        .apply_flow(flow("refuse: true", "b"), &actor)
        .await
        .unwrap_err();
    assert!(matches!(refused, RuntimeError::PieceFailed(_)), "{refused}");
    let message = refused.to_string();
    assert!(
        message.contains("is disabled") && message.contains("refused the registration"),
        "{message}"
    );
    assert_eq!(taken(&log), [format!("disable 1.1.0 v3 {url}")]);
    let record = runtime.flow_record("listening").await.unwrap().unwrap();
    assert!(!record.enabled);
    // Enabling it while the trigger refuses fails the same way and changes nothing.
    assert!(
        runtime
            .set_flow_enabled("listening", true, &actor)
            .await
            .is_err()
    );
    let record = runtime.flow_record("listening").await.unwrap().unwrap();
    assert!(!record.enabled);
    assert!(taken(&log).is_empty());
}

/// A piece for the flow's step, which never runs here.
fn steps() -> Piece {
    struct Noop;
    impl Action for Noop {
        type Input = Value;
        type Output = Value;
        fn spec(&self) -> ActionSpec {
            ActionSpec::new("set", "Set")
        }
        async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
            Ok(input)
        }
    }
    Piece::builder("data", "Data").action(Noop).build().unwrap()
}

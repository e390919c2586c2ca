//! The worker against the in-memory bus and store, with test pieces and a paused clock, so
//! retry delays are exact and nothing depends on wall-clock speed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use piecework_bus::memory::MemoryBus;
use piecework_bus::{Bus, Message, subject};
use piecework_core::flow::{FlowDefinition, Format};
use piecework_core::{Catalog, Registry, Run, RunStatus, StepStatus};
use piecework_runtime::secrets::Keyring;
use piecework_runtime::{Actor, Runtime, RuntimeError};
use piecework_sdk::EgressPolicy;
use piecework_sdk::prelude::*;
use piecework_store::Store;
use piecework_store::memory::MemoryStore;
use piecework_telemetry::metrics::TriggerKind;
use piecework_worker::WorkerConfig;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Shared between the test and its pieces.
#[derive(Default)]
struct Probe {
    /// When each call of `flaky` happened.
    calls: Mutex<Vec<Instant>>,
    /// Items the polling trigger returns, newest first.
    items: Mutex<Vec<Value>>,
    polls: Mutex<u32>,
}

struct Flaky(Arc<Probe>);

#[derive(serde::Deserialize)]
struct FlakyInput {
    failures: usize,
    #[serde(default)]
    fatal: bool,
}

impl Action for Flaky {
    type Input = FlakyInput;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("flaky", "Flaky")
            .prop(Prop::number("failures", "Failures before success").required())
            .prop(Prop::checkbox("fatal", "Fail fatally"))
    }

    async fn run(&self, ctx: &Context, input: FlakyInput) -> Result<Value, PieceError> {
        let call = {
            let mut calls = self.0.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len()
        };
        if input.fatal {
            return Err(PieceError::fatal("bad request"));
        }
        if call <= input.failures {
            return Err(PieceError::from_status(503, "service unavailable"));
        }
        Ok(json!({ "calls": call, "attempt": ctx.run.attempt }))
    }
}

struct Echo;

impl Action for Echo {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("echo", "Echo")
            .prop(Prop::json("value", "Value").required())
            .prop(Prop::secret_text("token", "Token"))
    }

    async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
        Ok(input["value"].clone())
    }
}

struct Sleepy;

impl Action for Sleepy {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("sleepy", "Sleepy").prop(Prop::number("seconds", "Seconds").required())
    }

    async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
        tokio::time::sleep(Duration::from_secs_f64(
            input["seconds"].as_f64().unwrap_or(0.0),
        ))
        .await;
        Ok(json!("woke up"))
    }
}

/// Reports what it can see of its connection: never the key itself.
struct WhoAmI;

#[derive(serde::Deserialize)]
struct VaultAuth {
    api_key: String,
    environment: String,
}

impl Action for WhoAmI {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("whoami", "Who am I").require_auth()
    }

    async fn run(&self, ctx: &Context, _input: Value) -> Result<Value, PieceError> {
        let auth: VaultAuth = ctx.auth()?;
        Ok(json!({ "environment": auth.environment, "key_length": auth.api_key.len() }))
    }
}

struct NewThings(Arc<Probe>);

impl PollingTrigger for NewThings {
    type Input = Value;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::polling("new_things", "New things", DedupeStrategy::LastItem)
    }

    async fn poll(&self, _ctx: &Context, _input: Value) -> Result<Vec<PolledItem>, PieceError> {
        *self.0.polls.lock().unwrap() += 1;
        let items = self.0.items.lock().unwrap().clone();
        Ok(items
            .into_iter()
            .map(|item| PolledItem::new(item.clone()).id(item["id"].as_str().unwrap_or_default()))
            .collect())
    }
}

struct Hook;

impl WebhookTrigger for Hook {
    type Input = Value;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("hook", "Hook")
    }
}

fn registry(probe: &Arc<Probe>) -> Registry {
    let mut registry = Registry::new();
    let piece = Piece::builder("test", "Test")
        .action(Flaky(probe.clone()))
        .action(Echo)
        .action(Sleepy)
        .polling_trigger(NewThings(probe.clone()))
        .webhook_trigger(Hook)
        .build();
    registry.register_built(piece).unwrap();
    let vault = Piece::builder("vault", "Vault")
        .auth(PieceAuth::custom(
            "Connection",
            [
                Prop::secret_text("api_key", "API key").required(),
                Prop::static_dropdown(
                    "environment",
                    "Environment",
                    [("Production", "prod"), ("Development", "dev")],
                )
                .required(),
            ],
        ))
        .action(WhoAmI)
        .build();
    registry.register_built(vault).unwrap();
    registry
}

struct Harness {
    runtime: Arc<Runtime>,
    store: MemoryStore,
    bus: MemoryBus,
    shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(probe: &Arc<Probe>, flow: &str) -> Self {
        Self::start_with(probe, flow, |_| {}).await
    }

    /// [`Harness::start`] with the worker's configuration adjusted.
    async fn start_with(
        probe: &Arc<Probe>,
        flow: &str,
        configure: impl FnOnce(&mut WorkerConfig),
    ) -> Self {
        let store = MemoryStore::new();
        let bus = MemoryBus::new();
        let runtime = Arc::new(
            Runtime::new(
                Arc::new(store.clone()),
                Arc::new(bus.clone()),
                Arc::new(Catalog::new(registry(probe))),
                EgressPolicy::default(),
            )
            .unwrap()
            .with_keyring(keyring("k1")),
        );
        let definition = FlowDefinition::parse(flow, Format::Yaml).unwrap();
        runtime
            .apply_flow(definition, &Actor("test".into()))
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let mut config = WorkerConfig {
            id: "w1".into(),
            concurrency: 4,
            ..WorkerConfig::default()
        };
        configure(&mut config);
        let worker = {
            let (runtime, shutdown) = (runtime.clone(), shutdown.clone());
            tokio::spawn(async move {
                piecework_worker::run(config, runtime, shutdown)
                    .await
                    .unwrap()
            })
        };
        Self {
            runtime,
            store,
            bus,
            shutdown,
            worker,
        }
    }

    async fn start_run(&self, id: &str, trigger: Value) {
        let flow = self.runtime.flow_version("f", 1).await.unwrap().unwrap();
        self.runtime
            .start_run(&flow, id.into(), trigger, TriggerKind::webhook)
            .await
            .unwrap();
    }

    async fn finished(&self, id: &str) -> Run {
        let run = self
            .store
            .wait_run_finished(id, Duration::from_secs(3600))
            .await
            .unwrap()
            .unwrap();
        assert!(run.status.is_terminal(), "run {id} did not finish: {run:?}");
        run
    }

    /// Step jobs delivered so far, from the worker's metrics.
    fn step_deliveries(&self) -> u64 {
        self.runtime
            .metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("piecework_jobs_received_total{") && l.contains("kind=\"step\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.worker.await.unwrap();
    }
}

fn keyring(id: &str) -> Keyring {
    Keyring::parse(&Keyring::generate_spec(id)).unwrap()
}

fn flow(steps: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: {{ piece: test, trigger: hook, auth: none }}\nsteps:\n{steps}"
    )
}

const RETRY: &str =
    "retry: { max_attempts: 3, initial_interval: 2s, multiplier: 3, max_interval: 1m, jitter: 0 }";

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_with_the_policy_delays_then_succeed() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: call, piece: test, action: flaky, input: {{ failures: 2 }}, {RETRY} }}\n"
    );
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;

    assert_eq!(run.status, RunStatus::Succeeded);
    let step = run.step("call").unwrap();
    assert_eq!(step.output, Some(json!({"calls": 3, "attempt": 3})));
    let statuses: Vec<_> = step
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (1, StepStatus::Retrying),
            (2, StepStatus::Retrying),
            (3, StepStatus::Succeeded)
        ]
    );
    let calls = probe.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [Duration::from_secs(2), Duration::from_secs(6)],
        "delays follow the policy"
    );

    let results = h
        .store
        .read_results(None, 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(results.len(), 3, "one pw:results entry per attempt");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_fail_the_run_and_terminate_the_job() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: call, piece: test, action: flaky, input: {{ failures: 99 }}, {RETRY} }}\n  - {{ name: after, piece: test, action: echo, input: {{ value: 1 }} }}\n"
    );
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;

    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("step `call` failed: HTTP 503: service unavailable (gave up after 3 attempts)")
    );
    assert_eq!(run.step("call").unwrap().attempts.len(), 3);
    assert!(
        run.step("after").is_none(),
        "no step runs after a failed one"
    );
    // Nothing is left to redeliver: the job was terminated, not retried forever.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(probe.calls.lock().unwrap().len(), 3);
    assert_eq!(h.bus.queued("default"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn fatal_errors_are_not_retried() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: call, piece: test, action: flaky, input: {{ failures: 0, fatal: true }}, {RETRY} }}\n"
    );
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.step("call").unwrap().attempts.len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_step_that_outlives_its_timeout_is_retried_then_fails() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: nap, piece: test, action: sleepy, input: { seconds: 600 }, timeout: 2s, retry: { max_attempts: 2, initial_interval: 1s, jitter: 0 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    let started = Instant::now();
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    let step = run.step("nap").unwrap();
    assert_eq!(
        step.error.as_deref(),
        Some("step timed out after 2s (gave up after 2 attempts)")
    );
    assert_eq!(step.attempts.len(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the action was cut off, not awaited"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_run_retried_by_hand_resumes_from_its_failed_step() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: first, piece: test, action: echo, input: {{ value: 1 }} }}\n  - {{ name: call, piece: test, action: flaky, input: {{ failures: 3 }}, {RETRY} }}\n  - {{ name: last, piece: test, action: echo, input: {{ value: \"{{{{ steps.call.output.calls }}}}\" }} }}\n"
    );
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let failed = h.finished("r1").await;
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.step("call").unwrap().attempts.len(), 3);

    // "The cause is fixed": the fourth call succeeds.
    let actor = Actor("test".into());
    let resumed = h.runtime.retry_run("r1", &actor).await.unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let numbers: Vec<u32> = run
        .step("call")
        .unwrap()
        .attempts
        .iter()
        .map(|a| a.attempt)
        .collect();
    assert_eq!(
        numbers,
        [1, 2, 3, 4],
        "attempts continue after the earlier ones"
    );
    assert_eq!(
        run.step("first").unwrap().attempts.len(),
        1,
        "steps before the failed one are not rerun"
    );
    assert_eq!(run.step("last").unwrap().output, Some(json!(4)));
    let again = h.runtime.retry_run("r1", &actor).await.unwrap_err();
    assert_eq!(
        again.to_string(),
        "run `r1` is succeeded; only failed runs can be retried"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_run_stops_its_step_in_flight_at_once() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: nap, piece: test, action: sleepy, input: { seconds: 10 } }\n  - { name: after, piece: test, action: flaky, input: { failures: 0 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cancelled = h
        .runtime
        .cancel_run("r1", &Actor("test".into()))
        .await
        .unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let run = h.store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(
        run.status,
        RunStatus::Cancelled,
        "the stopped step did not overwrite the cancel"
    );
    // The 10 s nap was stopped when the cancel came, not left to finish.
    let nap = run.step("nap").unwrap();
    assert_eq!(nap.status, StepStatus::Stopped);
    assert_eq!(
        nap.error.as_deref(),
        Some("stopped: the run was cancelled while the step ran")
    );
    assert!(
        (1900..3000).contains(&nap.attempts[0].duration_ms),
        "{:?}",
        nap.attempts
    );
    assert!(run.step("after").is_none());
    assert!(
        probe.calls.lock().unwrap().is_empty(),
        "nothing after the cancel ran"
    );
    let err = h
        .runtime
        .cancel_run("r1", &Actor("test".into()))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "run `r1` is not running");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_failure_continue_goes_on_to_the_next_step() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: call, piece: test, action: flaky, input: { failures: 0, fatal: true }, on_failure: continue }\n  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.call.status }}\" } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.step("call").unwrap().status, StepStatus::Failed);
    assert_eq!(run.step("after").unwrap().output, Some(json!("failed")));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn outputs_flow_between_steps_and_secrets_are_redacted() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: first, piece: test, action: echo, input: { value: { n: \"{{ trigger.n }}\" }, token: hunter2 } }\n  - { name: second, piece: test, action: echo, input: { value: \"{{ steps.first.output.n * 2 }}\" } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({"n": 21})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.step("second").unwrap().output, Some(json!(42)));
    let first = run.step("first").unwrap();
    assert_eq!(first.input["token"], json!("***"));
    assert!(!serde_json::to_string(&run).unwrap().contains("hunter2"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_template_fails_the_step_with_its_location() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: first, piece: test, action: echo, input: { value: \"{{ trigger.missing.deeper }}\" } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.step("first").unwrap().error.clone().unwrap();
    assert!(
        error.starts_with("template error at input.value"),
        "{error}"
    );
    assert_eq!(
        run.step("first").unwrap().attempts.len(),
        1,
        "template errors are not retried"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn malformed_messages_are_terminated_recorded_and_the_worker_keeps_serving() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: first, piece: test, action: echo, input: { value: 1 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.bus
        .publish(Message {
            subject: subject::step("default"),
            msg_id: "garbage".into(),
            headers: vec![],
            payload: Bytes::from_static(b"\xff\xff\xff not protobuf"),
        })
        .await
        .unwrap();
    h.start_run("r1", json!({})).await;
    assert_eq!(h.finished("r1").await.status, RunStatus::Succeeded);
    let audit = h.store.read_audit(None, 100).await.unwrap();
    let rejected: Vec<_> = audit
        .iter()
        .filter(|e| e.event.action == "job.reject")
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].event.error.contains("not a StepJob"),
        "{:?}",
        rejected[0].event
    );
    assert_eq!(
        h.bus.queued("default"),
        0,
        "the poison message is gone, not requeued"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_step_that_was_recorded_is_not_run_again() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: call, piece: test, action: flaky, input: { failures: 0 } }\n  - { name: after, piece: test, action: echo, input: { value: 1 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    assert_eq!(h.finished("r1").await.status, RunStatus::Succeeded);
    // The same step job again, as after a worker died between recording and acking.
    let job = piecework_proto::v1::StepJob {
        run_id: "r1".into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: "call".into(),
        epoch: 0,
        delay_ms: 0,
        wake_ms: 0,
    };
    let message = Message {
        subject: subject::step("default"),
        msg_id: "redelivery".into(),
        headers: vec![],
        payload: Bytes::from(piecework_proto::Message::encode_to_vec(&job)),
    };
    h.bus.publish(message).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(probe.calls.lock().unwrap().len(), 1, "the action ran once");
    let run = h.store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(
        run.step("call").unwrap().attempts.len(),
        1,
        "its result is recorded once"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn polling_starts_one_run_per_new_item_even_when_polls_repeat() {
    let probe = Arc::new(Probe::default());
    let text = "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: { piece: test, trigger: new_things }\nsteps:\n  - { name: first, piece: test, action: echo, input: { value: \"{{ trigger.id }}\" } }\n";
    let h = Harness::start(&probe, text).await;
    *probe.items.lock().unwrap() = vec![json!({"id": "1"})];
    let poll = |tick: i64| {
        let job = piecework_proto::v1::PollJob {
            flow_id: "f".into(),
            flow_version: 1,
            tick_unix_ms: tick,
        };
        let bus = h.bus.clone();
        async move {
            piecework_bus::jobs::publish_poll(&bus, "default", &job)
                .await
                .unwrap()
        }
    };
    // Baseline: the existing item does not fire.
    poll(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        h.store
            .list_runs(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    // Two new items, polled twice (the second poll sees nothing new).
    *probe.items.lock().unwrap() = vec![json!({"id": "3"}), json!({"id": "2"}), json!({"id": "1"})];
    poll(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    poll(3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A redelivered poll job (same tick) is deduplicated by its message id.
    assert!(poll(3).await.duplicate);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let query = piecework_store::RunQuery {
        limit: 100,
        ..Default::default()
    };
    let runs = h.store.list_runs(&query).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let mut outputs = Vec::new();
    for summary in runs {
        let run = h.finished(&summary.id).await;
        assert_eq!(
            run.started_by.name, "schedule",
            "polled runs are the scheduler's"
        );
        outputs.push(run.step("first").unwrap().output.clone().unwrap());
    }
    outputs.sort_by_key(|v| v.to_string());
    assert_eq!(outputs, [json!("2"), json!("3")]);
    assert_eq!(*probe.polls.lock().unwrap(), 3);

    // A poll whose one page no longer reaches the last item seen: the items it returns run,
    // and the gap between is said, never passed over in silence.
    *probe.items.lock().unwrap() = vec![json!({"id": "9"}), json!({"id": "8"})];
    poll(4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.store.list_runs(&query).await.unwrap().len(), 4);
    let metrics = h.runtime.metrics.encode();
    assert!(
        metrics.contains("piecework_poll_gaps_total{flow=\"f\"} 1"),
        "{metrics}"
    );
    let audit = h
        .runtime
        .query_audit(&piecework_store::audit::AuditQuery {
            action: Some("trigger.gap".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.entries.len(), 1, "{audit:?}");
    assert_eq!(audit.entries[0].event.resource, "flow/f");
    h.stop().await;
}

const SECRET: &str = "sk-live-0123456789abcdef";

#[tokio::test(start_paused = true)]
async fn steps_receive_their_connection_decrypted_and_it_is_stored_sealed() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: who, piece: vault, action: whoami, connection: prod-vault }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    let actor = Actor("test".into());
    let info = h
        .runtime
        .save_connection(
            "prod-vault",
            "vault",
            json!({"api_key": SECRET, "environment": "prod"}),
            &actor,
        )
        .await
        .unwrap();
    assert_eq!((info.piece.as_str(), info.key_id.as_str()), ("vault", "k1"));
    let stored = h.store.get_connection("prod-vault").await.unwrap().unwrap();
    assert!(
        !stored.secret.contains(SECRET) && !stored.secret.contains("prod\""),
        "sealed at rest: {}",
        stored.secret
    );

    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.step("who").unwrap().output,
        Some(json!({"environment": "prod", "key_length": SECRET.len()}))
    );
    let everything = format!("{run:?}{:?}", h.store.read_audit(None, 100).await.unwrap());
    assert!(
        !everything.contains(SECRET),
        "the secret is in no run state or audit entry"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_connection_values_are_refused_naming_the_field() {
    let probe = Arc::new(Probe::default());
    let h = Harness::start(
        &probe,
        &flow("  - { name: a, piece: test, action: echo, input: { value: 1 } }\n"),
    )
    .await;
    let actor = Actor("test".into());
    let refused = async |name: &str, piece: &str, values: Value| {
        h.runtime
            .save_connection(name, piece, values, &actor)
            .await
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        refused(
            "c",
            "vault",
            json!({"api_key": SECRET, "environment": "moon"})
        )
        .await,
        "connection values for `vault`: prop `environment`: \"moon\" is not one of the options (\"prod\", \"dev\")"
    );
    assert_eq!(
        refused("c", "vault", json!({"environment": "dev"})).await,
        "connection values for `vault`: prop `api_key`: is required"
    );
    assert_eq!(
        refused("c", "test", json!({})).await,
        "piece `test` takes no connection"
    );
    assert_eq!(
        refused("c", "nope", json!({})).await,
        "unknown piece `nope`"
    );
    assert!(
        refused("Prod Vault", "vault", json!({}))
            .await
            .contains("must be 1-100 lowercase")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_connection_fails_the_step_without_retries() {
    let probe = Arc::new(Probe::default());
    let steps =
        format!("  - {{ name: who, piece: vault, action: whoami, connection: ghost, {RETRY} }}\n");
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.step("who").unwrap().error.as_deref(),
        Some("no connection `ghost`")
    );
    assert_eq!(run.step("who").unwrap().attempts.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_connection_sealed_with_another_key_or_for_another_piece_fails_clearly() {
    let probe = Arc::new(Probe::default());
    let h = Harness::start(
        &probe,
        &flow("  - { name: a, piece: test, action: echo, input: { value: 1 } }\n"),
    )
    .await;
    let values = json!({"api_key": SECRET, "environment": "prod"});
    h.runtime
        .save_connection("prod-vault", "vault", values, &Actor("t".into()))
        .await
        .unwrap();
    let with_key = |id: &str| {
        let runtime = Runtime::new(
            Arc::new(h.store.clone()),
            Arc::new(h.bus.clone()),
            h.runtime.catalog().clone(),
            EgressPolicy::default(),
        );
        runtime.unwrap().with_keyring(keyring(id))
    };
    let err = with_key("k2")
        .connection_values("prod-vault", "vault")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "connection `prod-vault` was encrypted with key `k1`, which is not configured (configured: k2)"
    );
    let err = with_key("k1")
        .connection_values("prod-vault", "vault")
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Secrets(_)));
    assert!(
        err.to_string()
            .contains("the key is wrong or the data was altered"),
        "{err}"
    );
    assert!(!err.to_string().contains(SECRET));
    let err = h
        .runtime
        .connection_values("prod-vault", "test")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "connection `prod-vault` belongs to piece `vault`, not `test`"
    );
    // Sealed values are bound to the piece as well as the name: a record whose piece was
    // changed where it is stored does not open.
    let mut moved = h.store.get_connection("prod-vault").await.unwrap().unwrap();
    moved.piece = "test".into();
    h.store.put_connection(&moved).await.unwrap();
    let err = h
        .runtime
        .connection_values("prod-vault", "test")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the key is wrong or the data was altered"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_without_the_pinned_piece_version_retries_as_the_policy_says_then_fails() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: a, piece: test, version: \"^0.1\", action: echo, input: {{ value: 1 }}, {RETRY} }}\n"
    );
    // The flow is applied where `test` 0.1.0 exists...
    let h = Harness::start(&probe, &flow(&steps)).await;
    let mut h = h;
    h.shutdown.cancel();
    (&mut h.worker).await.unwrap();
    // ...and run by a worker built with `test` 2.0.0 only.
    let mut newer = Registry::new();
    newer
        .register_built(
            Piece::builder("test", "Test")
                .version("2.0.0")
                .action(Echo)
                .webhook_trigger(Hook)
                .build(),
        )
        .unwrap();
    let runtime = Arc::new(
        Runtime::new(
            Arc::new(h.store.clone()),
            Arc::new(h.bus.clone()),
            Arc::new(Catalog::new(newer)),
            EgressPolicy::default(),
        )
        .unwrap(),
    );
    let shutdown = CancellationToken::new();
    let config = WorkerConfig {
        id: "w2".into(),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(piecework_worker::run(config, runtime, shutdown.clone()));
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    let step = run.step("a").unwrap();
    // The api had the version when it pinned it: it may still be on its way here (a pieces
    // directory not scanned yet), so the step is retried — and fails once the policy ends.
    assert_eq!(
        step.error.as_deref(),
        Some(
            "this worker cannot serve piece `test` 0.1.0 yet (it has: 2.0.0) (gave up after 3 attempts)"
        )
    );
    assert_eq!(step.attempts.len(), 3);
    shutdown.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn consecutive_steps_on_one_queue_run_in_one_delivery() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: a, piece: test, action: echo, input: { value: 1 } }\n  - { name: b, piece: test, action: echo, input: { value: \"{{ steps.a.output + 1 }}\" } }\n  - { name: c, piece: test, action: echo, input: { value: \"{{ steps.b.output + 1 }}\" } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let outputs: Vec<_> = run.steps.iter().map(|s| s.output.clone()).collect();
    assert_eq!(outputs, [Some(json!(1)), Some(json!(2)), Some(json!(3))]);
    assert_eq!(h.step_deliveries(), 1, "one job for three steps");
    let results = h
        .store
        .read_results(None, 100, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(results.len(), 3, "each step journaled");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_inline_step_that_must_retry_hands_over_and_keeps_the_policy_delays() {
    let probe = Arc::new(Probe::default());
    let steps = format!(
        "  - {{ name: first, piece: test, action: echo, input: {{ value: 1 }} }}\n  - {{ name: call, piece: test, action: flaky, input: {{ failures: 2 }}, {RETRY} }}\n  - {{ name: last, piece: test, action: echo, input: {{ value: 3 }} }}\n"
    );
    let h = Harness::start(&probe, &flow(&steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let call = run.step("call").unwrap();
    let statuses: Vec<_> = call
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (1, StepStatus::Retrying),
            (2, StepStatus::Retrying),
            (3, StepStatus::Succeeded)
        ]
    );
    assert_eq!(call.output, Some(json!({"calls": 3, "attempt": 3})));
    let calls = probe.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [Duration::from_secs(2), Duration::from_secs(6)],
        "the handed-over retry waits as the policy says"
    );
    assert_eq!(run.step("last").unwrap().attempts.len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_step_on_another_queue_or_past_the_budget_gets_a_job_of_its_own() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: a, piece: test, action: echo, input: { value: 1 } }\n  - { name: b, piece: test, action: echo, input: { value: 2 } }\n  - { name: c, piece: test, action: echo, input: { value: 3 } }\n  - { name: d, piece: test, action: echo, input: { value: 4 }, queue: vpn }\n  - { name: e, piece: test, action: echo, input: { value: 5 }, queue: vpn }\n";
    let h = Harness::start_with(&probe, &flow(steps), |config| {
        config.queues = vec!["default".into(), "vpn".into()];
        config.max_steps_per_delivery = 2;
    })
    .await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.steps.len(), 5);
    // a+b (budget 2), c (then another queue), d+e.
    assert_eq!(h.step_deliveries(), 3);
    h.stop().await;
}

/// A worker died after journaling two steps it ran inline and before the third: the job is
/// redelivered and the run resumes from the journal — the recorded steps do not run again.
#[tokio::test(start_paused = true)]
async fn a_job_redelivered_mid_journal_resumes_after_the_recorded_steps() {
    use piecework_core::run::Attempt;
    use piecework_core::{Run, StepState};
    use piecework_store::StepUpdate;
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: a, piece: test, action: flaky, input: { failures: 0 } }\n  - { name: b, piece: test, action: flaky, input: { failures: 0 } }\n  - { name: c, piece: test, action: flaky, input: { failures: 0 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.store
        .create_run(&Run::new("r1".into(), "f", 1, json!({})))
        .await
        .unwrap();
    for name in ["a", "b"] {
        let state = StepState {
            name: name.into(),
            piece: "test".into(),
            action: "flaky".into(),
            version: "0.1.0".into(),
            status: StepStatus::Succeeded,
            input: json!({"failures": 0}),
            output: Some(json!({"calls": 0})),
            error: None,
            attempts: vec![Attempt {
                attempt: 1,
                status: StepStatus::Succeeded,
                started_at: chrono::Utc::now(),
                duration_ms: 1,
                error: None,
                worker: "dead".into(),
            }],
            retry_at: None,
            epoch: 0,
            branch: None,
        };
        h.store
            .record_step(StepUpdate {
                unmark: false,
                closed: Vec::new(),
                pause: None,
                wake: None,
                run_id: "r1".into(),
                step: state,
                result: Default::default(),
                audit: None,
                response: None,
                run: None,
            })
            .await
            .unwrap();
    }
    // The first step's job, delivered again.
    let job = piecework_proto::v1::StepJob {
        run_id: "r1".into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: "a".into(),
        epoch: 0,
        delay_ms: 0,
        wake_ms: 0,
    };
    h.bus
        .publish(Message {
            subject: subject::step("default"),
            msg_id: "r1:a".into(),
            headers: vec![],
            payload: Bytes::from(piecework_proto::Message::encode_to_vec(&job)),
        })
        .await
        .unwrap();
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(probe.calls.lock().unwrap().len(), 1, "only `c` ran");
    for (name, worker) in [("a", "dead"), ("b", "dead"), ("c", "w1")] {
        let attempts = &run.step(name).unwrap().attempts;
        assert_eq!(attempts.len(), 1, "{name}");
        assert_eq!(attempts[0].worker, worker, "{name}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_branch_step_runs_the_branch_its_condition_chose_and_takes_its_output() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: triage\n",
        "    if: \"{{ trigger.priority == 'critical' }}\"\n",
        "    then:\n",
        "      - { name: page, piece: test, action: echo, input: { value: \"page\" } }\n",
        "      - name: when\n",
        "        router:\n",
        "          - { name: night, when: \"{{ trigger.hour < 8 }}\", steps: [ { name: wake, piece: test, action: echo, input: { value: \"{{ steps.page.output }} now\" } } ] }\n",
        "        default: [ { name: later, piece: test, action: echo, input: { value: \"{{ steps.page.output }} later\" } } ]\n",
        "    else:\n",
        "      - { name: queue, piece: test, action: echo, input: { value: \"queue\" } }\n",
        "  - { name: report, piece: test, action: echo, input: { value: \"{{ steps.triage.branch }}: {{ steps.triage.output }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    let cases = [
        (
            "r1",
            json!({"priority": "critical", "hour": 3}),
            "then: page now",
            vec!["triage", "page", "when", "wake", "report"],
        ),
        (
            "r2",
            json!({"priority": "critical", "hour": 12}),
            "then: page later",
            vec!["triage", "page", "when", "later", "report"],
        ),
        (
            "r3",
            json!({"priority": "low", "hour": 3}),
            "else: queue",
            vec!["triage", "queue", "report"],
        ),
    ];
    for (id, trigger, report, ran) in cases {
        h.start_run(id, trigger).await;
        let run = h.finished(id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        let names: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ran, "{id}");
        assert_eq!(run.step("report").unwrap().output, Some(json!(report)));
    }
    // The run shows which branch ran and why; the branch step's output is its branch's.
    let run = h.store.get_run("r2").await.unwrap().unwrap();
    let triage = run.step("triage").unwrap();
    assert_eq!(triage.branch.as_deref(), Some("then"));
    assert_eq!(triage.input, json!({"then": true}));
    assert_eq!(triage.output, Some(json!("page later")));
    let when = run.step("when").unwrap();
    assert_eq!(
        (when.branch.as_deref(), &when.input),
        (Some("default"), &json!({"night": false}))
    );
    assert_eq!(when.output, Some(json!("page later")));
    assert_eq!(
        h.step_deliveries(),
        3,
        "one delivery per run: branch steps run inline"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_condition_that_is_not_a_boolean_fails_the_run_naming_the_branch() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: gate, if: \"{{ trigger.flag }}\", then: [ { name: a, piece: test, action: echo, input: { value: 1 } } ] }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({"flag": "yes"})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("step `gate` failed: condition of branch `then`: evaluated to \"yes\", not true or false"),
        "{error}"
    );
    assert!(run.step("a").is_none());
    h.stop().await;
}

/// Fires the timers due now, as a scheduler would.
/// A run recorded with its first job in the outbox by a publisher that died before
/// publishing it: nothing runs until a relay's sweep (here the worker's) publishes the job,
/// and then the run completes and the outbox is empty.
#[tokio::test(start_paused = true)]
async fn a_run_whose_publisher_died_before_publishing_is_relayed_from_the_outbox() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: a, piece: test, action: flaky, input: { failures: 0 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    let mut run = Run::new("orphan".into(), "f", 1, json!({}));
    run.created_at = h.runtime.now();
    let job = piecework_store::OutboxJob {
        run_id: "orphan".into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: "a".into(),
        epoch: 0,
    };
    assert!(h.store.create_run_queued(&run, &[job]).await.unwrap());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let waiting = h.store.get_run("orphan").await.unwrap().unwrap();
    assert_eq!(waiting.status, RunStatus::Running);
    assert!(waiting.steps.is_empty(), "nothing published the job yet");

    tokio::time::sleep(piecework_runtime::OUTBOX_SWEEP).await;
    let run = until_status(&h, "orphan", RunStatus::Succeeded).await;
    assert_eq!(run.steps[0].attempts.len(), 1);
    let later = h.runtime.now() + chrono::Duration::hours(1);
    assert!(h.store.outbox(later, 10).await.unwrap().is_empty());
}

async fn fire_timers(h: &Harness) -> usize {
    h.runtime
        .fire_due_timers(h.runtime.now(), 100, Duration::from_secs(60))
        .await
        .unwrap()
}

/// Waits (on the paused clock) until run `id` has status `status`.
async fn until_status(h: &Harness, id: &str, status: RunStatus) -> Run {
    for _ in 0..1000 {
        let run = h.store.get_run(id).await.unwrap().unwrap();
        if run.status == status {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {id} never became {status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_delay_pauses_the_run_without_a_job_until_its_timer_wakes_it() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - { name: a, piece: test, action: echo, input: { value: 1 } }\n",
        "  - { name: pause, delay: 30s }\n",
        "  - { name: b, piece: test, action: echo, input: { value: \"{{ steps.pause.output.waited_until }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    let started = h.runtime.now();
    h.start_run("r1", json!({})).await;
    let run = until_status(&h, "r1", RunStatus::Waiting).await;
    let pause = run.step("pause").unwrap();
    assert_eq!(pause.status, StepStatus::Waiting);
    let until = pause.retry_at.unwrap();
    assert!(until >= started + chrono::Duration::seconds(30), "{until}");
    assert_eq!(pause.input["waiting_for"], "delay");
    assert_eq!(h.step_deliveries(), 1, "the wait holds no job");
    // Not due yet: nothing fires.
    assert_eq!(fire_timers(&h).await, 0);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(fire_timers(&h).await, 1);
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.step("pause").unwrap().status, StepStatus::Succeeded);
    assert_eq!(
        run.step("b").unwrap().output,
        Some(json!(until)),
        "the delay's output is when it ended"
    );
    // A timer that fires again (its wake lost, say) finds nothing to wake.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(fire_timers(&h).await, 0, "the wake dropped the timer");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_approval_wait_resumes_once_with_its_payload_or_times_out_into_its_branch() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: approval\n",
        "    wait_for: approval\n",
        "    timeout: 1h\n",
        "    on_timeout: [ { name: escalate, piece: test, action: echo, input: { value: \"nobody answered\" } } ]\n",
        "  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.approval.output }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    let admin = piecework_runtime::Actor("api:ops".into());

    // Resumed by hand: the payload is the step's output.
    h.start_run("r1", json!({})).await;
    until_status(&h, "r1", RunStatus::Waiting).await;
    let resumed = h
        .runtime
        .resume_waiting_run("r1", "approval", json!({"approved": true}), &admin)
        .await
        .unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.step("after").unwrap().output,
        Some(json!({"approved": true}))
    );
    assert!(run.step("escalate").is_none());
    let approval = run.step("approval").unwrap();
    assert_eq!(approval.attempts.last().unwrap().worker, "api:ops");
    // Once only, and only a wait step of a waiting run.
    let again = h
        .runtime
        .resume_waiting_run("r1", "approval", json!({}), &admin)
        .await
        .unwrap_err();
    assert!(
        again
            .to_string()
            .contains("is not waiting on step `approval` (it is succeeded)"),
        "{again}"
    );
    let wrong = h
        .runtime
        .resume_waiting_run("r1", "after", json!({}), &admin)
        .await
        .unwrap_err();
    assert!(
        wrong.to_string().contains("`after` is not a wait step"),
        "{wrong}"
    );

    // Not resumed within the timeout: the timeout branch runs and its output is the wait's.
    h.start_run("r2", json!({})).await;
    until_status(&h, "r2", RunStatus::Waiting).await;
    tokio::time::sleep(Duration::from_secs(3601)).await;
    assert_eq!(fire_timers(&h).await, 1);
    let run = h.finished("r2").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let approval = run.step("approval").unwrap();
    assert_eq!(approval.branch.as_deref(), Some("timeout"));
    assert_eq!(approval.output, Some(json!("nobody answered")));
    assert_eq!(
        run.step("after").unwrap().output,
        Some(json!("nobody answered"))
    );
    // The late resume is refused.
    let late = h
        .runtime
        .resume_waiting_run("r2", "approval", json!({}), &admin)
        .await
        .unwrap_err();
    assert!(late.to_string().contains("not waiting"), "{late}");

    // A waiting run is cancelled at once, and its timer goes when it fires.
    h.start_run("r3", json!({})).await;
    until_status(&h, "r3", RunStatus::Waiting).await;
    h.runtime.cancel_run("r3", &admin).await.unwrap();
    assert_eq!(h.finished("r3").await.status, RunStatus::Cancelled);
    tokio::time::sleep(Duration::from_secs(3601)).await;
    assert_eq!(fire_timers(&h).await, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        fire_timers(&h).await,
        0,
        "the cancelled run's timer was dropped"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wait_without_a_timeout_branch_fails_when_it_times_out() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: approval, wait_for: approval, timeout: 10m }\n  - { name: after, piece: test, action: echo, input: { value: 1 } }\n";
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    until_status(&h, "r1", RunStatus::Waiting).await;
    tokio::time::sleep(Duration::from_secs(601)).await;
    assert_eq!(fire_timers(&h).await, 1);
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("step `approval` failed: timed out: not resumed within 600s"),
        "{run:?}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_loop_runs_its_steps_for_each_item_in_order_and_collects_their_outputs() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: each_ticket\n",
        "    for_each: \"{{ trigger.items }}\"\n",
        "    steps:\n",
        "      - { name: double, piece: test, action: echo, input: { value: \"{{ item * 2 }}\" } }\n",
        "      - name: label\n",
        "        if: \"{{ steps.double.output > 4 }}\"\n",
        "        then: [ { name: big, piece: test, action: echo, input: { value: \"{{ loop.index0 }}:{{ steps.double.output }} big\" } } ]\n",
        "        else: [ { name: small, piece: test, action: echo, input: { value: \"{{ loop.index }}/{{ loop.length }} small\" } } ]\n",
        "  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.each_ticket.output | length }} items: {{ steps.each_ticket.output | join(', ') }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({"items": [1, 2, 3]})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let each = run.step("each_ticket").unwrap();
    assert_eq!(each.status, StepStatus::Succeeded);
    assert_eq!(each.input, json!({"items": [1, 2, 3]}));
    assert_eq!(
        each.output,
        Some(json!(["1/3 small", "2/3 small", "2:6 big"])),
        "the outputs of each item's last step, in item order"
    );
    let names: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "each_ticket",
            "double[0]",
            "label[0]",
            "small[0]",
            "double[1]",
            "label[1]",
            "small[1]",
            "double[2]",
            "label[2]",
            "big[2]",
            "after"
        ]
    );
    assert_eq!(run.step("double[2]").unwrap().output, Some(json!(6)));
    assert_eq!(
        run.step("after").unwrap().output,
        Some(json!("3 items: 1/3 small, 2/3 small, 2:6 big"))
    );
    assert_eq!(h.step_deliveries(), 1, "the whole loop ran inline");

    // An empty list runs nothing and gives []; anything but a list fails the loop.
    h.start_run("r2", json!({"items": []})).await;
    let run = h.finished("r2").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.step("each_ticket").unwrap().output, Some(json!([])));
    assert_eq!(run.step("after").unwrap().output, Some(json!("0 items: ")));
    h.start_run("r3", json!({"items": "nope"})).await;
    let run = h.finished("r3").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("for_each gave \"nope\", not a list"),
        "{run:?}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_parallel_loop_runs_its_lanes_side_by_side_and_keeps_item_order() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: each\n",
        "    for_each: \"{{ trigger.items }}\"\n",
        "    parallelism: 2\n",
        "    steps:\n",
        "      - { name: nap, piece: test, action: sleepy, input: { seconds: \"{{ item }}\" } }\n",
        "      - name: size\n",
        "        if: \"{{ item > 2 }}\"\n",
        "        then: [ { name: big, piece: test, action: echo, input: { value: \"{{ item }} big\" } } ]\n",
        "        else: [ { name: small, piece: test, action: echo, input: { value: \"{{ item }} small\" } } ]\n",
        "  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.each.output | join(', ') }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    let started = Instant::now();
    // Lane 0 takes items 0, 2, 4 (3 + 1 + 2 s), lane 1 items 1 and 3 (1 + 3 s).
    h.start_run("r1", json!({"items": [3, 1, 1, 3, 2]})).await;
    let run = h.finished("r1").await;
    let took = started.elapsed();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(10),
        "the lanes ran side by side: {took:?}"
    );
    let each = run.step("each").unwrap();
    assert_eq!(
        each.output,
        Some(json!(["3 big", "1 small", "1 small", "3 big", "2 small"])),
        "the outputs in item order, whichever lane ended first"
    );
    assert_eq!(
        each.attempts.len(),
        1,
        "the loop is closed, not attempted again"
    );
    for i in 0..5 {
        assert_eq!(run.step(&format!("nap[{i}]")).unwrap().attempts.len(), 1);
        assert_eq!(
            run.step(&format!("size[{i}]")).unwrap().status,
            StepStatus::Succeeded
        );
    }
    assert_eq!(
        run.step("after").unwrap().output,
        Some(json!("3 big, 1 small, 1 small, 3 big, 2 small"))
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_failed_in_one_lane_retried_by_hand_finishes_every_lane() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: each\n",
        "    for_each: \"{{ trigger.items }}\"\n",
        "    parallelism: 2\n",
        "    steps:\n",
        "      - { name: call, piece: test, action: flaky, input: { failures: \"{{ 2 if item == 'bad' else 0 }}\" }, retry: { max_attempts: 1 } }\n",
        "      - { name: nap, piece: test, action: sleepy, input: { seconds: 5 } }\n",
        "      - { name: done, piece: test, action: echo, input: { value: \"{{ item }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({"items": ["a", "bad", "c", "d"]}))
        .await;
    let failed = h.finished("r1").await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert_eq!(
        failed.step("call[1]").unwrap().status,
        StepStatus::Failed,
        "{failed:?}"
    );
    // Lane 0's nap in flight is stopped: the run failed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let stopped = h.store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(
        stopped.step("nap[0]").unwrap().status,
        StepStatus::Stopped,
        "{stopped:?}"
    );
    assert!(stopped.step("call[2]").is_none(), "{stopped:?}");

    h.runtime
        .retry_run("r1", &Actor("test".into()))
        .await
        .unwrap();
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.step("each").unwrap().output,
        Some(json!(["a", "bad", "c", "d"]))
    );
    assert_eq!(run.step("call[1]").unwrap().attempts.len(), 2);
    let nap: Vec<StepStatus> = run
        .step("nap[0]")
        .unwrap()
        .attempts
        .iter()
        .map(|a| a.status)
        .collect();
    assert_eq!(
        nap,
        [StepStatus::Stopped, StepStatus::Succeeded],
        "the stopped nap ran again"
    );
    for step in ["call[0]", "call[2]", "call[3]"] {
        assert_eq!(run.step(step).unwrap().attempts.len(), 1, "{step}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn debounced_items_start_one_run_per_group_with_its_last_item() {
    let probe = Arc::new(Probe::default());
    let steps = "  - { name: echo, piece: test, action: echo, input: { value: \"{{ trigger.ticket }}:{{ trigger.n }}\" } }\n";
    let definition = flow(steps).replace(
        "steps:\n",
        "debounce: 10s\ndebounce_key: \"{{ trigger.ticket }}\"\ndebounce_max: 30s\nsteps:\n",
    );
    let h = Harness::start(&probe, &definition).await;
    let flow = h.runtime.flow_version("f", 1).await.unwrap().unwrap();
    let hold = |ticket: &'static str, n: u32| {
        let (runtime, flow) = (h.runtime.clone(), flow.clone());
        async move {
            runtime
                .hold_item(
                    &flow,
                    json!({ "ticket": ticket, "n": n }),
                    TriggerKind::webhook,
                    piecework_sdk::Principal::new("webhook:f", None),
                    None,
                )
                .await
                .unwrap()
        }
    };
    let runs = || async {
        let query = piecework_store::RunQuery {
            flow_id: Some("f".into()),
            limit: 100,
            ..Default::default()
        };
        h.store.list_runs(&query).await.unwrap()
    };
    for (ticket, n) in [("a", 1), ("a", 2), ("b", 1), ("a", 3)] {
        hold(ticket, n).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Eight seconds in, `a` was held four seconds ago: nothing is due.
    assert_eq!(fire_timers(&h).await, 0);
    assert!(runs().await.is_empty());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fire_timers(&h).await, 2, "one run per ticket");
    let mut outputs = Vec::new();
    for summary in runs().await {
        let run = h.finished(&summary.id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.started_by.name, "webhook:f");
        outputs.push(run.step("echo").unwrap().output.clone().unwrap());
    }
    outputs.sort_by_key(ToString::to_string);
    assert_eq!(
        outputs,
        [json!("a:3"), json!("b:1")],
        "each with its last item"
    );
    assert_eq!(fire_timers(&h).await, 0, "the groups are gone");

    // Items every 5 s would hold a group forever: `debounce_max` starts it anyway.
    let started = h.runtime.now();
    let due = hold("c", 1).await;
    assert_eq!(due, started + chrono::Duration::seconds(10));
    for n in 2..=7 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        fire_timers(&h).await;
        hold("c", n).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    fire_timers(&h).await;
    let all = runs().await;
    assert_eq!(all.len(), 3, "`c` started its run at debounce_max: {all:?}");
    let newest = h.finished(&all[0].id).await;
    assert_eq!(
        newest.step("echo").unwrap().output,
        Some(json!("c:6")),
        "the last item before debounce_max; item 7 opened a new group"
    );
    let metrics = h.runtime.metrics.encode();
    assert!(
        metrics.contains("piecework_trigger_items_held_total{flow=\"f\"} 11"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delay_inside_a_loop_pauses_each_item() {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: each\n",
        "    for_each: \"{{ trigger.items }}\"\n",
        "    steps:\n",
        "      - { name: pause, delay: 10s }\n",
        "      - { name: echo, piece: test, action: echo, input: { value: \"{{ item }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({"items": ["a", "b"]})).await;
    for waiting in ["pause[0]", "pause[1]"] {
        for _ in 0..1000 {
            let run = h.store.get_run("r1").await.unwrap().unwrap();
            if run
                .step(waiting)
                .is_some_and(|s| s.status == StepStatus::Waiting)
            {
                assert_eq!(run.status, RunStatus::Waiting);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(fire_timers(&h).await, 1, "{waiting}");
    }
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.step("each").unwrap().output, Some(json!(["a", "b"])));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_step_that_fails_for_good_with_on_failure_branch_runs_its_catch_steps_and_the_run_goes_on()
 {
    let probe = Arc::new(Probe::default());
    let steps = concat!(
        "  - name: call\n",
        "    piece: test\n",
        "    action: flaky\n",
        "    input: { failures: 5, fatal: true }\n",
        "    on_failure: branch\n",
        "    catch:\n",
        "      - { name: report, piece: test, action: echo, input: { value: \"handled: {{ steps.call.error }}\" } }\n",
        "  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.call.status }} / {{ steps.call.output }}\" } }\n",
    );
    let h = Harness::start(&probe, &flow(steps)).await;
    h.start_run("r1", json!({})).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let call = run.step("call").unwrap();
    assert_eq!(call.status, StepStatus::Failed);
    assert_eq!(call.branch.as_deref(), Some("catch"));
    assert_eq!(call.attempts.len(), 1, "a fatal error is not retried");
    let report = run.step("report").unwrap().output.clone().unwrap();
    assert!(
        report.as_str().unwrap().starts_with("handled: "),
        "{report}"
    );
    assert_eq!(
        call.output.as_ref(),
        Some(&report),
        "the catch steps' output is the step's"
    );
    assert_eq!(
        run.step("after").unwrap().output,
        Some(json!(format!("failed / {}", report.as_str().unwrap())))
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_past_its_flows_timeout_is_failed_and_one_that_ended_is_left_alone() {
    let probe = Arc::new(Probe::default());
    let text = flow("  - { name: approval, wait_for: approval }\n  - { name: after, piece: test, action: echo, input: { value: 1 } }\n")
        .replace("steps:\n", "timeout: 1m\nsteps:\n");
    let h = Harness::start(&probe, &text).await;
    h.start_run("r1", json!({})).await;
    let run = until_status(&h, "r1", RunStatus::Waiting).await;
    assert!(run.deadline.is_some());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fire_timers(&h).await, 0, "not yet");
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(fire_timers(&h).await, 1);
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("timed out: the run did not end within the flow's timeout (1m)")
    );
    let late = h
        .runtime
        .resume_waiting_run(
            "r1",
            "approval",
            json!({}),
            &piecework_runtime::Actor("ops".into()),
        )
        .await
        .unwrap_err();
    assert!(late.to_string().contains("not waiting"), "{late}");

    // Resumed in time: the run ends, and its deadline then changes nothing.
    h.start_run("r2", json!({})).await;
    until_status(&h, "r2", RunStatus::Waiting).await;
    h.runtime
        .resume_waiting_run(
            "r2",
            "approval",
            json!({}),
            &piecework_runtime::Actor("ops".into()),
        )
        .await
        .unwrap();
    assert_eq!(h.finished("r2").await.status, RunStatus::Succeeded);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(fire_timers(&h).await, 1);
    assert_eq!(h.finished("r2").await.status, RunStatus::Succeeded);
    let audit = h.store.read_audit(None, 1000).await.unwrap();
    let timeouts: Vec<&str> = audit
        .iter()
        .filter(|e| e.event.action == "run.timeout")
        .map(|e| e.event.resource.as_str())
        .collect();
    assert_eq!(
        timeouts,
        ["run/r1"],
        "only the run that timed out is audited"
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(fire_timers(&h).await, 0, "the deadline timer is gone");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn runs_beyond_max_concurrent_runs_wait_unstarted_for_a_free_slot() {
    let probe = Arc::new(Probe::default());
    let text = flow("  - { name: approval, wait_for: approval }\n  - { name: after, piece: test, action: echo, input: { value: 1 } }\n")
        .replace("steps:\n", "max_concurrent_runs: 1\nsteps:\n");
    let h = Harness::start(&probe, &text).await;
    let ops = piecework_runtime::Actor("ops".into());
    h.start_run("r1", json!({})).await;
    until_status(&h, "r1", RunStatus::Waiting).await;
    h.start_run("r2", json!({})).await;
    // r1 holds the one slot while it waits: r2 does not start, however long.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let r2 = h.store.get_run("r2").await.unwrap().unwrap();
    assert_eq!(r2.status, RunStatus::Running);
    assert!(r2.steps.is_empty(), "r2 has not started: {r2:?}");
    // r1 ends: r2 takes the slot on its next try.
    h.runtime
        .resume_waiting_run("r1", "approval", json!({}), &ops)
        .await
        .unwrap();
    assert_eq!(h.finished("r1").await.status, RunStatus::Succeeded);
    let r2 = until_status(&h, "r2", RunStatus::Waiting).await;
    assert_eq!(r2.step("approval").unwrap().attempts.len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_subflow_step_starts_the_other_flow_once_and_takes_its_output_when_it_ends() {
    let probe = Arc::new(Probe::default());
    let parent = flow(concat!(
        "  - { name: sub, subflow: child, input: { n: \"{{ trigger.n }}\" } }\n",
        "  - { name: after, piece: test, action: echo, input: { value: \"{{ steps.sub.output }}\" } }\n",
    ));
    let h = Harness::start(&probe, &parent).await;
    let child = flow(concat!(
        "  - { name: pause, delay: 10s }\n",
        "  - { name: double, piece: test, action: echo, input: { value: \"{{ trigger.n * 2 }}\" } }\n",
    ))
    .replace("name: f\n", "name: child\n");
    h.runtime
        .apply_flow(
            FlowDefinition::parse(&child, Format::Yaml).unwrap(),
            &Actor("test".into()),
        )
        .await
        .unwrap();
    h.start_run("r1", json!({"n": 21})).await;
    let run = until_status(&h, "r1", RunStatus::Waiting).await;
    let sub = run.step("sub").unwrap();
    assert_eq!(sub.input["waiting_for"], "subflow");
    let child_id = sub.input["run_id"].as_str().unwrap().to_owned();
    let child_run = h.store.get_run(&child_id).await.unwrap().unwrap();
    let parent = child_run.parent.clone().unwrap();
    assert_eq!(
        (parent.run_id.as_str(), parent.step.as_str()),
        ("r1", "sub")
    );
    assert_eq!(
        (child_run.depth, child_run.started_by.name.as_str()),
        (1, "flow:f")
    );
    // The child's delay ends; its end brings the parent's timer forward: one firing wakes
    // the child, the next the parent.
    tokio::time::sleep(Duration::from_secs(11)).await;
    fire_timers(&h).await;
    assert_eq!(h.finished(&child_id).await.status, RunStatus::Succeeded);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fire_timers(&h).await;
    let run = h.finished("r1").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.step("sub").unwrap().output, Some(json!(42)));
    assert_eq!(run.step("after").unwrap().output, Some(json!(42)));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_or_too_deep_subflow_fails_its_step() {
    let probe = Arc::new(Probe::default());
    // `f` starts itself: the ninth level is refused.
    let text = flow("  - { name: again, subflow: f }\n");
    let h = Harness::start(&probe, &text).await;
    h.start_run("r1", json!({})).await;
    let mut id = "r1".to_owned();
    for _ in 0..8 {
        let run = until_status(&h, &id, RunStatus::Waiting).await;
        id = run.step("again").unwrap().input["run_id"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let deepest = h.finished(&id).await;
    assert_eq!(deepest.status, RunStatus::Failed);
    assert!(
        deepest
            .error
            .as_deref()
            .unwrap()
            .contains("sub-flows nest deeper than 8"),
        "{deepest:?}"
    );
    // The failure climbs back up: each parent's step fails naming its child's run.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        fire_timers(&h).await;
    }
    let top = h.finished("r1").await;
    assert_eq!(top.status, RunStatus::Failed);
    assert!(
        top.error.as_deref().unwrap().contains("sub-flow run"),
        "{top:?}"
    );
    h.stop().await;
}

//! One behaviour suite, run against the in-memory store and against Redis (a real
//! redis-server from the testkit), so the adapters cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use piecework_core::run::Attempt;
use piecework_core::{FlowDefinition, Format, Run, RunStatus, StepState, StepStatus, ValidFlow};
use piecework_proto::v1::{self, AuditEvent, StepResult};
use piecework_sdk::PollState;
use piecework_store::audit::{self, AuditQuery};
use piecework_store::memory::MemoryStore;
use piecework_store::redis::{RedisConfig, RedisStore};
use piecework_store::{
    DEBOUNCE_STEP, Held, HeldMeta, OutboxJob, Pause, RunQuery, RunUpdate, StepUpdate, Store, Timer,
};
use piecework_testkit::{RedisCluster, RedisServer};
use serde_json::json;

fn flow(name: &str, description: &str, enabled: bool) -> ValidFlow {
    let text = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ndescription: {description}\nenabled: {enabled}\ntrigger: {{piece: p, trigger: t}}\nsteps: []\n"
    );
    ValidFlow {
        definition: FlowDefinition::parse(&text, Format::Yaml).unwrap(),
        resolved: BTreeMap::from([("trigger".to_owned(), "1.0.0".parse().unwrap())]),
    }
}

/// A flow whose definition says nothing of `enabled`.
fn unmarked(name: &str, description: &str) -> ValidFlow {
    let mut valid = flow(name, description, true);
    valid.definition.enabled = None;
    valid
}

fn step(name: &str, status: StepStatus, attempt: u32) -> StepState {
    StepState {
        name: name.into(),
        piece: "p".into(),
        action: "a".into(),
        version: "1.0.0".into(),
        status,
        input: json!({"x": 1}),
        output: (status == StepStatus::Succeeded).then(|| json!({"y": 2})),
        error: (status != StepStatus::Succeeded).then(|| "boom".into()),
        attempts: (1..=attempt)
            .map(|n| Attempt {
                attempt: n,
                status,
                started_at: Utc::now(),
                duration_ms: 3,
                error: None,
                worker: "w".into(),
            })
            .collect(),
        retry_at: None,
        epoch: 0,
        branch: None,
    }
}

fn result(run: &str, step: &str, attempt: u32, run_status: v1::RunStatus) -> StepResult {
    StepResult {
        run_id: run.into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: step.into(),
        piece: "p".into(),
        action: "a".into(),
        version: "1.0.0".into(),
        attempt,
        status: v1::StepStatus::Succeeded as i32,
        duration_ms: 3,
        error: String::new(),
        run_status: run_status as i32,
        finished_unix_ms: 1_700_000_000_000,
        branch: String::new(),
    }
}

async fn flows_are_versioned_and_keep_their_cursor(store: Arc<dyn Store>) {
    let revision = store.flows_revision().await.unwrap();
    let first = store.apply_flow(flow("f", "a", true)).await.unwrap();
    let applied = store.flows_revision().await.unwrap();
    assert!(applied > revision, "applying moves the flows revision");
    assert_eq!((first.version, first.created), (1, true));
    // An operator pauses the flow; re-applying the same definition (CI does) leaves it paused.
    store.set_flow_enabled("f", false).await.unwrap();
    let same = store.apply_flow(flow("f", "a", true)).await.unwrap();
    assert_eq!(
        (same.version, same.created, same.record.enabled),
        (1, false, false)
    );
    store.set_flow_enabled("f", true).await.unwrap();
    let cursor = PollState {
        recent_ids: ["7".to_owned()].into(),
        ..PollState::default()
    };
    store.put_trigger_state("f", &cursor).await.unwrap();
    // A definition that changes `enabled` is a new version, and its word counts.
    let paused = store.apply_flow(flow("f", "a", false)).await.unwrap();
    assert_eq!(
        (paused.version, paused.created, paused.record.enabled),
        (2, true, false)
    );
    store.set_flow_enabled("f", true).await.unwrap();
    let again = store.apply_flow(flow("f", "a", false)).await.unwrap();
    assert_eq!(
        (again.version, again.created, again.record.enabled),
        (2, false, true),
        "the same definition again changes nothing an operator set"
    );
    let changed = store.apply_flow(unmarked("f", "b")).await.unwrap();
    assert_eq!(
        (changed.version, changed.created, changed.record.enabled),
        (3, true, true),
        "a changed definition that says nothing of `enabled` keeps it"
    );
    let fresh = store.apply_flow(unmarked("g", "new")).await.unwrap();
    assert!(
        fresh.record.enabled,
        "a new flow is enabled unless it says not"
    );
    assert_eq!(
        store
            .get_flow_version("f", 1)
            .await
            .unwrap()
            .unwrap()
            .definition
            .description,
        "a"
    );
    assert_eq!(
        store
            .get_flow_version("f", 3)
            .await
            .unwrap()
            .unwrap()
            .resolved["trigger"]
            .to_string(),
        "1.0.0"
    );
    assert!(store.get_flow_version("f", 4).await.unwrap().is_none());
    let before_disable = store.flows_revision().await.unwrap();
    assert!(
        !store
            .set_flow_enabled("f", false)
            .await
            .unwrap()
            .unwrap()
            .enabled
    );
    assert!(
        store.flows_revision().await.unwrap() > before_disable,
        "disabling moves the flows revision"
    );
    assert!(
        store
            .set_flow_enabled("nope", true)
            .await
            .unwrap()
            .is_none()
    );
    store.apply_flow(flow("e", "x", true)).await.unwrap();
    let ids: Vec<String> = store
        .list_flows()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(ids, ["e", "f", "g"]);
    assert_eq!(
        store.trigger_state("f").await.unwrap(),
        Some(cursor),
        "the cursor survives applies"
    );
    assert_eq!(store.trigger_state("e").await.unwrap(), None);
}

async fn runs_are_created_once_and_record_steps(store: Arc<dyn Store>) {
    let run = Run::new("r1".into(), "f", 1, json!({"id": 5}));
    assert!(store.create_run(&run).await.unwrap());
    assert!(!store.create_run(&run).await.unwrap());
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: step("a", StepStatus::Retrying, 1),
            result: result("r1", "a", 1, v1::RunStatus::Running),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap();
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: step("a", StepStatus::Succeeded, 2),
            result: result("r1", "a", 2, v1::RunStatus::Running),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let done = RunUpdate {
        status: RunStatus::Succeeded,
        error: None,
        finished_at: Some(Utc::now()),
    };
    let status = store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: step("b", StepStatus::Succeeded, 1),
            result: result("r1", "b", 1, v1::RunStatus::Succeeded),
            audit: None,
            response: Some(json!({"status": 201})),
            run: Some(done),
        })
        .await
        .unwrap();
    assert_eq!(
        status,
        RunStatus::Succeeded,
        "the run's status after the write"
    );
    let stored = store.get_run("r1").await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Succeeded);
    assert_eq!(stored.trigger, json!({"id": 5}));
    assert_eq!(stored.response, Some(json!({"status": 201})));
    assert!(stored.finished_at.is_some());
    let names: Vec<&str> = stored.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "steps in the order they ran");
    assert_eq!(stored.step("a").unwrap().attempts.len(), 2);
    assert_eq!(stored.step("a").unwrap().output, Some(json!({"y": 2})));
    assert!(store.get_run("nope").await.unwrap().is_none());

    let results = store.read_results(None, 10, Duration::ZERO).await.unwrap();
    let attempts: Vec<(String, u32)> = results
        .iter()
        .map(|e| (e.event.step.clone(), e.event.attempt))
        .collect();
    assert_eq!(
        attempts,
        [
            ("a".to_owned(), 1),
            ("a".to_owned(), 2),
            ("b".to_owned(), 1)
        ]
    );
    assert_eq!(
        results[2].event,
        result("r1", "b", 1, v1::RunStatus::Succeeded),
        "fields round-trip"
    );
    let after = store
        .read_results(Some(&results[1].id), 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    // A cursor by time: everything from before the results, nothing from after them.
    let before = store.results_cursor_at(1_600_000_000_000).await.unwrap();
    let all = store
        .read_results(before.as_deref(), 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let ahead = Utc::now().timestamp_millis() + 60_000;
    let ahead = store.results_cursor_at(ahead).await.unwrap();
    let none = store
        .read_results(ahead.as_deref(), 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
}

async fn runs_are_listed_newest_first_with_filters(store: Arc<dyn Store>) {
    for (i, flow_id) in ["f", "g", "f"].iter().enumerate() {
        let mut run = Run::new(format!("r{i}"), flow_id, 1, json!({}));
        run.created_at = Utc::now() + chrono::Duration::milliseconds(i as i64);
        store.create_run(&run).await.unwrap();
    }
    let failed = RunUpdate {
        status: RunStatus::Failed,
        error: Some("nope".into()),
        finished_at: Some(Utc::now()),
    };
    store.update_run("r2", failed).await.unwrap();
    let all = store
        .list_runs(&RunQuery {
            limit: 10,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r2", "r1", "r0"]);
    let of_f = store
        .list_runs(&RunQuery {
            flow_id: Some("f".into()),
            limit: 10,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(of_f.len(), 2);
    let failed = store
        .list_runs(&RunQuery {
            status: Some(RunStatus::Failed),
            limit: 10,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error.as_deref(), Some("nope"));
    let one = store
        .list_runs(&RunQuery {
            limit: 1,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
}

async fn runs_page_by_cursor_and_filter_by_time_and_starter(store: Arc<dyn Store>) {
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    // 25 runs; runs 10..13 share one millisecond, so the cursor must break ties.
    for i in 0..25_i64 {
        let mut run = Run::new(
            format!("r{i:02}"),
            if i % 2 == 0 { "f" } else { "g" },
            1,
            json!({}),
        );
        let ms = if (10..13).contains(&i) { 10 } else { i };
        run.created_at = t0 + chrono::Duration::milliseconds(ms * 1000);
        run.started_by =
            piecework_sdk::Principal::new(if i % 5 == 0 { "api:ops" } else { "webhook:f" }, None);
        store.create_run(&run).await.unwrap();
    }
    store
        .update_run(
            "r03",
            RunUpdate {
                status: RunStatus::Failed,
                error: Some("no".into()),
                finished_at: Some(Utc::now()),
            },
        )
        .await
        .unwrap();
    // Every run exactly once across pages of 4, newest first.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_runs(&RunQuery {
                after: after.clone(),
                limit: 4,
                ..RunQuery::default()
            })
            .await
            .unwrap();
        seen.extend(page.iter().map(|r| r.id.clone()));
        if page.len() < 4 {
            break;
        }
        after = page.last().map(piecework_store::RunCursor::after);
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("r{i:02}")).collect();
    expected.reverse();
    assert_eq!(seen, expected);
    let cursor: piecework_store::RunCursor = "1700000000000.r10".parse().unwrap();
    assert_eq!(cursor.to_string(), "1700000000000.r10");
    assert!("r10".parse::<piecework_store::RunCursor>().is_err());

    // Time, flow and starter filters; counts over the same.
    let window = RunQuery {
        since: Some(t0 + chrono::Duration::seconds(5)),
        until: Some(t0 + chrono::Duration::seconds(15)),
        limit: 100,
        ..RunQuery::default()
    };
    let ids: Vec<String> = store
        .list_runs(&window)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        ids,
        [
            "r14", "r13", "r12", "r11", "r10", "r09", "r08", "r07", "r06", "r05"
        ]
    );
    let by_hand = store
        .list_runs(&RunQuery {
            started_by: Some("api".into()),
            flow_id: Some("f".into()),
            limit: 100,
            ..RunQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = by_hand.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r20", "r10", "r00"]);
    assert_eq!(by_hand[0].started_by, "api:ops");
    let stats = store
        .run_stats(&RunQuery {
            flow_id: Some("g".into()),
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.total, 12);
    assert_eq!(stats.counts["running"], 11);
    assert_eq!(stats.counts["failed"], 1);
    let stats = store
        .run_stats(&RunQuery {
            started_by: Some("webhook".into()),
            ..window
        })
        .await
        .unwrap();
    assert_eq!(stats.total, 8, "{stats:?}");
}

async fn waiting_for_a_run_wakes_on_its_finish(store: Arc<dyn Store>) {
    store
        .create_run(&Run::new("w".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let still = store
        .wait_run_finished("w", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.status, RunStatus::Running);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_run_finished("w", Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let done = RunUpdate {
        status: RunStatus::Cancelled,
        error: None,
        finished_at: Some(Utc::now()),
    };
    store.update_run("w", done).await.unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken, not timed out");
    assert_eq!(
        finished.unwrap().unwrap().unwrap().status,
        RunStatus::Cancelled
    );
}

/// A watch registered before the run exists learns how it ended — status, error, response and
/// the last output — from the finish itself; a cancel ends it too; nothing ends in time: `None`.
async fn a_watch_registered_first_learns_how_the_run_ended(store: Arc<dyn Store>) {
    let watch = store.watch_run("w1").await.unwrap();
    store
        .create_run(&Run::new("w1".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut last = step("b", StepStatus::Succeeded, 1);
            last.output = Some(json!({"answer": 42}));
            store
                .record_step(StepUpdate {
                    unmark: false,
                    closed: Vec::new(),
                    pause: None,
                    wake: None,
                    run_id: "w1".into(),
                    step: step("a", StepStatus::Succeeded, 1),
                    result: result("w1", "a", 1, v1::RunStatus::Running),
                    audit: None,
                    response: Some(json!({"status": 201, "body": "made"})),
                    run: None,
                })
                .await
                .unwrap();
            store
                .record_step(StepUpdate {
                    unmark: false,
                    closed: Vec::new(),
                    pause: None,
                    wake: None,
                    run_id: "w1".into(),
                    step: last,
                    result: result("w1", "b", 1, v1::RunStatus::Succeeded),
                    audit: None,
                    response: None,
                    run: Some(RunUpdate {
                        status: RunStatus::Succeeded,
                        error: None,
                        finished_at: Some(Utc::now()),
                    }),
                })
                .await
                .unwrap();
        })
    };
    let ended = watch
        .ended(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the run ended");
    writer.await.unwrap();
    assert_eq!(ended.status, RunStatus::Succeeded);
    assert_eq!(ended.response, Some(json!({"status": 201, "body": "made"})));
    assert_eq!(ended.output, Some(json!({"answer": 42})));
    assert_eq!(ended.error, None);

    let watch = store.watch_run("w2").await.unwrap();
    store
        .create_run(&Run::new("w2".into(), "f", 1, json!({})))
        .await
        .unwrap();
    store.cancel_run("w2", Utc::now()).await.unwrap();
    let ended = watch.ended(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(ended.status, RunStatus::Cancelled);

    let watch = store.watch_run("w3").await.unwrap();
    store
        .create_run(&Run::new("w3".into(), "f", 1, json!({})))
        .await
        .unwrap();
    store
        .update_run(
            "w3",
            RunUpdate {
                status: RunStatus::Failed,
                error: Some("flow f version 1 does not exist".into()),
                finished_at: Some(Utc::now()),
            },
        )
        .await
        .unwrap();
    let ended = watch.ended(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(ended.status, RunStatus::Failed);
    assert_eq!(
        ended.error.as_deref(),
        Some("flow f version 1 does not exist")
    );

    let watch = store.watch_run("never").await.unwrap();
    assert_eq!(watch.ended(Duration::from_millis(100)).await.unwrap(), None);
}

/// A webhook's run is created only while its flow is enabled at the admitted version, with the
/// call's audit entry in the same write.
async fn admitted_runs_are_created_only_on_a_current_enabled_flow(store: Arc<dyn Store>) {
    use piecework_store::Admission;
    let applied = store.apply_flow(flow("hook", "a", true)).await.unwrap();
    let event = AuditEvent {
        actor: "webhook".into(),
        action: "webhook.receive".into(),
        resource: "flow/hook".into(),
        outcome: "success".into(),
        time_unix_ms: Utc::now().timestamp_millis(),
        ..AuditEvent::default()
    };
    let run = |id: &str, version: u32| Run::new(id.into(), "hook", version, json!({"n": 1}));
    assert_eq!(
        store
            .create_admitted_run(&run("h1", applied.version), Some(&event), &[])
            .await
            .unwrap(),
        Admission::Created
    );
    assert_eq!(
        store
            .create_admitted_run(&run("h1", applied.version), None, &[])
            .await
            .unwrap(),
        Admission::Exists
    );
    assert_eq!(
        store.get_run("h1").await.unwrap().unwrap().trigger,
        json!({"n": 1})
    );
    let audit = store.read_audit(None, 10).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event, event);
    // Another version, a disabled flow, an unknown flow: nothing is written.
    assert_eq!(
        store
            .create_admitted_run(&run("h2", applied.version + 1), Some(&event), &[])
            .await
            .unwrap(),
        Admission::Stale
    );
    store.set_flow_enabled("hook", false).await.unwrap();
    assert_eq!(
        store
            .create_admitted_run(&run("h3", applied.version), Some(&event), &[])
            .await
            .unwrap(),
        Admission::Stale
    );
    let unknown = Run::new("h4".into(), "nope", 1, json!({}));
    assert_eq!(
        store
            .create_admitted_run(&unknown, None, &[])
            .await
            .unwrap(),
        Admission::Stale
    );
    for id in ["h2", "h3", "h4"] {
        assert!(store.get_run(id).await.unwrap().is_none(), "{id}");
    }
    assert_eq!(store.read_audit(None, 10).await.unwrap().len(), 1);
}

async fn streams_and_the_piece_store_work(store: Arc<dyn Store>) {
    for action in ["flow.apply", "step.execute"] {
        let event = AuditEvent {
            actor: "api:x".into(),
            action: action.into(),
            outcome: "success".into(),
            ..AuditEvent::default()
        };
        store.append_audit(event).await.unwrap();
    }
    let audit = store.read_audit(None, 10).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .map(|e| e.event.action.as_str())
            .collect::<Vec<_>>(),
        ["flow.apply", "step.execute"]
    );
    assert_eq!(
        store
            .read_audit(Some(&audit[0].id), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // A blocking read returns as soon as an entry arrives.
    let tail = store
        .read_results(None, 10, Duration::ZERO)
        .await
        .unwrap()
        .last()
        .map(|e| e.id.clone());
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .read_results(tail.as_deref(), 10, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .create_run(&Run::new("s".into(), "f", 1, json!({})))
        .await
        .unwrap();
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "s".into(),
            step: step("a", StepStatus::Succeeded, 1),
            result: result("s", "a", 1, v1::RunStatus::Running),
            audit: Some(AuditEvent {
                action: "step.execute".into(),
                resource: "run/s/step/a".into(),
                ..AuditEvent::default()
            }),
            response: None,
            run: None,
        })
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("woken by the entry");
    assert_eq!(read.unwrap().unwrap().len(), 1);
    let audit = store.read_audit(None, 10).await.unwrap();
    assert_eq!(
        audit.last().unwrap().event.resource,
        "run/s/step/a",
        "the step's audit entry came with it"
    );

    let kv = store.kv();
    assert_eq!(kv.get("flow:f:n").await.unwrap(), None);
    kv.put("flow:f:n", json!({"n": 1})).await.unwrap();
    assert_eq!(kv.get("flow:f:n").await.unwrap(), Some(json!({"n": 1})));
    assert!(kv.delete("flow:f:n").await.unwrap());
    assert!(!kv.delete("flow:f:n").await.unwrap());
}

async fn leases_exclude_other_holders_until_released_or_lapsed(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(300);
    assert!(store.acquire_lease("poll:f", "a", ttl).await.unwrap());
    assert!(!store.acquire_lease("poll:f", "b", ttl).await.unwrap());
    assert!(
        store.acquire_lease("poll:g", "b", ttl).await.unwrap(),
        "leases are per name"
    );
    store.release_lease("poll:f", "b").await.unwrap();
    assert!(
        !store.acquire_lease("poll:f", "b", ttl).await.unwrap(),
        "only the holder releases"
    );
    store.release_lease("poll:f", "a").await.unwrap();
    assert!(store.acquire_lease("poll:f", "b", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        store.acquire_lease("poll:f", "c", ttl).await.unwrap(),
        "a dead holder's lease lapses"
    );
}

async fn runs_cancel_only_while_running_and_resume_only_when_failed(store: Arc<dyn Store>) {
    assert_eq!(store.cancel_run("none", Utc::now()).await.unwrap(), None);
    store
        .create_run(&Run::new("c".into(), "f", 1, json!({})))
        .await
        .unwrap();
    assert_eq!(
        store
            .resume_run("c", &step("a", StepStatus::Retrying, 1), &[])
            .await
            .unwrap(),
        Some(false)
    );
    assert_eq!(store.cancel_run("c", Utc::now()).await.unwrap(), Some(true));
    assert_eq!(
        store.cancel_run("c", Utc::now()).await.unwrap(),
        Some(false)
    );
    assert_eq!(
        store.get_run("c").await.unwrap().unwrap().status,
        RunStatus::Cancelled
    );
    // The step that was in flight finishes and would end the run: the cancel stands, and the
    // worker learns of it from the write.
    let done = RunUpdate {
        status: RunStatus::Succeeded,
        error: None,
        finished_at: Some(Utc::now()),
    };
    let status = store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "c".into(),
            step: step("a", StepStatus::Succeeded, 1),
            result: result("c", "a", 1, v1::RunStatus::Succeeded),
            audit: None,
            response: None,
            run: Some(done),
        })
        .await
        .unwrap();
    assert_eq!(status, RunStatus::Cancelled);
    let cancelled = store.get_run("c").await.unwrap().unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert_eq!(
        cancelled.step("a").unwrap().status,
        StepStatus::Succeeded,
        "the step itself is recorded"
    );

    store
        .create_run(&Run::new("r".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let failed = RunUpdate {
        status: RunStatus::Failed,
        error: Some("step `a` failed".into()),
        finished_at: Some(Utc::now()),
    };
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r".into(),
            step: step("a", StepStatus::Failed, 2),
            result: result("r", "a", 2, v1::RunStatus::Failed),
            audit: None,
            response: None,
            run: Some(failed),
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .resume_run("r", &step("a", StepStatus::Retrying, 2), &[])
            .await
            .unwrap(),
        Some(true)
    );
    let resumed = store.get_run("r").await.unwrap().unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    assert_eq!((&resumed.error, resumed.finished_at), (&None, None));
    assert_eq!(resumed.step("a").unwrap().status, StepStatus::Retrying);
    assert_eq!(
        resumed.step("a").unwrap().attempts.len(),
        2,
        "history is kept"
    );
}

async fn connections_are_stored_listed_and_deleted(store: Arc<dyn Store>) {
    let record = |name: &str, secret: &str| piecework_store::ConnectionRecord {
        name: name.into(),
        piece: "my-company-api".into(),
        key_id: "k1".into(),
        secret: secret.into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    assert!(store.get_connection("prod").await.unwrap().is_none());
    store
        .put_connection(&record("prod", "sealed-1"))
        .await
        .unwrap();
    store
        .put_connection(&record("dev", "sealed-2"))
        .await
        .unwrap();
    store
        .put_connection(&record("prod", "sealed-3"))
        .await
        .unwrap();
    assert_eq!(
        store.get_connection("prod").await.unwrap().unwrap().secret,
        "sealed-3"
    );
    let names: Vec<String> = store
        .list_connections()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["dev", "prod"]);
    // Last use: only ever forward, and gone with the connection.
    assert!(store.connections_used().await.unwrap().is_empty());
    let (earlier, later) = (
        Utc::now() - chrono::Duration::minutes(5),
        Utc::now() - chrono::Duration::minutes(1),
    );
    store.touch_connection("prod", later).await.unwrap();
    store.touch_connection("prod", earlier).await.unwrap();
    let used = store.connections_used().await.unwrap();
    assert_eq!(
        used.get("prod").map(|t| t.timestamp_millis()),
        Some(later.timestamp_millis())
    );
    assert!(!used.contains_key("dev"));
    assert!(store.delete_connection("prod").await.unwrap());
    assert!(!store.delete_connection("prod").await.unwrap());
    assert_eq!(store.list_connections().await.unwrap().len(), 1);
    assert!(store.connections_used().await.unwrap().is_empty());
}

async fn webhook_secrets_are_kept_unless_replaced(store: Arc<dyn Store>) {
    assert_eq!(store.get_webhook_secret("f").await.unwrap(), None);
    assert!(store.put_webhook_secret("f", "s1", false).await.unwrap());
    assert!(
        !store.put_webhook_secret("f", "s2", false).await.unwrap(),
        "a second apply keeps the first secret"
    );
    assert_eq!(
        store.get_webhook_secret("f").await.unwrap().as_deref(),
        Some("s1")
    );
    assert!(store.put_webhook_secret("f", "s3", true).await.unwrap());
    assert_eq!(
        store.get_webhook_secret("f").await.unwrap().as_deref(),
        Some("s3")
    );
    assert_eq!(store.get_webhook_secret("g").await.unwrap(), None);
}

async fn api_keys_are_created_once_listed_and_deleted(store: Arc<dyn Store>) {
    use piecework_core::access::Role;
    let record = |name: &str, role: Role, hash: &str| piecework_store::ApiKeyRecord {
        name: name.into(),
        role,
        hash: hash.into(),
        key_id: "k1".into(),
        created_at: Utc::now(),
        created_by: "api:bootstrap".into(),
    };
    assert!(store.get_api_key("ci").await.unwrap().is_none());
    let ci = record("ci", Role::Developer, "h1");
    assert!(store.create_api_key(&ci).await.unwrap());
    assert!(
        !store
            .create_api_key(&record("ci", Role::Admin, "h2"))
            .await
            .unwrap(),
        "a taken name is refused"
    );
    assert_eq!(store.get_api_key("ci").await.unwrap(), Some(ci.clone()));
    assert!(
        store
            .create_api_key(&record("oncall", Role::Operator, "h3"))
            .await
            .unwrap()
    );
    let listed: Vec<(String, Role)> = store
        .list_api_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.name, k.role))
        .collect();
    assert_eq!(
        listed,
        [
            ("ci".to_owned(), Role::Developer),
            ("oncall".to_owned(), Role::Operator)
        ]
    );
    assert!(store.delete_api_key("ci").await.unwrap());
    assert!(!store.delete_api_key("ci").await.unwrap());
    assert!(store.get_api_key("ci").await.unwrap().is_none());
}

/// Key rotation rewrites what it read, and nothing that changed in between.
async fn resealing_replaces_only_what_was_read(store: Arc<dyn Store>) {
    use piecework_core::access::Role;
    let connection = |secret: &str| piecework_store::ConnectionRecord {
        name: "prod".into(),
        piece: "my-company-api".into(),
        key_id: "k1".into(),
        secret: secret.into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let read = connection("{\"old\":1}");
    assert!(
        !store
            .reseal_connection(&read, &connection("{\"new\":1}"))
            .await
            .unwrap(),
        "nothing to reseal yet"
    );
    store.put_connection(&read).await.unwrap();
    let mut resealed = connection("{\"new\":1}");
    resealed.key_id = "k2".into();
    assert!(store.reseal_connection(&read, &resealed).await.unwrap());
    assert_eq!(
        store.get_connection("prod").await.unwrap(),
        Some(resealed.clone())
    );
    assert!(
        !store
            .reseal_connection(&read, &connection("{\"stale\":1}"))
            .await
            .unwrap(),
        "saved meanwhile: kept"
    );
    assert_eq!(store.get_connection("prod").await.unwrap(), Some(resealed));

    store.put_webhook_secret("f", "s1", false).await.unwrap();
    assert!(!store.reseal_webhook_secret("f", "s0", "s2").await.unwrap());
    assert!(store.reseal_webhook_secret("f", "s1", "s2").await.unwrap());
    assert_eq!(
        store.get_webhook_secret("f").await.unwrap().as_deref(),
        Some("s2")
    );
    assert!(
        !store
            .reseal_webhook_secret("none", "s1", "s2")
            .await
            .unwrap()
    );

    let key = |hash: &str, key_id: &str| piecework_store::ApiKeyRecord {
        name: "ci".into(),
        role: Role::Developer,
        hash: hash.into(),
        key_id: key_id.into(),
        created_at: Utc::now(),
        created_by: "api:bootstrap".into(),
    };
    let old = key("h1", "k1");
    let new = key("h2", "k2");
    assert!(!store.rehash_api_key(&old, &new).await.unwrap());
    store.create_api_key(&old).await.unwrap();
    assert!(store.rehash_api_key(&old, &new).await.unwrap());
    assert_eq!(store.get_api_key("ci").await.unwrap(), Some(new));
    assert!(
        !store.rehash_api_key(&old, &key("h3", "k3")).await.unwrap(),
        "rehashed by another process meanwhile"
    );
}

async fn audit_queries_filter_page_and_bound_time(store: Arc<dyn Store>) {
    let before = Utc::now().timestamp_millis() - 1;
    // More than one read chunk, so filtering continues across chunks.
    for i in 0..1200 {
        let (actor, action, resource) = if i % 3 == 0 {
            ("worker:w1", "step.execute", format!("run/r{i}/step/a"))
        } else {
            ("api:key", "flow.apply", format!("flow/f{i}"))
        };
        let event = AuditEvent {
            actor: actor.into(),
            action: action.into(),
            resource,
            outcome: if i == 600 { "failure" } else { "success" }.into(),
            time_unix_ms: Utc::now().timestamp_millis(),
            ..AuditEvent::default()
        };
        store.append_audit(event).await.unwrap();
    }
    let query = |edit: fn(&mut AuditQuery)| {
        let mut query = AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        };
        edit(&mut query);
        let store = store.clone();
        async move { audit::query(store.as_ref(), &query).await.unwrap() }
    };
    let workers = query(|q| q.actor = Some("worker".into())).await;
    assert_eq!(workers.entries.len(), 400);
    assert_eq!(workers.next, None, "the whole stream was read");
    assert!(workers.cursor.is_some());
    assert!(
        workers
            .entries
            .iter()
            .all(|e| e.event.action == "step.execute")
    );
    let one_run = query(|q| q.resource = Some("run/r3".into())).await;
    assert_eq!(one_run.entries.len(), 1, "run/r3 is not run/r30");
    assert_eq!(one_run.entries[0].event.resource, "run/r3/step/a");
    let failures = query(|q| q.outcome = Some("failure".into())).await;
    assert_eq!(failures.entries.len(), 1);
    let capped = query(|q| q.action = Some("flow".into())).await;
    assert_eq!(capped.entries.len(), 800);

    // Paging follows `next` without gaps or repeats.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page_query = AuditQuery {
            actor: Some("worker:w1".into()),
            limit: 150,
            after: after.clone(),
            ..AuditQuery::default()
        };
        let page = audit::query(store.as_ref(), &page_query).await.unwrap();
        seen.extend(page.entries.into_iter().map(|e| e.event.resource));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..1200)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("run/r{i}/step/a"))
        .collect();
    assert_eq!(seen, expected);

    // Time bounds.
    let all = query(|q| q.limit = 1000).await;
    assert_eq!(all.entries.len(), 1000);
    assert!(all.next.is_some(), "the limit stopped it");
    let since_before = AuditQuery {
        since_ms: Some(before),
        limit: 5,
        ..AuditQuery::default()
    };
    assert_eq!(
        audit::query(store.as_ref(), &since_before)
            .await
            .unwrap()
            .entries
            .len(),
        5
    );
    let future = AuditQuery {
        since_ms: Some(Utc::now().timestamp_millis() + 3_600_000),
        limit: 5,
        ..AuditQuery::default()
    };
    assert!(
        audit::query(store.as_ref(), &future)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    let past = AuditQuery {
        until_ms: Some(before),
        limit: 5,
        ..AuditQuery::default()
    };
    let page = audit::query(store.as_ref(), &past).await.unwrap();
    assert!(page.entries.is_empty());
    assert_eq!(page.next, None);
}

async fn a_step_that_ends_a_branch_records_the_branch_step_with_it(store: Arc<dyn Store>) {
    let run = Run::new("r1".into(), "f", 1, json!({}));
    store.create_run(&run).await.unwrap();
    let mut gate = step("gate", StepStatus::Succeeded, 1);
    gate.branch = Some("then".into());
    gate.output = None;
    let mut chosen = result("r1", "gate", 1, v1::RunStatus::Running);
    chosen.branch = "then".into();
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: gate.clone(),
            result: chosen.clone(),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let last = step("inside", StepStatus::Succeeded, 1);
    let mut closed = gate.clone();
    closed.output.clone_from(&last.output);
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: vec![closed],
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: last.clone(),
            result: result("r1", "inside", 1, v1::RunStatus::Running),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap();
    let stored = store.get_run("r1").await.unwrap().unwrap();
    let names: Vec<&str> = stored.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["gate", "inside"], "the branch step keeps its place");
    let gate = stored.step("gate").unwrap();
    assert_eq!(gate.branch.as_deref(), Some("then"));
    assert_eq!(
        gate.output, last.output,
        "the branch's output is the branch step's"
    );
    let results = store.read_results(None, 10, Duration::ZERO).await.unwrap();
    assert_eq!(
        results[0].event, chosen,
        "the branch round-trips in pw:results"
    );
    assert_eq!(results[1].event.branch, "");
}

/// Records step `name` of run `run` as waiting, with a timer due at `due` when given.
async fn start_waiting(
    store: &Arc<dyn Store>,
    run: &str,
    name: &str,
    due: Option<chrono::DateTime<Utc>>,
) -> RunStatus {
    let mut waiting = step(name, StepStatus::Waiting, 1);
    waiting.retry_at = due;
    let timer = due.map(|due| Timer {
        run_id: run.into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: name.into(),
        due,
    });
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: Some(Pause { timer }),
            wake: None,
            run_id: run.into(),
            step: waiting,
            result: result(run, name, 1, v1::RunStatus::Waiting),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap()
}

async fn waiting_runs_wake_once_from_their_timers_or_resume_by_hand(store: Arc<dyn Store>) {
    let mut added = store.watch_timers().await.unwrap();
    added.borrow_and_update();
    for id in ["r1", "r2", "r3"] {
        store
            .create_run(&Run::new(id.into(), "f", 1, json!({})))
            .await
            .unwrap();
    }
    assert_eq!(store.next_timer().await.unwrap(), None);
    let now = Utc::now();
    let due = now - chrono::Duration::seconds(1);
    assert_eq!(
        start_waiting(&store, "r1", "pause", Some(due)).await,
        RunStatus::Waiting
    );
    tokio::time::timeout(Duration::from_secs(5), added.changed())
        .await
        .expect("a new timer is announced")
        .unwrap();
    let later = now + chrono::Duration::hours(1);
    assert_eq!(
        start_waiting(&store, "r2", "approve", Some(later)).await,
        RunStatus::Waiting
    );
    assert_eq!(
        start_waiting(&store, "r3", "approve", None).await,
        RunStatus::Waiting
    );
    let next = store.next_timer().await.unwrap().unwrap();
    assert_eq!(next.timestamp_millis(), due.timestamp_millis());

    // Due timers are taken once per `again_after`: the second look finds none.
    let taken = store
        .take_due_timers(now, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let timer = taken[0].clone();
    assert_eq!(
        (
            timer.run_id.as_str(),
            timer.flow_id.as_str(),
            timer.flow_version,
            timer.step.as_str()
        ),
        ("r1", "f", 1, "pause")
    );
    assert_eq!(timer.due.timestamp_millis(), due.timestamp_millis());
    assert!(
        store
            .take_due_timers(now, 10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    // Pushed back, it fires again if its wake is lost.
    let again = now + chrono::Duration::seconds(61);
    assert_eq!(
        store
            .take_due_timers(again, 10, Duration::from_secs(60))
            .await
            .unwrap()
            .len(),
        1
    );

    // The wake is claimed by one; a claimer that died before recording may claim again.
    assert!(store.claim_wake(&timer).await.unwrap());
    assert_eq!(
        store.get_run("r1").await.unwrap().unwrap().status,
        RunStatus::Running
    );
    assert!(store.claim_wake(&timer).await.unwrap());
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "r1".into(),
            step: step("pause", StepStatus::Succeeded, 1),
            result: result("r1", "pause", 1, v1::RunStatus::Running),
            audit: None,
            response: None,
            run: None,
        })
        .await
        .unwrap();
    assert!(
        !store.claim_wake(&timer).await.unwrap(),
        "woken and recorded"
    );
    assert!(
        store
            .take_due_timers(again, 10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "the claim dropped the timer"
    );

    // By hand: only a run waiting on that step.
    let approve = |run: &str| Timer {
        run_id: run.into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: "approve".into(),
        due: later,
    };
    let mut done = step("approve", StepStatus::Succeeded, 1);
    done.output = Some(json!({"approved": true}));
    let resumed = result("r2", "approve", 1, v1::RunStatus::Running);
    assert_eq!(
        store
            .resume_waiting(&approve("r2"), &done, &resumed)
            .await
            .unwrap(),
        Some(true)
    );
    let run = store.get_run("r2").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(
        run.step("approve").unwrap().output,
        Some(json!({"approved": true}))
    );
    assert_eq!(
        store
            .resume_waiting(&approve("r2"), &done, &resumed)
            .await
            .unwrap(),
        Some(false),
        "resumed once"
    );
    assert!(
        !store.claim_wake(&approve("r2")).await.unwrap(),
        "a late timer loses to the resume"
    );
    assert_eq!(
        store
            .resume_waiting(&approve("nope"), &done, &resumed)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.next_timer().await.unwrap(),
        None,
        "r2's timer went with the resume"
    );
    let results = store.read_results(None, 100, Duration::ZERO).await.unwrap();
    assert!(results.iter().any(|r| r.event == resumed));

    // A waiting run can be cancelled; it then resumes no more.
    assert_eq!(
        store.cancel_run("r3", Utc::now()).await.unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .resume_waiting(&approve("r3"), &done, &resumed)
            .await
            .unwrap(),
        Some(false)
    );
}

async fn rate_limits_space_starts_across_callers(store: Arc<dyn Store>) {
    let interval = Duration::from_millis(200);
    let first = store.reserve_rate("api", interval).await.unwrap();
    let second = store.reserve_rate("api", interval).await.unwrap();
    let third = store.reserve_rate("api", interval).await.unwrap();
    let other = store.reserve_rate("other", interval).await.unwrap();
    assert_eq!(first, Duration::ZERO);
    assert_eq!(other, Duration::ZERO, "limits are per key");
    // Reserved back to back: each start one interval after the one before (less the time the
    // calls took).
    assert!(
        second > Duration::from_millis(100) && second <= interval,
        "{second:?}"
    );
    assert!(
        third > Duration::from_millis(300) && third <= interval * 2,
        "{third:?}"
    );
}

async fn run_slots_count_only_runs_still_going(store: Arc<dyn Store>) {
    for id in ["a", "b", "c"] {
        store
            .create_run(&Run::new(id.into(), "f", 1, json!({})))
            .await
            .unwrap();
    }
    assert!(store.acquire_run_slot("f", "a", 2).await.unwrap());
    assert!(
        store.acquire_run_slot("f", "a", 2).await.unwrap(),
        "held already"
    );
    assert!(store.acquire_run_slot("f", "b", 2).await.unwrap());
    assert!(!store.acquire_run_slot("f", "c", 2).await.unwrap(), "full");
    assert!(
        store.acquire_run_slot("g", "c", 2).await.unwrap(),
        "per flow"
    );
    // A run that ends frees its slot.
    store.cancel_run("a", Utc::now()).await.unwrap();
    assert!(store.acquire_run_slot("f", "c", 2).await.unwrap());
    assert!(!store.acquire_run_slot("f", "d", 2).await.unwrap());
}

async fn a_loop_joins_once_every_lane_ended(store: Arc<dyn Store>) {
    let run = Run::new("r".into(), "f", 1, json!({}));
    store.create_run(&run).await.unwrap();
    assert!(!store.join_lane("r", "each", 1, 3).await.unwrap());
    assert!(
        !store.join_lane("r", "each", 1, 3).await.unwrap(),
        "a lane counted twice counts once"
    );
    assert!(
        store.join_lane("r", "other", 0, 1).await.unwrap(),
        "loops count apart: one lane of one"
    );
    assert!(!store.join_lane("r", "each", 0, 3).await.unwrap());
    assert!(
        store.join_lane("r", "each", 2, 3).await.unwrap(),
        "the last lane"
    );
    assert!(
        store.join_lane("r", "each", 0, 3).await.unwrap(),
        "a redelivered lane end sees the loop complete too"
    );
    // The count is not part of the run's record.
    let read = store.get_run("r").await.unwrap().unwrap();
    assert!(read.steps.is_empty(), "{read:?}");
    assert!(
        !store.join_lane("gone", "each", 0, 1).await.unwrap(),
        "a run that no longer exists joins nothing"
    );
}

async fn debounced_items_wait_in_their_group_until_it_is_quiet(store: Arc<dyn Store>) {
    let t0 = chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap();
    let held = |slot: &str, n: u64, id: Option<&str>, at: i64| Held {
        flow_id: "f".into(),
        slot: slot.into(),
        item_id: id.map(str::to_owned),
        item: json!({ "n": n, "big": 12_345_678_901_234_567_u64 }),
        meta: HeldMeta {
            flow_version: 2,
            key: format!("key-{slot}"),
            trigger: "webhook".into(),
            started_by: piecework_sdk::Principal::new("webhook:f", None),
        },
        period: Duration::from_secs(10),
        max: Duration::from_secs(25),
        now: t0 + chrono::Duration::seconds(at),
    };
    let secs = |s: i64| t0 + chrono::Duration::seconds(s);
    assert_eq!(
        store.hold_item(&held("a", 1, None, 0)).await.unwrap(),
        secs(10)
    );
    assert_eq!(
        store.hold_item(&held("a", 2, None, 8)).await.unwrap(),
        secs(18)
    );
    assert_eq!(
        store.hold_item(&held("b", 9, Some("x"), 8)).await.unwrap(),
        secs(18)
    );
    assert_eq!(
        store.hold_item(&held("b", 10, Some("x"), 9)).await.unwrap(),
        secs(18),
        "the same item again changes nothing"
    );
    // Items keep coming: the first one waits at most `max`.
    assert_eq!(
        store.hold_item(&held("a", 3, None, 20)).await.unwrap(),
        secs(25)
    );
    let a = store.pending_item("f", "a").await.unwrap().unwrap();
    assert_eq!(
        a.item,
        json!({ "n": 3, "big": 12_345_678_901_234_567_u64 }),
        "the last item, as it came"
    );
    assert_eq!((a.seq, a.first, a.due), (3, t0, secs(25)));
    assert_eq!(a.meta.flow_version, 2);
    assert_eq!(a.meta.key, "key-a");
    assert_eq!(store.pending_item("f", "b").await.unwrap().unwrap().seq, 1);
    assert!(store.pending_item("f", "zz").await.unwrap().is_none());

    // Their timers come due with the others.
    let due = store
        .take_due_timers(secs(30), 10, Duration::from_secs(60))
        .await
        .unwrap();
    let mut slots: Vec<(&str, &str, u32)> = due
        .iter()
        .map(|t| (t.run_id.as_str(), t.step.as_str(), t.flow_version))
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, [("a", DEBOUNCE_STEP, 0), ("b", DEBOUNCE_STEP, 0)]);
    // A group that took another item since its run started is kept; one that did not ends.
    store.release_item("f", "a", 2).await.unwrap();
    assert!(store.pending_item("f", "a").await.unwrap().is_some());
    store.release_item("f", "a", 3).await.unwrap();
    assert!(store.pending_item("f", "a").await.unwrap().is_none());
    store.release_item("f", "b", 1).await.unwrap();
    let later = store
        .take_due_timers(secs(1000), 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        later.is_empty(),
        "released groups leave no timer: {later:?}"
    );
    // A new item after the release starts a new group.
    assert_eq!(
        store.hold_item(&held("a", 4, None, 100)).await.unwrap(),
        secs(110)
    );
    assert_eq!(store.pending_item("f", "a").await.unwrap().unwrap().seq, 1);
}

async fn in_flight_places_are_bounded_leased_and_given_back(store: Arc<dyn Store>) {
    let lease = Duration::from_secs(60);
    assert!(store.acquire_in_flight("api", "a", 2, lease).await.unwrap());
    assert!(
        store.acquire_in_flight("api", "a", 2, lease).await.unwrap(),
        "held already"
    );
    assert!(store.acquire_in_flight("api", "b", 2, lease).await.unwrap());
    assert!(
        !store.acquire_in_flight("api", "c", 2, lease).await.unwrap(),
        "full"
    );
    assert!(
        store
            .acquire_in_flight("other", "c", 2, lease)
            .await
            .unwrap(),
        "per key"
    );
    store.release_in_flight("api", "a").await.unwrap();
    assert!(store.acquire_in_flight("api", "c", 2, lease).await.unwrap());
    // A holder that never gives its place back loses it when its lease lapses.
    assert!(
        store
            .acquire_in_flight("short", "x", 1, Duration::from_millis(50))
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_in_flight("short", "y", 1, lease)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        store
            .acquire_in_flight("short", "y", 1, lease)
            .await
            .unwrap()
    );
}

fn job(run: &str, step: &str, epoch: u32) -> OutboxJob {
    OutboxJob {
        run_id: run.into(),
        flow_id: "f".into(),
        flow_version: 1,
        step: step.into(),
        epoch,
    }
}

async fn jobs_are_held_in_the_outbox_with_their_run_until_sent(store: Arc<dyn Store>) {
    let applied = store.apply_flow(flow("f", "d", true)).await.unwrap();
    let mut run = Run::new("o1".into(), "f", applied.version, json!({}));
    run.created_at = Utc::now() - chrono::Duration::seconds(10);
    assert!(
        store
            .create_run_queued(&run, &[job("o1", "first", 0)])
            .await
            .unwrap()
    );
    // A run that exists queues nothing new.
    assert!(
        !store
            .create_run_queued(&run, &[job("o1", "other", 0)])
            .await
            .unwrap()
    );
    let mut admitted = Run::new("o2".into(), "f", applied.version, json!({}));
    admitted.created_at = Utc::now() - chrono::Duration::seconds(5);
    store
        .create_admitted_run(&admitted, None, &[job("o2", "first", 0)])
        .await
        .unwrap();
    // Only jobs recorded before the cut, oldest first, bounded.
    assert_eq!(
        store.outbox(Utc::now(), 10).await.unwrap(),
        [job("o1", "first", 0), job("o2", "first", 0)]
    );
    assert_eq!(
        store.outbox(Utc::now(), 1).await.unwrap(),
        [job("o1", "first", 0)]
    );
    assert_eq!(
        store
            .outbox(Utc::now() - chrono::Duration::seconds(7), 10)
            .await
            .unwrap(),
        [job("o1", "first", 0)]
    );
    store
        .outbox_sent(&[job("o1", "first", 0), job("o2", "first", 0)])
        .await
        .unwrap();
    assert!(store.outbox(Utc::now(), 10).await.unwrap().is_empty());

    // A retry queues its step and lanes with the resume.
    store
        .update_run(
            "o1",
            RunUpdate {
                status: RunStatus::Failed,
                error: Some("boom".into()),
                finished_at: Some(Utc::now()),
            },
        )
        .await
        .unwrap();
    let retried = [job("o1", "each[0]", 3), job("o1", "each[1]", 3)];
    assert_eq!(
        store
            .resume_run("o1", &step("each[0]", StepStatus::Retrying, 1), &retried)
            .await
            .unwrap(),
        Some(true)
    );
    let later = Utc::now() + chrono::Duration::seconds(1);
    let mut queued = store.outbox(later, 10).await.unwrap();
    queued.sort_by(|a, b| a.step.cmp(&b.step));
    assert_eq!(queued, retried);
    // A refused resume queues nothing.
    assert_eq!(
        store
            .resume_run(
                "o1",
                &step("x", StepStatus::Retrying, 1),
                &[job("o1", "x", 4)]
            )
            .await
            .unwrap(),
        Some(false)
    );
    store.outbox_sent(&retried).await.unwrap();
    assert!(store.outbox(later, 10).await.unwrap().is_empty());
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(super::MemoryStore::new())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = super::RedisServer::start().await.unwrap();
                    let config = super::RedisConfig { url: server.url(), ..super::RedisConfig::default() };
                    let store = super::RedisStore::connect(config).await.unwrap();
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
        /// A Redis Cluster of three primaries: every key carries the hash tag `{pw}`.
        mod redis_cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let cluster = super::RedisCluster::start(3, 0).await.unwrap();
                    let config = super::RedisConfig {
                        url: cluster.url(),
                        cluster: true,
                        ..super::RedisConfig::default()
                    };
                    let store = super::RedisStore::connect(config).await.unwrap();
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

suite!(
    jobs_are_held_in_the_outbox_with_their_run_until_sent,
    runs_page_by_cursor_and_filter_by_time_and_starter,
    debounced_items_wait_in_their_group_until_it_is_quiet,
    a_loop_joins_once_every_lane_ended,
    in_flight_places_are_bounded_leased_and_given_back,
    run_slots_count_only_runs_still_going,
    rate_limits_space_starts_across_callers,
    a_step_that_ends_a_branch_records_the_branch_step_with_it,
    waiting_runs_wake_once_from_their_timers_or_resume_by_hand,
    flows_are_versioned_and_keep_their_cursor,
    runs_are_created_once_and_record_steps,
    runs_are_listed_newest_first_with_filters,
    waiting_for_a_run_wakes_on_its_finish,
    a_watch_registered_first_learns_how_the_run_ended,
    admitted_runs_are_created_only_on_a_current_enabled_flow,
    streams_and_the_piece_store_work,
    leases_exclude_other_holders_until_released_or_lapsed,
    runs_cancel_only_while_running_and_resume_only_when_failed,
    connections_are_stored_listed_and_deleted,
    api_keys_are_created_once_listed_and_deleted,
    webhook_secrets_are_kept_unless_replaced,
    resealing_replaces_only_what_was_read,
    audit_queries_filter_page_and_bound_time,
);

#[tokio::test]
async fn redis_data_survives_a_restart_and_the_store_reconnects() {
    let mut server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    store.apply_flow(flow("f", "a", true)).await.unwrap();
    store
        .create_run(&Run::new("r".into(), "f", 1, json!({})))
        .await
        .unwrap();
    server.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.get_run("r").await {
            Ok(run) => {
                assert!(run.is_some(), "the run survived");
                break;
            }
            Err(err) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no reconnect: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    store.ready().await.unwrap();
    assert_eq!(
        store.get_flow("f").await.unwrap().unwrap().latest_version,
        1
    );
}

/// Behind Redis Sentinel the store follows a failover: when the primary dies, the replica
/// the Sentinels promote has the data, takes the writes, and carries the run-finished
/// notifications.
#[tokio::test]
async fn redis_behind_sentinels_follows_a_failover() {
    let mut sentinels = piecework_testkit::RedisSentinel::start().await.unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: sentinels.url(),
        sentinel_master: Some(piecework_testkit::RedisSentinel::MASTER.into()),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    store.apply_flow(flow("f", "a", true)).await.unwrap();
    store
        .create_run(&Run::new("before".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let primary = sentinels.primary().await.unwrap();
    // Replication is asynchronous: let the replica confirm it has the writes.
    let mut direct = ::redis::Client::open(format!("redis://127.0.0.1:{primary}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let replicas: i64 = ::redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(replicas, 1);
    assert_eq!(sentinels.kill_primary().await, Some(primary));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.get_run("before").await {
            Ok(run) => {
                assert!(run.is_some(), "the replica had the run");
                break;
            }
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "no failover: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_ne!(sentinels.primary().await, Some(primary));
    let watch = store.watch_run("after").await.unwrap();
    store
        .create_run(&Run::new("after".into(), "f", 1, json!({})))
        .await
        .unwrap();
    store
        .update_run(
            "after",
            RunUpdate {
                status: RunStatus::Succeeded,
                error: None,
                finished_at: Some(Utc::now()),
            },
        )
        .await
        .unwrap();
    let ended = watch.ended(Duration::from_secs(10)).await.unwrap().unwrap();
    assert_eq!(ended.status, RunStatus::Succeeded);
}

/// Sync webhooks share one run-finished subscription per process, and it survives a restart.
#[tokio::test]
async fn run_finished_waiters_share_one_subscription_that_survives_a_restart() {
    let mut server = RedisServer::start().await.unwrap();
    let store = Arc::new(
        RedisStore::connect(RedisConfig {
            url: server.url(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    let admin = ::redis::Client::open(server.url()).unwrap();
    let patterns = async || -> i64 {
        let Ok(mut conn) = admin.get_multiplexed_async_connection().await else {
            return -1;
        };
        ::redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(&mut conn)
            .await
            .unwrap_or(-1)
    };
    let finish = |id: &str| {
        let (store, id) = (store.clone(), id.to_owned());
        async move {
            let done = RunUpdate {
                status: RunStatus::Succeeded,
                error: None,
                finished_at: Some(Utc::now()),
            };
            store.update_run(&id, done).await.unwrap();
        }
    };
    let wait_all = |ids: Vec<String>| {
        let store = store.clone();
        ids.into_iter()
            .map(|id| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.wait_run_finished(&id, Duration::from_secs(30)).await },
                )
            })
            .collect::<Vec<_>>()
    };

    let ids: Vec<String> = (0..50).map(|n| format!("sync-{n}")).collect();
    for id in &ids {
        store
            .create_run(&Run::new(id.clone(), "f", 1, json!({})))
            .await
            .unwrap();
    }
    let waiters = wait_all(ids.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(patterns().await, 1, "50 waiters, one subscription");
    for id in &ids {
        finish(id).await;
    }
    for waiter in waiters {
        let run = waiter.await.unwrap().unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Succeeded);
    }

    server.restart().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while patterns().await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription was not reopened after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store
        .create_run(&Run::new("after".into(), "f", 1, json!({})))
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waiter = wait_all(vec!["after".into()]).pop().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    finish("after").await;
    let run = waiter.await.unwrap().unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "woken after the restart");
}

#[tokio::test]
async fn redis_audit_entries_older_than_the_retention_are_trimmed() {
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: server.url(),
        audit_retention: Duration::from_secs(3600),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    // An entry from long ago (its stream id is its time), then one now.
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = ::redis::cmd("XADD")
        .arg("pw:audit")
        .arg("1000-0")
        .arg("actor")
        .arg("api:old")
        .query_async(&mut conn)
        .await
        .unwrap();
    let event = AuditEvent {
        actor: "api:new".into(),
        action: "flow.apply".into(),
        resource: "flow/f".into(),
        outcome: "success".into(),
        time_unix_ms: Utc::now().timestamp_millis(),
        ..AuditEvent::default()
    };
    store.append_audit(event).await.unwrap();
    let entries = store.read_audit(None, 10).await.unwrap();
    let actors: Vec<&str> = entries.iter().map(|e| e.event.actor.as_str()).collect();
    assert_eq!(actors, ["api:new"]);
}

/// Finished runs (succeeded, failed, cancelled) disappear once the retention has passed; runs
/// still running, and failed runs resumed in time, stay.
async fn finished_runs_expire_after_the_retention(store: Arc<dyn Store>) {
    let finish = |status| RunUpdate {
        status,
        error: None,
        finished_at: Some(Utc::now()),
    };
    for id in ["done", "failed", "cancelled", "running", "resumed"] {
        store
            .create_run(&Run::new(id.into(), "f", 1, json!({})))
            .await
            .unwrap();
    }
    store
        .update_run("done", finish(RunStatus::Succeeded))
        .await
        .unwrap();
    store
        .update_run("failed", finish(RunStatus::Failed))
        .await
        .unwrap();
    store
        .update_run("resumed", finish(RunStatus::Failed))
        .await
        .unwrap();
    store.cancel_run("cancelled", Utc::now()).await.unwrap();
    assert_eq!(
        store
            .resume_run("resumed", &step("a", StepStatus::Retrying, 1), &[])
            .await
            .unwrap(),
        Some(true)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.get_run("done").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "`done` never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for gone in ["failed", "cancelled"] {
        assert!(store.get_run(gone).await.unwrap().is_none(), "{gone}");
    }
    for kept in ["running", "resumed"] {
        assert!(store.get_run(kept).await.unwrap().is_some(), "{kept}");
    }
    let listed: Vec<String> = store
        .list_runs(&RunQuery {
            limit: 10,
            ..RunQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
}

const SHORT_RETENTION: Duration = Duration::from_secs(1);

#[tokio::test]
async fn memory_runs_expire_after_the_retention() {
    let store = MemoryStore::new().with_run_retention(SHORT_RETENTION);
    finished_runs_expire_after_the_retention(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_runs_expire_after_the_retention_and_their_index_is_trimmed() {
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: server.url(),
        run_retention: SHORT_RETENTION,
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    finished_runs_expire_after_the_retention(Arc::new(store.clone())).await;
    // Creating a run trims index entries older than the retention.
    store
        .create_run(&Run::new("later".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let indexed: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("pw:runs:flow:f")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, ["later"]);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg("pw:run:resumed")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "a resumed run no longer expires");
}

#[tokio::test]
async fn redis_with_tls_and_a_password_is_reached_with_its_ca_and_password() {
    let server = RedisServer::start_with(piecework_testkit::Options {
        tls: true,
        password: Some("redis-pass-123".into()),
    })
    .await
    .unwrap();
    let url = server.url();
    assert!(url.starts_with("rediss://:redis-pass-123@"), "{url}");
    let config = RedisConfig {
        url: url.clone(),
        tls_ca_file: Some(server.tls().unwrap().ca.clone()),
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    };
    config.validate().unwrap();
    let store = RedisStore::connect(config.clone()).await.unwrap();
    // A run, and a waiter woken over the pub/sub connection, which is TLS too.
    waiting_for_a_run_wakes_on_its_finish(Arc::new(store)).await;

    let refused = |config: RedisConfig| async move {
        match RedisStore::connect(config).await {
            Ok(_) => panic!("connected"),
            Err(err) => err.to_string(),
        }
    };
    let untrusted = refused(RedisConfig {
        tls_ca_file: None,
        ..config.clone()
    })
    .await;
    assert!(!untrusted.contains("redis-pass-123"), "{untrusted}");
    let wrong = refused(RedisConfig {
        url: url.replace("redis-pass-123", "wrong-pass"),
        ..config
    })
    .await;
    assert!(!wrong.contains("wrong-pass"), "{wrong}");
}

/// Step updates written concurrently share round trips (group commit); each still gets its
/// own outcome, and one that fails does not take the others of its batch with it.
#[tokio::test]
async fn redis_step_updates_written_together_each_get_their_own_outcome() {
    let server = RedisServer::start().await.unwrap();
    let store = Arc::new(
        RedisStore::connect(RedisConfig {
            url: server.url(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    for i in 0..300 {
        store
            .create_run(&Run::new(format!("r{i}"), "f", 1, json!({})))
            .await
            .unwrap();
    }
    // A key of the wrong type where a run should be: its update fails.
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = ::redis::cmd("SET")
        .arg("pw:run:broken")
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let update = |run: String, last: bool| StepUpdate {
        unmark: false,
        closed: Vec::new(),
        pause: None,
        wake: None,
        step: step("a", StepStatus::Succeeded, 1),
        result: result(&run, "a", 1, v1::RunStatus::Succeeded),
        run_id: run,
        audit: None,
        response: None,
        run: last.then(|| RunUpdate {
            status: RunStatus::Succeeded,
            error: None,
            finished_at: Some(Utc::now()),
        }),
    };
    let writes = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(
                async move { store.record_step(update(format!("r{i}"), i % 2 == 0)).await },
            )
        })
        .chain(std::iter::once({
            let store = store.clone();
            tokio::spawn(async move { store.record_step(update("broken".into(), true)).await })
        }))
        .collect::<Vec<_>>();
    let mut outcomes = Vec::new();
    for write in writes {
        outcomes.push(write.await.unwrap());
    }
    let broken = outcomes.pop().unwrap();
    assert!(broken.is_err(), "{broken:?}");
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let expected = if i % 2 == 0 {
            RunStatus::Succeeded
        } else {
            RunStatus::Running
        };
        assert_eq!(outcome.unwrap(), expected, "run r{i}");
        let run = store.get_run(&format!("r{i}")).await.unwrap().unwrap();
        assert_eq!(run.steps.len(), 1);
        assert_eq!(run.status, expected);
    }
    // Redis does not roll a transaction back: the broken update's other commands ran.
    let results = store
        .read_results(None, 1000, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(results.len(), 301);
}

/// The run-finished notification carries how the run ended, as JSON a waiter reads without
/// touching the run.
#[tokio::test]
async fn redis_run_finished_notifications_carry_the_run_end() {
    use futures::StreamExt as _;
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("pw:run-done:n1").await.unwrap();
    let mut messages = pubsub.into_on_message();
    store
        .create_run(&Run::new("n1".into(), "f", 1, json!({})))
        .await
        .unwrap();
    let mut last = step("a", StepStatus::Succeeded, 1);
    last.output = Some(json!({"ok": "yes \"quoted\""}));
    store
        .record_step(StepUpdate {
            unmark: false,
            closed: Vec::new(),
            pause: None,
            wake: None,
            run_id: "n1".into(),
            step: last,
            result: result("n1", "a", 1, v1::RunStatus::Succeeded),
            audit: None,
            response: Some(json!([1, 2])),
            run: Some(RunUpdate {
                status: RunStatus::Succeeded,
                error: None,
                finished_at: Some(Utc::now()),
            }),
        })
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap()
        .unwrap();
    let payload: String = message.get_payload().unwrap();
    let ended: piecework_store::RunEnded = serde_json::from_str(&payload).unwrap();
    assert_eq!(
        ended,
        piecework_store::RunEnded {
            status: RunStatus::Succeeded,
            error: None,
            response: Some(json!([1, 2])),
            output: Some(json!({"ok": "yes \"quoted\""})),
        }
    );
}

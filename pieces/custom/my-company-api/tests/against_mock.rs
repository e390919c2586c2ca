//! The piece against the mock ticketing API, exactly as the engine calls it.

use std::sync::Arc;
use std::time::Duration;

use piecework_mock_ticketing::{Fault, MockTicketing};
use piecework_sdk::{
    Context, EgressPolicy, HttpClient, MemoryKv, Owner, Piece, PieceError, RunInfo, ScopedStore,
};
use serde_json::{Value, json};

const TOKEN: &str = "tok-123";

async fn mock() -> MockTicketing {
    MockTicketing::start("127.0.0.1:0".parse().unwrap(), TOKEN)
        .await
        .unwrap()
}

fn piece() -> Piece {
    piecework_piece_my_company_api::piece().unwrap()
}

fn ctx(url: &str, environment: &str, key: &str, owner: &str) -> Context {
    Context::new(
        RunInfo::new("run-1", "flow", 1, "step", 1),
        Owner { id: owner.into() },
        ScopedStore::new(Arc::new(MemoryKv::default()), "flow"),
        HttpClient::new(EgressPolicy::allowing_loopback()).unwrap(),
    )
    .with_auth(Some(
        json!({ "api_key": key, "environment": environment, "base_url": url }),
    ))
}

async fn run(action: &str, ctx: &Context, input: Value) -> Result<Value, PieceError> {
    piece().action(action).unwrap().run_json(ctx, input).await
}

#[tokio::test]
async fn production_uses_v2_and_other_environments_v1() {
    let mock = mock().await;
    for (environment, version) in [("prod", "v2"), ("staging", "v1"), ("dev", "v1")] {
        let out = run(
            "health_check",
            &ctx(&mock.url, environment, TOKEN, "ada"),
            json!({}),
        )
        .await
        .unwrap();
        assert_eq!(out["status"], "healthy", "{out}");
        assert_eq!(out["api_version"], version);
        assert_eq!(
            mock.requests().last().unwrap().version.as_deref(),
            Some(version)
        );
    }
}

#[tokio::test]
async fn create_ticket_checks_permission_and_is_idempotent_across_retries() {
    let mock = mock().await;
    let ctx = ctx(&mock.url, "prod", TOKEN, "ada");
    let input = json!({"title": "Printer on fire", "description": "Third floor", "priority": "critical", "assignee": "bob"});
    let first = run("create_ticket", &ctx, input.clone()).await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(
        first["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v2/tickets/{id}")),
        "{first}"
    );
    assert!(first["created_at"].is_string());
    // A retry of the same step (same idempotency key) does not file a second ticket.
    let again = run("create_ticket", &ctx, input).await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(mock.tickets().len(), 1);
    let ticket = mock.ticket(&id).unwrap();
    assert_eq!(
        (ticket.priority.as_str(), ticket.assignee.as_deref()),
        ("critical", Some("bob"))
    );
    let posted = mock
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(posted.idempotency_key.as_deref(), Some("run-1:step"));
}

#[tokio::test]
async fn permission_is_checked_for_the_flow_owner() {
    let mock = mock().await;
    mock.deny("mallory", "create_ticket");
    let input = json!({"title": "t", "description": "d"});
    let err = run(
        "create_ticket",
        &ctx(&mock.url, "dev", TOKEN, "mallory"),
        input.clone(),
    )
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        "insufficient permissions: `mallory` may not create_ticket"
    );
    let err = run("create_ticket", &ctx(&mock.url, "dev", TOKEN, ""), input)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("needs the flow to have an owner"),
        "{err}"
    );
    assert!(mock.tickets().is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_before_any_request() {
    let mock = mock().await;
    let err = run(
        "create_ticket",
        &ctx(&mock.url, "dev", TOKEN, "ada"),
        json!({"title": "t", "description": "d", "priority": "urgent"}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("prop `priority`: \"urgent\" is not one of the options"),
        "{err}"
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn failures_are_classified_and_retry_after_is_honoured() {
    let mock = mock().await;
    let ctx = ctx(&mock.url, "dev", TOKEN, "ada");
    let update = json!({"ticket_id": "T-1", "status": "closed"});
    mock.inject(Fault {
        status: Some(503),
        ..Fault::default()
    });
    assert!(
        run("update_ticket", &ctx, update.clone())
            .await
            .unwrap_err()
            .is_retryable()
    );
    mock.inject(Fault {
        status: Some(429),
        retry_after: Some(7),
        ..Fault::default()
    });
    let err = run("update_ticket", &ctx, update.clone())
        .await
        .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    let err = run("update_ticket", &ctx, update).await.unwrap_err();
    assert!(
        !err.is_retryable(),
        "404 for an unknown ticket is fatal: {err}"
    );
    let bad_key = self::ctx(&mock.url, "dev", "wrong", "ada");
    let err = run(
        "update_ticket",
        &bad_key,
        json!({"ticket_id": "T-1", "status": "closed"}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().starts_with("HTTP 401"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn health_check_reports_an_unreachable_api_instead_of_failing() {
    let out = run(
        "health_check",
        &ctx("http://127.0.0.1:9", "dev", TOKEN, "ada"),
        json!({}),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], "unhealthy");
    assert!(
        out["error"].is_string() && out["latency_ms"].is_number(),
        "{out}"
    );
}

#[tokio::test]
async fn new_ticket_lists_newest_first_with_filters() {
    let mock = mock().await;
    mock.add_ticket("a", "low", "support");
    mock.add_ticket("b", "critical", "infra");
    mock.add_ticket("c", "critical", "support");
    let piece = piece();
    let piecework_sdk::TriggerHandle::Polling(trigger) = piece.trigger("new_ticket").unwrap()
    else {
        panic!("new_ticket polls");
    };
    let ctx = ctx(&mock.url, "dev", TOKEN, "ada");
    let all = trigger.poll_json(&ctx, json!({})).await.unwrap();
    let titles: Vec<&str> = all
        .iter()
        .map(|i| i.data["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["c", "b", "a"]);
    assert_eq!(all[0].id.as_deref(), Some("T-1003"));
    let filtered = trigger
        .poll_json(&ctx, json!({"team": "support", "priority": "critical"}))
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].data["title"], "c");
}

#[tokio::test]
async fn auth_validation_calls_the_api_with_the_key() {
    let mock = mock().await;
    let piece = piece();
    piece
        .validate_auth(&ctx(&mock.url, "prod", TOKEN, ""))
        .await
        .unwrap();
    let err = piece
        .validate_auth(&ctx(&mock.url, "prod", "stolen", ""))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the API key was rejected (Generate a key at https://internal.company.example/settings)"
    );
    assert!(!err.to_string().contains("stolen"));
}

#[tokio::test]
async fn the_team_and_assignee_dropdowns_load_their_options_from_the_api() {
    let mock = mock().await;
    let piece = piece();
    let create = piece.action("create_ticket").unwrap();
    let ctx = ctx(&mock.url, "prod", TOKEN, "ada");
    let teams = create.options_json(&ctx, "team", json!({})).await.unwrap();
    let values: Vec<&Value> = teams.options.iter().map(|o| &o.value).collect();
    assert_eq!(
        values,
        [&json!("support"), &json!("platform"), &json!("billing")]
    );
    assert_eq!(teams.options[1].label, "Platform");
    assert_eq!(mock.requests().last().unwrap().path, "/v2/teams");

    // The assignee depends on the team: disabled until one is chosen.
    let waiting = create
        .options_json(&ctx, "assignee", json!({}))
        .await
        .unwrap();
    assert!(waiting.disabled && waiting.options.is_empty());
    assert_eq!(waiting.placeholder.as_deref(), Some("Choose a team first"));
    let members = create
        .options_json(&ctx, "assignee", json!({"team": "platform"}))
        .await
        .unwrap();
    let labels: Vec<&str> = members.options.iter().map(|o| o.label.as_str()).collect();
    assert_eq!(labels, ["Linus", "Ken"]);

    // An unknown team is the API's 404, a prop without options is refused before any call.
    let err = create
        .options_json(&ctx, "assignee", json!({"team": "nope"}))
        .await
        .unwrap_err();
    assert!(err.message().contains("404"), "{err}");
    let err = create
        .options_json(&ctx, "priority", json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "prop `priority` of `create_ticket` is not a dynamic dropdown: its options are in its metadata"
    );
    // Without a connection: nothing to ask yet.
    let anonymous = Context::new(
        RunInfo::new("options", "", 0, "team", 1),
        Owner::default(),
        ScopedStore::new(Arc::new(MemoryKv::default()), ""),
        HttpClient::new(EgressPolicy::allowing_loopback()).unwrap(),
    );
    let none = create
        .options_json(&anonymous, "team", json!({}))
        .await
        .unwrap();
    assert_eq!(
        none.placeholder.as_deref(),
        Some("Choose a connection first")
    );
}

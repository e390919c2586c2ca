//! End to end through the in-process sandbox (api + scheduler + worker on the in-memory
//! adapters), over real HTTP. The demo piece `my-company-api` runs as a bundle, in its own
//! process, as in `piecework dev`.

mod common;

use std::time::Duration;

use piecework::config::Config;
use piecework::dev::Sandbox;
use serde_json::{Value, json};

async fn sandbox(api_key: Option<&str>) -> (Sandbox, String) {
    sandbox_with(|config| config.api.api_key = api_key.map(str::to_owned)).await
}

async fn sandbox_with(configure: impl FnOnce(&mut Config)) -> (Sandbox, String) {
    let mut config = Config::default();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.egress.allow_loopback(); // as `piecework dev` does
    configure(&mut config);
    let flows = piecework::flows::examples().unwrap();
    let sandbox = Sandbox::start_with(
        config,
        flows,
        piecework::registry::pieces().unwrap(),
        piecework::infra::Infra::MEMORY,
        test_keyring(),
        &[common::demo_bundle()],
    )
    .await
    .unwrap();
    let base = format!("http://{}", sandbox.api_addr);
    (sandbox, base)
}

fn test_keyring() -> piecework_runtime::secrets::Keyring {
    let spec = piecework_runtime::secrets::Keyring::generate_spec("test");
    piecework_runtime::secrets::Keyring::parse(&spec).unwrap()
}

use common::client;

const ORDER_FLOW: &str = r#"
apiVersion: piecework/v1
kind: Flow
name: orders
trigger: { piece: webhook, trigger: catch, auth: none }
steps:
  - name: total
    piece: data
    action: set
    input:
      value: "{{ trigger.body.items | map(attribute='price') | sum }}"
  - name: remember
    piece: store
    action: put
    input: { key: last_total, value: "{{ steps.total.output }}" }
  - name: respond
    piece: webhook
    action: return_response
    input:
      status: 201
      body: { total: "{{ steps.total.output }}", stored: "{{ steps.remember.output.key }}" }
"#;

#[tokio::test]
async fn a_flow_applied_through_the_api_answers_its_sync_webhook() {
    let (sandbox, base) = sandbox(None).await;
    let http = client();

    let applied = http
        .post(format!("{base}/v1/flows"))
        .body(ORDER_FLOW)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201);
    let applied: Value = applied.json().await.unwrap();
    assert_eq!(applied["version"], 1);
    // Applying the same definition again is idempotent.
    let again = http
        .post(format!("{base}/v1/flows"))
        .body(ORDER_FLOW)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);

    let body = json!({"items": [{"price": 3}, {"price": 4.5}]});
    let response = http
        .post(format!("{base}/v1/webhooks/orders/sync"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"total": 7.5, "stored": "last_total"})
    );

    // The run is listed and shows every step's input, output and attempts.
    let runs: Value = http
        .get(format!("{base}/v1/runs?flow=orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = runs["runs"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(runs["runs"][0]["status"], "succeeded");
    let run: Value = http
        .get(format!("{base}/v1/runs/{run_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let steps = run["run"]["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["total", "remember", "respond"]);
    assert_eq!(steps[0]["output"], json!(7.5));
    assert_eq!(
        steps[1]["input"],
        json!({"key": "last_total", "value": 7.5})
    );
    assert_eq!(steps[2]["attempts"][0]["attempt"], 1);

    // The flow and its version read back.
    let flow: Value = http
        .get(format!("{base}/v1/flows/orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            flow["flow"]["latest_version"].as_u64(),
            flow["latest"]["definition"]["name"].as_str()
        ),
        (Some(1), Some("orders"))
    );
    let version: Value = http
        .get(format!("{base}/v1/flows/orders/versions/1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["version"]["resolved"]["total"], "0.1.0");
    let missing = http
        .get(format!("{base}/v1/flows/orders/versions/9"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Audit: the apply (twice) and every step execution; paged with `after`.
    let first: Value = http
        .get(format!("{base}/v1/audit?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cursor = first["entries"][0]["id"].as_str().unwrap().to_owned();
    let rest: Value = http
        .get(format!("{base}/v1/audit?after={cursor}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        rest["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != cursor.as_str())
    );
    assert_eq!(
        http.get(format!("{base}/v1/audit?limit=0"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let audit: Value = http
        .get(format!("{base}/v1/audit"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.iter().filter(|a| **a == "flow.apply").count() >= 4,
        "{actions:?}"
    );
    assert!(
        actions.iter().filter(|a| **a == "step.execute").count() >= 3,
        "{actions:?}"
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn steps_routed_to_another_queue_run_in_dev() {
    let mut config = Config::default();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.egress.allow_loopback(); // as `piecework dev` does
    let text = ORDER_FLOW.replace("    action: put\n", "    action: put\n    queue: vpn-eu\n");
    let flow = piecework_core::FlowDefinition::parse(&text, piecework_core::Format::Yaml).unwrap();
    let sandbox = Sandbox::start(
        config,
        vec![flow],
        piecework::registry::pieces().unwrap(),
        piecework::infra::Infra::MEMORY,
        test_keyring(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", sandbox.api_addr);
    let body = json!({"items": [{"price": 1}]});
    let response = client()
        .post(format!("{base}/v1/webhooks/orders/sync"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_flow_is_rejected_with_every_problem() {
    let (sandbox, base) = sandbox(None).await;
    let bad = ORDER_FLOW.replace("action: put", "action: upsert").replace(
        "steps.total.output }}\", stored",
        "steps.nothing.output }}\", stored",
    );
    let response = client()
        .post(format!("{base}/v1/flows"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_flow");
    let issues: Vec<String> = body["error"]["details"]["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}: {}",
                i["path"].as_str().unwrap(),
                i["message"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        issues,
        [
            "steps[1] (remember).action: piece `store` has no action `upsert` (it has: get, put, delete)",
            "steps[2] (respond).input.body.total: refers to step `nothing`, which does not exist",
        ]
    );
    let garbage = client()
        .post(format!("{base}/v1/flows"))
        .body("{ not: [yaml")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let body: Value = garbage.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("flow is not valid YAML"),
        "{body}"
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn the_api_key_guards_everything_but_webhooks_and_health() {
    let key = "a-long-enough-api-key";
    let (sandbox, base) = sandbox(Some(key)).await;
    let http = client();
    assert_eq!(
        http.get(format!("{base}/v1/flows"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let wrong = http
        .get(format!("{base}/v1/flows"))
        .bearer_auth("a-long-enough-api-kex")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        http.get(format!("{base}/v1/flows"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let echo = http
        .post(format!("{base}/v1/webhooks/echo/sync"))
        .json(&json!({"name": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(echo.status(), 200);
    assert_eq!(echo.headers()["x-greeted-by"], "piecework");
    assert_eq!(
        echo.json::<Value>().await.unwrap(),
        json!({"message": "hello, ada", "length": 3})
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn an_open_api_is_refused_beyond_loopback() {
    let mut config = Config::default();
    config.api.listen = "0.0.0.0:0".parse().unwrap();
    config.egress.allow_loopback(); // as `piecework dev` does
    let refused = Sandbox::start(
        config,
        Vec::new(),
        piecework::registry::pieces().unwrap(),
        piecework::infra::Infra::MEMORY,
        test_keyring(),
    )
    .await;
    let err = refused
        .err()
        .expect("no key beyond loopback is refused")
        .to_string();
    assert!(err.contains("PW_API_KEY"), "{err}");
}

#[tokio::test]
async fn webhooks_refuse_unknown_disabled_and_non_webhook_flows_alike() {
    let (sandbox, base) = sandbox(None).await;
    let http = client();
    let refused = |path: &'static str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let response = http.post(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    // A caller learns nothing about which flows exist: unknown, scheduled, disabled look alike.
    let missing = refused("/v1/webhooks/nope").await;
    assert_eq!(missing.0, 404);
    assert!(missing.1.contains("no such webhook"), "{}", missing.1);
    assert_eq!(refused("/v1/webhooks/heartbeat").await, missing);
    let bad_json = http
        .post(format!("{base}/v1/webhooks/echo"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad_json.status(),
        400,
        "an admitted call gets the real error"
    );
    assert_eq!(
        http.post(format!("{base}/v1/flows/echo/disable"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(refused("/v1/webhooks/echo").await, missing);
    assert_eq!(
        http.post(format!("{base}/v1/flows/echo/enable"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let accepted = http
        .post(format!("{base}/v1/webhooks/echo"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    assert!(accepted["run_id"].is_string());
    // The API remembers the flow that admitted a call; disabling it still refuses the next.
    assert_eq!(
        http.post(format!("{base}/v1/flows/echo/disable"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(refused("/v1/webhooks/echo").await, missing);
    let bad_query = http
        .get(format!("{base}/v1/runs?status=sleeping"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_query.status(), 400);
    // Refusals are counted, not audited one by one.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (reason, count) in [("unknown_flow", 1), ("not_webhook", 1), ("disabled", 2)] {
        assert!(
            metrics.contains(&format!(
                "piecework_webhook_refused_total{{reason=\"{reason}\"}} {count}"
            )),
            "{reason}: {metrics}"
        );
    }
    let audit: Value = http
        .get(format!("{base}/v1/audit?action=webhook"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries.iter().all(|e| e["resource"] == "flow/echo"),
        "{audit}"
    );
    sandbox.stop().await.unwrap();
}

const SIGNED_FLOW: &str = "apiVersion: piecework/v1\nkind: Flow\nname: signed\ntrigger: { piece: webhook, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: \"{{ trigger.body.n }}\" } }\n";

#[tokio::test]
async fn webhook_flows_take_only_signed_calls_by_default() {
    use piecework_runtime::webhooks::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
    let (sandbox, base) = sandbox(None).await;
    let http = client();
    let applied: Value = http
        .post(format!("{base}/v1/flows"))
        .body(SIGNED_FLOW)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(applied["webhook"]["auth"], "hmac", "{applied}");
    let secret = applied["webhook"]["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 64);
    // Shown once: applying again does not show it; admins can read it.
    let again: Value = http
        .post(format!("{base}/v1/flows"))
        .body(SIGNED_FLOW)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["created"], false);
    assert_eq!(again["webhook"], json!({"auth": "hmac"}));
    let read: Value = http
        .get(format!("{base}/v1/flows/signed/webhook-secret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["secret"], secret.as_str());

    let body = br#"{"n": 5}"#.to_vec();
    let now = chrono::Utc::now().timestamp();
    let call = |timestamp: Option<i64>, signature: Option<String>| {
        let mut request = http
            .post(format!("{base}/v1/webhooks/signed/sync"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(timestamp) = timestamp {
            request = request.header(TIMESTAMP_HEADER, timestamp.to_string());
        }
        if let Some(signature) = signature {
            request = request.header(SIGNATURE_HEADER, signature);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let ok = call(Some(now), Some(sign(&secret, now, &body))).await;
    assert_eq!(ok, (200, "5".to_owned()));
    let refused = call(None, None).await;
    assert_eq!(refused.0, 404);
    assert!(refused.1.contains("no such webhook"));
    for (timestamp, signature) in [
        (Some(now), Some(sign("another-secret", now, &body))),
        (Some(now), Some(sign(&secret, now, b"{\"n\": 6}"))),
        (Some(now - 600), Some(sign(&secret, now - 600, &body))),
        (Some(now), None),
    ] {
        assert_eq!(call(timestamp, signature).await, refused);
    }
    // Rotated: the old secret stops working at once.
    let rotated: Value = http
        .post(format!("{base}/v1/flows/signed/webhook-secret/rotate"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    assert_eq!(
        call(Some(now), Some(sign(&secret, now, &body))).await,
        refused
    );
    assert_eq!(
        call(Some(now), Some(sign(new_secret, now, &body))).await.0,
        200
    );

    // `auth: token` reads the secret from a header.
    let token_flow = SIGNED_FLOW
        .replace("name: signed", "name: tokened")
        .replace(
            "trigger: catch }",
            "trigger: catch, auth: token, token_header: x-hub-token }",
        );
    let applied: Value = http
        .post(format!("{base}/v1/flows"))
        .body(token_flow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = applied["webhook"]["secret"].as_str().unwrap();
    let with = |value: &str| {
        http.post(format!("{base}/v1/webhooks/tokened/sync"))
            .header("content-type", "application/json")
            .header("x-hub-token", value)
            .body(body.clone())
            .send()
    };
    assert_eq!(with(token).await.unwrap().status(), 200);
    assert_eq!(with("guess").await.unwrap().status(), 404);

    // `auth` is for webhook triggers only, and named values only.
    let wrong = http
        .post(format!("{base}/v1/flows"))
        .body(SIGNED_FLOW.replace("trigger: catch }", "trigger: catch, auth: basic }"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);
    assert!(
        wrong
            .text()
            .await
            .unwrap()
            .contains("unknown variant `basic`")
    );
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn webhook_calls_beyond_the_rates_or_the_body_limit_are_refused() {
    let (sandbox, base) = sandbox_with(|config| {
        config.api.webhook_rate_per_flow = "2/min".parse().unwrap();
        config.api.webhook_rate = "5/min".parse().unwrap();
        config.api.max_webhook_bytes = 4096;
    })
    .await;
    let http = client();
    let call = |flow: &'static str, body: String| {
        http.post(format!("{base}/v1/webhooks/{flow}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let small = || json!({"name": "ada"}).to_string();
    assert_eq!(call("echo", small()).await.unwrap().status(), 202);
    assert_eq!(call("echo", small()).await.unwrap().status(), 202);
    let limited = call("echo", small()).await.unwrap();
    assert_eq!(limited.status(), 429, "the flow's burst of 2 is spent");
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // The total rate counts every call, refused ones too: 2 more, then nothing.
    assert_eq!(call("nope", small()).await.unwrap().status(), 404);
    assert_eq!(call("nope", small()).await.unwrap().status(), 404);
    assert_eq!(call("nope", small()).await.unwrap().status(), 429);
    sandbox.stop().await.unwrap();

    let (sandbox, base) = sandbox_with(|config| config.api.max_webhook_bytes = 4096).await;
    let big = json!({"name": "x".repeat(5000)}).to_string();
    let refused = client()
        .post(format!("{base}/v1/webhooks/echo"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sandbox, base) = sandbox_with(|config| {
        config.api.header_read_timeout = Duration::from_secs(1);
        config.api.sync_timeout = Duration::from_secs(1);
        config.api.request_timeout = Duration::from_secs(2);
    })
    .await;
    let addr = base.trim_start_matches("http://").to_owned();

    // Headers a byte at a time, never finished: the connection is closed.
    let mut slowloris = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slowloris
        .write_all(b"POST /v1/webhooks/echo HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), slowloris.read_to_end(&mut buf))
        .await
        .expect("the server closed the connection");
    assert!(read.is_ok(), "{read:?}");

    // Headers in time, then a body that never arrives: 408 once the request time is up.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/webhooks/echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"name\":")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), slow_body.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Well-behaved callers are not affected.
    let ok = client()
        .post(format!("{base}/v1/webhooks/echo"))
        .json(&json!({"name": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn the_pieces_catalog_lists_metadata() {
    let (sandbox, base) = sandbox(None).await;
    let catalog: Value = client()
        .get(format!("{base}/v1/pieces"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = catalog["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "data",
            "http",
            "my-company-api",
            "schedule",
            "store",
            "webhook"
        ]
    );
    // The private piece is a bundle, the core ones are built in.
    let bundled: Value = client()
        .get(format!("{base}/v1/pieces/my-company-api"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bundled["origin"]["source"], "directory", "{bundled}");
    assert!(
        bundled["origin"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let http_piece: Value = client()
        .get(format!("{base}/v1/pieces/http"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http_piece["piece"]["actions"][0]["name"], "send_request");
    assert_eq!(http_piece["versions"], json!(["0.2.0"]));
    sandbox.stop().await.unwrap();
}

/// A piece with custom auth, for the connections API.
fn registry_with_vault() -> piecework_core::Registry {
    use piecework_sdk::prelude::*;
    struct Noop;
    impl Action for Noop {
        type Input = Value;
        type Output = Value;
        fn spec(&self) -> ActionSpec {
            ActionSpec::new("noop", "Noop").require_auth()
        }
        async fn run(&self, _ctx: &Context, _input: Value) -> Result<Value, PieceError> {
            Ok(Value::Null)
        }
    }
    let mut registry = piecework::registry::pieces().unwrap();
    let auth = PieceAuth::custom(
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
    );
    registry
        .register_built(
            Piece::builder("vault", "Vault")
                .auth(auth)
                .action(Noop)
                .build(),
        )
        .unwrap();
    registry
}

#[tokio::test]
async fn connections_are_saved_through_the_api_and_never_returned() {
    let mut config = Config::default();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.egress.allow_loopback(); // as `piecework dev` does
    let sandbox = Sandbox::start(
        config,
        vec![],
        registry_with_vault(),
        piecework::infra::Infra::MEMORY,
        test_keyring(),
    )
    .await
    .unwrap();
    let base = format!("http://{}", sandbox.api_addr);
    let http = client();
    let secret = "sk-live-very-secret-value";
    let body = json!({"name": "prod", "piece": "vault", "values": {"api_key": secret, "environment": "prod"}});
    let created = http
        .post(format!("{base}/v1/connections"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created = created.text().await.unwrap();
    assert!(!created.contains(secret), "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["connection"]["piece"], "vault");
    assert_eq!(created["connection"]["key_id"], "test");
    let replaced = http
        .post(format!("{base}/v1/connections"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), 200);

    let listed = http
        .get(format!("{base}/v1/connections"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains("\"prod\"") && !listed.contains(secret),
        "{listed}"
    );
    let one = http
        .get(format!("{base}/v1/connections/prod"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!one.contains(secret), "{one}");

    let bad = json!({"name": "x", "piece": "vault", "values": {"api_key": secret, "environment": "moon"}});
    let refused = http
        .post(format!("{base}/v1/connections"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let refused = refused.text().await.unwrap();
    assert!(
        refused.contains("prop `environment`") && !refused.contains(secret),
        "{refused}"
    );
    let malformed = http
        .post(format!("{base}/v1/connections"))
        .body(format!("{{\"name\": \"x\", \"values\": \"{secret}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert!(!malformed.text().await.unwrap().contains(secret));

    assert_eq!(
        http.delete(format!("{base}/v1/connections/prod"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        http.delete(format!("{base}/v1/connections/prod"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let audit = http
        .get(format!("{base}/v1/audit"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        audit.contains("connection.save") && audit.contains("connection.delete"),
        "{audit}"
    );
    assert!(!audit.contains(secret));
    sandbox.stop().await.unwrap();
}

#[tokio::test]
async fn the_auto_assign_demo_assigns_each_new_ticket_exactly_once() {
    let mut config = Config::default();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.egress.allow_loopback(); // as `piecework dev` does
    let flow = piecework::flows::examples()
        .unwrap()
        .into_iter()
        .find(|f| f.name == "auto-assign")
        .map(|mut f| {
            f.trigger.poll_interval = Some(Duration::from_secs(1));
            f
        })
        .unwrap();
    let sandbox = Sandbox::start_with(
        config,
        vec![flow],
        piecework::registry::pieces().unwrap(),
        piecework::infra::Infra::MEMORY,
        test_keyring(),
        &[common::demo_bundle()],
    )
    .await
    .unwrap();
    let mock = piecework::demo::start(&sandbox.runtime, Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;

    let query = piecework_store::RunQuery {
        flow_id: Some("auto-assign".into()),
        limit: 1000,
        ..Default::default()
    };
    let summaries = sandbox.runtime.runs(&query).await.unwrap();
    assert!(
        summaries.len() >= 5,
        "tickets keep coming: {}",
        summaries.len()
    );
    let mut seen = std::collections::HashSet::new();
    for summary in &summaries {
        let run = sandbox
            .runtime
            .wait_run_finished(&summary.id, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.status, piecework_core::RunStatus::Succeeded, "{run:?}");
        let id = run.trigger["id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "ticket {id} fired twice");
        let ticket = mock.ticket(&id).unwrap();
        let expected = if ticket.priority == "critical" {
            "on-call"
        } else {
            "triage"
        };
        assert_eq!(
            (ticket.assignee.as_deref(), ticket.status.as_str()),
            (Some(expected), "in_progress")
        );
    }
    let patches = mock
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, summaries.len(), "one update per run");
    sandbox.stop().await.unwrap();
}

/// The flow-control example end to end against the ticketing mock: a loop over the
/// incidents, a branch by priority, an approval wait for the critical one (resumed through
/// the API) and a rate limit on every call to the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_incident_batch_example_loops_branches_waits_for_approval_and_keeps_its_rate() {
    let (sandbox, base) = sandbox(None).await;
    let mock = piecework::demo::start(&sandbox.runtime, Duration::from_secs(3600))
        .await
        .unwrap();
    let http = client();
    let incidents = json!({"incidents": [
        {"title": "disk full", "priority": "critical"},
        {"title": "slow page", "priority": "low"},
        {"title": "typo", "priority": "medium"},
    ]});
    let started: Value = http
        .post(format!("{base}/v1/webhooks/incident-batch"))
        .json(&incidents)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["run_id"].as_str().unwrap().to_owned();
    let run_of = || async {
        http.get(format!("{base}/v1/runs/{id}"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["run"]
            .clone()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let run = loop {
        let run = run_of().await;
        if run["status"] == "waiting" {
            break run;
        }
        assert!(std::time::Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let waiting: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "waiting")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        waiting,
        ["approval[0]"],
        "the critical incident waits: {run}"
    );

    let resumed = http
        .post(format!("{base}/v1/runs/{id}/resume"))
        .json(&json!({"step": "approval[0]", "payload": {"assignee": "ada"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 202, "{}", resumed.text().await.unwrap());
    let run = sandbox
        .runtime
        .wait_run_finished(&id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, piecework_core::RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.step("summary").unwrap().output,
        Some(json!("3 incidents filed"))
    );
    let mut tickets = mock.tickets();
    tickets.sort_by(|a, b| a.title.cmp(&b.title));
    let filed: Vec<(&str, Option<&str>)> = tickets
        .iter()
        .map(|t| (t.title.as_str(), t.assignee.as_deref()))
        .collect();
    assert_eq!(
        filed,
        [
            ("disk full", Some("ada")),
            ("slow page", Some("triage")),
            ("typo", Some("triage"))
        ]
    );
    // The calls to the API kept to 5 starts a second: the 5 made after the approval (one
    // update, then two creates and two updates) started at least 4 × 200 ms apart in all.
    let starts: Vec<_> = run
        .steps
        .iter()
        .filter(|s| s.piece == "my-company-api" && s.name != "file[0]")
        .map(|s| s.attempts[0].started_at)
        .collect();
    assert_eq!(starts.len(), 5);
    let span = *starts.iter().max().unwrap() - *starts.iter().min().unwrap();
    assert!(span >= chrono::Duration::milliseconds(750), "{span}");
    sandbox.stop().await.unwrap();
}

/// A webhook wait: a step hands out the run's resume URL; a POST to it (no API key, the
/// token is the proof) resumes the run once, with the body as the wait's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_wait_resumes_once_from_its_signed_url() {
    let (sandbox, base) = sandbox(None).await;
    let http = client();
    let flow = r#"
apiVersion: piecework/v1
kind: Flow
name: sign-off
trigger: { piece: webhook, trigger: catch, auth: none }
steps:
  - { name: ask, piece: data, action: set, input: { value: "{{ run.resume_url }}" } }
  - { name: sign_off, wait_for: webhook, timeout: 1h }
  - { name: done, piece: data, action: set, input: { value: "signed by {{ steps.sign_off.output.by }}" } }
"#;
    let applied = http
        .post(format!("{base}/v1/flows"))
        .body(flow)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201, "{}", applied.text().await.unwrap());
    let started: Value = http
        .post(format!("{base}/v1/webhooks/sign-off"))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["run_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let url = loop {
        let run: Value = http
            .get(format!("{base}/v1/runs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["run"]["status"] == "waiting" {
            break run["run"]["steps"][0]["output"]
                .as_str()
                .unwrap()
                .to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let path = &url[url.find("/v1/resume/").expect("a resume URL")..];
    assert!(path.len() > "/v1/resume/".len() + id.len() + 20, "{url}");
    let anonymous = reqwest::Client::new();
    // A forged or altered token is refused like an unknown one.
    for forged in [
        format!("/v1/resume/{id}.test.AAAA"),
        format!("{}x", path),
        "/v1/resume/nothing".to_owned(),
    ] {
        let refused = anonymous
            .post(format!("{base}{forged}"))
            .json(&json!({"by": "mallory"}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 404, "{forged}");
    }
    let resumed = anonymous
        .post(format!("{base}{path}"))
        .json(&json!({"by": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 202, "{}", resumed.text().await.unwrap());
    let run = sandbox
        .runtime
        .wait_run_finished(&id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, piecework_core::RunStatus::Succeeded, "{run:?}");
    assert_eq!(
        run.step("done").unwrap().output,
        Some(json!("signed by ada"))
    );
    let again = anonymous
        .post(format!("{base}{path}"))
        .json(&json!({"by": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "a run resumes once");
    sandbox.stop().await.unwrap();
}

/// A synchronous call whose run outlasts `sync_timeout` is answered 202 with the run's id,
/// its status and where to follow it, and the run goes on.
#[tokio::test]
async fn a_sync_call_that_outlasts_its_timeout_is_answered_with_a_run_to_follow() {
    let (_sandbox, base) = sandbox_with(|config| {
        config.api.api_key = None;
        config.api.sync_timeout = Duration::from_millis(300);
    })
    .await;
    let http = client();
    let flow = r#"
apiVersion: piecework/v1
kind: Flow
name: approvals
trigger: { piece: webhook, trigger: catch, auth: none }
steps:
  - { name: sign_off, wait_for: approval, timeout: 1h }
"#;
    let applied = http
        .post(format!("{base}/v1/flows"))
        .body(flow)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201, "{}", applied.text().await.unwrap());
    let response = http
        .post(format!("{base}/v1/webhooks/approvals/sync"))
        .json(&json!({"amount": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    let run_id = body["run_id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/runs/{run_id}"));
    assert_eq!(body["status_url"], location.as_str());
    assert_eq!(body["status"], "waiting", "{body}");
    let run: Value = http
        .get(format!("{base}{location}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["run"]["status"], "waiting", "{run}");
}

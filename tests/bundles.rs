//! Pieces as bundles on the production topology: real nats-server and redis-server, separate
//! api and worker processes, the `probe` test piece packed into bundles here. Each test is a
//! user's path: publish then run on a worker that never saw the bundle, drop a bundle into a
//! watched directory, pin two versions at once, yank, upgrade — and what must never happen: a
//! tampered or unsigned bundle running, a secret reaching a piece, a crashing or hanging
//! piece taking its worker down.

mod common;

use std::time::Duration;

use common::{Fleet, Target, client, drop_bundle, probe_bundle};
use piecework_bundle::{Bundle, Digest, Manifest, SigningKey};
use serde_json::{Value, json};

const FAST_RETRIES: &str = "retry: { max_attempts: 2, initial_interval: 200ms }";

fn flow(name: &str, piece: &str, action: &str, input: &str, extra: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: call, piece: {piece}, action: {action}, input: {input}{extra} }}\n"
    )
}

async fn publish(fleet: &Fleet, bytes: &[u8], signature: Option<String>) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}/v1/pieces", fleet.api))
        .body(bytes.to_vec());
    if let Some(signature) = signature {
        request = request.header("piecework-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The published file and the output of `piecework piece publish`.
fn publish_with_cli(fleet: &Fleet, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = drop_bundle(dir.path(), bytes);
    let out = common::piecework_command()
        .args(["piece", "publish"])
        .arg(&path)
        .args(["--api", &fleet.api])
        .env("PW_API_KEY", common::ADMIN_KEY)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Builds the piece in `dir` (Rust or TypeScript) with `piecework piece build` into the
/// fleet's pieces directory.
fn build_into_pieces(fleet: &Fleet, dir: &str) {
    let out = common::piecework_command()
        .args(["piece", "build", dir, "--out"])
        .arg(fleet.pieces_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run_once(fleet: &Fleet, flow: &str, body: Value) -> Value {
    let run = fleet.webhook(flow, body).await;
    fleet.finished(&run, Duration::from_secs(60)).await
}

fn output(run: &Value) -> &Value {
    &run["steps"][0]["output"]
}

#[tokio::test]
async fn a_published_bundle_runs_on_a_worker_that_never_saw_it() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    let bytes = probe_bundle("1.2.0").await;
    let printed = publish_with_cli(&fleet, &bytes);
    assert!(printed.contains("published probe 1.2.0"), "{printed}");
    // Publishing the same bundle again changes nothing.
    assert!(publish_with_cli(&fleet, &bytes).contains("already published"));

    // The worker starts after the publish, with an empty pieces directory and cache.
    fleet.start_worker("w1", &[]).await;
    fleet
        .apply(&flow(
            "echo",
            "probe@^1.2",
            "echo",
            "{ value: \"{{ trigger.body.n }}\" }",
            "",
        ))
        .await;
    let run = run_once(&fleet, "echo", json!({"n": 7})).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
    assert_eq!(output(&run)["value"], 7);
    assert_eq!(output(&run)["version"], "1.2.0");
    assert_eq!(run["steps"][0]["version"], "1.2.0");

    let versions: Value = client()
        .get(format!("{}/v1/pieces/probe/versions", fleet.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(versions["versions"][0]["source"], "registry", "{versions}");
    assert_eq!(
        versions["versions"][0]["digest"],
        Digest::of(&bytes).as_str()
    );
    assert_eq!(
        versions["versions"][0]["published"]["publisher"],
        "api:bootstrap"
    );
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit.iter().any(|e| e["action"] == "piece.publish"
            && e["resource"] == "piece/probe/1.2.0"
            && e["outcome"] == "success"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn two_versions_of_a_piece_run_side_by_side_and_runs_keep_their_pins() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &["--concurrency", "8"]).await;
    for version in ["1.0.0", "2.0.0"] {
        let (status, body) = publish(&fleet, &probe_bundle(version).await, None).await;
        assert_eq!(status, 201, "{body}");
    }
    fleet
        .apply(&flow("old", "probe@^1", "sleep", "{ ms: 500 }", ""))
        .await;
    fleet
        .apply(&flow("new", "probe@^2", "sleep", "{ ms: 500 }", ""))
        .await;
    let (old, new) = tokio::join!(
        fleet.webhook("old", json!({})),
        fleet.webhook("new", json!({}))
    );
    let old = fleet.finished(&old, Duration::from_secs(60)).await;
    let new = fleet.finished(&new, Duration::from_secs(60)).await;
    assert_eq!(output(&old)["version"], "1.0.0", "{old}");
    assert_eq!(output(&new)["version"], "2.0.0", "{new}");
}

#[tokio::test]
async fn a_bundle_dropped_into_the_pieces_directory_is_served_without_a_restart() {
    let mut fleet = Fleet::start("[pieces]\nscan_interval = \"500ms\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let refused = client()
        .post(format!("{}/v1/flows", fleet.api))
        .body(flow("dropped", "probe", "echo", "{ value: 1 }", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 422, "the piece is not there yet");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown piece `probe`"),
        "{body}"
    );

    drop_bundle(&fleet.pieces_dir(), &probe_bundle("3.1.0").await);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = client()
            .get(format!("{}/v1/pieces/probe", fleet.api))
            .send()
            .await
            .unwrap();
        if found.status().is_success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not loaded within 5s:\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet
        .apply(&flow("dropped", "probe", "echo", "{ value: 1 }", ""))
        .await;
    let run = run_once(&fleet, "dropped", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
    assert_eq!(output(&run)["version"], "3.1.0");
}

#[tokio::test]
async fn a_crashing_or_hanging_piece_fails_its_attempts_and_the_worker_carries_on() {
    let mut fleet = Fleet::start("[pieces]\ncancel_grace = \"500ms\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    publish(&fleet, &probe_bundle("1.0.0").await, None).await;
    fleet
        .apply(&flow(
            "crash",
            "probe",
            "crash",
            "{}",
            &format!(", {FAST_RETRIES}"),
        ))
        .await;
    fleet
        .apply(&flow(
            "hang",
            "probe",
            "hang",
            "{ ms: 60000 }",
            &format!(", timeout: 1s, {FAST_RETRIES}"),
        ))
        .await;
    fleet
        .apply(&flow("echo", "probe", "echo", "{ value: ok }", ""))
        .await;

    let crashed = run_once(&fleet, "crash", json!({})).await;
    assert_eq!(crashed["status"], "failed", "{crashed}");
    let attempts = crashed["steps"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "the crash is retryable: {crashed}");
    assert!(
        crashed["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("killed by signal 6"),
        "{crashed}"
    );

    let hung = run_once(&fleet, "hang", json!({})).await;
    assert_eq!(hung["status"], "failed", "{hung}");
    assert!(
        hung["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{hung}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fleet
        .logs("w1")
        .contains("piece did not stop a cancelled call; killing its process")
    {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.logs("w1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same worker, still up, runs the piece again in a fresh process.
    let fine = run_once(&fleet, "echo", json!({})).await;
    assert_eq!(fine["status"], "succeeded", "{fine}\n{}", fleet.log_tails());
}

/// Cancelling a run reaches into the piece process: the worker stops the step in flight and
/// the piece gets `cancel` for its call (the probe says so when its sleep is cut short).
#[tokio::test]
async fn cancelling_a_run_stops_its_call_inside_the_piece_process() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    publish(&fleet, &probe_bundle("1.0.0").await, None).await;
    fleet
        .apply(&flow("long", "probe", "sleep", "{ ms: 60000 }", ""))
        .await;
    let id = fleet.webhook("long", json!({})).await;
    // The call is in flight in the piece process.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !fleet.logs("w1").contains("probe: sleeping 60000 ms") {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.logs("w1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled = client()
        .post(format!("{}/v1/runs/{id}/cancel", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let asked = std::time::Instant::now();

    let deadline = asked + Duration::from_secs(10);
    let run = loop {
        let run = fleet.run(&id).await;
        if run["steps"][0]["status"] == "stopped" {
            break run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{run}\n{}",
            fleet.logs("w1")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(
        run["steps"][0]["error"],
        "stopped: the run was cancelled while the step ran"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fleet
        .logs("w1")
        .contains("probe: sleep of 60000 ms stopped after")
    {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.logs("w1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "stopped long before the 60 s sleep would have ended"
    );
}

#[tokio::test]
async fn a_piece_sees_none_of_the_workers_secrets() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    // The worker's environment has every secret a process of the fleet may hold.
    fleet.env.push(("PROBE_REGION".into(), "eu-west-1".into()));
    fleet
        .env
        .push(("PW_API_KEY".into(), "a-very-secret-api-key-000".into()));
    fleet.start_worker("w1", &[]).await;
    publish(&fleet, &probe_bundle("1.0.0").await, None).await;
    fleet.apply(&flow("env", "probe", "env", "{}", "")).await;
    let run = run_once(&fleet, "env", json!({})).await;
    let env = output(&run)["env"]
        .as_object()
        .unwrap_or_else(|| panic!("{run}"));
    let names: Vec<&String> = env.keys().collect();
    assert!(!names.iter().any(|n| n.starts_with("PW_")), "{names:?}");
    let dump = output(&run).to_string();
    for secret in [
        fleet.encryption_key.as_str(),
        "a-very-secret-api-key-000",
        &fleet.redis.url(),
        &fleet.nats.url(),
    ] {
        assert!(!dump.contains(secret), "the piece saw {secret}: {dump}");
    }
    assert!(
        !env.contains_key("PROBE_REGION"),
        "undeclared names stay out too"
    );
}

#[tokio::test]
async fn tampered_and_unsigned_bundles_are_refused_with_the_reason() {
    let key = SigningKey::parse(&SigningKey::generate("ci").unwrap()).unwrap();
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.env.push(("PW_TRUSTED_KEYS".into(), key.public_key()));
    fleet.start_worker("strict", &[]).await;

    // A damaged file is not a bundle.
    let mut damaged = probe_bundle("1.0.0").await;
    let at = damaged.len() / 2;
    damaged[at] ^= 0xff;
    let (status, body) = publish(&fleet, &damaged, None).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a piece bundle"),
        "{body}"
    );

    // Unsigned: the api (which trusts nothing) takes it; the worker, which requires a
    // signature, refuses to run it and says why.
    let unsigned = probe_bundle("1.0.0").await;
    assert_eq!(publish(&fleet, &unsigned, None).await.0, 201);
    fleet
        .apply(&flow(
            "unsigned",
            "probe@=1.0.0",
            "echo",
            "{ value: 1 }",
            "",
        ))
        .await;
    let run = run_once(&fleet, "unsigned", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("is not signed, and PW_TRUSTED_KEYS requires a signature by one of: ci"),
        "{error}"
    );
    assert_eq!(
        run["steps"][0]["attempts"].as_array().unwrap().len(),
        1,
        "never retried"
    );

    // Signed by the trusted key: it runs.
    let signed = probe_bundle("1.1.0").await;
    let signature = serde_json::to_string(&key.sign(&Digest::of(&signed))).unwrap();
    assert_eq!(publish(&fleet, &signed, Some(signature)).await.0, 201);
    fleet
        .apply(&flow("signed", "probe@=1.1.0", "echo", "{ value: 1 }", ""))
        .await;
    let run = run_once(&fleet, "signed", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());

    // Bytes swapped in the registry behind the index's back are caught by the digest.
    let honest = probe_bundle("1.2.0").await;
    let signature = serde_json::to_string(&key.sign(&Digest::of(&honest))).unwrap();
    assert_eq!(publish(&fleet, &honest, Some(signature)).await.0, 201);
    let nats = async_nats::connect(fleet.nats.url()).await.unwrap();
    let store = async_nats::jetstream::new(nats)
        .get_object_store("PW_PIECE_BUNDLES")
        .await
        .unwrap();
    let evil = probe_bundle("1.2.0")
        .await
        .into_iter()
        .rev()
        .collect::<Vec<u8>>();
    store
        .put(Digest::of(&honest).hex(), &mut evil.as_slice())
        .await
        .unwrap();
    fleet
        .apply(&flow("swapped", "probe@=1.2.0", "echo", "{ value: 1 }", ""))
        .await;
    let run = run_once(&fleet, "swapped", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("changed or tampered with"), "{error}");
}

#[tokio::test]
async fn an_api_that_trusts_keys_refuses_unsigned_publishes() {
    let key = SigningKey::parse(&SigningKey::generate("release").unwrap()).unwrap();
    let mut fleet = Fleet::start("").await;
    fleet.env.push(("PW_TRUSTED_KEYS".into(), key.public_key()));
    fleet.start_api().await;
    let (status, body) = publish(&fleet, &probe_bundle("1.0.0").await, None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["message"],
        "the bundle is not signed, and PW_TRUSTED_KEYS requires a signature by one of: release"
    );
}

/// A bundle whose metadata drops `sleep`: enough for the version check, which reads only
/// metadata (it would never start: its program describes itself differently).
async fn breaking_bundle(version: &str) -> Vec<u8> {
    let original = probe_bundle(version).await;
    let bundle = Bundle::read(&original).unwrap();
    let mut manifest: Manifest = bundle.manifest;
    manifest.piece.actions.retain(|a| a.name != "sleep");
    let dir = tempfile::tempdir().unwrap();
    Bundle::unpack(&original, &dir.path().join("x")).unwrap();
    let program = std::fs::read(dir.path().join("x/bin/probe")).unwrap();
    piecework_bundle::pack(
        &manifest,
        &[piecework_bundle::File {
            path: "bin/probe".into(),
            contents: program,
            executable: true,
        }],
    )
    .unwrap()
}

#[tokio::test]
async fn upgrades_are_checked_and_yanks_refused_while_a_flow_uses_the_version() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    publish(&fleet, &probe_bundle("1.0.0").await, None).await;
    fleet
        .apply(&flow("pinned", "probe@^1", "sleep", "{ ms: 1 }", ""))
        .await;

    // In use: cannot be yanked.
    let yank = client()
        .delete(format!("{}/v1/pieces/probe/versions/1.0.0", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(yank.status().as_u16(), 409);
    let body: Value = yank.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("used by enabled flows: pinned"),
        "{body}"
    );

    // A compatible release: the upgrade moves the flow and the run uses the new version.
    publish(&fleet, &probe_bundle("1.1.0").await, None).await;
    let upgrade = |args: &[&str]| {
        let out = common::piecework_command()
            .args([
                "flow", "upgrade", "pinned", "--piece", "probe", "--api", &fleet.api,
            ])
            .args(args)
            .env("PW_API_KEY", common::ADMIN_KEY)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = upgrade(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("call: probe 1.0.0 → 1.1.0"), "{text}");
    assert!(text.contains("applied flow `pinned` version 2"), "{text}");
    let run = run_once(&fleet, "pinned", json!({})).await;
    assert_eq!(output(&run)["version"], "1.1.0", "{run}");

    // A major release that drops the action the flow uses is refused, even when asked for.
    publish(&fleet, &breaking_bundle("2.0.0").await, None).await;
    let (ok, text) = upgrade(&["--to", "^2"]);
    assert!(!ok, "{text}");
    assert!(text.contains("has no action `sleep`"), "{text}");

    // One that drops another action breaks other flows, not this one: refused, then forced.
    let mut manifest_only = Bundle::read(&probe_bundle("2.1.0").await).unwrap().manifest;
    manifest_only.piece.actions.retain(|a| a.name != "echo");
    let dir = tempfile::tempdir().unwrap();
    let original = probe_bundle("2.1.0").await;
    Bundle::unpack(&original, &dir.path().join("x")).unwrap();
    let program = std::fs::read(dir.path().join("x/bin/probe")).unwrap();
    let dropped_echo = piecework_bundle::pack(
        &manifest_only,
        &[piecework_bundle::File {
            path: "bin/probe".into(),
            contents: program,
            executable: true,
        }],
    )
    .unwrap();
    publish(&fleet, &dropped_echo, None).await;
    let (ok, text) = upgrade(&["--to", "=2.1.0"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("breaks") && text.contains("action `echo` was removed"),
        "{text}"
    );
    let (ok, text) = upgrade(&["--to", "=2.1.0", "--force"]);
    assert!(ok, "{text}");
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "flow.upgrade.forced" && e["resource"] == "flow/pinned"),
        "{audit:?}"
    );

    // Upgraded away from, 1.0.0 is pinned by no enabled flow's latest version: it can go.
    let yank = client()
        .delete(format!("{}/v1/pieces/probe/versions/1.0.0", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(
        yank.status().as_u16(),
        200,
        "{}",
        yank.text().await.unwrap()
    );
    let gone = client()
        .get(format!("{}/v1/pieces/probe/versions/1.0.0", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 404);
}

/// Dynamic dropdowns while a flow is written: the api asks the piece, in its own process, with
/// the chosen connection, and the piece asks its system.
#[tokio::test]
async fn dropdown_options_come_from_the_piece_process_with_the_connection() {
    const KEY: &str = "options-secret-key-4711";
    let mock = piecework_mock_ticketing::MockTicketing::start("127.0.0.1:0".parse().unwrap(), KEY)
        .await
        .unwrap();
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    fleet.start_api().await;
    fleet.save_tickets_connection(KEY, &mock.url).await;
    let options = |query: &str| {
        let url = format!("{}/v1/pieces/my-company-api/props/{query}", fleet.api);
        async move {
            let response = client().get(url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (status, teams) = options("team/options?action=create_ticket&connection=tickets").await;
    assert_eq!(status, 200, "{teams}");
    assert_eq!(
        teams,
        json!({"options": [
            {"label": "Support", "value": "support"},
            {"label": "Platform", "value": "platform"},
            {"label": "Billing", "value": "billing"},
        ]})
    );
    // The refresher as a parameter; the action found by the prop alone.
    let (status, members) = options("assignee/options?connection=tickets&team=platform").await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(
        members["options"][0],
        json!({"label": "Linus", "value": "u-linus"})
    );
    let (_, waiting) = options("assignee/options?connection=tickets").await;
    assert_eq!(
        waiting,
        json!({"options": [], "placeholder": "Choose a team first", "disabled": true})
    );
    let (_, typed) =
        options("assignee/options?connection=tickets&input=%7B%22team%22%3A%22billing%22%7D").await;
    assert_eq!(
        typed["options"],
        json!([{"label": "Joan", "value": "u-joan"}])
    );
    assert_eq!(
        mock.requests()
            .iter()
            .filter(|r| r.path.starts_with("/v1/teams"))
            .count(),
        3,
        "each load asked the ticketing API once"
    );

    // Bad requests name their problem; a failing system is the piece's error, not the api's.
    let (status, body) = options("priority/options?connection=tickets").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "piece `my-company-api` has no dynamic dropdown `priority`"
    );
    let (status, body) = options("priority/options?action=create_ticket").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "prop `priority` of `create_ticket` is not a dynamic dropdown: its options are in its metadata"
    );
    let (status, body) = options("team/options?action=nope").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = options("team/options?action=create_ticket&connection=missing").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = options("assignee/options?connection=tickets&team=nope").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "piece_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("could not load the options of `assignee`"),
        "{message}"
    );
    assert!(message.contains("404"), "{message}");
    assert!(!fleet.all_logs().contains(KEY), "the key reached a log");
}

/// A TypeScript piece written with the Activepieces framework — the guide's
/// `examples/ts-pieces/my-company-api`, unmodified — builds into a `node` bundle with the same
/// `piece build` and runs on the fleet: its action files a ticket through a connection (read
/// as `context.auth.props`), puts into the flow's store, and its health check reads the
/// connection as the guide's pieces do (`context.auth.apiKey`).
#[tokio::test]
async fn a_typescript_piece_of_the_activepieces_framework_runs_on_the_fleet() {
    const KEY: &str = "ts-secret-key-4711";
    let mock = piecework_mock_ticketing::MockTicketing::start("127.0.0.1:0".parse().unwrap(), KEY)
        .await
        .unwrap();
    let mut fleet = Fleet::start("").await;
    build_into_pieces(&fleet, "examples/ts-pieces/my-company-api");
    fleet.start_api().await;
    let worker = fleet.start_worker("w1", &[]).await;
    fleet.save_tickets_connection(KEY, &mock.url).await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-tickets\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: file, piece: my-company-api, action: create_ticket, connection: tickets, input: { title: \"{{ trigger.body.title }}\", description: from a TypeScript piece } }\n  - { name: health, piece: my-company-api, action: health_check, connection: tickets }\n",
        )
        .await;
    let run = run_once(&fleet, "ts-tickets", json!({ "title": "Printer on fire" })).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
    let ticket = &run["steps"][0]["output"];
    assert!(ticket["id"].as_str().unwrap().starts_with("T-"), "{ticket}");
    assert_eq!(run["steps"][0]["version"], "1.0.0");
    assert_eq!(run["steps"][1]["output"]["status"], "healthy", "{run}");
    assert_eq!(run["steps"][1]["output"]["apiVersion"], "v1");
    // The action named `health_check` is the piece's health check, as in the guide.
    let metrics = common::get_text(&worker.replace("/readyz", "/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("piecework_piece_healthy{")
                && line.contains("my-company-api")
                && line.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        mock.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/v1/tickets"),
        "the piece called the API"
    );
    assert_eq!(mock.tickets().last().unwrap().title, "Printer on fire");
    // The connection's key went to the API and nowhere into the run.
    assert!(!run.to_string().contains(KEY));

    // A worker held to the default egress policy (no loopback): the piece's `fetch` is
    // refused by address, the step fails for good, naming the host.
    fleet.env.push(("PW_EGRESS_ALLOW".into(), String::new()));
    fleet.start_worker("guarded", &[]).await;
    fleet.kill("w1");
    let refused = run_once(&fleet, "ts-tickets", json!({ "title": "Not filed" })).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    let error = refused["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("egress refused") && error.contains("loopback"),
        "{error}"
    );
    assert_eq!(refused["steps"][0]["attempts"].as_array().unwrap().len(), 1);
    assert!(mock.tickets().iter().all(|t| t.title != "Not filed"));
}

/// Two pieces published by Activepieces on npm (`@activepieces/piece-data-mapper` and
/// `@activepieces/piece-store`), wrapped in a package that only re-exports them, build and run
/// unmodified through a flow: the mapper's output is put in the project-scoped store and read
/// back by the next run.
#[tokio::test]
async fn published_activepieces_pieces_run_unmodified_through_a_flow() {
    let mut fleet = Fleet::start("").await;
    for piece in ["ap-store", "ap-data-mapper"] {
        build_into_pieces(&fleet, &format!("examples/ts-pieces/{piece}"));
    }
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: ap-pieces\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: before, piece: ap-store, action: get, input: { key: last_order, default_value: none, store_scope: COLLECTION } }\n  - { name: map, piece: ap-data-mapper, action: advanced_mapping, input: { mapping: { order: \"{{ trigger.body.order }}\", total: \"{{ trigger.body.total }}\" } } }\n  - { name: put, piece: ap-store, action: put, input: { key: last_order, value: \"{{ steps.map.output.order }}\", store_scope: COLLECTION } }\n",
        )
        .await;
    let first = run_once(&fleet, "ap-pieces", json!({ "order": "A-1", "total": 12 })).await;
    assert_eq!(
        first["status"],
        "succeeded",
        "{first}\n{}",
        fleet.log_tails()
    );
    assert_eq!(first["steps"][0]["output"], "none");
    assert_eq!(
        first["steps"][1]["output"],
        json!({ "order": "A-1", "total": 12 })
    );
    assert_eq!(first["steps"][2]["output"], "A-1");
    let second = run_once(&fleet, "ap-pieces", json!({ "order": "A-2", "total": 3 })).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(
        second["steps"][0]["output"], "A-1",
        "the store kept the last order"
    );

    // The author's tools take the TypeScript piece's directory as they take a Rust one's.
    let tested = common::piecework_command()
        .args([
            "piece",
            "test",
            "examples/ts-pieces/ap-data-mapper",
            "advanced_mapping",
            "--input",
            r#"{"mapping": {"a": [1, 2]}}"#,
        ])
        .output()
        .unwrap();
    assert!(
        tested.status.success(),
        "{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    let output: Value = serde_json::from_slice(&tested.stdout).unwrap();
    assert_eq!(output, json!({ "a": [1, 2] }));
    let docs = common::piecework_command()
        .args(["piece", "docs", "examples/ts-pieces/ap-store"])
        .output()
        .unwrap();
    let docs = String::from_utf8_lossy(&docs.stdout);
    assert!(docs.contains("Store Scope (`store_scope`)"), "{docs}");
}

/// The TypeScript piece's polling trigger (the framework's `pollingHelper`, last-item
/// dedupe) on the fleet: the first poll is the baseline, then each new ticket starts one run,
/// with no gap reported although the helper returns only what is new.
#[tokio::test]
async fn a_typescript_polling_trigger_starts_one_run_per_new_item() {
    const KEY: &str = "ts-poll-key-4711";
    let mock = piecework_mock_ticketing::MockTicketing::start("127.0.0.1:0".parse().unwrap(), KEY)
        .await
        .unwrap();
    mock.add_ticket("old news", "low", "support");
    let mut fleet = Fleet::start("").await;
    build_into_pieces(&fleet, "examples/ts-pieces/my-company-api");
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    fleet.save_tickets_connection(KEY, &mock.url).await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-new-tickets\ntrigger: { piece: my-company-api, trigger: new_ticket, connection: tickets, poll_interval: 1s }\nsteps:\n  - { name: note, piece: data, action: set, input: { value: \"{{ trigger.title }}\" } }\n",
        )
        .await;
    let polls = || {
        mock.requests()
            .iter()
            .filter(|r| r.path == "/v1/tickets")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while polls() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mock.add_ticket("first", "high", "support");
    mock.add_ticket("second", "high", "support");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let titles = loop {
        let runs = fleet.runs_of("ts-new-tickets").await;
        let finished: Vec<Value> = runs
            .iter()
            .filter(|r| r["status"] == "succeeded")
            .cloned()
            .collect();
        if finished.len() >= 2 {
            break finished;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{runs:?}\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A few more polls: nothing runs twice, the baseline never runs.
    let seen = polls();
    while polls() < seen + 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs = fleet.runs_of("ts-new-tickets").await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    let mut notes: Vec<String> = Vec::new();
    for run in &titles {
        let run = fleet.run(run["id"].as_str().unwrap()).await;
        notes.push(run["steps"][0]["output"].as_str().unwrap().to_owned());
    }
    notes.sort();
    assert_eq!(notes, ["first", "second"]);
    let audit = fleet.stream("pw:audit").await;
    assert!(
        !audit.iter().any(|e| e["action"] == "trigger.gap"),
        "no gap reported: {audit:?}"
    );
}

/// What the Node host's context gives a framework piece — props under their own names, the
/// run's id and step, a secret text connection in both its shapes, the flow's and the
/// project's store, `files.write` — and what it refuses: `context.run.pause` fails the step
/// with an error that names it. A framework webhook trigger turns a call into runs.
#[tokio::test]
async fn a_typescript_piece_gets_the_framework_context_and_a_clear_error_for_what_is_missing() {
    let target = Target::start().await;
    const PUBLIC: &str = "https://piecework.example.internal";
    let mut fleet = Fleet::start(&format!(
        "[egress]\nmax_response_bytes = 1000\n[api]\npublic_url = \"{PUBLIC}\"\n"
    ))
    .await;
    build_into_pieces(&fleet, "tests/fixtures/ts-context");
    // Members using what the host lacks are left out; the piece loads without them.
    let metadata = common::piecework_command()
        .args(["piece", "metadata", "tests/fixtures/ts-context"])
        .output()
        .unwrap();
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let names = |kind: &str| -> Vec<String> {
        metadata[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names("actions"),
        [
            "inspect",
            "pause",
            "fetch_size",
            "http_size",
            "slow_then_call"
        ]
    );
    assert_eq!(names("triggers"), ["caught", "registered"]);
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet
        .save_connection("tok", "ts-context", json!("s3cret-token"))
        .await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-context\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: first, piece: ts-context, action: inspect, connection: tok, input: { some_value: \"{{ trigger.body.v }}\", count: 2 } }\n  - { name: second, piece: ts-context, action: inspect, connection: tok, input: { some_value: again } }\n  - { name: stop, piece: ts-context, action: pause, connection: tok }\n",
        )
        .await;
    let run = run_once(&fleet, "ts-context", json!({ "v": "hello" })).await;
    assert_eq!(run["status"], "failed", "{run}");
    let first = &run["steps"][0]["output"];
    assert_eq!(first["props"], json!({ "someValue": "hello", "count": 2 }));
    assert_eq!(first["runId"], run["id"]);
    assert_eq!(first["step"], "first");
    assert_eq!(first["flow"], "ts-context");
    assert_eq!(first["publicUrl"], format!("{PUBLIC}/"));
    assert_eq!(first["token"], "both shapes");
    assert_eq!(first["seen"], 1);
    assert_eq!(run["steps"][1]["output"]["seen"], 2, "the flow's store");
    assert!(
        first["file"]
            .as_str()
            .unwrap()
            .starts_with("data:application/octet-stream;name=hello.txt;base64,aGVsbG8="),
        "{first}"
    );
    let error = run["steps"][2]["error"].as_str().unwrap();
    assert!(
        error.contains("`context.run.pause`") && error.contains("not supported"),
        "{error}"
    );
    assert_eq!(run["steps"][2]["attempts"].as_array().unwrap().len(), 1);
    assert!(!run.to_string().contains("s3cret-token"));
    // The connection's last use is recorded (a step uses it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fleet.get("/v1/connections/tok").await["connection"]["last_used_at"].is_null() {
        assert!(std::time::Instant::now() < deadline, "no last use recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The project-scoped store is shared by the runs of every flow.
    let again = run_once(&fleet, "ts-context", json!({ "v": "x" })).await;
    assert_eq!(again["steps"][0]["output"]["everywhere"], 3);

    // `fetch` and `node:http` read no more than max_response_bytes.
    for action in ["fetch_size", "http_size"] {
        fleet
            .apply(&format!(
                "apiVersion: piecework/v1\nkind: Flow\nname: ts-fetch\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: get, piece: ts-context, action: {action}, connection: tok, input: {{ url: \"{}/big/k?bytes={{{{ trigger.body.bytes }}}}\" }} }}\n",
                target.url
            ))
            .await;
        let small = run_once(&fleet, "ts-fetch", json!({ "bytes": 100 })).await;
        assert_eq!(small["status"], "succeeded", "{action}: {small}");
        assert_eq!(small["steps"][0]["output"]["bytes"], 102, "{action}");
        let big = run_once(&fleet, "ts-fetch", json!({ "bytes": 5000 })).await;
        assert_eq!(big["status"], "failed", "{action}: {big}");
        let error = big["steps"][0]["error"].as_str().unwrap();
        assert!(
            error.contains("larger than 1000 bytes (max_response_bytes)"),
            "{action}: {error}"
        );
    }

    // A cancelled call's requests are aborted: what it would have done next never happens.
    fleet
        .apply(&format!(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-cancel\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: slow, piece: ts-context, action: slow_then_call, connection: tok, timeout: 1s, retry: {{ max_attempts: 1 }}, input: {{ slow_url: \"{url}/slow/wait?ms=3000\", then_url: \"{url}/flaky/after?fail=0\" }} }}\n",
            url = target.url
        ))
        .await;
    let run = run_once(&fleet, "ts-cancel", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(target.hits("wait").len(), 1);
    assert!(
        target.hits("after").is_empty(),
        "the cancelled call went on"
    );

    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-caught\ntrigger: { piece: ts-context, trigger: caught, connection: tok, auth: none }\nsteps:\n  - { name: note, piece: data, action: set, input: { value: \"{{ trigger.n }}\" } }\n",
        )
        .await;
    let response = client()
        .post(format!("{}/v1/webhooks/ts-caught", fleet.api))
        .json(&json!({ "items": [{ "n": 1 }, { "n": 2 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    let ids = started["run_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2, "{started}");
    for (n, id) in ids.iter().enumerate() {
        let run = fleet
            .finished(id.as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"][0]["output"], json!(n + 1));
    }

    // A trigger's onEnable runs when its flow starts listening (with the connection, the
    // flow's store and the flow's webhook URL) and onDisable when it stops; re-applying
    // the flow with the same trigger runs neither; an onEnable that throws leaves the flow
    // disabled, saying why.
    let hooked = |step: &str, refuse: bool| {
        format!(
            "apiVersion: piecework/v1\nkind: Flow\nname: ts-hooks\ntrigger: {{ piece: ts-context, trigger: registered, connection: tok, auth: none, input: {{ refuse: {refuse} }} }}\nsteps:\n  - {{ name: {step}, piece: data, action: set, input: {{ value: \"{{{{ trigger }}}}\" }} }}\n"
        )
    };
    let seen = |run: &Value| run["steps"][0]["output"].clone();
    fleet.apply(&hooked("note", false)).await;
    let run = run_once(&fleet, "ts-hooks", json!({})).await;
    let item = seen(&run);
    let url = format!("{PUBLIC}/v1/webhooks/ts-hooks");
    assert_eq!(item["webhookUrl"], url.as_str(), "{run}");
    assert_eq!(
        item["registration"],
        json!({ "url": url, "token": true }),
        "{run}"
    );
    assert_eq!(
        (item["enables"].clone(), item["disables"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(item["token"], true, "the webhook call gets the connection");
    fleet.apply(&hooked("renamed", false)).await;
    let item = seen(&run_once(&fleet, "ts-hooks", json!({})).await);
    assert_eq!(
        item["enables"], 1,
        "the same trigger stays registered: {item}"
    );
    for toggle in ["disable", "enable"] {
        let out = common::piecework_command()
            .args(["flow", toggle, "ts-hooks", "--api", &fleet.api])
            .env("PW_API_KEY", common::ADMIN_KEY)
            .output()
            .unwrap();
        assert!(out.status.success(), "{toggle}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said.trim(), format!("flow `ts-hooks` {toggle}d"));
    }
    let item = seen(&run_once(&fleet, "ts-hooks", json!({})).await);
    assert_eq!(
        (item["enables"].clone(), item["disables"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(item["registration"]["url"], url.as_str());
    let response = client()
        .post(format!("{}/v1/flows", fleet.api))
        .body(hooked("note", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error = response.text().await.unwrap();
    assert!(
        error.contains("is disabled") && error.contains("the source refused the registration"),
        "{error}"
    );
    let flow = fleet.get("/v1/flows/ts-hooks").await;
    assert_eq!(flow["flow"]["enabled"], false, "{flow}");
}

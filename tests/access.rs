//! Access control on the production topology (real nats-server and redis-server, separate api
//! and worker processes): named keys made with the CLI, every route × every role, revocation
//! seen by another api process, the audit actor, and who started a run reaching the piece.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{ADMIN_KEY, Fleet, client, drop_bundle, probe_bundle};
use piecework_api::{Access, ApiConfig};
use piecework_core::access::Role;
use serde_json::{Value, json};

fn cli(fleet: &Fleet, key: &str, args: &[&str]) -> Output {
    common::piecework_command()
        .args(args)
        .env("PW_API_URL", &fleet.api)
        .env("PW_API_KEY", key)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `piecework api-key create NAME --role ROLE` as the bootstrap admin; returns the key.
fn create_key(fleet: &Fleet, name: &str, role: Role) -> String {
    let out = cli(
        fleet,
        ADMIN_KEY,
        &["api-key", "create", name, "--role", role.as_str()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with(&format!("pwk_{name}_")), "{key}");
    key
}

/// Who may call each route, written out independently of the code: `public`, or the roles'
/// initials (admin, developer, operator, viewer). A route of the API missing here fails the
/// test, so a new route cannot ship without someone deciding who may call it.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "public"),
    ("GET", "/readyz", "public"),
    ("GET", "/openapi.json", "public"),
    ("GET", "/", "public"),
    ("GET", "/console/app.js", "public"),
    ("GET", "/console/style.css", "public"),
    ("GET", "/metrics", "adov"),
    ("POST", "/v1/webhooks/{flow}", "public"),
    ("POST", "/v1/webhooks/{flow}/sync", "public"),
    ("POST", "/v1/resume/{token}", "public"),
    ("GET", "/v1/pieces", "adov"),
    ("POST", "/v1/pieces", "ad"),
    ("GET", "/v1/pieces/{name}", "adov"),
    ("GET", "/v1/pieces/{name}/docs", "adov"),
    ("GET", "/v1/whoami", "adov"),
    ("GET", "/v1/stats", "adov"),
    ("GET", "/v1/pieces/{name}/versions", "adov"),
    ("GET", "/v1/pieces/{name}/versions/{version}", "adov"),
    ("DELETE", "/v1/pieces/{name}/versions/{version}", "ad"),
    ("GET", "/v1/pieces/{name}/props/{prop}/options", "ad"),
    ("GET", "/v1/flows", "adov"),
    ("POST", "/v1/flows", "ad"),
    ("GET", "/v1/flows/{id}", "adov"),
    ("GET", "/v1/flows/{id}/versions/{version}", "adov"),
    ("POST", "/v1/flows/{id}/enable", "ado"),
    ("POST", "/v1/flows/{id}/disable", "ado"),
    ("POST", "/v1/flows/{id}/upgrade", "ad"),
    ("POST", "/v1/flows/{id}/runs", "ado"),
    ("GET", "/v1/flows/{id}/webhook-secret", "a"),
    ("POST", "/v1/flows/{id}/webhook-secret/rotate", "a"),
    ("GET", "/v1/runs", "adov"),
    ("GET", "/v1/runs/stats", "adov"),
    ("GET", "/v1/runs/{id}", "adov"),
    ("POST", "/v1/runs/{id}/cancel", "ao"),
    ("POST", "/v1/runs/{id}/retry", "ao"),
    ("POST", "/v1/runs/{id}/resume", "ao"),
    ("GET", "/v1/audit", "adov"),
    ("GET", "/v1/connections", "adov"),
    ("POST", "/v1/connections", "ad"),
    ("GET", "/v1/connections/{name}", "adov"),
    ("DELETE", "/v1/connections/{name}", "ad"),
    ("POST", "/v1/keys/rotate", "a"),
    ("GET", "/v1/api-keys", "a"),
    ("POST", "/v1/api-keys", "a"),
    ("DELETE", "/v1/api-keys/{name}", "a"),
];

fn initial(role: Role) -> char {
    role.as_str().chars().next().unwrap()
}

/// A request that reaches `path`'s handler: placeholders filled with names that exist
/// nowhere, so no allowed call changes anything.
fn concrete(path: &str) -> String {
    path.replace("{version}", "9.9.9")
        .replace("{name}", "no-such-thing")
        .replace("{id}", "no-such-thing")
        .replace("{flow}", "no-such-thing")
        .replace("{token}", "no-such-thing")
        .replace("{prop}", "no-such-thing")
}

/// `/metrics` names flows: on the API's port it takes a key; Prometheus scrapes the api's
/// health port, which is not published, without one.
#[tokio::test]
async fn metrics_need_a_key_on_the_api_port_but_not_on_the_health_port() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    let anonymous = reqwest::Client::new();
    let on_api = anonymous
        .get(format!("{}/metrics", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(on_api.status(), 401);
    let on_health = anonymous
        .get(format!("{}/metrics", fleet.api_health))
        .send()
        .await
        .unwrap();
    assert_eq!(on_health.status(), 200);
    assert!(
        on_health
            .text()
            .await
            .unwrap()
            .contains("piecework_build_info")
    );
    for probe in ["healthz", "readyz"] {
        let status = anonymous
            .get(format!("{}/{probe}", fleet.api_health))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{probe}");
    }
}

#[tokio::test]
async fn every_route_answers_each_role_as_its_policy_says() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    let keys: Vec<(Role, String)> = Role::ALL
        .into_iter()
        .map(|role| (role, create_key(&fleet, &format!("k-{role}"), role)))
        .collect();
    let table = piecework_api::route_table(&ApiConfig::default());
    for route in &table {
        assert!(
            EXPECTED
                .iter()
                .any(|(m, p, _)| *m == route.method.as_str() && *p == route.path),
            "{} {} has no expected policy in this test: decide who may call it",
            route.method,
            route.path
        );
    }
    let anonymous = reqwest::Client::new();
    for (method, path, who) in EXPECTED {
        let route = table
            .iter()
            .find(|r| r.method.as_str() == *method && r.path == *path)
            .unwrap_or_else(|| panic!("{method} {path} is expected but not served"));
        assert_eq!(
            route.access == Access::Public,
            *who == "public",
            "{method} {path}: {:?}",
            route.access
        );
        let url = format!("{}{}", fleet.api, concrete(path));
        let send = |key: Option<&str>| {
            let mut request = anonymous
                .request(route.method.clone(), &url)
                .header("content-type", "application/json")
                .body("{}");
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            async move { request.send().await.unwrap().status().as_u16() }
        };
        let without = send(None).await;
        if *who == "public" {
            assert!(
                ![401, 403].contains(&without),
                "{method} {path}: public, yet {without}"
            );
            continue;
        }
        assert_eq!(without, 401, "{method} {path} without a key");
        let forged = send(Some("pwk_k-admin_forged")).await;
        assert_eq!(forged, 401, "{method} {path} with a forged key");
        for (role, key) in &keys {
            let status = send(Some(key)).await;
            if who.contains(initial(*role)) {
                assert!(
                    ![401, 403].contains(&status) && status < 500,
                    "{method} {path} as {role}: allowed, yet {status}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} as {role}");
            }
        }
    }
}

#[tokio::test]
async fn keys_are_named_audited_revoked_everywhere_and_start_runs_as_themselves() {
    let mut fleet = Fleet::start("").await;
    let dir = fleet.pieces_dir();
    drop_bundle(&dir, &probe_bundle("1.0.0").await);
    fleet.start_api().await;
    let other_api = fleet.start_api_as("api-2").await;
    fleet.start_worker("w1", &[]).await;

    let developer = create_key(&fleet, "ci-deploy", Role::Developer);
    let operator = create_key(&fleet, "oncall", Role::Operator);
    let listed = cli(&fleet, ADMIN_KEY, &["api-key", "list"]);
    let listed = text(&listed);
    assert!(
        listed.contains("ci-deploy") && listed.contains("developer"),
        "{listed}"
    );
    assert!(!listed.contains(&developer), "a listing never shows a key");

    // A name is taken once; roles are checked.
    let again = cli(
        &fleet,
        ADMIN_KEY,
        &["api-key", "create", "oncall", "--role", "viewer"],
    );
    assert!(
        !again.status.success() && text(&again).contains("exists"),
        "{}",
        text(&again)
    );
    let bad = cli(
        &fleet,
        ADMIN_KEY,
        &["api-key", "create", "x", "--role", "root"],
    );
    assert!(
        text(&bad).contains("unknown role \"root\""),
        "{}",
        text(&bad)
    );
    // Only admins manage keys; the error says why.
    let denied = cli(&fleet, &developer, &["api-key", "list"]);
    assert!(
        text(&denied)
            .contains("the key `ci-deploy` has the developer role, which may not manage API keys"),
        "{}",
        text(&denied)
    );

    // The developer applies a flow: the audit trail names the key.
    let flow = "apiVersion: piecework/v1\nkind: Flow\nname: who\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: me, piece: probe, action: whoami }\n";
    let applied = client()
        .post(format!("{}/v1/flows", fleet.api))
        .bearer_auth(&developer)
        .body(flow)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201, "{}", applied.text().await.unwrap());
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "flow.apply" && e["actor"] == "api:ci-deploy"),
        "{audit:?}"
    );

    // The operator starts a run by hand: the run and the piece know who.
    let started: Value = client()
        .post(format!("{}/v1/flows/who/runs", fleet.api))
        .bearer_auth(&operator)
        .json(&json!({"trigger": {"reason": "check"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run_id = started["run_id"].as_str().expect("a run id").to_owned();
    let run = fleet.finished(&run_id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
    let expected = json!({"name": "api:oncall", "role": "operator"});
    assert_eq!(run["started_by"], expected, "{run}");
    assert_eq!(run["steps"][0]["output"]["run"]["started_by"], expected);
    assert_eq!(run["trigger"], json!({"reason": "check"}));
    // A webhook's run is the webhook's.
    let hooked = fleet.webhook("who", json!({})).await;
    let run = fleet.finished(&hooked, Duration::from_secs(30)).await;
    assert_eq!(
        run["steps"][0]["output"]["run"]["started_by"],
        json!({"name": "webhook:who"})
    );

    // Revoked on one api process, refused by the other at once.
    let on_other = |key: String| {
        let url = format!("{other_api}/v1/flows");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(on_other(operator.clone()).await, 200);
    let revoked = cli(&fleet, ADMIN_KEY, &["api-key", "revoke", "oncall"]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    let deadline = Instant::now() + Duration::from_secs(1);
    while on_other(operator.clone()).await != 401 {
        assert!(
            Instant::now() < deadline,
            "still accepted 1 s after revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit.iter().any(|e| e["action"] == "api_key.revoke"
            && e["resource"] == "api-key/oncall"
            && e["actor"] == "api:bootstrap"),
        "{audit:?}"
    );
    // Neither the key nor its hash is anywhere in the API's answers or the logs.
    let keys: Value = client()
        .get(format!("{}/v1/api-keys", fleet.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!keys.to_string().contains("hash"), "{keys}");
    // The whole secret: base64url has `_` in it, so splitting at the last one would leave a
    // fragment short enough to turn up in a log by chance.
    let secret = developer.strip_prefix("pwk_ci-deploy_").unwrap();
    assert_eq!(secret.len(), 43);
    assert!(!fleet.all_logs().contains(secret));
}

/// The CLI a new user reaches for: the admin key from a mounted file, flow files applied with
/// `flow apply`, the webhook secret shown once, read again and rotated by an admin.
#[tokio::test]
async fn the_cli_reads_its_key_from_a_file_and_manages_webhook_secrets() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    let key_file = fleet.dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{ADMIN_KEY}\n")).unwrap();
    let from_file = |args: &[&str]| {
        common::piecework_command()
            .args(args)
            .env("PW_API_URL", &fleet.api)
            .env_remove("PW_API_KEY")
            .env("PW_API_KEY_FILE", &key_file)
            .output()
            .unwrap()
    };
    let flow = fleet.dir.path().join("hook.yaml");
    std::fs::write(
        &flow,
        "apiVersion: piecework/v1\nkind: Flow\nname: hook\ntrigger: { piece: webhook, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: 1 } }\n",
    )
    .unwrap();
    let applied = from_file(&["flow", "apply", flow.to_str().unwrap()]);
    let printed = text(&applied);
    assert!(applied.status.success(), "{printed}");
    assert!(
        printed.contains("applied flow `hook` version 1"),
        "{printed}"
    );
    let shown = printed.lines().last().unwrap().trim().to_owned();
    assert_eq!(shown.len(), 64, "{printed}");
    let again = text(&from_file(&["flow", "apply", flow.to_str().unwrap()]));
    assert!(
        again.contains("unchanged") && !again.contains(&shown),
        "{again}"
    );

    let read = from_file(&["flow", "webhook-secret", "hook"]);
    assert_eq!(String::from_utf8(read.stdout).unwrap().trim(), shown);
    let rotated = from_file(&["flow", "webhook-secret", "hook", "--rotate"]);
    let rotated = String::from_utf8(rotated.stdout).unwrap().trim().to_owned();
    assert!(rotated.len() == 64 && rotated != shown, "{rotated}");

    // An empty key file is an error that names the file, not a silent anonymous call.
    std::fs::write(&key_file, "\n").unwrap();
    let empty = from_file(&["flow", "webhook-secret", "hook"]);
    assert!(!empty.status.success());
    assert!(text(&empty).contains("is empty"), "{}", text(&empty));
}

/// The operator's procedure for a new encryption key, on separate processes: put the new
/// key first, `piecework key rotate`, drop the old one — and every connection, webhook
/// secret and API key still works.
#[tokio::test]
async fn rotating_the_encryption_key_reseals_everything_and_retires_the_old_key() {
    use piecework_runtime::webhooks::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
    let target = common::Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;

    // Under k1: a connection, a signed webhook flow that uses it, a named key.
    fleet
        .save_connection(
            "upstream",
            "http",
            json!({"kind": "bearer", "token": "tok-rotate-123456"}),
        )
        .await;
    let flow = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: rekeyed\ntrigger: {{ piece: webhook, trigger: catch }}\nsteps:\n  - {{ name: call, piece: http, action: send_request, connection: upstream, input: {{ url: \"{}/echo\" }} }}\n",
        target.url
    );
    let applied: Value = client()
        .post(format!("{}/v1/flows", fleet.api))
        .body(flow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = applied["webhook"]["secret"].as_str().unwrap().to_owned();
    let created = cli(
        &fleet,
        ADMIN_KEY,
        &["api-key", "create", "ci", "--role", "viewer"],
    );
    assert!(created.status.success(), "{}", text(&created));
    let ci_key = String::from_utf8(created.stdout).unwrap().trim().to_owned();

    let restart = |fleet: &mut Fleet, keys: String| {
        fleet.encryption_key = keys;
        assert!(fleet.terminate("api").success());
        assert!(fleet.terminate("w1").success());
    };
    let k1 = fleet.encryption_key.clone();
    let k2 = piecework_runtime::secrets::Keyring::generate_spec("k2");
    restart(&mut fleet, format!("{k2},{k1}"));
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;

    let rotated = cli(&fleet, ADMIN_KEY, &["key", "rotate"]);
    let report = text(&rotated);
    assert!(rotated.status.success(), "{report}");
    for expected in [
        "connections: 1 re-sealed under `k2`",
        "webhook secrets: 1 re-sealed under `k2`",
        "api key `ci` is hashed under `k1`",
        "still needed: k1",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }
    // The named key is re-hashed the first time it is used.
    let listed = reqwest::Client::new()
        .get(format!("{}/v1/runs", fleet.api))
        .bearer_auth(&ci_key)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let again = text(&cli(&fleet, ADMIN_KEY, &["key", "rotate"]));
    assert!(
        again.contains("connections: 0 re-sealed under `k2`, 1 already were")
            && again.contains("nothing needs any key but `k2`"),
        "{again}"
    );
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "keys.rotate" && e["resource"] == "keys/k2"),
        "{audit:?}"
    );

    // k1 is gone: everything still opens.
    restart(&mut fleet, k2);
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let body = br#"{"n": 1}"#.to_vec();
    let now = chrono::Utc::now().timestamp();
    let response = client()
        .post(format!("{}/v1/webhooks/rekeyed/sync", fleet.api))
        .header("content-type", "application/json")
        .header(TIMESTAMP_HEADER, now.to_string())
        .header(SIGNATURE_HEADER, sign(&secret, now, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}\n{}", fleet.log_tails());
    assert_eq!(
        answer["body"]["headers"]["authorization"], "Bearer ***",
        "the connection opened and its token was sent (and masked): {answer}"
    );
    let listed = reqwest::Client::new()
        .get(format!("{}/v1/runs", fleet.api))
        .bearer_auth(&ci_key)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200, "the re-hashed key works without k1");
}

/// The production transport: NATS and Redis behind TLS and passwords. Every process connects
/// with the CA and the passwords from its configuration, runs flows, and never logs a
/// password.
#[tokio::test]
async fn a_fleet_runs_over_tls_with_passwords_and_keeps_them_out_of_its_logs() {
    let mut fleet = Fleet::start_with(
        "",
        piecework_testkit::Options {
            tls: true,
            password: Some("transport-secret-42".into()),
        },
    )
    .await;
    assert!(fleet.redis.url().starts_with("rediss://"));
    assert!(fleet.nats.url().starts_with("tls://"));
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet
        .apply("apiVersion: piecework/v1\nkind: Flow\nname: secure\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: \"{{ trigger.body.n }}\" } }\n")
        .await;
    let id = fleet.webhook("secure", json!({"n": 7})).await;
    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"], 7);
    let doctor = common::piecework_command()
        .args(["doctor"])
        .arg("--config")
        .arg(fleet.dir.path().join("piecework.toml"))
        .env("PW_NATS_URL", fleet.nats.url())
        .env("PW_REDIS_URL", fleet.redis.url())
        .env("PW_ENCRYPTION_KEY", &fleet.encryption_key)
        .output()
        .unwrap();
    let report = text(&doctor);
    assert!(report.contains("✓ NATS at tls://***@127.0.0.1"), "{report}");
    assert!(
        report.contains("✓ Redis at rediss://***@127.0.0.1"),
        "{report}"
    );
    assert!(!report.contains("transport-secret-42"), "{report}");
    assert!(!fleet.all_logs().contains("transport-secret-42"));
}

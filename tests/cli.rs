//! The piece author's and operator's commands, run as a user runs them.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use piecework_mock_ticketing::MockTicketing;
use serde_json::{Value, json};

/// Runs the CLI with the demo piece's bundle in its pieces directory, as an operator whose
/// `PW_PIECES_DIR` holds their team's bundles.
fn piecework(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut child = common::piecework_command()
        .args(args)
        .env("PW_PIECES_DIR", common::demo_pieces())
        .env_remove("PW_ENCRYPTION_KEY")
        .env_remove("PW_REDIS_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `piecework dev` on real NATS and Redis with a known encryption key.
struct Installation {
    nats: piecework_testkit::NatsServer,
    redis: piecework_testkit::RedisServer,
    key: String,
    api: String,
    dev: std::process::Child,
}

impl Installation {
    async fn start() -> Self {
        let nats = piecework_testkit::NatsServer::start().await.unwrap();
        let redis = piecework_testkit::RedisServer::start().await.unwrap();
        let key = piecework_runtime::secrets::Keyring::generate_spec("k1");
        let port = piecework_testkit::free_port();
        let api = format!("http://127.0.0.1:{port}");
        let dev = common::piecework_command()
            .env("PW_PIECES_DIR", common::demo_pieces())
            .args([
                "dev",
                "--no-examples",
                "--quiet",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--nats", &nats.url(), "--redis", &redis.url()])
            .env("PW_ENCRYPTION_KEY", &key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        piecework_sdk::http::install_crypto_provider();
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{api}/readyz")).await.is_err() {
            assert!(Instant::now() < deadline, "dev did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            nats,
            redis,
            key,
            api,
            dev,
        }
    }
}

#[test]
fn piece_docs_follow_the_guides_layout() {
    let out = piecework(&["piece", "docs", "my-company-api"], &[], None);
    assert!(out.status.success(), "{}", text(&out));
    let docs = text(&out);
    for expected in [
        "# My Company API",
        "## Overview",
        "## Authentication",
        "- Environment (`environment`) (required), one of Production/Staging/Development",
        "### Create Ticket",
        "- Title (`title`) (required), short text: Ticket title",
        "**Output:** Ticket ID (`id`), created timestamp (`created_at`), ticket URL (`url`)",
        "## Triggers",
        "### New Ticket",
    ] {
        assert!(docs.contains(expected), "missing {expected:?} in:\n{docs}");
    }
}

#[test]
fn piece_check_fails_a_bump_too_small_for_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("released.json");
    let out = piecework(
        &[
            "piece",
            "metadata",
            "my-company-api",
            "-o",
            path.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut released: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    // The released version had an action that is gone now, and the version did not move.
    let mut archive = released["actions"][0].clone();
    archive["name"] = json!("archive_ticket");
    released["actions"].as_array_mut().unwrap().push(archive);
    std::fs::write(&path, released.to_string()).unwrap();
    let out = piecework(
        &[
            "piece",
            "check",
            "my-company-api",
            "--against",
            path.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert!(!out.status.success());
    let report = text(&out);
    assert!(
        report.contains("major  action `archive_ticket` was removed"),
        "{report}"
    );
    assert!(report.contains("needs a major bump, made none"), "{report}");

    // Released as 0.9.0 without health_check: 1.0.0 is a big enough bump.
    released["actions"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["name"] != "archive_ticket" && a["name"] != "health_check");
    released["version"] = json!("0.9.0");
    std::fs::write(&path, released.to_string()).unwrap();
    let out = piecework(
        &[
            "piece",
            "check",
            "my-company-api",
            "--against",
            path.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("minor  action `health_check` was added"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piece_test_runs_actions_locally_against_the_api() {
    let mock = MockTicketing::start("127.0.0.1:0".parse().unwrap(), "tok")
        .await
        .unwrap();
    mock.deny("mallory", "create_ticket");
    let auth = json!({"api_key": "tok", "environment": "prod", "base_url": mock.url}).to_string();
    let health = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "health_check",
            "--auth",
            "-",
        ],
        &[],
        Some(&auth),
    );
    assert!(health.status.success(), "{}", text(&health));
    let out: Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(
        (out["status"].as_str(), out["api_version"].as_str()),
        (Some("healthy"), Some("v2"))
    );

    let input = r#"{"title": "Printer on fire", "description": "Third floor", "priority": "high"}"#;
    let created = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "create_ticket",
            "--input",
            input,
            "--auth",
            &auth,
            "--owner",
            "ada",
        ],
        &[],
        None,
    );
    assert!(created.status.success(), "{}", text(&created));
    let id = serde_json::from_slice::<Value>(&created.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(mock.ticket(&id).unwrap().priority, "high");

    let denied = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "create_ticket",
            "--input",
            input,
            "--auth",
            &auth,
            "--owner",
            "mallory",
        ],
        &[],
        None,
    );
    assert!(!denied.status.success());
    assert!(
        text(&denied)
            .contains("failed (fatal): insufficient permissions: `mallory` may not create_ticket"),
        "{}",
        text(&denied)
    );
    assert!(!text(&denied).contains("tok\""), "the key is not echoed");

    let polled = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "new_ticket",
            "--auth",
            &auth,
        ],
        &[],
        None,
    );
    assert!(polled.status.success(), "{}", text(&polled));
    assert!(String::from_utf8_lossy(&polled.stdout).contains("Printer on fire"));
    let unknown = piecework(
        &["piece", "test", "my-company-api", "delete_everything"],
        &[],
        None,
    );
    assert!(text(&unknown).contains("has no action or trigger `delete_everything` (actions: create_ticket, update_ticket, health_check; triggers: new_ticket)"), "{}", text(&unknown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_managed_through_the_cli_and_used_by_piece_test() {
    let mock = MockTicketing::start("127.0.0.1:0".parse().unwrap(), "tok")
        .await
        .unwrap();
    let Installation {
        nats: _nats,
        redis,
        key,
        api,
        mut dev,
    } = Installation::start().await;
    let env = [("PW_API_URL", api.as_str())];
    let values = json!({"api_key": "tok", "environment": "dev", "base_url": mock.url}).to_string();
    let created = piecework(
        &[
            "connection",
            "create",
            "tickets",
            "--piece",
            "my-company-api",
            "--values",
            "-",
        ],
        &env,
        Some(&values),
    );
    assert!(created.status.success(), "{}", text(&created));
    assert!(text(&created).contains(
        "saved connection `tickets` for piece `my-company-api` (encrypted with key `k1`)"
    ));
    let wrong = json!({"api_key": "nope", "environment": "dev", "base_url": mock.url}).to_string();
    let refused = piecework(
        &[
            "connection",
            "create",
            "bad",
            "--piece",
            "my-company-api",
            "--values",
            &wrong,
        ],
        &env,
        None,
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("the API key was rejected"),
        "{}",
        text(&refused)
    );
    let listed = piecework(&["connection", "list"], &env, None);
    assert!(
        text(&listed).contains("tickets") && !text(&listed).contains("tok"),
        "{}",
        text(&listed)
    );

    // The stored value is sealed...
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stored: String = redis::cmd("GET")
        .arg("pw:connection:tickets")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !stored.contains("\"tok\"") && !stored.contains(&mock.url),
        "{stored}"
    );
    // ...and piece test opens it with the key, like a worker.
    let env_with_store = [
        ("PW_REDIS_URL", redis.url()),
        ("PW_ENCRYPTION_KEY", key.clone()),
    ];
    let env_with_store: Vec<(&str, &str)> = env_with_store
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let health = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "health_check",
            "--connection",
            "tickets",
        ],
        &env_with_store,
        None,
    );
    assert!(health.status.success(), "{}", text(&health));
    assert!(text(&health).contains("\"healthy\""));
    let other_key = [
        ("PW_REDIS_URL", redis.url()),
        (
            "PW_ENCRYPTION_KEY",
            piecework_runtime::secrets::Keyring::generate_spec("k2"),
        ),
    ];
    let other_key: Vec<(&str, &str)> = other_key.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let locked = piecework(
        &[
            "piece",
            "test",
            "my-company-api",
            "health_check",
            "--connection",
            "tickets",
        ],
        &other_key,
        None,
    );
    assert!(!locked.status.success());
    assert!(
        text(&locked)
            .contains("was encrypted with key `k1`, which is not configured (configured: k2)"),
        "{}",
        text(&locked)
    );

    let deleted = piecework(&["connection", "delete", "tickets"], &env, None);
    assert!(deleted.status.success(), "{}", text(&deleted));
    dev.kill().unwrap();
    dev.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_unreachable_endpoints_bad_connections_and_missing_servers() {
    let good = MockTicketing::start("127.0.0.1:0".parse().unwrap(), "tok")
        .await
        .unwrap();
    let revoked = MockTicketing::start("127.0.0.1:0".parse().unwrap(), "tok")
        .await
        .unwrap();
    let gone = MockTicketing::start("127.0.0.1:0".parse().unwrap(), "tok")
        .await
        .unwrap();
    let Installation {
        nats,
        redis,
        key,
        api,
        mut dev,
    } = Installation::start().await;
    for (name, mock) in [("tickets", &good), ("revoked", &revoked), ("gone", &gone)] {
        let values =
            json!({"api_key": "tok", "environment": "dev", "base_url": mock.url}).to_string();
        let out = piecework(
            &[
                "connection",
                "create",
                name,
                "--piece",
                "my-company-api",
                "--values",
                &values,
            ],
            &[("PW_API_URL", &api)],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    revoked.revoke("tok");
    gone.stop();

    // The mocks listen on loopback, which only an installation that allows it may call.
    let env = [
        ("PW_NATS_URL", nats.url()),
        ("PW_REDIS_URL", redis.url()),
        ("PW_ENCRYPTION_KEY", key.clone()),
        ("PW_EGRESS_ALLOW", "127.0.0.0/8".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = piecework(&["doctor"], &env, None);
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    for expected in [
        "✓ my-company-api 1.1.0 (3 actions, 1 triggers)",
        "✓ encryption keys: k1",
        "✓ NATS at",
        "✓ Redis at",
        "✓ queue default: 0 waiting",
        "✗ connection `tickets` (my-company-api) works, but over plain HTTP",
        "✗ connection `revoked` (my-company-api): the API key was rejected",
        "✗ connection `gone` (my-company-api): cannot reach",
        "fix: verify the API key, the environment, that the endpoint is reachable",
        "3 check(s) failed",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }

    let other_key = piecework_runtime::secrets::Keyring::generate_spec("k2");
    let env = [
        ("PW_NATS_URL", nats.url()),
        ("PW_REDIS_URL", redis.url()),
        ("PW_ENCRYPTION_KEY", other_key),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let report = text(&piecework(&["doctor"], &env, None));
    assert!(report.contains("✗ connection `tickets` was encrypted with key `k1`, which is not configured (configured: k2)"), "{report}");
    dev.kill().unwrap();
    dev.wait().unwrap();

    let nowhere = [
        ("PW_NATS_URL", "nats://127.0.0.1:1"),
        ("PW_REDIS_URL", "redis://127.0.0.1:1"),
        ("PW_ENCRYPTION_KEY", key.as_str()),
    ];
    let out = piecework(&["doctor"], &nowhere, None);
    let report = text(&out);
    assert!(!out.status.success());
    assert!(
        report.contains("✗ bus is not reachable: cannot connect to NATS at nats://127.0.0.1:1"),
        "{report}"
    );
    assert!(
        report
            .contains("fix: check PW_NATS_URL, that nats-server runs with -js, and firewall rules"),
        "{report}"
    );
    assert!(report.contains("✗ Redis"), "{report}");
}

#[test]
fn a_bundle_built_twice_from_the_same_source_has_the_same_digest() {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/pieces/custom/my-company-api");
    let digest_of_a_fresh_build = || {
        // A touched source file makes cargo compile the piece again, not just reuse it.
        let lib = std::path::Path::new(source).join("src/lib.rs");
        std::fs::File::options()
            .append(true)
            .open(&lib)
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        let out_dir = tempfile::tempdir().unwrap();
        let out = piecework(
            &[
                "piece",
                "build",
                source,
                "--profile",
                "dev",
                "--out",
                out_dir.path().to_str().unwrap(),
            ],
            &[],
            None,
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !text(&out).contains("warning:"),
            "one version number, no warning: {}",
            text(&out)
        );
        let inspected = piecework(
            &[
                "piece",
                "inspect",
                "--json",
                out_dir
                    .path()
                    .join("my-company-api-1.1.0.piece.tgz")
                    .to_str()
                    .unwrap(),
            ],
            &[],
            None,
        );
        let json: Value = serde_json::from_slice(&inspected.stdout).unwrap();
        json["digest"].as_str().unwrap().to_owned()
    };
    assert_eq!(digest_of_a_fresh_build(), digest_of_a_fresh_build());
}

#[test]
fn key_generate_env_prints_fresh_secrets_a_process_accepts() {
    let first = text(&piecework(&["key", "generate", "--env"], &[], None));
    let second = text(&piecework(&["key", "generate", "--env"], &[], None));
    let value = |file: &str, name: &str| {
        file.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in:\n{file}"))
            .to_owned()
    };
    let key = value(&first, "PW_ENCRYPTION_KEY");
    assert_eq!(
        piecework_runtime::secrets::Keyring::parse(&key)
            .unwrap()
            .current_id(),
        "k1"
    );
    let api_key = value(&first, "PW_API_KEY");
    assert!(api_key.len() >= 32, "{api_key}");
    assert_ne!(api_key, value(&second, "PW_API_KEY"));
    assert_ne!(key, value(&second, "PW_ENCRYPTION_KEY"));
}

/// The shipped deployment files: compose publishes the API alone on every interface and
/// refuses to start without keys; the Kubernetes example ships no Secret to fill in.
#[test]
fn deployment_files_publish_only_the_api_and_ship_no_secrets() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap())
            .unwrap();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            if name != "api" {
                assert!(
                    port.starts_with("127.0.0.1:"),
                    "{name} publishes {port} beyond this machine"
                );
            }
        }
        if matches!(name, "nats" | "redis") {
            assert!(service.get("ports").is_none(), "{name} is published");
        }
    }
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    assert!(
        text.contains("PW_API_KEY: ${PW_API_KEY:?"),
        "an empty API key is refused"
    );
    assert!(text.contains("PW_ENCRYPTION_KEY: ${PW_ENCRYPTION_KEY:?"));
    for entry in std::fs::read_dir(root.join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        let manifest = std::fs::read_to_string(&path).unwrap();
        assert!(
            !manifest.contains("kind: Secret"),
            "{} ships a Secret to fill in",
            path.display()
        );
        assert!(!manifest.contains("change-me"), "{}", path.display());
    }
}

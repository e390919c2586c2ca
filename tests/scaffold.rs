//! A new private piece, end to end as its author goes: `piece new` outside any workspace,
//! `cargo test`, `piece test`, `piece build`, `piece inspect`, then deploying the bundle to a
//! running `piecework dev` by dropping it into its pieces directory — with no change to
//! piecework and no rebuild of it. The piece compiles its own copy of the SDK's dependencies
//! (a separate target directory, kept between runs), so this is ignored in the main run;
//! `scripts/test` runs it on its own.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(dir: &Path, command: &mut Command) -> String {
    let out = command
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

#[tokio::test]
#[ignore = "compiles a piece package from scratch; scripts/test runs it separately"]
async fn a_new_piece_builds_tests_and_deploys_to_a_running_fleet_with_no_rebuild() {
    let home = tempfile::tempdir().unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/scaffold-test");
    let piecework = |args: &[&str]| {
        let mut command = common::piecework_command();
        command.args(args).env("CARGO_TARGET_DIR", &target);
        command
    };

    let out = run(home.path(), &mut piecework(&["piece", "new", "acme-crm"]));
    assert!(out.contains("created acme-crm"), "{out}");
    let piece = home.path().join("acme-crm");
    assert!(piece.join("src/main.rs").is_file());

    // Its own tests, with cargo alone (the lock file came from piecework: nothing to fetch).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut test = Command::new(&cargo);
    test.args(["test", "--offline"])
        .env("CARGO_TARGET_DIR", &target);
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_PKG_") || name == "CARGO_MANIFEST_DIR" {
            test.env_remove(name);
        }
    }
    let tested = run(&piece, &mut test);
    assert!(
        tested.contains("hello_greets_and_requires_a_name ... ok"),
        "{tested}"
    );

    // As a worker would run it: built, started, spoken to over the protocol.
    let greeting = run(
        &piece,
        &mut piecework(&[
            "piece",
            "test",
            ".",
            "hello",
            "--input",
            r#"{"name": "ada"}"#,
        ]),
    );
    assert!(
        greeting.contains("\"greeting\": \"hello, ada\""),
        "{greeting}"
    );

    let dist = home.path().join("dist");
    let built = run(
        &piece,
        &mut piecework(&[
            "piece",
            "build",
            ".",
            "--profile",
            "dev",
            "--out",
            dist.to_str().unwrap(),
        ]),
    );
    let bundle = dist.join("acme-crm-0.1.0.piece.tgz");
    assert!(built.contains("built acme-crm 0.1.0"), "{built}");
    let inspected = run(
        &piece,
        &mut piecework(&["piece", "inspect", bundle.to_str().unwrap()]),
    );
    assert!(inspected.contains("actions    hello"), "{inspected}");
    assert!(inspected.contains("bin/acme-crm"), "{inspected}");
    let docs = run(
        &piece,
        &mut piecework(&["piece", "docs", bundle.to_str().unwrap()]),
    );
    assert!(docs.contains("### Say hello"), "{docs}");

    // A running installation that has never heard of the piece, watching a pieces directory.
    let pieces = home.path().join("pieces");
    std::fs::create_dir(&pieces).unwrap();
    let port = piecework_testkit::free_port();
    let api = format!("http://127.0.0.1:{port}");
    let mut dev = piecework(&[
        "dev",
        "--no-examples",
        "--quiet",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--pieces",
        pieces.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let http = common::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{api}/readyz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "dev did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::copy(&bundle, pieces.join(".incoming")).unwrap();
    std::fs::rename(
        pieces.join(".incoming"),
        pieces.join("acme-crm-0.1.0.piece.tgz"),
    )
    .unwrap();
    let flow = "apiVersion: piecework/v1\nkind: Flow\nname: greet\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: hi, piece: acme-crm@^0.1, action: hello, input: { name: \"{{ trigger.body.name }}\" } }\n";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied = http
            .post(format!("{api}/v1/flows"))
            .body(flow)
            .send()
            .await
            .unwrap();
        if applied.status().is_success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bundle was not picked up: {}",
            applied.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer: serde_json::Value = http
        .post(format!("{api}/v1/webhooks/greet/sync"))
        .json(&serde_json::json!({"name": "grace"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer, serde_json::json!({"greeting": "hello, grace"}));

    // Edit, rebuild into the watched directory: the running dev serves the new build.
    let action = piece.join("src/actions/hello.rs");
    let source = std::fs::read_to_string(&action).unwrap();
    std::fs::write(&action, source.replace("\"hello, {}\"", "\"hi again, {}\"")).unwrap();
    run(
        &piece,
        &mut piecework(&[
            "piece",
            "build",
            ".",
            "--profile",
            "dev",
            "--out",
            pieces.to_str().unwrap(),
        ]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer: serde_json::Value = http
            .post(format!("{api}/v1/webhooks/greet/sync"))
            .json(&serde_json::json!({"name": "grace"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if answer == serde_json::json!({"greeting": "hi again, grace"}) {
            break;
        }
        assert_eq!(answer, serde_json::json!({"greeting": "hello, grace"}));
        assert!(
            Instant::now() < deadline,
            "the rebuilt bundle was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    dev.kill().unwrap();
    dev.wait().unwrap();
}

/// `piece new --typescript`: a framework piece its author runs with `piece test`, builds
/// into a `node` bundle and checks against the protocol, with no Rust involved.
#[tokio::test]
async fn a_new_typescript_piece_tests_builds_and_speaks_the_protocol() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("acme-crm");
    run(
        work.path(),
        common::piecework_command().args(["piece", "new", "acme-crm", "--typescript"]),
    );
    assert!(dir.join("src/index.ts").is_file());
    let output = run(
        &dir,
        common::piecework_command().args([
            "piece",
            "test",
            ".",
            "hello",
            "--input",
            r#"{"name": "ada"}"#,
        ]),
    );
    assert!(output.contains(r#""greeting": "hello, ada""#), "{output}");
    run(
        &dir,
        common::piecework_command().args(["piece", "build", "."]),
    );
    let bundle = dir.join("dist/acme-crm-0.1.0.piece.tgz");
    assert!(bundle.is_file());
    let inspected = run(
        &dir,
        common::piecework_command()
            .args(["piece", "inspect"])
            .arg(&bundle),
    );
    assert!(
        inspected.contains("runtime    node piece.js"),
        "{inspected}"
    );
    let checked = run(
        &dir,
        common::piecework_command()
            .args(["piece", "conformance"])
            .arg(&bundle),
    );
    assert!(checked.contains("speaks piece protocol"), "{checked}");
}

//! The web console in a real browser: headless Chromium (Debian's `chromium`, driven by
//! playwright-core from npm; `scripts/test` installs both) against a live `piecework dev`
//! that needs a key. It logs in, opens a run that failed, retries it once the service it
//! calls is back, sees it succeed, makes a connection with the piece's form, and visits
//! every page; each page's screenshot is kept in
//! `target/console-screenshots/` as the run's artifacts.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Target, client};
use serde_json::{Value, json};

const KEY: &str = "console-test-key-0123456789";

/// Sends `request` and reads the answer's JSON.
async fn fetch(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_logs_in_retries_a_failed_run_and_sees_every_page() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser = root.join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/test (npm ci in tests/browser)"
    );
    let target = Target::start().await;
    let dev = common::Dev::start_with(&[], &[("PW_API_KEY", KEY)]).await;
    let call = |method: reqwest::Method, path: &str| {
        client()
            .request(method, format!("{}{path}", dev.url))
            .bearer_auth(KEY)
    };
    // A flow whose step calls a service that is down: its run fails.
    let flow = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: console-demo\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - name: fetch\n    piece: http\n    action: send_request\n    retry: {{ max_attempts: 1 }}\n    input: {{ method: GET, url: \"{}/toggle/console\" }}\n",
        target.url
    );
    let applied = call(reqwest::Method::POST, "/v1/flows")
        .body(flow)
        .send()
        .await
        .unwrap();
    assert!(
        applied.status().is_success(),
        "{}",
        applied.text().await.unwrap()
    );
    target.set_broken("console", true);
    let started: Value = fetch(
        client()
            .post(format!("{}/v1/webhooks/console-demo", dev.url))
            .json(&json!({})),
    )
    .await;
    let run_id = started["run_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let run: Value = fetch(call(reqwest::Method::GET, &format!("/v1/runs/{run_id}"))).await;
        if run["run"]["status"] == "failed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not fail: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The service is back: the retry the user clicks succeeds.
    target.set_broken("console", false);

    // A viewer, to see the console hold to the key's role.
    let viewer: Value = fetch(
        call(reqwest::Method::POST, "/v1/api-keys")
            .json(&json!({ "name": "console-viewer", "role": "viewer" })),
    )
    .await;
    let viewer_key = viewer["key"].as_str().unwrap().to_owned();

    let screenshots = root.join("target/console-screenshots");
    let output = tokio::process::Command::new("node")
        .arg(browser.join("console.js"))
        .env("PW_CONSOLE_URL", &dev.url)
        .env("PW_CONSOLE_KEY", KEY)
        .env("PW_VIEWER_KEY", &viewer_key)
        .env("PW_FAILED_RUN", &run_id)
        .env("PW_FLOW", "console-demo")
        .env("PW_SCREENSHOTS", &screenshots)
        .output()
        .await
        .expect("node runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the browser test failed:\n{said}");
    for page in [
        "login",
        "overview",
        "runs",
        "run-failed",
        "run-retried",
        "flows",
        "flow",
        "pieces",
        "piece",
        "connections",
        "audit",
        "viewer-connections",
    ] {
        let shot = screenshots.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "no screenshot of {page}"
        );
    }
    // What the browser did went through the API, as the key's actor.
    let audit: Value = fetch(call(reqwest::Method::GET, "/v1/audit?action=run.retry")).await;
    assert_eq!(audit["entries"][0]["actor"], "api:bootstrap", "{audit}");
    // The connection the form made is there, sealed, and never shown.
    let made: Value = fetch(call(reqwest::Method::GET, "/v1/connections/console-http")).await;
    assert_eq!(made["connection"]["piece"], "http", "{made}");
    assert!(!made.to_string().contains("s3cret-console-token"));
}

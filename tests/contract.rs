//! The API keeps its OpenAPI contract: schemathesis (from PyPI; `scripts/test` installs it)
//! reads `GET /openapi.json` from a live `piecework dev` and sends it thousands of generated
//! requests — valid ones and broken ones, in sequences that follow the links between
//! operations. No request may get a server error, and every answer must match the document:
//! its status, its content type and its schema.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// schemathesis: `PW_SCHEMATHESIS`, the one `scripts/test` installs, or one on PATH.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("PW_SCHEMATHESIS") {
        return path.into();
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/schemathesis/bin/schemathesis");
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("schemathesis"))
            .find(|candidate| candidate.is_file())
    });
    on_path.expect("schemathesis is not installed: run scripts/test, which installs it from PyPI")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_as_its_openapi_document_says() {
    let schemathesis = schemathesis();
    let dev = common::Dev::start(&[]).await;
    let url = format!("{}/openapi.json", dev.url);
    // Which checks, and where they do not apply.
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/contract/schemathesis.toml");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(schemathesis)
            // Its cache of findings goes with the build, not into the checkout.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .arg("--config-file")
            .arg(config)
            .args(["run", &url, "--max-examples", "25"])
            .args(["--workers", "2", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
}

//! The BullMQ baseline: the queue layer Activepieces runs on, on the same Redis. Runs
//! `bullmq/bench.mjs` with the machine's Node.js, installing its one dependency with `npm ci`
//! the first time.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bullmq");

/// What stopped the baseline from running at all (as opposed to failing while it ran).
#[derive(Debug)]
pub struct Unavailable(pub String);

/// Moves `count` no-op jobs through BullMQ; returns the time it took, as the script measured.
pub fn run(
    redis: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Result<Duration, Unavailable>> {
    if let Err(missing) = install() {
        return Ok(Err(missing));
    }
    let output = Command::new("node")
        .current_dir(DIR)
        .args([
            "bench.mjs",
            "--redis",
            redis,
            "--jobs",
            &count.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .output()
        .context("running node bench.mjs")?;
    if !output.status.success() {
        bail!(
            "the BullMQ script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the BullMQ script printed {line:?}"))?;
    let seconds = result["seconds"]
        .as_f64()
        .context("no `seconds` in the BullMQ result")?;
    Ok(Ok(Duration::from_secs_f64(seconds)))
}

/// `npm ci` once; an absent Node.js or an unreachable registry makes the baseline unavailable.
fn install() -> Result<(), Unavailable> {
    if Path::new(DIR).join("node_modules/bullmq").exists() {
        return Ok(());
    }
    let installed = Command::new("npm")
        .current_dir(DIR)
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .output();
    match installed {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(Unavailable(format!(
            "npm ci failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
        Err(err) => Err(Unavailable(format!("npm is not available: {err}"))),
    }
}

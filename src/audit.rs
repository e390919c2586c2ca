//! `piecework audit tail`: follows the audit trail through `GET /v1/audit`.
//!
//! It pages through what matches since `--since`, then asks again every second from the last
//! entry the API looked at (its `cursor`), so filtered-out entries are never read twice.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::{AuditArgs, AuditCommand, AuditTailArgs};
use crate::client::ApiClient;

const POLL_EVERY: Duration = Duration::from_secs(1);

pub async fn run(args: AuditArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        AuditCommand::Tail(tail) => follow(&client, &tail, shutdown).await,
    }
}

async fn follow(
    client: &ApiClient,
    args: &AuditTailArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    loop {
        let page = client
            .send(reqwest::Method::GET, &path(args, after.as_deref()), None)
            .await
            .context("reading the audit trail")?;
        for entry in page["entries"].as_array().into_iter().flatten() {
            println!("{}", render(entry, args.json));
        }
        if let Some(cursor) = page["cursor"].as_str() {
            after = Some(cursor.to_owned());
        }
        if page["next"].is_string() {
            continue;
        }
        if args.no_follow {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// `/v1/audit?…`: the filters, and `since` until the first entry has been looked at.
fn path(args: &AuditTailArgs, after: Option<&str>) -> String {
    let mut query = url_query();
    match after {
        Some(after) => query.append_pair("after", after),
        None => query.append_pair("since", &args.since),
    };
    for (name, value) in [
        ("actor", &args.actor),
        ("action", &args.action),
        ("resource", &args.resource),
        ("outcome", &args.outcome),
    ] {
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    query.append_pair("limit", "500");
    format!("/v1/audit?{}", query.finish())
}

fn url_query() -> form_urlencoded::Serializer<'static, String> {
    form_urlencoded::Serializer::new(String::new())
}

/// `time  outcome  actor  action  resource  duration  [error]`.
fn render(entry: &Value, json: bool) -> String {
    if json {
        return entry.to_string();
    }
    let field = |name: &str| entry[name].as_str().unwrap_or("-").to_owned();
    let mut line = format!(
        "{}  {:<7}  {:<16}  {:<16}  {}  {}ms",
        field("time"),
        field("outcome"),
        field("actor"),
        field("action"),
        field("resource"),
        entry["duration_ms"].as_u64().unwrap_or(0),
    );
    if let Some(error) = entry["error"].as_str() {
        line.push_str("  ");
        line.push_str(error);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AuditTailArgs {
        AuditTailArgs {
            since: "10m".into(),
            actor: None,
            action: Some("run.cancel".into()),
            resource: Some("run/a b".into()),
            outcome: None,
            no_follow: true,
            json: false,
        }
    }

    #[test]
    fn the_first_request_starts_at_since_and_later_ones_after_the_cursor() {
        assert_eq!(
            path(&args(), None),
            "/v1/audit?since=10m&action=run.cancel&resource=run%2Fa+b&limit=500"
        );
        assert!(path(&args(), Some("17-0")).starts_with("/v1/audit?after=17-0&action="));
    }

    #[test]
    fn entries_render_on_one_line_with_their_error() {
        let entry = serde_json::json!({
            "time": "2026-11-25T10:00:00Z", "outcome": "failure", "actor": "api:api-key",
            "action": "run.cancel", "resource": "run/r1", "duration_ms": 3,
            "error": "run `r1` is not running"
        });
        let line = render(&entry, false);
        assert!(
            line.starts_with("2026-11-25T10:00:00Z  failure  api:api-key"),
            "{line}"
        );
        assert!(line.ends_with("3ms  run `r1` is not running"), "{line}");
    }
}

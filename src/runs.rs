//! `piecework runs`: the runs of an installation, through `GET /v1/runs` (cursor-paged),
//! `GET /v1/runs/stats`, `GET /v1/runs/{id}` and the retry and cancel routes.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::{RunFilters, RunsArgs, RunsCommand};
use crate::client::ApiClient;

const POLL_EVERY: Duration = Duration::from_secs(1);

pub async fn run(args: RunsArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        RunsCommand::List {
            filters,
            status,
            limit,
            all,
            json,
        } => {
            let mut after: Option<String> = None;
            loop {
                let mut query = filters.query();
                if let Some(status) = &status {
                    query.append_pair("status", status);
                }
                if let Some(after) = &after {
                    query.append_pair("after", after);
                }
                query.append_pair("limit", &limit.to_string());
                let page = client
                    .send(Method::GET, &format!("/v1/runs?{}", query.finish()), None)
                    .await
                    .context("listing runs")?;
                for run in page["runs"].as_array().into_iter().flatten() {
                    println!("{}", line(run, json));
                }
                match page["next"].as_str() {
                    Some(next) if all => after = Some(next.to_owned()),
                    _ => return Ok(()),
                }
            }
        }
        RunsCommand::Stats { filters, json } => {
            let path = format!("/v1/runs/stats?{}", filters.query().finish());
            let stats = client.send(Method::GET, &path, None).await?;
            if json {
                println!("{stats}");
            } else {
                for (status, count) in stats["counts"].as_object().into_iter().flatten() {
                    println!("{status:<10} {count}");
                }
                println!("{:<10} {}", "total", stats["total"]);
            }
            Ok(())
        }
        RunsCommand::Show { id, json } => {
            let shown = client
                .send(Method::GET, &format!("/v1/runs/{id}"), None)
                .await?;
            if json {
                println!("{}", shown["run"]);
            } else {
                print!("{}", detail(&shown["run"]));
            }
            Ok(())
        }
        RunsCommand::Retry { id } => {
            let retried = client
                .send(Method::POST, &format!("/v1/runs/{id}/retry"), None)
                .await?;
            println!(
                "retrying run {id} ({})",
                retried["run"]["status"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        RunsCommand::Cancel { id } => {
            client
                .send(Method::POST, &format!("/v1/runs/{id}/cancel"), None)
                .await?;
            println!("cancelled run {id}");
            Ok(())
        }
        RunsCommand::Tail { filters, json } => tail(&client, filters, json, shutdown).await,
    }
}

impl RunFilters {
    /// The filters as query parameters.
    fn query(&self) -> form_urlencoded::Serializer<'static, String> {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("flow", &self.flow),
            ("since", &self.since),
            ("until", &self.until),
            ("trigger", &self.trigger),
        ] {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
        query
    }
}

/// Prints each run that matches when it is first seen and whenever its status changes,
/// asking every second for the runs since the tail began (or `--since`).
async fn tail(
    client: &ApiClient,
    mut filters: RunFilters,
    json: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if filters.since.is_none() {
        filters.since = Some(chrono::Utc::now().to_rfc3339());
    }
    let mut seen: HashMap<String, String> = HashMap::new();
    loop {
        let mut query = filters.query();
        query.append_pair("limit", "1000");
        let page = client
            .send(Method::GET, &format!("/v1/runs?{}", query.finish()), None)
            .await
            .context("reading runs")?;
        let mut runs: Vec<&Value> = page["runs"].as_array().into_iter().flatten().collect();
        runs.reverse();
        for run in runs {
            let id = run["id"].as_str().unwrap_or_default().to_owned();
            let status = run["status"].as_str().unwrap_or_default().to_owned();
            if seen.get(&id) != Some(&status) {
                println!("{}", line(run, json));
                seen.insert(id, status);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// `created  status  flow  id  started_by  [error]`.
fn line(run: &Value, json: bool) -> String {
    if json {
        return run.to_string();
    }
    let field = |name: &str| run[name].as_str().unwrap_or("-").to_owned();
    let mut line = format!(
        "{}  {:<9}  {:<20}  {}  {}",
        field("created_at"),
        field("status"),
        field("flow_id"),
        field("id"),
        field("started_by"),
    );
    if let Some(error) = run["error"].as_str() {
        line.push_str("  ");
        line.push_str(error);
    }
    line
}

/// A run and its steps, as text.
fn detail(run: &Value) -> String {
    let field = |value: &Value, name: &str| value[name].as_str().unwrap_or("-").to_owned();
    let mut out = format!(
        "run {}  flow {} v{}  {}\nstarted {} by {}\n",
        field(run, "id"),
        field(run, "flow_id"),
        run["flow_version"],
        field(run, "status"),
        field(run, "created_at"),
        field(&run["started_by"], "name"),
    );
    if let Some(error) = run["error"].as_str() {
        out.push_str(&format!("error: {error}\n"));
    }
    for step in run["steps"].as_array().into_iter().flatten() {
        let attempts = step["attempts"].as_array().map_or(0, Vec::len);
        out.push_str(&format!(
            "  {:<24} {:<10} {} attempt(s)",
            field(step, "name"),
            field(step, "status"),
            attempts
        ));
        if let Some(branch) = step["branch"].as_str() {
            out.push_str(&format!("  branch {branch}"));
        }
        match (step.get("output"), step["error"].as_str()) {
            (_, Some(error)) => out.push_str(&format!("  error: {error}")),
            (Some(output), None) if !output.is_null() => {
                let text = output.to_string();
                let short: String = text.chars().take(120).collect();
                out.push_str(&format!("  → {short}"));
            }
            _ => {}
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_render_on_one_line_and_in_detail() {
        let run = json!({
            "id": "r1", "flow_id": "sync", "flow_version": 2, "status": "failed",
            "created_at": "2026-12-07T10:00:00Z", "started_by": {"name": "webhook:sync"},
            "error": "step `call` failed: HTTP 503",
            "steps": [
                {"name": "triage", "status": "succeeded", "branch": "then", "output": "page", "attempts": [{}]},
                {"name": "call", "status": "failed", "error": "HTTP 503", "attempts": [{}, {}]}
            ]
        });
        let summary = json!({"id": "r1", "flow_id": "sync", "status": "failed",
            "created_at": "2026-12-07T10:00:00Z", "started_by": "webhook:sync", "error": "boom"});
        assert_eq!(
            line(&summary, false),
            "2026-12-07T10:00:00Z  failed     sync                  r1  webhook:sync  boom"
        );
        let text = detail(&run);
        assert!(
            text.starts_with(
                "run r1  flow sync v2  failed\nstarted 2026-12-07T10:00:00Z by webhook:sync\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "triage                   succeeded  1 attempt(s)  branch then  → \"page\""
            ),
            "{text}"
        );
        assert!(
            text.contains("call                     failed     2 attempt(s)  error: HTTP 503"),
            "{text}"
        );
    }
}

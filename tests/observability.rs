//! Observability across real processes: one trace per run through an OTLP receiver, metrics
//! scraped from every process, the audit trail through Redis, the API and the CLI, and no
//! secret in any of them.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{Fleet, Target, client};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use piecework_mock_ticketing::MockTicketing;
use prost::Message as _;
use serde_json::{Value, json};

/// The API key of the mock ticketing API: it must never show up outside the connection.
const SECRET: &str = "sk-live-7f3a9c1e55b0-do-not-leak";

fn webhook_flow(name: &str, steps: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n{steps}"
    )
}

/// One exported span with its process's resource attributes.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    instance: String,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Exported {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// A minimal OTLP/HTTP trace receiver: what an OpenTelemetry collector does on port 4318.
#[derive(Clone, Default)]
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Exported>>>,
    /// Every request body as received, to search for secrets in the raw bytes.
    raw: Arc<Mutex<Vec<u8>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let collector = Collector {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Collector::default()
        };
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(collector.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        collector
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect()
    }

    /// Waits until the trace holds spans with all of `names`.
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Exported> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.of_trace(trace_id);
            if names
                .iter()
                .all(|n| spans.iter().any(|s| s.span.name == *n))
            {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} lacks some of {names:?}; it has {:?}",
                spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn receive(State(collector): State<Collector>, body: Bytes) -> Vec<u8> {
    collector.raw.lock().unwrap().extend_from_slice(&body);
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut spans = collector.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.unwrap_or_default().attributes;
        let service = attribute(&resource, "service.name").unwrap_or_default();
        let instance = attribute(&resource, "service.instance.id").unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Exported {
                    service: service.clone(),
                    instance: instance.clone(),
                    span,
                });
            }
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

/// The connection `tickets` to the mock ticketing API, holding [`SECRET`].
async fn save_tickets_connection(fleet: &Fleet, mock: &MockTicketing) {
    fleet
        .save_connection(
            "tickets",
            "my-company-api",
            json!({ "api_key": SECRET, "environment": "dev", "base_url": mock.url }),
        )
        .await;
}

fn one<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans.iter().filter(|s| s.span.name == name).collect();
    assert_eq!(found.len(), 1, "one span named {name:?}: {found:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_run_across_two_worker_processes_is_one_trace_and_leaks_no_secret() {
    let collector = Collector::start().await;
    let target = Target::start().await;
    let mock = MockTicketing::start("127.0.0.1:0".parse().unwrap(), SECRET)
        .await
        .unwrap();
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    fleet.env = vec![
        ("PW_OTLP_ENDPOINT".into(), collector.url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    fleet.start_api().await;
    // Different queues force the run across both processes.
    fleet
        .start_worker("wa", &["--queues", "default", "--concurrency", "2"])
        .await;
    fleet
        .start_worker("wb", &["--queues", "checks", "--concurrency", "2"])
        .await;
    save_tickets_connection(&fleet, &mock).await;
    let steps = format!(
        "  - {{ name: fetch, piece: http, action: send_request, input: {{ url: \"{url}/ok\" }} }}\n  - {{ name: check, piece: my-company-api, action: health_check, connection: tickets, queue: checks }}\n  - {{ name: shape, piece: data, action: set, input: {{ value: \"{{{{ steps.check.output.status }}}}\" }} }}\n",
        url = target.url
    );
    fleet.apply(&webhook_flow("traced", &steps)).await;

    // The caller's own trace: the run joins it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = client()
        .post(format!("{}/v1/webhooks/traced", fleet.api))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({ "hello": "world" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["trace_id"], trace_id, "{answer}");
    let run_id = answer["run_id"].as_str().unwrap().to_owned();
    let run = fleet.finished(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][2]["output"], "healthy", "{run}");
    assert!(
        run["trace"].as_str().unwrap().contains(trace_id),
        "the run keeps its traceparent: {run}"
    );

    let spans = collector
        .wait_for(
            trace_id,
            &[
                "POST /v1/webhooks/{flow}",
                "run traced",
                "step fetch",
                "step check",
                "step shape",
            ],
        )
        .await;
    // Give late publish spans a moment, then look at everything of the trace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = collector.of_trace(trace_id).into_iter().chain(spans).fold(
        Vec::<Exported>::new(),
        |mut all, s| {
            if !all.iter().any(|a| a.id() == s.id()) {
                all.push(s);
            }
            all
        },
    );

    let request = one(&spans, "POST /v1/webhooks/{flow}");
    assert_eq!(
        request.parent(),
        caller_span,
        "the incoming traceparent is honoured"
    );
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(request.service, "piecework-api");
    assert_eq!(
        request.attribute("http.route").as_deref(),
        Some("/v1/webhooks/{flow}")
    );
    assert_eq!(
        request.attribute("http.response.status_code").as_deref(),
        Some("202")
    );

    let run_span = one(&spans, "run traced");
    assert_eq!(
        run_span.parent(),
        request.id(),
        "the run is a child of the request"
    );
    assert_eq!(
        run_span.attribute("piecework.run.id").as_deref(),
        Some(run_id.as_str())
    );

    let publishes: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.span.name.starts_with("publish pw.jobs."))
        .collect();
    assert_eq!(publishes.len(), 3, "one publish per step: {publishes:#?}");
    for publish in &publishes {
        assert_eq!(publish.span.kind, SpanKind::Producer as i32);
        assert_eq!(
            publish.attribute("messaging.system").as_deref(),
            Some("nats")
        );
        assert_eq!(
            publish.attribute("messaging.operation.type").as_deref(),
            Some("send")
        );
        assert!(publish.attribute("messaging.message.id").is_some());
    }
    assert!(
        publishes.iter().any(|p| p.parent() == run_span.id()),
        "the first step is published inside the run span"
    );

    let mut instances = HashMap::new();
    for (name, piece, queue) in [
        ("step fetch", "http", "default"),
        ("step check", "my-company-api", "checks"),
        ("step shape", "data", "default"),
    ] {
        let step = one(&spans, name);
        assert_eq!(step.parent(), run_span.id(), "{name} is a child of the run");
        assert_eq!(step.span.kind, SpanKind::Consumer as i32);
        assert_eq!(step.service, "piecework-worker");
        assert_eq!(step.attribute("piecework.piece").as_deref(), Some(piece));
        assert_eq!(
            step.attribute("piecework.outcome").as_deref(),
            Some("succeeded")
        );
        assert_eq!(step.attribute("piecework.attempt").as_deref(), Some("1"));
        assert_eq!(
            step.attribute("piecework.run.id").as_deref(),
            Some(run_id.as_str())
        );
        assert!(step.attribute("piecework.piece.version").is_some());
        assert_eq!(
            step.attribute("messaging.destination.name"),
            Some(format!("pw.jobs.{queue}.step"))
        );
        assert_eq!(
            step.attribute("messaging.operation.type").as_deref(),
            Some("process")
        );
        // The receive side links to the publish that sent its job.
        let linked: Vec<String> = step.span.links.iter().map(|l| hex(&l.span_id)).collect();
        let publish = publishes
            .iter()
            .find(|p| linked.contains(&p.id()))
            .unwrap_or_else(|| panic!("{name} links to a publish span: {linked:?}"));
        assert_eq!(
            publish.attribute("messaging.destination.name"),
            Some(format!("pw.jobs.{queue}.step"))
        );
        instances.insert(name, step.instance.clone());
    }
    assert_ne!(
        instances["step fetch"], instances["step check"],
        "the steps ran in two worker processes"
    );
    let next_publish = publishes
        .iter()
        .find(|p| p.parent() == one(&spans, "step fetch").id())
        .expect("the next step is published inside the step that finished");
    assert_eq!(
        next_publish
            .attribute("messaging.destination.name")
            .as_deref(),
        Some("pw.jobs.checks.step")
    );

    // No secret in spans, logs, the audit trail or any API answer.
    let raw = String::from_utf8_lossy(&collector.raw.lock().unwrap()).into_owned();
    assert!(!raw.is_empty());
    assert!(!raw.contains(SECRET), "a span carries the secret");
    assert!(!format!("{:?}", collector.spans()).contains(SECRET));
    let logs = fleet.all_logs();
    assert!(logs.contains("worker started"), "the logs were captured");
    assert!(!logs.contains(SECRET), "a log line carries the secret");
    let audit = fleet.stream("pw:audit").await;
    assert!(audit.iter().any(|e| e["action"] == "connection.save"));
    assert!(!format!("{audit:?}").contains(SECRET));
    for path in [
        "/v1/audit?limit=1000",
        "/v1/connections",
        &format!("/v1/runs/{run_id}"),
    ] {
        let body = client()
            .get(format!("{}{path}", fleet.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(SECRET), "{path} answers with the secret");
    }
}

/// A sample of an exposition: metric name and labels.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the Prometheus/OpenMetrics text format: `name{label="value",…} value`.
fn parse_exposition(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                (name.to_owned(), parse_labels(body))
            }
        };
        samples.insert((name, labels), value);
    }
    samples
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => value.push(chars.next().unwrap().1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// Scrapes `url` until the series reaches `at_least` (scheduled work takes its ticks).
async fn wait_for_metric(url: &str, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let found = value(&scrape(url).await, name, labels);
        if found >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {found}, wanted {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scrape(url: &str) -> Samples {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    parse_exposition(&text)
}

/// The value of one series (0 when absent).
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .get(&(name.to_owned(), labels))
        .copied()
        .unwrap_or(0.0)
}

/// The sum over every series of `name` whose labels include `labels`.
fn total(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_api_worker_and_scheduler_move_as_runs_succeed_fail_and_retry() {
    let target = Target::start().await;
    let mock = MockTicketing::start("127.0.0.1:0".parse().unwrap(), SECRET)
        .await
        .unwrap();
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    let api = fleet.start_api().await;
    let worker = fleet
        .start_worker("w1", &[])
        .await
        .replace("/readyz", "/metrics");
    let scheduler = fleet
        .start_scheduler("s1")
        .await
        .replace("/readyz", "/metrics");
    let api_metrics = format!("{api}/metrics");
    let before_api = scrape(&api_metrics).await;
    let before = scrape(&worker).await;
    assert_eq!(
        value(&before, "piecework_build_info", &[("version", "0.1.0")]),
        1.0
    );

    let send = |name: &str, path: &str, attempts: u32| {
        format!(
            "  - {{ name: {name}, piece: http, action: send_request, input: {{ url: \"{}{path}\" }}, retry: {{ max_attempts: {attempts}, initial_interval: 100ms }} }}\n",
            target.url
        )
    };
    fleet
        .apply(&webhook_flow("ok", &send("get", "/ok", 1)))
        .await;
    fleet
        .apply(&webhook_flow("flaky", &send("get", "/flaky/f?fail=1", 3)))
        .await;
    target.set_broken("m", true);
    fleet
        .apply(&webhook_flow("broken", &send("get", "/toggle/m", 2)))
        .await;
    save_tickets_connection(&fleet, &mock).await;
    fleet
        .apply(&webhook_flow(
            "health",
            "  - { name: check, piece: my-company-api, action: health_check, connection: tickets }\n",
        ))
        .await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: tick\ntrigger: { piece: schedule, trigger: every, input: { interval: 1s } }\nsteps:\n  - { name: noop, piece: data, action: set, input: { value: 1 } }\n",
        )
        .await;

    for (flow, status) in [
        ("ok", "succeeded"),
        ("flaky", "succeeded"),
        ("broken", "failed"),
        ("health", "succeeded"),
    ] {
        let id = fleet.webhook(flow, json!({})).await;
        let run = fleet.finished(&id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], status, "{flow}: {run}");
    }
    // Let the scheduler tick and the tick flow run a few times.
    wait_for_metric(
        &worker,
        "piecework_runs_finished_total",
        &[("flow", "tick"), ("status", "succeeded")],
        2.0,
    )
    .await;
    // A polling flow: its first poll only sets the cursor (the ticket already there is
    // dropped as seen); a ticket filed afterwards starts one run.
    mock.add_ticket("old", "low", "core");
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: tickets\ntrigger: { piece: my-company-api, trigger: new_ticket, connection: tickets, poll_interval: 1s }\nsteps:\n  - { name: noop, piece: data, action: set, input: { value: 1 } }\n",
        )
        .await;
    wait_for_metric(
        &worker,
        "piecework_polls_total",
        &[("flow", "tickets"), ("outcome", "succeeded")],
        1.0,
    )
    .await;
    mock.add_ticket("new", "high", "core");
    wait_for_metric(
        &worker,
        "piecework_runs_finished_total",
        &[("flow", "tickets"), ("status", "succeeded")],
        1.0,
    )
    .await;

    let after = scrape(&worker).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        total(&after, name, labels) - total(&before, name, labels)
    };
    let http = [("piece", "http"), ("action", "send_request")];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = http.to_vec();
        labels.push(extra);
        labels
    };
    // ok 1, flaky 1 (after a retry), broken 0.
    assert_eq!(
        delta(
            "piecework_step_executions_total",
            &with(("outcome", "succeeded"))
        ),
        2.0
    );
    // flaky's first attempt and broken's first attempt.
    assert_eq!(
        delta(
            "piecework_step_executions_total",
            &with(("outcome", "retrying"))
        ),
        2.0
    );
    assert_eq!(
        delta(
            "piecework_step_executions_total",
            &with(("outcome", "failed"))
        ),
        1.0
    );
    assert_eq!(delta("piecework_step_retries_total", &http), 2.0);
    assert_eq!(delta("piecework_step_duration_seconds_count", &http), 5.0);
    assert!(delta("piecework_step_duration_seconds_sum", &http) > 0.0);
    let le_inf = with(("le", "+Inf"));
    assert_eq!(
        delta("piecework_step_duration_seconds_bucket", &le_inf),
        5.0
    );
    for (flow, status, count) in [
        ("ok", "succeeded", 1.0),
        ("flaky", "succeeded", 1.0),
        ("broken", "failed", 1.0),
        ("health", "succeeded", 1.0),
    ] {
        assert_eq!(
            delta(
                "piecework_runs_finished_total",
                &[("flow", flow), ("status", status)]
            ),
            count,
            "{flow}"
        );
    }
    assert!(
        delta(
            "piecework_runs_started_total",
            &[("flow", "tick"), ("trigger", "schedule")]
        ) >= 2.0
    );
    assert_eq!(
        delta(
            "piecework_jobs_terminated_total",
            &[("queue", "default"), ("reason", "failed")]
        ),
        1.0
    );
    assert!(delta("piecework_jobs_received_total", &[("kind", "step")]) >= 7.0);
    assert!(delta("piecework_jobs_received_total", &[("kind", "poll")]) >= 2.0);
    let tickets = [("flow", "tickets")];
    assert!(
        delta(
            "piecework_polls_total",
            &[("flow", "tickets"), ("outcome", "succeeded")]
        ) >= 2.0
    );
    // The baseline's ticket, then on every later poll both tickets: all seen but the new one.
    let polled = delta("piecework_poll_items_total", &tickets);
    assert!(polled >= 2.0, "{polled}");
    assert_eq!(
        delta("piecework_poll_dedupe_dropped_total", &tickets),
        polled - 1.0
    );
    assert_eq!(
        delta(
            "piecework_runs_started_total",
            &[("flow", "tickets"), ("trigger", "polling")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "piecework_piece_healthy",
            &[("piece", "my-company-api"), ("flow", "health")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "piecework_health_checks_total",
            &[("piece", "my-company-api"), ("healthy", "true")]
        ),
        1.0
    );
    // The console's figures come from the fleet's records, not one process's metrics: the
    // health check's verdict and each flow's executions, from the api.
    let stats = fleet.get("/v1/stats?since=1h").await;
    let health = &stats["health"];
    assert!(
        health
            .as_array()
            .unwrap()
            .iter()
            .any(|check| check["piece"] == "my-company-api"
                && check["flow"] == "health"
                && check["healthy"] == true),
        "{stats}"
    );
    let broken = stats["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "broken")
        .cloned()
        .unwrap_or_default();
    assert!(broken["failed"].as_u64().unwrap_or(0) >= 1, "{stats}");
    assert!(
        broken["error_rate"].as_f64().unwrap_or(0.0) > 0.0,
        "{stats}"
    );
    // Queue gauges come from the consumer at scrape time.
    assert!(
        after.contains_key(&(
            "piecework_queue_pending".to_owned(),
            BTreeMap::from([("queue".to_owned(), "default".to_owned())])
        )),
        "queue gauges are exported"
    );

    let api_after = scrape(&api_metrics).await;
    let api_delta = |name: &str, labels: &[(&str, &str)]| {
        total(&api_after, name, labels) - total(&before_api, name, labels)
    };
    for flow in ["ok", "flaky", "broken", "health"] {
        assert_eq!(
            api_delta(
                "piecework_runs_started_total",
                &[("flow", flow), ("trigger", "webhook")]
            ),
            1.0
        );
    }
    assert_eq!(
        api_delta(
            "piecework_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/webhooks/{flow}"),
                ("status", "202")
            ]
        ),
        4.0
    );
    assert!(
        api_delta(
            "piecework_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/v1/runs/{id}")]
        ) >= 4.0
    );
    // Adoption: enabled flows per piece.
    assert_eq!(
        value(&api_after, "piecework_flows_enabled", &[("piece", "http")]),
        3.0
    );
    assert_eq!(
        value(
            &api_after,
            "piecework_flows_enabled",
            &[("piece", "webhook")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &api_after,
            "piecework_flows_enabled",
            &[("piece", "schedule")]
        ),
        1.0
    );

    let scheduler_after = scrape(&scheduler).await;
    assert!(
        value(
            &scheduler_after,
            "piecework_scheduler_ticks_total",
            &[("outcome", "published")]
        ) >= 2.0
    );
    assert_eq!(
        value(&scheduler_after, "piecework_scheduled_flows", &[]),
        2.0
    );
}

#[test]
fn the_grafana_dashboard_is_valid_and_queries_only_metrics_that_exist() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/piecework.json"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert_eq!(dashboard["uid"], "piecework");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for panel in panels {
        assert!(
            panel["title"].is_string(),
            "every panel has a title: {panel}"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    assert!(
        exprs.len() >= 10,
        "the dashboard has its queries: {exprs:?}"
    );
    let names = piecework_telemetry::metrics::NAMES;
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(start) = rest.find("piecework_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| names.contains(base))
                .unwrap_or(name);
            assert!(
                names.contains(&family),
                "{expr} refers to {name}, which piecework does not export"
            );
            used.insert(family.to_owned());
            rest = &tail[end..];
        }
    }
    for wanted in [
        "piecework_step_executions_total",
        "piecework_step_duration_seconds",
        "piecework_step_retries_total",
        "piecework_queue_pending",
        "piecework_runs_finished_total",
        "piecework_flows_enabled",
    ] {
        assert!(used.contains(wanted), "the dashboard charts {wanted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_mutations_and_steps_and_filters_by_actor_action_resource_and_time()
{
    let target = Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    let api = fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let started = chrono::Utc::now();
    let steps = format!(
        "  - {{ name: one, piece: http, action: send_request, input: {{ url: \"{url}/ok\" }} }}\n  - {{ name: two, piece: data, action: set, input: {{ value: 2 }} }}\n",
        url = target.url
    );
    fleet.apply(&webhook_flow("audited", &steps)).await;
    let run_id = fleet.webhook("audited", json!({})).await;
    let run = fleet.finished(&run_id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded");
    // A refused mutation is audited as a failure.
    let refused = client()
        .post(format!("{api}/v1/runs/{run_id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    let disabled = client()
        .post(format!("{api}/v1/flows/audited/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);

    // Redis holds every field for every entry.
    let audit = fleet.stream("pw:audit").await;
    for entry in &audit {
        for field in [
            "actor",
            "action",
            "resource",
            "outcome",
            "time_ms",
            "duration_ms",
        ] {
            assert!(entry.contains_key(field), "{field} missing in {entry:?}");
        }
    }
    let find = |action: &str, resource: &str| {
        audit
            .iter()
            .find(|e| e["action"] == action && e["resource"] == resource)
            .unwrap_or_else(|| panic!("no {action} on {resource} in {audit:#?}"))
    };
    assert_eq!(find("flow.apply", "flow/audited")["actor"], "api:bootstrap");
    assert_eq!(find("webhook.receive", "flow/audited")["actor"], "webhook");
    assert_eq!(find("flow.disable", "flow/audited")["outcome"], "success");
    let cancel = find("run.cancel", &format!("run/{run_id}"));
    assert_eq!(cancel["outcome"], "failure");
    assert!(cancel["error"].contains("not running"), "{cancel:?}");
    for step in ["one", "two"] {
        let entry = find("step.execute", &format!("run/{run_id}/step/{step}"));
        assert_eq!(entry["actor"], "worker:w1");
        assert_eq!(entry["outcome"], "success");
    }

    let get = |query: String| {
        let api = api.clone();
        async move {
            let response = client()
                .get(format!("{api}/v1/audit?{query}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{query}");
            response.json::<Value>().await.unwrap()
        }
    };
    let actions = |page: &Value| -> Vec<String> {
        page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    };
    let steps = get("action=step".into()).await;
    assert_eq!(actions(&steps), ["step.execute", "step.execute"]);
    assert_eq!(actions(&get("actor=worker".into()).await).len(), 2);
    let of_run = get(format!("resource=run/{run_id}")).await;
    assert_eq!(
        actions(&of_run),
        ["step.execute", "step.execute", "run.cancel"]
    );
    let failures = get("outcome=failure".into()).await;
    assert_eq!(actions(&failures), ["run.cancel"]);
    assert_eq!(failures["entries"][0]["resource"], format!("run/{run_id}"));
    let since = started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let all = get(format!("since={since}&limit=1000")).await;
    assert_eq!(
        actions(&all),
        [
            "flow.apply",
            "webhook.receive",
            "step.execute",
            "step.execute",
            "run.cancel",
            "flow.disable"
        ]
    );
    assert!(
        get("since=1m".into()).await["entries"]
            .as_array()
            .unwrap()
            .len()
            >= 6
    );
    assert_eq!(
        actions(&get("until=2020-01-01T00:00:00Z".into()).await).len(),
        0
    );
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(
        actions(&get(format!("since={}", later.replace('+', "%2B"))).await).len(),
        0
    );
    // Paging: two at a time, following `next`, sees each entry once.
    let mut paged = Vec::new();
    let mut after = None::<String>;
    loop {
        let query = match &after {
            Some(after) => format!("limit=2&after={after}"),
            None => "limit=2".to_owned(),
        };
        let page = get(query).await;
        paged.extend(actions(&page));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, actions(&all));
    for bad in ["since=yesterday", "outcome=maybe", "limit=0", "colour=red"] {
        let response = client()
            .get(format!("{api}/v1/audit?{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    // `piecework audit tail`: what is there, then what comes.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_piecework"))
        .args([
            "audit",
            "--api",
            &api,
            "tail",
            "--no-follow",
            "--action",
            "flow",
        ])
        .env("PW_API_KEY", common::ADMIN_KEY)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8(printed.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("flow.apply") && lines[0].contains("flow/audited"));
    assert!(lines[1].contains("flow.disable"));

    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_piecework"))
        .args([
            "audit",
            "--api",
            &api,
            "tail",
            "--json",
            "--action",
            "flow.enable",
        ])
        .env("PW_API_KEY", common::ADMIN_KEY)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enabled = client()
        .post(format!("{api}/v1/flows/audited/enable"))
        .send()
        .await
        .unwrap();
    assert_eq!(enabled.status(), 200);
    let stdout = follow.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("the tail prints the new entry")
        .unwrap()
        .unwrap();
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["action"], "flow.enable");
    assert_eq!(entry["resource"], "flow/audited");
    follow.kill().await.unwrap();
}

/// The HTTP status of `url`, 0 when it does not answer.
async fn status_of(url: &str) -> u16 {
    client()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_for_status(fleet: &Fleet, url: &str, wanted: u16, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while status_of(url).await != wanted {
        assert!(
            Instant::now() < deadline,
            "{url} never answered {wanted} ({why}):\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_scheduler_are_alive_but_not_ready_while_redis_is_away() {
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    let api = fleet.start_api().await;
    let scheduler = fleet.start_scheduler("s1").await;
    let api_ready = format!("{api}/readyz");
    assert_eq!(status_of(&api_ready).await, 200);
    assert_eq!(status_of(&scheduler).await, 200);

    fleet.redis.stop().await;
    wait_for_status(&fleet, &api_ready, 503, "Redis is down").await;
    wait_for_status(&fleet, &scheduler, 503, "Redis is down").await;
    let body: Value = client()
        .get(&api_ready)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["bus"], "ok");
    assert_ne!(body["store"], "ok", "{body}");
    // Alive all the while: an orchestrator must not restart them for a dependency's outage.
    assert_eq!(status_of(&format!("{api}/healthz")).await, 200);
    assert_eq!(
        status_of(&scheduler.replace("/readyz", "/healthz")).await,
        200
    );

    fleet.redis.restart().await.unwrap();
    wait_for_status(&fleet, &api_ready, 200, "Redis is back").await;
    wait_for_status(&fleet, &scheduler, 200, "Redis is back").await;
}

/// Every string in Redis: each key's name and contents, whatever its type.
async fn redis_dump(fleet: &Fleet) -> String {
    use redis::AsyncCommands as _;
    let mut conn = fleet.redis().await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let contents = match kind.as_str() {
            "string" => conn.get::<_, String>(&key).await.unwrap(),
            "hash" => format!("{:?}", conn.hgetall::<_, Vec<String>>(&key).await.unwrap()),
            "set" => format!("{:?}", conn.smembers::<_, Vec<String>>(&key).await.unwrap()),
            "zset" => format!(
                "{:?}",
                conn.zrange::<_, Vec<String>>(&key, 0, -1).await.unwrap()
            ),
            "list" => format!(
                "{:?}",
                conn.lrange::<_, Vec<String>>(&key, 0, -1).await.unwrap()
            ),
            "stream" => {
                let entries: redis::Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                format!("{entries:?}")
            }
            other => panic!("key {key} of unexpected type {other}"),
        };
        dump.push_str(&key);
        dump.push('\n');
        dump.push_str(&contents);
        dump.push('\n');
    }
    dump
}

/// A connection's token that upstreams echo back — in a response body and in a 400 — must
/// reach no sink: not the webhook's reply, the run, the audit trail, any log, Redis, any NATS
/// message, or the exported spans. It is masked, not dropped: the step's record says `***`.
#[tokio::test]
async fn a_secret_echoed_by_an_upstream_reaches_no_sink() {
    const CANARY: &str = "canary-tok-51d0c8e2a9f4";
    let collector = Collector::start().await;
    let target = Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.env = vec![
        ("PW_OTLP_ENDPOINT".into(), collector.url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    // Everything published on NATS from now on, JetStream and KV included.
    let nats = async_nats::connect(fleet.nats.url()).await.unwrap();
    let mut everything = nats.subscribe(">").await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(message) = everything.next().await {
                let mut seen = seen.lock().unwrap();
                seen.extend_from_slice(message.subject.as_bytes());
                seen.extend_from_slice(&message.payload);
                for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
                    seen.extend_from_slice(name.to_string().as_bytes());
                    for value in values {
                        seen.extend_from_slice(value.as_str().as_bytes());
                    }
                }
            }
        })
    };
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet
        .save_connection("canary", "http", json!({"kind": "bearer", "token": CANARY}))
        .await;
    fleet
        .apply(&webhook_flow(
            "canary",
            "  - { name: call, piece: http, action: send_request, connection: canary, input: { url: \"{{ trigger.body.url }}\" }, retry: { max_attempts: 1 } }\n",
        ))
        .await;

    // An upstream that echoes the request's headers: the output would carry the token.
    let reply = client()
        .post(format!("{}/v1/webhooks/canary/sync", fleet.api))
        .json(&json!({"url": format!("{}/echo", target.url)}))
        .send()
        .await
        .unwrap();
    let echoed_run = reply.headers()["x-piecework-run-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let reply = reply.text().await.unwrap();
    assert!(
        reply.contains("\"authorization\":\"Bearer ***\""),
        "{reply}"
    );
    // An upstream whose 400 quotes the credentials: the error would carry it.
    let failed = client()
        .post(format!("{}/v1/webhooks/canary/sync", fleet.api))
        .json(&json!({"url": format!("{}/reject", target.url)}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        failed.contains("invalid credentials: Bearer ***"),
        "{failed}"
    );
    let run = fleet.run(&echoed_run).await;
    assert_eq!(
        run["steps"][0]["output"]["body"]["headers"]["authorization"], "Bearer ***",
        "{run}"
    );

    // Let the spans of both runs reach the collector.
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector
        .spans()
        .iter()
        .filter(|s| s.span.name.starts_with("step"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no step spans exported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sinks: Vec<(&str, String)> = vec![
        ("sync webhook replies", format!("{reply}{failed}")),
        ("the runs", format!("{run}")),
    ];
    for path in ["/v1/runs", "/v1/audit?since=1h", "/v1/connections"] {
        let answer = client()
            .get(format!("{}{path}", fleet.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sinks.push(("an API answer", answer));
    }
    sinks.push(("a process log", fleet.all_logs()));
    sinks.push(("Redis", redis_dump(&fleet).await));
    let raw = collector.raw.lock().unwrap().clone();
    assert!(!raw.is_empty());
    sinks.push((
        "the exported spans",
        String::from_utf8_lossy(&raw).into_owned(),
    ));
    recorder.abort();
    let published = seen.lock().unwrap().clone();
    assert!(!published.is_empty(), "NATS traffic was recorded");
    sinks.push(("NATS", String::from_utf8_lossy(&published).into_owned()));
    for (sink, text) in &sinks {
        assert!(!text.contains(CANARY), "the canary reached {sink}");
    }
}

/// A sub-flow's run is part of its parent's trace: its run span is a child of the sub-flow
/// step's span, and its steps are children of its run, though another worker runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subflow_run_is_traced_under_the_step_that_started_it() {
    let collector = Collector::start().await;
    let mut fleet = Fleet::start("[scheduler]\ntimer_poll = \"1s\"\n").await;
    fleet.env = vec![
        ("PW_OTLP_ENDPOINT".into(), collector.url.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_worker("w2", &[]).await;
    fleet
        .apply(&webhook_flow(
            "child",
            "  - { name: double, piece: data, action: set, input: { value: \"{{ trigger.n * 2 }}\" } }\n",
        ))
        .await;
    fleet
        .apply(&webhook_flow(
            "parent",
            "  - { name: call, subflow: child, input: { n: \"{{ trigger.body.n }}\" } }\n  - { name: after, piece: data, action: set, input: { value: \"{{ steps.call.output }}\" } }\n",
        ))
        .await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = client()
        .post(format!("{}/v1/webhooks/parent", fleet.api))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({ "n": 21 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    let run = fleet
        .finished(answer["run_id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"], 42, "{run}");

    let spans = collector
        .wait_for(
            trace_id,
            &[
                "run parent",
                "step call",
                "run child",
                "step double",
                "step after",
            ],
        )
        .await;
    let step_call: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.span.name == "step call")
        .collect();
    let child_run = one(&spans, "run child");
    assert!(
        step_call.iter().any(|s| s.id() == child_run.parent()),
        "the child run is a child of the step that started it: {child_run:#?}"
    );
    assert_eq!(one(&spans, "step double").parent(), child_run.id());
    assert!(spans.iter().all(|s| s.trace_id() == trace_id));
}

//! Every metric piecework exports, by name, with its labels: the one place to look them up.
//!
//! Each process owns one [`Metrics`] (the `Runtime` holds it) and serves it at `/metrics` in
//! the OpenMetrics text format, which Prometheus scrapes natively. Every process registers
//! every family, so a dashboard query never refers to a name that does not exist; a family a
//! role never touches simply has no samples there.
//!
//! Labels are bounded: piece, action, piece version, flow, queue, outcome, HTTP route (the
//! matched pattern, never the path). Run ids, connection names and error messages never become
//! labels.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Names of the exported series (as Prometheus sees them: counters end in `_total`, histograms
/// add `_bucket`, `_sum` and `_count`). The dashboard and the tests check against this list.
pub const NAMES: &[&str] = &[
    "piecework_build_info",
    "piecework_step_executions_total",
    "piecework_step_duration_seconds",
    "piecework_step_retries_total",
    "piecework_runs_started_total",
    "piecework_runs_finished_total",
    "piecework_trigger_items_held_total",
    "piecework_attempts_lost_total",
    "piecework_job_publish_failures_total",
    "piecework_outbox_relayed_total",
    "piecework_poll_gaps_total",
    "piecework_polls_total",
    "piecework_poll_items_total",
    "piecework_poll_dedupe_dropped_total",
    "piecework_jobs_received_total",
    "piecework_jobs_terminated_total",
    "piecework_jobs_infra_retries_total",
    "piecework_jobs_in_flight",
    "piecework_queue_pending",
    "piecework_queue_ack_pending",
    "piecework_queue_redelivered",
    "piecework_flows_enabled",
    "piecework_piece_healthy",
    "piecework_health_checks_total",
    "piecework_scheduler_ticks_total",
    "piecework_scheduled_flows",
    "piecework_http_requests_total",
    "piecework_http_request_duration_seconds",
    "piecework_webhook_refused_total",
];

/// How a step attempt ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StepOutcome {
    succeeded,
    retrying,
    failed,
    /// Stopped mid-attempt because the run ended (cancelled, past its timeout).
    stopped,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RunOutcome {
    succeeded,
    failed,
    cancelled,
}

/// What started a run.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TriggerKind {
    webhook,
    polling,
    schedule,
    /// Started through the API (`POST /v1/flows/{id}/runs`).
    manual,
}

impl TriggerKind {
    pub const ALL: [TriggerKind; 4] = [
        TriggerKind::webhook,
        TriggerKind::polling,
        TriggerKind::schedule,
        TriggerKind::manual,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::webhook => "webhook",
            TriggerKind::polling => "polling",
            TriggerKind::schedule => "schedule",
            TriggerKind::manual => "manual",
        }
    }

    /// The kind [`TriggerKind::as_str`] names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// How a poll ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PollOutcome {
    succeeded,
    retrying,
    failed,
    /// Another worker held the flow's poll lease.
    skipped,
}

/// Which job a delivery carried.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum JobKind {
    poll,
    step,
    unknown,
}

/// Why a job was terminated rather than acked.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TermReason {
    /// A malformed message or one naming things that do not exist.
    poison,
    /// The step failed for good (fatal error or last attempt).
    failed,
    /// Its bookkeeping kept failing (store or bus errors) past `[worker] max_infra_retries`.
    gave_up,
}

/// What happened to a scheduler tick.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TickOutcome {
    published,
    /// Another scheduler published the same tick first.
    duplicate,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub piece: String,
    pub action: String,
    pub version: String,
    pub outcome: StepOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub piece: String,
    pub action: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunStartLabels {
    pub flow: String,
    pub trigger: TriggerKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunEndLabels {
    pub flow: String,
    pub status: RunOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub flow: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub flow: String,
    pub outcome: PollOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub queue: String,
    pub kind: JobKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TermLabels {
    pub queue: String,
    pub reason: TermReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PieceLabels {
    pub piece: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub piece: String,
    pub flow: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthCheckLabels {
    pub piece: String,
    pub healthy: bool,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TickLabels {
    pub outcome: TickOutcome,
}

/// Why a webhook call was refused. Not by flow: anonymous callers choose the flow name, and
/// must not be able to grow the metrics.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WebhookRefusal {
    unknown_flow,
    disabled,
    not_webhook,
    missing,
    stale,
    wrong,
    /// Beyond the process's total webhook rate.
    rate_limited,
    /// Beyond the flow's rate (the caller was admitted).
    flow_rate_limited,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookRefusedLabels {
    pub reason: WebhookRefusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The matched route pattern (`/v1/runs/{id}`), or `unmatched`.
    pub route: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Step and request durations: 1 ms to ~65 s.
fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

/// Every metric of a process. Cheap to update from any task; share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Step attempts by piece, action, piece version and outcome.
    pub step_executions: Family<StepLabels, Counter>,
    /// How long step attempts took, by piece and action.
    pub step_duration: HistogramFamily<ActionLabels>,
    /// Attempts that will be retried, by piece and action.
    pub step_retries: Family<ActionLabels, Counter>,
    /// Runs created, by flow and what started them.
    pub runs_started: Family<RunStartLabels, Counter>,
    /// Runs ended, by flow and final status.
    pub runs_finished: Family<RunEndLabels, Counter>,
    /// Trigger items a flow's `debounce` held back, by flow (a call retried with the same
    /// `Idempotency-Key` too); each group of them starts one run (in `runs_started`).
    pub trigger_items_held: Family<FlowLabels, Counter>,
    /// Step attempts whose worker stopped before recording them (found on redelivery), by
    /// flow.
    pub attempts_lost: Family<FlowLabels, Counter>,
    /// Step jobs of a run's start or retry that could not be published (the bus was away
    /// or did not acknowledge), by queue: they wait in the store's outbox for the relay.
    pub job_publish_failures: Family<QueueLabels, Counter>,
    /// Step jobs the outbox relay published for a publisher that could not, by queue.
    pub outbox_relayed: Family<QueueLabels, Counter>,
    /// Polls that did not reach back to the last item emitted before, by flow.
    pub poll_gaps: Family<FlowLabels, Counter>,
    /// Polls of polling triggers, by flow and outcome.
    pub polls: Family<PollLabels, Counter>,
    /// Items polling triggers returned, before deduplication.
    pub poll_items: Family<FlowLabels, Counter>,
    /// Items dropped as already seen by the dedupe strategy.
    pub poll_dedupe_dropped: Family<FlowLabels, Counter>,
    /// Deliveries taken from a queue.
    pub jobs_received: Family<JobLabels, Counter>,
    /// Deliveries terminated (never redelivered).
    pub jobs_terminated: Family<TermLabels, Counter>,
    /// Deliveries put back because the store or the bus failed while handling them.
    pub jobs_infra_retries: Family<JobLabels, Counter>,
    /// Deliveries being handled right now.
    pub jobs_in_flight: Family<QueueLabels, Gauge>,
    /// Jobs in the queue not yet delivered (from the consumer; refreshed at scrape).
    pub queue_pending: Family<QueueLabels, Gauge>,
    /// Jobs delivered and not yet settled, fleet-wide (from the consumer).
    pub queue_ack_pending: Family<QueueLabels, Gauge>,
    /// Jobs currently redelivered at least once (from the consumer).
    pub queue_redelivered: Family<QueueLabels, Gauge>,
    /// Adoption: enabled flows using each piece (trigger or step).
    pub flows_enabled: Family<PieceLabels, Gauge>,
    /// The last health check action's verdict per piece and flow (1 healthy, 0 not).
    pub piece_healthy: Family<HealthLabels, Gauge>,
    /// Health check actions run, by piece and verdict.
    pub health_checks: Family<HealthCheckLabels, Counter>,
    /// Scheduler ticks by outcome.
    pub scheduler_ticks: Family<TickLabels, Counter>,
    /// Flows the scheduler is ticking.
    pub scheduled_flows: Gauge,
    /// API requests by method, route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// API request durations by method and route.
    pub http_request_duration: HistogramFamily<HttpRouteLabels>,
    /// Webhook calls refused (unknown, disabled or not a webhook flow; bad credentials).
    pub webhook_refused: Family<WebhookRefusedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("piecework");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The piecework version running", build_info);
        let metrics = Self {
            step_executions: Family::default(),
            step_duration: Family::new_with_constructor(duration_histogram),
            step_retries: Family::default(),
            runs_started: Family::default(),
            runs_finished: Family::default(),
            trigger_items_held: Family::default(),
            attempts_lost: Family::default(),
            job_publish_failures: Family::default(),
            outbox_relayed: Family::default(),
            poll_gaps: Family::default(),
            polls: Family::default(),
            poll_items: Family::default(),
            poll_dedupe_dropped: Family::default(),
            jobs_received: Family::default(),
            jobs_terminated: Family::default(),
            jobs_infra_retries: Family::default(),
            jobs_in_flight: Family::default(),
            queue_pending: Family::default(),
            queue_ack_pending: Family::default(),
            queue_redelivered: Family::default(),
            flows_enabled: Family::default(),
            piece_healthy: Family::default(),
            health_checks: Family::default(),
            scheduler_ticks: Family::default(),
            scheduled_flows: Gauge::default(),
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(duration_histogram),
            webhook_refused: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        let m = &metrics;
        r.register(
            "step_executions",
            "Step attempts by piece, action, piece version and outcome",
            m.step_executions.clone(),
        );
        r.register(
            "step_duration_seconds",
            "How long step attempts took",
            m.step_duration.clone(),
        );
        r.register(
            "step_retries",
            "Step attempts that will be retried",
            m.step_retries.clone(),
        );
        r.register(
            "runs_started",
            "Runs created, by flow and trigger kind",
            m.runs_started.clone(),
        );
        r.register(
            "runs_finished",
            "Runs ended, by flow and final status",
            m.runs_finished.clone(),
        );
        r.register(
            "poll_gaps",
            "Polls that did not reach back to the last item emitted before, by flow",
            m.poll_gaps.clone(),
        );
        r.register(
            "attempts_lost",
            "Step attempts whose worker stopped before recording them, by flow",
            m.attempts_lost.clone(),
        );
        r.register(
            "job_publish_failures",
            "Step jobs of a run's start or retry that could not be published, left in the outbox, by queue",
            m.job_publish_failures.clone(),
        );
        r.register(
            "outbox_relayed",
            "Step jobs the outbox relay published for a publisher that could not, by queue",
            m.outbox_relayed.clone(),
        );
        r.register(
            "trigger_items_held",
            "Trigger items held back by a flow's debounce, by flow",
            m.trigger_items_held.clone(),
        );
        r.register(
            "polls",
            "Polls of polling triggers by outcome",
            m.polls.clone(),
        );
        r.register(
            "poll_items",
            "Items returned by polling triggers before deduplication",
            m.poll_items.clone(),
        );
        r.register(
            "poll_dedupe_dropped",
            "Polled items dropped as already seen",
            m.poll_dedupe_dropped.clone(),
        );
        r.register(
            "jobs_received",
            "Deliveries taken from a queue",
            m.jobs_received.clone(),
        );
        r.register(
            "jobs_terminated",
            "Deliveries terminated instead of acked",
            m.jobs_terminated.clone(),
        );
        r.register(
            "jobs_infra_retries",
            "Deliveries put back because the store or the bus failed while handling them",
            m.jobs_infra_retries.clone(),
        );
        r.register(
            "jobs_in_flight",
            "Deliveries this worker is handling",
            m.jobs_in_flight.clone(),
        );
        r.register(
            "queue_pending",
            "Jobs waiting in the queue (consumer info)",
            m.queue_pending.clone(),
        );
        r.register(
            "queue_ack_pending",
            "Jobs delivered and not yet settled, fleet-wide (consumer info)",
            m.queue_ack_pending.clone(),
        );
        r.register(
            "queue_redelivered",
            "Jobs currently redelivered at least once (consumer info)",
            m.queue_redelivered.clone(),
        );
        r.register(
            "flows_enabled",
            "Enabled flows using each piece",
            m.flows_enabled.clone(),
        );
        r.register(
            "piece_healthy",
            "Verdict of the last health check action (1 healthy, 0 unhealthy)",
            m.piece_healthy.clone(),
        );
        r.register(
            "health_checks",
            "Health check actions run, by verdict",
            m.health_checks.clone(),
        );
        r.register(
            "scheduler_ticks",
            "Scheduler ticks by outcome",
            m.scheduler_ticks.clone(),
        );
        r.register(
            "scheduled_flows",
            "Flows the scheduler is ticking",
            m.scheduled_flows.clone(),
        );
        r.register(
            "http_requests",
            "API requests by method, route and status",
            m.http_requests.clone(),
        );
        r.register(
            "webhook_refused",
            "Webhook calls refused, by reason (they are not audited one by one)",
            m.webhook_refused.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "API request durations",
            m.http_request_duration.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The OpenMetrics text exposition of every metric ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a step attempt.
    pub fn step_attempted(
        &self,
        piece: &str,
        action: &str,
        version: &str,
        outcome: StepOutcome,
        seconds: f64,
    ) {
        self.step_executions
            .get_or_create(&StepLabels {
                piece: piece.to_owned(),
                action: action.to_owned(),
                version: version.to_owned(),
                outcome,
            })
            .inc();
        let labels = ActionLabels {
            piece: piece.to_owned(),
            action: action.to_owned(),
        };
        self.step_duration.get_or_create(&labels).observe(seconds);
        if outcome == StepOutcome::retrying {
            self.step_retries.get_or_create(&labels).inc();
        }
    }

    pub fn run_started(&self, flow: &str, trigger: TriggerKind) {
        self.runs_started
            .get_or_create(&RunStartLabels {
                flow: flow.to_owned(),
                trigger,
            })
            .inc();
    }

    pub fn run_finished(&self, flow: &str, status: RunOutcome) {
        self.runs_finished
            .get_or_create(&RunEndLabels {
                flow: flow.to_owned(),
                status,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_family_is_named_and_every_name_is_registered() {
        // A family appears in the exposition once it has a sample: give each one.
        let metrics = Metrics::new();
        metrics.step_attempted("http", "send", "1.0.0", StepOutcome::retrying, 0.02);
        metrics.run_started("f", TriggerKind::webhook);
        metrics.run_finished("f", RunOutcome::succeeded);
        let flow = FlowLabels { flow: "f".into() };
        let queue = QueueLabels {
            queue: "default".into(),
        };
        metrics
            .polls
            .get_or_create(&PollLabels {
                flow: "f".into(),
                outcome: PollOutcome::skipped,
            })
            .inc();
        metrics.poll_items.get_or_create(&flow).inc();
        metrics.poll_dedupe_dropped.get_or_create(&flow).inc();
        metrics
            .jobs_received
            .get_or_create(&JobLabels {
                queue: "default".into(),
                kind: JobKind::step,
            })
            .inc();
        metrics
            .jobs_terminated
            .get_or_create(&TermLabels {
                queue: "default".into(),
                reason: TermReason::poison,
            })
            .inc();
        metrics
            .jobs_infra_retries
            .get_or_create(&JobLabels {
                queue: "default".into(),
                kind: JobKind::poll,
            })
            .inc();
        for gauge in [
            &metrics.jobs_in_flight,
            &metrics.queue_pending,
            &metrics.queue_ack_pending,
            &metrics.queue_redelivered,
        ] {
            gauge.get_or_create(&queue).set(1);
        }
        metrics
            .flows_enabled
            .get_or_create(&PieceLabels { piece: "p".into() })
            .set(1);
        metrics
            .trigger_items_held
            .get_or_create(&FlowLabels { flow: "f".into() })
            .inc();
        metrics
            .attempts_lost
            .get_or_create(&FlowLabels { flow: "f".into() })
            .inc();
        metrics
            .poll_gaps
            .get_or_create(&FlowLabels { flow: "f".into() })
            .inc();
        metrics.job_publish_failures.get_or_create(&queue).inc();
        metrics.outbox_relayed.get_or_create(&queue).inc();
        metrics
            .piece_healthy
            .get_or_create(&HealthLabels {
                piece: "p".into(),
                flow: "f".into(),
            })
            .set(1);
        metrics
            .health_checks
            .get_or_create(&HealthCheckLabels {
                piece: "p".into(),
                healthy: true,
            })
            .inc();
        metrics
            .scheduler_ticks
            .get_or_create(&TickLabels {
                outcome: TickOutcome::published,
            })
            .inc();
        metrics
            .http_requests
            .get_or_create(&HttpLabels {
                method: "GET".into(),
                route: "/healthz".into(),
                status: 200,
            })
            .inc();
        metrics
            .http_request_duration
            .get_or_create(&HttpRouteLabels {
                method: "GET".into(),
                route: "/healthz".into(),
            })
            .observe(0.001);
        metrics
            .webhook_refused
            .get_or_create(&WebhookRefusedLabels {
                reason: WebhookRefusal::wrong,
            })
            .inc();
        let text = metrics.encode();
        let mut families: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                }
            })
            .collect();
        families.sort();
        let mut names: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
        names.sort();
        assert_eq!(families, names);
        assert!(text.contains(
            "piecework_step_executions_total{piece=\"http\",action=\"send\",version=\"1.0.0\",outcome=\"retrying\"} 1"
        ));
        assert!(text.contains("piecework_step_retries_total{piece=\"http\",action=\"send\"} 1"));
        assert!(
            text.contains(
                "piecework_step_duration_seconds_count{piece=\"http\",action=\"send\"} 1"
            )
        );
        assert!(text.ends_with("# EOF\n"));
    }
}

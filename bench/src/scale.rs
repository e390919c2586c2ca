//! What the fleet costs when it is big or idle: a scheduler with many polling flows, and api,
//! scheduler and workers with nothing to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use piecework_proto::Message as _;
use piecework_proto::v1::PollJob;
use piecework_runtime::Runtime;
use serde::Serialize;

use crate::fleet::{Infra, Process};
use crate::stats::Latency;

/// The scheduler with many enabled polling flows.
#[derive(Debug, Clone, Serialize)]
pub struct SchedulerScale {
    pub flows: usize,
    pub interval_seconds: f64,
    /// How long applying the flows took (through `Runtime::apply_flow`, 64 at a time).
    pub apply_seconds: f64,
    /// How long a starting scheduler took to plan every flow.
    pub load_seconds: f64,
    pub window_seconds: f64,
    /// From each tick to its poll job reaching a consumer.
    pub tick_jitter: Latency,
    /// The scheduler's CPU over the window, in % of one core.
    pub scheduler_cpu_percent: f64,
    /// Its resident memory at the end of the window.
    pub scheduler_rss_mb: f64,
}

/// Applies `flows` flows polling the probe piece every `interval`, starts a scheduler, and
/// watches the poll jobs it publishes for `window`.
pub async fn scheduler_scale(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    flows: usize,
    interval: Duration,
    window: Duration,
) -> anyhow::Result<SchedulerScale> {
    crate::scenarios::publish_probe(runtime).await?;
    let interval_text = humantime_interval(interval);
    let started = Instant::now();
    futures::stream::iter(0..flows)
        .map(|n| {
            let runtime = runtime.clone();
            let yaml = format!(
                "apiVersion: piecework/v1\nkind: Flow\nname: scale-{n}\ntrigger: {{ piece: probe, trigger: ticks, poll_interval: {interval_text} }}\nsteps:\n  - {{ name: a, piece: data, action: set, input: {{ value: 1 }} }}\n"
            );
            async move { crate::scenarios::apply(&runtime, &yaml).await.map(drop) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let apply_seconds = started.elapsed().as_secs_f64();

    let client = async_nats::connect(&infra.nats).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream("PW_JOBS").await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "pw-default",
            jetstream::consumer::pull::Config {
                durable_name: Some("pw-default".into()),
                filter_subject: "pw.jobs.default.*".into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .context("the default queue's consumer")?;
    let scheduler = Process::scheduler(infra, "bench-scheduler").await?;
    // Measure once the scheduler has planned every flow (its first read of the list).
    let loading = Instant::now();
    let metrics_url = scheduler.ready.replace("/readyz", "/metrics");
    let http = reqwest::Client::new();
    loop {
        let text = http.get(&metrics_url).send().await?.text().await?;
        let scheduled = text
            .lines()
            .find_map(|l| l.strip_prefix("piecework_scheduled_flows "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if scheduled >= flows {
            break;
        }
        anyhow::ensure!(
            loading.elapsed() < Duration::from_secs(300),
            "the scheduler planned {scheduled} of {flows} flows in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let load_seconds = loading.elapsed().as_secs_f64();
    let cpu_before = scheduler.cpu_seconds()?;
    let window_start = chrono::Utc::now().timestamp_millis();
    let deadline = Instant::now() + window;
    let mut jitters = Vec::new();
    while Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            let received = chrono::Utc::now().timestamp_millis();
            if message.subject.ends_with(".poll")
                && let Ok(job) = PollJob::decode(message.payload.as_ref())
                && job.tick_unix_ms >= window_start
            {
                let late = u64::try_from(received - job.tick_unix_ms).unwrap_or(0);
                jitters.push(Duration::from_millis(late));
            }
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let cpu = scheduler.cpu_seconds()? - cpu_before;
    let rss = scheduler.rss_bytes()?;
    drop(scheduler);
    Ok(SchedulerScale {
        flows,
        interval_seconds: interval.as_secs_f64(),
        apply_seconds,
        load_seconds,
        window_seconds: window.as_secs_f64(),
        tick_jitter: Latency::of(jitters),
        scheduler_cpu_percent: cpu / window.as_secs_f64() * 100.0,
        scheduler_rss_mb: rss as f64 / (1024.0 * 1024.0),
    })
}

fn humantime_interval(interval: Duration) -> String {
    format!("{}s", interval.as_secs().max(1))
}

/// One process of the idle fleet.
#[derive(Debug, Clone, Serialize)]
pub struct IdleProcess {
    pub name: String,
    /// CPU over the fleet's window, in % of one core.
    pub cpu_percent: f64,
    /// Redis commands and NATS messages it sent per second, measured alone.
    pub redis_ops_per_sec: f64,
    pub nats_ops_per_sec: f64,
}

/// An api, a scheduler and two workers with nothing to do.
#[derive(Debug, Clone, Serialize)]
pub struct IdleFleet {
    pub window_seconds: f64,
    pub processes: Vec<IdleProcess>,
}

/// Runs the idle fleet together for `window` (CPU per process), then each kind of process
/// alone for `alone` (its Redis and NATS operations: the servers count only totals).
pub async fn idle_fleet(
    infra: &Infra,
    nats_monitor: &str,
    window: Duration,
    alone: Duration,
) -> anyhow::Result<IdleFleet> {
    let counters = Counters::new(infra, nats_monitor).await?;
    let mut processes = Vec::new();
    {
        let (api, _) = Process::api(infra).await?;
        let scheduler = Process::scheduler(infra, "idle-scheduler").await?;
        let w0 = Process::worker(infra, "idle-w0", 16).await?;
        let w1 = Process::worker(infra, "idle-w1", 16).await?;
        let fleet = [&api, &scheduler, &w0, &w1];
        // Past the start-up work (stream and consumer checks, the first refresh).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before: Vec<f64> = fleet
            .iter()
            .map(|p| p.cpu_seconds())
            .collect::<anyhow::Result<_>>()?;
        tokio::time::sleep(window).await;
        for (process, before) in fleet.iter().zip(before) {
            processes.push(IdleProcess {
                name: process.name.clone(),
                cpu_percent: (process.cpu_seconds()? - before) / window.as_secs_f64() * 100.0,
                redis_ops_per_sec: 0.0,
                nats_ops_per_sec: 0.0,
            });
        }
    }
    for (index, kind) in ["api", "scheduler", "worker", "worker"].iter().enumerate() {
        if index == 3 {
            // Both workers behave alike; the first's figures stand for the second's.
            let (redis, nats) = (
                processes[2].redis_ops_per_sec,
                processes[2].nats_ops_per_sec,
            );
            processes[3].redis_ops_per_sec = redis;
            processes[3].nats_ops_per_sec = nats;
            continue;
        }
        let process = match *kind {
            "api" => Process::api(infra).await?.0,
            "scheduler" => Process::scheduler(infra, "alone-scheduler").await?,
            _ => Process::worker(infra, "alone-worker", 16).await?,
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (redis_before, nats_before) = counters.read().await?;
        tokio::time::sleep(alone).await;
        let (redis_after, nats_after) = counters.read().await?;
        drop(process);
        let per_sec = |n: u64| n as f64 / alone.as_secs_f64();
        // The counters' own reads: one INFO per read.
        processes[index].redis_ops_per_sec = per_sec(redis_after.saturating_sub(redis_before + 1));
        processes[index].nats_ops_per_sec = per_sec(nats_after.saturating_sub(nats_before));
    }
    Ok(IdleFleet {
        window_seconds: window.as_secs_f64(),
        processes,
    })
}

/// Server-wide operation counters: Redis commands processed, NATS messages received.
struct Counters {
    redis: redis::aio::MultiplexedConnection,
    varz: String,
    http: reqwest::Client,
}

impl Counters {
    async fn new(infra: &Infra, nats_monitor: &str) -> anyhow::Result<Self> {
        let redis = redis::Client::open(infra.redis.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self {
            redis,
            varz: format!("{nats_monitor}/varz"),
            http: reqwest::Client::new(),
        })
    }

    async fn read(&self) -> anyhow::Result<(u64, u64)> {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut self.redis.clone())
            .await?;
        let commands = info
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no total_commands_processed in INFO")?;
        let varz: serde_json::Value = self.http.get(&self.varz).send().await?.json().await?;
        let messages = varz["in_msgs"].as_u64().context("no in_msgs in /varz")?;
        Ok((commands, messages))
    }
}

//! The piecework figures: runs of a 3-step flow through worker processes (and in memory), the
//! synchronous webhook under load, and a worker's memory idle and with 1,000 jobs in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use piecework_core::flow::{FlowDefinition, Format};
use piecework_core::run::new_run_id;
use piecework_core::{FlowVersion, Run};
use piecework_proto::v1::RunStatus;
use piecework_runtime::{Actor, Runtime};
use piecework_telemetry::metrics::TriggerKind;
use serde::Serialize;
use serde_json::json;

use crate::fleet::{Infra, Process};
use crate::stats::{Latency, rate};

/// Three no-op core actions: what a step costs when the piece itself costs nothing.
fn three_step_flow(name: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: a, piece: data, action: set, input: {{ value: 1 }} }}\n  - {{ name: b, piece: data, action: set, input: {{ value: 2 }} }}\n  - {{ name: c, piece: data, action: set, input: {{ value: 3 }} }}\n"
    )
}

/// The same three no-op steps, done by a bundle's action in the piece's own process.
fn three_remote_steps(name: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: a, piece: probe, action: noop, input: {{ value: 1 }} }}\n  - {{ name: b, piece: probe, action: noop, input: {{ value: 2 }} }}\n  - {{ name: c, piece: probe, action: noop, input: {{ value: 3 }} }}\n"
    )
}

/// What running a piece out of process costs, against the same flow in the binary.
#[derive(Debug, Clone, Serialize)]
pub struct OutOfProcess {
    pub in_binary: Throughput,
    pub out_of_process: Throughput,
    /// Out-of-process steps/s over in-binary steps/s.
    pub steps_ratio: f64,
    /// Extra CPU (worker + piece process) per step, in µs.
    pub extra_cpu_us_per_step: f64,
    /// The same no-op in TypeScript (the Activepieces framework, under the Node host).
    pub typescript: Throughput,
    /// TypeScript steps/s over in-binary steps/s.
    pub typescript_steps_ratio: f64,
    /// Extra CPU (worker + node) per step over in-binary, in µs.
    pub typescript_extra_cpu_us_per_step: f64,
}

fn three_typescript_steps(name: &str) -> String {
    three_remote_steps(name).replace("piece: probe", "piece: ts-noop")
}

/// Builds the no-op TypeScript piece (`bench/ts-noop`) with `piecework piece build` and
/// publishes it, once per harness run.
pub async fn publish_ts_noop(runtime: &Runtime) -> anyhow::Result<()> {
    static PUBLISHED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    PUBLISHED
        .get_or_try_init(|| async {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ts-noop");
            let staging = tempfile::tempdir()?;
            let out = std::process::Command::new(crate::fleet::binary()?)
                .args(["piece", "build"])
                .arg(&dir)
                .arg("--out")
                .arg(staging.path())
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "building {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let bundle = std::fs::read(staging.path().join("ts-noop-1.0.0.piece.tgz"))?;
            runtime
                .publish_piece(bundle.into(), None, &Actor::api("bench"))
                .await?;
            anyhow::Ok(())
        })
        .await
        .map(drop)
}

/// The same no-op flow through one worker process, its steps done by a built-in piece and
/// by a bundle (published to the registry, run in a child process). Both run twice,
/// alternating, and the better of each counts: the machine's noise is larger than the
/// difference otherwise. CPU counts the worker and its piece processes.
pub async fn out_of_process(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    runs: usize,
) -> anyhow::Result<OutOfProcess> {
    publish_probe(runtime).await?;
    publish_ts_noop(runtime).await?;
    let worker = Process::worker(infra, "bench-oop", 64).await?;
    let local = apply(runtime, &three_step_flow("bench-in-binary")).await?;
    let remote = apply(runtime, &three_remote_steps("bench-out-of-process")).await?;
    let node = apply(runtime, &three_typescript_steps("bench-typescript")).await?;
    let cpu = || worker.cpu_seconds_with_children();
    // Warm up: the piece processes start on first use.
    drive(runtime, &remote, 10.min(runs), cpu).await?;
    drive(runtime, &node, 10.min(runs), cpu).await?;
    let mut best: [Option<Throughput>; 3] = [None, None, None];
    for _ in 0..2 {
        for (slot, flow) in best.iter_mut().zip([&local, &remote, &node]) {
            let t = drive(runtime, flow, runs, cpu).await?;
            if slot
                .as_ref()
                .is_none_or(|b| t.steps_per_sec > b.steps_per_sec)
            {
                *slot = Some(t);
            }
        }
    }
    drop(worker);
    let [in_binary, out_of_process, typescript] = best.map(|b| b.expect("two rounds"));
    Ok(OutOfProcess {
        steps_ratio: out_of_process.steps_per_sec / in_binary.steps_per_sec,
        extra_cpu_us_per_step: out_of_process.worker_cpu_us_per_step
            - in_binary.worker_cpu_us_per_step,
        typescript_steps_ratio: typescript.steps_per_sec / in_binary.steps_per_sec,
        typescript_extra_cpu_us_per_step: typescript.worker_cpu_us_per_step
            - in_binary.worker_cpu_us_per_step,
        in_binary,
        out_of_process,
        typescript,
    })
}

/// Publishes the `probe` test piece (1.0.0) to the registry, once per harness run.
pub async fn publish_probe(runtime: &Runtime) -> anyhow::Result<()> {
    static PUBLISHED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    PUBLISHED
        .get_or_try_init(|| async {
            let probe = crate::fleet::sibling("probe")?;
            let staging = tempfile::tempdir()?;
            let program = staging.path().join("probe");
            std::fs::copy(&probe, &program)?;
            std::fs::write(staging.path().join("version.txt"), "1.0.0")?;
            let (bundle, _) =
                piecework_host::build::bundle_executable(&program, Default::default())
                    .await
                    .map_err(anyhow::Error::msg)?;
            runtime
                .publish_piece(bundle.into(), None, &Actor::api("bench"))
                .await?;
            anyhow::Ok(())
        })
        .await
        .map(drop)
}

/// Starts runs concurrently, at most this many creations in flight.
const STARTERS: usize = 64;

/// What a throughput scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub runs: usize,
    pub steps: usize,
    pub seconds: f64,
    pub runs_per_sec: f64,
    pub steps_per_sec: f64,
    /// From the end of one step (or the run's creation) to the start of the next.
    pub dispatch: Dispatch,
    /// CPU time the worker process(es) spent per step: steady across machine noise, unlike
    /// rates.
    pub worker_cpu_us_per_step: f64,
}

pub async fn apply(runtime: &Runtime, yaml: &str) -> anyhow::Result<Arc<FlowVersion>> {
    let definition = FlowDefinition::parse(yaml, Format::Yaml)?;
    let applied = &runtime
        .apply_flow(definition, &Actor::api("bench"))
        .await?
        .applied;
    runtime
        .flow_version(&applied.record.id, applied.version)
        .await?
        .context("the applied version vanished")
}

/// Starts `runs` runs of `flow` and waits for all of them to finish, watching `pw:results`.
pub async fn drive(
    runtime: &Arc<Runtime>,
    flow: &Arc<FlowVersion>,
    runs: usize,
    worker_cpu: impl Fn() -> anyhow::Result<f64>,
) -> anyhow::Result<Throughput> {
    let watcher = {
        let runtime = runtime.clone();
        let flow_id = flow.flow_id.clone();
        tokio::spawn(async move { wait_for_finishes(&runtime, &flow_id, runs).await })
    };
    // Let the watcher's blocking read start before the first result can exist.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu_before = worker_cpu()?;
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..runs)
        .map(|_| {
            let runtime = runtime.clone();
            let flow = flow.clone();
            async move {
                let id = new_run_id();
                runtime
                    .start_run(&flow, id.clone(), json!({}), TriggerKind::webhook)
                    .await
                    .map(|_| id)
            }
        })
        .buffer_unordered(STARTERS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let failed = tokio::time::timeout(Duration::from_secs(600), watcher)
        .await
        .context("runs did not finish within 10 minutes")???;
    let elapsed = started.elapsed();
    let cpu = worker_cpu()? - cpu_before;
    if failed > 0 {
        bail!("{failed} of {runs} runs failed");
    }
    let steps = runs * flow.definition.steps.len();
    Ok(Throughput {
        runs,
        steps,
        seconds: elapsed.as_secs_f64(),
        runs_per_sec: rate(runs, elapsed),
        steps_per_sec: rate(steps, elapsed),
        dispatch: dispatch_latency(runtime, &ids).await?,
        worker_cpu_us_per_step: cpu * 1e6 / steps as f64,
    })
}

/// Counts finished runs of `flow_id` in `pw:results`; returns how many failed.
async fn wait_for_finishes(runtime: &Runtime, flow_id: &str, runs: usize) -> anyhow::Result<usize> {
    let mut after = "$".to_owned();
    let (mut finished, mut failed) = (0, 0);
    while finished < runs {
        let entries = runtime
            .read_results(Some(&after), 1000, Duration::from_secs(5))
            .await?;
        for entry in entries {
            after = entry.id;
            let result = entry.event;
            if result.flow_id != flow_id {
                continue;
            }
            match RunStatus::try_from(result.run_status) {
                Ok(RunStatus::Succeeded) => finished += 1,
                Ok(RunStatus::Failed | RunStatus::Cancelled) => {
                    finished += 1;
                    failed += 1;
                }
                _ => {}
            }
        }
    }
    Ok(failed)
}

/// Gaps between one step's end and the next one's start, all of them (the keys of a
/// [`Latency`]) and the first steps' alone: from the run's creation, a hop through JetStream
/// where the later steps of a 3-step flow run inline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dispatch {
    #[serde(flatten)]
    pub all: Latency,
    pub first_step: Latency,
}

async fn dispatch_latency(runtime: &Arc<Runtime>, ids: &[String]) -> anyhow::Result<Dispatch> {
    let runs: Vec<Option<Run>> = futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let runtime = runtime.clone();
            async move { runtime.run(&id).await }
        })
        .buffer_unordered(STARTERS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let (mut gaps, mut first) = (Vec::new(), Vec::new());
    for run in runs.into_iter().flatten() {
        let mut previous_end: DateTime<Utc> = run.created_at;
        for (index, step) in run.steps.iter().enumerate() {
            let Some(attempt) = step.attempts.first() else {
                continue;
            };
            let gap = (attempt.started_at - previous_end)
                .to_std()
                .unwrap_or_default();
            if index == 0 {
                first.push(gap);
            }
            gaps.push(gap);
            previous_end = attempt.started_at
                + chrono::Duration::milliseconds(i64::try_from(attempt.duration_ms).unwrap_or(0));
        }
    }
    Ok(Dispatch {
        all: Latency::of(gaps),
        first_step: Latency::of(first),
    })
}

/// N runs through `workers` worker processes on NATS and Redis.
pub async fn fleet_throughput(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    workers: usize,
    runs: usize,
) -> anyhow::Result<Throughput> {
    let mut processes = Vec::new();
    for n in 0..workers {
        processes.push(Process::worker(infra, &format!("bench-w{n}"), 64).await?);
    }
    let flow = apply(runtime, &three_step_flow(&format!("bench-{workers}w"))).await?;
    let cpu = || {
        processes
            .iter()
            .map(Process::cpu_seconds)
            .sum::<anyhow::Result<f64>>()
    };
    let measured = drive(runtime, &flow, runs, cpu).await;
    drop(processes);
    measured
}

/// Step dispatch latency without load: `runs` runs one after another through two worker
/// processes, each started when the previous one finished.
pub async fn unloaded_dispatch(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    runs: usize,
) -> anyhow::Result<Dispatch> {
    let workers = vec![
        Process::worker(infra, "bench-l0", 64).await?,
        Process::worker(infra, "bench-l1", 64).await?,
    ];
    let flow = apply(runtime, &three_step_flow("bench-latency")).await?;
    let mut ids = Vec::with_capacity(runs);
    for _ in 0..runs {
        let id = new_run_id();
        runtime
            .start_run(&flow, id.clone(), json!({}), TriggerKind::webhook)
            .await?;
        let run = runtime
            .wait_run_finished(&id, Duration::from_secs(30))
            .await?
            .context("the run vanished")?;
        if !run.status.is_terminal() {
            bail!("run {id} did not finish within 30s");
        }
        ids.push(id);
    }
    drop(workers);
    dispatch_latency(runtime, &ids).await
}

/// N runs on the embedded in-memory bus and store, worker in-process: `piecework dev`.
pub async fn in_memory_throughput(runs: usize) -> anyhow::Result<Throughput> {
    let mut config = piecework::config::Config::default();
    config.worker.concurrency = 64;
    let (runtime, _) = piecework::infra::runtime(
        &config,
        piecework::registry::pieces()?,
        piecework::infra::Infra::MEMORY,
        None,
    )
    .await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(piecework_worker::run(
        config.worker.clone(),
        runtime.clone(),
        shutdown.clone(),
    ));
    let flow = apply(&runtime, &three_step_flow("bench-dev")).await?;
    // In memory the worker shares this process with the harness: its CPU counts too.
    let measured = drive(&runtime, &flow, runs, || {
        crate::fleet::cpu_seconds(std::process::id())
    })
    .await;
    shutdown.cancel();
    let _ = worker.await;
    measured
}

/// What the synchronous webhook did under load.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookLoad {
    pub clients: usize,
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub latency: Latency,
}

/// `POST /v1/webhooks/{flow}/sync` on a one-step flow from `clients` concurrent clients for
/// `duration`, against an api process and two workers (Activepieces' benchmark shape).
pub async fn sync_webhook(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    levels: &[usize],
    duration: Duration,
) -> anyhow::Result<Vec<WebhookLoad>> {
    let (api, base) = Process::api(infra).await?;
    let workers = vec![
        Process::worker(infra, "bench-s0", 64).await?,
        Process::worker(infra, "bench-s1", 64).await?,
    ];
    apply(
        runtime,
        "apiVersion: piecework/v1\nkind: Flow\nname: bench-sync\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: reply, piece: data, action: set, input: { value: { greeting: \"hello, {{ trigger.body.name }}\" } } }\n",
    )
    .await?;
    let url = format!("{base}/v1/webhooks/bench-sync/sync");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    // Warm up connections and caches.
    for _ in 0..20 {
        post(&http, &url).await?;
    }
    let mut loads = Vec::new();
    for &clients in levels {
        loads.push(load(&http, &url, clients, duration).await?);
    }
    drop(workers);
    drop(api);
    Ok(loads)
}

pub(crate) async fn post(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .json(&json!({ "name": "ada" }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "{url} answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    response.bytes().await?;
    Ok(())
}

/// `clients` concurrent clients posting to `url` as fast as it answers, for `duration`.
pub(crate) async fn load(
    http: &reqwest::Client,
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<WebhookLoad> {
    load_with(http, url, clients, duration, |http, url| async move {
        post(&http, &url).await
    })
    .await
}

/// `clients` concurrent clients each sending `request` to `url` again as soon as it is
/// answered, for `duration`: requests per second and latencies.
async fn load_with<F, Fut>(
    http: &reqwest::Client,
    url: &str,
    clients: usize,
    duration: Duration,
    request: F,
) -> anyhow::Result<WebhookLoad>
where
    F: Fn(reqwest::Client, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, request) = (http.clone(), url.to_owned(), request.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    request(http.clone(), url.clone()).await?;
                    latencies.push(sent.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    Ok(WebhookLoad {
        clients,
        requests: latencies.len(),
        seconds: elapsed.as_secs_f64(),
        requests_per_sec: rate(latencies.len(), elapsed),
        latency: Latency::of(latencies),
    })
}

/// A worker's resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub idle_rss_mb: f64,
    pub in_flight: usize,
    pub loaded_rss_mb: f64,
    /// The same number of requests held open from a bare reqwest client: what the HTTP client
    /// and its connection take of each in-flight step.
    pub bare_client_kib_per_request: f64,
}

/// Idle RSS of a worker with `jobs` slots, then its RSS while `jobs` steps wait on a slow HTTP
/// endpoint.
pub async fn worker_memory(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    jobs: usize,
) -> anyhow::Result<Memory> {
    let hold = Hold::start().await?;
    let worker = Process::worker(infra, "bench-mem", jobs).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = worker.rss_bytes()?;
    let flow = apply(
        runtime,
        &format!(
            "apiVersion: piecework/v1\nkind: Flow\nname: bench-hold\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: wait, piece: http, action: send_request, input: {{ url: \"{}/hold\" }}, timeout: 5m }}\n",
            hold.url
        ),
    )
    .await?;
    futures::stream::iter(0..jobs)
        .map(|_| {
            let (runtime, flow) = (runtime.clone(), flow.clone());
            async move {
                runtime
                    .start_run(&flow, new_run_id(), json!({}), TriggerKind::webhook)
                    .await
            }
        })
        .buffer_unordered(STARTERS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while hold.waiting() < jobs {
        if Instant::now() > deadline {
            bail!(
                "only {} of {jobs} jobs reached the worker's HTTP calls: {}",
                hold.waiting(),
                worker.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loaded = worker.rss_bytes()?;
    let in_flight = hold.waiting();
    hold.release();
    drop(worker);
    let bare = crate::baselines::held_request_kib(jobs).await?;
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Ok(Memory {
        idle_rss_mb: mb(idle),
        in_flight,
        loaded_rss_mb: mb(loaded),
        bare_client_kib_per_request: bare,
    })
}

/// An HTTP endpoint that holds every request until released.
pub(crate) struct Hold {
    pub(crate) url: String,
    waiting: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl Hold {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hold = Self {
            url: format!("http://{}", listener.local_addr()?),
            waiting: Arc::default(),
            release: Arc::default(),
            released: Arc::default(),
        };
        let (waiting, release, released) = (
            hold.waiting.clone(),
            hold.release.clone(),
            hold.released.clone(),
        );
        let app = axum::Router::new().route(
            "/hold",
            axum::routing::get(move || {
                let (waiting, release, released) =
                    (waiting.clone(), release.clone(), released.clone());
                async move {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    if !released.load(Ordering::SeqCst) {
                        release.notified().await;
                    }
                    "ok"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(hold)
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

/// `piecework dev`'s synchronous webhook (in memory) under the same load client, next to the
/// same server's `/healthz`: how much of what the process can answer a run costs.
#[derive(Debug, Clone, Serialize)]
pub struct DevWebhook {
    pub webhook: Vec<WebhookLoad>,
    pub healthz: Vec<WebhookLoad>,
}

pub async fn dev_sync_webhook(levels: &[usize], duration: Duration) -> anyhow::Result<DevWebhook> {
    let (dev, base) = Process::dev().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let applied = http
        .post(format!("{base}/v1/flows"))
        .body("apiVersion: piecework/v1\nkind: Flow\nname: bench-sync\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: reply, piece: data, action: set, input: { value: { greeting: \"hello, {{ trigger.body.name }}\" } } }\n")
        .send()
        .await?;
    if !applied.status().is_success() {
        bail!(
            "applying the flow to piecework dev failed: {}",
            applied.text().await?
        );
    }
    let webhook_url = format!("{base}/v1/webhooks/bench-sync/sync");
    for _ in 0..20 {
        post(&http, &webhook_url).await?;
    }
    let mut webhook = Vec::new();
    let mut healthz = Vec::new();
    for &clients in levels {
        webhook.push(load(&http, &webhook_url, clients, duration).await?);
        healthz.push(load_get(&http, &format!("{base}/healthz"), clients, duration).await?);
    }
    drop(dev);
    Ok(DevWebhook { webhook, healthz })
}

/// [`load`] with `GET`s.
async fn load_get(
    http: &reqwest::Client,
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<WebhookLoad> {
    load_with(http, url, clients, duration, |http, url| async move {
        http.get(&url).send().await?.bytes().await?;
        Ok(())
    })
    .await
}

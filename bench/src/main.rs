//! `piecework-bench`: piecework against the limits of its own infrastructure (raw JetStream)
//! and against the queue layer its peers use (BullMQ), measured in one run on one machine, so
//! the ratios mean something even where the absolute figures do not travel.
//!
//! It starts its own `nats-server` and `redis-server` (testkit), runs every scenario in turn,
//! prints a table and writes the figures as JSON. `just bench` runs the full version (release
//! build); `--smoke` moves a few hundred jobs through every scenario so CI keeps the harness
//! working without asserting on speed. See `BENCHMARKS.md` for what each figure means.
//!
//! - [`jetstream`]: pipelined publish + pull + ack, raw async-nats;
//! - [`bullmq`]: the same job count through BullMQ on the same Redis (Node.js);
//! - [`scenarios`]: runs of a 3-step flow through 1 and 2 worker processes and in memory, the
//!   same no-op flow done by a built-in piece and by a bundle in its own process, the
//!   synchronous webhook under 2 and 64 clients, and a worker's memory;
//! - [`soak`] (`--soak 30m`, `just soak`): a fleet under steady load, for memory growth and
//!   lost runs.

mod baselines;
mod bullmq;
mod fleet;
mod jetstream;
mod report;
mod scale;
mod scenarios;
mod soak;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use piecework_testkit::{NatsServer, RedisServer};
use serde_json::{Value, json};

use crate::fleet::Infra;
use crate::stats::rate;

/// The allocator `piecework` runs with, so in-process figures (dev in memory, the bare client's
/// memory) compare with the processes'.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Benchmark piecework against raw JetStream and BullMQ")]
struct Args {
    /// A few hundred jobs per scenario: checks the harness works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/latest.json")]
    out: PathBuf,
    /// Runs of the 3-step flow per throughput scenario (default 5000, smoke 100).
    #[arg(long)]
    runs: Option<usize>,
    /// Only the in-binary vs out-of-process comparison (to iterate on the piece host).
    #[arg(long)]
    only_pieces: bool,
    /// Instead of the benchmarks: a soak of this long (`30m`) — a fleet under steady webhook
    /// load, reporting memory growth and lost runs; fails past 5% growth (soaks of 5 minutes
    /// or more) or any lost run.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Webhook calls a second during the soak.
    #[arg(long, default_value_t = 50)]
    soak_rate: u32,
    /// Internal: serve the bare HTTP baseline on this address (the harness starts itself so).
    #[arg(long, hide = true)]
    serve_bare_http: Option<std::net::SocketAddr>,
    /// Internal: hold `--hold-count` requests to this URL open (the bare client's memory).
    #[arg(long, hide = true, requires = "hold_count")]
    hold_url: Option<String>,
    #[arg(long, hide = true)]
    hold_count: Option<usize>,
}

/// How much work each scenario does.
struct Sizes {
    raw_messages: usize,
    bullmq_jobs: usize,
    runs: usize,
    webhook_seconds: Duration,
    memory_jobs: usize,
    latency_runs: usize,
    request_replies: usize,
    scale_flows: usize,
    scale_interval: Duration,
    scale_window: Duration,
    idle_window: Duration,
    idle_alone: Duration,
}

impl Sizes {
    fn new(args: &Args) -> Self {
        if args.smoke {
            Self {
                raw_messages: 500,
                bullmq_jobs: 300,
                runs: args.runs.unwrap_or(100),
                webhook_seconds: Duration::from_secs(1),
                memory_jobs: 100,
                latency_runs: 20,
                request_replies: 50,
                scale_flows: 200,
                scale_interval: Duration::from_secs(2),
                scale_window: Duration::from_secs(4),
                idle_window: Duration::from_secs(2),
                idle_alone: Duration::from_secs(2),
            }
        } else {
            Self {
                raw_messages: 100_000,
                bullmq_jobs: 20_000,
                runs: args.runs.unwrap_or(5_000),
                webhook_seconds: Duration::from_secs(10),
                memory_jobs: 1_000,
                latency_runs: 500,
                request_replies: 1_000,
                scale_flows: 100_000,
                scale_interval: Duration::from_secs(30),
                scale_window: Duration::from_secs(40),
                idle_window: Duration::from_secs(60),
                idle_alone: Duration::from_secs(20),
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = if let Some(addr) = args.serve_bare_http {
        baselines::serve(addr).await
    } else if let (Some(url), Some(count)) = (&args.hold_url, args.hold_count) {
        baselines::hold_client(url, count).await
    } else {
        bench(&args).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    piecework_sdk::http::install_crypto_provider();
    let sizes = Sizes::new(args);
    fleet::binary()?;
    let nats = NatsServer::start().await?;
    let redis = RedisServer::start().await?;
    // As the compose file runs Redis: the append-only file fsynced every second (the testkit's
    // default fsyncs every write, which tests of restarts need and deployments do not use).
    let client = redis::Client::open(redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .query_async(&mut conn)
        .await?;
    let infra = Infra {
        nats: nats.url(),
        redis: redis.url(),
        key: piecework_runtime::secrets::Keyring::generate_spec("bench"),
    };
    let mut config = piecework::config::Config::default();
    config.nats.url = infra.nats.clone();
    config.redis.url = infra.redis.clone();
    let (runtime, _) = piecework::infra::runtime(
        &config,
        piecework::registry::pieces()?,
        piecework::infra::Infra::PRODUCTION,
        None,
    )
    .await?;

    if let Some(duration) = args.soak {
        eprintln!(
            "soak: api, scheduler, 2 workers, {} webhook calls a second for {}…",
            args.soak_rate,
            humantime::format_duration(duration)
        );
        let soak = soak::run(&infra, &runtime, duration, args.soak_rate).await?;
        let text = serde_json::to_string_pretty(&json!({
            "date": chrono::Utc::now().to_rfc3339(),
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "machine": machine(),
            "soak": soak,
        }))?;
        println!("{text}");
        if let Some(dir) = args.out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.out, text + "\n")?;
        if !soak.passed {
            anyhow::bail!(
                "the soak missed its targets: {} lost runs, memory growth {}",
                soak.lost,
                soak.processes
                    .iter()
                    .map(|m| format!("{} {:+.1}%", m.process, m.growth * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(());
    }

    if args.only_pieces {
        let bundles = scenarios::out_of_process(&infra, &runtime, sizes.runs).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "out_of_process": bundles }))?
        );
        return Ok(());
    }

    eprintln!("raw JetStream: {} messages…", sizes.raw_messages);
    let raw = jetstream::run(&infra.nats, sizes.raw_messages).await?;
    let raw_rate = rate(sizes.raw_messages, raw);
    eprintln!(
        "raw JetStream request/reply: {} round trips…",
        sizes.request_replies
    );
    let request_reply = jetstream::request_reply(&infra.nats, sizes.request_replies).await?;
    eprintln!(
        "bare HTTP server: 2 and 64 clients, {:?} each…",
        sizes.webhook_seconds
    );
    let bare_http = baselines::bare_http(&[2, 64], sizes.webhook_seconds).await?;

    eprintln!("BullMQ: {} jobs…", sizes.bullmq_jobs);
    let bullmq = match bullmq::run(&infra.redis, sizes.bullmq_jobs, 64)? {
        Ok(elapsed) => Some(rate(sizes.bullmq_jobs, elapsed)),
        Err(bullmq::Unavailable(why)) if args.smoke => {
            eprintln!("  skipped: {why}");
            None
        }
        Err(bullmq::Unavailable(why)) => anyhow::bail!("the BullMQ baseline cannot run: {why}"),
    };

    eprintln!("piecework, 1 worker: {} runs of 3 steps…", sizes.runs);
    let one = scenarios::fleet_throughput(&infra, &runtime, 1, sizes.runs).await?;
    eprintln!("piecework, 2 workers: {} runs of 3 steps…", sizes.runs);
    let two = scenarios::fleet_throughput(&infra, &runtime, 2, sizes.runs).await?;
    eprintln!(
        "piecework dispatch latency: {} runs one at a time…",
        sizes.latency_runs
    );
    let unloaded = scenarios::unloaded_dispatch(&infra, &runtime, sizes.latency_runs).await?;
    eprintln!(
        "pieces in the binary vs out of process: 2 × {} runs of 3 no-op steps each…",
        sizes.runs
    );
    let bundles = scenarios::out_of_process(&infra, &runtime, sizes.runs).await?;
    eprintln!("piecework dev (in memory): {} runs of 3 steps…", sizes.runs);
    let dev = scenarios::in_memory_throughput(sizes.runs).await?;
    eprintln!(
        "sync webhook: 2 and 64 clients, {:?} each…",
        sizes.webhook_seconds
    );
    let webhook =
        scenarios::sync_webhook(&infra, &runtime, &[2, 64], sizes.webhook_seconds).await?;
    eprintln!(
        "piecework dev sync webhook and /healthz: 2 and 64 clients, {:?} each…",
        sizes.webhook_seconds
    );
    let dev_webhook = scenarios::dev_sync_webhook(&[2, 64], sizes.webhook_seconds).await?;
    eprintln!(
        "worker memory: idle, then {} jobs in flight…",
        sizes.memory_jobs
    );
    let memory = scenarios::worker_memory(&infra, &runtime, sizes.memory_jobs).await?;
    eprintln!(
        "idle fleet: api, scheduler, 2 workers for {:?}, then each alone for {:?}…",
        sizes.idle_window, sizes.idle_alone
    );
    let idle = scale::idle_fleet(
        &infra,
        &nats.monitor_url(),
        sizes.idle_window,
        sizes.idle_alone,
    )
    .await?;
    // Last: it leaves many enabled flows behind.
    eprintln!(
        "scheduler scale: {} polling flows every {:?}, watched for {:?}…",
        sizes.scale_flows, sizes.scale_interval, sizes.scale_window
    );
    let scheduler = scale::scheduler_scale(
        &infra,
        &runtime,
        sizes.scale_flows,
        sizes.scale_interval,
        sizes.scale_window,
    )
    .await?;

    let best = one.steps_per_sec.max(two.steps_per_sec);
    let report = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "mode": if args.smoke { "smoke" } else { "full" },
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine": machine(),
        "redis_appendfsync": "everysec",
        "raw_jetstream": { "messages": sizes.raw_messages, "seconds": raw.as_secs_f64(), "msgs_per_sec": raw_rate },
        "raw_jetstream_request_reply": request_reply,
        "bare_http": {
            "requests_per_sec": bare_http.iter().map(|l| l.requests_per_sec).fold(0.0, f64::max),
            "loads": bare_http,
        },
        "bullmq": { "jobs": sizes.bullmq_jobs, "jobs_per_sec": bullmq },
        "piecework_1_worker": one,
        "piecework_2_workers": two,
        "dispatch_unloaded": unloaded,
        "dev_in_memory": dev,
        "out_of_process": bundles,
        "sync_webhook": webhook,
        "dev_sync_webhook": dev_webhook,
        "worker_memory": memory,
        "idle_fleet": idle,
        "scheduler_scale": scheduler,
        "ratios": {
            "steps_vs_raw_jetstream": best / raw_rate,
            "steps_vs_bullmq": bullmq.map(|b| best / b),
        },
    });
    report::print_table(&report);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("\nwritten to {}", args.out.display());
    Ok(())
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "model": model,
        "memory_gib": memory_gib,
    })
}

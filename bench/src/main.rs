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
//!   synchronous webhook under 2 and 64 clients, and a worker's memory.

mod bullmq;
mod fleet;
mod jetstream;
mod scenarios;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use piecework_testkit::{NatsServer, RedisServer};
use serde_json::{Value, json};

use crate::fleet::Infra;
use crate::stats::rate;

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
}

/// How much work each scenario does.
struct Sizes {
    raw_messages: usize,
    bullmq_jobs: usize,
    runs: usize,
    webhook_seconds: Duration,
    memory_jobs: usize,
    latency_runs: usize,
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
            }
        } else {
            Self {
                raw_messages: 100_000,
                bullmq_jobs: 20_000,
                runs: args.runs.unwrap_or(5_000),
                webhook_seconds: Duration::from_secs(10),
                memory_jobs: 1_000,
                latency_runs: 500,
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match bench(&args).await {
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
        "worker memory: idle, then {} jobs in flight…",
        sizes.memory_jobs
    );
    let memory = scenarios::worker_memory(&infra, &runtime, sizes.memory_jobs).await?;

    let best = one.steps_per_sec.max(two.steps_per_sec);
    let report = json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "mode": if args.smoke { "smoke" } else { "full" },
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine": machine(),
        "raw_jetstream": { "messages": sizes.raw_messages, "seconds": raw.as_secs_f64(), "msgs_per_sec": raw_rate },
        "bullmq": { "jobs": sizes.bullmq_jobs, "jobs_per_sec": bullmq },
        "piecework_1_worker": one,
        "piecework_2_workers": two,
        "dispatch_unloaded": unloaded,
        "dev_in_memory": dev,
        "out_of_process": bundles,
        "sync_webhook": webhook,
        "worker_memory": memory,
        "ratios": {
            "steps_vs_raw_jetstream": best / raw_rate,
            "steps_vs_bullmq": bullmq.map(|b| best / b),
        },
    });
    print_table(&report);
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

/// The figures, the targets from the benchmark issue, and whether each was met.
fn print_table(report: &Value) {
    let num = |path: &[&str]| {
        path.iter()
            .fold(report, |v, k| match k.parse::<usize>() {
                Ok(i) => &v[i],
                Err(_) => &v[*k],
            })
            .as_f64()
    };
    let raw = num(&["raw_jetstream", "msgs_per_sec"]).unwrap_or(0.0);
    let bullmq = num(&["bullmq", "jobs_per_sec"]);
    type Check = Option<(&'static str, bool)>;
    let rows: Vec<(String, Option<f64>, &str, Check)> = vec![
        (
            "raw JetStream (publish + pull + ack)".into(),
            Some(raw),
            "msg/s",
            None,
        ),
        ("BullMQ (same Redis)".into(), bullmq, "jobs/s", None),
        step_row(report, "piecework_1_worker", "1 worker"),
        step_row(report, "piecework_2_workers", "2 workers"),
        (
            "  runs/s, 2 workers".into(),
            num(&["piecework_2_workers", "runs_per_sec"]),
            "runs/s",
            None,
        ),
        (
            "  worker CPU per step, 1 worker".into(),
            num(&["piecework_1_worker", "worker_cpu_us_per_step"]),
            "us",
            None,
        ),
        (
            "  worker CPU per step, 2 workers".into(),
            num(&["piecework_2_workers", "worker_cpu_us_per_step"]),
            "us",
            None,
        ),
        latency_row(report, "p50", 0.5),
        latency_row(report, "p99", 3.0),
        (
            "  step dispatch p50, 2 workers, under load".into(),
            num(&["piecework_2_workers", "dispatch", "p50_ms"]),
            "ms",
            None,
        ),
        (
            "  step dispatch p99, 2 workers, under load".into(),
            num(&["piecework_2_workers", "dispatch", "p99_ms"]),
            "ms",
            None,
        ),
        (
            "no-op steps in the binary, 1 worker".into(),
            num(&["out_of_process", "in_binary", "steps_per_sec"]),
            "steps/s",
            None,
        ),
        {
            let ratio = num(&["out_of_process", "steps_ratio"]);
            (
                "  out of process (a bundle), same flow".into(),
                num(&["out_of_process", "out_of_process", "steps_per_sec"]),
                "steps/s",
                ratio.map(|r| (">= 0.85x", r >= 0.85)),
            )
        },
        (
            "  CPU per step in the binary (worker)".into(),
            num(&["out_of_process", "in_binary", "worker_cpu_us_per_step"]),
            "us",
            None,
        ),
        {
            let extra = num(&["out_of_process", "extra_cpu_us_per_step"]);
            (
                "  extra CPU per step out of process".into(),
                extra,
                "us",
                extra.map(|e| ("<= 30", e <= 30.0)),
            )
        },
        (
            "piecework dev (in memory)".into(),
            num(&["dev_in_memory", "steps_per_sec"]),
            "steps/s",
            None,
        ),
        (
            "  CPU per step, dev (worker + harness)".into(),
            num(&["dev_in_memory", "worker_cpu_us_per_step"]),
            "us",
            None,
        ),
        webhook_row(report, 0, "requests_per_sec", "req/s", None),
        webhook_row(report, 0, "p50_ms", "ms p50", Some(1.0)),
        webhook_row(report, 0, "p99_ms", "ms p99", None),
        webhook_row(report, 1, "requests_per_sec", "req/s", Some(5000.0)),
        webhook_row(report, 1, "p50_ms", "ms p50", None),
        webhook_row(report, 1, "p99_ms", "ms p99", None),
        {
            let idle = num(&["worker_memory", "idle_rss_mb"]);
            (
                "worker RSS, idle".into(),
                idle,
                "MB",
                idle.map(|v| ("<= 20", v <= 20.0)),
            )
        },
        (
            format!(
                "worker RSS, {} jobs in flight",
                report["worker_memory"]["in_flight"]
            ),
            num(&["worker_memory", "loaded_rss_mb"]),
            "MB",
            None,
        ),
    ];
    println!("\n{:<44} {:>12}  {:<8} target", "figure", "value", "unit");
    println!("{}", "-".repeat(80));
    for (name, value, unit, check) in rows {
        let value = value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}"));
        let target = check.map_or_else(String::new, |(target, met)| {
            format!("{target} {}", if met { "met" } else { "NOT met" })
        });
        println!("{name:<44} {value:>12}  {unit:<8} {target}");
    }
    let best = num(&["piecework_1_worker", "steps_per_sec"])
        .unwrap_or(0.0)
        .max(num(&["piecework_2_workers", "steps_per_sec"]).unwrap_or(0.0));
    println!("{}", "-".repeat(80));
    let vs_raw = best / raw.max(f64::EPSILON);
    println!(
        "{:<44} {:>12.3}  {:<8} >= 0.4 {}",
        "ratio: piecework steps/s / raw JetStream",
        vs_raw,
        "x",
        if vs_raw >= 0.4 { "met" } else { "NOT met" }
    );
    match bullmq {
        Some(bullmq) => {
            let vs = best / bullmq;
            println!(
                "{:<44} {:>12.3}  {:<8} >= 3 {}",
                "ratio: piecework steps/s / BullMQ jobs/s",
                vs,
                "x",
                if vs >= 3.0 { "met" } else { "NOT met" }
            );
        }
        None => println!(
            "{:<44} {:>12}",
            "ratio: piecework steps/s / BullMQ jobs/s", "n/a"
        ),
    }
}

type Row = (
    String,
    Option<f64>,
    &'static str,
    Option<(&'static str, bool)>,
);

fn step_row(report: &Value, key: &str, label: &str) -> Row {
    (
        format!("piecework 3-step runs, {label}"),
        report[key]["steps_per_sec"].as_f64(),
        "steps/s",
        None,
    )
}

fn latency_row(report: &Value, which: &'static str, target_ms: f64) -> Row {
    let value = report["dispatch_unloaded"][format!("{which}_ms")].as_f64();
    let target: &'static str = if which == "p50" { "<= 0.5" } else { "<= 3" };
    (
        format!("  step dispatch {which}, one run at a time"),
        value,
        "ms",
        value.map(|v| (target, v <= target_ms)),
    )
}

fn webhook_row(
    report: &Value,
    index: usize,
    field: &'static str,
    unit: &'static str,
    target: Option<f64>,
) -> Row {
    let load = &report["sync_webhook"][index];
    let value = match field {
        "requests_per_sec" => load[field].as_f64(),
        _ => load["latency"][field].as_f64(),
    };
    let check = target.zip(value).map(|(target, v)| {
        if field == "requests_per_sec" {
            (">= 5000", v >= target)
        } else {
            ("<= 1", v <= target)
        }
    });
    (
        format!("sync webhook, {} clients", load["clients"]),
        value,
        unit,
        check,
    )
}

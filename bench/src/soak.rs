//! The soak: a fleet (api, scheduler, two workers) under steady webhook load for a long
//! while, watching whether memory creeps and whether any accepted run goes missing.
//!
//! Each call carries its own `Idempotency-Key` and is retried until it is answered 202, as a
//! careful webhook sender does; so every order is one accepted run, and a run is lost only if
//! piecework loses it. Resident memory of every piecework process is sampled throughout; the
//! growth compares the last minute of load with the minute after the warm-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use piecework_runtime::Runtime;
use serde::Serialize;
use serde_json::json;

use crate::fleet::{Infra, Process};
use crate::scenarios::apply;

/// The target the issue set: memory grows less than this over a 30-minute soak.
pub const MAX_GROWTH: f64 = 0.05;

/// A soak shorter than this checks for lost runs only: its memory has not settled.
pub const SETTLED: Duration = Duration::from_secs(5 * 60);

/// How often memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Calls in flight at most, so a slow moment queues calls instead of piling up tasks.
const CALLS_IN_FLIGHT: usize = 256;

/// What a soak found.
#[derive(Debug, Clone, Serialize)]
pub struct Soak {
    pub seconds: f64,
    pub calls_per_sec: u32,
    /// Runs accepted (one per order).
    pub accepted: u64,
    /// Calls answered with something other than 202 and sent again.
    pub retried_calls: u64,
    pub succeeded: u64,
    /// Accepted runs that had not succeeded when the fleet had drained.
    pub lost: u64,
    pub processes: Vec<Memory>,
    /// Whether the figures meet the targets (memory only for soaks of [`SETTLED`] or more).
    pub passed: bool,
}

/// One process's resident memory over the soak.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub process: String,
    /// Median over the minute after the warm-up.
    pub settled_mb: f64,
    /// Median over the last minute of load.
    pub end_mb: f64,
    pub growth: f64,
    pub peak_mb: f64,
}

/// Runs the soak for `duration` at `rate` webhook calls a second.
pub async fn run(
    infra: &Infra,
    runtime: &Arc<Runtime>,
    duration: Duration,
    rate: u32,
) -> anyhow::Result<Soak> {
    let (api, base) = Process::api(infra).await?;
    let processes = vec![
        api,
        Process::scheduler(infra, "soak-scheduler").await?,
        Process::worker(infra, "soak-w0", 64).await?,
        Process::worker(infra, "soak-w1", 64).await?,
    ];
    apply(
        runtime,
        "apiVersion: piecework/v1\nkind: Flow\nname: soak\ntrigger: { piece: webhook, trigger: catch, auth: none }\nsteps:\n  - { name: total, piece: data, action: set, input: { value: \"{{ trigger.body.items | sum }}\" } }\n  - name: size\n    if: \"{{ steps.total.output > 10 }}\"\n    then:\n      - { name: big, piece: data, action: set, input: { value: large } }\n    else:\n      - { name: small, piece: data, action: set, input: { value: small } }\n  - { name: done, piece: data, action: set, input: { value: { order: \"{{ trigger.body.order }}\", size: \"{{ steps.size.output }}\" } } }\n",
    )
    .await?;
    let url = format!("{base}/v1/webhooks/soak");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CALLS_IN_FLIGHT)
        .timeout(Duration::from_secs(30))
        .build()?;
    let retried = Arc::new(AtomicU64::new(0));
    let orders = u64::from(rate) * duration.as_secs();
    let started = Instant::now();
    let sampling = tokio::spawn(sample(
        processes
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
            .collect(),
        duration,
    ));
    // Paced: one call per tick whatever the answers take, at most CALLS_IN_FLIGHT open.
    let open = Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT));
    let mut calls = tokio::task::JoinSet::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    for order in 0..orders {
        ticks.tick().await;
        let permit = open.clone().acquire_owned().await?;
        let (http, url, retried) = (http.clone(), url.clone(), retried.clone());
        calls.spawn(async move {
            let called = call(&http, &url, order, &retried).await;
            drop(permit);
            called
        });
        while let Some(done) = calls.try_join_next() {
            done??;
        }
        if order % (u64::from(rate) * 60) == 0 && order > 0 {
            eprintln!(
                "  soak: {} min, {order} calls",
                started.elapsed().as_secs() / 60
            );
        }
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let series = sampling.await?;
    let (succeeded, settled) = drain(runtime, orders).await?;
    let lost = orders - succeeded;
    let memory: Vec<Memory> = series
        .into_iter()
        .map(|(process, samples)| memory(process, &samples, duration))
        .collect();
    let long_enough = duration >= SETTLED;
    let passed = lost == 0 && (!long_enough || memory.iter().all(|m| m.growth < MAX_GROWTH));
    if !settled {
        eprintln!("  soak: the fleet had not finished every run when the drain ended");
    }
    drop(processes);
    Ok(Soak {
        seconds,
        calls_per_sec: rate,
        accepted: orders,
        retried_calls: retried.load(Ordering::Relaxed),
        succeeded,
        lost,
        processes: memory,
        passed,
    })
}

/// Waits until every accepted run ended (or nothing moved for a minute); returns how many
/// succeeded and whether all ended.
async fn drain(runtime: &Runtime, accepted: u64) -> anyhow::Result<(u64, bool)> {
    let query = piecework_store::RunQuery {
        flow_id: Some("soak".into()),
        ..Default::default()
    };
    let mut last = (0, Instant::now());
    loop {
        let stats = runtime.run_stats(&query).await?;
        let count = |status: &str| stats.counts.get(status).copied().unwrap_or(0);
        let ended = count("succeeded") + count("failed") + count("cancelled");
        if ended >= accepted {
            return Ok((count("succeeded"), true));
        }
        if ended > last.0 {
            last = (ended, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            return Ok((count("succeeded"), false));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A process's memory figures from its samples: the settled level is the median of the
/// minute after the warm-up (a sixth of the soak, 10 s to 5 min), the end the median of
/// the last minute.
fn memory(process: String, samples: &[(f64, u64)], duration: Duration) -> Memory {
    let total = duration.as_secs_f64();
    let warm_up = (total / 6.0).clamp(10.0, 300.0);
    let window = 60.0f64.min(total / 4.0);
    let median = |from: f64, to: f64| {
        let mut inside: Vec<u64> = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, rss)| *rss)
            .collect();
        inside.sort_unstable();
        inside.get(inside.len() / 2).copied().unwrap_or(0)
    };
    let mb = |bytes: u64| bytes as f64 / 1_048_576.0;
    let settled = median(warm_up, warm_up + window);
    let end = median(total - window, total);
    let peak = samples.iter().map(|(_, rss)| *rss).max().unwrap_or(0);
    Memory {
        process,
        settled_mb: mb(settled),
        end_mb: mb(end),
        growth: if settled == 0 {
            0.0
        } else {
            end as f64 / settled as f64 - 1.0
        },
        peak_mb: mb(peak),
    }
}

/// Posts order `order` until it is answered 202.
async fn call(
    http: &reqwest::Client,
    url: &str,
    order: u64,
    retried: &AtomicU64,
) -> anyhow::Result<()> {
    let key = format!("soak-{order}");
    let body = json!({ "order": order, "items": [order % 7, order % 5, 1] });
    for _ in 0..100 {
        match http
            .post(url)
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
            .await
        {
            Ok(response) if response.status() == 202 => return Ok(()),
            _ => {
                retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    bail!("order {order} was never accepted")
}

/// Resident memory of each process every [`SAMPLE_EVERY`] for `duration`: (seconds since
/// the start, bytes) per process.
async fn sample(
    processes: Vec<(String, u32)>,
    duration: Duration,
) -> Vec<(String, Vec<(f64, u64)>)> {
    let started = Instant::now();
    let mut series: Vec<(String, Vec<(f64, u64)>)> = processes
        .iter()
        .map(|(name, _)| (name.clone(), Vec::new()))
        .collect();
    while started.elapsed() < duration {
        for ((_, pid), (_, samples)) in processes.iter().zip(&mut series) {
            if let Ok(rss) = crate::fleet::rss_bytes(*pid) {
                samples.push((started.elapsed().as_secs_f64(), rss));
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    series
}

//! The table printed at the end of a run: each figure, and each ratio with the benchmark
//! issue's target and whether it was met. Ratios are taken within the run, against baselines
//! measured on the same machine minutes apart, because absolute rates here move ±20% between
//! runs.

use serde_json::Value;

/// A printed line: what, its value, its unit, and the target it is held to.
struct Row {
    name: String,
    value: Option<f64>,
    unit: &'static str,
    target: Option<Target>,
}

/// A bound and whether the value keeps it.
struct Target {
    text: &'static str,
    met: bool,
}

fn at(report: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .fold(report, |v, k| match k.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[*k],
        })
        .as_f64()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b)
}

fn figure(name: impl Into<String>, value: Option<f64>, unit: &'static str) -> Row {
    Row {
        name: name.into(),
        value,
        unit,
        target: None,
    }
}

fn at_least(
    name: impl Into<String>,
    value: Option<f64>,
    unit: &'static str,
    text: &'static str,
    bound: f64,
) -> Row {
    Row {
        target: value.map(|v| Target {
            text,
            met: v >= bound,
        }),
        ..figure(name, value, unit)
    }
}

fn at_most(
    name: impl Into<String>,
    value: Option<f64>,
    unit: &'static str,
    text: &'static str,
    bound: f64,
) -> Row {
    Row {
        target: value.map(|v| Target {
            text,
            met: v <= bound,
        }),
        ..figure(name, value, unit)
    }
}

/// Prints the figures and the ratios the step hot path issue targets.
pub fn print_table(report: &Value) {
    let n = |path: &[&str]| at(report, path);
    let raw = n(&["raw_jetstream", "msgs_per_sec"]);
    let rr = n(&["raw_jetstream_request_reply", "p50_ms"]);
    let bare = n(&["bare_http", "requests_per_sec"]);
    let bullmq = n(&["bullmq", "jobs_per_sec"]);
    let one = n(&["piecework_1_worker", "steps_per_sec"]);
    let two = n(&["piecework_2_workers", "steps_per_sec"]);
    let best = one.zip(two).map(|(a, b)| a.max(b)).or(one).or(two);
    let cpu = n(&["piecework_1_worker", "worker_cpu_us_per_step"]);
    let dispatch = n(&["dispatch_unloaded", "p50_ms"]);
    let sync2 = n(&["sync_webhook", "0", "latency", "p50_ms"]);
    let sync64 = n(&["sync_webhook", "1", "requests_per_sec"]);
    let dev = n(&["dev_in_memory", "steps_per_sec"]);
    let dev_hook64 = n(&["dev_sync_webhook", "webhook", "1", "requests_per_sec"]);
    let dev_healthz64 = n(&["dev_sync_webhook", "healthz", "1", "requests_per_sec"]);
    let dev_hook2 = n(&["dev_sync_webhook", "webhook", "0", "latency", "p50_ms"]);
    let idle_mb = n(&["worker_memory", "idle_rss_mb"]);
    let loaded_mb = n(&["worker_memory", "loaded_rss_mb"]);
    let in_flight = n(&["worker_memory", "in_flight"]);
    let per_step_kb = loaded_mb
        .zip(idle_mb)
        .zip(in_flight)
        .filter(|(_, jobs)| *jobs > 0.0)
        .map(|((loaded, idle), jobs)| (loaded - idle) * 1024.0 / jobs);

    let mut rows = vec![
        figure(
            "baseline: raw JetStream (publish + pull + ack)",
            raw,
            "msg/s",
        ),
        figure("baseline: raw JetStream request/reply p50", rr, "ms"),
        figure("baseline: bare HTTP server, 64 clients", bare, "req/s"),
        figure("baseline: BullMQ (same Redis)", bullmq, "jobs/s"),
        figure("piecework 3-step runs, 1 worker", one, "steps/s"),
        figure("piecework 3-step runs, 2 workers", two, "steps/s"),
        at_least(
            "  steps/s / raw JetStream msg/s",
            ratio(best, raw),
            "x",
            ">= 1.0",
            1.0,
        ),
        at_least(
            "  steps/s / BullMQ jobs/s",
            ratio(best, bullmq),
            "x",
            ">= 10",
            10.0,
        ),
        at_most("  worker CPU per step, 1 worker", cpu, "us", "<= 15", 15.0),
        figure(
            "  worker CPU per step, 2 workers",
            n(&["piecework_2_workers", "worker_cpu_us_per_step"]),
            "us",
        ),
        figure("step dispatch p50, one run at a time", dispatch, "ms"),
        at_most(
            "  / raw JetStream request/reply p50",
            ratio(dispatch, rr),
            "x",
            "<= 2",
            2.0,
        ),
        figure(
            "  step dispatch p99, one run at a time",
            n(&["dispatch_unloaded", "p99_ms"]),
            "ms",
        ),
        figure(
            "  first step only (a JetStream hop), p50",
            n(&["dispatch_unloaded", "first_step", "p50_ms"]),
            "ms",
        ),
        figure("sync webhook, 64 clients", sync64, "req/s"),
        at_least(
            "  / bare HTTP req/s",
            ratio(sync64, bare),
            "x",
            ">= 0.5",
            0.5,
        ),
        figure("sync webhook, 2 clients, p50", sync2, "ms"),
        at_most(
            "  / raw JetStream request/reply p50",
            ratio(sync2, rr),
            "x",
            "<= 4",
            4.0,
        ),
        figure("piecework dev (in memory)", dev, "steps/s"),
        at_least(
            "  / raw JetStream msg/s",
            ratio(dev, raw),
            "x",
            ">= 2.5",
            2.5,
        ),
        figure("dev sync webhook, 64 clients", dev_hook64, "req/s"),
        at_least(
            "  / the same server's /healthz req/s",
            ratio(dev_hook64, dev_healthz64),
            "x",
            ">= 0.25",
            0.25,
        ),
        at_most(
            "dev sync webhook, 2 clients, p50",
            dev_hook2,
            "ms",
            "<= 0.2",
            0.2,
        ),
        figure(
            "pieces: out of process / in the binary",
            n(&["out_of_process", "steps_ratio"]),
            "x",
        ),
        at_most(
            "  extra CPU per step out of process",
            n(&["out_of_process", "extra_cpu_us_per_step"]),
            "us",
            "<= 30",
            30.0,
        ),
        figure(
            "pieces: TypeScript (Node host) / in the binary",
            n(&["out_of_process", "typescript_steps_ratio"]),
            "x",
        ),
        figure(
            "  extra CPU per step in TypeScript",
            n(&["out_of_process", "typescript_extra_cpu_us_per_step"]),
            "us",
        ),
        at_most("worker RSS, idle", idle_mb, "MB", "<= 20", 20.0),
        at_most(
            "  memory per in-flight step",
            per_step_kb,
            "KB",
            "<= 8",
            8.0,
        ),
        figure(
            "  of which a bare HTTP client's per held request",
            n(&["worker_memory", "bare_client_kib_per_request"]),
            "KB",
        ),
        figure(
            format!(
                "scheduler, {} polling flows: tick jitter p50",
                report["scheduler_scale"]["flows"]
            ),
            n(&["scheduler_scale", "tick_jitter", "p50_ms"]),
            "ms",
        ),
        at_most(
            "  tick jitter p99",
            n(&["scheduler_scale", "tick_jitter", "p99_ms"]),
            "ms",
            "<= 100",
            100.0,
        ),
        at_most(
            "  scheduler CPU",
            n(&["scheduler_scale", "scheduler_cpu_percent"]),
            "% core",
            "< 100",
            100.0,
        ),
    ];
    for process in report["idle_fleet"]["processes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = process["name"].as_str().unwrap_or_default();
        rows.push(at_most(
            format!("idle {name}: CPU"),
            process["cpu_percent"].as_f64(),
            "% core",
            "<= 1",
            1.0,
        ));
        let ops = process["redis_ops_per_sec"]
            .as_f64()
            .zip(process["nats_ops_per_sec"].as_f64())
            .map(|(r, n)| r + n);
        rows.push(at_most(
            "  Redis + NATS operations",
            ops,
            "ops/s",
            "<= 20",
            20.0,
        ));
    }

    println!("\n{:<48} {:>12}  {:<7} target", "figure", "value", "unit");
    println!("{}", "-".repeat(84));
    for row in rows {
        let value = row.value.map_or_else(
            || "n/a".to_owned(),
            |v| {
                if v.abs() < 10.0 {
                    format!("{v:.3}")
                } else {
                    format!("{v:.1}")
                }
            },
        );
        let target = row.target.map_or_else(String::new, |t| {
            format!("{} {}", t.text, if t.met { "met" } else { "NOT met" })
        });
        println!("{:<48} {value:>12}  {:<7} {target}", row.name, row.unit);
    }
}

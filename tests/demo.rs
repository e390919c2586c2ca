//! The README's demo command, as a user runs it: `piecework dev` as a real process. The shipped
//! schedule flow must produce successful runs visible in the feed and at `GET /v1/runs`, and
//! Ctrl-C (SIGINT) must stop it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn piecework_dev_runs_the_demo_flows_and_stops_on_ctrl_c() {
    demo(&[]);
}

#[test]
fn piecework_dev_runs_the_demo_on_real_nats_and_redis() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (nats, redis) = runtime.block_on(async {
        let nats = piecework_testkit::NatsServer::start().await.unwrap();
        let redis = piecework_testkit::RedisServer::start().await.unwrap();
        (nats, redis)
    });
    demo(&["--nats", &nats.url(), "--redis", &redis.url()]);
    // The runs are in Redis, where separate processes would see them.
    let runs: u64 = runtime.block_on(async {
        let client = ::redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        ::redis::cmd("ZCARD")
            .arg("pw:runs:flow:heartbeat")
            .query_async(&mut conn)
            .await
            .unwrap()
    });
    assert!(runs >= 1);
}

/// Runs `piecework dev` with `args`, waits for a successful heartbeat run in the feed and at
/// `GET /v1/runs`, then stops it with SIGINT.
fn demo(args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_piecework"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("piecework starts");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Generous: the first start builds the demo piece, slow on a loaded CI machine.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut addr = None;
    let mut feed_saw_success = false;
    let mut tickets_assigned = false;
    let mut printed = Vec::new();
    while Instant::now() < deadline && !(addr.is_some() && feed_saw_success && tickets_assigned) {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        if let Some(rest) = line.trim_start().strip_prefix("api") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("heartbeat") && line.contains("run succeeded") {
            feed_saw_success = true;
        }
        if line.contains("auto-assign") && line.contains("run succeeded") {
            tickets_assigned = true;
        }
        printed.push(line);
    }
    let addr = addr.unwrap_or_else(|| {
        panic!(
            "the api address is printed; it printed:\n{}",
            printed.join("\n")
        )
    });
    assert!(
        feed_saw_success,
        "a heartbeat run succeeded in the feed within 120s"
    );
    assert!(
        tickets_assigned,
        "the auto-assign demo assigned a ticket within 120s; it printed:\n{}",
        printed.join("\n")
    );

    let runs: Value =
        reqwest::blocking_get(&format!("{addr}/v1/runs?flow=heartbeat&status=succeeded"));
    assert!(!runs["runs"].as_array().unwrap().is_empty(), "{runs}");

    // SIGINT, as Ctrl-C sends it.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit on Ctrl-C, got {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "piecework did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

mod reqwest {
    /// A tiny blocking GET on a fresh runtime, to keep this test synchronous like a user's shell.
    pub fn blocking_get(url: &str) -> serde_json::Value {
        piecework_sdk::http::install_crypto_provider();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { ::reqwest::get(url).await.unwrap().json().await.unwrap() })
    }
}

//! A fleet of real piecework processes on real nats-server and redis-server (testkit), and an
//! HTTP target whose behaviour tests control, for the end-to-end tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::any;
use piecework_testkit::{NatsServer, RedisServer, free_port};
use serde_json::{Value, json};
use tempfile::TempDir;

/// Runs `piecework` with `args` as a user would in a shell: without what `cargo test` adds to
/// the environment (which would make the cargo it may run rebuild everything).
pub fn piecework_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_piecework"));
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                name.as_str(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            command.env_remove(name);
        }
    }
    command
}

/// A directory holding the `my-company-api` bundle, built once per test binary with the real
/// `piecework piece build` (dev profile) from `pieces/custom/my-company-api`.
/// `piecework dev` as a real process on a free port, killed when dropped.
pub struct Dev {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Dev {
    /// Starts `piecework dev` with `args` and waits until its api answers `/readyz`.
    pub async fn start(args: &[&str]) -> Dev {
        Dev::start_with(args, &[]).await
    }

    /// [`Dev::start`] with environment variables set.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Dev {
        use std::io::{BufRead, BufReader};
        let mut child = piecework_command()
            .args(["dev", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("piecework dev starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The feed goes on; once the address is read, nobody listens.
                let _ = tx.send(line);
            }
        });
        // Generous: the first start builds the demo piece, slow on a loaded CI machine.
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = loop {
            assert!(
                Instant::now() < deadline,
                "piecework dev printed no api address"
            );
            let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if let Some(rest) = line.trim_start().strip_prefix("api")
                && let Some(url) = rest.split_whitespace().next()
            {
                break url.trim_end_matches('/').to_owned();
            }
        };
        let dev = Dev { child, url };
        let ready = format!("{}/healthz", dev.url);
        loop {
            let answer = client().get(&ready).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "piecework dev is not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        dev
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn demo_pieces() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("demo-pieces")
                .tempdir()
                .unwrap()
                .keep();
            let source = concat!(env!("CARGO_MANIFEST_DIR"), "/pieces/custom/my-company-api");
            let out = piecework_command()
                .args(["piece", "build", source, "--profile", "dev", "--out"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "piece build failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

/// The `my-company-api` bundle file.
pub fn demo_bundle() -> PathBuf {
    let dir = demo_pieces();
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".piece.tgz"))
        .expect("the demo bundle was built")
}

/// The `probe` test piece as a bundle of `version` (one build, any number of versions).
pub async fn probe_bundle(version: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("probe");
    std::fs::copy(
        piecework_testkit::binaries::binary("piecework-piece-probe", "probe"),
        &program,
    )
    .unwrap();
    std::fs::write(dir.path().join("version.txt"), version).unwrap();
    let options = piecework_host::build::Options {
        files: vec![piecework_bundle::File {
            path: "version.txt".into(),
            contents: version.as_bytes().to_vec(),
            executable: false,
        }],
        ..Default::default()
    };
    piecework_host::build::bundle_executable(&program, options)
        .await
        .unwrap()
        .0
}

/// Writes `bytes` as a bundle file into `dir` the safe way (a hidden name, then a rename).
pub fn drop_bundle(dir: &std::path::Path, bytes: &[u8]) -> PathBuf {
    let manifest = piecework_bundle::Bundle::read(bytes).unwrap().manifest;
    let path = dir.join(manifest.file_name());
    let staging = dir.join(format!(".{}", manifest.file_name()));
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, &path).unwrap();
    path
}

/// The bootstrap admin key (`PW_API_KEY`) of every fleet's processes.
pub const ADMIN_KEY: &str = "fleet-bootstrap-admin-key-0123456789";

/// An HTTP client that sends [`ADMIN_KEY`] unless a request says otherwise (an open API, as
/// `piecework dev`'s, ignores it).
pub fn client() -> reqwest::Client {
    piecework_sdk::http::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {ADMIN_KEY}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Real servers plus the piecework processes a test starts.
pub struct Fleet {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub dir: TempDir,
    config: PathBuf,
    processes: HashMap<String, Child>,
    pub api: String,
    /// The health port of the api `api` names: `/healthz`, `/readyz`, key-less `/metrics`.
    pub api_health: String,
    /// `PW_ENCRYPTION_KEY` of every process.
    pub encryption_key: String,
    /// More environment for every process started from now on.
    pub env: Vec<(String, String)>,
}

impl Fleet {
    /// The pieces directory every process of the fleet watches (empty at first).
    pub fn pieces_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("pieces");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Puts the `my-company-api` bundle into the fleet's pieces directory.
    pub fn with_demo_piece(&self) {
        std::fs::copy(
            demo_bundle(),
            self.pieces_dir().join(demo_bundle().file_name().unwrap()),
        )
        .unwrap();
    }
}

impl Fleet {
    /// Starts nats-server and redis-server; `config` is the TOML every process reads.
    pub async fn start(config: &str) -> Fleet {
        Self::start_with(config, piecework_testkit::Options::default()).await
    }

    /// [`Fleet::start`] on servers secured as `options` say: with TLS, every process trusts
    /// the servers' CA (`tls_ca_file` is added to `config`, which must then have no `[nats]`
    /// or `[redis]` section); passwords travel in the URLs.
    pub async fn start_with(config: &str, options: piecework_testkit::Options) -> Fleet {
        let nats = NatsServer::start_with(options.clone())
            .await
            .expect("nats-server starts");
        let redis = RedisServer::start_with(options)
            .await
            .expect("redis-server starts");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("piecework.toml");
        let mut config = config.to_owned();
        for (section, server) in [("nats", nats.tls()), ("redis", redis.tls())] {
            if let Some(tls) = server {
                config.push_str(&format!(
                    "\n[{section}]\ntls_ca_file = {:?}\n",
                    tls.ca.display().to_string()
                ));
            }
        }
        std::fs::write(&path, config).unwrap();
        Fleet {
            nats,
            redis,
            dir,
            config: path,
            processes: HashMap::new(),
            api: String::new(),
            api_health: String::new(),
            encryption_key: piecework_runtime::secrets::Keyring::generate_spec("k1"),
            env: Vec::new(),
        }
    }

    fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let pieces = self.pieces_dir();
        let cache = self.dir.path().join(format!("cache-{name}"));
        let child = piecework_command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("PW_PIECES_DIR", pieces)
            .env("PW_PIECES_CACHE", cache)
            .env("PW_NATS_URL", self.nats.url())
            .env("PW_REDIS_URL", self.redis.url())
            .env("PW_ENCRYPTION_KEY", &self.encryption_key)
            .env("PW_API_KEY", ADMIN_KEY)
            // The targets of tests listen on loopback, which the egress guard denies by default;
            // a test of the guard itself sets `PW_EGRESS_ALLOW` to "" in `env`.
            .env("PW_EGRESS_ALLOW", "127.0.0.0/8,::1,localhost")
            .env("PW_LOG", "info")
            .env("PW_LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("piecework starts");
        self.processes.insert(name.to_owned(), child);
    }

    /// Starts `piecework api` and waits until it is ready; it is the one `Fleet::api` names.
    pub async fn start_api(&mut self) -> String {
        let (api, health) = self.start_api_with_health("api").await;
        self.api = api;
        self.api_health = health;
        self.api.clone()
    }

    /// Starts another `piecework api` process, named `name`; returns its base URL.
    pub async fn start_api_as(&mut self, name: &str) -> String {
        self.start_api_with_health(name).await.0
    }

    /// Starts an api; returns its base URL and its health base URL.
    async fn start_api_with_health(&mut self, name: &str) -> (String, String) {
        let (port, health) = self
            .spawn_ready(name, |port, health| {
                let args = ["api", "--listen", &format!("127.0.0.1:{port}")]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(["--health-listen".to_owned(), format!("127.0.0.1:{health}")])
                    .collect();
                (args, format!("http://127.0.0.1:{port}/readyz"))
            })
            .await;
        (
            format!("http://127.0.0.1:{port}"),
            format!("http://127.0.0.1:{health}"),
        )
    }

    /// Starts `piecework worker --id <id>`, waits until it consumes; returns its `/readyz` URL.
    pub async fn start_worker(&mut self, id: &str, extra: &[&str]) -> String {
        let (port, _) = self
            .spawn_ready(id, |port, _| {
                let mut args: Vec<String> = ["worker", "--id", id, "--health-listen"]
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                args.push(format!("127.0.0.1:{port}"));
                args.extend(extra.iter().map(|a| (*a).to_owned()));
                (args, format!("http://127.0.0.1:{port}/readyz"))
            })
            .await;
        format!("http://127.0.0.1:{port}/readyz")
    }

    /// Starts `piecework scheduler`, waits until it is ready; returns its `/readyz` URL.
    pub async fn start_scheduler(&mut self, name: &str) -> String {
        let (port, _) = self
            .spawn_ready(name, |port, _| {
                let args = vec![
                    "scheduler".to_owned(),
                    "--health-listen".to_owned(),
                    format!("127.0.0.1:{port}"),
                ];
                (args, format!("http://127.0.0.1:{port}/readyz"))
            })
            .await;
        format!("http://127.0.0.1:{port}/readyz")
    }

    /// Starts process `name` with the arguments and readiness URL `make(port, port)` builds
    /// for two free ports, and waits until it is ready; returns the ports. A port found free
    /// can be taken by another test's process before this one binds it: then it starts again
    /// on other ports.
    async fn spawn_ready(
        &mut self,
        name: &str,
        make: impl Fn(u16, u16) -> (Vec<String>, String),
    ) -> (u16, u16) {
        for attempt in 1.. {
            let ports = (free_port(), free_port());
            let (args, ready) = make(ports.0, ports.1);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.spawn(name, &args);
            match self.wait_ready(name, &ready).await {
                Ok(()) => return ports,
                Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("{name} exited:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Saves a connection through the API.
    pub async fn save_connection(&self, name: &str, piece: &str, values: Value) {
        let response = client()
            .post(format!("{}/v1/connections", self.api))
            .json(&json!({ "name": name, "piece": piece, "values": values }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "saving connection {name} failed: {status} {}",
            response.text().await.unwrap()
        );
    }

    /// Saves connection `tickets` of `my-company-api` to the mock ticketing API at `url`
    /// with API key `key`.
    pub async fn save_tickets_connection(&self, key: &str, url: &str) {
        self.save_connection(
            "tickets",
            "my-company-api",
            json!({ "api_key": key, "environment": "dev", "base_url": url }),
        )
        .await;
    }

    /// Every process's log, concatenated.
    pub fn all_logs(&self) -> String {
        let mut names: Vec<&String> = self.processes.keys().collect();
        names.sort();
        names.into_iter().map(|name| self.logs(name)).collect()
    }

    /// Waits until `url` answers; the process's log if it exited first.
    async fn wait_ready(&mut self, name: &str, url: &str) -> Result<(), String> {
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = http.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self
                .processes
                .get_mut(name)
                .and_then(|c| c.try_wait().unwrap())
            {
                return Err(format!("exit {status}:\n{}", self.logs(name)));
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready:\n{}",
                self.logs(name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no cleanup, like a crashed host.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.processes.remove(name) {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let mut child = self.processes.remove(name).expect("a running process");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    pub fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The last lines of every process's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut names: Vec<&String> = self.processes.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let logs = self.logs(name);
                let lines: Vec<&str> = logs.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!("--- {name} ---\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn apply(&self, flow: &str) {
        let response = client()
            .post(format!("{}/v1/flows", self.api))
            .body(flow.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert!(
            status.is_success(),
            "apply failed: {status} {}",
            response.text().await.unwrap()
        );
    }

    pub async fn webhook(&self, flow: &str, body: Value) -> String {
        let response = client()
            .post(format!("{}/v1/webhooks/{flow}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        response.json::<Value>().await.unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `GET` an API path (with the admin key), as JSON.
    pub async fn get(&self, path: &str) -> Value {
        let response = client()
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The API's `/metrics` text (with the admin key).
    pub async fn metrics(&self) -> String {
        get_text(&format!("{}/metrics", self.api)).await
    }

    /// The runs of `flow`, newest first.
    pub async fn runs_of(&self, flow: &str) -> Vec<Value> {
        let runs = self.get(&format!("/v1/runs?flow={flow}")).await;
        runs["runs"].as_array().cloned().unwrap_or_default()
    }

    pub async fn run(&self, id: &str) -> Value {
        let response = client()
            .get(format!("{}/v1/runs/{id}", self.api))
            .send()
            .await
            .unwrap();
        response.json::<Value>().await.unwrap()["run"].clone()
    }

    /// Waits until the run has ended (neither running nor waiting); returns it.
    pub async fn finished(&self, id: &str, timeout: Duration) -> Value {
        self.until_run(id, timeout, |s| s != "running" && s != "waiting")
            .await
    }

    /// Waits until the run's status is `status`; returns it.
    pub async fn run_in(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.until_run(id, timeout, |s| s == status).await
    }

    async fn until_run(&self, id: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await;
            if run["status"].as_str().is_some_and(&done) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} still running: {run}\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// Every entry of a Redis stream, as field maps.
    pub async fn stream(&self, key: &str) -> Vec<HashMap<String, String>> {
        let mut conn = self.redis().await;
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| {
                entry
                    .map
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            redis::from_redis_value_ref::<String>(v).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, mut child) in self.processes.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The body of `GET url` (with the admin key), as text.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// An HTTP service flows call, with behaviour the test controls.
#[derive(Clone, Default)]
pub struct Target {
    pub url: String,
    state: Arc<Mutex<TargetState>>,
}

#[derive(Default)]
struct TargetState {
    /// When each key was called.
    hits: HashMap<String, Vec<Instant>>,
    broken: HashMap<String, bool>,
}

impl Target {
    /// `/ok`: 200. `/flaky/{key}?fail=N`: 503 for the first N calls. `/slow/{key}?ms=M`:
    /// answers after M ms. `/toggle/{key}`: 500 while broken. `/echo`: 200 with the request's
    /// headers; `/reject`: 400 quoting the `Authorization` header — the careless upstreams
    /// that put a caller's credentials into what piecework records. `/big/{key}?bytes=N`: a
    /// JSON string of N bytes.
    pub async fn start() -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Target {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Target::default()
        };
        let app = Router::new()
            .route("/ok", any(|| async { axum::Json(json!({"ok": true})) }))
            .route("/flaky/{key}", any(flaky))
            .route("/slow/{key}", any(slow))
            .route("/toggle/{key}", any(toggle))
            .route("/echo", any(echo_headers))
            .route("/reject", any(reject_quoting_authorization))
            .route("/big/{key}", any(big))
            .with_state(target.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        target
    }

    fn hit(&self, key: &str) -> usize {
        let mut state = self.state.lock().unwrap();
        let hits = state.hits.entry(key.to_owned()).or_default();
        hits.push(Instant::now());
        hits.len()
    }

    pub fn hits(&self, key: &str) -> Vec<Instant> {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    pub fn set_broken(&self, key: &str, broken: bool) {
        self.state
            .lock()
            .unwrap()
            .broken
            .insert(key.to_owned(), broken);
    }

    pub async fn wait_for_hits(&self, key: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.hits(key).len() < count {
            assert!(
                Instant::now() < deadline,
                "{key} got {} hits, wanted {count}",
                self.hits(key).len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn headers_json(headers: &axum::http::HeaderMap) -> Value {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn echo_headers(headers: axum::http::HeaderMap) -> axum::Json<Value> {
    axum::Json(json!({ "headers": headers_json(&headers) }))
}

async fn reject_quoting_authorization(headers: axum::http::HeaderMap) -> (StatusCode, String) {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    (
        StatusCode::BAD_REQUEST,
        format!("invalid credentials: {given}"),
    )
}

async fn flaky(
    State(target): State<Target>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, usize>>,
) -> (StatusCode, axum::Json<Value>) {
    let calls = target.hit(&key);
    if calls <= q.get("fail").copied().unwrap_or(0) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "try later"})),
        )
    } else {
        (StatusCode::OK, axum::Json(json!({"calls": calls})))
    }
}

async fn slow(
    State(target): State<Target>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, u64>>,
) -> axum::Json<Value> {
    let calls = target.hit(&key);
    tokio::time::sleep(Duration::from_millis(q.get("ms").copied().unwrap_or(1000))).await;
    axum::Json(json!({"calls": calls}))
}

async fn big(
    State(target): State<Target>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, usize>>,
) -> axum::Json<Value> {
    target.hit(&key);
    axum::Json(json!("x".repeat(q.get("bytes").copied().unwrap_or(0))))
}

async fn toggle(
    State(target): State<Target>,
    Path(key): Path<String>,
) -> (StatusCode, axum::Json<Value>) {
    target.hit(&key);
    let broken = target
        .state
        .lock()
        .unwrap()
        .broken
        .get(&key)
        .copied()
        .unwrap_or(false);
    if broken {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "broken"})),
        )
    } else {
        (StatusCode::OK, axum::Json(json!({"fixed": true})))
    }
}

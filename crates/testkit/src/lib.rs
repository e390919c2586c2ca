//! Real servers for tests: [`NatsServer`] (`nats-server -js`) and [`RedisServer`]
//! (`redis-server` with an append-only file), each on a free port in its own temp directory.
//!
//! Tests never use the instances on the standard ports: they start their own, and can stop,
//! kill and restart them (same port, same data directory) to prove what survives. Servers are
//! killed and their directories removed on drop. A missing binary is a clear error naming the
//! Debian package to install.
//!
//! [`Server::start_with`] starts one that requires TLS (certificates from [`tls`]) and a
//! password, as production installations do. [`NatsCluster`] and [`RedisCluster`] start
//! several nodes in one cluster, [`RedisSentinel`] a primary and a replica watched by
//! Sentinels, for tests that kill one.
//!
//! [`binaries`] builds the workspace's piece programs that tests run as real processes.

pub mod binaries;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error(
        "{binary} was not found on PATH or in /usr/sbin: install the Debian package `{package}` \
         (apt-get install {package}), or run scripts/test, which installs it"
    )]
    Missing {
        binary: &'static str,
        package: &'static str,
    },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: &'static str,
        source: std::io::Error,
    },
    #[error("{binary} did not become ready on port {port} within {timeout:?}; its log:\n{log}")]
    NotReady {
        binary: &'static str,
        port: u16,
        timeout: Duration,
        log: String,
    },
    #[error("temp dir: {0}")]
    Io(#[from] std::io::Error),
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds a server binary on PATH, or where Debian installs daemons.
fn find(binary: &'static str, package: &'static str) -> Result<PathBuf, TestkitError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or(TestkitError::Missing { binary, package })
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a free port")
}

/// A server process the kit owns.
struct Process {
    binary: &'static str,
    path: PathBuf,
    args: Vec<String>,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Process {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.binary))
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.path)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TestkitError::Spawn {
                binary: self.binary,
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&self, probe: impl AsyncFn(u16) -> bool) -> Result<(), TestkitError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if probe(self.port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(TestkitError::NotReady {
            binary: self.binary,
            port: self.port,
            timeout: READY_TIMEOUT,
            log: std::fs::read_to_string(self.log_path()).unwrap_or_default(),
        })
    }

    /// SIGKILL: the process gets no chance to clean up, like a crashed host.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, then waits for the process to exit (SIGKILL after 10s).
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

async fn port_open(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_ok()
}

async fn redis_pong(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

/// How a server is secured: TLS with the kit's certificates, and a password.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub tls: bool,
    pub password: Option<String>,
}

/// What a started server was secured with.
#[derive(Debug, Clone, Default)]
struct Setup {
    tls: Option<tls::TlsFiles>,
    password: Option<String>,
}

/// The user name the kit gives NATS when it sets a password.
pub const NATS_USER: &str = "piecework";

/// What differs between the servers the kit runs.
pub trait Kind {
    const BINARY: &'static str;
    /// The Debian package that installs `BINARY`.
    const PACKAGE: &'static str;
    const SCHEME: &'static str;
    /// The scheme of a TLS connection.
    const TLS_SCHEME: &'static str;
    fn args(port: u16, dir: &Path) -> Vec<String>;
    /// The arguments that turn TLS on (`files`) or set a password.
    fn secure_args(port: u16, tls: Option<&tls::TlsFiles>, password: Option<&str>) -> Vec<String>;
    /// The credentials part of a URL (`user:password@`) for `password`.
    fn userinfo(password: &str) -> String;
    /// Whether the server on `port` answers.
    fn ready(port: u16) -> impl Future<Output = bool> + Send;
}

/// `nats-server` with JetStream (file storage in its temp dir).
pub enum Nats {}

/// The monitoring port of a NATS server on `port`: a free port chosen from it, the same for
/// every restart.
fn monitor_port(port: u16) -> u16 {
    use std::sync::Mutex;
    static PORTS: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());
    let mut ports = PORTS.lock().unwrap();
    if let Some((_, monitor)) = ports.iter().find(|(p, _)| *p == port) {
        return *monitor;
    }
    let monitor = free_port();
    ports.push((port, monitor));
    monitor
}

impl Server<Nats> {
    /// The monitoring endpoint (`http://127.0.0.1:PORT`): `/varz`, `/connz`, `/jsz`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", monitor_port(self.process.port))
    }
}

impl Kind for Nats {
    const BINARY: &'static str = "nats-server";
    const PACKAGE: &'static str = "nats-server";
    const SCHEME: &'static str = "nats";
    const TLS_SCHEME: &'static str = "tls";

    /// With the HTTP monitoring endpoint on the next port (`/varz` for message counts).
    fn args(port: u16, dir: &Path) -> Vec<String> {
        let store = dir.join("jetstream").display().to_string();
        [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            &store,
            "-m",
            &monitor_port(port).to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn secure_args(_port: u16, tls: Option<&tls::TlsFiles>, password: Option<&str>) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(files) = tls {
            args.extend([
                "--tls".to_owned(),
                "--tlscert".to_owned(),
                files.server_cert.display().to_string(),
                "--tlskey".to_owned(),
                files.server_key.display().to_string(),
            ]);
        }
        if let Some(password) = password {
            args.extend([
                "--user".to_owned(),
                NATS_USER.to_owned(),
                "--pass".to_owned(),
                password.to_owned(),
            ]);
        }
        args
    }

    fn userinfo(password: &str) -> String {
        format!("{NATS_USER}:{password}@")
    }

    fn ready(port: u16) -> impl Future<Output = bool> + Send {
        port_open(port)
    }
}

/// `redis-server` with an fsync-always append-only file in its temp dir, so a restart keeps
/// everything that was acknowledged.
pub enum Redis {}

impl Kind for Redis {
    const BINARY: &'static str = "redis-server";
    const PACKAGE: &'static str = "redis-server";
    const SCHEME: &'static str = "redis";
    const TLS_SCHEME: &'static str = "rediss";

    fn args(port: u16, dir: &Path) -> Vec<String> {
        let dir = dir.display().to_string();
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// TLS on the port the server would have listened on in plain TCP (which is closed).
    fn secure_args(port: u16, tls: Option<&tls::TlsFiles>, password: Option<&str>) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(files) = tls {
            args.extend(
                [
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    &files.server_cert.display().to_string(),
                    "--tls-key-file",
                    &files.server_key.display().to_string(),
                    "--tls-ca-cert-file",
                    &files.ca.display().to_string(),
                    "--tls-auth-clients",
                    "optional",
                ]
                .map(str::to_owned),
            );
        }
        if let Some(password) = password {
            args.extend(["--requirepass".to_owned(), password.to_owned()]);
        }
        args
    }

    fn userinfo(password: &str) -> String {
        format!(":{password}@")
    }

    fn ready(port: u16) -> impl Future<Output = bool> + Send {
        redis_pong(port)
    }
}

pub type NatsServer = Server<Nats>;
pub type RedisServer = Server<Redis>;

/// A server on a free port in its own temp dir; killed and removed on drop.
pub struct Server<K: Kind> {
    process: Process,
    setup: Setup,
    kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Server<K> {
    pub async fn start() -> Result<Self, TestkitError> {
        Self::start_with(Options::default()).await
    }

    /// A server that requires TLS (with certificates from a fresh CA, [`Server::tls`]) and
    /// the password, as `options` say.
    pub async fn start_with(options: Options) -> Result<Self, TestkitError> {
        let path = find(K::BINARY, K::PACKAGE)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("pw-{}-", K::BINARY))
            .tempdir()?;
        let port = free_port();
        let setup = Setup {
            tls: if options.tls {
                Some(tls::certificates(dir.path())?)
            } else {
                None
            },
            password: options.password,
        };
        let mut args = K::args(port, dir.path());
        args.extend(K::secure_args(
            port,
            setup.tls.as_ref(),
            setup.password.as_deref(),
        ));
        let mut process = Process {
            binary: K::BINARY,
            path,
            args,
            port,
            dir,
            child: None,
        };
        process.spawn()?;
        let server = Self {
            process,
            setup,
            kind: std::marker::PhantomData,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> Result<(), TestkitError> {
        // A secured server does not answer a plain PING: an open port has to do.
        let plain = self.setup.tls.is_none() && self.setup.password.is_none();
        self.process
            .wait_ready(async |port| {
                if plain {
                    K::ready(port).await
                } else {
                    port_open(port).await
                }
            })
            .await
    }

    /// The URL clients connect with: the TLS scheme and the password when the server has
    /// them.
    pub fn url(&self) -> String {
        let scheme = if self.setup.tls.is_some() {
            K::TLS_SCHEME
        } else {
            K::SCHEME
        };
        let userinfo = self
            .setup
            .password
            .as_deref()
            .map(K::userinfo)
            .unwrap_or_default();
        format!("{scheme}://{userinfo}127.0.0.1:{}", self.process.port)
    }

    /// The certificates of a server started with TLS.
    pub fn tls(&self) -> Option<&tls::TlsFiles> {
        self.setup.tls.as_ref()
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn data_dir(&self) -> &Path {
        self.process.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Graceful stop (SIGTERM); Redis completes its append-only file.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts again on the same port with the same data directory.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.process.stop().await;
        self.process.spawn()?;
        self.wait_ready().await
    }
}

/// `nats-server`s in one JetStream cluster on loopback (`n0`, `n1`, …), each with its own
/// ports and store, for tests that kill a node (the stream leader) under load.
pub struct NatsCluster {
    nodes: Vec<Process>,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other and waits until JetStream has a meta leader.
    pub async fn start(size: usize) -> Result<Self, TestkitError> {
        let path = find(Nats::BINARY, Nats::PACKAGE)?;
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(size);
        for (i, (port, cluster)) in ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("pw-nats-cluster-")
                .tempdir()?;
            let mut args = Nats::args(*port, dir.path());
            args.extend(
                [
                    "--server_name",
                    &format!("n{i}"),
                    "--cluster_name",
                    "pw",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster}"),
                    "--routes",
                    &routes,
                ]
                .map(str::to_owned),
            );
            let mut process = Process {
                binary: Nats::BINARY,
                path: path.clone(),
                args,
                port: *port,
                dir,
                child: None,
            };
            process.spawn()?;
            nodes.push(process);
        }
        let cluster = Self { nodes };
        for i in 0..size {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// Waits until node `i` answers its health check, which in a cluster needs JetStream's
    /// meta leader.
    async fn wait_healthy(&self, i: usize) -> Result<(), TestkitError> {
        let node = &self.nodes[i];
        let monitor = monitor_port(node.port);
        node.wait_ready(async |_| healthz_ok(monitor).await).await
    }

    /// Every node's URL, comma-separated, as `PW_NATS_URL` takes them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `name`'s (`n1`) URL.
    pub fn node_url(&self, name: &str) -> String {
        format!("nats://127.0.0.1:{}", self.node(name).port)
    }

    fn node(&self, name: &str) -> &Process {
        let i: usize = name
            .trim_start_matches('n')
            .parse()
            .expect("a node name: n0, n1, …");
        &self.nodes[i]
    }

    /// SIGKILL of node `name`.
    pub async fn kill(&mut self, name: &str) {
        let i: usize = name.trim_start_matches('n').parse().expect("a node name");
        self.nodes[i].kill().await;
    }

    /// Starts node `name` again with its store, and waits until it is healthy.
    pub async fn restart(&mut self, name: &str) -> Result<(), TestkitError> {
        let i: usize = name.trim_start_matches('n').parse().expect("a node name");
        self.nodes[i].stop().await;
        self.nodes[i].spawn()?;
        self.wait_healthy(i).await
    }
}

/// `redis-server`s in one Redis Cluster on loopback: `primaries` primaries sharing the 16384
/// slots, each with `replicas_each` replicas, formed with `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<Process>,
}

impl RedisCluster {
    /// Starts the nodes, forms the cluster and waits until every node says it is `ok`.
    pub async fn start(primaries: usize, replicas_each: usize) -> Result<Self, TestkitError> {
        let cli = find("redis-cli", "redis-tools")?;
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas_each) {
            let node = redis_node(|port, dir| {
                let mut args = Redis::args(port, dir);
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        // Replicas sync at once, so a primary killed early has one to take
                        // over from it.
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(str::to_owned),
                );
                Ok(args)
            });
            nodes.push(node.await?);
        }
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args([
                "--cluster-replicas",
                &replicas_each.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| TestkitError::Spawn {
                binary: "redis-cli",
                source,
            })?;
        let cluster = Self { nodes };
        if !output.status.success() {
            return Err(TestkitError::NotReady {
                binary: "redis-cli",
                port: cluster.nodes[0].port,
                timeout: READY_TIMEOUT,
                log: String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr),
            });
        }
        // Ready when every node sees the cluster whole and every replica has its primary's
        // data (a replica that never synced cannot take over).
        for node in &cluster.nodes {
            let cli = cli.clone();
            node.wait_ready(async |port| {
                let ok = cluster_info(&cli, port)
                    .await
                    .is_some_and(|info| info.contains("cluster_state:ok"));
                let port = port.to_string();
                let synced = redis_cli(&cli, &["-p", &port, "info", "replication"])
                    .await
                    .is_some_and(|info| {
                        info.contains("role:master") || info.contains("master_link_status:up")
                    });
                ok && synced
            })
            .await?;
        }
        Ok(cluster)
    }

    /// Every node's URL, comma-separated, as `PW_REDIS_URL` takes them with
    /// `PW_REDIS_CLUSTER=true`.
    pub fn url(&self) -> String {
        redis_urls(&self.nodes)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of the primary that serves `key`'s slot now, as a live node sees it.
    pub async fn primary_of(&self, key: &str) -> Option<u16> {
        let cli = find("redis-cli", "redis-tools").ok()?;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let port = node.port.to_string();
            let slot = redis_cli(&cli, &["-p", &port, "cluster", "keyslot", key]).await;
            let nodes = redis_cli(&cli, &["-p", &port, "cluster", "nodes"]).await;
            let (Some(slot), Some(nodes)) = (slot, nodes) else {
                continue;
            };
            let slot: u16 = slot.trim().parse().ok()?;
            // `<id> <ip:port@bus> <flags> <primary> <sent> <received> <epoch> <link> <slots>…`
            return nodes.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let serves = fields.iter().skip(8).any(|range| {
                    let (from, to) = range.split_once('-').unwrap_or((range, range));
                    matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(from), Ok(to)) if (from..=to).contains(&slot))
                });
                let address = fields.get(1)?.split('@').next()?;
                serves.then(|| address.rsplit(':').next()?.parse().ok()).flatten()
            });
        }
        None
    }

    /// SIGKILL of the node on `port`.
    pub async fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill().await;
        }
    }
}

/// A Redis primary with one replica, watched by three Sentinels (quorum 2) as `pw`, on
/// loopback: a killed primary is failed over to the replica within a few seconds.
pub struct RedisSentinel {
    servers: Vec<Process>,
    sentinels: Vec<Process>,
}

impl RedisSentinel {
    /// The name the Sentinels know the primary by.
    pub const MASTER: &'static str = "pw";

    /// Starts the primary, its replica and the Sentinels, and waits until the replica has
    /// synced and every Sentinel sees the replica and the other Sentinels.
    pub async fn start() -> Result<Self, TestkitError> {
        let cli = find("redis-cli", "redis-tools")?;
        let fast_sync = || ["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let primary = redis_node(|port, dir| {
            let mut args = Redis::args(port, dir);
            args.extend(fast_sync());
            Ok(args)
        })
        .await?;
        let primary_port = primary.port;
        let replica = redis_node(|port, dir| {
            let mut args = Redis::args(port, dir);
            args.extend(fast_sync());
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary_port.to_string(),
            ]);
            Ok(args)
        })
        .await?;
        let servers = vec![primary, replica];
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let sentinel = redis_node(|port, dir| {
                // A Sentinel rewrites its configuration file: it lives in the node's directory.
                let conf = dir.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {master} 127.0.0.1 {primary_port} 2\nsentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 5000\nsentinel parallel-syncs {master} 1\n",
                        dir = dir.display(),
                        master = Self::MASTER,
                    ),
                )?;
                Ok(vec![conf.display().to_string(), "--sentinel".to_owned()])
            });
            sentinels.push(sentinel.await?);
        }
        let setup = Self { servers, sentinels };
        let replica = setup.servers[1].port.to_string();
        setup.servers[1]
            .wait_ready(async |_| {
                redis_cli(&cli, &["-p", &replica, "info", "replication"])
                    .await
                    .is_some_and(|info| info.contains("master_link_status:up"))
            })
            .await?;
        for sentinel in &setup.sentinels {
            let port = sentinel.port.to_string();
            sentinel
                .wait_ready(async |_| {
                    let master =
                        redis_cli(&cli, &["-p", &port, "sentinel", "master", Self::MASTER])
                            .await
                            .unwrap_or_default();
                    // `redis-cli` prints the reply's fields one per line: name, then value.
                    let field = |name: &str| {
                        let mut lines = master.lines();
                        lines.find(|l| *l == name)?;
                        lines.next().and_then(|v| v.parse::<u32>().ok())
                    };
                    field("num-slaves") == Some(1) && field("num-other-sentinels") == Some(2)
                })
                .await?;
        }
        Ok(setup)
    }

    /// The Sentinels' URLs, comma-separated, as `PW_REDIS_URL` takes them with
    /// `PW_REDIS_SENTINEL_MASTER`.
    pub fn url(&self) -> String {
        redis_urls(&self.sentinels)
    }

    /// The port of the primary as the Sentinels name it now.
    pub async fn primary(&self) -> Option<u16> {
        let cli = find("redis-cli", "redis-tools").ok()?;
        for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
            let port = sentinel.port.to_string();
            let args = [
                "-p",
                &port,
                "sentinel",
                "get-master-addr-by-name",
                Self::MASTER,
            ];
            if let Some(answer) = redis_cli(&cli, &args).await {
                return answer.lines().nth(1)?.trim().parse().ok();
            }
        }
        None
    }

    /// SIGKILL of the primary the Sentinels name now; returns its port.
    pub async fn kill_primary(&mut self) -> Option<u16> {
        let port = self.primary().await?;
        let server = self.servers.iter_mut().find(|s| s.port == port)?;
        server.kill().await;
        Some(port)
    }
}

/// Starts a `redis-server` with `args(port, dir)` on a free port in a directory of its own,
/// and waits until it answers.
async fn redis_node(
    args: impl FnOnce(u16, &Path) -> Result<Vec<String>, TestkitError>,
) -> Result<Process, TestkitError> {
    let dir = tempfile::Builder::new()
        .prefix("pw-redis-node-")
        .tempdir()?;
    let port = free_port();
    let mut process = Process {
        binary: Redis::BINARY,
        path: find(Redis::BINARY, Redis::PACKAGE)?,
        args: args(port, dir.path())?,
        port,
        dir,
        child: None,
    };
    process.spawn()?;
    process.wait_ready(redis_pong).await?;
    Ok(process)
}

/// The URLs of `nodes`, comma-separated.
fn redis_urls(nodes: &[Process]) -> String {
    nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect::<Vec<_>>()
        .join(",")
}

/// `CLUSTER INFO` of the node on `port`, through `redis-cli`.
async fn cluster_info(cli: &Path, port: u16) -> Option<String> {
    redis_cli(cli, &["-p", &port.to_string(), "cluster", "info"]).await
}

/// What `redis-cli ARGS` prints, if it succeeds.
async fn redis_cli(cli: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(cli)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether the NATS monitoring endpoint on `port` says the server (and its JetStream) is
/// healthy.
async fn healthz_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    let request = b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer));
    let status_ok = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer);
        text.lines()
            .next()
            .is_some_and(|line| line.contains(" 200 "))
    };
    matches!(read.await, Ok(Ok(_))) && status_ok(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn servers_start_stop_and_restart_on_their_port() {
        let mut nats = NatsServer::start().await.unwrap();
        let mut redis = RedisServer::start().await.unwrap();
        assert!(port_open(nats.port()).await);
        assert!(redis_pong(redis.port()).await);
        nats.stop().await;
        redis.kill().await;
        assert!(!port_open(nats.port()).await);
        assert!(!redis_pong(redis.port()).await);
        nats.restart().await.unwrap();
        redis.restart().await.unwrap();
        assert!(port_open(nats.port()).await);
        assert!(redis_pong(redis.port()).await);
    }

    #[test]
    fn a_missing_binary_names_the_package() {
        let err = find("definitely-not-installed-pw", "some-package").unwrap_err();
        assert!(
            err.to_string().contains("apt-get install some-package"),
            "{err}"
        );
    }
}

//! piecework processes started by the harness, the way an installation runs them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use piecework_testkit::free_port;

/// Where the infrastructure is, for every process.
#[derive(Debug, Clone)]
pub struct Infra {
    pub nats: String,
    pub redis: String,
    pub key: String,
}

/// One running `piecework` process; killed when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    /// Its `/readyz`.
    pub ready: String,
    log: PathBuf,
}

/// The `piecework` binary next to this one (`cargo build --bins` builds both).
pub fn binary() -> anyhow::Result<PathBuf> {
    sibling("piecework")
}

/// A program built next to this one.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let here = std::env::current_exe()?;
    let bin = here.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release -p piecework -p piecework-bench -p piecework-piece-probe`, as `just bench` does)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Process {
    /// `piecework worker` with `concurrency` slots.
    pub async fn worker(infra: &Infra, id: &str, concurrency: usize) -> anyhow::Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port());
        let concurrency = concurrency.to_string();
        Self::start(
            infra,
            id,
            &[
                "worker",
                "--id",
                id,
                "--concurrency",
                &concurrency,
                "--health-listen",
                &listen,
            ],
            format!("http://{listen}/readyz"),
        )
        .await
    }

    /// `piecework api`; returns it with its base URL.
    pub async fn api(infra: &Infra) -> anyhow::Result<(Self, String)> {
        let listen = format!("127.0.0.1:{}", free_port());
        let health = format!("127.0.0.1:{}", free_port());
        let base = format!("http://{listen}");
        let process = Self::start(
            infra,
            "api",
            &["api", "--listen", &listen, "--health-listen", &health],
            format!("{base}/readyz"),
        )
        .await?;
        Ok((process, base))
    }

    /// `piecework scheduler`.
    pub async fn scheduler(infra: &Infra, name: &str) -> anyhow::Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port());
        Self::start(
            infra,
            name,
            &["scheduler", "--health-listen", &listen],
            format!("http://{listen}/readyz"),
        )
        .await
    }

    /// `piecework dev` on the embedded in-memory bus and store, without the example flows;
    /// returns it with its base URL.
    pub async fn dev() -> anyhow::Result<(Self, String)> {
        let listen = format!("127.0.0.1:{}", free_port());
        let base = format!("http://{listen}");
        let process = Self::spawn(
            None,
            "dev",
            &["dev", "--no-examples", "--quiet", "--listen", &listen],
            format!("{base}/readyz"),
        )
        .await?;
        Ok((process, base))
    }

    async fn start(
        infra: &Infra,
        name: &str,
        args: &[&str],
        ready: String,
    ) -> anyhow::Result<Self> {
        Self::spawn(Some(infra), name, args, ready).await
    }

    /// Starts `piecework ARGS` on `infra` (none: the embedded default) and waits until ready.
    async fn spawn(
        infra: Option<&Infra>,
        name: &str,
        args: &[&str],
        ready: String,
    ) -> anyhow::Result<Self> {
        let log =
            std::env::temp_dir().join(format!("piecework-bench-{name}-{}.log", std::process::id()));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(binary()?);
        command.env_remove("PW_NATS_URL").env_remove("PW_REDIS_URL");
        if let Some(infra) = infra {
            command
                .env("PW_NATS_URL", &infra.nats)
                .env("PW_REDIS_URL", &infra.redis)
                .env("PW_ENCRYPTION_KEY", &infra.key);
        }
        let child = command
            .args(args)
            // Measure the runtime, not its guard rails.
            .env("PW_WEBHOOK_RATE", "0")
            .env("PW_WEBHOOK_RATE_PER_FLOW", "0")
            // The memory scenario's endpoint listens on loopback, which the egress guard denies
            // by default.
            .env("PW_EGRESS_ALLOW", "127.0.0.0/8")
            // As deployed: the default log level, JSON lines to a file.
            .env_remove("PW_LOG")
            .env_remove("RUST_LOG")
            .env_remove("PW_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut process = Self {
            name: name.to_owned(),
            child,
            ready,
            log,
        };
        process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = http.get(&self.ready).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status}: {}", self.name, self.logs());
            }
            if Instant::now() > deadline {
                bail!("{} not ready after 60s: {}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU time (user + system) the process has used, from `/proc`.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.child.id())
    }

    /// CPU time of the process and of its children (its piece processes), living or reaped.
    pub fn cpu_seconds_with_children(&self) -> anyhow::Result<f64> {
        let pid = self.child.id();
        let mut total = cpu_seconds(pid)? + reaped_children_cpu_seconds(pid)?;
        for child in children_of(pid) {
            total += cpu_seconds(child).unwrap_or(0.0);
        }
        Ok(total)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, from `/proc`.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.child.id())
    }
}

/// Resident memory of process `pid`, from `/proc`.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// User + system CPU seconds of process `pid` (`/proc/<pid>/stat`, fields 14 and 15).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // Fields 14 and 15 of the file are the 12th and 13th after the name.
    Ok((ticks(11)? + ticks(12)?) / CLOCK_TICKS)
}

fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    Ok(after_name.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds of children `pid` has waited for (`cutime` + `cstime`).
fn reaped_children_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let fields = stat_fields(pid)?;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((ticks(13) + ticks(14)) / CLOCK_TICKS)
}

/// The live processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            stat_fields(*candidate)
                .ok()
                .and_then(|f| f.get(1).and_then(|ppid| ppid.parse::<u32>().ok()))
                == Some(pid)
        })
        .collect()
}

/// `sysconf(_SC_CLK_TCK)`: 100 on Linux everywhere that matters.
const CLOCK_TICKS: f64 = 100.0;

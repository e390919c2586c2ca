//! Configuration layering: defaults, then the TOML file, then `PW_*` variables and flags
//! (clap reads both), then validation with a message that names the bad value.
//!
//! One [`Config`] describes the whole fleet; each process reads the sections it needs.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, bail};
use piecework_api::ApiConfig;
use piecework_bus::nats::NatsConfig;
use piecework_host::HostConfig;
use piecework_scheduler::SchedulerConfig;
use piecework_sdk::EgressPolicy;
use piecework_store::redis::RedisConfig;
use piecework_worker::WorkerConfig;
use serde::{Deserialize, Serialize};

use crate::cli::ConfigArgs;

/// Where each process serves `/healthz`, `/readyz` and `/metrics` for the infrastructure
/// (probes, Prometheus), apart from the API's port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// The worker's health address (`0.0.0.0:9090` in a container).
    pub worker_listen: SocketAddr,
    /// The scheduler's health address.
    pub scheduler_listen: SocketAddr,
    /// The api's health address: `/metrics` without a key, for Prometheus (on the API's own
    /// port `/metrics` needs a key, as it names flows).
    pub api_listen: SocketAddr,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            worker_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            scheduler_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
        }
    }
}

/// The configuration of every process, as in the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub scheduler: SchedulerConfig,
    /// Which hosts pieces may call.
    pub egress: EgressPolicy,
    pub health: HealthConfig,
    /// How bundles are found and run: the pieces directory, trusted keys, limits.
    pub pieces: HostConfig,
    /// The in-memory store of `piecework dev` without Redis.
    pub memory: MemoryConfig,
}

/// The embedded store's bounds (runs also expire after `[redis] run_retention`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Finished runs kept at most (`PW_MEMORY_MAX_FINISHED_RUNS`): the oldest to finish go
    /// first, so a long `piecework dev` session holds a flat footprint.
    pub max_finished_runs: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_finished_runs: piecework_store::memory::DEFAULT_MAX_FINISHED_RUNS,
        }
    }
}

impl Config {
    /// The API's address as callers outside reach it: `[api] public_url`, else its listen
    /// address.
    pub fn public_url(&self) -> String {
        self.api
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.api.listen))
    }

    /// Defaults, then the file (if any), then the infrastructure flags; `overrides` applies
    /// the command's own flags; then everything is validated.
    pub fn load(common: &ConfigArgs, overrides: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mut config = match &common.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        if let Some(url) = &common.nats_url {
            config.nats.url = url.clone();
        }
        if let Some(url) = &common.redis_url {
            config.redis.url = url.clone();
        }
        if let Some(dir) = &common.pieces_dir {
            config.pieces.dir = Some(dir.clone());
        }
        if let Some(keys) = &common.trusted_keys {
            config.pieces.trusted_keys = keys.clone();
        }
        if let Some(dir) = &common.pieces_cache {
            config.pieces.cache_dir = dir.clone();
        }
        if let Some(key) = api_key_from_env()? {
            config.api.api_key = Some(key);
        }
        if let Some(url) = std::env::var("PW_PUBLIC_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            config.api.public_url = Some(url);
        }
        if let Some(replicas) = env_value("PW_NATS_REPLICAS") {
            config.nats.replicas = replicas
                .parse()
                .with_context(|| format!("PW_NATS_REPLICAS={replicas:?} is not a number"))?;
        }
        if let Some(cluster) = env_value("PW_REDIS_CLUSTER") {
            config.redis.cluster = cluster.parse().with_context(|| {
                format!("PW_REDIS_CLUSTER={cluster:?} is not `true` or `false`")
            })?;
        }
        if let Some(master) = env_value("PW_REDIS_SENTINEL_MASTER") {
            config.redis.sentinel_master = Some(master);
        }
        if let Some(retention) = env_value("PW_RUN_RETENTION") {
            config.redis.run_retention = humantime::parse_duration(&retention)
                .with_context(|| format!("PW_RUN_RETENTION={retention:?} is not a duration"))?;
        }
        if let Some(max) = env_value("PW_MEMORY_MAX_FINISHED_RUNS") {
            config.memory.max_finished_runs = max
                .parse()
                .with_context(|| format!("PW_MEMORY_MAX_FINISHED_RUNS={max:?} is not a number"))?;
        }
        if let Some(allow) = std::env::var("PW_EGRESS_ALLOW")
            .ok()
            .filter(|a| !a.is_empty())
        {
            config.egress.extend_allow(&allow);
        }
        overrides(&mut config);
        if config.api.api_key.is_none()
            && let Some(path) = &config.api.api_key_file
        {
            config.api.api_key = Some(read_key_file(path)?);
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses a TOML document; a key nothing reads is an error naming it (a typo must not
    /// silently leave a default in place — sections shared with piece processes, such as
    /// `[egress]`, ignore unknown fields on the wire, so this is checked here).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut unknown = Vec::new();
        let document = toml::Deserializer::parse(text)?;
        let config: Config = serde_ignored::deserialize(document, |path| {
            unknown.push(path.to_string());
        })?;
        if let Some(key) = unknown.first() {
            bail!("unknown key `{key}`");
        }
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            ("api", self.api.validate()),
            ("worker", self.worker.validate()),
            ("scheduler", self.scheduler.validate()),
            (
                "nats",
                check_url("url", &self.nats.url, &["nats", "tls"]).and(self.nats.validate()),
            ),
            (
                "redis",
                check_url("url", &self.redis.url, &["redis", "rediss"]).and(self.redis.validate()),
            ),
            ("pieces", self.pieces.validate()),
            ("egress", self.egress.validate()),
        ];
        for (section, check) in checks {
            if let Err(message) = check {
                bail!("invalid configuration [{section}] {message}");
            }
        }
        Ok(())
    }
}

/// A `PW_*` variable that is set and not empty.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The API key from `PW_API_KEY`, or from the file `PW_API_KEY_FILE` names — never from a
/// flag, which every user of the machine can read in the process list. Empty means none (as
/// compose passes an unset variable).
pub fn api_key_from_env() -> anyhow::Result<Option<String>> {
    if let Some(key) = std::env::var("PW_API_KEY").ok().filter(|k| !k.is_empty()) {
        return Ok(Some(key));
    }
    match std::env::var_os("PW_API_KEY_FILE").filter(|p| !p.is_empty()) {
        Some(path) => read_key_file(Path::new(&path)).map(Some),
        None => Ok(None),
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API key file {}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        bail!("the API key file {} is empty", path.display());
    }
    Ok(key.to_owned())
}

fn check_url(field: &str, value: &str, schemes: &[&str]) -> Result<(), String> {
    for url in value.split(',') {
        let scheme = url.trim().split_once("://").map(|(s, _)| s);
        if !scheme.is_some_and(|s| schemes.contains(&s)) {
            let expected: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
            return Err(format!(
                "{field}: {url:?} must start with {}",
                expected.join(" or ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_and_unknown_keys_are_named() {
        let config =
            Config::parse("[worker]\nconcurrency = 4\nqueues = [\"default\", \"vpn\"]\n[nats]\nurl = \"nats://n:4222\"\n").unwrap();
        assert_eq!(config.worker.concurrency, 4);
        assert_eq!(config.worker.queues, ["default", "vpn"]);
        assert_eq!(config.nats.url, "nats://n:4222");
        let err = Config::parse("[worker]\nconcurency = 4\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `concurency`"),
            "{err}"
        );
        let err = Config::parse("[egress]\nalow = [\"10.0.0.0/8\"]\n").unwrap_err();
        assert_eq!(err.to_string(), "unknown key `egress.alow`");
        let err = Config::parse("[worker]\nack_wait = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("ack_wait"), "{err}");
        let mut config = Config::parse("[egress]\nallow = [\"10.0.0.0/40\"]\n").unwrap();
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "invalid configuration [egress] allow: \"10.0.0.0/40\" is not a network (address/prefix)"
        );
        config.egress.allow.clear();
        config.validate().unwrap();
    }

    #[test]
    fn the_documented_configuration_is_valid() {
        let doc = include_str!("../docs/operating.md");
        let start = doc
            .find("```toml\n")
            .expect("operating.md shows the configuration")
            + 8;
        let end = start + doc[start..].find("```").unwrap();
        let config = Config::parse(&doc[start..end]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.pieces.dir.as_deref(), Some(Path::new("/srv/pieces")));
        assert_eq!(
            config.pieces.env["my-company-api"]["MY_COMPANY_CA_FILE"],
            "/etc/company/ca.pem"
        );
        assert_eq!(config.memory.max_finished_runs, 5000);
    }

    #[test]
    fn bad_values_name_their_section_and_field() {
        let mut config = Config::default();
        config.worker.concurrency = 0;
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration [worker] concurrency: must be at least 1"
        );
        let mut config = Config::default();
        config.api.api_key = Some("short".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("[api] api_key")
        );
        let mut config = Config::default();
        config.redis.url = "localhost:6379".into();
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration [redis] url: \"localhost:6379\" must start with redis:// or rediss://"
        );
    }
}

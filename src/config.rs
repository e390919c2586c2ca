//! Configuration layering: defaults, then the TOML file, then `PW_*` variables and flags
//! (clap reads both), then validation with a message that names the bad value.

use std::path::Path;

use anyhow::{Context as _, bail};
use piecework_api::ApiConfig;
use piecework_scheduler::SchedulerConfig;
use piecework_sdk::EgressPolicy;
use piecework_worker::WorkerConfig;
use serde::{Deserialize, Serialize};

use crate::cli::DevArgs;

/// Configuration of `piecework dev`: every service's section, as in the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub scheduler: SchedulerConfig,
    /// Which hosts pieces may call.
    pub egress: EgressPolicy,
}

impl DevConfig {
    /// Builds the config from defaults, the file (if any) and the flags/environment.
    pub fn load(args: &DevArgs) -> anyhow::Result<Self> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        if let Some(listen) = args.listen {
            config.api.listen = listen;
        }
        if let Some(key) = &args.api_key {
            config.api.api_key = Some(key.clone());
        }
        if let Some(concurrency) = args.concurrency {
            config.worker.concurrency = concurrency;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            ("api", self.api.validate()),
            ("worker", self.worker.validate()),
            ("scheduler", self.scheduler.validate()),
        ];
        for (section, check) in checks {
            if let Err(message) = check {
                bail!("invalid configuration [{section}] {message}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_and_unknown_keys_are_named() {
        let config: DevConfig =
            toml::from_str("[worker]\nconcurrency = 4\nqueues = [\"default\", \"vpn\"]\n").unwrap();
        assert_eq!(config.worker.concurrency, 4);
        assert_eq!(config.worker.queues, ["default", "vpn"]);
        let err = toml::from_str::<DevConfig>("[worker]\nconcurency = 4\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `concurency`"),
            "{err}"
        );
        let err = toml::from_str::<DevConfig>("[worker]\nack_wait = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("ack_wait"), "{err}");
    }

    #[test]
    fn bad_values_name_their_section_and_field() {
        let mut config = DevConfig::default();
        config.worker.concurrency = 0;
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration [worker] concurrency: must be at least 1"
        );
        let mut config = DevConfig::default();
        config.api.api_key = Some("short".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("[api] api_key")
        );
    }
}

//! Building the runtime a process runs on: the in-memory adapters, or NATS and Redis.

use std::sync::Arc;

use anyhow::Context as _;
use piecework_bus::Bus;
use piecework_bus::memory::MemoryBus;
use piecework_bus::nats::NatsBus;
use piecework_core::Registry;
use piecework_runtime::Runtime;
use piecework_store::Store;
use piecework_store::memory::MemoryStore;
use piecework_store::redis::RedisStore;

use crate::cli::ConfigArgs;
use crate::config::Config;
use piecework_runtime::secrets::{Keyring, SecretsError};

/// Which bus and store to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Infra {
    pub nats: bool,
    pub redis: bool,
}

impl Infra {
    pub const MEMORY: Infra = Infra {
        nats: false,
        redis: false,
    };
    pub const PRODUCTION: Infra = Infra {
        nats: true,
        redis: true,
    };

    pub fn describe(&self) -> String {
        let bus = if self.nats {
            "NATS JetStream"
        } else {
            "the in-memory bus"
        };
        let store = if self.redis {
            "Redis"
        } else {
            "the in-memory store"
        };
        format!("{bus} and {store}")
    }
}

/// The connection keys from `PW_ENCRYPTION_KEY`; a clear error when `required` and unset.
pub fn keyring(common: &ConfigArgs, required: bool) -> anyhow::Result<Option<Keyring>> {
    match &common.encryption_key {
        Some(spec) => Ok(Some(Keyring::parse(spec)?)),
        None if required => Err(SecretsError::NoKey.into()),
        None => Ok(None),
    }
}

/// Connects the adapters `infra` asks for, loads the pieces (built in, from the pieces
/// directory and the registry) and builds the runtime. The returned sources are followed once
/// spawned.
pub async fn runtime(
    config: &Config,
    registry: Registry,
    infra: Infra,
    keyring: Option<Keyring>,
) -> anyhow::Result<(Arc<Runtime>, crate::pieces::Sources)> {
    runtime_with(config, registry, infra, keyring, &[]).await
}

/// [`runtime`], also loading the bundle `files`.
pub async fn runtime_with(
    config: &Config,
    registry: Registry,
    infra: Infra,
    keyring: Option<Keyring>,
    files: &[std::path::PathBuf],
) -> anyhow::Result<(Arc<Runtime>, crate::pieces::Sources)> {
    let bus: Arc<dyn Bus> = if infra.nats {
        Arc::new(
            NatsBus::connect(config.nats.clone())
                .await
                .context("NATS")?,
        )
    } else {
        Arc::new(MemoryBus::new())
    };
    let store: Arc<dyn Store> = if infra.redis {
        Arc::new(
            RedisStore::connect(config.redis.clone())
                .await
                .context("Redis")?,
        )
    } else {
        Arc::new(
            MemoryStore::new()
                .with_run_retention(config.redis.run_retention)
                .with_max_finished_runs(config.memory.max_finished_runs),
        )
    };
    let catalog = Arc::new(piecework_core::Catalog::new(registry));
    let (host, sources) = crate::pieces::load(config, &bus, &catalog, files).await?;
    let public_url = config.public_url();
    let runtime = Runtime::new(store, bus, catalog, config.egress.clone())?
        .with_host(host)
        .with_public_url(public_url);
    let runtime = Arc::new(match keyring {
        Some(keyring) => runtime.with_keyring(keyring),
        None => runtime,
    });
    Ok((runtime, sources))
}

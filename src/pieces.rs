//! Where a process's pieces come from: the built-in ones ([`crate::registry`]), bundles in the
//! pieces directory (`PW_PIECES_DIR`) and bundles published to the registry.
//!
//! [`load`] builds the host and fills the catalog before the process serves anything (the
//! first directory scan, the registry's current index); [`Sources::spawn`] then keeps both
//! followed, and [`Running::stop`] ends that and every piece process once the service has
//! drained.

use std::sync::Arc;

use anyhow::Context as _;
use piecework_bus::Bus;
use piecework_core::Catalog;
use piecework_host::PieceHost;
use piecework_host::directory::Directory;
use piecework_host::registry::Follow;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The loaded sources, ready to be followed.
pub struct Sources {
    host: Arc<PieceHost>,
    directory: Option<Directory>,
    follow: Follow,
}

/// Builds the host, loads `files` (bundles named one by one, as `piecework dev` loads its
/// demo piece), scans the pieces directory and loads the registry's index.
pub async fn load(
    config: &Config,
    bus: &Arc<dyn Bus>,
    catalog: &Arc<Catalog>,
    files: &[std::path::PathBuf],
) -> anyhow::Result<(Arc<PieceHost>, Sources)> {
    let mut pieces = config.pieces.clone();
    pieces.public_url = Some(config.public_url());
    let host = PieceHost::new(pieces, config.egress.clone())?;
    for file in files {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        piecework_host::directory::load_file(&host, catalog, file, &bytes)
            .map_err(anyhow::Error::msg)
            .with_context(|| file.display().to_string())?;
    }
    let directory = match &config.pieces.dir {
        None => None,
        Some(dir) => {
            let mut directory = Directory::new(dir.clone(), host.clone(), catalog.clone());
            let scan = directory
                .scan()
                .await
                .with_context(|| format!("cannot read the pieces directory {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), loaded = scan.loaded.len(), refused = scan.refused.len(), "scanned the pieces directory");
            Some(directory)
        }
    };
    let follow = Follow::new(bus.pieces(), host.clone(), catalog.clone());
    match follow.sync().await {
        Ok(published) => tracing::debug!(published, "loaded the piece registry's index"),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the piece registry yet; following it will retry")
        }
    }
    catalog.set_fetch(follow.fetcher());
    Ok((
        host.clone(),
        Sources {
            host,
            directory,
            follow,
        },
    ))
}

impl Sources {
    /// Follows the directory and the registry, and tidies idle piece processes.
    pub fn spawn(self) -> Running {
        let token = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(directory) = self.directory {
            tasks.spawn(directory.watch(token.clone()));
        }
        tasks.spawn(self.follow.run(token.clone()));
        tasks.spawn(self.host.run(token.clone()));
        Running { token, tasks }
    }
}

/// The followers of a process's piece sources.
pub struct Running {
    token: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops following and stops every piece process. Call it after the service returned, so
    /// its in-flight steps finished on live processes.
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

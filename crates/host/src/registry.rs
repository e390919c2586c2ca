//! Bundles from the piece registry: every published version enters the catalog as soon as it
//! is published (its metadata is in the index, so nothing is downloaded), and its bytes are
//! fetched, checked and unpacked by the first process that runs it.
//!
//! [`Follow::sync`] loads what is published now; [`Follow::run`] then follows the index,
//! re-subscribing with backoff when NATS goes away. A version this process has not heard of
//! (published a moment ago) is looked up directly when a step needs it ([`Follow::fetcher`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use piecework_bus::pieces::{Change, PieceRegistry, Published};
use piecework_core::Catalog;
use piecework_core::registry::{Entry, Fetch, Origin};
use semver::Version;
use tokio_util::sync::CancellationToken;

use crate::{PieceHost, Source};

/// Keeps the catalog in step with the registry.
#[derive(Clone)]
pub struct Follow {
    registry: Arc<dyn PieceRegistry>,
    host: Arc<PieceHost>,
    catalog: Arc<Catalog>,
}

impl Follow {
    pub fn new(
        registry: Arc<dyn PieceRegistry>,
        host: Arc<PieceHost>,
        catalog: Arc<Catalog>,
    ) -> Self {
        Self {
            registry,
            host,
            catalog,
        }
    }

    /// Loads every published version (at start, before serving).
    pub async fn sync(&self) -> Result<usize, piecework_bus::pieces::RegistryError> {
        let published = self.registry.list().await?;
        let count = published.len();
        for entry in published {
            self.published(entry);
        }
        Ok(count)
    }

    /// Follows the index until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(500);
        loop {
            let watched = tokio::select! {
                watched = self.registry.watch() => watched,
                () = shutdown.cancelled() => return,
            };
            match watched {
                Ok(mut changes) => loop {
                    let change = tokio::select! {
                        change = changes.next() => change,
                        () = shutdown.cancelled() => return,
                    };
                    match change {
                        Some(Ok(change)) => {
                            delay = Duration::from_millis(500);
                            self.apply(change);
                        }
                        Some(Err(err)) => {
                            tracing::warn!(error = %err, "piece registry watch failed; resubscribing");
                            break;
                        }
                        None => break,
                    }
                },
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?delay, "cannot watch the piece registry")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    fn apply(&self, change: Change) {
        match change {
            Change::Published(entry) => {
                self.published(*entry);
            }
            Change::Removed { name, version } => self.removed(&name, &version),
        }
    }

    /// Adds a published version unless this process already has it (or a directory bundle
    /// of it, which takes precedence).
    fn published(&self, entry: Published) -> bool {
        let snapshot = self.catalog.snapshot();
        if let Some(existing) = snapshot.entry(&entry.name, &entry.version) {
            if !matches!(existing.origin, Origin::Registry { .. }) {
                tracing::debug!(piece = %entry.name, version = %entry.version, "a local version shadows the registry's");
            }
            return false;
        }
        if snapshot
            .entries(&entry.name)
            .any(|e| e.origin == Origin::Builtin)
        {
            tracing::warn!(piece = %entry.name, "ignoring a published bundle named like a built-in piece");
            return false;
        }
        match self.entry_of(&entry) {
            Ok(loaded) => {
                let registered = self
                    .catalog
                    .update(|registry| registry.register_from(loaded.piece, loaded.origin));
                if registered.is_ok() {
                    tracing::info!(piece = %entry.name, version = %entry.version, digest = %entry.digest.short(), "a published piece version is available");
                }
                registered.is_ok()
            }
            Err(why) => {
                tracing::warn!(piece = %entry.name, version = %entry.version, reason = %why, "ignoring a published bundle");
                false
            }
        }
    }

    fn entry_of(&self, entry: &Published) -> Result<Entry, String> {
        entry.manifest.validate().map_err(|e| e.to_string())?;
        if entry.manifest.piece.name != entry.name || entry.manifest.piece.version != entry.version
        {
            return Err("its index entry and its manifest disagree on name or version".into());
        }
        let source = Source::Registry {
            registry: self.registry.clone(),
            signature: entry.signature.clone(),
        };
        let piece = self
            .host
            .load(&entry.manifest, &entry.digest, source)
            .map_err(|e| e.to_string())?;
        Ok(Entry {
            piece,
            origin: Origin::Registry {
                digest: entry.digest.to_string(),
            },
        })
    }

    fn removed(&self, name: &str, version: &Version) {
        let removed = self.catalog.update(|registry| {
            let ours = registry
                .entry(name, version)
                .is_some_and(|e| matches!(e.origin, Origin::Registry { .. }));
            ours.then(|| registry.remove(name, version)).flatten()
        });
        if let Some(removed) = removed {
            tracing::info!(piece = name, %version, "a piece version was removed from the registry");
            if let Some(digest) = removed.origin.digest() {
                self.host.retire(name, &version.to_string(), digest);
            }
        }
    }

    /// Looks up versions the watch has not delivered yet.
    pub fn fetcher(&self) -> Arc<dyn Fetch> {
        Arc::new(self.clone())
    }
}

#[async_trait]
impl Fetch for Follow {
    async fn fetch(&self, name: &str, version: &Version) -> Result<Option<Entry>, String> {
        let Some(published) = self
            .registry
            .get(name, version)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        self.entry_of(&published).map(Some)
    }
}

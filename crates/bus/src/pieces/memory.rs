//! The in-process piece registry of `piecework dev` and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use piecework_bundle::Digest;
use semver::Version;
use tokio::sync::broadcast;

use super::{Change, PieceRegistry, Published, RegistryError, immutable};

pub struct MemoryPieces {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
}

#[derive(Default)]
struct State {
    index: BTreeMap<(String, Version), Published>,
    bundles: HashMap<Digest, Bytes>,
}

impl Default for MemoryPieces {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changes: broadcast::channel(256).0,
        }
    }
}

impl MemoryPieces {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PieceRegistry for MemoryPieces {
    async fn publish(&self, entry: Published, bundle: Bytes) -> Result<bool, RegistryError> {
        let mut state = self.state.lock().unwrap();
        let key = (entry.name.clone(), entry.version.clone());
        if let Some(existing) = state.index.get(&key) {
            return if existing.digest == entry.digest {
                Ok(false)
            } else {
                Err(immutable(existing, &entry.digest))
            };
        }
        state.bundles.insert(entry.digest.clone(), bundle);
        state.index.insert(key, entry.clone());
        let _ = self.changes.send(Change::Published(Box::new(entry)));
        Ok(true)
    }

    async fn get(&self, name: &str, version: &Version) -> Result<Option<Published>, RegistryError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .index
            .get(&(name.to_owned(), version.clone()))
            .cloned())
    }

    async fn list(&self) -> Result<Vec<Published>, RegistryError> {
        Ok(self.state.lock().unwrap().index.values().cloned().collect())
    }

    async fn download(&self, digest: &Digest) -> Result<Option<Bytes>, RegistryError> {
        Ok(self.state.lock().unwrap().bundles.get(digest).cloned())
    }

    async fn remove(
        &self,
        name: &str,
        version: &Version,
    ) -> Result<Option<Published>, RegistryError> {
        let mut state = self.state.lock().unwrap();
        let Some(removed) = state.index.remove(&(name.to_owned(), version.clone())) else {
            return Ok(None);
        };
        if !state.index.values().any(|p| p.digest == removed.digest) {
            state.bundles.remove(&removed.digest);
        }
        let _ = self.changes.send(Change::Removed {
            name: name.to_owned(),
            version: version.clone(),
        });
        Ok(Some(removed))
    }

    async fn watch(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RegistryError>>, RegistryError> {
        // Subscribe before the snapshot: a change in between shows twice, never not at all.
        let changes = self.changes.subscribe();
        let current: Vec<Result<Change, RegistryError>> = self
            .state
            .lock()
            .unwrap()
            .index
            .values()
            .map(|p| Ok(Change::Published(Box::new(p.clone()))))
            .collect();
        let live = futures::stream::unfold(changes, |mut changes| async move {
            loop {
                match changes.recv().await {
                    Ok(change) => return Some((Ok(change), changes)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(futures::stream::iter(current).chain(live).boxed())
    }
}

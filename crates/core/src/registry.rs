//! The pieces a process can run, by name and version.
//!
//! Flows name a piece and a semver range; the range is resolved here when a flow version is
//! created, and again by the worker, which refuses a step whose range it cannot serve.
//!
//! A [`Registry`] is an immutable snapshot; the [`Catalog`] holds the current one and swaps in
//! a new one when bundles arrive or leave (a file dropped into the pieces directory, a version
//! published to the registry), so readers never wait on a writer and a step keeps the pieces it
//! started with.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use piecework_sdk::{Piece, PieceDefinitionError, PieceMetadata};
use semver::{Version, VersionReq};
use serde::Serialize;

/// Where a registered version comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Origin {
    /// Compiled into this binary.
    Builtin,
    /// A bundle file in the pieces directory (or baked into the image).
    Directory { digest: String, path: String },
    /// A bundle published to the registry.
    Registry { digest: String },
}

impl Origin {
    /// The bundle's digest (`sha256:…`), for bundles.
    pub fn digest(&self) -> Option<&str> {
        match self {
            Origin::Builtin => None,
            Origin::Directory { digest, .. } | Origin::Registry { digest } => Some(digest),
        }
    }
}

/// One registered version.
#[derive(Debug, Clone)]
pub struct Entry {
    pub piece: Piece,
    pub origin: Origin,
}

/// Registered pieces; several versions of one piece may be registered side by side.
#[derive(Default, Clone, Debug)]
pub struct Registry {
    /// Per name, versions newest first.
    pieces: BTreeMap<String, Vec<Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Definition(#[from] PieceDefinitionError),
    #[error("piece `{0}` version {1} is registered twice")]
    Duplicate(String, Version),
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a built-in piece.
    pub fn register(&mut self, piece: Piece) -> Result<(), RegistryError> {
        self.register_from(piece, Origin::Builtin)
    }

    pub fn register_from(&mut self, piece: Piece, origin: Origin) -> Result<(), RegistryError> {
        let versions = self.pieces.entry(piece.name().to_owned()).or_default();
        if versions
            .iter()
            .any(|e| e.piece.version() == piece.version())
        {
            return Err(RegistryError::Duplicate(
                piece.name().to_owned(),
                piece.version().clone(),
            ));
        }
        versions.push(Entry { piece, origin });
        versions.sort_by(|a, b| b.piece.version().cmp(a.piece.version()));
        Ok(())
    }

    /// Registers the result of a piece's constructor, surfacing a bad definition.
    pub fn register_built(
        &mut self,
        piece: Result<Piece, PieceDefinitionError>,
    ) -> Result<(), RegistryError> {
        self.register(piece?)
    }

    /// Removes a version; returns what was registered.
    pub fn remove(&mut self, name: &str, version: &Version) -> Option<Entry> {
        let versions = self.pieces.get_mut(name)?;
        let at = versions.iter().position(|e| e.piece.version() == version)?;
        let removed = versions.remove(at);
        if versions.is_empty() {
            self.pieces.remove(name);
        }
        Some(removed)
    }

    /// The newest registered version matching `range`.
    pub fn resolve(&self, name: &str, range: &VersionReq) -> Option<&Piece> {
        self.pieces
            .get(name)?
            .iter()
            .map(|e| &e.piece)
            .find(|p| range.matches(p.version()))
    }

    pub fn get(&self, name: &str, version: &Version) -> Option<&Piece> {
        self.entry(name, version).map(|e| &e.piece)
    }

    pub fn entry(&self, name: &str, version: &Version) -> Option<&Entry> {
        self.pieces
            .get(name)?
            .iter()
            .find(|e| e.piece.version() == version)
    }

    /// The newest version of a piece.
    pub fn newest(&self, name: &str) -> Option<&Piece> {
        self.pieces.get(name)?.first().map(|e| &e.piece)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.pieces.contains_key(name)
    }

    /// Registered versions of a piece, newest first.
    pub fn versions(&self, name: &str) -> Vec<&Version> {
        self.entries(name).map(|e| e.piece.version()).collect()
    }

    /// Registered versions of a piece with their origins, newest first.
    pub fn entries(&self, name: &str) -> impl Iterator<Item = &Entry> {
        self.pieces.get(name).into_iter().flatten()
    }

    /// Every registered piece, by name then newest version first.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.pieces.values().flatten().map(|e| &e.piece)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pieces.keys().map(String::as_str)
    }

    /// Metadata of the newest version of every piece, for the catalog.
    pub fn catalog(&self) -> Vec<&PieceMetadata> {
        self.pieces
            .values()
            .filter_map(|v| v.first())
            .map(|e| e.piece.metadata())
            .collect()
    }
}

/// Finds a version the catalog does not hold yet (the registry, on first use).
#[async_trait]
pub trait Fetch: Send + Sync + 'static {
    /// `Ok(None)`: no such version anywhere.
    async fn fetch(&self, name: &str, version: &Version) -> Result<Option<Entry>, String>;
}

/// The pieces this process can run right now. Cheap to read: a snapshot is one `Arc` clone.
pub struct Catalog {
    current: RwLock<Arc<Registry>>,
    fetch: RwLock<Option<Arc<dyn Fetch>>>,
}

impl Catalog {
    pub fn new(registry: Registry) -> Self {
        Self {
            current: RwLock::new(Arc::new(registry)),
            fetch: RwLock::new(None),
        }
    }

    /// The pieces as they are now; later changes do not affect it.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.current.read().unwrap().clone()
    }

    /// Changes the catalog: `change` edits a copy that then replaces the current snapshot.
    pub fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> T {
        let mut current = self.current.write().unwrap();
        let mut next = Registry::clone(&current);
        let out = change(&mut next);
        *current = Arc::new(next);
        out
    }

    /// Where versions this process has not heard of are looked for.
    pub fn set_fetch(&self, fetch: Arc<dyn Fetch>) {
        *self.fetch.write().unwrap() = Some(fetch);
    }

    /// An exact version: from the catalog, else fetched (and then kept).
    pub async fn get_or_fetch(
        &self,
        name: &str,
        version: &Version,
    ) -> Result<Option<Piece>, String> {
        if let Some(piece) = self.snapshot().get(name, version) {
            return Ok(Some(piece.clone()));
        }
        let fetch = self.fetch.read().unwrap().clone();
        let Some(fetch) = fetch else {
            return Ok(None);
        };
        let Some(entry) = fetch.fetch(name, version).await? else {
            return Ok(None);
        };
        let piece = entry.piece.clone();
        self.update(|registry| {
            // Another task may have fetched it meanwhile: keep the first.
            let _ = registry.register_from(entry.piece, entry.origin);
        });
        Ok(Some(piece))
    }
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("current", &self.snapshot())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(name: &str, version: &str) -> Piece {
        Piece::builder(name, name).version(version).build().unwrap()
    }

    #[test]
    fn versions_live_side_by_side_newest_first() {
        let mut registry = Registry::new();
        registry.register(piece("p", "1.2.0")).unwrap();
        registry.register(piece("p", "2.0.0")).unwrap();
        registry.register(piece("p", "1.10.0")).unwrap();
        let versions: Vec<String> = registry
            .versions("p")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(versions, ["2.0.0", "1.10.0", "1.2.0"]);
        let range = VersionReq::parse("^1.2").unwrap();
        assert_eq!(
            registry.resolve("p", &range).unwrap().version().to_string(),
            "1.10.0"
        );
        assert!(matches!(
            registry.register(piece("p", "1.2.0")),
            Err(RegistryError::Duplicate(..))
        ));
        let removed = registry.remove("p", &Version::new(2, 0, 0)).unwrap();
        assert_eq!(removed.origin, Origin::Builtin);
        assert_eq!(
            registry.newest("p").unwrap().version().to_string(),
            "1.10.0"
        );
    }

    #[test]
    fn a_snapshot_does_not_change_under_its_reader() {
        let catalog = Catalog::new(Registry::new());
        let before = catalog.snapshot();
        catalog.update(|r| r.register(piece("p", "1.0.0")).unwrap());
        assert!(!before.contains("p"));
        assert!(catalog.snapshot().contains("p"));
    }

    struct OneVersion;

    #[async_trait]
    impl Fetch for OneVersion {
        async fn fetch(&self, name: &str, version: &Version) -> Result<Option<Entry>, String> {
            Ok((version.major == 3).then(|| Entry {
                piece: piece(name, &version.to_string()),
                origin: Origin::Registry {
                    digest: "sha256:00".into(),
                },
            }))
        }
    }

    #[tokio::test]
    async fn unknown_versions_are_fetched_once_and_kept() {
        let catalog = Catalog::new(Registry::new());
        let v3 = Version::new(3, 0, 0);
        assert!(catalog.get_or_fetch("p", &v3).await.unwrap().is_none());
        catalog.set_fetch(Arc::new(OneVersion));
        let fetched = catalog.get_or_fetch("p", &v3).await.unwrap().unwrap();
        assert_eq!(fetched.version(), &v3);
        let entry = catalog.snapshot().entry("p", &v3).cloned().unwrap();
        assert_eq!(entry.origin.digest(), Some("sha256:00"));
        assert!(
            catalog
                .get_or_fetch("p", &Version::new(4, 0, 0))
                .await
                .unwrap()
                .is_none()
        );
    }
}

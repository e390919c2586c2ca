//! The piece registry: bundles published once and fetched by every process of the fleet.
//!
//! An index maps name → version → the bundle's digest, size, publisher, time, signature and
//! manifest; the bundles themselves are stored by digest. Versions are immutable: publishing
//! the same bundle again changes nothing, another bundle under a published version is refused.
//! Processes [`watch`](PieceRegistry::watch) the index (every entry, then each change), so a
//! version published once is known everywhere at once; the bundle's bytes are downloaded
//! only by the processes that run it, on first use.
//!
//! Adapters: [`nats::NatsPieces`] (a JetStream key-value bucket for the index, an object
//! store for the bundles) and [`memory::MemoryPieces`] for `piecework dev` and tests.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use piecework_bundle::{Digest, Manifest, Signature};
use semver::Version;
use serde::{Deserialize, Serialize};

pub mod memory;
pub mod nats;

/// One published version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub name: String,
    pub version: Version,
    pub digest: Digest,
    /// Bytes of the `.piece.tgz`.
    pub size: u64,
    /// Who published it (the audit actor).
    pub publisher: String,
    pub published_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
    pub manifest: Manifest,
}

/// A change to the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Published(Box<Published>),
    Removed { name: String, version: Version },
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the piece registry is not reachable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the piece registry holds a damaged entry at {key}: {message}")]
    Corrupt { key: String, message: String },
}

/// The piece registry.
#[async_trait]
pub trait PieceRegistry: Send + Sync + 'static {
    /// Stores the bundle and indexes it. Returns `false` when this exact bundle was already
    /// published; another digest under a published version is a [`RegistryError::Conflict`].
    async fn publish(&self, entry: Published, bundle: Bytes) -> Result<bool, RegistryError>;

    async fn get(&self, name: &str, version: &Version) -> Result<Option<Published>, RegistryError>;

    /// Every published version, by name then version.
    async fn list(&self) -> Result<Vec<Published>, RegistryError>;

    /// A bundle's bytes (unchecked: the caller verifies the digest).
    async fn download(&self, digest: &Digest) -> Result<Option<Bytes>, RegistryError>;

    /// Removes a version from the index (and its bytes, unless another version shares them).
    async fn remove(
        &self,
        name: &str,
        version: &Version,
    ) -> Result<Option<Published>, RegistryError>;

    /// Every entry as it is now, then each change as it happens.
    async fn watch(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RegistryError>>, RegistryError>;
}

/// The conflict of publishing another bundle under an existing version.
pub(crate) fn immutable(existing: &Published, digest: &Digest) -> RegistryError {
    RegistryError::Conflict(format!(
        "{} {} is already published as {} (this bundle is {digest}); versions are immutable: bump the version",
        existing.name, existing.version, existing.digest
    ))
}

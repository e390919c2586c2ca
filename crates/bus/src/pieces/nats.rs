//! The piece registry on NATS JetStream: the index in the key-value bucket `PW_PIECES`
//! (key `<name>.<version>`, value the [`Published`] entry as JSON), the bundles in the object
//! store `PW_PIECE_BUNDLES` (object name: the digest's hex). Both are created at start, with
//! the job stream's replica count.

use async_nats::jetstream::{self, kv, object_store};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use piecework_bundle::Digest;
use semver::Version;
use tokio::io::AsyncReadExt as _;

use super::{Change, PieceRegistry, Published, RegistryError, immutable};

pub const INDEX_BUCKET: &str = "PW_PIECES";
pub const BUNDLE_BUCKET: &str = "PW_PIECE_BUNDLES";

pub struct NatsPieces {
    index: kv::Store,
    bundles: object_store::ObjectStore,
}

fn unavailable(context: &str, err: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("{context}: {err}"))
}

/// Creates the index bucket's stream as a key-value bucket's, directly: async-nats 0.51's
/// `create_key_value` first reads the account's JetStream info, whose answer from the
/// nats-server 2.9 Debian ships it cannot parse. The settings are the KV conventions.
async fn create_kv_stream(
    jetstream: &jetstream::Context,
    replicas: usize,
) -> Result<(), RegistryError> {
    jetstream
        .create_or_update_stream(jetstream::stream::Config {
            name: format!("KV_{INDEX_BUCKET}"),
            description: Some("piecework piece registry: name.version -> published bundle".into()),
            subjects: vec![format!("$KV.{INDEX_BUCKET}.>")],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("cannot create the piece index", e))?;
    Ok(())
}

fn key(name: &str, version: &Version) -> String {
    format!("{name}.{version}")
}

impl NatsPieces {
    /// Opens (creating if needed) the index and the bundle store.
    pub async fn open(
        jetstream: &jetstream::Context,
        replicas: usize,
    ) -> Result<Self, RegistryError> {
        let index = match jetstream.get_key_value(INDEX_BUCKET).await {
            Ok(index) => index,
            Err(_) => {
                create_kv_stream(jetstream, replicas).await?;
                jetstream
                    .get_key_value(INDEX_BUCKET)
                    .await
                    .map_err(|e| unavailable("cannot open the piece index", e))?
            }
        };
        let bundles = match jetstream.get_object_store(BUNDLE_BUCKET).await {
            Ok(bundles) => bundles,
            Err(_) => jetstream
                .create_object_store(object_store::Config {
                    bucket: BUNDLE_BUCKET.into(),
                    description: Some("piecework piece bundles by digest".into()),
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("cannot create the bundle store", e))?,
        };
        Ok(Self { index, bundles })
    }

    fn decode(key: &str, value: &[u8]) -> Result<Published, RegistryError> {
        serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        })
    }

    fn change(entry: kv::Entry) -> Result<Change, RegistryError> {
        match entry.operation {
            kv::Operation::Put => Ok(Change::Published(Box::new(Self::decode(
                &entry.key,
                &entry.value,
            )?))),
            kv::Operation::Delete | kv::Operation::Purge => {
                let (name, version) =
                    entry
                        .key
                        .split_once('.')
                        .ok_or_else(|| RegistryError::Corrupt {
                            key: entry.key.clone(),
                            message: "not name.version".into(),
                        })?;
                let version = Version::parse(version).map_err(|e| RegistryError::Corrupt {
                    key: entry.key.clone(),
                    message: e.to_string(),
                })?;
                Ok(Change::Removed {
                    name: name.to_owned(),
                    version,
                })
            }
        }
    }
}

#[async_trait]
impl PieceRegistry for NatsPieces {
    async fn publish(&self, entry: Published, bundle: Bytes) -> Result<bool, RegistryError> {
        if let Some(existing) = self.get(&entry.name, &entry.version).await? {
            return if existing.digest == entry.digest {
                Ok(false)
            } else {
                Err(immutable(&existing, &entry.digest))
            };
        }
        // The bytes first: an index entry must never point at a bundle that is not there.
        let object = entry.digest.hex().to_owned();
        if self.bundles.info(&object).await.is_err() {
            self.bundles
                .put(object.as_str(), &mut bundle.as_ref())
                .await
                .map_err(|e| unavailable("cannot store the bundle", e))?;
        }
        let value = Bytes::from(serde_json::to_vec(&entry).expect("entries serialize"));
        let key = key(&entry.name, &entry.version);
        match self.index.create(&key, value).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Published concurrently: same bundle is fine, another is a conflict.
                match self.get(&entry.name, &entry.version).await? {
                    Some(existing) if existing.digest == entry.digest => Ok(false),
                    Some(existing) => Err(immutable(&existing, &entry.digest)),
                    None => Err(unavailable("cannot index the bundle", err)),
                }
            }
            Err(err) => Err(unavailable("cannot index the bundle", err)),
        }
    }

    async fn get(&self, name: &str, version: &Version) -> Result<Option<Published>, RegistryError> {
        let key = key(name, version);
        let value = self
            .index
            .get(&key)
            .await
            .map_err(|e| unavailable("cannot read the piece index", e))?;
        value.map(|v| Self::decode(&key, &v)).transpose()
    }

    async fn list(&self) -> Result<Vec<Published>, RegistryError> {
        let mut keys = self
            .index
            .keys()
            .await
            .map_err(|e| unavailable("cannot list the piece index", e))?;
        let mut entries = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("cannot list the piece index", e))?;
            if let Some(value) = self
                .index
                .get(&key)
                .await
                .map_err(|e| unavailable("cannot read the piece index", e))?
            {
                entries.push(Self::decode(&key, &value)?);
            }
        }
        entries.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(entries)
    }

    async fn download(&self, digest: &Digest) -> Result<Option<Bytes>, RegistryError> {
        let mut object = match self.bundles.get(digest.hex()).await {
            Ok(object) => object,
            Err(err) if err.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(unavailable("cannot download the bundle", err)),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| unavailable("cannot download the bundle", e))?;
        Ok(Some(Bytes::from(bytes)))
    }

    async fn remove(
        &self,
        name: &str,
        version: &Version,
    ) -> Result<Option<Published>, RegistryError> {
        let Some(removed) = self.get(name, version).await? else {
            return Ok(None);
        };
        self.index
            .purge(key(name, version))
            .await
            .map_err(|e| unavailable("cannot remove the index entry", e))?;
        let shared = self
            .list()
            .await?
            .iter()
            .any(|p| p.digest == removed.digest);
        if !shared && let Err(err) = self.bundles.delete(removed.digest.hex()).await {
            tracing::warn!(digest = %removed.digest, error = %err, "could not delete a removed bundle's bytes");
        }
        Ok(Some(removed))
    }

    async fn watch(
        &self,
    ) -> Result<BoxStream<'static, Result<Change, RegistryError>>, RegistryError> {
        let watch = self
            .index
            .watch_with_history(">")
            .await
            .map_err(|e| unavailable("cannot watch the piece index", e))?;
        Ok(watch
            .map(|entry| match entry {
                Ok(entry) => Self::change(entry),
                Err(err) => Err(unavailable("watching the piece index", err)),
            })
            .boxed())
    }
}

//! Operations on deployed pieces: publishing a bundle to the registry, listing a piece's
//! versions with where each comes from, and yanking a published version.

use bytes::Bytes;
use chrono::Utc;
use piecework_bundle::{Bundle, Signature};
use piecework_bus::pieces::Published;
use piecework_core::registry::Origin;
use semver::Version;
use serde::Serialize;

use crate::{Actor, Runtime, RuntimeError};

/// What publishing did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishOutcome {
    pub piece: Published,
    /// False when this exact bundle was already published (publishing is idempotent).
    pub created: bool,
}

/// One version of a piece as this process knows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct VersionInfo {
    pub version: String,
    #[serde(flatten)]
    pub origin: Origin,
    /// For published versions: who published it, when, its size and signer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<PublishedInfo>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PublishedInfo {
    pub publisher: String,
    pub published_at: chrono::DateTime<Utc>,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

impl Runtime {
    /// Publishes a bundle to the registry: it must read as a bundle, not take a built-in
    /// piece's name, and be signed by a trusted key when this process trusts any. Audited as
    /// `piece.publish`; the version is then on every process of the fleet.
    pub async fn publish_piece(
        &self,
        bytes: Bytes,
        signature: Option<Signature>,
        actor: &Actor,
    ) -> Result<PublishOutcome, RuntimeError> {
        let started = std::time::Instant::now();
        let mut resource = "piece".to_owned();
        let result = self.publish(bytes, signature, actor, &mut resource).await;
        self.audit(
            actor,
            "piece.publish",
            &resource,
            started,
            result.as_ref().err(),
        )
        .await;
        result
    }

    async fn publish(
        &self,
        bytes: Bytes,
        signature: Option<Signature>,
        actor: &Actor,
        resource: &mut String,
    ) -> Result<PublishOutcome, RuntimeError> {
        let bundle =
            Bundle::read(&bytes).map_err(|e| RuntimeError::InvalidBundle(e.to_string()))?;
        let manifest = &bundle.manifest;
        *resource = format!("piece/{}/{}", manifest.name(), manifest.version());
        if self
            .pieces()
            .entries(manifest.name())
            .any(|e| e.origin == Origin::Builtin)
        {
            return Err(RuntimeError::InvalidBundle(format!(
                "`{}` is a built-in piece; a bundle needs another name",
                manifest.name()
            )));
        }
        if let Some(host) = self.host() {
            host.trusted_keys()
                .verify(&bundle.digest, signature.as_ref())
                .map_err(|e| RuntimeError::InvalidBundle(e.to_string()))?;
        }
        let entry = Published {
            name: manifest.name().to_owned(),
            version: manifest.version().clone(),
            digest: bundle.digest.clone(),
            size: bundle.size,
            publisher: actor.0.clone(),
            published_at: Utc::now(),
            signature,
            manifest: manifest.clone(),
        };
        let created = self.bus.pieces().publish(entry.clone(), bytes).await?;
        let piece = if created {
            entry
        } else {
            self.bus
                .pieces()
                .get(&entry.name, &entry.version)
                .await?
                .unwrap_or(entry)
        };
        // Known here at once, whatever the registry watch is doing.
        if let Err(err) = self
            .catalog()
            .get_or_fetch(&piece.name, &piece.version)
            .await
        {
            tracing::warn!(piece = %piece.name, version = %piece.version, error = %err, "published, but not loaded here yet");
        }
        Ok(PublishOutcome { piece, created })
    }

    /// Every version of `name` this process can run, newest first, with where it comes from.
    pub async fn piece_versions(&self, name: &str) -> Result<Vec<VersionInfo>, RuntimeError> {
        let entries: Vec<(Version, Origin)> = self
            .pieces()
            .entries(name)
            .map(|e| (e.piece.version().clone(), e.origin.clone()))
            .collect();
        if entries.is_empty() {
            return Err(RuntimeError::NoSuchPiece(name.to_owned()));
        }
        let mut versions = Vec::with_capacity(entries.len());
        for (version, origin) in entries {
            let published = match origin {
                Origin::Registry { .. } => {
                    self.bus
                        .pieces()
                        .get(name, &version)
                        .await?
                        .map(|p| PublishedInfo {
                            publisher: p.publisher,
                            published_at: p.published_at,
                            size: p.size,
                            signed_by: p.signature.map(|s| s.key),
                        })
                }
                _ => None,
            };
            versions.push(VersionInfo {
                version: version.to_string(),
                origin,
                published,
            });
        }
        Ok(versions)
    }

    /// Removes a published version from the registry, unless an enabled flow uses it (its
    /// latest version pins it). Runs that already pinned it keep their record; a retry of
    /// one would fail. Audited as `piece.yank`.
    pub async fn yank_piece(
        &self,
        name: &str,
        version: &Version,
        actor: &Actor,
    ) -> Result<Published, RuntimeError> {
        self.audited(
            actor,
            "piece.yank",
            &format!("piece/{name}/{version}"),
            self.yank(name, version),
        )
        .await
    }

    async fn yank(&self, name: &str, version: &Version) -> Result<Published, RuntimeError> {
        let registry = self.bus.pieces();
        if registry.get(name, version).await?.is_none() {
            return Err(
                match self.pieces().entry(name, version).map(|e| e.origin.clone()) {
                    Some(Origin::Builtin) => RuntimeError::Conflict(format!(
                        "{name} {version} is built in, not published: it cannot be yanked"
                    )),
                    Some(Origin::Directory { path, .. }) => RuntimeError::Conflict(format!(
                        "{name} {version} comes from the pieces directory ({path}), not the registry: remove the file"
                    )),
                    _ => RuntimeError::NoSuchPiece(format!("{name} {version}")),
                },
            );
        }
        let mut users = Vec::new();
        for record in self.store.list_flows().await?.iter().filter(|f| f.enabled) {
            let Some(flow) = self.flow_version(&record.id, record.latest_version).await? else {
                continue;
            };
            let definition = &flow.definition;
            let uses = std::iter::once(("trigger", definition.trigger.piece.as_str()))
                .chain(
                    definition
                        .all_steps()
                        .into_iter()
                        .map(|s| (s.name.as_str(), s.piece.as_str())),
                )
                .any(|(key, piece)| piece == name && flow.resolved.get(key) == Some(version));
            if uses {
                users.push(record.id.clone());
            }
        }
        if !users.is_empty() {
            return Err(RuntimeError::Conflict(format!(
                "{name} {version} is used by enabled flows: {}; upgrade or disable them first",
                users.join(", ")
            )));
        }
        registry
            .remove(name, version)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchPiece(format!("{name} {version}")))
    }
}

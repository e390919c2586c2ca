//! Bundles from a directory: `PW_PIECES_DIR` (a mounted volume, or a directory baked into the
//! image), scanned at start and then every `scan_interval`.
//!
//! A file is read again only when its size or modification time changes; a file that does not
//! read as a bundle (still being copied, damaged) is reported once and tried again when it
//! changes. Copy bundles in under another name and rename them (`cp x.piece.tgz dir/.x &&
//! mv dir/.x dir/x.piece.tgz`) to be sure a half-copied file is never seen; hidden files are
//! ignored. Polling rather than inotify: it works the same on bind mounts, network volumes
//! and Kubernetes config maps, and costs a `stat` per file per scan.
//!
//! A bundle in the directory takes precedence over the same version in the registry; no
//! bundle may take the name of a built-in piece.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use piecework_bundle::{Bundle, Digest};
use piecework_core::Catalog;
use piecework_core::registry::Origin;
use semver::Version;
use tokio_util::sync::CancellationToken;

use crate::{PieceHost, Source, read_signature, signature_path};

/// Bundle files end with this.
pub const SUFFIX: &str = ".piece.tgz";

/// What one scan changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// `name version` of each bundle loaded or reloaded.
    pub loaded: Vec<String>,
    /// `name version` of each bundle unloaded because its file went away.
    pub removed: Vec<String>,
    /// Files that could not be used, with why.
    pub refused: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    size: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug)]
struct Seen {
    stamp: Stamp,
    /// The bundle this file holds, once it loaded.
    loaded: Option<(String, Version, Digest)>,
}

/// Loads the bundle file `path` (whose bytes are `bytes`) into the catalog, replacing another
/// bundle of the same version from a file. Refuses built-in names.
pub fn load_file(
    host: &Arc<PieceHost>,
    catalog: &Catalog,
    path: &Path,
    bytes: &[u8],
) -> Result<(String, Version, Digest), String> {
    let bundle = Bundle::read(bytes).map_err(|e| e.to_string())?;
    let name = bundle.manifest.piece.name.clone();
    let version = bundle.manifest.piece.version.clone();
    let digest = bundle.digest.clone();
    let snapshot = catalog.snapshot();
    if let Some(existing) = snapshot.entry(&name, &version) {
        match &existing.origin {
            Origin::Builtin => {
                return Err(format!(
                    "{name} {version} is built into this binary; a bundle cannot replace it"
                ));
            }
            origin if origin.digest() == Some(digest.as_str()) => {
                return Ok((name, version, digest));
            }
            _ => {}
        }
    }
    if snapshot.entries(&name).any(|e| e.origin == Origin::Builtin) {
        return Err(format!(
            "`{name}` is a built-in piece; bundles need another name"
        ));
    }
    if host.trusted.required() {
        let signature = read_signature(&signature_path(path))?;
        if let Err(err) = host.trusted.verify(&digest, signature.as_ref()) {
            tracing::warn!(file = %path.display(), error = %err, "bundle is not signed by a trusted key: steps using it will fail");
        }
    }
    let piece = host
        .load(&bundle.manifest, &digest, Source::File(path.to_owned()))
        .map_err(|e| e.to_string())?;
    let origin = Origin::Directory {
        digest: digest.to_string(),
        path: path.display().to_string(),
    };
    let replaced = catalog.update(|registry| {
        let replaced = registry.remove(&name, &version);
        registry
            .register_from(piece, origin)
            .map(|()| replaced)
            .map_err(|e| e.to_string())
    })?;
    if let Some(old) = replaced
        && let Some(old_digest) = old.origin.digest()
    {
        host.retire(&name, &version.to_string(), old_digest);
    }
    tracing::info!(piece = %name, %version, digest = %digest.short(), file = %path.display(), "loaded a piece bundle");
    Ok((name, version, digest))
}

/// One pieces directory, kept in the catalog.
pub struct Directory {
    dir: PathBuf,
    host: Arc<PieceHost>,
    catalog: Arc<Catalog>,
    seen: HashMap<PathBuf, Seen>,
}

impl Directory {
    pub fn new(dir: PathBuf, host: Arc<PieceHost>, catalog: Arc<Catalog>) -> Self {
        Self {
            dir,
            host,
            catalog,
            seen: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Scans until `shutdown`.
    pub async fn watch(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.host.config.scan_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(err) = self.scan().await {
                tracing::warn!(dir = %self.dir.display(), error = %err, "cannot scan the pieces directory");
            }
        }
    }

    /// One pass over the directory.
    pub async fn scan(&mut self) -> std::io::Result<Scan> {
        let mut report = Scan::default();
        let mut present = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') || !name.ends_with(SUFFIX) {
                continue;
            }
            let Ok(metadata) = tokio::fs::metadata(&path).await else {
                continue;
            };
            if !metadata.is_file() {
                continue;
            }
            present.push(path.clone());
            let stamp = Stamp {
                size: metadata.len(),
                modified: metadata.modified().ok(),
            };
            if self.seen.get(&path).is_some_and(|s| s.stamp == stamp) {
                continue;
            }
            self.read(path, stamp, &mut report).await;
        }
        let gone: Vec<PathBuf> = self
            .seen
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            self.forget(&path, &mut report);
        }
        Ok(report)
    }

    async fn read(&mut self, path: PathBuf, stamp: Stamp, report: &mut Scan) {
        let previous = self.seen.remove(&path).and_then(|s| s.loaded);
        let loaded = match tokio::fs::read(&path).await {
            Err(err) => Err(format!("cannot read it: {err}")),
            Ok(bytes) => self.load(&path, Bytes::from(bytes), previous.as_ref()),
        };
        let loaded = match loaded {
            Ok(loaded) => {
                report.loaded.push(format!("{} {}", loaded.0, loaded.1));
                Some(loaded)
            }
            Err(why) => {
                tracing::warn!(file = %path.display(), reason = %why, "ignoring a file in the pieces directory until it changes");
                report.refused.push((path.clone(), why));
                previous
            }
        };
        self.seen.insert(path, Seen { stamp, loaded });
    }

    fn load(
        &self,
        path: &Path,
        bytes: Bytes,
        previous: Option<&(String, Version, Digest)>,
    ) -> Result<(String, Version, Digest), String> {
        let loaded = load_file(&self.host, &self.catalog, path, &bytes)?;
        if let Some((old_name, old_version, old_digest)) = previous
            && (old_name != &loaded.0 || old_version != &loaded.1)
        {
            // The file now holds another piece or version: the old one leaves with it.
            self.unload(old_name, old_version, old_digest);
        }
        Ok(loaded)
    }

    fn forget(&mut self, path: &Path, report: &mut Scan) {
        let Some(seen) = self.seen.remove(path) else {
            return;
        };
        let Some((name, version, digest)) = seen.loaded else {
            return;
        };
        if self.unload(&name, &version, &digest) {
            report.removed.push(format!("{name} {version}"));
            tracing::info!(piece = %name, %version, file = %path.display(), "unloaded a piece bundle whose file is gone");
            // Another file may hold the same version: read it again on the next scan.
            for other in self.seen.values_mut() {
                if other
                    .loaded
                    .as_ref()
                    .is_some_and(|(n, v, _)| *n == name && *v == version)
                {
                    other.stamp.size = u64::MAX;
                }
            }
        }
    }

    /// Removes the version if the catalog still has it from this directory with `digest`.
    fn unload(&self, name: &str, version: &Version, digest: &Digest) -> bool {
        let removed = self.catalog.update(|registry| {
            let ours = registry.entry(name, version).is_some_and(|e| {
                matches!(&e.origin, Origin::Directory { digest: d, .. } if d == digest.as_str())
            });
            ours.then(|| registry.remove(name, version)).flatten()
        });
        if removed.is_some() {
            self.host
                .retire(name, &version.to_string(), digest.as_str());
        }
        removed.is_some()
    }
}

//! The archive: a gzip-compressed tar with `piece.json` first, then the payload.
//!
//! Packing is deterministic — entries sorted by path, every timestamp, owner and mode fixed,
//! no gzip file name or time — so the same inputs always give the same bytes, and so the same
//! digest. Reading checks everything before anything is written to disk: only regular files,
//! only relative paths without `..`, bounded counts and sizes, a valid manifest whose
//! entrypoint is in the archive.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use flate2::read::GzDecoder;
use flate2::{Compression, GzBuilder};

use crate::digest::Digest;
use crate::manifest::{MANIFEST, Manifest, ManifestError, RuntimeKind, check_path};

/// Most files a bundle may hold.
pub const MAX_FILES: usize = 10_000;
/// Most bytes a bundle may unpack to.
pub const MAX_UNPACKED_BYTES: u64 = 1 << 30;

/// A bundle that cannot be packed, read or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("not a piece bundle: {0}")]
    Malformed(String),
    #[error("{0}")]
    Pack(String),
    #[error("cannot write the bundle's files to {path}: {source}")]
    Unpack {
        path: String,
        source: std::io::Error,
    },
}

/// One file to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Its path inside the bundle.
    pub path: String,
    pub contents: Vec<u8>,
    pub executable: bool,
}

/// A file in a bundle, as listed by [`Bundle::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub executable: bool,
}

/// A bundle that passed every check, identified by the digest of its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub manifest: Manifest,
    pub digest: Digest,
    /// The payload (everything but `piece.json`), by path.
    pub files: Vec<Listed>,
    /// Size of the `.piece.tgz`.
    pub size: u64,
}

/// Packs `manifest` and `files` into a `.piece.tgz`.
pub fn pack(manifest: &Manifest, files: &[File]) -> Result<Vec<u8>, BundleError> {
    manifest.validate()?;
    let mut sorted: BTreeMap<&str, &File> = BTreeMap::new();
    for file in files {
        check_path(&file.path).map_err(|p| BundleError::Pack(format!("file {p}")))?;
        if file.path == MANIFEST {
            return Err(BundleError::Pack(
                "piece.json is written from the manifest, not packed as a file".into(),
            ));
        }
        if sorted.insert(&file.path, file).is_some() {
            return Err(BundleError::Pack(format!("{} is packed twice", file.path)));
        }
    }
    let entrypoint = &manifest.runtime.entrypoint;
    match sorted.get(entrypoint.as_str()) {
        None => {
            return Err(BundleError::Pack(format!(
                "the entrypoint {entrypoint} is not among the packed files"
            )));
        }
        Some(file) if manifest.runtime.kind == RuntimeKind::Exec && !file.executable => {
            return Err(BundleError::Pack(format!(
                "the entrypoint {entrypoint} of an exec bundle must be executable"
            )));
        }
        Some(_) => {}
    }
    let gzip = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gzip);
    append(&mut tar, MANIFEST, &manifest.to_json(), false)?;
    for file in sorted.values() {
        append(&mut tar, &file.path, &file.contents, file.executable)?;
    }
    let gzip = tar
        .into_inner()
        .map_err(|e| BundleError::Pack(e.to_string()))?;
    gzip.finish().map_err(|e| BundleError::Pack(e.to_string()))
}

fn append<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    contents: &[u8],
    executable: bool,
) -> Result<(), BundleError> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(contents.len() as u64);
    header.set_mode(if executable { 0o755 } else { 0o644 });
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, path, contents)
        .map_err(|e| BundleError::Pack(format!("cannot pack {path}: {e}")))
}

impl Bundle {
    /// Reads and checks a `.piece.tgz` without writing anything.
    pub fn read(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let mut manifest = None;
        let mut files = Vec::new();
        walk(bytes, |path, entry, executable| {
            if path == MANIFEST {
                let mut json = Vec::new();
                entry
                    .take(1 << 20)
                    .read_to_end(&mut json)
                    .map_err(|e| malformed(format!("piece.json: {e}")))?;
                manifest = Some(Manifest::parse(&json)?);
            } else {
                files.push(Listed {
                    path: path.to_owned(),
                    size: entry.size(),
                    executable,
                });
            }
            Ok(())
        })?;
        let manifest = manifest.ok_or_else(|| malformed("it has no piece.json".into()))?;
        let entrypoint = &manifest.runtime.entrypoint;
        match files.iter().find(|f| &f.path == entrypoint) {
            None => {
                return Err(malformed(format!(
                    "its entrypoint {entrypoint} is not in the bundle"
                )));
            }
            Some(file) if manifest.runtime.kind == RuntimeKind::Exec && !file.executable => {
                return Err(malformed(format!(
                    "its entrypoint {entrypoint} is not executable"
                )));
            }
            Some(_) => {}
        }
        Ok(Bundle {
            manifest,
            digest: Digest::of(bytes),
            files,
            size: bytes.len() as u64,
        })
    }

    /// Writes the payload of `bytes` (already [`read`](Bundle::read)) under `dir`, which must
    /// not exist yet. Executables keep their execute bit; nothing else carries over from the
    /// archive (owners, times, other modes).
    pub fn unpack(bytes: &[u8], dir: &Path) -> Result<(), BundleError> {
        let io = |path: &Path, source: std::io::Error| BundleError::Unpack {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir(dir).map_err(|e| io(dir, e))?;
        walk(bytes, |path, entry, executable| {
            if path == MANIFEST {
                return Ok(());
            }
            let target = dir.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            let mut out = std::fs::File::create(&target).map_err(|e| io(&target, e))?;
            std::io::copy(entry, &mut out).map_err(|e| io(&target, e))?;
            set_executable(&target, executable).map_err(|e| io(&target, e))
        })
    }
}

#[cfg(unix)]
fn set_executable(path: &Path, executable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_executable(_: &Path, _: bool) -> std::io::Result<()> {
    Ok(())
}

fn malformed(message: String) -> BundleError {
    BundleError::Malformed(message)
}

/// Visits every entry after checking it: a regular file at a clean relative path, within the
/// count and size limits, each path once.
fn walk(
    bytes: &[u8],
    mut visit: impl FnMut(&str, &mut tar::Entry<'_, GzDecoder<&[u8]>>, bool) -> Result<(), BundleError>,
) -> Result<(), BundleError> {
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let entries = archive
        .entries()
        .map_err(|e| malformed(format!("not a gzip-compressed tar: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| malformed(format!("a damaged entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| malformed(format!("an entry with an unreadable path: {e}")))?;
        let path = path
            .to_str()
            .ok_or_else(|| malformed("an entry's path is not UTF-8".into()))?
            .to_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(malformed(format!(
                "{path} is not a regular file (links, directories and devices are not allowed)"
            )));
        }
        check_path(&path).map_err(|p| malformed(format!("entry {p}")))?;
        if !seen.insert(path.clone()) {
            return Err(malformed(format!("{path} appears twice")));
        }
        if seen.len() > MAX_FILES {
            return Err(malformed(format!("more than {MAX_FILES} files")));
        }
        total = total.saturating_add(entry.size());
        if total > MAX_UNPACKED_BYTES {
            return Err(malformed(format!(
                "it unpacks to more than {} MiB",
                MAX_UNPACKED_BYTES >> 20
            )));
        }
        let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
        visit(&path, &mut entry, executable)?;
    }
    // Read to the end of the gzip stream, whose trailer checksum catches a damaged archive.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .map_err(|e| malformed(format!("a damaged archive: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn manifest() -> Manifest {
        let piece = piecework_sdk::Piece::builder("acme", "Acme")
            .version("1.0.0")
            .build()
            .unwrap();
        Manifest::exec(piece.metadata().clone(), "bin/acme")
    }

    fn files() -> Vec<File> {
        vec![
            File {
                path: "README.md".into(),
                contents: b"# acme\n".to_vec(),
                executable: false,
            },
            File {
                path: "bin/acme".into(),
                contents: b"#!/bin/sh\necho hi\n".to_vec(),
                executable: true,
            },
        ]
    }

    #[test]
    fn packing_is_deterministic_and_reads_back() {
        let one = pack(&manifest(), &files()).unwrap();
        let mut reversed = files();
        reversed.reverse();
        let two = pack(&manifest(), &reversed).unwrap();
        assert_eq!(
            one, two,
            "the same inputs in another order give the same bytes"
        );
        let bundle = Bundle::read(&one).unwrap();
        assert_eq!(bundle.manifest, manifest());
        assert_eq!(bundle.digest, Digest::of(&one));
        let paths: Vec<&str> = bundle.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["README.md", "bin/acme"]);
        assert!(bundle.files[1].executable && !bundle.files[0].executable);

        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("acme");
        Bundle::unpack(&one, &into).unwrap();
        assert_eq!(
            std::fs::read(into.join("bin/acme")).unwrap(),
            files()[1].contents
        );
        assert!(!into.join("piece.json").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(into.join("bin/acme"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
        }
    }

    #[test]
    fn packing_refuses_what_could_not_run() {
        let mut missing = files();
        missing.remove(1);
        assert!(
            pack(&manifest(), &missing)
                .unwrap_err()
                .to_string()
                .contains("not among")
        );
        let mut not_exec = files();
        not_exec[1].executable = false;
        assert!(
            pack(&manifest(), &not_exec)
                .unwrap_err()
                .to_string()
                .contains("executable")
        );
        let mut escaping = files();
        escaping[0].path = "../x".into();
        assert!(pack(&manifest(), &escaping).is_err());
    }

    /// A hand-made archive, to feed the reader what `pack` would never write.
    fn raw(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let gzip = GzBuilder::new().write(Vec::new(), Compression::fast());
        let mut tar = tar::Builder::new(gzip);
        for (path, kind, contents) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(contents.len() as u64);
            header.set_mode(0o755);
            // `append_data` refuses `..`; write the name into the header directly.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            tar.append(&header, *contents).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn reading_refuses_tampered_and_hostile_archives() {
        let json = manifest().to_json();
        let ok = raw(&[
            ("piece.json", tar::EntryType::Regular, &json),
            ("bin/acme", tar::EntryType::Regular, b"x"),
        ]);
        assert!(Bundle::read(&ok).is_ok());
        let escape = raw(&[
            ("piece.json", tar::EntryType::Regular, &json),
            ("../../etc/cron.d/x", tar::EntryType::Regular, b"x"),
        ]);
        assert!(
            Bundle::read(&escape)
                .unwrap_err()
                .to_string()
                .contains("..")
        );
        let link = raw(&[
            ("piece.json", tar::EntryType::Regular, &json),
            ("bin/acme", tar::EntryType::Symlink, b""),
        ]);
        assert!(
            Bundle::read(&link)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        let no_manifest = raw(&[("bin/acme", tar::EntryType::Regular, b"x")]);
        assert!(
            Bundle::read(&no_manifest)
                .unwrap_err()
                .to_string()
                .contains("no piece.json")
        );
        let no_entrypoint = raw(&[("piece.json", tar::EntryType::Regular, &json)]);
        assert!(
            Bundle::read(&no_entrypoint)
                .unwrap_err()
                .to_string()
                .contains("entrypoint")
        );
        assert!(Bundle::read(b"not gzip at all").is_err());
        let mut flipped = pack(&manifest(), &files()).unwrap();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0xff;
        assert!(
            Bundle::read(&flipped).is_err(),
            "a damaged archive is refused"
        );
    }
}

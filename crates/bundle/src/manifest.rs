//! `piece.json`: what a bundle holds and how to run it.
//!
//! ```json
//! {
//!   "format": 1,
//!   "protocol": "1.0",
//!   "runtime": { "kind": "exec", "entrypoint": "bin/my-company-api", "platform": "linux-x86_64" },
//!   "limits": { "memory_mb": 256 },
//!   "env": ["MY_COMPANY_CA_BUNDLE"],
//!   "piece": { "name": "my-company-api", "version": "1.0.0", … }
//! }
//! ```
//!
//! `piece` is the piece's metadata exactly as `describe` returns it, so the catalog, flow
//! validation and the docs read a bundle without starting it.

use piecework_sdk::PieceMetadata;
use piecework_sdk::protocol;
use serde::{Deserialize, Serialize};

/// The manifest format this crate reads and writes.
pub const FORMAT: u32 = 1;
/// The manifest's name inside a bundle.
pub const MANIFEST: &str = "piece.json";

/// A bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format ([`FORMAT`]).
    pub format: u32,
    /// The piece protocol the entrypoint speaks (`major.minor`).
    pub protocol: String,
    pub runtime: RuntimeSpec,
    #[serde(default)]
    pub limits: Limits,
    /// Environment variables the piece may read, passed from the host's environment when set
    /// there. Nothing else reaches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The piece's metadata, as `describe` returns it.
    pub piece: PieceMetadata,
}

/// How the payload is started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    pub kind: RuntimeKind,
    /// The program (`exec`) or script (`node`), relative to the bundle's root.
    pub entrypoint: String,
    /// For `exec`: the OS and CPU it was built for (`linux-x86_64`); hosts refuse others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// What kind of program a bundle carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// A native executable that speaks the protocol itself (a Rust piece built with `serve`).
    Exec,
    /// A JavaScript module run by piecework's Node host.
    Node,
}

/// Resource limits of the piece's processes; unset fields take the host's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Address-space limit of each process, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Largest protocol frame either side accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// Calls one process works on at once; more wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// A manifest that cannot be used; the message says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("piece.json: {0}")]
pub struct ManifestError(pub String);

/// The platform this binary runs on, as manifests name it.
pub fn current_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

impl Manifest {
    /// A manifest for an executable built on this platform.
    pub fn exec(piece: PieceMetadata, entrypoint: impl Into<String>) -> Self {
        Self {
            format: FORMAT,
            protocol: protocol::VERSION.to_owned(),
            runtime: RuntimeSpec {
                kind: RuntimeKind::Exec,
                entrypoint: entrypoint.into(),
                platform: Some(current_platform()),
            },
            limits: Limits::default(),
            env: Vec::new(),
            piece,
        }
    }

    /// A bundle of a script for piecework's Node host: it runs on any platform with Node.
    pub fn node(piece: PieceMetadata, entrypoint: impl Into<String>) -> Self {
        Self {
            runtime: RuntimeSpec {
                kind: RuntimeKind::Node,
                entrypoint: entrypoint.into(),
                platform: None,
            },
            ..Self::exec(piece, String::new())
        }
    }

    pub fn name(&self) -> &str {
        &self.piece.name
    }

    pub fn version(&self) -> &semver::Version {
        &self.piece.version
    }

    /// `NAME-VERSION.piece.tgz`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.piece.tgz", self.piece.name, self.piece.version)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("manifests serialize");
        json.push(b'\n');
        json
    }

    /// Checks what serde cannot: the format, the protocol, names, paths and env names.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let fail = |message: String| Err(ManifestError(message));
        if self.format != FORMAT {
            return fail(format!(
                "format {} is not supported (this piecework reads format {FORMAT})",
                self.format
            ));
        }
        if let Err(err) = protocol::check_version(&self.protocol, "bundle") {
            return fail(format!("protocol: {err}"));
        }
        if !piecework_sdk::piece::is_piece_name(&self.piece.name) {
            return fail(format!(
                "piece.name {:?} must be lowercase letters, digits and '-'",
                self.piece.name
            ));
        }
        if let Err(err) = piecework_sdk::piece::check_metadata(&self.piece) {
            return fail(format!("piece: {}", err.problem));
        }
        if !self.piece.version.build.is_empty() {
            return fail(format!(
                "piece.version {}: build metadata (`+…`) is not allowed, versions must be comparable",
                self.piece.version
            ));
        }
        if let Err(problem) = check_path(&self.runtime.entrypoint) {
            return fail(format!("runtime.entrypoint: {problem}"));
        }
        if self.runtime.entrypoint == MANIFEST {
            return fail("runtime.entrypoint cannot be piece.json".into());
        }
        for name in &self.env {
            if let Err(problem) = check_env_name(name) {
                return fail(format!("env: {name:?} {problem}"));
            }
        }
        if self.limits.memory_mb == Some(0) || self.limits.concurrency == Some(0) {
            return fail("limits: memory_mb and concurrency must be at least 1".into());
        }
        if self.limits.max_message_bytes.is_some_and(|n| n < 1024) {
            return fail("limits.max_message_bytes must be at least 1024".into());
        }
        Ok(())
    }
}

/// A path inside a bundle: relative, `/`-separated, no `.` or `..` parts, portable characters.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.starts_with('/') || path.contains('\\') {
        return Err(format!(
            "{path:?} must be a relative path with `/` separators"
        ));
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("{path:?} has an empty, `.` or `..` part"));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | '+'))
        {
            return Err(format!(
                "{path:?} may only use letters, digits and `. - _ @ +`"
            ));
        }
    }
    Ok(())
}

/// Environment names a piece may ask for: upper-case identifiers, never piecework's own
/// (`PW_*`: the encryption key, the API key, backend URLs) nor the dynamic loader's (`LD_*`).
pub fn check_env_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err("must be upper-case letters, digits and '_'");
    }
    if name.starts_with("PW_") {
        return Err("is piecework's own: pieces never see PW_* variables");
    }
    if name.starts_with("LD_") {
        return Err("is the dynamic loader's and cannot be passed to a piece");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> PieceMetadata {
        piecework_sdk::Piece::builder("acme", "Acme")
            .version("1.2.0")
            .build()
            .unwrap()
            .metadata()
            .clone()
    }

    #[test]
    fn manifests_round_trip_and_name_their_file() {
        let mut manifest = Manifest::exec(metadata(), "bin/acme");
        manifest.env = vec!["ACME_REGION".into()];
        manifest.limits.memory_mb = Some(128);
        let parsed = Manifest::parse(&manifest.to_json()).unwrap();
        assert_eq!(parsed, manifest);
        assert_eq!(parsed.file_name(), "acme-1.2.0.piece.tgz");
        assert_eq!(parsed.runtime.platform, Some(current_platform()));
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let check = |edit: fn(&mut Manifest)| {
            let mut manifest = Manifest::exec(metadata(), "bin/acme");
            edit(&mut manifest);
            manifest.validate().unwrap_err().to_string()
        };
        assert!(check(|m| m.format = 2).contains("format 2"));
        assert!(check(|m| m.protocol = "2.0".into()).contains("major versions differ"));
        assert!(check(|m| m.runtime.entrypoint = "../escape".into()).contains("entrypoint"));
        assert!(check(|m| m.runtime.entrypoint = "/usr/bin/env".into()).contains("relative"));
        assert!(check(|m| m.env = vec!["PW_ENCRYPTION_KEY".into()]).contains("never see PW_*"));
        assert!(check(|m| m.env = vec!["LD_PRELOAD".into()]).contains("loader"));
        assert!(check(|m| m.env = vec!["lower".into()]).contains("upper-case"));
        assert!(check(|m| m.limits.memory_mb = Some(0)).contains("at least 1"));
        let err = Manifest::parse(br#"{"format": 1}"#).unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
    }
}

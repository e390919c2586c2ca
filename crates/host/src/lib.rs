//! The piece host: runs pieces that ship as bundles, each in its own child process, and keeps
//! the process catalog in step with where bundles come from.
//!
//! - [`PieceHost::load`] turns a bundle's manifest into a [`Piece`] whose actions and triggers
//!   call a [`pool::Pool`] over piece protocol v1 ([`remote`]). The pool starts the process on
//!   first use (unpacking the bundle into the cache and checking its digest and signature
//!   first), keeps it warm, restarts it with backoff after a crash and stops it when idle.
//! - [`process`] is one child: a cleared environment (only what the manifest declares), an
//!   address-space limit, no core dumps, a cap on frame size, stderr into the host's log.
//! - [`directory`] scans and watches `PW_PIECES_DIR` (bundles baked into an image or dropped
//!   into a mounted volume); [`registry`] follows the piece registry in NATS, so a version
//!   published once is known to every process without a restart.
//!
//! A bundle's program is native (`exec`) or a script for piecework's Node host (`node`,
//! `hosts/node`: a TypeScript piece of the Activepieces framework), run with the `node` on
//! PATH, its heap bounded by `--max-old-space-size` instead of the address space.
//!
//! Built-in pieces never come here: they run in the process that registered them.

pub mod build;
pub mod conformance;
pub mod directory;
pub mod pool;
pub mod process;
pub mod registry;
pub mod remote;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use piecework_bundle::manifest::current_platform;
use piecework_bundle::{Bundle, Digest, Manifest, RuntimeKind, Signature, TrustedKeys};
use piecework_bus::pieces::PieceRegistry;
use piecework_sdk::protocol::{self, DescribeParams, LogLevel};
use piecework_sdk::{EgressPolicy, Piece, PieceError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::pool::{Pool, PoolKey, Prepare};
use crate::process::{Label, Launch};

/// How bundles are run. The `[pieces]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// A directory of bundles (`*.piece.tgz`), scanned at start and watched (`PW_PIECES_DIR`).
    pub dir: Option<PathBuf>,
    /// How often the directory is scanned for new, changed and removed bundles.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
    /// Where bundles are unpacked (and registry downloads kept), by digest. Keep it private
    /// to the process's user.
    pub cache_dir: PathBuf,
    /// Public keys (`ID:BASE64`, comma-separated) whose signatures are trusted; when set, a
    /// bundle without a valid signature by one of them is refused (`PW_TRUSTED_KEYS`).
    pub trusted_keys: String,
    /// Values for the env names pieces declare, per piece: `[pieces.env.my-company-api]
    /// MY_COMPANY_REGION = "eu"`. A declared name not set here is taken from this process's
    /// environment, when set there.
    pub env: BTreeMap<String, BTreeMap<String, String>>,
    /// A piece process with no call for this long is stopped (and started again when needed).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a new process may take to answer `describe`.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long a cancelled call, or a process asked to stop, may take before it is killed.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Address-space limit of a piece process, in MiB, unless its manifest sets one.
    pub memory_mb: u64,
    /// Largest frame exchanged with a piece, unless its manifest sets a limit.
    pub max_message_bytes: usize,
    /// Calls one piece process works on at once, unless its manifest says.
    pub concurrency: usize,
    /// The most verbose level of the pieces' own log lines that reaches this log.
    pub log_level: LogLevel,
    /// The API's address as callers outside reach it, told to pieces in `describe`: filled
    /// in from `[api] public_url`, not set here.
    #[serde(skip)]
    pub public_url: Option<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            dir: None,
            scan_interval: Duration::from_secs(2),
            cache_dir: std::env::temp_dir().join("piecework-pieces"),
            trusted_keys: String::new(),
            env: BTreeMap::new(),
            idle_timeout: Duration::from_secs(300),
            start_timeout: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(5),
            memory_mb: 1024,
            max_message_bytes: protocol::DEFAULT_MAX_MESSAGE_BYTES,
            concurrency: 64,
            log_level: LogLevel::Info,
            public_url: None,
        }
    }
}

impl HostConfig {
    pub fn validate(&self) -> Result<(), String> {
        TrustedKeys::parse(&self.trusted_keys).map_err(|e| format!("trusted_keys: {e}"))?;
        if self.memory_mb < 16 {
            return Err("memory_mb: must be at least 16".into());
        }
        if self.concurrency == 0 {
            return Err("concurrency: must be at least 1".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes: must be at least 1024".into());
        }
        if self.scan_interval < Duration::from_millis(100) {
            return Err("scan_interval: must be at least 100ms".into());
        }
        for (piece, names) in &self.env {
            for name in names.keys() {
                piecework_bundle::manifest::check_env_name(name)
                    .map_err(|problem| format!("env.{piece}.{name}: {problem}"))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid [pieces] configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Definition(#[from] piecework_sdk::PieceDefinitionError),
    #[error("cannot prepare the piece cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

/// Where a bundle's bytes are, for when its process first starts.
#[derive(Clone)]
pub enum Source {
    /// A file: the pieces directory, or one given on the command line. Its signature, if any,
    /// is the file beside it with `.sig` appended.
    File(PathBuf),
    /// The piece registry.
    Registry {
        registry: Arc<dyn PieceRegistry>,
        signature: Option<Signature>,
    },
    /// Bytes in hand.
    Bytes {
        bytes: Bytes,
        signature: Option<Signature>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Registry { .. } => f.write_str("the registry"),
            Source::Bytes { .. } => f.write_str("bytes"),
        }
    }
}

/// The signature file of a bundle file.
pub fn signature_path(bundle: &Path) -> PathBuf {
    let mut name = bundle.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Reads a signature file; `Ok(None)` when there is none.
pub fn read_signature(path: &Path) -> Result<Option<Signature>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a bundle signature: {e}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

impl Source {
    async fn signature(&self) -> Result<Option<Signature>, PieceError> {
        match self {
            Source::File(path) => {
                let path = signature_path(path);
                tokio::task::spawn_blocking(move || read_signature(&path))
                    .await
                    .map_err(|e| PieceError::retryable(e.to_string()))?
                    .map_err(PieceError::fatal)
            }
            Source::Registry { signature, .. } | Source::Bytes { signature, .. } => {
                Ok(signature.clone())
            }
        }
    }

    async fn bytes(&self, digest: &Digest) -> Result<Bytes, PieceError> {
        match self {
            Source::File(path) => tokio::fs::read(path).await.map(Bytes::from).map_err(|e| {
                PieceError::fatal(format!("cannot read the bundle {}: {e}", path.display()))
            }),
            Source::Registry { registry, .. } => registry
                .download(digest)
                .await
                .map_err(|e| PieceError::retryable(e.to_string()))?
                .ok_or_else(|| {
                    PieceError::fatal(format!("the registry has no bundle {digest} (removed?)"))
                }),
            Source::Bytes { bytes, .. } => Ok(bytes.clone()),
        }
    }
}

/// Runs bundles for this process. One per process, shared.
pub struct PieceHost {
    config: HostConfig,
    trusted: TrustedKeys,
    describe: DescribeParams,
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl std::fmt::Debug for PieceHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceHost")
            .field("cache_dir", &self.config.cache_dir)
            .finish_non_exhaustive()
    }
}

impl PieceHost {
    /// A host with `config`; pieces' HTTP clients get `egress`.
    pub fn new(config: HostConfig, egress: EgressPolicy) -> Result<Arc<Self>, HostError> {
        config.validate().map_err(HostError::Config)?;
        let trusted = TrustedKeys::parse(&config.trusted_keys)
            .map_err(|e| HostError::Config(e.to_string()))?;
        create_private_dir(&config.cache_dir).map_err(|source| HostError::Cache {
            path: config.cache_dir.display().to_string(),
            source,
        })?;
        let describe = DescribeParams {
            protocol: protocol::VERSION.to_owned(),
            host: concat!("piecework ", env!("CARGO_PKG_VERSION")).to_owned(),
            egress,
            log_level: config.log_level,
            max_message_bytes: config.max_message_bytes,
            public_url: config.public_url.clone(),
        };
        Ok(Arc::new(Self {
            config,
            trusted,
            describe,
            pools: Mutex::default(),
        }))
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    pub fn trusted_keys(&self) -> &TrustedKeys {
        &self.trusted
    }

    /// A piece backed by the bundle `digest` with this manifest. Nothing starts until the
    /// first call.
    pub fn load(
        self: &Arc<Self>,
        manifest: &Manifest,
        digest: &Digest,
        source: Source,
    ) -> Result<Piece, HostError> {
        let label = Label {
            piece: manifest.piece.name.clone(),
            version: manifest.piece.version.to_string(),
            digest: digest.short().to_owned(),
        };
        let key = PoolKey {
            name: label.piece.clone(),
            version: label.version.clone(),
            digest: digest.to_string(),
        };
        let mut describe = self.describe.clone();
        if let Some(max) = manifest.limits.max_message_bytes {
            describe.max_message_bytes = max;
        }
        let launcher = Launcher {
            host: Arc::downgrade(self),
            manifest: manifest.clone(),
            digest: digest.clone(),
            source,
            label: label.clone(),
        };
        let pool = Arc::new(Pool::new(
            key,
            label,
            Box::new(launcher),
            manifest.piece.clone(),
            describe,
            self.config.start_timeout,
        ));
        let piece = remote::piece(manifest.piece.clone(), pool.clone())?;
        let mut pools = self.pools.lock().unwrap();
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(&pool));
        Ok(piece)
    }

    /// Reads, checks and loads a bundle held in memory (`piece test FILE`, tests).
    pub fn load_bytes(
        self: &Arc<Self>,
        bytes: Bytes,
        signature: Option<Signature>,
    ) -> Result<(Piece, Bundle), String> {
        let bundle = Bundle::read(&bytes).map_err(|e| e.to_string())?;
        let piece = self
            .load(
                &bundle.manifest,
                &bundle.digest,
                Source::Bytes { bytes, signature },
            )
            .map_err(|e| e.to_string())?;
        Ok((piece, bundle))
    }

    fn live_pools(&self) -> Vec<Arc<Pool>> {
        self.pools
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Retires the pools of `name` `version` whose digest is `digest` (the bundle was replaced
    /// or removed): their processes stop once their calls are done.
    pub fn retire(&self, name: &str, version: &str, digest: &str) {
        for pool in self.live_pools() {
            let key = pool.key();
            if key.name == name && key.version == version && key.digest == digest {
                pool.retire();
            }
        }
    }

    /// Stops processes that have been idle too long (and retired ones once idle).
    pub fn tidy(&self) {
        for pool in self.live_pools() {
            pool.tidy(self.config.idle_timeout);
        }
    }

    /// Tidies now and then until `shutdown`, then stops every process.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let every =
            (self.config.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.tidy(),
                () = shutdown.cancelled() => break,
            }
        }
        self.stop_all().await;
    }

    /// Stops every piece process, waiting for them to exit.
    pub async fn stop_all(&self) {
        let pools = self.live_pools();
        futures::future::join_all(pools.iter().map(|p| p.stop())).await;
    }

    /// Starts (or reuses) the process of bundle `name` `version` and asks it for `health`:
    /// what `piecework doctor` checks. Returns how long that took.
    pub async fn check(&self, name: &str, version: &str) -> Result<Duration, PieceError> {
        let pool = self
            .live_pools()
            .into_iter()
            .find(|p| p.key().name == name && p.key().version == version && !p.is_retired())
            .ok_or_else(|| PieceError::fatal(format!("no bundle {name} {version} is loaded")))?;
        let started = std::time::Instant::now();
        let health: protocol::Health = pool
            .call(protocol::method::HEALTH, &serde_json::json!({}), None)
            .await?;
        if health.status != "ok" {
            return Err(PieceError::fatal(format!(
                "it answered health with status {:?}",
                health.status
            )));
        }
        Ok(started.elapsed())
    }

    /// The pools of this host, for inspection.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.live_pools()
    }

    fn env_for(&self, manifest: &Manifest, home: &Path) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), home.into()),
            ("TMPDIR".into(), home.into()),
            ("LANG".into(), "C.UTF-8".into()),
            // Few malloc arenas: the address-space limit then bounds memory, not reservations.
            ("MALLOC_ARENA_MAX".into(), "2".into()),
        ];
        let configured = self.config.env.get(&manifest.piece.name);
        for name in &manifest.env {
            let value = configured
                .and_then(|values| values.get(name).map(OsString::from))
                .or_else(|| std::env::var_os(name));
            if let Some(value) = value {
                env.push((name.into(), value));
            }
        }
        env
    }
}

/// Prepares a bundle for its pool: bytes checked, unpacked by digest, started under limits.
struct Launcher {
    host: Weak<PieceHost>,
    manifest: Manifest,
    digest: Digest,
    source: Source,
    label: Label,
}

#[async_trait]
impl Prepare for Launcher {
    async fn prepare(&self) -> Result<Launch, PieceError> {
        let host = self
            .host
            .upgrade()
            .ok_or_else(|| PieceError::retryable("the piece host is shutting down"))?;
        let refused =
            |why: String| PieceError::fatal(format!("piece {} cannot run: {why}", self.label));
        let runtime = &self.manifest.runtime;
        let node = match runtime.kind {
            RuntimeKind::Node => Some(node_program().ok_or_else(|| {
                refused("it is a `node` bundle and this machine has no Node.js: put Node 20 or newer on PATH".into())
            })?),
            RuntimeKind::Exec => None,
        };
        if let Some(platform) = &runtime.platform
            && *platform != current_platform()
        {
            return Err(refused(format!(
                "it was built for {platform}, this host is {}",
                current_platform()
            )));
        }
        let signature = self.source.signature().await?;
        host.trusted
            .verify(&self.digest, signature.as_ref())
            .map_err(|e| refused(e.to_string()))?;
        let dir = host.config.cache_dir.join(self.digest.hex());
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            let bytes = self.source.bytes(&self.digest).await?;
            let actual = Digest::of(&bytes);
            if actual != self.digest {
                return Err(refused(format!(
                    "its bytes from {:?} have digest {actual}, not {} (changed or tampered with)",
                    self.source, self.digest
                )));
            }
            let cache = host.config.cache_dir.clone();
            let target = dir.clone();
            tokio::task::spawn_blocking(move || unpack_into_cache(&bytes, &cache, &target))
                .await
                .map_err(|e| PieceError::retryable(e.to_string()))?
                .map_err(refused)?;
        }
        let home = host.config.cache_dir.join("home").join(self.digest.hex());
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(|e| PieceError::retryable(format!("cannot create {}: {e}", home.display())))?;
        let limits = &self.manifest.limits;
        let entrypoint = dir.join(&runtime.entrypoint);
        let memory_mb = limits.memory_mb.unwrap_or(host.config.memory_mb);
        let (program, args, memory_bytes) = match node {
            // V8 reserves far more address space than it uses: its heap is bounded by its own
            // flag, the address space only loosely.
            Some(node) => (
                node,
                vec![
                    format!("--max-old-space-size={memory_mb}").into(),
                    entrypoint.into_os_string(),
                ],
                (memory_mb + NODE_ADDRESS_SPACE_MB) << 20,
            ),
            None => (entrypoint, Vec::new(), memory_mb << 20),
        };
        Ok(Launch {
            label: self.label.clone(),
            program,
            args,
            dir,
            env: host.env_for(&self.manifest, &home),
            memory_bytes,
            max_message_bytes: limits
                .max_message_bytes
                .unwrap_or(host.config.max_message_bytes),
            concurrency: limits.concurrency.unwrap_or(host.config.concurrency),
            cancel_grace: host.config.cancel_grace,
        })
    }
}

/// Address space a Node process gets beyond its heap limit: V8 reserves large regions up
/// front (its code range, and about 10 GiB per WebAssembly memory — `fetch` instantiates
/// one) and fails when it cannot, so for Node the heap flag is the memory bound and the
/// address space only a loose backstop.
pub const NODE_ADDRESS_SPACE_MB: u64 = 64 * 1024;

/// `node` on this process's PATH: the Node host runs `node` bundles with it.
pub fn node_program() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("node"))
            .find(|candidate| candidate.is_file())
    })
}

/// Unpacks into a fresh temporary directory, then renames it into place: a half-written
/// bundle is never mistaken for a complete one, and racing processes agree.
fn unpack_into_cache(bytes: &[u8], cache: &Path, target: &Path) -> Result<(), String> {
    Bundle::read(bytes).map_err(|e| e.to_string())?;
    let staging = cache.join(format!(
        ".unpack-{}-{}",
        std::process::id(),
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bundle")
    ));
    let _ = std::fs::remove_dir_all(&staging);
    Bundle::unpack(bytes, &staging).map_err(|e| e.to_string())?;
    match std::fs::rename(&staging, target) {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(err) => Err(format!(
            "cannot move the unpacked bundle into {}: {err}",
            target.display()
        )),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

//! TypeScript pieces: `piece build` on a directory written with the Activepieces framework
//! (`package.json`, `src/index.ts`). The piece's dependencies are installed with npm, and the
//! piece and piecework's Node host (`hosts/node`, compiled into this binary) are bundled by
//! esbuild into one `piece.js` that speaks the piece protocol under `node`; the bundle is a
//! `node` bundle that deploys like any other.
//!
//! The host's own dependencies (esbuild) are installed once, with `npm ci` from its committed
//! lock file, into a cache directory named after the host's contents.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The host's files, as committed in `hosts/node`.
const HOST_FILES: &[(&str, &str)] = &[
    ("package.json", include_str!("../hosts/node/package.json")),
    (
        "package-lock.json",
        include_str!("../hosts/node/package-lock.json"),
    ),
    ("build.js", include_str!("../hosts/node/build.js")),
    ("src/host.js", include_str!("../hosts/node/src/host.js")),
    (
        "src/metadata.js",
        include_str!("../hosts/node/src/metadata.js"),
    ),
    ("src/names.js", include_str!("../hosts/node/src/names.js")),
    ("src/egress.js", include_str!("../hosts/node/src/egress.js")),
];

/// Whether `dir` holds a TypeScript (or JavaScript) piece rather than a Rust one.
pub fn is_node_piece(dir: &Path) -> bool {
    dir.join("package.json").is_file() && !dir.join("Cargo.toml").is_file()
}

/// `node` on PATH, or a clear error.
pub fn node() -> anyhow::Result<PathBuf> {
    piecework_host::node_program().context(
        "a TypeScript piece needs Node.js 20 or newer: `node` is not on PATH (apt-get install nodejs npm)",
    )
}

/// The host, unpacked and with its dependencies installed, in the cache.
fn host_dir() -> anyhow::Result<PathBuf> {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for (path, contents) in HOST_FILES {
        for byte in path.bytes().chain(contents.bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = cache
        .join("piecework")
        .join(format!("node-host-{hash:016x}"));
    let installed = dir.join("node_modules").join("esbuild");
    if installed.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let _lock = InstallLock::take(&dir)?;
    // Another build may have installed it while this one waited.
    if installed.is_dir() {
        return Ok(dir);
    }
    for (path, contents) in HOST_FILES {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("host files sit in a directory"))?;
        std::fs::write(&file, contents)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    npm(&dir, &["ci", "--omit=dev"])?;
    Ok(dir)
}

/// Held while npm installs into a directory, so builds running at once (two CI jobs, two
/// tests) never install into one `node_modules` together: a lock file created exclusively,
/// removed when dropped. One left by a build that died is taken over after ten minutes.
struct InstallLock(PathBuf);

impl InstallLock {
    fn take(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(".piecework-install.lock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15 * 60);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(Self(path)),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|at| {
                            at.elapsed()
                                .is_ok_and(|age| age > std::time::Duration::from_secs(600))
                        });
                    if stale {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("{} is still held by another build", path.display());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(err) => {
                    return Err(err).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether `dir`'s `node_modules` was installed from its current lock file: npm writes
/// `node_modules/.package-lock.json` when it installs.
fn installed_from_lock(dir: &Path) -> bool {
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (
        modified(dir.join("node_modules").join(".package-lock.json")),
        modified(dir.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed >= lock,
        _ => false,
    }
}

/// Runs `npm ARGS` in `dir`, quietly, failing with npm's own words.
fn npm(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("npm")
        .args(args)
        .args(["--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run npm (apt-get install npm)")?;
    if !output.status.success() {
        bail!(
            "`npm {}` in {} failed:\n{}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Installs the piece's dependencies (`npm ci` with a lock file, else `npm install`) and
/// bundles it with the host into `out/piece.js`; returns that file.
pub fn bundle(dir: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    node()?;
    let host = host_dir()?;
    {
        let _lock = InstallLock::take(dir)?;
        if !installed_from_lock(dir) {
            if dir.join("package-lock.json").is_file() {
                npm(dir, &["ci"])?;
            } else {
                npm(dir, &["install"])?;
            }
        }
    }
    let output = Command::new("node")
        .arg(host.join("build.js"))
        .arg(dir)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .context("cannot run node")?;
    if !output.status.success() {
        bail!(
            "bundling {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(out.join("piece.js"))
}

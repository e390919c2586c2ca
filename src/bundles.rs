//! The piece author's side of bundles: `piecework piece build`, `inspect`, `keygen`, `sign`,
//! `publish`, `versions`, `yank`, `conformance`, and [`open`], which lets every other `piece`
//! command take a bundle file or a piece's source directory where it takes a piece name.
//!
//! A Rust piece is a cargo package with a binary whose `main` calls `piecework_sdk::serve`.
//! `piece build` compiles it, asks the program to describe itself over the protocol and packs
//! it with `[package.metadata.piecework]` from its `Cargo.toml`:
//!
//! ```toml
//! [package.metadata.piecework]
//! bin = "my-company-api"            # which binary is the piece, when there are several
//! env = ["MY_COMPANY_CA_FILE"]      # environment variables it may read
//! limits = { memory_mb = 256 }      # and max_message_bytes, concurrency
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use piecework_bundle::{Bundle, File, Limits, Signature, SigningKey, TrustedKeys};
use piecework_host::build::{self, Options};
use piecework_host::{HostConfig, PieceHost, read_signature, signature_path};
use piecework_sdk::Piece;
use serde::Deserialize;
use serde_json::Value;

use crate::client::ApiClient;

/// The cargo profile a build uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Optimized: what to ship.
    Release,
    /// Unoptimized, fast to build: for trying a piece out.
    Dev,
}

impl Profile {
    fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
        }
    }
}

/// `[package.metadata.piecework]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildMetadata {
    #[serde(default)]
    bin: Option<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    limits: Limits,
}

/// What cargo says about the piece's package.
struct CargoPackage {
    bin: String,
    /// `package.version` of Cargo.toml.
    version: String,
    build: BuildMetadata,
    target_dir: PathBuf,
    manifest: PathBuf,
}

/// A cargo command without what cargo sets for a program it runs: under `cargo run` or a test,
/// the outer package's CARGO_PKG_*, CARGO_MANIFEST_DIR… would make this cargo see a changed
/// environment and rebuild the piece's dependencies from scratch.
fn cargo() -> std::process::Command {
    let program = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_a_program = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                name.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            );
        if set_for_a_program {
            command.env_remove(name.as_ref());
        }
    }
    command
}

fn cargo_package(dir: &Path) -> anyhow::Result<CargoPackage> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} has no Cargo.toml: `piece build` takes a Rust piece's directory (TypeScript pieces come with the Node host)",
            dir.display()
        );
    }
    let manifest = manifest.canonicalize()?;
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run `cargo metadata` (is cargo on PATH?)")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed for {}", manifest.display());
    }
    let metadata: Value = serde_json::from_slice(&out.stdout)?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path()))
        .with_context(|| format!("cargo does not list the package of {}", manifest.display()))?;
    let build: BuildMetadata = match package["metadata"].get("piecework") {
        Some(section) => serde_json::from_value(section.clone())
            .context("[package.metadata.piecework] in Cargo.toml")?,
        None => BuildMetadata::default(),
    };
    let bins: Vec<&str> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    let bin = match (&build.bin, bins.as_slice()) {
        (Some(bin), _) if bins.contains(&bin.as_str()) => bin.clone(),
        (Some(bin), _) => bail!(
            "[package.metadata.piecework] bin = {bin:?}, but the package has no such binary (it has: {})",
            bins.join(", ")
        ),
        (None, [only]) => (*only).to_owned(),
        (None, []) => bail!(
            "{} has no binary: add src/main.rs with `fn main() -> std::process::ExitCode {{ piecework_sdk::serve(my_piece::piece()) }}`",
            manifest.display()
        ),
        (None, several) => bail!(
            "{} has several binaries ({}): name the piece's with `bin = \"…\"` under [package.metadata.piecework]",
            manifest.display(),
            several.join(", ")
        ),
    };
    let version = package["version"].as_str().unwrap_or_default().to_owned();
    let target_dir = metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")?;
    Ok(CargoPackage {
        bin,
        version,
        build,
        target_dir,
        manifest,
    })
}

/// Compiles the piece's binary and returns its path. Cargo's progress goes to stderr unless
/// `quiet` (its errors always do).
fn compile(package: &CargoPackage, profile: Profile, quiet: bool) -> anyhow::Result<PathBuf> {
    let mut command = cargo();
    if quiet {
        command.arg("--quiet");
    }
    let mut child = command
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--profile",
        ])
        .arg(profile.cargo_name())
        .arg("--manifest-path")
        .arg(&package.manifest)
        .args(["--bin", &package.bin])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run `cargo build`")?;
    let stdout = child.stdout.take().expect("piped");
    let mut executable = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == package.bin.as_str()
            && let Some(path) = message["executable"].as_str()
        {
            executable = Some(PathBuf::from(path));
        }
    }
    if !child.wait()?.success() {
        bail!("`cargo build` of {} failed", package.manifest.display());
    }
    executable.with_context(|| format!("cargo built no executable `{}`", package.bin))
}

/// What [`build`] made.
pub struct Built {
    pub path: PathBuf,
    pub bundle: Bundle,
}

/// How to build.
pub struct BuildOptions<'a> {
    /// Where to write the bundle (default: `pieces/` under cargo's target directory).
    pub out: Option<&'a Path>,
    pub profile: Profile,
    pub sign: Option<&'a SigningKey>,
    /// Keep cargo's progress off the terminal.
    pub quiet: bool,
}

/// Builds the piece in `dir` into a bundle. It appears by rename, with its signature already
/// beside it, so a watched pieces directory never sees it half-written.
pub async fn build(dir: &Path, options: &BuildOptions<'_>) -> anyhow::Result<Built> {
    if crate::node::is_node_piece(dir) {
        return build_node(dir, options).await;
    }
    let (profile, quiet, sign, out) = (options.profile, options.quiet, options.sign, options.out);
    let dir = dir.to_owned();
    let (package, program) = tokio::task::spawn_blocking(move || {
        let package = cargo_package(&dir)?;
        let program = compile(&package, profile, quiet)?;
        anyhow::Ok((package, program))
    })
    .await??;
    let mut files = Vec::new();
    let readme = package
        .manifest
        .parent()
        .map(|d| d.join("README.md"))
        .filter(|p| p.is_file());
    if let Some(readme) = readme {
        files.push(File {
            path: "README.md".into(),
            contents: std::fs::read(&readme)?,
            executable: false,
        });
    }
    let options = Options {
        env: package.build.env.clone(),
        limits: package.build.limits.clone(),
        files,
    };
    let (bytes, manifest) = build::bundle_executable(&program, options)
        .await
        .map_err(anyhow::Error::msg)?;
    let version = manifest.piece.version.to_string();
    if !quiet && version != package.version {
        eprintln!(
            "warning: the piece says it is version {version}, Cargo.toml says {}: the bundle is {version}. \
             Keep one number with `.version(env!(\"CARGO_PKG_VERSION\"))`",
            package.version
        );
    }
    let out = out.map_or_else(|| package.target_dir.join("pieces"), Path::to_owned);
    write_bundle(&out, &bytes, &manifest, sign)
}

/// Writes a built bundle (and its signature, with `sign`) into `out`.
fn write_bundle(
    out: &Path,
    bytes: &[u8],
    manifest: &piecework_bundle::Manifest,
    sign: Option<&SigningKey>,
) -> anyhow::Result<Built> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join(manifest.file_name());
    let bundle = Bundle::read(bytes)?;
    if let Some(key) = sign {
        write_atomically(
            &signature_path(&path),
            &signature_json(&key.sign(&bundle.digest)),
        )?;
    }
    write_atomically(&path, bytes)?;
    Ok(Built { path, bundle })
}

/// `"piecework"` in a TypeScript piece's package.json: what `[package.metadata.piecework]`
/// says for a Rust one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeBuildMetadata {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    limits: Limits,
}

/// [`build`] of a TypeScript piece: bundled with the Node host by esbuild (`crate::node`),
/// packed as a `node` bundle in `dist/` (or `out`).
async fn build_node(dir: &Path, options: &BuildOptions<'_>) -> anyhow::Result<Built> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let package: Value = serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)
        .with_context(|| format!("{}/package.json is not JSON", dir.display()))?;
    let metadata: NodeBuildMetadata = match package.get("piecework") {
        Some(section) => {
            serde_json::from_value(section.clone()).context("\"piecework\" in package.json")?
        }
        None => NodeBuildMetadata::default(),
    };
    let staging = tempfile::tempdir()?;
    let script = {
        let (dir, staging) = (dir.clone(), staging.path().to_owned());
        tokio::task::spawn_blocking(move || crate::node::bundle(&dir, &staging)).await??
    };
    let mut files = Vec::new();
    if dir.join("README.md").is_file() {
        files.push(File {
            path: "README.md".into(),
            contents: std::fs::read(dir.join("README.md"))?,
            executable: false,
        });
    }
    let build_options = Options {
        env: metadata.env,
        limits: metadata.limits,
        files,
    };
    let (bytes, manifest) = build::bundle_node(&crate::node::node()?, &script, build_options)
        .await
        .map_err(anyhow::Error::msg)?;
    let out = options.out.map_or_else(|| dir.join("dist"), Path::to_owned);
    write_bundle(&out, &bytes, &manifest, options.sign)
}

fn signature_json(signature: &Signature) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(signature).expect("signatures serialize");
    json.push(b'\n');
    json
}

/// Writes a hidden temporary file beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bundle");
    let staging = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&staging, bytes)
        .with_context(|| format!("cannot write {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `piecework piece inspect`.
pub fn inspect(file: &Path, json: bool, trusted: Option<&str>) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let bundle = Bundle::read(&bytes).with_context(|| file.display().to_string())?;
    let signature = read_signature(&signature_path(file)).map_err(anyhow::Error::msg)?;
    let verdict = match (&signature, trusted) {
        (None, _) => "none".to_owned(),
        (Some(signature), Some(keys)) => {
            match TrustedKeys::parse(keys)?.verify(&bundle.digest, Some(signature)) {
                Ok(Some(key)) => format!("by `{key}` (valid, trusted)"),
                Ok(None) => format!("by `{}` (not a trusted key)", signature.key),
                Err(err) => format!("INVALID: {err}"),
            }
        }
        (Some(signature), None) => format!(
            "by `{}` (not checked: set PW_TRUSTED_KEYS to verify)",
            signature.key
        ),
    };
    let manifest = &bundle.manifest;
    if json {
        let files: Vec<Value> = bundle
            .files
            .iter()
            .map(|f| serde_json::json!({ "path": f.path, "size": f.size, "executable": f.executable }))
            .collect();
        let out = serde_json::json!({
            "digest": bundle.digest,
            "size": bundle.size,
            "manifest": manifest,
            "files": files,
            "signature": signature,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let piece = &manifest.piece;
    println!("{} {}  {}", piece.name, piece.version, piece.description);
    println!(
        "  file       {} ({})",
        file.display(),
        human_size(bundle.size)
    );
    println!("  digest     {}", bundle.digest);
    println!(
        "  runtime    {} {} ({}), protocol {}",
        match manifest.runtime.kind {
            piecework_bundle::RuntimeKind::Exec => "exec",
            piecework_bundle::RuntimeKind::Node => "node",
        },
        manifest.runtime.entrypoint,
        manifest
            .runtime
            .platform
            .as_deref()
            .unwrap_or("any platform"),
        manifest.protocol
    );
    let limits = &manifest.limits;
    let show = |value: Option<String>| value.unwrap_or_else(|| "host default".into());
    println!(
        "  limits     memory {}, messages {}, concurrency {}",
        show(limits.memory_mb.map(|m| format!("{m} MiB"))),
        show(limits.max_message_bytes.map(|b| human_size(b as u64))),
        show(limits.concurrency.map(|c| c.to_string())),
    );
    println!(
        "  env        {}",
        if manifest.env.is_empty() {
            "none".to_owned()
        } else {
            manifest.env.join(", ")
        }
    );
    println!("  signature  {verdict}");
    let names = |names: Vec<&str>| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    println!(
        "  actions    {}",
        names(piece.actions.iter().map(|a| a.name.as_str()).collect())
    );
    println!(
        "  triggers   {}",
        names(piece.triggers.iter().map(|t| t.name.as_str()).collect())
    );
    for file in &bundle.files {
        println!(
            "  file       {} ({}{})",
            file.path,
            human_size(file.size),
            if file.executable { ", executable" } else { "" }
        );
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `piecework piece keygen`: writes the private key (mode 0600) and prints the public one.
pub fn keygen(id: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let private = SigningKey::generate(id)?;
    let key = SigningKey::parse(&private)?;
    let path = out.map_or_else(|| PathBuf::from(format!("{id}.key")), Path::to_owned);
    if path.exists() {
        bail!("{} exists; not overwriting a key", path.display());
    }
    write_private(&path, &format!("{private}\n"))?;
    println!(
        "wrote the private key to {} (keep it secret: CI signs with it)",
        path.display()
    );
    println!("public key, for PW_TRUSTED_KEYS on api, scheduler and workers:");
    println!("{}", key.public_key());
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Reads a signing key from a file, or from `PW_SIGNING_KEY` when `key` is `env`.
pub fn signing_key(key: &str) -> anyhow::Result<SigningKey> {
    let text = if key == "env" {
        std::env::var("PW_SIGNING_KEY").context("--key env: PW_SIGNING_KEY is not set")?
    } else {
        std::fs::read_to_string(key)
            .with_context(|| format!("cannot read the signing key {key}"))?
    };
    Ok(SigningKey::parse(&text)?)
}

/// `piecework piece sign`: writes `FILE.sig`.
pub fn sign(file: &Path, key: &SigningKey) -> anyhow::Result<PathBuf> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let bundle = Bundle::read(&bytes).with_context(|| file.display().to_string())?;
    let path = signature_path(file);
    write_atomically(&path, &signature_json(&key.sign(&bundle.digest)))?;
    Ok(path)
}

/// `piecework piece publish`: sends the bundle (and its signature) to the API.
pub async fn publish(
    client: &ApiClient,
    file: &Path,
    signature: Option<&Path>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let bundle = Bundle::read(&bytes).with_context(|| file.display().to_string())?;
    let signature_file = signature.map_or_else(|| signature_path(file), Path::to_owned);
    let signature = read_signature(&signature_file).map_err(anyhow::Error::msg)?;
    if signature.is_none() && signature_file != signature_path(file) {
        bail!("{} does not exist", signature_file.display());
    }
    let headers: Vec<(&str, String)> = signature
        .iter()
        .map(|s| {
            (
                "piecework-signature",
                serde_json::to_string(s).expect("signatures serialize"),
            )
        })
        .collect();
    let answer = client
        .send_bytes(reqwest::Method::POST, "/v1/pieces", bytes, &headers)
        .await?;
    let piece = &answer["piece"];
    let what = format!(
        "{} {} ({})",
        piece["name"].as_str().unwrap_or_default(),
        piece["version"].as_str().unwrap_or_default(),
        bundle.digest
    );
    if answer["created"] == true {
        match piece["signed_by"].as_str() {
            Some(key) => {
                println!("published {what}, signed by `{key}`: every worker can run it now")
            }
            None => println!(
                "published {what}, unsigned: every worker can run it now, except those that \
                 require a signature (PW_TRUSTED_KEYS)"
            ),
        }
    } else {
        println!("{what} was already published; nothing changed");
    }
    Ok(())
}

/// `piecework piece conformance`: the protocol suite against a program, bundle or directory.
pub async fn conformance(target: &Path) -> anyhow::Result<()> {
    let built;
    let target = if crate::node::is_node_piece(target) {
        let options = BuildOptions {
            out: None,
            profile: Profile::Dev,
            sign: None,
            quiet: true,
        };
        built = build(target, &options).await?;
        built.path.as_path()
    } else {
        target
    };
    let (program, dir, _unpacked) = if target.is_dir() && target.join("Cargo.toml").is_file() {
        let package = cargo_package(target)?;
        let program = compile(&package, Profile::Dev, false)?;
        let dir = program.parent().map(Path::to_owned).unwrap_or_default();
        (program, dir, None)
    } else if target.to_string_lossy().ends_with(".piece.tgz") {
        let bytes = std::fs::read(target)?;
        let bundle = Bundle::read(&bytes)?;
        let unpacked = tempfile::tempdir()?;
        let root = unpacked.path().join("bundle");
        Bundle::unpack(&bytes, &root)?;
        (
            root.join(&bundle.manifest.runtime.entrypoint),
            root,
            Some(unpacked),
        )
    } else {
        let dir = target.parent().map(Path::to_owned).unwrap_or_default();
        (target.to_owned(), dir, None)
    };
    // A script for the Node host runs under `node`.
    let (program, args) = if program.extension().is_some_and(|e| e == "js") {
        (crate::node::node()?, vec![program.into_os_string()])
    } else {
        (program, Vec::new())
    };
    let report = piecework_host::conformance::run_with(&program, &args, &dir).await;
    for check in &report.checks {
        match &check.failure {
            None => println!("✓ {}", check.name),
            Some(why) => println!("✗ {}: {why}", check.name),
        }
    }
    let failed = report.checks.iter().filter(|c| c.failure.is_some()).count();
    if failed > 0 {
        bail!("{failed} of {} protocol checks failed", report.checks.len());
    }
    println!(
        "{} speaks piece protocol {}",
        target.display(),
        piecework_sdk::protocol::VERSION
    );
    Ok(())
}

/// A piece opened for a command: keep it while using the piece, then [`Opened::close`].
pub struct Opened {
    pub piece: Piece,
    host: Option<Arc<PieceHost>>,
    _cache: Option<tempfile::TempDir>,
}

impl Opened {
    /// Stops the piece's process, if it has one.
    pub async fn close(self) {
        if let Some(host) = self.host {
            host.stop_all().await;
        }
    }
}

/// Opens what a `piece` command names: a bundle file, a piece's source directory (built in
/// debug for speed), a built-in piece, or a bundle in the pieces directory — newest version.
pub async fn open(target: &str, pieces_dir: Option<&Path>) -> anyhow::Result<Opened> {
    let path = Path::new(target);
    let source_dir =
        path.is_dir() && (path.join("Cargo.toml").is_file() || crate::node::is_node_piece(path));
    if target.ends_with(".piece.tgz") || source_dir {
        let bytes = if path.is_dir() {
            eprintln!("building {} …", path.display());
            let staging = tempfile::tempdir()?;
            let options = BuildOptions {
                out: Some(staging.path()),
                profile: Profile::Dev,
                sign: None,
                quiet: false,
            };
            build(path, &options).await?;
            let built = std::fs::read_dir(staging.path())?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".piece.tgz"))
                .context("the build wrote no bundle")?;
            std::fs::read(built)?
        } else {
            std::fs::read(path).with_context(|| format!("cannot read {target}"))?
        };
        let signature = read_signature(&signature_path(path)).ok().flatten();
        let cache = tempfile::tempdir()?;
        // What this command just built from source is trusted; a bundle file is checked as
        // the fleet would check it.
        let host = local_host(cache.path(), !path.is_dir())?;
        let (piece, _) = host
            .load_bytes(Bytes::from(bytes), signature)
            .map_err(anyhow::Error::msg)
            .with_context(|| target.to_owned())?;
        return Ok(Opened {
            piece,
            host: Some(host),
            _cache: Some(cache),
        });
    }
    let registry = crate::registry::pieces()?;
    if let Some(piece) = registry.newest(target) {
        return Ok(Opened {
            piece: piece.clone(),
            host: None,
            _cache: None,
        });
    }
    if let Some(dir) = pieces_dir {
        let cache = tempfile::tempdir()?;
        let host = local_host(cache.path(), true)?;
        let catalog = Arc::new(piecework_core::Catalog::new(piecework_core::Registry::new()));
        let mut directory = piecework_host::directory::Directory::new(
            dir.to_owned(),
            host.clone(),
            catalog.clone(),
        );
        directory.scan().await?;
        if let Some(piece) = catalog.snapshot().newest(target) {
            return Ok(Opened {
                piece: piece.clone(),
                host: Some(host),
                _cache: Some(cache),
            });
        }
    }
    let known: Vec<&str> = registry.names().collect();
    bail!(
        "no piece `{target}` (built in: {}{}); give a bundle file or a piece's directory instead",
        known.join(", "),
        pieces_dir.map_or(String::new(), |d| format!("; nor in {}", d.display()))
    )
}

/// A host for running a piece on this machine, caching under `cache`; it requires the
/// signatures `PW_TRUSTED_KEYS` asks for when `check_signatures`.
fn local_host(cache: &Path, check_signatures: bool) -> anyhow::Result<Arc<PieceHost>> {
    let trusted_keys = if check_signatures {
        std::env::var("PW_TRUSTED_KEYS").unwrap_or_default()
    } else {
        String::new()
    };
    let config = HostConfig {
        cache_dir: cache.join("cache"),
        trusted_keys,
        ..HostConfig::default()
    };
    Ok(PieceHost::new(config, crate::piece_test::local_egress())?)
}

//! Making bundles: ask a piece program what it is (over the protocol, as a host would), then
//! pack it with its manifest. `piecework piece build` uses this after compiling the program.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use piecework_bundle::{File, Limits, Manifest};
use piecework_sdk::protocol::{self, DescribeParams, Described, method};
use piecework_sdk::{EgressPolicy, PieceError};

use crate::process::{Exit, Label, Launch, Process};

/// What goes into a bundle besides the program.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Env names the piece may read.
    pub env: Vec<String>,
    pub limits: Limits,
    /// Extra files (a README), by path in the bundle.
    pub files: Vec<File>,
}

/// Starts `program` with nothing but a minimal environment and asks it to `describe` itself.
pub async fn describe(program: &Path, timeout: Duration) -> Result<Described, PieceError> {
    describe_with(program, &[], timeout).await
}

/// [`describe`] of `program ARGS` (`node piece.js`).
async fn describe_with(
    program: &Path,
    args: &[std::ffi::OsString],
    timeout: Duration,
) -> Result<Described, PieceError> {
    let subject = args.last().map_or(program, Path::new);
    let dir = subject
        .parent()
        .map_or_else(|| Path::new(".").to_owned(), Path::to_owned);
    let launch = Launch {
        label: Label {
            piece: program.display().to_string(),
            version: String::new(),
            digest: String::new(),
        },
        program: program.to_owned(),
        args: args.to_vec(),
        dir,
        env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
        memory_bytes: (1 << 30) + (crate::NODE_ADDRESS_SPACE_MB << 20),
        max_message_bytes: protocol::DEFAULT_MAX_MESSAGE_BYTES,
        concurrency: 1,
        cancel_grace: Duration::from_secs(2),
    };
    let process: Arc<Process> = Process::spawn(launch).await?;
    let params = DescribeParams {
        protocol: protocol::VERSION.to_owned(),
        host: concat!("piecework ", env!("CARGO_PKG_VERSION"), " (piece build)").to_owned(),
        egress: EgressPolicy::default(),
        log_level: protocol::LogLevel::Warn,
        max_message_bytes: protocol::DEFAULT_MAX_MESSAGE_BYTES,
        public_url: None,
    };
    let described = tokio::time::timeout(
        timeout,
        process.call::<Described>(method::DESCRIBE, &params, None),
    )
    .await;
    process.end(Exit::Stopped);
    let _ = process.exited().await;
    let described = match described {
        Ok(described) => described?,
        Err(_) => {
            return Err(PieceError::fatal(format!(
                "{} did not answer `describe` within {}: is it a piece built with piecework_sdk::serve?",
                subject.display(),
                humantime::format_duration(timeout)
            )));
        }
    };
    protocol::check_version(&described.protocol, "piece")?;
    Ok(described)
}

/// Packs an executable piece program as a bundle: `bin/<piece name>` plus `piece.json` from
/// what the program describes. Returns the bytes and the manifest.
pub async fn bundle_executable(
    program: &Path,
    options: Options,
) -> Result<(Vec<u8>, Manifest), String> {
    let described = describe(program, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    let contents = tokio::fs::read(program)
        .await
        .map_err(|e| format!("cannot read {}: {e}", program.display()))?;
    let entrypoint = format!("bin/{}", described.piece.name);
    let mut manifest = Manifest::exec(described.piece, entrypoint.clone());
    manifest.env = options.env;
    manifest.limits = options.limits;
    let mut files = options.files;
    files.push(File {
        path: entrypoint,
        contents,
        executable: true,
    });
    let bytes = piecework_bundle::pack(&manifest, &files).map_err(|e| e.to_string())?;
    Ok((bytes, manifest))
}

/// Packs a piece bundled for piecework's Node host (`piece.js`, from `piecework piece build`
/// on a TypeScript piece) as a `node` bundle, asking `node piece.js` what it is.
pub async fn bundle_node(
    node: &Path,
    script: &Path,
    options: Options,
) -> Result<(Vec<u8>, Manifest), String> {
    let args = [script.as_os_str().to_owned()];
    let described = describe_with(node, &args, Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    let contents = tokio::fs::read(script)
        .await
        .map_err(|e| format!("cannot read {}: {e}", script.display()))?;
    let mut manifest = Manifest::node(described.piece, NODE_ENTRYPOINT);
    manifest.env = options.env;
    manifest.limits = options.limits;
    let mut files = options.files;
    files.push(File {
        path: NODE_ENTRYPOINT.into(),
        contents,
        executable: false,
    });
    let bytes = piecework_bundle::pack(&manifest, &files).map_err(|e| e.to_string())?;
    Ok((bytes, manifest))
}

/// Where a `node` bundle keeps its script.
pub const NODE_ENTRYPOINT: &str = "piece.js";

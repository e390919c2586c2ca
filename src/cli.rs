//! Command-line interface. Every flag that configures a service can also come from a `PW_*`
//! environment variable or the TOML file given with `--config`; flags win over the environment,
//! which wins over the file, which wins over defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use piecework_telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "piecework",
    version,
    about = "A runtime for private pieces: typed integrations, run by a scheduler and stateless workers"
)]
pub struct Cli {
    /// Log format: auto (pretty on a terminal, JSON otherwise), pretty or json.
    #[arg(long, env = "PW_LOG_FORMAT", default_value = "auto", global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run api, scheduler and worker in one process, with the example flows loaded and a live
    /// feed of runs: on the embedded in-memory bus and store, or on NATS and Redis with
    /// `--nats` and `--redis`.
    Dev(DevArgs),
    /// Serve the HTTP API.
    Api(ApiArgs),
    /// Publish poll jobs for polling and scheduled flows (several may run at once).
    Scheduler(SchedulerArgs),
    /// Pull jobs from queues and run pieces.
    Worker(WorkerArgs),
    /// Write, build, test, sign, publish and inspect pieces.
    #[command(subcommand)]
    Piece(PieceCommand),
    /// Encryption keys for connections and webhook secrets: generate, rotate.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage connections (through the API).
    Connection(ConnectionArgs),
    /// Create, list and revoke named API keys (through the API, with an admin key).
    ApiKey(ApiKeyArgs),
    /// Read the audit trail (through the API).
    Audit(AuditArgs),
    /// List, count, inspect, follow, retry and cancel runs (through the API).
    Runs(RunsArgs),
    /// Check pieces, NATS, Redis, queues and every connection; say what to fix.
    Doctor(DoctorArgs),
    /// Work with flow files.
    #[command(subcommand)]
    Flow(FlowCommand),
}

impl Command {
    pub fn service_name(&self) -> &'static str {
        match self {
            Command::Dev(_) => "piecework-dev",
            Command::Api(_) => "piecework-api",
            Command::Scheduler(_) => "piecework-scheduler",
            Command::Worker(_) => "piecework-worker",
            _ => "piecework-cli",
        }
    }

    /// Services log `info`; `dev` and the tools keep to warnings (the feed and the output are
    /// the point). `PW_LOG` overrides.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Api(_) | Command::Scheduler(_) | Command::Worker(_) => "info",
            _ => "warn",
        }
    }
}

/// Where configuration and infrastructure come from; shared by every service command.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML file with `[nats]`, `[redis]`, `[api]`, `[worker]`, `[scheduler]`, `[egress]`,
    /// `[health]`, `[pieces]` sections; one file can serve the whole fleet.
    #[arg(long, env = "PW_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated.
    #[arg(long = "nats", env = "PW_NATS_URL")]
    pub nats_url: Option<String>,
    /// Redis URL.
    #[arg(long = "redis", env = "PW_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Keys that encrypt connection values: `id:base64` pairs, comma-separated, the first
    /// current (`piecework key generate` makes one). Only from the environment, never a flag,
    /// so it stays out of process listings.
    #[arg(skip = std::env::var("PW_ENCRYPTION_KEY").ok().filter(|k| !k.is_empty()))]
    pub encryption_key: Option<String>,
    /// A directory of piece bundles (`*.piece.tgz`), loaded at start and watched: a bundle
    /// copied in is served within seconds, without a restart.
    #[arg(long = "pieces", env = "PW_PIECES_DIR")]
    pub pieces_dir: Option<PathBuf>,
    /// Public keys (`ID:BASE64`, comma-separated, from `piecework piece keygen`) whose
    /// signatures are trusted; when set, bundles not signed by one of them are refused.
    #[arg(long, env = "PW_TRUSTED_KEYS")]
    pub trusted_keys: Option<String>,
    /// Where bundles are unpacked and registry downloads cached (default: a directory under
    /// the system's temporary directory).
    #[arg(long, env = "PW_PIECES_CACHE")]
    pub pieces_cache: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Address of the HTTP API.
    #[arg(long, env = "PW_API_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Jobs the worker runs at once.
    #[arg(long, env = "PW_WORKER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Also load every flow (`*.yaml`, `*.yml`, `*.json`) in this directory.
    #[arg(long, env = "PW_FLOWS")]
    pub flows: Option<PathBuf>,
    /// Do not load the example flows shipped with piecework.
    #[arg(long)]
    pub no_examples: bool,
    /// Do not print the live feed of runs and steps.
    #[arg(long)]
    pub quiet: bool,
    /// Webhook calls accepted in all, per second or minute (`10000/s`, `0` for no limit).
    #[arg(long, env = "PW_WEBHOOK_RATE")]
    pub webhook_rate: Option<piecework_api::limits::Rate>,
    /// Webhook calls accepted per flow (`1000/s`, `0` for no limit).
    #[arg(long, env = "PW_WEBHOOK_RATE_PER_FLOW")]
    pub webhook_rate_per_flow: Option<piecework_api::limits::Rate>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Address to listen on.
    #[arg(long, env = "PW_API_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Webhook calls accepted in all, per second or minute (`10000/s`, `0` for no limit).
    #[arg(long, env = "PW_WEBHOOK_RATE")]
    pub webhook_rate: Option<piecework_api::limits::Rate>,
    /// Webhook calls accepted per flow (`1000/s`, `0` for no limit).
    #[arg(long, env = "PW_WEBHOOK_RATE_PER_FLOW")]
    pub webhook_rate_per_flow: Option<piecework_api::limits::Rate>,
    /// Address of `/healthz`, `/readyz` and key-less `/metrics` for the infrastructure.
    #[arg(long, env = "PW_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Address of `/healthz` and `/readyz`.
    #[arg(long, env = "PW_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Queues to serve, comma-separated (a step with `queue: internal` runs only on workers
    /// serving `internal`).
    #[arg(long, env = "PW_WORKER_QUEUES", value_delimiter = ',')]
    pub queues: Option<Vec<String>>,
    /// Jobs run at once; the worker pulls no more than that.
    #[arg(long, env = "PW_WORKER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Name in logs and attempt records (default: host name and pid).
    #[arg(long, env = "PW_WORKER_ID")]
    pub id: Option<String>,
    /// Address of `/healthz` and `/readyz`.
    #[arg(long, env = "PW_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum PieceCommand {
    /// List the pieces: built in, and the bundles in the pieces directory (`--pieces`).
    List {
        /// A directory of bundles to list as well.
        #[arg(long = "pieces", env = "PW_PIECES_DIR")]
        pieces_dir: Option<PathBuf>,
    },
    /// Create a new private piece: a cargo package that builds into a bundle.
    New {
        /// Lowercase letters, digits and '-', e.g. `acme-crm`.
        name: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The piecework checkout whose SDK it depends on (default: this binary's, or the
        /// one around the current directory).
        #[arg(long, conflicts_with = "typescript")]
        sdk: Option<PathBuf>,
        /// A TypeScript piece written with the Activepieces framework, instead of Rust.
        #[arg(long)]
        typescript: bool,
    },
    /// Build a piece's directory into a bundle (`NAME-VERSION.piece.tgz`).
    Build {
        /// The piece's directory (a cargo package whose binary calls `piecework_sdk::serve`).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where to write the bundle (default: `pieces/` in cargo's target directory). Point it
        /// at a watched pieces directory to deploy as you build.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// `release` to ship, `dev` to try it out quickly.
        #[arg(long, value_enum, default_value = "release")]
        profile: crate::bundles::Profile,
        /// Sign it with this key file (from `piece keygen`), or `env` for PW_SIGNING_KEY.
        #[arg(long)]
        sign: Option<String>,
    },
    /// Print a bundle's manifest, digest, files and signature.
    Inspect {
        file: PathBuf,
        /// The manifest and details as JSON.
        #[arg(long)]
        json: bool,
        /// Keys to check the signature against.
        #[arg(long, env = "PW_TRUSTED_KEYS")]
        trusted_keys: Option<String>,
    },
    /// Make an ed25519 key pair for signing bundles.
    Keygen {
        /// The key's id, as it appears in signatures and PW_TRUSTED_KEYS.
        #[arg(long, default_value = "release")]
        id: String,
        /// Where to write the private key (default: ./ID.key).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Sign a bundle: writes FILE.sig beside it.
    Sign {
        file: PathBuf,
        /// The private key file, or `env` for PW_SIGNING_KEY.
        #[arg(long)]
        key: String,
    },
    /// Publish a bundle to the registry through the API: every worker can run it at once.
    Publish {
        file: PathBuf,
        /// Its signature (default: FILE.sig, when it exists).
        #[arg(long)]
        signature: Option<PathBuf>,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// The versions of a piece the installation has, and where each comes from.
    Versions {
        piece: String,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Remove a published version from the registry (refused while an enabled flow uses it).
    Yank {
        piece: String,
        version: String,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Check that a piece program speaks piece protocol v1 (a program, bundle or directory).
    Conformance { target: PathBuf },
    /// Print a piece's metadata as JSON (what the catalog, docs and version checks read).
    Metadata {
        /// A piece name, a bundle file or a piece's directory.
        piece: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Generate the piece's internal documentation page (Markdown) from its metadata.
    Docs {
        /// A piece name, a bundle file or a piece's directory.
        piece: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Check that the piece's version number fits its changes since an earlier metadata file
    /// (from `piece metadata`) or bundle; exits non-zero when the bump is too small.
    Check {
        /// A piece name, a bundle file or a piece's directory.
        piece: String,
        /// Metadata JSON or bundle of the released version.
        #[arg(long)]
        against: PathBuf,
    },
    /// Run one action or trigger locally and print what it returns.
    Test {
        /// A piece name, a bundle file or a piece's directory (built first).
        piece: String,
        /// The action or trigger.
        name: String,
        /// Input as JSON or `@FILE` (for a webhook trigger: the request body).
        #[arg(long, default_value = "{}")]
        input: String,
        /// Connection values as JSON, `@FILE`, or `-` for standard input.
        #[arg(long, conflicts_with = "connection")]
        auth: Option<String>,
        /// A stored connection (reads Redis at PW_REDIS_URL with PW_ENCRYPTION_KEY).
        #[arg(long)]
        connection: Option<String>,
        /// The flow owner the piece sees (for permission checks).
        #[arg(long, env = "USER", default_value = "local")]
        owner: String,
    },
}

/// Where the API is, for commands that talk to it.
#[derive(Debug, Args)]
pub struct ApiClientArgs {
    /// Base URL of the API.
    #[arg(
        long = "api",
        env = "PW_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct ConnectionArgs {
    #[command(flatten)]
    pub api: ApiClientArgs,
    #[command(subcommand)]
    pub command: ConnectionCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConnectionCommand {
    /// Create or replace a connection. Values are checked against the piece's auth and stored
    /// encrypted; they are never shown again.
    Create {
        /// The connection's name, as flows refer to it.
        name: String,
        /// The piece it authenticates.
        #[arg(long)]
        piece: String,
        /// The values as JSON, `@FILE`, or `-` for standard input (keeps secrets out of shell
        /// history).
        #[arg(long)]
        values: String,
    },
    /// List connections (names, pieces, key ids; never values).
    List,
    /// Delete a connection.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct ApiKeyArgs {
    #[command(flatten)]
    pub api: ApiClientArgs,
    #[command(subcommand)]
    pub command: ApiKeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it: it is shown this once (store it in your secret manager).
    Create {
        /// The key's name: who uses it (`ci-deploy`, `oncall`), the actor in the audit trail.
        name: String,
        /// admin (everything, keys too), developer (flows, pieces, connections), operator
        /// (runs, enable/disable), viewer (read only).
        #[arg(long)]
        role: String,
    },
    /// List keys: names, roles, who created them and when (never the keys).
    List,
    /// Revoke a key: no api process accepts it from the next request on.
    Revoke { name: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub api: ApiClientArgs,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub api: ApiClientArgs,
    #[command(subcommand)]
    pub command: RunsCommand,
}

/// Which runs: the filters `list`, `stats` and `tail` share.
#[derive(Debug, Clone, Default, Args)]
pub struct RunFilters {
    /// Only runs of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Only runs created since: RFC 3339 or a duration back (`15m`, `2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only runs created before: RFC 3339 or a duration back.
    #[arg(long)]
    pub until: Option<String>,
    /// Only runs started by `webhook`, `schedule` (polls and ticks), `api` (by hand) or
    /// `flow` (sub-flows).
    #[arg(long)]
    pub trigger: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first, one per line.
    List {
        #[command(flatten)]
        filters: RunFilters,
        /// Only runs in this status (running, waiting, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1-1000); with `--all`, the page size.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Follow the pages to the end: every run that matches.
        #[arg(long)]
        all: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Count runs per status.
    Stats {
        #[command(flatten)]
        filters: RunFilters,
        #[arg(long)]
        json: bool,
    },
    /// Show one run: its steps, attempts, outputs and errors.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Retry a failed run from its failed step.
    Retry { id: String },
    /// Cancel a running or waiting run: its step in flight is stopped.
    Cancel { id: String },
    /// Print runs as they start and as they end, until interrupted.
    Tail {
        #[command(flatten)]
        filters: RunFilters,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print audit entries as they are recorded: every API mutation, webhook call and step
    /// execution. Filters match hierarchically (`--action run` matches `run.cancel`).
    Tail(AuditTailArgs),
}

#[derive(Debug, Args)]
pub struct AuditTailArgs {
    /// Start with the entries since this time: RFC 3339 or a duration back (`15m`, `2h`).
    #[arg(long, default_value = "10m")]
    pub since: String,
    /// Only this actor (`api:ci-deploy`, `webhook`, `worker`, `worker:w1`).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action (`flow.apply`, `step.execute`, `run`, …).
    #[arg(long)]
    pub action: Option<String>,
    /// Only this resource or what lies under it (`flow/echo`, `run/<id>`).
    #[arg(long)]
    pub resource: Option<String>,
    /// Only `success` or `failure`.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Print what is there and exit instead of following.
    #[arg(long)]
    pub no_follow: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print a new random key for PW_ENCRYPTION_KEY.
    Generate {
        /// The key's id (rotate by prepending a key with a new id).
        #[arg(long, default_value = "k1")]
        id: String,
        /// Print an env file instead: PW_ENCRYPTION_KEY and a fresh bootstrap PW_API_KEY, for
        /// compose's `.env` or `kubectl create secret generic --from-env-file`.
        #[arg(long)]
        env: bool,
    },
    /// Re-seal every connection and webhook secret under the first key of the api's
    /// PW_ENCRYPTION_KEY (through the API, with an admin key), and say which old keys are
    /// still needed. Put the new key first on every process before running it.
    Rotate {
        #[command(flatten)]
        api: ApiClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Check flow files against the pieces in this binary (and the bundles in the pieces
    /// directory); reports every problem with its location. Exits non-zero if any is invalid.
    Validate {
        /// Flow files (YAML or JSON).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A directory of bundles whose pieces the flows may use.
        #[arg(long = "pieces", env = "PW_PIECES_DIR")]
        pieces_dir: Option<PathBuf>,
    },
    /// Apply flow files through the API (YAML, or JSON for `.json`): each becomes a new
    /// version unless unchanged. A new webhook flow's secret is printed this once.
    Apply {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Enable a flow through the API: its trigger starts listening (running the trigger's
    /// enable hook; a hook that fails leaves the flow disabled and says why).
    Enable {
        flow: String,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Disable a flow through the API: no new runs start (its trigger's disable hook runs);
    /// runs in progress finish.
    Disable {
        flow: String,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Print a webhook flow's secret, or replace it with `--rotate` (admin keys only; audited).
    WebhookSecret {
        flow: String,
        /// Make a new secret: calls signed with the old one are refused from now on.
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        api: ApiClientArgs,
    },
    /// Move a flow to a newer version of one of its pieces, through the API: the flow's steps
    /// using it are re-resolved, the change is checked like `piece check` against the pinned
    /// version, and a new flow version is applied only when nothing breaks.
    Upgrade {
        flow: String,
        /// The piece to upgrade.
        #[arg(long)]
        piece: String,
        /// A new version range for the piece's steps (`^2`); default: keep each step's range.
        #[arg(long)]
        to: Option<String>,
        /// Apply even with breaking changes (audited as forced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiClientArgs,
    },
}

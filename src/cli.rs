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
    /// Inspect the pieces built into this binary.
    #[command(subcommand)]
    Piece(PieceCommand),
    /// Encryption keys for connections.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage connections (through the API).
    Connection(ConnectionArgs),
    /// Read the audit trail (through the API).
    Audit(AuditArgs),
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
    /// `[health]` sections; one file can serve the whole fleet.
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
}

#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Address of the HTTP API.
    #[arg(long, env = "PW_API_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Require `Authorization: Bearer <key>` on the API (webhooks excepted).
    #[arg(long, env = "PW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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
    /// Require `Authorization: Bearer <key>` on `/v1/*` (webhooks excepted).
    #[arg(long, env = "PW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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
    /// List the registered pieces with their versions, actions and triggers.
    List,
    /// Create a new private piece under pieces/custom/ and register it (rebuild to use it).
    New {
        /// Lowercase letters, digits and '-', e.g. `acme-crm`.
        name: String,
        /// The piecework checkout (default: the one around the current directory).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Print a piece's metadata as JSON (what the catalog, docs and version checks read).
    Metadata {
        /// The piece's name.
        piece: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Generate the piece's internal documentation page (Markdown) from its metadata.
    Docs {
        piece: String,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Check that the piece's version number fits its changes since an earlier metadata file
    /// (from `piece metadata`); exits non-zero when the bump is too small.
    Check {
        piece: String,
        /// Metadata JSON of the released version.
        #[arg(long)]
        against: PathBuf,
    },
    /// Run one action or trigger locally and print what it returns.
    Test {
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
    /// The API key, if the API requires one.
    #[arg(long, env = "PW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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
pub struct AuditArgs {
    #[command(flatten)]
    pub api: ApiClientArgs,
    #[command(subcommand)]
    pub command: AuditCommand,
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
    /// Only this actor (`api:api-key`, `webhook`, `worker`, `worker:w1`).
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
    },
}

#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Check flow files against the pieces in this binary; reports every problem with its
    /// location. Exits non-zero if any file is invalid.
    Validate {
        /// Flow files (YAML or JSON).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

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
    /// Run api, scheduler and worker in one process on the embedded in-memory bus and store,
    /// with the example flows loaded and a live feed of runs.
    Dev(DevArgs),
    /// Inspect the pieces built into this binary.
    #[command(subcommand)]
    Piece(PieceCommand),
    /// Work with flow files.
    #[command(subcommand)]
    Flow(FlowCommand),
}

impl Command {
    pub fn service_name(&self) -> &'static str {
        match self {
            Command::Dev(_) => "piecework-dev",
            Command::Piece(_) | Command::Flow(_) => "piecework-cli",
        }
    }

    /// `dev` keeps logs to warnings so the run feed stays readable; `PW_LOG` overrides.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Dev(_) => "warn",
            Command::Piece(_) | Command::Flow(_) => "warn",
        }
    }
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// TOML file with `[api]`, `[worker]` and `[scheduler]` sections.
    #[arg(long, env = "PW_CONFIG")]
    pub config: Option<PathBuf>,
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

#[derive(Debug, Subcommand)]
pub enum PieceCommand {
    /// List the registered pieces with their versions, actions and triggers.
    List,
    /// Print a piece's metadata as JSON (what the catalog, docs and version checks read).
    Metadata {
        /// The piece's name.
        piece: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
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

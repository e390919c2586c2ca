//! Telemetry setup for every piecework process: one call at start ([`init`]) and one guard
//! dropped at shutdown.
//!
//! Logs are human-readable on a terminal and JSON lines otherwise (what log collectors want).
//! The filter comes from `PW_LOG` or `RUST_LOG` (e.g. `info,piecework_worker=debug`), else the
//! process's default. The OTLP exporter joins here; the guard will flush it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    Pretty,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (auto, pretty, json)")),
        }
    }
}

/// Options of [`init`].
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` of this process: `piecework-api`, `piecework-worker`, …
    pub service: &'static str,
    pub format: LogFormat,
    /// Filter used when neither `PW_LOG` nor `RUST_LOG` is set.
    pub default_filter: &'static str,
}

/// Flushes telemetry when dropped at shutdown.
#[must_use = "telemetry is flushed when the guard is dropped"]
pub struct Guard {
    service: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        tracing::debug!(service = self.service, "telemetry flushed");
    }
}

/// Installs the global subscriber. Call once, at the start of `main`.
pub fn init(options: Options) -> Guard {
    let filter = std::env::var("PW_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(options.default_filter));
    let json = match options.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    // A second init (tests running several processes in one binary) keeps the first.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
    Guard {
        service: options.service,
    }
}

//! Telemetry for every piecework process: one call at start ([`init`]), one guard dropped at
//! shutdown, and the pieces the services use while they run.
//!
//! - **Logs** are human-readable on a terminal and JSON lines otherwise (what log collectors
//!   want). The filter comes from `PW_LOG` or `RUST_LOG` (e.g. `info,piecework_worker=debug`),
//!   else the process's default. Logs are events only: spans belong to the trace exporter.
//! - **Traces** go to an OTLP collector over HTTP/protobuf when an endpoint is configured
//!   ([`otlp`]: `PW_OTLP_ENDPOINT` or the standard `OTEL_EXPORTER_OTLP_*` variables). Without
//!   one no exporter or OpenTelemetry layer is installed, so no layer wants spans (they are not
//!   built) and nothing is injected into messages. The guard flushes pending spans.
//! - **Propagation** ([`propagation`]) carries W3C `traceparent`/`tracestate` through NATS
//!   headers and HTTP requests, so a run is one trace across processes.
//! - **Metrics** ([`metrics`]) are defined in one module, with bounded labels, and served in the
//!   Prometheus/OpenMetrics text format by every process.

pub mod metrics;
pub mod otlp;
pub mod propagation;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use metrics::Metrics;

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

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid {variable}: {message}")]
    Config {
        variable: &'static str,
        message: String,
    },
    #[error("cannot start the OTLP exporter: {0}")]
    Exporter(String),
}

/// Flushes telemetry when dropped at shutdown. Drop it outside the async runtime: the
/// exporter's last flush blocks.
#[must_use = "telemetry is flushed when the guard is dropped"]
pub struct Guard {
    service: &'static str,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(err) = tracer.shutdown()
        {
            eprintln!("{}: flushing traces failed: {err}", self.service);
        }
    }
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans: when not, trace context is neither injected nor
/// extracted.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the global subscriber (and the OTLP exporter when configured). Call once, at the
/// start of `main`, before the async runtime exists.
pub fn init(options: Options) -> Result<Guard, TelemetryError> {
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
    // Logs are events only, each carrying its own fields (run id, step, flow …): spans are for
    // the trace exporter. Formatting every span's fields for log context cost a worker ~50 µs
    // per step (BENCHMARKS.md), and without an exporter no layer wants spans, so they are
    // never even built.
    let filter = filter.and(filter_fn(|metadata| metadata.is_event()));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.compact().with_filter(filter).boxed()
    };
    let exporter = otlp::Settings::from_env()?;
    let mut layers = vec![logs];
    let tracer = match exporter {
        Some(settings) => {
            let (provider, layer) = otlp::start(&settings, options.service)?;
            layers.push(layer);
            Some(provider)
        }
        None => None,
    };
    // A second init (tests running several services in one binary) keeps the first.
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
    {
        EXPORTING.store(tracer.is_some(), Ordering::Relaxed);
    }
    Ok(Guard {
        service: options.service,
        tracer,
    })
}

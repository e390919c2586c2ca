//! The OTLP trace exporter: where spans go and how.
//!
//! Spans are exported over OTLP/HTTP with protobuf bodies (port 4318 of a collector or of
//! Jaeger) by a batch processor on its own thread, so exporting never blocks a request or a
//! step. The endpoint comes from, in order:
//!
//! 1. `PW_OTLP_ENDPOINT`: the collector's base URL (`http://otel-collector:4318`); spans go to
//!    its `/v1/traces`;
//! 2. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (base
//!    URL), as every OpenTelemetry SDK reads them, together with `OTEL_EXPORTER_OTLP_HEADERS`,
//!    `…_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//!    the `OTEL_BSP_*` batch settings.
//!
//! Without any of them, or with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`,
//! nothing is exported and no OpenTelemetry layer is installed. `PW_TRACE` filters which spans
//! are exported (`EnvFilter` syntax, default `info`), independently of the log filter.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::TelemetryError;

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The full traces URL, or `None` to let the standard variables decide.
    pub traces_url: Option<String>,
    /// Which spans are exported.
    pub filter: String,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// Reads settings from `var` (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Ok(None);
        }
        for variable in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = var(variable) {
                if protocol != "http/protobuf" {
                    return Err(TelemetryError::Config {
                        variable,
                        message: format!(
                            "{protocol:?} is not supported: piecework exports OTLP over HTTP \
                             (http/protobuf, port 4318 of a collector)"
                        ),
                    });
                }
                break;
            }
        }
        let filter = var("PW_TRACE").unwrap_or_else(|| "info".to_owned());
        if let Err(err) = EnvFilter::try_new(&filter) {
            return Err(TelemetryError::Config {
                variable: "PW_TRACE",
                message: err.to_string(),
            });
        }
        if let Some(base) = var("PW_OTLP_ENDPOINT") {
            let base = base.trim().trim_end_matches('/');
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                return Err(TelemetryError::Config {
                    variable: "PW_OTLP_ENDPOINT",
                    message: format!(
                        "{base:?} must be an http:// or https:// URL, e.g. http://otel-collector:4318"
                    ),
                });
            }
            return Ok(Some(Self {
                traces_url: Some(format!("{base}/v1/traces")),
                filter,
            }));
        }
        let standard = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        Ok(standard.map(|_| Self {
            traces_url: None,
            filter,
        }))
    }
}

/// Builds the exporter and the tracing layer that feeds it.
pub fn start<S>(
    settings: &Settings,
    service: &'static str,
) -> Result<(SdkTracerProvider, Box<dyn Layer<S> + Send + Sync>), TelemetryError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    // The exporter's HTTP client uses rustls with the process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if let Some(url) = &settings.traces_url {
        builder = builder.with_endpoint(url.clone());
    }
    let exporter = builder
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build();
    let tracer = provider.tracer("piecework");
    let filter = EnvFilter::try_new(&settings.filter).map_err(|e| TelemetryError::Config {
        variable: "PW_TRACE",
        message: e.to_string(),
    })?;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
        .boxed();
    Ok((provider, layer))
}

/// `service.name` (unless `OTEL_SERVICE_NAME` says otherwise), version and instance.
fn resource(service: &'static str) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service);
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new(
                "service.instance.id",
                format!("{host}-{}", std::process::id()),
            ),
        ])
        .build()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<Settings>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(
            settings(&[
                ("PW_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .unwrap(),
            None
        );
    }

    #[test]
    fn piecework_endpoint_is_a_base_url() {
        let found = settings(&[("PW_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(
            found.traces_url.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(found.filter, "info");
    }

    #[test]
    fn standard_variables_are_left_to_the_sdk() {
        let found = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])
            .unwrap()
            .unwrap();
        assert_eq!(found.traces_url, None);
    }

    #[test]
    fn bad_values_are_named() {
        let err = settings(&[("PW_OTLP_ENDPOINT", "collector:4318")]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid PW_OTLP_ENDPOINT"),
            "{err}"
        );
        let err = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("OTLP over HTTP"), "{err}");
        let err =
            settings(&[("PW_OTLP_ENDPOINT", "http://c"), ("PW_TRACE", "info,[")]).unwrap_err();
        assert!(err.to_string().starts_with("invalid PW_TRACE"), "{err}");
    }
}

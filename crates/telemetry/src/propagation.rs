//! W3C trace context (`traceparent`, `tracestate`) in and out of message and request headers.
//!
//! A publisher injects the context of its `publish` span into the NATS headers; the worker
//! that receives the job links its span to it, and parents it on the run's span, whose
//! `traceparent` is kept with the run. So a run started by a webhook or a poll is one trace
//! however many workers its steps land on.
//!
//! When spans are not exported every function here is a no-op: nothing is injected, and
//! headers that arrive are ignored.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Header names of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

struct Pairs<'a>(&'a [(String, String)]);

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct Collect<'a>(&'a mut Vec<(String, String)>);

impl Injector for Collect<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// The trace context of `span` as headers; empty when spans are not exported.
pub fn headers_of(span: &tracing::Span) -> Vec<(String, String)> {
    if !crate::exporting() {
        return Vec::new();
    }
    let cx = span.context();
    let mut headers = Vec::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Collect(&mut headers));
    }
    headers
}

/// The `traceparent` of `span`, to keep with something that outlives it (a run).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    headers_of(span)
        .into_iter()
        .find(|(k, _)| k == TRACEPARENT)
        .map(|(_, v)| v)
}

/// The hex trace id of `span`, for logs and API answers.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

fn extract(headers: &[(String, String)]) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&Pairs(headers))
}

/// Makes `span` (not yet entered) a child of the context in `headers`, if there is one.
/// Returns whether it did.
pub fn set_parent(span: &tracing::Span, headers: &[(String, String)]) -> bool {
    if !crate::exporting() {
        return false;
    }
    let cx = extract(headers);
    cx.span().span_context().is_valid() && span.set_parent(cx).is_ok()
}

/// Makes `span` (not yet entered) a child of the span a `traceparent` names.
pub fn set_parent_traceparent(span: &tracing::Span, traceparent: &str) -> bool {
    set_parent(span, &[(TRACEPARENT.to_owned(), traceparent.to_owned())])
}

/// Links `span` to the context in `headers` (a message's producer), if there is one.
pub fn add_link(span: &tracing::Span, headers: &[(String, String)]) {
    if !crate::exporting() {
        return;
    }
    let cx = extract(headers);
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_exporter_nothing_is_injected() {
        let span = tracing::info_span!("test");
        assert!(headers_of(&span).is_empty());
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(trace_id_of(&span), None);
        assert!(!set_parent_traceparent(
            &span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
    }

    #[test]
    fn extraction_reads_w3c_headers() {
        let headers = vec![(
            "Traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )];
        let cx = extract(&headers);
        let span = cx.span();
        let found = span.span_context();
        assert!(found.is_valid());
        assert_eq!(
            found.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(!extract(&[]).span().span_context().is_valid());
    }
}

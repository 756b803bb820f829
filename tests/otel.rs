//! A replay points at the work it replays, through a real OpenTelemetry pipeline in process:
//! `tracing` spans exported by `tracing-opentelemetry` to the SDK's in-memory exporter. The
//! layer's `TraceHook` (written here as the docs show it) names the span a request executes
//! in; the record keeps it; a retry's `idempotency` span is linked to it and carries its ids.
//!
//! A binary of its own: it installs a `tracing` subscriber, and `tracing`'s callsite cache is
//! process-wide (see `tests/traces.rs`).

#[path = "common/mod.rs"]
mod common;

use common::{Runs, post, send, service};
use opentelemetry::{
    Value,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower_idempotency::{IdempotencyLayer, Origin, TraceContext, TraceHook};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::prelude::*;

/// The hook of the `TraceHook` docs.
struct Otel;

impl TraceHook for Otel {
    fn current(&self) -> Option<TraceContext> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span = span.span_context();
        TraceContext::new(span.trace_id().to_bytes(), span.span_id().to_bytes(), span.trace_flags().to_u8())
    }

    fn link(&self, origin: &Origin) {
        if let Some(original) = origin.span.or(origin.caller) {
            let (trace, span) = (TraceId::from_bytes(original.trace_id()), SpanId::from_bytes(original.span_id()));
            let flags = TraceFlags::new(original.flags());
            let context = SpanContext::new(trace, span, flags, true, TraceState::default());
            tracing::Span::current().add_link(context);
        }
    }
}

fn attribute(span: &SpanData, name: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == name).map(|kv| match &kv.value {
        Value::String(s) => s.as_str().to_owned(),
        other => other.to_string(),
    })
}

#[test]
fn a_replays_span_links_to_the_span_that_executed_and_carries_its_ids() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let runs = Runs::default();
            let svc = service(IdempotencyLayer::new().with_trace_hook(Otel), runs.clone());
            let mut first = post("/orders", "k", "{}");
            first.headers_mut().insert("traceparent", caller.parse().unwrap());
            assert!(!send(&svc, first).await.replayed());
            let retry = send(&svc, post("/orders", "k", "{}")).await;
            assert!(retry.replayed());
            assert_eq!(runs.get(), 1);
        })
    });
    provider.force_flush().unwrap();
    let spans: Vec<SpanData> =
        exporter.get_finished_spans().unwrap().into_iter().filter(|span| span.name == "idempotency").collect();
    let [executed, replayed] = &spans[..] else { panic!("two idempotency spans, got {spans:#?}") };
    assert!(executed.links.links.is_empty(), "the first request links to nothing");
    // The replay's span is linked to the executing span (its own trace), and says so.
    let links: Vec<&SpanContext> = replayed.links.links.iter().map(|link| &link.span_context).collect();
    assert_eq!(links.len(), 1, "{replayed:#?}");
    let original = &links[0];
    assert_eq!(original.trace_id(), executed.span_context.trace_id());
    assert_eq!(original.span_id(), executed.span_context.span_id());
    assert_ne!(replayed.span_context.trace_id(), executed.span_context.trace_id(), "two traces, linked");
    assert_eq!(attribute(replayed, "original_trace_id"), Some(executed.span_context.trace_id().to_string()));
    let traceparent = attribute(replayed, "original_traceparent").unwrap();
    assert_eq!(traceparent, format!("00-{}-{}-01", executed.span_context.trace_id(), executed.span_context.span_id()));
    assert_eq!(attribute(executed, "original_trace_id"), None);
}

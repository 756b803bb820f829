//! A replay or a joined request points at the work it follows, through a real OpenTelemetry
//! pipeline in process: `tracing` spans exported by `tracing-opentelemetry` to the SDK's
//! in-memory exporter. The layer's `TraceHook` (written here as the docs show it) names the span
//! a request executes in; the record keeps it, and so does the head a response in flight
//! publishes for joiners (in a store that encodes it: Redis, as well as the memory store); a
//! retry's or a joiner's `idempotency` span is linked to it and carries its ids.
//!
//! A binary of its own: it installs a `tracing` subscriber, and `tracing`'s callsite cache is
//! process-wide (see `tests/traces.rs`).

#[path = "common/mod.rs"]
mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use common::{Runs, TestBody, post, send, service};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use opentelemetry::{
    Value,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::Notify;
use tower::{BoxError, ServiceExt};
use tower_idempotency::{
    Duplicates, IdempotencyLayer, Origin, Outcome, RequestBody, TraceContext, TraceHook, store::LiveLog,
};
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

/// Runs `scenario` on a current-thread runtime under a `tracing` subscriber that exports to
/// OpenTelemetry's in-memory exporter: what it returned, and the `idempotency` spans it ended,
/// in the order they ended.
fn traced<T, F: Future<Output = T>>(scenario: impl FnOnce() -> F) -> (T, Vec<SpanData>) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let returned = tracing::subscriber::with_default(subscriber, || runtime.block_on(scenario()));
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap().into_iter().filter(|span| span.name == "idempotency");
    (returned, spans.collect())
}

const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Asserts that `follower`'s span is linked to `executed`'s (its own trace: two traces,
/// linked) and carries its ids as fields, and that `executed` links to nothing.
fn assert_follows(follower: &SpanData, executed: &SpanData) {
    assert!(executed.links.links.is_empty(), "the first request links to nothing");
    let links: Vec<&SpanContext> = follower.links.links.iter().map(|link| &link.span_context).collect();
    assert_eq!(links.len(), 1, "{follower:#?}");
    let original = &links[0];
    assert_eq!(original.trace_id(), executed.span_context.trace_id());
    assert_eq!(original.span_id(), executed.span_context.span_id());
    assert_ne!(follower.span_context.trace_id(), executed.span_context.trace_id(), "two traces, linked");
    assert_eq!(attribute(follower, "original_trace_id"), Some(executed.span_context.trace_id().to_string()));
    let traceparent = attribute(follower, "original_traceparent").unwrap();
    assert_eq!(traceparent, format!("00-{}-{}-01", executed.span_context.trace_id(), executed.span_context.span_id()));
    assert_eq!(attribute(executed, "original_trace_id"), None);
}

#[test]
fn a_replays_span_links_to_the_span_that_executed_and_carries_its_ids() {
    let ((), spans) = traced(|| async {
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::new().with_trace_hook(Otel), runs.clone());
        let mut first = post("/orders", "k", "{}");
        first.headers_mut().insert("traceparent", CALLER.parse().unwrap());
        assert!(!send(&svc, first).await.replayed());
        let retry = send(&svc, post("/orders", "k", "{}")).await;
        assert!(retry.replayed());
        assert_eq!(runs.get(), 1);
    });
    let [executed, replayed] = &spans[..] else { panic!("two idempotency spans, got {spans:#?}") };
    assert_follows(replayed, executed);
}

/// A handler whose body sends `first;`, then waits for `release` before it sends `last` and
/// ends: a response in flight for as long as the test holds it.
fn held_handler(
    release: Arc<Notify>,
    runs: Arc<AtomicUsize>,
) -> impl tower::Service<Request<RequestBody<Full<Bytes>>>, Response = Response<TestBody>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: Request<RequestBody<Full<Bytes>>>| {
        let (release, runs) = (release.clone(), runs.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let frames = futures_util::stream::unfold(0, move |step| {
                let release = release.clone();
                async move {
                    match step {
                        0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first;"))), 1)),
                        1 => {
                            release.notified().await;
                            Some((Ok(Frame::data(Bytes::from_static(b"last"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            Ok::<_, BoxError>(Response::new(BodyExt::boxed(StreamBody::new(frames))))
        }
    })
}

/// A duplicate sent while the first request's body is held joins its response; both bodies
/// end once it is released. The handler runs once.
async fn join_a_response_in_flight<St: LiveLog>(layer: IdempotencyLayer<St>, key: &str) {
    let (release, runs) = (Arc::new(Notify::new()), Arc::new(AtomicUsize::new(0)));
    let layer = layer.with_duplicates(Duplicates::join()).with_trace_hook(Otel);
    let svc = tower::Layer::layer(&layer, held_handler(release.clone(), runs.clone()));
    let mut first = post("/orders", key, "{}");
    first.headers_mut().insert("traceparent", CALLER.parse().unwrap());
    let first = svc.clone().oneshot(first).await.unwrap();
    assert_eq!(first.extensions().get::<Outcome>(), Some(&Outcome::Executed));
    // The first client reads its body, which publishes its head for duplicates to join.
    let first = tokio::spawn(async move { first.into_body().collect().await.map(|body| body.to_bytes()) });
    let joined = svc.clone().oneshot(post("/orders", key, "{}")).await.unwrap();
    assert_eq!(joined.extensions().get::<Outcome>(), Some(&Outcome::Joined));
    release.notify_one();
    let joined = joined.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(joined, "first;last");
    assert_eq!(first.await.unwrap().unwrap(), "first;last");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The spans of a join: the executing request's, and the joiner's (told apart by its link).
fn executed_and_joined(spans: &[SpanData]) -> (&SpanData, &SpanData) {
    assert_eq!(spans.len(), 2, "two idempotency spans, got {spans:#?}");
    let (linked, unlinked): (Vec<_>, Vec<_>) = spans.iter().partition(|span| !span.links.links.is_empty());
    let ([joined], [executed]) = (&linked[..], &unlinked[..]) else {
        panic!("one span linked (the joiner's), one not: {spans:#?}")
    };
    (executed, joined)
}

#[test]
fn a_joined_requests_span_links_to_the_span_that_executes_and_carries_its_ids() {
    let ((), spans) = traced(|| join_a_response_in_flight(IdempotencyLayer::new(), "k"));
    let (executed, joined) = executed_and_joined(&spans);
    assert_follows(joined, executed);
}

/// The same through Redis, whose live log encodes the head (with its origin) and decodes it
/// for the joiner.
#[cfg(feature = "redis")]
#[test]
fn a_joined_requests_span_links_to_the_span_that_executes_through_redis() {
    let (ran, spans) = traced(|| async {
        let Some(url) = common::redis::redis_url().await else { return false };
        let store = common::redis::store(&url).await;
        let layer = IdempotencyLayer::from_store(store)
            .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap());
        join_a_response_in_flight(layer, &uuid::Uuid::new_v4().to_string()).await;
        true
    });
    if ran {
        let (executed, joined) = executed_and_joined(&spans);
        assert_follows(joined, executed);
    }
}

//! A `tracing` event for every outcome, inside an `idempotency` span on the guarded
//! path, and never the key itself.
//!
//! A binary of its own: `tracing` caches each callsite's interest process-wide, and a test
//! that reaches a callsite first on a thread without a subscriber would switch it off for the
//! scoped subscriber here (tokio-rs/tracing's callsite cache; `tests/alloc.rs` is alone for the
//! same reason, its global allocator).

#[path = "common/mod.rs"]
mod common;

use std::{
    fmt::Debug,
    sync::{Arc, Mutex, atomic::AtomicBool},
};

use common::{
    Runs,
    outage::{Outage, Switch},
    post, send, service,
};
use http::{Method, StatusCode};
use tower_idempotency::{IdempotencyLayer, Outcome, Secret, store::MemoryStore};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

/// One logged event or span: its `outcome` field (if any), its full text, and the name of the
/// span it was in.
type Line = (Option<String>, String, Option<String>);

/// Everything the layer logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<Line>>>);

struct Fields {
    outcome: Option<String>,
    text: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "outcome" {
            self.outcome = Some(value.to_owned());
        }
        self.text.push_str(&format!(" {}={value}", field.name()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.text.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Captured {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields { outcome: None, text: String::new() };
        event.record(&mut fields);
        let span = ctx.event_span(event).map(|span| span.name().to_owned());
        self.0.lock().unwrap().push((fields.outcome, fields.text, span));
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
        let mut fields = Fields { outcome: None, text: String::new() };
        attrs.record(&mut fields);
        self.0.lock().unwrap().push((None, fields.text, None));
    }
}

#[tokio::test]
async fn every_outcome_is_logged_in_a_span_without_the_key() {
    const KEY: &str = "a-very-secret-key-123";
    let captured = Captured::default();
    let _guard = tracing_subscriber::registry().with(captured.clone()).set_default();

    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut get = post("/orders", KEY, "{}");
    *get.method_mut() = Method::GET;
    send(&svc, get).await; // bypassed
    send(&svc, post("/orders", KEY, "{}")).await; // executed
    send(&svc, post("/orders", KEY, "{}")).await; // replayed
    send(&svc, post("/orders", KEY, "other")).await; // key reused
    let mut invalid = post("/orders", KEY, "{}");
    invalid.headers_mut().insert("idempotency-key", "has space".parse().unwrap());
    send(&svc, invalid).await; // invalid key

    let events = captured.0.lock().unwrap().clone();
    let outcomes: Vec<&str> = events.iter().filter_map(|(outcome, ..)| outcome.as_deref()).collect();
    for expected in ["bypassed", "executed", "replayed", "key_reused", "invalid_key"] {
        assert!(outcomes.contains(&expected), "no event for {expected}: {outcomes:?}");
    }
    for (outcome, _, span) in &events {
        if matches!(outcome.as_deref(), Some("executed" | "replayed" | "key_reused")) {
            assert_eq!(span.as_deref(), Some("idempotency"), "guarded outcomes are logged in the request's span");
        }
    }
    for (_, text, _) in &events {
        assert!(!text.contains(KEY), "a log line carries the key: {text}");
    }
}

/// Over a store shared by processes, a layer with no secret, or with a secret other than the
/// one the store was set up with, refuses with `503` and says why and what to do, in an error.
#[tokio::test]
async fn a_missing_or_different_secret_is_refused_with_an_error_naming_cause_and_fix() {
    let captured = Captured::default();
    let _guard = tracing_subscriber::registry().with(captured.clone()).set_default();
    let store = Outage::new(MemoryStore::new()).outliving();
    let runs = Runs::default();
    let secret = |s: &str| Secret::new(format!("{s}: a secret of more than 16 bytes")).unwrap();
    let first = service(IdempotencyLayer::from_store(store.clone()).with_secret(secret("first")), runs.clone());
    let other = service(IdempotencyLayer::from_store(store.clone()).with_secret(secret("other")), runs.clone());
    let none = service(IdempotencyLayer::from_store(store), runs.clone());

    assert_eq!(send(&first, post("/orders", "k1", "{}")).await.outcome, Outcome::Executed);
    for svc in [&other, &none] {
        let reply = send(svc, post("/orders", "k1", "{}")).await;
        assert_eq!((reply.status, reply.outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable));
    }
    assert_eq!(runs.get(), 1, "neither ran the request again");
    assert_eq!(send(&first, post("/orders", "k1", "{}")).await.outcome, Outcome::Replayed);

    let events = captured.0.lock().unwrap().clone();
    let errors: Vec<&String> = events.iter().map(|(_, text, _)| text).filter(|t| t.contains("refusing")).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("another secret") && errors[0].contains("the same secret"), "{}", errors[0]);
    assert!(errors[1].contains("no secret was set") && errors[1].contains("with_secret"), "{}", errors[1]);
}

/// The log line of a request failed closed carries the store's own error (here the
/// "connection refused" the store answered), not only "unavailable".
#[tokio::test]
async fn a_failing_store_is_logged_with_its_own_error() {
    let captured = Captured::default();
    let _guard = tracing_subscriber::registry().with(captured.clone()).set_default();
    let store = Switch { inner: MemoryStore::new(), down: Arc::new(AtomicBool::new(true)) };
    let svc = service(IdempotencyLayer::from_store(store), Runs::default());
    let reply = send(&svc, post("/orders", "k1", "{}")).await;
    assert_eq!((reply.status, reply.outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable));

    let events = captured.0.lock().unwrap().clone();
    let line = events.iter().map(|(_, text, _)| text).find(|t| t.contains("failing closed")).expect("a log line");
    assert!(line.contains("idempotency store unavailable: connection refused"), "{line}");
}

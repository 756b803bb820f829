//! Metrics (feature `metrics`): what each request and each fault records, read back through a
//! Prometheus recorder installed for the test's thread (a current-thread runtime, so the
//! layer's background tasks record into it too). Time is tokio's paused clock.

use crate::common;

use std::{future::Future, time::Duration};

use common::{Runs, outage::Outage, post, send, service};
use http::StatusCode;
use metrics_exporter_prometheus::PrometheusBuilder;
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, store::MemoryStore};

/// Runs `test` on a paused current-thread runtime with a fresh recorder; returns what it
/// rendered at the end, in the Prometheus text format.
fn recorded<F: Future<Output = ()>>(test: impl FnOnce() -> F) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    ::metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
    handle.render()
}

/// The value of the series written exactly as `series` (name and labels), or 0.
fn value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

fn with(
    mut request: http::Request<http_body_util::Full<bytes::Bytes>>,
    name: &'static str,
    value: &'static str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request.headers_mut().insert(name, http::HeaderValue::from_static(value));
    request
}

#[test]
fn every_request_counts_once_by_its_outcome_and_a_replay_records_its_records_age() {
    let text = recorded(|| async {
        let runs = Runs::default();
        let layer = IdempotencyLayer::new().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) });
        let svc = service(layer, runs.clone());
        assert_eq!(send(&svc, post("/orders", "a", "{}")).await.status, StatusCode::CREATED);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(send(&svc, post("/orders", "a", "{}")).await.replayed());
        assert_eq!(send(&svc, post("/orders", "a", "{\"other\":1}")).await.outcome, Outcome::KeyReused);
        // A duplicate waits for the request in flight (2 s), then replays it.
        let slow = tokio::spawn(send(&svc, with(post("/orders", "b", "{}"), "x-delay-ms", "2000")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waited = send(&svc, post("/orders", "b", "{}")).await;
        assert!(waited.replayed());
        slow.await.unwrap();
        let mut get = post("/orders", "c", "{}");
        *get.method_mut() = http::Method::GET;
        assert_eq!(send(&svc, get).await.outcome, Outcome::Bypassed);
        let mut invalid = post("/orders", "c", "{}");
        invalid.headers_mut().insert("idempotency-key", http::HeaderValue::from_static(""));
        assert_eq!(send(&svc, invalid).await.outcome, Outcome::InvalidKey);
        assert_eq!(runs.get(), 3);
    });
    let count = |outcome: &str| value(&text, &format!("idempotency_requests_total{{outcome=\"{outcome}\"}}"));
    assert_eq!(
        [count("executed"), count("replayed"), count("key_reused"), count("bypassed"), count("invalid_key")],
        [2.0, 2.0, 1.0, 1.0, 1.0],
        "{text}"
    );
    assert_eq!(value(&text, "idempotency_replayed_record_age_seconds_count"), 2.0, "{text}");
    // The age is wall-clock time (the record's completion time): at least 0, at most a minute.
    let age = value(&text, "idempotency_replayed_record_age_seconds_sum");
    assert!((0.0..60.0).contains(&age), "{text}");
    assert_eq!(value(&text, "idempotency_wait_seconds_count{duplicates=\"wait\"}"), 1.0, "{text}");
    assert!(value(&text, "idempotency_wait_seconds_sum{duplicates=\"wait\"}") >= 1.9, "{text}");
    // Every lock taken was given back; each was held for its handler's time.
    assert_eq!(value(&text, "idempotency_locks_held"), 0.0, "{text}");
    assert_eq!(value(&text, "idempotency_waiters"), 0.0, "{text}");
    assert_eq!(value(&text, "idempotency_lock_held_seconds_count"), 2.0, "{text}");
    assert!(value(&text, "idempotency_lock_held_seconds_sum") >= 2.0, "{text}");
    // Each `begin`: the two executions, the replays, the mismatch, the waiter's second look.
    assert!(value(&text, "idempotency_store_operation_seconds_count{operation=\"begin\"}") >= 5.0, "{text}");
    assert_eq!(value(&text, "idempotency_store_operation_seconds_count{operation=\"complete\"}"), 2.0, "{text}");
    assert_eq!(value(&text, "idempotency_lease_seconds"), 30.0, "{text}");
    assert_eq!(value(&text, "idempotency_detached_handlers"), 0.0, "{text}");
    assert_eq!(value(&text, "idempotency_lease_takeovers_total"), 0.0, "{text}");
}

#[test]
fn a_lock_taken_over_after_its_lease_and_the_old_owners_write_refused_are_counted() {
    let text = recorded(|| async {
        let store = Outage::new(MemoryStore::new());
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(1)), runs.clone());
        // The store refuses renewals (and writes) for 2 s: the first request's lease runs out
        // while its handler (5 s) runs.
        store.down_for(Duration::from_secs(2));
        let first = tokio::spawn(send(&svc, with(post("/orders", "k", "{}"), "x-delay-ms", "5000")));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Past the lease: a retry takes the key over and runs the handler a second time; its
        // own record waits for the store to be back.
        let second = send(&svc, post("/orders", "k", "{}")).await;
        assert_eq!(second.outcome, Outcome::Executed);
        assert_eq!(first.await.unwrap().outcome, Outcome::Executed);
        assert_eq!(runs.get(), 2);
    });
    assert_eq!(value(&text, "idempotency_lease_takeovers_total"), 1.0, "{text}");
    assert_eq!(value(&text, "idempotency_fenced_writes_rejected_total"), 1.0, "{text}");
    assert!(value(&text, "idempotency_record_write_retries_total") >= 1.0, "{text}");
    assert_eq!(value(&text, "idempotency_record_write_failures_total"), 0.0, "{text}");
    assert_eq!(value(&text, "idempotency_locks_held"), 0.0, "{text}");
}

#[test]
fn a_record_that_cannot_be_written_within_the_lease_is_a_write_failure() {
    let text = recorded(|| async {
        let store = Outage::new(MemoryStore::new());
        let svc =
            service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(2)), Runs::default());
        store.down_for(Duration::from_secs(60));
        assert_eq!(send(&svc, post("/orders", "k", "{}")).await.status, StatusCode::CREATED);
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    assert_eq!(value(&text, "idempotency_record_write_failures_total"), 1.0, "{text}");
    assert!(value(&text, "idempotency_record_write_retries_total") >= 1.0, "{text}");
    assert_eq!(value(&text, "idempotency_locks_held"), 0.0, "{text}");
}

/// A recorder that counts how often each series is registered (each registration is a lookup
/// in a real recorder's registry: what the layer's metrics cost per request), and records
/// nothing.
#[derive(Default)]
struct Registrations(std::sync::Mutex<std::collections::HashMap<String, usize>>);

impl Registrations {
    fn count(&self, key: &::metrics::Key) {
        *self.0.lock().unwrap().entry(key.name().to_owned()).or_default() += 1;
    }

    fn of(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

impl ::metrics::Recorder for Registrations {
    fn describe_counter(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
    fn describe_gauge(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
    fn describe_histogram(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}

    fn register_counter(&self, key: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Counter {
        self.count(key);
        ::metrics::Counter::noop()
    }

    fn register_gauge(&self, key: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Gauge {
        self.count(key);
        ::metrics::Gauge::noop()
    }

    fn register_histogram(&self, key: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Histogram {
        self.count(key);
        ::metrics::Histogram::noop()
    }
}

/// A layer sets the gauges of its bounds once, not at every service it makes (axum makes one
/// per request for a router called without `with_state`), and again once its settings change;
/// a lock's gauge is registered once per lock (its drop decrements through the same handle).
#[test]
fn a_layer_shows_its_bounds_once_and_a_locks_gauge_is_registered_once() {
    let registrations = Registrations::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    ::metrics::with_local_recorder(&registrations, || {
        runtime.block_on(async {
            let (layer, runs) = (IdempotencyLayer::new(), Runs::default());
            for key in ["a", "b", "c"] {
                let svc = service(layer.clone(), runs.clone());
                assert_eq!(send(&svc, post("/orders", key, "{}")).await.status, StatusCode::CREATED);
            }
            let _changed = service(layer.with_lease(Duration::from_secs(60)), runs.clone());
            assert_eq!(runs.get(), 3);
        })
    });
    assert_eq!(registrations.of("idempotency_lease_seconds"), 2, "the first layer once, the changed one once");
    assert_eq!(registrations.of("idempotency_detached_handlers_limit"), 2);
    assert_eq!(registrations.of("idempotency_locks_held"), 3, "one registration per lock");
    assert_eq!(registrations.of("idempotency_requests_total"), 3);
}

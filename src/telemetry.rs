//! Metrics through the `metrics` facade (feature `metrics`): every name and label the layer
//! records, in one place. Without the feature each function here is empty and each gauge guard
//! zero-sized, so nothing is recorded and nothing is computed here (a caller still reads the
//! clock to time a store operation, a wait or a join: one read each).
//!
//! Labels are bounded: an outcome, a store operation, a duplicates mode. Never a key, a scope
//! or a tenant. Every label value is a literal, so each series' key is a `static` (no
//! allocation per request).
//!
//! The cost, counted with callgrind (docs/performance.md, "What the metrics cost"): with the
//! Prometheus exporter's recorder installed, a first request takes 1.07× the instructions it
//! takes without the feature (+3,600), a replay 1.11× (+2,200), a request the layer does not
//! guard 1.02×; on without a recorder, at most 1.02×. Most of it is one lookup in the
//! recorder's registry per series recorded.

#[cfg(feature = "metrics")]
use metrics::{counter, gauge, histogram};

use crate::Outcome;

/// One request's outcome: `idempotency_requests_total{outcome}`.
#[inline]
pub(crate) fn request(outcome: Outcome) {
    #[cfg(feature = "metrics")]
    {
        // One literal per outcome: each series' key is then a `static`.
        macro_rules! count {
            ($($variant:ident => $label:literal),* $(,)?) => {
                match outcome {
                    $(Outcome::$variant => counter!("idempotency_requests_total", "outcome" => $label).increment(1),)*
                }
            };
        }
        count!(
            Bypassed => "bypassed",
            Executed => "executed",
            Replayed => "replayed",
            Joined => "joined",
            InFlight => "in_flight",
            ResponseNotRetained => "response_not_retained",
            KeyExpired => "key_expired",
            KeyReused => "key_reused",
            InvalidKey => "invalid_key",
            MissingKey => "missing_key",
            RequestBodyUnreadable => "request_body_unreadable",
            RequestBodyNotJson => "request_body_not_json",
            RequestBodyTooLarge => "request_body_too_large",
            StoreUnavailable => "store_unavailable",
            Unprotected => "unprotected",
            RolledBack => "rolled_back",
        );
    }
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// A lock this process held was found lost while its request was still in flight (a renewal
/// refused: its lease ran out, and another request may have taken the key over and be running
/// the handler a second time).
pub(crate) fn lease_taken_over() {
    #[cfg(feature = "metrics")]
    counter!("idempotency_lease_takeovers_total").increment(1);
}

/// A record write refused because the lock was no longer this request's.
pub(crate) fn fenced_write_rejected() {
    #[cfg(feature = "metrics")]
    counter!("idempotency_fenced_writes_rejected_total").increment(1);
}

/// A record write that failed and is tried again.
pub(crate) fn record_write_retried() {
    #[cfg(feature = "metrics")]
    counter!("idempotency_record_write_retries_total").increment(1);
}

/// A record that could not be written at all: the next retry executes again.
pub(crate) fn record_write_failed() {
    #[cfg(feature = "metrics")]
    counter!("idempotency_record_write_failures_total").increment(1);
}

/// A store operation the layer timed.
#[derive(Clone, Copy)]
pub(crate) enum Operation {
    Begin,
    Complete,
    Renew,
    Release,
}

/// How long a store operation took: `idempotency_store_operation_seconds{operation}`.
#[inline]
pub(crate) fn store_operation(operation: Operation, started: tokio::time::Instant) {
    #[cfg(feature = "metrics")]
    {
        let seconds = started.elapsed().as_secs_f64();
        match operation {
            Operation::Begin => {
                histogram!("idempotency_store_operation_seconds", "operation" => "begin").record(seconds)
            }
            Operation::Complete => {
                histogram!("idempotency_store_operation_seconds", "operation" => "complete").record(seconds);
            }
            Operation::Renew => {
                histogram!("idempotency_store_operation_seconds", "operation" => "renew").record(seconds)
            }
            Operation::Release => {
                histogram!("idempotency_store_operation_seconds", "operation" => "release").record(seconds);
            }
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (operation, started);
}

/// How long a duplicate waited for the request in flight (until it ended, its head came, or
/// the wait timed out): `idempotency_wait_seconds{duplicates}`.
pub(crate) fn waited(join: bool, started: tokio::time::Instant) {
    #[cfg(feature = "metrics")]
    {
        let seconds = started.elapsed().as_secs_f64();
        if join {
            histogram!("idempotency_wait_seconds", "duplicates" => "join").record(seconds);
        } else {
            histogram!("idempotency_wait_seconds", "duplicates" => "wait").record(seconds);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (join, started);
}

/// How long a joined response lasted, from its head to its end (or its client leaving).
pub(crate) fn joined(started: tokio::time::Instant) {
    #[cfg(feature = "metrics")]
    histogram!("idempotency_join_seconds").record(started.elapsed().as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = started;
}

/// How long a lock was held, from the `begin` that took it to its record written or its
/// release: the handler's time under the lease (`idempotency_lease_seconds` is the lease).
pub(crate) fn lock_held(began: tokio::time::Instant) {
    #[cfg(feature = "metrics")]
    histogram!("idempotency_lock_held_seconds").record(began.elapsed().as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = began;
}

/// The age of a record when it is replayed (do clients retry inside the TTL, and how late?).
#[inline]
pub(crate) fn replayed(origin: &crate::Origin) {
    #[cfg(feature = "metrics")]
    if let Some(age) = origin.completed_at.and_then(|at| at.elapsed().ok()) {
        histogram!("idempotency_replayed_record_age_seconds").record(age.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = origin;
}

/// Whether a layer's settings were shown in the gauges of its bounds: once per layer (and again
/// after a change of its settings), not at every service it makes. (axum makes one per request
/// for a router called without `with_state`, as tests and benchmarks call it: the three
/// bounds' gauges were set twice a service, ~2,900 instructions a request with Prometheus'
/// recorder.) A copy of the settings starts unshown. Zero-sized without the feature.
#[derive(Default)]
pub(crate) struct BoundsShown {
    #[cfg(feature = "metrics")]
    shown: std::sync::atomic::AtomicBool,
}

impl Clone for BoundsShown {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// A layer's bounds and lease, next to the gauges they bound. Set when the layer makes its
/// first service (the last layer to do so in a process wins, for layers that differ).
pub(crate) fn bounds(shown: &BoundsShown, lease: std::time::Duration, waiters_per_key: usize, detached: usize) {
    #[cfg(feature = "metrics")]
    if !shown.shown.swap(true, std::sync::atomic::Ordering::Relaxed) {
        gauge!("idempotency_lease_seconds").set(lease.as_secs_f64());
        gauge!("idempotency_waiters_per_key_limit").set(waiters_per_key as f64);
        gauge!("idempotency_detached_handlers_limit").set(detached as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (shown, lease, waiters_per_key, detached);
}

/// What a gauge guard counts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Held {
    /// A lock held by this process.
    Lock,
    /// A duplicate waiting for the request in flight.
    Waiter,
    /// A duplicate following a joined response.
    Joiner,
    /// A handler (or its body's drain) detached from its client.
    Detached,
}

/// One unit of a gauge, for as long as it lives: incremented when made, decremented when
/// dropped, through the handle registered once when it was made (a registration is a lookup
/// in the recorder's registry: the drop does not look it up again). Zero-sized without the
/// feature.
#[must_use]
pub(crate) struct Tracked {
    #[cfg(feature = "metrics")]
    gauge: metrics::Gauge,
}

impl Tracked {
    pub(crate) fn new(held: Held) -> Self {
        #[cfg(feature = "metrics")]
        {
            let gauge = gauge_of(held);
            gauge.increment(1.0);
            Self { gauge }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = held;
            Self {}
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.gauge.decrement(1.0);
    }
}

#[cfg(feature = "metrics")]
fn gauge_of(held: Held) -> metrics::Gauge {
    match held {
        Held::Lock => gauge!("idempotency_locks_held"),
        Held::Waiter => gauge!("idempotency_waiters"),
        Held::Joiner => gauge!("idempotency_joiners"),
        Held::Detached => gauge!("idempotency_detached_handlers"),
    }
}

//! The fingerprint the layer computes for a request, read off a store that only listens.
//!
//! Tests that stand in for another process holding a key (a crashed owner, a stale token) lock
//! it in the store directly, and need the fingerprint the layer would send for the same request.
//! `Fingerprint::compute` is private to the crate, so they ask the layer itself.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    IdempotencyLayer,
    store::{
        Begin, Fingerprint, Followed, IdempotencyStore, LiveCursor, LiveEvent, LockToken, Record, StoreError, StoreKey,
    },
};

/// A store that answers every `begin` with "in flight", after noting its fingerprint: the
/// layer's path up to the store and back, with nothing kept.
#[derive(Clone, Default, Debug)]
pub struct Probe(Arc<Mutex<Option<Fingerprint>>>);

impl Probe {
    /// The fingerprint of the last `begin`.
    pub fn last(&self) -> Option<Fingerprint> {
        *self.0.lock().unwrap()
    }
}

impl IdempotencyStore for Probe {
    async fn begin(&self, _: &StoreKey, fingerprint: &Fingerprint, _: Duration) -> Result<Begin, StoreError> {
        *self.0.lock().unwrap() = Some(*fingerprint);
        Ok(Begin::Locked)
    }

    async fn complete(&self, _: &StoreKey, _: &LockToken, _: Record, _: Duration) -> Result<bool, StoreError> {
        unreachable!("a probe never hands out a lock")
    }

    async fn renew(&self, _: &StoreKey, _: &LockToken, _: Duration) -> Result<bool, StoreError> {
        unreachable!("a probe never hands out a lock")
    }

    async fn release(&self, _: &StoreKey, _: &LockToken) -> Result<bool, StoreError> {
        unreachable!("a probe never hands out a lock")
    }

    async fn publish(&self, _: &StoreKey, _: &LockToken, _: u64, _: Vec<LiveEvent>) -> Result<(), StoreError> {
        unreachable!("a probe never hands out a lock")
    }

    async fn follow(
        &self,
        _: &StoreKey,
        _: &Fingerprint,
        _: Option<LiveCursor>,
        _: Duration,
    ) -> Result<Followed, StoreError> {
        unreachable!("a probe is used in reject mode only")
    }
}

/// The fingerprint a layer with the default settings computes for a `method` request to `uri`
/// with `body` (an `Idempotency-Key` is added; keys are not fingerprinted).
pub async fn fingerprint_of(method: http::Method, uri: &str, body: &'static [u8]) -> Fingerprint {
    let probe = Probe::default();
    let handler =
        tower::service_fn(|_: Request<_>| async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) });
    let service = IdempotencyLayer::from_store(probe.clone()).layer(handler);
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("idempotency-key", "probe")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 409, "the probe answers in flight");
    probe.last().expect("the layer asked the store")
}

//! A store wrapper for the faults a real store cannot be made to show on cue: completions that
//! take a while, and outages of `complete` and `renew` for a set time (a Redis failover).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use std::sync::atomic::AtomicBool;

use tokio::time::Instant;
use tower_idempotency::store::{
    Begin, Fingerprint, Followed, IdempotencyStore, LiveCursor, LiveEvent, LiveLog, LockToken, MemoryStore, Record,
    StoreError, StoreKey,
};

/// `inner`, with `complete` slowed down and `complete`/`renew` failing until a set instant.
#[derive(Clone)]
pub struct Outage<St> {
    pub inner: St,
    state: Arc<Mutex<State>>,
    pub completes: Arc<AtomicUsize>,
    pub failed_completes: Arc<AtomicUsize>,
    /// Says it outlives the process, whatever `inner` says: a shared store, in process.
    outlives: bool,
}

#[derive(Default)]
struct State {
    complete_delay: Duration,
    release_delay: Duration,
    down_until: Option<Instant>,
}

impl<St: IdempotencyStore> Outage<St> {
    pub fn new(inner: St) -> Self {
        Self {
            inner,
            state: Arc::default(),
            completes: Arc::default(),
            failed_completes: Arc::default(),
            outlives: false,
        }
    }

    /// Says it outlives the process, as a shared store (Redis, PostgreSQL) does.
    pub fn outliving(mut self) -> Self {
        self.outlives = true;
        self
    }

    /// Every `complete` takes `delay` (tokio time) before it reaches the store.
    pub fn slow_completes(&self, delay: Duration) {
        self.state.lock().unwrap().complete_delay = delay;
    }

    /// Every `release` takes `delay` (tokio time) before it reaches the store.
    pub fn slow_releases(&self, delay: Duration) {
        self.state.lock().unwrap().release_delay = delay;
    }

    /// `complete` and `renew` fail for `length` from now (`begin` and `release` still work, as
    /// for a store that went down after the request began).
    pub fn down_for(&self, length: Duration) {
        self.state.lock().unwrap().down_until = Some(Instant::now() + length);
    }

    fn down(&self) -> bool {
        self.state.lock().unwrap().down_until.is_some_and(|until| Instant::now() < until)
    }
}

impl<St: IdempotencyStore> IdempotencyStore for Outage<St> {
    fn outlives_process(&self) -> bool {
        self.outlives || self.inner.outlives_process()
    }

    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let delay = self.state.lock().unwrap().complete_delay;
        tokio::time::sleep(delay).await;
        if self.down() {
            self.failed_completes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::unavailable("injected: store down"));
        }
        self.completes.fetch_add(1, Ordering::SeqCst);
        self.inner.complete(key, lock, record, ttl).await
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        if self.down() {
            return Err(StoreError::unavailable("injected: store down"));
        }
        self.inner.renew(key, lock, lease).await
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        let delay = self.state.lock().unwrap().release_delay;
        tokio::time::sleep(delay).await;
        self.inner.release(key, lock).await
    }
}

impl<St: LiveLog> LiveLog for Outage<St> {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.inner.publish(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.inner.follow(key, fingerprint, cursor, timeout).await
    }
}

/// A `MemoryStore` whose `begin` fails while `down` is set.
#[derive(Clone, Default)]
pub struct Switch {
    pub inner: MemoryStore,
    pub down: Arc<AtomicBool>,
}

impl IdempotencyStore for Switch {
    fn outlives_process(&self) -> bool {
        self.inner.outlives_process()
    }

    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("connection refused"));
        }
        self.inner.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.complete(key, lock, record, ttl).await
    }
    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        self.inner.renew(key, lock, lease).await
    }
    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        self.inner.release(key, lock).await
    }
}

impl LiveLog for Switch {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.inner.publish(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.inner.follow(key, fingerprint, cursor, timeout).await
    }
}

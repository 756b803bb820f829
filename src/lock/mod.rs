//! The in-flight lock: who owns a request's key from `begin` until its record is written.
//!
//! - [`LockGuard`] is held by the executing request. Dropped without being completed, it
//!   releases the lock.
//! - Its lease is renewed by the layer's [`Keeper`], a task of its own, whether or not the
//!   request is being polled.
//! - [`LockGuard::complete`] hands the lock to a [`Completion`]: from then on the record (or a
//!   not-retained record) is written whatever happens to the request, retried through store failures
//!   until the lease is nearly spent.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{runtime::Handle, time::Instant};

use crate::store::{IdempotencyStore, LiveEvent, LockToken, Record, StoreKey};

mod completion;
mod keeper;

pub(crate) use completion::Completion;
pub(crate) use keeper::Keeper;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The pause after the first failed completion; it doubles after each, up to the next.
const COMPLETE_FIRST_PAUSE: Duration = Duration::from_millis(50);
const COMPLETE_MAX_PAUSE: Duration = Duration::from_secs(1);

/// A held lock, with its store type erased so bodies, futures and the keeper need not name it.
pub(crate) trait Held: Send + Sync + 'static {
    fn lease(&self) -> &Lease;
    /// Renews the lease once (started by [`Lease::start_renewal`]).
    fn renew(self: Arc<Self>) -> BoxFuture<()>;
    /// Replaces the lock by `record`, retrying failed writes while the lease lasts.
    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()>;
    /// Removes the lock.
    fn release(self: Arc<Self>) -> BoxFuture<()>;
    /// Appends `events` to the lock's live log from index `from`; `false` if the store failed
    /// (the caller sends them again).
    fn publish(self: Arc<Self>, from: u64, events: Vec<LiveEvent>) -> BoxFuture<bool>;
}

/// When a lock was last renewed, and how long it is known to hold.
pub(crate) struct Lease {
    length: Duration,
    times: Mutex<LeaseTimes>,
    keeper: Keeper,
    /// The lock's id in `keeper`, set once it is registered.
    id: std::sync::OnceLock<usize>,
    /// A write of the record failed at least once and is being retried.
    retrying: AtomicBool,
}

#[derive(Clone, Copy)]
struct LeaseTimes {
    /// The start of the last successful `begin` or `renew`.
    renewed_at: Instant,
    /// A renewal is under way.
    renewing: bool,
    /// The lock was completed or released: nothing renews it any more.
    finished: bool,
}

impl Lease {
    /// Until when the store is known to hold the lock (counted from the start of the last
    /// write that extended it, so never later than the store's own expiry).
    fn until(&self) -> Instant {
        let times = self.times();
        times.renewed_at + self.length
    }

    fn times(&self) -> std::sync::MutexGuard<'_, LeaseTimes> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the lock is due for renewal at `now`, marking it as being renewed if so.
    pub(crate) fn start_renewal(&self, now: Instant, after: Duration) -> bool {
        let mut times = self.times();
        let due = !times.renewing && !times.finished && times.renewed_at + after <= now;
        times.renewing |= due;
        due
    }

    fn end_renewal(&self, renewed_from: Option<Instant>) {
        let mut times = self.times();
        times.renewing = false;
        if let Some(at) = renewed_from {
            times.renewed_at = times.renewed_at.max(at);
        }
    }

    /// Whether a write of the record failed and is being retried.
    pub(crate) fn is_retrying(&self) -> bool {
        self.retrying.load(Ordering::Acquire)
    }

    fn is_finished(&self) -> bool {
        self.times().finished
    }

    /// The lock is completed or released: stop renewing it.
    fn finish(&self) {
        self.times().finished = true;
        if let Some(id) = self.id.get() {
            self.keeper.forget(*id);
        }
    }
}

struct StoreLock<St> {
    store: Arc<St>,
    key: StoreKey,
    token: LockToken,
    ttl: Duration,
    lease: Lease,
}

impl<St: IdempotencyStore> Held for StoreLock<St> {
    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn renew(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let started = Instant::now();
            let renewed = self.store.renew(&self.key, &self.token, self.lease.length).await;
            let lost = !self.lease.is_finished();
            match &renewed {
                Ok(true) => tracing::trace!(token = ?self.token, "idempotency lease renewed"),
                Ok(false) if lost => tracing::warn!(token = ?self.token, "idempotency lock lost while in flight"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, token = ?self.token, "idempotency lease renewal failed"),
            }
            self.lease.end_renewal(matches!(renewed, Ok(true)).then_some(started));
        })
    }

    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()> {
        Box::pin(async move {
            // A failed write is retried with backoff while the lock surely holds the key (the
            // keeper renews it meanwhile, extending that), and for one lease at most: giving
            // up frees the key once the lease expires, and a retry of the request would then
            // run the handler again.
            let started = Instant::now();
            let mut pause = COMPLETE_FIRST_PAUSE;
            for attempt in 1u32.. {
                let error = match self.store.complete(&self.key, &self.token, record.clone(), self.ttl).await {
                    Ok(true) => {
                        tracing::trace!(token = ?self.token, "idempotency record completed");
                        break;
                    }
                    Ok(false) => {
                        // Either an earlier attempt did write (its answer was lost) or the
                        // lease expired and the key was taken over.
                        tracing::warn!(token = ?self.token, "idempotency lock no longer held at completion");
                        break;
                    }
                    Err(error) => error,
                };
                let next = Instant::now() + pause;
                if next >= self.lease.until() || next >= started + self.lease.length {
                    tracing::error!(
                        %error,
                        attempt,
                        token = ?self.token,
                        "idempotency record could not be stored within the lease; the key frees when it expires"
                    );
                    self.lease.retrying.store(true, Ordering::Release);
                    break;
                }
                tracing::warn!(%error, attempt, "idempotency record not stored yet; retrying");
                self.lease.retrying.store(true, Ordering::Release);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(COMPLETE_MAX_PAUSE);
            }
            self.lease.finish();
        })
    }

    fn release(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            match self.store.release(&self.key, &self.token).await {
                Ok(_) => tracing::trace!(token = ?self.token, "idempotency lock released"),
                Err(error) => tracing::warn!(
                    %error,
                    token = ?self.token,
                    "idempotency lock release failed; the key frees when its lease expires"
                ),
            }
            self.lease.finish();
        })
    }

    fn publish(self: Arc<Self>, from: u64, events: Vec<LiveEvent>) -> BoxFuture<bool> {
        Box::pin(async move {
            match self.store.publish(&self.key, &self.token, from, events).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::debug!(%error, token = ?self.token, "idempotency live publish failed; sending it again");
                    false
                }
            }
        })
    }
}

/// The lock one executing request holds.
///
/// Registered with the layer's [`Keeper`] from the start, so its lease is renewed however the
/// request is polled. [`complete`](Self::complete) and [`release`](Self::release) hand it to a
/// [`Completion`]; dropped without either, it releases the lock on the runtime.
pub(crate) struct LockGuard {
    held: Option<Arc<dyn Held>>,
    runtime: Option<Handle>,
}

/// What a [`LockGuard`] is made of: the store, the key, the token and the lock's timing.
pub(crate) struct Locked<St> {
    pub(crate) store: Arc<St>,
    pub(crate) key: StoreKey,
    pub(crate) token: LockToken,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    /// When the `begin` that took the lock was sent: the lease counts from then.
    pub(crate) began: Instant,
}

impl LockGuard {
    pub(crate) fn new<St: IdempotencyStore>(locked: Locked<St>, keeper: &Keeper) -> Self {
        let Locked { store, key, token, ttl, lease, began } = locked;
        let times = LeaseTimes { renewed_at: began, renewing: false, finished: false };
        let lease = Lease {
            length: lease,
            times: Mutex::new(times),
            keeper: keeper.clone(),
            id: Default::default(),
            retrying: AtomicBool::new(false),
        };
        let held: Arc<dyn Held> = Arc::new(StoreLock { store, key, token, ttl, lease });
        let _ = held.lease().id.set(keeper.register(&held));
        Self { held: Some(held), runtime: Handle::try_current().ok() }
    }

    /// The runtime the request runs on, where work left at a drop goes on.
    pub(crate) fn runtime(&self) -> Option<Handle> {
        self.runtime.clone()
    }

    /// The lock, for publishing its response as it is produced (join mode).
    pub(crate) fn held(&self) -> Option<Arc<dyn Held>> {
        self.held.clone()
    }

    /// Replaces the lock by `record`: the write is owned by the returned [`Completion`] (and by
    /// the runtime, should it be dropped) and retried through store failures.
    pub(crate) fn complete(mut self, record: Record) -> Completion {
        match self.held.take() {
            Some(held) => Completion::start(held.clone().complete(record), self.runtime.take()).watching(held),
            None => Completion::done(),
        }
    }

    /// Releases the lock, so a retry with the key executes again.
    pub(crate) fn release(mut self) -> Completion {
        self.take_release()
    }

    fn take_release(&mut self) -> Completion {
        match self.held.take() {
            Some(held) => Completion::start(held.release(), self.runtime.take()),
            None => Completion::done(),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.held.is_some() {
            // Handed to the runtime by the completion's own drop.
            drop(self.take_release());
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard").field("held", &self.held.is_some()).finish_non_exhaustive()
    }
}

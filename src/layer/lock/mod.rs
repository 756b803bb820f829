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
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{runtime::Handle, time::Instant};

use crate::{
    store::{IdempotencyStore, LockToken, Record, StoreKey},
    telemetry::{self, Held, Tracked},
};

mod completion;
mod handle;
mod keeper;

pub(crate) use completion::Completion;
pub(crate) use handle::{LiveOps, Published, StoreHandle, follower};
pub(crate) use keeper::Keeper;

/// The pause after the first failed completion; it doubles after each, up to the next.
const COMPLETE_FIRST_PAUSE: Duration = Duration::from_millis(50);
const COMPLETE_MAX_PAUSE: Duration = Duration::from_secs(1);

/// When a lock was last renewed, and how long it is known to hold.
pub(crate) struct Lease {
    length: Duration,
    times: Mutex<LeaseTimes>,
    keeper: Keeper,
    /// The lock's id in `keeper`, set once it is registered.
    id: std::sync::OnceLock<usize>,
    /// A write of the record failed at least once and is being retried.
    retrying: AtomicBool,
    /// A renewal found the lock lost while its request was in flight (counted once).
    lost: AtomicBool,
    /// When the `begin` that took the lock was sent.
    began: Instant,
    /// Counted among the locks this process holds, while the lease lives.
    _tracked: Tracked,
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
        if !std::mem::replace(&mut self.times().finished, true) {
            telemetry::lock_held(self.began);
        }
        if let Some(id) = self.id.get() {
            self.keeper.forget(*id);
        }
    }
}

/// The lock one executing request holds.
///
/// Registered with the layer's [`Keeper`] from the start, so its lease is renewed however the
/// request is polled. [`complete`](Self::complete) and [`release`](Self::release) hand it to a
/// [`Completion`]; dropped without either, it releases the lock on the runtime.
pub(crate) struct LockGuard {
    held: Option<Arc<dyn StoreHandle>>,
    runtime: Option<Handle>,
}

/// What a [`LockGuard`] is made of: the store, the key, the token and the lock's timing.
pub(crate) struct Locked<St> {
    pub(crate) store: Arc<St>,
    pub(crate) key: StoreKey,
    pub(crate) token: LockToken,
    pub(crate) ttl: Duration,
    /// How long past `ttl` the key stays marked expired (zero: not at all).
    pub(crate) grace: Duration,
    pub(crate) lease: Duration,
    /// When the `begin` that took the lock was sent: the lease counts from then.
    pub(crate) began: Instant,
    /// The store's live log, when the layer publishes into it (join mode).
    pub(crate) live: Option<LiveOps<St>>,
}

impl LockGuard {
    pub(crate) fn new<St: IdempotencyStore>(locked: Locked<St>, keeper: &Keeper) -> Self {
        let Locked { store, key, token, ttl, grace, lease, began, live } = locked;
        let times = LeaseTimes { renewed_at: began, renewing: false, finished: false };
        let lease = Lease {
            length: lease,
            times: Mutex::new(times),
            keeper: keeper.clone(),
            id: Default::default(),
            retrying: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            began,
            _tracked: Tracked::new(Held::Lock),
        };
        let held = handle::Handle::held(store, key, live, handle::Holding { token, ttl, grace, lease });
        if let Some(lease) = held.lease() {
            let _ = lease.id.set(keeper.register(&held));
        }
        Self { held: Some(held), runtime: Handle::try_current().ok() }
    }

    /// The runtime the request runs on, where work left at a drop goes on.
    pub(crate) fn runtime(&self) -> Option<Handle> {
        self.runtime.clone()
    }

    /// The lock, for publishing its response as it is produced (join mode).
    pub(crate) fn held(&self) -> Option<Arc<dyn StoreHandle>> {
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

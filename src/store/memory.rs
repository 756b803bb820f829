//! The in-memory store: one process, no setup.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::time::Instant;

use super::{Begin, IdempotencyStore, LockToken, StoreError, StoreKey};
use crate::{Fingerprint, Record};

/// Default bound on entries (locks and completed records).
const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Default bound on the bytes held by completed records (bodies and headers).
const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Default period of the background sweep that frees expired entries.
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// An in-memory [`IdempotencyStore`]: a sharded concurrent map (`dashmap`), for one process.
///
/// - **Expiry.** A background task (started on first use inside a tokio runtime, stopped when
///   the last clone of the store is dropped) frees expired records and abandoned locks every
///   [sweep interval](MemoryStoreBuilder::sweep_interval), whether or not a request touches
///   them. Expired entries are also treated as absent the moment they expire.
/// - **Bounds.** At most [`max_entries`](MemoryStoreBuilder::max_entries) entries and
///   [`max_bytes`](MemoryStoreBuilder::max_bytes) of recorded responses. Past either, the
///   oldest completed records are evicted first; an in-flight lock is never evicted. When only
///   locks remain, `begin` on a new key fails with [`StoreError::is_capacity`] (the layer
///   answers `503`), and nothing is overwritten. A single record larger than `max_bytes` is
///   kept as a tombstone.
/// - **Time** is `tokio::time::Instant`, so tests can pause and advance it.
///
/// Cloning is cheap and clones share the same entries.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<StoreKey, Slot>,
    /// Completed records, oldest first, for eviction. An element whose `seq` no longer matches
    /// the map is stale and skipped.
    completed: Mutex<VecDeque<(StoreKey, u64)>>,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    seq: AtomicU64,
    sweeper_started: AtomicBool,
    max_entries: usize,
    max_bytes: usize,
    sweep_interval: Duration,
}

enum Slot {
    Locked { token: LockToken, lease_until: Instant },
    Completed { fingerprint: Fingerprint, record: Record, expires_at: Instant, seq: u64, weight: usize },
}

/// `now + by`, saturating at a century from now: `Duration::MAX` means "forever", not a panic.
fn later(now: Instant, by: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now + by.min(CENTURY)
}

impl Slot {
    fn expired(&self, now: Instant) -> bool {
        match self {
            Self::Locked { lease_until, .. } => *lease_until <= now,
            Self::Completed { expires_at, .. } => *expires_at <= now,
        }
    }

    fn weight(&self) -> usize {
        match self {
            Self::Locked { .. } => 0,
            Self::Completed { weight, .. } => *weight,
        }
    }
}

/// Builds a [`MemoryStore`] with non-default bounds.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    sweep_interval: Duration,
}

impl MemoryStoreBuilder {
    /// The most entries (locks plus completed records) the store holds. Default: 100 000.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// The most bytes of recorded responses (bodies, headers, trailers) the store holds.
    /// Default: 256 MiB.
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// How often expired entries are freed in the background. Default: 1 s.
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                completed: Mutex::new(VecDeque::new()),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                seq: AtomicU64::new(0),
                sweeper_started: AtomicBool::new(false),
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                sweep_interval: self.sweep_interval,
            }),
        }
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self { max_entries: DEFAULT_MAX_ENTRIES, max_bytes: DEFAULT_MAX_BYTES, sweep_interval: DEFAULT_SWEEP_INTERVAL }
    }
}

impl MemoryStore {
    /// A store with the default bounds (100 000 entries, 256 MiB of records).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for bounds and the sweep interval.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// Entries held now: locks plus completed records, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.inner.entries.load(Ordering::Acquire)
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of recorded responses held now (see [`StoredResponse::weight`](crate::StoredResponse::weight)).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// Frees every expired entry now (the background sweep does this on its own).
    pub fn sweep(&self) {
        self.inner.sweep(Instant::now());
    }

    fn ensure_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.inner.sweeper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.sweep_interval;
        runtime.spawn(sweep_forever(weak, every));
    }
}

async fn sweep_forever(store: Weak<Inner>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = store.upgrade() else { return };
        inner.sweep(Instant::now());
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl Inner {
    fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        let now = Instant::now();
        if let Some(mut slot) = self.map.get_mut(key) {
            return Ok(self.begin_existing(&mut slot, fingerprint, lease, now));
        }
        // A new key: make room first, outside any shard lock (eviction touches other shards).
        self.reserve_entry()?;
        match self.map.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                // Another caller inserted the key meanwhile.
                self.entries.fetch_sub(1, Ordering::AcqRel);
                Ok(self.begin_existing(slot.get_mut(), fingerprint, lease, now))
            }
            Entry::Vacant(vacant) => {
                let token = LockToken::new(*fingerprint);
                vacant.insert(Slot::Locked { token, lease_until: later(now, lease) });
                Ok(Begin::Execute(token))
            }
        }
    }

    fn begin_existing(&self, slot: &mut Slot, fingerprint: &Fingerprint, lease: Duration, now: Instant) -> Begin {
        if !slot.expired(now) {
            let (held_for, completed) = match slot {
                Slot::Locked { token, .. } => (token.fingerprint(), None),
                Slot::Completed { fingerprint, record, .. } => (&*fingerprint, Some(record)),
            };
            return match (held_for == fingerprint, completed) {
                (false, _) => Begin::Mismatch,
                (true, None) => Begin::InFlight,
                (true, Some(record)) => Begin::Completed(record.clone()),
            };
        }
        // Expired: take the key over in place. A stale queue element is skipped later.
        self.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
        let token = LockToken::new(*fingerprint);
        *slot = Slot::Locked { token, lease_until: later(now, lease) };
        Begin::Execute(token)
    }

    /// Counts one more entry, evicting the oldest completed records while over the bound.
    fn reserve_entry(&self) -> Result<(), StoreError> {
        let held = self.entries.fetch_add(1, Ordering::AcqRel) + 1;
        if held <= self.max_entries {
            return Ok(());
        }
        self.evict_while(|| self.entries.load(Ordering::Acquire) > self.max_entries);
        if self.entries.load(Ordering::Acquire) > self.max_entries {
            self.entries.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::capacity());
        }
        Ok(())
    }

    /// Evicts the oldest completed records (never a lock) while `over()` holds.
    fn evict_while(&self, over: impl Fn() -> bool) {
        let mut queue = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        while over() {
            let Some((key, seq)) = queue.pop_front() else { return };
            self.remove_completed(&key, seq);
        }
    }

    fn remove_completed(&self, key: &StoreKey, seq: u64) {
        let removed = self.map.remove_if(key, |_, slot| matches!(slot, Slot::Completed { seq: s, .. } if *s == seq));
        if let Some((_, slot)) = removed {
            self.entries.fetch_sub(1, Ordering::AcqRel);
            self.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
        }
    }

    fn complete(&self, key: &StoreKey, lock: &LockToken, mut record: Record, ttl: Duration) -> bool {
        let mut weight = record.weight();
        if weight > self.max_bytes {
            record = Record::NotRetained;
            weight = 0;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        {
            let Some(mut slot) = self.map.get_mut(key) else { return false };
            if !matches!(&*slot, Slot::Locked { token, .. } if token == lock) {
                return false;
            }
            let fingerprint = *lock.fingerprint();
            *slot = Slot::Completed { fingerprint, record, expires_at: later(Instant::now(), ttl), seq, weight };
            self.bytes.fetch_add(weight, Ordering::AcqRel);
        }
        self.completed.lock().unwrap_or_else(|e| e.into_inner()).push_back((key.clone(), seq));
        if self.bytes.load(Ordering::Acquire) > self.max_bytes {
            self.evict_while(|| self.bytes.load(Ordering::Acquire) > self.max_bytes);
        }
        true
    }

    fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> bool {
        match self.map.get_mut(key).as_deref_mut() {
            Some(Slot::Locked { token, lease_until }) if token == lock => {
                *lease_until = later(Instant::now(), lease);
                true
            }
            _ => false,
        }
    }

    fn release(&self, key: &StoreKey, lock: &LockToken) -> bool {
        let removed = self.map.remove_if(key, |_, slot| matches!(slot, Slot::Locked { token, .. } if token == lock));
        if removed.is_some() {
            self.entries.fetch_sub(1, Ordering::AcqRel);
        }
        removed.is_some()
    }

    fn sweep(&self, now: Instant) {
        self.map.retain(|_, slot| {
            if !slot.expired(now) {
                return true;
            }
            self.entries.fetch_sub(1, Ordering::AcqRel);
            self.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
            false
        });
        // Drop queue elements whose record is gone, so the queue does not outgrow the map.
        let mut queue = self.completed.lock().unwrap_or_else(|e| e.into_inner());
        queue.retain(|(key, seq)| {
            self.map.get(key).is_some_and(|slot| matches!(&*slot, Slot::Completed { seq: s, .. } if s == seq))
        });
    }
}

impl IdempotencyStore for MemoryStore {
    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        self.ensure_sweeper();
        self.inner.begin(key, fingerprint, lease)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.inner.complete(key, lock, record, ttl))
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        Ok(self.inner.renew(key, lock, lease))
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        Ok(self.inner.release(key, lock))
    }
}

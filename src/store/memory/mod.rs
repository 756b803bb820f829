//! The in-memory store: one process, no setup.
//!
//! - `mod.rs`: the store, its map and bounds, the sweep, the trait impl.
//! - `slot.rs`: what the map holds (a lock or a record, keyed by a keyed hash).
//! - `eviction.rs`: the eviction order, in queues completions on different cores do not share.
//! - `builder.rs`: the bounds and their defaults.

use std::{
    fmt,
    hash::{BuildHasher, BuildHasherDefault, RandomState},
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use tokio::time::Instant;

mod builder;
mod eviction;
mod live;
mod slot;

pub use builder::MemoryStoreBuilder;
use slot::{KeyId, KeyIdHasher, Slot, Stored, later};

use eviction::{Padded, Queues};
use live::Live;

use super::{
    Begin, Completed, Fingerprint, Followed, IdempotencyStore, Inspect, KeyState, LiveCursor, LiveEvent, LiveLog,
    LockToken, Locked, Purged, Record, StoreError, StoreKey,
};
use crate::rt::{Background, Running};

/// An in-memory [`IdempotencyStore`]: a sharded concurrent map (`dashmap`), for one process.
///
/// - **Expiry.** A background task (started on first use inside a tokio runtime, stopped when
///   the last clone of the store is dropped) frees expired records and abandoned locks every
///   [sweep interval](MemoryStoreBuilder::with_cleanup_interval), whether or not a request touches
///   them. When the runtime it runs on shuts down, the next use of the store on another
///   runtime starts it again there. Expired entries are also treated as absent the moment
///   they expire, by every operation.
/// - **Bounds.** At most [`with_max_entries`](MemoryStoreBuilder::with_max_entries) entries and
///   [`with_max_bytes`](MemoryStoreBuilder::with_max_bytes) of recorded responses and live logs
///   (see [live logs](#live-logs)). Past either, the
///   oldest completed records are evicted first (in completion order across the whole store;
///   with several threads completing at once, the order is that of a sequence number taken as
///   each record is written, so a completion preempted in between counts as later); an
///   in-flight lock is never evicted. Completions of distinct keys on different cores share no
///   lock below the bound unless their keys meet in one of the map's shards (16 per core) or
///   eviction queues (4 per core, at most 64); at the bound, evictions meet at the oldest
///   record's queue and shard. When only
///   locks remain, `begin` on a new key fails with [`StoreError::is_capacity`] (the layer
///   answers `503`), and nothing is overwritten. A single record larger than `max_bytes` is
///   kept as a not-retained record.
/// - **Time** is `tokio::time::Instant`, so tests can pause and advance it.
/// - **Memory.** An entry is keyed by a 128-bit keyed hash of the store key (two SipHash-1-3
///   digests under random per-store keys: no one outside the process can make two keys
///   collide), not by the key itself, and a record is kept as one exact-size buffer
///   ([`StoredResponse`](super::StoredResponse) encoded, body included) that replays decode without copying. A
///   record then costs its body and header bytes plus under 200 bytes (see
///   `cargo bench --bench memory`).
///
/// # Live logs
///
/// A lock's live log (what a response in flight publishes for duplicates to join,
/// [`Duplicates::Join`](crate::Duplicates::Join)) is counted in the byte bound from its first
/// publish or follower until the lock ends, when it is freed: **40 bytes per event** (each body
/// chunk, and each end of a `text/event-stream` event with an id), grown by doubling, **plus
/// the event's bytes**, plus under 200 bytes for the log itself. Measured by a counting
/// allocator (test `alloc::a_memory_live_log_holds_what_the_store_counts`), the store counts
/// exactly what the log holds: 10,000 events of 5 bytes hold 705 KB (65.5 bytes per event
/// beyond its bytes: 14× the body), of 20 bytes 855 KB (4.3×), 2,000 events of 500 bytes
/// 1.08 MB (1.08×). The body bytes are shared with the response that published them; followers
/// share them too.
///
/// Each log is bounded: at most [`with_max_live_log`](MemoryStoreBuilder::with_max_live_log)
/// (default 4 MiB) per response. A publish that would take a log past its bound, or the store
/// past [`with_max_bytes`](MemoryStoreBuilder::with_max_bytes) once no record is left to evict,
/// is refused ([`StoreError::is_capacity`]), and nothing more is appended to that log: the layer
/// then keeps the response as not retained, as past its record limit (joined bodies end with
/// an error, later duplicates get `409` `response-not-retained`, the response itself goes on to
/// its client).
///
/// Cloning is cheap and clones share the same entries.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<KeyId, Slot, BuildHasherDefault<KeyIdHasher>>,
    /// The keys of the two hashes that make a [`KeyId`].
    ids: [RandomState; 2],
    /// Completed records in the order they completed, for eviction.
    completed: Queues,
    /// Entries and record bytes held: written by every `begin` of a new key and every
    /// completion, so on a cache line of their own (apart from the map's and the bounds',
    /// which every operation only reads).
    counts: Padded<Counts>,
    /// The background sweep.
    sweeper: Background,
    max_entries: usize,
    max_bytes: usize,
    /// The most a live log holds (its weight), per response.
    max_live_log: usize,
    sweep_interval: Duration,
}

/// How many queued elements beyond twice the entries held a sweep tolerates before it looks
/// every element up (stale ones at the queues' fronts it drops every time).
const STALE_SLACK: usize = 1024;

#[derive(Default)]
struct Counts {
    entries: AtomicUsize,
    bytes: AtomicUsize,
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
        self.inner.counts.0.entries.load(Ordering::Acquire)
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of recorded responses held now (see [`StoredResponse::weight`](super::StoredResponse::weight)),
    /// and of the live logs of locks (see [live logs](MemoryStore#live-logs)).
    pub fn bytes(&self) -> usize {
        self.inner.counts.0.bytes.load(Ordering::Acquire)
    }

    /// Frees every expired entry now (the background sweep does this on its own).
    pub fn sweep(&self) {
        self.inner.sweep(Instant::now());
    }

    /// Starts the sweep on the current runtime, or again if the runtime that ran it ended.
    fn ensure_sweeper(&self) {
        let (store, every) = (Arc::downgrade(&self.inner), self.inner.sweep_interval);
        self.inner.sweeper.ensure(|running| sweep_forever(store, every, running));
    }
}

async fn sweep_forever(store: Weak<Inner>, every: Duration, _running: Running) {
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
            .field("max_live_log", &self.inner.max_live_log)
            .finish()
    }
}

impl Inner {
    fn id(&self, key: &StoreKey) -> KeyId {
        KeyId([self.ids[0].hash_one(key), self.ids[1].hash_one(key)])
    }

    fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let id = self.id(key);
        if let Some(mut slot) = self.map.get_mut(&id) {
            return self.begin_existing(&mut slot, fingerprint, lease, now);
        }
        // A new key: make room first, outside any shard lock (eviction touches other shards).
        self.reserve_entry()?;
        match self.map.entry(id) {
            Entry::Occupied(mut slot) => {
                // Another caller inserted the key meanwhile.
                self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
                self.begin_existing(slot.get_mut(), fingerprint, lease, now)
            }
            Entry::Vacant(vacant) => {
                let token = LockToken::new(*fingerprint);
                vacant.insert(Slot::Locked { token, lease_until: later(now, lease), live: None });
                Ok(Begin::Execute(token))
            }
        }
    }

    fn begin_existing(
        &self,
        slot: &mut Slot,
        fingerprint: &Fingerprint,
        lease: Duration,
        now: Instant,
    ) -> Result<Begin, StoreError> {
        if let Slot::Completed { expires_at, grace_until, .. } = slot {
            if *expires_at <= now && now < *grace_until {
                return Ok(Begin::Expired);
            }
        }
        if !slot.expired(now) {
            let (held_for, completed) = match slot {
                Slot::Locked { token, .. } => (token.fingerprint(), None),
                Slot::Completed { fingerprint, record, .. } => (&*fingerprint, Some(record)),
            };
            return match (held_for == fingerprint, completed) {
                (false, _) => Ok(Begin::Mismatch),
                (true, None) => Ok(Begin::Locked),
                (true, Some(record)) => record.to_record().map(Begin::Completed),
            };
        }
        // Expired: take the key over in place. A stale queue element is skipped later.
        self.counts.0.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
        slot.end_live(false, &self.counts.0.bytes);
        let token = LockToken::new(*fingerprint);
        *slot = Slot::Locked { token, lease_until: later(now, lease), live: None };
        Ok(Begin::Execute(token))
    }

    /// Counts one more entry, evicting the oldest completed record if that puts the store over
    /// its bound.
    ///
    /// Each reservation over the bound evicts one record at most, so callers reserving at the
    /// same time evict one each and never more than the bound asks for. Fails only when no
    /// record is left to evict while still over the bound (only locks left).
    fn reserve_entry(&self) -> Result<(), StoreError> {
        let held = self.counts.0.entries.fetch_add(1, Ordering::AcqRel) + 1;
        if held <= self.max_entries {
            return Ok(());
        }
        // Another caller's eviction may have made room meanwhile.
        if self.counts.0.entries.load(Ordering::Acquire) <= self.max_entries || self.evict_oldest() {
            return Ok(());
        }
        self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
        Err(StoreError::capacity())
    }

    /// Evicts the oldest completed record (never a lock), skipping stale queue elements.
    /// `false` when there is none to evict.
    fn evict_oldest(&self) -> bool {
        while let Some((key, seq)) = self.completed.pop_oldest() {
            if self.remove_completed(&key, seq) {
                return true;
            }
        }
        false
    }

    /// Removes the record `seq` of `key`, if the map still holds it.
    fn remove_completed(&self, key: &KeyId, seq: u64) -> bool {
        let removed = self.map.remove_if(key, |_, slot| matches!(slot, Slot::Completed { seq: s, .. } if *s == seq));
        let Some((_, slot)) = removed else { return false };
        self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
        self.counts.0.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
        true
    }

    fn complete(&self, key: &StoreKey, lock: &LockToken, record: Record, ttl: Duration, grace: Duration) -> bool {
        let record_weight = record.weight();
        // Encoded outside the shard lock. A record over the whole budget, or one the encoding
        // cannot hold, is kept as a not-retained record, which counts no bytes.
        let stored = if record_weight > self.max_bytes { Stored::NotRetained } else { Stored::new(&record) };
        let weight = match &stored {
            Stored::Response(_) => record_weight,
            Stored::NotRetained => 0,
        };
        let id = self.id(key);
        let seq = self.completed.next_seq();
        let held;
        {
            let Some(mut slot) = self.map.get_mut(&id) else { return false };
            let now = Instant::now();
            if !slot.is_live_lock(lock, now) {
                return false;
            }
            let fingerprint = *lock.fingerprint();
            let expires_at = later(now, ttl);
            let grace_until = later(expires_at, grace);
            let completed = Slot::Completed { fingerprint, record: stored, expires_at, grace_until, seq, weight };
            std::mem::replace(&mut *slot, completed).end_live(true, &self.counts.0.bytes);
            held = self.counts.0.bytes.fetch_add(weight, Ordering::AcqRel) + weight;
        }
        self.completed.push(id, seq);
        // Over the byte budget: evict the oldest records until this record's bytes fit.
        if held > self.max_bytes {
            while self.counts.0.bytes.load(Ordering::Acquire) > self.max_bytes && self.evict_oldest() {}
        }
        true
    }

    fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> bool {
        let now = Instant::now();
        match self.map.get_mut(&self.id(key)).as_deref_mut() {
            Some(Slot::Locked { token, lease_until, .. }) if token == lock && *lease_until > now => {
                *lease_until = later(now, lease);
                true
            }
            _ => false,
        }
    }

    fn release(&self, key: &StoreKey, lock: &LockToken) -> bool {
        let now = Instant::now();
        let removed = self.map.remove_if(&self.id(key), |_, slot| slot.is_live_lock(lock, now));
        let Some((_, slot)) = removed else { return false };
        self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
        slot.end_live(false, &self.counts.0.bytes);
        true
    }

    /// A new live log, counted in the store's bytes.
    fn new_live(&self) -> Arc<Live> {
        self.counts.0.bytes.fetch_add(live::EMPTY_WEIGHT, Ordering::AcqRel);
        Live::new()
    }

    /// Appends `events` to `lock`'s live log: the store's byte bound made room for them first
    /// (evicting the oldest records), and the log's own bound holds. Refused (`capacity`)
    /// past either.
    fn publish(&self, key: &StoreKey, lock: &LockToken, from: u64, events: Vec<LiveEvent>) -> Result<(), StoreError> {
        let Some(live) = self.live_of(key, lock) else { return Ok(()) };
        let growth = live.growth_of(&events);
        while self.counts.0.bytes.load(Ordering::Acquire) + growth > self.max_bytes {
            if !self.evict_oldest() {
                return Err(StoreError::capacity());
            }
        }
        live.publish(from, events, self.max_live_log, &self.counts.0.bytes).map_err(|live::Full| StoreError::capacity())
    }

    /// The live log of `lock`, made if it has none yet; `None` when the lock is not held.
    fn live_of(&self, key: &StoreKey, lock: &LockToken) -> Option<Arc<Live>> {
        let now = Instant::now();
        match self.map.get_mut(&self.id(key)).as_deref_mut() {
            Some(Slot::Locked { token, lease_until, live }) if token == lock && *lease_until > now => {
                Some(live.get_or_insert_with(|| self.new_live()).clone())
            }
            _ => None,
        }
    }

    /// The log a follower at `cursor` reads, the cursor in it, and until when the lease holds;
    /// or what ended it.
    fn followed(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
    ) -> Result<(Arc<Live>, LiveCursor, Instant), Followed> {
        let now = Instant::now();
        let mut slot = self.map.get_mut(&self.id(key)).ok_or(Followed::Ended { completed: false })?;
        match &mut *slot {
            Slot::Locked { token, lease_until, live }
                if *lease_until > now
                    && token.fingerprint() == fingerprint
                    && cursor.is_none_or(|cursor| cursor.lock() == token.id()) =>
            {
                let cursor = cursor.unwrap_or(LiveCursor::new(token.id(), 0));
                Ok((live.get_or_insert_with(|| self.new_live()).clone(), cursor, *lease_until))
            }
            Slot::Completed { fingerprint: completed, expires_at, .. }
                if completed == fingerprint && *expires_at > now =>
            {
                Err(Followed::Ended { completed: true })
            }
            _ => Err(Followed::Ended { completed: false }),
        }
    }

    fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let now = Instant::now();
        let Some(slot) = self.map.get(&self.id(key)) else { return Ok(KeyState::Unknown) };
        if slot.expired(now) {
            return Ok(KeyState::Unknown);
        }
        Ok(match &*slot {
            Slot::Locked { token, lease_until, .. } => KeyState::Locked(Locked::new(token, wall(*lease_until, now))),
            // Past its TTL, within a grace: its record is no longer the key's.
            Slot::Completed { expires_at, .. } if *expires_at <= now => KeyState::Unknown,
            Slot::Completed { record, expires_at, .. } => {
                KeyState::Completed(Completed::new(record.to_record()?, wall(*expires_at, now)))
            }
        })
    }

    fn purge(&self, key: &StoreKey) -> Purged {
        let now = Instant::now();
        let Entry::Occupied(slot) = self.map.entry(self.id(key)) else { return Purged::Unknown };
        let purged = match slot.get() {
            _ if slot.get().expired(now) => Purged::Unknown,
            Slot::Locked { .. } => return Purged::Locked,
            Slot::Completed { .. } => Purged::Removed,
        };
        // A stale queue element is skipped later, as for an expired record.
        let (_, slot) = slot.remove_entry();
        self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
        self.counts.0.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
        slot.end_live(false, &self.counts.0.bytes);
        purged
    }

    fn sweep(&self, now: Instant) {
        self.map.retain(|_, slot| {
            if !slot.expired(now) {
                return true;
            }
            self.counts.0.entries.fetch_sub(1, Ordering::AcqRel);
            self.counts.0.bytes.fetch_sub(slot.weight(), Ordering::AcqRel);
            slot.end_live(false, &self.counts.0.bytes);
            false
        });
        // Drop queue elements whose record is gone (expired, or its key taken over): those at
        // the fronts every time (where expiry leaves them), all of them only once the queues
        // hold more than twice the entries plus a slack, since that looks every element up.
        let is_stale = |key: &KeyId, seq: u64| {
            !self.map.get(key).is_some_and(|slot| matches!(&*slot, Slot::Completed { seq: s, .. } if *s == seq))
        };
        self.completed.drop_stale_fronts(is_stale);
        if self.completed.len() <= 2 * self.counts.0.entries.load(Ordering::Acquire) + STALE_SLACK {
            return;
        }
        self.completed.retain(|key, seq| !is_stale(key, seq));
    }
}

impl IdempotencyStore for MemoryStore {
    /// `false`: its locks and records end with the process, so a random secret per process
    /// keys the layer's digests and no configuration is needed.
    fn outlives_process(&self) -> bool {
        false
    }

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
        Ok(self.inner.complete(key, lock, record, ttl, Duration::ZERO))
    }

    /// Keeps the whole slot, record included, until the grace ends (no second entry): its
    /// bytes count against the store's bound until then, and eviction may drop it first.
    async fn complete_with_grace(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.inner.complete(key, lock, record, ttl, grace))
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        Ok(self.inner.renew(key, lock, lease))
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        Ok(self.inner.release(key, lock))
    }
}

/// `at` on the wall clock, `now` being this process's `SystemTime::now()`.
fn wall(at: Instant, now: Instant) -> std::time::SystemTime {
    let wall_now = std::time::SystemTime::now();
    match at.checked_duration_since(now) {
        Some(ahead) => wall_now + ahead,
        None => wall_now - now.duration_since(at),
    }
}

impl Inspect for MemoryStore {
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        self.inner.inspect(key)
    }

    async fn purge(&self, key: &StoreKey) -> Result<Purged, StoreError> {
        Ok(self.inner.purge(key))
    }
}

impl LiveLog for MemoryStore {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.inner.publish(key, lock, from, events)
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        let (live, cursor, lease_until) = match self.inner.followed(key, fingerprint, cursor) {
            Ok(followed) => followed,
            Err(ended) => return Ok(ended),
        };
        // No later than the lease: a lock that expires unreleased ends its log then (the next
        // follow finds it gone).
        let until = later(Instant::now(), timeout).min(lease_until);
        Ok(live.follow(cursor, until).await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::{IdempotencyKey, store::StoredResponse};

    fn key(n: usize) -> StoreKey {
        StoreKey::new(None, IdempotencyKey::parse(format!("key-{n}").as_bytes()).unwrap())
    }

    /// Records that expire leave stale elements in the eviction queues. A sweep drops those at
    /// the queues' fronts every time; the ones behind a live record it leaves until the queues
    /// hold more than twice the entries plus the slack, then drops them all.
    #[tokio::test(start_paused = true)]
    async fn the_eviction_queues_stay_bounded_by_the_map() {
        const LONG: Duration = Duration::from_secs(3600);
        const SHORT: Duration = Duration::from_secs(1);
        let store = MemoryStore::builder().with_max_entries(1_000_000).build();
        let record = Record::Response(Arc::new(StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new())));
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let complete = |n: usize, ttl: Duration| {
            let Ok(Begin::Execute(token)) = store.inner.begin(&key(n), &fingerprint, ttl) else { panic!() };
            assert!(store.inner.complete(&key(n), &token, record.clone(), ttl, Duration::ZERO));
        };
        let expire_and_sweep = || async {
            tokio::time::advance(SHORT * 2).await;
            store.sweep();
        };
        // Expired records queued before a live one: at the fronts, dropped at once.
        (0..5_000).for_each(|n| complete(n, SHORT));
        complete(100_000, LONG);
        expire_and_sweep().await;
        assert_eq!((store.len(), store.inner.completed.len()), (1, 1));
        // Behind live records (in every queue), within the slack: left in place.
        (100_001..102_001).for_each(|n| complete(n, LONG));
        (10_000..10_500).for_each(|n| complete(n, SHORT));
        expire_and_sweep().await;
        assert_eq!((store.len(), store.inner.completed.len()), (2_001, 2_501));
        // Past twice the entries plus the slack: every stale element goes.
        (20_000..25_000).for_each(|n| complete(n, SHORT));
        expire_and_sweep().await;
        assert_eq!((store.len(), store.inner.completed.len()), (2_001, 2_001));
        assert!(matches!(store.inner.begin(&key(100_000), &fingerprint, SHORT), Ok(Begin::Completed(_))));
    }
}

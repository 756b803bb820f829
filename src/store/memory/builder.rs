//! The bounds of a `MemoryStore`, and their defaults.

use std::{hash::RandomState, sync::Arc, time::Duration};

use dashmap::DashMap;

use super::{Inner, MemoryStore, Padded, Queues};
use crate::rt::Background;

/// Default bound on entries (locks and completed records).
const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Default bound on the bytes held by completed records (bodies and headers).
const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Default bound on one live log (what a response in flight publishes for join mode).
const DEFAULT_MAX_LIVE_LOG: usize = 4 * 1024 * 1024;
/// Default period of the background sweep that frees expired entries.
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Builds a [`MemoryStore`] with non-default bounds.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    max_live_log: usize,
    sweep_interval: Duration,
}

impl MemoryStoreBuilder {
    /// The most entries (locks plus completed records) the store holds. Default: 100 000.
    ///
    /// ```
    /// use tower_idempotency::store::MemoryStore;
    ///
    /// let store = MemoryStore::builder().with_max_entries(10_000).build();
    /// # let _ = store;
    /// ```
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// The most bytes of recorded responses (bodies, headers, trailers) and live logs the
    /// store holds. Default: 256 MiB.
    ///
    /// ```
    /// use tower_idempotency::store::MemoryStore;
    ///
    /// let store = MemoryStore::builder().with_max_bytes(64 * 1024 * 1024).build();
    /// # let _ = store;
    /// ```
    pub fn with_max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// The most memory one live log holds: what a response in flight publishes for duplicates
    /// to join ([`Duplicates::Join`](crate::Duplicates::Join)), counted as the
    /// [store's docs](MemoryStore#live-logs) say (40 bytes per event plus its bytes). Default:
    /// 4 MiB.
    ///
    /// Past it the store refuses the response's next publish; the layer then keeps the
    /// response as not retained, as past its record limit: its joined bodies end with an
    /// error and later duplicates get `409` `response-not-retained`, while the response itself
    /// goes on to its client.
    ///
    /// ```
    /// use tower_idempotency::store::MemoryStore;
    ///
    /// let store = MemoryStore::builder().with_max_live_log(1024 * 1024).build();
    /// # let _ = store;
    /// ```
    pub fn with_max_live_log(mut self, max: usize) -> Self {
        self.max_live_log = max;
        self
    }

    /// How often expired entries are freed in the background. Default: 1 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::MemoryStore;
    ///
    /// let store = MemoryStore::builder().with_cleanup_interval(Duration::from_secs(10)).build();
    /// # let _ = store;
    /// ```
    pub fn with_cleanup_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the store.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
    ///
    /// let layer = IdempotencyLayer::from_store(MemoryStore::builder().with_max_entries(1_000).build());
    /// # let _ = layer;
    /// ```
    pub fn build(self) -> MemoryStore {
        // The map has sixteen shards per core (a power of two; `dashmap`'s default is four), so
        // that two cores working on distinct keys rarely wait on one shard's lock.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        MemoryStore {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher_and_shard_amount(Default::default(), (cores * 16).next_power_of_two()),
                ids: [RandomState::new(), RandomState::new()],
                completed: Queues::new(cores),
                counts: Padded::default(),
                sweeper: Background::default(),
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                max_live_log: self.max_live_log,
                sweep_interval: self.sweep_interval,
            }),
        }
    }
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_live_log: DEFAULT_MAX_LIVE_LOG,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

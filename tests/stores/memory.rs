//! `MemoryStore` against the shared store conformance suite, plus its own bounds and expiry.

use crate::common;

use std::time::Duration;

use tower_idempotency::store::MemoryStore;

#[tokio::test(start_paused = true)]
async fn memory_store_passes_the_conformance_suite() {
    common::conformance::run(|| async { MemoryStore::new() }, tokio::time::advance).await;
    common::conformance::run_live(|| async { MemoryStore::new() }, tokio::time::advance).await;
    common::conformance::run_expired(|| async { MemoryStore::new() }, tokio::time::advance).await;
    common::conformance::run_inspect(|| async { MemoryStore::new() }, tokio::time::advance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_races_completion_on_threads() {
    common::conformance::purge_never_removes_a_lock_racing_its_completion(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_begins_on_threads_lock_once() {
    common::conformance::concurrent_begins_lock_once(MemoryStore::new()).await;
}

mod bounds {
    use std::{sync::Arc, time::Duration};

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use tower_idempotency::store::{Begin, IdempotencyStore, MemoryStore, Record, StoredResponse};

    use crate::common::{
        Runs,
        conformance::{LEASE, begin, fp, fresh_key, lock},
        post, send, service,
    };

    fn record_of(len: usize) -> Record {
        Record::Response(Arc::new(StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from(vec![0u8; len]))))
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_reclaimed_without_a_request() {
        let store = MemoryStore::builder().with_cleanup_interval(Duration::from_secs(1)).build();
        for _ in 0..100 {
            let key = fresh_key(None);
            let token = lock(&store, &key, fp(1)).await;
            assert!(store.complete(&key, &token, record_of(100), TTL).await.unwrap());
        }
        // An abandoned lock is reclaimed too, once its lease is over.
        lock(&store, &fresh_key(None), fp(1)).await;
        assert_eq!(store.len(), 101);
        assert_eq!(store.bytes(), 100 * 100);
        tokio::time::sleep(TTL + Duration::from_secs(2)).await;
        assert_eq!(store.len(), 0, "the background sweep freed every expired entry");
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_bounded_by_evicting_the_oldest_records() {
        let store = MemoryStore::builder().with_max_entries(10).build();
        let mut keys = Vec::new();
        for _ in 0..25 {
            let key = fresh_key(None);
            let token = lock(&store, &key, fp(1)).await;
            assert!(store.complete(&key, &token, record_of(10), TTL).await.unwrap());
            assert!(store.len() <= 10, "the bound holds at every point");
            keys.push(key);
        }
        assert_eq!(store.len(), 10);
        // The newest ten are kept; the oldest were evicted.
        for key in &keys[15..] {
            assert!(matches!(begin(&store, key, fp(1)).await, Begin::Completed(_)));
        }
        assert!(matches!(begin(&store, &keys[0], fp(1)).await, Begin::Execute(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn locks_are_never_evicted_and_a_full_store_refuses_new_keys() {
        let store = MemoryStore::builder().with_max_entries(5).build();
        let done = fresh_key(None);
        let token = lock(&store, &done, fp(1)).await;
        store.complete(&done, &token, record_of(1), TTL).await.unwrap();
        let locked: Vec<_> = (0..4).map(|_| fresh_key(None)).collect();
        for key in &locked {
            lock(&store, key, fp(1)).await;
        }
        // Full: the new key evicts the completed record, never a lock.
        let newest = fresh_key(None);
        lock(&store, &newest, fp(1)).await;
        assert_eq!(store.len(), 5);
        // Only locks remain: a new key is refused (the evicted record's key is new again),
        // and nothing is overwritten.
        for key in [fresh_key(None), done] {
            let refused = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
            assert!(refused.is_capacity());
        }
        for key in locked.iter().chain([&newest]) {
            assert!(matches!(begin(&store, key, fp(1)).await, Begin::Locked));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_full_of_locks_answers_503_through_the_layer() {
        let store = MemoryStore::builder().with_max_entries(1).build();
        lock(&store, &fresh_key(None), fp(1)).await;
        let runs = Runs::default();
        let svc = service(tower_idempotency::IdempotencyLayer::from_store(store), runs.clone());
        send(&svc, post("/orders", "k", "{}")).await.assert_problem(503, "store-unavailable");
        assert_eq!(runs.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_bounded_and_an_oversized_record_becomes_a_not_retained_record() {
        let store = MemoryStore::builder().with_max_bytes(1000).build();
        let mut keys = Vec::new();
        for _ in 0..10 {
            let key = fresh_key(None);
            let token = lock(&store, &key, fp(1)).await;
            store.complete(&key, &token, record_of(300), TTL).await.unwrap();
            assert!(store.bytes() <= 1000, "{} bytes", store.bytes());
            keys.push(key);
        }
        assert_eq!(store.bytes(), 900);
        assert!(matches!(begin(&store, &keys[9], fp(1)).await, Begin::Completed(Record::Response(_))));
        assert!(matches!(begin(&store, &keys[0], fp(1)).await, Begin::Execute(_)));
        // One record over the whole budget is kept as a not-retained record: the key is never run twice.
        let huge = fresh_key(None);
        let token = lock(&store, &huge, fp(1)).await;
        assert!(store.complete(&huge, &token, record_of(5000), TTL).await.unwrap());
        assert!(matches!(begin(&store, &huge, fp(1)).await, Begin::Completed(Record::NotRetained)));
    }

    /// A not-retained record holds no response bytes: a `complete` that ends up keeping one (the record
    /// is over `max_bytes`, or its encoding fails) adds nothing to `bytes()`, so it never
    /// evicts real records for bytes it does not keep.
    #[tokio::test(start_paused = true)]
    async fn a_not_retained_record_counts_no_bytes() {
        let store = MemoryStore::builder().with_max_bytes(100_000).build();
        let mut kept = Vec::new();
        for _ in 0..4 {
            let key = fresh_key(None);
            let token = lock(&store, &key, fp(1)).await;
            assert!(store.complete(&key, &token, record_of(10_000), TTL).await.unwrap());
            kept.push(key);
        }
        assert_eq!(store.bytes(), 40_000);

        // Over the whole budget: kept as a not-retained record.
        let huge = fresh_key(None);
        let token = lock(&store, &huge, fp(1)).await;
        assert!(store.complete(&huge, &token, record_of(200_000), TTL).await.unwrap());
        assert!(matches!(begin(&store, &huge, fp(1)).await, Begin::Completed(Record::NotRetained)));
        assert_eq!(store.bytes(), 40_000, "an oversized record's not-retained record counts no bytes");

        // Within the budget by weight (65 536 bytes), but 65 536 header fields do not fit the
        // encoding's count: kept as a not-retained record too, and counted as one.
        let mut headers = HeaderMap::new();
        for _ in 0..=usize::from(u16::MAX) {
            headers.append("x", http::HeaderValue::from_static(""));
        }
        let unencodable = Record::Response(Arc::new(StoredResponse::new(StatusCode::OK, headers, Bytes::new())));
        assert_eq!(unencodable.weight(), 65_536);
        let odd = fresh_key(None);
        let token = lock(&store, &odd, fp(1)).await;
        assert!(store.complete(&odd, &token, unencodable, TTL).await.unwrap());
        assert!(matches!(begin(&store, &odd, fp(1)).await, Begin::Completed(Record::NotRetained)));
        assert_eq!(store.bytes(), 40_000, "an unencodable record's not-retained record counts no bytes");
        // No phantom bytes, so no real record was evicted to make room for them.
        for key in &kept {
            assert!(matches!(begin(&store, key, fp(1)).await, Begin::Completed(Record::Response(_))));
        }
        assert_eq!(store.len(), 6);

        // Freed, a not-retained record gives back nothing it did not take.
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        store.sweep();
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}

/// At the entry bound, concurrent callers on distinct keys evict records for each other: none
/// is refused while completed records remain to evict (a race once made `begin` fail with
/// `capacity` when another caller's reservation landed between eviction and its check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_never_refuses_while_records_can_be_evicted() {
    use tower_idempotency::store::{Begin, IdempotencyStore, Record};

    let store = MemoryStore::builder().with_max_entries(500).build();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    let key = common::conformance::fresh_key(None);
                    let fp = common::conformance::fp(1);
                    match store.begin(&key, &fp, Duration::from_secs(30)).await {
                        Ok(Begin::Execute(token)) => {
                            assert!(
                                store
                                    .complete(&key, &token, Record::NotRetained, Duration::from_secs(60))
                                    .await
                                    .unwrap()
                            );
                        }
                        other => panic!("a fresh key must execute, got {other:?}"),
                    }
                    assert!(store.len() <= 500 + 4, "the bound holds, give or take reservations in flight");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(store.len(), 500);
}

/// Completions of distinct keys on two threads at once, racing through a full store: the
/// bound holds at every point, and what is left at the end is the newest records, oldest-first
/// eviction having held across the eviction queues. (Only the newest half is asserted: a
/// completion whose thread is preempted between taking its sequence number and returning is
/// stamped late here, so the order this test sees can lag the store's.)
#[test]
fn racing_completions_evict_oldest_first_across_queues() {
    use std::sync::{Barrier, Mutex, atomic::AtomicU64, atomic::Ordering};

    use tower_idempotency::store::{Begin, IdempotencyStore, Record};

    const BOUND: usize = 1_000;
    const THREADS: usize = 2;
    const PER_THREAD: usize = 20_000;
    let store = MemoryStore::builder().with_max_entries(BOUND).build();
    let order = AtomicU64::new(0);
    let completed = Mutex::new(Vec::new());
    let start = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                let mut mine = Vec::with_capacity(PER_THREAD);
                start.wait();
                runtime.block_on(async {
                    for _ in 0..PER_THREAD {
                        let key = common::conformance::fresh_key(None);
                        let fp = common::conformance::fp(1);
                        let Ok(Begin::Execute(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await else {
                            panic!("a fresh key must execute");
                        };
                        let ttl = Duration::from_secs(600);
                        assert!(store.complete(&key, &token, Record::NotRetained, ttl).await.unwrap());
                        mine.push((order.fetch_add(1, Ordering::SeqCst), key));
                        assert!(store.len() <= BOUND + THREADS, "{} entries", store.len());
                    }
                });
                completed.lock().unwrap().extend(mine);
            });
        }
    });
    assert_eq!(store.len(), BOUND);
    let mut completed = completed.into_inner().unwrap();
    completed.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    // The newest records, newest first, are all still there (a key that was evicted would
    // answer `Execute`, not `Mismatch`, to another fingerprint).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    for (rank, (_, key)) in completed.iter().take(BOUND / 2).enumerate() {
        let begin = runtime.block_on(store.begin(key, &common::conformance::fp(2), Duration::from_secs(30))).unwrap();
        assert!(matches!(begin, Begin::Mismatch), "the record completed {rank} before the last was evicted");
    }
}

/// The background sweep is not tied to the runtime that started it: when that runtime ends
/// (and the sweep task with it), the next use of the store on another runtime starts it
/// again, and it frees expired entries there without a request touching their keys.
#[test]
fn the_sweep_restarts_on_the_next_runtime() {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use tower_idempotency::store::{IdempotencyStore, Record, StoredResponse};

    const TTL: Duration = Duration::from_secs(5);
    let every = Duration::from_secs(1);
    let store = MemoryStore::builder().with_cleanup_interval(every).build();
    let record =
        Record::Response(Arc::new(StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"swept"))));
    for round in 0..3 {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let key = common::conformance::fresh_key(None);
            let token = common::conformance::lock(&store, &key, common::conformance::fp(1)).await;
            assert!(store.complete(&key, &token, record.clone(), TTL).await.unwrap());
            assert_eq!(store.len(), 1);
            // No request touches the key again: only the sweep can free it.
            tokio::time::sleep(TTL + every * 2).await;
            assert_eq!(store.len(), 0, "round {round}: the sweep ran on this runtime and freed the record");
            assert_eq!(store.bytes(), 0);
        });
        // The runtime ends here, and the sweep task it was running with it.
        drop(runtime);
    }
}

/// A store that forgets to release: the suite must catch it.
#[derive(Clone, Default)]
struct NeverReleases(MemoryStore);

impl tower_idempotency::store::IdempotencyStore for NeverReleases {
    fn outlives_process(&self) -> bool {
        false
    }

    async fn begin(
        &self,
        key: &tower_idempotency::store::StoreKey,
        fingerprint: &tower_idempotency::store::Fingerprint,
        lease: Duration,
    ) -> Result<tower_idempotency::store::Begin, tower_idempotency::store::StoreError> {
        self.0.begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &tower_idempotency::store::StoreKey,
        lock: &tower_idempotency::store::LockToken,
        record: tower_idempotency::store::Record,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.complete(key, lock, record, ttl).await
    }

    async fn renew(
        &self,
        key: &tower_idempotency::store::StoreKey,
        lock: &tower_idempotency::store::LockToken,
        lease: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        self.0.renew(key, lock, lease).await
    }

    async fn release(
        &self,
        _key: &tower_idempotency::store::StoreKey,
        _lock: &tower_idempotency::store::LockToken,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        Ok(true)
    }
}

impl tower_idempotency::store::LiveLog for NeverReleases {
    async fn publish(
        &self,
        key: &tower_idempotency::store::StoreKey,
        lock: &tower_idempotency::store::LockToken,
        from: u64,
        events: Vec<tower_idempotency::store::LiveEvent>,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.0.publish(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &tower_idempotency::store::StoreKey,
        fingerprint: &tower_idempotency::store::Fingerprint,
        cursor: Option<tower_idempotency::store::LiveCursor>,
        timeout: Duration,
    ) -> Result<tower_idempotency::store::Followed, tower_idempotency::store::StoreError> {
        self.0.follow(key, fingerprint, cursor, timeout).await
    }
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "expected the key to be free")]
async fn the_conformance_suite_catches_a_store_that_never_releases() {
    common::conformance::run(|| async { NeverReleases::default() }, tokio::time::advance).await;
}

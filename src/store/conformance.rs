//! The store conformance suite (feature `conformance`): what every [`IdempotencyStore`] must
//! do, as checks any store crate can run against its own store in its own tests.
//!
//! [`run`] runs every check of the core ([`IdempotencyStore`]), each against a fresh store from
//! `make`, and names the check that failed; [`run_live`] does the same for the live log
//! ([`LiveLog`]), for a store that has one, [`run_inspect`] for the operator's look at one
//! key ([`Inspect`]), and [`run_expired`] for the grace of expired keys
//! ([`complete_with_grace`](IdempotencyStore::complete_with_grace)), for a store that keeps
//! marks. Time-based checks move the store's clock with `advance`: `tokio::time::advance` on
//! paused time for a store that reads `tokio::time::Instant` (like [`MemoryStore`]), a real
//! `tokio::time::sleep` for a store whose clock is a server's (leases and TTLs here are short,
//! so that stays quick). Keys are fresh UUIDs, so parallel tests against one server never
//! collide; give each test run its own key prefix if it shares the server with other data.
//!
//! ```
//! use tower_idempotency::store::{MemoryStore, conformance};
//!
//! // In a store crate: `MyStore::connect(..)` where this says `MemoryStore::new()`.
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! conformance::run(|| async { MemoryStore::new() }, tokio::time::advance).await;
//! // A store with a live log (waiting and joining) runs its checks too.
//! conformance::run_live(|| async { MemoryStore::new() }, tokio::time::advance).await;
//! # }
//! ```
//!
//! Inside a test: `#[tokio::test(start_paused = true)] async fn conforms() { conformance::run(..).await }`.
//! Each check is also public, for a store that needs one on its own (a real cluster, say);
//! [`run`], [`run_live`] and [`run_inspect`] are the ones to call, so that a check added later never skips a
//! store.
//!
//! [`MemoryStore`]: super::MemoryStore

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::{
    IdempotencyKey, Origin, ScopeId, TraceContext,
    store::{
        Begin, Fingerprint, Followed, IdempotencyStore, Inspect, KeyState, LiveCursor, LiveEvent, LiveLog, LockToken,
        Purged, Record, StoreKey, StoredResponse,
    },
};

/// Lease used by the suite: short enough for real-time stores.
pub const LEASE: Duration = Duration::from_millis(400);
/// TTL used by the suite.
pub const TTL: Duration = Duration::from_millis(800);

/// A key no other test (or parallel run) uses.
pub fn fresh_key(scope: Option<ScopeId>) -> StoreKey {
    let key = IdempotencyKey::parse(uuid::Uuid::new_v4().to_string().as_bytes()).unwrap();
    StoreKey::new(scope, key)
}

/// A fingerprint made of `n` repeated.
pub fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A `201` response with a few headers (one repeated) and `body`.
pub fn response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-multi", HeaderValue::from_static("one"));
    headers.append("x-multi", HeaderValue::from_static("two"));
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(body))
}

/// [`response`] as a record.
pub fn record(body: &'static [u8]) -> Record {
    Record::Response(Arc::new(response(body)))
}

/// Locks the free `key` for `fingerprint`, with the suite's lease; panics if it is not free.
pub async fn lock<S: IdempotencyStore>(store: &S, key: &StoreKey, fingerprint: Fingerprint) -> LockToken {
    match store.begin(key, &fingerprint, LEASE).await.unwrap() {
        Begin::Execute(token) => token,
        other => panic!("expected the key to be free, got {other:?}"),
    }
}

/// `begin` with the suite's lease, unwrapped.
pub async fn begin<S: IdempotencyStore>(store: &S, key: &StoreKey, fingerprint: Fingerprint) -> Begin {
    store.begin(key, &fingerprint, LEASE).await.unwrap()
}

/// A free key is locked; then the same request is in flight and another one a mismatch.
pub async fn free_key_is_locked_then_in_flight<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    assert_eq!(token.fingerprint(), &fp(1));
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked));
    assert!(matches!(begin(&store, &key, fp(2)).await, Begin::Mismatch));
}

/// A completed record comes back byte for byte: status, repeated headers, binary body,
/// trailers, and its origin (completion time, trace contexts).
pub async fn completed_record_is_returned_intact<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    let mut stored = response(b"\x00\xffbinary \"body\"\n");
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    stored.trailers = Some(trailers);
    let origin = Origin {
        completed_at: Some(UNIX_EPOCH + Duration::from_millis(1_796_000_000_123)),
        caller: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        span: TraceContext::new([0xab; 16], [0xcd; 8], 1),
    };
    stored = stored.with_origin(origin);
    assert!(store.complete(&key, &token, Record::Response(Arc::new(stored.clone())), TTL).await.unwrap());
    match begin(&store, &key, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(*got, stored),
        other => panic!("expected the record, got {other:?}"),
    }
    assert!(matches!(begin(&store, &key, fp(2)).await, Begin::Mismatch));
}

/// A record with an empty body and no headers comes back as it was.
pub async fn empty_body_round_trips<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    let stored = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
    assert!(store.complete(&key, &token, Record::Response(Arc::new(stored.clone())), TTL).await.unwrap());
    match begin(&store, &key, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(*got, stored),
        other => panic!("expected the record, got {other:?}"),
    }
}

/// A not-retained record is kept and answered for its fingerprint only.
pub async fn not_retained_is_kept<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    assert!(store.complete(&key, &token, Record::NotRetained, TTL).await.unwrap());
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Completed(Record::NotRetained)));
    assert!(matches!(begin(&store, &key, fp(2)).await, Begin::Mismatch));
}

/// A released key executes again; releasing twice changes nothing.
pub async fn release_frees_the_key<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let first = lock(&store, &key, fp(1)).await;
    assert!(store.release(&key, &first).await.unwrap());
    // Released: the next request executes, even one with another payload.
    let second = lock(&store, &key, fp(2)).await;
    assert_ne!(first, second);
    // Releasing twice, or with the old token, changes nothing.
    assert!(!store.release(&key, &first).await.unwrap());
    assert!(matches!(begin(&store, &key, fp(2)).await, Begin::Locked));
}

/// Only the lock's owner completes, renews or releases it; a completed record is final.
pub async fn only_the_owner_writes<S: IdempotencyStore>(store: S) {
    let key = fresh_key(None);
    let other_key = fresh_key(None);
    let owner = lock(&store, &key, fp(1)).await;
    let stranger = lock(&store, &other_key, fp(1)).await;
    assert!(!store.complete(&key, &stranger, record(b"forged"), TTL).await.unwrap());
    assert!(!store.renew(&key, &stranger, LEASE).await.unwrap());
    assert!(!store.release(&key, &stranger).await.unwrap());
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked));
    assert!(store.complete(&key, &owner, record(b"real"), TTL).await.unwrap());
    // Once completed, no token can rewrite or remove the record.
    assert!(!store.complete(&key, &owner, record(b"again"), TTL).await.unwrap());
    assert!(!store.release(&key, &owner).await.unwrap());
    assert!(!store.renew(&key, &owner, LEASE).await.unwrap());
    match begin(&store, &key, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(got.body, Bytes::from_static(b"real")),
        other => panic!("expected the owner's record, got {other:?}"),
    }
}

/// The same key in another scope, or in none, is another key.
pub async fn scopes_are_separate<S: IdempotencyStore>(store: S) {
    let unscoped = fresh_key(None);
    let tenant_a = StoreKey::new(Some(ScopeId::digest("tenant-a")), unscoped.key().clone());
    let tenant_b = StoreKey::new(Some(ScopeId::digest("tenant-b")), unscoped.key().clone());
    let token = lock(&store, &tenant_a, fp(1)).await;
    assert!(store.complete(&tenant_a, &token, record(b"a"), TTL).await.unwrap());
    // The same key in another scope (or none) is a different key.
    lock(&store, &tenant_b, fp(1)).await;
    lock(&store, &unscoped, fp(1)).await;
}

/// A lock nobody renews frees after one lease, and its old owner's writes change nothing.
pub async fn abandoned_lock_is_free_after_one_lease<F, Fut, S>(store: S, advance: &F)
where
    S: IdempotencyStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = fresh_key(None);
    let stale = lock(&store, &key, fp(1)).await;
    advance(LEASE / 2).await;
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked));
    advance(LEASE).await;
    // The owner vanished without renewing: the key is free again.
    let fresh = lock(&store, &key, fp(1)).await;
    assert_ne!(stale, fresh);
    // The stale owner's late writes change nothing.
    assert!(!store.renew(&key, &stale, LEASE).await.unwrap());
    assert!(!store.complete(&key, &stale, record(b"stale"), TTL).await.unwrap());
    assert!(!store.release(&key, &stale).await.unwrap());
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked));
    assert!(store.complete(&key, &fresh, record(b"fresh"), TTL).await.unwrap());
    match begin(&store, &key, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(got.body, Bytes::from_static(b"fresh")),
        other => panic!("expected the new owner's record, got {other:?}"),
    }
}

/// A lock whose lease expired is never written by its old owner, even when no other request
/// took the key over since: `complete`, `renew` and `release` all return `Ok(false)` and
/// change nothing, so the key is free (expired counts as absent for every operation).
pub async fn expired_lock_is_never_written_by_its_old_owner<F, Fut, S>(store: S, advance: &F)
where
    S: IdempotencyStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    // One key per operation, so that a write wrongly let through by one cannot hide another.
    let completed = fresh_key(None);
    let renewed = fresh_key(None);
    let released = fresh_key(None);
    let on_completed = lock(&store, &completed, fp(1)).await;
    let on_renewed = lock(&store, &renewed, fp(1)).await;
    let on_released = lock(&store, &released, fp(1)).await;
    advance(LEASE + LEASE / 2).await;
    // Nobody took the keys over: the expired locks are still the last thing written.
    assert!(
        !store.complete(&completed, &on_completed, record(b"late"), TTL).await.unwrap(),
        "an expired lock's old owner cannot complete it"
    );
    assert!(!store.renew(&renewed, &on_renewed, LEASE).await.unwrap(), "an expired lock cannot be renewed");
    assert!(!store.release(&released, &on_released).await.unwrap(), "an expired lock cannot be released");
    // Nothing was written: no record, no extended lease; each key is free for a new request.
    for (key, old) in [(&completed, on_completed), (&renewed, on_renewed), (&released, on_released)] {
        let fresh = lock(&store, key, fp(1)).await;
        assert_ne!(fresh, old);
        // Taken over, it is still not the old owner's to write.
        assert!(!store.complete(key, &old, record(b"late"), TTL).await.unwrap());
        assert!(!store.renew(key, &old, LEASE).await.unwrap());
        assert!(!store.release(key, &old).await.unwrap());
        assert!(matches!(begin(&store, key, fp(1)).await, Begin::Locked));
    }
}

/// Renewing keeps a lock well past its first lease.
pub async fn renewal_keeps_the_lock<F, Fut, S>(store: S, advance: &F)
where
    S: IdempotencyStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    for _ in 0..4 {
        advance(LEASE * 2 / 3).await;
        assert!(store.renew(&key, &token, LEASE).await.unwrap());
    }
    // Four lease-thirds past the original lease, still held.
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked));
    assert!(store.complete(&key, &token, record(b"slow"), TTL).await.unwrap());
}

/// A record expires after its TTL and the key is free again.
pub async fn record_expires_after_ttl<F, Fut, S>(store: S, advance: &F)
where
    S: IdempotencyStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
    advance(TTL / 2).await;
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Completed(_)));
    advance(TTL).await;
    // Expired: the key is free, for any payload.
    lock(&store, &key, fp(2)).await;
}

/// A record completed with a grace is replayed for its TTL, then told apart as expired
/// ([`Begin::Expired`], for any fingerprint, locking nothing) for the grace, then the key is
/// free; a record completed without one is free at its TTL.
pub async fn expired_key_is_told_apart_for_its_grace<F, Fut, S>(store: S, advance: &F)
where
    S: IdempotencyStore,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    let stale = lock(&store, &fresh_key(None), fp(1)).await;
    assert!(!store.complete_with_grace(&key, &stale, record(b"y"), TTL, TTL).await.unwrap(), "fenced as complete");
    assert!(store.complete_with_grace(&key, &token, record(b"x"), TTL, TTL * 2).await.unwrap());
    advance(TTL / 2).await;
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Completed(_)));
    advance(TTL).await;
    // 1.5 TTL: past the TTL, within the grace (until 3 TTL).
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Expired));
    assert!(matches!(begin(&store, &key, fp(2)).await, Begin::Expired), "whatever the fingerprint");
    advance(TTL).await;
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Expired), "a begin locked nothing");
    advance(TTL).await;
    // 3.5 TTL: past the grace, the key is free.
    lock(&store, &key, fp(2)).await;
}

/// `n` tasks begin `key` at once, spread round-robin over `replicas` (stores sharing one
/// backend): asserts that exactly one executes and every other one sees it in flight, and
/// returns the winner's replica index and lock.
pub async fn race_begins<S: IdempotencyStore>(
    replicas: &[Arc<S>],
    key: &StoreKey,
    n: usize,
    lease: Duration,
) -> (usize, LockToken) {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let replica = i % replicas.len();
            let (store, key, barrier) = (replicas[replica].clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                (replica, store.begin(&key, &fp(1), lease).await.unwrap())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (replica, Begin::Execute(token)) => winners.push((replica, token)),
            (_, Begin::Locked) => {}
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of {n} concurrent begins executes");
    winners.remove(0)
}

/// Many tasks begin the same key at once: exactly one executes, the rest see it in flight.
pub async fn concurrent_begins_lock_once<S: IdempotencyStore>(store: S) {
    let store = [Arc::new(store)];
    for _round in 0..20 {
        race_begins(&store, &fresh_key(None), 64, LEASE * 10).await;
    }
}

/// A head event like [`response`]'s, of a request that came without a trace context.
pub fn live_head() -> LiveEvent {
    let response = response(b"");
    LiveEvent::Head { status: response.status(), headers: response.headers().clone(), origin: Origin::default() }
}

/// [`live_head`] with the origin of the request in flight: its caller's `traceparent` and the
/// span it runs in (no completion time yet).
pub fn live_head_with_origin() -> LiveEvent {
    let response = response(b"");
    let origin = Origin {
        completed_at: None,
        caller: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        span: TraceContext::new([0xab; 16], [0xcd; 8], 1),
    };
    LiveEvent::Head { status: response.status(), headers: response.headers().clone(), origin }
}

/// `follow` unwrapped, with a timeout of `timeout`.
pub async fn follow<S: LiveLog>(
    store: &S,
    key: &StoreKey,
    fingerprint: Fingerprint,
    cursor: Option<LiveCursor>,
    timeout: Duration,
) -> Followed {
    store.follow(key, &fingerprint, cursor, timeout).await.unwrap()
}

/// Follows until an event or the end arrives (a wait that times out first is asked again, up
/// to `tries` times).
async fn follow_until_news<S: LiveLog>(
    store: &S,
    key: &StoreKey,
    cursor: Option<LiveCursor>,
    tries: usize,
) -> Followed {
    let mut cursor = cursor;
    for _ in 0..tries {
        match follow(store, key, fp(1), cursor, LEASE / 4).await {
            Followed::Live { events, cursor: next } if events.is_empty() => cursor = Some(next),
            news => return news,
        }
    }
    panic!("nothing new after {tries} follows")
}

/// What a lock publishes is followed in order, from a cursor, each index once; a follower at
/// the end of the log gets nothing new once its wait times out.
pub async fn published_events_are_followed<S: LiveLog>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    let Followed::Live { events, cursor } = follow(&store, &key, fp(1), None, Duration::from_millis(20)).await else {
        panic!("a live lock has a live log");
    };
    assert!(events.is_empty(), "nothing published yet: {events:?}");
    assert_eq!(cursor, LiveCursor::new(token.id(), 0));

    let data = |bytes: &'static [u8]| LiveEvent::Data(Bytes::from_static(bytes));
    let binary = data(b"\x00\xff\r\n\"event\"");
    store.publish(&key, &token, 0, vec![live_head(), binary.clone()]).await.unwrap();
    let Followed::Live { events, cursor } = follow(&store, &key, fp(1), Some(cursor), LEASE).await else {
        panic!("the lock is live");
    };
    assert_eq!(events, vec![live_head(), binary.clone()], "the head with repeated headers, binary data");
    assert_eq!(cursor.read(), 2);

    // Index 1 again (a publish sent twice) is kept once; what follows it is new.
    let end = LiveEvent::EventEnd(Bytes::from_static(b"evt-7"));
    store.publish(&key, &token, 1, vec![binary.clone(), data(b"more"), end.clone()]).await.unwrap();
    let Followed::Live { events, cursor: after } = follow(&store, &key, fp(1), Some(cursor), LEASE).await else {
        panic!("the lock is live");
    };
    assert_eq!(events, vec![data(b"more"), end.clone()]);
    assert_eq!(after.read(), 4);

    // From the start, the whole log.
    let Followed::Live { events, .. } = follow(&store, &key, fp(1), None, LEASE).await else { panic!("live") };
    assert_eq!(events, vec![live_head(), binary, data(b"more"), end]);

    // At the end of the log, the wait times out with nothing.
    let Followed::Live { events, cursor: same } =
        follow(&store, &key, fp(1), Some(after), Duration::from_millis(20)).await
    else {
        panic!("the lock is live");
    };
    assert!(events.is_empty());
    assert_eq!(same, after);
    // Another fingerprint has no log here.
    assert_eq!(follow(&store, &key, fp(2), None, LEASE).await, Followed::Ended { completed: false });
}

/// A head comes back with the origin of the request in flight (the trace a joined request
/// links to), and one without it as it was published.
pub async fn a_head_keeps_the_origin_of_the_request_in_flight<S: LiveLog>(store: S) {
    for head in [live_head_with_origin(), live_head()] {
        let key = fresh_key(None);
        let token = lock(&store, &key, fp(1)).await;
        store.publish(&key, &token, 0, vec![head.clone()]).await.unwrap();
        let Followed::Live { events, .. } = follow(&store, &key, fp(1), None, LEASE).await else {
            panic!("the lock is live");
        };
        assert_eq!(events, vec![head]);
    }
}

/// A follower waiting at the end of the log is woken by a publish, well before its timeout.
pub async fn publish_wakes_a_follower<S, A, F>(store: S, advance: &A)
where
    S: LiveLog,
    A: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    let store = Arc::new(store);
    let key = fresh_key(None);
    let token = lock(&*store, &key, fp(1)).await;
    let follower = {
        let (store, key) = (store.clone(), key.clone());
        // A timeout far past the lease: only a wake-up returns an event.
        tokio::spawn(async move { follow(&*store, &key, fp(1), None, Duration::from_secs(60)).await })
    };
    advance(Duration::from_millis(50)).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    match follower.await.unwrap() {
        Followed::Live { events, .. } => assert_eq!(events, vec![live_head()], "woken with the event"),
        other => panic!("expected the event, got {other:?}"),
    }
}

/// `complete` ends the log, waking its followers with `completed`, and the record is there.
pub async fn complete_ends_the_log<S, A, F>(store: S, advance: &A)
where
    S: LiveLog,
    A: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    let store = Arc::new(store);
    let key = fresh_key(None);
    let token = lock(&*store, &key, fp(1)).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    let cursor = LiveCursor::new(token.id(), 1);
    let follower = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { follow(&*store, &key, fp(1), Some(cursor), Duration::from_secs(60)).await })
    };
    advance(Duration::from_millis(50)).await;
    assert!(store.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    assert_eq!(follower.await.unwrap(), Followed::Ended { completed: true });
    assert_eq!(follow(&*store, &key, fp(1), Some(cursor), LEASE).await, Followed::Ended { completed: true });
    assert_eq!(follow(&*store, &key, fp(1), None, LEASE).await, Followed::Ended { completed: true });
    assert!(matches!(begin(&*store, &key, fp(1)).await, Begin::Completed(Record::Response(_))));
    // A publish after the end writes nothing.
    store.publish(&key, &token, 1, vec![LiveEvent::Data(Bytes::from_static(b"late"))]).await.unwrap();
    assert_eq!(follow(&*store, &key, fp(1), None, LEASE).await, Followed::Ended { completed: true });
}

/// `release` ends the log without a record; the log of a later lock on the key is its own, so
/// a follower of the first never reads it, and the first owner cannot write into it.
pub async fn release_ends_the_log<S, A, F>(store: S, advance: &A)
where
    S: LiveLog,
    A: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    let store = Arc::new(store);
    let key = fresh_key(None);
    let first = lock(&*store, &key, fp(1)).await;
    let cursor = LiveCursor::new(first.id(), 0);
    let follower = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { follow(&*store, &key, fp(1), Some(cursor), Duration::from_secs(60)).await })
    };
    advance(Duration::from_millis(50)).await;
    assert!(store.release(&key, &first).await.unwrap());
    assert_eq!(follower.await.unwrap(), Followed::Ended { completed: false });

    let second = lock(&*store, &key, fp(1)).await;
    assert_eq!(follow(&*store, &key, fp(1), Some(cursor), LEASE).await, Followed::Ended { completed: false });
    store.publish(&key, &first, 0, vec![live_head()]).await.unwrap();
    let Followed::Live { events, cursor } = follow(&*store, &key, fp(1), None, Duration::from_millis(20)).await else {
        panic!("the second lock is live");
    };
    assert!(events.is_empty(), "the old owner wrote into the new lock's log: {events:?}");
    assert_eq!(cursor.lock(), second.id());
}

/// A lock whose lease runs out unreleased ends its log: its followers learn it within a lease.
pub async fn expired_lock_ends_the_log<S, A, F>(store: S, advance: &A)
where
    S: LiveLog,
    A: Fn(Duration) -> F,
    F: Future<Output = ()>,
{
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    let cursor = LiveCursor::new(token.id(), 1);
    advance(LEASE + LEASE / 2).await;
    assert_eq!(follow_until_news(&store, &key, Some(cursor), 4).await, Followed::Ended { completed: false });
    assert_eq!(follow(&store, &key, fp(1), None, LEASE).await, Followed::Ended { completed: false });
}

/// `inspect` unwrapped.
pub async fn inspect<S: Inspect>(store: &S, key: &StoreKey) -> KeyState {
    store.inspect(key).await.unwrap()
}

/// `purge` unwrapped.
pub async fn purge<S: Inspect>(store: &S, key: &StoreKey) -> Purged {
    store.purge(key).await.unwrap()
}

/// Asserts that `at` lies within `slack` of `expected` (times a store converts from its own
/// clock, or from a remaining duration, to this process's).
fn assert_near(at: SystemTime, expected: SystemTime, slack: Duration, what: &str) {
    let off = at.duration_since(expected).or_else(|early| Ok::<_, ()>(early.duration())).unwrap();
    assert!(off <= slack, "{what}: {at:?} is {off:?} away from {expected:?}");
}

/// How far a time an inspection reports may be from the one expected: stores that convert a
/// remaining duration read their clock a little after the store did.
const SLACK: Duration = Duration::from_millis(250);

/// A key nobody used is unknown, and purging it removes nothing.
pub async fn unknown_key_is_unknown<S: Inspect>(store: S) {
    let key = fresh_key(None);
    assert_eq!(inspect(&store, &key).await, KeyState::Unknown);
    assert_eq!(purge(&store, &key).await, Purged::Unknown);
    // Purging wrote nothing: the key is free.
    lock(&store, &key, fp(1)).await;
}

/// A key in flight says since when (the token's time) and until when its lease runs; purging
/// it is refused and changes nothing: the owner still completes, and its record is then
/// what the key holds.
pub async fn in_flight_key_is_shown_and_kept<S: Inspect>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    let KeyState::Locked(in_flight) = inspect(&store, &key).await else { panic!("the key is in flight") };
    let since = token.since().expect("a new token holds its time");
    assert_eq!(in_flight.since(), Some(since));
    assert_near(since, SystemTime::now(), SLACK, "since");
    assert_near(in_flight.lease_until(), SystemTime::now() + LEASE, SLACK, "lease until");
    assert_eq!(purge(&store, &key).await, Purged::Locked);
    assert!(matches!(begin(&store, &key, fp(1)).await, Begin::Locked), "a refused purge leaves the lock");
    assert!(store.renew(&key, &token, LEASE).await.unwrap());
    assert!(store.complete(&key, &token, record(b"done"), TTL).await.unwrap(), "the owner still completes");
    assert!(matches!(inspect(&store, &key).await, KeyState::Completed(_)));
}

/// A completed key shows its record (status, size, completion time) and until when it is
/// kept; purged, it is unknown and the next request executes. Another scope's key is apart.
pub async fn completed_key_is_shown_and_purged<S: Inspect>(store: S) {
    let key = fresh_key(Some(ScopeId::digest("tenant-a")));
    let other_scope = StoreKey::new(Some(ScopeId::digest("tenant-b")), key.key().clone());
    let token = lock(&store, &key, fp(1)).await;
    let origin = Origin {
        completed_at: Some(UNIX_EPOCH + Duration::from_millis(1_796_000_000_123)),
        caller: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ..Origin::default()
    };
    let stored = response(b"{\"charged\":true}").with_origin(origin);
    assert!(store.complete(&key, &token, Record::Response(Arc::new(stored.clone())), TTL).await.unwrap());
    let KeyState::Completed(completed) = inspect(&store, &key).await else { panic!("the key is completed") };
    assert!(completed.is_retained());
    assert_eq!(completed.status(), Some(StatusCode::CREATED));
    assert_eq!(completed.size(), Some(stored.body().len()));
    assert_eq!(completed.completed_at(), origin.completed_at);
    assert_eq!(completed.origin(), Some(&origin));
    assert_eq!(completed.trace_id(), Some(*b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36"));
    assert_near(completed.expires_at(), SystemTime::now() + TTL, SLACK, "expires at");
    assert!(matches!(completed.record(), Record::Response(got) if **got == stored), "the record, intact");
    assert_eq!(inspect(&store, &other_scope).await, KeyState::Unknown, "scopes are apart");
    assert_eq!(purge(&store, &other_scope).await, Purged::Unknown);

    assert_eq!(purge(&store, &key).await, Purged::Removed);
    assert_eq!(inspect(&store, &key).await, KeyState::Unknown);
    assert_eq!(purge(&store, &key).await, Purged::Unknown, "purged once");
    // The next request executes, even with another payload.
    lock(&store, &key, fp(2)).await;
}

/// A not-retained record is shown as completed without a response, and purged like any
/// record; a record made without an origin (before records kept one) shows none.
pub async fn not_retained_and_untimed_records_are_shown<S: Inspect>(store: S) {
    let key = fresh_key(None);
    let token = lock(&store, &key, fp(1)).await;
    assert!(store.complete(&key, &token, Record::NotRetained, TTL).await.unwrap());
    let KeyState::Completed(completed) = inspect(&store, &key).await else { panic!("the key is completed") };
    assert!(!completed.is_retained());
    assert_eq!((completed.status(), completed.size(), completed.completed_at()), (None, None, None));
    assert_eq!(purge(&store, &key).await, Purged::Removed);
    lock(&store, &key, fp(1)).await;

    let untimed = fresh_key(None);
    let token = lock(&store, &untimed, fp(1)).await;
    assert!(store.complete(&untimed, &token, record(b""), TTL).await.unwrap());
    let KeyState::Completed(completed) = inspect(&store, &untimed).await else { panic!("the key is completed") };
    assert_eq!(
        (completed.status(), completed.size(), completed.completed_at()),
        (Some(StatusCode::CREATED), Some(0), None)
    );
    assert_eq!(completed.trace_id(), None);
}

/// An expired lock or record is unknown, as it is for `begin`, and purging it removes no
/// record.
pub async fn expired_keys_are_unknown<F, Fut, S>(store: S, advance: &F)
where
    S: Inspect,
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let (locked, completed) = (fresh_key(None), fresh_key(None));
    lock(&store, &locked, fp(1)).await;
    let token = lock(&store, &completed, fp(1)).await;
    assert!(store.complete(&completed, &token, record(b"x"), LEASE).await.unwrap());
    advance(LEASE + LEASE / 2).await;
    for key in [&locked, &completed] {
        assert_eq!(inspect(&store, key).await, KeyState::Unknown);
        assert_eq!(purge(&store, key).await, Purged::Unknown);
        lock(&store, key, fp(2)).await;
    }
}

/// `purge` races the owner's `complete`: the purge is refused (the record then stays), or
/// it removes the record just written; never does it remove the lock.
pub async fn purge_never_removes_a_lock_racing_its_completion<S: Inspect>(store: S) {
    let store = Arc::new(store);
    let (mut refused, mut removed) = (0, 0);
    for _round in 0..40 {
        let key = fresh_key(None);
        let token = lock(&*store, &key, fp(1)).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let owner = {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.complete(&key, &token, record(b"raced"), TTL).await.unwrap()
            })
        };
        let operator = {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                purge(&*store, &key).await
            })
        };
        assert!(owner.await.unwrap(), "a purge never takes the lock from its owner");
        match operator.await.unwrap() {
            Purged::Locked => {
                refused += 1;
                assert!(matches!(inspect(&*store, &key).await, KeyState::Completed(_)));
            }
            Purged::Removed => {
                removed += 1;
                assert_eq!(inspect(&*store, &key).await, KeyState::Unknown);
            }
            Purged::Unknown => panic!("the key held a lock or a record throughout"),
        }
    }
    assert_eq!(refused + removed, 40);
}

/// Names the check being run in the panic output when it fails.
struct Running(&'static str);

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("store conformance check `{}` failed", self.0);
        }
    }
}

/// Runs each named check against a fresh store, naming the one that fails.
macro_rules! checks {
    ($make:ident, $advance_fn:ident, $($check:ident $(($advance:ident))?),* $(,)?) => {$(
        let running = Running(stringify!($check));
        $check($make().await $(, &$advance)?).await;
        drop(running);
    )*};
}

/// Runs every check of the core suite (what [`IdempotencyStore`] promises), each against a
/// fresh store from `make`; `advance` moves the store's clock (see the [module docs](self)).
/// Panics, naming the check, at the first failure.
pub async fn run<S, M, MakeFut, A, AdvanceFut>(make: M, advance: A)
where
    S: IdempotencyStore,
    M: Fn() -> MakeFut,
    MakeFut: Future<Output = S>,
    A: Fn(Duration) -> AdvanceFut,
    AdvanceFut: Future<Output = ()>,
{
    checks!(
        make,
        advance,
        free_key_is_locked_then_in_flight,
        completed_record_is_returned_intact,
        empty_body_round_trips,
        not_retained_is_kept,
        release_frees_the_key,
        only_the_owner_writes,
        scopes_are_separate,
        abandoned_lock_is_free_after_one_lease(advance),
        expired_lock_is_never_written_by_its_old_owner(advance),
        renewal_keeps_the_lock(advance),
        record_expires_after_ttl(advance),
        concurrent_begins_lock_once,
    );
}

/// Runs the checks of the grace for expired keys
/// ([`complete_with_grace`](IdempotencyStore::complete_with_grace)), for a store that keeps
/// marks, as [`run`] does for the core.
pub async fn run_expired<S, M, MakeFut, A, AdvanceFut>(make: M, advance: A)
where
    S: IdempotencyStore,
    M: Fn() -> MakeFut,
    MakeFut: Future<Output = S>,
    A: Fn(Duration) -> AdvanceFut,
    AdvanceFut: Future<Output = ()>,
{
    checks!(make, advance, expired_key_is_told_apart_for_its_grace(advance),);
}

/// Runs every check of the operator's look at one key ([`Inspect`]), for a store that has it,
/// as [`run`] does for the core.
pub async fn run_inspect<S, M, MakeFut, A, AdvanceFut>(make: M, advance: A)
where
    S: Inspect,
    M: Fn() -> MakeFut,
    MakeFut: Future<Output = S>,
    A: Fn(Duration) -> AdvanceFut,
    AdvanceFut: Future<Output = ()>,
{
    checks!(
        make,
        advance,
        unknown_key_is_unknown,
        in_flight_key_is_shown_and_kept,
        completed_key_is_shown_and_purged,
        not_retained_and_untimed_records_are_shown,
        expired_keys_are_unknown(advance),
        purge_never_removes_a_lock_racing_its_completion,
    );
}

/// Runs every check of the live log ([`LiveLog`]), for a store that has one, as [`run`] does
/// for the core. A store with a live log runs both.
pub async fn run_live<S, M, MakeFut, A, AdvanceFut>(make: M, advance: A)
where
    S: LiveLog,
    M: Fn() -> MakeFut,
    MakeFut: Future<Output = S>,
    A: Fn(Duration) -> AdvanceFut,
    AdvanceFut: Future<Output = ()>,
{
    checks!(
        make,
        advance,
        published_events_are_followed,
        a_head_keeps_the_origin_of_the_request_in_flight,
        publish_wakes_a_follower(advance),
        complete_ends_the_log(advance),
        release_ends_the_log(advance),
        expired_lock_ends_the_log(advance),
    );
}

//! `RedisStore` against the shared store conformance suite, plus what only Redis can show:
//! server-side expiry, the documented key and value layouts, replicas racing on one key, and
//! failure (Redis unreachable, silent, killed, down then back).
//!
//! Needs a Redis: `REDIS_URL`, or `redis://127.0.0.1:6379` when it answers (see
//! `common::redis` for the skip policy). Each run uses its own key prefix.
#![cfg(feature = "redis")]

use crate::common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    conformance::{self, LEASE, TTL, fp, fresh_key, lock, race_begins, record, response},
    redis::{Proxy, closed_port, exists, pttl, raw, raw_get, raw_key, redis_url, run_prefix, store, tcp_addr},
};
use tokio::{net::TcpListener, task::JoinSet};
use tower_idempotency::{
    ScopeId,
    store::{
        Begin, IdempotencyStore, Record, RedisStore, StoreError, StoreKey,
        redis::{
            self, AsyncCommands, IntoConnectionInfo,
            aio::{ConnectionManager, ConnectionManagerConfig},
        },
    },
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_passes_the_conformance_suite() {
    let Some(url) = redis_url().await else { return };
    conformance::run(|| store(&url), tokio::time::sleep).await;
    conformance::run_live(|| store(&url), tokio::time::sleep).await;
    conformance::run_expired(|| store(&url), tokio::time::sleep).await;
    conformance::run_inspect(|| store(&url), tokio::time::sleep).await;
}

/// The URL of the Redis under test, or return from the test (skipped).
macro_rules! redis_or_skip {
    () => {
        match redis_url().await {
            Some(url) => url,
            None => return,
        }
    };
}

fn token_id(value: &[u8]) -> u128 {
    u128::from_be_bytes(value[33..49].try_into().unwrap())
}

#[tokio::test]
async fn key_and_value_layout_are_as_documented() {
    let url = redis_or_skip!();
    let store = store(&url).await;
    let mut conn = raw(&url).await;
    let unscoped = fresh_key(None);
    let scoped = StoreKey::new(Some(ScopeId::digest("tenant")), unscoped.key().clone());

    // A lock: 'L', fingerprint, token id (big-endian), nothing else.
    let token = lock(&store, &scoped, fp(1)).await;
    let value = raw_get(&mut conn, &scoped).await.expect("the lock is at {prefix}{scope hex}:{key}");
    assert_eq!(value.len(), 49);
    assert_eq!(value[0], b'L');
    assert_eq!(&value[1..33], fp(1).as_bytes());
    assert_eq!(token_id(&value), token.id());
    assert!(!exists(&mut conn, &unscoped).await, "the unscoped key is another Redis key");

    // A response: 'R', fingerprint, status, headers... and the body verbatim at the end.
    let body = b"{\"id\":\"ord_1\",\"note\":\"\\u00e9\\n\"}\x00\xff";
    let stored = Record::Response(Arc::new(tower_idempotency::store::StoredResponse::new(
        response(b"").status(),
        response(b"").headers().clone(),
        Bytes::from_static(body),
    )));
    assert!(store.complete(&scoped, &token, stored, TTL).await.unwrap());
    let value = raw_get(&mut conn, &scoped).await.unwrap();
    assert_eq!(value[0], b'R');
    assert_eq!(&value[1..33], fp(1).as_bytes());
    assert_eq!(&value[33..35], &201u16.to_be_bytes());
    assert!(value.ends_with(body), "the body is stored raw, not escaped or encoded");

    // A not-retained record: 'R' replaced by 'T', fingerprint, nothing else; unscoped key is `-`.
    let token = lock(&store, &unscoped, fp(2)).await;
    assert!(raw_get(&mut conn, &unscoped).await.is_some(), "the unscoped lock is at {{prefix}}-:{{key}}");
    assert!(store.complete(&unscoped, &token, Record::NotRetained, TTL).await.unwrap());
    let value = raw_get(&mut conn, &unscoped).await.unwrap();
    assert_eq!(value.len(), 33);
    assert_eq!(value[0], b'T');
    assert_eq!(&value[1..33], fp(2).as_bytes());
    assert!(raw_key(&unscoped).starts_with(run_prefix().as_bytes()));
}

#[tokio::test]
async fn locks_and_records_expire_in_redis_itself() {
    let url = redis_or_skip!();
    let store = store(&url).await;
    let mut conn = raw(&url).await;
    let lease = Duration::from_millis(600);
    let ttl = Duration::from_millis(900);

    // The lease is the lock key's own expiry; renewal resets it.
    let key = fresh_key(None);
    let Begin::Execute(token) = store.begin(&key, &fp(1), lease).await.unwrap() else { panic!("free key") };
    let left = pttl(&mut conn, &key).await;
    assert!((400..=600).contains(&left), "lock PTTL {left}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pttl(&mut conn, &key).await <= 300);
    assert!(store.renew(&key, &token, lease).await.unwrap());
    assert!(pttl(&mut conn, &key).await > 400, "renew sets the lease from now");

    // Completion sets the TTL from completion; replays do not extend it.
    assert!(store.complete(&key, &token, record(b"done"), ttl).await.unwrap());
    let left = pttl(&mut conn, &key).await;
    assert!((700..=900).contains(&left), "record PTTL {left}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(store.begin(&key, &fp(1), lease).await.unwrap(), Begin::Completed(_)));
    assert!(pttl(&mut conn, &key).await <= 600, "a replay does not extend the TTL");

    // Past the TTL the key is gone from Redis: nobody called the store meanwhile.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!exists(&mut conn, &key).await);

    // An abandoned lock is gone from Redis after its lease, untouched.
    let abandoned = fresh_key(None);
    lock(&store, &abandoned, fp(1)).await;
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    assert!(!exists(&mut conn, &abandoned).await);

    // Release deletes the key at once.
    let released = fresh_key(None);
    let token = lock(&store, &released, fp(1)).await;
    assert!(store.release(&released, &token).await.unwrap());
    assert!(!exists(&mut conn, &released).await);
}

#[tokio::test]
async fn stale_owner_cannot_touch_the_new_owners_lock() {
    let url = redis_or_skip!();
    let store = store(&url).await;
    let mut conn = raw(&url).await;
    let key = fresh_key(None);
    let lease = Duration::from_millis(200);
    let Begin::Execute(stale) = store.begin(&key, &fp(1), lease).await.unwrap() else { panic!("free key") };
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let Begin::Execute(fresh) = store.begin(&key, &fp(1), Duration::from_secs(5)).await.unwrap() else {
        panic!("the expired lock is free")
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = pttl(&mut conn, &key).await;

    // The stale owner wakes up and tries every write.
    assert!(!store.renew(&key, &stale, Duration::from_secs(60)).await.unwrap());
    assert!(!store.complete(&key, &stale, record(b"stale"), Duration::from_secs(60)).await.unwrap());
    assert!(!store.release(&key, &stale).await.unwrap());

    // Nothing changed: same value (the new owner's token), no longer expiry.
    let value = raw_get(&mut conn, &key).await.unwrap();
    assert_eq!((value[0], token_id(&value)), (b'L', fresh.id()));
    assert!(pttl(&mut conn, &key).await <= before);
    assert!(store.complete(&key, &fresh, record(b"fresh"), TTL).await.unwrap());
}

#[tokio::test]
async fn a_crashed_replicas_lock_is_free_after_one_lease() {
    let url = redis_or_skip!();
    let replica_b = store(&url).await;
    let key = fresh_key(None);
    let lease = Duration::from_millis(600);
    let started = Instant::now();
    {
        // Replica A takes the lock and dies without releasing or renewing it.
        let replica_a = store(&url).await;
        assert!(matches!(replica_a.begin(&key, &fp(1), lease).await.unwrap(), Begin::Execute(_)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(replica_b.begin(&key, &fp(1), lease).await.unwrap(), Begin::Locked));
    assert!(matches!(replica_b.begin(&key, &fp(2), lease).await.unwrap(), Begin::Mismatch));
    tokio::time::sleep(lease.saturating_sub(started.elapsed()) + Duration::from_millis(50)).await;
    assert!(matches!(replica_b.begin(&key, &fp(1), lease).await.unwrap(), Begin::Execute(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_on_one_key_execute_once() {
    let url = redis_or_skip!();
    // Two stores, two connections: two replicas of a service.
    let replicas = [Arc::new(store(&url).await), Arc::new(store(&url).await)];
    for _round in 0..5 {
        let key = fresh_key(Some(ScopeId::digest("tenant")));
        let (winner, token) = race_begins(&replicas, &key, 200, Duration::from_secs(5)).await;
        assert!(replicas[winner].complete(&key, &token, record(b"once"), TTL).await.unwrap());
        for replica in &replicas {
            match replica.begin(&key, &fp(1), LEASE).await.unwrap() {
                Begin::Completed(Record::Response(got)) => assert_eq!(got.body(), &Bytes::from_static(b"once")),
                other => panic!("expected the record, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_record_completed_on_one_replica_replays_on_the_other() {
    let url = redis_or_skip!();
    let (replica_a, replica_b) = (store(&url).await, store(&url).await);
    let key = fresh_key(Some(ScopeId::digest("tenant")));
    let token = lock(&replica_a, &key, fp(1)).await;
    assert!(matches!(replica_b.begin(&key, &fp(1), LEASE).await.unwrap(), Begin::Locked));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let stored = response(b"\x00{\"id\":\"ord_1\"}\xff").with_trailers(trailers);
    assert!(replica_a.complete(&key, &token, Record::Response(Arc::new(stored.clone())), TTL).await.unwrap());
    match replica_b.begin(&key, &fp(1), LEASE).await.unwrap() {
        Begin::Completed(Record::Response(got)) => assert_eq!(*got, stored),
        other => panic!("expected the record, got {other:?}"),
    }
    assert!(matches!(replica_b.begin(&key, &fp(2), LEASE).await.unwrap(), Begin::Mismatch));
}

#[tokio::test]
async fn unreadable_values_are_reported_and_left_alone() {
    let url = redis_or_skip!();
    let store = store(&url).await;
    let mut conn = raw(&url).await;
    let expire = |key: &StoreKey| (raw_key(key), 5_000_u64);

    // Not a value this crate wrote: corrupt, and not overwritten by a lock.
    let foreign = fresh_key(None);
    let (raw_foreign, ms) = expire(&foreign);
    let _: () = conn.pset_ex(&raw_foreign, "someone else's value", ms).await.unwrap();
    let error = store.begin(&foreign, &fp(1), LEASE).await.unwrap_err();
    assert!(error.is_corrupt(), "{error:?}");
    assert_eq!(raw_get(&mut conn, &foreign).await.unwrap(), b"someone else's value");

    // A response record cut short: corrupt.
    let truncated = fresh_key(None);
    let token = lock(&store, &truncated, fp(1)).await;
    assert!(store.complete(&truncated, &token, record(b"body"), TTL).await.unwrap());
    let (raw_truncated, ms) = expire(&truncated);
    let value = raw_get(&mut conn, &truncated).await.unwrap();
    let _: () = conn.pset_ex(&raw_truncated, &value[..40], ms).await.unwrap();
    assert!(store.begin(&truncated, &fp(1), LEASE).await.unwrap_err().is_corrupt());

    // A key of another type: Redis answers with an error, reported as unavailable.
    let hash = fresh_key(None);
    let (raw_hash, _) = expire(&hash);
    let _: () = conn.hset(&raw_hash, "f", "v").await.unwrap();
    let _: () = conn.pexpire(&raw_hash, 5_000).await.unwrap();
    let error = store.begin(&hash, &fp(1), LEASE).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(std::error::Error::source(&error).is_some_and(|s| s.to_string().contains("WRONGTYPE")), "{error:?}");
}

#[tokio::test]
async fn scripts_lost_by_redis_are_loaded_again() {
    let url = redis_or_skip!();
    let store = store(&url).await;
    let mut conn = raw(&url).await;
    let (released, completed) = (fresh_key(None), fresh_key(None));
    let flush = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            // What a Redis restart or failover does to the script cache. (Other stores
            // sharing this Redis reload them the same way.)
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
        }
    };
    flush(&mut conn).await;
    let token = lock(&store, &released, fp(1)).await;
    flush(&mut conn).await;
    assert!(store.renew(&released, &token, LEASE).await.unwrap());
    flush(&mut conn).await;
    assert!(store.release(&released, &token).await.unwrap());
    let token = lock(&store, &completed, fp(1)).await;
    flush(&mut conn).await;
    assert!(store.complete(&completed, &token, record(b"after a flush"), TTL).await.unwrap());
    flush(&mut conn).await;
    match store.begin(&completed, &fp(1), LEASE).await.unwrap() {
        Begin::Completed(Record::Response(got)) => assert_eq!(got.body(), &Bytes::from_static(b"after a flush")),
        other => panic!("expected the record, got {other:?}"),
    }
}

fn is_store_failure(error: &StoreError) -> bool {
    error.is_unavailable() || error.is_timeout()
}

#[tokio::test]
async fn unreachable_redis_fails_fast() {
    // Needs no Redis: nothing listens there.
    let addr = closed_port().await;
    let url = format!("redis://{addr}");
    let started = Instant::now();
    let connected = RedisStore::builder().connect(url.as_str()).await;
    assert!(connected.is_err());
    assert!(started.elapsed() < Duration::from_secs(1), "connect gave up after {:?}", started.elapsed());

    let store = RedisStore::builder().build(tower_idempotency::store::redis::Client::open(url.as_str()).unwrap());
    let key = fresh_key(None);
    let token = tower_idempotency::store::LockToken::new(fp(1));
    for _ in 0..3 {
        let started = Instant::now();
        let error = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
        assert!(error.is_unavailable(), "a refused connection is unavailable: {error:?}");
        assert!(std::error::Error::source(&error).is_some());
        assert!(is_store_failure(&store.complete(&key, &token, record(b"x"), TTL).await.unwrap_err()));
        assert!(is_store_failure(&store.renew(&key, &token, LEASE).await.unwrap_err()));
        assert!(is_store_failure(&store.release(&key, &token).await.unwrap_err()));
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn a_silent_redis_times_out_at_the_operation_timeout() {
    // Needs no Redis: a server that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(300);
    let url = format!("redis://{addr}");
    let ours = RedisStore::builder()
        .with_operation_timeout(timeout)
        .build(tower_idempotency::store::redis::Client::open(url.as_str()).unwrap());
    // A manager of the caller's that would wait forever: the command timeout still holds.
    let patient = ConnectionManagerConfig::new().set_connection_timeout(None).set_response_timeout(None);
    let manager = ConnectionManager::new_lazy_with_config(redis::Client::open(url).unwrap(), patient).unwrap();
    let theirs = RedisStore::builder().with_operation_timeout(timeout).build(manager);
    let key = fresh_key(None);
    for (store, patient) in [(ours, false), (theirs, true)] {
        for _ in 0..3 {
            let started = Instant::now();
            let error = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
            let took = started.elapsed();
            assert!(error.is_timeout(), "{error:?}");
            assert!(took < timeout * 3, "took {took:?}");
            // The patient manager never ends an attempt: the command timeout ends each
            // operation. Ours ends each attempt a tenth before it, and starts the next at once,
            // so an operation joins one under way: never a failure left from an attempt that
            // ended unobserved, handed over at once.
            let least = if patient { timeout } else { timeout / 4 };
            assert!(took >= least, "took {took:?}");
        }
    }
    silent.abort();
}

#[tokio::test]
async fn after_an_idle_gap_an_operation_still_tries_a_silent_redis() {
    // The manager starts its next connection attempt when an operation sees one fail; idle
    // past that attempt's end, nobody sees it fail, and the manager hands that failure to the
    // next operation at once. The operation tries again instead of failing in microseconds.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(300);
    let store = RedisStore::builder()
        .with_operation_timeout(timeout)
        .build(tower_idempotency::store::redis::Client::open(url.as_str()).unwrap());
    let key = fresh_key(None);
    for _ in 0..3 {
        let started = Instant::now();
        let error = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
        let took = started.elapsed();
        assert!(error.is_timeout(), "{error:?}");
        assert!(took >= timeout / 4 && took < timeout * 3, "took {took:?}");
        // Idle for longer than the attempt the manager has just started.
        tokio::time::sleep(timeout * 2).await;
    }
    silent.abort();
}

#[tokio::test]
async fn a_lazy_store_starts_while_redis_is_down_and_recovers_by_itself() {
    let url = redis_or_skip!();
    let mut proxy = Proxy::down(tcp_addr(&url)).await;
    let through_proxy = proxy.url(&url);
    // Built while Redis is down: no error, no connection yet.
    let store = RedisStore::builder()
        .with_prefix(run_prefix())
        .with_operation_timeout(Duration::from_millis(500))
        .build(redis::Client::open(through_proxy).unwrap());
    let key = fresh_key(None);

    for _ in 0..3 {
        let error = store.begin(&key, &fp(1), LEASE).await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
    }
    // Time passes while Redis is down (background reconnect attempts fail meanwhile).
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.up().await;
    // The first request after Redis is back works: each request tries a fresh connection.
    let token = lock(&store, &key, fp(1)).await;

    proxy.take_down().await;
    let error = store.complete(&key, &token, record(b"x"), TTL).await.unwrap_err();
    assert!(is_store_failure(&error), "{error:?}");
    for _ in 0..3 {
        assert!(is_store_failure(&store.begin(&key, &fp(1), LEASE).await.unwrap_err()));
    }

    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.up().await;
    // Again the first request after Redis is back works.
    assert!(matches!(store.begin(&key, &fp(1), LEASE).await.unwrap(), Begin::Locked));
    assert!(store.complete(&key, &token, record(b"back"), TTL).await.unwrap());
    assert!(matches!(store.begin(&key, &fp(1), LEASE).await.unwrap(), Begin::Completed(_)));
    proxy.take_down().await;
}

#[tokio::test]
async fn a_slow_answer_times_out_and_later_replies_stay_in_order() {
    let url = redis_or_skip!();
    let mut proxy = Proxy::down(tcp_addr(&url)).await;
    proxy.up().await;
    let through_proxy = proxy.url(&url);
    let timeout = Duration::from_millis(300);
    let store = RedisStore::builder()
        .with_prefix(run_prefix())
        .with_operation_timeout(timeout)
        .connect(through_proxy)
        .await
        .unwrap();
    let (done, slow, next) = (fresh_key(None), fresh_key(None), fresh_key(None));
    let token = lock(&store, &done, fp(1)).await;

    // Redis runs the begin, but its answer comes too late.
    proxy.freeze(true);
    let started = Instant::now();
    let error = store.begin(&slow, &fp(1), LEASE).await.unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    assert!(started.elapsed() < timeout * 3, "took {:?}", started.elapsed());
    proxy.freeze(false);

    // The late answer is not taken for the answer to a later command.
    assert!(matches!(store.begin(&next, &fp(2), LEASE).await.unwrap(), Begin::Execute(_)));
    assert!(store.complete(&done, &token, record(b"done"), TTL).await.unwrap());
    assert!(matches!(store.begin(&done, &fp(1), LEASE).await.unwrap(), Begin::Completed(_)));
    // The timed-out begin did lock its key: a retry sees it in flight until the lease ends,
    // never a second execution.
    assert!(matches!(store.begin(&slow, &fp(1), LEASE).await.unwrap(), Begin::Locked));
    proxy.take_down().await;
}

/// The ids of the connections Redis has for `user`.
async fn connections_of(conn: &mut redis::aio::MultiplexedConnection, user: &str) -> Vec<u64> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.unwrap();
    list.lines()
        .filter(|line| line.split(' ').any(|field| field == format!("user={user}")))
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")).map(|id| id.parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_reconnects_by_itself() {
    let url = redis_or_skip!();
    let mut admin = raw(&url).await;
    // A user of its own, so CLIENT KILL USER hits this store's connection and nothing else.
    let user = format!("idem-test-{}", uuid::Uuid::new_v4().simple());
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", ">pw", "~*", "+@all"])
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER (the test needs a Redis user allowed to manage ACLs)");
    let info = url.as_str().into_connection_info().unwrap();
    let settings = info.redis_settings().clone().set_username(&user).set_password("pw");
    let client = redis::Client::open(info.set_redis_settings(settings)).unwrap();
    let store =
        RedisStore::builder().with_prefix(run_prefix()).connect(client.get_connection_info().clone()).await.unwrap();

    let key = fresh_key(None);
    let lease = Duration::from_secs(10);
    let Begin::Execute(token) = store.begin(&key, &fp(1), lease).await.unwrap() else { panic!("free key") };
    let before = connections_of(&mut admin, &user).await;
    assert_eq!(before.len(), 1, "one multiplexed connection");

    // Kill it while requests are running.
    let mut load = JoinSet::new();
    for _ in 0..20 {
        let (store, key) = (store.clone(), key.clone());
        load.spawn(async move {
            let mut failures = Vec::new();
            let until = Instant::now() + Duration::from_millis(400);
            while Instant::now() < until {
                if let Err(error) = store.begin(&key, &fp(1), LEASE).await {
                    failures.push(error);
                }
            }
            failures
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed: i64 = redis::cmd("CLIENT").arg(&["KILL", "USER", &user]).query_async(&mut admin).await.unwrap();
    assert_eq!(killed, 1);
    while let Some(failures) = load.join_next().await {
        for error in failures.unwrap() {
            assert!(is_store_failure(&error), "only unavailable or timeout, got {error:?}");
        }
    }

    // The next operations work, on a new connection, without anyone rebuilding the store.
    let next = store.renew(&key, &token, lease).await;
    assert!(next.as_ref().map_or_else(is_store_failure, |renewed| *renewed), "{next:?}");
    assert!(store.renew(&key, &token, lease).await.unwrap());
    assert!(store.complete(&key, &token, record(b"after"), TTL).await.unwrap());
    let after = connections_of(&mut admin, &user).await;
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "a new connection");
    let _: () = redis::cmd("ACL").arg(&["DELUSER", &user]).query_async(&mut admin).await.unwrap();
}

/// What `MEMORY USAGE` reports for the key the store wrote under the default prefix.
async fn usage(conn: &mut redis::aio::MultiplexedConnection, key: &StoreKey) -> i64 {
    let mut redis_key = b"idem:".to_vec();
    redis_key.extend_from_slice(&raw_key(key)[run_prefix().len()..]);
    redis::cmd("MEMORY").arg("USAGE").arg(redis_key).arg("SAMPLES").arg(0).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn memory_per_record_is_as_documented() {
    let url = redis_or_skip!();
    // The documented figures are for the default prefix and a UUID key (36 bytes), so this
    // test alone writes under `idem:`; its keys are fresh UUIDs that live for the TTL only.
    let store = RedisStore::builder().connect(url.as_str()).await.unwrap();
    let mut conn = raw(&url).await;
    let mut report = String::from("MEMORY USAGE, default prefix, 36-byte key:\n");
    for scope in [None, Some(ScopeId::digest("tenant"))] {
        let label = if scope.is_some() { "scoped" } else { "unscoped" };
        let key = fresh_key(scope);
        let token = lock(&store, &key, fp(1)).await;
        let lock_usage = usage(&mut conn, &key).await;
        assert!(store.complete(&key, &token, Record::NotRetained, TTL).await.unwrap());
        let not_retained_usage = usage(&mut conn, &key).await;
        report += &format!("  {label}: lock {lock_usage} B, not-retained record {not_retained_usage} B\n");
        // Documented: 152 / 136 B unscoped, 216 / 200 B scoped (Redis 7.0); other versions
        // differ a little, hence the margin.
        assert!(lock_usage <= 250 && not_retained_usage <= 250, "{report}");

        for body_len in [0, 100, 1_000, 10_000, 100_000] {
            let key = fresh_key(scope);
            let token = lock(&store, &key, fp(1)).await;
            // One header, `content-type: application/json`: 28 bytes of name and value.
            let mut headers = response(b"").headers().clone();
            headers.remove("x-multi");
            let stored = tower_idempotency::store::StoredResponse::new(
                http::StatusCode::CREATED,
                headers,
                Bytes::from(vec![b'x'; body_len]),
            );
            let weight = stored.weight() as i64;
            assert!(store.complete(&key, &token, Record::Response(Arc::new(stored)), TTL).await.unwrap());
            let used = usage(&mut conn, &key).await;
            let overhead = used - weight;
            report += &format!("  {label}: body {body_len} B, usage {used} B, usage - body - headers {overhead} B\n");
            // Documented: about 140 B (unscoped) or 205 B (scoped) beyond body and headers,
            // plus the allocator rounding the value up to its size class (under a quarter).
            assert!(overhead <= 250 + body_len as i64 / 4, "{report}");
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
}

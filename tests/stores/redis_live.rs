//! `RedisStore`'s live logs, beyond the conformance suite: replicas publishing and following,
//! the dedicated connections of blocking reads, a stale owner's publish, the stream layout and
//! its expiry, and (on a `redis-server` of the test's own) the round trips of waiting and
//! joining, counted by Redis.
//!
//! Needs a Redis: `REDIS_URL`, or `redis://127.0.0.1:6379` when it answers (see
//! `common::redis` for the skip policy). The counting tests start their own `redis-server`
//! (Redis's command statistics are server-wide, and other tests share the one on 6379); without
//! `redis-server` on the PATH they say so and pass, unless `REDIS_URL` is set.
#![cfg(feature = "redis")]

use crate::common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{
    conformance::{TTL, fp, fresh_key, live_head, record},
    redis::{raw, redis_url, run_prefix, store},
};
use tokio::time::Instant;
use tower_idempotency::store::{
    Begin, Followed, IdempotencyStore, LiveCursor, LiveEvent, LiveLog, LockToken, RedisStore, StoreKey,
    redis::{self, AsyncCommands, aio::MultiplexedConnection},
};

/// The URL of the Redis under test, or return from the test (skipped).
macro_rules! redis_or_skip {
    () => {
        match redis_url().await {
            Some(url) => url,
            None => return,
        }
    };
}

fn data(text: &str) -> LiveEvent {
    LiveEvent::Data(Bytes::copy_from_slice(text.as_bytes()))
}

async fn lock_for(store: &RedisStore, key: &StoreKey, lease: Duration) -> LockToken {
    match store.begin(key, &fp(1), lease).await.unwrap() {
        Begin::Execute(token) => token,
        other => panic!("expected a free key, got {other:?}"),
    }
}

/// Follows `key` from its start until the log ends, as a joiner does: the events, the end, and
/// how long each `follow` that returned events took.
async fn follow_to_the_end(store: &RedisStore, key: &StoreKey, timeout: Duration) -> (Vec<LiveEvent>, bool, usize) {
    let mut cursor = None;
    let mut events = Vec::new();
    let mut calls = 0;
    loop {
        calls += 1;
        match store.follow(key, &fp(1), cursor, timeout).await.unwrap() {
            Followed::Live { events: new, cursor: next } => {
                events.extend(new);
                cursor = Some(next);
            }
            Followed::Ended { completed } => return (events, completed, calls),
            other => panic!("{other:?}"),
        }
    }
}

/// A stream entry as `XRANGE` returns it: the id, and the fields with their values.
type Entry<T> = (String, Vec<(T, T)>);

/// The Redis keys matching `pattern` (tests only: `KEYS` scans the whole database).
async fn keys(conn: &mut MultiplexedConnection, pattern: &str) -> Vec<Vec<u8>> {
    conn.keys(pattern).await.unwrap()
}

/// The stream of `lock`'s log, found by its documented name `{prefix}{TAG}live:{lock id hex}`.
async fn stream_of(conn: &mut MultiplexedConnection, lock: &LockToken) -> Option<Vec<u8>> {
    let mut found = keys(conn, &format!("{}{{*}}live:{:032x}", run_prefix(), lock.id())).await;
    assert!(found.len() <= 1, "{found:?}");
    found.pop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_on_another_replica_is_woken_with_every_event_in_order() {
    let url = redis_or_skip!();
    // Two stores, two clients: two replicas of a service sharing one prefix.
    let (producer, follower) = (store(&url).await, store(&url).await);
    let key = fresh_key(None);
    let token = lock_for(&producer, &key, Duration::from_secs(10)).await;

    // The follower waits first, with a timeout far past the test: only wake-ups end its reads.
    let following = tokio::spawn({
        let key = key.clone();
        async move {
            let mut cursor = None;
            let mut events = Vec::new();
            let mut waits = Vec::new();
            loop {
                let started = Instant::now();
                match follower.follow(&key, &fp(1), cursor, Duration::from_secs(60)).await.unwrap() {
                    Followed::Live { events: new, cursor: next } => {
                        assert!(!new.is_empty(), "a 60 s follow returned empty-handed: it was not woken");
                        events.extend(new);
                        cursor = Some(next);
                    }
                    Followed::Ended { completed } => return (events, completed, waits),
                    other => panic!("{other:?}"),
                }
                waits.push(started.elapsed());
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut published = vec![live_head()];
    producer.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    for batch in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Batches of one to three events, as a producer publishing what accumulated.
        let events: Vec<_> = (0..=batch % 3).map(|i| data(&format!("chunk-{batch}.{i};"))).collect();
        let from = published.len() as u64;
        published.extend(events.iter().cloned());
        producer.publish(&key, &token, from, events).await.unwrap();
    }
    published.push(LiveEvent::EventEnd(Bytes::from_static(b"evt-9")));
    producer.publish(&key, &token, published.len() as u64 - 1, vec![published.last().unwrap().clone()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(producer.complete(&key, &token, record(b"done"), TTL).await.unwrap());

    let (events, completed, waits) = tokio::time::timeout(Duration::from_secs(5), following).await.unwrap().unwrap();
    assert_eq!(events, published, "every event, in order, each once");
    assert!(completed, "complete ends the log with a record");
    let slowest = waits.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(1), "each read was woken by a publish: {waits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocked_followers_leave_the_store_free_for_everything_else() {
    let url = redis_or_skip!();
    let store = Arc::new(store(&url).await);
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(10)).await;
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { store.follow(&key, &fp(1), None, Duration::from_secs(30)).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Four followers block in XREAD; the same store serves other keys meanwhile, at once.
    let started = Instant::now();
    for _ in 0..20 {
        let other = fresh_key(None);
        let other_token = lock_for(&store, &other, Duration::from_secs(5)).await;
        assert!(store.complete(&other, &other_token, record(b"x"), TTL).await.unwrap());
        assert!(matches!(store.begin(&other, &fp(1), TTL).await.unwrap(), Begin::Completed(_)));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "60 operations took {took:?} while followers blocked");
    assert!(followers.iter().all(|f| !f.is_finished()), "the followers are still waiting");

    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    for follower in followers {
        let followed = tokio::time::timeout(Duration::from_secs(2), follower).await.unwrap().unwrap();
        assert!(matches!(followed, Followed::Live { events, .. } if events == [live_head()]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_past_the_connection_bound_wait_their_turn_and_miss_nothing() {
    let url = redis_or_skip!();
    let store = Arc::new(
        RedisStore::builder()
            .with_prefix(run_prefix())
            .with_max_blocking_connections(2)
            .connect(url.as_str())
            .await
            .unwrap(),
    );
    assert!(format!("{store:?}").contains("at most 2"));
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(10)).await;
    let followers: Vec<_> = (0..6)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { follow_to_the_end(&store, &key, Duration::from_secs(30)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = vec![live_head(), data("a"), data("b")];
    store.publish(&key, &token, 0, events[..1].to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.publish(&key, &token, 1, events[1..].to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(store.release(&key, &token).await.unwrap());
    for follower in followers {
        let (got, completed, _) = tokio::time::timeout(Duration::from_secs(3), follower).await.unwrap().unwrap();
        assert_eq!((got, completed), (events.clone(), false));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_follower_leaves_no_blocked_connection_behind() {
    let url = redis_or_skip!();
    // One dedicated connection: had the cancelled read's connection gone back to the pool, the
    // next follower's read would queue behind the 30 s block still running in Redis.
    let store = Arc::new(
        RedisStore::builder()
            .with_prefix(run_prefix())
            .with_max_blocking_connections(1)
            .connect(url.as_str())
            .await
            .unwrap(),
    );
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(10)).await;
    let cancelled = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.follow(&key, &fp(1), None, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancelled.abort();
    let _ = cancelled.await;

    let next = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.follow(&key, &fp(1), Some(LiveCursor::new(token.id(), 0)), Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    let followed = tokio::time::timeout(Duration::from_secs(2), next).await.expect("woken at once").unwrap().unwrap();
    assert!(matches!(followed, Followed::Live { events, .. } if events == [live_head()]));
}

#[tokio::test]
async fn a_publisher_whose_lease_ran_out_writes_nothing() {
    let url = redis_or_skip!();
    let (store, mut conn) = (store(&url).await, raw(&url).await);
    let key = fresh_key(None);
    let lease = Duration::from_millis(300);
    let stale = lock_for(&store, &key, lease).await;
    store.publish(&key, &stale, 0, vec![live_head()]).await.unwrap();
    assert!(stream_of(&mut conn, &stale).await.is_some(), "published while held");
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(stream_of(&mut conn, &stale).await.is_none(), "the log expired with the lease");

    // The stale owner publishes before and after another request took the key.
    store.publish(&key, &stale, 1, vec![data("stale")]).await.unwrap();
    store.publish(&key, &stale, 0, vec![live_head(), data("stale")]).await.unwrap();
    let fresh = lock_for(&store, &key, Duration::from_secs(5)).await;
    store.publish(&key, &stale, 0, vec![live_head(), data("stale")]).await.unwrap();
    assert!(stream_of(&mut conn, &stale).await.is_none(), "nothing written under the stale lock");

    let Followed::Live { events, cursor } = store.follow(&key, &fp(1), None, Duration::from_millis(50)).await.unwrap()
    else {
        panic!("the new lock is live")
    };
    assert!(events.is_empty(), "a follower of the new lock sees nothing of the stale one: {events:?}");
    assert_eq!(cursor.lock(), fresh.id());
    let stale_cursor = Some(LiveCursor::new(stale.id(), 0));
    let followed = store.follow(&key, &fp(1), stale_cursor, Duration::from_millis(50)).await.unwrap();
    assert_eq!(followed, Followed::Ended { completed: false }, "the stale lock's log has ended");
}

#[tokio::test]
async fn the_live_log_is_a_stream_that_expires_with_the_lease_and_soon_after_its_end() {
    let url = redis_or_skip!();
    let (store, mut conn) = (store(&url).await, raw(&url).await);

    // Never published nor followed: no stream at all, completed or released.
    for release in [false, true] {
        let key = fresh_key(None);
        let token = lock_for(&store, &key, Duration::from_secs(5)).await;
        if release {
            assert!(store.release(&key, &token).await.unwrap());
        } else {
            assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
        }
        assert!(stream_of(&mut conn, &token).await.is_none(), "a lock nobody followed leaves no stream");
    }

    // Published: entries 1-1, 1-2, ... with one field each; the stream's TTL is the lease's.
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(2)).await;
    store
        .publish(&key, &token, 0, vec![live_head(), data("\u{0}bytes\r\n"), LiveEvent::EventEnd("7".into())])
        .await
        .unwrap();
    let stream = stream_of(&mut conn, &token).await.expect("a stream named {prefix}{TAG}live:{lock id}");
    let kind: String = redis::cmd("TYPE").arg(&stream).query_async(&mut conn).await.unwrap();
    assert_eq!(kind, "stream");
    let entries: Vec<Entry<Vec<u8>>> =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    let layout: Vec<_> = entries.iter().map(|(id, fields)| (id.as_str(), fields.len(), fields[0].0.clone())).collect();
    assert_eq!(layout, [("1-1", 1, b"h".to_vec()), ("1-2", 1, b"d".to_vec()), ("1-3", 1, b"e".to_vec())]);
    assert_eq!(entries[1].1[0].1, b"\x00bytes\r\n", "data raw");
    assert_eq!(&entries[0].1[0].1[..2], &201u16.to_be_bytes(), "the head: status, then headers as in a record");
    let lock_ttl: i64 = conn.pttl(common::redis::raw_key(&key)).await.unwrap();
    let stream_ttl: i64 = conn.pttl(&stream).await.unwrap();
    assert!((lock_ttl - stream_ttl).abs() < 100, "lock {lock_ttl} ms, stream {stream_ttl} ms");
    assert!(store.renew(&key, &token, Duration::from_secs(20)).await.unwrap());
    let stream_ttl: i64 = conn.pttl(&stream).await.unwrap();
    assert!(stream_ttl > 19_000, "renew extends the log with the lock: {stream_ttl} ms");

    // The end: `2-0`, `c` = 1, kept for 5 s so that late followers still find it.
    assert!(store.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    let end: Vec<Entry<String>> =
        redis::cmd("XRANGE").arg(&stream).arg("2-0").arg("+").query_async(&mut conn).await.unwrap();
    assert_eq!(end, [("2-0".to_owned(), vec![("c".to_owned(), "1".to_owned())])]);
    let stream_ttl: i64 = conn.pttl(&stream).await.unwrap();
    assert!((3_000..=5_000).contains(&stream_ttl), "an ended log is kept 5 s: {stream_ttl} ms");

    // Followed before anything was published: the follower opens it (`0-1`); release ends it
    // with `c` = 0.
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(5)).await;
    store.follow(&key, &fp(1), None, Duration::from_millis(10)).await.unwrap();
    let stream = stream_of(&mut conn, &token).await.expect("opened by the follower");
    assert!(store.release(&key, &token).await.unwrap());
    let entries: Vec<Entry<String>> =
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    let expected = [("0-1", ("o", "")), ("2-0", ("c", "0"))]
        .map(|(id, (f, v))| (id.to_owned(), vec![(f.to_owned(), v.to_owned())]));
    assert_eq!(entries, expected);
}

#[tokio::test]
async fn live_scripts_lost_by_redis_are_loaded_again() {
    let url = redis_or_skip!();
    let (store, mut conn) = (store(&url).await, raw(&url).await);
    let flush = |conn: &mut MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
        }
    };
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(5)).await;
    flush(&mut conn).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    flush(&mut conn).await;
    let Followed::Live { events, .. } = store.follow(&key, &fp(1), None, Duration::from_millis(10)).await.unwrap()
    else {
        panic!("live")
    };
    assert_eq!(events, [live_head()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_your_own_manager_checks_every_100_ms_unless_given_a_client() {
    let url = redis_or_skip!();
    let client = redis::Client::open(url.as_str()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client.clone()).await.unwrap();
    let polling = RedisStore::builder().with_prefix(run_prefix()).build(manager.clone());
    assert!(format!("{polling:?}").contains("followers check every 100ms"), "{polling:?}");
    let blocking = RedisStore::builder().with_prefix(run_prefix()).with_blocking_client(client).build(manager);
    assert!(format!("{blocking:?}").contains("dedicated connections"), "{blocking:?}");
    // Both follow correctly; only the second is woken by Redis (counted in `round_trips`).
    for store in [polling, blocking] {
        let key = fresh_key(None);
        let token = lock_for(&store, &key, Duration::from_secs(5)).await;
        let follower = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move { follow_to_the_end(&store, &key, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        store.publish(&key, &token, 0, vec![live_head(), data("x")]).await.unwrap();
        // Time for a check: a follower that checks only after `complete` learns of the end
        // first, and reads the rest from the record.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
        let (events, completed, _) = tokio::time::timeout(Duration::from_secs(2), follower).await.unwrap().unwrap();
        assert_eq!((events, completed), (vec![live_head(), data("x")], true));
    }
}

// ---- Round trips, counted by a Redis of the test's own ----

/// A `redis-server` this test owns, on a free port: killed when dropped.
struct PrivateRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    async fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(std::env::var("REDIS_URL").is_err(), "REDIS_URL is set but redis-server is not on the PATH");
            eprintln!("skipping a round-trip count: no redis-server on the PATH");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("idem-redis-live-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Self { child, port, dir };
        let client = redis::Client::open(redis.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                    return Some(redis);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {port} did not answer");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Calls per command since the last `CONFIG RESETSTAT` (commands run inside scripts count
/// under their own names too).
async fn commandstats(conn: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|field| field.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

async fn reset_stats(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(conn).await.unwrap();
}

/// Runs every script once, so that the counts below hold no `NOSCRIPT` reload.
async fn warm_up(stores: &[&RedisStore]) {
    for store in stores {
        let key = fresh_key(None);
        let token = lock_for(store, &key, Duration::from_secs(5)).await;
        store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
        store.follow(&key, &fp(1), None, Duration::from_millis(5)).await.unwrap();
        assert!(store.renew(&key, &token, Duration::from_secs(5)).await.unwrap());
        assert!(store.release(&key, &token).await.unwrap());
        let token = lock_for(store, &key, Duration::from_secs(5)).await;
        assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
    }
}

/// The round trips a follower made, from Redis's counts: every store operation is one
/// `EVALSHA` or one `XREAD` (`begin`: `MULTI`..`EXEC`), so the follower's are all of those less
/// the producer's own `EVALSHA`s.
fn follower_round_trips(stats: &BTreeMap<String, u64>, producer_scripts: u64) -> (u64, u64) {
    let scripts = stats.get("evalsha").copied().unwrap_or(0) - producer_scripts;
    (scripts, stats.get("xread").copied().unwrap_or(0))
}

/// A producer that holds `key` for `hold`, renewing every third of `lease` as the layer does,
/// then completes; returns its `EVALSHA` count (renews + complete).
async fn hold_then_complete(
    store: &RedisStore,
    key: &StoreKey,
    token: LockToken,
    lease: Duration,
    hold: Duration,
) -> u64 {
    let until = Instant::now() + hold;
    let mut scripts = 0;
    while Instant::now() + lease / 3 < until {
        tokio::time::sleep(lease / 3).await;
        assert!(store.renew(key, &token, lease).await.unwrap());
        scripts += 1;
    }
    tokio::time::sleep_until(until).await;
    assert!(store.complete(key, &token, record(b"done"), TTL).await.unwrap());
    scripts + 1
}

/// A waiting duplicate: follows the key until the log ends, as the layer's wait mode does.
async fn wait_for_the_end(store: &RedisStore, key: &StoreKey, timeout: Duration) -> (bool, usize) {
    let until = Instant::now() + timeout;
    let mut cursor = None;
    let mut calls = 0;
    loop {
        calls += 1;
        match store.follow(key, &fp(1), cursor, until - Instant::now()).await.unwrap() {
            Followed::Live { cursor: next, .. } => cursor = Some(next),
            Followed::Ended { completed } => return (completed, calls),
            other => panic!("{other:?}"),
        }
    }
}

/// A wait of `hold` on a lock with `lease`, the follower's blocks capped at `max_block`: the
/// follower's round trips (scripts, `XREAD`s) and `follow` calls.
async fn count_a_wait(max_block: Duration, lease: Duration, hold: Duration) -> Option<(u64, u64, usize)> {
    let redis = PrivateRedis::start().await?;
    let producer = RedisStore::builder().connect(redis.url()).await.unwrap();
    let waiter = RedisStore::builder().with_max_block(max_block).connect(redis.url()).await.unwrap();
    warm_up(&[&producer, &waiter]).await;
    let mut admin = raw(&redis.url()).await;
    let key = fresh_key(None);
    let token = lock_for(&producer, &key, lease).await;
    reset_stats(&mut admin).await;
    let waiting = tokio::spawn({
        let key = key.clone();
        async move { wait_for_the_end(&waiter, &key, Duration::from_secs(120)).await }
    });
    let producer_scripts = hold_then_complete(&producer, &key, token, lease, hold).await;
    let (completed, calls) = tokio::time::timeout(Duration::from_secs(2), waiting).await.unwrap().unwrap();
    assert!(completed);
    let (scripts, reads) = follower_round_trips(&commandstats(&mut admin).await, producer_scripts);
    Some((scripts, reads, calls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_costs_a_few_round_trips_not_a_poll() {
    // A 3 s wait on a 3 s lease renewed every second, the follower's block capped at 1 s: the
    // default 30 s wait (30 s lease, 10 s cap) scaled down ten times.
    let Some((scripts, reads, calls)) =
        count_a_wait(Duration::from_secs(1), Duration::from_secs(3), Duration::from_secs(3)).await
    else {
        return;
    };
    let total = scripts + reads;
    println!(
        "a 3 s wait (3 s lease, 1 s block cap): {total} round trips ({scripts} scripts, {reads} XREAD) in {calls} \
         follow calls, {:.1}/s; the default 30 s wait at a 10 s cap: the same {total} (polling begin every 100 ms \
         made ~300)",
        total as f64 / 3.0
    );
    // One lookup, then a check and a blocking read per block (3 s / 1 s), the last woken by the end.
    assert!(total <= 10, "{total} round trips");
    assert!(reads <= 5, "{reads} XREADs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_s_wait_with_the_defaults() {
    let Some((scripts, reads, calls)) =
        count_a_wait(Duration::from_secs(10), Duration::from_secs(30), Duration::from_secs(30)).await
    else {
        return;
    };
    let total = scripts + reads;
    println!(
        "a 30 s wait, defaults (30 s lease, 10 s block cap): {total} round trips ({scripts} scripts, \
         {reads} XREAD) in {calls} follow calls"
    );
    assert!(total <= 10, "{total} round trips");
}

/// A producer publishing `n` events `every` apart, one publish at a time (as the layer does), and
/// a follower on another store from the start: the follower's round trips and `follow` calls,
/// and the producer's.
async fn count_a_joined_stream(n: u64, every: Duration) -> Option<(u64, u64, usize, u64)> {
    let redis = PrivateRedis::start().await?;
    let producer = RedisStore::builder().connect(redis.url()).await.unwrap();
    let follower = RedisStore::builder().connect(redis.url()).await.unwrap();
    warm_up(&[&producer, &follower]).await;
    let mut admin = raw(&redis.url()).await;
    let key = fresh_key(None);
    let lease = Duration::from_secs(30);
    let token = lock_for(&producer, &key, lease).await;
    reset_stats(&mut admin).await;
    let following = tokio::spawn({
        let key = key.clone();
        async move { follow_to_the_end(&follower, &key, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let mut published = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(started + every * i as u32).await;
        let event = if i == 0 { live_head() } else { data(&format!("id: {i}\ndata: {i}\n\n")) };
        published.push(event.clone());
        producer.publish(&key, &token, i, vec![event]).await.unwrap();
    }
    assert!(producer.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    let (events, completed, calls) = tokio::time::timeout(Duration::from_secs(5), following).await.unwrap().unwrap();
    assert_eq!((events, completed), (published, true));
    let stats = commandstats(&mut admin).await;
    let (scripts, reads) = follower_round_trips(&stats, n + 1);
    Some((scripts, reads, calls, n + 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_stream_costs_one_round_trip_per_publish() {
    // 100 events 20 ms apart: a 2 s generation (the 10 s one, 100 ms apart, costs the same per
    // event, plus a check per 2 s).
    let Some((scripts, reads, calls, produced)) = count_a_joined_stream(100, Duration::from_millis(20)).await else {
        return;
    };
    let total = scripts + reads;
    println!(
        "a joined 2 s stream of 100 events, one publish each: the follower made {total} round trips ({scripts} \
         scripts, {reads} XREAD) in {calls} follow calls; the producer {produced} (100 publishes, 1 complete)"
    );
    // At most one read per publish, plus the lookup, the first check, and a check per 2 s.
    assert!(reads <= 101, "{reads} XREADs");
    assert!(scripts <= 5, "{scripts} scripts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_10_s_stream() {
    let Some((scripts, reads, calls, produced)) = count_a_joined_stream(100, Duration::from_millis(100)).await else {
        return;
    };
    let total = scripts + reads;
    println!(
        "a joined 10 s stream of 100 events, one publish each: the follower made {total} round trips ({scripts} \
         scripts, {reads} XREAD) in {calls} follow calls; the producer {produced}"
    );
    assert!(reads <= 101 && scripts <= 8, "{scripts} scripts, {reads} XREADs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_one_round_trip_whatever_its_events() {
    let Some(redis) = PrivateRedis::start().await else { return };
    let store = RedisStore::builder().connect(redis.url()).await.unwrap();
    warm_up(&[&store]).await;
    let mut admin = raw(&redis.url()).await;
    let key = fresh_key(None);
    let token = lock_for(&store, &key, Duration::from_secs(5)).await;
    reset_stats(&mut admin).await;
    let events: Vec<_> = std::iter::once(live_head()).chain((0..49).map(|i| data(&format!("chunk {i}")))).collect();
    store.publish(&key, &token, 0, events.clone()).await.unwrap();
    // Sent again after a lost answer, with one more: only the new one is appended.
    let mut again = events.clone();
    again.push(data("chunk 49"));
    store.publish(&key, &token, 0, again).await.unwrap();
    let stats = commandstats(&mut admin).await;
    println!("two publishes of 50 and 51 events: {} EVALSHA, {} XADD inside", stats["evalsha"], stats["xadd"]);
    assert_eq!((stats["evalsha"], stats["xadd"]), (2, 51));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_without_a_client_check_ten_times_a_second() {
    let Some(redis) = PrivateRedis::start().await else { return };
    let client = redis::Client::open(redis.url()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    let producer = RedisStore::builder().connect(redis.url()).await.unwrap();
    let polling = RedisStore::builder().build(manager);
    warm_up(&[&producer, &polling]).await;
    let mut admin = raw(&redis.url()).await;
    let key = fresh_key(None);
    let token = lock_for(&producer, &key, Duration::from_secs(30)).await;
    reset_stats(&mut admin).await;
    let waiting = tokio::spawn({
        let key = key.clone();
        async move { wait_for_the_end(&polling, &key, Duration::from_secs(30)).await }
    });
    let producer_scripts =
        hold_then_complete(&producer, &key, token, Duration::from_secs(30), Duration::from_secs(1)).await;
    let (completed, _) = tokio::time::timeout(Duration::from_secs(2), waiting).await.unwrap().unwrap();
    assert!(completed);
    let (scripts, reads) = follower_round_trips(&commandstats(&mut admin).await, producer_scripts);
    println!("a 1 s wait without a client for blocking reads: {scripts} scripts, {reads} XREAD");
    assert_eq!(reads, 0, "never blocks the shared connection");
    assert!((8..=14).contains(&scripts), "{scripts} checks in 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedicated_connections_are_one_per_log_bounded_and_kept_for_the_next_follower() {
    let Some(redis) = PrivateRedis::start().await else { return };
    let store = Arc::new(RedisStore::builder().with_max_blocking_connections(3).connect(redis.url()).await.unwrap());
    let mut admin = raw(&redis.url()).await;
    let clients = async |admin: &mut MultiplexedConnection| -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(admin).await.unwrap();
        list.lines().count() - 1
    };
    let peak = Arc::new(AtomicUsize::new(0));
    // Round 0: eight followers of one log share one blocking read, on one connection. Then
    // eight logs, two followers each: three connections at most, the others wait their turn.
    for (round, logs) in [1, 8, 8].into_iter().enumerate() {
        let mut locks = Vec::new();
        let mut followers = Vec::new();
        for _ in 0..logs {
            let key = fresh_key(None);
            locks.push((key.clone(), lock_for(&store, &key, Duration::from_secs(10)).await));
            followers.extend((0..16 / logs).map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { follow_to_the_end(&store, &key, Duration::from_secs(30)).await })
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let blocked = clients(&mut admin).await;
        peak.fetch_max(blocked, Ordering::SeqCst);
        if round == 0 {
            assert_eq!(blocked, 1 + 1, "sixteen followers of one log: one blocking read");
        }
        for (key, token) in &locks {
            store.publish(key, token, 0, vec![live_head()]).await.unwrap();
        }
        // Time for every follower to read it, three logs at a time (one that reads only after
        // the end learns of the end first, and would read the rest from the record).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (key, token) in &locks {
            assert!(store.complete(key, token, record(b"x"), TTL).await.unwrap());
        }
        for follower in followers {
            let (events, completed, _) = tokio::time::timeout(Duration::from_secs(3), follower).await.unwrap().unwrap();
            assert_eq!((events, completed), (vec![live_head()], true), "round {round}");
        }
        // Kept open for the next follower: the shared connection and the dedicated ones (after
        // round 0, a follower back first may have opened a second while the read's own was not
        // given back yet).
        let open = clients(&mut admin).await;
        match round {
            0 => assert!((1 + 1..=1 + 3).contains(&open), "round 0: {open} connections"),
            _ => assert_eq!(open, 1 + 3, "round {round}: the shared connection and 3 idle"),
        }
    }
    assert_eq!(peak.load(Ordering::SeqCst), 1 + 3, "never more than the bound");
}

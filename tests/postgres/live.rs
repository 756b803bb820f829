//! Join mode in `PostgresStore`: replicas publishing and following each other, the statements
//! it costs (counted on the wire), the listener surviving its connection's death, and the
//! log's rows living no longer than their lock.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tower_idempotency::store::{
    Begin, Followed, IdempotencyStore, LiveCursor, LiveEvent, LiveLog, LockToken, PostgresStore, StoreKey,
    conformance::{fp, fresh_key, live_head, record},
    sqlx::{self, postgres::PgListener, postgres::PgPoolOptions},
};

use super::{Db, database_url, wire::Proxy};

/// Bound on a woken follower's delay: far under any recheck or timeout of these tests (so
/// only a notification meets it), with room for a loaded machine (measured: a few ms).
const WOKEN: Duration = Duration::from_secs(2);
/// A record's TTL no test outlives.
const TTL: Duration = Duration::from_secs(3600);
/// A lease no test outlives: only notifications (and the end of the test) end a wait.
const LONG_LEASE: Duration = Duration::from_secs(60);

fn data(i: usize) -> LiveEvent {
    LiveEvent::Data(Bytes::from(format!("data: {i}\n\n")))
}

async fn lock(store: &PostgresStore, key: &StoreKey) -> LockToken {
    match store.begin(key, &fp(1), LONG_LEASE).await.unwrap() {
        Begin::Execute(token) => token,
        other => panic!("expected the key to be free, got {other:?}"),
    }
}

/// Follows `key` from the start until its log ends: each batch of events with when it came.
async fn follow_to_the_end(store: &PostgresStore, key: &StoreKey) -> (Vec<(Instant, Vec<LiveEvent>)>, Followed) {
    let mut cursor: Option<LiveCursor> = None;
    let mut batches = Vec::new();
    loop {
        match store.follow(key, &fp(1), cursor, Duration::from_secs(30)).await.unwrap() {
            Followed::Live { events, cursor: next } => {
                assert!(!events.is_empty(), "a wait of 30 s timed out: the follower was not woken");
                if let Some(cursor) = cursor {
                    assert_eq!(next.lock(), cursor.lock());
                }
                batches.push((Instant::now(), events));
                cursor = Some(next);
            }
            ended => return (batches, ended),
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_what_another_publishes_in_order_woken_by_notifications() {
    let db = Db::new().await;
    let publisher = db.store().await;
    // A recheck far past the test: only notifications deliver the events in time.
    let follower = {
        let pool = PgPoolOptions::new().max_connections(4).connect(&database_url()).await.unwrap();
        db.builder().with_follow_recheck(Duration::from_secs(60)).build(pool)
    };
    let key = fresh_key(None);
    let token = lock(&publisher, &key).await;
    let following = tokio::spawn({
        let (follower, key) = (follower.clone(), key.clone());
        async move { follow_to_the_end(&follower, &key).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut published = vec![live_head()];
    let mut sent = Vec::new();
    publisher.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    sent.push(Instant::now());
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let batch = vec![data(i), LiveEvent::EventEnd(Bytes::from(i.to_string()))];
        publisher.publish(&key, &token, published.len() as u64, batch.clone()).await.unwrap();
        sent.push(Instant::now());
        published.extend(batch);
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(publisher.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    let completed_at = Instant::now();

    let (batches, ended) = following.await.unwrap();
    let ended_at = Instant::now();
    assert_eq!(ended, Followed::Ended { completed: true });
    let followed: Vec<LiveEvent> = batches.iter().flat_map(|(_, events)| events.clone()).collect();
    assert_eq!(followed, published, "every event, in order, once");
    // Each batch arrived shortly after it was published: woken, not found by a recheck.
    let mut delays = Vec::new();
    let mut received = 0;
    for (at, events) in &batches {
        received += events.len();
        // The publish that made the `received`-th event visible.
        let batch = if received == 1 { 0 } else { (received - 2) / 2 + 1 };
        delays.push(at.saturating_duration_since(sent[batch]));
    }
    delays.sort();
    let worst = *delays.last().unwrap();
    println!(
        "replica follow: {} events in {} batches from {} publishes; delay publish -> follower: median {:.1} ms, \
         worst {:.1} ms; end {:.1} ms after complete",
        followed.len(),
        batches.len(),
        sent.len(),
        millis(delays[delays.len() / 2]),
        millis(worst),
        millis(ended_at - completed_at),
    );
    assert!(worst < WOKEN, "a batch took {worst:?} to reach the other replica");
    assert!(ended_at - completed_at < WOKEN);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_of_waiting_for_a_completion_and_of_following_a_stream() {
    let db = Db::new().await;
    db.store().await;
    let url = db.url();
    let (follower_proxy, publisher_proxy) = (Proxy::start(&url).await, Proxy::start(&url).await);
    // One connection each, every statement prepared on it first: the counts are the steady
    // state (a statement's first use on a connection adds a round trip to prepare it).
    let follower = db.builder().build(follower_proxy.pool(&url, 1).await);
    let publisher = db.builder().build(publisher_proxy.pool(&url, 1).await);
    for end in ["complete", "release"] {
        let key = fresh_key(None);
        let token = lock(&publisher, &key).await;
        follower.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap();
        publisher.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
        match end {
            "complete" => assert!(publisher.complete(&key, &token, record(b"x"), TTL).await.unwrap()),
            _ => assert!(publisher.release(&key, &token).await.unwrap()),
        }
    }

    // A follower waiting 3 s for a lock that then completes.
    let key = fresh_key(None);
    let token = lock(&publisher, &key).await;
    let before = follower_proxy.pool_counts();
    let waiting = tokio::spawn({
        let (follower, key) = (follower.clone(), key.clone());
        async move {
            let followed = follower.follow(&key, &fp(1), None, Duration::from_secs(10)).await.unwrap();
            (followed, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(publisher.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    let completed_at = Instant::now();
    let (followed, woken_at) = waiting.await.unwrap();
    assert_eq!(followed, Followed::Ended { completed: true });
    let waited = follower_proxy.pool_counts() - before;
    // A second duplicate of a followed lock reads once.
    let key2 = fresh_key(None);
    let token2 = lock(&publisher, &key2).await;
    follower.follow(&key2, &fp(1), None, Duration::ZERO).await.unwrap();
    let before = follower_proxy.pool_counts();
    let waiting = tokio::spawn({
        let (follower, key2) = (follower.clone(), key2.clone());
        async move { follower.follow(&key2, &fp(1), None, Duration::from_secs(10)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(publisher.release(&key2, &token2).await.unwrap());
    assert_eq!(waiting.await.unwrap(), Followed::Ended { completed: false });
    let second = follower_proxy.pool_counts() - before;
    println!(
        "waiting 3 s for a completion: {} statements, {} round trips on the wire with sqlx's pings on release \
         (first follower of the lock); \
         a follower of a followed lock: {} statement(s); woken {:.1} ms after `complete` returned \
         (0: before its answer came back)",
        waited.statements,
        waited.round_trips,
        second.statements,
        millis(woken_at - completed_at),
    );
    assert!(waited.statements <= 2, "{waited:?}");
    // Each statement, and sqlx's ping as the connection goes back to the pool.
    assert!(waited.round_trips <= 2 * waited.statements, "{waited:?}");
    assert!(second.statements <= 1, "{second:?}");
    assert!(woken_at - completed_at < WOKEN);

    // Following a stream of N batches, published 20 ms apart.
    const N: usize = 50;
    let key = fresh_key(None);
    let published_before = publisher_proxy.pool_counts();
    let token = lock(&publisher, &key).await;
    let before = follower_proxy.pool_counts();
    let following = tokio::spawn({
        let (follower, key) = (follower.clone(), key.clone());
        async move { follow_to_the_end(&follower, &key).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    publisher.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    for i in 0..N {
        tokio::time::sleep(Duration::from_millis(20)).await;
        publisher.publish(&key, &token, 1 + i as u64, vec![data(i)]).await.unwrap();
    }
    assert!(publisher.complete(&key, &token, record(b"done"), TTL).await.unwrap());
    let streamed = started.elapsed();
    let (batches, ended) = following.await.unwrap();
    assert_eq!(ended, Followed::Ended { completed: true });
    // What came live is the log's start, in order (the rest comes from the record once the
    // log ended: the last publish may come just before the completion).
    let events: Vec<LiveEvent> = batches.iter().flat_map(|(_, events)| events.clone()).collect();
    let expected: Vec<LiveEvent> = std::iter::once(live_head()).chain((0..N).map(data)).collect();
    assert!(events.len() >= N, "{} of {} events came live", events.len(), N + 1);
    assert_eq!(events[..], expected[..events.len()]);
    let followed = follower_proxy.pool_counts() - before;
    let published = publisher_proxy.pool_counts() - published_before;
    println!(
        "following {} publishes (head + {N} batches, 20 ms apart): follower {} statements, {} round trips, \
         {} follow calls; publisher {} statements ({} publishes + begin + complete; {} round trips on the wire); \
         listening connections: follower's {:?}, publisher's {:?}; streamed in {:.0} ms",
        N + 1,
        followed.statements,
        followed.round_trips,
        batches.len() + 1,
        published.statements,
        N + 1,
        published.round_trips,
        follower_proxy.listener_counts(),
        publisher_proxy.listener_counts(),
        millis(streamed),
    );
    // One read per batch: the one that finds it (the next follow call waits at once when
    // nothing was notified since that read began), plus the first follower's second read
    // and the one that finds the end. A publish that commits while a read is in flight can
    // cost one read more (its notification arrives after the read began): slack for a
    // loaded machine, still well under the two reads per batch of reading before each wait.
    let batches_published = N as u64 + 1;
    assert!(followed.statements <= batches_published * 3 / 2, "{followed:?}");
    assert_eq!(published.statements, N as u64 + 3, "one statement per publish, begin, complete");
    // Each, and sqlx's ping on release (the last one may still be on its way).
    assert!(published.round_trips + 1 >= 2 * published.statements, "{published:?}");
    // sqlx may also ping a connection that sat idle before handing it out (its
    // `test_before_acquire`): on a loaded machine, a round trip or two more, none ours.
    assert!(published.round_trips <= 2 * published.statements + 2, "{published:?}");
    // The publisher's store never follows: it has no listening connection.
    assert_eq!(publisher_proxy.listener_counts().statements, 0);
    // The follower's listens once, on one connection.
    assert_eq!(follower_proxy.listener_counts().statements, 1);
    db.drop().await;
}

/// The pid of the backend listening on `store`'s channel, once there is one other than `not`.
async fn listener_pid(db: &Db, store: &PostgresStore, not: Option<i32>) -> i32 {
    // `LISTEN "channel"`, or `LISTEN "channel";` once reconnected.
    let sql = "SELECT pid FROM pg_stat_activity WHERE rtrim(query, ';') = $1 AND pid <> $2";
    let listen = format!("LISTEN \"{}\"", store.channel());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid = sqlx::query_scalar::<_, i32>(sql)
            .bind(&listen)
            .bind(not.unwrap_or(0))
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(Instant::now() < deadline, "no backend listening on {listen}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_still_wake_after_the_listeners_connection_is_killed() {
    let db = Db::new().await;
    let publisher = db.store().await;
    let follower = {
        let pool = PgPoolOptions::new().max_connections(4).connect(&database_url()).await.unwrap();
        db.builder().with_follow_recheck(Duration::from_secs(60)).build(pool)
    };
    let key = fresh_key(None);
    let token = lock(&publisher, &key).await;
    // The first follow starts the listener and marks the lock followed.
    let Followed::Live { cursor, .. } = follower.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap() else {
        panic!("the lock is live")
    };
    let killed = listener_pid(&db, &follower, None).await;

    // A follower waits; its listener's connection is killed, and the event is published
    // before the listener is back: the reconnection wakes the follower, which reads it.
    let waiting = tokio::spawn({
        let (follower, key) = (follower.clone(), key.clone());
        async move { follower.follow(&key, &fp(1), Some(cursor), Duration::from_secs(30)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let terminated: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(killed).fetch_one(&db.pool).await.unwrap();
    assert!(terminated);
    let published_at = Instant::now();
    publisher.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    let Followed::Live { events, cursor } = waiting.await.unwrap() else { panic!("the lock is live") };
    let first = published_at.elapsed();
    assert_eq!(events, vec![live_head()]);

    // On its new connection, the listener wakes followers as before.
    let again = listener_pid(&db, &follower, Some(killed)).await;
    assert_ne!(again, killed);
    let waiting = tokio::spawn({
        let (follower, key) = (follower.clone(), key.clone());
        async move { follower.follow(&key, &fp(1), Some(cursor), Duration::from_secs(30)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let published_at = Instant::now();
    publisher.publish(&key, &token, 1, vec![data(1)]).await.unwrap();
    let Followed::Live { events, .. } = waiting.await.unwrap() else { panic!("the lock is live") };
    let second = published_at.elapsed();
    assert_eq!(events, vec![data(1)]);
    println!(
        "listener killed: the event published meanwhile reached the follower in {:.1} ms; after the \
         reconnection, in {:.1} ms (recheck 60 s, wait 30 s)",
        millis(first),
        millis(second)
    );
    assert!(first < Duration::from_secs(5), "{first:?}");
    assert!(second < WOKEN, "{second:?}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_rechecks_within_the_cap_when_a_notification_is_lost() {
    let db = Db::new().await;
    let store = db.builder().with_follow_recheck(Duration::from_millis(300)).build(db.pool.clone());
    store.migrate().await.unwrap();
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    let Followed::Live { cursor, .. } = store.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap() else {
        panic!("the lock is live")
    };
    // An event written behind the store's back, so that nothing notifies: only the recheck
    // finds it.
    let waiting = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.follow(&key, &fp(1), Some(cursor), Duration::from_secs(30)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sql = format!(
        "INSERT INTO {} (key_id, token, seq, n, events) \
         VALUES (substr(sha256(decode('00', 'hex') || convert_to($1, 'UTF8')), 1, 16), $2, 0, 1, $3)",
        store.live_table()
    );
    let event = b"Ddata: lost\n\n";
    let mut row = (event.len() as u32).to_be_bytes().to_vec();
    row.extend_from_slice(event);
    let written = Instant::now();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(key.key().as_str())
        .bind(&token.id().to_be_bytes()[..])
        .bind(row)
        .execute(&db.pool)
        .await
        .unwrap();
    let Followed::Live { events, .. } = waiting.await.unwrap() else { panic!("the lock is live") };
    assert_eq!(events, vec![LiveEvent::Data(Bytes::from_static(b"data: lost\n\n"))]);
    assert!(written.elapsed() < Duration::from_secs(2), "{:?}", written.elapsed());
    db.drop().await;
}

/// The next notification on `listener`, if one comes within `within`.
async fn next_notice(listener: &mut PgListener, within: Duration) -> Option<String> {
    tokio::time::timeout(within, listener.recv()).await.ok().map(|n| n.unwrap().payload().to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_followed_lock_notifies_and_a_mark_orders_with_a_concurrent_publish() {
    let db = Db::new().await;
    let store = db.store().await;
    let mut listener = PgListener::connect(&database_url()).await.unwrap();
    listener.listen(store.channel()).await.unwrap();
    let quiet = Duration::from_millis(300);

    // Nobody follows: publish and complete send nothing (no commit takes the notify lock).
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
    assert_eq!(next_notice(&mut listener, quiet).await, None);

    // Followed: each write notifies, with the key id and the token.
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    store.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap();
    let key_id = {
        let sql = "SELECT substr(sha256(decode('00', 'hex') || convert_to($1, 'UTF8')), 1, 16)";
        let id: Vec<u8> = sqlx::query_scalar(sql).bind(key.key().as_str()).fetch_one(&db.pool).await.unwrap();
        hex(&id)
    };
    let tail = format!("{key_id}{}", hex(&token.id().to_be_bytes()));
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    assert_eq!(next_notice(&mut listener, quiet).await, Some(format!("p{tail}")));
    // A publish that adds nothing (sent again) notifies nothing.
    store.publish(&key, &token, 0, vec![live_head()]).await.unwrap();
    assert_eq!(next_notice(&mut listener, quiet).await, None);
    assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
    assert_eq!(next_notice(&mut listener, quiet).await, Some(format!("c{tail}")));
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    store.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap();
    assert!(store.release(&key, &token).await.unwrap());
    let payload = next_notice(&mut listener, quiet).await.unwrap();
    assert!(payload.starts_with('r') && payload.ends_with(&hex(&token.id().to_be_bytes())), "{payload}");

    // A follower's mark, committed while a publish waits on the lock row: the publish sees it
    // (PostgreSQL re-reads the row it locks) and notifies, though its snapshot predates it.
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    let mut mark = db.pool.begin().await.unwrap();
    let sql = format!("UPDATE {} SET followed = true WHERE key = $1", store.table());
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(key.key().as_str()).execute(&mut *mark).await.unwrap();
    let publishing = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.publish(&key, &token, 0, vec![live_head()]).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!publishing.is_finished(), "the publish waits for the mark's row lock");
    mark.commit().await.unwrap();
    publishing.await.unwrap();
    let payload = next_notice(&mut listener, Duration::from_secs(2)).await.unwrap();
    assert!(payload.starts_with('p'), "{payload}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_lives_no_longer_than_its_lock() {
    let db = Db::new().await;
    let store = db.builder().with_cleanup_interval(Duration::from_secs(3600)).build(db.pool.clone());
    store.migrate().await.unwrap();
    let live = "idempotency_live";
    assert!(store.live_table().ends_with("\"idempotency_live\""), "{}", store.live_table());
    let publish_three = |key: StoreKey, token: LockToken| {
        let store = store.clone();
        async move {
            store.publish(&key, &token, 0, vec![live_head(), data(0)]).await.unwrap();
            store.publish(&key, &token, 2, vec![data(1)]).await.unwrap();
        }
    };

    // One row per publish (a publish sent again, or overlapping, adds only what is new).
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    publish_three(key.clone(), token).await;
    assert_eq!(db.count(live).await, 2);
    store.publish(&key, &token, 2, vec![data(1)]).await.unwrap();
    store.publish(&key, &token, 1, vec![data(0), data(1), data(2)]).await.unwrap();
    assert_eq!(db.count(live).await, 3);
    let Followed::Live { events, .. } = store.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap() else {
        panic!("live")
    };
    assert_eq!(events, vec![live_head(), data(0), data(1), data(2)]);
    // A cursor inside a row reads from its event on.
    let Followed::Live { events, cursor } =
        store.follow(&key, &fp(1), Some(LiveCursor::new(token.id(), 1)), Duration::ZERO).await.unwrap()
    else {
        panic!("live")
    };
    assert_eq!((events, cursor.read()), (vec![data(0), data(1), data(2)], 4));
    // Completed, released: the log goes in the same statement.
    assert!(store.complete(&key, &token, record(b"x"), TTL).await.unwrap());
    assert_eq!(db.count(live).await, 0);
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    publish_three(key.clone(), token).await;
    assert!(store.release(&key, &token).await.unwrap());
    assert_eq!(db.count(live).await, 0);

    // A gap, or a lock that is not held, writes nothing.
    let key = fresh_key(None);
    let token = lock(&store, &key).await;
    store.publish(&key, &token, 5, vec![data(5)]).await.unwrap();
    store.publish(&key, &LockToken::new(fp(1)), 0, vec![live_head()]).await.unwrap();
    assert_eq!(db.count(live).await, 0);
    assert!(store.release(&key, &token).await.unwrap());

    // An expired lock: its old owner writes nothing more, and the reaper deletes its log
    // with its row (the key id computed in SQL is the store's).
    let key = fresh_key(Some(tower_idempotency::ScopeId::digest("tenant")));
    let Begin::Execute(token) = store.begin(&key, &fp(1), Duration::from_millis(300)).await.unwrap() else {
        panic!("free")
    };
    publish_three(key.clone(), token).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.publish(&key, &token, 3, vec![data(3)]).await.unwrap();
    assert_eq!(db.count(live).await, 2);
    assert_eq!(store.reap().await.unwrap(), 1);
    assert_eq!(db.count(live).await, 0);

    // Taken over after expiry: the old log stays invisible to the new lock's followers, and
    // goes when the new lock ends.
    let key = fresh_key(None);
    let Begin::Execute(old) = store.begin(&key, &fp(1), Duration::from_millis(300)).await.unwrap() else {
        panic!("free")
    };
    publish_three(key.clone(), old).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = lock(&store, &key).await;
    let Followed::Live { events, cursor } = store.follow(&key, &fp(1), None, Duration::ZERO).await.unwrap() else {
        panic!("the new lock is live")
    };
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(cursor.lock(), new.id());
    assert_eq!(db.count(live).await, 2);
    assert!(store.complete(&key, &new, record(b"x"), TTL).await.unwrap());
    assert_eq!(db.count(live).await, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_in_an_uncommitted_transaction_is_not_followed_and_does_not_block_a_follower() {
    let db = Db::new().await;
    let store = db.store().await;
    // As transactional mode holds it: the lock row exists only in the open transaction, and
    // becomes the record in the same commit (so there is never a live lock to follow).
    let key = fresh_key(None);
    let mut transaction = db.pool.begin().await.unwrap();
    let sql = format!(
        "INSERT INTO {} (scope, key, fingerprint, token, response, expires_at) \
         VALUES ('', $1, $2, $3, NULL, clock_timestamp() + interval '1 hour')",
        store.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(key.key().as_str())
        .bind(&[1u8; 32][..])
        .bind(&[7u8; 16][..])
        .execute(&mut *transaction)
        .await
        .unwrap();
    let started = Instant::now();
    let followed = store.follow(&key, &fp(1), None, Duration::from_secs(10)).await.unwrap();
    assert_eq!(followed, Followed::Ended { completed: false });
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    transaction.rollback().await.unwrap();
    db.drop().await;
}

#[tokio::test]
async fn following_without_a_database_fails_within_the_operation_timeout() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = PostgresStore::builder().with_operation_timeout(Duration::from_millis(500)).build(pool);
    let started = Instant::now();
    let error = store.follow(&fresh_key(None), &fp(1), None, Duration::from_secs(30)).await.unwrap_err();
    assert!(error.is_timeout() || error.is_unavailable(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

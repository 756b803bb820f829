//! The layer over `RedisStore`, as several replicas of a service run it: two layers, each
//! with its own `RedisStore` (its own connection), sharing one Redis.
//!
//! Needs a Redis: `REDIS_URL`, or `redis://127.0.0.1:6379` when it answers (see
//! `common::redis` for the skip policy). Time is real (Redis keeps the clock).
#![cfg(feature = "redis")]

use crate::common;

use std::time::Duration;

use common::{
    Runs, TestService, assert_executed_once, post, race,
    redis::{Proxy, closed_port, redis_url, run_prefix, store, tcp_addr},
    send, service,
};
use http::StatusCode;
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, StoreFailure, store::RedisStore};

/// The URL of the Redis under test, or return from the test (skipped).
macro_rules! redis_or_skip {
    () => {
        match redis_url().await {
            Some(url) => url,
            None => return,
        }
    };
}

/// The layer over `store`, with a TTL short enough that the tests leave no keys behind.
fn layer(store: RedisStore) -> IdempotencyLayer<RedisStore> {
    IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .with_ttl(Duration::from_secs(30))
}

/// A key no other test or run uses.
fn key() -> &'static str {
    uuid::Uuid::new_v4().to_string().leak()
}

/// Two replicas: two layers, two stores, one handler counter.
async fn replicas(
    url: &str,
    configure: impl Fn(IdempotencyLayer<RedisStore>) -> IdempotencyLayer<RedisStore>,
    runs: &Runs,
) -> [impl TestService; 2] {
    let a = service(configure(layer(store(url).await)), runs.clone());
    let b = service(configure(layer(store(url).await)), runs.clone());
    [a, b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_on_two_replicas_run_the_handler_once() {
    let url = redis_or_skip!();
    for round in 0..5 {
        let runs = Runs::default();
        let replicas = replicas(&url, |layer| layer, &runs).await;
        let replies = race(&replicas, key(), 200, 50).await;
        assert_eq!(runs.get(), 1, "round {round}: the handler ran {} times", runs.get());
        assert_executed_once(&replies, round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_duplicates_on_the_other_replica_get_the_same_response() {
    let url = redis_or_skip!();
    let runs = Runs::default();
    let wait = |layer: IdempotencyLayer<RedisStore>| {
        layer.with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) })
    };
    let replicas = replicas(&url, wait, &runs).await;
    let replies = race(&replicas, key(), 50, 100).await;
    assert_eq!(runs.get(), 1);
    for reply in &replies {
        assert_eq!((reply.status, reply.text().as_str()), (StatusCode::CREATED, r#"run 1: {"sku":"A1"}"#));
    }
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_on_the_other_replica_joins_the_running_response() {
    let url = redis_or_skip!();
    let runs = Runs::default();
    let [a, b] = replicas(&url, |layer| layer.with_duplicates(Duplicates::join()), &runs).await;
    let key = key();
    // 20 chunks 50 ms apart on replica A; the duplicate lands on replica B mid-way.
    let mut slow = post("/orders", key, "{}");
    slow.headers_mut().insert("x-chunks", 20.into());
    slow.headers_mut().insert("x-chunk-delay-ms", 50.into());
    let first = tokio::spawn(send(&a, slow));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let joined = send(&b, post("/orders", key, "{}")).await;
    let first = first.await.unwrap();
    assert_eq!(first.outcome, Outcome::Executed);
    assert_eq!(joined.outcome, Outcome::Joined);
    assert!(joined.replayed());
    assert_eq!((joined.status, &joined.body), (first.status, &first.body));
    let chunks: String = (0..20).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(joined.body, chunks.as_bytes());
    assert_eq!(runs.get(), 1, "the handler ran once, on replica A");
    assert_eq!(send(&b, post("/orders", key, "{}")).await.outcome, Outcome::Replayed);
}

#[tokio::test]
async fn a_response_recorded_by_one_replica_is_replayed_by_the_other() {
    let url = redis_or_skip!();
    let runs = Runs::default();
    let [a, b] = replicas(&url, |layer| layer, &runs).await;
    let key = key();
    let first = send(&a, post("/orders", key, "{}")).await;
    assert_eq!((first.status, first.outcome), (StatusCode::CREATED, Outcome::Executed));

    let replay = send(&b, post("/orders", key, "{}")).await;
    assert_eq!(replay.outcome, Outcome::Replayed);
    assert!(replay.replayed());
    assert_eq!((replay.status, &replay.body), (first.status, &first.body));
    assert_eq!(replay.headers["content-type"], "text/plain");
    let multi: Vec<_> = replay.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert!(!replay.headers.contains_key("set-cookie"), "set-cookie is not stored");
    assert_eq!(runs.get(), 1);

    // Another payload under the key, through either replica: 422.
    send(&b, post("/orders", key, r#"{"other":1}"#)).await.assert_problem(422, "key-reused");
    // The same key from another tenant is another key.
    let mut other_tenant = post("/orders", key, "{}");
    other_tenant.headers_mut().insert("authorization", "Bearer other".parse().unwrap());
    assert_eq!(send(&b, other_tenant).await.outcome, Outcome::Executed);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_redis_lock_past_the_lease() {
    let url = redis_or_skip!();
    let runs = Runs::default();
    // A 300 ms lease, renewed every 100 ms, around a handler that takes 1.2 s.
    let short_lease = |layer: IdempotencyLayer<RedisStore>| layer.with_lease(Duration::from_millis(300));
    let [a, b] = replicas(&url, short_lease, &runs).await;
    let key = key();
    let mut slow = post("/orders", key, "{}");
    slow.headers_mut().insert("x-delay-ms", 1_200.into());
    let started = tokio::time::Instant::now();
    let first = tokio::spawn(send(&a, slow));
    // Well past the lease, the lock is still held in Redis.
    for at in [150, 500, 900] {
        tokio::time::sleep_until(started + Duration::from_millis(at)).await;
        let duplicate = send(&b, post("/orders", key, "{}")).await;
        duplicate.assert_problem(409, "in-flight");
    }
    assert_eq!(first.await.unwrap().outcome, Outcome::Executed);
    assert_eq!(send(&b, post("/orders", key, "{}")).await.outcome, Outcome::Replayed);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_keep_is_not_run_again_on_the_other_replica() {
    let url = redis_or_skip!();
    let runs = Runs::default();
    let [a, b] = replicas(&url, |layer| layer.with_max_record(1000), &runs).await;
    let key = key();
    let mut big = post("/orders", key, "{}");
    big.headers_mut().insert("x-big", "5000".parse().unwrap());
    let first = send(&a, big).await;
    assert_eq!((first.status, first.body.len()), (StatusCode::CREATED, 5000));
    let retry = send(&b, post("/orders", key, "{}")).await;
    retry.assert_problem(409, "response-not-retained");
    assert!(!retry.headers.contains_key("retry-after"));
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn redis_down_fails_closed_or_open_and_recovers_by_itself() {
    // Fail closed and fail open need no Redis: nothing listens at this port.
    let nowhere = format!("redis://{}", closed_port().await);
    let runs = Runs::default();
    let closed = service(
        IdempotencyLayer::from_store(
            RedisStore::builder().build(tower_idempotency::store::redis::Client::open(nowhere.as_str()).unwrap()),
        )
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()),
        runs.clone(),
    );
    let reply = send(&closed, post("/orders", key(), "{}")).await;
    reply.assert_problem(503, "store-unavailable");
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(runs.get(), 0, "fail closed: the handler does not run");

    let open_layer = IdempotencyLayer::from_store(
        RedisStore::builder().build(tower_idempotency::store::redis::Client::open(nowhere.as_str()).unwrap()),
    )
    .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
    .with_store_failure(StoreFailure::FailOpen);
    let open = service(open_layer, runs.clone());
    let reply = send(&open, post("/orders", key(), "{}")).await;
    assert_eq!((reply.status, reply.outcome), (StatusCode::CREATED, Outcome::Unprotected));
    assert_eq!(runs.get(), 1, "fail open: the handler runs unprotected");

    // A service started while its Redis is down starts, answers 503, and works once Redis is up.
    let Some(url) = redis_url().await else { return };
    let mut proxy = Proxy::down(tcp_addr(&url)).await;
    let store = RedisStore::builder()
        .with_prefix(run_prefix())
        .build(tower_idempotency::store::redis::Client::open(proxy.url(&url)).unwrap());
    let svc = service(layer(store), runs.clone());
    let key = key();
    send(&svc, post("/orders", key, "{}")).await.assert_problem(503, "store-unavailable");
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.up().await;
    assert_eq!(send(&svc, post("/orders", key, "{}")).await.outcome, Outcome::Executed);
    assert_eq!(send(&svc, post("/orders", key, "{}")).await.outcome, Outcome::Replayed);
    assert_eq!(runs.get(), 2);
    proxy.take_down().await;
}

/// A store whose connection goes through `proxy`.
fn proxied_store(proxy: &Proxy, url: &str) -> RedisStore {
    RedisStore::builder()
        .with_prefix(run_prefix())
        .build(tower_idempotency::store::redis::Client::open(proxy.url(url)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_the_record_write_with_no_free_slot_still_gets_its_record() {
    let url = redis_or_skip!();
    let mut proxy = Proxy::down(tcp_addr(&url)).await;
    proxy.up().await;
    let runs = Runs::default();
    let svc = service(layer(proxied_store(&proxy, &url)).with_max_detached(0), runs.clone());
    let (with_body, empty) = (key(), key());
    let slow = |key: &'static str, empty: bool| {
        let mut request = post("/orders", key, "{}");
        request.headers_mut().insert("x-delay-ms", "200".parse().unwrap());
        if empty {
            request.headers_mut().insert("x-big", "0".parse().unwrap());
        }
        request
    };
    for (key, empty) in [(with_body, false), (empty, true)] {
        let sent = tokio::spawn(tower::ServiceExt::oneshot(svc.clone(), slow(key, empty)));
        // The begin went through; while the handler runs Redis goes away, so the record's
        // write is failing and being retried when the client leaves.
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.take_down().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        sent.abort(); // the client goes away (with a body in memory the head had arrived)
        let _ = sent.await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.up().await;
        let replay = common::settled(&svc, || slow(key, empty), 100, Duration::from_millis(50)).await;
        assert!(replay.replayed(), "{replay:?}");
    }
    assert_eq!(runs.get(), 2, "each key ran once");
    proxy.take_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_at_completion_shorter_than_the_lease_loses_nothing() {
    let url = redis_or_skip!();
    let mut proxy = Proxy::down(tcp_addr(&url)).await;
    proxy.up().await;
    let runs = Runs::default();
    let svc = service(layer(proxied_store(&proxy, &url)).with_lease(Duration::from_secs(30)), runs.clone());
    let key = key();
    let mut request = post("/orders", key, "{}");
    request.headers_mut().insert("x-delay-ms", "200".parse().unwrap());
    let first = tokio::spawn(send(&svc, request));
    // Redis goes away while the handler runs and stays away for 2 s: the completion fails
    // until it is back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.take_down().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.up().await;
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    // The client had the whole response only once the record was written: the retry replays.
    let retry = send(&svc, post("/orders", key, "{}")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1, "the handler never runs a second time");
    proxy.take_down().await;
}

#[test]
fn a_body_dropped_outside_any_runtime_is_still_recorded_in_redis() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let Some(url) = runtime.block_on(redis_url()) else { return };
    let store = runtime.block_on(store(&url));
    let runs = Runs::default();
    let svc = service(layer(store), runs.clone());
    let key = key();
    let streaming = || {
        let mut request = post("/stream", key, "{}");
        request.headers_mut().insert("x-chunks", "3".parse().unwrap());
        request.headers_mut().insert("x-chunk-delay-ms", "20".parse().unwrap());
        request
    };
    let mut body = runtime.block_on(tower::ServiceExt::oneshot(svc.clone(), streaming())).unwrap().into_body();
    runtime.block_on(http_body_util::BodyExt::frame(&mut body)).unwrap().unwrap();
    // No runtime on this thread: whatever the drop starts must not poll a Redis future here.
    std::thread::spawn(move || drop(body)).join().expect("dropping the body outside a runtime does not panic");
    runtime.block_on(async {
        let retry = common::settled(&svc, streaming, 100, Duration::from_millis(50)).await;
        assert!(retry.replayed(), "{retry:?}");
        assert_eq!(retry.text(), "chunk-0;chunk-1;chunk-2;");
    });
    assert_eq!(runs.get(), 1);
}

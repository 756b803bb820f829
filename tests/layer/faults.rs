//! Faults do not lose or stick keys: clients that go away, slow handlers, lost owners. Time
//! is tokio's paused clock.

use crate::common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use common::{Runs, post, send, service};
use http::StatusCode;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, Outcome,
    store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, Record, StoreKey, StoredResponse},
};

fn slow(key: &'static str, delay_ms: u32) -> http::Request<http_body_util::Full<Bytes>> {
    let mut request = post("/orders", key, "{}");
    request.headers_mut().insert("x-delay-ms", delay_ms.into());
    request
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_mid_handler_still_finishes_and_is_replayed() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    // The client gives up after 1 s; the handler needs 10 s.
    let gave_up = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(slow("k", 10_000))).await;
    assert!(gave_up.is_err());
    assert_eq!(runs.get(), 1, "the handler started");
    // While the detached handler runs, a retry sees it in flight.
    send(&svc, post("/orders", "k", "{}")).await.assert_problem(409, "in-flight");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the retry replays what already happened");
    assert_eq!(retry.text(), "run 1: {}");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_response_body_dropped_midway_is_drained_and_recorded() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut streaming = post("/stream", "k", "{}");
    streaming.headers_mut().insert("x-chunks", "5".parse().unwrap());
    streaming.headers_mut().insert("x-chunk-delay-ms", "1000".parse().unwrap());
    let response = svc.clone().oneshot(streaming).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk-0;");
    drop(body); // the client goes away after one chunk
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retry = send(&svc, post("/stream", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn past_the_detach_bound_a_dropped_request_is_cancelled_and_released() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_detached(0), runs.clone());
    let gave_up = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(slow("k", 10_000))).await;
    assert!(gave_up.is_err());
    tokio::task::yield_now().await;
    // Not detached: the lock was released, so the retry runs (nothing is stuck).
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(retry.outcome, Outcome::Executed);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn lease_renewal_keeps_a_slow_handlers_lock() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_lease(Duration::from_secs(3)), runs.clone());
    let first = tokio::spawn(send(&svc, slow("k", 20_000)));
    // Well past several leases, the handler still holds its key.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        send(&svc, post("/orders", "k", "{}")).await.assert_problem(409, "in-flight");
    }
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert!(send(&svc, post("/orders", "k", "{}")).await.replayed());
    assert_eq!(runs.get(), 1);
}

/// The fingerprint the layer computes for `post("/orders", _, "{}")`.
async fn orders_fingerprint() -> Fingerprint {
    common::probe::fingerprint_of(http::Method::POST, "/orders", b"{}").await
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_lock_is_free_after_one_lease() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(30)), runs.clone());
    // A process took the lock and crashed: nobody renews or releases it.
    let key = StoreKey::new(None, IdempotencyKey::parse(b"k").unwrap());
    assert!(matches!(
        store.begin(&key, &orders_fingerprint().await, Duration::from_secs(30)).await,
        Ok(Begin::Execute(_))
    ));
    send(&svc, post("/orders", "k", "{}")).await.assert_problem(409, "in-flight");
    tokio::time::advance(Duration::from_secs(29)).await;
    send(&svc, post("/orders", "k", "{}")).await.assert_problem(409, "in-flight");
    tokio::time::advance(Duration::from_secs(2)).await;
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(retry.outcome, Outcome::Executed);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stale_owner_never_overwrites_the_new_owners_record() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(30)), runs.clone());
    let key = StoreKey::new(None, IdempotencyKey::parse(b"k").unwrap());
    let Ok(Begin::Execute(stale)) = store.begin(&key, &orders_fingerprint().await, Duration::from_secs(30)).await
    else {
        panic!("the key is free");
    };
    tokio::time::advance(Duration::from_secs(31)).await;
    // The lease ran out; a retry takes the key over and completes it.
    let fresh = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(fresh.outcome, Outcome::Executed);
    // The old owner wakes up and tries to write its result, renew or release: nothing changes.
    let forged = Record::Response(Arc::new(StoredResponse::new(
        StatusCode::OK,
        http::HeaderMap::new(),
        Bytes::from_static(b"stale"),
    )));
    assert!(!store.complete(&key, &stale, forged, Duration::from_secs(60)).await.unwrap());
    assert!(!store.renew(&key, &stale, Duration::from_secs(30)).await.unwrap());
    assert!(!store.release(&key, &stale).await.unwrap());
    let replay = send(&svc, post("/orders", "k", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, fresh.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_replay_shares_the_stored_body_bytes() {
    let store = MemoryStore::new();
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()), runs.clone());
    send(&svc, post("/orders", "k", "{}")).await;
    let key = StoreKey::new(None, IdempotencyKey::parse(b"k").unwrap());
    let Ok(Begin::Completed(Record::Response(stored))) =
        store.begin(&key, &orders_fingerprint().await, Duration::from_secs(1)).await
    else {
        panic!("the record is there");
    };
    let replay = svc.clone().oneshot(post("/orders", "k", "{}")).await.unwrap();
    let frame = replay.into_body().frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, stored.body());
    assert_eq!(frame.as_ptr(), stored.body().as_ptr(), "the replay body is the stored buffer, not a copy");
}

fn streaming(key: &'static str, chunks: u32, delay_ms: u32) -> http::Request<http_body_util::Full<Bytes>> {
    let mut request = post("/stream", key, "{}");
    request.headers_mut().insert("x-chunks", chunks.into());
    request.headers_mut().insert("x-chunk-delay-ms", delay_ms.into());
    request
}

#[tokio::test(start_paused = true)]
async fn a_detached_streaming_handler_needs_one_permit() {
    // The client gives up before the head arrives; the handler then streams its body. One
    // detach permit must be enough to finish and record it.
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_detached(1), runs.clone());
    let mut request = streaming("k", 3, 10);
    request.headers_mut().insert("x-delay-ms", "20".parse().unwrap());
    assert!(tokio::time::timeout(Duration::from_millis(5), svc.clone().oneshot(request)).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = send(&svc, streaming("k", 3, 10)).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "chunk-0;chunk-1;chunk-2;");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_abandoned_without_a_detach_permit_keeps_a_not_retained_record() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_detached(0), runs.clone());
    let response = svc.clone().oneshot(streaming("k", 5, 1000)).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body); // gone midway, and nothing may finish the body in the background
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retry = send(&svc, streaming("k", 5, 1000)).await;
    retry.assert_problem(409, "response-not-retained");
    assert_eq!(runs.get(), 1, "the handler answered: it must never run twice");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_does_not_let_the_lease_lapse() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_lease(Duration::from_secs(30)), runs.clone());
    let response = svc.clone().oneshot(streaming("k", 3, 10)).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    // The client stops reading for several leases; nobody polls the body.
    tokio::time::sleep(Duration::from_secs(100)).await;
    send(&svc, streaming("k", 3, 10)).await.assert_problem(409, "in-flight");
    while body.frame().await.is_some() {}
    assert!(send(&svc, streaming("k", 3, 10)).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn durations_meaning_forever_do_not_panic() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new()
        .with_ttl(Duration::MAX)
        .with_lease(Duration::MAX)
        .with_duplicates(tower_idempotency::Duplicates::Wait { timeout: Duration::MAX });
    let svc = service(layer, runs.clone());
    send(&svc, post("/orders", "k", "{}")).await;
    tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
    assert!(send(&svc, post("/orders", "k", "{}")).await.replayed(), "still there a year later");
    assert_eq!(runs.get(), 1);
}

/// A body that panics on its first poll, counting its polls.
struct PanickingBody(Arc<std::sync::atomic::AtomicUsize>);

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        panic!("the body panics");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicked_body_is_never_polled_again_and_its_key_is_released() {
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = tower::service_fn({
        let polls = polls.clone();
        move |_req: http::Request<tower_idempotency::RequestBody<http_body_util::Full<Bytes>>>| {
            let polls = polls.clone();
            async move { Ok::<_, std::convert::Infallible>(http::Response::new(PanickingBody(polls))) }
        }
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::new(), handler);
    let polled = tokio::spawn(svc.clone().oneshot(post("/p", "k", "")));
    assert!(polled.await.unwrap_err().is_panic());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 1, "no background drain of a panicked body");
    // Released: the retry runs the handler (and panics again, as the handler would).
    let again = tokio::spawn(svc.clone().oneshot(post("/p", "k", "")));
    assert!(again.await.unwrap_err().is_panic());
    assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

//! Completion is owned, not hoped for (guide, steps 5-7): once the handler answered, the record or
//! not-retained record is written whatever the client, the detach bound or the store does; leases hold
//! whether or not the request is polled; duplicates hold nothing they do not use; a detached
//! body is read only while it can still be recorded.

use crate::common;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use common::{Reply, Runs, outage::Outage, post, send, service};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, RequestBody, store::MemoryStore};

fn slow(key: &'static str, delay_ms: u32) -> Request<Full<Bytes>> {
    let mut request = post("/orders", key, "{}");
    request.headers_mut().insert("x-delay-ms", delay_ms.into());
    request
}

fn empty_body(key: &'static str) -> Request<Full<Bytes>> {
    let mut request = post("/orders", key, "{}");
    request.headers_mut().insert("x-big", "0".parse().unwrap());
    request
}

// --- The final write is never bounded by the detach slots, nor lost with the client. -------

#[tokio::test(start_paused = true)]
async fn a_client_gone_during_the_store_write_with_no_free_slot_still_gets_its_record() {
    let store = Outage::new(MemoryStore::new());
    store.slow_completes(Duration::from_millis(500));
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_max_detached(0), runs.clone());

    // A body in memory: head and body wait for the record together (so they go out in one
    // write); the client gives up during that wait.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(post("/orders", "mem", "{}")))
            .await
            .is_err()
    );
    // An empty body: the head itself shows the end, so it waits for the record too.
    assert!(tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(empty_body("empty"))).await.is_err());

    tokio::time::sleep(Duration::from_secs(1)).await;
    let replay = send(&svc, post("/orders", "mem", "{}")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.text(), "run 1: {}");
    let replay = send(&svc, empty_body("empty")).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, "");
    assert_eq!(runs.get(), 2, "each key ran once");
    assert_eq!(store.completes.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_record_is_written_before_the_body_end_is_seen() {
    let store = Outage::new(MemoryStore::new());
    store.slow_completes(Duration::from_millis(300));
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()), runs.clone());
    let started = Instant::now();
    let first = send(&svc, post("/orders", "k", "{}")).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "the body ended before its record was written");
    // So a retry sent the moment the client has the whole response replays.
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

// --- Store failures at completion are retried while the lease lasts. -----------------------

async fn outage_at_completion(length: Duration) -> (Reply, Reply, usize, Duration) {
    let store = Outage::new(MemoryStore::new());
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(30)), runs.clone());
    // The store goes down just as the handler answers (it runs 100 ms).
    let outage = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        outage.down_for(length);
    });
    let started = Instant::now();
    let response = svc.clone().oneshot(slow("k", 100)).await.unwrap();
    let head_after = started.elapsed();
    // While the record is not written, a retry finds the key in flight, never free.
    let during = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(during.outcome, Outcome::InFlight, "{during:?}");
    let first = Reply::read(response).await;
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert!(store.failed_completes.load(Ordering::SeqCst) > 0, "the outage did hit the completion");
    (first, retry, runs.get(), head_after)
}

#[tokio::test(start_paused = true)]
async fn a_two_second_store_outage_at_completion_loses_nothing() {
    let (first, retry, runs, head_after) = outage_at_completion(Duration::from_secs(2)).await;
    assert!(head_after < Duration::from_millis(200), "the head waited {head_after:?} for a failing store");
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs, 1, "the handler never runs a second time");
}

#[tokio::test(start_paused = true)]
async fn a_ten_second_store_outage_at_completion_loses_nothing() {
    let (first, retry, runs, head_after) = outage_at_completion(Duration::from_secs(10)).await;
    assert!(head_after < Duration::from_millis(200), "the head waited {head_after:?} for a failing store");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs, 1, "the handler never runs a second time");
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_lease_gives_up_and_the_key_frees_with_the_lease() {
    // The documented limit: past the lease nothing holds the key, and a retry runs again.
    let store = Outage::new(MemoryStore::new());
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_lease(Duration::from_secs(30)), runs.clone());
    store.down_for(Duration::from_secs(120));
    let first = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "the client still gets the handler's answer");
    let after_lease = common::settled(&svc, || post("/orders", "k", "{}"), 400, Duration::from_millis(100)).await;
    assert_eq!(after_lease.outcome, Outcome::Executed);
    assert_eq!(runs.get(), 2);
}

// --- Leases do not depend on being polled. --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_for_several_leases_keeps_its_lock() {
    // Real time: a multi-thread runtime (which `block_in_place` needs) cannot pause its clock.
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = tower::service_fn({
        let runs = runs.clone();
        move |_: Request<RequestBody<Full<Bytes>>>| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                // Not polled for four leases: nothing on this task can renew anything.
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_secs(4)));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run {n}")))))
            }
        }
    });
    // A lease of 1 s: a renewal late by a few hundred milliseconds on a loaded machine still
    // lands within it, and the duplicates come 800 ms apart, the last 800 ms before the end.
    let svc = IdempotencyLayer::new().with_lease(Duration::from_secs(1)).layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/blocking", "k", "{}")));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let duplicate = svc.clone().oneshot(post("/blocking", "k", "{}")).await.unwrap();
        assert_eq!(Outcome::of(&duplicate), Outcome::InFlight, "the lock lapsed while the handler blocked");
    }
    let first = first.await.unwrap().unwrap().into_body().collect().await.unwrap().to_bytes();
    assert_eq!(first, "run 1");
    let replay = svc.clone().oneshot(post("/blocking", "k", "{}")).await.unwrap();
    assert_eq!(Outcome::of(&replay), Outcome::Replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// --- Duplicates hold no detach slot and no inner capacity. ---------------------------------

#[tokio::test(start_paused = true)]
async fn abandoned_waiters_take_no_detach_slot() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new()
        .with_max_detached(1)
        .with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(30) });
    let svc = service(layer, runs.clone());
    let first = tokio::spawn(send(&svc, slow("k", 10_000)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Five duplicates wait for it, and their clients give up.
    for _ in 0..5 {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(slow("k", 10_000))).await.is_err()
        );
    }
    // The one detach slot is still free: another request whose client leaves mid-handler is
    // finished in the background and recorded, not cancelled.
    assert!(tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(slow("other", 1_000))).await.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = send(&svc, post("/orders", "other", "{}")).await;
    assert!(other.replayed(), "the detached request was cancelled: {other:?}");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_holds_no_inner_capacity() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(30) });
    // Two requests at a time may reach the handler.
    let svc = ServiceBuilder::new().layer(layer).concurrency_limit(2).service(common::handler(runs.clone()));
    let first = tokio::spawn(send(&svc, slow("k", 20_000)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiter = tokio::spawn(send(&svc, slow("k", 20_000)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // An unrelated request gets the second slot at once, though a duplicate is waiting.
    let started = Instant::now();
    let unrelated = send(&svc, post("/orders", "unrelated", "{}")).await;
    assert_eq!(unrelated.outcome, Outcome::Executed);
    assert!(started.elapsed() < Duration::from_secs(1), "the unrelated request waited {:?}", started.elapsed());
    // The waiter gets the first's response once it completes.
    let first = first.await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(waited.replayed(), "{waited:?}");
    assert_eq!(waited.body, first.body);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_ends_up_executing_acquires_capacity_again() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(30) });
    let svc = ServiceBuilder::new().layer(layer).concurrency_limit(1).service(common::handler(runs.clone()));
    // The first fails after 1 s (released); the waiter then executes, through the limit.
    let mut failing = slow("k", 1_000);
    failing.headers_mut().insert("x-status", "503".parse().unwrap());
    let first = tokio::spawn(send(&svc, failing));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiter = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(waiter.outcome, Outcome::Executed, "{waiter:?}");
    assert_eq!(runs.get(), 2);
}

// --- A detached body is read only while it can still be recorded. --------------------------

/// An endless body of 100-byte chunks that counts its polls and yields between chunks.
struct Endless {
    polls: Arc<AtomicUsize>,
    yielded: bool,
}

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.yielded = !self.yielded;
        if self.yielded {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b'x'; 100])))))
    }
}

/// A handler answering `status` with an endless body, after `delay`.
fn endless(
    status: StatusCode,
    delay: Duration,
    polls: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
) -> impl Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Endless>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        runs.fetch_add(1, Ordering::SeqCst);
        let polls = polls.clone();
        async move {
            tokio::time::sleep(delay).await;
            let mut response = Response::new(Endless { polls, yielded: false });
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn an_endless_stream_whose_client_left_is_drained_only_to_the_record_limit() {
    let (polls, runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let layer = IdempotencyLayer::new().with_max_record(1_000);
    let svc = layer.layer(endless(StatusCode::OK, Duration::ZERO, polls.clone(), runs.clone()));
    let response = svc.clone().oneshot(post("/s", "k", "")).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body); // the client leaves after one chunk
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = polls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(polls.load(Ordering::SeqCst), settled, "the drain goes on past the record limit");
    assert!(settled <= 2 * 12, "{settled} polls for 1 000 bytes of 100-byte chunks");
    let retry = svc.clone().oneshot(post("/s", "k", "")).await.unwrap();
    assert_eq!(Outcome::of(&retry), Outcome::ResponseNotRetained);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unrecordable_body_is_never_drained() {
    for detach_before_the_answer in [false, true] {
        let (polls, runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let svc = IdempotencyLayer::new().layer(endless(
            StatusCode::INTERNAL_SERVER_ERROR,
            Duration::from_millis(100),
            polls.clone(),
            runs.clone(),
        ));
        if detach_before_the_answer {
            // The client leaves before the handler answers: the handler finishes detached.
            assert!(
                tokio::time::timeout(Duration::from_millis(10), svc.clone().oneshot(post("/s", "k", "")))
                    .await
                    .is_err()
            );
        } else {
            let response = svc.clone().oneshot(post("/s", "k", "")).await.unwrap();
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
        }
        let read_by_client = polls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            polls.load(Ordering::SeqCst),
            read_by_client,
            "a 500's body was drained ({detach_before_the_answer})"
        );
        // Released: the retry runs again.
        let retry = svc.clone().oneshot(post("/s", "k", "")).await.unwrap();
        assert_eq!(Outcome::of(&retry), Outcome::Executed);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}

// --- Background work survives runtimes and drops outside them. ------------------------------

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn the_lease_keeper_starts_again_on_the_next_runtime() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_lease(Duration::from_secs(3)), runs.clone());
    // A first runtime starts the layer's keeper, and ends.
    paused_runtime().block_on(send(&svc, slow("first", 5_000)));
    // On the next one, a slow handler still keeps its lock for several leases.
    paused_runtime().block_on(async {
        let first = tokio::spawn(send(&svc, slow("k", 20_000)));
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            send(&svc, post("/orders", "k", "{}")).await.assert_problem(409, "in-flight");
        }
        assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
        assert!(send(&svc, post("/orders", "k", "{}")).await.replayed());
    });
    assert_eq!(runs.get(), 2);
}

/// Drops a streaming response body on a thread outside any runtime, after one chunk, and
/// checks the rest is still drained and recorded on the runtime the request ran on.
fn body_dropped_outside_a_runtime_is_still_recorded<St: tower_idempotency::store::IdempotencyStore>(
    runtime: &tokio::runtime::Runtime,
    layer: IdempotencyLayer<St>,
    key: &'static str,
) {
    let runs = Runs::default();
    let svc = service(layer, runs.clone());
    let streaming = || {
        let mut request = post("/stream", key, "{}");
        request.headers_mut().insert("x-chunks", "3".parse().unwrap());
        request.headers_mut().insert("x-chunk-delay-ms", "20".parse().unwrap());
        request
    };
    let mut body = runtime.block_on(svc.clone().oneshot(streaming())).unwrap().into_body();
    runtime.block_on(body.frame()).unwrap().unwrap();
    std::thread::spawn(move || drop(body)).join().expect("dropping the body outside a runtime does not panic");
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let retry = send(&svc, streaming()).await;
        assert!(retry.replayed(), "{retry:?}");
        assert_eq!(retry.text(), "chunk-0;chunk-1;chunk-2;");
    });
    assert_eq!(runs.get(), 1);
}

#[test]
fn a_body_dropped_outside_any_runtime_is_still_recorded() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    body_dropped_outside_a_runtime_is_still_recorded(&runtime, IdempotencyLayer::new(), "outside");
}

#[tokio::test(start_paused = true)]
async fn past_the_record_limit_the_end_waits_for_the_not_retained_record() {
    let store = Outage::new(MemoryStore::new());
    store.slow_completes(Duration::from_millis(300));
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store.clone()).with_max_record(8), runs.clone());
    let big = || {
        let mut request = post("/orders", "big", "{}");
        request.headers_mut().insert("x-big", "64".parse().unwrap());
        request
    };
    let started = Instant::now();
    let first = send(&svc, big()).await;
    assert_eq!(first.body.len(), 64, "sent in full");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the end was seen before the not-retained record was kept"
    );
    // So a retry sent the moment the client has the whole response is told, not left in flight.
    send(&svc, big()).await.assert_problem(409, "response-not-retained");
    assert_eq!(runs.get(), 1);
}

#[test]
fn a_lock_left_by_a_runtime_that_ended_is_not_renewed_forever() {
    // The store's release takes a while, so a request cut off by its runtime's shutdown leaves
    // a release that never runs: its lock must still expire after one lease.
    let store = Outage::new(MemoryStore::new());
    store.slow_releases(Duration::from_millis(100));
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(store).with_lease(Duration::from_secs(3)), runs.clone());
    let first = paused_runtime();
    first.block_on(async {
        tokio::spawn(send(&svc, slow("k", 60_000)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
    drop(first); // the runtime ends with the handler in flight
    paused_runtime().block_on(async {
        // This runtime's keeper runs (started by another request) and must not keep the
        // abandoned lock alive.
        send(&svc, post("/orders", "other", "{}")).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let retry = send(&svc, post("/orders", "k", "{}")).await;
        assert_eq!(retry.outcome, Outcome::Executed, "{retry:?}");
    });
    assert_eq!(runs.get(), 3);
}

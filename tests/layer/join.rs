//! Join mode (guide, step 9), in process on paused time: a duplicate of a request in flight follows
//! its response as it is produced; `Last-Event-ID` resumes an event stream; failures, the
//! bound and the record limit; and waiting and joining are woken by the store, not polled.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use tower::{BoxError, Service, ServiceExt};

use crate::live_bound::next_data;
use tower_idempotency::{
    Duplicates, IdempotencyLayer, Outcome, RequestBody, ResponseBody,
    store::{
        Begin, Fingerprint, Followed, IdempotencyStore, LiveCursor, LiveEvent, LiveLog, LockToken, MemoryStore, Record,
        StoreError, StoreKey,
    },
};

type Body = BoxBody<Bytes, BoxError>;

/// An event stream: `x-events: N` events `id: I\ndata: I\n\n`, 100 ms apart (tokio time),
/// after `x-head-ms` (default 0) before the head; `x-status` answers that status instead,
/// `x-json` a small JSON body in memory;
/// `x-fail-after: K` fails the body after K events.
fn events_handler(
    runs: Arc<AtomicUsize>,
) -> impl Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Body>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let number = |name: &str| {
                request.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
            };
            tokio::time::sleep(Duration::from_millis(number("x-head-ms").unwrap_or(0))).await;
            if let Some(status) = number("x-status") {
                let body = Full::new(Bytes::from_static(b"failed")).map_err(|e: Infallible| match e {}).boxed();
                return Ok(Response::builder().status(status as u16).body(body).unwrap());
            }
            if number("x-json").is_some() {
                let body = Full::new(Bytes::from_static(b"{\"id\":1}")).map_err(|e: Infallible| match e {}).boxed();
                return Ok(Response::builder().header("content-type", "application/json").body(body).unwrap());
            }
            let (events, fail_after) = (number("x-events").unwrap_or(5), number("x-fail-after"));
            let stream = futures_util::stream::iter(0..events).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if fail_after == Some(i) {
                    return Err::<Frame<Bytes>, BoxError>("the generation failed".into());
                }
                Ok(Frame::data(Bytes::from(format!("id: {i}\ndata: {i}\n\n"))))
            });
            let response = Response::builder()
                .header("content-type", "text/event-stream")
                .header("x-model", "m1")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
            Ok::<_, BoxError>(response)
        }
    })
}

fn events(from: u64, to: u64) -> String {
    (from..to).map(|i| format!("id: {i}\ndata: {i}\n\n")).collect()
}

fn join_layer<St: LiveLog>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .with_duplicates(Duplicates::join())
}

type Svc = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Body>>, BoxError>;

fn app<St: IdempotencyStore>(layer: IdempotencyLayer<St>) -> (Svc, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    (tower::util::BoxCloneService::new(tower::Layer::layer(&layer, events_handler(runs.clone()))), runs)
}

fn request(key: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/complete").header("idempotency-key", key);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap()
}

fn call(svc: &Svc, request: Request<Full<Bytes>>) -> impl Future<Output = Response<ResponseBody<Body>>> + Send + use<> {
    let svc = svc.clone();
    async move { svc.oneshot(request).await.unwrap() }
}

async fn read_all(body: &mut ResponseBody<Body>) -> Result<String, String> {
    let mut text = String::new();
    while let Some(data) = next_data(body).await {
        text.push_str(std::str::from_utf8(&data?).unwrap());
    }
    Ok(text)
}

/// Data frames ready now, without waiting (what a joiner gets "at once").
fn ready_now(body: &mut ResponseBody<Body>) -> String {
    let mut text = String::new();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    while let std::task::Poll::Ready(Some(Ok(frame))) = std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    text
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_before_the_head_joins_at_the_first_byte() {
    let (svc, runs) = app(join_layer(MemoryStore::new()));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { read_all(call(&svc, request("k1", &[("x-head-ms", "200")])).await.body_mut()).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let joined = call(&svc, request("k1", &[("x-head-ms", "200")])).await;
    assert_eq!(joined.status(), StatusCode::OK);
    assert_eq!(Outcome::of(&joined), Outcome::Joined);
    assert_eq!(joined.headers()["idempotent-replayed"], "true");
    assert_eq!(joined.headers()["content-type"], "text/event-stream");
    assert_eq!(joined.headers()["x-model"], "m1");
    let mut body = joined.into_body();
    assert_eq!(read_all(&mut body).await.unwrap(), events(0, 5));
    assert_eq!(first.await.unwrap().unwrap(), events(0, 5));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "billed once");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_mid_stream_gets_everything_so_far_at_once_then_follows_live() {
    let (svc, runs) = app(join_layer(MemoryStore::new()));
    let mut first = call(&svc, request("k2", &[("x-events", "10")])).await.into_body();
    for _ in 0..4 {
        next_data(&mut first).await.unwrap().unwrap();
    }
    let mut joined = call(&svc, request("k2", &[])).await.into_body();
    assert_eq!(ready_now(&mut joined), events(0, 4), "the 4 events so far, without waiting");
    // Then live: each event reaches the joiner as the first request produces it.
    next_data(&mut first).await.unwrap().unwrap();
    assert_eq!(next_data(&mut joined).await.unwrap().unwrap(), events(4, 5));
    let rest = tokio::spawn(async move { read_all(&mut first).await });
    assert_eq!(read_all(&mut joined).await.unwrap(), events(5, 10));
    assert_eq!(rest.await.unwrap().unwrap(), events(5, 10));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn after_the_end_a_duplicate_is_an_ordinary_replay() {
    let (svc, runs) = app(join_layer(MemoryStore::new()));
    let first = read_all(call(&svc, request("k3", &[])).await.body_mut()).await.unwrap();
    let replay = call(&svc, request("k3", &[])).await;
    assert_eq!(Outcome::of(&replay), Outcome::Replayed);
    assert_eq!(read_all(&mut replay.into_body()).await.unwrap(), first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn last_event_id_resumes_a_join_and_a_replay() {
    // Joined after four events, "4" names an event not produced yet: the joiner waits for it
    // (it comes 100 ms later) and resumes after it; an id the stream never has gets the
    // whole stream once the record shows it is not there.
    let cases = [
        ("0", events(1, 5), events(1, 5)),
        ("2", events(3, 5), events(3, 5)),
        ("3", events(4, 5), events(4, 5)),
        ("4", String::new(), String::new()),
        ("nope", events(0, 5), events(0, 5)),
    ];
    for (last, expected, replayed) in cases {
        let (svc, runs) = app(join_layer(MemoryStore::new()));
        let key = format!("k4-{last}");
        let mut first = call(&svc, request(&key, &[])).await.into_body();
        // Joined once the first has sent four events of five (the fifth comes 100 ms later,
        // and its end at once after it: the fifth event waits for the record with the end, so
        // a duplicate after it would be a replay).
        let mut seen = String::new();
        while seen.matches("\n\n").count() < 4 {
            seen.push_str(std::str::from_utf8(&next_data(&mut first).await.unwrap().unwrap()).unwrap());
        }
        let joined = call(&svc, request(&key, &[("last-event-id", last)])).await;
        assert_eq!(Outcome::of(&joined), Outcome::Joined, "Last-Event-ID {last}");
        let joined = tokio::spawn(async move { read_all(&mut joined.into_body()).await });
        read_all(&mut first).await.unwrap();
        assert_eq!(joined.await.unwrap().unwrap(), expected, "joined with Last-Event-ID {last}");

        let replay = call(&svc, request(&key, &[("last-event-id", last)])).await;
        assert_eq!(Outcome::of(&replay), Outcome::Replayed);
        let length = replay.headers()["content-length"].to_str().unwrap().parse::<usize>().unwrap();
        assert_eq!(length, replayed.len(), "Content-Length of the resumed replay");
        assert_eq!(read_all(&mut replay.into_body()).await.unwrap(), replayed, "replayed with Last-Event-ID {last}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_joining_mid_stream_resumes_after_its_last_event_id() {
    let (svc, _) = app(join_layer(MemoryStore::new()));
    let mut first = call(&svc, request("k5", &[("x-events", "8")])).await.into_body();
    for _ in 0..5 {
        next_data(&mut first).await.unwrap().unwrap();
    }
    let mut joined = call(&svc, request("k5", &[("last-event-id", "1")])).await.into_body();
    let rest = tokio::spawn(async move { read_all(&mut first).await });
    assert_eq!(read_all(&mut joined).await.unwrap(), events(2, 8));
    rest.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_first_failing_before_its_head_lets_one_duplicate_execute() {
    let (svc, runs) = app(join_layer(MemoryStore::new()));
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, request("k6", &[("x-head-ms", "200"), ("x-status", "500")])).await.status() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let duplicates: Vec<_> = (0..5)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let response = call(&svc, request("k6", &[])).await;
                let outcome = Outcome::of(&response);
                (outcome, read_all(&mut response.into_body()).await.unwrap())
            })
        })
        .collect();
    assert_eq!(first.await.unwrap(), StatusCode::INTERNAL_SERVER_ERROR);
    let mut outcomes = Vec::new();
    for duplicate in duplicates {
        let (outcome, body) = duplicate.await.unwrap();
        assert_eq!(body, events(0, 5), "{outcome:?}");
        outcomes.push(outcome);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the failed first run, then one duplicate");
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Executed).count(), 1, "{outcomes:?}");
}

#[tokio::test(start_paused = true)]
async fn the_first_failing_mid_body_ends_every_joined_body_with_an_error_and_frees_the_key() {
    let (svc, runs) = app(join_layer(MemoryStore::new()));
    let mut first = call(&svc, request("k7", &[("x-fail-after", "3")])).await.into_body();
    next_data(&mut first).await.unwrap().unwrap();
    let mut joiners = Vec::new();
    for _ in 0..3 {
        joiners.push(call(&svc, request("k7", &[])).await.into_body());
    }
    let first = tokio::spawn(async move { read_all(&mut first).await });
    for mut joined in joiners {
        let error = read_all(&mut joined).await.expect_err("a joined body of a failed response fails");
        assert!(error.contains("failed"), "{error}");
    }
    assert!(first.await.unwrap().is_err());
    // The key was released: a retry executes again.
    let retry = call(&svc, request("k7", &[])).await;
    assert_eq!(Outcome::of(&retry), Outcome::Executed);
    assert_eq!(read_all(&mut retry.into_body()).await.unwrap(), events(0, 5));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn joiners_are_bounded_and_a_joiner_that_leaves_holds_nothing() {
    let (svc, runs) = app(join_layer(MemoryStore::new()).with_max_waiters(2));
    let mut first = call(&svc, request("k8", &[("x-events", "20")])).await.into_body();
    next_data(&mut first).await.unwrap().unwrap();
    let a = call(&svc, request("k8", &[])).await;
    let b = call(&svc, request("k8", &[])).await;
    assert_eq!((Outcome::of(&a), Outcome::of(&b)), (Outcome::Joined, Outcome::Joined));
    let refused = call(&svc, request("k8", &[])).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    assert_eq!(refused.headers()["retry-after"], "1");
    // Two clients leave: their places are free again.
    drop((a, b));
    let c = call(&svc, request("k8", &[])).await;
    assert_eq!(Outcome::of(&c), Outcome::Joined);
    let rest = tokio::spawn(async move { read_all(&mut first).await });
    assert_eq!(read_all(&mut c.into_body()).await.unwrap(), events(0, 20));
    rest.await.unwrap().unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_response_over_the_record_limit_cannot_be_joined() {
    let one = events(0, 1).len();
    let (svc, runs) = app(join_layer(MemoryStore::new()).with_max_record(one * 3));
    let mut first = call(&svc, request("k9", &[("x-events", "6")])).await.into_body();
    let head = next_data(&mut first).await.unwrap().unwrap();
    let mut joined = call(&svc, request("k9", &[])).await.into_body();
    let first = tokio::spawn(async move { read_all(&mut first).await });
    assert!(read_all(&mut joined).await.is_err(), "a joiner of a response past the limit ends with an error");
    let rest = first.await.unwrap().unwrap();
    assert_eq!(format!("{}{rest}", std::str::from_utf8(&head).unwrap()), events(0, 6), "the first client gets it all");
    let late = call(&svc, request("k9", &[])).await;
    assert_eq!(late.status(), StatusCode::CONFLICT);
    let problem = String::from_utf8(late.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(problem.contains("response-not-retained"), "{problem}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `MemoryStore`'s live log has a bound per response: a stream whose log would pass it is kept
/// as not retained, as past the record limit (joiners end with an error, later duplicates get
/// `409` `response-not-retained`), the first client gets it all (the check every store with a
/// bound runs, `tests/common/live_bound.rs`), and the store's bytes never pass the bound: they
/// fall back to none once the log ends.
#[tokio::test(start_paused = true)]
async fn a_live_log_past_its_bound_cannot_be_joined_and_holds_no_more() {
    const BOUND: usize = 16 * 1024;
    let store = MemoryStore::builder().with_max_live_log(BOUND).build();
    let mut most = 0;
    crate::live_bound::a_live_log_past_its_bound_cannot_be_joined(store.clone(), 600, || {
        most = most.max(store.bytes());
    })
    .await;
    assert!(most <= BOUND, "the store held {most} bytes for a log bounded at {BOUND}");
    assert!(most > BOUND / 2, "the log was counted: {most} bytes at most");
    assert_eq!(store.bytes(), 0, "the log ended: nothing held (a not-retained record counts none)");
}

/// A memory store that counts the calls made to it.
#[derive(Clone, Default)]
struct Counting {
    inner: MemoryStore,
    begins: Arc<AtomicUsize>,
    follows: Arc<AtomicUsize>,
    publishes: Arc<AtomicUsize>,
}

impl IdempotencyStore for Counting {
    fn outlives_process(&self) -> bool {
        self.inner.outlives_process()
    }

    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        self.inner.begin(key, fingerprint, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.complete(key, lock, record, ttl).await
    }
    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        self.inner.renew(key, lock, lease).await
    }
    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        self.inner.release(key, lock).await
    }
}

impl LiveLog for Counting {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        self.inner.publish(key, lock, from, events).await
    }
    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.follows.fetch_add(1, Ordering::SeqCst);
        self.inner.follow(key, fingerprint, cursor, timeout).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_30_s_wait_is_woken_by_the_store_not_polled() {
    let store = Counting::default();
    let layer = IdempotencyLayer::from_store(store.clone())
        .with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(60) })
        .with_lease(Duration::from_secs(120));
    let (svc, runs) = app(layer);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { read_all(call(&svc, request("w1", &[("x-head-ms", "30000")])).await.body_mut()).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let before = (store.begins.load(Ordering::SeqCst), store.follows.load(Ordering::SeqCst));
    let waited = call(&svc, request("w1", &[])).await;
    let (begins, follows) =
        (store.begins.load(Ordering::SeqCst) - before.0, store.follows.load(Ordering::SeqCst) - before.1);
    println!("a 30 s wait: {begins} begin and {follows} follow calls (polling every 100 ms made ~300)");
    assert_eq!(Outcome::of(&waited), Outcome::Replayed);
    assert_eq!(read_all(&mut waited.into_body()).await.unwrap(), first.await.unwrap().unwrap());
    assert_eq!(begins, 2, "one begin to find it in flight, one after it ended");
    assert!(follows <= 2, "{follows} follows");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_joined_10_s_stream_costs_one_follow_per_event_and_nothing_when_not_joined() {
    let store = Counting::default();
    let (svc, _) = app(join_layer(store.clone()));
    // Not joined, with a body complete before its head: nothing published.
    let mut quick = call(&svc, request("j0", &[("x-json", "1")])).await.into_body();
    read_all(&mut quick).await.unwrap();
    assert_eq!(store.publishes.load(Ordering::SeqCst), 0, "a response complete at once publishes nothing");

    // 100 events, 100 ms apart: a 10 s generation.
    let mut first = call(&svc, request("j1", &[("x-events", "100")])).await.into_body();
    next_data(&mut first).await.unwrap().unwrap();
    let follows = store.follows.load(Ordering::SeqCst);
    let mut joined = call(&svc, request("j1", &[])).await.into_body();
    let rest = tokio::spawn(async move { read_all(&mut first).await });
    assert_eq!(read_all(&mut joined).await.unwrap(), events(0, 100));
    rest.await.unwrap().unwrap();
    let (follows, publishes) = (store.follows.load(Ordering::SeqCst) - follows, store.publishes.load(Ordering::SeqCst));
    println!("a joined 10 s stream of 100 events: {follows} follow calls, {publishes} publishes");
    assert!(follows <= 102, "{follows} follows for 100 events");
    assert!(publishes <= 101, "{publishes} publishes for 100 events");
}

#[tokio::test(start_paused = true)]
async fn waiters_are_bounded_too() {
    let layer = IdempotencyLayer::new()
        .with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) })
        .with_max_waiters(1);
    let (svc, runs) = app(layer);
    let first = tokio::spawn(call(&svc, request("w2", &[("x-json", "1"), ("x-head-ms", "1000")])));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiter = tokio::spawn(call(&svc, request("w2", &[("x-json", "1")])));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let refused = call(&svc, request("w2", &[("x-json", "1")])).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT, "past the bound");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(Outcome::of(&first.await.unwrap()), Outcome::Executed);
    assert_eq!(Outcome::of(&waiter.await.unwrap()), Outcome::Replayed, "the waiter within the bound replays");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

//! Keys do not starve each other: [`DUPLICATES`] duplicates waiting on a slow key do not delay a
//! joined stream on another key of the same store. One check, run over every store: the memory
//! store, Redis and PostgreSQL (`tests/pace`, a binary of its own), Redis Cluster (in its test in
//! `tests/stores`). Real time on a multi-threaded runtime: the duplicates really wait, each
//! on its own task, while the stream runs.
#![allow(dead_code, unreachable_pub)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use tower::{BoxError, ServiceExt};
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, RequestBody, ResponseBody, store::LiveLog};

/// How many duplicates wait on the slow key.
pub const DUPLICATES: usize = 64;
/// The events of the paced stream, and the time between two of them.
const EVENTS: u64 = 40;
const EVERY: Duration = Duration::from_millis(50);
/// The most a joined frame may arrive after its event was produced.
pub const WITHIN: Duration = Duration::from_millis(100);

type Body = BoxBody<Bytes, BoxError>;

/// The handler: `x-role: slow` answers `slow done` once `release` is notified (its head waits
/// for it too); `x-role: paced` streams [`EVENTS`] events [`EVERY`] apart, each
/// `id: i\ndata: <µs since epoch>\n\n` stamped as it is produced.
fn handler(
    epoch: Instant,
    release: Arc<tokio::sync::Notify>,
    runs: Arc<[AtomicUsize; 2]>,
) -> impl tower::Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Body>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let (release, runs) = (release.clone(), runs.clone());
        async move {
            if request.headers().get("x-role").is_some_and(|role| role == "slow") {
                runs[0].fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                let body = Full::new(Bytes::from_static(b"slow done")).map_err(|never| match never {}).boxed();
                return Ok::<_, BoxError>(Response::new(body));
            }
            runs[1].fetch_add(1, Ordering::SeqCst);
            let stream = futures_util::stream::iter(0..EVENTS).then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(EVERY).await;
                }
                let produced = epoch.elapsed().as_micros();
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(format!("id: {i}\ndata: {produced}\n\n"))))
            });
            let response = Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)));
            Ok(response.unwrap())
        }
    })
}

fn request(key: &str, role: &'static str) -> Request<Full<Bytes>> {
    Request::post("/run")
        .header("idempotency-key", key)
        .header("x-role", role)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// Reads `body` to its end, checking that each event arrives within [`WITHIN`] of its
/// production: the events' ids in order, and the latest arrival of any.
async fn read_paced(epoch: Instant, mut body: ResponseBody<Body>) -> (Vec<u64>, Duration) {
    let mut ids = Vec::new();
    let mut latest = Duration::ZERO;
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("the paced stream ends cleanly").into_data() else { continue };
        let arrived = epoch.elapsed();
        text.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let mut lines = event.lines();
            let id = lines.next().and_then(|l| l.strip_prefix("id: ")).unwrap().parse().unwrap();
            let produced = lines.next().and_then(|l| l.strip_prefix("data: ")).unwrap().parse().unwrap();
            ids.push(id);
            latest = latest.max(arrived.saturating_sub(Duration::from_micros(produced)));
        }
    }
    assert!(text.is_empty(), "a partial event at the end: {text:?}");
    (ids, latest)
}

/// [`DUPLICATES`] duplicates of a slow request wait (join mode, no head yet) while a stream on
/// another key runs and a duplicate joins it: every event of the joined stream arrives within
/// [`WITHIN`] of its production. Then the slow request answers, and every duplicate gets its
/// response; each handler ran once.
///
/// `layers` are the replicas (one or more layers over the same store, or stores sharing a
/// backend): the duplicates are spread over them, the stream runs on the first and is joined on
/// the last.
pub async fn a_slow_key_does_not_delay_a_joined_stream_on_another<St: LiveLog>(layers: Vec<IdempotencyLayer<St>>) {
    let epoch = Instant::now();
    let release = Arc::new(tokio::sync::Notify::new());
    let runs: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let services: Vec<_> = layers
        .into_iter()
        .map(|layer| {
            let layer = layer.with_duplicates(Duplicates::join()).with_max_waiters(DUPLICATES + 1);
            tower::Layer::layer(&layer, handler(epoch, release.clone(), runs.clone()))
        })
        .collect();
    let slow_key = uuid::Uuid::new_v4().to_string();
    let paced_key = uuid::Uuid::new_v4().to_string();

    // The slow request holds its key; its duplicates wait for its head, each on its own task.
    // Its handler started, or the request was answered without it (a store error: then this
    // fails at once instead of waiting for a handler that never runs).
    let first = tokio::spawn(services[0].clone().oneshot(request(&slow_key, "slow")));
    let waiting = Instant::now();
    while runs[0].load(Ordering::SeqCst) == 0 {
        if first.is_finished() {
            let answered = first.await.unwrap().unwrap();
            let status = answered.status();
            let body = answered.into_body().collect().await.unwrap().to_bytes();
            panic!("the slow request was answered {status} without running its handler: {body:?}");
        }
        assert!(waiting.elapsed() < Duration::from_secs(10), "the slow request's handler never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let duplicates: Vec<_> = (0..DUPLICATES)
        .map(|i| {
            let service = services[i % services.len()].clone();
            let request = request(&slow_key, "slow");
            tokio::spawn(async move {
                let response = service.oneshot(request).await.unwrap();
                let replayed = response.headers().get("idempotent-replayed").is_some();
                let outcome = response.extensions().get::<Outcome>().cloned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (replayed, outcome, body)
            })
        })
        .collect();
    // Time for every duplicate to be waiting in the store (none has an answer yet).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(duplicates.iter().all(|d| !d.is_finished()), "the duplicates wait for the slow request");

    // The paced stream on another key, and a duplicate that joins it on the last replica.
    let original = services[0].clone().oneshot(request(&paced_key, "paced")).await.unwrap();
    assert_eq!(original.status(), StatusCode::OK);
    let reading_original = tokio::spawn(read_paced(epoch, original.into_body()));
    let joined = services[services.len() - 1].clone().oneshot(request(&paced_key, "paced")).await.unwrap();
    assert_eq!(joined.extensions().get::<Outcome>(), Some(&Outcome::Joined));
    let (joined_ids, joined_latest) = read_paced(epoch, joined.into_body()).await;
    let (original_ids, _) = reading_original.await.unwrap();
    let all: Vec<u64> = (0..EVENTS).collect();
    assert_eq!(original_ids, all);
    assert_eq!(joined_ids, all, "the joined stream has every event once, in order");
    assert!(
        joined_latest <= WITHIN,
        "with {DUPLICATES} duplicates waiting on another key, a joined event arrived {joined_latest:?} after it was produced"
    );
    assert!(duplicates.iter().all(|d| !d.is_finished()), "the duplicates still wait");

    // The slow request answers: every duplicate gets its response.
    release.notify_one();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "slow done");
    for duplicate in duplicates {
        let (replayed, outcome, body) =
            tokio::time::timeout(Duration::from_secs(10), duplicate).await.unwrap().unwrap();
        assert!(replayed, "{outcome:?}");
        assert_eq!(body, "slow done");
    }
    assert_eq!((runs[0].load(Ordering::SeqCst), runs[1].load(Ordering::SeqCst)), (1, 1), "each handler ran once");
    eprintln!("a joined event arrived at most {joined_latest:?} after its production, {DUPLICATES} duplicates waiting");
}

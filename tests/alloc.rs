//! The bypass path allocates nothing beyond the inner service's own work: counted with a
//! counting global allocator (`allocation-counter`), layered vs bare, in the same process.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::IdempotencyLayer;

fn handler<B: Send + 'static>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send + 'static>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_req: Request<B>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Allocations made by sending `request` through `service`, after one warm-up call.
fn allocations<S, B>(service: S, request: impl Fn() -> Request<B>) -> u64
where
    S: Service<Request<B>> + Clone,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let run = |req: Request<B>| {
        let svc = service.clone();
        let _ = runtime.block_on(async move { svc.oneshot(req).await.ok() });
    };
    run(request());
    let req = request();
    let svc = service.clone();
    allocation_counter::measure(|| {
        let _ = runtime.block_on(svc.oneshot(req));
    })
    .count_total
}

fn req(method: Method, key: Option<&'static str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri("/orders");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

#[test]
fn the_bypass_path_allocates_nothing() {
    let layer = IdempotencyLayer::new();
    for (case, method, key) in
        [("no key", Method::POST, None), ("uncovered method", Method::GET, Some("k")), ("PUT", Method::PUT, Some("k"))]
    {
        let bare = allocations(handler(), || req(method.clone(), key));
        let layered = allocations(layer.layer(handler()), || req(method.clone(), key));
        assert_eq!(layered, bare, "{case}: the layer added {} allocations", layered as i64 - bare as i64);
    }
    // And the counter does count: the guarded path allocates.
    let guarded = allocations(layer.layer(handler()), || req(Method::POST, Some("k")));
    assert!(guarded > allocations(handler(), || req(Method::POST, Some("k"))));
}

/// Allocations made by one guarded request (a fresh key) whose handler takes `takes` of
/// paused tokio time: the fewest of three, after warm-up requests that start the layer's
/// background tasks and give every shard of the store's map its table. (The handler answers
/// `500`, so no record stays behind to grow a shard: which shard a key lands in is random per
/// store, and a shard's first table or a growing one would be counted.)
fn guarded_allocations(takes: std::time::Duration) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let slow = tower::service_fn(move |_req: Request<tower_idempotency::RequestBody<Full<Bytes>>>| async move {
        tokio::time::sleep(takes).await;
        let mut response = Response::new(Full::new(Bytes::from_static(b"not recorded")));
        *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        Ok::<_, Infallible>(response)
    });
    let svc = IdempotencyLayer::new().with_lease(std::time::Duration::from_secs(30)).layer(slow);
    let keyed = |n: usize| {
        let key: &'static str = format!("key-{n}").leak();
        req(Method::POST, Some(key))
    };
    for n in 0..64 {
        let _ = runtime.block_on(svc.clone().oneshot(keyed(n)));
    }
    (100..103)
        .map(|n| {
            let request = keyed(n);
            allocation_counter::measure(|| {
                let _ = runtime.block_on(svc.clone().oneshot(request));
            })
            .count_total
        })
        .min()
        .unwrap()
}

#[test]
fn lease_renewal_costs_nothing_until_a_request_outlives_its_first_renewal_period() {
    // A 30 s lease is renewed 10 s after it was taken (checked every 5 s).
    let fast = guarded_allocations(std::time::Duration::from_secs(1));
    let within = guarded_allocations(std::time::Duration::from_secs(9));
    let renewed = guarded_allocations(std::time::Duration::from_secs(16));
    assert_eq!(within, fast, "a request done within the first renewal period pays for renewal");
    assert!(renewed > within, "the renewal of a slow request is not counted ({renewed} vs {within})");
}

/// SPEC 2.9: joiners share one buffer. A 1 MiB stream in flight (16 chunks of 64 KiB, all
/// produced), then 100 joiners that each receive all of it at once: the bytes they allocate
/// between them are a small fraction of one copy of the stream, let alone of 100.
#[test]
fn a_hundred_joiners_of_a_1_mib_stream_share_its_bytes() {
    use http_body_util::{BodyExt, StreamBody};
    use tower_idempotency::InFlight;

    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 16;
    const JOINERS: usize = 100;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let (chunks, receiver) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let receiver = std::sync::Arc::new(std::sync::Mutex::new(Some(receiver)));
    let handler = tower::service_fn(move |_req: Request<_>| {
        let receiver = receiver.lock().unwrap().take().expect("one execution");
        async move {
            let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
                let chunk = receiver.recv().await?;
                Some((Ok::<_, Infallible>(http_body::Frame::data(chunk)), receiver))
            });
            Ok::<_, Infallible>(Response::new(StreamBody::new(Box::pin(stream))))
        }
    });
    let layer = IdempotencyLayer::new()
        .with_in_flight(InFlight::join())
        .with_max_record(2 * CHUNK * CHUNKS)
        .with_max_waiters(JOINERS);
    let service = layer.layer(handler);
    let request = || req(Method::POST, Some("stream"));
    let mut first = runtime.block_on(service.clone().oneshot(request())).unwrap().into_body();
    for i in 0..CHUNKS {
        chunks.send(Bytes::from(vec![i as u8; CHUNK])).unwrap();
        let frame = runtime.block_on(first.frame()).unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), CHUNK);
    }
    let mut joiners = Vec::new();
    let info = allocation_counter::measure(|| {
        runtime.block_on(async {
            for _ in 0..JOINERS {
                let mut joined = service.clone().oneshot(request()).await.unwrap().into_body();
                let mut received = 0;
                while received < CHUNK * CHUNKS {
                    received += joined.frame().await.unwrap().unwrap().into_data().unwrap().len();
                }
                joiners.push(joined);
            }
        });
    });
    let stream = (CHUNK * CHUNKS) as u64;
    println!(
        "{JOINERS} joiners of a {} KiB stream allocated {} KiB at the peak ({} B per joiner)",
        stream / 1024,
        info.bytes_max / 1024,
        info.bytes_max / JOINERS as u64
    );
    assert!(info.bytes_max < stream / 4, "joiners copied the stream: {} bytes at the peak", info.bytes_max);
    // And they follow it to its end.
    drop(chunks);
    let rest = runtime.block_on(async {
        while first.frame().await.is_some() {}
        let mut ends = 0;
        for joined in &mut joiners {
            ends += usize::from(joined.frame().await.is_none());
        }
        ends
    });
    assert_eq!(rest, JOINERS, "every joined body ends when the first does");
}

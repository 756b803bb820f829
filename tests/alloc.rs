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

/// Transactional mode takes the same path: a method it does not cover passes through
/// untouched, allocating nothing (no database is needed to see it: the pool never connects).
#[cfg(feature = "postgres")]
#[test]
fn the_transactional_pass_through_allocates_nothing() {
    use tower_idempotency::store::{PostgresStore, sqlx::postgres::PgPoolOptions};

    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let pool =
        runtime.block_on(async { PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap() });
    let layer = IdempotencyLayer::from_store(PostgresStore::new(pool)).transactional();
    for (case, method, key) in [("uncovered method", Method::GET, Some("k")), ("PUT", Method::PUT, None)] {
        let bare = allocations(handler(), || req(method.clone(), key));
        let layered = allocations(layer.layer(handler()), || req(method.clone(), key));
        assert_eq!(layered, bare, "{case}: transactional mode added {} allocations", layered as i64 - bare as i64);
    }
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
    // Far more keys than the map has shards (16 per core), so every shard has its table.
    for n in 0..8192 {
        let _ = runtime.block_on(svc.clone().oneshot(keyed(n)));
    }
    (10_000..10_003)
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

/// Allocations of one first request with a key (executed and recorded) through the layer,
/// beyond those of the same request through the bare handler: the fewest of five, after
/// warm-up requests that start the layer's background tasks and grow the store's tables.
///
/// What is left, and why it stays (the README's "Allocations" lists the same):
///
/// | # | what | why |
/// | --- | --- | --- |
/// | 1 | the key's own copy (`IdempotencyKey`) | the request's headers belong to the handler |
/// | 2 | the boxed guarded future | an `async` block, which stable Rust cannot name in `Service::Future` |
/// | 3 | the guard's `Arc` | shared with the lease keeper, which renews it from its own task |
/// | 4 | the handler's future, boxed | it moves onto the runtime if the client leaves (detach) |
/// | 5, 6 | the recorded header map (`http`'s index table and entries) | the record's own headers: the response's go to the client |
/// | 7 | the response body, pinned in a box | polled once before the head goes out (read-ahead), then moved into the response |
/// | 8 | the recording's state, boxed | inline, it would make `ResponseBody` 688 bytes instead of 176 on every path, the bypass included, and it is moved several times on its way to the server |
/// | 9 | the record (`Arc<StoredResponse>`) | `Record::Response` is shared by the store API |
/// | 10 | the record's write, boxed | the store's future, behind the type-erased lock |
/// | 11 | the record's one encoded buffer in `MemoryStore` | what the store keeps |
/// | 12–14 | `Outcome` in the response's extensions | `http::Extensions` boxes its map, its table and each value |
///
/// Before this count was kept there were 16: the recording's chunk list (the first chunk is
/// now kept inline, and most bodies are one chunk) and a second copy of the encoded record
/// (`MemoryStore` now encodes into a buffer of the exact size, which `Bytes` takes over). An
/// inner service whose clone allocates (axum's `Route` is boxed) adds its clone: tower's rule
/// is that the readied instance goes with the request and a clone stays behind.
fn first_request_allocations(layered: bool) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    fn created<B>() -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|_req: Request<B>| async {
            let mut response = Response::new(Full::new(Bytes::from_static(br#"{"id":"ord_1","status":"created"}"#)));
            *response.status_mut() = http::StatusCode::CREATED;
            let headers = response.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            headers.insert(http::header::LOCATION, http::HeaderValue::from_static("/orders/ord_1"));
            Ok::<_, Infallible>(response)
        })
    }
    let keyed = |n: usize| {
        Request::post("/orders")
            .header(http::header::AUTHORIZATION, "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc")
            .header("idempotency-key", format!("first-request-{n:024}"))
            .body(Full::new(Bytes::from_static(br#"{"sku":"A1","quantity":2}"#)))
            .unwrap()
    };
    let measure = |send: &dyn Fn(Request<Full<Bytes>>)| {
        for n in 0..2_000 {
            send(keyed(n));
        }
        (10_000..10_005)
            .map(|n| {
                let request = keyed(n);
                allocation_counter::measure(|| send(request)).count_total
            })
            .min()
            .unwrap()
    };
    if layered {
        let svc = IdempotencyLayer::new().layer(created());
        measure(&|request| {
            let response = runtime.block_on(svc.clone().oneshot(request)).unwrap();
            assert_eq!(response.status(), http::StatusCode::CREATED);
            let body = runtime.block_on(http_body_util::BodyExt::collect(response.into_body())).unwrap();
            assert!(!body.to_bytes().is_empty());
        })
    } else {
        measure(&|request| {
            let response = runtime.block_on(created().oneshot(request)).unwrap();
            let body = runtime.block_on(http_body_util::BodyExt::collect(response.into_body())).unwrap();
            assert!(!body.to_bytes().is_empty());
        })
    }
}

#[test]
fn a_first_request_allocates_only_what_it_must() {
    let (bare, layered) = (first_request_allocations(false), first_request_allocations(true));
    println!("a first request with a key: {bare} allocations bare, {layered} through the layer");
    assert_eq!(layered - bare, FIRST_REQUEST_ALLOCATIONS, "bare {bare}, layered {layered}");
}

/// The layer's allocations per first request; each is listed above.
const FIRST_REQUEST_ALLOCATIONS: u64 = 14;

#[test]
fn lease_renewal_costs_nothing_until_a_request_outlives_its_first_renewal_period() {
    // A 30 s lease is renewed 10 s after it was taken (checked every 5 s).
    let fast = guarded_allocations(std::time::Duration::from_secs(1));
    let within = guarded_allocations(std::time::Duration::from_secs(9));
    let renewed = guarded_allocations(std::time::Duration::from_secs(16));
    assert_eq!(within, fast, "a request done within the first renewal period pays for renewal");
    assert!(renewed > within, "the renewal of a slow request is not counted ({renewed} vs {within})");
}

/// Guide, step 9: joiners share one buffer. A 1 MiB stream in flight (16 chunks of 64 KiB, all
/// produced), then 100 joiners that each receive all of it at once: the bytes they allocate
/// between them are a small fraction of one copy of the stream, let alone of 100.
#[test]
fn a_hundred_joiners_of_a_1_mib_stream_share_its_bytes() {
    use http_body_util::{BodyExt, StreamBody};
    use tower_idempotency::Duplicates;

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
        .with_duplicates(Duplicates::join())
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

/// What a live log of `MemoryStore` holds, measured by the allocator, against what the store
/// counts in its byte bound: per event and per byte, for token-sized and larger events.
#[test]
fn a_memory_live_log_holds_what_the_store_counts() {
    use tower_idempotency::{
        IdempotencyKey,
        store::{Begin, Fingerprint, IdempotencyStore, LiveEvent, LiveLog, MemoryStore, StoreKey},
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    for (events, size) in [(10_000usize, 5usize), (10_000, 20), (2_000, 500)] {
        let store = MemoryStore::builder().with_max_live_log(usize::MAX).build();
        let key = StoreKey::new(None, IdempotencyKey::parse(b"a-live-log").unwrap());
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let Ok(Begin::Execute(token)) =
            runtime.block_on(store.begin(&key, &fingerprint, std::time::Duration::from_secs(60)))
        else {
            panic!("a free key")
        };
        let before = store.bytes();
        // Published as the layer does: a batch at a time (16 events), each event's bytes its own.
        let held = allocation_counter::measure(|| {
            runtime.block_on(async {
                for from in (0..events).step_by(16) {
                    let batch = (from..(from + 16).min(events))
                        .map(|_| LiveEvent::Data(Bytes::from(vec![b'x'; size])))
                        .collect();
                    store.publish(&key, &token, from as u64, batch).await.unwrap();
                }
            })
        })
        .bytes_current as u64;
        let counted = (store.bytes() - before) as u64;
        let body = (events * size) as u64;
        let per_event = (held - body) as f64 / events as f64;
        println!(
            "{events} events of {size} bytes: the log holds {held} bytes ({per_event:.1} per event beyond its \
             bytes, {:.2}x the body); the store counts {counted}",
            held as f64 / body as f64
        );
        assert!(counted >= held, "the store counts {counted} bytes, the log holds {held}");
        assert!(counted <= held + held / 4, "the store counts {counted} bytes, the log holds {held}");
        assert!(runtime.block_on(store.release(&key, &token)).unwrap());
        assert_eq!(store.bytes(), 0, "the ended log is no longer counted");
    }
}

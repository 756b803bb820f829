//! What join mode costs the request that produces a stream, on `RedisStore`: the time to the
//! last byte of a streamed response (20 chunks, the handler yielding between them) in reject
//! mode (nothing published), in join mode with no joiner (every chunk published, pipelined,
//! never waited for), and in join mode with 4 joiners following it, in the same run.
//!
//! Run with: `cargo bench --bench join_stream --features redis` (Redis at `REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Report the ratios of the three, not the times.
// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::runtime::Runtime;
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyLayer, Duplicates, RequestBody, store::RedisStore};

const CHUNKS: usize = 20;

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/complete").header("idempotency-key", key).body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let store =
        rt.block_on(async { RedisStore::builder().with_prefix("bench-join:").connect(url.as_str()).await }).unwrap();
    let handler = service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
        let stream = futures_util::stream::iter(0..CHUNKS).then(|i| async move {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(format!("id: {i}\ndata: {}\n\n", "t".repeat(40)))))
        });
        let response =
            Response::builder().header("content-type", "text/event-stream").body(StreamBody::new(Box::pin(stream)));
        Ok::<_, Infallible>(response.unwrap())
    });
    let layer = IdempotencyLayer::from_store(store).with_max_waiters(8);
    let reject = layer.layer(handler);
    let join = layer.clone().with_duplicates(Duplicates::join()).layer(handler);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = AtomicU64::new(0);
    let key = || format!("{run}-{}", next.fetch_add(1, Ordering::Relaxed));
    let mut group = c.benchmark_group("join_stream");
    group.sample_size(30).measurement_time(Duration::from_secs(5));
    for (name, service, joiners) in
        [("reject", &reject, 0), ("join, no joiner", &join, 0), ("join, 4 joiners", &join, 4)]
    {
        group.bench_function(format!("time to last byte: {name}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (service, key) = (service.clone(), &key);
                let keys: Vec<String> = (0..iters).map(|_| key()).collect();
                async move {
                    let mut total = Duration::ZERO;
                    for key in keys {
                        let started = Instant::now();
                        let mut body = service.clone().oneshot(request(&key)).await.unwrap().into_body();
                        body.frame().await.unwrap().unwrap();
                        let followers: Vec<_> = (0..joiners)
                            .map(|_| {
                                let (service, key) = (service.clone(), key.clone());
                                tokio::spawn(async move {
                                    let joined = service.oneshot(request(&key)).await.unwrap();
                                    joined.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0)
                                })
                            })
                            .collect();
                        while body.frame().await.is_some() {}
                        total += started.elapsed();
                        for follower in followers {
                            follower.await.unwrap();
                        }
                    }
                    total
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

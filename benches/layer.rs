//! What the layer costs, in process, against the same router without it.
//!
//! Run with: `cargo bench --bench layer` (about a minute and a half), or
//! `scripts/bench-ratios.sh`, which runs it and prints each path's ratio to the bare router.
//!
//! Three groups:
//!
//! - `paths`: an axum 0.8 router with one `POST /orders` handler (parse a ~200-byte JSON body,
//!   answer `201` with ~300 bytes), bare and behind `IdempotencyLayer::new()`, driven through
//!   `tower::ServiceExt::oneshot` on a current-thread runtime, the response body read to its end.
//!   Every path of the layer is in this one group, so the ratios come from one run.
//! - `fingerprint`: a request through the layer up to the store (a probe answering `409`), by
//!   body size, against a raw SHA-256 of the same bytes.
//! - `memory_store`: `MemoryStore` operations on one thread, and on several threads at once
//!   with one hot key or distinct keys (throughput in operations per second).
//!
//! Requests are built outside the timed part (`iter_batched`). Every request carries an
//! `Authorization` header, as an API's requests do, so the default scope hashes it.

// `criterion_group!` makes an undocumented `pub fn`.
#![allow(missing_docs)]

use std::{
    hint::black_box,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use axum::http::{HeaderValue, Request, StatusCode, header};
use bytes::Bytes;
use common::{AUTHORIZATION, Path, probe::Probe, routers, runtime, send};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, ScopeId,
    store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, Record, StoreKey, StoredResponse},
};

mod common;

// --- group 1: the bare router against every path of the layer ---------------------------------

fn paths(c: &mut Criterion) {
    let rt = runtime();
    let routers = routers(&rt, MemoryStore::new());
    let mut group = c.benchmark_group("paths");
    for path in Path::ALL {
        let router = path.router(&routers);
        group.bench_function(path.name(), |b| {
            b.to_async(&rt).iter_batched(
                || path.request(),
                |request| async move { black_box(send(router, request).await) },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

// --- group 2: fingerprinting against raw SHA-256 -----------------------------------------------

/// A request whose body is `size` bytes goes through the layer up to the store (a probe that
/// answers "in flight", so nothing is kept or run): buffering, fingerprinting and the `409`.
/// Against a raw SHA-256 of the same bytes, the difference is what the layer adds per byte.
fn fingerprint(c: &mut Criterion) {
    let rt = runtime();
    let handler = tower::service_fn(|_: Request<_>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
    });
    let layered = tower::Layer::layer(&IdempotencyLayer::from_store(Probe::default()), handler);
    let mut group = c.benchmark_group("fingerprint");
    for size in [200, 64 * 1024, 1024 * 1024] {
        let body = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("sha256", size), &body, |b, body| {
            b.iter(|| black_box(Sha256::digest(black_box(body))))
        });
        group.bench_with_input(BenchmarkId::new("layer_to_store", size), &body, |b, body| {
            b.to_async(&rt).iter_batched(
                || {
                    Request::post("/orders?source=bench")
                        .header("idempotency-key", "fingerprint-bench")
                        .body(http_body_util::Full::new(body.clone()))
                        .unwrap()
                },
                |request| {
                    let layered = layered.clone();
                    async move {
                        let response = tower::ServiceExt::oneshot(layered, request).await.unwrap();
                        assert_eq!(response.status(), StatusCode::CONFLICT);
                        black_box(response)
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

// --- group 3: MemoryStore ------------------------------------------------------------------------

/// Polls a store future once: `MemoryStore` answers on the first poll.
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("MemoryStore never waits"),
    }
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 3600);

fn store_key(n: u64) -> StoreKey {
    let key: IdempotencyKey = format!("store-bench-{n:024}").parse().unwrap();
    StoreKey::new(Some(ScopeId::digest(AUTHORIZATION)), key)
}

fn fingerprint_of(n: u64) -> Fingerprint {
    Fingerprint::from_bytes(Sha256::digest(n.to_be_bytes()).into())
}

/// A ~300-byte response with two headers, shared by every record.
fn record() -> Record {
    let mut headers = http::HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::LOCATION, HeaderValue::from_static("/orders/ord_1"));
    let body = Bytes::from(vec![b'x'; 300]);
    Record::Response(Arc::new(StoredResponse::new(StatusCode::CREATED, headers, body)))
}

/// Locks `key` and completes it with `record`: the store's share of a miss.
fn begin_complete(store: &MemoryStore, key: &StoreKey, fingerprint: &Fingerprint, record: &Record) {
    let begin = now(store.begin(key, fingerprint, LEASE));
    let Ok(Begin::Execute(token)) = begin else { panic!("key was not free: {begin:?}") };
    assert!(now(store.complete(key, &token, record.clone(), TTL)).unwrap());
}

/// A store holding `n` completed records, keys `0..n`.
fn filled_store(n: u64, record: &Record) -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..n {
        begin_complete(&store, &store_key(i), &fingerprint_of(0), record);
    }
    store
}

/// Runs `op(thread, i)` for `i` in `0..iters` on each of `threads` threads at once; the wall
/// time from the first thread's start to the last one's end.
fn on_threads(threads: usize, iters: u64, op: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    (began, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let began = spans.iter().map(|s| s.0).min().unwrap();
        let ended = spans.iter().map(|s| s.1).max().unwrap();
        // Never zero: criterion rejects a sample that took no time.
        (ended - began).max(Duration::from_nanos(1))
    })
}

/// `threads` threads each lock and complete keys no other thread uses, thread `t` in
/// `stores[t % stores.len()]` (one store shared by all, or one each), each with a record of its
/// own as every request has; throughput in operations over all threads.
fn distinct_keys(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    threads: usize,
    stores: &[MemoryStore],
    round: &AtomicU64,
) {
    group.bench_function(BenchmarkId::new(name, threads), |b| {
        b.iter_custom(|iters| {
            let base = round.fetch_add(1, Ordering::Relaxed) << 32;
            let keys: Vec<Vec<StoreKey>> =
                (0..threads as u64).map(|t| (0..iters).map(|i| store_key(base | t << 28 | i)).collect()).collect();
            let records: Vec<Record> = (0..threads).map(|_| record()).collect();
            on_threads(threads, iters, &|t, i| {
                begin_complete(&stores[t % stores.len()], &keys[t][i as usize], &fingerprint_of(0), &records[t]);
            })
        })
    });
}

fn memory_store(c: &mut Criterion) {
    let record = record();
    let mut group = c.benchmark_group("memory_store");

    // One thread. A miss: begin on a new key, then complete it. The store sits at its bound
    // (100 000 entries) after the first samples, so each miss also evicts the oldest record.
    let store = MemoryStore::new();
    let next = AtomicU64::new(1 << 40);
    group.bench_function("begin_complete_new_key", |b| {
        b.iter_batched(
            || store_key(next.fetch_add(1, Ordering::Relaxed)),
            |key| begin_complete(&store, &key, &fingerprint_of(0), &record),
            BatchSize::SmallInput,
        )
    });
    let store = filled_store(1024, &record);
    let hot = store_key(7);
    group.bench_function("begin_completed_key", |b| {
        b.iter(|| black_box(now(store.begin(&hot, &fingerprint_of(0), LEASE)).unwrap()))
    });
    let locked = store_key(1 << 50);
    let Ok(Begin::Execute(_token)) = now(store.begin(&locked, &fingerprint_of(0), TTL)) else { unreachable!() };
    group.bench_function("begin_in_flight_key", |b| {
        b.iter(|| black_box(now(store.begin(&locked, &fingerprint_of(0), LEASE)).unwrap()))
    });

    // Several threads at once; throughput is in store operations per second over all threads.
    for threads in [1, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        // Every thread replays the same key.
        let store = filled_store(1024, &record);
        let hot = store_key(7);
        group.bench_function(BenchmarkId::new("replay_one_hot_key", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|_, _| {
                    black_box(now(store.begin(&hot, &fingerprint_of(0), LEASE)).unwrap());
                })
            })
        });
        // Every thread replays its own keys, spread over the map.
        let keys: Vec<StoreKey> = (0..1024).map(store_key).collect();
        group.bench_function(BenchmarkId::new("replay_many_keys", threads), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|t, i| {
                    let key = &keys[(i as usize * 7 + t * 512) % keys.len()];
                    black_box(now(store.begin(key, &fingerprint_of(0), LEASE)).unwrap());
                })
            })
        });
        // Every thread locks and completes keys no other thread uses (below the store's bound:
        // this measures the map, not eviction).
        let unbounded = [MemoryStore::builder().with_max_entries(usize::MAX / 2).build()];
        // From 1: round 0 would reuse the keys of `filled_store`.
        let round = AtomicU64::new(1);
        distinct_keys(&mut group, "begin_complete_distinct_keys", threads, &unbounded, &round);
        // The same at the store's bound (100 000 entries, the default): every completion also
        // evicts the oldest record, wherever its eviction queue is.
        let full = [filled_store(100_000, &record)];
        distinct_keys(&mut group, "begin_complete_distinct_keys_at_bound", threads, &full, &round);
        // The reference for the two above: the same work with nothing shared, each thread on a
        // store of its own at the bound. What the machine gives two threads that share nothing
        // is the most a shared store can scale to here.
        let own: Vec<MemoryStore> = (0..threads).map(|_| filled_store(100_000, &record)).collect();
        distinct_keys(&mut group, "begin_complete_own_store_at_bound", threads, &own, &round);
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = paths, fingerprint, memory_store }
criterion_main!(benches);

//! Store operations per request: `MemoryStore` against `RedisStore`, in the same run.
//!
//! Run with: `cargo bench --bench store --features redis` (the Redis part runs when
//! `REDIS_URL`, or `redis://127.0.0.1:6379`, answers; without the feature only `MemoryStore`).
//!
//! What one request costs in store round trips (the Redis figures are network round trips,
//! each one `EVALSHA`; `MemoryStore` makes none):
//!
//! - miss (first request with a key): `begin` + `complete` = 2 round trips;
//! - replay (a retry of a completed request): `begin` = 1 round trip;
//! - plus, while a slow handler runs, one `renew` per lease/3 (not measured here).
// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::runtime::Runtime;
use tower_idempotency::{
    IdempotencyKey,
    store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, Record, StoreKey, StoredResponse},
};

const LEASE: Duration = Duration::from_secs(30);
/// Short, so the keys a Redis run leaves behind are gone within seconds.
const TTL: Duration = Duration::from_secs(10);

/// A JSON API response: two headers and a body of `body_len` bytes.
fn record(body_len: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("location", HeaderValue::from_static("/orders/ord_1"));
    let body = Bytes::from(vec![b'x'; body_len]);
    Record::Response(Arc::new(StoredResponse::new(StatusCode::CREATED, headers, body)))
}

/// Fresh keys: a miss needs a key nobody used.
struct Keys {
    run: String,
    next: AtomicU64,
}

impl Keys {
    fn new() -> Self {
        Self { run: uuid::Uuid::new_v4().simple().to_string(), next: AtomicU64::new(0) }
    }

    fn fresh(&self) -> StoreKey {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        StoreKey::new(None, IdempotencyKey::parse(format!("{}-{n}", self.run).as_bytes()).unwrap())
    }
}

/// A completed key, for replays.
async fn completed<S: IdempotencyStore>(store: &S, keys: &Keys, body_len: usize) -> StoreKey {
    let key = keys.fresh();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let Begin::Execute(token) = store.begin(&key, &fingerprint, LEASE).await.unwrap() else { panic!("fresh key") };
    // Long enough to outlive the measurement.
    assert!(store.complete(&key, &token, record(body_len), Duration::from_secs(120)).await.unwrap());
    key
}

/// The operations of one request, by kind.
#[derive(Clone, Copy)]
enum Op {
    /// The first request with a key: `begin` locks, `complete` records.
    Miss,
    /// A retry of a completed request with a body of this many bytes: `begin` returns it.
    Replay(usize),
}

impl Op {
    fn name(self) -> String {
        match self {
            Self::Miss => "miss: begin + complete".to_owned(),
            Self::Replay(len) => format!("replay: begin, {len}-byte body"),
        }
    }

    #[cfg(feature = "redis")]
    fn round_trips(self) -> &'static str {
        match self {
            Self::Miss => "2 round trips",
            Self::Replay(_) => "1 round trip",
        }
    }
}

fn bench_store<S: IdempotencyStore>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    op: Op,
    name: &str,
    store: &S,
) {
    let keys = Keys::new();
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    match op {
        Op::Miss => group.bench_function(name, |b| {
            b.to_async(rt).iter(|| async {
                let key = keys.fresh();
                let Begin::Execute(token) = store.begin(&key, &fingerprint, LEASE).await.unwrap() else {
                    panic!("fresh key")
                };
                assert!(store.complete(&key, &token, record(200), TTL).await.unwrap());
            })
        }),
        Op::Replay(body_len) => {
            let key = rt.block_on(completed(store, &keys, body_len));
            group.bench_function(name, |b| {
                b.to_async(rt).iter(|| async {
                    let Begin::Completed(_) = store.begin(&key, &fingerprint, LEASE).await.unwrap() else {
                        panic!("completed key")
                    };
                })
            })
        }
    };
}

#[cfg(feature = "redis")]
fn redis_store(rt: &Runtime) -> Option<tower_idempotency::store::RedisStore> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("idem-bench:{}:", uuid::Uuid::new_v4().simple());
    match rt.block_on(tower_idempotency::store::RedisStore::builder().with_prefix(prefix).connect(url.as_str())) {
        Ok(store) => Some(store),
        Err(error) => {
            println!("skipping the RedisStore benches: no Redis at {url} ({error})");
            None
        }
    }
}

fn store_ops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let memory = MemoryStore::new();
    #[cfg(feature = "redis")]
    let redis = redis_store(&rt);
    #[cfg(not(feature = "redis"))]
    println!("RedisStore benches need `--features redis`");
    for op in [Op::Miss, Op::Replay(200), Op::Replay(64 * 1024)] {
        let mut group = c.benchmark_group(op.name());
        group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        bench_store(&mut group, &rt, op, "MemoryStore", &memory);
        #[cfg(feature = "redis")]
        if let Some(redis) = &redis {
            bench_store(&mut group, &rt, op, &format!("RedisStore ({})", op.round_trips()), redis);
        }
        group.finish();
    }
}

criterion_group!(benches, store_ops);
criterion_main!(benches);

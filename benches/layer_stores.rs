//! Miss and replay through the layer, by store: `MemoryStore`, `RedisStore`, `PostgresStore`,
//! in the same run.
//!
//! Run with: `cargo bench --bench layer_stores --features redis,postgres` (needs Redis at
//! `REDIS_URL`, default `redis://127.0.0.1:6379`, and PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; it fails when either does not answer).
//!
//! Each request goes through `IdempotencyLayer` around a handler answering `201` with a
//! 200-byte JSON body, the response read to its end. A miss costs the store `begin` +
//! `complete` (2 round trips for Redis and PostgreSQL), a replay `begin` (1).
// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{
    IdempotencyLayer, RequestBody,
    store::{IdempotencyStore, MemoryStore, PostgresStore, RedisStore, sqlx},
};

fn handler()
-> impl Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_request: Request<RequestBody<Full<Bytes>>>| async {
        let body = Bytes::from(format!("{{\"id\":\"ord_1\",\"order\":\"{}\"}}", "x".repeat(170)));
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = StatusCode::CREATED;
        response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
        Ok(response)
    })
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"sku":"A1","quantity":2}"#)))
        .unwrap()
}

fn bench<St: IdempotencyStore>(c: &mut Criterion, rt: &Runtime, name: &str, store: St) {
    let service = IdempotencyLayer::from_store(store).layer(handler());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("layer_stores");
    group.bench_function(format!("{name}: miss"), |b| {
        b.to_async(rt).iter(|| async {
            let key = format!("{run}-{}", next.fetch_add(1, Ordering::Relaxed));
            let response = service.clone().oneshot(request(&key)).await.unwrap();
            assert_eq!(response.status(), StatusCode::CREATED);
            response.into_body().collect().await.unwrap();
        })
    });
    let replayed = format!("{run}-replayed");
    rt.block_on(async { service.clone().oneshot(request(&replayed)).await.unwrap().into_body().collect().await })
        .unwrap();
    group.bench_function(format!("{name}: replay"), |b| {
        b.to_async(rt).iter(|| async {
            let response = service.clone().oneshot(request(&replayed)).await.unwrap();
            assert!(response.headers().contains_key("idempotent-replayed"));
            response.into_body().collect().await.unwrap();
        })
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    bench(c, &rt, "memory", MemoryStore::new());

    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("idem-bench:{}:", uuid::Uuid::new_v4().simple());
    let redis = rt.block_on(RedisStore::builder().with_prefix(prefix).connect(url.as_str())).expect("Redis answers");
    bench(c, &rt, "redis", redis);

    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("idem_bench_{}", uuid::Uuid::new_v4().simple());
    let pool = rt
        .block_on(sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(&url))
        .expect("PostgreSQL answers");
    let create = format!("CREATE SCHEMA {schema}");
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&pool)).unwrap();
    let postgres = PostgresStore::builder().with_schema(&schema).build(pool.clone());
    rt.block_on(postgres.migrate()).unwrap();
    bench(c, &rt, "postgres", postgres);
    let drop = format!("DROP SCHEMA {schema} CASCADE");
    rt.block_on(sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&pool)).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = stores
}
criterion_main!(benches);

//! Memory per stored record, and allocations per request on each path, counted with the
//! `allocation-counter` allocator (requested bytes, before the system allocator's rounding).
//!
//! Run with: `cargo bench --bench memory` (a few seconds; no timing, so no noise).
//!
//! - **Memory per record**: `RECORDS` first requests with a key through the layered router
//!   (the default `MemoryStore`, half full), then the bytes still held
//!   once their responses are dropped, per record, less the record's body and header bytes
//!   (`StoredResponse::weight`). What remains is the cost of keeping a record: the store's
//!   entry, its slot in the eviction queue, the record's framing. The store is also measured
//!   alone: `MemoryStore::begin` and `complete` of records made beforehand.
//! - **Allocations per request** on every path of the `paths` benchmark group, against the bare
//!   router.

#![allow(missing_docs)]

mod common;

use std::{sync::Arc, time::Duration};

use allocation_counter::measure;
use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use common::{Path, routers, runtime, send};
use tower_idempotency::{
    IdempotencyKey, ScopeId,
    store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, Record, StoreKey, StoredResponse},
};

/// Records stored: half the default `MemoryStore` bound, so none is evicted.
const RECORDS: u64 = 50_000;
/// Requests per path for the allocation counts.
const REQUESTS: u64 = 1_000;

fn main() {
    let rt = runtime();
    per_record_through_the_layer(&rt);
    per_record_in_the_store(&rt);
    allocations_per_request(&rt);
}

fn per_record_through_the_layer(rt: &tokio::runtime::Runtime) {
    let store = MemoryStore::new();
    let routers = routers(rt, store.clone());
    let (before_len, before_bytes) = (store.len() as u64, store.bytes() as u64);
    // Everything is made and dropped inside the measurement (a free of something made before
    // it would count as negative), so what it still holds at the end is what the store keeps.
    let info = measure(|| {
        rt.block_on(async {
            for _ in 0..RECORDS {
                let (status, _body) = send(&routers.layered, Path::Miss.request()).await;
                assert_eq!(status, StatusCode::CREATED);
            }
        })
    });
    let records = store.len() as u64 - before_len;
    assert_eq!(records, RECORDS);
    let held = info.bytes_current as f64 / records as f64;
    let weight = (store.bytes() as u64 - before_bytes) as f64 / records as f64;
    println!("memory per record, through the layer ({records} records, default MemoryStore)");
    println!("  held per record:               {held:>7.0} bytes");
    println!("  body + header bytes (weight):  {weight:>7.0} bytes");
    println!("  beyond body and headers:       {:>7.0} bytes", held - weight);
    println!("  allocations held per record:   {:>7.1}", info.count_current as f64 / records as f64);
}

/// A response like the benchmark handler's: ~300 bytes of JSON, `Content-Type` and `Location`.
fn record(n: u64) -> Record {
    let mut headers = http::HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::LOCATION, HeaderValue::try_from(format!("/orders/ord_{n}")).unwrap());
    let body = Bytes::from(vec![b'x'; 300]);
    Record::Response(Arc::new(StoredResponse::new(StatusCode::CREATED, headers, body)))
}

fn per_record_in_the_store(rt: &tokio::runtime::Runtime) {
    let store = MemoryStore::new();
    let scope = ScopeId::digest(common::AUTHORIZATION);
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let ttl = Duration::from_secs(24 * 3600);
    let lease = Duration::from_secs(30);
    // The records alone, to subtract them: the store's share is what is held beyond them.
    let mut records = Vec::with_capacity(RECORDS as usize);
    let made = measure(|| records.extend((0..RECORDS).map(record)));
    let weight = records.iter().map(Record::weight).sum::<usize>() as f64 / RECORDS as f64;
    let info = measure(|| {
        rt.block_on(async {
            for (n, record) in records.into_iter().enumerate() {
                let key: IdempotencyKey = format!("store-{n:030}").parse().unwrap();
                let key = StoreKey::new(Some(scope), key);
                let Ok(Begin::Execute(token)) = store.begin(&key, &fingerprint, lease).await else { unreachable!() };
                assert!(store.complete(&key, &token, record, ttl).await.unwrap());
            }
        })
    });
    // The records (and the vector holding them) were made before and are freed inside as the
    // store keeps them its own way: add them back, so what remains is what the store holds.
    let vector = RECORDS as i64 * std::mem::size_of::<Record>() as i64;
    let held = (info.bytes_current + made.bytes_current + vector) as f64 / RECORDS as f64;
    println!("memory per record, MemoryStore alone ({RECORDS} records, 36-byte idempotency keys)");
    println!("  held by the store per record:  {held:>7.0} bytes (map entry, eviction queue, the record)");
    println!("  body + header bytes (weight):  {weight:>7.0} bytes");
    println!("  beyond body and headers:       {:>7.0} bytes", held - weight);
    println!("  the same record as a StoredResponse: {:.0} bytes", made.bytes_current as f64 / RECORDS as f64);
}

fn allocations_per_request(rt: &tokio::runtime::Runtime) {
    let routers = routers(rt, MemoryStore::new());
    println!("allocations per request (mean of {REQUESTS}; the response read to its end)");
    println!("  {:<18} {:>11} {:>9} {:>13}", "path", "allocations", "bytes", "vs bare_post");
    let mut bare = 0.0;
    for path in Path::ALL {
        let requests: Vec<_> = (0..REQUESTS).map(|_| path.request()).collect();
        let router = path.router(&routers);
        let info = measure(|| {
            rt.block_on(async {
                for request in requests {
                    std::hint::black_box(send(router, request).await);
                }
            })
        });
        let count = info.count_total as f64 / REQUESTS as f64;
        if path == Path::BarePost {
            bare = count;
        }
        let bytes = info.bytes_total as f64 / REQUESTS as f64;
        println!("  {:<18} {count:>11.1} {bytes:>9.0} {:>+13.1}", path.name(), count - bare);
    }
}

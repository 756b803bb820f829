//! Floods of distinct keys: the `MemoryStore` bound holds at every point, memory stays flat,
//! in-flight locks are never evicted, and after the TTL everything is reclaimed.
//!
//! CI pushes 100,000 keys through the store API (`FLOOD_KEYS=N` for another count) and 20,000
//! requests through the layer; `cargo run --release --example flood` runs the full million.

use crate::common;

#[path = "../../examples/flood.rs"]
#[allow(dead_code)]
mod example;

use std::time::Duration;

use common::{Runs, post, send, service};
use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, Outcome, store::MemoryStore};

/// RSS is the whole process's: the tests that measure it take turns.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn a_flood_of_distinct_keys_stays_within_the_bound_and_is_reclaimed() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let keys = std::env::var("FLOOD_KEYS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let f = paused_runtime().block_on(example::flood_store(keys));
    println!("{f:#?}");
    assert_eq!(f.keys, keys);
    assert!(f.max_len <= example::MAX_ENTRIES, "{} entries", f.max_len);
    assert_eq!(f.max_len, example::MAX_ENTRIES, "the store filled up, so eviction was exercised");
    // Records are the only thing with weight; at most every entry but the held locks is one.
    assert!(
        f.max_bytes <= (example::MAX_ENTRIES - example::HELD_LOCKS) * example::record_weight(),
        "{} bytes",
        f.max_bytes
    );
    assert_eq!(f.held_locks_kept, example::HELD_LOCKS, "an in-flight lock was evicted");
    assert_eq!((f.len_after_ttl, f.bytes_after_ttl), (0, 0), "everything is reclaimed after the TTL");
    // Flat memory: once the store is full, the process does not grow with the number of keys.
    // (A store that leaked a few dozen bytes per key would add several MiB here.)
    let growth = f.rss_peak_kib.saturating_sub(f.rss_warm_kib);
    assert!(f.samples >= 90 && f.rss_warm_kib > 0, "{f:?}");
    assert!(growth < 2 * 1024, "RSS grew {growth} KiB after the store filled up: {f:?}");
}

#[test]
fn a_flood_through_the_layer_never_evicts_a_running_request() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    paused_runtime().block_on(async {
        const REQUESTS: usize = 20_000;
        const BOUND: usize = 1_000;
        let store = MemoryStore::builder().with_max_entries(BOUND).build();
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::from_store(store.clone()).with_ttl(Duration::from_secs(60)), runs.clone());
        // Ten requests whose handlers run through the whole flood.
        let slow: Vec<_> = (0..10)
            .map(|i| {
                let mut request = post("/orders", &format!("slow-{i}"), "{}");
                request.headers_mut().insert("x-delay-ms", "5000".parse().unwrap());
                tokio::spawn(send(&svc, request))
            })
            .collect();
        tokio::task::yield_now().await;
        let rss_warm = example::rss_kib();
        for i in 0..REQUESTS {
            let reply = send(&svc, post("/orders", &format!("flood-{i}"), "{}")).await;
            assert_eq!(reply.outcome, Outcome::Executed, "request {i}: {reply:?}");
            assert!(store.len() <= BOUND, "{} entries after request {i}", store.len());
        }
        let growth = example::rss_kib().saturating_sub(rss_warm);
        assert!(growth < 8 * 1024, "RSS grew {growth} KiB");
        for i in 0..10 {
            let duplicate = send(&svc, post("/orders", &format!("slow-{i}"), "{}")).await;
            duplicate.assert_problem(409, "in-flight");
        }
        for (i, task) in slow.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
            let replay = send(&svc, post("/orders", &format!("slow-{i}"), "{}")).await;
            assert!(replay.replayed(), "the slow request {i} was recorded");
        }
        assert_eq!(runs.get(), REQUESTS + 10);
        tokio::time::sleep(Duration::from_secs(62)).await;
        assert_eq!((store.len(), store.bytes()), (0, 0));
    });
}

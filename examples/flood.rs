//! A flood of distinct keys through a bounded `MemoryStore`: the bound holds at every point,
//! memory stays flat, in-flight locks are never evicted, and after the TTL everything is freed.
//!
//! Run with: `cargo run --release --example flood` (1,000,000 keys; `FLOOD_KEYS=N` for another
//! count). `tests/layer/flood.rs` runs the same code with fewer keys in CI.
//!
//! Time is tokio's paused clock, so "after the TTL" costs nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_idempotency::{
    IdempotencyKey, ScopeId,
    store::{Begin, Fingerprint, IdempotencyStore, LockToken, MemoryStore, Record, StoreKey, StoredResponse},
};

/// The bound on entries the flood runs against.
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// How long records live.
pub(crate) const TTL: Duration = Duration::from_secs(60);
/// Locks held through the whole flood.
pub(crate) const HELD_LOCKS: usize = 100;
/// A lease longer than the flood, so only eviction could take a held lock away.
const LONG_LEASE: Duration = Duration::from_secs(3600);

/// What a flood measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Figures {
    /// Distinct keys pushed through.
    pub(crate) keys: usize,
    /// The most entries the store held at any point (checked after every operation).
    pub(crate) max_len: usize,
    /// The most record bytes the store accounted at any point.
    pub(crate) max_bytes: usize,
    /// Resident set size before the flood.
    pub(crate) rss_start_kib: u64,
    /// RSS once the store is warm: after the first tenth of the keys, and at least five times
    /// the bound (the map and the eviction queue have grown to their working size).
    pub(crate) rss_warm_kib: u64,
    /// The highest RSS sampled.
    pub(crate) rss_peak_kib: u64,
    /// RSS after the last key.
    pub(crate) rss_end_kib: u64,
    /// RSS samples taken.
    pub(crate) samples: usize,
    /// Held locks still held (renewable by their owner, `Duplicates` to others) after the flood.
    pub(crate) held_locks_kept: usize,
    /// Entries and bytes once the TTL passed.
    pub(crate) len_after_ttl: usize,
    /// Record bytes once the TTL passed.
    pub(crate) bytes_after_ttl: usize,
    /// Wall-clock time of the flood itself.
    pub(crate) elapsed: Duration,
}

/// The resident set size of this process in KiB, from `/proc/self/statm` (0 where there is none).
pub(crate) fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4 // 4 KiB pages on the Linux machines this runs on
}

fn record(i: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Record::Response(Arc::new(StoredResponse::new(
        StatusCode::CREATED,
        headers,
        Bytes::from(format!("{{\"id\":\"ord_{i:012}\",\"status\":\"created\",\"pad\":\"........\"}}")),
    )))
}

/// The bytes one flood record weighs in the store's accounting.
pub(crate) fn record_weight() -> usize {
    record(0).weight()
}

fn key(i: usize) -> StoreKey {
    let scope = ScopeId::digest(format!("tenant-{}", i % 3));
    StoreKey::new(Some(scope), IdempotencyKey::parse(format!("flood-{i}").as_bytes()).expect("a valid key"))
}

/// Pushes `keys` distinct keys (lock, then complete) through a store bounded at
/// [`MAX_ENTRIES`], with [`HELD_LOCKS`] locks held throughout, then lets the TTL pass.
///
/// Panics the moment the bound is broken or a held lock is lost. Call on a runtime with paused
/// time.
pub(crate) async fn flood_store(keys: usize) -> Figures {
    let store = MemoryStore::builder().with_max_entries(MAX_ENTRIES).build();
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let mut figures = Figures { keys, rss_start_kib: rss_kib(), ..Figures::default() };
    let held: Vec<(StoreKey, LockToken)> = {
        let mut held = Vec::new();
        for i in 0..HELD_LOCKS {
            let key = StoreKey::new(None, IdempotencyKey::parse(format!("held-{i}").as_bytes()).expect("valid"));
            match store.begin(&key, &fingerprint, LONG_LEASE).await {
                Ok(Begin::Execute(token)) => held.push((key, token)),
                other => panic!("a fresh key is free, got {other:?}"),
            }
        }
        held
    };
    let started = Instant::now();
    let sample_every = (keys / 100).max(1);
    for i in 0..keys {
        let key = key(i);
        let token = match store.begin(&key, &fingerprint, Duration::from_secs(30)).await {
            Ok(Begin::Execute(token)) => token,
            other => panic!("key {i} is new, got {other:?}"),
        };
        figures.max_len = figures.max_len.max(store.len());
        assert!(store.complete(&key, &token, record(i), TTL).await.expect("memory never fails"), "key {i} completes");
        let (len, bytes) = (store.len(), store.bytes());
        figures.max_len = figures.max_len.max(len);
        figures.max_bytes = figures.max_bytes.max(bytes);
        assert!(len <= MAX_ENTRIES, "{len} entries after key {i}: the bound broke");
        if i % sample_every == sample_every - 1 {
            let rss = rss_kib();
            figures.samples += 1;
            figures.rss_peak_kib = figures.rss_peak_kib.max(rss);
            if figures.rss_warm_kib == 0 && i >= (keys / 10).max(5 * MAX_ENTRIES) {
                figures.rss_warm_kib = rss;
            }
            // The held locks are still held: their owner can renew them.
            for (key, token) in &held[..10] {
                assert!(store.renew(key, token, LONG_LEASE).await.expect("memory never fails"), "held lock evicted");
            }
        }
    }
    figures.elapsed = started.elapsed();
    figures.rss_end_kib = rss_kib();
    for (key, token) in &held {
        let seen = store.begin(key, &fingerprint, LONG_LEASE).await.expect("memory never fails");
        let renewed = store.renew(key, token, LONG_LEASE).await.expect("memory never fails");
        if matches!(seen, Begin::Locked) && renewed {
            figures.held_locks_kept += 1;
        }
    }
    // The owners finish: half record, half release. Then the TTL passes.
    for (n, (key, token)) in held.iter().enumerate() {
        if n % 2 == 0 {
            store.complete(key, token, record(n), TTL).await.expect("memory never fails");
        } else {
            store.release(key, token).await.expect("memory never fails");
        }
    }
    tokio::time::sleep(TTL + Duration::from_secs(2)).await;
    figures.len_after_ttl = store.len();
    figures.bytes_after_ttl = store.bytes();
    figures
}

#[allow(dead_code)]
fn main() {
    let keys = std::env::var("FLOOD_KEYS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    let f = runtime.block_on(flood_store(keys));
    println!("flood: {} distinct keys through MemoryStore bounded at {MAX_ENTRIES} entries", f.keys);
    println!("  time                 {:.2?} ({:.0} keys/s)", f.elapsed, f.keys as f64 / f.elapsed.as_secs_f64());
    println!("  most entries held    {} (bound {MAX_ENTRIES}, checked after every operation)", f.max_len);
    println!("  most record bytes    {} ({} records of {} bytes)", f.max_bytes, MAX_ENTRIES, record_weight());
    println!(
        "  RSS (KiB)            start {}, warm {}, peak {}, end {} ({} samples)",
        f.rss_start_kib, f.rss_warm_kib, f.rss_peak_kib, f.rss_end_kib, f.samples
    );
    println!("  RSS growth once warm {} KiB", f.rss_peak_kib.saturating_sub(f.rss_warm_kib));
    println!("  held locks kept      {} of {HELD_LOCKS}", f.held_locks_kept);
    println!("  after the TTL        {} entries, {} bytes", f.len_after_ttl, f.bytes_after_ttl);
}

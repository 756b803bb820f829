//! `MemoryStore` against the shared store conformance suite, plus its own bounds and expiry.

mod common;

use std::time::Duration;

use tower_idempotency::MemoryStore;

async fn advance(by: Duration) {
    tokio::time::advance(by).await;
}

store_conformance!(
    make: MemoryStore::new(),
    advance: advance,
    timed: #[tokio::test(start_paused = true)],
    race: #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
);

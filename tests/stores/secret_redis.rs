//! The deployment secret over `RedisStore`: what a reader of the Redis learns (key names and
//! values, after a request carrying a `Basic` credential and a PIN in its body), and replicas
//! that share one Redis with the same secret or with different ones.
//!
//! Each test has a key prefix of its own, so its check record is its own.
#![cfg(feature = "redis")]

use crate::common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use common::{
    dictionary::{self, Recovered},
    redis::{raw, redis_url},
};
use http::StatusCode;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    IdempotencyLayer, Outcome, Secret,
    store::{
        RedisStore,
        redis::{self, AsyncCommands},
    },
};

macro_rules! redis_or_skip {
    () => {
        match redis_url().await {
            Some(url) => url,
            None => return,
        }
    };
}

fn prefix() -> String {
    format!("idem-secret-test:{}:", uuid::Uuid::new_v4().simple())
}

async fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder().with_prefix(prefix).connect(url).await.unwrap()
}

fn secret(text: &str) -> Secret {
    Secret::new(format!("{text}: a test secret of more than 16 bytes")).unwrap()
}

/// Sends `request` through `layer` over a handler counting `runs`: its status and outcome.
async fn send(
    layer: &IdempotencyLayer<RedisStore>,
    runs: &Arc<AtomicUsize>,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> (StatusCode, Outcome) {
    let response = layer.layer(dictionary::handler(runs.clone())).oneshot(request).await.unwrap();
    (response.status(), Outcome::of(&response))
}

/// Deletes every key under `prefix` (the check record is kept for a century otherwise).
async fn clean(url: &str, prefix: &str) {
    let mut connection = raw(url).await;
    let names: Vec<Vec<u8>> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut connection).await.unwrap();
    for name in names {
        let _: () = connection.del(name).await.unwrap();
    }
}

/// Every key name under `prefix`, and every string value.
async fn dump(url: &str, prefix: &str) -> Vec<Vec<u8>> {
    let mut connection = raw(url).await;
    let names: Vec<Vec<u8>> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut connection).await.unwrap();
    let mut dump = Vec::new();
    for name in names {
        let kind: String = redis::cmd("TYPE").arg(&name).query_async(&mut connection).await.unwrap();
        if kind == "string" {
            dump.push(connection.get::<_, Vec<u8>>(&name).await.unwrap());
        }
        dump.push(name);
    }
    dump
}

#[tokio::test]
async fn key_names_and_values_reveal_neither_the_credential_nor_the_pin() {
    let url = redis_or_skip!();
    let prefix = prefix();
    let layer = IdempotencyLayer::from_store(store(&url, &prefix).await).with_secret(secret("dictionary"));
    let runs = Arc::new(AtomicUsize::new(0));
    assert_eq!(send(&layer, &runs, dictionary::request("transfer-1")).await.1, Outcome::Executed);
    assert_eq!(send(&layer, &runs, dictionary::request("transfer-1")).await.1, Outcome::Replayed);

    let dump = dump(&url, &prefix).await;
    // The record, and the check record: what a reader of the Redis has.
    assert!(dump.len() >= 4, "{} items", dump.len());
    assert!(!dictionary::in_clear(&dump));
    assert_eq!(dictionary::attack(&dump), Recovered { password: None, pin: None });
    clean(&url, &prefix).await;
}

#[tokio::test]
async fn two_replicas_with_the_same_secret_replay_each_others_keys() {
    let url = redis_or_skip!();
    let prefix = prefix();
    let a = IdempotencyLayer::from_store(store(&url, &prefix).await).with_secret(secret("shared"));
    let b = IdempotencyLayer::from_store(store(&url, &prefix).await).with_secret(secret("shared"));
    let runs = Arc::new(AtomicUsize::new(0));

    assert_eq!(send(&a, &runs, dictionary::request("k-1")).await, (StatusCode::CREATED, Outcome::Executed));
    assert_eq!(send(&b, &runs, dictionary::request("k-1")).await, (StatusCode::CREATED, Outcome::Replayed));
    assert_eq!(send(&b, &runs, dictionary::request("k-2")).await.1, Outcome::Executed);
    assert_eq!(send(&a, &runs, dictionary::request("k-2")).await.1, Outcome::Replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    clean(&url, &prefix).await;
}

#[tokio::test]
async fn a_replica_with_another_secret_is_refused_and_runs_nothing() {
    let url = redis_or_skip!();
    let prefix = prefix();
    let a = IdempotencyLayer::from_store(store(&url, &prefix).await).with_secret(secret("first"));
    let b = IdempotencyLayer::from_store(store(&url, &prefix).await).with_secret(secret("second"));
    let runs = Arc::new(AtomicUsize::new(0));

    assert_eq!(send(&a, &runs, dictionary::request("k-1")).await.1, Outcome::Executed);
    // Without the check, `b` would find no record for its own digests and run the request again.
    for _ in 0..2 {
        let (status, outcome) = send(&b, &runs, dictionary::request("k-1")).await;
        assert_eq!((status, outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The first replica goes on serving.
    assert_eq!(send(&a, &runs, dictionary::request("k-1")).await.1, Outcome::Replayed);
    clean(&url, &prefix).await;
}

#[tokio::test]
async fn a_shared_store_without_a_secret_is_refused() {
    let url = redis_or_skip!();
    let prefix = prefix();
    let layer = IdempotencyLayer::from_store(store(&url, &prefix).await);
    let runs = Arc::new(AtomicUsize::new(0));
    let (status, outcome) = send(&layer, &runs, dictionary::request("k-1")).await;
    assert_eq!((status, outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(dump(&url, &prefix).await.is_empty(), "nothing written");
}

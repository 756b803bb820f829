//! The deployment secret over `PostgresStore`: what a reader of the table (a backup) learns after
//! requests carrying a `Basic` credential and a PIN in their body, through the plain layer and
//! the transactional mode; replicas sharing one table with the same secret or different ones.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    IdempotencyLayer, Outcome, Secret,
    store::{PostgresStore, sqlx},
};

use super::Db;

#[path = "../common/dictionary.rs"]
mod dictionary;

use dictionary::Recovered;

fn secret(text: &str) -> Secret {
    Secret::new(format!("{text}: a test secret of more than 16 bytes")).unwrap()
}

type Request = http::Request<Full<Bytes>>;

async fn send(
    layer: &IdempotencyLayer<PostgresStore>,
    runs: &Arc<AtomicUsize>,
    request: Request,
) -> (StatusCode, Outcome) {
    let response = layer.layer(dictionary::handler(runs.clone())).oneshot(request).await.unwrap();
    (response.status(), Outcome::of(&response))
}

async fn send_transactional(
    layer: &IdempotencyLayer<PostgresStore>,
    runs: &Arc<AtomicUsize>,
    request: Request,
) -> (StatusCode, Outcome) {
    let service = layer.clone().transactional().layer(dictionary::handler(runs.clone()));
    let response = service.oneshot(request).await.unwrap();
    (response.status(), Outcome::of(&response))
}

/// Every column of every row of the store's table.
async fn dump(db: &Db) -> Vec<Vec<u8>> {
    let sql = format!(
        "SELECT scope, convert_to(key, 'UTF8'), fingerprint, coalesce(token, ''::bytea), \
         coalesce(response, ''::bytea) FROM {}.idempotency",
        db.schema
    );
    type Row = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&db.pool).await.unwrap();
    rows.into_iter().flat_map(|(a, b, c, d, e)| [a, b, c, d, e]).collect()
}

#[tokio::test]
async fn rows_reveal_neither_the_credential_nor_the_pin() {
    let db = Db::new().await;
    let layer = IdempotencyLayer::from_store(db.store().await).with_secret(secret("dictionary"));
    let runs = Arc::new(AtomicUsize::new(0));
    assert_eq!(send(&layer, &runs, dictionary::request("transfer-1")).await.1, Outcome::Executed);
    assert_eq!(send_transactional(&layer, &runs, dictionary::request("transfer-2")).await.1, Outcome::Executed);
    // The transactional mode keys its digests as the plain layer does: each replays the other.
    assert_eq!(send(&layer, &runs, dictionary::request("transfer-2")).await.1, Outcome::Replayed);
    assert_eq!(send_transactional(&layer, &runs, dictionary::request("transfer-1")).await.1, Outcome::Replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    let dump = dump(&db).await;
    // Two records and the check record, five columns each.
    assert_eq!(dump.len(), 15);
    assert!(!dictionary::in_clear(&dump));
    assert_eq!(dictionary::attack(&dump), Recovered { password: None, pin: None });
    db.drop().await;
}

#[tokio::test]
async fn two_replicas_with_the_same_secret_replay_each_others_keys() {
    let db = Db::new().await;
    let a = IdempotencyLayer::from_store(db.store().await).with_secret(secret("shared"));
    let b = IdempotencyLayer::from_store(db.store().await).with_secret(secret("shared"));
    let runs = Arc::new(AtomicUsize::new(0));

    assert_eq!(send(&a, &runs, dictionary::request("k-1")).await, (StatusCode::CREATED, Outcome::Executed));
    assert_eq!(send(&b, &runs, dictionary::request("k-1")).await, (StatusCode::CREATED, Outcome::Replayed));
    assert_eq!(send_transactional(&b, &runs, dictionary::request("k-2")).await.1, Outcome::Executed);
    assert_eq!(send_transactional(&a, &runs, dictionary::request("k-2")).await.1, Outcome::Replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    db.drop().await;
}

#[tokio::test]
async fn a_replica_with_another_secret_is_refused_and_runs_nothing() {
    let db = Db::new().await;
    let a = IdempotencyLayer::from_store(db.store().await).with_secret(secret("first"));
    let b = IdempotencyLayer::from_store(db.store().await).with_secret(secret("second"));
    let runs = Arc::new(AtomicUsize::new(0));

    assert_eq!(send(&a, &runs, dictionary::request("k-1")).await.1, Outcome::Executed);
    let refused = (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable);
    assert_eq!(send(&b, &runs, dictionary::request("k-1")).await, refused);
    assert_eq!(send_transactional(&b, &runs, dictionary::request("k-1")).await, refused);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(send_transactional(&a, &runs, dictionary::request("k-1")).await.1, Outcome::Replayed);
    db.drop().await;
}

#[tokio::test]
async fn a_shared_store_without_a_secret_is_refused() {
    let db = Db::new().await;
    let layer = IdempotencyLayer::from_store(db.store().await);
    let runs = Arc::new(AtomicUsize::new(0));
    let refused = (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable);
    assert_eq!(send(&layer, &runs, dictionary::request("k-1")).await, refused);
    assert_eq!(send_transactional(&layer, &runs, dictionary::request("k-1")).await, refused);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(dump(&db).await.is_empty(), "nothing written");
    db.drop().await;
}

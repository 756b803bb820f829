//! `PostgresStore` on its own: the conformance suite, the table, the reaper, failure.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceExt, service_fn};
use tower_idempotency::{
    IdempotencyLayer, Outcome, ScopeId,
    store::{
        Begin, IdempotencyStore, PostgresStore, Record, StoredResponse,
        conformance::{self, LEASE, TTL, fp, fresh_key, lock, record},
        sqlx::{self, Row, postgres::PgPoolOptions},
    },
};

use super::{Db, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_passes_the_conformance_suite() {
    let db = Db::new().await;
    let store = db.store().await;
    conformance::run(|| async { store.clone() }, tokio::time::sleep).await;
    conformance::run_live(|| async { store.clone() }, tokio::time::sleep).await;
    conformance::run_expired(|| async { store.clone() }, tokio::time::sleep).await;
    conformance::run_inspect(|| async { store.clone() }, tokio::time::sleep).await;
    db.drop().await;
}

#[tokio::test]
async fn rows_are_as_documented() {
    let db = Db::new().await;
    let store = db.store().await;
    let scoped = fresh_key(Some(ScopeId::from_bytes([0xab; 32])));
    let token = lock(&store, &scoped, fp(1)).await;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT scope, key, fingerprint, token, response, expires_at > clock_timestamp() AS live FROM {}",
        store.table()
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<Vec<u8>, _>("scope"), vec![0xab; 32]);
    assert_eq!(row.get::<String, _>("key"), scoped.key().as_str());
    assert_eq!(row.get::<Vec<u8>, _>("fingerprint"), vec![1; 32]);
    assert_eq!(row.get::<Option<Vec<u8>>, _>("token"), Some(token.id().to_be_bytes().to_vec()));
    assert_eq!(row.get::<Option<Vec<u8>>, _>("response"), None);
    assert!(row.get::<bool, _>("live"));

    let stored = conformance::response(b"{\"id\":1}");
    assert!(store.complete(&scoped, &token, record(b"{\"id\":1}"), TTL).await.unwrap());
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT token, response FROM {}", store.table())))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<Option<Vec<u8>>, _>("token"), None);
    let encoded = row.get::<Option<Vec<u8>>, _>("response").unwrap();
    assert_eq!(StoredResponse::decode(Bytes::from(encoded)).unwrap(), stored);

    // Unscoped: an empty scope. Not retained: no response.
    let unscoped = fresh_key(None);
    let token = lock(&store, &unscoped, fp(2)).await;
    assert!(store.complete(&unscoped, &token, Record::NotRetained, TTL).await.unwrap());
    let sql = format!("SELECT scope, response FROM {} WHERE key = $1", store.table());
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(unscoped.key().as_str()).fetch_one(&db.pool).await.unwrap();
    assert_eq!(row.get::<Vec<u8>, _>("scope"), Vec::<u8>::new());
    assert_eq!(row.get::<Option<Vec<u8>>, _>("response"), None);
    db.drop().await;
}

#[tokio::test]
async fn the_reaper_deletes_expired_rows_in_bounded_batches() {
    let db = Db::new().await;
    // A reaper that never runs by itself during the test: `reap` is called by hand.
    let store = db.builder().with_reap_batch(3).with_cleanup_interval(Duration::from_secs(3600)).build(db.pool.clone());
    store.migrate().await.unwrap();
    let short = Duration::from_millis(1);
    for _ in 0..7 {
        assert!(matches!(store.begin(&fresh_key(None), &fp(1), short).await.unwrap(), Begin::Execute(_)));
    }
    let live = fresh_key(None);
    lock(&store, &live, fp(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(db.keys().await, 8);
    let mut batches = Vec::new();
    loop {
        let deleted = store.reap().await.unwrap();
        batches.push(deleted);
        if deleted == 0 {
            break;
        }
    }
    assert_eq!(batches, [3, 3, 1, 0]);
    // The live lock stays.
    assert_eq!(db.keys().await, 1);
    assert!(matches!(store.begin(&live, &fp(1), LEASE).await.unwrap(), Begin::Locked));
    db.drop().await;
}

#[tokio::test]
async fn the_background_reaper_frees_expired_rows_without_a_request_touching_them() {
    let db = Db::new().await;
    let store = db.builder().with_reap_batch(2).with_cleanup_interval(Duration::from_millis(50)).build(db.pool.clone());
    store.migrate().await.unwrap();
    for _ in 0..5 {
        let key = fresh_key(None);
        let token = lock(&store, &key, fp(1)).await;
        assert!(store.complete(&key, &token, record(b"x"), Duration::from_millis(100)).await.unwrap());
    }
    let live = fresh_key(None);
    let token = lock(&store, &live, fp(1)).await;
    assert!(store.complete(&live, &token, record(b"kept"), Duration::from_secs(3600)).await.unwrap());
    eventually(Duration::from_secs(10), "expired rows reaped", || async { db.keys().await == 1 }).await;
    assert!(matches!(store.begin(&live, &fp(1), LEASE).await.unwrap(), Begin::Completed(_)));
    db.drop().await;
}

#[tokio::test]
async fn records_survive_a_new_pool_and_store() {
    let db = Db::new().await;
    let key = fresh_key(None);
    {
        let store = db.store().await;
        let token = lock(&store, &key, fp(1)).await;
        assert!(store.complete(&key, &token, record(b"durable"), TTL * 100).await.unwrap());
    }
    let pool = PgPoolOptions::new().connect(&super::database_url()).await.unwrap();
    let again = PostgresStore::builder().with_schema(&db.schema).build(pool);
    match again.begin(&key, &fp(1), LEASE).await.unwrap() {
        Begin::Completed(Record::Response(got)) => assert_eq!(got.body(), "durable"),
        other => panic!("{other:?}"),
    }
    db.drop().await;
}

/// The pid of the backend behind the store's only connection.
async fn backend_pid(store: &PostgresStore) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(store.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_operation_fails_closed() {
    let db = Db::new().await;
    db.store().await;
    // The store on a pool of one connection, so that its backend is known.
    let pool = PgPoolOptions::new().max_connections(1).connect(&db.url()).await.unwrap();
    let store = PostgresStore::builder().with_schema(&db.schema).build(pool);
    let pid = backend_pid(&store).await;

    let other = fresh_key(None);

    // A begin that waits inside PostgreSQL: another transaction holds an uncommitted insert
    // of its key.
    let mut holder = db.pool.begin().await.unwrap();
    let sql = format!(
        "INSERT INTO {} (scope, key, fingerprint, token, response, expires_at) \
         VALUES ('', $1, $2, NULL, NULL, clock_timestamp() + interval '1 hour')",
        store.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(other.key().as_str())
        .bind(&[1u8; 32][..])
        .execute(&mut *holder)
        .await
        .unwrap();
    let stuck = tokio::spawn({
        let store = store.clone();
        let other = other.clone();
        async move { store.begin(&other, &fp(1), LEASE).await }
    });
    eventually(Duration::from_secs(5), "the store's begin waits on the row", || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'";
        sqlx::query_scalar::<_, i64>(sql).bind(pid).fetch_one(&db.pool).await.unwrap() == 1
    })
    .await;
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&db.pool).await.unwrap();
    assert!(killed);
    let error = stuck.await.unwrap().unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    holder.rollback().await.unwrap();

    // Through the layer: the same failure is a 503, and the handler does not run.
    let pid = backend_pid(&store).await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = service_fn({
        let runs = runs.clone();
        move |_request: Request<tower_idempotency::RequestBody<Full<Bytes>>>| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ran")))) }
        }
    });
    let service = tower::Layer::layer(
        &IdempotencyLayer::from_store(store.clone())
            .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()),
        handler,
    );
    let mut holder = db.pool.begin().await.unwrap();
    let blocked = fresh_key(None);
    let sql = format!(
        "INSERT INTO {} (scope, key, fingerprint, token, response, expires_at) \
         VALUES ('', $1, $2, NULL, NULL, clock_timestamp() + interval '1 hour')",
        store.table()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(blocked.key().as_str())
        .bind(&[9u8; 32][..])
        .execute(&mut *holder)
        .await
        .unwrap();
    let request = Request::post("/charge")
        .header("idempotency-key", blocked.key().as_str())
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let answer = tokio::spawn(service.oneshot(request));
    eventually(Duration::from_secs(5), "the layer's begin waits on the row", || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'";
        sqlx::query_scalar::<_, i64>(sql).bind(pid).fetch_one(&db.pool).await.unwrap() == 1
    })
    .await;
    let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&db.pool).await.unwrap();
    let response = answer.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Outcome::of(&response), Outcome::StoreUnavailable);
    let _ = response.into_body().collect().await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0, "the handler never ran unprotected");
    holder.rollback().await.unwrap();

    // The pool makes a new connection: the store works again by itself.
    assert!(matches!(store.begin(&fresh_key(None), &fp(1), LEASE).await.unwrap(), Begin::Execute(_)));
    db.drop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_store_error_and_a_503() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = PostgresStore::new(pool);
    let error = store.begin(&fresh_key(None), &fp(1), LEASE).await.unwrap_err();
    assert!(error.is_unavailable() || error.is_timeout(), "{error:?}");
    let handler = service_fn(|_request: Request<tower_idempotency::RequestBody<Full<Bytes>>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ran"))))
    });
    let service = tower::Layer::layer(
        &IdempotencyLayer::from_store(store)
            .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()),
        handler,
    );
    let request =
        Request::post("/charge").header("idempotency-key", "k").body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

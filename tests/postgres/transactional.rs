//! Transactional mode through the layer, in process: the handler's writes and the record
//! commit together or not at all; a failed commit (a deferred constraint, a killed
//! connection, a serialization failure) leaves nothing and frees the key; duplicates wait or get `409` and never see a
//! half-done attempt; a response over the record limit rolls back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_idempotency::{Duplicates, IdempotencyLayer, Outcome, store::sqlx, transactional::PgTransaction};

use super::{Db, eventually};

/// What the handler sees: its executions, a gate it may wait at (and says it reached), and a
/// pool of its own for killing its transaction's connection.
#[derive(Clone)]
struct App {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    at_gate: Arc<Semaphore>,
    admin: sqlx::PgPool,
}

impl App {
    fn new(admin: sqlx::PgPool) -> Self {
        Self { runs: Arc::default(), gate: Arc::new(Semaphore::new(0)), at_gate: Arc::new(Semaphore::new(0)), admin }
    }
}

/// `POST /items`: inserts `{"id": N}` into `items` in the layer's transaction (first counting
/// the items with the id in `x-read`, when sent), then, by header: `x-gate` waits for a gate
/// permit, `x-kill` kills the transaction's connection, `x-end: SQL` runs `SQL` (its own
/// `COMMIT`, `ROLLBACK`, ...) on the connection it was lent, `x-panic` panics,
/// `x-status` answers that status, `x-bytes` answers that many bytes, `x-events: N` an event
/// stream of N events `id: I`.
async fn item(
    State(app): State<App>,
    Extension(tx): Extension<PgTransaction>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let id = serde_json::from_slice::<Value>(&body).unwrap()["id"].as_i64().unwrap();
    let pid: i32 = {
        let mut tx = tx.lock().await.unwrap();
        if let Some(read) = headers.get("x-read") {
            let read: i64 = read.to_str().unwrap().parse().unwrap();
            let _: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE id = $1")
                .bind(read)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO items (id) VALUES ($1)").bind(id).execute(&mut *tx).await.unwrap();
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *tx).await.unwrap()
    };
    if let Some(sql) = headers.get("x-end") {
        let sql = sql.to_str().unwrap().to_owned();
        let mut tx = tx.lock().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
    }
    if let Some(tables) = headers.get("x-tables") {
        // Tables created in the transaction: an abort unlinks their files before it releases
        // the transaction's locks, which makes the abort slow enough to watch.
        let tables: usize = tables.to_str().unwrap().parse().unwrap();
        let sql: String = (0..tables).map(|i| format!("CREATE TEMP TABLE t{i} (id int);")).collect();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx.lock().await.unwrap()).await.unwrap();
    }
    if headers.contains_key("x-panic") {
        panic!("the handler panics after its insert");
    }
    if headers.contains_key("x-keep-and-panic") {
        // A task the handler started keeps a clone of the transaction for a while.
        let kept = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(kept);
        });
        panic!("the handler panics after its insert");
    }
    if headers.contains_key("x-gate") {
        app.at_gate.add_permits(1);
        app.gate.acquire().await.unwrap().forget();
    }
    if headers.contains_key("x-kill") {
        // Waits (up to 5 s) until the backend is gone, its advisory lock with it: a retry sent
        // sooner could find the lock still held (a 409, seen on a loaded machine).
        let killed: bool =
            sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)").bind(pid).fetch_one(&app.admin).await.unwrap();
        assert!(killed);
    }
    if let Some(events) = headers.get("x-events") {
        let events: usize = events.to_str().unwrap().parse().unwrap();
        let body: String = (0..events).map(|i| format!("id: {i}\ndata: {id}\n\n")).collect();
        return ([(http::header::CONTENT_TYPE, "text/event-stream")], body).into_response();
    }
    let status = headers.get("x-status").map_or(201, |v| v.to_str().unwrap().parse().unwrap());
    let bytes = headers.get("x-bytes").map_or(0, |v| v.to_str().unwrap().parse().unwrap());
    (StatusCode::from_u16(status).unwrap(), format!("item {id}{}", "x".repeat(bytes))).into_response()
}

struct Setup {
    db: Db,
    app: App,
    router: Router,
    /// The store's pool.
    pool: sqlx::PgPool,
}

async fn setup(
    configure: impl FnOnce(
        IdempotencyLayer<tower_idempotency::store::PostgresStore>,
    ) -> IdempotencyLayer<tower_idempotency::store::PostgresStore>,
) -> Setup {
    setup_with("", configure).await
}

/// [`setup`], with `options` (`-c name=value` settings, URL-encoded) added to the store pool's
/// connections.
async fn setup_with(
    options: &str,
    configure: impl FnOnce(
        IdempotencyLayer<tower_idempotency::store::PostgresStore>,
    ) -> IdempotencyLayer<tower_idempotency::store::PostgresStore>,
) -> Setup {
    setup_pool(options, 8, configure).await
}

/// [`setup_with`], on a store pool of `connections` connections.
async fn setup_pool(
    options: &str,
    connections: u32,
    configure: impl FnOnce(
        IdempotencyLayer<tower_idempotency::store::PostgresStore>,
    ) -> IdempotencyLayer<tower_idempotency::store::PostgresStore>,
) -> Setup {
    let db = Db::new().await;
    // `items.id` unique, checked at commit: a duplicate id fails the commit, not the insert.
    let sql = format!(
        "CREATE TABLE {}.items (id bigint, CONSTRAINT items_id UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)",
        db.schema
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    // The handler's statements name `items` unqualified: the store's pool must find it.
    let url = format!("{}{options}", db.url());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(connections).connect(&url).await.unwrap();
    // No recheck within a test: every wake of a waiting duplicate is a notification.
    let store = tower_idempotency::store::PostgresStore::builder()
        .with_schema(&db.schema)
        .with_follow_recheck(Duration::from_secs(3600))
        .build(pool.clone());
    store.migrate().await.unwrap();
    let layer = configure(
        IdempotencyLayer::from_store(store)
            .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()),
    )
    .transactional();
    let app = App::new(db.pool.clone());
    let router = Router::new().route("/items", post(item).layer(layer)).with_state(app.clone());
    Setup { db, app, router, pool }
}

struct Reply {
    status: StatusCode,
    outcome: Outcome,
    replayed: bool,
    headers: HeaderMap,
    body: String,
}

async fn send(router: &Router, key: &str, body: &'static str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::post("/items").header("idempotency-key", key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let outcome = Outcome::of(&response);
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let headers = response.headers().clone();
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Reply { status, outcome, replayed, headers, body }
}

impl Setup {
    fn runs(&self) -> usize {
        self.app.runs.load(Ordering::SeqCst)
    }

    async fn items(&self) -> i64 {
        self.db.count("items").await
    }

    async fn keys(&self) -> i64 {
        self.db.keys().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handlers_writes_and_the_record_commit_together() {
    let s = setup(|layer| layer).await;
    let first = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((first.status, first.outcome), (StatusCode::CREATED, Outcome::Executed));
    assert_eq!((s.items().await, s.keys().await), (1, 1));
    let replay = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((replay.status, replay.replayed, replay.body.as_str()), (StatusCode::CREATED, true, "item 1"));
    assert_eq!(send(&s.router, "k1", r#"{"id":2}"#, &[]).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!((s.runs(), s.items().await), (1, 1));
    s.db.drop().await;
}

/// Guide, step 9: an event stream recorded in transactional mode keeps its event ends, so a replay
/// with `Last-Event-ID` sends only the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_event_stream_resumes_after_its_last_event_id() {
    let setup = setup(|layer| layer).await;
    let first = send(&setup.router, "sse", r#"{"id": 7}"#, &[("x-events", "3")]).await;
    assert_eq!(first.body, "id: 0\ndata: 7\n\nid: 1\ndata: 7\n\nid: 2\ndata: 7\n\n");
    let resumed = send(&setup.router, "sse", r#"{"id": 7}"#, &[("last-event-id", "1")]).await;
    assert!(resumed.replayed);
    assert_eq!(resumed.body, "id: 2\ndata: 7\n\n");
    assert_eq!(setup.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_not_recorded_rolls_back_the_handlers_writes() {
    let s = setup(|layer| layer).await;
    let failed = send(&s.router, "k1", r#"{"id":1}"#, &[("x-status", "422")]).await;
    assert_eq!(failed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!((s.items().await, s.keys().await), (0, 0), "rolled back: no row, no record");
    // The key is free: the retry executes, once.
    let retry = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((retry.status, retry.outcome), (StatusCode::CREATED, Outcome::Executed));
    assert_eq!((s.runs(), s.items().await), (2, 1));
    s.db.drop().await;
}

/// A commit that fails on an integrity constraint (a deferred unique constraint) is a final
/// answer: `409` `transaction-rejected` with `x-should-retry: false` and no `Retry-After`;
/// nothing of the attempt is kept and the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failing_on_a_deferred_constraint_is_final_leaves_nothing_and_frees_the_key() {
    let s = setup(|layer| layer).await;
    assert_eq!(send(&s.router, "first", r#"{"id":7}"#, &[]).await.status, StatusCode::CREATED);
    // Inserting id 7 again passes the insert and fails the commit.
    let failed = send(&s.router, "second", r#"{"id":7}"#, &[]).await;
    assert_eq!((failed.status, failed.outcome), (StatusCode::CONFLICT, Outcome::RolledBack), "{}", failed.body);
    assert!(failed.body.contains("transaction-rejected"), "{}", failed.body);
    assert_eq!(failed.headers.get("x-should-retry").map(|v| v.to_str().unwrap()), Some("false"));
    assert!(!failed.headers.contains_key("retry-after"));
    assert_eq!((s.items().await, s.keys().await), (1, 1), "only the first request's row and record");
    // The key is free: the retry executes again (and fails again, nothing kept).
    assert_eq!(send(&s.router, "second", r#"{"id":7}"#, &[]).await.status, StatusCode::CONFLICT);
    assert_eq!(s.runs(), 3);
    assert_eq!((s.items().await, s.keys().await), (1, 1));
    s.db.drop().await;
}

/// A serialization failure at commit: the store's connections run `SERIALIZABLE`. The
/// handler reads the items with id 2, inserts id 1 and stops at the gate; meanwhile another
/// serializable transaction reads the items with id 1, inserts id 2 and commits first. Each
/// read missed the other's write (a write skew), so PostgreSQL refuses the layer's commit
/// (`40001`): the client gets `503` `transaction-failed`, nothing of the attempt is kept, and
/// the retry executes and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failing_on_a_serialization_failure_leaves_nothing_and_frees_the_key() {
    let s = setup_with("%20-c%20default_transaction_isolation%3Dserializable", |layer| layer).await;
    let first = tokio::spawn({
        let router = s.router.clone();
        async move { send(&router, "k1", r#"{"id":1}"#, &[("x-read", "2"), ("x-gate", "1")]).await }
    });
    s.app.at_gate.acquire().await.unwrap().forget();
    let mut other = s.db.pool.begin().await.unwrap();
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(&mut *other).await.unwrap();
    let sql = format!("SELECT count(*) FROM {}.items WHERE id = 1", s.db.schema);
    let seen: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut *other).await.unwrap();
    assert_eq!(seen, 0, "the first request's insert is not committed");
    let sql = format!("INSERT INTO {}.items (id) VALUES (2)", s.db.schema);
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *other).await.unwrap();
    other.commit().await.unwrap();
    s.app.gate.add_permits(1);

    let failed = first.await.unwrap();
    assert_eq!((failed.status, failed.outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::RolledBack));
    assert!(failed.body.contains("transaction-failed"), "{}", failed.body);
    // Retryable: it may pass on a retry.
    assert!(failed.headers.contains_key("retry-after") && !failed.headers.contains_key("x-should-retry"));
    assert_eq!((s.items().await, s.keys().await), (1, 0), "only the other transaction's row; no record");
    let retry = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((retry.status, retry.outcome), (StatusCode::CREATED, Outcome::Executed));
    assert_eq!((s.runs(), s.items().await, s.keys().await), (2, 2, 1));
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_before_the_commit_leaves_nothing_and_frees_the_key() {
    let s = setup(|layer| layer).await;
    let killed = send(&s.router, "k1", r#"{"id":1}"#, &[("x-kill", "1")]).await;
    assert_eq!((killed.status, killed.outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::RolledBack));
    assert!(killed.headers.contains_key("retry-after") && !killed.headers.contains_key("x-should-retry"));
    assert_eq!((s.items().await, s.keys().await), (0, 0));
    let retry = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((retry.status, retry.outcome), (StatusCode::CREATED, Outcome::Executed));
    assert_eq!((s.runs(), s.items().await, s.keys().await), (2, 1, 1));
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_record_limit_rolls_back() {
    let s = setup(|layer| layer.with_max_record(100)).await;
    let large = send(&s.router, "k1", r#"{"id":1}"#, &[("x-bytes", "1000")]).await;
    assert_eq!((large.status, large.outcome), (StatusCode::INTERNAL_SERVER_ERROR, Outcome::RolledBack));
    assert!(large.body.contains("response-too-large"), "{}", large.body);
    assert_eq!((s.items().await, s.keys().await), (0, 0));
    // One that fits commits.
    assert_eq!(send(&s.router, "k1", r#"{"id":1}"#, &[("x-bytes", "10")]).await.status, StatusCode::CREATED);
    assert_eq!(s.items().await, 1);
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_flight_gets_409_and_never_sees_the_half_done_attempt() {
    let s = setup(|layer| layer).await;
    let router = s.router.clone();
    let first = tokio::spawn(async move { send(&router, "k1", r#"{"id":1}"#, &[("x-gate", "1")]).await });
    eventually(Duration::from_secs(5), "the first handler inserted", || async { s.runs() == 1 }).await;
    // Its insert is not visible, and a duplicate is refused without running.
    assert_eq!((s.items().await, s.keys().await), (0, 0));
    let duplicate = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((duplicate.status, duplicate.outcome), (StatusCode::CONFLICT, Outcome::InFlight));
    assert_eq!(s.runs(), 1);
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let replay = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert!(replay.replayed);
    assert_eq!((s.runs(), s.items().await), (1, 1));
    s.db.drop().await;
}

/// Whether some backend waits on a lock (a duplicate's insert waiting on the first's row).
async fn someone_waits_on_a_lock(db: &Db) -> bool {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()";
    sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.pool).await.unwrap() > 0
}

/// The store pool's isolation levels: the default (`READ COMMITTED`), and the two under which
/// a concurrent commit on the key fails the layer's own statements with a serialization
/// failure (the layer then takes the key anew, in a new transaction).
const ISOLATIONS: [&str; 3] = [
    "",
    "%20-c%20default_transaction_isolation%3Drepeatable%5C%20read",
    "%20-c%20default_transaction_isolation%3Dserializable",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_replays_once_the_first_commits_or_executes_once_it_rolls_back() {
    for isolation in ISOLATIONS {
        waiting_duplicate(isolation).await;
    }
}

async fn waiting_duplicate(isolation: &str) {
    let s = setup_with(isolation, |layer| layer.with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) }))
        .await;
    for (round, first_status) in [(1, "201"), (2, "500")] {
        let key = format!("k{round}");
        let body: &'static str = if round == 1 { r#"{"id":1}"# } else { r#"{"id":2}"# };
        let runs = s.runs();
        let (router, first_key) = (s.router.clone(), key.clone());
        let first = tokio::spawn(async move {
            send(&router, &first_key, body, &[("x-gate", "1"), ("x-status", first_status)]).await
        });
        eventually(Duration::from_secs(5), "the first handler inserted", || async { s.runs() == runs + 1 }).await;
        let (router, second_key) = (s.router.clone(), key.clone());
        let second = tokio::spawn(async move { send(&router, &second_key, body, &[]).await });
        // The duplicate waits, outside PostgreSQL (its wait registered, no statement waiting
        // on the first's uncommitted row).
        eventually(Duration::from_secs(5), "the duplicate waits", || async { waits_registered(&s).await == 1 }).await;
        assert!(!someone_waits_on_a_lock(&s.db).await);
        assert!(!second.is_finished());
        s.app.gate.add_permits(1);
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        if round == 1 {
            assert_eq!(first.status, StatusCode::CREATED);
            assert_eq!(
                (second.status, second.replayed),
                (StatusCode::CREATED, true),
                "replays the committed one ({isolation:?}): {}",
                second.body
            );
            assert_eq!(s.runs(), runs + 1);
        } else {
            assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!((second.status, second.outcome), (StatusCode::CREATED, Outcome::Executed), "runs itself");
            assert_eq!(s.runs(), runs + 2);
        }
    }
    assert_eq!((s.items().await, s.keys().await), (2, 2));
    s.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_gets_409_past_the_wait_timeout() {
    let timeout = Duration::from_millis(300);
    let s = setup(|layer| layer.with_duplicates(Duplicates::Wait { timeout })).await;
    let router = s.router.clone();
    let first = tokio::spawn(async move { send(&router, "k1", r#"{"id":1}"#, &[("x-gate", "1")]).await });
    eventually(Duration::from_secs(5), "the first handler inserted", || async { s.runs() == 1 }).await;
    let started = std::time::Instant::now();
    let duplicate = send(&s.router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((duplicate.status, duplicate.outcome), (StatusCode::CONFLICT, Outcome::InFlight));
    assert!(started.elapsed() >= timeout, "waited {:?}", started.elapsed());
    assert_eq!(s.runs(), 1);
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!((s.items().await, s.keys().await), (1, 1));
    s.db.drop().await;
}

/// A handler that panics rolls back, even when a task it started still holds a clone of its
/// transaction: the row is gone, and the retry executes at once (the key is not stuck behind
/// the clone's open transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_rolls_back_even_with_a_clone_of_its_transaction_kept() {
    let s = setup(|layer| layer).await;
    let router = s.router.clone().layer(tower_http::catch_panic::CatchPanicLayer::new());
    let panicked = send(&router, "k1", r#"{"id":1}"#, &[("x-keep-and-panic", "1")]).await;
    assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    eventually(Duration::from_secs(5), "the panicked attempt rolled back", || async {
        s.items().await == 0 && s.keys().await == 0
    })
    .await;
    let retry = send(&router, "k1", r#"{"id":1}"#, &[]).await;
    assert_eq!((retry.status, retry.outcome), (StatusCode::CREATED, Outcome::Executed), "{}", retry.body);
    assert_eq!((s.runs(), s.items().await, s.keys().await), (2, 1, 1));
    s.db.drop().await;
}

/// A store used only through the transactional layer still reaps its expired rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_used_only_in_transactional_mode_reaps_expired_rows() {
    let db = Db::new().await;
    let sql = format!("CREATE TABLE {}.items (id bigint)", db.schema);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&db.url()).await.unwrap();
    let store = db.builder().with_cleanup_interval(Duration::from_millis(50)).build(pool);
    store.migrate().await.unwrap();
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .with_ttl(Duration::from_millis(100))
        .transactional();
    let app = App::new(db.pool.clone());
    let router = Router::new().route("/items", post(item).layer(layer)).with_state(app);
    for (n, body) in [(1, r#"{"id":1}"#), (2, r#"{"id":2}"#), (3, r#"{"id":3}"#)] {
        assert_eq!(send(&router, &format!("k{n}"), body, &[]).await.status, StatusCode::CREATED);
    }
    eventually(Duration::from_secs(10), "the reaper deleted the expired records", || async { db.keys().await == 0 })
        .await;
    assert_eq!(db.count("items").await, 3, "the reaper deletes records, never the handler's rows");
    db.drop().await;
}

/// Taking the key is bounded by the store's operation timeout: with every connection of the
/// pool taken (and the pool's own acquire timeout a minute), the request answers `503`
/// `store-unavailable` instead of waiting for a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_the_key_is_bounded_by_the_operation_timeout() {
    let db = Db::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&db.url())
        .await
        .unwrap();
    let store = db.builder().with_operation_timeout(Duration::from_millis(200)).build(pool.clone());
    store.migrate().await.unwrap();
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .transactional();
    let app = App::new(db.pool.clone());
    let router = Router::new().route("/items", post(item).layer(layer)).with_state(app.clone());
    let held = pool.acquire().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), send(&router, "k1", r#"{"id":1}"#, &[]))
        .await
        .expect("an answer long before the pool's acquire timeout");
    assert_eq!((reply.status, reply.outcome), (StatusCode::SERVICE_UNAVAILABLE, Outcome::StoreUnavailable));
    assert!(reply.body.contains("store-unavailable"), "{}", reply.body);
    assert_eq!(app.runs.load(Ordering::SeqCst), 0, "the handler did not run");
    drop(held);
    db.drop().await;
}

/// A `409` in flight carries the `Retry-After` the layer was configured with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_in_flight_carries_the_configured_retry_after() {
    let s = setup(|layer| layer.with_duplicates(Duplicates::Reject { retry_after: Duration::from_secs(7) })).await;
    let router = s.router.clone();
    let first = tokio::spawn(async move { send(&router, "k1", r#"{"id":1}"#, &[("x-gate", "1")]).await });
    s.app.at_gate.acquire().await.unwrap().forget();
    let request = Request::post("/items").header("idempotency-key", "k1").body(Body::from(r#"{"id":1}"#)).unwrap();
    let duplicate = s.router.clone().oneshot(request).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(duplicate.headers()["retry-after"], "7");
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    s.db.drop().await;
}

/// Over real hyper, HTTP/1.1 and HTTP/2: a client that hangs up while its handler runs does
/// not cancel the handler's transaction. hyper drops the response future; the request runs on
/// to its commit, and the retry replays it (one execution, one row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_over_real_hyper_leaves_a_committed_record_the_retry_replays() {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
        service::TowerToHyperService,
    };

    for http2 in [false, true] {
        let s = setup(|layer| layer).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = s.router.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let builder = if http2 { builder.http2_only() } else { builder.http1_only() };
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        // One request on a connection of its own; `hang_up` closes the connection before the
        // answer arrives.
        let exchange = |headers: &'static [(&'static str, &'static str)]| async move {
            let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            let request = Request::post(format!("http://{addr}/items"))
                .header("host", addr.to_string())
                .header("idempotency-key", "k1")
                .body(http_body_util::Full::new(axum::body::Bytes::from_static(br#"{"id":1}"#)));
            let mut request = request.unwrap();
            for (name, value) in headers {
                request.headers_mut().insert(*name, value.parse().unwrap());
            }
            // The connection lives as long as this exchange: dropped with it, it closes.
            let (_connection, response) = if http2 {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
                let connection = AbortOnDrop(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                (connection, sender.send_request(request).await)
            } else {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
                let connection = AbortOnDrop(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                (connection, sender.send_request(request).await)
            };
            let response = response.unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            (response.status(), replayed, response.into_body().collect().await.unwrap().to_bytes())
        };
        let first = tokio::spawn(exchange(&[("x-gate", "1")]));
        s.app.at_gate.acquire().await.unwrap().forget();
        // The client hangs up: its task, and with it the connection, is gone.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        s.app.gate.add_permits(1);
        eventually(Duration::from_secs(10), "the abandoned request committed", || async {
            s.items().await == 1 && s.keys().await == 1
        })
        .await;
        let (status, replayed, body) = exchange(&[]).await;
        assert_eq!((status, replayed, &body[..]), (StatusCode::CREATED, true, &b"item 1"[..]), "http2: {http2}");
        assert_eq!((s.runs(), s.items().await), (1, 1), "http2: {http2}");
        server.abort();
        s.db.drop().await;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The promises of the plain layer, kept in transactional mode; clients over real hyper.

/// Serves `router` over real hyper (HTTP/1.1) on loopback until the handle is aborted.
async fn serve(router: Router) -> (std::net::SocketAddr, AbortOnDrop) {
    use hyper_util::{rt::TokioIo, service::TowerToHyperService};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    (addr, AbortOnDrop(server))
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<axum::body::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// `POST /items` over hyper: with `key` as its `Idempotency-Key` (none: no key).
async fn http_post(
    client: &Client,
    addr: std::net::SocketAddr,
    key: Option<&str>,
    body: &'static str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = Request::post(format!("http://{addr}/items"));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(axum::body::Bytes::from_static(body.as_bytes()))).unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let headers = response.headers().clone();
    let body = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // The outcome does not cross the wire; the problem's type says it.
    let outcome = Outcome::Executed;
    Reply { status, outcome, replayed, headers, body }
}

/// 80 concurrent retries of a key that completed all replay: reading a completed record takes
/// no lock, so the retries never collide with each other as if one were in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_concurrent_retries_of_a_completed_key_all_replay() {
    let s = setup(|layer| layer).await;
    let (addr, _server) = serve(s.router.clone()).await;
    let client = client();
    let first = http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retries: Vec<_> = (0..80)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]).await })
        })
        .collect();
    let mut conflicts = 0;
    for retry in retries {
        let retry = retry.await.unwrap();
        if retry.status == StatusCode::CONFLICT {
            conflicts += 1;
            continue;
        }
        assert_eq!((retry.status, retry.replayed, retry.body.as_str()), (StatusCode::CREATED, true, "item 1"));
    }
    assert_eq!(conflicts, 0, "retries of a completed key answered 409");
    assert_eq!((s.runs(), s.items().await, s.keys().await), (1, 1, 1));
    s.db.drop().await;
}

/// After a handler panics, its transaction has rolled back before the `500` leaves: each of
/// 150 retries sent the moment the `500` arrives executes (none finds the key still locked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_panic_the_rollback_precedes_the_answer_so_an_immediate_retry_executes() {
    let s = setup(|layer| layer).await;
    let router = s.router.clone().layer(tower_http::catch_panic::CatchPanicLayer::new());
    let (addr, _server) = serve(router).await;
    let client = client();
    let mut conflicts = 0;
    for round in 0..150 {
        let key = format!("k{round}");
        let body: &'static str = Box::leak(format!(r#"{{"id":{round}}}"#).into_boxed_str());
        let panicked = http_post(&client, addr, Some(&key), body, &[("x-panic", "1")]).await;
        assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
        let retry = http_post(&client, addr, Some(&key), body, &[]).await;
        if retry.status == StatusCode::CONFLICT {
            conflicts += 1;
            continue;
        }
        assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false), "round {round}: {}", retry.body);
    }
    assert_eq!(conflicts, 0, "immediate retries after a panic answered 409");
    assert_eq!((s.runs(), s.items().await, s.keys().await), (300, 150, 150));
    s.db.drop().await;
}

/// A handler (a plain tower service) that fails with an error: its transaction has rolled
/// back when the error comes out of the layer, so a retry sent at once executes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_handler_error_the_rollback_precedes_the_answer_so_an_immediate_retry_executes() {
    use tower_idempotency::RequestBody;
    let db = Db::new().await;
    let sql = format!("CREATE TABLE {}.items (id bigint)", db.schema);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&db.url()).await.unwrap();
    let store = db.builder().build(pool);
    store.migrate().await.unwrap();
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .transactional();
    let handler = tower::service_fn(|request: Request<RequestBody<Body>>| async move {
        let tx = request.extensions().get::<PgTransaction>().unwrap().clone();
        let fail = request.headers().contains_key("x-fail");
        sqlx::query("INSERT INTO items (id) VALUES (1)").execute(&mut *tx.lock().await.unwrap()).await.unwrap();
        if fail {
            return Err(std::io::Error::other("the handler fails after its insert"));
        }
        Ok::<_, std::io::Error>(Response::new(Body::from("done")))
    });
    let service = tower::ServiceBuilder::new().layer(layer).service(handler);
    for round in 0..150 {
        let key = format!("k{round}");
        let request = |fail: bool| {
            let request = Request::post("/items").header("idempotency-key", key.as_str());
            let request = if fail { request.header("x-fail", "1") } else { request };
            request.body(Body::empty()).unwrap()
        };
        assert!(service.clone().oneshot(request(true)).await.is_err());
        let retry = service.clone().oneshot(request(false)).await.unwrap();
        assert_eq!((retry.status(), Outcome::of(&retry)), (StatusCode::OK, Outcome::Executed), "round {round}");
    }
    assert_eq!((db.count("items").await, db.keys().await), (150, 150));
    db.drop().await;
}

/// The rows of the key's waits: the marker a duplicate leaves before it waits, which tells
/// the request in flight to notify when it ends (`n` counts the duplicates that registered).
async fn waits_registered(s: &Setup) -> i64 {
    let sql = format!(
        "SELECT coalesce(sum(n), 0)::int8 FROM {}.idempotency_live WHERE token = '\\x{}'",
        s.db.schema,
        "00".repeat(16)
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&s.db.pool).await.unwrap()
}

/// The store pool's connections in use.
fn in_use(s: &Setup) -> u32 {
    s.pool.size() - u32::try_from(s.pool.num_idle()).unwrap()
}

/// Waiting duplicates hold no pool connection and respect `with_max_waiters`: with a pool of
/// 4, 8 duplicates wait for a request in flight while an unrelated key is served at once, a
/// 9th duplicate gets `409` at once, and all 8 replay once the first commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_hold_no_connection_and_respect_max_waiters() {
    let wait = Duplicates::Wait { timeout: Duration::from_secs(60) };
    let s = setup_pool("", 4, |layer| layer.with_duplicates(wait).with_max_waiters(8)).await;
    let (addr, _server) = serve(s.router.clone()).await;
    let client = client();
    let first = tokio::spawn({
        let client = client.clone();
        async move { http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[("x-gate", "1")]).await }
    });
    s.app.at_gate.acquire().await.unwrap().forget();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]).await })
        })
        .collect();
    eventually(Duration::from_secs(10), "8 duplicates wait", || async { waits_registered(&s).await == 8 }).await;
    eventually(Duration::from_secs(5), "only the first holds a connection", || async { in_use(&s) == 1 }).await;
    assert!(!someone_waits_on_a_lock(&s.db).await, "no duplicate waits inside PostgreSQL");
    // A 9th is over the bound: 409 at once.
    let ninth = tokio::time::timeout(Duration::from_secs(10), http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]))
        .await
        .expect("the 9th duplicate is answered at once");
    assert_eq!(ninth.status, StatusCode::CONFLICT, "{}", ninth.body);
    assert!(ninth.body.contains("in-flight") && ninth.headers.contains_key("retry-after"), "{}", ninth.body);
    // An unrelated key is served at once.
    let other = tokio::time::timeout(Duration::from_secs(10), http_post(&client, addr, Some("k2"), r#"{"id":2}"#, &[]))
        .await
        .expect("an unrelated key is served while the duplicates wait");
    assert_eq!(other.status, StatusCode::CREATED);
    assert!(waiters.iter().all(|waiter| !waiter.is_finished()), "the duplicates still wait");
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    for waiter in waiters {
        let waiter = waiter.await.unwrap();
        assert_eq!((waiter.status, waiter.replayed, waiter.body.as_str()), (StatusCode::CREATED, true, "item 1"));
    }
    assert_eq!((s.runs(), s.items().await, s.keys().await), (2, 2, 2));
    s.db.drop().await;
}

/// A pool whose `statement_timeout` (200 ms) is shorter than the wait (1 s): the waiting
/// duplicate is not cut short as `503 store-unavailable`; it waits its whole timeout and gets
/// `409`, and a retry after the first committed replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_shorter_than_the_wait_is_not_store_unavailable() {
    let wait = Duplicates::Wait { timeout: Duration::from_secs(1) };
    let s = setup_with("%20-c%20statement_timeout%3D200", |layer| layer.with_duplicates(wait)).await;
    let (addr, _server) = serve(s.router.clone()).await;
    let client = client();
    let first = tokio::spawn({
        let client = client.clone();
        async move { http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[("x-gate", "1")]).await }
    });
    s.app.at_gate.acquire().await.unwrap().forget();
    let duplicate = http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT, "{}", duplicate.body);
    assert!(duplicate.body.contains("in-flight"), "{}", duplicate.body);
    s.app.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let replay = http_post(&client, addr, Some("k1"), r#"{"id":1}"#, &[]).await;
    assert_eq!((replay.status, replay.replayed), (StatusCode::CREATED, true));
    assert_eq!(s.runs(), 1);
    s.db.drop().await;
}

/// A handler that ends the layer's transaction itself (`COMMIT`, `ROLLBACK`, `COMMIT` then
/// `BEGIN`) is caught before anything is recorded: `500` `transaction-ended`, final; no
/// record and no lock of the key remain, and a retry executes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_ends_the_transaction_itself_is_detected_before_recording() {
    let s = setup(|layer| layer).await;
    for (round, sql) in ["COMMIT", "ROLLBACK", "COMMIT; BEGIN"].into_iter().enumerate() {
        let key = format!("k{round}");
        let body: &'static str = Box::leak(format!(r#"{{"id":{round}}}"#).into_boxed_str());
        let items = s.items().await;
        let ended = send(&s.router, &key, body, &[("x-end", sql)]).await;
        assert_eq!(ended.status, StatusCode::INTERNAL_SERVER_ERROR, "{sql}: {}", ended.body);
        assert!(ended.body.contains("transaction-ended"), "{sql}: {}", ended.body);
        assert_eq!(ended.headers.get("x-should-retry").map(|v| v.to_str().unwrap()), Some("false"), "{sql}");
        assert_eq!(s.keys().await, 0, "{sql}: nothing of the key's lock or record stays");
        // The handler's own COMMIT kept its row; its ROLLBACK did not.
        let kept = i64::from(sql.starts_with("COMMIT"));
        assert_eq!(s.items().await, items + kept, "{sql}");
        // (What the handler committed itself is the application's to clean up.)
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("TRUNCATE {}.items", s.db.schema)))
            .execute(&s.db.pool)
            .await
            .unwrap();
        let retry = send(&s.router, &key, body, &[]).await;
        assert_eq!((retry.status, retry.outcome), (StatusCode::CREATED, Outcome::Executed), "{sql}: {}", retry.body);
        assert_eq!(s.keys().await, 1, "{sql}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("TRUNCATE {0}.idempotency, {0}.items", s.db.schema)))
            .execute(&s.db.pool)
            .await
            .unwrap();
    }
    s.db.drop().await;
}

/// A request without a key on a transactional route reaches its handler with a transaction
/// of its own: committed when the response is one the layer would record, rolled back
/// otherwise; no key is recorded. The README's snippet and the example server's `/ledger`
/// rely on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_key_gets_a_transaction_of_its_own() {
    let s = setup(|layer| layer).await;
    let (addr, _server) = serve(s.router.clone()).await;
    let client = client();
    let created = http_post(&client, addr, None, r#"{"id":1}"#, &[]).await;
    assert_eq!((created.status, created.body.as_str()), (StatusCode::CREATED, "item 1"));
    assert_eq!((s.items().await, s.keys().await), (1, 0), "committed, nothing recorded");
    let refused = http_post(&client, addr, None, r#"{"id":2}"#, &[("x-status", "422")]).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!((s.items().await, s.keys().await), (1, 0), "rolled back");
    // Each runs again (no key, no replay).
    assert_eq!(http_post(&client, addr, None, r#"{"id":3}"#, &[]).await.status, StatusCode::CREATED);
    assert_eq!((s.runs(), s.items().await), (3, 2));
    s.db.drop().await;
}

/// A request in flight whose process died sends no notification (PostgreSQL only rolls its
/// transaction back when its connection closes): its waiting duplicate looks again at the
/// store's follow recheck, finds the key free and executes. The "process" here is a
/// connection holding the key's advisory lock in a transaction, then terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_of_a_request_whose_process_died_executes_after_a_recheck() {
    use sha2::{Digest, Sha256};
    let db = Db::new().await;
    let sql = format!("CREATE TABLE {}.items (id bigint)", db.schema);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&db.url()).await.unwrap();
    let store = db.builder().with_follow_recheck(Duration::from_millis(200)).build(pool);
    store.migrate().await.unwrap();
    // The key's advisory lock, as the layer computes it (unscoped key `k1` in this table).
    let mut digest = Sha256::new();
    digest.update(b"tower-idempotency\0");
    digest.update(store.table().as_bytes());
    digest.update([0]);
    digest.update([0]);
    digest.update(b"k1");
    let lock = i64::from_be_bytes(digest.finalize()[..8].try_into().unwrap());
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap())
        .with_scope(tower_idempotency::Scope::none())
        .with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(60) })
        .transactional();
    let app = App::new(db.pool.clone());
    let router = Router::new().route("/items", post(item).layer(layer)).with_state(app.clone());
    let mut dead = db.pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *dead).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut *dead).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock).execute(&mut *dead).await.unwrap();
    let waiter = tokio::spawn({
        let router = router.clone();
        async move { send(&router, "k1", r#"{"id":1}"#, &[]).await }
    });
    let marker = format!("SELECT count(*) FROM {}.idempotency_live", db.schema);
    eventually(Duration::from_secs(10), "the duplicate waits", || async {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(marker.clone())).fetch_one(&db.pool).await.unwrap() == 1
    })
    .await;
    assert!(!waiter.is_finished());
    let killed: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)").bind(pid).fetch_one(&db.pool).await.unwrap();
    assert!(killed);
    drop(dead);
    let reply = waiter.await.unwrap();
    assert_eq!((reply.status, reply.outcome), (StatusCode::CREATED, Outcome::Executed), "{}", reply.body);
    assert_eq!((app.runs.load(Ordering::SeqCst), db.count("items").await), (1, 1));
    db.drop().await;
}

/// After a commit that failed (a deferred constraint), the transaction's abort is over before
/// the answer leaves: PostgreSQL reports the commit's error before it releases the key's
/// advisory lock, so a retry sent the moment the answer arrived could find the key still held.
/// The handler creates tables in the transaction, so the abort has files to unlink before it
/// releases its locks. 15 times, the immediate retry executes again (and fails again), never
/// `409` in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_commit_an_immediate_retry_executes() {
    let s = setup(|layer| layer).await;
    assert_eq!(send(&s.router, "first", r#"{"id":7}"#, &[]).await.status, StatusCode::CREATED);
    for round in 0..15 {
        let key = format!("k{round}");
        for attempt in 0..2 {
            let runs = s.runs();
            let failed = send(&s.router, &key, r#"{"id":7}"#, &[("x-tables", "200")]).await;
            assert!(failed.body.contains("transaction-rejected"), "round {round}, attempt {attempt}: {}", failed.body);
            assert_eq!(s.runs(), runs + 1, "round {round}, attempt {attempt}: executed");
        }
    }
    assert_eq!((s.items().await, s.keys().await), (1, 1));
    s.db.drop().await;
}

//! Keys do not starve each other, measured in real time: 64 duplicates waiting on a slow key
//! leave a joined stream on another key its pace (each event within 100 ms of its
//! production), on the memory store, Redis (two replicas) and PostgreSQL (two replicas). Redis
//! Cluster runs the same check inside its own test (`tests/stores`).
//!
//! A binary of its own because it measures latency: `cargo test` runs test binaries one after
//! another, so no other test of the suite loads the machine while these measure, and within
//! this binary the tests take turns.
//!
//! Needs Redis (`REDIS_URL`, skipped without one unless it is set) and PostgreSQL
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; never skipped).

#[path = "../common/pace.rs"]
mod pace;
#[cfg(feature = "redis")]
#[path = "../common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis;

use tokio::sync::Mutex;
use tower_idempotency::{Duplicates, IdempotencyLayer, Secret, store::LiveLog};

/// The tests take turns: each measures with the machine to itself.
static TURN: Mutex<()> = Mutex::const_new(());

/// A join-mode layer over `store`, with the secret every replica shares.
fn layer<St: LiveLog>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::from_store(store)
        .with_secret(Secret::new("a test secret, the same on every replica").unwrap())
        .with_duplicates(Duplicates::join())
}

/// The memory store: duplicates wake only the followers of their own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory() {
    let _turn = TURN.lock().await;
    let layer = layer(tower_idempotency::store::MemoryStore::new());
    pace::a_slow_key_does_not_delay_a_joined_stream_on_another(vec![layer]).await;
}

/// Redis, two replicas: the duplicates outnumber the store's connections for blocking reads
/// (32), and share one read per log.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis() {
    let _turn = TURN.lock().await;
    let Some(url) = redis::redis_url().await else { return };
    let layers = vec![layer(redis::store(&url).await), layer(redis::store(&url).await)];
    pace::a_slow_key_does_not_delay_a_joined_stream_on_another(layers).await;
}

/// PostgreSQL, two replicas, each with its own store on the same table (in a schema of this
/// test's own).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres() {
    use tower_idempotency::store::{PostgresStore, sqlx};
    let _turn = TURN.lock().await;
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL at {url} does not answer ({error}); start it (see .ci/run)"));
    let schema = format!("idem_pace_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
    let store = || async {
        let store = PostgresStore::builder().with_schema(&schema).build(pool.clone());
        store.migrate().await.unwrap();
        store
    };
    let layers = vec![layer(store().await), layer(store().await)];
    pace::a_slow_key_does_not_delay_a_joined_stream_on_another(layers).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await.unwrap();
}

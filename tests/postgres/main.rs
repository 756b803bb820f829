//! Everything PostgreSQL, in one test binary: `PostgresStore` against the store conformance
//! suite and what only PostgreSQL shows (the table, the reaper, killed connections), the
//! transactional mode through the layer, and real processes (the example server, started
//! twice, restarted, aborted before its commit).
//!
//! Needs a PostgreSQL: `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`
//! (`.ci/run` starts one). An unreachable database fails these tests; it never skips them.
//! Each test works in a schema of its own, so tests running in parallel never collide.

mod live;
mod processes;
mod secret;
mod store;
mod transactional;
mod wire;

use std::time::Duration;

use tower_idempotency::store::{
    PostgresStore, PostgresStoreBuilder,
    sqlx::{self, PgPool, postgres::PgPoolOptions},
};

/// The database under test.
pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of one test's own, on a pool of its own (pools belong to one runtime).
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
}

impl Db {
    /// Connects (failing the test when the database does not answer) and creates the schema.
    pub(crate) async fn new() -> Self {
        Self::with_pool(PgPoolOptions::new().max_connections(16)).await
    }

    pub(crate) async fn with_pool(options: PgPoolOptions) -> Self {
        let url = database_url();
        let pool =
            options.acquire_timeout(Duration::from_secs(10)).connect(&url).await.unwrap_or_else(|error| {
                panic!("PostgreSQL at {url} does not answer ({error}); start it (see .ci/run)")
            });
        let schema = format!("idem_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
        Self { pool, schema }
    }

    /// A builder for a store on this schema's table.
    pub(crate) fn builder(&self) -> PostgresStoreBuilder {
        PostgresStore::builder().with_schema(&self.schema)
    }

    /// A store on this schema's table, the table created.
    pub(crate) async fn store(&self) -> PostgresStore {
        let store = self.builder().build(self.pool.clone());
        store.migrate().await.unwrap();
        store
    }

    /// The URL of this database with this schema first on the `search_path`.
    pub(crate) fn url(&self) -> String {
        let url = database_url();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20search_path%3D{}", self.schema)
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.{table}", self.schema);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.pool).await.unwrap()
    }

    /// The rows of the store's table, less the layer's secret-check record.
    pub(crate) async fn keys(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM {}.idempotency WHERE key <> $1", self.schema);
        let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(tower_idempotency::secret::CHECK_KEY);
        query.fetch_one(&self.pool).await.unwrap()
    }

    /// Drops the schema (a failed test leaves its schema behind, to look at).
    pub(crate) async fn drop(self) {
        let sql = format!("DROP SCHEMA {} CASCADE", self.schema);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await.unwrap();
    }
}

/// Polls `condition` every 10 ms until it holds; fails the test after `within`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

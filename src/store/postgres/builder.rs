//! [`PostgresStoreBuilder`]: the table, the operation timeout and the reaper's pace.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;

use super::{Inner, PostgresStore, live::Listener, sql::Statements};
use crate::rt::Background;

/// Default table name.
const DEFAULT_TABLE: &str = "idempotency";
/// Default bound on one store operation, waiting for a pooled connection included.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Default pause of the reaper between rounds.
const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(60);
/// Default most rows one reaper statement deletes.
const DEFAULT_REAP_BATCH: usize = 1_000;
/// Default longest wait of a follower without reading again.
const DEFAULT_FOLLOW_RECHECK: Duration = Duration::from_secs(10);

/// Builds a [`PostgresStore`] with a non-default table, operation timeout or reaper pace.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{PostgresStore, sqlx::postgres::PgPoolOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // `connect_lazy` needs no database yet; the store connects on first use.
/// let pool = PgPoolOptions::new().max_connections(16).connect_lazy("postgres://app@db/app").unwrap();
/// let store = PostgresStore::builder()
///     .with_schema("billing")
///     .with_table("idempotency_keys")
///     .with_operation_timeout(Duration::from_secs(2))
///     .build(pool);
/// assert_eq!(store.table(), r#""billing"."idempotency_keys""#);
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresStoreBuilder {
    schema: Option<String>,
    table: String,
    operation_timeout: Duration,
    reap_interval: Duration,
    reap_batch: usize,
    follow_recheck: Duration,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        Self {
            schema: None,
            table: DEFAULT_TABLE.to_owned(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            reap_interval: DEFAULT_REAP_INTERVAL,
            reap_batch: DEFAULT_REAP_BATCH,
            follow_recheck: DEFAULT_FOLLOW_RECHECK,
        }
    }
}

impl PostgresStoreBuilder {
    /// The table's name. Default: `idempotency`. Any text: it is always quoted, so it is
    /// case-sensitive (`"Idem"` is not `idem`).
    ///
    /// ```
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let builder = PostgresStore::builder().with_table("idempotency_keys");
    /// # let _ = builder;
    /// ```
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The schema the table is in. Default: none, so the connection's `search_path` decides
    /// (`public` unless configured otherwise). Quoted like the table.
    ///
    /// ```
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// // The table `billing.idempotency`.
    /// let builder = PostgresStore::builder().with_schema("billing");
    /// # let _ = builder;
    /// ```
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// The longest one store operation may take, waiting for a pooled connection included;
    /// past it the operation fails with
    /// [`StoreError::is_timeout`](crate::store::StoreError::is_timeout). Default: 5 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let builder = PostgresStore::builder().with_operation_timeout(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The pause of the background reaper between rounds. Default: 60 s. A round deletes
    /// batches until one comes back short.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let builder = PostgresStore::builder().with_cleanup_interval(Duration::from_secs(300));
    /// # let _ = builder;
    /// ```
    pub fn with_cleanup_interval(mut self, every: Duration) -> Self {
        self.reap_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The most expired rows one reaper statement deletes. Default: 1 000 (at least 1).
    ///
    /// ```
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let builder = PostgresStore::builder().with_reap_batch(10_000);
    /// # let _ = builder;
    /// ```
    pub fn with_reap_batch(mut self, rows: usize) -> Self {
        self.reap_batch = rows.max(1);
        self
    }

    /// The longest a duplicate following a response in flight (join and wait modes) waits
    /// without reading the log again. Default: 10 s. Followers are woken by notifications, and
    /// read again at the end of the lock's lease; this bound only matters when a notification
    /// is lost without a sign (the listening connection cut off without being closed).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::PostgresStore;
    ///
    /// let builder = PostgresStore::builder().with_follow_recheck(Duration::from_millis(500));
    /// # let _ = builder;
    /// ```
    pub fn with_follow_recheck(mut self, every: Duration) -> Self {
        self.follow_recheck = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the store on the application's pool. Connects nothing and needs no runtime:
    /// the table must exist by the first operation (see [`PostgresStore::migrate`]).
    ///
    /// ```
    /// use tower_idempotency::store::{PostgresStore, sqlx::PgPool};
    ///
    /// # async fn run(pool: PgPool) -> Result<(), tower_idempotency::store::sqlx::Error> {
    /// // `pool`: the application's own.
    /// let store = PostgresStore::builder().with_table("idempotency_keys").build(pool);
    /// store.migrate().await?; // or run the DDL of `migrations/` with your own migrations
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self, pool: PgPool) -> PostgresStore {
        let statements = Statements::new(self.schema.as_deref(), &self.table);
        let listener = Listener::new(statements.channel.clone(), pool.connect_options(), self.operation_timeout);
        PostgresStore {
            inner: Arc::new(Inner {
                pool,
                statements,
                operation_timeout: self.operation_timeout,
                reap_interval: self.reap_interval,
                reap_batch: i64::try_from(self.reap_batch).unwrap_or(i64::MAX),
                reaper: Background::default(),
                follow_recheck: self.follow_recheck,
                listener,
            }),
        }
    }
}

impl PostgresStore {
    /// A builder for the table, the operation timeout and the reaper.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }
}

//! The PostgreSQL store: records in the application's own database.
//!
//! - `mod.rs`: [`PostgresStore`], its contract (table, round trips, expiry, failure) and the
//!   trait;
//! - `builder.rs`: [`PostgresStoreBuilder`];
//! - `sql.rs`: the statement of each operation and the table's DDL;
//! - `reaper.rs`: the background task deleting expired rows in batches;
//! - `live/`: join mode, the live log (`publish`, `follow`) and the listening connection;
//! - the statements of transactional mode (`crate::transactional`, which runs them) are in
//!   `sql.rs` with the others.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row, postgres::PgRow};

use crate::{
    rt::Background,
    store::{
        Begin, Completed, Fingerprint, Followed, IdempotencyStore, Inspect, KeyState, LiveCursor, LiveEvent, LiveLog,
        LockToken, Locked, Purged, Record, StoreError, StoreKey, StoredResponse,
    },
};

mod builder;
pub(crate) mod live;
mod reaper;
pub(crate) mod sql;

pub use builder::PostgresStoreBuilder;
use sql::{Statements, state};

/// How often `begin` runs its statement again when a concurrent `begin` of the same key
/// committed while it ran (see `sql.rs`); each retry sees that row, so more than one is rare.
pub(crate) const BEGIN_ATTEMPTS: usize = 8;

/// An [`IdempotencyStore`] in PostgreSQL, on the application's [`PgPool`](https://docs.rs/sqlx/0.9/sqlx/type.PgPool.html): records survive
/// restarts of every process, and many replicas share keys.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::{PostgresStore, sqlx::PgPool}};
///
/// # async fn run() -> Result<(), tower_idempotency::store::sqlx::Error> {
/// let pool = PgPool::connect("postgres://postgres@127.0.0.1:5432/app").await?;
/// let store = PostgresStore::new(pool);
/// // Or run `migrations/0001_idempotency.sql`, `0002_idempotency_live.sql` and
/// // `0003_idempotency_grace.sql` with the application's own migrations.
/// store.migrate().await?;
/// let layer = IdempotencyLayer::from_store(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # The tables
///
/// One table (default `idempotency`, in the connection's `search_path`; see
/// [`with_table`](PostgresStoreBuilder::with_table) and
/// [`with_schema`](PostgresStoreBuilder::with_schema)), one row per (scope, key), and for join
/// mode its live log table, `{table}_live`. The crate ships their DDL as
/// `migrations/0001_idempotency.sql` and `migrations/0002_idempotency_live.sql`, for the
/// application's own migrations (`sqlx migrate`, refinery, ...); [`migrate`](PostgresStore::migrate)
/// runs the same DDL (`CREATE ... IF NOT EXISTS`, `ADD COLUMN IF NOT EXISTS`) for the
/// configured table. A table made by 0001 alone needs 0002 and 0003 before this version of
/// the store runs on it (its statements name the `followed` and `grace_until` columns);
/// `migrations/0003_idempotency_grace.sql` adds `grace_until`, the end of a record's grace
/// for expired keys (`IdempotencyLayer::with_expired_grace`).
///
/// | column | type | holds |
/// | --- | --- | --- |
/// | `scope` | `bytea` | the [`ScopeId`](crate::ScopeId) (32 bytes), or empty for the unscoped namespace |
/// | `key` | `text` | the idempotency key as sent (1 to 255 visible ASCII bytes) |
/// | `fingerprint` | `bytea` | the fingerprint of the request that locked or completed the key (32 bytes) |
/// | `token` | `bytea` | the lock's token (16 bytes) while locked; `NULL` once completed |
/// | `response` | `bytea` | once completed, the response as [`StoredResponse::encode_into`] writes it; `NULL` when not retained (`Record::NotRetained`) |
/// | `expires_at` | `timestamptz` | the end of the lease (locked) or of the TTL (completed) |
/// | `followed` | `boolean` | whether a duplicate follows the lock (join or wait mode): only then do the lock's writes notify (see [Responses in flight](#responses-in-flight)) |
///
/// The primary key is `(scope, key)`; an index on `expires_at` serves the reaper.
///
/// **What a row costs** (measured on PostgreSQL 15 with `pg_column_size` and the relation
/// sizes of 100 000 rows, a scoped 36-byte key): a lock's tuple is 152 bytes, about 167 bytes
/// of heap per row with its line pointer and page fill; a completed row adds its response's
/// encoded size less the 16-byte token (a record with an empty body and one header: 176 bytes).
/// The primary key index costs about 125 bytes per row for random keys, the `expires_at` index
/// about 20 to 30 (less where expiry times repeat). A response over about 2 KB is compressed
/// when it compresses and moved to the table's TOAST storage, as PostgreSQL does with any
/// large value. The encoded response is the body, the header names and values, 5 bytes of
/// layout and 6 per header field ([`StoredResponse::encode_into`]).
///
/// # Round trips
///
/// Every operation is one statement, hence one round trip and atomic:
///
/// | operation | statement |
/// | --- | --- |
/// | `begin` | reads the key's live row; only when there is none, `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired` |
/// | `renew` | `UPDATE ... WHERE token = $token AND expires_at > clock_timestamp()` |
/// | `complete` | the same `UPDATE`, which also deletes the lock's live log and, when the lock is `followed`, sends a `NOTIFY` |
/// | `release` | `DELETE ... WHERE token = $token AND expires_at > clock_timestamp()`, with the log and the `NOTIFY` as for `complete` |
/// | `publish` | one `INSERT` of the events past the log's end, however many, under `FOR SHARE` of the live lock; a `NOTIFY` when `followed` |
/// | `follow` | one read of the lock's row and its log after the cursor (the first one also marks the lock `followed`); when nothing is new, a wait on the listener, then one read per wake-up |
///
/// A replay, a duplicate in flight or a mismatch writes nothing: it is a read through the
/// primary key, with no transaction id and no WAL flush. A miss writes twice (`begin`,
/// `complete`), each a commit that waits for its WAL flush, which dominates its cost (see
/// `synchronous_commit`). A `begin` racing another `begin` of the same key that commits while
/// it runs reads the winner's row with a second statement (the first one's snapshot predates
/// that row). (sqlx also pings each connection as it returns to the pool: a second round trip
/// on the wire, after the caller has its answer.)
///
/// # Responses in flight
///
/// Join mode ([`Duplicates::Join`](crate::Duplicates)) publishes a response as it is produced,
/// and duplicates follow it, on this replica or another (see [`LiveEvent`]); wait mode's
/// duplicates follow the lock for its end only.
///
/// **The log.** Each publish is one row of the live log table, unlogged (no WAL: a crash of
/// PostgreSQL empties it; a follower then sees nothing new, and replays the record once the
/// lock completes), keyed by the key's id, the lock's token and the index of the row's first
/// event:
///
/// | column | type | holds |
/// | --- | --- | --- |
/// | `key_id` | `bytea` | the first 16 bytes of SHA-256(scope, a zero byte, key) |
/// | `token` | `bytea` | the token of the lock whose log it is (16 bytes) |
/// | `seq` | `int8` | the index in the log of the row's first event |
/// | `n` | `int4` | how many events the row holds |
/// | `events` | `bytea` | the events, each its length (4 bytes) then a tag byte and its head, data or event id |
///
/// A publish appends only the events past the log's end (one sent again adds nothing; one
/// leaving a gap adds nothing), and only while its lock is live: a lock whose lease ran out
/// writes nothing, and a later lock of the key has a log of its own (its token), which no
/// follower of the old one reads. Its commit does not wait for a WAL flush. The log is as long
/// as what the layer publishes: it stops at the record limit, so a log holds at most that many
/// body bytes. A row costs about 210 bytes beside its events (93 of heap, 118 of primary key,
/// measured on 100 000 rows). `complete` and `release` delete the lock's log in their own
/// statement; the log of a lock that expired goes with its row in the reaper, or when the next
/// lock of the key ends.
///
/// **Waking.** Followers are woken by `NOTIFY`, not by polling. A write that changes what a
/// follower waits for sends it in its own statement, so it is delivered when that commits, and
/// only when the lock is `followed`: PostgreSQL serializes the commits of all transactions
/// that notify, database-wide (measured here: 16 clients updating single rows ran at 3 530
/// commits/s, 407 when each also sent a `NOTIFY`), so the layer's writes never notify unless a
/// duplicate follows. The first read of a follower marks the lock; a publish holds the lock's
/// row `FOR SHARE`, so it either sees the mark or commits before it (the follower then reads
/// once more before it waits).
///
/// **The listening connection.** Each store (shared by its clones) has one connection that
/// `LISTEN`s on the table's [channel](PostgresStore::channel), opened with the pool's connect
/// options but outside the pool (a wait never holds a pooled connection; count one more
/// connection per process against `max_connections`). It starts with the first follower, and
/// ends when the last clone of the store is dropped. It hands each notification to the
/// waiting followers of its key. When its connection is lost it connects again, and wakes
/// every follower to read once (notifications sent meanwhile are lost). A follower waits at
/// most until the end of the lock's lease as its last read saw it (a lease running out sends
/// nothing: the follower reads again then, and finds it renewed or gone), and at most
/// [`with_follow_recheck`](PostgresStoreBuilder::with_follow_recheck) (default 10 s) in case
/// a notification was lost without a sign. A follower that finds nothing new waits without
/// reading first when nothing was notified since its previous read: about one read per
/// published batch. If the listening connection cannot be made within the operation timeout,
/// `follow` fails with [`StoreError::is_timeout`].
///
/// A lock taken in [transactional mode](#transactional-mode) is never followed: its row is
/// uncommitted until the commit that turns it into the record, so no follower can see or mark
/// it (a follower finds nothing live, at once), and nothing is published (the response is
/// buffered until the commit). Its duplicates wait on the same listening connection instead,
/// for the end of its transaction: each registers its wait in the key's *wait marker*, a row
/// of the live log table with an all-zero token (`seq` 0, `n` the waits registered), which the
/// layer deletes, notifying, once the transaction ended (see
/// [transactional mode](crate::transactional#waiting)).
///
/// # Expiry and fencing
///
/// Time is the database's `clock_timestamp()`, never a process's clock, so replicas with
/// skewed clocks agree, and a record written at the end of a long transaction still lives its
/// whole TTL (`now()` would count from the start of the transaction). A row past its
/// `expires_at` counts as absent for every operation: `begin` takes it over, and `complete`,
/// `renew` and `release` change a row only while it is locked by the caller's token under an
/// unexpired lease. Expired rows are deleted by a background reaper (started on first use
/// inside a tokio runtime, started again on the next runtime if that one ends, stopped when
/// the last clone of the store is dropped), at most
/// [`with_reap_batch`](PostgresStoreBuilder::with_reap_batch) rows per statement (default
/// 1 000) every [`with_cleanup_interval`](PostgresStoreBuilder::with_cleanup_interval) (default
/// 60 s), at once again while batches come back full. Rows locked by a running transaction are
/// skipped, never waited for. [`reap`](PostgresStore::reap) runs one batch now.
///
/// # Failure
///
/// Every operation, waiting for a pooled connection included, is bounded by the
/// [operation timeout](PostgresStoreBuilder::with_operation_timeout) (default 5 s): past it,
/// [`StoreError::is_timeout`]. A database that is down, a connection killed mid-operation, or
/// any error PostgreSQL reports is [`StoreError::is_unavailable`]; a row this crate cannot read
/// is [`StoreError::is_corrupt`]. The layer fails closed on all of them by default (`503`, the
/// handler does not run). A timed-out or cut `begin` may still have locked the key in the
/// database: retries then get `409` until its lease ends; the handler never runs twice.
///
/// # Transactional mode
///
/// In [transactional mode](crate::transactional) the handler's own writes, the lock and the record commit in
/// one transaction: see [`IdempotencyLayer::transactional`](crate::IdempotencyLayer::transactional).
///
/// Cloning is cheap; clones share the pool, the reaper and the listening connection.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) statements: Statements,
    pub(crate) operation_timeout: Duration,
    reap_interval: Duration,
    reap_batch: i64,
    reaper: Background,
    /// The longest a follower waits without reading again.
    pub(crate) follow_recheck: Duration,
    pub(crate) listener: live::Listener,
}

impl PostgresStore {
    /// A store with the defaults (table `idempotency`) over `pool`. Needs no connection yet.
    pub fn new(pool: PgPool) -> Self {
        Self::builder().build(pool)
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The table, quoted and qualified as the statements name it (`"idempotency"`).
    pub fn table(&self) -> &str {
        &self.inner.statements.table
    }

    /// The live log table of join mode, quoted and qualified like [`table`](Self::table)
    /// (`"idempotency_live"`).
    pub fn live_table(&self) -> &str {
        &self.inner.statements.live
    }

    /// The channel the store's notifications go on (`tower_idempotency_` and 16 hex digits
    /// of a digest of the table's name): its listening connection shows
    /// `LISTEN "<channel>"` in `pg_stat_activity`.
    pub fn channel(&self) -> &str {
        &self.inner.statements.channel
    }

    /// Creates the table, its index and the live log table if they do not exist, and adds the
    /// `followed` and `grace_until` columns to a table made before them (the DDL of
    /// `migrations/0001_idempotency.sql`, `0002_idempotency_live.sql` then
    /// `0003_idempotency_grace.sql`, for the configured table).
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(AssertSqlSafe(self.inner.statements.create.clone())).execute(&self.inner.pool).await?;
        Ok(())
    }

    /// The DDL [`migrate`](Self::migrate) runs, for the application's own migrations.
    pub fn schema_sql(&self) -> &str {
        &self.inner.statements.create
    }

    /// Deletes up to one batch of expired rows now and returns how many it deleted (the
    /// background reaper does this on its own).
    pub async fn reap(&self) -> Result<u64, StoreError> {
        self.inner.reap().await
    }

    /// Runs `operation` within the operation timeout, after making sure the reaper runs.
    async fn run<T>(&self, operation: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.ensure_reaper();
        tokio::time::timeout(self.inner.operation_timeout, operation)
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout()))
    }

    /// Runs an owner-only write that changes one row (`renew`): whether it did.
    async fn owner_write(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, StoreError> {
        let done = self.run(async { query.execute(&self.inner.pool).await.map_err(store_error) }).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Runs an owner-only write that answers with a row when it changed the key (`complete`,
    /// `release`, which end the lock's log too): whether it did.
    async fn owner_end(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, StoreError> {
        let done = self.run(async { query.fetch_optional(&self.inner.pool).await.map_err(store_error) }).await?;
        Ok(done.is_some())
    }

    pub(crate) fn ensure_reaper(&self) {
        let (store, every) = (Arc::downgrade(&self.inner), self.inner.reap_interval);
        self.inner.reaper.ensure(|running| reaper::reap_forever(store, every, running));
    }
}

/// A sqlx error as a store error: a pool timeout is a timeout, a row this crate cannot read
/// corrupt, anything else unavailable.
fn store_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::PoolTimedOut => StoreError::timeout(),
        sqlx::Error::Decode(source) => StoreError::corrupt(source),
        error => StoreError::unavailable(error),
    }
}

/// The `scope` column of `key`: the 32-byte digest, or empty when unscoped.
pub(crate) fn scope_bytes(key: &StoreKey) -> &[u8] {
    key.scope().map_or(&[][..], |scope| scope.as_bytes())
}

/// A duration as whole microseconds (at most a century, which the layer never exceeds).
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX).min(3_155_760_000_000_000)
}

/// The `response` column of `record`: its encoding, or `None` when not retained (and for a
/// response with a field too large for the encoding, which cannot be kept either).
fn encode(record: &Record) -> Option<Vec<u8>> {
    match record {
        Record::Response(response) => {
            let mut out = Vec::with_capacity(response.encoded_len());
            response.encode_into(&mut out).map(|()| out)
        }
        _ => None,
    }
}

/// A `response` column read back: the record, or not retained when `NULL`.
fn decode_record(encoded: Option<Vec<u8>>) -> Result<Record, StoreError> {
    match encoded {
        None => Ok(Record::NotRetained),
        Some(encoded) => StoredResponse::decode(Bytes::from(encoded))
            .map(|response| Record::Response(Arc::new(response)))
            .map_err(|error| StoreError::corrupt(format!("PostgreSQL row: {}", error.0))),
    }
}

/// What `begin`'s row says.
pub(crate) fn decode_begin(row: &PgRow, token: LockToken) -> Result<Begin, StoreError> {
    let corrupt = |error: sqlx::Error| StoreError::corrupt(error);
    match row.try_get::<i32, _>(0).map_err(corrupt)? {
        state::EXECUTE => Ok(Begin::Execute(token)),
        state::MISMATCH => Ok(Begin::Mismatch),
        state::IN_FLIGHT => Ok(Begin::Locked),
        state::EXPIRED => Ok(Begin::Expired),
        state::COMPLETED => decode_record(row.try_get(1).map_err(corrupt)?).map(Begin::Completed),
        _ => Err(StoreError::corrupt("PostgreSQL row: unknown state")),
    }
}

/// `begin` on `connection` (pooled, or a transaction's): the statement, run again while it
/// races a concurrent `begin` that committed meanwhile.
async fn begin_on(
    statements: &Statements,
    connection: &mut PgConnection,
    key: &StoreKey,
    token: LockToken,
    lease: Duration,
) -> Result<Begin, sqlx::Error> {
    for _ in 0..BEGIN_ATTEMPTS {
        let row = sqlx::query(AssertSqlSafe(statements.begin.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&token.fingerprint().as_bytes()[..])
            .bind(&token.id().to_be_bytes()[..])
            .bind(micros(lease))
            .fetch_optional(&mut *connection)
            .await?;
        if let Some(row) = row {
            return decode_begin(&row, token).map_err(|error| sqlx::Error::Decode(Box::new(error)));
        }
    }
    Err(sqlx::Error::Protocol("begin kept racing concurrent writers of the same key".into()))
}

impl IdempotencyStore for PostgresStore {
    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        let token = LockToken::new(*fingerprint);
        let statements = &self.inner.statements;
        self.run(async {
            let mut connection = self.inner.pool.acquire().await.map_err(store_error)?;
            begin_on(statements, &mut connection, key, token, lease).await.map_err(store_error)
        })
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // No grace: the same statement, the row's grace ending with its TTL.
        self.complete_with_grace(key, lock, record, ttl, Duration::ZERO).await
    }

    /// The row is kept, record included, until the grace ends (its `grace_until`), when the
    /// reaper deletes it: the record's bytes for the grace, and one `timestamptz` per row.
    async fn complete_with_grace(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Duration,
    ) -> Result<bool, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.complete.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&lock.id().to_be_bytes()[..])
            .bind(encode(&record))
            .bind(micros(ttl))
            .bind(&live::key_id(key)[..])
            .bind(micros(grace));
        self.owner_end(query).await
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.renew.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&lock.id().to_be_bytes()[..])
            .bind(micros(lease));
        self.owner_write(query).await
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.release.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&lock.id().to_be_bytes()[..])
            .bind(&live::key_id(key)[..]);
        self.owner_end(query).await
    }
}

/// The end of a lease or of a TTL is the database's: `inspect` reads the time left and adds
/// it to this process's clock. In transactional mode a request in flight holds its row in its
/// own uncommitted transaction, so it shows (and purging is refused) only once committed: a
/// key that `inspect` calls unknown may be in flight there.
impl Inspect for PostgresStore {
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.inspect.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str());
        let row = self.run(async { query.fetch_optional(&self.inner.pool).await.map_err(store_error) }).await?;
        let Some(row) = row else { return Ok(KeyState::Unknown) };
        let corrupt = |error: sqlx::Error| StoreError::corrupt(error);
        let left = u64::try_from(row.try_get::<i64, _>("left_us").map_err(corrupt)?).unwrap_or(0);
        let until = std::time::SystemTime::now() + Duration::from_micros(left);
        match row.try_get::<Option<Vec<u8>>, _>("token").map_err(corrupt)? {
            Some(token) => {
                let id = <[u8; 16]>::try_from(token.as_slice())
                    .map_err(|_| StoreError::corrupt("PostgreSQL row: a token of another length"))?;
                let fingerprint = <[u8; 32]>::try_from(row.try_get::<Vec<u8>, _>("fingerprint").map_err(corrupt)?)
                    .map_err(|_| StoreError::corrupt("PostgreSQL row: a fingerprint of another length"))?;
                let lock = LockToken::from_parts(u128::from_be_bytes(id), Fingerprint::from_bytes(fingerprint));
                Ok(KeyState::Locked(Locked::new(&lock, until)))
            }
            None => Ok(KeyState::Completed(Completed::new(
                decode_record(row.try_get("response").map_err(corrupt)?)?,
                until,
            ))),
        }
    }

    async fn purge(&self, key: &StoreKey) -> Result<Purged, StoreError> {
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.purge.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&live::key_id(key)[..]);
        let row = self.run(async { query.fetch_one(&self.inner.pool).await.map_err(store_error) }).await?;
        let corrupt = |error: sqlx::Error| StoreError::corrupt(error);
        let (removed, in_flight) = (
            row.try_get::<bool, _>("removed").map_err(corrupt)?,
            row.try_get::<bool, _>("in_flight").map_err(corrupt)?,
        );
        Ok(match (removed, in_flight) {
            (true, _) => Purged::Removed,
            (false, true) => Purged::Locked,
            (false, false) => Purged::Unknown,
        })
    }
}

impl LiveLog for PostgresStore {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.publish_events(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.follow_log(key, fingerprint, cursor, timeout).await
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.statements.table)
            .field("operation_timeout", &self.inner.operation_timeout)
            .field("reap_interval", &self.inner.reap_interval)
            .field("reap_batch", &self.inner.reap_batch)
            .field("follow_recheck", &self.inner.follow_recheck)
            .field("listener", &self.inner.listener)
            .finish_non_exhaustive()
    }
}

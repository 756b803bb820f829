//! Transactional mode (feature `postgres`), over a [`PostgresStore`]: the handler gets
//! the layer's database transaction ([`PgTransaction`], in the request's
//! extensions), and the key's lock, everything the handler writes through it and the recorded
//! response commit in that one transaction, before the response is released to the client.
//!
//! ```no_run
//! use tower_idempotency::{IdempotencyLayer, Secret, store::PostgresStore};
//! # fn layer(pool: tower_idempotency::store::sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! // The deployment secret, the same on every replica. Every setting of the layer,
//! // the secret included, is made before `transactional()`.
//! let secret = Secret::new(std::env::var("IDEMPOTENCY_SECRET")?)?;
//! let layer = IdempotencyLayer::from_store(PostgresStore::new(pool)).with_secret(secret).transactional();
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! It is a mode of the same layer, not a layer of its own: the request takes the same path
//! through it (the same admission of the key, the same buffering, scope and fingerprint, the
//! same answers to what `begin` finds, the same bound on waiting duplicates), and only how
//! the key is taken, how a duplicate waits and how the handler executes differ. It takes
//! every setting of the [`IdempotencyLayer`] it was made from (methods, key header and
//! policy, scope, fingerprint, limits, TTL, duplicates, renderer, retry hints), except fail
//! open: a store failure always answers `503` here (the handler needs the transaction). Its
//! service is [`Idempotency<S, Transactional>`](crate::Idempotency).
//!
//! # What it promises
//!
//! A crash of the process, a failed commit or a rollback anywhere before the commit leaves
//! nothing: no row the handler wrote, no record, the key free. After the commit the record
//! exists, and only then does the client see the response. So a retry either replays, or
//! executes against a database where the first attempt never happened: exactly once for
//! everything the handler writes through the transaction, with no window between the work
//! and its record (the window every cache-based idempotency layer leaves: work committed,
//! process killed before the record is stored, key expired, work done twice).
//!
//! Writes the handler makes elsewhere (another database, a payment provider, a second
//! connection of the pool) are not in the transaction: they are as in the plain layer.
//!
//! # How a request runs
//!
//! 1. The body is buffered and fingerprinted as in the plain layer. The layer opens a
//!    transaction on the store's pool and, in one statement, reads the key's row: a completed
//!    record replays, another fingerprint is `422`, exactly as in the plain layer, and neither
//!    takes any lock (so any number of concurrent retries of a completed key all replay).
//!    Only a key without a row is taken: under a transaction-scoped advisory lock on the key
//!    (`pg_try_advisory_xact_lock`), the same statement inserts its row.
//! 2. A duplicate of a request in flight cannot see its row (it is not committed), but finds
//!    the advisory lock held. With [`Duplicates::Reject`](crate::Duplicates::Reject) (the
//!    default) it gets `409` at once. With [`Duplicates::Wait`](crate::Duplicates::Wait) (and
//!    `Join`, which waits as `Wait` does here: nothing is released before the commit) it
//!    rolls back its transaction and waits **outside PostgreSQL**, holding no pool
//!    connection; at most [`with_max_waiters`](crate::IdempotencyLayer::with_max_waiters)
//!    duplicates of one key wait in one process, the others get `409`. It is woken by a
//!    notification when the first request's transaction ends (see *Waiting* below): when the
//!    first committed it replays the record, when the first rolled back it takes the key and
//!    executes, past the wait timeout `409`. Either way it never sees a half-done attempt.
//! 3. The handler runs with the transaction. It runs to its end even if the client leaves
//!    (the request runs on its own task).
//! 4. A response the cache predicate rejects (by default any non-`2xx`), an error or a panic
//!    of the handler **rolls back**, and the rollback is done before the answer (the error,
//!    the panic) leaves the layer: the handler's writes are undone with the lock, and a retry
//!    sent the moment the answer arrives executes again. A recordable response is buffered
//!    whole, **up to the record limit**
//!    ([`with_max_record`](crate::IdempotencyLayer::with_max_record), default 1 MiB): a larger
//!    one rolls back and the client gets `500` `response-too-large` (the response cannot be
//!    streamed before the commit, and the plain layer's not-retained record would commit work whose
//!    response no retry could ever see); a body that fails rolls back too (`503`
//!    `transaction-failed`).
//! 5. The record is written in the transaction, the transaction commits, then the response
//!    goes out. The record's statement updates the key's row only if this very transaction
//!    wrote it (`xmin`): a handler that ended the transaction itself, with its own `COMMIT` or
//!    `ROLLBACK` on the connection it was lent, is caught there, before anything is recorded.
//!    The layer then rolls back whatever the handler left open, deletes the key's lock if the
//!    handler's `COMMIT` kept it, logs an error naming the cause, and answers `500`
//!    `transaction-ended` (final); the key is free. What the handler committed itself stays:
//!    never end the layer's transaction.
//! 6. A commit that fails and may pass on a retry (a serialization failure, a deadlock, the
//!    connection lost) answers `503` `transaction-failed` with `Retry-After`: nothing was
//!    kept and the key is free (PostgreSQL reports a failed commit before it has released
//!    the key's lock, so the layer rolls back on the same connection, which waits for the
//!    abort, before it answers). (A connection lost during the commit itself may hide a commit
//!    that happened: the retry then replays it.) A commit that broke an integrity constraint
//!    (SQLSTATE class `23`, e.g. a deferred unique or foreign key constraint) fails the same
//!    way on every retry: it answers `409` `transaction-rejected`, final
//!    (`x-should-retry: false`, no `Retry-After`), nothing kept, the key free.
//!
//! A covered request without a key (where the key is optional, the default) still runs in a
//! transaction of its own, so a handler can always take its [`PgTransaction`] from the
//! extensions: it commits before the response's head goes out when the cache predicate
//! accepts the head (a `2xx` by default), and rolls back otherwise, as on an error or a panic.
//! Nothing is recorded and the body streams. Require a key
//! ([`KeyPolicy::Required`](crate::KeyPolicy::Required)) to refuse such requests with `400`
//! instead. A method the layer does not cover (by default anything but `POST` and `PATCH`)
//! passes through untouched, as in the plain layer, allocating nothing: its handler gets no
//! transaction (cover the method, with
//! [`with_methods`](crate::IdempotencyLayer::with_methods), for one that needs it).
//!
//! # Waiting
//!
//! A duplicate that finds the key's advisory lock held subscribes to the key on the store's
//! listening connection (the one join mode uses, outside the pool: see
//! [Responses in flight](crate::store::PostgresStore#responses-in-flight)), registers its wait in the
//! key's *wait marker* (a row of the live log table, committed, no WAL), and looks at the key
//! once more, outside any transaction. Once the first request's transaction has ended
//! (committed or rolled back), the layer that ran it deletes the marker, if there is one, and
//! sends a `NOTIFY` for the key, in one statement on the pool, after the answer. The marker is
//! read only after the end, so either it is seen and notified, or it was registered after the
//! end, and the look that follows it sees the end. A key nobody waits for costs that
//! statement nothing but a read of an index (no transaction id, no `NOTIFY`, so no
//! database-wide notify lock). A duplicate also looks again at the store's
//! [follow recheck](crate::store::PostgresStoreBuilder::with_follow_recheck) (default 10 s) at the
//! latest: a process that died mid-request sends nothing (PostgreSQL rolls its transaction
//! back when its connection closes).
//!
//! A statement of the layer's cancelled by `statement_timeout` (SQLSTATE `57014`) while it
//! takes or looks at the key counts as a duplicate in flight: a waiting duplicate waits on,
//! otherwise `409`; never `503` `store-unavailable`.
//!
//! # Round trips
//!
//! Besides the handler's own statements:
//!
//! | request | round trips |
//! | --- | --- |
//! | first request (committed) | 4: `BEGIN`, the key's statement (read, advisory lock, insert), the record, `COMMIT`; in wait mode one more statement after the answer (the end, above) |
//! | rolled back (predicate, error, panic, limit) | 3: `BEGIN`, the key's statement, `ROLLBACK`; one more after the answer (the end, above: it also deletes a lock a handler's own `COMMIT` kept) |
//! | failed commit | 5: the 4 of a first request, then `ROLLBACK` (the wait for the abort); one more after the answer (the end) |
//! | replay, mismatch, `409` | 3: `BEGIN`, the key's statement, `ROLLBACK` |
//! | waiting duplicate | the 3 above, then 1 to register its wait and 1 to look again; 1 look per notification (or recheck), and 3 more to take the key when the first rolled back. Woken once by a commit: 6, then it replays |
//! | request without a key | `BEGIN`, `COMMIT` or `ROLLBACK` |
//!
//! A store failure before the handler runs answers `503` `store-unavailable`; fail open
//! is not available in transactional mode (the handler needs the transaction). Each step of
//! taking the key (a pool connection and `BEGIN`, the key's statement; a waiting duplicate's
//! statements) is bounded by the store's
//! [operation timeout](crate::store::PostgresStoreBuilder::with_operation_timeout), and a wait by
//! the wait timeout; the commit is not (a commit cut short might still have happened).
//!
//! The transaction has already run the layer's statements when the handler gets it, so set
//! its isolation level for the pool's connections (`default_transaction_isolation`, e.g.
//! `options=-c default_transaction_isolation=repeatable\ read` in the URL), not with
//! `SET TRANSACTION` in the handler. Under `REPEATABLE READ` and `SERIALIZABLE` a concurrent
//! commit on the key fails the layer's own statements with a serialization failure; the layer
//! then takes the key again in a new transaction (a few times at most), which sees the
//! committed row. Under `SERIALIZABLE` the layer's read of the key also takes a predicate
//! lock on its neighbourhood in the index, so first requests on nearby keys at the same
//! time (a small table, increasing keys) can fail each other's commits: retryable `503`s.
//! Prefer `READ COMMITTED` (the default) or `REPEATABLE READ` unless the handler needs
//! `SERIALIZABLE`.
//!
//! Set PostgreSQL's `idle_in_transaction_session_timeout` so that a process cut off from
//! the database mid-request frees its key; a process that dies frees it at once (PostgreSQL
//! rolls back the transaction of a closed connection). A handler that fails or panics rolls
//! back before its answer leaves, even when a task it started still holds a clone of its
//! [`PgTransaction`] (a statement that clone is running is waited for).
//!
//! Needs PostgreSQL 13 or later (`pg_current_xact_id_if_assigned`).
//!
//! - `mod.rs`: the mode, [`Transactional`], and [`IdempotencyLayer::transactional`];
//! - `run.rs`: what it does on the request path: take the key in a transaction (a waiting
//!   duplicate waits outside it, woken by a notification), run the handler with it, record,
//!   commit, answer;
//! - `transaction.rs`: [`PgTransaction`], the handler's handle on the transaction.

use std::{fmt, sync::Arc};

use crate::{IdempotencyLayer, layer::config::StoreFailure, store::PostgresStore};

mod run;
mod transaction;

pub use transaction::{PgTransaction, PgTransactionGuard, TransactionClosed};

/// Transactional mode over a [`PostgresStore`]: see the [module docs](self). A layer in this
/// mode is an `IdempotencyLayer<Transactional>`, made by
/// [`IdempotencyLayer::transactional`]; its service is `Idempotency<S, Transactional>`.
pub struct Transactional {
    store: Arc<PostgresStore>,
}

impl fmt::Debug for Transactional {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transactional").field("store", &self.store).finish()
    }
}

impl IdempotencyLayer<PostgresStore> {
    /// This layer in transactional mode, with all its settings (fail open excepted: a store
    /// failure answers `503`): see [`transactional`](crate::transactional).
    pub fn transactional(self) -> IdempotencyLayer<Transactional> {
        self.into_mode(
            |store| Transactional { store },
            |config| {
                if config.store_failure == StoreFailure::FailOpen {
                    config.store_failure = StoreFailure::default();
                }
            },
        )
    }
}

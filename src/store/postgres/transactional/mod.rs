//! Transactional mode: [`TransactionalLayer`] and its service, [`Transactional`].
//!
//! - `mod.rs`: the layer, the service (a guarded or an unguarded run, each on its task), the
//!   response future;
//! - `run.rs`: one request: take the key in a transaction (a waiting duplicate waits outside
//!   it, woken by a notification), run the handler with it, record, commit, answer.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower::{Layer, Service};

use super::PostgresStore;
use crate::{
    IdempotencyKey, IdempotencyLayer,
    body::{RequestBody, ResponseBody},
    config::{Config, KeyPolicy},
    lock::BoxFuture,
    problem::ProblemKind,
    service::problem_response,
};

mod run;

/// The idempotency layer in transactional mode, over a [`PostgresStore`]: the handler gets
/// the layer's database transaction ([`PgTransaction`](super::PgTransaction), in the request's
/// extensions), and the key's lock, everything the handler writes through it and the recorded
/// response commit in that one transaction, before the response is released to the client.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::PostgresStore};
/// # fn layer(pool: tower_idempotency::store::sqlx::PgPool) {
/// let layer = IdempotencyLayer::from_store(PostgresStore::new(pool)).transactional();
/// # let _ = layer;
/// # }
/// ```
///
/// It takes every setting of the [`IdempotencyLayer`] it was made from (methods, key header
/// and policy, scope, fingerprint, limits, TTL, in-flight mode, renderer, retry hints).
///
/// # What it promises
///
/// A crash of the process, a failed commit or a rollback anywhere before the commit leaves
/// nothing: no row the handler wrote, no record, the key free. After the commit the record
/// exists, and only then does the client see the response. So a retry either replays, or
/// executes against a database where the first attempt never happened: exactly once for
/// everything the handler writes through the transaction, with no window between the work
/// and its record (the window every cache-based idempotency layer leaves: work committed,
/// process killed before the record is stored, key expired, work done twice).
///
/// Writes the handler makes elsewhere (another database, a payment provider, a second
/// connection of the pool) are not in the transaction: they are as in the plain layer.
///
/// # How a request runs
///
/// 1. The body is buffered and fingerprinted as in the plain layer. The layer opens a
///    transaction on the store's pool and, in one statement, reads the key's row: a completed
///    record replays, another fingerprint is `422`, exactly as in the plain layer, and neither
///    takes any lock (so any number of concurrent retries of a completed key all replay).
///    Only a key without a row is taken: under a transaction-scoped advisory lock on the key
///    (`pg_try_advisory_xact_lock`), the same statement inserts its row.
/// 2. A duplicate of a request in flight cannot see its row (it is not committed), but finds
///    the advisory lock held. With [`Duplicates::Reject`](crate::Duplicates::Reject) (the
///    default) it gets `409` at once. With [`Duplicates::Wait`](crate::Duplicates::Wait) (and
///    `Join`, which waits as `Wait` does here: nothing is released before the commit) it
///    rolls back its transaction and waits **outside PostgreSQL**, holding no pool
///    connection; at most [`with_max_waiters`](crate::IdempotencyLayer::with_max_waiters)
///    duplicates of one key wait in one process, the others get `409`. It is woken by a
///    notification when the first request's transaction ends (see *Waiting* below): when the
///    first committed it replays the record, when the first rolled back it takes the key and
///    executes, past the wait timeout `409`. Either way it never sees a half-done attempt.
/// 3. The handler runs with the transaction. It runs to its end even if the client leaves
///    (the request runs on its own task).
/// 4. A response the cache predicate rejects (by default any non-`2xx`), an error or a panic
///    of the handler **rolls back**, and the rollback is done before the answer (the error,
///    the panic) leaves the layer: the handler's writes are undone with the lock, and a retry
///    sent the moment the answer arrives executes again. A recordable response is buffered
///    whole, **up to the record limit**
///    ([`with_max_record`](crate::IdempotencyLayer::with_max_record), default 1 MiB): a larger
///    one rolls back and the client gets `500` `response-too-large` (the response cannot be
///    streamed before the commit, and the plain layer's not-retained record would commit work whose
///    response no retry could ever see); a body that fails rolls back too (`503`
///    `transaction-failed`).
/// 5. The record is written in the transaction, the transaction commits, then the response
///    goes out. The record's statement updates the key's row only if this very transaction
///    wrote it (`xmin`): a handler that ended the transaction itself, with its own `COMMIT` or
///    `ROLLBACK` on the connection it was lent, is caught there, before anything is recorded.
///    The layer then rolls back whatever the handler left open, deletes the key's lock if the
///    handler's `COMMIT` kept it, logs an error naming the cause, and answers `500`
///    `transaction-ended` (final); the key is free. What the handler committed itself stays:
///    never end the layer's transaction.
/// 6. A commit that fails and may pass on a retry (a serialization failure, a deadlock, the
///    connection lost) answers `503` `transaction-failed` with `Retry-After`: nothing was
///    kept and the key is free (PostgreSQL reports a failed commit before it has released
///    the key's lock, so the layer rolls back on the same connection, which waits for the
///    abort, before it answers). (A connection lost during the commit itself may hide a commit
///    that happened: the retry then replays it.) A commit that broke an integrity constraint
///    (SQLSTATE class `23`, e.g. a deferred unique or foreign key constraint) fails the same
///    way on every retry: it answers `409` `transaction-rejected`, final
///    (`x-should-retry: false`, no `Retry-After`), nothing kept, the key free.
///
/// A request the layer does not guard, without a key where the key is optional (the
/// default) or of a method it does not cover, still runs in a transaction of its own, so a
/// handler can always take its [`PgTransaction`](super::PgTransaction) from the extensions: it
/// commits before the response's head goes out when the cache predicate accepts the head (a
/// `2xx` by default), and rolls back otherwise, as on an error or a panic. Nothing is recorded
/// and the body streams. Require a key
/// ([`KeyPolicy::Required`](crate::KeyPolicy::Required)) to refuse such requests with `400`
/// instead.
///
/// # Waiting
///
/// A duplicate that finds the key's advisory lock held subscribes to the key on the store's
/// listening connection (the one join mode uses, outside the pool: see
/// [Responses in flight](super::PostgresStore#responses-in-flight)), registers its wait in the
/// key's *wait marker* (a row of the live log table, committed, no WAL), and looks at the key
/// once more, outside any transaction. Once the first request's transaction has ended
/// (committed or rolled back), the layer that ran it deletes the marker, if there is one, and
/// sends a `NOTIFY` for the key, in one statement on the pool, after the answer. The marker is
/// read only after the end, so either it is seen and notified, or it was registered after the
/// end, and the look that follows it sees the end. A key nobody waits for costs that
/// statement nothing but a read of an index (no transaction id, no `NOTIFY`, so no
/// database-wide notify lock). A duplicate also looks again at the store's
/// [follow recheck](super::PostgresStoreBuilder::with_follow_recheck) (default 10 s) at the
/// latest: a process that died mid-request sends nothing (PostgreSQL rolls its transaction
/// back when its connection closes).
///
/// A statement of the layer's cancelled by `statement_timeout` (SQLSTATE `57014`) while it
/// takes or looks at the key counts as a duplicate in flight: a waiting duplicate waits on,
/// otherwise `409`; never `503` `store-unavailable`.
///
/// # Round trips
///
/// Besides the handler's own statements:
///
/// | request | round trips |
/// | --- | --- |
/// | first request (committed) | 4: `BEGIN`, the key's statement (read, advisory lock, insert), the record, `COMMIT`; in wait mode one more statement after the answer (the end, above) |
/// | rolled back (predicate, error, panic, limit) | 3: `BEGIN`, the key's statement, `ROLLBACK`; one more after the answer (the end, above: it also deletes a lock a handler's own `COMMIT` kept) |
/// | failed commit | 5: the 4 of a first request, then `ROLLBACK` (the wait for the abort); one more after the answer (the end) |
/// | replay, mismatch, `409` | 3: `BEGIN`, the key's statement, `ROLLBACK` |
/// | waiting duplicate | the 3 above, then 1 to register its wait and 1 to look again; 1 look per notification (or recheck), and 3 more to take the key when the first rolled back. Woken once by a commit: 6, then it replays |
/// | request without a key | `BEGIN`, `COMMIT` or `ROLLBACK` |
///
/// A store failure before the handler runs answers `503` `store-unavailable`; fail open
/// is not available in transactional mode (the handler needs the transaction). Each step of
/// taking the key (a pool connection and `BEGIN`, the key's statement; a waiting duplicate's
/// statements) is bounded by the store's
/// [operation timeout](super::PostgresStoreBuilder::with_operation_timeout), and a wait by
/// the wait timeout; the commit is not (a commit cut short might still have happened).
///
/// The transaction has already run the layer's statements when the handler gets it, so set
/// its isolation level for the pool's connections (`default_transaction_isolation`, e.g.
/// `options=-c default_transaction_isolation=repeatable\ read` in the URL), not with
/// `SET TRANSACTION` in the handler. Under `REPEATABLE READ` and `SERIALIZABLE` a concurrent
/// commit on the key fails the layer's own statements with a serialization failure; the layer
/// then takes the key again in a new transaction (a few times at most), which sees the
/// committed row. Under `SERIALIZABLE` the layer's read of the key also takes a predicate
/// lock on its neighbourhood in the index, so first requests on nearby keys at the same
/// time (a small table, increasing keys) can fail each other's commits: retryable `503`s.
/// Prefer `READ COMMITTED` (the default) or `REPEATABLE READ` unless the handler needs
/// `SERIALIZABLE`.
///
/// Set PostgreSQL's `idle_in_transaction_session_timeout` so that a process cut off from
/// the database mid-request frees its key; a process that dies frees it at once (PostgreSQL
/// rolls back the transaction of a closed connection). A handler that fails or panics rolls
/// back before its answer leaves, even when a task it started still holds a clone of its
/// [`PgTransaction`](super::PgTransaction) (a statement that clone is running is waited for).
///
/// Needs PostgreSQL 13 or later (`pg_current_xact_id_if_assigned`).
#[must_use]
pub struct TransactionalLayer {
    store: Arc<PostgresStore>,
    config: Arc<Config>,
}

impl IdempotencyLayer<PostgresStore> {
    /// This layer in transactional mode, with all its settings: see [`TransactionalLayer`].
    pub fn transactional(self) -> TransactionalLayer {
        let (store, config) = self.into_parts();
        TransactionalLayer { store, config }
    }
}

impl Clone for TransactionalLayer {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), config: self.config.clone() }
    }
}

impl fmt::Debug for TransactionalLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionalLayer").field("store", &self.store).field("config", &self.config).finish()
    }
}

impl<S> Layer<S> for TransactionalLayer {
    type Service = Transactional<S>;

    fn layer(&self, inner: S) -> Transactional<S> {
        Transactional { inner, store: self.store.clone(), config: self.config.clone() }
    }
}

/// The service of a [`TransactionalLayer`] around the inner service `S`.
pub struct Transactional<S> {
    inner: S,
    store: Arc<PostgresStore>,
    config: Arc<Config>,
}

impl<S: Clone> Clone for Transactional<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), store: self.store.clone(), config: self.config.clone() }
    }
}

impl<S: fmt::Debug> fmt::Debug for Transactional<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transactional").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// The response future of [`Transactional`]: the request runs on its own task, so dropping
/// this future cancels nothing.
pub struct TransactionalResponseFuture<B: Body, E> {
    future: BoxFuture<Result<Response<ResponseBody<B>>, E>>,
}

impl<B: Body, E> Future for TransactionalResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx)
    }
}

impl<B: Body, E> fmt::Debug for TransactionalResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransactionalResponseFuture")
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Transactional<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf + Send,
    ResBody::Error: Into<tower::BoxError> + Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = TransactionalResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let ready = |response| TransactionalResponseFuture { future: Box::pin(async move { Ok(response) }) };
        let key = if config.covers(request.method()) {
            match IdempotencyKey::from_headers(request.headers(), &config.header) {
                Ok(Some(key)) => Some(key),
                Ok(None) if config.key_policy == KeyPolicy::Optional => None,
                Ok(None) => return ready(problem_response(config, request.headers(), ProblemKind::MissingKey, None)),
                Err(_) => return ready(problem_response(config, request.headers(), ProblemKind::InvalidKey, None)),
            }
        } else {
            None
        };
        // As in the plain layer: take the readied instance, leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let run = run::Run { inner, store: self.store.clone(), config: config.clone() };
        // The request runs on a task of its own, so that its transaction ends as the layer
        // decides even when the client leaves; unguarded requests (no key, an uncovered
        // method) too, in a transaction of their own.
        let task = match key {
            Some(key) => tokio::spawn(run.run(request, key)),
            None => tokio::spawn(run.run_unguarded(request)),
        };
        TransactionalResponseFuture {
            future: Box::pin(async move {
                match task.await {
                    Ok(result) => result,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    // The runtime is shutting down: the transaction was dropped, so rolled back.
                    Err(_) => {
                        let retry_after = Some(std::time::Duration::from_secs(1));
                        Ok(problem_response(
                            &config,
                            &http::HeaderMap::new(),
                            ProblemKind::TransactionFailed,
                            retry_after,
                        ))
                    }
                }
            }),
        }
    }
}

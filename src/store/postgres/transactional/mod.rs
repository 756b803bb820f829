//! Transactional mode: [`TransactionalLayer`] and its service, [`Transactional`].
//!
//! - `mod.rs`: the layer, the service (bypass or run), the response future;
//! - `run.rs`: one request: take the key in a transaction, run the handler with it, record,
//!   commit, answer.

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
///    transaction on the store's pool and inserts the key's row in it: a completed record
///    replays, another fingerprint is `422`, exactly as in the plain layer.
/// 2. A duplicate of a request in flight cannot see its row (it is not committed). With
///    [`Duplicates::Reject`](crate::Duplicates::Reject) (the default) the layer first takes a
///    transaction-scoped advisory lock on the key (`pg_try_advisory_xact_lock`): a duplicate
///    that cannot take it gets `409` at once. With [`Duplicates::Wait`](crate::Duplicates::Wait)
///    its insert waits on the first request's uncommitted row (notified by PostgreSQL itself,
///    no polling), bounded by the wait timeout as `lock_timeout`: when the first commits it
///    replays the record, when the first rolls back it executes, past the timeout `409`.
///    Either way it never sees a half-done attempt.
/// 3. The handler runs with the transaction. It runs to its end even if the client leaves
///    (the request runs on its own task).
/// 4. A response the cache predicate rejects (by default any non-`2xx`), an error or a panic
///    of the handler **rolls back**: the handler's writes are undone with the lock, and a retry
///    executes again. A recordable response is buffered whole, **up to the record limit**
///    ([`with_max_record`](crate::IdempotencyLayer::with_max_record), default 1 MiB): a larger
///    one rolls back and the client gets `500` `response-too-large` (the response cannot be
///    streamed before the commit, and the plain layer's not-retained record would commit work whose
///    response no retry could ever see); a body that fails rolls back too (`503`
///    `transaction-failed`).
/// 5. The record is written in the transaction, the transaction commits, then the response
///    goes out. A commit that fails (a serialization failure, a deferred constraint, the
///    connection lost) answers `503` `transaction-failed` with `Retry-After`: nothing was kept
///    and the key is free. (A connection lost during the commit itself may hide a commit
///    that happened: the retry then replays it.)
///
/// Round trips of a first request, besides the handler's own statements: `BEGIN`, the
/// advisory lock (or, waiting, `SET LOCAL lock_timeout` before and after the insert), the
/// key's insert, the record's update, `COMMIT`. A replay, a mismatch or a `409` ends after the
/// insert (or the advisory lock) with a rollback.
///
/// A store failure before the handler runs answers `503` `store-unavailable`; fail open
/// is not available in transactional mode (the handler needs the transaction). Taking the key
/// (a pool connection, `BEGIN`, the lock, the insert) is bounded by the store's
/// [operation timeout](super::PostgresStoreBuilder::with_operation_timeout), plus the wait
/// timeout when waiting; the commit is not (a commit cut short might still have happened).
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
/// back at once, even when a task it started still holds a clone of its [`PgTransaction`](super::PgTransaction).
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
        let bypass = |inner: &mut S, request: Request<ReqBody>| {
            let call = inner.call(request.map(RequestBody::streaming));
            TransactionalResponseFuture { future: Box::pin(async move { Ok(call.await?.map(ResponseBody::inner)) }) }
        };
        if !config.covers(request.method()) {
            return bypass(&mut self.inner, request);
        }
        let key = match IdempotencyKey::from_headers(request.headers(), &config.header) {
            Ok(Some(key)) => key,
            Ok(None) if config.key_policy == KeyPolicy::Optional => return bypass(&mut self.inner, request),
            Ok(None) => return ready(problem_response(config, request.headers(), ProblemKind::MissingKey, None)),
            Err(_) => return ready(problem_response(config, request.headers(), ProblemKind::InvalidKey, None)),
        };
        // As in the plain layer: take the readied instance, leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let run = run::Run { inner, store: self.store.clone(), config: config.clone() };
        let task = tokio::spawn(run.run(request, key));
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

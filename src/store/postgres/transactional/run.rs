//! One request in transactional mode: take the key in a transaction, run the handler with it,
//! record, commit, then answer.

use std::{sync::Arc, time::Duration};

use bytes::Buf;
use http::{Request, Response, request};
use http_body::Body;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};
use tower::{Service, ServiceExt};

use super::super::{PgTransaction, PostgresStore, begin_on, micros, scope_bytes};
use crate::{
    IdempotencyKey, Outcome,
    body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
    config::{Config, Duplicates, StoreFailure},
    events::marks_of,
    execute::stored_headers,
    headers::LAST_EVENT_ID,
    problem::ProblemKind,
    replay::replay,
    service::problem_response,
    store::{Begin, Fingerprint, LockToken, Record, StoreKey, StoredResponse},
};

/// PostgreSQL's `lock_not_available`: a `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

pub(super) struct Run<S> {
    pub(super) inner: S,
    pub(super) store: Arc<PostgresStore>,
    pub(super) config: Arc<Config>,
}

/// What taking the key in a transaction found.
enum Taken {
    /// The key is this transaction's: run the handler.
    Execute(Transaction<'static, Postgres>, LockToken),
    /// Replay, refuse or mismatch: the transaction was rolled back.
    Answer(Begin),
    /// A duplicate is in flight (its advisory lock is held, or the wait timed out).
    Busy,
}

impl<S> Run<S> {
    pub(super) async fn run<ReqBody, ResBody>(
        self,
        request: Request<ReqBody>,
        key: IdempotencyKey,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
        S::Future: Send + 'static,
        ReqBody: Body + Send + 'static,
        ReqBody::Data: Buf + Send,
        ResBody: Body + Send + 'static,
        ResBody::Data: Buf + Send,
        ResBody::Error: Into<tower::BoxError> + Send,
    {
        let Self { inner, store, config } = self;
        let (mut head, body) = request.into_parts();
        let problem =
            |head: &request::Parts, kind, retry_after| problem_response(&config, &head.headers, kind, retry_after);
        let body = match buffer(body, config.max_request_body).await {
            Ok(body) => body,
            Err(BufferError::TooLarge) => return Ok(problem(&head, ProblemKind::RequestBodyTooLarge, None)),
            Err(BufferError::Unreadable) => return Ok(problem(&head, ProblemKind::RequestBodyUnreadable, None)),
        };
        let fingerprint = Fingerprint::compute(&head, &config.fingerprint_headers, &body.data);
        let key = StoreKey::new(config.scope.resolve(&head), key);
        // The `Retry-After`s the plain layer sends: its in-flight setting, its store-failure one.
        let in_flight_retry_after = config.in_flight_retry_after();
        let unavailable_retry_after = match config.store_failure {
            StoreFailure::FailClosed { retry_after } => retry_after,
            _ => Duration::from_secs(1),
        };
        let retry_after = Duration::from_secs(1);

        store.ensure_reaper();
        // Taking the key is bounded like every store operation (and, when waiting, by the wait
        // timeout too); past it the transaction is dropped, so rolled back.
        let bound = store.inner.operation_timeout
            + match config.duplicates {
                Duplicates::Wait { timeout } | Duplicates::Join { timeout } => timeout,
                _ => Duration::ZERO,
            };
        let taken = tokio::time::timeout(bound, take(&store, &config, &key, fingerprint))
            .await
            .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        let (transaction, token) = match taken {
            Ok(Taken::Execute(transaction, token)) => (transaction, token),
            Ok(Taken::Answer(Begin::Completed(Record::Response(record)))) => {
                return Ok(replay(record, head.headers.get(LAST_EVENT_ID)));
            }
            Ok(Taken::Answer(Begin::Completed(_))) => {
                return Ok(problem(&head, ProblemKind::ResponseNotRetained, None));
            }
            Ok(Taken::Answer(Begin::Mismatch)) => return Ok(problem(&head, ProblemKind::KeyReused, None)),
            Ok(Taken::Answer(_) | Taken::Busy) => {
                return Ok(problem(&head, ProblemKind::InFlight, Some(in_flight_retry_after)));
            }
            Err(error) => {
                tracing::warn!(%error, "idempotency: PostgreSQL failed before the handler ran; answering 503");
                return Ok(problem(&head, ProblemKind::StoreUnavailable, Some(unavailable_retry_after)));
            }
        };
        let handle = PgTransaction::new(transaction);
        head.extensions.insert(handle.clone());
        let request = Request::from_parts(head, RequestBody::buffered(body));
        let headers = request.headers().clone();
        let problem = |kind, retry_after| problem_response(&config, &headers, kind, retry_after);

        // An error or a panic of the handler rolls back: the closer takes the transaction from
        // every clone of the handle (one kept by a task the handler spawned included) and drops
        // it, which sqlx rolls back.
        let closer = RollBackOnDrop(Some(handle.clone()));
        let response = inner.oneshot(request).await?;
        closer.disarm();
        let (mut head, body) = response.into_parts();
        let Some(transaction) = handle.close().await else { unreachable!("only this request closes its transaction") };
        if !config.predicate.should_record(&head) {
            rollback(transaction).await;
            head.extensions.insert(Outcome::Executed);
            return Ok(Response::from_parts(head, ResponseBody::inner(body)));
        }
        let (data, trailers) = match buffer(body, config.max_record).await {
            Ok(Buffered { data, trailers }) => (data, trailers),
            Err(BufferError::TooLarge) => {
                rollback(transaction).await;
                tracing::warn!("idempotency: response over the record limit; its transaction was rolled back");
                return Ok(problem(ProblemKind::ResponseTooLarge, None));
            }
            Err(BufferError::Unreadable) => {
                rollback(transaction).await;
                return Ok(problem(ProblemKind::TransactionFailed, Some(retry_after)));
            }
        };
        if !config.predicate.should_record_trailers(trailers.as_ref()) {
            rollback(transaction).await;
            head.extensions.insert(Outcome::Executed);
            return Ok(Response::from_parts(head, ResponseBody::full(data, trailers)));
        }
        let mut record =
            StoredResponse::new(head.status, stored_headers(&head.headers, &config.unstored_headers), data.clone());
        if let Some(trailers) = &trailers {
            record = record.with_trailers(trailers.clone());
        }
        // An event stream keeps its event ends, so a replay with `Last-Event-ID` resumes.
        record.marks = marks_of(&record.headers, &record.body);
        if let Err(error) = record_and_commit(&store, transaction, &key, token, &record, config.ttl).await {
            tracing::warn!(%error, "idempotency: the request's transaction did not commit; nothing was kept");
            return Ok(problem(ProblemKind::TransactionFailed, Some(retry_after)));
        }
        head.extensions.insert(Outcome::Executed);
        Ok(Response::from_parts(head, ResponseBody::full(data, trailers)))
    }
}

/// Takes the request's transaction from every clone of its handle when dropped before the
/// handler answered: on its error, on its panic (while unwinding), on cancellation.
struct RollBackOnDrop(Option<PgTransaction>);

impl RollBackOnDrop {
    /// The handler answered: the layer decides what becomes of the transaction.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RollBackOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abandon();
        }
    }
}

/// PostgreSQL's `serialization_failure`: under `REPEATABLE READ` or `SERIALIZABLE`, the key's
/// row changed after this transaction's snapshot was taken (a concurrent request committed
/// it). A new transaction sees it.
const SERIALIZATION_FAILURE: &str = "40001";

/// How many times taking a key starts over after a serialization failure of the layer's own
/// statements.
const TAKE_ATTEMPTS: usize = 4;

/// Opens a transaction and takes `key` in it (see the in-flight modes on
/// [`TransactionalLayer`](super::TransactionalLayer)). Under `REPEATABLE READ` or
/// `SERIALIZABLE`, a concurrent commit on the key fails the layer's statements with a
/// serialization failure: the transaction is dropped (rolled back) and taken anew, and the
/// new snapshot sees the committed row (a replay, a mismatch, or a lock in flight).
async fn take(
    store: &PostgresStore,
    config: &Config,
    key: &StoreKey,
    fingerprint: Fingerprint,
) -> Result<Taken, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match take_once(store, config, key, fingerprint).await {
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some(SERIALIZATION_FAILURE) && attempt < TAKE_ATTEMPTS =>
            {
                attempt += 1;
            }
            taken => return taken,
        }
    }
}

async fn take_once(
    store: &PostgresStore,
    config: &Config,
    key: &StoreKey,
    fingerprint: Fingerprint,
) -> Result<Taken, sqlx::Error> {
    let inner = &store.inner;
    let mut transaction = inner.pool.begin().await?;
    let token = LockToken::new(fingerprint);
    let began = match config.duplicates {
        Duplicates::Reject { .. } => {
            let lock = advisory_key(&inner.statements.table, key);
            let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(lock)
                .fetch_one(&mut *transaction)
                .await?;
            if !taken {
                rollback(transaction).await;
                return Ok(Taken::Busy);
            }
            begin_on(&inner.statements, &mut transaction, key, token, config.lease).await
        }
        // The response is released only once committed: nothing to join before, so a join waits.
        Duplicates::Wait { timeout } | Duplicates::Join { timeout } => {
            let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
            set_lock_timeout(&mut transaction, &format!("'{millis}ms'")).await?;
            let began = begin_on(&inner.statements, &mut transaction, key, token, config.lease).await;
            if began.is_ok() {
                set_lock_timeout(&mut transaction, "DEFAULT").await?;
            }
            began
        }
    };
    match began {
        Ok(Begin::Execute(token)) => Ok(Taken::Execute(transaction, token)),
        Ok(other) => {
            rollback(transaction).await;
            Ok(Taken::Answer(other))
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            rollback(transaction).await;
            Ok(Taken::Busy)
        }
        Err(error) => Err(error),
    }
}

/// `SET LOCAL lock_timeout`: `value` is `'N ms'` with N a number this module formatted, or
/// `DEFAULT`.
async fn set_lock_timeout(connection: &mut PgConnection, value: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(format!("SET LOCAL lock_timeout = {value}"))).execute(connection).await?;
    Ok(())
}

/// The advisory lock of `key` in `table`: the first 8 bytes of a SHA-256 over both. Two keys
/// sharing it (about one pair in 2^32 among 2^32 keys in flight) only make one wait or get
/// `409` while the other runs.
fn advisory_key(table: &str, key: &StoreKey) -> i64 {
    let mut digest = Sha256::new();
    digest.update(b"tower-idempotency\0");
    digest.update(table.as_bytes());
    digest.update([0]);
    digest.update(scope_bytes(key));
    digest.update([0]);
    digest.update(key.key().as_str().as_bytes());
    let digest = digest.finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Writes the record in the transaction that holds the key, then commits.
async fn record_and_commit(
    store: &PostgresStore,
    mut transaction: Transaction<'static, Postgres>,
    key: &StoreKey,
    token: LockToken,
    record: &StoredResponse,
    ttl: Duration,
) -> Result<(), sqlx::Error> {
    let mut encoded = Vec::with_capacity(record.encoded_len());
    // A response with a field too large for the encoding cannot be kept: not retained.
    let encoded = record.encode_into(&mut encoded).map(|()| encoded);
    let written = sqlx::query(AssertSqlSafe(store.inner.statements.record_held.clone()))
        .bind(scope_bytes(key))
        .bind(key.key().as_str())
        .bind(&token.id().to_be_bytes()[..])
        .bind(encoded)
        .bind(micros(ttl))
        .execute(&mut *transaction)
        .await?;
    if written.rows_affected() != 1 {
        return Err(sqlx::Error::Protocol("the transaction's own lock row was not found".into()));
    }
    transaction.commit().await
}

async fn rollback(transaction: Transaction<'static, Postgres>) {
    if let Err(error) = transaction.rollback().await {
        tracing::debug!(%error, "idempotency: rollback failed (PostgreSQL rolls back on its own)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_differ_by_table_scope_and_key() {
        let key = |k: &[u8], scope| StoreKey::new(scope, IdempotencyKey::parse(k).unwrap());
        let a = advisory_key("t", &key(b"a", None));
        assert_eq!(a, advisory_key("t", &key(b"a", None)));
        assert_ne!(a, advisory_key("u", &key(b"a", None)));
        assert_ne!(a, advisory_key("t", &key(b"b", None)));
        assert_ne!(a, advisory_key("t", &key(b"a", Some(crate::ScopeId::digest("x")))));
    }
}

//! One request in transactional mode: take the key in a transaction (a duplicate in wait mode
//! first waits for it outside any transaction), run the handler with it, record, commit, then
//! answer. A request the layer does not guard (no key, an uncovered method) runs in a
//! transaction of its own.

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction, postgres::PgRow};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::{PgTransaction, Transactional};
use crate::{
    Outcome,
    layer::{
        answer::problem_response,
        body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
        config::Config,
        duplicates::Waited,
        execute::stored_headers,
        future::ResponseFuture,
        lock::LiveOps,
        mode::{Began, Inner, Mode},
        sse::marks_of,
    },
    problem::ProblemKind,
    store::{
        Begin, Fingerprint, LockToken, PostgresStore, StoreError, StoreKey, StoredResponse,
        postgres::{
            BEGIN_ATTEMPTS, decode_begin,
            live::key_id,
            micros, scope_bytes,
            sql::{notice, state},
        },
    },
    trace::{self, Origin},
};

/// PostgreSQL's `query_canceled`: a statement cut short by `statement_timeout` (or a cancel
/// request). Not a failure of the store: the key is looked at again, or answered `409`.
const QUERY_CANCELED: &str = "57014";

/// PostgreSQL's `serialization_failure`: under `REPEATABLE READ` or `SERIALIZABLE`, the key's
/// row changed after this transaction's snapshot was taken (a concurrent request committed
/// it). A new transaction sees it.
const SERIALIZATION_FAILURE: &str = "40001";

/// How many times taking a key starts over after a serialization failure of the layer's own
/// statements.
const TAKE_ATTEMPTS: usize = 4;

/// The `Retry-After` of a transaction that did not commit.
const RETRY_AFTER: Duration = Duration::from_secs(1);

enum Taken {
    /// The key is this transaction's: run the handler.
    Execute(Transaction<'static, Postgres>, LockToken),
    /// Replay, refuse or mismatch: the transaction was rolled back.
    Answer(Begin),
    /// A duplicate is in flight (and, waiting, it did not end in time).
    Busy,
    /// PostgreSQL failed (or did not answer within the operation timeout).
    Failed(tower::BoxError),
}

/// What a look at the key outside any transaction found.
enum Peek {
    /// No live row and no request in flight: take it.
    Free,
    /// A request in flight holds the key's advisory lock.
    Busy,
    /// A live row: replay, mismatch, or a lock of the plain layer.
    Answer(Begin),
}

/// How the commit went.
enum Committed {
    Yes,
    /// The handler ended the transaction itself: nothing was recorded.
    EndedByHandler,
    Failed(sqlx::Error),
}

/// The transaction that holds a guarded request's key, and its lock's token.
pub(crate) struct Held {
    transaction: Transaction<'static, Postgres>,
    token: LockToken,
}

impl<S, ReqBody, ResBody> Mode<S, ReqBody, ResBody> for Transactional
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
    type Held = Held;
    type Store = PostgresStore;

    fn store(this: &Arc<Self>) -> &PostgresStore {
        &this.store
    }

    /// A method the layer does not cover passes through untouched, as in the plain layer. A
    /// covered request without a key (where the key is optional) runs in a transaction of its
    /// own, on its own task, so its handler finds its `PgTransaction` as a guarded one does.
    fn pass(
        this: &Arc<Self>,
        inner: &mut S,
        request: Request<RequestBody<ReqBody>>,
        config: &Arc<Config>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error> {
        if !config.covers(request.method()) {
            return ResponseFuture::bypass(inner.call(request));
        }
        // As on the guarded path: take the readied instance, leave a fresh clone behind.
        let clone = inner.clone();
        let inner = std::mem::replace(inner, clone);
        let run = run_unguarded(inner, this.store.clone(), config.clone(), request);
        ResponseFuture::guarded(Box::pin(on_its_task(config.clone(), run)))
    }

    async fn begin(
        this: &Arc<Self>,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        config: &Config,
    ) -> Result<(Instant, Began<Held>), StoreError> {
        this.store.ensure_reaper();
        let began = Instant::now();
        let taken = Lock::new(&this.store, config, key, *fingerprint).take_in_transaction().await;
        Ok((
            began,
            match taken {
                Taken::Execute(transaction, token) => Began::Execute(Held { transaction, token }),
                Taken::Answer(begin) => Began::Answer(begin),
                // The key's advisory lock is held: a request in flight.
                Taken::Busy => Began::Answer(Begin::Locked),
                Taken::Failed(error) => return Err(StoreError::unavailable(error)),
            },
        ))
    }

    /// Waits outside any transaction, holding no connection, until the request in flight on
    /// the key ends (then `begin` again takes the key or finds its record). Joining waits as
    /// waiting does: nothing is released before the commit.
    async fn wait(
        this: &Arc<Self>,
        _: Option<LiveOps<Self>>,
        key: &StoreKey,
        fingerprint: Fingerprint,
        config: &Config,
        until: Instant,
        _join: bool,
    ) -> Result<Waited, StoreError> {
        Lock::new(&this.store, config, key, fingerprint).wait(until).await
    }

    async fn execute(
        this: Arc<Self>,
        _: Option<LiveOps<Self>>,
        held: Held,
        _began: Instant,
        key: StoreKey,
        inner: Inner<S>,
        request: Request<RequestBody<ReqBody>>,
        config: Arc<Config>,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        // Readied on the request's own task too: a failure there (or a client gone while it
        // waits) rolls the transaction back before anything else, like a handler's error.
        let run = execute(inner, this.store.clone(), key, held, request, config.clone());
        on_its_task(config, run).await
    }
}

/// Runs `run` on a task of its own, so that the request's transaction ends as the layer
/// decides even when the client leaves (the response future is dropped).
async fn on_its_task<B, E>(
    config: Arc<Config>,
    run: impl Future<Output = Result<Response<ResponseBody<B>>, E>> + Send + 'static,
) -> Result<Response<ResponseBody<B>>, E>
where
    B: Body + Send + 'static,
    E: Send + 'static,
    Response<ResponseBody<B>>: Send,
{
    match tokio::spawn(run).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => resume_unwind(error.into_panic()),
        // The runtime is shutting down: the transaction was dropped, so rolled back.
        Err(_) => Ok(problem_response(
            &config.answers,
            &http::HeaderMap::new(),
            ProblemKind::TransactionFailed,
            Some(RETRY_AFTER),
        )),
    }
}

/// A guarded request whose transaction holds its key: the handler runs with it, then the
/// record is written in it and it commits, before the answer leaves.
async fn execute<S, ReqBody, ResBody>(
    inner: Inner<S>,
    store: Arc<PostgresStore>,
    key: StoreKey,
    held: Held,
    request: Request<RequestBody<ReqBody>>,
    config: Arc<Config>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf + Send,
    ResBody::Error: Into<tower::BoxError> + Send,
{
    let Held { transaction, token } = held;
    let ended =
        Ended { store: store.clone(), key: key.clone(), token, waits: config.duplicates.wait_timeout().is_some() };
    let inner = match inner.ready().await {
        Ok(inner) => inner,
        Err(error) => {
            ended.roll_back(transaction).await;
            return Err(error);
        }
    };
    let (mut head, body) = request.into_parts();
    let handle = PgTransaction::new(transaction);
    head.extensions.insert(handle.clone());
    let request = Request::from_parts(head, body);
    let headers = request.headers().clone();
    let caller = trace::caller(&headers);
    let span = config.trace.as_ref().and_then(|hook| hook.current());
    let problem = |kind, retry_after| problem_response(&config.answers, &headers, kind, retry_after);
    let (handled, transaction) = handle_with(inner, request, handle).await;
    let response = match handled {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            ended.roll_back(transaction).await;
            return Err(error);
        }
        Err(panic) => {
            ended.roll_back(transaction).await;
            resume_unwind(panic)
        }
    };
    let (mut head, body) = response.into_parts();
    if !config.predicate.should_record(&head) {
        ended.roll_back(transaction).await;
        head.extensions.insert(Outcome::Executed);
        return Ok(Response::from_parts(head, ResponseBody::inner(body)));
    }
    let (data, trailers) = match buffer(body, config.max_record).await {
        Ok(Buffered { data, trailers }) => (data, trailers),
        Err(BufferError::TooLarge) => {
            ended.roll_back(transaction).await;
            tracing::warn!("idempotency: response over the record limit; its transaction was rolled back");
            return Ok(problem(ProblemKind::ResponseTooLarge, None));
        }
        Err(BufferError::Unreadable) => {
            ended.roll_back(transaction).await;
            return Ok(problem(ProblemKind::TransactionFailed, Some(RETRY_AFTER)));
        }
    };
    if !config.predicate.should_record_trailers(trailers.as_ref()) {
        ended.roll_back(transaction).await;
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
    record.origin = Origin { completed_at: Some(trace::completed_now()), caller, span };
    match record_and_commit(&store, transaction, &key, token, &record, config.ttl).await {
        Committed::Yes => {
            if ended.waits {
                ended.spawn(notice::COMPLETED);
            }
        }
        Committed::EndedByHandler => {
            // Before the answer: the key is free once the client hears of it.
            ended.run(notice::RELEASED).await;
            tracing::error!(
                "idempotency: the handler ended the request's transaction itself (it ran its own COMMIT or \
                 ROLLBACK on the connection it was lent); nothing was recorded and the key is free, but what \
                 the handler committed itself stays. Let the layer commit: never end its transaction"
            );
            return Ok(problem(ProblemKind::TransactionEnded, None));
        }
        Committed::Failed(error) => {
            ended.spawn(notice::RELEASED);
            let kind = commit_failure(&error);
            tracing::warn!(%error, problem = kind.slug(), "idempotency: the request's transaction did not commit; nothing was kept");
            return Ok(problem(kind, Some(RETRY_AFTER)));
        }
    }
    head.extensions.insert(Outcome::Executed);
    Ok(Response::from_parts(head, ResponseBody::full(data, trailers)))
}

/// A request the layer does not guard (no key where one is optional, or an uncovered
/// method): the handler runs in a transaction of its own, committed when the cache
/// predicate accepts the response's head (before the head goes out), rolled back
/// otherwise. Nothing is recorded; the body streams.
async fn run_unguarded<S, ReqBody, ResBody>(
    inner: S,
    store: Arc<PostgresStore>,
    config: Arc<Config>,
    request: Request<RequestBody<ReqBody>>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Body + Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf,
    ResBody::Error: Into<tower::BoxError>,
{
    store.ensure_reaper();
    let begun = tokio::time::timeout(store.inner.operation_timeout, store.inner.pool.begin()).await;
    let transaction = match begun.unwrap_or(Err(sqlx::Error::PoolTimedOut)) {
        Ok(transaction) => transaction,
        Err(error) => {
            tracing::warn!(%error, "idempotency: PostgreSQL failed before the handler ran; answering 503");
            let retry_after = Some(config.unavailable_retry_after());
            return Ok(problem_response(
                &config.answers,
                request.headers(),
                ProblemKind::StoreUnavailable,
                retry_after,
            ));
        }
    };
    let (mut head, body) = request.into_parts();
    let handle = PgTransaction::new(transaction);
    head.extensions.insert(handle.clone());
    let headers = head.headers.clone();
    let request = Request::from_parts(head, body);
    let (handled, transaction) = handle_with(inner, request, handle).await;
    let response = match handled {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            rollback(transaction).await;
            return Err(error);
        }
        Err(panic) => {
            rollback(transaction).await;
            resume_unwind(panic)
        }
    };
    let (head, body) = response.into_parts();
    if !config.predicate.should_record(&head) {
        rollback(transaction).await;
    } else if let Err(error) = transaction.commit().await {
        let kind = commit_failure(&error);
        tracing::warn!(%error, problem = kind.slug(), "idempotency: the request's transaction did not commit");
        return Ok(problem_response(&config.answers, &headers, kind, Some(RETRY_AFTER)));
    }
    Ok(Response::from_parts(head, ResponseBody::inner(body)))
}

/// Runs the handler with the transaction behind `handle`, catching its panic, and takes the
/// transaction back from every clone of the handle (waiting for a statement a clone runs).
/// The caller commits or rolls back before it answers, also on an error or a panic: a retry
/// sent the moment the answer arrives finds the key free.
async fn handle_with<S, Req, Res>(
    inner: S,
    request: Req,
    handle: PgTransaction,
) -> (Result<Result<Res, S::Error>, Box<dyn Any + Send>>, Transaction<'static, Postgres>)
where
    S: Service<Req, Response = Res> + Send + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
{
    // Cancelled (the runtime shuts down), the transaction is dropped from every clone.
    let closer = RollBackOnDrop(Some(handle.clone()));
    let handled = CatchUnwind(Box::pin(inner.oneshot(request))).await;
    closer.disarm();
    let Some(transaction) = handle.close().await else { unreachable!("only this request closes its transaction") };
    (handled, transaction)
}

/// Polls a future, catching its panic.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Drops the request's transaction from every clone of its handle if dropped armed: when the
/// request's task is cancelled (the runtime shuts down).
struct RollBackOnDrop(Option<PgTransaction>);

impl RollBackOnDrop {
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

/// Taking one key.
struct Lock<'a> {
    store: &'a PostgresStore,
    config: &'a Config,
    key: &'a StoreKey,
    fingerprint: Fingerprint,
    /// The key's advisory lock.
    advisory: i64,
    /// The key's id in the live log table and in notifications.
    id: [u8; 16],
}

/// `operation` within `within`; past it, a pool timeout.
async fn bounded<T>(
    within: Duration,
    operation: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(within, operation).await.unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

fn is_cancelled(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(error) if error.code().as_deref() == Some(QUERY_CANCELED))
}

impl<'a> Lock<'a> {
    fn new(store: &'a PostgresStore, config: &'a Config, key: &'a StoreKey, fingerprint: Fingerprint) -> Self {
        let advisory = advisory_key(&store.inner.statements.table, key);
        Self { store, config, key, fingerprint, advisory, id: key_id(key) }
    }

    /// Waits, outside any transaction and holding no connection, until `until` at most, for
    /// the request in flight to end: [`Waited::Ended`] once a look at the key finds it free
    /// (the caller's `begin` then takes it), [`Waited::Answered`] when it finds the record.
    ///
    /// The duplicate subscribes to the key on the store's listening connection, registers its
    /// wait in the key's wait marker (committed), then looks at the key once more: the end of
    /// the request in flight, which reads the marker after its commit or rollback, either sees
    /// it and notifies, or came before that look, which then sees the end. It is woken by the
    /// notification, and looks again at the latest after the store's follow recheck (an owner
    /// whose process died sends nothing).
    async fn wait(&self, until: Instant) -> Result<Waited, StoreError> {
        let inner = &self.store.inner;
        let subscription = inner.listener.subscribe(self.id);
        inner.listener.listening(inner.operation_timeout).await?;
        loop {
            if Instant::now() >= until {
                return Ok(Waited::TimedOut);
            }
            let changed = subscription.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut peeked = self.peek().await;
            if matches!(peeked, Ok(Peek::Busy | Peek::Answer(Begin::Locked))) {
                match self.register().await {
                    Err(error) if !is_cancelled(&error) => return Err(StoreError::unavailable(error)),
                    _ => peeked = self.peek().await,
                }
            }
            match peeked {
                Ok(Peek::Free) => return Ok(Waited::Ended),
                // A committed lock still running (a plain layer's on the same table, or a
                // handler that committed the layer's transaction itself): wait on, woken when
                // it ends, as for an uncommitted one.
                Ok(Peek::Answer(Begin::Locked)) => {}
                // The record (or a mismatch): answered from this look, with no transaction.
                Ok(Peek::Answer(begin)) => return Ok(Waited::Answered(begin)),
                Ok(Peek::Busy) => {}
                // `statement_timeout` cut the look short: not a store failure, wait on.
                Err(error) if is_cancelled(&error) => {}
                Err(error) => return Err(StoreError::unavailable(error)),
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Waited::TimedOut);
            }
            let wake = until.min(now + inner.follow_recheck);
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Opens a transaction and takes the key in it. A serialization failure of the layer's
    /// statements (`REPEATABLE READ`, `SERIALIZABLE`: a concurrent commit on the key) starts
    /// over in a new transaction, whose snapshot sees the committed row. A cancelled
    /// statement is `Busy`.
    async fn take_in_transaction(&self) -> Taken {
        let within = self.store.inner.operation_timeout;
        let mut attempt = 1;
        loop {
            match bounded(within, self.take_once()).await {
                Ok(taken) => return taken,
                Err(sqlx::Error::Database(error))
                    if error.code().as_deref() == Some(SERIALIZATION_FAILURE) && attempt < TAKE_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(error) if is_cancelled(&error) => return Taken::Busy,
                Err(error) => return Taken::Failed(error.into()),
            }
        }
    }

    async fn take_once(&self) -> Result<Taken, sqlx::Error> {
        let inner = &self.store.inner;
        let mut transaction = inner.pool.begin().await?;
        let token = LockToken::new(self.fingerprint);
        for _ in 0..BEGIN_ATTEMPTS {
            let row = sqlx::query(AssertSqlSafe(inner.statements.tx_begin.clone()))
                .bind(scope_bytes(self.key))
                .bind(self.key.key().as_str())
                .bind(&self.fingerprint.as_bytes()[..])
                .bind(&token.id().to_be_bytes()[..])
                .bind(micros(self.config.lease))
                .bind(self.advisory)
                .fetch_optional(&mut *transaction)
                .await;
            let row = match row {
                Ok(Some(row)) => row,
                // A concurrent `begin` committed the key after the statement's snapshot.
                Ok(None) => continue,
                Err(error) => {
                    rollback(transaction).await;
                    return Err(error);
                }
            };
            return match answer(&row, token)? {
                Peek::Free => Ok(Taken::Execute(transaction, token)),
                Peek::Busy => {
                    rollback(transaction).await;
                    Ok(Taken::Busy)
                }
                Peek::Answer(begin) => {
                    rollback(transaction).await;
                    Ok(Taken::Answer(begin))
                }
            };
        }
        rollback(transaction).await;
        Err(sqlx::Error::Protocol("begin kept racing concurrent writers of the same key".into()))
    }

    /// The key as `take` would find it, read outside any transaction (one statement).
    async fn peek(&self) -> Result<Peek, sqlx::Error> {
        let inner = &self.store.inner;
        let query = sqlx::query(AssertSqlSafe(inner.statements.tx_peek.clone()))
            .bind(scope_bytes(self.key))
            .bind(self.key.key().as_str())
            .bind(&self.fingerprint.as_bytes()[..])
            .bind(self.advisory);
        let row = bounded(inner.operation_timeout, query.fetch_one(&inner.pool)).await?;
        answer(&row, LockToken::new(self.fingerprint))
    }

    /// Registers a wait in the key's wait marker (one statement, committed).
    async fn register(&self) -> Result<(), sqlx::Error> {
        let inner = &self.store.inner;
        let query = sqlx::query(AssertSqlSafe(inner.statements.tx_wait.clone())).bind(&self.id[..]);
        bounded(inner.operation_timeout, query.execute(&inner.pool)).await?;
        Ok(())
    }
}

/// What a `tx_begin` or `tx_peek` row says (`Free`: taken, or free to take).
fn answer(row: &PgRow, token: LockToken) -> Result<Peek, sqlx::Error> {
    let decode = |error| sqlx::Error::Decode(Box::new(error));
    match row.try_get::<i32, _>(0)? {
        state::BUSY => Ok(Peek::Busy),
        _ => match decode_begin(row, token).map_err(decode)? {
            Begin::Execute(_) => Ok(Peek::Free),
            other => Ok(Peek::Answer(other)),
        },
    }
}

/// The end of a request's transaction, seen from outside it (`tx_end`): what is left of its
/// lock goes (a handler's own `COMMIT` made it outlive the transaction), and the duplicates
/// that registered a wait on the key are notified.
#[derive(Clone)]
struct Ended {
    store: Arc<PostgresStore>,
    key: StoreKey,
    token: LockToken,
    /// Whether duplicates may wait (wait or join mode): then a commit is followed by `tx_end`
    /// too.
    waits: bool,
}

impl Ended {
    /// Rolls the transaction back, then runs `tx_end` off the answer's path.
    async fn roll_back(&self, transaction: Transaction<'static, Postgres>) {
        rollback(transaction).await;
        self.spawn(notice::RELEASED);
    }

    fn spawn(&self, kind: u8) {
        let ended = self.clone();
        tokio::spawn(async move { ended.run(kind).await });
    }

    async fn run(&self, kind: u8) {
        let inner = &self.store.inner;
        let kind = [kind];
        let kind = std::str::from_utf8(&kind).unwrap_or("r");
        let query = sqlx::query(AssertSqlSafe(inner.statements.tx_end.clone()))
            .bind(scope_bytes(&self.key))
            .bind(self.key.key().as_str())
            .bind(&self.token.id().to_be_bytes()[..])
            .bind(&key_id(&self.key)[..])
            .bind(kind);
        if let Err(error) = bounded(inner.operation_timeout, query.fetch_one(&inner.pool)).await {
            tracing::warn!(%error, "idempotency: could not notify the duplicates waiting for a key");
        }
    }
}

/// The problem a commit that failed answers: an integrity constraint (SQLSTATE class `23`,
/// e.g. a deferred unique or foreign key constraint) fails the same way on every retry, so it
/// is final; anything else (a serialization failure, a deadlock, the connection lost) may
/// pass on a retry.
fn commit_failure(error: &sqlx::Error) -> ProblemKind {
    match error {
        sqlx::Error::Database(error) if error.code().is_some_and(|code| code.starts_with("23")) => {
            ProblemKind::TransactionRejected
        }
        _ => ProblemKind::TransactionFailed,
    }
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

/// Writes the record in the transaction that holds the key, then commits. The record's
/// statement updates the lock row only if this very transaction wrote it: when the handler
/// ended the transaction itself, it finds nothing, and nothing is recorded.
async fn record_and_commit(
    store: &PostgresStore,
    mut transaction: Transaction<'static, Postgres>,
    key: &StoreKey,
    token: LockToken,
    record: &StoredResponse,
    ttl: Duration,
) -> Committed {
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
        .await;
    match written {
        Ok(written) if written.rows_affected() == 1 => match commit(&mut transaction).await {
            Ok(()) => Committed::Yes,
            Err(error) => {
                rollback(transaction).await;
                Committed::Failed(error)
            }
        },
        Ok(_) => {
            // Ends whatever transaction the handler left open (or warns that there is none).
            rollback(transaction).await;
            Committed::EndedByHandler
        }
        Err(error) => {
            rollback(transaction).await;
            Committed::Failed(error)
        }
    }
}

/// Commits `transaction` in place: unlike `Transaction::commit`, a failure leaves it in the
/// caller's hands, to [`rollback`], which waits until PostgreSQL has aborted it (its error
/// arrives before the abort releases the key's advisory lock), so that the answer leaves
/// only once a retry can take the key. Committed, the transaction has nothing left to roll
/// back when dropped.
async fn commit(transaction: &mut Transaction<'static, Postgres>) -> Result<(), sqlx::Error> {
    use sqlx_core::transaction::TransactionManager;
    sqlx::postgres::PgTransactionManager::commit(transaction).await
}

/// Rolls back, waiting for PostgreSQL's answer: the key's advisory lock and row are gone
/// when it returns.
async fn rollback(transaction: Transaction<'static, Postgres>) {
    if let Err(error) = transaction.rollback().await {
        tracing::debug!(%error, "idempotency: rollback failed (PostgreSQL rolls back on its own)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdempotencyKey;

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

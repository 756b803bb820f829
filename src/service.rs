//! [`Idempotency`]: the service, with its bypass and guarded paths.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Buf;
use http::{HeaderMap, HeaderName, Request, Response, header, request, response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use crate::{
    IdempotencyKey, Outcome, Record, StoredResponse,
    body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
    fingerprint::Fingerprint,
    future::ResponseFuture,
    layer::{Config, InFlight, KeyPolicy, StoreFailure},
    lock::{Completion, LockGuard, Locked},
    problem::{Problem, ProblemKind},
    recording::Recording,
    store::{Begin, IdempotencyStore, StoreKey},
};

/// The idempotency middleware around an inner service `S`, over store `St`.
///
/// Built by [`IdempotencyLayer`](crate::IdempotencyLayer). The inner service receives a
/// [`RequestBody`] (the original body, or the bytes the layer buffered) and the response body
/// is a [`ResponseBody`]. Errors are the inner service's own: everything the layer decides
/// itself is a response.
pub struct Idempotency<S, St> {
    inner: S,
    store: Arc<St>,
    config: Arc<Config>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: Arc<St>, config: Arc<Config>) -> Self {
        Self { inner, store, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), store: self.store.clone(), config: self.config.clone() }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").field("inner", &self.inner).field("config", &self.config).finish_non_exhaustive()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf,
    ResBody::Error: Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        if !config.covers(request.method()) {
            tracing::trace!(outcome = "bypassed", "idempotency: method not covered");
            return ResponseFuture::bypass(self.inner.call(request.map(RequestBody::streaming)));
        }
        let key = match IdempotencyKey::from_headers(request.headers(), &config.header) {
            Ok(Some(key)) => key,
            Ok(None) if config.key_policy == KeyPolicy::Optional => {
                tracing::trace!(outcome = "bypassed", "idempotency: no key");
                return ResponseFuture::bypass(self.inner.call(request.map(RequestBody::streaming)));
            }
            Ok(None) => return problem_future(config, request.headers(), ProblemKind::MissingKey),
            Err(invalid) => {
                tracing::debug!(reason = %invalid, "idempotency: invalid key");
                return problem_future(config, request.headers(), ProblemKind::InvalidKey);
            }
        };
        // `poll_ready` readied `self.inner`; take that instance for this request and leave a
        // fresh clone behind, which the next `poll_ready` will drive.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!("idempotency", method = %request.method(), path = request.uri().path());
        let guarded = Guarded { inner, store: self.store.clone(), config: self.config.clone(), _bodies: PhantomData };
        let run = async move {
            let result = guarded.run(request, key).await;
            if let Ok(response) = &result {
                let outcome = Outcome::of(response);
                tracing::debug!(outcome = outcome.as_str(), status = response.status().as_u16(), "idempotency");
            }
            result
        };
        ResponseFuture::guarded(Box::pin(run.instrument(span)))
    }
}

fn problem_future<F, B: Body, E>(config: &Config, request: &HeaderMap, kind: ProblemKind) -> ResponseFuture<F, B, E> {
    ResponseFuture::ready(problem_response(config, request, kind, None))
}

/// The layer's own answer to a request with headers `request`: rendered by the configured
/// renderer, or as a gRPC status for a gRPC request.
fn problem_response<B: Body>(
    config: &Config,
    request: &HeaderMap,
    kind: ProblemKind,
    retry_after: Option<Duration>,
) -> Response<ResponseBody<B>> {
    let (head, body) = config.answers.render(Problem::new(kind, retry_after), crate::grpc::is_grpc(request));
    Response::from_parts(head, ResponseBody::full(body, None))
}

fn replay<B: Body>(record: Arc<StoredResponse>) -> Response<ResponseBody<B>> {
    let (mut head, body, trailers) = record.replay();
    head.extensions.insert(Outcome::Replayed);
    Response::from_parts(head, ResponseBody::full(body, trailers))
}

/// One guarded request: everything after the key was found valid.
struct Guarded<S, St, ReqBody, ResBody> {
    inner: S,
    store: Arc<St>,
    config: Arc<Config>,
    _bodies: PhantomData<fn(ReqBody) -> ResBody>,
}

/// The inner service of a guarded request: the instance `poll_ready` readied, for as long as
/// the request may still execute, or an idle clone that is readied only if it does.
///
/// A request that replays, waits or is refused must hold no capacity of the inner service (a
/// `ConcurrencyLimit` permit, a buffer slot): while it waits, the readied instance is dropped.
enum Inner<S> {
    Ready(S),
    Idle(S),
}

impl<S: Clone> Inner<S> {
    /// Gives back the readiness reserved for this request, keeping an idle clone.
    fn idle(&mut self) {
        if let Self::Ready(ready) = self {
            *self = Self::Idle(ready.clone());
        }
    }

    /// The service, ready for one call.
    async fn ready<R>(self) -> Result<S, S::Error>
    where
        S: Service<R>,
    {
        match self {
            Self::Ready(ready) => Ok(ready),
            Self::Idle(idle) => tower::ServiceExt::ready_oneshot(idle).await,
        }
    }
}

impl<S, St, ReqBody, ResBody> Guarded<S, St, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf,
    ResBody::Error: Send,
{
    async fn run(
        self,
        request: Request<ReqBody>,
        key: IdempotencyKey,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let Self { inner, store, config, .. } = self;
        let mut inner = Inner::Ready(inner);
        let (head, body) = request.into_parts();
        let body = match buffer(body, config.max_request_body).await {
            Ok(body) => body,
            Err(BufferError::TooLarge) => {
                return Ok(problem_response(&config, &head.headers, ProblemKind::RequestBodyTooLarge, None));
            }
            Err(BufferError::Unreadable) => {
                return Ok(problem_response(&config, &head.headers, ProblemKind::RequestBodyUnreadable, None));
            }
        };
        let fingerprint = Fingerprint::compute(&head, &config.fingerprint_headers, &body.data);
        let key = StoreKey::new(config.scope.resolve(&head), key);

        // In wait mode, a duplicate polls the store with a growing step until the first
        // request finishes or the timeout passes: a store-agnostic wait, the same for a local
        // map and a remote store. It waits holding nothing of the inner service.
        let started = Instant::now();
        let mut wait_step = Duration::from_millis(5);
        let (began, begin) = loop {
            let began = Instant::now();
            let begin = match store.begin(&key, &fingerprint, config.lease).await {
                Ok(begin) => begin,
                Err(error) => return store_failed(inner, &config, error, head, body).await,
            };
            let InFlight::Wait { timeout } = config.in_flight else { break (began, begin) };
            let waited = started.elapsed();
            if !matches!(begin, Begin::InFlight) || waited >= timeout {
                break (began, begin);
            }
            inner.idle();
            tokio::time::sleep(wait_step.min(timeout - waited)).await;
            wait_step = (wait_step * 2).min(Duration::from_millis(100));
        };
        let in_flight_retry_after = match config.in_flight {
            InFlight::Reject { retry_after } => retry_after,
            InFlight::Wait { .. } => Duration::from_secs(1),
        };
        let token = match begin {
            Begin::Execute(token) => token,
            Begin::Completed(Record::Response(record)) => return Ok(replay(record)),
            Begin::Completed(Record::NotRetained) => {
                return Ok(problem_response(&config, &head.headers, ProblemKind::ResponseNotRetained, None));
            }
            Begin::Mismatch => return Ok(problem_response(&config, &head.headers, ProblemKind::KeyReused, None)),
            Begin::InFlight => {
                let retry_after = Some(in_flight_retry_after);
                return Ok(problem_response(&config, &head.headers, ProblemKind::InFlight, retry_after));
            }
        };
        let locked = Locked { store, key, token, ttl: config.ttl, lease: config.lease, began };
        // The guard first: if readying the service fails, or the request is dropped while it
        // waits for readiness, the lock is released.
        let guard = LockGuard::new(locked, &config.keeper);
        let inner = inner.ready().await?;
        execute(inner, guard, Request::from_parts(head, RequestBody::buffered(body)), config).await
    }
}

async fn store_failed<S, ReqBody, ResBody>(
    inner: Inner<S>,
    config: &Config,
    error: crate::StoreError,
    head: request::Parts,
    body: Buffered,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ResBody: Body,
{
    match config.store_failure {
        StoreFailure::FailClosed { retry_after } => {
            tracing::warn!(%error, "idempotency store failed; failing closed with 503");
            Ok(problem_response(config, &head.headers, ProblemKind::StoreUnavailable, Some(retry_after)))
        }
        StoreFailure::FailOpen => {
            tracing::warn!(%error, "idempotency store failed; failing open: running the request unprotected");
            let mut inner = inner.ready().await?;
            let response = inner.call(Request::from_parts(head, RequestBody::buffered(body))).await?;
            let (mut head, body) = response.into_parts();
            head.extensions.insert(Outcome::Unprotected);
            Ok(Response::from_parts(head, ResponseBody::inner(body)))
        }
    }
}

/// Runs the handler under `guard` and turns its answer into the response.
async fn execute<S, ReqBody, ResBody>(
    mut inner: S,
    guard: LockGuard,
    request: Request<RequestBody<ReqBody>>,
    config: Arc<Config>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf,
    ResBody::Error: Send,
{
    let future = match catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
        Ok(future) => future,
        Err(panic) => {
            guard.release().await;
            resume_unwind(panic)
        }
    };
    let (handled, guard) = Executing::new(Box::pin(future), guard, config.clone()).await;
    let response = match handled {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            guard.release().await;
            return Err(error);
        }
        Err(panic) => {
            guard.release().await;
            resume_unwind(panic)
        }
    };
    let (mut head, answer) = answer(response, guard, &config);
    head.extensions.insert(Outcome::Executed);
    match answer {
        Answer::Passed(body, release) => {
            // Released before the head goes out: a retry sent after it runs again.
            release.await;
            Ok(Response::from_parts(head, ResponseBody::inner(body)))
        }
        Answer::Recorded(mut recording) => {
            // A body already in memory ends here, and its record is written before anything
            // is sent. The head waits for that only when it shows the end itself (nothing
            // left to send after it); otherwise the last frame waits, so a failing store never
            // holds back the head.
            std::future::poll_fn(|cx| {
                recording.read_ahead(cx);
                Poll::Ready(())
            })
            .await;
            if recording.end_needs_the_head() {
                std::future::poll_fn(|cx| recording.poll_completion(cx)).await;
            }
            Ok(Response::from_parts(head, ResponseBody::recording(recording)))
        }
    }
}

/// What the handler's answer becomes.
enum Answer<B: Body> {
    /// Not recordable: the body passes through untouched, and the lock is being released.
    Passed(B, Completion),
    /// Recordable: the body is recorded on its way out.
    Recorded(Recording<B>),
}

fn answer<B>(response: Response<B>, guard: LockGuard, config: &Config) -> (response::Parts, Answer<B>)
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    let (head, body) = response.into_parts();
    if !config.predicate.should_record(&head) {
        return (head, Answer::Passed(body, guard.release()));
    }
    let headers = stored_headers(&head.headers, &config.unstored_headers);
    let expected = content_length(&head.headers);
    let recording = Recording::new(body, guard, head.status, headers, expected, config);
    (head, Answer::Recorded(recording))
}

/// The `Content-Length` the handler declared: the server sends that many bytes and no more.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

type Panic = Box<dyn std::any::Any + Send>;

/// The handler's future while it runs, with the lock it holds.
///
/// Dropped before the handler answered (the client went away, a timeout outside the layer
/// fired), it is not cancelled: it moves onto the runtime under a detach permit, runs to the
/// end, and its answer is recorded as if the client were still there — so the retry replays
/// what already happened. With no permit free, the handler is cancelled and the lock released
/// (it never answered, so a retry may run it). A panic is caught and handed back as a value,
/// so the lock is released before the panic goes on.
struct Executing<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
    E: Send + 'static,
{
    /// Boxed, so it can move onto the runtime.
    future: Option<Pin<Box<F>>>,
    guard: Option<LockGuard>,
    config: Arc<Config>,
}

impl<F, B, E> Executing<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
    E: Send + 'static,
{
    fn new(future: Pin<Box<F>>, guard: LockGuard, config: Arc<Config>) -> Self {
        Self { future: Some(future), guard: Some(guard), config }
    }
}

impl<F, B, E> Future for Executing<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
    E: Send + 'static,
{
    type Output = (Result<F::Output, Panic>, LockGuard);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let future = this.future.as_mut().expect("Executing polled after completion");
        let polled = match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic),
        };
        // Done (or poisoned by its panic): nothing left to detach.
        this.future = None;
        let guard = this.guard.take().expect("Executing polled after completion");
        Poll::Ready((polled, guard))
    }
}

impl<F, B, E> Drop for Executing<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
    E: Send + 'static,
{
    fn drop(&mut self) {
        let (Some(future), Some(guard)) = (self.future.take(), self.guard.take()) else { return };
        let Some(runtime) = guard.runtime().or_else(|| tokio::runtime::Handle::try_current().ok()) else { return };
        let Ok(permit) = self.config.detached.clone().try_acquire_owned() else {
            tracing::warn!("too many detached handlers; request cancelled and its key released");
            return;
        };
        tracing::debug!("client went away; finishing the request in the background");
        let config = self.config.clone();
        runtime.spawn(async move {
            let _permit = permit;
            let (handled, guard) = Executing::<F, B, E>::new(future, guard, config.clone()).await;
            let Ok(Ok(response)) = handled else {
                guard.release().await;
                return;
            };
            match answer(response, guard, &config).1 {
                // Not recordable: its body is not read, only the lock released.
                Answer::Passed(_, release) => release.await,
                Answer::Recorded(recording) => recording.drain().await,
            }
        });
    }
}

/// Headers kept in a record: the end-to-end ones, less `Content-Length` (recomputed on
/// replay), `Date` (regenerated) and the configured list (`Set-Cookie` by default). `Trailer`
/// is end-to-end (RFC 9110 6.6.2) and kept: HTTP/1.1 sends only the trailers it names.
fn stored_headers(headers: &HeaderMap, unstored: &[HeaderName]) -> HeaderMap {
    // Hop-by-hop: the fixed list of RFC 9110 section 7.6.1, and whatever `Connection` names.
    let connection = headers.get_all(header::CONNECTION);
    let named_by_connection = |name: &HeaderName| {
        connection.iter().any(|value| {
            value.to_str().is_ok_and(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case(name.as_str())))
        })
    };
    let dropped = |name: &HeaderName| {
        matches!(
            *name,
            header::CONNECTION
                | header::PROXY_AUTHENTICATE
                | header::PROXY_AUTHORIZATION
                | header::TE
                | header::TRANSFER_ENCODING
                | header::UPGRADE
                | header::CONTENT_LENGTH
                | header::DATE
        ) || name.as_str() == "keep-alive"
            || unstored.contains(name)
            || named_by_connection(name)
    };
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !dropped(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

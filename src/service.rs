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

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, Request, Response, header, request};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;
use tracing::Instrument;

use crate::{
    IdempotencyKey, Outcome, Record, StoredResponse,
    body::{BufferError, Recording, RequestBody, ResponseBody, buffer},
    fingerprint::Fingerprint,
    future::ResponseFuture,
    layer::{Config, InFlight, KeyPolicy, StoreFailure},
    lock::LockGuard,
    problem::Problem,
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
            Ok(None) => return problem_future(Problem::MISSING_KEY),
            Err(invalid) => {
                tracing::debug!(reason = %invalid, "idempotency: invalid key");
                return problem_future(Problem::INVALID_KEY);
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
        ResponseFuture::guarded(Box::pin(run.instrument(span)), self.config.detached.clone())
    }
}

fn problem_future<F, B: Body, E>(problem: Problem) -> ResponseFuture<F, B, E> {
    ResponseFuture::ready(problem_response(problem, None))
}

fn problem_response<B: Body>(problem: Problem, retry_after: Option<Duration>) -> Response<ResponseBody<B>> {
    let (head, body) = problem.into_parts(retry_after);
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

impl<S, St, ReqBody, ResBody> Guarded<S, St, ReqBody, ResBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
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
        let config = &*self.config;
        let (head, body) = request.into_parts();
        let body = match buffer(body, config.max_request_body).await {
            Ok(body) => body,
            Err(BufferError::TooLarge) => return Ok(problem_response(Problem::REQUEST_BODY_TOO_LARGE, None)),
            Err(BufferError::Unreadable) => return Ok(problem_response(Problem::REQUEST_BODY_UNREADABLE, None)),
        };
        let fingerprint = Fingerprint::compute(&head, &config.fingerprint_headers, &body);
        let key = StoreKey::new(config.scope.resolve(&head), key);

        // In wait mode, a duplicate polls the store with a growing step until the first
        // request finishes or the timeout passes: a store-agnostic wait, the same for a local
        // map and a remote store.
        let started = Instant::now();
        let mut wait_step = Duration::from_millis(5);
        let begin = loop {
            let begin = match self.store.begin(&key, &fingerprint, config.lease).await {
                Ok(begin) => begin,
                Err(error) => return self.store_failed(error, head, body).await,
            };
            let InFlight::Wait { timeout } = config.in_flight else { break begin };
            let waited = started.elapsed();
            if !matches!(begin, Begin::InFlight) || waited >= timeout {
                break begin;
            }
            tokio::time::sleep(wait_step.min(timeout - waited)).await;
            wait_step = (wait_step * 2).min(Duration::from_millis(100));
        };
        let in_flight_retry_after = match config.in_flight {
            InFlight::Reject { retry_after } => retry_after,
            InFlight::Wait { .. } => Duration::from_secs(1),
        };
        Ok(match begin {
            Begin::Execute(token) => {
                let guard = LockGuard::new(self.store.clone(), key, token, config.lease, config.ttl);
                return self.execute(guard, head, body).await;
            }
            Begin::Completed(Record::Response(record)) => replay(record),
            Begin::Completed(Record::NotRetained) => problem_response(Problem::RESPONSE_NOT_RETAINED, None),
            Begin::Mismatch => problem_response(Problem::KEY_REUSED, None),
            Begin::InFlight => problem_response(Problem::IN_FLIGHT, Some(in_flight_retry_after)),
        })
    }

    async fn store_failed(
        self,
        error: crate::StoreError,
        head: request::Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        match self.config.store_failure {
            StoreFailure::FailClosed { retry_after } => {
                tracing::warn!(%error, "idempotency store failed; failing closed with 503");
                Ok(problem_response(Problem::STORE_UNAVAILABLE, Some(retry_after)))
            }
            StoreFailure::FailOpen => {
                tracing::warn!(%error, "idempotency store failed; failing open: running the request unprotected");
                let mut inner = self.inner;
                let response = inner.call(Request::from_parts(head, RequestBody::buffered(body))).await?;
                let (mut head, body) = response.into_parts();
                head.extensions.insert(Outcome::Unprotected);
                Ok(Response::from_parts(head, ResponseBody::inner(body)))
            }
        }
    }

    async fn execute(
        self,
        mut guard: LockGuard,
        head: request::Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let mut inner = self.inner;
        let request = Request::from_parts(head, RequestBody::buffered(body));
        let handled = match catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
            Ok(future) => KeepLease { future, guard: &mut guard }.await,
            Err(panic) => Err(panic),
        };
        let response = match handled {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                release(&mut guard).await;
                return Err(error);
            }
            Err(panic) => {
                release(&mut guard).await;
                resume_unwind(panic)
            }
        };
        let (mut head, body) = response.into_parts();
        head.extensions.insert(Outcome::Executed);
        if !self.config.predicate.should_record(&head) {
            release(&mut guard).await;
            return Ok(Response::from_parts(head, ResponseBody::inner(body)));
        }
        let headers = stored_headers(&head.headers, &self.config.unstored_headers);
        let mut recording =
            Recording::new(body, guard, head.status, headers, self.config.max_record, self.config.detached.clone());
        // A body already in memory is recorded before the response leaves, and sent from the
        // record's own bytes; a streaming body is recorded as it goes.
        if let Some((completing, body)) = std::future::poll_fn(|cx| Poll::Ready(recording.read_ready(cx))).await {
            completing.await;
            return Ok(Response::from_parts(head, body));
        }
        recording.renew_in_background();
        Ok(Response::from_parts(head, ResponseBody::recording(recording)))
    }
}

async fn release(guard: &mut LockGuard) {
    if let Some(release) = guard.release() {
        release.await;
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, renewing the lease while it is pending and turning a panic into a
    /// value so the lock can be released before the panic goes on.
    struct KeepLease<'a, F> {
        #[pin]
        future: F,
        guard: &'a mut LockGuard,
    }
}

impl<F: Future> Future for KeepLease<'_, F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = this.future;
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => {
                this.guard.poll_renew(cx);
                Poll::Pending
            }
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Headers kept in a record: the end-to-end ones, less `Content-Length` (recomputed on
/// replay), `Date` (regenerated) and the configured list (`Set-Cookie` by default).
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
                | header::TRAILER
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

//! The guarded path: everything after the key was found valid. The body is buffered and
//! fingerprinted, the scope resolved, and the store's `begin` decides: replay, refuse, wait, or
//! execute (then [`execute`](crate::execute) takes over).

use std::{marker::PhantomData, sync::Arc, time::Duration};

use bytes::Buf;
use http::{Request, Response, request};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::{
    IdempotencyKey, Outcome,
    body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
    config::{Config, InFlight, StoreFailure},
    execute::execute,
    lock::{LockGuard, Locked},
    problem::ProblemKind,
    replay::replay,
    service::problem_response,
    store::{Begin, Fingerprint, IdempotencyStore, Record, StoreError, StoreKey},
};

/// One guarded request: everything after the key was found valid.
pub(crate) struct Guarded<S, St, ReqBody, ResBody> {
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

impl<S, St, ReqBody, ResBody> Guarded<S, St, ReqBody, ResBody> {
    pub(crate) fn new(inner: S, store: Arc<St>, config: Arc<Config>) -> Self {
        Self { inner, store, config, _bodies: PhantomData }
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
    pub(crate) async fn run(
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
        let in_flight_retry_after = config.in_flight_retry_after();
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
    error: StoreError,
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

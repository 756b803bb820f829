//! The guarded path: everything after the key was found valid. The body is buffered and
//! fingerprinted, the scope resolved, and the store's `begin` decides: replay, refuse, wait, or
//! execute (then [`execute`](crate::execute) takes over).

use std::{marker::PhantomData, sync::Arc};

use bytes::Buf;
use http::{Request, Response, request};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::{
    IdempotencyKey, Outcome,
    body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
    config::{Config, Duplicates, MAX_DURATION, StoreFailure, WaitSlot},
    execute::execute,
    headers::LAST_EVENT_ID,
    join::{Follow, Following, Joined, Waited, joined_head, wait_in_flight},
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
    ResBody::Error: Into<tower::BoxError> + Send,
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

        // In wait and join mode, a duplicate follows the lock's live log in the store, woken by
        // the store, until the first request ends (then `begin` again: replay, or execute if
        // it failed) or, joining, until its head is there. It waits holding nothing of the
        // inner service, and in a bounded number per key.
        let started = Instant::now();
        let mut waiter: Option<(WaitSlot, Arc<dyn Follow>)> = None;
        let (began, begin) = loop {
            let began = Instant::now();
            let begin = match store.begin(&key, &fingerprint, config.lease).await {
                Ok(begin) => begin,
                Err(error) => return store_failed(inner, &config, error, head, body).await,
            };
            let Some(timeout) = config.duplicates.wait_timeout() else { break (began, begin) };
            let until = started + timeout.min(MAX_DURATION);
            if !matches!(begin, Begin::Locked) || Instant::now() >= until {
                break (began, begin);
            }
            if waiter.is_none() {
                let Some(slot) = config.waiting.enter(&key) else { break (began, begin) };
                let following: Arc<dyn Follow> =
                    Arc::new(Following { store: store.clone(), key: key.clone(), fingerprint, lease: config.lease });
                waiter = Some((slot, following));
            }
            let Some((_, following)) = &waiter else { unreachable!("set above") };
            inner.idle();
            let join = matches!(config.duplicates, Duplicates::Join { .. });
            match wait_in_flight(following, until, join).await {
                Ok(Waited::Head { status, headers, events, cursor }) => {
                    let Some((slot, following)) = waiter.take() else { unreachable!("set above") };
                    let (parts, start) = joined_head(status, headers, head.headers.get(LAST_EVENT_ID), &events);
                    let joined = Joined::new(following, status, events, cursor, start, slot);
                    return Ok(Response::from_parts(parts, ResponseBody::joined(joined)));
                }
                Ok(Waited::Ended | Waited::TimedOut) => {}
                Err(error) => return store_failed(inner, &config, error, head, body).await,
            }
        };
        drop(waiter);
        let in_flight_retry_after = config.in_flight_retry_after();
        let token = match begin {
            Begin::Execute(token) => token,
            Begin::Completed(Record::Response(record)) => {
                return Ok(replay(record, head.headers.get(LAST_EVENT_ID)));
            }
            Begin::Completed(Record::NotRetained) => {
                return Ok(problem_response(&config, &head.headers, ProblemKind::ResponseNotRetained, None));
            }
            Begin::Mismatch => return Ok(problem_response(&config, &head.headers, ProblemKind::KeyReused, None)),
            Begin::Locked => {
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
    ResBody::Error: Into<tower::BoxError>,
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

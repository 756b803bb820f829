//! [`Idempotency`]: the service. A request is passed through untouched (bypass), answered at
//! once (an invalid or missing key), or guarded: see [`guarded`](crate::guarded).

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Buf;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use crate::{
    IdempotencyKey, Outcome,
    layer::answer::problem_response,
    layer::body::{RequestBody, ResponseBody},
    layer::config::{Config, KeyPolicy},
    layer::future::ResponseFuture,
    layer::guarded::Guarded,
    layer::lock::LiveOps,
    problem::ProblemKind,
    store::IdempotencyStore,
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
    live: Option<LiveOps<St>>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: Arc<St>, config: Arc<Config>, live: Option<LiveOps<St>>) -> Self {
        Self { inner, store, config, live }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), store: self.store.clone(), config: self.config.clone(), live: self.live }
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
    ResBody::Error: Into<tower::BoxError> + Send,
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
        let guarded = Guarded::new(inner, self.store.clone(), self.config.clone(), self.live);
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
    ResponseFuture::ready(problem_response(&config.answers, request, kind, None))
}

//! [`Idempotency`]: the service, and the front of the path every mode shares: [`admit`]
//! passes a request through (its mode says how), answers it at once (an invalid or missing
//! key), or guards it (`guarded.rs`).

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use crate::{
    IdempotencyKey, Outcome,
    layer::answer::problem_answer,
    layer::body::{RequestBody, ResponseBody},
    layer::config::Config,
    layer::future::ResponseFuture,
    layer::guarded::Guarded,
    layer::lock::LiveOps,
    layer::mode::Mode,
    problem::Problem,
    telemetry,
};

/// The idempotency middleware around an inner service `S`, in mode `M`: a store (the plain
/// layer: any [`IdempotencyStore`](crate::store::IdempotencyStore)), or transactional mode.
///
/// Built by [`IdempotencyLayer`](crate::IdempotencyLayer). The inner service receives a
/// [`RequestBody`] (the original body, or the bytes the layer buffered) and the response body
/// is a [`ResponseBody`]. Errors are the inner service's own: everything the layer decides
/// itself is a response.
pub struct Idempotency<S, M> {
    inner: S,
    mode: Arc<M>,
    config: Arc<Config>,
    live: Option<LiveOps<M>>,
}

impl<S, M> Idempotency<S, M> {
    pub(crate) fn new(inner: S, mode: Arc<M>, config: Arc<Config>, live: Option<LiveOps<M>>) -> Self {
        Self { inner, mode, config, live }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, M> Clone for Idempotency<S, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), mode: self.mode.clone(), config: self.config.clone(), live: self.live }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Idempotency<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").field("inner", &self.inner).field("config", &self.config).finish_non_exhaustive()
    }
}

impl<S, M, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, M>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    M: Mode<S, ReqBody, ResBody>,
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
        let key = match admit(&self.config, &request) {
            Admission::Pass => {
                telemetry::request(Outcome::Bypassed);
                return M::pass(&self.mode, &mut self.inner, request.map(RequestBody::streaming), &self.config);
            }
            Admission::Refuse(problem) => {
                let response = problem_answer(&self.config.answers, request.headers(), problem);
                telemetry::request(Outcome::of(&response));
                return ResponseFuture::ready(response);
            }
            Admission::Guard(key) => key,
        };
        // `poll_ready` readied `self.inner`; take that instance for this request and leave a
        // fresh clone behind, which the next `poll_ready` will drive.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!(
            "idempotency",
            method = %request.method(),
            path = request.uri().path(),
            // A replay's or a joiner's: the request it follows (see `TraceHook`).
            original_trace_id = tracing::field::Empty,
            original_traceparent = tracing::field::Empty,
        );
        let guarded = Guarded::new(inner, self.mode.clone(), self.config.clone(), self.live);
        let run = async move {
            let result = guarded.run(request, key).await;
            if let Ok(response) = &result {
                let outcome = Outcome::of(response);
                telemetry::request(outcome);
                tracing::debug!(outcome = outcome.as_str(), status = response.status().as_u16(), "idempotency");
            }
            result
        };
        ResponseFuture::guarded(Box::pin(run.instrument(span)))
    }
}

/// What the front of the path decides for a request, in every mode.
pub(crate) enum Admission {
    /// Not the layer's: an uncovered method, or no key where one is optional.
    Pass,
    /// A missing required key or an invalid one: answered at once.
    Refuse(Problem),
    /// A valid key (`None`: the key is in the body, read once it is buffered): guarded.
    Guard(Option<IdempotencyKey>),
}

/// Admits a request: its method, then its key.
pub(crate) fn admit<B>(config: &Config, request: &Request<B>) -> Admission {
    if !config.covers(request.method()) {
        tracing::trace!(outcome = "bypassed", "idempotency: method not covered");
        return Admission::Pass;
    }
    if config.upload_appends.passes(request.method(), request.headers()) {
        tracing::trace!(outcome = "bypassed", "idempotency: a resumable upload's append");
        return Admission::Pass;
    }
    if config.key_source.in_body() {
        return Admission::Guard(None);
    }
    match IdempotencyKey::from_headers(request.headers(), &config.header) {
        Ok(Some(key)) => Admission::Guard(Some(key)),
        Ok(None) => match config.missing_key() {
            Some(missing) => Admission::Refuse(missing),
            None => {
                tracing::trace!(outcome = "bypassed", "idempotency: no key");
                Admission::Pass
            }
        },
        Err(invalid) => {
            tracing::debug!(reason = %invalid, "idempotency: invalid key");
            Admission::Refuse(Problem::invalid_key(invalid))
        }
    }
}

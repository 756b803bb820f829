//! The guarded path, the same for every [`Mode`]: the body is buffered and fingerprinted, the
//! scope resolved, and the mode's `begin` decides: replay, refuse, wait for or join a duplicate
//! in flight, or execute (then the mode executes).

use std::{marker::PhantomData, sync::Arc};

use bytes::{Buf, Bytes};
use http::{Request, Response, request};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use crate::{
    IdempotencyKey, Outcome,
    headers::IDEMPOTENCY_KEY_RETENTION,
    layer::{
        answer::{problem_answer, problem_response, refused_response},
        body::{BufferError, Buffered, RequestBody, ResponseBody, buffer},
        config::{Config, Duplicates, StoreFailure},
        duplicates::{Joined, Waited, joined_head},
        lock::LiveOps,
        mode::{Began, Inner, Mode, wait_until},
        replay::replay,
        sse::resumes_after,
    },
    problem::{Problem, ProblemKind},
    secret::Refused,
    store::{Begin, Fingerprint, IdempotencyStore, Record, StoreError, StoreKey},
    telemetry, trace,
};

/// One guarded request: everything after the key was found valid.
pub(crate) struct Guarded<S, M, ReqBody, ResBody> {
    inner: S,
    mode: Arc<M>,
    config: Arc<Config>,
    live: Option<LiveOps<M>>,
    _bodies: PhantomData<fn(ReqBody) -> ResBody>,
}

/// A guarded request, buffered and fingerprinted, with its store key.
pub(crate) struct Prepared {
    pub(crate) head: request::Parts,
    pub(crate) body: Buffered,
    pub(crate) key: StoreKey,
    pub(crate) fingerprint: Fingerprint,
}

/// Why a guarded request could not be prepared.
pub(crate) enum Unprepared<B: Body> {
    /// Answered at once: a body over the limit or that failed, a missing or other secret, a
    /// key in the body that is missing (where required) or invalid.
    Answer(Response<ResponseBody<B>>),
    /// The store failed while the layer checked its secret there.
    Store(StoreError, request::Parts, Buffered),
    /// Its body holds no key (where keys are optional), or it is not a call the layer guards
    /// (a JSON-RPC notification): it runs through as a request without a key does.
    #[cfg_attr(not(feature = "json"), allow(dead_code))]
    Pass(request::Parts, Buffered),
}

/// What a JSON-RPC request is answered with (its `id`) (nothing without the `json` feature).
#[cfg(feature = "json")]
pub(crate) type ReplyId = crate::layer::json::Reply;
#[cfg(not(feature = "json"))]
pub(crate) type ReplyId = std::convert::Infallible;

/// Buffers the body (up to the limit), reads the key there if it is in the body (`key` is
/// `None`; a JSON-RPC request's id goes to `reply`), then fingerprints the request and
/// resolves its scope with the layer's keyed digests (once per layer, after checking that
/// `store` holds this secret's check record).
pub(crate) async fn prepare<St, ReqBody, ResBody>(
    config: &Config,
    store: &St,
    request: Request<ReqBody>,
    key: Option<IdempotencyKey>,
    reply: &mut Option<ReplyId>,
) -> Result<Prepared, Unprepared<ResBody>>
where
    St: IdempotencyStore,
    ReqBody: Body,
    ReqBody::Data: Buf,
    ResBody: Body,
{
    let (head, body) = request.into_parts();
    let problem = |kind| Unprepared::Answer(problem_response(&config.answers, &head.headers, kind, None));
    let body = match buffer(body, config.max_request_body).await {
        Ok(body) => body,
        Err(BufferError::TooLarge) => {
            let too_large = Problem::body_too_large(config.max_request_body);
            return Err(Unprepared::Answer(problem_answer(&config.answers, &head.headers, too_large)));
        }
        Err(BufferError::Unreadable) => return Err(problem(ProblemKind::RequestBodyUnreadable)),
    };
    // The key from the body: the same rules, and a JSON-RPC request fingerprinted without
    // what a retry changes (its id).
    let (key, fingerprinted) = match key {
        Some(key) => (key, None::<Vec<u8>>),
        #[cfg(feature = "json")]
        None => {
            use crate::layer::{
                config::KeyPolicy,
                json::{BodyKey, read},
            };
            let (found, id) = read(&config.key_source, &body.data, config.key_policy == KeyPolicy::Required);
            *reply = id;
            match found {
                BodyKey::Key(key, fingerprinted) => (key, fingerprinted),
                BodyKey::Missing => {
                    return Err(match config.missing_key() {
                        Some(missing) => Unprepared::Answer(problem_answer(&config.answers, &head.headers, missing)),
                        None => Unprepared::Pass(head, body),
                    });
                }
                BodyKey::Through => return Err(Unprepared::Pass(head, body)),
                BodyKey::Refuse(refused) => {
                    return Err(Unprepared::Answer(problem_answer(&config.answers, &head.headers, refused)));
                }
            }
        }
        #[cfg(not(feature = "json"))]
        None => unreachable!("a key in the body needs the `json` feature ({reply:?})"),
    };
    // Before the store: a body its route fingerprints as canonical JSON and cannot read is
    // answered without touching it.
    let Ok(fingerprinted) = config.body_fingerprint.read(fingerprinted.as_deref().unwrap_or(&body.data)) else {
        return Err(problem(ProblemKind::RequestBodyNotJson));
    };
    let keyed = match config.digests.ready(store, config.lease).await {
        Ok(keyed) => keyed,
        Err(Refused::Store(error)) => return Err(Unprepared::Store(error, head, body)),
        Err(refused) => return Err(Unprepared::Answer(refused_response(config, &head.headers, &refused))),
    };
    let fingerprint = Fingerprint::compute(keyed, &head, &config.fingerprint_headers, &fingerprinted);
    let key = config.store_key(keyed, &head, key);
    Ok(Prepared { head, body, key, fingerprint })
}

/// What the store's answer other than "execute" gets: a replay, or the layer's own answer.
pub(crate) fn answer<ResBody: Body>(
    config: &Config,
    head: &request::Parts,
    begin: Begin,
) -> Response<ResponseBody<ResBody>> {
    let problem = |kind, retry_after| problem_response(&config.answers, &head.headers, kind, retry_after);
    match begin {
        Begin::Completed(Record::Response(record)) => {
            telemetry::replayed(record.origin());
            trace::link(config.trace.as_deref(), record.origin());
            replay(record, &head.headers)
        }
        Begin::Completed(Record::NotRetained) => problem(ProblemKind::ResponseNotRetained, None),
        Begin::Mismatch => problem(ProblemKind::KeyReused, None),
        Begin::Expired => {
            let mut answer = problem(ProblemKind::KeyExpired, None);
            if let Some(retention) = &config.retention {
                answer.headers_mut().insert(IDEMPOTENCY_KEY_RETENTION, retention.clone());
            }
            answer
        }
        // A lock (its owner still running), or a store answer this layer does not know: the
        // same request may still be running, so try again later.
        _ => problem(ProblemKind::InFlight, Some(config.in_flight_retry_after())),
    }
}

impl<S, M, ReqBody, ResBody> Guarded<S, M, ReqBody, ResBody> {
    pub(crate) fn new(inner: S, mode: Arc<M>, config: Arc<Config>, live: Option<LiveOps<M>>) -> Self {
        Self { inner, mode, config, live, _bodies: PhantomData }
    }
}

impl<S, M, ReqBody, ResBody> Guarded<S, M, ReqBody, ResBody>
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
    /// Guards `request` (its `key`, or `None`: in its body). A JSON-RPC request's replay or
    /// refusal answers with its own `id`.
    pub(crate) async fn run(
        self,
        request: Request<ReqBody>,
        key: Option<IdempotencyKey>,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let mut reply = None;
        let response = self.guard(request, key, &mut reply).await?;
        #[cfg(feature = "json")]
        if let Some(id) = reply {
            return Ok(crate::layer::json::with_reply_id(response, id));
        }
        Ok(response)
    }

    async fn guard(
        self,
        request: Request<ReqBody>,
        key: Option<IdempotencyKey>,
        reply: &mut Option<ReplyId>,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let Self { inner, mode, config, live, .. } = self;
        let mut inner = Inner::Ready(inner);
        let prepared = prepare(&config, M::store(&mode), request, key, reply).await;
        let Prepared { head, body, key, fingerprint } = match prepared {
            Ok(prepared) => prepared,
            Err(Unprepared::Answer(answered)) => return Ok(answered),
            Err(Unprepared::Store(error, head, body)) => return store_failed(inner, &config, error, head, body).await,
            Err(Unprepared::Pass(head, body)) => {
                let mut inner = inner.ready().await?;
                let request = Request::from_parts(head, RequestBody::buffered(body));
                return M::pass(&mode, &mut inner, request, &config).await;
            }
        };

        // In wait and join mode, a duplicate waits for the request in flight (the mode says
        // how: the plain one follows the lock's live log, woken by the store) until it ends
        // (then `begin` again: replay, or execute if it failed) or, joining, until its head is
        // there. It waits holding nothing of the inner service, and in a bounded number per key.
        let started = Instant::now();
        let mut slot = None;
        let (began, held) = loop {
            let (began, found) = match M::begin(&mode, &key, &fingerprint, &config).await {
                Ok(found) => found,
                Err(error) => return store_failed(inner, &config, error, head, body).await,
            };
            let begin = match found {
                Began::Execute(held) => break (began, held),
                Began::Answer(begin) => begin,
            };
            let waiting = config.duplicates.wait_timeout().map(|timeout| wait_until(started, timeout));
            let Some(until) = waiting.filter(|until| matches!(begin, Begin::Locked) && Instant::now() < *until) else {
                return Ok(answer(&config, &head, begin));
            };
            if slot.is_none() {
                slot = config.waiting.enter(&key);
                if slot.is_none() {
                    return Ok(answer(&config, &head, begin));
                }
            }
            inner.idle();
            let join = matches!(config.duplicates, Duplicates::Join { .. });
            let waiting_since = Instant::now();
            let waited = M::wait(&mode, live, &key, fingerprint, &config, until, join).await;
            telemetry::waited(join, waiting_since);
            match waited {
                Ok(Waited::Head { status, headers, origin, events, cursor, following }) => {
                    let Some(mut slot) = slot.take() else { unreachable!("entered above") };
                    slot.join();
                    // As a replay's: the joiner's span points at the request it follows.
                    trace::link(config.trace.as_deref(), &origin);
                    let last_event_id =
                        resumes_after(&head.headers, &headers).map(|id| Bytes::copy_from_slice(id.as_bytes()));
                    let parts = joined_head(status, headers);
                    let joined = Joined::new(following, status, events, cursor, last_event_id, slot);
                    return Ok(Response::from_parts(parts, ResponseBody::joined(joined)));
                }
                Ok(Waited::Answered(begin)) => return Ok(answer(&config, &head, begin)),
                Ok(Waited::Ended | Waited::TimedOut) => {}
                Err(error) => return store_failed(inner, &config, error, head, body).await,
            }
        };
        drop(slot);
        let request = Request::from_parts(head, RequestBody::buffered(body));
        M::execute(mode, live, held, began, key, inner, request, config).await
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
            Ok(problem_response(&config.answers, &head.headers, ProblemKind::StoreUnavailable, Some(retry_after)))
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

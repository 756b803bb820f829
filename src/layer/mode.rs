//! [`Mode`]: what the plain layer and transactional mode do differently on the one request
//! path — how a guarded request takes its key, how a duplicate waits for the request in
//! flight, how the handler executes, and what an unguarded request gets. Everything else
//! (admission, buffering, fingerprint, scope, what `begin`'s answer means, the bound on
//! waiters, the layer's own answers) is the same code for both, in `service.rs` and
//! `guarded.rs`.
//!
//! The plain mode is any [`IdempotencyStore`]: implemented here for every store, so the
//! layer's store type is its mode. Transactional mode is `crate::transactional`.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower::Service;

use super::{
    body::{RequestBody, ResponseBody},
    config::Config,
    duplicates::{Waited, wait_in_flight},
    execute::execute,
    future::ResponseFuture,
    lock::{LiveOps, LockGuard, Locked, follower},
};
use crate::{
    store::{Begin, Fingerprint, IdempotencyStore, LockToken, StoreError, StoreKey},
    telemetry::{self, Operation},
};

/// What a mode's `begin` found: the key is now this request's (with what executing needs),
/// or the store's answer otherwise (never [`Begin::Execute`]).
pub(crate) enum Began<H> {
    Execute(H),
    Answer(Begin),
}

/// A way of taking a key, waiting and executing: see the [module docs](self).
pub(crate) trait Mode<S, ReqBody, ResBody>: Send + Sync + Sized + 'static
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body,
{
    /// What executing needs once the key is this request's.
    type Held: Send;

    /// The store the mode keeps its keys in (where the layer checks its secret).
    type Store: IdempotencyStore;

    fn store(this: &Arc<Self>) -> &Self::Store;

    /// The answer to a request the layer does not guard (an uncovered method, or no key
    /// where one is optional: its body streaming, or buffered where the key was looked for
    /// in it). `inner` is ready.
    fn pass(
        this: &Arc<Self>,
        inner: &mut S,
        request: Request<RequestBody<ReqBody>>,
        config: &Arc<Config>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>;

    /// One atomic look at the key, taking it if it is free.
    fn begin(
        this: &Arc<Self>,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        config: &Config,
    ) -> impl Future<Output = Result<(Instant, Began<Self::Held>), StoreError>> + Send;

    /// Waits, up to `until`, for the request in flight on the key to end, or (`join`) for
    /// its head. `live`: the store's live log, where the mode follows one.
    fn wait(
        this: &Arc<Self>,
        live: Option<LiveOps<Self>>,
        key: &StoreKey,
        fingerprint: Fingerprint,
        config: &Config,
        until: Instant,
        join: bool,
    ) -> impl Future<Output = Result<Waited, StoreError>> + Send;

    /// Runs the handler with the key held, and answers. `inner` is readied here, once
    /// whatever must end with the request (the lock) is owned.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        this: Arc<Self>,
        live: Option<LiveOps<Self>>,
        held: Self::Held,
        began: Instant,
        key: StoreKey,
        inner: Inner<S>,
        request: Request<RequestBody<ReqBody>>,
        config: Arc<Config>,
    ) -> impl Future<Output = Result<Response<ResponseBody<ResBody>>, S::Error>> + Send;
}

/// The plain mode: the store's lock, the handler's response streamed while it is recorded.
impl<St, S, ReqBody, ResBody> Mode<S, ReqBody, ResBody> for St
where
    St: IdempotencyStore,
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Buf + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Buf,
    ResBody::Error: Into<tower::BoxError> + Send,
{
    type Held = LockToken;
    type Store = St;

    fn store(this: &Arc<Self>) -> &St {
        this
    }

    fn pass(
        _: &Arc<Self>,
        inner: &mut S,
        request: Request<RequestBody<ReqBody>>,
        _: &Arc<Config>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error> {
        ResponseFuture::bypass(inner.call(request))
    }

    async fn begin(
        this: &Arc<Self>,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        config: &Config,
    ) -> Result<(Instant, Began<LockToken>), StoreError> {
        let began = Instant::now();
        let begun = this.begin(key, fingerprint, config.lease).await;
        telemetry::store_operation(Operation::Begin, began);
        Ok((
            began,
            match begun? {
                Begin::Execute(token) => Began::Execute(token),
                other => Began::Answer(other),
            },
        ))
    }

    async fn wait(
        this: &Arc<Self>,
        live: Option<LiveOps<Self>>,
        key: &StoreKey,
        fingerprint: Fingerprint,
        config: &Config,
        until: Instant,
        join: bool,
    ) -> Result<Waited, StoreError> {
        // Waiting and joining are set only over a store with a live log; without one (never
        // the case) the duplicate waits out its timeout rather than asking the store in a loop.
        let Some(live) = live else {
            tokio::time::sleep_until(until).await;
            return Ok(Waited::TimedOut);
        };
        let following = follower(this.clone(), key.clone(), fingerprint, config.lease, live);
        wait_in_flight(&following, until, join).await
    }

    async fn execute(
        this: Arc<Self>,
        live: Option<LiveOps<Self>>,
        token: LockToken,
        began: Instant,
        key: StoreKey,
        inner: Inner<S>,
        request: Request<RequestBody<ReqBody>>,
        config: Arc<Config>,
    ) -> Result<Response<ResponseBody<ResBody>>, S::Error> {
        let locked = Locked {
            store: this,
            key,
            token,
            ttl: config.ttl,
            grace: config.expired_grace,
            lease: config.lease,
            began,
            live,
        };
        // The guard first: if readying the service fails, or the request is dropped while it
        // waits for readiness, the lock is released.
        let guard = LockGuard::new(locked, &config.keeper);
        let inner = inner.ready().await?;
        execute(inner, guard, request, config).await
    }
}

/// The inner service of a guarded request: the instance `poll_ready` readied, for as long as
/// the request may still execute, or an idle clone that is readied only if it does.
///
/// A request that replays, waits or is refused must hold no capacity of the inner service (a
/// `ConcurrencyLimit` permit, a buffer slot): while it waits, the readied instance is dropped.
pub(crate) enum Inner<S> {
    Ready(S),
    Idle(S),
}

impl<S: Clone> Inner<S> {
    /// Gives back the readiness reserved for this request, keeping an idle clone.
    pub(crate) fn idle(&mut self) {
        if let Self::Ready(ready) = self {
            *self = Self::Idle(ready.clone());
        }
    }

    /// The service, ready for one call.
    pub(crate) async fn ready<R>(self) -> Result<S, S::Error>
    where
        S: Service<R>,
    {
        match self {
            Self::Ready(ready) => Ok(ready),
            Self::Idle(idle) => tower::ServiceExt::ready_oneshot(idle).await,
        }
    }
}

/// The wait bound of a mode's duplicates: `timeout` from `started`, at most a century.
pub(crate) fn wait_until(started: Instant, timeout: Duration) -> Instant {
    started + timeout.min(super::config::MAX_DURATION)
}

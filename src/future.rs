//! [`ResponseFuture`]: the future the service returns.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::Semaphore;

use crate::{Outcome, body::ResponseBody, lock::BoxFuture};

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Dropped before it finishes (the client went away, or a timeout outside the layer fired),
    /// a guarded request is not cancelled: it is detached onto the runtime, runs to the end and
    /// is recorded, so the retry replays what already happened. The number of detached
    /// requests is bounded ([`with_max_detached`](crate::IdempotencyLayer::with_max_detached)).
    pub struct ResponseFuture<F, B, E>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E>
    where
        B: Body,
    {
        Bypass { #[pin] future: F },
        Guarded { guarded: Detachable<B, E> },
        Ready { response: Option<Response<ResponseBody<B>>> },
    }
}

impl<F, B: Body, E> ResponseFuture<F, B, E> {
    pub(crate) fn bypass(future: F) -> Self {
        Self { kind: Kind::Bypass { future } }
    }

    /// An answer the layer made without any work to finish (a problem response).
    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self { kind: Kind::Ready { response: Some(response) } }
    }

    pub(crate) fn guarded(future: Guarded<B, E>, detach: Arc<Semaphore>) -> Self
    where
        B: Body + Send + 'static,
        B::Data: bytes::Buf,
        B::Error: Send,
        E: Send + 'static,
    {
        let guarded = Detachable { future: Some(future), finish: finish::<B, E>, detach, polling: false };
        Self { kind: Kind::Guarded { guarded } }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Data: bytes::Buf,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { future } => {
                let result = ready!(future.poll(cx));
                Poll::Ready(result.map(|response| response.map(ResponseBody::inner)))
            }
            KindProj::Guarded { guarded } => {
                // The guarded future logs its own outcome, inside the request's span.
                guarded.poll(cx)
            }
            KindProj::Ready { response } => {
                let response = response.take().expect("ResponseFuture polled after completion");
                tracing::debug!(outcome = Outcome::of(&response).as_str(), "idempotency");
                Poll::Ready(Ok(response))
            }
        }
    }
}

impl<F, B: Body, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            Kind::Bypass { .. } => "ResponseFuture::Bypass",
            Kind::Guarded { .. } => "ResponseFuture::Guarded",
            Kind::Ready { .. } => "ResponseFuture::Ready",
        })
    }
}

/// The boxed guarded request.
type Guarded<B, E> = BoxFuture<Result<Response<ResponseBody<B>>, E>>;

/// A boxed guarded request that finishes on the runtime if dropped before it is done.
struct Detachable<B: Body, E> {
    future: Option<Guarded<B, E>>,
    /// Turns the future into one the runtime can run on its own (made where the bounds that
    /// needs are known; `Drop` cannot ask for them).
    finish: fn(Guarded<B, E>) -> BoxFuture<()>,
    detach: Arc<Semaphore>,
    /// Set while the future is being polled: if a panic unwinds out of `poll`, the future is
    /// poisoned and must not be detached (polling it again would panic once more).
    polling: bool,
}

impl<B: Body, E> Detachable<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        let Some(future) = self.future.as_mut() else {
            panic!("ResponseFuture polled after completion");
        };
        self.polling = true;
        let polled = future.as_mut().poll(cx);
        self.polling = false;
        let result = ready!(polled);
        self.future = None;
        Poll::Ready(result)
    }
}

impl<B: Body, E> Drop for Detachable<B, E> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else { return };
        if self.polling {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Ok(permit) = self.detach.clone().try_acquire_owned() else {
            tracing::warn!("too many detached handlers; request cancelled and its key released");
            return;
        };
        tracing::debug!("client went away; finishing the request in the background");
        let finish = (self.finish)(future);
        runtime.spawn(async move {
            let _permit = permit;
            finish.await;
        });
    }
}

/// Awaits the response and reads its body to the end, recording it, all under the permit the
/// detached task already holds (the body must not need a second one).
fn finish<B, E>(future: Guarded<B, E>) -> BoxFuture<()>
where
    B: Body + Send + 'static,
    B::Data: bytes::Buf,
    B::Error: Send,
    E: Send + 'static,
{
    Box::pin(async move {
        let Ok(response) = future.await else { return };
        let mut body = std::pin::pin!(response.into_body());
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if frame.is_err() {
                return;
            }
        }
    })
}

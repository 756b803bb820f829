//! [`ResponseFuture`]: the future the service returns.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::{Outcome, layer::body::ResponseBody, rt::BoxFuture};

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Dropped before it finishes (the client went away, or a timeout outside the layer fired),
    /// a request whose handler is running is not cancelled: the handler is detached onto the
    /// runtime, runs to the end and is recorded, so the retry replays what already happened.
    /// The number of detached handlers is bounded
    /// ([`with_max_detached`](crate::IdempotencyLayer::with_max_detached)). A request that
    /// only waits, replays or is refused is simply dropped.
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
        Guarded { future: Guarded<B, E> },
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

    pub(crate) fn guarded(future: Guarded<B, E>) -> Self {
        Self { kind: Kind::Guarded { future } }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Data: bytes::Buf,
    B::Error: Into<tower::BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { future } => {
                let result = ready!(future.poll(cx));
                Poll::Ready(result.map(|response| response.map(ResponseBody::inner)))
            }
            KindProj::Guarded { future } => {
                // The guarded future logs its own outcome, inside the request's span.
                future.as_mut().poll(cx)
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

/// The boxed guarded request. Dropping it cancels nothing that matters: a request that is
/// executing detaches its handler onto the runtime by itself (see `service::Executing`), and
/// a request that only buffers, waits, replays or is refused has nothing to finish.
type Guarded<B, E> = BoxFuture<Result<Response<ResponseBody<B>>, E>>;

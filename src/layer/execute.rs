//! Executing: the handler runs under its lock, is detached onto the runtime if its client
//! leaves, and its answer is either passed through (not recordable) or recorded on its way out
//! ([`Recording`]).

use std::{
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Buf;
use http::{HeaderMap, HeaderName, Request, Response, header, response};
use http_body::Body;
use tower::Service;

use crate::{
    Outcome,
    layer::body::{RequestBody, ResponseBody},
    layer::config::Config,
    layer::lock::{Completion, LockGuard},
    layer::recording::Recording,
    rt::{self, Undetached},
    trace::{self, Origin},
};

/// Runs the handler under `guard` and turns its answer into the response.
pub(crate) async fn execute<S, ReqBody, ResBody>(
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
    ResBody::Error: Into<tower::BoxError> + Send,
{
    let span = config.trace.as_ref().and_then(|hook| hook.current());
    let origin = Origin { caller: trace::caller(request.headers()), span, ..Origin::default() };
    let future = match catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
        Ok(future) => future,
        Err(panic) => {
            guard.release().await;
            resume_unwind(panic)
        }
    };
    let (handled, guard) = Executing::new(Box::pin(future), guard, config.clone(), origin).await;
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
    let (mut head, answer) = answer(response, guard, origin, &config);
    head.extensions.insert(Outcome::Executed);
    match answer {
        Answer::Passed(body, release) => {
            // Released before the head goes out: a retry sent after it runs again.
            release.await;
            Ok(Response::from_parts(head, ResponseBody::inner(body)))
        }
        Answer::Recorded(mut recording) => {
            // A body already in memory ends here, and its record is written before anything
            // is sent: the server then writes head and body together, in one write (were the
            // body's end a small write of its own after the record, Nagle's algorithm would
            // hold it until the client's delayed ACK). When the head shows the end itself
            // (nothing left to send after it), it waits for the record however long that
            // takes; otherwise only for the write's first attempt, so a failing store holds
            // back the body's end, not the head. A body still streaming sends its head at once.
            std::future::poll_fn(|cx| {
                recording.read_ahead(cx);
                Poll::Ready(())
            })
            .await;
            if recording.end_needs_the_head() {
                std::future::poll_fn(|cx| recording.poll_completion(cx)).await;
            } else {
                std::future::poll_fn(|cx| recording.poll_first_attempt(cx)).await;
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

fn answer<B>(response: Response<B>, guard: LockGuard, origin: Origin, config: &Config) -> (response::Parts, Answer<B>)
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    let (mut head, body) = response.into_parts();
    if !config.predicate.should_record(&head) {
        return (head, Answer::Passed(body, guard.release()));
    }
    if let Some(retention) = &config.retention {
        // Recorded with the response, so its replays say it too.
        head.headers.insert(crate::headers::IDEMPOTENCY_KEY_RETENTION, retention.clone());
    }
    let headers = stored_headers(&head.headers, &config.unstored_headers);
    let expected = content_length(&head.headers);
    let recording = Recording::new(body, guard, head.status, headers, expected, origin, config);
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
    /// Kept in the record, detached or not.
    origin: Origin,
}

impl<F, B, E> Executing<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
    E: Send + 'static,
{
    fn new(future: Pin<Box<F>>, guard: LockGuard, config: Arc<Config>, origin: Origin) -> Self {
        Self { future: Some(future), guard: Some(guard), config, origin }
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
        let detaching = match rt::reserve(guard.runtime(), Some(&self.config.detached)) {
            Ok(detaching) => detaching,
            Err(Undetached::NoRuntime) => return,
            Err(Undetached::Full) => {
                tracing::warn!("too many detached handlers; request cancelled and its key released");
                return;
            }
        };
        tracing::debug!("client went away; finishing the request in the background");
        let (config, origin) = (self.config.clone(), self.origin);
        detaching.spawn(async move {
            let (handled, guard) = Executing::<F, B, E>::new(future, guard, config.clone(), origin).await;
            let Ok(Ok(response)) = handled else {
                guard.release().await;
                return;
            };
            match answer(response, guard, origin, &config).1 {
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
pub(crate) fn stored_headers(headers: &HeaderMap, unstored: &[HeaderName]) -> HeaderMap {
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
    // Most responses drop at most `Content-Length`: copy the map whole (no rehashing) and
    // remove it. Otherwise, rebuild it from the fields kept.
    if !headers.keys().any(|name| name != header::CONTENT_LENGTH && dropped(name)) {
        let mut kept = headers.clone();
        kept.remove(header::CONTENT_LENGTH);
        return kept;
    }
    kept_fields(headers, dropped)
}

/// The fields of `headers` that `dropped` keeps, rebuilt into a map of their own.
fn kept_fields(headers: &HeaderMap, dropped: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !dropped(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(HeaderName::from_static(name), http::HeaderValue::from_static(value));
        }
        map
    }

    /// The copy-and-remove shortcut keeps exactly what rebuilding field by field keeps.
    #[test]
    fn the_shortcut_keeps_what_the_rebuild_keeps() {
        let cases = [
            map(&[("content-type", "application/json"), ("content-length", "2"), ("location", "/o/1")]),
            map(&[("content-length", "2"), ("content-length", "2"), ("x-a", "1"), ("x-a", "2")]),
            map(&[("x-a", "1")]),
            map(&[("connection", "x-foo"), ("x-foo", "1"), ("x-bar", "2"), ("content-length", "1")]),
            map(&[("set-cookie", "a=1"), ("date", "today"), ("transfer-encoding", "chunked"), ("x-b", "3")]),
        ];
        let unstored = [header::SET_COOKIE];
        for headers in cases {
            let kept = stored_headers(&headers, &unstored);
            let rebuilt = kept_fields(&headers, |name| {
                let named =
                    headers.get_all(header::CONNECTION).iter().any(|v| v.to_str().unwrap().contains(name.as_str()));
                [
                    header::CONNECTION,
                    header::CONTENT_LENGTH,
                    header::DATE,
                    header::TRANSFER_ENCODING,
                    header::SET_COOKIE,
                ]
                .contains(name)
                    || named
            });
            assert_eq!(kept, rebuilt, "{headers:?}");
            for name in rebuilt.keys() {
                let values = |map: &HeaderMap| map.get_all(name).iter().cloned().collect::<Vec<_>>();
                assert_eq!(values(&kept), values(&rebuilt), "the order of {name}'s values");
            }
            assert!(!kept.contains_key(header::CONTENT_LENGTH));
        }
    }
}

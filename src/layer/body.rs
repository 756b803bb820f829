//! Request and response bodies: what the inner service receives, and what the layer returns.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use tower::BoxError;

use crate::{layer::duplicates::Joined, layer::recording::Recording, rt::into_bytes};

pin_project! {
    /// The request body the inner service receives: the original body, untouched, when the
    /// layer let the request through, or the bytes it buffered to fingerprint it.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Streaming { #[pin] body: B },
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn streaming(body: B) -> Self {
        Self { kind: RequestKind::Streaming { body } }
    }

    pub(crate) fn buffered(buffered: Buffered) -> Self {
        let Buffered { data, trailers } = buffered;
        Self { kind: RequestKind::Buffered { data: (!data.is_empty()).then_some(data), trailers } }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => {
                Poll::Ready(ready!(body.poll_frame(cx)).map(|frame| frame.map(into_bytes)))
            }
            RequestKindProj::Buffered { data, trailers } => Poll::Ready(next_frame(data, trailers)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
            RequestKind::Buffered { data, .. } => {
                write!(f, "RequestBody::Buffered({} bytes)", data.as_ref().map_or(0, Bytes::len))
            }
        }
    }
}

/// The next frame of a body held in memory: its data, then its trailers.
fn next_frame<E>(data: &mut Option<Bytes>, trailers: &mut Option<HeaderMap>) -> Option<Result<Frame<Bytes>, E>> {
    match data.take() {
        Some(data) => Some(Ok(Frame::data(data))),
        None => trailers.take().map(|t| Ok(Frame::trailers(t))),
    }
}

/// Why a request body could not be buffered.
#[derive(Debug)]
pub(crate) enum BufferError {
    TooLarge,
    Unreadable,
}

/// A request body read to its end: its bytes and its trailers.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    pub(crate) data: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

/// Reads a whole request body, up to `limit` bytes, keeping its trailers. A body of one chunk
/// is not copied.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Result<Buffered, BufferError>
where
    B: Body,
    B::Data: Buf,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BufferError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut first = Bytes::new();
    let mut more: Option<BytesMut> = None;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let mut data = match frame.map_err(|_| BufferError::Unreadable)?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
                continue;
            }
        };
        let held = more.as_ref().map_or(first.len(), BytesMut::len);
        if held + data.remaining() > limit {
            return Err(BufferError::TooLarge);
        }
        match &mut more {
            Some(buf) => buf.put(data),
            None if first.is_empty() => first = data.copy_to_bytes(data.remaining()),
            None => {
                let mut buf = BytesMut::with_capacity(held + data.remaining());
                buf.extend_from_slice(&first);
                buf.put(data);
                more = Some(buf);
            }
        }
    }
    Ok(Buffered { data: more.map_or(first, BytesMut::freeze), trailers })
}

pin_project! {
    /// The response body the layer returns: the handler's body (streamed as it is produced,
    /// and recorded when the response is recordable), a body the layer made (a replay or a
    /// problem), or the body of a joined response ([`Duplicates::Join`](crate::Duplicates::Join)).
    ///
    /// Its error is a [`tower::BoxError`](https://docs.rs/tower/0.5/tower/type.BoxError.html): the handler's body error, or, for a joined response, why
    /// it ended before the response it follows did.
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B>
    where
        B: Body,
    {
        Inner { #[pin] body: B, into_error: IntoError<B> },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Recording { recording: Recording<B>, into_error: IntoError<B> },
        Joined { joined: Box<Joined> },
    }
}

/// Turns the handler's body error into the response body's, made where `B::Error:
/// Into<BoxError>` is known (the `Body` impl itself carries no bound on it: a bound there trips
/// the compiler's proof that a future holding the body is `Send`, rust-lang/rust#64552).
type IntoError<B> = fn(<B as Body>::Error) -> BoxError;

fn into_error<B: Body>(error: B::Error) -> BoxError
where
    B::Error: Into<BoxError>,
{
    error.into()
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self
    where
        B::Error: Into<BoxError>,
    {
        Self { kind: ResponseKind::Inner { body, into_error: into_error::<B> } }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self { kind: ResponseKind::Full { data: (!data.is_empty()).then_some(data), trailers } }
    }

    pub(crate) fn recording(recording: Recording<B>) -> Self
    where
        B::Error: Into<BoxError>,
    {
        Self { kind: ResponseKind::Recording { recording, into_error: into_error::<B> } }
    }

    pub(crate) fn joined(joined: Joined) -> Self {
        Self { kind: ResponseKind::Joined { joined: Box::new(joined) } }
    }
}

/// A change made, chunk by chunk, to a body the layer answers with (on a JSON-RPC route: the
/// retry's `id`, `layer/json.rs`).
pub(crate) trait Rewrite: Send + Sync + 'static {
    /// Takes the next chunk; pushes what is ready onto `out`.
    fn feed(&mut self, chunk: Bytes, out: &mut std::collections::VecDeque<Bytes>);
    /// The body ended: pushes the rest.
    fn finish(&mut self, out: &mut std::collections::VecDeque<Bytes>);
}

impl<B: Body> ResponseBody<B> {
    /// The body with `rewrite` applied, if the layer made it (a replay, a problem: rewritten
    /// at once, with its new length; a joined body: as it passes). The handler's own body is
    /// left alone.
    #[cfg_attr(not(feature = "json"), allow(dead_code))]
    pub(crate) fn rewritten(mut self, mut rewrite: Box<dyn Rewrite>) -> (Self, Option<usize>) {
        let len = match &mut self.kind {
            ResponseKind::Full { data, .. } => {
                let mut out = std::collections::VecDeque::new();
                if let Some(data) = data.take() {
                    rewrite.feed(data, &mut out);
                }
                rewrite.finish(&mut out);
                let whole: Bytes = match out.len() {
                    0 | 1 => out.pop_front().unwrap_or_default(),
                    _ => out.iter().flat_map(|chunk| chunk.iter().copied()).collect::<Vec<u8>>().into(),
                };
                let len = whole.len();
                *data = (!whole.is_empty()).then_some(whole);
                Some(len)
            }
            ResponseKind::Joined { joined } => {
                joined.rewrite_with(rewrite);
                None
            }
            ResponseKind::Inner { .. } | ResponseKind::Recording { .. } => None,
        };
        (self, len)
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match self.project().kind.project() {
            ResponseKindProj::Inner { body, into_error } => {
                ready!(body.poll_frame(cx)).map(|frame| frame.map(into_bytes).map_err(*into_error))
            }
            ResponseKindProj::Full { data, trailers } => next_frame(data, trailers),
            ResponseKindProj::Recording { recording, into_error } => {
                ready!(recording.poll_frame(cx)).map(|frame| frame.map_err(*into_error))
            }
            ResponseKindProj::Joined { joined } => ready!(joined.poll_frame(cx)),
        })
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body, .. } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Recording { recording, .. } => recording.is_end_stream(),
            ResponseKind::Joined { joined } => joined.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body, .. } => body.size_hint(),
            ResponseKind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                match trailers {
                    None => SizeHint::with_exact(len),
                    // No exact length with trailers to send: HTTP/1.1 then goes chunked, which
                    // is the only way it can carry them.
                    Some(_) => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(len);
                        hint
                    }
                }
            }
            ResponseKind::Recording { recording, .. } => recording.size_hint(),
            ResponseKind::Joined { .. } => SizeHint::new(),
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            ResponseKind::Inner { .. } => "ResponseBody::Inner",
            ResponseKind::Full { .. } => "ResponseBody::Full",
            ResponseKind::Recording { .. } => "ResponseBody::Recording",
            ResponseKind::Joined { .. } => "ResponseBody::Joined",
        })
    }
}

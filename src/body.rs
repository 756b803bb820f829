//! Request and response bodies, and the recording of a streamed response.

use std::{
    collections::VecDeque,
    fmt,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    Record, StoredResponse,
    lock::{BoxFuture, LockGuard, run_soon},
};

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
        Buffered { data: Option<Bytes> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn streaming(body: B) -> Self {
        Self { kind: RequestKind::Streaming { body } }
    }

    pub(crate) fn buffered(data: Bytes) -> Self {
        Self { kind: RequestKind::Buffered { data: (!data.is_empty()).then_some(data) } }
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
            RequestKindProj::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
            RequestKind::Buffered { data } => {
                write!(f, "RequestBody::Buffered({} bytes)", data.as_ref().map_or(0, Bytes::len))
            }
        }
    }
}

/// A frame with its data as `Bytes`: free for `Bytes` itself, one copy for other buffers.
fn into_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

/// Why a request body could not be buffered.
#[derive(Debug)]
pub(crate) enum BufferError {
    TooLarge,
    Unreadable,
}

/// Reads a whole request body, up to `limit` bytes. A body of one chunk is not copied.
pub(crate) async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, BufferError>
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
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame.map_err(|_| BufferError::Unreadable)?.into_data() else { continue };
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
    Ok(more.map_or(first, BytesMut::freeze))
}

pin_project! {
    /// The response body the layer returns: the handler's body (streamed as it is produced,
    /// and recorded when the response is recordable), or a body the layer made (a replay or a
    /// problem).
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
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Recording { recording: Recording<B> },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self { kind: ResponseKind::Inner { body } }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self { kind: ResponseKind::Full { data: (!data.is_empty()).then_some(data), trailers } }
    }

    pub(crate) fn recording(recording: Recording<B>) -> Self {
        Self { kind: ResponseKind::Recording { recording } }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => {
                Poll::Ready(ready!(body.poll_frame(cx)).map(|frame| frame.map(into_bytes)))
            }
            ResponseKindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ResponseKindProj::Recording { recording } => recording.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Recording { recording } => recording.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ResponseKind::Recording { recording } => recording.size_hint(),
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            ResponseKind::Inner { .. } => "ResponseBody::Inner",
            ResponseKind::Full { .. } => "ResponseBody::Full",
            ResponseKind::Recording { .. } => "ResponseBody::Recording",
        })
    }
}

/// A handler's response body passed through to the client while it is recorded.
///
/// At the end of the body the record (or, past the record limit, a tombstone) replaces the
/// lock before the end is reported, so a client that read the whole response and retries gets
/// the replay. A body error or panic releases the lock. If the client goes away first, the
/// rest of the body is drained on the runtime (bounded by the detach permits) and recorded.
pub(crate) struct Recording<B: Body> {
    state: Option<Box<RecordingState<B>>>,
}

struct RecordingState<B: Body> {
    body: Pin<Box<B>>,
    guard: LockGuard,
    status: StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    size: usize,
    /// `false` once the body passed the record limit: only a tombstone is kept.
    retain: bool,
    max_record: usize,
    trailers: Option<HeaderMap>,
    /// Frames read ahead by [`Recording::read_ready`], not yet passed on.
    read_ahead: VecDeque<Frame<Bytes>>,
    /// A body error read ahead, passed on after `read_ahead`.
    failure: Option<B::Error>,
    /// The body's end was read ahead: do not poll it again.
    ended: bool,
    completing: Option<BoxFuture<()>>,
    /// The body panicked: it must never be polled again.
    poisoned: bool,
    detach: Arc<Semaphore>,
    detached: bool,
    /// Spawns the drain of this state (made where the bounds it needs are known; `Drop` cannot
    /// ask for them).
    spawn_drain: fn(Box<RecordingState<B>>, OwnedSemaphorePermit, tokio::runtime::Handle),
}

impl<B> Recording<B>
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    pub(crate) fn new(
        body: B,
        guard: LockGuard,
        status: StatusCode,
        headers: HeaderMap,
        max_record: usize,
        detach: Arc<Semaphore>,
    ) -> Self {
        let retain = body.size_hint().lower() <= max_record as u64;
        Self {
            state: Some(Box::new(RecordingState {
                body: Box::pin(body),
                guard,
                status,
                headers,
                chunks: Vec::new(),
                size: 0,
                retain,
                max_record,
                trailers: None,
                read_ahead: VecDeque::new(),
                failure: None,
                ended: false,
                completing: None,
                poisoned: false,
                detach,
                detached: false,
                spawn_drain: spawn_drain::<B>,
            })),
        }
    }
}

impl<B> Recording<B>
where
    B: Body,
    B::Data: Buf,
{
    /// Reads the frames the body has ready now, without waiting and up to the record limit.
    ///
    /// When that reaches the end (a body already in memory, the common case), returns the
    /// record with the completion that stores it, and the response body, sharing its bytes.
    /// Otherwise the frames read stay queued for the client and the rest streams as usual.
    pub(crate) fn read_ready(&mut self, cx: &mut Context<'_>) -> Option<(BoxFuture<()>, ResponseBody<B>)> {
        let state = self.state.as_mut()?;
        loop {
            if state.size > state.max_record || state.failure.is_some() {
                return None;
            }
            match state.poll_body(cx) {
                Poll::Pending => return None,
                Poll::Ready(Some(Ok(frame))) => state.read_ahead.push_back(frame),
                Poll::Ready(Some(Err(error))) => state.failure = Some(error),
                Poll::Ready(None) => {
                    state.ended = true;
                    break;
                }
            }
        }
        if !state.retain {
            return None; // a tombstone: the queued frames go out through `poll_frame`
        }
        let record = state.finish();
        let Record::Response(stored) = &record else { return None };
        let body = ResponseBody::full(stored.body.clone(), stored.trailers.clone());
        let completing = state.guard.complete(record)?;
        self.state = None;
        Some((completing, body))
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let Some(state) = self.state.as_mut() else { return Poll::Ready(None) };
        if let Some(frame) = state.read_ahead.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = state.failure.take() {
            self.state = None;
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(completing) = &mut state.completing {
            ready!(completing.as_mut().poll(cx));
            self.state = None;
            return Poll::Ready(None);
        }
        let next = if state.ended { None } else { ready!(state.poll_body(cx)) };
        match next {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(error)) => {
                self.state = None;
                Poll::Ready(Some(Err(error)))
            }
            None => {
                let record = state.finish();
                match state.guard.complete(record) {
                    Some(completing) => {
                        state.completing = Some(completing);
                        self.poll_frame(cx)
                    }
                    None => {
                        self.state = None;
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Some(state) if state.completing.is_none() => {
                let queued: u64 = state.read_ahead.iter().filter_map(Frame::data_ref).map(|d| d.len() as u64).sum();
                let rest = state.body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + queued);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + queued);
                }
                hint
            }
            _ => SizeHint::with_exact(0),
        }
    }
}

impl<B> RecordingState<B>
where
    B: Body,
    B::Data: Buf,
{
    /// Polls the handler's body once: records a frame, releases the lock on an error or a
    /// panic (the panic then goes on), renews the lease while pending.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let body = &mut self.body;
        match catch_unwind(AssertUnwindSafe(|| body.as_mut().poll_frame(cx))) {
            Err(panic) => {
                self.poisoned = true;
                self.release();
                resume_unwind(panic)
            }
            Ok(Poll::Pending) => {
                self.guard.poll_renew(cx);
                Poll::Pending
            }
            Ok(Poll::Ready(Some(Ok(frame)))) => {
                let frame = into_bytes(frame);
                self.record(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Ok(Poll::Ready(Some(Err(error)))) => {
                self.release();
                Poll::Ready(Some(Err(error)))
            }
            Ok(Poll::Ready(None)) => Poll::Ready(None),
        }
    }

    fn release(&mut self) {
        if let Some(release) = self.guard.release() {
            run_soon(release);
        }
    }
}

impl<B: Body> RecordingState<B> {
    fn record(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.size += data.len();
            if self.size > self.max_record {
                self.retain = false;
                self.chunks = Vec::new();
            } else if self.retain && !data.is_empty() {
                self.chunks.push(data.clone());
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers.get_or_insert_with(HeaderMap::new).extend(trailers.clone());
        }
    }

    fn finish(&mut self) -> Record {
        if !self.retain {
            return Record::NotRetained;
        }
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut body = BytesMut::with_capacity(self.size);
                for chunk in self.chunks.drain(..) {
                    body.extend_from_slice(&chunk);
                }
                body.freeze()
            }
        };
        Record::Response(Arc::new(StoredResponse {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body,
            trailers: self.trailers.take(),
        }))
    }
}

impl<B: Body> Recording<B> {
    /// From now on the response streams: keep the lease alive from a task of its own, however
    /// slowly the client reads.
    pub(crate) fn renew_in_background(&mut self) {
        if let Some(state) = &mut self.state {
            state.guard.renew_in_background();
        }
    }
}

impl<B: Body> Drop for Recording<B> {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else { return };
        if state.poisoned {
            return; // the lock was released when the body panicked
        }
        if let Some(completing) = state.completing.take() {
            run_soon(completing);
            return;
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        let permit = state.detach.clone().try_acquire_owned().ok();
        match (runtime, permit) {
            (Some(runtime), Some(permit)) if !state.detached => {
                // The client went away mid-body: read the rest and record it.
                state.detached = true;
                (state.spawn_drain)(state, permit, runtime);
            }
            _ => {
                // The rest cannot be read (no runtime, no detach permit, or the drain itself
                // was dropped). The handler did run: keep a tombstone, never free the key for
                // a second run.
                tracing::warn!("response abandoned before its end; its key keeps a tombstone");
                if let Some(completing) = state.guard.complete(Record::NotRetained) {
                    run_soon(completing);
                }
            }
        }
    }
}

fn spawn_drain<B>(state: Box<RecordingState<B>>, permit: OwnedSemaphorePermit, runtime: tokio::runtime::Handle)
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    let drain = Drain { recording: Recording { state: Some(state) } };
    runtime.spawn(async move {
        let _permit = permit;
        drain.await;
    });
}

/// Reads a recording to its end, with no one listening: the client went away.
struct Drain<B: Body> {
    recording: Recording<B>,
}

impl<B> std::future::Future for Drain<B>
where
    B: Body,
    B::Data: Buf,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match ready!(self.recording.poll_frame(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Poll::Ready(()),
            }
        }
    }
}

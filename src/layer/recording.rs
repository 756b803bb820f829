//! [`Recording`]: a handler's response body passed through to the client while it is kept.
//!
//! The rule this file exists for: **the record is written before the client can see the
//! response end**, however the server reads the body. hyper does not always poll a body to
//! its `None`: it stops once `Content-Length` bytes were written, once trailers arrive, and
//! never polls a body of known length 0. So the end is recognised from the frame that makes
//! it — the body reports [`is_end_stream`](Body::is_end_stream), the known length is reached,
//! trailers arrive — or from `None`, and that last frame is held back until the record is
//! written. A client that received the whole response and retries gets the replay.
//!
//! The end travels with the bytes before it. Frames the body has ready are read ahead
//! (up to [`READ_AHEAD_FRAMES`] at a time), before the head goes out and after each frame: a
//! body whose end is ready ends there, and what was read with it is held back with the last
//! frame. A body complete when the handler returns (a JSON answer) is recorded before its head
//! goes out, and the server writes head and body at once, in one write; a stream whose end
//! follows its last chunk at once sends that chunk and the end together. Were the end a write
//! of its own after the record, Nagle's algorithm (a server without `TCP_NODELAY`) would hold
//! it until the client's delayed ACK, about 40 ms.
//!
//! The states, in order (an explicit enum; see [`State`]):
//!
//! | state | what goes out | what the lock does |
//! | --- | --- | --- |
//! | `Streaming` | each frame as the handler makes it (those ready are read ahead) | held, renewed by the keeper |
//! | `Completing` | the frames read with the end, once the record is written | replaced by the record |
//! | `Passing` | the rest of a body past the record limit, unkept, once the not-retained record is written | replaced by a not-retained record at the limit |
//! | `Failed` | the body's error | released |
//! | `Done` | nothing | — |
//!
//! Dropped while `Streaming` (the client went away, or the server stopped reading early), the
//! rest of the body is drained on the runtime under a detach permit and recorded, but only as
//! far as needed to decide: draining stops at the record limit. With no permit free the
//! handler's answer still counts: a not-retained record is written, never a release.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Semaphore;

use crate::{
    CachePredicate,
    layer::config::{Config, Duplicates},
    layer::duplicates::publisher::Publisher,
    layer::lock::{Completion, LockGuard},
    layer::sse::{EventScanner, is_event_stream},
    rt::{self, Detaching, into_bytes},
    store::EventMark,
    store::{Record, StoredResponse},
    trace::{Origin, completed_now},
};

/// The most frames read ahead at a time (before the head, and after each frame sent): enough
/// for a short stream produced at once, few enough that an endless ready stream still moves.
const READ_AHEAD_FRAMES: usize = 16;

/// A recordable response body on its way to the client.
pub(crate) struct Recording<B: Body> {
    state: State<B>,
    /// Asked at the end whether the trailers still allow the record.
    predicate: Arc<dyn CachePredicate>,
    detach: Arc<Semaphore>,
    /// Spawns the drain of a recording whose client went away (made where the bounds it needs
    /// are known; `Drop` cannot ask for them).
    spawn_drain: fn(Recording<B>, Detaching),
}

/// Where a [`Recording`] stands; see the module docs for the table.
enum State<B: Body> {
    /// The body passes through and is kept, until its end is seen.
    /// Boxed: `Streaming` is large (the tape's header map, the body's state), and a
    /// `ResponseBody` on every path, a bypass included, is moved several times on its way to
    /// the server; boxed, it is a quarter of the size.
    Streaming(Box<Streaming<B>>),
    /// The end was seen and the record is being written; the frames read ahead with the end,
    /// then `last`, go out once it is.
    Completing { completion: Completion, ahead: VecDeque<Frame<Bytes>>, last: Option<Frame<Bytes>> },
    /// Past the record limit: a not-retained record is being written; the rest passes through unkept once
    /// it is (the frame that passed the limit may be the last, and the end must not be seen
    /// before the not-retained record exists).
    Passing { body: Pin<Box<B>>, ahead: VecDeque<Frame<Bytes>>, not_retained: Completion },
    /// The body failed and the lock was released; the frames read ahead before the failure,
    /// then its error, go out next.
    Failed { ahead: VecDeque<Frame<Bytes>>, error: Option<B::Error> },
    /// Everything went out.
    Done,
}

struct Streaming<B> {
    body: Pin<Box<B>>,
    guard: LockGuard,
    tape: Tape,
    /// Frames read ahead (before the head went out, or with the frame last sent), not yet
    /// sent.
    ahead: VecDeque<Frame<Bytes>>,
    /// The body's length when known (`Content-Length`, or an exact size hint): once that many
    /// bytes passed, the body is complete, as the server sees it.
    expected: Option<u64>,
    /// A drain task owns this recording already (the client went away).
    detached: bool,
    /// Join mode: what the body produced goes to the lock's live log too, from the first
    /// time the body makes the client wait (a body complete at once publishes nothing).
    join: bool,
    publisher: Option<Publisher>,
}

/// What is kept of the body so far.
struct Tape {
    status: StatusCode,
    headers: HeaderMap,
    chunks: Chunks,
    size: usize,
    max: usize,
    trailers: Option<HeaderMap>,
    /// A `text/event-stream` body: where its events with an id end.
    events: Option<(EventScanner, Vec<EventMark>)>,
    /// The executing request's trace contexts (the completion time is set at the end).
    origin: Origin,
}

/// The body's chunks so far: the first one inline (most recorded bodies are one chunk, so
/// keeping them allocates nothing), the rest after it.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        match self.first {
            None => self.first = Some(chunk),
            Some(_) => self.rest.push(chunk),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(&self.rest)
    }

    /// The whole body, `size` bytes: one chunk as it is, several copied into one buffer.
    fn concat(&mut self, size: usize) -> Bytes {
        let Some(first) = self.first.take() else { return Bytes::new() };
        if self.rest.is_empty() {
            return first;
        }
        let mut body = BytesMut::with_capacity(size);
        body.extend_from_slice(&first);
        for chunk in self.rest.drain(..) {
            body.extend_from_slice(&chunk);
        }
        body.freeze()
    }
}

/// What one frame from the handler's body did.
enum Step {
    /// Send it on; the body goes on.
    Send(Frame<Bytes>),
    /// It was the last: the recording moved on to `Completing`.
    Ended,
}

impl<B> Recording<B>
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    /// Starts recording `body` (the answer's status and the headers to keep), under `guard`.
    ///
    /// `expected` is the length the server will send, when known. Known to be over the record
    /// limit, only a not-retained record is kept, at once.
    pub(crate) fn new(
        body: B,
        guard: LockGuard,
        status: StatusCode,
        headers: HeaderMap,
        expected: Option<u64>,
        origin: Origin,
        config: &Config,
    ) -> Self {
        let (max_record, detach, predicate) = (config.max_record, config.detached.clone(), config.predicate.clone());
        let expected = expected.or_else(|| body.size_hint().exact());
        let events = is_event_stream(&headers).then(Default::default);
        let join = matches!(config.duplicates, Duplicates::Join { .. });
        let tape = Tape {
            status,
            headers,
            chunks: Chunks::default(),
            size: 0,
            max: max_record,
            trailers: None,
            events,
            origin,
        };
        let streaming = Streaming {
            body: Box::pin(body),
            guard,
            tape,
            ahead: VecDeque::new(),
            expected,
            detached: false,
            join,
            publisher: None,
        };
        let mut recording =
            Self { state: State::Streaming(Box::new(streaming)), predicate, detach, spawn_drain: spawn_drain::<B> };
        if expected.is_some_and(|len| len > max_record as u64) {
            recording.pass();
        }
        recording
    }
}

impl<B> Recording<B>
where
    B: Body,
    B::Data: Buf,
{
    /// Reads the frames the body has ready now (up to [`READ_AHEAD_FRAMES`]), before the head
    /// goes out: a body already in memory ends here, and its record is under way before
    /// anything is sent.
    pub(crate) fn read_ahead(&mut self, cx: &mut Context<'_>) {
        for _ in 0..READ_AHEAD_FRAMES {
            if !matches!(self.state, State::Streaming(_)) {
                return;
            }
            match self.poll_body(cx) {
                Poll::Ready(Some(Ok(Step::Send(frame)))) => match &mut self.state {
                    State::Streaming(streaming) => streaming.ahead.push_back(frame),
                    State::Passing { ahead, .. } => {
                        ahead.push_back(frame);
                        return;
                    }
                    _ => unreachable!("a frame to send leaves the recording streaming or passing"),
                },
                Poll::Ready(Some(Err(error))) => {
                    if let State::Failed { error: failed, .. } = &mut self.state {
                        *failed = Some(error);
                    }
                    return;
                }
                Poll::Ready(Some(Ok(Step::Ended)) | None) => return,
                Poll::Pending => {
                    self.end_if_nothing_is_left();
                    return;
                }
            }
        }
        // Still more ready: the body streams, and what it produced so far is published.
        self.publish(cx);
    }

    /// A body of known length 0 that has nothing ready is complete as the server sees it:
    /// hyper never polls such a body on HTTP/1.1, so its end is now.
    fn end_if_nothing_is_left(&mut self) {
        if let State::Streaming(streaming) = &self.state {
            if streaming.ahead.is_empty() && streaming.expected == Some(streaming.tape.size as u64) {
                self.end(None);
            }
        }
    }

    /// Whether the response end is already known but nothing is left to send before it (an
    /// empty body, trailers only): then the head itself shows the end, and must wait for the
    /// record.
    pub(crate) fn end_needs_the_head(&self) -> bool {
        match &self.state {
            State::Completing { completion, ahead, last } => {
                !completion.is_done()
                    && !ahead.iter().any(Frame::is_data)
                    && last.as_ref().is_none_or(|frame| !frame.is_data())
            }
            _ => false,
        }
    }

    /// Waits for the record's write, if one is under way.
    pub(crate) fn poll_completion(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.state {
            State::Completing { completion, .. } => Pin::new(completion).poll(cx),
            _ => Poll::Ready(()),
        }
    }

    /// Waits for the first attempt of the store write under way, if any (the record of a body
    /// read to its end ahead, or a not-retained record): done, the head goes out with the body
    /// in one write; failed, the head goes out at once and the body waits for the retries.
    pub(crate) fn poll_first_attempt(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.state {
            State::Completing { completion, .. } | State::Passing { not_retained: completion, .. } => {
                completion.poll_first_attempt(cx)
            }
            _ => Poll::Ready(()),
        }
    }

    /// Polls the handler's body once and records what it gives. `None` once it ended (the
    /// recording is then `Completing`).
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Step, B::Error>>> {
        let State::Streaming(streaming) = &mut self.state else { return Poll::Ready(None) };
        let body = &mut streaming.body;
        let polled = match catch_unwind(AssertUnwindSafe(|| body.as_mut().poll_frame(cx))) {
            Ok(polled) => polled,
            Err(panic) => {
                // The body must never be polled again; its answer does not count.
                self.fail();
                resume_unwind(panic)
            }
        };
        match polled {
            Poll::Pending => {
                // The handler is producing: the time to publish what it produced so far.
                self.publish(cx);
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(self.on_frame(into_bytes(frame))))),
            Poll::Ready(Some(Err(error))) => {
                self.fail();
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.end(None);
                Poll::Ready(None)
            }
        }
    }

    /// Join mode: moves the lock's live log on with what the body produced (never waits).
    fn publish(&mut self, cx: &mut Context<'_>) {
        let State::Streaming(streaming) = &mut self.state else { return };
        if streaming.publisher.is_none() && streaming.join {
            let tape = &streaming.tape;
            let marks = tape.events.as_ref().map_or(&[][..], |(_, marks)| marks);
            streaming.publisher = streaming.guard.held().map(|held| Publisher::new(held, tape.chunks.iter(), marks));
        }
        if let Some(publisher) = &mut streaming.publisher {
            let tape = &streaming.tape;
            publisher.flush(cx, tape.status, &tape.headers, tape.origin);
            if publisher.full() {
                // The store keeps no more of its live log: as past the record limit, the
                // response is not retained (joiners end, duplicates get the answer for it).
                self.pass();
            }
        }
    }

    fn on_frame(&mut self, frame: Frame<Bytes>) -> Step {
        let State::Streaming(streaming) = &mut self.state else { return Step::Send(frame) };
        let tape = &mut streaming.tape;
        if let Some(data) = frame.data_ref() {
            let start = tape.size;
            tape.size += data.len();
            if tape.size > tape.max {
                self.pass();
                return Step::Send(frame);
            }
            if !data.is_empty() {
                tape.chunks.push(data.clone());
                let mut found = Vec::new();
                if let Some((scanner, marks)) = &mut tape.events {
                    scanner.feed(data, |mark| {
                        found.push((mark.id.clone(), (mark.end - start as u64) as usize));
                        marks.push(mark);
                    });
                }
                if let Some(publisher) = &mut streaming.publisher {
                    publisher.data(data, found);
                }
            }
            let complete = streaming.body.is_end_stream() || streaming.expected == Some(tape.size as u64);
            if !complete {
                return Step::Send(frame);
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            // Trailers are always the last frame.
            tape.trailers.get_or_insert_with(HeaderMap::new).extend(trailers.clone());
        } else {
            return Step::Send(frame);
        }
        self.end(Some(frame));
        Step::Ended
    }

    /// The body is complete: write the record (or, if its trailers say it failed, release the
    /// lock), holding `last` back until that is done.
    fn end(&mut self, last: Option<Frame<Bytes>>) {
        let State::Streaming(streaming) = std::mem::replace(&mut self.state, State::Done) else { return };
        let Streaming { guard, mut tape, ahead, .. } = *streaming;
        let completion = match self.predicate.should_record_trailers(tape.trailers.as_ref()) {
            true => guard.complete(tape.finish()),
            false => guard.release(),
        };
        self.state = State::Completing { completion, ahead, last };
    }

    /// Past the record limit: keep a not-retained record now (the handler answered, so it must never run
    /// again for this key), and let the rest of the body through unkept.
    fn pass(&mut self) {
        let State::Streaming(streaming) = std::mem::replace(&mut self.state, State::Done) else { return };
        let Streaming { body, guard, ahead, .. } = *streaming;
        let not_retained = guard.complete(Record::NotRetained);
        self.state = State::Passing { body, ahead, not_retained };
    }

    /// The body failed or panicked: release the lock, so a retry runs again.
    fn fail(&mut self) {
        if let State::Streaming(streaming) = std::mem::replace(&mut self.state, State::Done) {
            let Streaming { guard, ahead, .. } = *streaming;
            drop(guard.release());
            self.state = State::Failed { ahead, error: None };
        }
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            match &mut self.state {
                State::Streaming(streaming) => {
                    if let Some(frame) = streaming.ahead.pop_front() {
                        self.publish(cx);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    match std::task::ready!(self.poll_body(cx)) {
                        Some(Ok(Step::Send(frame))) => match &mut self.state {
                            // It passed the record limit: it goes out once the not-retained record is kept.
                            State::Passing { ahead, .. } => ahead.push_back(frame),
                            State::Streaming(streaming) => {
                                // Look further: if the end is ready right after this frame, the
                                // frame waits for the record with it (one write, not two).
                                streaming.ahead.push_back(frame);
                                self.read_ahead(cx);
                            }
                            _ => unreachable!("a frame to send leaves the recording streaming or passing"),
                        },
                        Some(Ok(Step::Ended)) | None => {}
                        Some(Err(error)) => {
                            self.state = State::Done;
                            return Poll::Ready(Some(Err(error)));
                        }
                    }
                }
                State::Completing { completion, ahead, last } => {
                    std::task::ready!(Pin::new(completion).poll(cx));
                    if let Some(frame) = ahead.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let last = last.take();
                    self.state = State::Done;
                    return Poll::Ready(last.map(Ok));
                }
                State::Passing { body, ahead, not_retained } => {
                    std::task::ready!(Pin::new(not_retained).poll(cx));
                    if let Some(frame) = ahead.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let polled = std::task::ready!(body.as_mut().poll_frame(cx));
                    if polled.is_none() {
                        self.state = State::Done;
                    }
                    return Poll::Ready(polled.map(|frame| frame.map(into_bytes)));
                }
                State::Failed { ahead, error } => {
                    if let Some(frame) = ahead.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let error = error.take();
                    self.state = State::Done;
                    if let Some(error) = error {
                        return Poll::Ready(Some(Err(error)));
                    }
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    /// Drives the recording until what is kept of the key is decided: the record written, a
    /// not-retained record kept, or the lock released. What the body sends past that is not read.
    fn poll_decided(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.end_if_nothing_is_left();
        loop {
            if matches!(self.state, State::Passing { .. } | State::Failed { .. } | State::Done) {
                return Poll::Ready(());
            }
            match std::task::ready!(self.poll_frame(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Poll::Ready(()),
            }
        }
    }

    /// Reads the body until the record is decided, with no one listening (the client went
    /// away before the handler answered).
    pub(crate) async fn drain(mut self) {
        std::future::poll_fn(|cx| self.poll_decided(cx)).await;
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Completing { completion, ahead, last } => last.is_none() && ahead.is_empty() && completion.is_done(),
            State::Failed { ahead, error } => ahead.is_empty() && error.is_none(),
            State::Streaming(_) | State::Passing { .. } => false,
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Streaming(streaming) => plus(streaming.body.size_hint(), data_len(&streaming.ahead)),
            State::Completing { ahead, last, .. } => {
                let len = data_len(ahead) + last.as_ref().and_then(Frame::data_ref).map_or(0, |d| d.len() as u64);
                match last.as_ref().is_some_and(Frame::is_trailers) {
                    false => SizeHint::with_exact(len),
                    // Trailers still to send: no exact length, so HTTP/1.1 goes chunked and can
                    // carry them.
                    true => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(len);
                        hint
                    }
                }
            }
            State::Passing { body, ahead, .. } => plus(body.size_hint(), data_len(ahead)),
            State::Failed { ahead, .. } => {
                let mut hint = SizeHint::new();
                hint.set_lower(data_len(ahead));
                hint
            }
            State::Done => SizeHint::with_exact(0),
        }
    }
}

/// The data bytes of `frames`.
fn data_len(frames: &VecDeque<Frame<Bytes>>) -> u64 {
    frames.iter().filter_map(Frame::data_ref).map(|data| data.len() as u64).sum()
}

/// `hint` plus `more` bytes read ahead.
fn plus(hint: SizeHint, more: u64) -> SizeHint {
    let mut sum = SizeHint::new();
    sum.set_lower(hint.lower() + more);
    if let Some(upper) = hint.upper() {
        sum.set_upper(upper + more);
    }
    sum
}

impl Tape {
    fn finish(&mut self) -> Record {
        let body = self.chunks.concat(self.size);
        Record::Response(Arc::new(StoredResponse {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body,
            trailers: self.trailers.take(),
            marks: self.events.take().map(|(_, marks)| marks).unwrap_or_default(),
            origin: Origin { completed_at: Some(completed_now()), ..self.origin },
        }))
    }
}

impl<B: Body> Drop for Recording<B> {
    fn drop(&mut self) {
        let State::Streaming(streaming) = std::mem::replace(&mut self.state, State::Done) else {
            // `Completing` hands its write to the runtime by itself.
            return;
        };
        let detaching = match streaming.detached {
            false => rt::reserve(streaming.guard.runtime(), Some(&self.detach)).ok(),
            true => None,
        };
        match detaching {
            Some(detaching) => {
                // The client went away mid-body: read on until the record is decided.
                let mut streaming = streaming;
                streaming.detached = true;
                let recording = Self {
                    state: State::Streaming(streaming),
                    predicate: self.predicate.clone(),
                    detach: self.detach.clone(),
                    spawn_drain: self.spawn_drain,
                };
                (self.spawn_drain)(recording, detaching);
            }
            None => {
                // The rest cannot be read (no runtime, no detach permit, or the drain itself
                // was dropped). The handler did answer: keep a not-retained record, never free the key
                // for a second run.
                tracing::warn!("response abandoned before its end; its key keeps a not-retained record");
                drop(streaming.guard.complete(Record::NotRetained));
            }
        }
    }
}

fn spawn_drain<B>(recording: Recording<B>, detaching: Detaching)
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Send,
{
    detaching.spawn(recording.drain());
}

impl<B: Body> fmt::Debug for Recording<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.state {
            State::Streaming(_) => "Recording::Streaming",
            State::Completing { .. } => "Recording::Completing",
            State::Passing { .. } => "Recording::Passing",
            State::Failed { .. } => "Recording::Failed",
            State::Done => "Recording::Done",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use http_body_util::StreamBody;
    use tokio::time::Instant;

    use super::*;
    use crate::{
        IdempotencyKey,
        layer::lock::{Keeper, Locked},
        store::{Begin, Fingerprint, IdempotencyStore, MemoryStore, StoreKey},
    };

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

    /// A recording of `frames` (one poll each, after a `Pending`), declared `expected` long,
    /// over a fresh lock in `store`.
    async fn recording(
        store: &MemoryStore,
        frames: Frames,
        expected: Option<u64>,
        max: usize,
    ) -> (Recording<impl Body<Data = Bytes, Error = Infallible> + Send + 'static>, StoreKey) {
        let stream = futures_util::StreamExt::then(futures_util::stream::iter(frames), |frame| async move {
            tokio::task::yield_now().await;
            frame
        });
        recording_of(store, StreamBody::new(stream), expected, max).await
    }

    /// A recording of `body` over a fresh lock in `store`.
    async fn recording_of<B>(
        store: &MemoryStore,
        body: B,
        expected: Option<u64>,
        max: usize,
    ) -> (Recording<B>, StoreKey)
    where
        B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
        recording_with(store, body, expected, crate::IdempotencyLayer::new().with_max_record(max)).await
    }

    /// A recording of `body` over a fresh lock in `store`, with `layer`'s settings.
    async fn recording_with<B>(
        store: &MemoryStore,
        body: B,
        expected: Option<u64>,
        layer: crate::IdempotencyLayer,
    ) -> (Recording<B>, StoreKey)
    where
        B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
        recording_from(store, body, expected, layer, Origin::default()).await
    }

    /// [`recording_with`], for a request that came from `origin`.
    async fn recording_from<B>(
        store: &MemoryStore,
        body: B,
        expected: Option<u64>,
        layer: crate::IdempotencyLayer,
        origin: Origin,
    ) -> (Recording<B>, StoreKey)
    where
        B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
        let key = StoreKey::new(None, IdempotencyKey::parse(b"k").unwrap());
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let began = Instant::now();
        let Ok(Begin::Execute(token)) = store.begin(&key, &fingerprint, Duration::from_secs(30)).await else {
            panic!("the key is free")
        };
        let lease = Duration::from_secs(30);
        let locked = Locked {
            store: Arc::new(store.clone()),
            key: key.clone(),
            token,
            ttl: lease,
            grace: Duration::ZERO,
            lease,
            began,
            live: None,
        };
        let guard = LockGuard::new(locked, &Keeper::new(lease));
        let recording =
            Recording::new(body, guard, StatusCode::OK, HeaderMap::new(), expected, origin, layer.settings());
        (recording, key)
    }

    async fn state_of(store: &MemoryStore, key: &StoreKey) -> &'static str {
        match store.begin(key, &Fingerprint::from_bytes([1; 32]), Duration::from_secs(30)).await.unwrap() {
            Begin::Locked => "locked",
            Begin::Completed(Record::Response(_)) => "recorded",
            Begin::Completed(Record::NotRetained) => "not-retained",
            Begin::Execute(_) => "free",
            Begin::Mismatch => "mismatch",
            Begin::Expired => "expired",
        }
    }

    async fn next(recording: &mut Recording<impl Body<Data = Bytes, Error = Infallible>>) -> Option<Frame<Bytes>> {
        std::future::poll_fn(|cx| recording.poll_frame(cx)).await.map(Result::unwrap)
    }

    fn data(bytes: &'static str) -> Result<Frame<Bytes>, Infallible> {
        Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_exists_when_the_declared_length_is_handed_out() {
        let store = MemoryStore::new();
        let (mut recording, key) = recording(&store, vec![data("ab"), data("cd")], Some(4), 100).await;
        assert_eq!(next(&mut recording).await.unwrap().into_data().unwrap(), "ab");
        assert_eq!(state_of(&store, &key).await, "locked");
        // The last bytes: a server stops here and never asks for the end.
        assert_eq!(next(&mut recording).await.unwrap().into_data().unwrap(), "cd");
        assert_eq!(state_of(&store, &key).await, "recorded");
        assert!(recording.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_keeps_its_origin_and_when_it_was_completed() {
        let store = MemoryStore::new();
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let caller = crate::TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let origin = Origin { caller, ..Origin::default() };
        let body = http_body_util::Full::new(Bytes::from_static(b"ok"));
        let before = std::time::SystemTime::now() - Duration::from_millis(1);
        let (mut recording, key) = recording_from(&store, body, Some(2), crate::IdempotencyLayer::new(), origin).await;
        assert_eq!(next(&mut recording).await.unwrap().into_data().unwrap(), "ok");
        let Begin::Completed(Record::Response(record)) =
            store.begin(&key, &fingerprint, Duration::from_secs(30)).await.unwrap()
        else {
            panic!("recorded")
        };
        assert_eq!(record.origin().caller, caller);
        let at = record.origin().completed_at.unwrap();
        assert!(before <= at && at <= std::time::SystemTime::now(), "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_end_the_body_and_are_recorded() {
        let store = MemoryStore::new();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let frames = vec![data("ab"), Ok(Frame::trailers(trailers.clone()))];
        let (mut recording, key) = recording(&store, frames, None, 100).await;
        next(&mut recording).await.unwrap();
        let last = next(&mut recording).await.unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers);
        match store.begin(&key, &Fingerprint::from_bytes([1; 32]), Duration::from_secs(1)).await.unwrap() {
            Begin::Completed(Record::Response(stored)) => {
                assert_eq!(stored.body, "ab");
                assert_eq!(stored.trailers, Some(trailers));
            }
            other => panic!("not recorded: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_limit_the_not_retained_record_is_kept_at_once_and_the_rest_passes() {
        let store = MemoryStore::new();
        let (mut recording, key) = recording(&store, vec![data("abc"), data("def"), data("g")], None, 4).await;
        next(&mut recording).await.unwrap();
        assert_eq!(state_of(&store, &key).await, "locked");
        next(&mut recording).await.unwrap();
        assert_eq!(state_of(&store, &key).await, "not-retained", "decided at the limit, not at the end");
        assert_eq!(next(&mut recording).await.unwrap().into_data().unwrap(), "g");
        assert!(next(&mut recording).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_body_of_known_length_is_complete_without_its_end() {
        let store = MemoryStore::new();
        // Declared empty, and never ending: the server sends the head and reads no further.
        let frames = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
        let (mut recording, key) = recording_of(&store, StreamBody::new(frames), Some(0), 100).await;
        std::future::poll_fn(|cx| {
            recording.read_ahead(cx);
            Poll::Ready(())
        })
        .await;
        // The head shows the end: it waits for the record.
        std::future::poll_fn(|cx| recording.poll_completion(cx)).await;
        assert_eq!(state_of(&store, &key).await, "recorded");
        assert!(recording.is_end_stream());
        assert_eq!(recording.size_hint().exact(), Some(0));
    }

    /// gRPC's way: the status is in the trailers.
    struct GrpcOk;

    impl CachePredicate for GrpcOk {
        fn should_record(&self, head: &http::response::Parts) -> bool {
            head.status == StatusCode::OK
        }

        fn should_record_trailers(&self, trailers: Option<&HeaderMap>) -> bool {
            trailers.and_then(|t| t.get("grpc-status")).is_some_and(|status| status == "0")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_the_predicate_rejects_release_the_key() {
        for (status, kept) in [("0", "recorded"), ("13", "free")] {
            let store = MemoryStore::new();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", status.parse().unwrap());
            let frames = futures_util::stream::iter([data("msg"), Ok(Frame::trailers(trailers))]);
            let layer = crate::IdempotencyLayer::new().with_cache_predicate(GrpcOk);
            let (mut recording, key) = recording_with(&store, StreamBody::new(frames), None, layer).await;
            while next(&mut recording).await.is_some() {}
            assert_eq!(state_of(&store, &key).await, kept, "grpc-status {status}");
        }
    }
}

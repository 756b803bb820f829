//! [`Joined`]: the body of a joined response, and its head.

use std::{
    collections::VecDeque,
    fmt,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use tokio::time::Instant;
use tower::BoxError;

use crate::{
    IDEMPOTENT_REPLAYED, Outcome,
    layer::body::Rewrite,
    layer::duplicates::WaitSlot,
    layer::lock::StoreHandle,
    layer::sse::{resume_in_body, skips_lf},
    rt::BoxFuture,
    store::{Followed, LiveCursor, LiveEvent, StoreError, StoredResponse},
};

/// The joined response: the first request's head with `Idempotent-Replayed: true`, and a body
/// that follows the first request's.
pub(crate) fn joined_head(status: StatusCode, mut headers: HeaderMap) -> http::response::Parts {
    // The length is not known until the end: sent chunked (HTTP/1.1) or framed (HTTP/2).
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers = headers;
    head.extensions.insert(Outcome::Joined);
    head
}

/// How long a joined duplicate whose `Last-Event-ID` names no event of the log yet waits for
/// that event to be published, once it has read all the log holds, before it takes the id for
/// unknown and gets the whole stream (the wait ends with a read that finds nothing new past
/// it: reads that bring events are catching up, however long they take).
///
/// The first request's client gets each frame before the publish that carries it reaches the
/// store (one round trip later, batched). A client that reconnects faster than that, to this
/// replica or another, names an event the log does not hold yet: it waits for it, woken by the
/// store as every follower is, so the wait costs no round trip beyond the reads that bring the
/// event, and no latency beyond the publish's own. Only an id the stream never had costs the
/// whole wait before the first body byte.
pub(crate) const RESUME_WAIT: Duration = Duration::from_secs(1);

/// Where a joined body starts sending.
enum Start {
    /// At this body offset: the bytes before it are skipped. `after_cr`: the event there ended
    /// with a CR, so an LF at `offset` (the rest of that CRLF) is skipped too.
    At { offset: u64, after_cr: bool },
    /// After the event whose id is `id` (`Last-Event-ID`), not yet found. The body read
    /// meanwhile is held. First the log is read to its end as it is now, without waiting
    /// (`until` is `None` meanwhile), and the last event with the id there is taken; if there
    /// is none, the first one published after that, within [`RESUME_WAIT`] of nothing new
    /// (`until`). Should
    /// the log end first, the record decides, as a replay does.
    Seeking { id: Bytes, found: Option<u64>, until: Option<Instant> },
}

/// Why a joined body ended early.
#[derive(Debug)]
struct JoinInterrupted(&'static str);

impl fmt::Display for JoinInterrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the joined response ended before its end: {}", self.0)
    }
}

impl std::error::Error for JoinInterrupted {}

/// The body of a joined response.
pub(crate) struct Joined {
    following: Arc<dyn StoreHandle>,
    status: StatusCode,
    cursor: LiveCursor,
    /// Body bytes of the first response taken so far (sent, queued, held or skipped).
    position: u64,
    start: Start,
    /// Bytes ready to send, in order; while seeking, every body byte taken (from offset 0).
    ready: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    step: JoinStep,
    /// A change made to the body as it passes (a JSON-RPC retry's `id`).
    rewrite: Option<Box<dyn Rewrite>>,
    /// This joiner's place among the key's waiters: given back when the body is dropped.
    _slot: WaitSlot,
}

enum JoinStep {
    /// Following the log (a read under way, or none yet).
    Following(Option<BoxFuture<Result<Followed, StoreError>>>),
    /// The log ended with a record: reading it for the rest.
    Finishing(BoxFuture<Result<Option<Arc<StoredResponse>>, StoreError>>),
    /// Everything is queued.
    Done,
    /// The error to send next.
    Failed(Option<BoxError>),
}

impl Joined {
    /// A joined body after the head: `events`, what the first read of the log held past it,
    /// and `cursor`, where that read ended. With `last_event_id` (an event stream's
    /// `Last-Event-ID`), it starts after that event.
    pub(crate) fn new(
        following: Arc<dyn StoreHandle>,
        status: StatusCode,
        events: Vec<LiveEvent>,
        cursor: LiveCursor,
        last_event_id: Option<Bytes>,
        slot: WaitSlot,
    ) -> Self {
        let start = match last_event_id {
            Some(id) => Start::Seeking { id, found: None, until: None },
            None => Start::At { offset: 0, after_cr: false },
        };
        let mut joined = Self {
            following,
            status,
            cursor,
            position: 0,
            start,
            ready: VecDeque::new(),
            trailers: None,
            step: JoinStep::Following(None),
            rewrite: None,
            _slot: slot,
        };
        joined.take(events);
        joined
    }

    /// Takes the body bytes and the event ends among `events`, in order.
    fn take(&mut self, events: Vec<LiveEvent>) {
        for event in events {
            match event {
                LiveEvent::Data(data) => self.queue(data),
                LiveEvent::EventEnd(id) => {
                    if let Start::Seeking { id: last, found, until } = &mut self.start {
                        if id == *last {
                            *found = Some(self.position);
                            if until.is_some() {
                                // Published while this joiner waited for it: resume there.
                                self.resolve(self.position);
                            }
                        }
                    }
                }
                LiveEvent::Head { .. } => {}
            }
        }
    }

    fn queue(&mut self, data: Bytes) {
        let from = self.position;
        self.position += data.len() as u64;
        let Start::At { offset, after_cr } = &mut self.start else {
            // Seeking: held, from offset 0.
            if !data.is_empty() {
                self.ready.push_back(data);
            }
            return;
        };
        if self.position <= *offset || data.is_empty() {
            return;
        }
        // `data` holds the byte at `offset` unless an earlier chunk did (then `after_cr` was
        // cleared with it).
        let mut skip = usize::try_from(offset.saturating_sub(from)).unwrap_or(usize::MAX);
        if std::mem::take(after_cr) && skips_lf(Some(b'\r'), data[skip]) {
            skip += 1;
        }
        if skip < data.len() {
            self.push(data.slice(skip..));
        }
    }

    /// Queues bytes to send, through the rewrite if there is one.
    fn push(&mut self, data: Bytes) {
        match &mut self.rewrite {
            Some(rewrite) => rewrite.feed(data, &mut self.ready),
            None => self.ready.push_back(data),
        }
    }

    /// Applies `rewrite` to the body from its start (what is queued already included; what is
    /// held while seeking, once it is sent).
    pub(crate) fn rewrite_with(&mut self, mut rewrite: Box<dyn Rewrite>) {
        if matches!(self.start, Start::At { .. }) {
            let queued = std::mem::take(&mut self.ready);
            for data in queued {
                rewrite.feed(data, &mut self.ready);
            }
        }
        self.rewrite = Some(rewrite);
    }

    /// The place to start is known: `offset`, within the bytes taken so far. What was held
    /// while seeking is sent from there.
    fn resolve(&mut self, offset: u64) {
        let held = std::mem::take(&mut self.ready);
        let after_cr = offset.checked_sub(1).and_then(|at| byte_at(&held, at)) == Some(b'\r');
        self.start = Start::At { offset, after_cr };
        self.position = 0;
        for data in held {
            self.queue(data);
        }
    }

    /// After a read of the log while seeking (`news`: it brought events): decides where to
    /// start if it is time to.
    fn seek(&mut self, news: bool) {
        let Start::Seeking { found, until, .. } = &mut self.start else { return };
        match (*until, *found) {
            // Caught up: the last event with the id read so far, or wait for one.
            (None, Some(offset)) if !news => self.resolve(offset),
            (None, None) if !news => *until = Some(Instant::now() + RESUME_WAIT),
            // Nothing new for as long as it waits: an id the stream does not have gets the
            // whole stream. (While reads bring events, it is still catching up.)
            (Some(until), _) if !news && Instant::now() >= until => self.resolve(0),
            _ => {}
        }
    }

    /// How long the next read of the log may wait.
    fn read_timeout(&self) -> Duration {
        match &self.start {
            Start::At { .. } => READ_TIMEOUT,
            Start::Seeking { until: None, .. } => Duration::ZERO,
            Start::Seeking { until: Some(until), .. } => until.saturating_duration_since(Instant::now()),
        }
    }

    fn fail(&mut self, why: &'static str) {
        tracing::debug!(why, "idempotency: joined response interrupted");
        self.step = JoinStep::Failed(Some(Box::new(JoinInterrupted(why))));
        if matches!(self.start, Start::Seeking { .. }) {
            self.ready.clear();
        }
    }

    /// The rest of the body from the record that ended the log.
    fn finish(&mut self, record: Option<Arc<StoredResponse>>) {
        let Some(record) = record else { return self.fail("the first request's response was not kept") };
        let sent = usize::try_from(self.position).unwrap_or(usize::MAX);
        if record.status != self.status || record.body.len() < sent {
            return self.fail("the key holds another response");
        }
        if let Start::Seeking { id, .. } = &self.start {
            // The whole response is known: where a replay would start.
            let resumed = resume_in_body(&record.body, &record.marks, id);
            let offset = resumed.map_or(0, |rest| (record.body.len() - rest.len()) as u64);
            self.ready.clear();
            self.position = 0;
            self.start = Start::At { offset, after_cr: false };
            self.queue(record.body.clone());
        } else {
            self.queue(record.body.slice(sent..));
        }
        self.trailers = record.trailers.clone();
        self.step = JoinStep::Done;
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        loop {
            if matches!(self.start, Start::At { .. }) {
                if let Some(data) = self.next_data() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
            }
            let timeout = self.read_timeout();
            match &mut self.step {
                JoinStep::Following(reading) => {
                    // One read at most per lease: the store wakes it sooner when anything happens.
                    let (following, cursor) = (&self.following, self.cursor);
                    let read = reading.get_or_insert_with(|| following.clone().follow(Some(cursor), timeout));
                    let followed = ready!(read.as_mut().poll(cx));
                    self.step = JoinStep::Following(None);
                    match followed {
                        Ok(Followed::Live { events, cursor }) => {
                            self.cursor = cursor;
                            let news = !events.is_empty();
                            self.take(events);
                            self.seek(news);
                        }
                        Ok(Followed::Ended { completed: true }) => {
                            self.step = JoinStep::Finishing(self.following.clone().record());
                        }
                        Ok(Followed::Ended { completed: false }) => self.fail("the first request failed"),
                        Err(_) => self.fail("the store failed"),
                    }
                }
                JoinStep::Finishing(reading) => match ready!(reading.as_mut().poll(cx)) {
                    Ok(record) => self.finish(record),
                    Err(_) => self.fail("the store failed"),
                },
                JoinStep::Done => {
                    if let Some(mut rewrite) = self.rewrite.take() {
                        rewrite.finish(&mut self.ready);
                        continue;
                    }
                    return Poll::Ready(self.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))));
                }
                JoinStep::Failed(error) => return Poll::Ready(error.take().map(Err)),
            }
        }
    }

    /// The next bytes to send: what is ready, in one frame of up to [`MAX_FRAME`] bytes (a
    /// joiner catching up on thousands of token-sized chunks sends them in a few frames).
    fn next_data(&mut self) -> Option<Bytes> {
        let first = self.ready.pop_front()?;
        if self.ready.front().is_none_or(|next| first.len() + next.len() > MAX_FRAME) {
            return Some(first);
        }
        let mut frame = BytesMut::from(&first[..]);
        while let Some(next) = self.ready.pop_front() {
            if frame.len() + next.len() > MAX_FRAME {
                self.ready.push_front(next);
                break;
            }
            frame.extend_from_slice(&next);
        }
        Some(frame.freeze())
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ready.is_empty()
            && match &self.step {
                JoinStep::Done => self.trailers.is_none() && self.rewrite.is_none(),
                JoinStep::Failed(error) => error.is_none(),
                _ => false,
            }
    }
}

/// The byte at body offset `at` among `held`, the body from offset 0.
fn byte_at(held: &VecDeque<Bytes>, mut at: u64) -> Option<u8> {
    for data in held {
        match usize::try_from(at).ok().and_then(|i| data.get(i)) {
            Some(&byte) => return Some(byte),
            None => at -= data.len() as u64,
        }
    }
    None
}

/// The most bytes of ready chunks joined into one frame.
const MAX_FRAME: usize = 16 * 1024;

/// How long one read of the log waits at most before asking again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

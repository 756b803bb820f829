//! [`Joined`]: the body of a joined response, and its head.

use std::{
    collections::VecDeque,
    fmt,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use tower::BoxError;

use crate::{
    IDEMPOTENT_REPLAYED, Outcome,
    layer::body::Rewrite,
    layer::duplicates::WaitSlot,
    layer::lock::StoreHandle,
    layer::sse::is_event_stream,
    rt::BoxFuture,
    store::{Followed, LiveCursor, LiveEvent, StoreError, StoredResponse},
};

/// The joined response: the first request's head with `Idempotent-Replayed: true`, and a body
/// that follows the first request's.
pub(crate) fn joined_head(
    status: StatusCode,
    mut headers: HeaderMap,
    last_event_id: Option<&HeaderValue>,
    events: &[LiveEvent],
) -> (http::response::Parts, u64) {
    // The length is not known until the end: sent chunked (HTTP/1.1) or framed (HTTP/2).
    headers.remove(header::CONTENT_LENGTH);
    let resume = match last_event_id {
        Some(id) if is_event_stream(&headers) => resume_in(events, id.as_bytes()),
        _ => 0,
    };
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers = headers;
    head.extensions.insert(Outcome::Joined);
    (head, resume)
}

/// The body offset after the last event with id `last` among `events`; 0 if there is none.
fn resume_in(events: &[LiveEvent], last: &[u8]) -> u64 {
    let mut offset = 0;
    let mut resume = 0;
    for event in events {
        match event {
            LiveEvent::Data(data) => offset += data.len() as u64,
            LiveEvent::EventEnd(id) if id == last => resume = offset,
            _ => {}
        }
    }
    resume
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
    /// Body bytes of the first response accounted for so far (sent, queued or skipped).
    position: u64,
    /// The body offset sending starts at (after the event `Last-Event-ID` names).
    start: u64,
    /// Bytes ready to send, in order.
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
    pub(crate) fn new(
        following: Arc<dyn StoreHandle>,
        status: StatusCode,
        events: Vec<LiveEvent>,
        cursor: LiveCursor,
        start: u64,
        slot: WaitSlot,
    ) -> Self {
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

    /// Queues the body bytes among `events`, from the start offset on.
    fn take(&mut self, events: Vec<LiveEvent>) {
        for event in events {
            if let LiveEvent::Data(data) = event {
                self.queue(data);
            }
        }
    }

    fn queue(&mut self, data: Bytes) {
        let from = self.position;
        self.position += data.len() as u64;
        if self.position <= self.start || data.is_empty() {
            return;
        }
        let skip = usize::try_from(self.start.saturating_sub(from)).unwrap_or(usize::MAX);
        let data = data.slice(skip..);
        match &mut self.rewrite {
            Some(rewrite) => rewrite.feed(data, &mut self.ready),
            None => self.ready.push_back(data),
        }
    }

    /// Applies `rewrite` to the body from its start (what is queued already included).
    pub(crate) fn rewrite_with(&mut self, mut rewrite: Box<dyn Rewrite>) {
        let queued = std::mem::take(&mut self.ready);
        for data in queued {
            rewrite.feed(data, &mut self.ready);
        }
        self.rewrite = Some(rewrite);
    }

    fn fail(&mut self, why: &'static str) {
        tracing::debug!(why, "idempotency: joined response interrupted");
        self.step = JoinStep::Failed(Some(Box::new(JoinInterrupted(why))));
    }

    /// The rest of the body from the record that ended the log.
    fn finish(&mut self, record: Option<Arc<StoredResponse>>) {
        let Some(record) = record else { return self.fail("the first request's response was not kept") };
        let sent = usize::try_from(self.position).unwrap_or(usize::MAX);
        if record.status != self.status || record.body.len() < sent {
            return self.fail("the key holds another response");
        }
        let rest = record.body.slice(sent..);
        self.queue(rest);
        self.trailers = record.trailers.clone();
        self.step = JoinStep::Done;
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(data) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
            }
            match &mut self.step {
                JoinStep::Following(reading) => {
                    // One read at most per lease: the store wakes it sooner when anything happens.
                    let following = &self.following;
                    let cursor = self.cursor;
                    let read = reading.get_or_insert_with(|| following.clone().follow(Some(cursor), READ_TIMEOUT));
                    let followed = ready!(read.as_mut().poll(cx));
                    self.step = JoinStep::Following(None);
                    match followed {
                        Ok(Followed::Live { events, cursor }) => {
                            self.cursor = cursor;
                            self.take(events);
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

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ready.is_empty()
            && match &self.step {
                JoinStep::Done => self.trailers.is_none() && self.rewrite.is_none(),
                JoinStep::Failed(error) => error.is_none(),
                _ => false,
            }
    }
}

/// How long one read of the log waits at most before asking again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

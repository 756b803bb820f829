//! [`Publisher`]: the live half of a recording in join mode. What the body has produced goes
//! into the lock's live log in the store, for duplicates to follow, without ever
//! holding the response back: at most one publish is under way, and what the body produces
//! meanwhile is batched into the next.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use crate::{
    Origin,
    layer::lock::{Published, StoreHandle},
    rt::BoxFuture,
    store::EventMark,
    store::LiveEvent,
};

/// The most bytes of body pieces joined into one log event.
const MAX_JOINED: usize = 4 * 1024;

pub(crate) struct Publisher {
    held: Arc<dyn StoreHandle>,
    /// The log index of `queue[0]`.
    next: u64,
    /// Events not yet acknowledged by the store (the ones being sent first).
    queue: Vec<LiveEvent>,
    /// The publish under way, and how many events of `queue` it carries.
    sending: Option<(BoxFuture<Published>, usize)>,
    /// The store refused a publish for the log's bound: nothing more is published.
    full: bool,
    /// The head is queued (it is made at the first flush: a response that never publishes,
    /// complete before its head went out, never copies its headers).
    head_queued: bool,
    /// Body bytes not queued yet (see `push_data`), and how many.
    pending: Vec<Bytes>,
    pending_len: usize,
}

impl Publisher {
    /// A publisher for `held`'s log, with the body bytes recorded before it existed and the
    /// event ends found in them.
    pub(crate) fn new<'a>(
        held: Arc<dyn StoreHandle>,
        recorded: impl IntoIterator<Item = &'a Bytes>,
        marks: &[EventMark],
    ) -> Self {
        let mut publisher = Self {
            held,
            next: 0,
            queue: Vec::new(),
            sending: None,
            head_queued: false,
            full: false,
            pending: Vec::new(),
            pending_len: 0,
        };
        let (mut offset, mut marks) = (0u64, marks.iter().peekable());
        for data in recorded {
            let end = offset + data.len() as u64;
            let mut within = Vec::new();
            while let Some(mark) = marks.next_if(|mark| mark.end <= end) {
                within.push((mark.id.clone(), (mark.end - offset) as usize));
            }
            publisher.data(data, within);
            offset = end;
        }
        publisher
    }

    /// Queues body bytes, split at the event ends they contain (`marks`: the ids, and their
    /// offsets within `data`).
    pub(crate) fn data(&mut self, data: &Bytes, marks: impl IntoIterator<Item = (Bytes, usize)>) {
        let mut at = 0;
        for (id, end) in marks {
            if end > at {
                self.push_data(data.slice(at..end));
                at = end;
            }
            self.seal();
            self.queue.push(LiveEvent::EventEnd(id));
        }
        if at < data.len() {
            self.push_data(data.slice(at..));
        }
    }

    /// Body bytes, held with those before them until an event end, the start of the next
    /// publish or [`MAX_JOINED`] bytes, then queued as one log event: a body of token-sized
    /// chunks makes one log event per publish between two event ends, not one per chunk.
    fn push_data(&mut self, data: Bytes) {
        self.pending_len += data.len();
        self.pending.push(data);
        if self.pending_len >= MAX_JOINED {
            self.seal();
        }
    }

    /// Queues the held body bytes (copied into one piece if there are several).
    fn seal(&mut self) {
        let data = match self.pending.len() {
            0 => return,
            1 => self.pending.pop().unwrap_or_default(),
            _ => {
                let mut joined = BytesMut::with_capacity(self.pending_len);
                for piece in self.pending.drain(..) {
                    joined.extend_from_slice(&piece);
                }
                joined.freeze()
            }
        };
        self.pending_len = 0;
        self.queue.push(LiveEvent::Data(data));
    }

    /// Whether the store refused a publish for the log's bound: the response cannot be joined.
    pub(crate) fn full(&self) -> bool {
        self.full
    }

    /// Moves publishing on: finishes the publish under way if it is done, and starts the next
    /// with everything queued since, the response head (`status`, `headers`, and the `origin`
    /// of the request, which a joiner's span links to) first. Never waits (`cx` is woken when
    /// a publish finishes).
    pub(crate) fn flush(&mut self, cx: &mut Context<'_>, status: StatusCode, headers: &HeaderMap, origin: Origin) {
        if self.full {
            return;
        }
        if !self.head_queued {
            // In flight: not completed yet.
            let origin = Origin { completed_at: None, ..origin };
            self.queue.insert(0, LiveEvent::Head { status, headers: headers.clone(), origin });
            self.head_queued = true;
        }
        loop {
            if let Some((sending, count)) = &mut self.sending {
                let Poll::Ready(published) = sending.as_mut().poll(cx) else { return };
                let count = *count;
                self.sending = None;
                match published {
                    Published::Stored => {}
                    // Sent again at the next flush, with whatever joined the queue.
                    Published::Failed => return,
                    Published::Full => {
                        self.full = true;
                        self.queue = Vec::new();
                        (self.pending, self.pending_len) = (Vec::new(), 0);
                        return;
                    }
                }
                self.queue.drain(..count);
                self.next += count as u64;
            }
            // No publish under way: the bytes held go with the next.
            self.seal();
            if self.queue.is_empty() {
                return;
            }
            // The events are kept until the store acknowledges them (a clone shares the bytes).
            let batch = self.queue.clone();
            let count = batch.len();
            self.sending = Some((self.held.clone().publish(self.next, batch), count));
        }
    }
}

//! Responses in flight, as join mode and waiting see them: what a store carries from the
//! request that executes to the duplicates that follow it (SPEC 2.9).
//!
//! The executing request **publishes** its response as it is produced: first its head, then
//! its body in pieces, with the end of each `text/event-stream` event that has an `id:`. Each
//! lock has a log of these events of its own. A duplicate **follows** the log: it reads what was
//! published after its [`LiveCursor`], and when there is nothing new the store wakes it when
//! there is (no polling). `complete`, `release`, and the lease running out end the log; a
//! follower then learns whether a record replaced the lock ([`Followed::Ended`]), and reads
//! the rest of the response from the record.
//!
//! A log holds at most the record limit of body bytes (a response past it is not retained, and
//! stops being published), and lives no longer than its lock.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// One piece of a response in flight, as the executing request publishes it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LiveEvent {
    /// The status and the headers a replay would send. Always the first event, and only once.
    Head {
        /// The response status.
        status: StatusCode,
        /// The headers kept for a replay (hop-by-hop, `Content-Length`, `Date` removed).
        headers: HeaderMap,
    },
    /// The next bytes of the body.
    Data(Bytes),
    /// A `text/event-stream` event whose `id:` is this value ended where the body published so
    /// far ends (a duplicate sending `Last-Event-ID` with this value resumes there).
    EventEnd(Bytes),
}

impl LiveEvent {
    /// Body bytes this event carries (the only bytes a store bounds).
    pub fn data_len(&self) -> usize {
        match self {
            Self::Data(data) => data.len(),
            Self::Head { .. } | Self::EventEnd(_) => 0,
        }
    }
}

/// Where a follower stands in a lock's log: the lock's token id, and how many events it has
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LiveCursor {
    lock: u128,
    read: u64,
}

impl LiveCursor {
    /// A cursor in the log of lock `lock` (a [`LockToken::id`](super::LockToken::id)), after its
    /// first `read` events.
    pub const fn new(lock: u128, read: u64) -> Self {
        Self { lock, read }
    }

    /// The token id of the lock whose log this is.
    pub const fn lock(&self) -> u128 {
        self.lock
    }

    /// How many events of the log were read.
    pub const fn read(&self) -> u64 {
        self.read
    }
}

/// What [`IdempotencyStore::follow`](super::IdempotencyStore::follow) found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Followed {
    /// The lock is live: the events after the cursor (none if the wait timed out first), and
    /// the cursor after them.
    Live {
        /// The new events, in order.
        events: Vec<LiveEvent>,
        /// Where the next `follow` starts.
        cursor: LiveCursor,
    },
    /// The log followed has ended, or the key holds no live lock for the fingerprint.
    /// `completed`: a record replaced the lock (ask `begin` for it). Otherwise the lock was
    /// released, expired, or taken over.
    Ended {
        /// Whether a record replaced the lock.
        completed: bool,
    },
}

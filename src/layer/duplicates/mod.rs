//! Duplicates of a request in flight: waiting for its end, or joining its response as it is
//! produced. Both follow the lock's live log in the store, woken by the store.
//!
//! - [`Waiting`]: how many duplicates of each key wait or join in this process (bounded).
//! - [`wait_in_flight`]: follows the log until it ends (wait mode), or until the head is there
//!   (join mode), bounded by the wait timeout.
//! - [`Joined`] (`joined.rs`): a joined response's body. It sends what the log holds, then follows it, and
//!   once the log ends with a record, sends the rest from the record (its end, its trailers).
//!   A log that ends without a record (the first request failed mid-body) ends the body with
//!   an error. A client that leaves drops it, and with it everything it held.

mod joined;
pub(crate) mod publisher;

pub(crate) use joined::{Joined, joined_head};

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::{
    Origin,
    layer::lock::StoreHandle,
    store::StoreKey,
    store::{Followed, LiveCursor, LiveEvent, StoreError},
    telemetry::{self, Held, Tracked},
};

/// What a duplicate that waited for the request in flight found.
pub(crate) enum Waited {
    /// Join mode: the first request's head is there (with its origin, for the joiner's span to
    /// link to), with what followed it so far, and the handle to follow the rest with.
    Head {
        status: StatusCode,
        headers: HeaderMap,
        origin: Origin,
        events: Vec<LiveEvent>,
        cursor: LiveCursor,
        following: Arc<dyn StoreHandle>,
    },
    /// The request in flight ended (or the lock changed hands): ask `begin` again.
    Ended,
    /// The request in flight ended, and the look that saw it found what the key now holds
    /// (a record, another request's fingerprint): the answer, without asking `begin` again.
    /// (Transactional mode's waiters answer so; the plain mode's ask `begin`.)
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Answered(crate::store::Begin),
    /// The wait timed out.
    TimedOut,
}

/// Follows the key's live log until it ends, until `until`, or (when `join`) until its head.
pub(crate) async fn wait_in_flight(
    following: &Arc<dyn StoreHandle>,
    until: Instant,
    join: bool,
) -> Result<Waited, StoreError> {
    let mut cursor = None;
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(Waited::TimedOut);
        }
        match following.clone().follow(cursor, until - now).await? {
            Followed::Live { events, cursor: next } => {
                // A log read from its start begins with its head.
                if join && cursor.is_none_or(|c: LiveCursor| c.read() == 0) {
                    let mut events = events.into_iter();
                    if let Some(LiveEvent::Head { status, headers, origin }) = events.next() {
                        let (events, following) = (events.collect(), following.clone());
                        return Ok(Waited::Head { status, headers, origin, events, cursor: next, following });
                    }
                }
                cursor = Some(next);
            }
            Followed::Ended { .. } => return Ok(Waited::Ended),
        }
    }
}

/// How many duplicates wait for or join each key in flight in this process.
pub(crate) struct Waiting {
    pub(crate) max: usize,
    keys: std::sync::Mutex<std::collections::HashMap<StoreKey, usize>>,
}

impl Waiting {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, keys: Default::default() })
    }

    /// A place among `key`'s waiters, held until dropped; `None` when all are taken.
    pub(crate) fn enter(self: &Arc<Self>, key: &StoreKey) -> Option<WaitSlot> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let count = keys.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        let tracked = Tracked::new(Held::Waiter);
        Some(WaitSlot { waiting: self.clone(), key: key.clone(), tracked, joined_at: None })
    }
}

/// One duplicate's place among its key's waiters.
pub(crate) struct WaitSlot {
    waiting: Arc<Waiting>,
    key: StoreKey,
    /// Counted as a waiter, then as a joiner.
    tracked: Tracked,
    /// When it started following a joined response.
    joined_at: Option<Instant>,
}

impl WaitSlot {
    /// The duplicate stops waiting and follows a joined response (with this place).
    pub(crate) fn join(&mut self) {
        self.tracked = Tracked::new(Held::Joiner);
        self.joined_at = Some(Instant::now());
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        if let Some(at) = self.joined_at {
            telemetry::joined(at);
        }
        let mut keys = self.waiting.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = keys.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

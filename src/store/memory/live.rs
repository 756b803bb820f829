//! The live log of one lock in the map: made by the first publish or follower, shared by
//! every follower, and ended (its memory freed) by whatever removes the lock.
//!
//! A log keeps each event as a [`Piece`] of 40 bytes (the body bytes are `Bytes`, shared with
//! the response that published them; a head is boxed), and counts what it holds in the
//! store's byte count: its pieces' capacity, the bytes they carry, and the log itself
//! ([`Live::weight_of`]). It stays under its bound per response: a publish that would pass it
//! appends nothing and marks the log full, and every later one is refused too.

use std::{
    mem::size_of,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;

use crate::{
    Origin,
    store::{Followed, LiveCursor, LiveEvent},
};

pub(super) struct Live {
    log: Mutex<Log>,
    /// Woken at every change of `log`.
    changed: Notify,
}

#[derive(Default)]
struct Log {
    pieces: Vec<Piece>,
    /// What the log holds, as counted in the store's bytes (see [`Live::weight_of`]).
    weight: usize,
    /// A publish would have taken the log past its bound: nothing more is appended.
    full: bool,
    /// `Some(completed)` once the lock is gone.
    ended: Option<bool>,
}

/// One event as the log keeps it: 40 bytes (`LiveEvent` is over 100, for its head's header
/// map inline).
enum Piece {
    Head(Box<Head>),
    Data(Bytes),
    EventEnd(Bytes),
}

/// A head as a piece keeps it: status, headers, and the origin of the request in flight.
type Head = (StatusCode, HeaderMap, Origin);

/// A publish that would take the log past its bound: refused.
pub(super) struct Full;

/// What a log costs before any event: the `Live` and its `Arc`.
pub(super) const EMPTY_WEIGHT: usize = size_of::<Live>() + 2 * size_of::<usize>();

impl Piece {
    fn new(event: LiveEvent) -> Self {
        match event {
            LiveEvent::Head { status, headers, origin } => Self::Head(Box::new((status, headers, origin))),
            LiveEvent::Data(data) => Self::Data(data),
            LiveEvent::EventEnd(id) => Self::EventEnd(id),
        }
    }

    fn to_event(&self) -> LiveEvent {
        match self {
            Self::Head(head) => LiveEvent::Head { status: head.0, headers: head.1.clone(), origin: head.2 },
            Self::Data(data) => LiveEvent::Data(data.clone()),
            Self::EventEnd(id) => LiveEvent::EventEnd(id.clone()),
        }
    }
}

/// The bytes an event carries beyond its piece: the body bytes, the event id, or the head
/// (its box with the origin, and each header field's name and value plus a field's own 64 bytes or so in the
/// map).
fn carried(event: &LiveEvent) -> usize {
    match event {
        LiveEvent::Head { headers, .. } => {
            size_of::<Head>()
                + headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 64).sum::<usize>()
        }
        LiveEvent::Data(data) => data.len(),
        LiveEvent::EventEnd(id) => id.len(),
    }
}

impl Live {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self { log: Mutex::new(Log { weight: EMPTY_WEIGHT, ..Log::default() }), changed: Notify::new() })
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What appending `events` would add to the log's weight, at most: the bytes they carry,
    /// and the pieces' capacity grown by doubling (as a `Vec` does).
    pub(super) fn growth_of(&self, events: &[LiveEvent]) -> usize {
        let log = self.log();
        let (len, capacity) = (log.pieces.len(), log.pieces.capacity());
        let needed = len + events.len();
        let grown = if needed > capacity { (capacity * 2).max(needed).max(16) } else { capacity };
        events.iter().map(carried).sum::<usize>() + (grown - capacity) * size_of::<Piece>()
    }

    /// Appends the events from index `from` on that the log does not hold yet, counting what
    /// they add in `bytes`; refused when that would take the log past `max` (and every publish
    /// after it).
    pub(super) fn publish(
        &self,
        from: u64,
        events: Vec<LiveEvent>,
        max: usize,
        bytes: &AtomicUsize,
    ) -> Result<(), Full> {
        let mut log = self.log();
        if log.ended.is_some() {
            return Ok(());
        }
        if log.full {
            return Err(Full);
        }
        let held = log.pieces.len() as u64;
        if from > held {
            // A gap: never written by the layer, which publishes in order. Keep the log whole.
            return Ok(());
        }
        let skip = usize::try_from(held - from).unwrap_or(usize::MAX);
        let new: Vec<LiveEvent> = events.into_iter().skip(skip).collect();
        if new.is_empty() {
            return Ok(());
        }
        let carried: usize = new.iter().map(carried).sum();
        let (len, capacity) = (log.pieces.len(), log.pieces.capacity());
        let needed = len + new.len();
        let pieces_weight = |capacity: usize| capacity * size_of::<Piece>();
        let room = max.saturating_sub(log.weight + carried - pieces_weight(capacity));
        if needed > capacity {
            // Double, as a `Vec` does, but never past what the bound leaves.
            let grown = (capacity * 2).max(needed).max(16).min(room / size_of::<Piece>());
            if grown < needed {
                log.full = true;
                return Err(Full);
            }
            log.pieces.reserve_exact(grown - len);
        } else if log.weight + carried > max {
            log.full = true;
            return Err(Full);
        }
        log.pieces.extend(new.into_iter().map(Piece::new));
        let weight = log.weight - pieces_weight(capacity) + pieces_weight(log.pieces.capacity()) + carried;
        bytes.fetch_add(weight - log.weight, Ordering::AcqRel);
        log.weight = weight;
        drop(log);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The lock is gone: free what the log holds (no longer counted in `bytes`), and wake
    /// every follower. Followers read the rest from the record.
    pub(super) fn end(&self, completed: bool, bytes: &AtomicUsize) {
        let mut log = self.log();
        if log.ended.is_none() {
            log.ended = Some(completed);
            log.pieces = Vec::new();
            bytes.fetch_sub(log.weight, Ordering::AcqRel);
            log.weight = 0;
        }
        drop(log);
        self.changed.notify_waiters();
    }

    /// What a follower at `cursor` gets now, or `None` when nothing is new.
    fn read(&self, cursor: LiveCursor) -> Option<Followed> {
        let log = self.log();
        if let Some(completed) = log.ended {
            return Some(Followed::Ended { completed });
        }
        let read = usize::try_from(cursor.read()).unwrap_or(usize::MAX);
        let new = log.pieces.get(read..).filter(|new| !new.is_empty())?;
        let cursor = LiveCursor::new(cursor.lock(), log.pieces.len() as u64);
        Some(Followed::Live { events: new.iter().map(Piece::to_event).collect(), cursor })
    }

    /// Waits until something after `cursor` exists, the log ends, or `until` passes.
    pub(super) async fn follow(&self, cursor: LiveCursor, until: tokio::time::Instant) -> Followed {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change between the look and the wait wakes it.
            changed.as_mut().enable();
            if let Some(followed) = self.read(cursor) {
                return followed;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Followed::Live { events: Vec::new(), cursor };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_40_bytes() {
        assert_eq!(size_of::<Piece>(), 40);
        assert!(size_of::<LiveEvent>() > 100, "{}", size_of::<LiveEvent>());
    }
}

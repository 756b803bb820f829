//! The live log of one lock in the map: made by the first publish or follower, shared by
//! every follower (the body bytes are `Bytes`, so a follower's copy of the log shares them), and
//! ended by whatever removes the lock.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::store::{Followed, LiveCursor, LiveEvent};

#[derive(Default)]
pub(super) struct Live {
    log: Mutex<Log>,
    /// Woken at every change of `log`.
    changed: Notify,
}

#[derive(Default)]
struct Log {
    events: Vec<LiveEvent>,
    /// `Some(completed)` once the lock is gone.
    ended: Option<bool>,
}

impl Live {
    pub(super) fn new() -> Arc<Self> {
        Arc::default()
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the events from index `from` on that the log does not hold yet.
    pub(super) fn publish(&self, from: u64, events: Vec<LiveEvent>) {
        let mut log = self.log();
        if log.ended.is_some() {
            return;
        }
        let held = log.events.len() as u64;
        let skip = usize::try_from(held.saturating_sub(from)).unwrap_or(usize::MAX);
        if from > held {
            // A gap: never written by the layer, which publishes in order. Keep the log whole.
            return;
        }
        let before = log.events.len();
        log.events.extend(events.into_iter().skip(skip));
        if log.events.len() > before {
            drop(log);
            self.changed.notify_waiters();
        }
    }

    /// The lock is gone: wake every follower.
    pub(super) fn end(&self, completed: bool) {
        self.log().ended.get_or_insert(completed);
        self.changed.notify_waiters();
    }

    /// What a follower at `cursor` gets now, or `None` when nothing is new.
    fn read(&self, cursor: LiveCursor) -> Option<Followed> {
        let log = self.log();
        let read = usize::try_from(cursor.read()).unwrap_or(usize::MAX);
        if let Some(new) = log.events.get(read..).filter(|new| !new.is_empty()) {
            let cursor = LiveCursor::new(cursor.lock(), log.events.len() as u64);
            return Some(Followed::Live { events: new.to_vec(), cursor });
        }
        log.ended.map(|completed| Followed::Ended { completed })
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

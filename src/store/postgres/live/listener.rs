//! [`Listener`]: one connection per store, of its own, that `LISTEN`s on the table's channel
//! and hands each notification to the followers of its key.
//!
//! A follower [`subscribe`](Listener::subscribe)s to its key before it reads, waits on the
//! subscription, and reads again when woken. The listener wakes a key's followers on each
//! notification for the key, and every follower after it (re)connected, since notifications
//! sent while it was not listening are lost: each follower then reads once to catch up.
//!
//! A key counts the notifications it received (and the listener's reconnections), and stays
//! known for [`LINGER`] after its last follower returned: a follower that returned events
//! leaves a [`Memo`] of where it stopped, so that the next `follow` from there, when nothing was
//! notified since its read began, waits at once instead of reading nothing new first.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions},
};
use tokio::{
    sync::{Notify, futures::Notified, watch},
    time::Instant,
};

use super::super::sql::notice;
use crate::{
    rt::{Background, Running},
    store::{LiveCursor, StoreError},
};

/// A key's id in the live log and in notifications (see [`key_id`](super::key_id)).
pub(crate) type KeyId = [u8; 16];

/// The first pause before connecting again after a failure; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How many ends of locks a key remembers for its followers (one is the usual).
const ENDS_KEPT: usize = 8;
/// How many memos a key keeps (its followers usually stand at one cursor).
const MEMOS_KEPT: usize = 4;
/// How long a key stays known after its last follower returned: longer than a joiner takes
/// to pass the events on and follow again.
const LINGER: Duration = Duration::from_secs(1);

/// The listener of one store (shared by its clones). Its task starts with the first follower
/// and ends when the store is dropped.
pub(crate) struct Listener {
    shared: Arc<Shared>,
    /// The application pool's connect options: the listener connects as the pool does, but on
    /// a connection of its own, never one of the pool's.
    options: Arc<PgConnectOptions>,
    connect_timeout: Duration,
    task: Background,
    /// Dropped with the store, which ends the task.
    stop: watch::Sender<()>,
}

struct Shared {
    channel: Arc<str>,
    keys: Mutex<HashMap<KeyId, Weak<Key>>>,
    /// Keys whose last follower returned lately, kept for [`LINGER`], oldest first.
    lingering: Mutex<VecDeque<(Instant, KeyId, Arc<Key>)>>,
    /// Whether the listener's `LISTEN` is in effect.
    listening: watch::Sender<bool>,
}

/// What the followers of one key share: woken on each notification for the key.
struct Key {
    changed: Notify,
    /// Notifications received for the key, and reconnections of the listener: a follower's
    /// read that began at `seen` has missed nothing while it still is `seen`.
    seen: AtomicU64,
    /// The ends notified for the key's locks: (token, completed), the latest last.
    ends: Mutex<Vec<(u128, bool)>>,
    memos: Mutex<Vec<Memo>>,
    /// When its last follower returned; whether it is in `lingering`.
    left_at: Mutex<Instant>,
    lingers: AtomicBool,
}

/// Where a follower stopped: at `cursor`, after a read that began when the key had `seen`
/// notifications, which found the lease running until `lease_end`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Memo {
    pub(super) cursor: LiveCursor,
    pub(super) seen: u64,
    pub(super) lease_end: Instant,
}

/// A follower's interest in a key, from before its first read until it returns.
pub(crate) struct Subscription {
    shared: Arc<Shared>,
    id: KeyId,
    key: Arc<Key>,
}

impl Listener {
    pub(crate) fn new(channel: Arc<str>, options: Arc<PgConnectOptions>, connect_timeout: Duration) -> Self {
        let shared = Arc::new(Shared {
            channel,
            keys: Mutex::default(),
            lingering: Mutex::default(),
            listening: watch::Sender::new(false),
        });
        Self { shared, options, connect_timeout, task: Background::default(), stop: watch::Sender::new(()) }
    }

    /// Starts following `id`: every notification for it from now on wakes the subscription.
    pub(crate) fn subscribe(&self, id: KeyId) -> Subscription {
        let mut keys = self.shared.keys();
        let key = match keys.get(&id).and_then(Weak::upgrade) {
            Some(key) => key,
            None => {
                let key = Arc::new(Key {
                    changed: Notify::new(),
                    seen: AtomicU64::new(0),
                    ends: Mutex::default(),
                    memos: Mutex::default(),
                    left_at: Mutex::new(Instant::now()),
                    lingers: AtomicBool::new(false),
                });
                keys.insert(id, Arc::downgrade(&key));
                key
            }
        };
        Subscription { shared: self.shared.clone(), id, key }
    }

    /// Waits, at most `within`, until the listener listens (starting it if it is not running):
    /// a follower reads only then, so that nothing committed after its read goes unnoticed.
    pub(crate) async fn listening(&self, within: Duration) -> Result<(), StoreError> {
        self.ensure_started();
        let mut listening = self.shared.listening.subscribe();
        match tokio::time::timeout(within, listening.wait_for(|listening| *listening)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::timeout()),
        }
    }

    fn ensure_started(&self) {
        let (shared, options, stop) = (self.shared.clone(), self.options.clone(), self.stop.subscribe());
        let connect_timeout = self.connect_timeout;
        self.task.ensure(|running| listen_forever(shared, options, connect_timeout, stop, running));
    }
}

impl Shared {
    fn keys(&self) -> MutexGuard<'_, HashMap<KeyId, Weak<Key>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a notification to its key's followers (there may be none in this process).
    fn dispatch(&self, payload: &str) {
        let Some((kind, id, token)) = parse(payload) else {
            tracing::debug!(payload, "idempotency: an unknown notification on the store's channel; ignored");
            return;
        };
        let Some(key) = self.keys().get(&id).and_then(Weak::upgrade) else { return };
        match kind {
            notice::COMPLETED => key.end(token, true),
            notice::RELEASED => key.end(token, false),
            _ => {}
        }
        key.seen.fetch_add(1, Ordering::AcqRel);
        key.changed.notify_waiters();
    }

    /// Wakes every follower, to read again: notifications may have been missed (and no memo
    /// holds any more).
    fn wake_all(&self) {
        let keys: Vec<_> = self.keys().values().filter_map(Weak::upgrade).collect();
        for key in keys {
            key.seen.fetch_add(1, Ordering::AcqRel);
            key.changed.notify_waiters();
        }
    }

    /// Keeps `key` known for [`LINGER`], and forgets the keys whose time is up.
    fn linger(&self, id: KeyId, key: &Arc<Key>) {
        let now = Instant::now();
        *key.left_at.lock().unwrap_or_else(|e| e.into_inner()) = now;
        let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        if !key.lingers.swap(true, Ordering::AcqRel) {
            lingering.push_back((now + LINGER, id, key.clone()));
        }
        let mut forgotten = Vec::new();
        while lingering.front().is_some_and(|(until, ..)| *until <= now) {
            let Some((_, id, key)) = lingering.pop_front() else { break };
            let left_at = *key.left_at.lock().unwrap_or_else(|e| e.into_inner());
            if left_at + LINGER > now {
                // Followed again since: it lingers from its latest return.
                lingering.push_back((left_at + LINGER, id, key));
            } else {
                key.lingers.store(false, Ordering::Release);
                forgotten.push((id, key));
            }
        }
        drop(lingering);
        if forgotten.is_empty() {
            return;
        }
        let mut keys = self.keys();
        for (id, key) in forgotten {
            // Under the map's lock no one can clone the key: without followers, it goes.
            if Arc::strong_count(&key) == 1 {
                keys.remove(&id);
            }
        }
    }
}

impl Key {
    fn end(&self, token: u128, completed: bool) {
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        if ends.len() == ENDS_KEPT {
            ends.remove(0);
        }
        ends.push((token, completed));
    }
}

impl Subscription {
    /// Completes at the next notification for the key (or reconnection of the listener);
    /// `enable` it before reading, so that one arriving during the read counts.
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.key.changed.notified()
    }

    /// Whether a notification said that the lock `token` ended, and if so whether a record
    /// replaced it.
    pub(super) fn ended(&self, token: u128) -> Option<bool> {
        let ends = self.key.ends.lock().unwrap_or_else(|e| e.into_inner());
        ends.iter().rev().find(|(ended, _)| *ended == token).map(|(_, completed)| *completed)
    }

    /// How many notifications the key has received (and reconnections seen): take it before
    /// a read, for [`remember`](Self::remember).
    pub(super) fn seen(&self) -> u64 {
        self.key.seen.load(Ordering::Acquire)
    }

    /// Leaves a memo for the next follower from `memo.cursor`.
    pub(super) fn remember(&self, memo: Memo) {
        let mut memos = self.key.memos.lock().unwrap_or_else(|e| e.into_inner());
        memos.retain(|kept| kept.cursor != memo.cursor);
        if memos.len() == MEMOS_KEPT {
            memos.remove(0);
        }
        memos.push(memo);
    }

    /// The memo left at `cursor`, if nothing was notified for the key since its read began:
    /// then nothing after `cursor` is known to exist, and anything committed later will wake
    /// this subscription. Call it after enabling [`changed`](Self::changed).
    pub(super) fn memo(&self, cursor: LiveCursor) -> Option<Memo> {
        let memos = self.key.memos.lock().unwrap_or_else(|e| e.into_inner());
        let memo = *memos.iter().find(|memo| memo.cursor == cursor)?;
        (memo.seen == self.seen()).then_some(memo)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.linger(self.id, &self.key);
    }
}

/// `p`, `c` or `r`, then the key id and the token in hex.
fn parse(payload: &str) -> Option<(u8, KeyId, u128)> {
    let payload = payload.as_bytes();
    let (&kind, rest) = payload.split_first()?;
    if rest.len() != 64 {
        return None;
    }
    let mut id = [0; 16];
    let mut token = [0; 16];
    for (i, pair) in rest.chunks_exact(2).enumerate() {
        let byte = (hex(pair[0])? << 4) | hex(pair[1])?;
        if i < 16 { id[i] = byte } else { token[i - 16] = byte }
    }
    Some((kind, id, u128::from_be_bytes(token)))
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// Listens until the store is dropped, connecting again (with a growing pause) whenever the
/// connection fails.
async fn listen_forever(
    shared: Arc<Shared>,
    options: Arc<PgConnectOptions>,
    connect_timeout: Duration,
    mut stop: watch::Receiver<()>,
    _running: Running,
) {
    // A pool of one connection, of the listener's own: `PgListener` takes its connection
    // from it, and a new one when the connection is lost.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(connect_timeout)
        .connect_lazy_with((*options).clone());
    let mut backoff = MIN_BACKOFF;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            error = listen(&shared, &pool, &mut backoff) => {
                shared.listening.send_replace(false);
                tracing::warn!(%error, "idempotency: the PostgreSQL listener lost its connection; connecting again");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listening session: returns the error that ended it.
async fn listen(shared: &Shared, pool: &PgPool, backoff: &mut Duration) -> sqlx::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(error) => return error,
    };
    if let Err(error) = listener.listen(&shared.channel).await {
        return error;
    }
    *backoff = MIN_BACKOFF;
    // Every follower reads again (what was notified before this `LISTEN` is lost), and no
    // memo holds; then new followers may read.
    shared.wake_all();
    shared.listening.send_replace(true);
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => shared.dispatch(notification.payload()),
            // The connection was lost, and `PgListener` listens again on a new one: what was
            // notified in between is lost, so every follower reads again.
            Ok(None) => {
                tracing::debug!("idempotency: the PostgreSQL listener reconnected");
                shared.wake_all();
            }
            Err(error) => return error,
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("channel", &self.shared.channel)
            .field("listening", &*self.shared.listening.borrow())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        let payload = format!("c{}{}", "0f".repeat(16), "a1".repeat(16));
        let (kind, id, token) = parse(&payload).unwrap();
        assert_eq!(kind, notice::COMPLETED);
        assert_eq!(id, [0x0f; 16]);
        assert_eq!(token, u128::from_be_bytes([0xa1; 16]));
        for bad in
            ["", "c", &payload[..64], &format!("{payload}0"), &payload.replace('f', "F"), &payload.replace('a', "g")]
        {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_lingers_after_its_last_follower_then_goes() {
        let listener = Listener::new("c".into(), Arc::new(PgConnectOptions::new()), Duration::from_secs(1));
        let first = listener.subscribe([1; 16]);
        let second = listener.subscribe([1; 16]);
        assert!(Arc::ptr_eq(&first.key, &second.key));
        drop(first);
        listener.shared.dispatch(&format!("r{}{}", "01".repeat(16), "00".repeat(16)));
        assert_eq!(second.ended(0), Some(false));
        assert_eq!(second.ended(1), None);
        let cursor = LiveCursor::new(0, 3);
        let memo = Memo { cursor, seen: second.seen(), lease_end: Instant::now() };
        second.remember(memo);
        drop(second);
        // Within the linger, the next follower finds the memo, until a notification comes.
        tokio::time::advance(LINGER / 2).await;
        let third = listener.subscribe([1; 16]);
        assert!(third.memo(cursor).is_some());
        assert!(third.memo(LiveCursor::new(0, 4)).is_none());
        listener.shared.dispatch(&format!("p{}{}", "01".repeat(16), "00".repeat(16)));
        assert!(third.memo(cursor).is_none(), "a notification since the memo's read");
        drop(third);
        // Past the linger, the key goes (on the next return of any follower).
        tokio::time::advance(LINGER * 2).await;
        drop(listener.subscribe([2; 16]));
        let keys = listener.shared.keys();
        assert!(!keys.contains_key(&[1; 16]), "{:?}", keys.keys().collect::<Vec<_>>());
    }
}

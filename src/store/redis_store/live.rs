//! Live logs in Redis: `publish` appends a lock's events to its stream, `follow` reads them,
//! woken by a blocking `XREAD` on a dedicated connection.
//!
//! A follower's steps (see the `RedisStore` docs for the contract):
//!
//! 1. no cursor: `lookup` finds the lock for the fingerprint (one script);
//! 2. `check` (one script): is the key still held by the cursor's lock? Its lease left, and the
//!    entries after the cursor (the stream is made if missing, so that the end is written);
//! 3. nothing new: `XREAD BLOCK` from the cursor, until the follower's timeout, the lease seen
//!    in step 2 runs out, or the block limit, whichever comes first; woken by a publish or
//!    the end marker.
//!
//! A check holds for [`TRUSTED`]: a follower that checked its lock that recently reads with
//! `XREAD` alone (one round trip per wake-up). That is safe because an ended log stays for
//! [`ENDED_TTL`], longer than `TRUSTED`: a read sent within `TRUSTED` of a check finds the end
//! marker if the lock ended meanwhile, and a lock that expires unended stops the read when the
//! lease runs out.
//!
//! One blocking read per log and place: followers of one lock at one cursor (the duplicates of
//! a request waiting for its head, joiners at the end of its log) share one `XREAD BLOCK`, sent
//! by the first of them, and each takes what it found ([`Flights`]). However many duplicates
//! one key has, it holds one dedicated connection, and leaves the others to the other keys.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ::redis::{Cmd, Value};
use tokio::{sync::watch, time::Instant};

use super::{
    RedisStore, codec,
    codec::Entry,
    connection::{Command, store_error},
    millis,
    readers::{Held, Readers},
    scripts::{FOLLOW, LOOKUP, PUBLISH},
    slot,
};
use crate::store::{Fingerprint, Followed, LiveCursor, LiveEvent, LockToken, StoreError, StoreKey};

/// How long an ended log (with its end marker) stays in Redis.
pub(super) const ENDED_TTL: Duration = Duration::from_secs(5);
/// How long a check of the lock lets a follower read without checking again: well within
/// [`ENDED_TTL`], so that a read sent this long after a check still reaches Redis before the
/// log, had it ended meanwhile, is gone.
const TRUSTED: Duration = Duration::from_secs(2);
/// The most entries one read returns.
const READ_COUNT: usize = 256;
/// Without a client to open dedicated connections from: how often a follower checks again.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The most locks remembered as recently checked.
const MAX_SEEN: usize = 1024;

/// The live-log half of the store: the dedicated connections and what followers saw.
pub(super) struct Live {
    /// `None`: built on a connection with no client for dedicated connections; followers
    /// check every [`POLL_INTERVAL`] instead of blocking.
    pub(super) readers: Option<Readers>,
    /// The longest one blocking read waits.
    pub(super) max_block: Duration,
    seen: Mutex<HashMap<u128, Seen>>,
    flights: Flights,
}

/// What a follower last learned of a lock.
struct Seen {
    record_key: Box<[u8]>,
    fingerprint: Fingerprint,
    checked: Instant,
    /// When its lease runs out, as of `checked`.
    lease_until: Instant,
    /// The end marker was read: whether a record replaced the lock.
    ended: Option<bool>,
}

enum Known {
    Ended(bool),
    Live(Instant),
    Unknown,
}

/// The blocking reads under way, one per lock and cursor: the first follower at a place sends
/// the read ([`Board::Lead`]), the others wait for what it finds ([`Board::Follow`]).
#[derive(Default)]
struct Flights(Mutex<HashMap<Place, watch::Receiver<Option<Landed>>>>);

/// A place in a log: the lock's id and the cursor's count of events read.
type Place = (u128, u64);

/// What a shared blocking read found.
#[derive(Clone)]
enum Landed {
    /// The entries after the cursor.
    Entries(Arc<[Entry]>),
    /// Nothing before the read's block ended.
    Nothing,
    /// The read failed.
    Failed(Arc<StoreError>),
}

enum Board<'a> {
    /// No read is under way at this place: send it, and land what it finds.
    Lead(Flight<'a>),
    /// A read is under way: its answer, once it comes (the channel closes without one when
    /// its follower gave up before sending it, or was cancelled).
    Follow(watch::Receiver<Option<Landed>>),
}

/// The read of the follower that leads at a place; dropped, it leaves the place (and its
/// followers, if it never landed, find the channel closed and try again).
struct Flight<'a> {
    flights: &'a Flights,
    place: Place,
    landed: watch::Sender<Option<Landed>>,
    /// The map's receiver is a clone of it: how `drop` tells this flight's entry.
    own: watch::Receiver<Option<Landed>>,
}

impl Flights {
    fn board(&self, lock: u128, read: u64) -> Board<'_> {
        let mut flights = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let place = (lock, read);
        if let Some(landed) = flights.get(&place).filter(|landed| landed.has_changed().is_ok()) {
            return Board::Follow(landed.clone());
        }
        let (landed, receiver) = watch::channel(None);
        flights.insert(place, receiver.clone());
        Board::Lead(Flight { flights: self, place, landed, own: receiver })
    }
}

impl Flight<'_> {
    /// Hands what the read found to the followers waiting on it.
    fn land(self, landed: Landed) {
        self.landed.send_replace(Some(landed));
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.0.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(&self.place).is_some_and(|landed| self.own.same_channel(landed)) {
            flights.remove(&self.place);
        }
    }
}

impl Live {
    pub(super) fn new(readers: Option<Readers>, max_block: Duration) -> Self {
        Self { readers, max_block, seen: Mutex::new(HashMap::new()), flights: Flights::default() }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known(&self, lock: u128, record_key: &[u8], fingerprint: &Fingerprint, now: Instant) -> Known {
        let seen = self.seen();
        let Some(seen) = seen.get(&lock).filter(|s| *s.record_key == *record_key && s.fingerprint == *fingerprint)
        else {
            return Known::Unknown;
        };
        match seen.ended {
            Some(completed) => Known::Ended(completed),
            None if now < seen.checked + TRUSTED && now < seen.lease_until => Known::Live(seen.lease_until),
            None => Known::Unknown,
        }
    }

    fn checked(&self, lock: u128, record_key: &[u8], fingerprint: &Fingerprint, now: Instant, lease_left: Duration) {
        let mut seen = self.seen();
        if seen.len() >= MAX_SEEN && !seen.contains_key(&lock) {
            seen.retain(|_, s| s.ended.is_none() && now < s.checked + TRUSTED);
            if seen.len() >= MAX_SEEN {
                return;
            }
        }
        let entry = Seen {
            record_key: record_key.into(),
            fingerprint: *fingerprint,
            checked: now,
            lease_until: now + lease_left,
            ended: None,
        };
        seen.insert(lock, entry);
    }

    fn ended(&self, lock: u128, completed: bool) {
        if let Some(seen) = self.seen().get_mut(&lock) {
            seen.ended = Some(completed);
        }
    }

    fn forget(&self, lock: u128) {
        self.seen().remove(&lock);
    }
}

/// What a check of the cursor's lock found.
enum Checked {
    Ended(bool),
    Live { lease_left: Duration, entries: Vec<Value> },
}

impl RedisStore {
    fn stream_key(&self, record_key: &[u8], lock: u128) -> Vec<u8> {
        slot::stream_key(&self.inner.prefix, record_key, lock)
    }

    /// The key and the stream key of `lock`'s log, for the owner-only scripts.
    pub(super) fn keys(&self, key: &StoreKey, lock: &LockToken) -> (Vec<u8>, Vec<u8>) {
        let record_key = self.redis_key(key);
        let stream = self.stream_key(&record_key, lock.id());
        (record_key, stream)
    }

    pub(super) async fn publish_events(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        let mut entries = events.into_iter().map_while(codec::encode_event).peekable();
        if entries.peek().is_none() {
            return Ok(());
        }
        let (record_key, stream) = self.keys(key, lock);
        let mut invocation = PUBLISH.key(record_key);
        invocation.key(stream).arg(&codec::lock_value(lock)[..]).arg(from);
        for (field, value) in entries {
            invocation.arg(field).arg(&value[..]);
        }
        match self.run(Command::Script(&invocation)).await? {
            // Written; or the lock is gone, or the publish would leave a gap: nothing written.
            Value::Int(0..=2) => Ok(()),
            _ => Err(StoreError::corrupt("unexpected reply to the publish script")),
        }
    }

    pub(super) async fn follow_log(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        let live = &self.inner.live;
        let deadline = Instant::now().checked_add(timeout).unwrap_or_else(far_future);
        let record_key = self.redis_key(key);
        let mut cursor = match cursor {
            Some(cursor) => cursor,
            None => match self.lookup(&record_key, fingerprint).await? {
                Ok(lock) => LiveCursor::new(lock, 0),
                Err(completed) => return Ok(Followed::Ended { completed }),
            },
        };
        let lock = cursor.lock();
        let stream = self.stream_key(&record_key, lock);
        let lock_value = codec::lock_value(&LockToken::from_parts(lock, *fingerprint));
        let mut held: Option<Held<'_>> = None;
        // A follow that may not wait (a zero timeout) still reads once: what a recent check
        // trusts says the lock lives, not that nothing was published since.
        let mut must_read = Instant::now() >= deadline;
        loop {
            let known = match live.known(lock, &record_key, fingerprint, Instant::now()) {
                Known::Live(_) if std::mem::take(&mut must_read) => Known::Unknown,
                known => known,
            };
            let lease_until = match known {
                Known::Ended(completed) => {
                    live.forget(lock);
                    return Ok(Followed::Ended { completed });
                }
                Known::Live(lease_until) => lease_until,
                Known::Unknown => match self.check(&record_key, &stream, &lock_value, cursor).await? {
                    Checked::Ended(completed) => {
                        live.forget(lock);
                        return Ok(Followed::Ended { completed });
                    }
                    Checked::Live { lease_left, entries } => {
                        let now = Instant::now();
                        live.checked(lock, &record_key, fingerprint, now, lease_left);
                        let entries = entries.into_iter().map(codec::decode_entry).collect::<Result<Vec<_>, _>>()?;
                        if let Some(followed) = read(live, entries, &mut cursor)? {
                            return Ok(followed);
                        }
                        now + lease_left
                    }
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(Followed::Live { events: Vec::new(), cursor });
            }
            let block_until = deadline.min(lease_until).min(now + live.max_block);
            let Some(readers) = &live.readers else {
                tokio::time::sleep_until(block_until.min(now + POLL_INTERVAL)).await;
                live.forget(lock);
                continue;
            };
            let landed = match live.flights.board(lock, cursor.read()) {
                Board::Follow(mut landed) => {
                    // Another follower reads at this place: no connection of our own meanwhile.
                    held = None;
                    match tokio::time::timeout_at(deadline, landed.wait_for(Option::is_some)).await {
                        Err(_) => return Ok(Followed::Live { events: Vec::new(), cursor }),
                        Ok(Ok(landed)) => landed.clone().unwrap_or(Landed::Nothing),
                        // It gave up before reading: one of its followers reads instead.
                        Ok(Err(_)) => continue,
                    }
                }
                Board::Lead(flight) => {
                    if held.is_none() {
                        held = readers.try_take();
                        if held.is_none() {
                            // All in use: wait for one, then check again before reading (what
                            // the check saw may be old by then). The place stays ours meanwhile.
                            held = readers.take_until(block_until).await;
                            live.forget(lock);
                            continue;
                        }
                    }
                    let Some(reader) = held.as_mut() else { unreachable!("taken above") };
                    let block = block_until.saturating_duration_since(now);
                    let command = xread(&stream, cursor.read(), block);
                    let reply = tokio::time::timeout(block + self.inner.operation_timeout, reader.read(&command)).await;
                    let landed = match reply.map_err(|_| StoreError::timeout()).and_then(|r| r.map_err(store_error)) {
                        Ok(Value::Nil) => Landed::Nothing,
                        Ok(reply) => match stream_entries(reply)
                            .and_then(|entries| entries.into_iter().map(codec::decode_entry).collect())
                        {
                            Ok(entries) => Landed::Entries(entries),
                            Err(error) => Landed::Failed(Arc::new(error)),
                        },
                        Err(error) => Landed::Failed(Arc::new(error)),
                    };
                    flight.land(landed.clone());
                    landed
                }
            };
            match landed {
                Landed::Nothing => {
                    if Instant::now() >= deadline {
                        return Ok(Followed::Live { events: Vec::new(), cursor });
                    }
                    // The lease seen, or the block limit, ran out: check the lock again.
                    live.forget(lock);
                }
                Landed::Entries(entries) => {
                    if let Some(followed) = read(live, entries.iter().cloned(), &mut cursor)? {
                        return Ok(followed);
                    }
                }
                Landed::Failed(error) => return Err(error.duplicate()),
            }
        }
    }

    /// The lock a follower with no cursor follows: `Ok(lock id)`, or `Err(completed)` when
    /// the key holds no lock for `fingerprint`.
    async fn lookup(&self, record_key: &[u8], fingerprint: &Fingerprint) -> Result<Result<u128, bool>, StoreError> {
        let mut invocation = LOOKUP.key(record_key);
        invocation.arg(fingerprint.as_bytes());
        let Value::Array(reply) = self.run(Command::Script(&invocation)).await? else {
            return Err(StoreError::corrupt("unexpected reply to the lookup script"));
        };
        match reply.as_slice() {
            [Value::Int(0)] => Ok(Err(false)),
            [Value::Int(1)] => Ok(Err(true)),
            [Value::Int(2), Value::BulkString(token)] => match <[u8; 16]>::try_from(token.as_slice()) {
                Ok(token) => Ok(Ok(u128::from_be_bytes(token))),
                Err(_) => Err(StoreError::corrupt("a lock token of the wrong length")),
            },
            _ => Err(StoreError::corrupt("unexpected reply to the lookup script")),
        }
    }

    async fn check(
        &self,
        record_key: &[u8],
        stream: &[u8],
        lock_value: &[u8],
        cursor: LiveCursor,
    ) -> Result<Checked, StoreError> {
        let mut invocation = FOLLOW.key(record_key);
        let first = format!("1-{}", cursor.read().saturating_add(1));
        invocation.key(stream).arg(lock_value).arg(first).arg(READ_COUNT);
        let Value::Array(reply) = self.run(Command::Script(&invocation)).await? else {
            return Err(StoreError::corrupt("unexpected reply to the follow script"));
        };
        let mut reply = reply.into_iter();
        match (reply.next(), reply.next(), reply.next()) {
            (Some(Value::Int(0)), None, None) => Ok(Checked::Ended(false)),
            (Some(Value::Int(1)), None, None) => Ok(Checked::Ended(true)),
            (Some(Value::Int(2)), Some(Value::Int(left)), Some(Value::Array(entries))) => {
                // A lock always has an expiry; one without (`-1`, a key changed by hand) is
                // read at the block limit.
                let lease_left = u64::try_from(left).map_or(self.inner.live.max_block, Duration::from_millis);
                Ok(Checked::Live { lease_left, entries })
            }
            _ => Err(StoreError::corrupt("unexpected reply to the follow script")),
        }
    }
}

/// `XREAD COUNT n BLOCK ms STREAMS stream 1-read`: the entries after the first `read` events,
/// waiting up to `block` (at least 1 ms: `BLOCK 0` would wait forever) for one.
fn xread(stream: &[u8], read: u64, block: Duration) -> Cmd {
    let mut command = ::redis::cmd("XREAD");
    command.arg("COUNT").arg(READ_COUNT).arg("BLOCK").arg(millis(block));
    command.arg("STREAMS").arg(stream).arg(format!("1-{read}"));
    command
}

/// The entries of the one stream an `XREAD` reply holds (RESP2: `[[key, entries]]`, RESP3:
/// `{key: entries}`).
fn stream_entries(reply: Value) -> Result<Vec<Value>, StoreError> {
    let streams = match reply {
        Value::Array(streams) => streams.into_iter().next().and_then(|stream| match stream {
            Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
            _ => None,
        }),
        Value::Map(streams) => streams.into_iter().next().map(|(_, entries)| entries),
        _ => None,
    };
    match streams {
        Some(Value::Array(entries)) => Ok(entries),
        _ => Err(StoreError::corrupt("unexpected reply to XREAD")),
    }
}

/// What the entries after `cursor` give a follower: the events (the cursor moved past them),
/// or the end; `None` when there is nothing new.
fn read(
    live: &Live,
    entries: impl IntoIterator<Item = Entry>,
    cursor: &mut LiveCursor,
) -> Result<Option<Followed>, StoreError> {
    let mut events = Vec::new();
    let mut ended = None;
    for entry in entries {
        match entry {
            Entry::Open => {}
            Entry::Event(index, event) if index == cursor.read() + events.len() as u64 => events.push(event),
            Entry::Event(..) => return Err(StoreError::corrupt("a live log with a gap")),
            Entry::End(completed) => {
                ended = Some(completed);
                break;
            }
        }
    }
    if events.is_empty() {
        return Ok(ended.map(|completed| {
            live.forget(cursor.lock());
            Followed::Ended { completed }
        }));
    }
    if let Some(completed) = ended {
        // The end is for the next follow.
        live.ended(cursor.lock(), completed);
    }
    *cursor = LiveCursor::new(cursor.lock(), cursor.read() + events.len() as u64);
    Ok(Some(Followed::Live { events, cursor: *cursor }))
}

/// A deadline past any timeout a caller means.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

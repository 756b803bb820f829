//! Join mode in PostgreSQL: `publish` appends to the live log table, `follow` reads it and
//! waits for the [`Listener`]'s notifications.
//!
//! - `mod.rs`: the two operations;
//! - `listener.rs`: the store's listening connection and its followers;
//! - `event.rs`: events as a row of the log holds them.
//!
//! A follower's wait is cut short by a notification for its key (a publish, a completion, a
//! release), by the end of the lock's lease as its last read saw it (a lease that runs out
//! sends nothing: the follower reads again then, and finds it renewed or gone), and at the
//! latest by the store's [follow recheck](super::PostgresStoreBuilder::with_follow_recheck)
//! (a notification lost on a connection that died without a sign). Each of them costs one
//! read; nothing reads on a timer of its own.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Row, postgres::PgRow};
use tokio::time::Instant;

use super::{PostgresStore, scope_bytes, sql::followed, store_error};
use crate::store::{Fingerprint, Followed, LiveCursor, LiveEvent, LockToken, StoreError, StoreKey};

mod event;
mod listener;

pub(crate) use listener::Listener;
use listener::{KeyId, Memo};

/// How long after the end of a lease, as PostgreSQL counted it at the last read, a follower
/// reads again (the time the read took to come back is in the margin).
const LEASE_MARGIN: Duration = Duration::from_millis(5);

/// The id of `key` in the live log and in notifications: the first 16 bytes of
/// SHA-256(scope || 0x00 || key). The reaper computes the same in SQL (`sql.rs`).
pub(crate) fn key_id(key: &StoreKey) -> KeyId {
    let mut digest = Sha256::new();
    digest.update(scope_bytes(key));
    digest.update([0]);
    digest.update(key.key().as_str().as_bytes());
    let mut id = [0; 16];
    id.copy_from_slice(&digest.finalize()[..16]);
    id
}

/// What one read of the log found.
enum Read {
    Live {
        token: u128,
        /// Whether the lock was marked followed before this read (else this read marked it).
        followed: bool,
        /// What was left of the lease.
        left: Duration,
        events: Vec<LiveEvent>,
    },
    Ended {
        completed: bool,
    },
}

impl PostgresStore {
    /// [`LiveLog::publish`](crate::store::LiveLog::publish): one statement.
    pub(super) async fn publish_events(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let Some(encoded) = events.iter().map(event::encode).collect::<Option<Vec<_>>>() else {
            // Its record cannot be kept either: followers wait for the end of the lock.
            tracing::debug!("idempotency: a live head too large to encode is not published");
            return Ok(());
        };
        let from = i64::try_from(from).map_err(|_| StoreError::corrupt("a live event index past i64"))?;
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.publish.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&lock.id().to_be_bytes()[..])
            .bind(&key_id(key)[..])
            .bind(from)
            .bind(encoded);
        self.run(async { query.fetch_one(&self.inner.pool).await.map_err(store_error) }).await?;
        Ok(())
    }

    /// [`LiveLog::follow`](crate::store::LiveLog::follow): reads, and while
    /// there is nothing new, waits to be woken and reads again, until `timeout`.
    pub(super) async fn follow_log(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        mut cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        let until = Instant::now().checked_add(timeout).unwrap_or_else(far_future);
        let id = key_id(key);
        let listener = &self.inner.listener;
        // Subscribed before the first read and listening, so that what commits after the read
        // wakes this follower.
        let subscription = listener.subscribe(id);
        listener.listening(self.inner.operation_timeout).await?;
        let mut read_again = true;
        let mut first = true;
        loop {
            let changed = subscription.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Left by the follow that returned at `cursor`, if nothing was notified since its
            // read and its lease still runs: nothing new is known, so wait at once (anything
            // committed since wakes us).
            let memo = if std::mem::take(&mut first) {
                cursor.and_then(|cursor| subscription.memo(cursor)).filter(|memo| memo.lease_end > Instant::now())
            } else {
                None
            };
            let (here, lease_end) = match memo {
                Some(memo) => (memo.cursor, memo.lease_end),
                None => {
                    let seen = subscription.seen();
                    let (token, followed, left, events) = match self.read_log(key, fingerprint, cursor, &id).await? {
                        Read::Ended { completed } => return Ok(Followed::Ended { completed }),
                        Read::Live { token, followed, left, events } => (token, followed, left, events),
                    };
                    // Counted from before the read: the lease may have been shorter by the time it took.
                    let lease_end = Instant::now() + left;
                    let here = LiveCursor::new(token, cursor.map_or(0, |cursor| cursor.read()));
                    if !events.is_empty() {
                        let cursor = LiveCursor::new(token, here.read() + events.len() as u64);
                        if followed {
                            subscription.remember(Memo { cursor, seen, lease_end });
                        }
                        return Ok(Followed::Live { events, cursor });
                    }
                    if !followed && std::mem::take(&mut read_again) && Instant::now() < until {
                        // This read marked the lock followed: a publish that committed after its
                        // snapshot, before the mark, did not notify (see `sql.rs`).
                        cursor = Some(here);
                        continue;
                    }
                    (here, lease_end)
                }
            };
            cursor = Some(here);
            if let Some(completed) = subscription.ended(here.lock()) {
                return Ok(Followed::Ended { completed });
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Followed::Live { events: Vec::new(), cursor: here });
            }
            let wake = until.min(lease_end + LEASE_MARGIN).min(now + self.inner.follow_recheck);
            tokio::select! {
                () = &mut changed => {
                    if let Some(completed) = subscription.ended(here.lock()) {
                        return Ok(Followed::Ended { completed });
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if wake >= until {
                        return Ok(Followed::Live { events: Vec::new(), cursor: here });
                    }
                }
            }
        }
    }

    /// One read of the log after `cursor` (one statement; it marks the lock followed).
    async fn read_log(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        id: &KeyId,
    ) -> Result<Read, StoreError> {
        let token = cursor.map(|cursor| cursor.lock().to_be_bytes());
        let read = cursor.map_or(0, |cursor| cursor.read());
        let at = i64::try_from(read).map_err(|_| StoreError::corrupt("a live cursor past i64"))?;
        let query = sqlx::query(AssertSqlSafe(self.inner.statements.follow.clone()))
            .bind(scope_bytes(key))
            .bind(key.key().as_str())
            .bind(&fingerprint.as_bytes()[..])
            .bind(token.as_ref().map(|token| &token[..]))
            .bind(at)
            .bind(&id[..]);
        let row = self.run(async { query.fetch_one(&self.inner.pool).await.map_err(store_error) }).await?;
        decode_read(&row, at)
    }
}

/// What the read's row says; `at`: the index its events start at.
fn decode_read(row: &PgRow, at: i64) -> Result<Read, StoreError> {
    let corrupt = |error: sqlx::Error| StoreError::corrupt(error);
    match row.try_get::<i32, _>("state").map_err(corrupt)? {
        followed::COMPLETED => return Ok(Read::Ended { completed: true }),
        followed::GONE => return Ok(Read::Ended { completed: false }),
        followed::LIVE => {}
        _ => return Err(StoreError::corrupt("PostgreSQL live row: unknown state")),
    }
    let token: Vec<u8> = row.try_get("token").map_err(corrupt)?;
    let token =
        <[u8; 16]>::try_from(token).map_err(|_| StoreError::corrupt("PostgreSQL row: a token not of 16 bytes"))?;
    let followed: bool = row.try_get("followed").map_err(corrupt)?;
    let left: i64 = row.try_get("left_us").map_err(corrupt)?;
    let rows: Option<Vec<Vec<u8>>> = row.try_get("events").map_err(corrupt)?;
    let first: Option<i64> = row.try_get("first").map_err(corrupt)?;
    let held: Option<i64> = row.try_get("n").map_err(corrupt)?;
    let mut events = Vec::new();
    if let (Some(rows), Some(first), Some(held)) = (rows, first, held) {
        // The first row may start before the cursor: skip what the follower has read.
        let skip = usize::try_from(at - first)
            .map_err(|_| StoreError::corrupt("PostgreSQL live log: a gap after the cursor"))?;
        for row in rows {
            event::decode_row(row, &mut events)
                .map_err(|error| StoreError::corrupt(format!("PostgreSQL live row: {error}")))?;
        }
        if i64::try_from(events.len()) != Ok(held) || skip > events.len() {
            return Err(StoreError::corrupt("PostgreSQL live row: not the events it counts"));
        }
        events.drain(..skip);
    }
    Ok(Read::Live {
        token: u128::from_be_bytes(token),
        followed,
        left: Duration::from_micros(left.max(0).unsigned_abs()),
        events,
    })
}

/// A deadline no wait reaches (`Instant + Duration` would overflow).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdempotencyKey, ScopeId};

    #[test]
    fn key_ids_differ_by_scope_and_key() {
        let key = |k: &[u8], scope| StoreKey::new(scope, IdempotencyKey::parse(k).unwrap());
        let a = key_id(&key(b"a", None));
        assert_eq!(a, key_id(&key(b"a", None)));
        assert_ne!(a, key_id(&key(b"b", None)));
        assert_ne!(a, key_id(&key(b"a", Some(ScopeId::digest("x")))));
        // SHA-256("\0a"), as the reaper computes it in SQL.
        let digest = Sha256::digest(b"\0a");
        assert_eq!(a[..], digest[..16]);
    }
}

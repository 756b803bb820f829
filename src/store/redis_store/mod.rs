//! The Redis store: many replicas sharing keys.
//!
//! - `mod.rs`: [`RedisStore`], its contract (layouts, round trips, failure) and the trait;
//! - `builder.rs`: [`RedisStoreBuilder`];
//! - `connection.rs`: the connection an operation goes out on, and sending one command;
//! - `scripts.rs`: the Lua script of each operation;
//! - `codec.rs`: the values it keeps (lock, record, not-retained record, live log entries);
//! - `live.rs`: `publish` and `follow` (a lock's live log, and how a follower waits for it);
//! - `readers.rs`: the dedicated connections of blocking reads;
//! - `slot.rs`: Cluster slots, and the name of a live log's stream in its lock key's slot.

use std::{fmt, sync::Arc, time::Duration};

use ::redis::{Pipeline, RedisError, Value};

use super::{
    Begin, Completed, IdempotencyStore, Inspect, KeyState, LiveLog, LockToken, Locked, Purged, StoreError, StoreKey,
};
use crate::store::{Fingerprint, Followed, LiveCursor, LiveEvent, Record};

mod builder;
mod codec;
mod connection;
mod live;
mod readers;
mod scripts;
mod slot;

pub use builder::{RedisConnection, RedisStoreBuilder};
use connection::{Command, Connection, Handle, store_error};
use live::{ENDED_TTL, Live};
use scripts::{BEGIN, COMPLETE, INSPECT, PURGE, RELEASE, RENEW};

/// The longest lease or TTL sent to Redis, in ms (about 31 700 years): Redis rejects an
/// expiry past `i64::MAX` ms from now.
const MAX_EXPIRY_MS: u64 = 1_000_000_000_000_000;

/// An [`IdempotencyStore`] in Redis, for many replicas sharing keys.
///
/// Every operation is one round trip running one Lua script, so it is atomic, and works
/// unchanged on a single node and on Redis Cluster: `begin` touches one Redis key, the others
/// that key and its lock's live log, kept in the same Cluster slot. Locks, records and live
/// logs expire by Redis key expiry (`PX`), so nothing sweeps and an abandoned lock frees
/// itself, and its live log, after one lease.
///
/// # Building one
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::store::{RedisStore, redis};
///
/// # async fn run() -> Result<(), tower_idempotency::store::redis::RedisError> {
/// // Connects now: fails when Redis is down.
/// let store = RedisStore::builder().connect("redis://127.0.0.1:6379").await?;
///
/// // Connects on first use: a service started while Redis is down starts anyway, answers
/// // `503` while Redis stays down and recovers by itself once Redis is back.
/// let store = RedisStore::builder()
///     .with_prefix("orders-api:idem:")
///     .with_operation_timeout(Duration::from_millis(500))
///     .build(redis::Client::open("redis://127.0.0.1:6379")?);
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
///
/// The connection is a multiplexed [`ConnectionManager`](::redis::aio::ConnectionManager): one TCP connection shared by every
/// request of the process, reconnected by itself after a failure. Use the
/// [re-exported `redis` crate](crate::store::redis) to build a [`Client`](::redis::Client) or a manager of your
/// own (TLS, ACL users, RESP3), so the versions match. Followers of in-flight requests (join
/// and wait mode) also open [dedicated connections](#live-logs-join-and-wait-mode) from the
/// same client, up to a bound.
///
/// # Redis Cluster
///
/// With the `redis-cluster` feature (which turns on the `redis` crate's `cluster-async`; a
/// separate feature so that single-node users do not build the cluster client), build the
/// store with [`connect_cluster`](RedisStoreBuilder::connect_cluster) from one or more node
/// URLs, or [`build`](RedisStoreBuilder::build) on a `ClusterClient` (connects on first use)
/// or a `ClusterConnection` of yours. The
/// keys, values and scripts are the same: each operation touches one key, or one key and its
/// lock's live log, whose stream key carries a hash tag chosen to land in that key's slot (see
/// [the key layout](#key-layout)); so each goes to the node that owns the key's slot, and keys
/// spread over all slots. A follower's blocking read goes to that node too, on a dedicated
/// cluster connection.
///
/// # Failure
///
/// Every operation, waiting for a connection included, is bounded by the
/// [command timeout](RedisStoreBuilder::with_operation_timeout) (default 1 s). Past it the operation
/// fails with [`StoreError::is_timeout`]; a refused or broken connection or an error reply
/// fails with [`StoreError::is_unavailable`]; a value this crate cannot read fails with
/// [`StoreError::is_corrupt`]. The layer answers all three as configured by its store failure
/// mode (by default `503` with `Retry-After`). While Redis refuses connections each operation
/// makes one fresh connection attempt, so the first request after Redis is back succeeds.
/// While Redis accepts connections and never answers, a connection this store made ends each
/// attempt a tenth before the command timeout (failing as a timeout), and each operation
/// waits for an attempt: the one under way, which may fail before the operation's own timeout,
/// or a fresh one, never only the failure of one that ended before it began.
///
/// A timed-out operation may still have run in Redis. A `begin` that locked the key leaves it
/// in flight until its lease ends (retries get `409`, the handler never runs twice); a
/// `complete` that wrote the record makes retries replay it. A late answer is discarded,
/// never taken for the answer to a later command.
///
/// # Key layout
///
/// ```text
/// {prefix}{scope}:{key}          a lock or record   e.g. idem:-:3f2a1c9e-order-77
/// {prefix}{TAG}live:{lock id}    a lock's live log  e.g. idem:{27921}live:5f0e…0001 (a lock on it)
/// {prefix}{TAG}expired:{scope}:{key}   an expired mark   e.g. idem:{4113}expired:-:3f2a1c9e-order-77
/// ```
///
/// The expired mark (`1`) exists only with a grace for expired keys
/// ([`IdempotencyLayer::with_expired_grace`](crate::IdempotencyLayer::with_expired_grace)):
/// `complete` writes it with the record, for the TTL and the grace, in the record key's slot
/// (the same `TAG` rule), and a `begin` that finds no record but the mark answers that the key
/// expired. Its cost: a key of a few bytes per record, for the grace; every `begin` of a free
/// key looks for it (one `EXISTS` inside the script).
///
/// - `prefix`: [`RedisStoreBuilder::with_prefix`], default `idem:`;
/// - `scope`: the [`ScopeId`](crate::ScopeId) as 64 lowercase hex digits, or `-` for the
///   unscoped namespace;
/// - `key`: the idempotency key as sent (1 to 255 visible ASCII bytes);
/// - `lock id`: the [`LockToken::id`] of the lock whose log it is, 32 lowercase hex digits;
/// - `TAG`: a hash tag that puts the stream in the Cluster slot of the lock's key: for slot
///   `s`, the smallest number, in decimal, whose CRC16 (the one Cluster hashes keys with) falls
///   in `s` (at most 6 digits; the table of all 16 384 is made once per process, in a few ms).
///   With a prefix holding a `{` that opens no tag of its own (`a{b`, `{}`), the tag goes first
///   instead: `{TAG}{prefix}live:{lock id}`.
///
/// The scope part has a fixed form, so the first `:` after it ends it and no two (scope, key)
/// pairs share a Redis key, and no record key is ever a stream's (`{` never follows the prefix
/// in one). The record key has no `{hash tag}` of ours, so keys spread over the Cluster slots.
/// (A client key that itself contains `{...}` becomes a hash tag and only pins that client's
/// keys to one slot; its live logs follow it there.) Use a prefix per service, or per
/// environment, when several share one Redis.
///
/// # Value layout
///
/// One Redis string per key, binary (no base64, no JSON escaping of the body):
///
/// ```text
/// offset  bytes  field
/// 0       1      tag: 'L' lock | 'R' response | 'T' not-retained record
/// 1       32     fingerprint of the request that locked or completed the key
/// ---- lock: 49 bytes in all
/// 33      16     lock token id, big-endian
/// ---- not-retained record: 33 bytes in all
/// ---- response:
/// 33      2      status, big-endian u16
/// 35      2      header field count N, big-endian u16
///         N x    name length (u16 BE), name, value length (u32 BE), value
///         1      trailers: 0 none, 1 present, then a count and fields as for the headers
///         rest   the body, raw, to the end of the value
/// ```
///
/// The scripts read only the first 33 bytes (`begin`: tag and fingerprint) or 49 bytes
/// (`complete`, `renew`, `release`: the whole lock value, so only the owner's token matches)
/// of a held value; they never parse a response. The client decodes a replayed response
/// once, and its body is a slice of the reply buffer, not a copy. A value that does not
/// decode, or that this crate did not write, is [`StoreError::is_corrupt`] (and is left as it
/// is). The tag doubles as a layout version: a later layout gets new tags.
///
/// A live log is a Redis stream with one entry per event (one field each; the id says where):
///
/// ```text
/// id        field  value
/// 0-1       o      (empty) opened by a follower before anything was published
/// 1-(i+1)   h      event i, the head: status and headers, laid out as in a response above
///                  (status, field count, fields, flags byte 0), no body
/// 1-(i+1)   d      event i, body bytes, raw
/// 1-(i+1)   e      event i, the end of a text/event-stream event: its id, raw
/// 2-0       c      the end: 1 when a record replaced the lock, 0 when it was released
/// ```
///
/// # Memory per record
///
/// A record costs its body and its header names and values, plus 38 bytes of layout and 6
/// per header field, plus the Redis key, plus Redis's own bookkeeping for a string key with an
/// expiry. Measured with `MEMORY USAGE` on Redis 7.0 (64-bit, jemalloc), default prefix, a
/// 36-byte key (a UUID), a response with one header (`content-type: application/json`), by
/// the test `memory_per_record_is_as_documented`:
///
/// | key | lock | not-retained record | record, empty body | record, 10 000-byte body |
/// | --- | --- | --- | --- | --- |
/// | unscoped (43-byte Redis key) | 152 B | 136 B | 168 B | 10 328 B |
/// | scoped (106-byte Redis key) | 216 B | 200 B | 232 B | 10 392 B |
///
/// So beyond its body and headers a record costs about **140 B unscoped, 205 B scoped** (the
/// scope is 64 hex digits of key), plus 6 B per further header field. Redis also rounds the
/// value up to the allocator's next size class, up to a quarter more (a 1 000-byte body
/// costs 1 368 B in all, a 100 000-byte body 114 776 B).
///
/// A live log costs about 4.7 KB (a stream's first node, as `MEMORY USAGE` reports it on
/// Redis 7.0) plus about its body bytes (100 events of 100 bytes: 13.7 KB in all), for the
/// lease and 5 s after its end. Only locks that publish (join mode) or are followed have one.
///
/// Bound Redis memory with `maxmemory`. Under `noeviction` (recommended) a full Redis refuses
/// new locks and the layer answers `503`; an evicting policy may drop a live lock (a retry
/// then runs while the first is still running) or a record (a retry runs again).
///
/// # Round trips
///
/// | request | round trips |
/// | --- | --- |
/// | first with a key (miss) | 2: `begin` + `complete` (or `release` when not recorded) |
/// | replay, in flight, mismatch | 1: `begin` |
/// | slow handler | + 1 `renew` per lease/3 while it runs |
/// | join mode, the first request | + 1 `publish` per batch of events (the layer keeps one under way) |
/// | a duplicate waiting 30 s (defaults) | 7 in all, then its `begin`s |
/// | a duplicate joined to a stream of N publishes | N + 1, plus a check per 2 s |
///
/// `complete`, `renew`, `release` and `publish` (whatever its number of events) are one
/// `EVALSHA` each. `begin` is `MULTI`, `EVALSHA`, `GET`, `EXEC`, written and answered at once:
/// the script decides (and locks), the `GET` in the same transaction returns a completed
/// record's bytes. So a replayed body never passes
/// through Lua, where a large string costs Redis several times a plain `GET` (measured on
/// Redis 7.0: a 64 KiB record returned by the script took 135 µs, by the `GET` 30 µs).
/// `complete` does hand the record to Lua, once per key: a response near the 1 MiB default
/// record limit costs Redis about 2–3 ms of CPU to store.
///
/// The waiting and joining figures were counted by Redis (`INFO commandstats` on a server of
/// the test's own, tests `redis_live::a_30_s_wait_with_the_defaults` and
/// `redis_live::a_joined_10_s_stream`): a 30 s wait on a lock renewed every 10 s made 7 (the
/// lookup, 3 checks, 3 blocking reads), where polling `begin` every 100 ms made about 300; a
/// follower of a 10 s stream of 100 events, one publish each, made 107 (the lookup, 5 checks,
/// 101 blocking reads, the last woken by the end). See [live logs](#live-logs-join-and-wait-mode).
///
/// The first time a script meets a Redis server (or after a restart or `SCRIPT FLUSH`) Redis
/// answers `NOSCRIPT`, and the store loads the script and sends the command again: two more
/// round trips, once per script and server.
///
/// # Live logs (join and wait mode)
///
/// A lock's response in flight is kept in a Redis stream of its own (see
/// [the key layout](#key-layout)), so a duplicate on any replica can follow it:
///
/// - **`publish`** runs one script: while the caller holds the lock, it appends the events
///   whose indices the stream lacks (a publish sent again appends nothing twice; one that would
///   leave a gap appends nothing) and sets the stream's expiry to the lock's. A stale owner's
///   publish writes nothing.
/// - **`complete`** and **`release`** append the end marker (`2-0`) in the same script that
///   changes the lock, if the stream exists, and keep the ended stream 5 s, so a follower
///   blocked on it wakes at once and a late one still finds the end. A lock nobody published
///   to or followed gets no stream. **`renew`** extends the stream with the lock.
/// - **`follow`** with no cursor first looks the lock up (one script). Then one script checks
///   that the key still holds the cursor's lock for the fingerprint, returns the entries after
///   the cursor and the lease left, and makes the stream if it is missing (so that the end is
///   written to it). With nothing new, the follower waits in `XREAD BLOCK` from its cursor, on a
///   dedicated connection, until a publish or the end wakes it, its timeout passes, the lease
///   it saw runs out (a crashed owner's log ends with its lease: the next check finds the lock
///   gone), or the [block limit](RedisStoreBuilder::with_max_block) (default 10 s) passes;
///   then it checks again. A follower that checked within 2 s reads with `XREAD` alone, so
///   following a stream costs one round trip per wake-up.
///
/// The dedicated connections: a blocking read never goes out on the shared connection, which
/// every other operation needs meanwhile. The store opens them from its client (the URL's, the
/// `Client` or `ClusterClient` it was built on, or the one given to
/// [`with_blocking_client`](RedisStoreBuilder::with_blocking_client)), at most
/// [32](RedisStoreBuilder::with_max_blocking_connections) at once, and keeps them open, idle,
/// for the next follower. The followers of one log at one cursor share one blocking read: the
/// first sends it, and each takes what it finds, so a key's duplicates hold one connection
/// however many they are (64 duplicates waiting on one slow request leave a joined stream on
/// another key within a few ms of its pace: test `a_slow_key_does_not_delay_a_joined_stream_on_another`).
/// A follower that finds them all in use waits for one, then checks before reading. One cancelled in the middle of a read closes its connection (which ends the
/// read in Redis) instead of giving it back. A store built on a connection of yours with no
/// client ([`build`](RedisStoreBuilder::build) on a `ConnectionManager` or a
/// `ClusterConnection`) has no
/// dedicated connections: its followers check every 100 ms instead (about 10 round trips a
/// second each), and `Debug` says so.
///
/// A follower that checks only after the log ended learns of the end, not of the events it had
/// not read: the record holds them.
///
/// # Consistency
///
/// Scripts and transactions run alone on a Redis node, so each operation is atomic: of
/// concurrent `begin`s on a free key exactly one locks it, whichever replica sends it. Redis
/// replication is asynchronous, so a failover can lose a lock or record written just before
/// it (a retry may then run again).
///
/// Cloning is cheap; clones share the connection and the dedicated ones.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    prefix: Box<[u8]>,
    operation_timeout: Duration,
    live: Live,
}

impl RedisStore {
    /// The Redis key of `key`: `{prefix}{scope hex or -}:{key}`.
    fn redis_key(&self, key: &StoreKey) -> Vec<u8> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let prefix = &self.inner.prefix;
        let text = key.key().as_str().as_bytes();
        let mut out = Vec::with_capacity(prefix.len() + 65 + text.len());
        out.extend_from_slice(prefix);
        match key.scope() {
            Some(scope) => {
                for byte in scope.as_bytes() {
                    out.extend_from_slice(&[HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]]);
                }
            }
            None => out.push(b'-'),
        }
        out.push(b':');
        out.extend_from_slice(text);
        out
    }

    /// Sends `command` within the command timeout.
    async fn run(&self, command: Command<'_>) -> Result<Value, StoreError> {
        let started = tokio::time::Instant::now();
        let unsent = |error: &RedisError| self.inner.unsent(error, started.elapsed());
        let attempt = async {
            let reply = match self.inner.handle().await? {
                Handle::Single(mut connection) => command.send_retrying(&mut connection, unsent).await,
                #[cfg(feature = "redis-cluster")]
                Handle::Cluster(mut connection) => command.send_retrying(&mut connection, unsent).await,
            };
            reply.map_err(store_error)
        };
        tokio::time::timeout(self.inner.operation_timeout, attempt).await.unwrap_or_else(|_| Err(StoreError::timeout()))
    }
}

/// The answer of an owner-only script: 1 when it changed the key, 0 when the caller no longer
/// holds the lock.
fn written(reply: Value) -> Result<bool, StoreError> {
    match reply {
        Value::Int(changed) => Ok(changed == 1),
        _ => Err(StoreError::corrupt("unexpected reply to an owner-only script")),
    }
}

/// A duration as whole ms for `PX` / `PEXPIRE`: rounded up, at least 1 (Redis rejects 0).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX).clamp(1, MAX_EXPIRY_MS)
}

impl IdempotencyStore for RedisStore {
    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        let token = LockToken::new(*fingerprint);
        let key = self.redis_key(key);
        let lock = codec::lock_value(&token);
        let mut transaction = Pipeline::new();
        // Errors come back as values, so that `NOSCRIPT` can be told apart.
        transaction.atomic().ignore_errors();
        let mark = slot::mark_key(&self.inner.prefix, &key);
        transaction.cmd("EVALSHA").arg(BEGIN.get_hash()).arg(2).arg(&key).arg(&mark).arg(&lock[..]).arg(millis(lease));
        transaction.cmd("GET").arg(&key);
        let replies = match self.run(Command::Begin(&transaction)).await? {
            Value::Array(replies) => replies,
            _ => return Err(StoreError::corrupt("unexpected reply to the begin transaction")),
        };
        match <[Value; 2]>::try_from(replies) {
            Ok([Value::Int(0), _]) => Ok(Begin::Execute(token)),
            Ok([Value::Int(1), _]) => Ok(Begin::Mismatch),
            Ok([Value::Int(2), _]) => Ok(Begin::Locked),
            Ok([Value::Int(3), Value::BulkString(value)]) => codec::decode_record(value).map(Begin::Completed),
            Ok([Value::Int(4), _]) => Err(StoreError::corrupt("the key holds a value this crate did not write")),
            Ok([Value::Int(5), _]) => Ok(Begin::Expired),
            Ok([Value::ServerError(error), _]) => Err(StoreError::unavailable(RedisError::from(error))),
            _ => Err(StoreError::corrupt("unexpected reply to the begin transaction")),
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let value = codec::encode_record(lock.fingerprint(), &record);
        let (key, stream) = self.keys(key, lock);
        let mut invocation = COMPLETE.key(key);
        invocation.key(stream).arg(&codec::lock_value(lock)[..]).arg(value).arg(millis(ttl)).arg(millis(ENDED_TTL));
        written(self.run(Command::Script(&invocation)).await?)
    }

    /// The record key expires at the TTL as without a grace; a second key of a few bytes, the
    /// mark (`1`, in the record key's Cluster slot), is kept for the TTL and the grace.
    async fn complete_with_grace(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Duration,
    ) -> Result<bool, StoreError> {
        let value = codec::encode_record(lock.fingerprint(), &record);
        let (key, stream) = self.keys(key, lock);
        let mark = slot::mark_key(&self.inner.prefix, &key);
        let mut invocation = COMPLETE.key(key);
        invocation.key(stream).key(mark).arg(&codec::lock_value(lock)[..]).arg(value).arg(millis(ttl));
        invocation.arg(millis(ENDED_TTL)).arg(millis(grace));
        written(self.run(Command::Script(&invocation)).await?)
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        let (key, stream) = self.keys(key, lock);
        let mut invocation = RENEW.key(key);
        invocation.key(stream).arg(&codec::lock_value(lock)[..]).arg(millis(lease));
        written(self.run(Command::Script(&invocation)).await?)
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        let (key, stream) = self.keys(key, lock);
        let mut invocation = RELEASE.key(key);
        invocation.key(stream).arg(&codec::lock_value(lock)[..]).arg(millis(ENDED_TTL));
        written(self.run(Command::Script(&invocation)).await?)
    }
}

/// A lock's lease and a record's TTL are Redis key expiry: `inspect` reads the time left
/// (`PTTL`) and adds it to this process's clock.
impl Inspect for RedisStore {
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let invocation = INSPECT.key(self.redis_key(key));
        let reply = self.run(Command::Script(&invocation)).await?;
        let Value::Array(reply) = reply else { return Err(StoreError::corrupt("unexpected reply to inspect")) };
        let (ttl, value) = match <[Value; 2]>::try_from(reply) {
            Ok([Value::Int(ttl), Value::BulkString(value)]) => (ttl, value),
            Err(empty) if empty.is_empty() => return Ok(KeyState::Unknown),
            _ => return Err(StoreError::corrupt("unexpected reply to inspect")),
        };
        // `-1`: no expiry, which this crate never writes; shown as the longest it would.
        let left = Duration::from_millis(u64::try_from(ttl).unwrap_or(MAX_EXPIRY_MS));
        let until = std::time::SystemTime::now().checked_add(left).unwrap_or(std::time::SystemTime::now());
        match value.first() {
            Some(&codec::LOCK) => Ok(KeyState::Locked(Locked::new(&codec::decode_lock(&value)?, until))),
            _ => Ok(KeyState::Completed(Completed::new(codec::decode_record(value)?, until))),
        }
    }

    async fn purge(&self, key: &StoreKey) -> Result<Purged, StoreError> {
        let invocation = PURGE.key(self.redis_key(key));
        match self.run(Command::Script(&invocation)).await? {
            Value::Int(0) => Ok(Purged::Unknown),
            Value::Int(1) => Ok(Purged::Removed),
            Value::Int(2) => Ok(Purged::Locked),
            Value::Int(3) => Err(StoreError::corrupt("the key holds a value this crate did not write")),
            _ => Err(StoreError::corrupt("unexpected reply to purge")),
        }
    }
}

impl LiveLog for RedisStore {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.publish_events(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.follow_log(key, fingerprint, cursor, timeout).await
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connection = match &self.inner.connection {
            Connection::Given(_) => "connection manager",
            Connection::Deferred(deferred) if deferred.manager.get().is_some() => "connection manager",
            Connection::Deferred(_) => "not yet connected",
            #[cfg(feature = "redis-cluster")]
            Connection::GivenCluster(_) => "cluster connection",
            #[cfg(feature = "redis-cluster")]
            Connection::DeferredCluster(cluster) if cluster.connection.initialized() => "cluster connection",
            #[cfg(feature = "redis-cluster")]
            Connection::DeferredCluster(_) => "cluster, not yet connected",
        };
        let blocking_reads = match &self.inner.live.readers {
            Some(readers) => format!("dedicated connections, at most {}", readers.max()),
            None => format!("none: followers check every {:?}", live::POLL_INTERVAL),
        };
        f.debug_struct("RedisStore")
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .field("operation_timeout", &self.inner.operation_timeout)
            .field("connection", &connection)
            .field("blocking_reads", &blocking_reads)
            .field("max_block", &self.inner.live.max_block)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::Client;

    use crate::{IdempotencyKey, ScopeId};

    #[test]
    fn key_layout() {
        let store = RedisStore::builder().with_prefix("p:").build(Client::open("redis://127.0.0.1:1").unwrap());
        let key = IdempotencyKey::parse(b"a:b{c}").unwrap();
        assert_eq!(store.redis_key(&StoreKey::new(None, key.clone())), b"p:-:a:b{c}");
        let scoped = store.redis_key(&StoreKey::new(Some(ScopeId::from_bytes([0xab; 32])), key));
        assert_eq!(scoped, format!("p:{}:a:b{{c}}", "ab".repeat(32)).into_bytes());
    }

    #[test]
    fn expiries_are_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
    }

    #[test]
    fn building_needs_neither_redis_nor_a_runtime() {
        let store = RedisStore::builder().build(::redis::Client::open("redis://127.0.0.1:1").unwrap());
        assert!(format!("{store:?}").contains("not yet connected"));
        assert!(::redis::Client::open("not a url").is_err(), "an invalid URL fails before the store");
    }
}

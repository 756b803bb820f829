//! The Redis store: many replicas sharing keys.
//!
//! - `mod.rs`: [`RedisStore`], its contract (layouts, round trips, failure) and the trait;
//! - `builder.rs`: [`RedisStoreBuilder`];
//! - `connection.rs`: the connection an operation goes out on, and sending one command;
//! - `scripts.rs`: the Lua script of each operation;
//! - `codec.rs`: the values it keeps (lock, record, not-retained record).

use std::{fmt, sync::Arc, time::Duration};

use ::redis::{Pipeline, RedisError, Value};

use super::{Begin, IdempotencyStore, LockToken, StoreError, StoreKey};
use crate::store::{Fingerprint, Followed, LiveCursor, LiveEvent, Record};

mod builder;
mod codec;
mod connection;
mod live;
mod readers;
mod scripts;
mod slot;

pub use builder::RedisStoreBuilder;
use connection::{Command, Connection, Handle, store_error};
use live::{ENDED_TTL, Live};
use scripts::{BEGIN, COMPLETE, RELEASE, RENEW};

/// The longest lease or TTL sent to Redis, in ms (about 31 700 years): Redis rejects an
/// expiry past `i64::MAX` ms from now.
const MAX_EXPIRY_MS: u64 = 1_000_000_000_000_000;

/// An [`IdempotencyStore`] in Redis, for many replicas sharing keys.
///
/// Every operation is one round trip running one Lua script on one Redis key, so it is atomic
/// and works unchanged on a single node and on Redis Cluster (no hash tag needed). Locks and
/// records expire by Redis key expiry (`PX`), so nothing sweeps and an abandoned lock frees
/// itself after one lease.
///
/// # Building one
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::store::RedisStore;
///
/// # async fn run() -> Result<(), tower_idempotency::store::redis::RedisError> {
/// // Connects now: fails when Redis is down.
/// let store = RedisStore::builder().connect("redis://127.0.0.1:6379").await?;
///
/// // Connects on first use: a service started while Redis is down starts anyway, answers
/// // `503` while Redis stays down and recovers by itself once Redis is back.
/// let store = RedisStore::builder()
///     .with_prefix("orders-api:idem:")
///     .with_command_timeout(Duration::from_millis(500))
///     .connect_lazy("redis://127.0.0.1:6379")?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
///
/// The connection is a multiplexed [`ConnectionManager`](::redis::aio::ConnectionManager): one TCP connection shared by every
/// request of the process, reconnected by itself after a failure. Use the
/// [re-exported `redis` crate](crate::store::redis) to build a [`Client`](::redis::Client) or a manager of your
/// own (TLS, ACL users, RESP3), so the versions match.
///
/// # Redis Cluster
///
/// With the `redis-cluster` feature (which turns on the `redis` crate's `cluster-async`; a
/// separate feature so that single-node users do not build the cluster client), build the
/// store with [`connect_cluster`](RedisStoreBuilder::connect_cluster) from one or more node
/// URLs, [`build_cluster`](RedisStoreBuilder::build_cluster) (connects on first use) or
/// [`build_with_cluster_connection`](RedisStoreBuilder::build_with_cluster_connection). The
/// keys, values and scripts are the same: each operation touches one key, so it goes to the
/// node that owns the key's slot, keys spread over all slots, and no hash tag is needed.
///
/// # Failure
///
/// Every operation, waiting for a connection included, is bounded by the
/// [command timeout](RedisStoreBuilder::with_command_timeout) (default 1 s). Past it the operation
/// fails with [`StoreError::is_timeout`]; a refused or broken connection or an error reply
/// fails with [`StoreError::is_unavailable`]; a value this crate cannot read fails with
/// [`StoreError::is_corrupt`]. The layer answers all three as configured by its store failure
/// mode (by default `503` with `Retry-After`). While Redis is down each operation makes one
/// fresh connection attempt, so the first request after Redis is back succeeds.
///
/// A timed-out operation may still have run in Redis. A `begin` that locked the key leaves it
/// in flight until its lease ends (retries get `409`, the handler never runs twice); a
/// `complete` that wrote the record makes retries replay it. A late answer is discarded,
/// never taken for the answer to a later command.
///
/// # Key layout
///
/// ```text
/// {prefix}{scope}:{key}         e.g. idem:-:3f2a1c9e-order-77
/// ```
///
/// - `prefix`: [`RedisStoreBuilder::with_prefix`], default `idem:`;
/// - `scope`: the [`ScopeId`](crate::ScopeId) as 64 lowercase hex digits, or `-` for the
///   unscoped namespace;
/// - `key`: the idempotency key as sent (1 to 255 visible ASCII bytes).
///
/// The scope part has a fixed form, so the first `:` after it ends it and no two (scope, key)
/// pairs share a Redis key. Each operation touches that one key, so no `{hash tag}` is needed
/// on Redis Cluster; keys spread over the slots. (A client key that itself contains `{...}`
/// becomes a hash tag and only pins that client's keys to one slot.) Use a prefix per
/// service, or per environment, when several share one Redis.
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
///
/// `complete`, `renew` and `release` are one `EVALSHA` each. `begin` is `MULTI`, `EVALSHA`,
/// `GET`, `EXEC`, written and answered at once: the script decides (and locks), the `GET` in
/// the same transaction returns a completed record's bytes. So a replayed body never passes
/// through Lua, where a large string costs Redis several times a plain `GET` (measured on
/// Redis 7.0: a 64 KiB record returned by the script took 135 µs, by the `GET` 30 µs).
/// `complete` does hand the record to Lua, once per key: a response near the 1 MiB default
/// record limit costs Redis about 2–3 ms of CPU to store.
///
/// The first time a script meets a Redis server (or after a restart or `SCRIPT FLUSH`) Redis
/// answers `NOSCRIPT`, and the store loads the script and sends the command again: two more
/// round trips, once per script and server.
///
/// # Consistency
///
/// Scripts and transactions run alone on a Redis node, so each operation is atomic: of
/// concurrent `begin`s on a free key exactly one locks it, whichever replica sends it. Redis
/// replication is asynchronous, so a failover can lose a lock or record written just before
/// it (a retry may then run again).
///
/// Cloning is cheap; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    prefix: Box<[u8]>,
    command_timeout: Duration,
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
        let attempt = async {
            let reply = match self.inner.handle().await? {
                Handle::Single(mut connection) => command.send_retrying(&mut connection).await,
                #[cfg(feature = "redis-cluster")]
                Handle::Cluster(mut connection) => command.send_retrying(&mut connection).await,
            };
            reply.map_err(store_error)
        };
        tokio::time::timeout(self.inner.command_timeout, attempt).await.unwrap_or_else(|_| Err(StoreError::timeout()))
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
        transaction.cmd("EVALSHA").arg(BEGIN.get_hash()).arg(1).arg(&key).arg(&lock[..]).arg(millis(lease));
        transaction.cmd("GET").arg(&key);
        let replies = match self.run(Command::Begin(&transaction)).await? {
            Value::Array(replies) => replies,
            _ => return Err(StoreError::corrupt("unexpected reply to the begin transaction")),
        };
        match <[Value; 2]>::try_from(replies) {
            Ok([Value::Int(0), _]) => Ok(Begin::Execute(token)),
            Ok([Value::Int(1), _]) => Ok(Begin::Mismatch),
            Ok([Value::Int(2), _]) => Ok(Begin::InFlight),
            Ok([Value::Int(3), Value::BulkString(value)]) => codec::decode_record(value).map(Begin::Completed),
            Ok([Value::Int(4), _]) => Err(StoreError::corrupt("the key holds a value this crate did not write")),
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
            .field("command_timeout", &self.inner.command_timeout)
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
        let store = RedisStore::builder().connect_lazy("redis://127.0.0.1:1").unwrap();
        assert!(format!("{store:?}").contains("not yet connected"));
        assert!(RedisStore::builder().connect_lazy("not a url").is_err());
    }
}

//! The Redis store: many replicas sharing keys.

use std::{
    fmt,
    sync::{Arc, LazyLock, OnceLock},
    time::Duration,
};

use ::redis::{
    Client, IntoConnectionInfo, Pipeline, RedisError, RedisResult, Script, ScriptInvocation, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};

use super::{Begin, IdempotencyStore, LockToken, StoreError, StoreKey};
use crate::{Fingerprint, Record};
#[cfg(feature = "redis-cluster")]
use ::redis::{cluster::ClusterClient, cluster_async::ClusterConnection};

mod codec;

/// Default prefix of every Redis key the store writes.
const DEFAULT_PREFIX: &str = "idem:";
/// Default bound on one store operation, connecting included.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest lease or TTL sent to Redis, in ms (about 31 700 years): Redis rejects an
/// expiry past `i64::MAX` ms from now.
const MAX_EXPIRY_MS: u64 = 1_000_000_000_000_000;

/// `begin`: look the key up and lock it when free, in one step.
///
/// `KEYS[1]`: the key. `ARGV[1]`: the new lock value (`L`, fingerprint, token). `ARGV[2]`: the
/// lease in ms. Returns 0 (locked: execute), 1 (mismatch), 2 (in flight), 3 (completed for
/// this fingerprint) or 4 (a value this crate did not write). It reads the first 33 bytes of
/// a held value only: the record itself comes from the `GET` that follows the script in the
/// same `MULTI`, because a large string through Lua costs Redis several times a plain `GET`.
/// An expired lock or record no longer exists (Redis expired it), so it counts as free.
const BEGIN_LUA: &str = r"
local head = redis.call('GETRANGE', KEYS[1], 0, 32)
if head == '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
local tag = string.sub(head, 1, 1)
if #head ~= 33 or (tag ~= 'L' and tag ~= 'R' and tag ~= 'T') then
  return 4
end
if string.sub(head, 2) ~= string.sub(ARGV[1], 2, 33) then
  return 1
end
if tag == 'L' then
  return 2
end
return 3
";

/// `complete`: replace the caller's lock by the record, with its TTL.
///
/// `ARGV[1]`: the caller's lock value. `ARGV[2]`: the record. `ARGV[3]`: the TTL in ms.
const COMPLETE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// `renew`: extend the caller's lock. `ARGV[1]`: the lock value. `ARGV[2]`: the lease in ms.
const RENEW_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// `release`: remove the caller's lock. `ARGV[1]`: the lock value.
const RELEASE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(BEGIN_LUA));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

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
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
///
/// // Connects on first use: a service started while Redis is down starts anyway, answers
/// // `503` while Redis stays down and recovers by itself once Redis is back.
/// let store = RedisStore::builder()
///     .prefix("orders-api:idem:")
///     .command_timeout(Duration::from_millis(500))
///     .connect_lazy("redis://127.0.0.1:6379")?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
///
/// The connection is a multiplexed [`ConnectionManager`]: one TCP connection shared by every
/// request of the process, reconnected by itself after a failure. Use the
/// [re-exported `redis` crate](crate::store::redis) to build a [`Client`] or a manager of your
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
/// [command timeout](RedisStoreBuilder::command_timeout) (default 1 s). Past it the operation
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
/// - `prefix`: [`RedisStoreBuilder::prefix`], default `idem:`;
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
/// 0       1      tag: 'L' lock | 'R' response | 'T' tombstone
/// 1       32     fingerprint of the request that locked or completed the key
/// ---- lock: 49 bytes in all
/// 33      16     lock token id, big-endian
/// ---- tombstone: 33 bytes in all
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
/// | key | lock | tombstone | record, empty body | record, 10 000-byte body |
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
}

enum Connection {
    /// A manager given by the caller or made by [`RedisStoreBuilder::connect`].
    Given(ConnectionManager),
    /// A manager made on first use, so that building the store needs neither Redis nor a
    /// tokio runtime.
    Deferred(Box<Deferred>),
    /// A Redis Cluster connection given by the caller or made by
    /// [`RedisStoreBuilder::connect_cluster`].
    #[cfg(feature = "redis-cluster")]
    GivenCluster(ClusterConnection),
    /// A Redis Cluster connection made on first use.
    #[cfg(feature = "redis-cluster")]
    DeferredCluster(Box<DeferredCluster>),
}

/// A `ConnectionManager` made on first use (itself connecting lazily).
struct Deferred {
    client: Client,
    config: ConnectionManagerConfig,
    manager: OnceLock<ConnectionManager>,
}

/// Connects on first use; a failed attempt leaves the cell empty, so the next operation
/// tries again.
#[cfg(feature = "redis-cluster")]
struct DeferredCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
}

/// The connection one operation goes out on.
enum Handle {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(ClusterConnection),
}

/// Builds a [`RedisStore`] with a non-default key prefix or command timeout.
///
/// Finish with [`connect`](Self::connect) (connects now), [`connect_lazy`](Self::connect_lazy)
/// or [`build`](Self::build) (connect on first use), or
/// [`build_with_manager`](Self::build_with_manager) (your own connection).
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    command_timeout: Duration,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_owned(), command_timeout: DEFAULT_COMMAND_TIMEOUT }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every Redis key the store writes. Default: `idem:`.
    ///
    /// Give each service (or environment) sharing one Redis its own prefix. Avoid `{` and `}`
    /// in it: on Redis Cluster they would make it a hash tag and put every key in one slot.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, waiting for a connection included; past it
    /// the operation fails with [`StoreError::is_timeout`]. Default: 1 s. It also bounds each
    /// connection attempt of the managers this builder makes.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, `rediss://`
    /// needs a TLS feature of the `redis` crate) and builds the store.
    ///
    /// Fails when the URL is invalid or Redis does not answer within the command timeout.
    pub async fn connect(self, url: impl IntoConnectionInfo) -> Result<RedisStore, RedisError> {
        let client = Client::open(url)?;
        let manager = ConnectionManager::new_with_config(client, self.manager_config()).await?;
        Ok(self.build_with_manager(manager))
    }

    /// Builds the store for the Redis at `url` without connecting: the first operation
    /// connects. Fails only when the URL is invalid.
    ///
    /// A service built this way starts while Redis is down; its requests then fail as
    /// [`StoreError::is_unavailable`] (the layer's `503`) until Redis answers.
    pub fn connect_lazy(self, url: impl IntoConnectionInfo) -> Result<RedisStore, RedisError> {
        Ok(self.build(Client::open(url)?))
    }

    /// Builds the store on `client` without connecting: the first operation connects (see
    /// [`connect_lazy`](Self::connect_lazy)). Needs no tokio runtime.
    pub fn build(self, client: Client) -> RedisStore {
        let config = self.manager_config();
        self.finish(Connection::Deferred(Box::new(Deferred { client, config, manager: OnceLock::new() })))
    }

    /// Builds the store on a connection manager of your own (its reconnection settings
    /// apply; the command timeout still bounds every operation).
    pub fn build_with_manager(self, manager: ConnectionManager) -> RedisStore {
        self.finish(Connection::Given(manager))
    }

    /// Connects to the Redis Cluster that `nodes` belong to (one or more of its nodes'
    /// URLs) and builds the store. Each connection attempt and each answer is bounded by the
    /// command timeout. Fails when no node answers.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisStore, RedisError> {
        let client = ClusterClient::builder(nodes)
            .connection_timeout(self.command_timeout)
            .response_timeout(self.command_timeout)
            .build()?;
        let connection = client.get_async_connection().await?;
        Ok(self.build_with_cluster_connection(connection))
    }

    /// Builds the store on a Redis Cluster client without connecting: the first operation
    /// connects, and while that fails each operation tries again (failing as
    /// [`StoreError::is_unavailable`] or [`StoreError::is_timeout`] meanwhile).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn build_cluster(self, client: ClusterClient) -> RedisStore {
        let cluster = DeferredCluster { client, connection: tokio::sync::OnceCell::new() };
        self.finish(Connection::DeferredCluster(Box::new(cluster)))
    }

    /// Builds the store on a Redis Cluster connection of your own.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn build_with_cluster_connection(self, connection: ClusterConnection) -> RedisStore {
        self.finish(Connection::GivenCluster(connection))
    }

    /// The settings of the managers this builder makes: one attempt per connection (the
    /// store makes a fresh one per operation while Redis is down, so a request fails fast
    /// instead of waiting out a backoff) bounded by the command timeout.
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(Some(self.command_timeout))
    }

    fn finish(self, connection: Connection) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                connection,
                prefix: self.prefix.into_bytes().into_boxed_slice(),
                command_timeout: self.command_timeout,
            }),
        }
    }
}

impl RedisStore {
    /// A builder for the key prefix and command timeout.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to the Redis at `url` with the default settings; see
    /// [`RedisStoreBuilder::connect`].
    pub async fn connect(url: impl IntoConnectionInfo) -> Result<Self, RedisError> {
        Self::builder().connect(url).await
    }

    /// The store for the Redis at `url` with the default settings, connecting on first use;
    /// see [`RedisStoreBuilder::connect_lazy`].
    pub fn connect_lazy(url: impl IntoConnectionInfo) -> Result<Self, RedisError> {
        Self::builder().connect_lazy(url)
    }

    /// The store on `client` with the default settings, connecting on first use; see
    /// [`RedisStoreBuilder::build`].
    pub fn from_client(client: Client) -> Self {
        Self::builder().build(client)
    }

    /// The store on your connection manager with the default settings; see
    /// [`RedisStoreBuilder::build_with_manager`].
    pub fn from_connection_manager(manager: ConnectionManager) -> Self {
        Self::builder().build_with_manager(manager)
    }

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

/// What one store operation sends: one round trip.
#[derive(Clone, Copy)]
enum Command<'a> {
    /// One script: `complete`, `renew`, `release`.
    Script(&'a ScriptInvocation<'a>),
    /// `begin`: `MULTI`, the begin script, `GET`, `EXEC`.
    Begin(&'a Pipeline),
}

impl Command<'_> {
    /// Sends the command, and once more after a refused connection: that sent nothing, and a
    /// `ConnectionManager` has started a fresh attempt meanwhile, so the first request after
    /// Redis is back works.
    async fn send_retrying<C: ConnectionLike + Send>(self, connection: &mut C) -> RedisResult<Value> {
        match self.send(connection).await {
            Err(error) if error.is_connection_refusal() => self.send(connection).await,
            reply => reply,
        }
    }

    /// Sends the command; when Redis lacks the script (first use, restart, `SCRIPT FLUSH`),
    /// loads it and sends the command again.
    async fn send<C: ConnectionLike + Send>(self, connection: &mut C) -> RedisResult<Value> {
        match self {
            // `invoke_async` sends `EVALSHA`, and on `NOSCRIPT` loads the script and retries.
            Self::Script(invocation) => invocation.invoke_async(connection).await,
            Self::Begin(transaction) => {
                let replies: Value = transaction.query_async(connection).await?;
                if !lacks_script(&replies) {
                    return Ok(replies);
                }
                BEGIN.load_async(connection).await?;
                transaction.query_async(connection).await
            }
        }
    }
}

impl Inner {
    async fn handle(&self) -> Result<Handle, StoreError> {
        let deferred = match &self.connection {
            Connection::Given(manager) => return Ok(Handle::Single(manager.clone())),
            Connection::Deferred(deferred) => deferred,
            #[cfg(feature = "redis-cluster")]
            Connection::GivenCluster(connection) => return Ok(Handle::Cluster(connection.clone())),
            #[cfg(feature = "redis-cluster")]
            Connection::DeferredCluster(cluster) => {
                let connecting = cluster.connection.get_or_try_init(|| cluster.client.get_async_connection());
                return Ok(Handle::Cluster(connecting.await.map_err(store_error)?.clone()));
            }
        };
        if let Some(manager) = deferred.manager.get() {
            return Ok(Handle::Single(manager.clone()));
        }
        let made = ConnectionManager::new_lazy_with_config(deferred.client.clone(), deferred.config.clone())
            .map_err(StoreError::unavailable)?;
        // Two first calls may race: both make a manager (lazy: not yet connected) and the
        // first one stored wins.
        Ok(Handle::Single(deferred.manager.get_or_init(|| made).clone()))
    }
}

fn store_error(error: RedisError) -> StoreError {
    if error.is_timeout() { StoreError::timeout() } else { StoreError::unavailable(error) }
}

/// Whether the begin transaction's script failed with `NOSCRIPT`.
fn lacks_script(replies: &Value) -> bool {
    let Value::Array(replies) = replies else { return false };
    matches!(replies.first(), Some(Value::ServerError(error)) if error.kind() == Some(ServerErrorKind::NoScript))
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
        let mut invocation = COMPLETE.key(self.redis_key(key));
        invocation.arg(&codec::lock_value(lock)[..]).arg(value).arg(millis(ttl));
        written(self.run(Command::Script(&invocation)).await?)
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        let mut invocation = RENEW.key(self.redis_key(key));
        invocation.arg(&codec::lock_value(lock)[..]).arg(millis(lease));
        written(self.run(Command::Script(&invocation)).await?)
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        let mut invocation = RELEASE.key(self.redis_key(key));
        invocation.arg(&codec::lock_value(lock)[..]);
        written(self.run(Command::Script(&invocation)).await?)
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
        f.debug_struct("RedisStore")
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .field("command_timeout", &self.inner.command_timeout)
            .field("connection", &connection)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdempotencyKey, ScopeId};

    #[test]
    fn key_layout() {
        let store = RedisStore::builder().prefix("p:").build(Client::open("redis://127.0.0.1:1").unwrap());
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
        let store = RedisStore::connect_lazy("redis://127.0.0.1:1").unwrap();
        assert!(format!("{store:?}").contains("not yet connected"));
        assert!(RedisStore::connect_lazy("not a url").is_err());
    }
}

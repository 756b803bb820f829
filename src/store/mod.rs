//! Where locks and completed responses live.
//!
//! Every store implements [`IdempotencyStore`]: four operations, each one atomic in the store,
//! and every state change after [`begin`](IdempotencyStore::begin) fenced by the lock's
//! [`LockToken`]. The crate ships [`MemoryStore`] (one process) and, with the `redis` feature,
//! `RedisStore` (many replicas; a single Redis node, or Redis Cluster with the `redis-cluster`
//! feature). Both pass the same conformance suite.
//!
//! # The state of one key
//!
//! | state | `begin` with the same fingerprint | with another fingerprint |
//! | --- | --- | --- |
//! | absent (or expired) | lock it: [`Begin::Execute`] | lock it: [`Begin::Execute`] |
//! | locked, lease not expired | [`Begin::Locked`] | [`Begin::Mismatch`] |
//! | locked, lease expired | take it over: [`Begin::Execute`] with a new token | take it over |
//! | completed | [`Begin::Completed`] | [`Begin::Mismatch`] |
//!
//! # Responses in flight
//!
//! Each lock has a live log ([`LiveEvent`]s): the executing request
//! [`publish`](IdempotencyStore::publish)es its response into it as it is produced, when the
//! layer is in join mode, and duplicates [`follow`](IdempotencyStore::follow) it, woken by the
//! store. `complete`, `release` and expiry end it. Waiting duplicates follow it too, for its
//! end only. See [`LiveEvent`] for the contract.
//!
//! # Concurrent calls on the same key
//!
//! Of any number of concurrent `begin` calls on an absent key, exactly one returns
//! [`Begin::Execute`]. `complete`, `renew` and `release` change the key only while it is still
//! locked by the caller's token under an unexpired lease: once the lease expired, the old
//! owner's calls return `Ok(false)` and change nothing, whether or not another caller took the
//! key over since (an expired lock counts as absent for every operation, in every store).

use std::{
    fmt,
    future::Future,
    sync::OnceLock,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::{IdempotencyKey, ScopeId};

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
mod fingerprint;
mod live;
mod memory;
mod record;
// Not named `redis`: that name is the re-exported client crate below.
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis_store;

/// The `redis` client crate [`RedisStore`] is built on, re-exported so that the `Client` or
/// `ConnectionManager` you hand it comes from the same version.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ::redis;
/// The `sqlx` crate [`PostgresStore`] is built on, re-exported so that the `PgPool` you hand
/// it comes from the same version.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use ::sqlx;
pub use fingerprint::Fingerprint;
pub use live::{Followed, LiveCursor, LiveEvent};
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{
    PgTransaction, PgTransactionGuard, PostgresStore, PostgresStoreBuilder, TransactionClosed, Transactional,
    TransactionalLayer, TransactionalResponseFuture,
};
pub use record::{DecodeError, Record, StoredResponse};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_store::{RedisStore, RedisStoreBuilder};

/// A backend for locks and recorded responses.
///
/// Each method is one atomic operation in the store. See the [module docs](self) for the
/// state machine of a key and the contract under concurrent calls.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Looks the key up and, if it is free, locks it for `lease`, all in one atomic step.
    ///
    /// A completed record with a different fingerprint, or a live lock with a different
    /// fingerprint, is a [`Begin::Mismatch`]. A lock whose lease has run out counts as free.
    fn begin(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// Replaces the caller's lock by `record`, kept for `ttl` from now.
    ///
    /// `Ok(false)`, with nothing written, when the key is no longer locked by `lock` or the
    /// lock's lease has expired (even if no one took the key over since).
    fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Extends the caller's lock to `lease` from now. `Ok(false)` when it is no longer held.
    fn renew(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes the caller's lock so the next request with the key executes again.
    /// `Ok(false)`, changing nothing, when it is no longer held.
    fn release(&self, key: &StoreKey, lock: &LockToken) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Appends `events` to the live log of the caller's lock (see [`LiveEvent`]): join mode
    /// publishes a response as it is produced, for duplicates to follow.
    ///
    /// `from` is the index in the log of `events[0]`. A store keeps each index once, so a
    /// publish sent again after a lost answer appends nothing twice. Nothing is written, and
    /// `Ok(())` returned, when the lock is no longer held.
    fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the live log of the key's lock for `fingerprint` after `cursor` (`None`: the log
    /// of whichever lock holds the key now, from its start), waiting up to `timeout` for a new
    /// event or for the log to end.
    ///
    /// The wait is woken by the store (a notification, a blocking read), not by asking it
    /// again every few milliseconds: `publish`, `complete`, `release` and the lease running
    /// out each wake the lock's followers. [`Followed::Ended`] when the log of `cursor`'s lock
    /// ended, or no live lock for `fingerprint` holds the key.
    fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Followed, StoreError>> + Send;
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Begin {
    /// The key was free and is now locked by this token: run the request.
    Execute(LockToken),
    /// The key holds a completed record for the same request.
    Completed(Record),
    /// The same request is being executed under a live lock.
    Locked,
    /// The key is locked or completed for a different request.
    Mismatch,
}

/// The store key: the pair (scope, idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreKey {
    scope: Option<ScopeId>,
    key: IdempotencyKey,
}

impl StoreKey {
    /// The store key for `key` in `scope` (`None`: the unscoped namespace).
    pub fn new(scope: Option<ScopeId>, key: IdempotencyKey) -> Self {
        Self { scope, key }
    }

    /// The scope part.
    pub fn scope(&self) -> Option<&ScopeId> {
        self.scope.as_ref()
    }

    /// The idempotency key part.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }
}

/// Proof of holding a key's lock: a token unique to one `begin`, plus the fingerprint of the
/// request it locked for. Stores compare the token on every write, so a stale owner can never
/// overwrite a newer one.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken {
    id: u128,
    fingerprint: Fingerprint,
}

impl LockToken {
    /// A new token for a lock taken for `fingerprint`.
    ///
    /// Unique across processes: a random per-process prefix (drawn once) and a counter.
    pub fn new(fingerprint: Fingerprint) -> Self {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self { id: (u128::from(prefix) << 64) | u128::from(n), fingerprint }
    }

    /// Rebuilds a token from its parts (for stores that keep it elsewhere).
    pub const fn from_parts(id: u128, fingerprint: Fingerprint) -> Self {
        Self { id, fingerprint }
    }

    /// The token's unique id.
    pub const fn id(&self) -> u128 {
        self.id
    }

    /// The fingerprint of the request that holds the lock.
    pub const fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockToken({:032x})", self.id)
    }
}

/// A store operation failed: the store is unreachable, timed out, or full.
///
/// The layer turns it into a `503` (fail closed, the default) or runs the request unprotected
/// (fail open); see [`StoreFailure`](crate::StoreFailure).
pub struct StoreError {
    kind: ErrorKind,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Unavailable,
    Timeout,
    Capacity,
    Corrupt,
}

impl StoreError {
    /// The store could not be reached or answered with an error.
    pub fn unavailable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { kind: ErrorKind::Unavailable, source: Some(source.into()) }
    }

    /// The store did not answer in time.
    pub fn timeout() -> Self {
        Self { kind: ErrorKind::Timeout, source: None }
    }

    /// The store is full of in-flight locks and cannot take a new key.
    pub fn capacity() -> Self {
        Self { kind: ErrorKind::Capacity, source: None }
    }

    /// The store returned data this crate cannot read.
    pub fn corrupt(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { kind: ErrorKind::Corrupt, source: Some(source.into()) }
    }

    /// Whether the store could not be reached or answered with an error.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// Whether the store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// Whether the store was full of in-flight locks.
    pub fn is_capacity(&self) -> bool {
        self.kind == ErrorKind::Capacity
    }

    /// Whether the store returned data this crate cannot read.
    pub fn is_corrupt(&self) -> bool {
        self.kind == ErrorKind::Corrupt
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StoreError");
        d.field("kind", &self.kind);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            ErrorKind::Unavailable => "idempotency store unavailable",
            ErrorKind::Timeout => "idempotency store timed out",
            ErrorKind::Capacity => "idempotency store is full of in-flight requests",
            ErrorKind::Corrupt => "idempotency store returned unreadable data",
        })
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

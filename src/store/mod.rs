//! Where locks and completed responses live.
//!
//! Every store implements [`IdempotencyStore`]: four operations (`begin`, `complete`, `renew`,
//! `release`), each one atomic in the store, and every state change after
//! [`begin`](IdempotencyStore::begin) fenced by the lock's [`LockToken`]. That is a complete
//! store. Waiting for a duplicate in flight and joining its response need one more, optional
//! capability, the lock's live log ([`LiveLog`]); an operator's look at one key, and its purge,
//! another ([`Inspect`]), which the layer never needs.
//!
//! The crate ships four stores, each with all three traits, and each passing the same
//! conformance suite (`conformance`, feature `conformance`):
//!
//! | store | feature | for |
//! | --- | --- | --- |
//! | [`MemoryStore`] | (always) | one process |
//! | `RedisStore` | `redis` (`redis-cluster` for Redis Cluster) | many replicas sharing a Redis |
//! | `PostgresStore` | `postgres` | records in the application's own database, and transactional mode |
//! | `DynamoDbStore` | `dynamodb` | AWS Lambda functions and replicas sharing one DynamoDB table (waiting and joining by polling) |
//!
//! # Implementing a store
//!
//! A store keeps, per [`StoreKey`], either a lock (its token and until when its lease runs) or
//! a completed record (its fingerprint, the [`Record`], until when it is kept). This one keeps
//! them in a `HashMap` and passes the core conformance suite as it is:
//!
//! ```
//! use std::{collections::HashMap, sync::Mutex, time::Duration};
//!
//! use tokio::time::Instant;
//! use tower_idempotency::store::{
//!     Begin, Fingerprint, IdempotencyStore, LockToken, Record, StoreError, StoreKey,
//! };
//!
//! enum Entry {
//!     Locked { token: LockToken, until: Instant },
//!     Completed { fingerprint: Fingerprint, record: Record, until: Instant },
//! }
//!
//! /// Every key's entry. (A real store also frees expired entries, as `MemoryStore` does.)
//! #[derive(Default)]
//! struct MapStore(Mutex<HashMap<StoreKey, Entry>>);
//!
//! impl MapStore {
//!     /// Runs `write` if `lock` still holds `key` under an unexpired lease.
//!     fn if_held(&self, key: &StoreKey, lock: &LockToken, write: impl FnOnce(&mut HashMap<StoreKey, Entry>)) -> bool {
//!         let mut map = self.0.lock().unwrap();
//!         let held = matches!(map.get(key), Some(Entry::Locked { token, until }) if token == lock && *until > Instant::now());
//!         if held {
//!             write(&mut map);
//!         }
//!         held
//!     }
//! }
//!
//! impl IdempotencyStore for MapStore {
//!     async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
//!         let mut map = self.0.lock().unwrap();
//!         let now = Instant::now();
//!         match map.get(key) {
//!             Some(Entry::Completed { fingerprint: kept, record, until }) if *until > now => {
//!                 return Ok(if kept == fingerprint { Begin::Completed(record.clone()) } else { Begin::Mismatch });
//!             }
//!             Some(Entry::Locked { token, until }) if *until > now => {
//!                 return Ok(if token.fingerprint() == fingerprint { Begin::Locked } else { Begin::Mismatch });
//!             }
//!             // Absent, or expired: free.
//!             _ => {}
//!         }
//!         let token = LockToken::new(*fingerprint);
//!         map.insert(key.clone(), Entry::Locked { token, until: now + lease });
//!         Ok(Begin::Execute(token))
//!     }
//!
//!     async fn complete(&self, key: &StoreKey, lock: &LockToken, record: Record, ttl: Duration) -> Result<bool, StoreError> {
//!         let until = Instant::now() + ttl;
//!         let fingerprint = *lock.fingerprint();
//!         Ok(self.if_held(key, lock, |map| {
//!             map.insert(key.clone(), Entry::Completed { fingerprint, record, until });
//!         }))
//!     }
//!
//!     async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
//!         let until = Instant::now() + lease;
//!         Ok(self.if_held(key, lock, |map| {
//!             map.insert(key.clone(), Entry::Locked { token: *lock, until });
//!         }))
//!     }
//!
//!     async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
//!         Ok(self.if_held(key, lock, |map| {
//!             map.remove(key);
//!         }))
//!     }
//! }
//!
//! # #[cfg(feature = "conformance")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // In the store's own tests (feature `conformance`):
//! tower_idempotency::store::conformance::run(|| async { MapStore::default() }, tokio::time::advance).await;
//!
//! // It is a complete store: the layer takes it as it is.
//! let layer = tower_idempotency::IdempotencyLayer::from_store(MapStore::default());
//! # let _ = layer;
//! # }
//! # #[cfg(not(feature = "conformance"))]
//! # fn main() {}
//! ```
//!
//! Duplicates of a request in flight get `409` over such a store. To let them wait or join
//! ([`IdempotencyLayer::with_duplicates`](crate::IdempotencyLayer::with_duplicates)), the store
//! implements [`LiveLog`] too, whose contract is on the trait, and runs the live checks of the
//! suite as well. The compiler refuses waiting or joining over a store without it:
//!
//! ```compile_fail
//! # use std::time::Duration;
//! # use tower_idempotency::{IdempotencyLayer, Duplicates, store::*};
//! # struct CoreOnly;
//! # impl IdempotencyStore for CoreOnly {
//! #     async fn begin(&self, _: &StoreKey, _: &Fingerprint, _: Duration) -> Result<Begin, StoreError> { todo!() }
//! #     async fn complete(&self, _: &StoreKey, _: &LockToken, _: Record, _: Duration) -> Result<bool, StoreError> { todo!() }
//! #     async fn renew(&self, _: &StoreKey, _: &LockToken, _: Duration) -> Result<bool, StoreError> { todo!() }
//! #     async fn release(&self, _: &StoreKey, _: &LockToken) -> Result<bool, StoreError> { todo!() }
//! # }
//! // error: `CoreOnly` has no live log
//! let layer = IdempotencyLayer::from_store(CoreOnly).with_duplicates(Duplicates::join());
//! ```
//!
//! # The state of one key
//!
//! | state | `begin` with the same fingerprint | with another fingerprint |
//! | --- | --- | --- |
//! | absent (or expired) | lock it: [`Begin::Execute`] | lock it: [`Begin::Execute`] |
//! | locked, lease not expired | [`Begin::Locked`] | [`Begin::Mismatch`] |
//! | locked, lease expired | take it over: [`Begin::Execute`] with a new token | take it over |
//! | completed | [`Begin::Completed`] | [`Begin::Mismatch`] |
//! | completed with a grace, past its TTL, within the grace | [`Begin::Expired`] | [`Begin::Expired`] |
//!
//! # Responses in flight
//!
//! A store with a [`LiveLog`] keeps one log per lock: the executing request publishes its
//! response into it as it is produced (join mode), and duplicates follow it, woken by the
//! store, until `complete`, `release` or expiry ends it. Waiting duplicates follow it too, for
//! its end only. The contract is on [`LiveLog`].
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
#[cfg(feature = "dynamodb")]
mod dynamodb;
mod fingerprint;
mod inspect;
mod live;
mod memory;
mod record;
// Not named `redis`: that name is the re-exported client crate below.
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
mod redis_store;

/// The `aws-sdk-dynamodb` crate [`DynamoDbStore`] is built on, re-exported so that the
/// `Client` you hand it comes from the same version.
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use ::aws_sdk_dynamodb;
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
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use dynamodb::{DynamoDbStore, DynamoDbStoreBuilder};
pub use fingerprint::Fingerprint;
pub use inspect::{Completed, Inspect, KeyState, Locked, Purged};
pub use live::{Followed, LiveCursor, LiveEvent, LiveLog};
#[cfg(any(feature = "redis", feature = "postgres", feature = "dynamodb"))]
pub(crate) use live::{decode_head, encode_head};
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresStore, PostgresStoreBuilder};
pub(crate) use record::EventMark;
pub use record::{DecodeError, Record, StoredResponse};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_store::{RedisConnection, RedisStore, RedisStoreBuilder};

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

    /// [`complete`](Self::complete), and then, for `grace` after the record's `ttl` ran out,
    /// a mark of the key: [`begin`](Self::begin) answers [`Begin::Expired`] for it, whatever
    /// the fingerprint, and locks nothing, until the grace ends and the key is free. The layer
    /// calls it instead of `complete` when a grace is set
    /// ([`with_expired_grace`](crate::IdempotencyLayer::with_expired_grace)).
    ///
    /// The same fencing as `complete`. What the mark costs is the store's to say: each store
    /// of this crate states it. The default keeps no mark (it calls `complete`): over a store
    /// that does not implement it, a key past its TTL is free again, as without a grace.
    fn complete_with_grace(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = grace;
        self.complete(key, lock, record, ttl)
    }

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

    /// Whether what the store keeps outlives the process: shared by replicas, kept across a
    /// restart. Default: `true`. [`MemoryStore`] says `false`; a store that wraps another
    /// answers as the one it wraps.
    ///
    /// Over such a store the layer needs a deployment secret
    /// ([`with_secret`](crate::IdempotencyLayer::with_secret)), the same in every process, and
    /// checks once, with `begin` and `complete` on a reserved key, that the store's other
    /// users have the same one (see [`secret`](crate::secret)). Over a store that ends with
    /// the process, a random secret per process will do, and nothing is checked.
    fn outlives_process(&self) -> bool {
        true
    }
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
    /// The key's record ran past its TTL less than its grace ago
    /// ([`complete_with_grace`](IdempotencyStore::complete_with_grace)): the request ran, and
    /// its response is gone. The key is not locked.
    Expired,
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
///
/// Its id also says when the lock was taken ([`since`](Self::since)), so that every store
/// that keeps the id of a lock can tell an operator since when the key is in flight
/// ([`Inspect`]) without keeping anything more.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken {
    id: u128,
    fingerprint: Fingerprint,
}

/// Bits of a token id below its time: a per-process random part and a counter.
const TOKEN_TIME_SHIFT: u32 = 80;

impl LockToken {
    /// A new token for a lock taken for `fingerprint` now.
    ///
    /// The id is the time in milliseconds since the Unix epoch (48 bits, the process's wall
    /// clock), a random per-process part drawn once (48 bits) and a counter (32 bits): unique
    /// across processes, since two ids could only meet in the same millisecond, with the same
    /// random part (a 2^-48 chance per pair of processes) and the same count.
    pub fn new(fingerprint: Fingerprint) -> Self {
        static PROCESS: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let process = *PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0) & 0xffff_ffff_ffff;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64 & 0xffff_ffff_ffff);
        let id = (u128::from(millis) << TOKEN_TIME_SHIFT) | (u128::from(process) << 32) | u128::from(n);
        Self { id, fingerprint }
    }

    /// When the lock was taken: the time [`new`](Self::new) wrote into the id, to the
    /// millisecond, by the clock of the process that took it. `None` for an id that holds no
    /// time (one from before tokens held it, a lock taken under a version that wrote a random
    /// prefix there: anything before 2020 or after 2200 is taken as that).
    pub fn since(&self) -> Option<std::time::SystemTime> {
        const FROM: u64 = 1_577_836_800_000; // 2020-01-01
        const UNTIL: u64 = 7_258_118_400_000; // 2200-01-01
        let millis = (self.id >> TOKEN_TIME_SHIFT) as u64;
        (FROM..UNTIL).contains(&millis).then(|| std::time::UNIX_EPOCH + Duration::from_millis(millis))
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

    /// The store is full: of in-flight locks (it cannot take a new key), or, for a publish, the
    /// lock's live log is at the store's bound for one log (see [`LiveLog`]).
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

    /// Whether the store was full: of in-flight locks, or a live log at its bound.
    pub fn is_capacity(&self) -> bool {
        self.kind == ErrorKind::Capacity
    }

    /// Whether the store returned data this crate cannot read.
    pub fn is_corrupt(&self) -> bool {
        self.kind == ErrorKind::Corrupt
    }

    /// The same error for another caller of an operation shared by several (its source as
    /// text).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn duplicate(&self) -> Self {
        Self { kind: self.kind, source: self.source.as_ref().map(|source| source.to_string().into()) }
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

/// What went wrong, then the store's own error: `idempotency store unavailable: Connection
/// refused (os error 111)`. A log line (`%error`) therefore carries the store's error whatever
/// the subscriber; as with `std::io::Error`, [`source`](std::error::Error::source) is then the
/// store error's own source, so that a chain is printed once.
impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            ErrorKind::Unavailable => "idempotency store unavailable",
            ErrorKind::Timeout => "idempotency store timed out",
            ErrorKind::Capacity => "idempotency store is full of in-flight requests",
            ErrorKind::Corrupt => "idempotency store returned unreadable data",
        })?;
        match &self.source {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().and_then(std::error::Error::source)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_store_error_says_what_the_store_said_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let error = StoreError::unavailable(refused);
        assert_eq!(error.to_string(), "idempotency store unavailable: Connection refused (os error 111)");
        // The store's error is in the text: its own source (none here) comes next in a chain.
        assert!(error.source().is_none());
        assert_eq!(StoreError::timeout().to_string(), "idempotency store timed out");

        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl fmt::Display for Wrapped {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("query failed")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = StoreError::unavailable(Wrapped(std::io::Error::other("broken pipe")));
        assert_eq!(error.to_string(), "idempotency store unavailable: query failed");
        assert_eq!(error.source().map(ToString::to_string).as_deref(), Some("broken pipe"));
    }

    #[test]
    fn a_token_says_when_it_was_taken_and_stays_unique() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        let tokens: Vec<_> = (0..1000).map(|_| LockToken::new(Fingerprint::from_bytes([1; 32]))).collect();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        for token in &tokens {
            let since = token.since().unwrap().duration_since(UNIX_EPOCH).unwrap().as_millis();
            assert!((before..=after).contains(&since), "{since} not within [{before}, {after}]");
        }
        let ids: std::collections::HashSet<_> = tokens.iter().map(LockToken::id).collect();
        assert_eq!(ids.len(), tokens.len());
        // An id that holds no time (a random prefix there) says none.
        assert_eq!(LockToken::from_parts(u128::MAX, Fingerprint::from_bytes([1; 32])).since(), None);
        assert_eq!(LockToken::from_parts(1, Fingerprint::from_bytes([1; 32])).since(), None);
    }
}

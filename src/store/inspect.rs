//! A look at one key, for an operator: [`Inspect`], the optional store capability, and what it
//! answers ([`KeyState`], [`Locked`], [`Completed`], [`Purged`]).

use std::{future::Future, time::SystemTime};

use http::StatusCode;

use super::{IdempotencyStore, LockToken, Record, StoreError, StoreKey};
use crate::Origin;

/// What an operator needs to answer a support ticket ("did this charge go through, and what
/// did we answer?") and to act on one key: its state ([`inspect`](Self::inspect)) and its
/// removal ([`purge`](Self::purge)). An optional capability, as the live log
/// ([`LiveLog`](super::LiveLog)) is: the layer never calls it, and a store that implements
/// only [`IdempotencyStore`] is complete. The crate's stores all implement it.
///
/// The store key of a request is computed with the layer's keyed digests:
/// [`IdempotencyLayer::store_key`](crate::IdempotencyLayer::store_key).
///
/// # The contract
///
/// - **One read.** `inspect` reads the key once, atomically: an expired lock or record is
///   [`KeyState::Unknown`], as it is for `begin`. Times are wall-clock times, to the
///   millisecond: a lock's start is written into its token by the process that took it
///   ([`LockToken::since`]), a record's completion into the record by the process that
///   recorded it ([`Origin::completed_at`], with the trace of the request); the
///   end of a lease and of a record's TTL are the store's, converted with this process's
///   clock.
/// - **Purging never runs a request twice at once.** `purge` removes a completed record, so
///   that the next request with the key executes again, in one atomic step that refuses a
///   key in flight ([`Purged::Locked`], nothing changed). A lock is not the operator's to
///   remove: its owner is still running the request, so a retry let in by the removal would
///   run it a second time alongside, and the owner's record would then be refused (its token
///   no longer holds the key). A lock ends by itself: completed, released, or its lease run
///   out (one lease after its process died); purge then.
///
/// The conformance suite checks it: `conformance::run_inspect` (feature `conformance`).
pub trait Inspect: IdempotencyStore {
    /// What the key holds now.
    fn inspect(&self, key: &StoreKey) -> impl Future<Output = Result<KeyState, StoreError>> + Send;

    /// Removes the key's completed record, unless a request holds the key in flight.
    fn purge(&self, key: &StoreKey) -> impl Future<Output = Result<Purged, StoreError>> + Send;
}

/// What [`Inspect::inspect`] found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing: never seen, released, expired, or purged. The next request executes.
    Unknown,
    /// A request holds the key under a lease.
    Locked(Locked),
    /// The key holds a record: its retries are replayed (or answered `409` for a record not
    /// retained) until it expires.
    Completed(Completed),
}

/// A key in flight: since when, and until when its lease runs unless renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    since: Option<SystemTime>,
    lease_until: SystemTime,
}

impl Locked {
    /// The key held by `lock`, whose lease runs until `lease_until`.
    pub fn new(lock: &LockToken, lease_until: SystemTime) -> Self {
        Self { since: lock.since(), lease_until }
    }

    /// When the lock was taken ([`LockToken::since`]); `None` for a lock whose token holds no
    /// time.
    pub fn since(&self) -> Option<SystemTime> {
        self.since
    }

    /// When the lease runs out unless its owner renews it (every third of it while the
    /// request runs). Past it, the key is free.
    pub fn lease_until(&self) -> SystemTime {
        self.lease_until
    }
}

/// A completed key: its record and until when it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    record: Record,
    expires_at: SystemTime,
}

impl Completed {
    /// The key holds `record` until `expires_at`.
    pub fn new(record: Record, expires_at: SystemTime) -> Self {
        Self { record, expires_at }
    }

    /// The record, as a replay would send it.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Whether the response was retained (a replay sends it); `false` for a not-retained
    /// record (retries get `409`).
    pub fn is_retained(&self) -> bool {
        matches!(self.record, Record::Response(_))
    }

    /// Where the record came from: when it completed, and the trace of the request that
    /// executed; `None` for a record not retained.
    pub fn origin(&self) -> Option<&Origin> {
        match &self.record {
            Record::Response(response) => Some(response.origin()),
            Record::NotRetained => None,
        }
    }

    /// When the response was complete (by the recording process's clock); `None` for a record
    /// not retained or written before records kept the time.
    pub fn completed_at(&self) -> Option<SystemTime> {
        self.origin()?.completed_at
    }

    /// The trace id of the request that executed (what a trace viewer finds it by); `None` for
    /// a record not retained, one written before records kept it, or a request that ran
    /// outside any trace.
    pub fn trace_id(&self) -> Option<[u8; 16]> {
        self.origin()?.trace_id()
    }

    /// Until when the record is kept: past it, the key is free.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The status a replay sends; `None` for a record not retained.
    pub fn status(&self) -> Option<StatusCode> {
        match &self.record {
            Record::Response(response) => Some(response.status()),
            Record::NotRetained => None,
        }
    }

    /// The body's length in bytes; `None` for a record not retained.
    pub fn size(&self) -> Option<usize> {
        match &self.record {
            Record::Response(response) => Some(response.body().len()),
            Record::NotRetained => None,
        }
    }
}

/// What [`Inspect::purge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purged {
    /// The record is gone: the next request with the key executes.
    Removed,
    /// The key held nothing (nothing, or only an expired entry, which is gone too).
    Unknown,
    /// Refused, nothing changed: a request holds the key in flight (see the
    /// [contract](Inspect#the-contract)).
    Locked,
}

//! What the map holds for a store key: a lock or a completed record.

use std::{
    hash::Hasher,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;

use super::live::Live;
use crate::store::{Fingerprint, LockToken, Record, StoreError, StoredResponse};

/// What the map holds for a store key: 128 bits of keyed hash. Two different keys share an id
/// with probability 2^-128, and only the process knows the hash keys, so none can be made to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct KeyId(pub(super) [u64; 2]);

impl std::hash::Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its first half is the map's hash.
        state.write_u64(self.0[0]);
    }
}

/// The map's hasher: passes a [`KeyId`]'s hash through.
#[derive(Default)]
pub(super) struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached (a `KeyId` writes one `u64`); a plain fold for completeness.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) enum Slot {
    /// `live`: the lock's live log, made by its first publish or follower only.
    Locked { token: LockToken, lease_until: Instant, live: Option<Arc<Live>> },
    Completed {
        fingerprint: Fingerprint,
        record: Stored,
        expires_at: Instant,
        /// The end of its grace ([`IdempotencyStore::complete_with_grace`]): `expires_at`
        /// without one. The slot is kept, record and all, until then.
        grace_until: Instant,
        seq: u64,
        weight: usize,
    },
}

/// A completed record as the map keeps it.
#[derive(Clone)]
pub(super) enum Stored {
    /// [`StoredResponse::encode_into`]: status, headers, trailers and body in one allocation
    /// of exactly the encoded length, which `Bytes` takes over as it is (no second buffer and
    /// copy, as `Arc<[u8]>` needed); its reference count is allocated when a replay first
    /// shares it.
    Response(Bytes),
    NotRetained,
}

impl Stored {
    pub(super) fn new(record: &Record) -> Self {
        match record {
            Record::Response(response) => {
                // `encode_into` reserves exactly the encoded length.
                let mut encoded = Vec::new();
                match response.encode_into(&mut encoded) {
                    Some(()) => Self::Response(Bytes::from(encoded)),
                    None => Self::NotRetained, // a field too large for the encoding
                }
            }
            Record::NotRetained => Self::NotRetained,
        }
    }

    /// The record back, its header values and body sharing this buffer.
    pub(super) fn to_record(&self) -> Result<Record, StoreError> {
        match self {
            Self::Response(encoded) => StoredResponse::decode(encoded.clone())
                .map(|response| Record::Response(Arc::new(response)))
                .map_err(StoreError::corrupt),
            Self::NotRetained => Ok(Record::NotRetained),
        }
    }
}

/// `now + by`, saturating at a century from now: `Duration::MAX` means "forever", not a panic.
pub(super) fn later(now: Instant, by: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now + by.min(CENTURY)
}

impl Slot {
    pub(super) fn expired(&self, now: Instant) -> bool {
        match self {
            Self::Locked { lease_until, .. } => *lease_until <= now,
            Self::Completed { grace_until, .. } => *grace_until <= now,
        }
    }

    /// Whether this is `lock`'s lock and its lease has not run out. An expired lock counts as
    /// absent for every operation: its old owner can no longer complete, renew or release it,
    /// whether or not another request took the key over since (as in Redis, where the key
    /// is gone).
    pub(super) fn is_live_lock(&self, lock: &LockToken, now: Instant) -> bool {
        matches!(self, Self::Locked { token, lease_until, .. } if token == lock && *lease_until > now)
    }

    /// Wakes the followers of the lock this slot held, now that it is replaced or removed, and
    /// frees its log (no longer counted in `bytes`).
    pub(super) fn end_live(&self, completed: bool, bytes: &AtomicUsize) {
        if let Self::Locked { live: Some(live), .. } = self {
            live.end(completed, bytes);
        }
    }

    /// The bytes of its record (a lock's live log counts its own, until it ends).
    pub(super) fn weight(&self) -> usize {
        match self {
            Self::Locked { .. } => 0,
            Self::Completed { weight, .. } => *weight,
        }
    }
}

//! The table's item: attribute names, the partition key of a store key, the clock, and reading
//! what an item says.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_sdk_dynamodb::{primitives::Blob, types::AttributeValue};
use bytes::Bytes;

use crate::store::{Fingerprint, Record, StoreError, StoreKey, StoredResponse};

/// The partition key (string).
pub(super) const PK: &str = "pk";
/// The fingerprint of the request that locked or completed the key (binary, 32 bytes).
pub(super) const FINGERPRINT: &str = "fp";
/// The lock's token (binary, 16 bytes), while locked.
pub(super) const TOKEN: &str = "tok";
/// The end of the lease (locked) or of the record's TTL (completed), in milliseconds since the
/// Unix epoch: what every operation judges expiry by.
pub(super) const EXPIRES: &str = "exp";
/// The same instant in whole seconds, rounded up: DynamoDB's TTL attribute.
pub(super) const TTL: &str = "ttl";
/// With a grace for expired keys: its end, in milliseconds since the Unix epoch (absent: none).
pub(super) const GRACE: &str = "gr";
/// The encoded response (binary), once completed; absent when not retained.
pub(super) const RESPONSE: &str = "rec";
/// The token of the lock that completed the key (16 bytes), then a number drawn for that one
/// `complete` call (16 bytes), by which the call knows itself if the SDK sends it again.
pub(super) const COMPLETED_BY: &str = "by";
/// How many events the live log holds (number), while locked.
pub(super) const LOG_LEN: &str = "n";
/// How many bytes the live log holds (number), while locked.
pub(super) const LOG_BYTES: &str = "lb";
/// The live log (a list of binary events), while locked and once something was published.
pub(super) const LOG: &str = "log";

/// DynamoDB's limit on one item: 400 KB, attribute names included.
pub(super) const ITEM_LIMIT: usize = 400 * 1024;
/// What a completed item holds beside its response, at most: the partition key (a 64-digit
/// scope, a separator, a key of up to 255 bytes, and the store's prefix, counted apart), the
/// fingerprint, the completing token, two numbers and the attribute names, rounded up.
pub(super) const ITEM_OVERHEAD: usize = 1024;

/// Now, on the process's system clock, in milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// `now + duration` in milliseconds (saturating).
pub(super) fn after(now: u64, duration: Duration) -> u64 {
    now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// The TTL attribute of an expiry in milliseconds: whole seconds, rounded up.
pub(super) fn ttl_seconds(expires_ms: u64) -> u64 {
    expires_ms.div_ceil(1000)
}

/// The partition key of `key`: the store's prefix, then the scope as 64 hex digits (`-` when
/// unscoped), `/`, and the key as sent.
pub(super) fn partition_key(prefix: &str, key: &StoreKey) -> String {
    let mut pk = String::with_capacity(prefix.len() + 66 + key.key().as_str().len());
    pk.push_str(prefix);
    match key.scope() {
        Some(scope) => {
            for byte in scope.as_bytes() {
                pk.push_str(&format!("{byte:02x}"));
            }
        }
        None => pk.push('-'),
    }
    pk.push('/');
    pk.push_str(key.key().as_str());
    pk
}

pub(super) fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

pub(super) fn binary(bytes: impl Into<Vec<u8>>) -> AttributeValue {
    AttributeValue::B(Blob::new(bytes))
}

pub(super) fn token_bytes(id: u128) -> AttributeValue {
    binary(id.to_be_bytes().to_vec())
}

/// What one item says, read from its attributes.
#[derive(Debug)]
pub(super) struct Item<'a>(pub(super) &'a HashMap<String, AttributeValue>);

impl Item<'_> {
    fn corrupt(what: &str) -> StoreError {
        StoreError::corrupt(format!("DynamoDB item: {what}"))
    }

    fn blob(&self, name: &str) -> Result<Option<&[u8]>, StoreError> {
        match self.0.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::B(blob)) => Ok(Some(blob.as_ref())),
            Some(_) => Err(Self::corrupt(name)),
        }
    }

    fn u64(&self, name: &str) -> Result<Option<u64>, StoreError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(AttributeValue::N(n)) => n.parse().map(Some).map_err(|_| Self::corrupt(name)),
            Some(_) => Err(Self::corrupt(name)),
        }
    }

    fn id(&self, name: &str) -> Result<Option<u128>, StoreError> {
        self.blob(name)?
            .map(|bytes| <[u8; 16]>::try_from(bytes).map(u128::from_be_bytes).map_err(|_| Self::corrupt(name)))
            .transpose()
    }

    /// The item's fingerprint.
    pub(super) fn fingerprint(&self) -> Result<Fingerprint, StoreError> {
        let bytes = self.blob(FINGERPRINT)?.ok_or_else(|| Self::corrupt("no fingerprint"))?;
        <[u8; 32]>::try_from(bytes).map(Fingerprint::from_bytes).map_err(|_| Self::corrupt(FINGERPRINT))
    }

    /// The lock's token id, while locked.
    pub(super) fn token(&self) -> Result<Option<u128>, StoreError> {
        self.id(TOKEN)
    }

    /// The token id of the lock that completed the key, once completed.
    pub(super) fn completed_by(&self) -> Result<Option<u128>, StoreError> {
        self.blob(COMPLETED_BY)?
            .map(|bytes| {
                bytes
                    .get(..16)
                    .and_then(|id| <[u8; 16]>::try_from(id).ok())
                    .map(u128::from_be_bytes)
                    .ok_or_else(|| Self::corrupt(COMPLETED_BY))
            })
            .transpose()
    }

    /// The whole `by` attribute: the completing token and its call's number.
    pub(super) fn completion(&self) -> Result<Option<&[u8]>, StoreError> {
        self.blob(COMPLETED_BY)
    }

    /// Whether the item's lease or TTL has run out at `now`.
    pub(super) fn expired(&self, now: u64) -> Result<bool, StoreError> {
        Ok(self.u64(EXPIRES)?.ok_or_else(|| Self::corrupt("no expiry"))? <= now)
    }

    /// Whether it is a record past its TTL, within its grace.
    pub(super) fn in_grace(&self, now: u64) -> Result<bool, StoreError> {
        Ok(self.expired(now)? && self.u64(GRACE)?.is_some_and(|end| now < end))
    }

    /// When the item's lease or TTL runs out.
    pub(super) fn expires_at(&self) -> Result<SystemTime, StoreError> {
        let expires = self.u64(EXPIRES)?.ok_or_else(|| Self::corrupt("no expiry"))?;
        UNIX_EPOCH.checked_add(Duration::from_millis(expires)).ok_or_else(|| Self::corrupt(EXPIRES))
    }

    /// How many events the live log holds.
    pub(super) fn log_len(&self) -> Result<u64, StoreError> {
        Ok(self.u64(LOG_LEN)?.unwrap_or(0))
    }

    /// The live log's events, encoded.
    pub(super) fn log(&self) -> Result<&[AttributeValue], StoreError> {
        match self.0.get(LOG) {
            None => Ok(&[]),
            Some(AttributeValue::L(events)) => Ok(events),
            Some(_) => Err(Self::corrupt(LOG)),
        }
    }

    /// The record of a completed item.
    pub(super) fn record(&self) -> Result<Record, StoreError> {
        match self.blob(RESPONSE)? {
            None => Ok(Record::NotRetained),
            Some(encoded) => StoredResponse::decode(Bytes::copy_from_slice(encoded))
                .map(|response| Record::Response(Arc::new(response)))
                .map_err(|error| Self::corrupt(error.0)),
        }
    }
}

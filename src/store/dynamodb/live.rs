//! The live log of join and wait modes, kept in the lock's item: `publish` appends to it under
//! the lock's token, `follow` polls it (DynamoDB has no push channel).

use std::{collections::HashMap, time::Duration};

use aws_sdk_dynamodb::types::AttributeValue;
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::{DynamoDbStore, item::*, sdk_error};
use crate::store::{
    Fingerprint, Followed, LiveCursor, LiveEvent, LockToken, StoreError, StoreKey, decode_head, encode_head,
};

/// Tags of an encoded event (its first byte).
const HEAD: u8 = 0;
const DATA: u8 = 1;
const EVENT_END: u8 = 2;

/// One event as one binary list element: its tag, then the head (as every store writes it:
/// [`encode_head`], a record with its origin and without a body), the data, or the event id.
fn encode(event: &LiveEvent) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match event {
        LiveEvent::Head { status, headers, origin } => {
            out.push(HEAD);
            encode_head(*status, headers.clone(), *origin, &mut out)?;
        }
        LiveEvent::Data(data) => {
            out.push(DATA);
            out.extend_from_slice(data);
        }
        LiveEvent::EventEnd(id) => {
            out.push(EVENT_END);
            out.extend_from_slice(id);
        }
    }
    Some(out)
}

fn decode(value: &AttributeValue) -> Result<LiveEvent, StoreError> {
    let corrupt = |what: &str| StoreError::corrupt(format!("DynamoDB live log: {what}"));
    let AttributeValue::B(blob) = value else { return Err(corrupt("not binary")) };
    let (&tag, rest) = blob.as_ref().split_first().ok_or_else(|| corrupt("empty event"))?;
    let rest = Bytes::from(BytesMut::from(rest));
    match tag {
        HEAD => decode_head(rest).map_err(|error| corrupt(error.0)),
        DATA => Ok(LiveEvent::Data(rest)),
        EVENT_END => Ok(LiveEvent::EventEnd(rest)),
        _ => Err(corrupt("unknown tag")),
    }
}

/// What one read of the item tells a follower.
enum Read {
    /// Something to return: new events, or the end.
    News(Followed),
    /// The lock is live and nothing is new past `cursor`.
    Nothing(LiveCursor),
}

/// Reads the item `found` (`None`: absent) for a follower of `fingerprint` at `cursor`.
fn read(
    found: Option<&HashMap<String, AttributeValue>>,
    fingerprint: &Fingerprint,
    cursor: Option<LiveCursor>,
    now: u64,
) -> Result<Read, StoreError> {
    let ended = |completed| Ok(Read::News(Followed::Ended { completed }));
    let Some(found) = found else { return ended(false) };
    let item = Item(found);
    if item.expired(now)? {
        return ended(false);
    }
    let Some(token) = item.token()? else {
        // Completed: by the followed lock, or (no cursor) for the same request.
        let completed = match cursor {
            Some(cursor) => item.completed_by()? == Some(cursor.lock()),
            None => item.fingerprint()? == *fingerprint,
        };
        return ended(completed);
    };
    let cursor = match cursor {
        Some(cursor) if cursor.lock() == token => cursor,
        // Another lock holds the key now: the one followed ended without a record.
        Some(_) => return ended(false),
        None if item.fingerprint()? == *fingerprint => LiveCursor::new(token, 0),
        None => return ended(false),
    };
    let log = item.log()?;
    let read = usize::try_from(cursor.read()).unwrap_or(usize::MAX);
    if read >= log.len() {
        return Ok(Read::Nothing(cursor));
    }
    let events = log[read..].iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let cursor = LiveCursor::new(token, log.len() as u64);
    Ok(Read::News(Followed::Live { events, cursor }))
}

impl DynamoDbStore {
    /// [`LiveLog::publish`](crate::store::LiveLog::publish): appends the events past the log's
    /// end, while the lock is live. Events that would take the log past its byte bound are
    /// refused ([`StoreError::capacity`]), and nothing of them is appended.
    pub(super) async fn publish_events(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        mut from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        let mut encoded = events.iter().map(encode).collect::<Option<Vec<_>>>().unwrap_or_default();
        // Twice at most: a first attempt that finds the log already holds some of the events
        // (a publish sent again) appends the rest.
        for _ in 0..2 {
            if encoded.is_empty() {
                return Ok(());
            }
            // A list element costs its bytes and one more.
            let bytes: u64 = encoded.iter().map(|event| event.len() as u64 + 1).sum();
            let Some(room) = self.inner.live_log_limit.checked_sub(bytes) else {
                return Err(StoreError::capacity());
            };
            let count = encoded.len() as u64;
            let values = [
                (":events", AttributeValue::L(encoded.iter().cloned().map(binary).collect())),
                (":empty", AttributeValue::L(Vec::new())),
                (":from", number(from)),
                (":count", number(count)),
                (":bytes", number(bytes)),
                (":room", number(room)),
            ];
            let names = [("#log", LOG), ("#n", LOG_LEN), ("#lb", LOG_BYTES)];
            let update = "SET #log = list_append(if_not_exists(#log, :empty), :events), #n = #n + :count, \
                          #lb = #lb + :bytes";
            let now = now_ms();
            let condition = "#tok = :token AND #exp > :now AND #n = :from AND #lb <= :room";
            let Some(found) = self.owner_update_if(key, lock, now, update, condition, values, &names).await? else {
                return Ok(());
            };
            let found = Item(&found);
            if found.0.is_empty() || found.token()? != Some(lock.id()) || found.expired(now)? {
                // No longer held: nothing to write.
                return Ok(());
            }
            let len = found.log_len()?;
            if len == from {
                // The lock is the caller's and the log ends at `from`: the byte bound failed.
                return Err(StoreError::capacity());
            }
            // Before `from`, a gap; past the events, all of them were there already.
            if len < from || len >= from + count {
                return Ok(());
            }
            encoded.drain(..usize::try_from(len - from).unwrap_or(usize::MAX).min(encoded.len()));
            from = len;
        }
        Ok(())
    }

    /// [`LiveLog::follow`](crate::store::LiveLog::follow): reads the item at once, then every
    /// polling interval until something is new, the log ends, or `timeout`.
    pub(super) async fn follow_log(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        mut cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            let request =
                self.inner.client.get_item().table_name(&self.inner.table).key(PK, self.pk(key)).consistent_read(true);
            let found = self.run(async { request.send().await.map_err(sdk_error) }).await?;
            match read(found.item(), fingerprint, cursor, now_ms())? {
                Read::News(news) => return Ok(news),
                Read::Nothing(at) => cursor = Some(at),
            }
            let now = Instant::now();
            if now >= deadline {
                let cursor = cursor.expect("a live lock's read sets the cursor");
                return Ok(Followed::Live { events: Vec::new(), cursor });
            }
            tokio::time::sleep(self.inner.follow_interval.min(deadline - now)).await;
        }
    }
}

//! The binary layout of one Redis value: a lock, a recorded response or a not-retained record;
//! and of the entries of a lock's live log (a Redis stream).
//!
//! ```text
//! offset  bytes  field
//! 0       1      tag: b'L' lock | b'R' response | b'T' not-retained record
//! 1       32     fingerprint of the request that locked or completed the key
//! ---- lock: 49 bytes in all
//! 33      16     lock token id, big-endian
//! ---- not-retained record: 33 bytes in all
//! ---- response:
//! 33      2      status, big-endian
//! 35      2      header field count N, big-endian
//!         N x    name length (u16 BE), name, value length (u32 BE), value
//!         1      trailers: 0 none, 1 present, then a count and fields as for the headers
//!         rest   the body, raw, up to the end of the value
//! ```
//!
//! The scripts read only the first 33 (`begin`) or 49 (`complete`, `renew`, `release`) bytes;
//! only this module parses a response. The tag doubles as the layout version: a later layout
//! gets new tags, and a value with an unknown tag is reported as corrupt.
//!
//! A live log entry has one field, named by a letter, and its id says where it is:
//!
//! ```text
//! id       field  value
//! 0-1      o      empty: the log was opened by a follower before anything was published
//! 1-(i+1)  h      event i is the head: status, headers and origin, as a record's (no body)
//! 1-(i+1)  d      event i is body data: the bytes, raw
//! 1-(i+1)  e      event i ends a text/event-stream event: its id, raw
//! 2-0      c      the end: 1 a record replaced the lock, 0 it was released
//! ```

use std::sync::Arc;

use ::redis::Value;
use bytes::Bytes;

use crate::store::{Fingerprint, LiveEvent, LockToken, Record, StoreError, StoredResponse, decode_head, encode_head};

/// Tag of an in-flight lock.
pub(super) const LOCK: u8 = b'L';
/// Tag of a recorded response.
pub(super) const RESPONSE: u8 = b'R';
/// Tag of a not-retained record (the response was not retained).
pub(super) const NOT_RETAINED: u8 = b'T';

/// Bytes before any tag-specific field: the tag and the fingerprint.
const PREFIX_LEN: usize = 1 + 32;
/// Length of a lock value.
pub(super) const LOCK_LEN: usize = PREFIX_LEN + 16;

/// The value of the lock `token` holds: what the owner-only scripts compare.
pub(super) fn lock_value(token: &LockToken) -> [u8; LOCK_LEN] {
    let mut value = [0; LOCK_LEN];
    value[0] = LOCK;
    value[1..PREFIX_LEN].copy_from_slice(token.fingerprint().as_bytes());
    value[PREFIX_LEN..].copy_from_slice(&token.id().to_be_bytes());
    value
}

/// Encodes a completed record for `fingerprint`: the tag and fingerprint, then the response in
/// [`StoredResponse::encode_into`]'s layout.
///
/// A response with a field too large for the layout (a header map of more than 65 535 fields,
/// a value over 4 GiB) cannot be kept, so it becomes a not-retained record, like any response too large
/// to retain.
pub(super) fn encode_record(fingerprint: &Fingerprint, record: &Record) -> Vec<u8> {
    let Record::Response(response) = record else { return not_retained(fingerprint) };
    let mut out = Vec::with_capacity(PREFIX_LEN + response.encoded_len());
    out.push(RESPONSE);
    out.extend_from_slice(fingerprint.as_bytes());
    match response.encode_into(&mut out) {
        Some(()) => out,
        None => not_retained(fingerprint),
    }
}

fn not_retained(fingerprint: &Fingerprint) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN);
    out.push(NOT_RETAINED);
    out.extend_from_slice(fingerprint.as_bytes());
    out
}

/// The lock a lock value holds.
pub(super) fn decode_lock(value: &[u8]) -> Result<LockToken, StoreError> {
    if value.len() != LOCK_LEN || value[0] != LOCK {
        return Err(corrupt("not a lock value"));
    }
    let fingerprint: [u8; 32] = value[1..PREFIX_LEN].try_into().expect("32 bytes");
    let id: [u8; 16] = value[PREFIX_LEN..].try_into().expect("16 bytes");
    Ok(LockToken::from_parts(u128::from_be_bytes(id), Fingerprint::from_bytes(fingerprint)))
}

/// Decodes a completed record (a response or a not-retained record). The body and header values are
/// slices of `value`, not copies.
pub(super) fn decode_record(value: Vec<u8>) -> Result<Record, StoreError> {
    if value.len() < PREFIX_LEN {
        return Err(corrupt("truncated"));
    }
    // The fingerprint, already compared by the script, is skipped.
    match value[0] {
        NOT_RETAINED if value.len() == PREFIX_LEN => Ok(Record::NotRetained),
        RESPONSE => StoredResponse::decode(Bytes::from(value).slice(PREFIX_LEN..))
            .map(|response| Record::Response(Arc::new(response)))
            .map_err(|error| corrupt(error.0)),
        NOT_RETAINED => Err(corrupt("trailing bytes after a not-retained record")),
        LOCK => Err(corrupt("a lock where a record was expected")),
        _ => Err(corrupt("unknown value tag")),
    }
}

/// The field and value of the live log entry of `event`.
///
/// `None` for a head too large for the layout (more than 65 535 header fields, a value over
/// 4 GiB): like its record, which is then not retained, it cannot be published.
pub(super) fn encode_event(event: LiveEvent) -> Option<(&'static [u8], Bytes)> {
    Some(match event {
        LiveEvent::Head { status, headers, origin } => {
            let mut out = Vec::new();
            encode_head(status, headers, origin, &mut out)?;
            (b"h", Bytes::from(out))
        }
        LiveEvent::Data(data) => (b"d", data),
        LiveEvent::EventEnd(id) => (b"e", id),
    })
}

/// One entry of a live log, as read back.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    /// The placeholder a follower opens the log with.
    Open,
    /// Event `index` of the log.
    Event(u64, LiveEvent),
    /// The lock is gone: `true` when a record replaced it.
    End(bool),
}

/// Decodes one entry of an `XRANGE` or `XREAD` reply: `[id, [field, value]]`.
pub(super) fn decode_entry(entry: Value) -> Result<Entry, StoreError> {
    let Value::Array(parts) = entry else { return Err(corrupt("a live log entry is not an array")) };
    let [Value::BulkString(id), fields] = <[Value; 2]>::try_from(parts).map_err(|_| corrupt("live log entry"))? else {
        return Err(corrupt("live log entry"));
    };
    let mut fields = match fields {
        Value::Array(fields) => fields,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(field, value)| [field, value]).collect(),
        _ => return Err(corrupt("live log entry fields")),
    };
    let (Some(Value::BulkString(value)), Some(Value::BulkString(field))) = (fields.pop(), fields.pop()) else {
        return Err(corrupt("live log entry fields"));
    };
    let index = match id.as_slice() {
        b"0-1" => return Ok(Entry::Open),
        b"2-0" if field == b"c" => return Ok(Entry::End(value == b"1")),
        _ => id
            .strip_prefix(b"1-")
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
            .and_then(|n| n.checked_sub(1))
            .ok_or_else(|| corrupt("live log entry id"))?,
    };
    let value = Bytes::from(value);
    let event = match field.as_slice() {
        b"h" => decode_head(value).map_err(|error| corrupt(error.0))?,
        b"d" => LiveEvent::Data(value),
        b"e" => LiveEvent::EventEnd(value),
        _ => return Err(corrupt("live log entry field")),
    };
    Ok(Entry::Event(index, event))
}

fn corrupt(what: &'static str) -> StoreError {
    StoreError::corrupt(format!("Redis value: {what}"))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;
    use crate::{Origin, TraceContext};

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([7; 32])
    }

    fn response() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(b"\x00\xff{\"id\":1}\r\n"))
            .with_trailers(trailers)
    }

    #[test]
    fn lock_value_layout() {
        let token = LockToken::from_parts(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10, fp());
        let value = lock_value(&token);
        assert_eq!(value[0], b'L');
        assert_eq!(&value[1..33], &[7; 32]);
        assert_eq!(&value[33..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn response_round_trips_with_the_documented_layout() {
        let stored = response();
        let encoded = encode_record(&fp(), &Record::Response(Arc::new(stored.clone())));
        let mut expected = vec![b'R'];
        expected.extend_from_slice(&[7; 32]);
        expected.extend_from_slice(&[0, 201, 0, 3]);
        expected.extend_from_slice(b"\x00\x0ccontent-type\x00\x00\x00\x10application/json");
        expected.extend_from_slice(b"\x00\x07x-multi\x00\x00\x00\x03one");
        expected.extend_from_slice(b"\x00\x07x-multi\x00\x00\x00\x03two");
        expected.extend_from_slice(b"\x01\x00\x01\x00\x0bgrpc-status\x00\x00\x00\x010");
        expected.extend_from_slice(b"\x00\xff{\"id\":1}\r\n");
        assert_eq!(encoded, expected);
        match decode_record(encoded).unwrap() {
            Record::Response(got) => assert_eq!(*got, stored),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_trailers_and_empty_body() {
        let stored = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
        let encoded = encode_record(&fp(), &Record::Response(Arc::new(stored.clone())));
        assert_eq!(encoded.len(), 33 + 2 + 2 + 1);
        match decode_record(encoded).unwrap() {
            Record::Response(got) => assert_eq!(*got, stored),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_retained_round_trips() {
        let encoded = encode_record(&fp(), &Record::NotRetained);
        assert_eq!(encoded.len(), 33);
        assert_eq!(encoded[0], b'T');
        assert_eq!(decode_record(encoded).unwrap(), Record::NotRetained);
    }

    fn entry(id: &str, field: &str, value: &[u8]) -> Value {
        let fields = vec![Value::BulkString(field.into()), Value::BulkString(value.to_vec())];
        Value::Array(vec![Value::BulkString(id.into()), Value::Array(fields)])
    }

    #[test]
    fn live_events_round_trip_with_the_documented_layout() {
        let head = response();
        let events = [
            LiveEvent::Head { status: head.status, headers: head.headers.clone(), origin: Origin::default() },
            LiveEvent::Head {
                status: head.status,
                headers: head.headers.clone(),
                origin: Origin {
                    caller: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                    span: TraceContext::new([0xab; 16], [0xcd; 8], 1),
                    completed_at: None,
                },
            },
            LiveEvent::Data(Bytes::from_static(b"\x00\xff\r\n")),
            LiveEvent::EventEnd(Bytes::from_static(b"evt-7")),
        ];
        for (index, event) in events.into_iter().enumerate() {
            let (field, value) = encode_event(event.clone()).unwrap();
            let id = format!("1-{}", index + 1);
            let decoded = decode_entry(entry(&id, std::str::from_utf8(field).unwrap(), &value)).unwrap();
            assert_eq!(decoded, Entry::Event(index as u64, event));
        }
        let (field, value) = encode_event(LiveEvent::Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            origin: Origin::default(),
        })
        .unwrap();
        assert_eq!((field, &value[..]), (&b"h"[..], &[0, 200, 0, 0, 0][..]), "status, no headers, flags");
        assert_eq!(decode_entry(entry("0-1", "o", b"")).unwrap(), Entry::Open);
        assert_eq!(decode_entry(entry("2-0", "c", b"1")).unwrap(), Entry::End(true));
        assert_eq!(decode_entry(entry("2-0", "c", b"0")).unwrap(), Entry::End(false));
    }

    #[test]
    fn damaged_entries_are_corrupt() {
        for bad in [
            entry("1-0", "d", b"x"),
            entry("1-x", "d", b"x"),
            entry("3-0", "d", b"x"),
            entry("1-1", "z", b"x"),
            entry("1-1", "h", b"\x00"),
            Value::Nil,
            Value::Array(vec![Value::BulkString(b"1-1".to_vec())]),
            Value::Array(vec![Value::BulkString(b"1-1".to_vec()), Value::Array(vec![])]),
        ] {
            assert!(decode_entry(bad.clone()).unwrap_err().is_corrupt(), "{bad:?}");
        }
    }

    #[test]
    fn damaged_values_are_corrupt_never_a_panic() {
        let encoded = encode_record(&fp(), &Record::Response(Arc::new(response())));
        // Every truncation that cuts into the header section fails to decode.
        let body_at = encoded.len() - response().body.len();
        for len in 0..body_at {
            let err = decode_record(encoded[..len].to_vec()).unwrap_err();
            assert!(err.is_corrupt(), "length {len}: {err:?}");
        }
        let mut bad = encoded.clone();
        bad[0] = b'X';
        assert!(decode_record(bad).unwrap_err().is_corrupt());
        let mut bad = encoded.clone();
        bad[33..35].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode_record(bad).unwrap_err().is_corrupt());
        let mut bad = encoded.clone();
        bad[35..37].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode_record(bad).unwrap_err().is_corrupt());
        let mut bad = encoded.clone();
        bad[39] = b' '; // A space in a header name.
        assert!(decode_record(bad).unwrap_err().is_corrupt());
        let token = LockToken::from_parts(1, fp());
        assert!(decode_record(lock_value(&token).to_vec()).unwrap_err().is_corrupt());
        let mut not_retained = encode_record(&fp(), &Record::NotRetained);
        not_retained.push(0);
        assert!(decode_record(not_retained).unwrap_err().is_corrupt());
    }
}

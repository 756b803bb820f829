//! The binary layout of one Redis value: a lock, a recorded response or a not-retained record.
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

use std::sync::Arc;

use bytes::Bytes;

use crate::store::{Fingerprint, LockToken, Record, StoreError, StoredResponse};

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

fn corrupt(what: &'static str) -> StoreError {
    StoreError::corrupt(format!("Redis value: {what}"))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;

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

//! [`LiveEvent`]s as the `events` column of the live log holds them: each one its length (4
//! bytes, big-endian), then a tag byte and the head (as every store writes it:
//! [`encode_head`], a record with its origin and without a body), the data, or the event id.
//! `publish` hands PostgreSQL each event [`encode`]d, and the statement prefixes the lengths
//! (so that it can leave out the events the log already holds); a read [`decode_row`]s each
//! row.

use bytes::Bytes;

use crate::store::{LiveEvent, decode_head, encode_head};

const HEAD: u8 = b'H';
const DATA: u8 = b'D';
const EVENT_END: u8 = b'E';

/// `event` encoded; `None` when its head cannot be encoded (more than 65 535 header fields, a
/// value over 4 GiB), as a record with such a head cannot be kept either.
pub(super) fn encode(event: &LiveEvent) -> Option<Vec<u8>> {
    match event {
        LiveEvent::Head { status, headers, origin } => {
            let mut out = vec![HEAD];
            encode_head(*status, headers.clone(), *origin, &mut out)?;
            Some(out)
        }
        LiveEvent::Data(data) => Some(tagged(DATA, data)),
        LiveEvent::EventEnd(id) => Some(tagged(EVENT_END, id)),
    }
}

fn tagged(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + bytes.len());
    out.push(tag);
    out.extend_from_slice(bytes);
    out
}

/// The events of one row, appended to `out`; their data share the row's memory.
pub(super) fn decode_row(row: Vec<u8>, out: &mut Vec<LiveEvent>) -> Result<(), &'static str> {
    let mut row = Bytes::from(row);
    while !row.is_empty() {
        let len = row.get(..4).ok_or("a truncated live row")?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if row.len() - 4 < len {
            return Err("a truncated live row");
        }
        let mut event = row.split_to(4 + len);
        let _ = event.split_to(4);
        out.push(decode(event)?);
    }
    Ok(())
}

/// Reads back what [`encode`] wrote; the data shares `encoded`'s memory.
fn decode(mut encoded: Bytes) -> Result<LiveEvent, &'static str> {
    if encoded.is_empty() {
        return Err("empty live event");
    }
    let tag = encoded.split_to(1)[0];
    match tag {
        HEAD => decode_head(encoded).map_err(|error| error.0),
        DATA => Ok(LiveEvent::Data(encoded)),
        EVENT_END => Ok(LiveEvent::EventEnd(encoded)),
        _ => Err("unknown live event tag"),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;
    use crate::{Origin, TraceContext};

    #[test]
    fn events_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        for event in [
            LiveEvent::Head { status: StatusCode::OK, headers, origin: Origin::default() },
            LiveEvent::Head {
                status: StatusCode::NO_CONTENT,
                headers: HeaderMap::new(),
                origin: Origin { span: TraceContext::new([0xab; 16], [0xcd; 8], 1), ..Origin::default() },
            },
            LiveEvent::Data(Bytes::from_static(b"\x00\xffdata: 1\n\n")),
            LiveEvent::Data(Bytes::new()),
            LiveEvent::EventEnd(Bytes::from_static(b"evt-7")),
        ] {
            assert_eq!(decode(Bytes::from(encode(&event).unwrap())).unwrap(), event);
        }
    }

    /// A row as the publish statement writes it: each encoded event after its length.
    fn row(events: &[LiveEvent]) -> Vec<u8> {
        let mut row = Vec::new();
        for event in events {
            let encoded = encode(event).unwrap();
            row.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            row.extend_from_slice(&encoded);
        }
        row
    }

    #[test]
    fn rows_round_trip() {
        let events = vec![
            LiveEvent::Data(Bytes::from_static(b"a")),
            LiveEvent::EventEnd(Bytes::new()),
            LiveEvent::Data(Bytes::new()),
        ];
        let mut out = Vec::new();
        decode_row(row(&events), &mut out).unwrap();
        decode_row(Vec::new(), &mut out).unwrap();
        assert_eq!(out, events);
    }

    #[test]
    fn damaged_events_are_errors() {
        for damaged in [&b""[..], b"X", b"H", b"H\x00\xc8\x00\x00\x00body"] {
            assert!(decode(Bytes::copy_from_slice(damaged)).is_err(), "{damaged:?}");
        }
        let mut out = Vec::new();
        for damaged in [&b"\x00\x00"[..], b"\x00\x00\x00\x05Dab", b"\x00\x00\x00\x00"] {
            assert!(decode_row(damaged.to_vec(), &mut out).is_err(), "{damaged:?}");
        }
    }
}

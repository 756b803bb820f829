//! A [`LiveEvent`] as the `event` column of the live log holds it: a tag byte, then the head
//! (as [`StoredResponse::encode_into`] writes a record without a body), the data, or the
//! event id.

use bytes::Bytes;

use crate::store::{LiveEvent, StoredResponse};

const HEAD: u8 = b'H';
const DATA: u8 = b'D';
const EVENT_END: u8 = b'E';

/// `event` encoded; `None` when its head cannot be encoded (more than 65 535 header fields, a
/// value over 4 GiB), as a record with such a head cannot be kept either.
pub(super) fn encode(event: &LiveEvent) -> Option<Vec<u8>> {
    match event {
        LiveEvent::Head { status, headers } => {
            let head = StoredResponse::new(*status, headers.clone(), Bytes::new());
            let mut out = Vec::with_capacity(1 + head.encoded_len());
            out.push(HEAD);
            head.encode_into(&mut out)?;
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

/// Reads back what [`encode`] wrote; the data shares `encoded`'s memory.
pub(super) fn decode(encoded: Vec<u8>) -> Result<LiveEvent, &'static str> {
    let mut encoded = Bytes::from(encoded);
    if encoded.is_empty() {
        return Err("empty live event");
    }
    let tag = encoded.split_to(1)[0];
    match tag {
        HEAD => {
            let head = StoredResponse::decode(encoded).map_err(|error| error.0)?;
            if !head.body.is_empty() || head.trailers.is_some() {
                return Err("a live head with a body");
            }
            Ok(LiveEvent::Head { status: head.status, headers: head.headers })
        }
        DATA => Ok(LiveEvent::Data(encoded)),
        EVENT_END => Ok(LiveEvent::EventEnd(encoded)),
        _ => Err("unknown live event tag"),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;

    #[test]
    fn events_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        for event in [
            LiveEvent::Head { status: StatusCode::OK, headers },
            LiveEvent::Head { status: StatusCode::NO_CONTENT, headers: HeaderMap::new() },
            LiveEvent::Data(Bytes::from_static(b"\x00\xffdata: 1\n\n")),
            LiveEvent::Data(Bytes::new()),
            LiveEvent::EventEnd(Bytes::from_static(b"evt-7")),
        ] {
            assert_eq!(decode(encode(&event).unwrap()).unwrap(), event);
        }
    }

    #[test]
    fn damaged_events_are_errors() {
        for damaged in [&b""[..], b"X", b"H", b"H\x00\xc8\x00\x00\x00body"] {
            assert!(decode(damaged.to_vec()).is_err(), "{damaged:?}");
        }
    }
}

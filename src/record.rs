//! The stored response: what a replay sends back, and its compact encoding.

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

/// A completed response as kept by a store: status, end-to-end headers, body and trailers.
///
/// Headers that must not be replayed (hop-by-hop, `Content-Length`, `Date`, `Set-Cookie` by
/// default) are removed before a record is made; see
/// [`IdempotencyLayer::with_unstored_headers`](crate::IdempotencyLayer::with_unstored_headers).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The response status.
    pub status: StatusCode,
    /// The end-to-end headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, when the response had any (gRPC keeps its status there).
    pub trailers: Option<HeaderMap>,
}

impl StoredResponse {
    /// Bytes this record holds: body, header names and values, trailers.
    ///
    /// Stores use it to bound their memory; it leaves out the fixed size of the struct itself.
    pub fn weight(&self) -> usize {
        fn map_weight(map: &HeaderMap) -> usize {
            map.iter().map(|(name, value)| name.as_str().len() + value.len()).sum()
        }
        self.body.len() + map_weight(&self.headers) + self.trailers.as_ref().map_or(0, map_weight)
    }

    /// The replay: same status, headers and body bytes (shared, not copied), plus
    /// `Idempotent-Replayed: true` and a recomputed `Content-Length`. The headers are moved out
    /// when no one else holds the record (a store that decodes a record per lookup), cloned
    /// otherwise.
    pub(crate) fn replay(self: std::sync::Arc<Self>) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
        let Self { status, mut headers, body, trailers } = std::sync::Arc::unwrap_or_clone(self);
        headers.insert(crate::IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        parts.headers = headers;
        (parts, body, trailers)
    }

    /// The record as one buffer: status, headers, trailers, then the body.
    ///
    /// Lengths are prefixed (`u16` names, `u32` values and counts), so the encoding is
    /// unambiguous; [`decode`](Self::decode) reads it back without copying the body or the
    /// header values. A store that keeps many records uses it to hold each in one exact-size
    /// allocation instead of a header map, a struct and a body.
    pub(crate) fn encode(&self) -> Vec<u8> {
        fn map_len(map: &HeaderMap) -> usize {
            4 + map.iter().map(|(name, value)| 2 + name.as_str().len() + 4 + value.len()).sum::<usize>()
        }
        fn put_map(out: &mut Vec<u8>, map: &HeaderMap) {
            out.put_u32(map.len() as u32);
            for (name, value) in map {
                out.put_u16(name.as_str().len() as u16);
                out.put_slice(name.as_str().as_bytes());
                out.put_u32(value.len() as u32);
                out.put_slice(value.as_bytes());
            }
        }
        let len = 2 + map_len(&self.headers) + 1 + self.trailers.as_ref().map_or(0, map_len) + self.body.len();
        let mut out = Vec::with_capacity(len);
        out.put_u16(self.status.as_u16());
        put_map(&mut out, &self.headers);
        match &self.trailers {
            Some(trailers) => {
                out.put_u8(1);
                put_map(&mut out, trailers);
            }
            None => out.put_u8(0),
        }
        out.put_slice(&self.body);
        out
    }

    /// Reads back what [`encode`](Self::encode) wrote; header values and the body share
    /// `encoded`'s memory.
    pub(crate) fn decode(mut encoded: Bytes) -> Result<Self, DecodeError> {
        fn map(encoded: &mut Bytes) -> Result<HeaderMap, DecodeError> {
            let count = encoded.try_get_u32().map_err(|_| DecodeError)? as usize;
            let mut map = HeaderMap::with_capacity(count);
            for _ in 0..count {
                let len = encoded.try_get_u16().map_err(|_| DecodeError)? as usize;
                let name = HeaderName::from_bytes(encoded.get(..len).ok_or(DecodeError)?).map_err(|_| DecodeError)?;
                encoded.advance(len);
                let len = encoded.try_get_u32().map_err(|_| DecodeError)? as usize;
                if encoded.len() < len {
                    return Err(DecodeError);
                }
                let value = HeaderValue::from_maybe_shared(encoded.split_to(len)).map_err(|_| DecodeError)?;
                map.append(name, value);
            }
            Ok(map)
        }
        let status = StatusCode::from_u16(encoded.try_get_u16().map_err(|_| DecodeError)?).map_err(|_| DecodeError)?;
        let headers = map(&mut encoded)?;
        let trailers = match encoded.try_get_u8().map_err(|_| DecodeError)? {
            0 => None,
            _ => Some(map(&mut encoded)?),
        };
        Ok(Self { status, headers, body: encoded, trailers })
    }
}

/// A buffer that is not a record [`StoredResponse::encode`] wrote.
#[derive(Debug)]
pub(crate) struct DecodeError;

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not an encoded record")
    }
}

impl std::error::Error for DecodeError {}

/// What a completed key holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The response, replayed to every retry.
    Response(std::sync::Arc<StoredResponse>),
    /// A tombstone: the request ran, but its response was too large to keep. Retries get `409`
    /// with problem type `response-not-retained`, so the handler never runs twice.
    NotRetained,
}

impl Record {
    /// Bytes this record holds beyond its fixed size (see [`StoredResponse::weight`]).
    pub fn weight(&self) -> usize {
        match self {
            Self::Response(r) => r.weight(),
            Self::NotRetained => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        for (body, trailers) in [(&b"{}"[..], None), (b"", Some(trailers)), (&[0xff; 3000][..], None)] {
            let record = StoredResponse {
                status: StatusCode::CREATED,
                headers: headers.clone(),
                body: Bytes::copy_from_slice(body),
                trailers,
            };
            assert_eq!(StoredResponse::decode(Bytes::from(record.encode())).unwrap(), record);
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"\x00")).is_err());
    }
}

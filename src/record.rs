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
    ///
    /// No `Content-Length` where it does not belong (SPEC 2.8): on `1xx`, `204` and `304`
    /// (RFC 9110 8.6), and on a replay with trailers, so that HTTP/1.1 sends it chunked, the
    /// only framing that carries trailers.
    pub(crate) fn replay(self: std::sync::Arc<Self>) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
        let Self { status, mut headers, body, trailers } = std::sync::Arc::unwrap_or_clone(self);
        headers.insert(crate::IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        let without_content =
            status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        if without_content || trailers.is_some() {
            headers.remove(header::CONTENT_LENGTH);
        } else {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        parts.headers = headers;
        (parts, body, trailers)
    }

    /// Appends the record as one buffer: status, headers, trailers, then the raw body. A store
    /// keeps records in this form (a store crate need not invent its own).
    ///
    /// ```text
    /// bytes  field
    /// 2      status, big-endian
    /// 2      header field count N, big-endian
    /// N x    name length (u16 BE), name, value length (u32 BE), value
    /// 1      trailers: 0 none, 1 present, then a count and fields as for the headers
    /// rest   the body, raw, up to the end
    /// ```
    ///
    /// Every length is prefixed, so the encoding is unambiguous; [`decode`](Self::decode)
    /// reads it back without copying the body or the header values. Stores keep records in
    /// it (one exact-size allocation in `MemoryStore`, one value in Redis). `None` when a
    /// count or length does not fit its field (more than 65 535 header fields, a value over
    /// 4 GiB): such a response cannot be kept, like one over the record limit.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Option<()> {
        fn fields(out: &mut Vec<u8>, map: &HeaderMap) -> Option<()> {
            out.put_u16(u16::try_from(map.len()).ok()?);
            for (name, value) in map {
                // `http` caps a header name at 65 535 bytes; a value has no cap of its own.
                out.put_u16(u16::try_from(name.as_str().len()).ok()?);
                out.put_slice(name.as_str().as_bytes());
                out.put_u32(u32::try_from(value.len()).ok()?);
                out.put_slice(value.as_bytes());
            }
            Some(())
        }
        out.reserve(self.encoded_len());
        out.put_u16(self.status.as_u16());
        fields(out, &self.headers)?;
        match &self.trailers {
            None => out.put_u8(0),
            Some(trailers) => {
                out.put_u8(1);
                fields(out, trailers)?;
            }
        }
        out.put_slice(&self.body);
        Some(())
    }

    /// The length [`encode_into`](Self::encode_into) writes.
    pub fn encoded_len(&self) -> usize {
        fn fields_len(map: &HeaderMap) -> usize {
            2 + map.iter().map(|(name, value)| 2 + name.as_str().len() + 4 + value.len()).sum::<usize>()
        }
        2 + fields_len(&self.headers) + 1 + self.trailers.as_ref().map_or(0, fields_len) + self.body.len()
    }

    /// Reads back what [`encode_into`](Self::encode_into) wrote; header values and the body
    /// share `encoded`'s memory. Damaged input is an error, never a panic or a huge allocation.
    pub fn decode(mut encoded: Bytes) -> Result<Self, DecodeError> {
        fn fields(encoded: &mut Bytes) -> Result<HeaderMap, DecodeError> {
            let count = usize::from(encoded.try_get_u16().map_err(|_| DecodeError("truncated"))?);
            // Every field takes at least 6 bytes: do not trust a count the input cannot hold.
            if count > encoded.len() / 6 {
                return Err(DecodeError("truncated"));
            }
            let mut map = HeaderMap::with_capacity(count);
            for _ in 0..count {
                let len = usize::from(encoded.try_get_u16().map_err(|_| DecodeError("truncated"))?);
                let name = encoded.get(..len).ok_or(DecodeError("truncated"))?;
                let name = HeaderName::from_bytes(name).map_err(|_| DecodeError("invalid header name"))?;
                encoded.advance(len);
                let len = encoded.try_get_u32().map_err(|_| DecodeError("truncated"))? as usize;
                if encoded.len() < len {
                    return Err(DecodeError("truncated"));
                }
                let value = HeaderValue::from_maybe_shared(encoded.split_to(len))
                    .map_err(|_| DecodeError("invalid header value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        let status = encoded.try_get_u16().map_err(|_| DecodeError("truncated"))?;
        let status = StatusCode::from_u16(status).map_err(|_| DecodeError("invalid status"))?;
        let headers = fields(&mut encoded)?;
        let trailers = match encoded.try_get_u8().map_err(|_| DecodeError("truncated"))? {
            0 => None,
            1 => Some(fields(&mut encoded)?),
            _ => return Err(DecodeError("invalid trailer flag")),
        };
        Ok(Self { status, headers, body: encoded, trailers })
    }
}

/// A buffer that is not a record [`StoredResponse::encode_into`] wrote.
#[derive(Debug)]
pub struct DecodeError(pub(crate) &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not an encoded record: {}", self.0)
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
    use std::sync::Arc;

    use super::*;

    fn stored(status: u16, body: &'static [u8], trailers: Option<HeaderMap>) -> Arc<StoredResponse> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let status = StatusCode::from_u16(status).unwrap();
        Arc::new(StoredResponse { status, headers, body: Bytes::from_static(body), trailers })
    }

    #[test]
    fn replay_recomputes_content_length_where_the_status_allows_a_body() {
        for (status, body) in [(200, &b"{\"id\":1}"[..]), (201, b""), (202, b"x"), (404, b"missing")] {
            let (head, got, trailers) = stored(status, body, None).replay();
            assert_eq!(head.status, status);
            assert_eq!(head.headers[header::CONTENT_LENGTH], body.len().to_string().as_str(), "{status}");
            assert_eq!(head.headers[crate::IDEMPOTENT_REPLAYED], "true");
            assert_eq!(head.headers[header::CONTENT_TYPE], "text/plain");
            assert_eq!(&got[..], body);
            assert!(trailers.is_none());
        }
    }

    /// SPEC 2.8: `Content-Length` is never added to `1xx`, `204` or `304` (RFC 9110 8.6: a
    /// server must not send it on `1xx` or `204`; on `304` it would describe another response).
    #[test]
    fn replay_adds_no_content_length_to_a_status_without_content() {
        for status in [100, 103, 204, 304] {
            let (head, body, _) = stored(status, b"", None).replay();
            assert_eq!(head.status, status);
            assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{status}: {:?}", head.headers);
            assert_eq!(head.headers[crate::IDEMPOTENT_REPLAYED], "true");
            assert!(body.is_empty());
        }
        // Nor keeps one a record should not hold.
        let mut record = Arc::unwrap_or_clone(stored(204, b"", None));
        record.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (head, _, _) = Arc::new(record).replay();
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{:?}", head.headers);
    }

    /// With trailers, no `Content-Length`: HTTP/1.1 then sends the replay chunked, the only
    /// framing that carries trailers.
    #[test]
    fn replay_with_trailers_has_no_content_length() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        for body in [&b"\x00\x00\x00\x00\x02hi"[..], b""] {
            let (head, got, replayed_trailers) = stored(200, body, Some(trailers.clone())).replay();
            assert!(!head.headers.contains_key(header::CONTENT_LENGTH), "{:?}", head.headers);
            assert_eq!(head.headers[crate::IDEMPOTENT_REPLAYED], "true");
            assert_eq!(&got[..], body);
            assert_eq!(replayed_trailers.as_ref(), Some(&trailers));
        }
    }

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
            let mut encoded = Vec::new();
            record.encode_into(&mut encoded).unwrap();
            assert_eq!(encoded.len(), record.encoded_len());
            assert_eq!(StoredResponse::decode(Bytes::from(encoded)).unwrap(), record);
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"\x00")).is_err());
    }
}

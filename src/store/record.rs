//! The stored response: what a replay sends back, and its compact encoding.

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// A completed response as kept by a store: status, end-to-end headers, body and trailers.
///
/// Headers that must not be replayed (hop-by-hop, `Content-Length`, `Date`, `Set-Cookie` by
/// default) are removed before a record is made; see
/// [`IdempotencyLayer::with_unstored_headers`](crate::IdempotencyLayer::with_unstored_headers).
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::store::StoredResponse;
///
/// let mut trailers = HeaderMap::new();
/// trailers.insert("grpc-status", "0".parse().unwrap());
/// let record = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"hi"))
///     .with_trailers(trailers);
/// assert_eq!(record.body(), "hi");
/// assert_eq!(record.trailers().unwrap()["grpc-status"], "0");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

impl StoredResponse {
    /// A record of a response without trailers. The headers are kept as given: the layer
    /// removes the ones it does not replay before it makes a record.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self { status, headers, body, trailers: None }
    }

    /// The same record, with the trailers the response ended with.
    #[must_use]
    pub fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The end-to-end headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The whole body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The trailers, when the response had any (gRPC keeps its status there).
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// Bytes this record holds: body, header names and values, trailers.
    ///
    /// Stores use it to bound their memory; it leaves out the fixed size of the struct itself.
    pub fn weight(&self) -> usize {
        fn map_weight(map: &HeaderMap) -> usize {
            map.iter().map(|(name, value)| name.as_str().len() + value.len()).sum()
        }
        self.body.len() + map_weight(&self.headers) + self.trailers.as_ref().map_or(0, map_weight)
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
#[non_exhaustive]
pub enum Record {
    /// The response, replayed to every retry.
    Response(std::sync::Arc<StoredResponse>),
    /// A not-retained record: the request ran, but its response was too large to keep. Retries get `409`
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
    use http::header;

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
            let mut encoded = Vec::new();
            record.encode_into(&mut encoded).unwrap();
            assert_eq!(encoded.len(), record.encoded_len());
            assert_eq!(StoredResponse::decode(Bytes::from(encoded)).unwrap(), record);
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"\x00")).is_err());
    }
}

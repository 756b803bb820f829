//! The stored response: what a replay sends back, and its compact encoding.

use std::time::{Duration, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::trace::{self, Origin, TraceContext};

/// The end of a `text/event-stream` event with an id, as a record keeps it: where a duplicate
/// that saw the event resumes (`Last-Event-ID`). The layer finds them while recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventMark {
    /// The event's `id:` value.
    pub(crate) id: Bytes,
    /// The body offset just past the empty line that ended the event.
    pub(crate) end: u64,
}

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
    /// For a `text/event-stream` body: the end of each event with an id, in order (where a
    /// replay with `Last-Event-ID` starts).
    pub(crate) marks: Vec<EventMark>,
    /// When it was completed, and the trace of the request that executed.
    pub(crate) origin: Origin,
}

/// Flag bits of the byte after the headers.
const HAS_TRAILERS: u8 = 1;
const HAS_MARKS: u8 = 2;
const HAS_ORIGIN: u8 = 4;

/// Bits of the origin's own flag byte: which of its fields follow.
const ORIGIN_COMPLETED_AT: u8 = 1;
const ORIGIN_CALLER: u8 = 2;
const ORIGIN_SPAN: u8 = 4;

impl StoredResponse {
    /// A record of a response without trailers. The headers are kept as given: the layer
    /// removes the ones it does not replay before it makes a record.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self { status, headers, body, trailers: None, marks: Vec::new(), origin: Origin::default() }
    }

    /// The same record, with the trailers the response ended with.
    #[must_use]
    pub fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The same record, with where it came from (the layer sets it on every record it makes).
    #[must_use]
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// When the record was completed, and the trace contexts of the request that executed
    /// (empty for a record written before they were kept).
    pub fn origin(&self) -> &Origin {
        &self.origin
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
        let marks: usize = self.marks.iter().map(|mark| mark.id.len() + 8).sum();
        self.body.len() + map_weight(&self.headers) + self.trailers.as_ref().map_or(0, map_weight) + marks
    }

    /// Appends the record as one buffer: status, headers, trailers, then the raw body. A store
    /// keeps records in this form (a store crate need not invent its own).
    ///
    /// ```text
    /// bytes  field
    /// 2      status, big-endian
    /// 2      header field count N, big-endian
    /// N x    name length (u16 BE), name, value length (u32 BE), value
    /// 1      flags: bit 0 trailers, bit 1 event marks, bit 2 origin
    ///        trailers, if flagged: a count and fields as for the headers
    ///        event marks, if flagged: count M (u32 BE), then M x id length (u16 BE), id,
    ///        end offset in the body (u64 BE): where each `text/event-stream` event with an
    ///        id ends, so a replay with `Last-Event-ID` starts there without parsing the body
    ///        origin, if flagged: 1 byte of bits (0 completed-at, 1 caller, 2 span), then
    ///        those present: completed-at as milliseconds since the Unix epoch (u64 BE);
    ///        the caller's and the span's trace context, 25 bytes each (trace id 16,
    ///        span id 8, trace flags 1)
    /// rest   the body, raw, up to the end
    /// ```
    ///
    /// A record without event marks or origin encodes as it did before they existed (flags 0
    /// or 1), and such records, already stored, decode as before (with an empty origin).
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
        let has_marks = !self.marks.is_empty();
        let has_origin = !self.origin.is_empty();
        out.put_u8(
            if self.trailers.is_some() { HAS_TRAILERS } else { 0 }
                | if has_marks { HAS_MARKS } else { 0 }
                | if has_origin { HAS_ORIGIN } else { 0 },
        );
        if let Some(trailers) = &self.trailers {
            fields(out, trailers)?;
        }
        if has_marks {
            out.put_u32(u32::try_from(self.marks.len()).ok()?);
            for mark in &self.marks {
                out.put_u16(u16::try_from(mark.id.len()).ok()?);
                out.put_slice(&mark.id);
                out.put_u64(mark.end);
            }
        }
        if has_origin {
            encode_origin(&self.origin, out);
        }
        out.put_slice(&self.body);
        Some(())
    }

    /// The length [`encode_into`](Self::encode_into) writes.
    pub fn encoded_len(&self) -> usize {
        fn fields_len(map: &HeaderMap) -> usize {
            2 + map.iter().map(|(name, value)| 2 + name.as_str().len() + 4 + value.len()).sum::<usize>()
        }
        let marks = match self.marks.len() {
            0 => 0,
            _ => 4 + self.marks.iter().map(|mark| 2 + mark.id.len() + 8).sum::<usize>(),
        };
        let origin = if self.origin.is_empty() { 0 } else { origin_len(&self.origin) };
        2 + fields_len(&self.headers)
            + 1
            + self.trailers.as_ref().map_or(0, fields_len)
            + marks
            + origin
            + self.body.len()
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
        let flags = encoded.try_get_u8().map_err(|_| DecodeError("truncated"))?;
        if flags & !(HAS_TRAILERS | HAS_MARKS | HAS_ORIGIN) != 0 {
            return Err(DecodeError("invalid flags"));
        }
        let trailers = if flags & HAS_TRAILERS != 0 { Some(fields(&mut encoded)?) } else { None };
        let mut marks = Vec::new();
        if flags & HAS_MARKS != 0 {
            let count = encoded.try_get_u32().map_err(|_| DecodeError("truncated"))? as usize;
            // Every mark takes at least 10 bytes.
            if count > encoded.len() / 10 {
                return Err(DecodeError("truncated"));
            }
            marks.reserve_exact(count);
            for _ in 0..count {
                let len = usize::from(encoded.try_get_u16().map_err(|_| DecodeError("truncated"))?);
                if encoded.len() < len {
                    return Err(DecodeError("truncated"));
                }
                let id = encoded.split_to(len);
                let end = encoded.try_get_u64().map_err(|_| DecodeError("truncated"))?;
                marks.push(EventMark { id, end });
            }
        }
        let origin = if flags & HAS_ORIGIN != 0 { decode_origin(&mut encoded)? } else { Origin::default() };
        if marks.iter().any(|mark| mark.end > encoded.len() as u64) {
            return Err(DecodeError("event mark past the body"));
        }
        Ok(Self { status, headers, body: encoded, trailers, marks, origin })
    }
}

fn origin_len(origin: &Origin) -> usize {
    1 + if origin.completed_at.is_some() { 8 } else { 0 }
        + [origin.caller, origin.span].iter().flatten().count() * trace::ENCODED_LEN
}

fn encode_origin(origin: &Origin, out: &mut Vec<u8>) {
    let bit = |present: bool, bit: u8| if present { bit } else { 0 };
    out.put_u8(
        bit(origin.completed_at.is_some(), ORIGIN_COMPLETED_AT)
            | bit(origin.caller.is_some(), ORIGIN_CALLER)
            | bit(origin.span.is_some(), ORIGIN_SPAN),
    );
    if let Some(at) = origin.completed_at {
        // Before the epoch (a clock set far back) reads as the epoch itself.
        let millis = at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis());
        out.put_u64(u64::try_from(millis).unwrap_or(u64::MAX));
    }
    for context in [origin.caller, origin.span].iter().flatten() {
        context.encode_into(out);
    }
}

fn decode_origin(encoded: &mut Bytes) -> Result<Origin, DecodeError> {
    let bits = encoded.try_get_u8().map_err(|_| DecodeError("truncated"))?;
    if bits & !(ORIGIN_COMPLETED_AT | ORIGIN_CALLER | ORIGIN_SPAN) != 0 {
        return Err(DecodeError("invalid origin flags"));
    }
    let mut origin = Origin::default();
    if bits & ORIGIN_COMPLETED_AT != 0 {
        let millis = encoded.try_get_u64().map_err(|_| DecodeError("truncated"))?;
        origin.completed_at = UNIX_EPOCH.checked_add(Duration::from_millis(millis));
    }
    let mut context = |present: bool| -> Result<Option<TraceContext>, DecodeError> {
        if !present {
            return Ok(None);
        }
        let bytes = encoded.get(..trace::ENCODED_LEN).ok_or(DecodeError("truncated"))?;
        let context = TraceContext::decode(bytes).ok_or(DecodeError("invalid trace context"))?;
        encoded.advance(trace::ENCODED_LEN);
        Ok(Some(context))
    };
    origin.caller = context(bits & ORIGIN_CALLER != 0)?;
    origin.span = context(bits & ORIGIN_SPAN != 0)?;
    Ok(origin)
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
                marks: Vec::new(),
                origin: Origin::default(),
            };
            let mut encoded = Vec::new();
            record.encode_into(&mut encoded).unwrap();
            assert_eq!(encoded.len(), record.encoded_len());
            assert_eq!(StoredResponse::decode(Bytes::from(encoded)).unwrap(), record);
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"\x00")).is_err());
    }

    #[test]
    fn event_marks_round_trip_and_leave_old_records_readable() {
        let body = Bytes::from_static(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
        let mut record = StoredResponse::new(StatusCode::OK, HeaderMap::new(), body.clone());
        record.marks = vec![
            EventMark { id: Bytes::from_static(b"1"), end: 15 },
            EventMark { id: Bytes::from_static(b"2"), end: 30 },
        ];
        for trailers in [None, Some(HeaderMap::from_iter([(header::ETAG, HeaderValue::from_static("x"))]))] {
            record.trailers = trailers;
            let mut encoded = Vec::new();
            record.encode_into(&mut encoded).unwrap();
            assert_eq!(encoded.len(), record.encoded_len());
            assert_eq!(StoredResponse::decode(Bytes::from(encoded)).unwrap(), record);
        }
        // Without marks, the layout is the one records had before marks existed.
        let plain = StoredResponse::new(StatusCode::OK, HeaderMap::new(), body);
        let mut encoded = Vec::new();
        plain.encode_into(&mut encoded).unwrap();
        assert_eq!(&encoded[..5], b"\x00\xc8\x00\x00\x00");
        // A mark past the body, or an unknown flag, is an error.
        let mut bad = Vec::new();
        record.trailers = None;
        record.marks[1].end = 99;
        record.encode_into(&mut bad).unwrap();
        assert!(StoredResponse::decode(Bytes::from(bad)).is_err());
        assert!(StoredResponse::decode(Bytes::from_static(b"\x00\xc8\x00\x00\x08")).is_err());
    }

    #[test]
    fn the_origin_round_trips_and_records_without_one_keep_their_layout() {
        let caller = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let span = TraceContext::new([7; 16], [9; 8], 0).unwrap();
        let body = Bytes::from_static(b"id: 1\ndata: a\n\n");
        let mut record = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), body.clone());
        record.marks = vec![EventMark { id: Bytes::from_static(b"1"), end: 15 }];
        let at = trace::completed_now();
        let origins = [
            Origin { completed_at: Some(at), caller: Some(caller), span: Some(span) },
            Origin { completed_at: Some(at), caller: None, span: None },
            Origin { completed_at: None, caller: None, span: Some(span) },
            Origin { completed_at: Some(UNIX_EPOCH), caller: Some(caller), span: None },
        ];
        for origin in origins {
            for trailers in [None, Some(HeaderMap::from_iter([(header::ETAG, HeaderValue::from_static("x"))]))] {
                let record = record.clone().with_origin(origin);
                let record = StoredResponse { trailers, ..record };
                let mut encoded = Vec::new();
                record.encode_into(&mut encoded).unwrap();
                assert_eq!(encoded.len(), record.encoded_len());
                let decoded = StoredResponse::decode(Bytes::from(encoded)).unwrap();
                assert_eq!(decoded, record);
                assert_eq!(decoded.origin().trace_id(), origin.span.or(origin.caller).map(|c| c.trace_id()));
                assert_eq!(decoded.body(), &body);
            }
        }
        // A record stored before origins existed (these bytes are what the encoding wrote
        // then): it decodes, with nothing known of its origin.
        let old = b"\x00\xc9\x00\x01\x00\x04etag\x00\x00\x00\x01x\x00{}";
        let decoded = StoredResponse::decode(Bytes::from_static(old)).unwrap();
        assert!(decoded.origin().is_empty());
        assert_eq!(
            (decoded.status(), decoded.body().as_ref(), &decoded.headers()["etag"]),
            (StatusCode::CREATED, &b"{}"[..], &HeaderValue::from_static("x"))
        );
        let mut encoded = Vec::new();
        decoded.encode_into(&mut encoded).unwrap();
        assert_eq!(encoded, old);
        // Damaged origins are errors: an unknown bit, a context cut short, an all-zero id.
        let mut encoded = Vec::new();
        StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new())
            .with_origin(Origin { completed_at: None, caller: Some(caller), span: None })
            .encode_into(&mut encoded)
            .unwrap();
        let mut unknown = encoded.clone();
        unknown[5] |= 0x80;
        assert!(StoredResponse::decode(Bytes::from(unknown)).is_err());
        assert!(StoredResponse::decode(Bytes::from(encoded[..20].to_vec())).is_err());
        let mut zero = encoded.clone();
        zero[6..22].fill(0);
        assert!(StoredResponse::decode(Bytes::from(zero)).is_err());
    }
}

//! The stored response: what a replay sends back.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

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
    /// `Idempotent-Replayed: true` and a recomputed `Content-Length`.
    pub(crate) fn replay(&self) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = self.status;
        parts.headers = self.headers.clone();
        parts.headers.insert(crate::IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        (parts, self.body.clone(), self.trailers.clone())
    }
}

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

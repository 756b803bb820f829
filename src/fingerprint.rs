//! What makes two requests "the same request": HMAC-SHA-256, under a key derived from the
//! layer's [`Secret`](crate::Secret), over method, path, query and body, plus any configured
//! headers. Keyed, so that a store reader cannot test guesses of a secret in a body (a PIN, a
//! card's CVC) against the fingerprint the store keeps.
//!
//! Each part is length-prefixed, so no two different requests share an encoding (`/a?b` with
//! body `c` is not `/a` with query `bc`).

use std::borrow::Cow;

use hmac::Mac;
use http::{HeaderName, request::Parts};

#[cfg(feature = "json")]
use crate::{error::ConfigError, json::JsonPointer};
use crate::{secret::Keyed, store::Fingerprint};

/// How a request's body enters its fingerprint: its raw bytes (the default), or, with the
/// feature `json`, its canonical JSON form without listed members (`canonical_json`). Set per layer with
/// [`IdempotencyLayer::with_body_fingerprint`](crate::IdempotencyLayer::with_body_fingerprint)
/// (a route of its own: a clone of the layer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFingerprint(BodyForm);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum BodyForm {
    #[default]
    Raw,
    #[cfg(feature = "json")]
    CanonicalJson(Vec<JsonPointer>),
}

/// The body is not what its route's [`BodyFingerprint`] reads: not I-JSON on a canonical
/// JSON route.
#[derive(Debug)]
pub(crate) struct Unreadable;

impl BodyFingerprint {
    /// The body's bytes as they are: one byte of whitespace makes another request.
    pub const fn raw() -> Self {
        Self(BodyForm::Raw)
    }

    /// The body as canonical JSON (RFC 8785, the JSON Canonicalization Scheme), without the
    /// object members `excluded` points at (JSON Pointers, RFC 6901: `/client_time`,
    /// `/meta/trace_id`). Member order, whitespace and the spelling of numbers (`10`, `10.0`,
    /// `1e1`) then make no difference; the excluded members (a client timestamp, a trace id)
    /// make none either, present or not.
    ///
    /// A body that is not I-JSON (RFC 7493: UTF-8 JSON, no member name twice in one object,
    /// numbers a double can hold) gets `400` [`request-body-not-json`](crate::problem::REQUEST_BODY_NOT_JSON),
    /// and the handler does not run. A pointer into an array may pass through an element
    /// (`/items/0/note`) but removes no element itself (that would move the ones after it).
    ///
    /// An error for a string that is not a JSON Pointer, or for the empty pointer (the whole
    /// body).
    ///
    /// ```
    /// use tower_idempotency::{BodyFingerprint, IdempotencyLayer};
    ///
    /// let quotes = IdempotencyLayer::new()
    ///     .with_body_fingerprint(BodyFingerprint::canonical_json(["/client_time"]).unwrap());
    /// # let _ = quotes;
    /// ```
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn canonical_json<I>(excluded: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let excluded = excluded
            .into_iter()
            .map(|pointer| match pointer.as_ref() {
                "" => Err(ConfigError::InvalidJsonPointer(String::new())),
                pointer => JsonPointer::parse(pointer),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self(BodyForm::CanonicalJson(excluded)))
    }

    /// The bytes the fingerprint takes for `body`.
    pub(crate) fn read<'b>(&self, body: &'b [u8]) -> Result<Cow<'b, [u8]>, Unreadable> {
        match &self.0 {
            BodyForm::Raw => Ok(Cow::Borrowed(body)),
            #[cfg(feature = "json")]
            BodyForm::CanonicalJson(excluded) => {
                crate::json::canonical(body, excluded).map(Cow::Owned).map_err(|_| Unreadable)
            }
        }
    }
}

impl Fingerprint {
    /// Fingerprints a request from its head, the headers to include and its buffered body.
    ///
    /// The body is hashed once, straight from the buffer.
    pub(crate) fn compute(keyed: &Keyed, head: &Parts, headers: &[HeaderName], body: &[u8]) -> Self {
        let mut hasher = keyed.fingerprint_mac();
        let mut part = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        part(head.method.as_str().as_bytes());
        part(head.uri.path().as_bytes());
        match head.uri.query() {
            // "no query" and "empty query" (`/a?`) are different requests.
            None => part(b"\x00none"),
            Some(q) => part(q.as_bytes()),
        }
        for name in headers {
            part(name.as_str().as_bytes());
            let values = head.headers.get_all(name);
            let count = values.iter().count() as u64;
            part(&count.to_be_bytes());
            for value in values {
                part(value.as_bytes());
            }
        }
        part(body);
        Self::from_bytes(hasher.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::secret::test_keyed as keyed;

    #[test]
    fn keyed_by_the_secret() {
        let (head, ()) = http::Request::post("/pin").body(()).unwrap().into_parts();
        let one = Fingerprint::compute(&keyed(1), &head, &[], b"{\"pin\":\"1234\"}");
        assert_eq!(one, Fingerprint::compute(&keyed(1), &head, &[], b"{\"pin\":\"1234\"}"));
        assert_ne!(one, Fingerprint::compute(&keyed(2), &head, &[], b"{\"pin\":\"1234\"}"));
    }

    fn fp(method: &str, uri: &str, body: &[u8]) -> Fingerprint {
        let (head, ()) = http::Request::builder().method(method).uri(uri).body(()).unwrap().into_parts();
        Fingerprint::compute(&keyed(1), &head, &[], body)
    }

    #[test]
    fn every_part_counts_and_encoding_is_unambiguous() {
        let base = fp("POST", "/a?x=1", b"{}");
        assert_eq!(base, fp("POST", "/a?x=1", b"{}"));
        assert_ne!(base, fp("PATCH", "/a?x=1", b"{}"));
        assert_ne!(base, fp("POST", "/b?x=1", b"{}"));
        assert_ne!(base, fp("POST", "/a?x=2", b"{}"));
        assert_ne!(base, fp("POST", "/a?x=1", b"{ }"));
        assert_ne!(fp("POST", "/a?b", b"c"), fp("POST", "/a?bc", b""));
        assert_ne!(fp("POST", "/a", b""), fp("POST", "/a?", b""));
    }

    #[test]
    fn configured_headers_count() {
        let name = HeaderName::from_static("x-account");
        let mk = |v: &str| {
            let (head, ()) = http::Request::post("/a").header(&name, v).body(()).unwrap().into_parts();
            Fingerprint::compute(&keyed(1), &head, std::slice::from_ref(&name), b"")
        };
        assert_ne!(mk("1"), mk("2"));
        let (head, ()) = http::Request::post("/a").header(&name, "1").body(()).unwrap().into_parts();
        assert_eq!(Fingerprint::compute(&keyed(1), &head, &[], b""), fp("POST", "/a", b""));
    }
}

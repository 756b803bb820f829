//! What makes two requests "the same request": HMAC-SHA-256, under a key derived from the
//! layer's [`Secret`](crate::Secret), over method, path, query and body, plus any configured
//! headers. Keyed, so that a store reader cannot test guesses of a secret in a body (a PIN, a
//! card's CVC) against the fingerprint the store keeps.
//!
//! Each part is length-prefixed, so no two different requests share an encoding (`/a?b` with
//! body `c` is not `/a` with query `bc`).

use hmac::Mac;
use http::{HeaderName, request::Parts};

use crate::{secret::Keyed, store::Fingerprint};

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

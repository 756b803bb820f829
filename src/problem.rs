//! The responses the layer makes itself: RFC 9457 problem details.
//!
//! Every error the layer answers is `application/problem+json` with a stable `type` URI (one
//! per problem, listed below), a `title`, the `status` and a `detail`. None of them echoes the
//! key, the body or any other part of the request. The bodies are static: making one costs no
//! allocation beyond the response itself.
//!
//! # missing-key
//! `400`: the route requires an `Idempotency-Key` and the request has none.
//!
//! # invalid-key
//! `400`: the key is empty, longer than 255 bytes, holds a byte that is not visible ASCII, is a
//! malformed quoted string, or the header was sent more than once.
//!
//! # request-body-unreadable
//! `400`: the request body failed while the layer read it to fingerprint it.
//!
//! # in-flight
//! `409` with `Retry-After`: a request with this key and the same payload is still running.
//! Retry after the given number of seconds.
//!
//! # response-not-retained
//! `409` without `Retry-After`: the request with this key already ran, but its response was
//! larger than the record limit and was not kept. Retrying will not help; the handler will not
//! run twice for one key.
//!
//! # request-body-too-large
//! `413`: the request body is larger than the limit the layer buffers to fingerprint it.
//!
//! # key-reused
//! `422`: the key was already used for a different request (method, path, query or body).
//!
//! # store-unavailable
//! `503` with `Retry-After`: the idempotency store could not be reached, so the request was not
//! run (fail closed).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

use crate::Outcome;

macro_rules! problems {
    ($( $(#[$doc:meta])* $konst:ident = $slug:literal, $status:literal, $title:literal, $detail:literal; )*) => {
        $( $(#[$doc])* pub const $konst: &str = concat!(
            "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#", $slug
        ); )*

        impl Problem {
            fn parts(self) -> (StatusCode, &'static str) {
                match self {
                    $( Self::$konst => (
                        match StatusCode::from_u16($status) { Ok(s) => s, Err(_) => unreachable!() },
                        concat!(
                            r#"{"type":"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#"#,
                            $slug, r#"","title":""#, $title, r#"","status":"#, $status,
                            r#","detail":""#, $detail, r#""}"#
                        ),
                    ), )*
                }
            }
        }

        /// One of the problems the layer answers.
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Problem { $( $konst, )* }
    };
}

problems! {
    /// `type` of the `400` for a missing key on a route that requires one.
    MISSING_KEY = "missing-key", 400, "Idempotency key required",
        "This endpoint requires an Idempotency-Key header.";
    /// `type` of the `400` for an invalid key.
    INVALID_KEY = "invalid-key", 400, "Invalid idempotency key",
        "The Idempotency-Key header must be sent once, holding 1 to 255 visible ASCII characters, bare or as a quoted string.";
    /// `type` of the `400` for a request body that could not be read.
    REQUEST_BODY_UNREADABLE = "request-body-unreadable", 400, "Request body unreadable",
        "The request body could not be read.";
    /// `type` of the `409` for a duplicate of a request still in flight (with `Retry-After`).
    IN_FLIGHT = "in-flight", 409, "Request in flight",
        "A request with this idempotency key is still being processed. Retry later.";
    /// `type` of the `409` for a key whose response was too large to keep (no `Retry-After`).
    RESPONSE_NOT_RETAINED = "response-not-retained", 409, "Response not retained",
        "The request with this idempotency key was processed, but its response was too large to keep for replay.";
    /// `type` of the `413` for a request body over the buffering limit.
    REQUEST_BODY_TOO_LARGE = "request-body-too-large", 413, "Request body too large",
        "The request body is larger than the idempotency layer accepts.";
    /// `type` of the `422` for a key reused with a different request.
    KEY_REUSED = "key-reused", 422, "Idempotency key reused",
        "This idempotency key was already used with a different request.";
    /// `type` of the `503` when the store is unreachable (with `Retry-After`).
    STORE_UNAVAILABLE = "store-unavailable", 503, "Idempotency store unavailable",
        "The request was not processed because its idempotency could not be ensured. Retry later.";
}

impl Problem {
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Self::MISSING_KEY => Outcome::MissingKey,
            Self::INVALID_KEY => Outcome::InvalidKey,
            Self::REQUEST_BODY_UNREADABLE => Outcome::BodyUnreadable,
            Self::IN_FLIGHT => Outcome::InFlight,
            Self::RESPONSE_NOT_RETAINED => Outcome::NotRetained,
            Self::REQUEST_BODY_TOO_LARGE => Outcome::BodyTooLarge,
            Self::KEY_REUSED => Outcome::KeyReused,
            Self::STORE_UNAVAILABLE => Outcome::StoreUnavailable,
        }
    }

    /// The response head and body; `retry_after` adds the header (rounded up to whole seconds).
    pub(crate) fn into_parts(self, retry_after: Option<Duration>) -> (http::response::Parts, Bytes) {
        let (status, body) = self.parts();
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = status;
        head.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        head.headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = retry_after {
            head.headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
        }
        head.extensions.insert(self.outcome());
        (head, Bytes::from_static(body.as_bytes()))
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1, saturating at `u64::MAX` (so a
/// `Duration::MAX` never overflows).
fn retry_after_secs(after: Duration) -> u64 {
    after.as_secs().saturating_add(u64::from(after.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_saturates() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1500), 2),
            (Duration::from_secs(2), 2),
            (Duration::from_secs(u64::MAX - 1) + Duration::from_nanos(1), u64::MAX),
            (Duration::from_secs(u64::MAX), u64::MAX),
            (Duration::MAX, u64::MAX),
        ];
        for (after, secs) in cases {
            assert_eq!(retry_after_secs(after), secs, "{after:?}");
            let (head, _) = Problem::IN_FLIGHT.into_parts(Some(after));
            assert_eq!(head.headers[header::RETRY_AFTER], secs.to_string().as_str(), "{after:?}");
        }
    }

    #[test]
    fn bodies_are_valid_problem_json() {
        for p in [
            Problem::MISSING_KEY,
            Problem::INVALID_KEY,
            Problem::REQUEST_BODY_UNREADABLE,
            Problem::IN_FLIGHT,
            Problem::RESPONSE_NOT_RETAINED,
            Problem::REQUEST_BODY_TOO_LARGE,
            Problem::KEY_REUSED,
            Problem::STORE_UNAVAILABLE,
        ] {
            let (head, body) = p.into_parts(None);
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["status"], head.status.as_u16());
            assert!(json["type"].as_str().unwrap().starts_with("https://docs.rs/tower-idempotency/"));
            assert!(!json["title"].as_str().unwrap().is_empty());
            assert!(!json["detail"].as_str().unwrap().is_empty());
        }
    }
}

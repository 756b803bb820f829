//! gRPC: the layer in front of a tonic (or any gRPC-over-HTTP/2) service.
//!
//! Nothing to enable: a gRPC call is an HTTP/2 `POST`, so the layer covers it as it is.
//!
//! - **The key** is the `idempotency-key` metadata entry, which is the `Idempotency-Key`
//!   HTTP/2 header (gRPC metadata keys are lowercase header names): with tonic,
//!   `request.metadata_mut().insert("idempotency-key", key.parse()?)`.
//! - **The fingerprint** covers the method's path (`/package.Service/Method`) and the request
//!   message as framed on the wire; metadata is not part of it, as headers are not.
//! - **What is recorded**: a gRPC response is HTTP `200` whatever its outcome, which travels
//!   in `grpc-status`. The default cache predicate, [`SuccessOnly`](crate::SuccessOnly),
//!   records a gRPC call only when it succeeded (`grpc-status: 0`, in the head of a
//!   trailers-only answer or in the trailers after the messages); every failed call releases
//!   its key, so a retry runs again. [`GrpcStatusOk`] is a stricter predicate for a layer in
//!   front of gRPC only: it also refuses trailers with no `grpc-status` at all.
//! - **Replays** of unary and server-streaming calls are byte for byte the first response:
//!   the headers, every message frame, and the trailers (`grpc-status: 0`), plus
//!   `idempotent-replayed: true` in the response metadata. A recorded stream is replayed at
//!   once; calls whose response is over the record limit are not retained (below).
//! - **The layer's own answers** to a gRPC request (content type `application/grpc`,
//!   `application/grpc+proto`, ...) are gRPC statuses, whatever the
//!   [`ProblemRenderer`](crate::problem::ProblemRenderer): a trailers-only response (HTTP
//!   `200`, `content-type: application/grpc`, `grpc-status`, `grpc-message`, no body), never
//!   problem+json, which a gRPC client could not read. They carry the configured
//!   [retry hints](crate::hints) as metadata, and retryable ones also
//!   `grpc-retry-pushback-ms` (gRFC A6), which gRPC clients with a retry policy obey.
//!
//! | problem | HTTP answer | gRPC status | why |
//! | --- | --- | --- | --- |
//! | `missing-key`, `invalid-key`, `request-body-unreadable`, `request-body-not-json` | `400` | `INVALID_ARGUMENT` (3) | the request is malformed; fix it, do not retry |
//! | `request-body-too-large` | `413` | `INVALID_ARGUMENT` (3) | as for `400`: the request message cannot be accepted as it is |
//! | `in-flight` | `409` | `ABORTED` (10) | a concurrency conflict that ends by itself: retry after the pushback, with the same key |
//! | `key-reused` | `422` | `ALREADY_EXISTS` (6) | the key already exists, bound to another request: use a new key |
//! | `response-not-retained` | `409` | `FAILED_PRECONDITION` (9) | the call ran, but its response was not kept: retrying cannot get it |
//! | `key-expired` | `410` | `FAILED_PRECONDITION` (9) | the call ran, and its record expired: retrying cannot get it |
//! | `store-unavailable` | `503` | `UNAVAILABLE` (14) | transient: retry after the pushback |
//! | `transaction-failed` | `503` | `UNAVAILABLE` (14) | transient: retry after the pushback |
//! | `response-too-large` | `500` | `RESOURCE_EXHAUSTED` (8) | final: the response cannot be recorded |
//! | `transaction-rejected` | `409` | `FAILED_PRECONDITION` (9) | final: the call's writes break a constraint of the database; retrying fails the same way |
//! | `transaction-ended` | `500` | `INTERNAL` (13) | final: a fault of the server (its handler ended the call's transaction itself) |
//!
//! `ABORTED` rather than `ALREADY_EXISTS` for a duplicate in flight, because the gRPC status
//! guide reserves `ALREADY_EXISTS` for "the entity a client tried to create already exists"
//! (here: a key bound to a different request) and names `ABORTED` for concurrency conflicts.
//!
//! ```
//! use tower_idempotency::IdempotencyLayer;
//!
//! // tonic: Server::builder().layer(layer).add_service(OrdersServer::new(orders))
//! let layer = IdempotencyLayer::new();
//! # let _ = layer;
//! ```

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, header::CONTENT_TYPE};

pub use crate::predicate::GrpcStatusOk;
pub(crate) use crate::predicate::is_grpc;
use crate::{
    predicate::GRPC_STATUS,
    problem::{Problem, ProblemKind},
};

const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The gRPC status code for `kind`; see the module docs for the table.
const fn code(kind: ProblemKind) -> u16 {
    match kind {
        ProblemKind::MissingKey
        | ProblemKind::InvalidKey
        | ProblemKind::RequestBodyUnreadable
        | ProblemKind::RequestBodyNotJson
        | ProblemKind::RequestBodyTooLarge => 3,
        ProblemKind::InFlight => 10,
        ProblemKind::KeyReused => 6,
        ProblemKind::ResponseNotRetained | ProblemKind::KeyExpired => 9,
        ProblemKind::StoreUnavailable | ProblemKind::TransactionFailed => 14,
        ProblemKind::ResponseTooLarge => 8,
        ProblemKind::TransactionRejected => 9,
        ProblemKind::TransactionEnded => 13,
    }
}

/// The trailers-only gRPC answer to `problem`. Its message is the problem's `detail`, which
/// needs no percent-encoding (printable ASCII without `%`; a unit test checks).
pub(crate) fn render(problem: &Problem) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code(problem.kind())));
    let message = match problem.detail() {
        Cow::Borrowed(detail) => HeaderValue::from_static(detail),
        // Printable ASCII (the limit's digits in a static sentence): always a valid value.
        Cow::Owned(detail) => {
            HeaderValue::try_from(detail).unwrap_or_else(|_| HeaderValue::from_static(problem.kind().detail()))
        }
    };
    headers.insert(GRPC_MESSAGE, message);
    if let Some(ms) = problem.retry_after_ms() {
        headers.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(ms));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderMap, StatusCode, response};

    use super::*;
    use crate::{CachePredicate, InvalidKey};

    fn head(status: u16, headers: &[(&str, &str)]) -> response::Parts {
        let mut builder = Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn trailers(status: Option<&str>) -> HeaderMap {
        let mut trailers = HeaderMap::new();
        if let Some(status) = status {
            trailers.insert(GRPC_STATUS, status.parse().unwrap());
        }
        trailers
    }

    #[test]
    fn grpc_content_types() {
        for grpc in ["application/grpc", "application/grpc+proto", "application/GRPC+json", "application/grpc-web"] {
            assert!(is_grpc(&head(200, &[("content-type", grpc)]).headers), "{grpc}");
        }
        for other in ["application/json", "application/grp", "text/plain", ""] {
            assert!(!is_grpc(&head(200, &[("content-type", other)]).headers), "{other}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn records_only_grpc_status_0() {
        let grpc = ("content-type", "application/grpc");
        // A normal answer: decided by the trailers.
        assert!(GrpcStatusOk.should_record(&head(200, &[grpc])));
        assert!(GrpcStatusOk.should_record_trailers(Some(&trailers(Some("0")))));
        for failed in [Some("2"), Some("13"), Some("00"), None] {
            assert!(!GrpcStatusOk.should_record_trailers(Some(&trailers(failed))), "{failed:?}");
        }
        // Trailers-only: decided by the head.
        assert!(GrpcStatusOk.should_record(&head(200, &[grpc, ("grpc-status", "0")])));
        assert!(GrpcStatusOk.should_record_trailers(None));
        for failed in ["3", "14", "x"] {
            assert!(!GrpcStatusOk.should_record(&head(200, &[grpc, ("grpc-status", failed)])), "{failed}");
        }
        // gRPC over another HTTP status is not a success.
        assert!(!GrpcStatusOk.should_record(&head(201, &[grpc])));
        assert!(!GrpcStatusOk.should_record(&head(503, &[grpc])));
        // Not gRPC: 2xx.
        assert!(GrpcStatusOk.should_record(&head(201, &[("content-type", "application/json")])));
        assert!(!GrpcStatusOk.should_record(&head(500, &[])));
    }

    #[test]
    fn the_default_predicate_records_only_grpc_status_0() {
        use crate::SuccessOnly;
        let grpc = ("content-type", "application/grpc+proto");
        // Trailers-only: decided by the head.
        assert!(SuccessOnly.should_record(&head(200, &[grpc, ("grpc-status", "0")])));
        for failed in ["3", "9", "14"] {
            assert!(!SuccessOnly.should_record(&head(200, &[grpc, ("grpc-status", failed)])), "{failed}");
        }
        assert!(!SuccessOnly.should_record(&head(503, &[grpc])));
        // A stream: decided by its trailers.
        assert!(SuccessOnly.should_record(&head(200, &[grpc])));
        assert!(SuccessOnly.should_record_trailers(Some(&trailers(Some("0")))));
        for failed in ["2", "13", "00"] {
            assert!(!SuccessOnly.should_record_trailers(Some(&trailers(Some(failed)))), "{failed}");
        }
        // Not gRPC: 2xx, and trailers of its own change nothing.
        assert!(SuccessOnly.should_record(&head(201, &[("content-type", "application/json")])));
        assert!(!SuccessOnly.should_record(&head(500, &[])));
        assert!(SuccessOnly.should_record_trailers(None));
        assert!(SuccessOnly.should_record_trailers(Some(&trailers(None))));
    }

    #[test]
    fn answers_are_trailers_only_statuses() {
        let expected = [
            (ProblemKind::MissingKey, 3),
            (ProblemKind::InvalidKey, 3),
            (ProblemKind::RequestBodyUnreadable, 3),
            (ProblemKind::RequestBodyNotJson, 3),
            (ProblemKind::InFlight, 10),
            (ProblemKind::ResponseNotRetained, 9),
            (ProblemKind::RequestBodyTooLarge, 3),
            (ProblemKind::KeyReused, 6),
            (ProblemKind::KeyExpired, 9),
            (ProblemKind::StoreUnavailable, 14),
            (ProblemKind::TransactionFailed, 14),
            (ProblemKind::ResponseTooLarge, 8),
            (ProblemKind::TransactionRejected, 9),
            (ProblemKind::TransactionEnded, 13),
        ];
        assert_eq!(expected.len(), ProblemKind::ALL.len());
        for (kind, status) in expected {
            let response = render(&Problem::new(kind, Some(Duration::from_millis(1200))));
            assert_eq!(response.status(), StatusCode::OK, "{kind:?}");
            assert!(response.body().is_empty(), "{kind:?}");
            let headers = response.headers();
            assert_eq!(headers[CONTENT_TYPE], "application/grpc");
            assert_eq!(headers[GRPC_STATUS], status.to_string().as_str(), "{kind:?}");
            // No percent-encoding needed: printable ASCII, no `%`.
            let message = headers[GRPC_MESSAGE].to_str().unwrap();
            assert_eq!(message, kind.detail());
            assert!(message.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'%'), "{kind:?}");
            let pushback = headers.get(GRPC_RETRY_PUSHBACK_MS).map(|v| v.to_str().unwrap());
            assert_eq!(pushback, kind.is_retryable().then_some("1200"), "{kind:?}");
        }
    }

    #[test]
    fn the_messages_that_say_more_need_no_percent_encoding_either() {
        let rules: [InvalidKey; 6] = [
            InvalidKey::Empty,
            InvalidKey::TooLong,
            InvalidKey::InvalidByte,
            InvalidKey::MalformedQuotedString,
            InvalidKey::Repeated,
            InvalidKey::NotAString,
        ];
        let places = [
            crate::problem::KeyPlace::Header,
            crate::problem::KeyPlace::OtherHeader,
            #[cfg(feature = "json")]
            crate::problem::KeyPlace::Body,
            #[cfg(feature = "json")]
            crate::problem::KeyPlace::JsonRpc,
        ];
        let problems = rules
            .map(Problem::invalid_key)
            .into_iter()
            .chain(places.map(Problem::missing_key))
            .chain([Problem::body_too_large(2 * 1024 * 1024)]);
        for problem in problems {
            let response = render(&problem);
            let message = response.headers()[GRPC_MESSAGE].to_str().unwrap();
            assert_eq!(message, problem.detail(), "{problem:?}");
            assert!(message.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'%'), "{problem:?}");
        }
    }
}

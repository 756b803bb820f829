//! What is recorded: the [`CachePredicate`] strategy, its default [`SuccessOnly`], and the
//! stricter [`GrpcStatusOk`] for gRPC-only layers (also at `tower_idempotency::grpc`).

use http::{HeaderMap, HeaderName, StatusCode, header::CONTENT_TYPE, response};

/// The gRPC status header (in a trailers-only head, or in the trailers).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Decides whether a response becomes the key's record. Implemented for closures
/// `Fn(&http::response::Parts) -> bool`.
///
/// A response it rejects releases the key, so a retry executes again. The default,
/// [`SuccessOnly`], records `2xx` responses, and gRPC calls only when they succeeded.
pub trait CachePredicate: Send + Sync + 'static {
    /// Whether to record the response whose head is `head`.
    fn should_record(&self, head: &response::Parts) -> bool;

    /// Whether a response whose head was accepted is still recorded once its body ended with
    /// `trailers` (`None`: no trailers). Asked before the record is written, so the answer
    /// can depend on a status sent in the trailers (gRPC's `grpc-status`). Default: `true`.
    ///
    /// A rejection releases the key. A body that passed the record limit was decided at the
    /// limit (a not-retained record) and is not asked.
    fn should_record_trailers(&self, trailers: Option<&HeaderMap>) -> bool {
        let _ = trailers;
        true
    }
}

impl<F> CachePredicate for F
where
    F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
{
    fn should_record(&self, head: &response::Parts) -> bool {
        self(head)
    }
}

/// The default [`CachePredicate`]: record successes.
///
/// - An HTTP response is recorded when its status is `2xx`.
/// - A gRPC response (content type `application/grpc*`) is recorded only when the call
///   succeeded, `grpc-status: 0`: in the head of a trailers-only answer (how tonic answers a
///   handler's `Err(Status)`), or in the trailers that end a stream (a stream that fails after
///   its first messages, say). A failed call releases its key, so a retry runs again. Its HTTP
///   status must be `200`, as gRPC requires.
///
/// Trailers without `grpc-status` (an HTTP response's own trailers) change nothing. For gRPC
/// only, [`GrpcStatusOk`](crate::grpc::GrpcStatusOk) is stricter: trailers must carry
/// `grpc-status: 0`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SuccessOnly;

impl CachePredicate for SuccessOnly {
    fn should_record(&self, head: &response::Parts) -> bool {
        if is_grpc(&head.headers) {
            return succeeded(head);
        }
        head.status.is_success()
    }

    fn should_record_trailers(&self, trailers: Option<&HeaderMap>) -> bool {
        trailers.and_then(|trailers| trailers.get(GRPC_STATUS)).is_none_or(|status| status == "0")
    }
}

/// A [`CachePredicate`] for a layer in front of gRPC only: records a call only when it
/// succeeded, `grpc-status: 0`. The default, [`SuccessOnly`](crate::SuccessOnly), does the same
/// for gRPC responses; this one also refuses trailers that carry no `grpc-status`.
///
/// - A response head with a `grpc-status` is a trailers-only answer: recorded if that status
///   is `0`, released otherwise (this is how tonic answers a handler's `Err(Status)`).
/// - Otherwise the status comes in the trailers, after the messages: recorded if the trailers
///   carry `grpc-status: 0`, released otherwise (a stream that failed mid-way, say). A body
///   that ends with no trailers at all was decided by its head: that is the trailers-only
///   form.
/// - The HTTP status must be `200`, as gRPC requires.
///
/// A response that is not gRPC (its content type is not `application/grpc*`, as from an
/// axum route beside the tonic service) is judged by its head as by
/// [`SuccessOnly`](crate::SuccessOnly): a `2xx` is recorded. Its trailers, if it has any,
/// must still carry `grpc-status: 0`, so give such routes a layer of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcStatusOk;

impl CachePredicate for GrpcStatusOk {
    fn should_record(&self, head: &response::Parts) -> bool {
        if !is_grpc(&head.headers) {
            return head.status.is_success();
        }
        succeeded(head)
    }

    fn should_record_trailers(&self, trailers: Option<&HeaderMap>) -> bool {
        trailers.is_none_or(|trailers| trailers.get(GRPC_STATUS).is_some_and(|status| status == "0"))
    }
}

/// Whether the head of a gRPC response is that of a call that may have succeeded: HTTP `200`,
/// and no `grpc-status` in it or `grpc-status: 0` (a trailers-only success).
pub(crate) fn succeeded(head: &response::Parts) -> bool {
    head.status == StatusCode::OK && head.headers.get(GRPC_STATUS).is_none_or(|status| status == "0")
}

/// Whether `headers` (a request's or a response's) are gRPC's: content type
/// `application/grpc`, optionally followed by `+proto`, `+json`, `-web`, ...
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.len() >= 16 && value[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

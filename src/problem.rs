//! The responses the layer makes itself: RFC 9457 problem details by default.
//!
//! Every error the layer answers is, by default ([`Rfc9457`]), `application/problem+json` with
//! a stable `type` URI (one per problem, listed below), a `title`, the `status` and a `detail`
//! that says what went wrong: for `missing-key`, where the route reads the key; for
//! `invalid-key`, the rule the key broke; for `request-body-too-large`, the limit. None of them
//! echoes the key, the body or any other part of the request.
//!
//! An API with an error envelope of its own answers in it through a [`ProblemRenderer`]
//! ([`IdempotencyLayer::with_problem_renderer`](crate::IdempotencyLayer::with_problem_renderer)).
//! A renderer sees the [`Problem`] only — its [kind](ProblemKind), status and retry hint —
//! never the request, so it cannot echo the request either. Whatever it renders, the layer
//! adds the [retry hints](crate::hints), `Cache-Control: no-store` (unless the renderer set a
//! `Cache-Control`) and the [`Outcome`]. A gRPC request (content type
//! `application/grpc*`) gets a gRPC status instead, whatever the renderer: see
//! [`grpc`](crate::grpc).
//!
//! # missing-key
//! `400`: the route requires a key and the request has none. The `detail` asks for it where the
//! route reads it: the `Idempotency-Key` header, a header of another name, the JSON request
//! body, or a JSON-RPC call's `params._meta.idempotencyKey`.
//!
//! # invalid-key
//! `400`: the key is empty, longer than 255 bytes, holds a byte that is not visible ASCII, is a
//! malformed quoted string, or the header was sent more than once. The `detail` names which
//! ([`Problem::key_rule`] gives it to a renderer), for example `"The idempotency key is
//! longer than 255 bytes."`.
//!
//! # request-body-unreadable
//! `400`: the request body failed while the layer read it to fingerprint it.
//!
//! # request-body-not-json
//! `400`: the route reads its request body as JSON (its key is in the body, or its fingerprint
//! is taken from the JSON) and the body is not valid JSON. On a route that fingerprints its
//! body as canonical JSON (`BodyFingerprint::canonical_json`, feature `json`), a body that is
//! not I-JSON (a member name given twice in one object, a number no double can hold) is
//! refused the same way: two bodies that differ only there must not share a fingerprint. The
//! request did not run; the key can be used again with a corrected body.
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
//! # key-expired
//! `410` without `Retry-After`, on a route with a grace for expired keys
//! ([`IdempotencyLayer::with_expired_grace`](crate::IdempotencyLayer::with_expired_grace)): a
//! request with this key ran, its record was kept for the TTL and has expired since, so its
//! response is gone; within the grace the layer answers this instead of running the request
//! again. Retrying will not help; a new operation needs a new key. The answer carries
//! `Idempotency-Key-Retention` (how long keys are kept), as the route's recorded responses
//! do. `410 Gone`: what the key names is no longer available, for good (not `409`, which
//! clients retry as a conflict that may pass).
//!
//! # request-body-too-large
//! `413`: the request body is larger than the limit the layer buffers to fingerprint it
//! ([`IdempotencyLayer::with_max_request_body`](crate::IdempotencyLayer::with_max_request_body));
//! the `detail` states the limit ([`Problem::limit`]), for example `"The request body is larger
//! than 2097152 bytes, the most this endpoint accepts."`.
//!
//! # key-reused
//! `422`: the key was already used for a different request (method, path, query or body).
//!
//! # store-unavailable
//! `503` with `Retry-After`: the idempotency store could not be reached, so the request was not
//! run (fail closed).
//!
//! # transaction-failed
//! `503` with `Retry-After`, in transactional mode only (`transactional`, feature `postgres`): the
//! request's transaction did not commit for a reason that may pass (a serialization failure,
//! a deadlock, a lost connection), so nothing the handler wrote was kept and the key is free.
//! Retry: the retry executes against a database where this attempt never happened. (A
//! constraint the commit broke is `transaction-rejected`, final.)
//!
//! # response-too-large
//! `500`, in transactional mode only (`transactional`, feature `postgres`): the handler's response
//! was larger than the record limit, so it could not be recorded in the request's
//! transaction; the transaction was rolled back and nothing was written. Retrying will not
//! help until the response fits the limit.
//!
//! # transaction-rejected
//! `409` without `Retry-After`, in transactional mode only (`transactional`,
//! feature `postgres`): the request's transaction broke an integrity constraint of the
//! database when it committed (a deferred unique or foreign key constraint, for instance), so
//! nothing it did was kept and the key is free. Retrying the same request fails the same way.
//!
//! # transaction-ended
//! `500`, in transactional mode only (`transactional`, feature `postgres`): the
//! handler ended the request's transaction itself (it ran its own `COMMIT` or `ROLLBACK` on
//! the connection it was lent), so the response could not be recorded with it. Nothing was
//! recorded and the key is free; what the handler committed itself stays. A fault of the
//! server, not of the request: retrying does not help until the handler is fixed.

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::{InvalidKey, Outcome};

macro_rules! problems {
    ($(
        $(#[$doc:meta])* $konst:ident, $(#[$kind_doc:meta])* $kind:ident
            = $slug:literal, $status:literal, $title:literal, $detail:literal;
    )*) => {
        $( $(#[$doc])* pub const $konst: &str = concat!(
            "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#", $slug
        ); )*

        /// One of the problems the layer answers itself; see the [module docs](self) for each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemKind { $( $(#[$kind_doc])* $kind, )* }

        impl ProblemKind {
            /// Every kind, in the order of the module docs.
            pub const ALL: &[ProblemKind] = &[ $( ProblemKind::$kind, )* ];

            /// The stable `type` URI of its RFC 9457 body (one of this module's constants).
            #[must_use]
            pub const fn type_uri(self) -> &'static str {
                match self { $( Self::$kind => $konst, )* }
            }

            /// The last part of [`type_uri`](Self::type_uri): `"in-flight"`, `"key-reused"`, ...
            #[must_use]
            pub const fn slug(self) -> &'static str {
                match self { $( Self::$kind => $slug, )* }
            }

            /// Its HTTP status.
            #[must_use]
            pub const fn status(self) -> StatusCode {
                match self {
                    $( Self::$kind => match StatusCode::from_u16($status) { Ok(s) => s, Err(_) => unreachable!() }, )*
                }
            }

            /// A short, human-readable summary (the RFC 9457 `title`).
            #[must_use]
            pub const fn title(self) -> &'static str {
                match self { $( Self::$kind => $title, )* }
            }

            /// What happened and what the client can do (the RFC 9457 `detail`). Static text,
            /// never request content.
            #[must_use]
            pub const fn detail(self) -> &'static str {
                match self { $( Self::$kind => $detail, )* }
            }

            /// The RFC 9457 body of the default renderer.
            const fn body(self) -> &'static str {
                match self {
                    $( Self::$kind => concat!(
                        r#"{"type":"https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#"#,
                        $slug, r#"","title":""#, $title, r#"","status":"#, $status,
                        r#","detail":""#, $detail, r#""}"#
                    ), )*
                }
            }
        }
    };
}

problems! {
    /// `type` of the `400` for a missing key on a route that requires one.
    MISSING_KEY, /// `400`: the route requires a key and the request has none.
    MissingKey = "missing-key", 400, "Idempotency key required",
        "This endpoint requires an Idempotency-Key header.";
    /// `type` of the `400` for an invalid key.
    INVALID_KEY, /// `400`: the key is not a valid idempotency key.
    InvalidKey = "invalid-key", 400, "Invalid idempotency key",
        "The Idempotency-Key header must be sent once, holding 1 to 255 visible ASCII characters, bare or as a quoted string.";
    /// `type` of the `400` for a request body that could not be read.
    REQUEST_BODY_UNREADABLE, /// `400`: the request body failed while the layer read it.
    RequestBodyUnreadable = "request-body-unreadable", 400, "Request body unreadable",
        "The request body could not be read.";
    /// `type` of the `400` for a request body that is not JSON on a route that reads it as JSON.
    REQUEST_BODY_NOT_JSON, /// `400`: the route reads its body as JSON and it is not valid JSON.
    RequestBodyNotJson = "request-body-not-json", 400, "Request body not JSON",
        "This endpoint reads the request body as JSON, and it is not valid JSON.";
    /// `type` of the `409` for a duplicate of a request still in flight (with `Retry-After`).
    IN_FLIGHT, /// `409`, retryable: a request with this key and payload is still running.
    InFlight = "in-flight", 409, "Request in flight",
        "A request with this idempotency key is still being processed. Retry later.";
    /// `type` of the `409` for a key whose response was too large to keep (no `Retry-After`).
    RESPONSE_NOT_RETAINED, /// `409`, final: the request ran, but its response was too large to keep.
    ResponseNotRetained = "response-not-retained", 409, "Response not retained",
        "The request with this idempotency key was processed, but its response was too large to keep for replay.";
    /// `type` of the `410` for a key past its TTL, within its grace.
    KEY_EXPIRED, /// `410`, final: the key's request ran and its record expired; it does not run again.
    KeyExpired = "key-expired", 410, "Idempotency key expired",
        "A request with this idempotency key was processed, and its record has expired since, so the request is not run again. Use a new key for a new request.";
    /// `type` of the `413` for a request body over the buffering limit.
    REQUEST_BODY_TOO_LARGE, /// `413`: the request body is over the limit the layer buffers.
    RequestBodyTooLarge = "request-body-too-large", 413, "Request body too large",
        "The request body is larger than the idempotency layer accepts.";
    /// `type` of the `422` for a key reused with a different request.
    KEY_REUSED, /// `422`: the key was already used for a different request.
    KeyReused = "key-reused", 422, "Idempotency key reused",
        "This idempotency key was already used with a different request.";
    /// `type` of the `503` when the store is unreachable (with `Retry-After`).
    STORE_UNAVAILABLE, /// `503`, retryable: the store failed, so the request was not run.
    StoreUnavailable = "store-unavailable", 503, "Idempotency store unavailable",
        "The request was not processed because its idempotency could not be ensured. Retry later.";
    /// `type` of the `503` when the request's transaction did not commit (transactional mode).
    TRANSACTION_FAILED, /// `503`, retryable: the transaction did not commit; nothing was kept.
    TransactionFailed = "transaction-failed", 503, "Transaction failed",
        "The request's transaction did not commit, so nothing it did was kept. Retry later.";
    /// `type` of the `500` for a response too large to record in the transaction.
    RESPONSE_TOO_LARGE, /// `500`, final: the response was too large to record; nothing was kept.
    ResponseTooLarge = "response-too-large", 500, "Response too large",
        "The response was too large to record with the request's transaction, so the transaction was rolled back and nothing was kept.";
    /// `type` of the `409` for a transaction that broke an integrity constraint at its commit.
    TRANSACTION_REJECTED, /// `409`, final: the transaction broke an integrity constraint; nothing was kept.
    TransactionRejected = "transaction-rejected", 409, "Transaction rejected",
        "The request's transaction broke an integrity constraint of the database when it committed, so nothing it did was kept. Retrying the same request fails the same way.";
    /// `type` of the `500` for a handler that ended the request's transaction itself.
    TRANSACTION_ENDED, /// `500`, final: the handler ended the layer's transaction itself; nothing was recorded.
    TransactionEnded = "transaction-ended", 500, "Transaction ended by the handler",
        "The server ended the request's transaction before its response could be recorded with it, so nothing was recorded.";
}

impl ProblemKind {
    /// Whether a retry with the same key can succeed: `true` for [`InFlight`](Self::InFlight)
    /// [`StoreUnavailable`](Self::StoreUnavailable) and
    /// [`TransactionFailed`](Self::TransactionFailed), whose answers say when to come back.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::InFlight | Self::StoreUnavailable | Self::TransactionFailed)
    }

    pub(crate) const fn outcome(self) -> Outcome {
        match self {
            Self::MissingKey => Outcome::MissingKey,
            Self::InvalidKey => Outcome::InvalidKey,
            Self::RequestBodyUnreadable => Outcome::RequestBodyUnreadable,
            Self::RequestBodyNotJson => Outcome::RequestBodyNotJson,
            Self::InFlight => Outcome::InFlight,
            Self::ResponseNotRetained => Outcome::ResponseNotRetained,
            Self::KeyExpired => Outcome::KeyExpired,
            Self::RequestBodyTooLarge => Outcome::RequestBodyTooLarge,
            Self::KeyReused => Outcome::KeyReused,
            Self::StoreUnavailable => Outcome::StoreUnavailable,
            Self::TransactionFailed | Self::ResponseTooLarge | Self::TransactionRejected | Self::TransactionEnded => {
                Outcome::RolledBack
            }
        }
    }
}

/// A problem the layer answers, as a [`ProblemRenderer`] sees it: its kind, its status, and,
/// for a retryable one, when to retry. Nothing from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    kind: ProblemKind,
    retry_after: Option<Duration>,
    cause: Option<Cause>,
}

/// What exactly went wrong, where the kind alone does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The rule an invalid key broke.
    Key(InvalidKey),
    /// The limit a request body passed, in bytes.
    Limit(usize),
    /// Where the route reads the key a request lacked.
    Missing(KeyPlace),
}

/// Where a route reads its idempotency key: what its `missing-key` answer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyPlace {
    /// The `Idempotency-Key` header.
    Header,
    /// A header of another name.
    OtherHeader,
    /// A JSON request body.
    #[cfg(feature = "json")]
    Body,
    /// A JSON-RPC request's `params._meta.idempotencyKey`.
    #[cfg(feature = "json")]
    JsonRpc,
}

impl Problem {
    /// `kind`, with its retry hint: `retry_after` is kept for a
    /// [retryable](ProblemKind::is_retryable) kind only.
    #[must_use]
    pub const fn new(kind: ProblemKind, retry_after: Option<Duration>) -> Self {
        Self { kind, retry_after: if kind.is_retryable() { retry_after } else { None }, cause: None }
    }

    /// The `invalid-key` problem of a key that broke `rule`: its [`detail`](Self::detail)
    /// names the rule.
    #[must_use]
    pub const fn invalid_key(rule: InvalidKey) -> Self {
        Self { kind: ProblemKind::InvalidKey, retry_after: None, cause: Some(Cause::Key(rule)) }
    }

    /// The `missing-key` problem of a route that reads its key at `place`: its detail asks for
    /// the key there.
    pub(crate) const fn missing_key(place: KeyPlace) -> Self {
        // The `Idempotency-Key` header is what the kind's own detail asks for.
        let cause = match place {
            KeyPlace::Header => None,
            place => Some(Cause::Missing(place)),
        };
        Self { kind: ProblemKind::MissingKey, retry_after: None, cause }
    }

    /// The `request-body-too-large` problem of a body over `limit` bytes: its
    /// [`detail`](Self::detail) states the limit.
    #[must_use]
    pub const fn body_too_large(limit: usize) -> Self {
        Self { kind: ProblemKind::RequestBodyTooLarge, retry_after: None, cause: Some(Cause::Limit(limit)) }
    }

    /// For an `invalid-key` problem, the rule the key broke.
    #[must_use]
    pub const fn key_rule(&self) -> Option<InvalidKey> {
        match self.cause {
            Some(Cause::Key(rule)) => Some(rule),
            _ => None,
        }
    }

    /// For a `request-body-too-large` problem, the limit the body passed, in bytes.
    #[must_use]
    pub const fn limit(&self) -> Option<usize> {
        match self.cause {
            Some(Cause::Limit(limit)) => Some(limit),
            _ => None,
        }
    }

    /// Which problem it is.
    #[must_use]
    pub const fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// Its HTTP status ([`ProblemKind::status`]).
    #[must_use]
    pub const fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// How long the client should wait before retrying with the same key: `Some` for the
    /// retryable problems (`409` in flight, `503`), `None` for the final ones.
    #[must_use]
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The `title` ([`ProblemKind::title`]).
    #[must_use]
    pub const fn title(&self) -> &'static str {
        self.kind.title()
    }

    /// The `detail`: what went wrong and what the client can do. The kind's own
    /// ([`ProblemKind::detail`]), or, where the problem knows more, one that says it: the rule
    /// an invalid key broke, the limit a request body passed, where the route reads the key a
    /// request lacked. Never request content.
    #[must_use]
    pub fn detail(&self) -> Cow<'static, str> {
        match self.cause {
            None => Cow::Borrowed(self.kind.detail()),
            Some(Cause::Missing(place)) => Cow::Borrowed(missing_key_detail(place)),
            Some(Cause::Key(rule)) => Cow::Borrowed(key_rule_detail(rule)),
            Some(Cause::Limit(limit)) => {
                Cow::Owned(format!("The request body is larger than {limit} bytes, the most this endpoint accepts."))
            }
        }
    }

    /// The `Retry-After` value: [`retry_after`](Self::retry_after) in whole seconds, rounded
    /// up, at least 1, saturating (so `Duration::MAX` never overflows).
    #[must_use]
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(retry_after_secs)
    }

    /// The `retry-after-ms` value: [`retry_after`](Self::retry_after) in milliseconds, rounded
    /// up, and never more than [`retry_after_secs`](Self::retry_after_secs) × 1000
    /// (saturating).
    #[must_use]
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.retry_after.map(retry_after_ms)
    }
}

/// Turns a [`Problem`] into the response the client gets. Implemented by [`Rfc9457`] (the
/// default) and by every closure `Fn(&Problem) -> http::Response<Bytes>`.
///
/// It sees the problem only, never the request, so nothing from the request can end up in
/// the answer. The layer then adds the [retry hints](crate::hints) (replacing headers of the
/// same names), `Cache-Control: no-store` unless the rendered response has a
/// `Cache-Control`, and the [`Outcome`]. The renderer chooses the status too: an API that
/// answers a reused key with `400`, as Stripe does, can.
///
/// Stripe's error envelope:
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, StatusCode, header::CONTENT_TYPE};
/// use tower_idempotency::{
///     IdempotencyLayer,
///     hints::{RetryHint, STRIPE_SHOULD_RETRY},
///     problem::{Problem, ProblemKind},
/// };
///
/// fn stripe_error(problem: &Problem) -> Response<Bytes> {
///     let (status, kind) = match problem.kind() {
///         ProblemKind::KeyReused => (StatusCode::BAD_REQUEST, "idempotency_error"),
///         ProblemKind::InFlight | ProblemKind::ResponseNotRetained => (StatusCode::CONFLICT, "idempotency_error"),
///         ProblemKind::StoreUnavailable => (problem.status(), "api_error"),
///         _ => (problem.status(), "invalid_request_error"),
///     };
///     let body = serde_json::json!({ "error": { "type": kind, "message": problem.detail() } });
///     Response::builder()
///         .status(status)
///         .header(CONTENT_TYPE, "application/json")
///         .body(Bytes::from(body.to_string()))
///         .unwrap()
/// }
///
/// let layer = IdempotencyLayer::new()
///     .with_problem_renderer(stripe_error)
///     .with_retry_hints(RetryHint::DEFAULT.into_iter().chain([RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)]));
/// # let _ = layer;
///
/// let answer = stripe_error(&Problem::new(ProblemKind::KeyReused, None));
/// assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
/// let json: serde_json::Value = serde_json::from_slice(answer.body()).unwrap();
/// assert_eq!(json["error"]["type"], "idempotency_error");
/// ```
pub trait ProblemRenderer: Send + Sync + 'static {
    /// The response for `problem`.
    fn render(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> ProblemRenderer for F
where
    F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

/// The default [`ProblemRenderer`]: RFC 9457 `application/problem+json` with the problem's
/// `type` URI, `title`, `status` and `detail`. The bodies are static strings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rfc9457;

impl ProblemRenderer for Rfc9457 {
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        let body = match problem.cause {
            None => Bytes::from_static(problem.kind.body().as_bytes()),
            Some(_) => Bytes::from(rfc9457_body(problem)),
        };
        let mut response = Response::new(body);
        *response.status_mut() = problem.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response
    }
}

/// The `detail` of a `missing-key` answer of a route that reads its key at `place`.
const fn missing_key_detail(place: KeyPlace) -> &'static str {
    match place {
        KeyPlace::Header => ProblemKind::MissingKey.detail(),
        KeyPlace::OtherHeader => "This endpoint requires an idempotency key header.",
        #[cfg(feature = "json")]
        KeyPlace::Body => "This endpoint requires an idempotency key in the JSON request body.",
        #[cfg(feature = "json")]
        KeyPlace::JsonRpc => {
            "This method requires an idempotency key in params._meta.idempotencyKey (a call without an id, a notification, needs none)."
        }
    }
}

/// The `detail` of an invalid key, per rule: which one it broke, and what a key is.
const fn key_rule_detail(rule: InvalidKey) -> &'static str {
    match rule {
        InvalidKey::Empty => "The idempotency key is empty. A key holds 1 to 255 visible ASCII characters.",
        InvalidKey::TooLong => "The idempotency key is longer than 255 bytes.",
        InvalidKey::InvalidByte => {
            "The idempotency key holds a character that is not visible ASCII (a space, a control character or a non-ASCII byte)."
        }
        InvalidKey::MalformedQuotedString => {
            "The idempotency key starts with a double quote but is not a well-formed quoted string: one closing quote at the end, only a quote or a backslash escaped inside."
        }
        InvalidKey::Repeated => "The idempotency key header was sent more than once; send it once.",
        InvalidKey::NotAString => {
            "The idempotency key in the request body is not a string, or is in a batch (one key cannot stand for several calls)."
        }
    }
}

/// The RFC 9457 body of a problem whose detail is its own (the other bodies are static).
fn rfc9457_body(problem: &Problem) -> String {
    let mut body = format!(
        r#"{{"type":"{}","title":"{}","status":{},"detail":""#,
        problem.kind.type_uri(),
        problem.kind.title(),
        problem.status().as_u16()
    );
    for c in problem.detail().chars() {
        match c {
            '"' => body.push_str("\\\""),
            '\\' => body.push_str("\\\\"),
            c => body.push(c),
        }
    }
    body.push_str("\"}");
    body
}

/// The [`ProblemRenderer`] of a JSON-RPC route
/// (`KeySource::json_rpc`, feature `json`, sets it): a JSON-RPC 2.0 error
/// response, `application/json`, with the problem's HTTP status (so its retry hints keep
/// their HTTP meaning):
///
/// ```json
/// {"jsonrpc":"2.0","id":null,"error":{"code":-32001,"message":"Request in flight",
///  "data":{"type":"https://docs.rs/…#in-flight","status":409,"retryAfterMs":1000}}}
/// ```
///
/// `message` is the problem's title, `data.type` its `type` URI, `data.detail` what went wrong
/// (a missing key: where it goes), `data.retryAfterMs` is there for a retryable problem. The layer sets `id` to the request's (it stays `null` when the
/// request's id could not be read: a body not JSON, too large, or a batch).
/// The codes ([`ProblemKind::json_rpc_code`]): `-32700` (parse error) for a body that is not
/// JSON, `-32600` (invalid request) for a body too large or unreadable, `-32602` (invalid
/// params) for a missing or invalid key, and from `-32001` down the server errors: `-32001`
/// in flight, `-32002` key reused, `-32003` response not retained, `-32004` store unavailable,
/// `-32005` transaction failed, `-32006` response too large, `-32007` transaction rejected,
/// `-32008` transaction ended; `-32009` key expired; `-32000` for a problem without a code of its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonRpc;

impl ProblemKind {
    /// The JSON-RPC error code of the [`JsonRpc`] renderer.
    #[must_use]
    pub const fn json_rpc_code(self) -> i32 {
        #[allow(unreachable_patterns)]
        match self {
            Self::RequestBodyNotJson => -32700,
            Self::RequestBodyTooLarge | Self::RequestBodyUnreadable => -32600,
            Self::MissingKey | Self::InvalidKey => -32602,
            Self::InFlight => -32001,
            Self::KeyReused => -32002,
            Self::ResponseNotRetained => -32003,
            Self::StoreUnavailable => -32004,
            Self::TransactionFailed => -32005,
            Self::ResponseTooLarge => -32006,
            Self::TransactionRejected => -32007,
            Self::TransactionEnded => -32008,
            Self::KeyExpired => -32009,
            _ => -32000,
        }
    }
}

impl ProblemRenderer for JsonRpc {
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        let kind = problem.kind;
        let retry = problem.retry_after_ms().map(|ms| format!(r#","retryAfterMs":{ms}"#)).unwrap_or_default();
        let detail = problem.detail();
        // The title and type URI are static JSON-safe text (the RFC 9457 bodies embed them too).
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{},"message":"{}","data":{{"type":"{}","status":{},"detail":"{}"{}}}}}}}"#,
            kind.json_rpc_code(),
            kind.title(),
            kind.type_uri(),
            problem.status().as_u16(),
            json_escaped(&detail),
            retry,
        );
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = problem.status();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// `text` as the inside of a JSON string (the details are ASCII without control characters).
fn json_escaped(text: &str) -> Cow<'_, str> {
    if !text.contains(['"', '\\']) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `Retry-After` in whole seconds: rounded up, at least 1, saturating at `u64::MAX` (so a
/// `Duration::MAX` never overflows).
fn retry_after_secs(after: Duration) -> u64 {
    after.as_secs().saturating_add(u64::from(after.subsec_nanos() > 0)).max(1)
}

/// `retry-after-ms`: the wait in milliseconds, rounded up, and at most the `Retry-After`
/// seconds × 1000 (saturating).
fn retry_after_ms(after: Duration) -> u64 {
    let ms = u64::try_from(after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    ms.min(retry_after_secs(after).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_saturates() {
        let cases = [
            (Duration::ZERO, 1, 0),
            (Duration::from_nanos(1), 1, 1),
            (Duration::from_millis(1), 1, 1),
            (Duration::from_secs(1), 1, 1000),
            (Duration::from_millis(1500), 2, 1500),
            (Duration::from_micros(1_500_001), 2, 1501),
            (Duration::from_secs(2), 2, 2000),
            (Duration::from_secs(u64::MAX / 1000), u64::MAX / 1000, u64::MAX / 1000 * 1000),
            (Duration::from_secs(u64::MAX / 1000 + 1), u64::MAX / 1000 + 1, u64::MAX),
            (Duration::from_secs(u64::MAX - 1) + Duration::from_nanos(1), u64::MAX, u64::MAX),
            (Duration::from_secs(u64::MAX), u64::MAX, u64::MAX),
            (Duration::MAX, u64::MAX, u64::MAX),
        ];
        for (after, secs, ms) in cases {
            assert_eq!(retry_after_secs(after), secs, "{after:?}");
            assert_eq!(retry_after_ms(after), ms, "{after:?}");
            assert!(ms <= secs.saturating_mul(1000), "{after:?}");
        }
    }

    #[test]
    fn json_rpc_errors_are_json_rpc_responses() {
        for &kind in ProblemKind::ALL {
            let problem = Problem::new(kind, Some(Duration::from_millis(1500)));
            let response = JsonRpc.render(&problem);
            assert_eq!(response.status(), kind.status());
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(json["jsonrpc"], "2.0");
            assert!(json["id"].is_null());
            assert_eq!(json["error"]["code"], kind.json_rpc_code());
            assert_eq!(json["error"]["message"], kind.title());
            assert_eq!(json["error"]["data"]["type"], kind.type_uri());
            assert_eq!(json["error"]["data"]["status"], kind.status().as_u16());
            assert!(json["error"]["data"]["detail"].as_str().is_some_and(|detail| !detail.is_empty()));
            let retry = json["error"]["data"].get("retryAfterMs");
            assert_eq!(retry.is_some(), kind.is_retryable(), "{kind:?}");
        }
        let detail = |problem: Problem| {
            let json: serde_json::Value = serde_json::from_slice(JsonRpc.render(&problem).body()).unwrap();
            json["error"]["data"]["detail"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            detail(Problem::invalid_key(crate::InvalidKey::TooLong)),
            "The idempotency key is longer than 255 bytes."
        );
        #[cfg(feature = "json")]
        assert!(detail(Problem::missing_key(KeyPlace::JsonRpc)).contains("params._meta.idempotencyKey"));
        assert_eq!(json_escaped(r#"a "b" \c"#), r#"a \"b\" \\c"#);
        let codes: std::collections::HashSet<_> = ProblemKind::ALL.iter().map(|kind| kind.json_rpc_code()).collect();
        assert!(codes.contains(&-32700) && codes.contains(&-32602) && codes.contains(&-32001));
    }

    #[test]
    fn a_missing_key_is_asked_for_where_the_route_reads_it() {
        let detail = |place| Problem::missing_key(place).detail();
        assert_eq!(Problem::missing_key(KeyPlace::Header), Problem::new(ProblemKind::MissingKey, None));
        assert!(detail(KeyPlace::Header).contains("Idempotency-Key header"));
        let elsewhere = [
            (KeyPlace::OtherHeader, "idempotency key header"),
            #[cfg(feature = "json")]
            (KeyPlace::Body, "idempotency key in the JSON request body"),
            #[cfg(feature = "json")]
            (KeyPlace::JsonRpc, "idempotency key in params._meta.idempotencyKey"),
        ];
        for (place, asks) in elsewhere {
            assert!(detail(place).contains(asks), "{place:?}: {}", detail(place));
            assert!(!detail(place).contains("Idempotency-Key"), "{place:?}: {}", detail(place));
            // The RFC 9457 body carries the same detail.
            let json: serde_json::Value =
                serde_json::from_slice(Rfc9457.render(&Problem::missing_key(place)).body()).unwrap();
            assert_eq!(json["detail"], *detail(place));
        }
    }

    #[test]
    fn a_final_problem_drops_its_retry_after() {
        assert_eq!(Problem::new(ProblemKind::KeyReused, Some(Duration::from_secs(1))).retry_after(), None);
        assert_eq!(Problem::new(ProblemKind::InFlight, None).retry_after(), None);
    }
}

//! The header names both halves of the crate use: the server writes or reads them, the client
//! reads or writes them. Public at the root (the key and replay headers) and in `hints` (the
//! retry hints).

use http::HeaderName;

/// The default header carrying the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header a replayed response carries: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The response headers a browser page needs to read from the layer's answers, for
/// tower-http's `CorsLayer::expose_headers` (or any CORS layer's `Access-Control-Expose-Headers`):
/// `Idempotent-Replayed` (on a replay), and the retry hints `Retry-After`, `retry-after-ms`,
/// `x-should-retry` and `Stripe-Should-Retry` (on the layer's own answers), and
/// `Idempotency-Key-Retention` (how long keys are kept, when an expired grace is set). CORS safelists
/// none of them: without this setting, a page calling the API from another origin reads none.
///
/// ```
/// use tower_http::cors::CorsLayer;
///
/// let cors = CorsLayer::new().expose_headers(tower_idempotency::EXPOSE_HEADERS);
/// # let _ = cors;
/// ```
pub const EXPOSE_HEADERS: [HeaderName; 6] = [
    IDEMPOTENT_REPLAYED,
    http::header::RETRY_AFTER,
    RETRY_AFTER_MS,
    X_SHOULD_RETRY,
    STRIPE_SHOULD_RETRY,
    IDEMPOTENCY_KEY_RETENTION,
];

/// `retry-after-ms`: how long to wait before retrying, in milliseconds. Not standard; sent and
/// read by the Stainless-generated SDKs (OpenAI's, Anthropic's), which prefer it to
/// `Retry-After` for its precision.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// `x-should-retry`: `true` or `false`, the server's word on whether a retry can help. Not
/// standard; obeyed by the Stainless-generated SDKs (OpenAI's, Anthropic's).
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// `Stripe-Should-Retry`: Stripe's name for [`X_SHOULD_RETRY`], obeyed by Stripe's SDKs.
pub const STRIPE_SHOULD_RETRY: HeaderName = HeaderName::from_static("stripe-should-retry");

/// `traceparent`: the W3C trace context of the caller's span.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `Last-Event-ID`: the id of the last `text/event-stream` event a reconnecting client saw.
pub(crate) const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// `Idempotency-Key-Retention`: how long the layer keeps what a key did, sent on a route with
/// a grace for expired keys ([`with_expired_grace`](crate::IdempotencyLayer::with_expired_grace))
/// on its recorded responses (and so their replays) and on its `key-expired` answers. An RFC
/// 9651 Dictionary of whole seconds: `ttl=86400, grace=604800` (the record is replayed for
/// `ttl` after the request ran; for `grace` after that the key gets `410` `key-expired`; then
/// it is free). Named after the field whose lifetime it describes: the IETF draft that defines
/// `Idempotency-Key` asks servers to publish their expiry policy but names no field for it,
/// and RFC 6648 advises against an `X-` prefix.
pub const IDEMPOTENCY_KEY_RETENTION: HeaderName = HeaderName::from_static("idempotency-key-retention");

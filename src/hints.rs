//! Retry hints: the response headers that tell a client whether, and when, to retry.
//!
//! Both halves of the crate speak them. The layer puts them on the answers it makes itself
//! (never on a handler's response or a replay), as configured with
//! [`IdempotencyLayer::with_retry_hints`](crate::IdempotencyLayer::with_retry_hints); the
//! client's [`DefaultClassifier`](crate::client::DefaultClassifier) and
//! [`retry_after`](crate::client::retry_after) read them.
//!
//! | answer | hint (default set) | who reads it |
//! | --- | --- | --- |
//! | retryable: `409` in flight, `503` store unavailable | `Retry-After: <seconds>` (rounded up) | RFC 9110; clients following the IETF draft; Stripe's Python SDK |
//! | | `retry-after-ms: <milliseconds>` (at most the seconds × 1000) | the Stainless-generated SDKs (OpenAI, Anthropic), before `Retry-After` |
//! | final: `400`, `413`, `422`, `409` response-not-retained and transaction-rejected, `500` | `x-should-retry: false` | the Stainless-generated SDKs, which otherwise retry every `409` |
//! | | `Stripe-Should-Retry: false` (not in the default set) | Stripe's SDKs, which otherwise retry every `409` |
//!
//! A Stripe-compatible API adds Stripe's header to the default set:
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, hints::{RetryHint, STRIPE_SHOULD_RETRY}};
//!
//! let layer = IdempotencyLayer::new()
//!     .with_retry_hints(RetryHint::DEFAULT.into_iter().chain([RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)]));
//! # let _ = layer;
//! ```

use http::{HeaderMap, HeaderName, HeaderValue, header::RETRY_AFTER};

use crate::problem::Problem;

pub use crate::headers::{RETRY_AFTER_MS, STRIPE_SHOULD_RETRY, X_SHOULD_RETRY};

/// One header the layer's own answers carry to say whether and when to retry.
///
/// Set the list with
/// [`IdempotencyLayer::with_retry_hints`](crate::IdempotencyLayer::with_retry_hints); the
/// default is [`RetryHint::DEFAULT`]. Keep [`RetryAfter`](Self::RetryAfter): it is what marks
/// a `409` as "in flight, come back" rather than "not retained" for clients that follow the
/// IETF draft, this crate's [`RetryPolicy`](crate::client::RetryPolicy) among them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryHint {
    /// `Retry-After: <seconds>` (RFC 9110, section 10.2.3), rounded up to whole seconds, at
    /// least 1, on retryable answers.
    RetryAfter,
    /// [`retry-after-ms`](RETRY_AFTER_MS)`: <milliseconds>` on retryable answers: the wait
    /// rounded up to the millisecond, and never more than `Retry-After` × 1000, so a client
    /// reading either header waits no longer than the other one says.
    RetryAfterMs,
    /// `<name>: false` on final answers (`400`, `413`, `422`, `409` response-not-retained):
    /// [`X_SHOULD_RETRY`] for the Stainless-generated SDKs, [`STRIPE_SHOULD_RETRY`] for
    /// Stripe's. Retryable answers get no value: their status and `Retry-After` already say so.
    ShouldRetry(HeaderName),
}

impl RetryHint {
    /// The default set: `Retry-After`, `retry-after-ms`, and `x-should-retry: false`.
    pub const DEFAULT: [RetryHint; 3] =
        [RetryHint::RetryAfter, RetryHint::RetryAfterMs, RetryHint::ShouldRetry(X_SHOULD_RETRY)];
}

/// Puts `hints` for `problem` on `headers`, replacing what a renderer may have set under the
/// same names.
pub(crate) fn apply(hints: &[RetryHint], problem: &Problem, headers: &mut HeaderMap) {
    for hint in hints {
        match hint {
            RetryHint::RetryAfter => {
                if let Some(secs) = problem.retry_after_secs() {
                    headers.insert(RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            RetryHint::RetryAfterMs => {
                if let Some(ms) = problem.retry_after_ms() {
                    headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
                }
            }
            RetryHint::ShouldRetry(name) => {
                if !problem.kind().is_retryable() {
                    headers.insert(name.clone(), HeaderValue::from_static("false"));
                }
            }
        }
    }
}

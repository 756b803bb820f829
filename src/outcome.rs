//! What the layer did with a request, for logs and metrics.

use std::fmt;

/// What the layer did with a request.
///
/// Every response the layer guarded or answered itself carries its `Outcome` in its
/// extensions; read it with [`Outcome::of`]. Requests the layer let through untouched (an
/// uncovered method, or no key where one is optional) carry none, so the bypass path allocates
/// nothing: `Outcome::of` reports them as [`Outcome::Bypassed`].
///
/// ```
/// # use tower_idempotency::Outcome;
/// let response = http::Response::new(());
/// assert_eq!(Outcome::of(&response), Outcome::Bypassed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Not covered (method), or no key where one is optional: passed through untouched.
    Bypassed,
    /// First request with this key: the handler ran (its response is recorded if the cache
    /// predicate accepts it and its body ends normally).
    Executed,
    /// A recorded response was replayed; the handler did not run.
    Replayed,
    /// A duplicate joined the same request in flight: it got the first request's response as
    /// it was produced ([`Duplicates::Join`](crate::Duplicates::Join)); the handler did not run.
    Joined,
    /// `409`: the same request is still in flight.
    InFlight,
    /// `409`: the request ran, but its response was too large to keep.
    ResponseNotRetained,
    /// `410`: the key's record expired, within the grace the layer keeps expired keys for.
    KeyExpired,
    /// `422`: the key was used for a different request.
    KeyReused,
    /// `400`: the key is invalid.
    InvalidKey,
    /// `400`: the key is required and missing.
    MissingKey,
    /// `400`: the request body failed while being read.
    RequestBodyUnreadable,
    /// `400`: the route reads its body as JSON and it is not valid JSON.
    RequestBodyNotJson,
    /// `413`: the request body is over the limit.
    RequestBodyTooLarge,
    /// `503`: the store failed and the layer fails closed.
    StoreUnavailable,
    /// The store failed and the layer fails open: the handler ran without protection.
    Unprotected,
    /// Transactional mode: the handler ran, but its transaction was rolled back (a failed
    /// commit, a response over the record limit), so nothing was kept.
    RolledBack,
}

impl Outcome {
    /// The outcome recorded on `response`; [`Outcome::Bypassed`] when there is none.
    pub fn of<B>(response: &http::Response<B>) -> Self {
        response.extensions().get::<Self>().copied().unwrap_or(Self::Bypassed)
    }

    /// A short, stable name for metrics labels (`"executed"`, `"replayed"`, ...).
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Bypassed => "bypassed",
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Joined => "joined",
            Self::InFlight => "in_flight",
            Self::ResponseNotRetained => "response_not_retained",
            Self::KeyExpired => "key_expired",
            Self::KeyReused => "key_reused",
            Self::InvalidKey => "invalid_key",
            Self::MissingKey => "missing_key",
            Self::RequestBodyUnreadable => "request_body_unreadable",
            Self::RequestBodyNotJson => "request_body_not_json",
            Self::RequestBodyTooLarge => "request_body_too_large",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unprotected => "unprotected",
            Self::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

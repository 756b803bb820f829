//! [`IdempotencyLayer`]: the builder and the tower `Layer`.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, Method, response};
use tokio::sync::Semaphore;
use tower::Layer;

use crate::{
    Idempotency, MemoryStore, Scope,
    hints::RetryHint,
    lock::Keeper,
    problem::{Answers, ProblemRenderer},
    store::IdempotencyStore,
};

/// The default header carrying the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Decides whether a response becomes the key's record. Implemented for closures
/// `Fn(&http::response::Parts) -> bool`.
///
/// A response it rejects releases the key, so a retry executes again. The default,
/// [`SuccessOnly`], records `2xx` responses only.
pub trait CachePredicate: Send + Sync + 'static {
    /// Whether to record the response whose head is `head`.
    fn should_record(&self, head: &response::Parts) -> bool;

    /// Whether a response whose head was accepted is still recorded once its body ended with
    /// `trailers` (`None`: no trailers). Asked before the record is written, so the answer
    /// can depend on a status sent in the trailers (gRPC's `grpc-status`). Default: `true`.
    ///
    /// A rejection releases the key. A body that passed the record limit was decided at the
    /// limit (a tombstone) and is not asked.
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

/// The default [`CachePredicate`]: record `2xx` responses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SuccessOnly;

impl CachePredicate for SuccessOnly {
    fn should_record(&self, head: &response::Parts) -> bool {
        head.status.is_success()
    }
}

/// What to do with a request that has no key. Default: [`KeyPolicy::Optional`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyPolicy {
    /// Pass it through untouched, like an uncovered method.
    #[default]
    Optional,
    /// Answer `400` with the `missing-key` problem.
    Required,
}

/// What a duplicate of a request still in flight gets. Default: [`InFlight::Reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    /// `409` with the `in-flight` problem and this `Retry-After` (rounded up to seconds).
    Reject {
        /// The `Retry-After` to send. Default: 1 s.
        retry_after: Duration,
    },
    /// Wait up to `timeout` for the first request to finish and answer with its result (a
    /// replay); past the timeout, `409` as in `Reject` with a `Retry-After` of 1 s. If the first
    /// request fails and releases the key, one waiter executes instead.
    Wait {
        /// How long to wait at most.
        timeout: Duration,
    },
}

impl Default for InFlight {
    fn default() -> Self {
        Self::Reject { retry_after: Duration::from_secs(1) }
    }
}

/// What the layer does when the store fails (unreachable, timed out, full).
/// Default: [`StoreFailure::FailClosed`] with a 1 s `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Answer `503` with the `store-unavailable` problem and this `Retry-After`; the handler
    /// does not run.
    FailClosed {
        /// The `Retry-After` to send.
        retry_after: Duration,
    },
    /// Run the handler without protection (no lock, nothing recorded), logging a warning.
    FailOpen,
}

impl Default for StoreFailure {
    fn default() -> Self {
        Self::FailClosed { retry_after: Duration::from_secs(1) }
    }
}

/// An invalid configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The header name is not a valid HTTP header name.
    InvalidHeaderName(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidHeaderName(name) => write!(f, "`{name}` is not a valid HTTP header name"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Settings shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    pub(crate) key_policy: KeyPolicy,
    pub(crate) scope: Scope,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) max_request_body: usize,
    pub(crate) max_record: usize,
    pub(crate) predicate: Arc<dyn CachePredicate>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) in_flight: InFlight,
    pub(crate) store_failure: StoreFailure,
    pub(crate) unstored_headers: Vec<HeaderName>,
    pub(crate) detached: Arc<Semaphore>,
    pub(crate) max_detached: usize,
    /// How the layer's own answers are made: the renderer and the retry hints.
    pub(crate) answers: Answers,
    /// Renews the leases of this configuration's locks.
    pub(crate) keeper: Keeper,
}

impl Config {
    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("header", &self.header)
            .field("key_policy", &self.key_policy)
            .field("scope", &self.scope)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("max_request_body", &self.max_request_body)
            .field("max_record", &self.max_record)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("in_flight", &self.in_flight)
            .field("store_failure", &self.store_failure)
            .field("unstored_headers", &self.unstored_headers)
            .field("max_detached", &self.max_detached)
            .field("retry_hints", &self.answers.hints)
            .finish_non_exhaustive()
    }
}

/// Default limit on the request body buffered for the fingerprint: 2 MiB (axum's default).
pub const DEFAULT_MAX_REQUEST_BODY: usize = 2 * 1024 * 1024;
/// Default limit on a recorded response body: 1 MiB.
pub const DEFAULT_MAX_RECORD: usize = 1024 * 1024;
/// Default time a completed record is kept, from completion: 24 h.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest TTL or lease kept: a century. Longer values (up to `Duration::MAX`, "forever")
/// are lowered to it.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Default lease of an in-flight lock: 30 s (renewed every third of it while the handler runs).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default bound on handlers detached after their client went away: 1024.
pub const DEFAULT_MAX_DETACHED: usize = 1024;

/// The layer that makes covered requests idempotent. See the [crate docs](crate).
///
/// `St` is the store; [`IdempotencyLayer::new`] uses a fresh [`MemoryStore`]. Every setter
/// takes and returns the layer by value and documents its default. Clones share the store.
#[must_use]
pub struct IdempotencyLayer<St = MemoryStore> {
    store: Arc<St>,
    config: Arc<Config>,
}

impl IdempotencyLayer<MemoryStore> {
    /// A layer with the defaults and a new in-memory store.
    pub fn new() -> Self {
        Self::with_store(MemoryStore::new())
    }
}

impl Default for IdempotencyLayer<MemoryStore> {
    fn default() -> Self {
        Self::new()
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer with the defaults over `store`. To share keys between several layers (per-route
    /// layers with different settings, say), clone the layer and change the clone's settings:
    /// clones share the store.
    pub fn with_store(store: St) -> Self {
        let config = Config {
            methods: vec![Method::POST, Method::PATCH],
            header: IDEMPOTENCY_KEY,
            key_policy: KeyPolicy::Optional,
            scope: Scope::authorization(),
            fingerprint_headers: Vec::new(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_record: DEFAULT_MAX_RECORD,
            predicate: Arc::new(SuccessOnly),
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            in_flight: InFlight::default(),
            store_failure: StoreFailure::default(),
            unstored_headers: vec![http::header::SET_COOKIE],
            detached: Arc::new(Semaphore::new(DEFAULT_MAX_DETACHED)),
            max_detached: DEFAULT_MAX_DETACHED,
            answers: Answers::default(),
            keeper: Keeper::new(DEFAULT_LEASE),
        };
        Self { store: Arc::new(store), config: Arc::new(config) }
    }

    /// The store this layer uses.
    pub fn store(&self) -> &Arc<St> {
        &self.store
    }

    /// The settings its services share.
    #[cfg(test)]
    pub(crate) fn settings(&self) -> &Config {
        &self.config
    }

    fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods the layer covers; others pass through untouched. Default: `POST`, `PATCH`.
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// The header carrying the key. Default: `Idempotency-Key`.
    pub fn with_header_name(self, name: HeaderName) -> Self {
        self.config(|c| c.header = name)
    }

    /// [`with_header_name`](Self::with_header_name) from a string, with an error for an invalid
    /// name.
    pub fn try_with_header_name(self, name: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::try_from(name).map_err(|_| ConfigError::InvalidHeaderName(name.to_owned()))?;
        Ok(self.with_header_name(name))
    }

    /// Whether a covered request without a key passes through or gets `400`.
    /// Default: [`KeyPolicy::Optional`]. To require a key on some routes only, layer those
    /// routes with a clone of this layer set to [`KeyPolicy::Required`].
    pub fn with_key_policy(self, policy: KeyPolicy) -> Self {
        self.config(|c| c.key_policy = policy)
    }

    /// Who a key belongs to. Default: [`Scope::authorization`], the SHA-256 digest of the
    /// `Authorization` header.
    pub fn with_scope(self, scope: Scope) -> Self {
        self.config(|c| c.scope = scope)
    }

    /// Headers included in the request fingerprint, besides method, path, query and body.
    /// Default: none.
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.config(|c| c.fingerprint_headers = headers)
    }

    /// The largest request body the layer buffers to fingerprint; larger gets `413`.
    /// Default: 2 MiB.
    pub fn with_max_request_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_request_body = bytes)
    }

    /// The largest response body recorded. A larger response is still sent in full, but only a
    /// tombstone is kept: retries get `409` `response-not-retained`. Default: 1 MiB.
    pub fn with_max_record(self, bytes: usize) -> Self {
        self.config(|c| c.max_record = bytes)
    }

    /// Which responses are recorded; the others release the key. Default: [`SuccessOnly`]
    /// (`2xx`).
    pub fn with_cache_predicate(self, predicate: impl CachePredicate) -> Self {
        let predicate = Arc::new(predicate);
        self.config(|c| c.predicate = predicate)
    }

    /// How long a record is kept, counted from completion; replays never extend it.
    /// Default: 24 h. At most a century (`Duration::MAX` is taken as that).
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.config(|c| c.ttl = ttl.clamp(Duration::from_millis(1), MAX_DURATION))
    }

    /// The lease of an in-flight lock: renewed every third of it while the handler runs, so a
    /// crashed process frees its keys within one lease. Default: 30 s. Values under 3 ms are
    /// raised to 3 ms.
    pub fn with_lease(self, lease: Duration) -> Self {
        let lease = lease.clamp(Duration::from_millis(3), MAX_DURATION);
        self.config(|c| {
            c.lease = lease;
            c.keeper = Keeper::new(lease);
        })
    }

    /// What a duplicate of an in-flight request gets. Default: [`InFlight::Reject`] with a 1 s
    /// `Retry-After`.
    pub fn with_in_flight(self, in_flight: InFlight) -> Self {
        self.config(|c| c.in_flight = in_flight)
    }

    /// What happens when the store fails. Default: [`StoreFailure::FailClosed`] with a 1 s
    /// `Retry-After`.
    pub fn with_store_failure(self, on_failure: StoreFailure) -> Self {
        self.config(|c| c.store_failure = on_failure)
    }

    /// Response headers never stored, so never replayed, on top of those always left out
    /// (hop-by-hop headers, `Content-Length`, recomputed, and `Date`). Default: `Set-Cookie`,
    /// so one caller's session cookie is never handed to whoever replays.
    pub fn with_unstored_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.config(|c| c.unstored_headers = headers)
    }

    /// How the bodies of the layer's own answers (`400`, `409`, `413`, `422`, `503`) are made.
    /// Default: [`Rfc9457`](crate::problem::Rfc9457), `application/problem+json`.
    ///
    /// The renderer sees the [`Problem`](crate::problem::Problem) only, never the request; the
    /// layer adds the [retry hints](Self::with_retry_hints), `Cache-Control: no-store` and the
    /// [`Outcome`](crate::Outcome) to what it renders. A gRPC request gets a gRPC status
    /// instead ([`grpc`](crate::grpc)).
    pub fn with_problem_renderer(self, renderer: impl ProblemRenderer) -> Self {
        let renderer = Arc::new(renderer);
        self.config(|c| c.answers.renderer = renderer)
    }

    /// The headers the layer's own answers carry to tell clients whether and when to retry
    /// (the list replaces the default). Default: [`RetryHint::DEFAULT`]: `Retry-After` and
    /// `retry-after-ms` on retryable answers (`409` in flight, `503`), `x-should-retry: false`
    /// on final ones (`400`, `413`, `422`, `409` response-not-retained). A Stripe-compatible
    /// API adds [`RetryHint::ShouldRetry`]`(`[`STRIPE_SHOULD_RETRY`](crate::hints::STRIPE_SHOULD_RETRY)`)`.
    /// Executions and replays never carry a hint.
    pub fn with_retry_hints(self, hints: impl IntoIterator<Item = RetryHint>) -> Self {
        let hints = hints.into_iter().collect();
        self.config(|c| c.answers.hints = hints)
    }

    /// The most requests kept running after their client went away, so their result is
    /// recorded. Past it, a handler that has not answered yet is cancelled and its key released;
    /// one that already answered (its body was being sent) keeps a tombstone, so it never runs
    /// twice. Default: 1024.
    pub fn with_max_detached(self, max: usize) -> Self {
        let detached = Arc::new(Semaphore::new(max));
        self.config(|c| {
            c.detached = detached;
            c.max_detached = max;
        })
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), config: self.config.clone() }
    }
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.store.clone(), self.config.clone())
    }
}

//! The settings the layer's services share, and the strategies they plug in: what a missing
//! key or a duplicate in flight gets, what a store failure does, and the defaults (what is
//! recorded, the cache predicate, is `crate::predicate`). [`IdempotencyLayer`](crate::IdempotencyLayer) builds them.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, header, response};
use tokio::sync::Semaphore;

use crate::{
    BodyFingerprint, KeySource, Scope, UploadAppends,
    hints::RetryHint,
    layer::{duplicates::Waiting, lock::Keeper},
    predicate::CachePredicate,
    problem::{Problem, ProblemRenderer, Rfc9457},
    secret::Digests,
};

/// What to do with a request that has no key. Default: [`KeyPolicy::Optional`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyPolicy {
    /// Pass it through untouched, like an uncovered method.
    #[default]
    Optional,
    /// Answer `400` with the `missing-key` problem.
    Required,
}

/// What a duplicate of a request still in flight gets. Default: [`Duplicates::Reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Duplicates {
    /// `409` with the `in-flight` problem and this `Retry-After` (rounded up to seconds).
    Reject {
        /// The `Retry-After` to send. Default: 1 s.
        retry_after: Duration,
    },
    /// Wait up to `timeout` for the first request to finish and answer with its result (a
    /// replay); past the timeout, `409` as in `Reject` with a `Retry-After` of 1 s. If the first
    /// request fails and releases the key, one waiter executes instead.
    ///
    /// The wait is woken by the store when the first request ends (no polling). At most
    /// [`with_max_waiters`](crate::IdempotencyLayer::with_max_waiters) duplicates of one key
    /// wait in one process; past that, `409`.
    Wait {
        /// How long to wait at most.
        timeout: Duration,
    },
    /// Join the first request's response as it is produced: the duplicate gets its
    /// status and headers as soon as they exist, every body byte produced so far at once, then
    /// each further byte as it is produced, and ends when the first ends, with
    /// `Idempotent-Replayed: true`. The handler runs once, however many clients reconnect.
    ///
    /// - A duplicate waits up to `timeout` for the first request's head; past it, `409` as in
    ///   `Reject` with a `Retry-After` of 1 s. Once joined, it follows to the end.
    /// - The first request fails before its head: one duplicate executes instead (as in
    ///   `Wait`). It fails mid-body (an error, a panic, a status its trailers reject): every
    ///   joined body ends with an error, and the key is released.
    /// - A response over the record limit cannot be joined: once it passes the limit, joined
    ///   bodies end with an error and new duplicates get `409` `response-not-retained`.
    /// - `text/event-stream`: a duplicate that sends `Last-Event-ID: X` gets only the events
    ///   after the one whose `id:` is `X`, exactly, whatever the stream's length, line endings
    ///   or chunks, on every store and replica. Replays honour it too. Event ids are meant to
    ///   be unique; if `X` repeats, the resume is after its last occurrence in what is
    ///   published when the duplicate arrives (in a replay, in the whole response).
    /// - Seen means resumable: a client may get an event before its publish reaches the store
    ///   (one round trip later). A joiner whose `X` is not in the log yet waits for it, up to
    ///   1 s, woken by the store, at no cost in round trips; an `X` the stream never has costs
    ///   that second before the body starts, then gets the whole stream (a replay of an
    ///   unknown `X` gets it at once).
    /// - At most [`with_max_waiters`](crate::IdempotencyLayer::with_max_waiters) duplicates of
    ///   one key join in one process; past that, `409` with `Retry-After`.
    /// - Across replicas: the executing request publishes its response to the store as it is
    ///   recorded ([`LiveLog::publish`](crate::store::LiveLog::publish)),
    ///   and joiners on any replica follow it there. Publishing never waits for the store on
    ///   the response's path: while one publish is under way, what follows is batched into
    ///   the next. A response whose body is complete before its head goes out publishes
    ///   nothing at all.
    /// - In transactional mode (`transactional`, feature `postgres`), where the response is
    ///   released only once committed, `Join` waits as `Wait` does.
    Join {
        /// How long to wait at most for the first request's head.
        timeout: Duration,
    },
}

impl Duplicates {
    /// [`Duplicates::Join`] with a `timeout` of 30 s (the default lease).
    pub const fn join() -> Self {
        Self::Join { timeout: DEFAULT_LEASE }
    }

    /// How long a duplicate waits for the first request, if it waits at all.
    pub(crate) fn wait_timeout(&self) -> Option<Duration> {
        match self {
            Self::Reject { .. } => None,
            Self::Wait { timeout } | Self::Join { timeout } => Some(*timeout),
        }
    }
}

impl Default for Duplicates {
    fn default() -> Self {
        Self::Reject { retry_after: Duration::from_secs(1) }
    }
}

/// What the layer does when the store fails (unreachable, timed out, full).
/// Default: [`StoreFailure::FailClosed`] with a 1 s `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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

/// Settings shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) header: HeaderName,
    /// Where the key is read: the header, or the body.
    pub(crate) key_source: KeySource,
    pub(crate) key_policy: KeyPolicy,
    /// Whether upload appends of the resumable-upload draft pass untouched.
    pub(crate) upload_appends: UploadAppends,
    pub(crate) scope: Scope,
    /// The keyed digests of the scope and the fingerprint.
    pub(crate) digests: Digests,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    /// How the body enters the fingerprint: raw bytes, or canonical JSON.
    pub(crate) body_fingerprint: BodyFingerprint,
    pub(crate) max_request_body: usize,
    pub(crate) max_record: usize,
    pub(crate) predicate: Arc<dyn CachePredicate>,
    pub(crate) ttl: Duration,
    /// How long past its TTL a key gets `key-expired` (zero: no grace).
    pub(crate) expired_grace: Duration,
    /// `Idempotency-Key-Retention`, with a grace: recorded responses and `key-expired` carry it.
    pub(crate) retention: Option<HeaderValue>,
    pub(crate) lease: Duration,
    pub(crate) duplicates: Duplicates,
    pub(crate) store_failure: StoreFailure,
    pub(crate) unstored_headers: Vec<HeaderName>,
    pub(crate) detached: Arc<Semaphore>,
    pub(crate) max_detached: usize,
    /// The duplicates waiting for or joining each key in flight, bounded per key.
    pub(crate) waiting: Arc<Waiting>,
    /// How the layer's own answers are made: the renderer and the retry hints.
    pub(crate) answers: Answers,
    /// Renews the leases of this configuration's locks.
    pub(crate) keeper: Keeper,
    /// Names the executing span in a record, and links a replay's span to it.
    pub(crate) trace: Option<Arc<dyn crate::TraceHook>>,
    /// Whether these settings' bounds were set in the metrics' gauges (feature `metrics`).
    pub(crate) bounds_shown: crate::telemetry::BoundsShown,
}

impl Config {
    /// The store key of the request whose head is `head`: its scope, keyed with `keyed`, and
    /// its idempotency key. The one formula of the request path and of
    /// [`IdempotencyLayer::store_key`](crate::IdempotencyLayer::store_key).
    pub(crate) fn store_key(
        &self,
        keyed: &crate::secret::Keyed,
        head: &http::request::Parts,
        key: crate::IdempotencyKey,
    ) -> crate::store::StoreKey {
        crate::store::StoreKey::new(self.scope.resolve(head, keyed.scope_key()), key)
    }

    /// The `Retry-After` of a `409` in flight: the reject setting's, or 1 s past a wait.
    pub(crate) fn in_flight_retry_after(&self) -> Duration {
        match self.duplicates {
            Duplicates::Reject { retry_after } => retry_after,
            Duplicates::Wait { .. } | Duplicates::Join { .. } => Duration::from_secs(1),
        }
    }

    /// The `Retry-After` of a `503` store-unavailable: the fail-closed setting's, or 1 s where
    /// the layer answers `503` although it would fail open (a secret the store's other users
    /// do not share; transactional mode, which cannot run unprotected).
    pub(crate) fn unavailable_retry_after(&self) -> Duration {
        match self.store_failure {
            StoreFailure::FailClosed { retry_after } => retry_after,
            StoreFailure::FailOpen => Duration::from_secs(1),
        }
    }

    /// Sets `retention` from the TTL and the grace (none without a grace).
    pub(crate) fn set_retention(&mut self) {
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        self.retention = (!self.expired_grace.is_zero()).then(|| {
            let value = format!("ttl={}, grace={}", secs(self.ttl), secs(self.expired_grace));
            HeaderValue::try_from(value).expect("digits, commas and spaces")
        });
    }

    /// What a covered request without a key gets: `None`, to run through unguarded (keys are
    /// optional), or the `missing-key` problem asking for the key where this route reads it.
    /// The one decision of the header path and of the body path.
    pub(crate) fn missing_key(&self) -> Option<crate::problem::Problem> {
        if self.key_policy == KeyPolicy::Optional {
            return None;
        }
        Some(crate::problem::Problem::missing_key(self.key_source.place(&self.header)))
    }

    pub(crate) fn covers(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("header", &self.header)
            .field("key_source", &self.key_source)
            .field("key_policy", &self.key_policy)
            .field("upload_appends", &self.upload_appends)
            .field("scope", &self.scope)
            .field("digests", &self.digests)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("body_fingerprint", &self.body_fingerprint)
            .field("max_request_body", &self.max_request_body)
            .field("max_record", &self.max_record)
            .field("ttl", &self.ttl)
            .field("expired_grace", &self.expired_grace)
            .field("lease", &self.lease)
            .field("duplicates", &self.duplicates)
            .field("store_failure", &self.store_failure)
            .field("unstored_headers", &self.unstored_headers)
            .field("max_detached", &self.max_detached)
            .field("trace", &self.trace.is_some())
            .field("max_waiters", &self.waiting.max)
            .field("retry_hints", &self.answers.hints)
            .finish_non_exhaustive()
    }
}

/// How the layer answers its problems: the renderer and the retry hints.
#[derive(Clone)]
pub(crate) struct Answers {
    pub(crate) renderer: std::sync::Arc<dyn ProblemRenderer>,
    pub(crate) hints: Vec<RetryHint>,
}

impl Default for Answers {
    fn default() -> Self {
        Self { renderer: std::sync::Arc::new(Rfc9457), hints: RetryHint::DEFAULT.to_vec() }
    }
}

impl Answers {
    /// The head and body of the answer to `problem`; `grpc` for a gRPC request, which gets a
    /// gRPC status whatever the renderer.
    pub(crate) fn render(&self, problem: Problem, grpc: bool) -> (response::Parts, Bytes) {
        let response = if grpc { crate::grpc::render(&problem) } else { self.renderer.render(&problem) };
        let (mut head, body) = response.into_parts();
        crate::hints::apply(&self.hints, &problem, &mut head.headers);
        if !head.headers.contains_key(header::CACHE_CONTROL) {
            head.headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        head.extensions.insert(problem.kind().outcome());
        (head, body)
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
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Default lease of an in-flight lock: 30 s (renewed every third of it while the handler runs).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default bound on handlers detached after their client went away: 1024.
pub const DEFAULT_MAX_DETACHED: usize = 1024;
/// Default bound on the duplicates of one key that wait for it or join it, per process: 64.
pub const DEFAULT_MAX_WAITERS: usize = 64;

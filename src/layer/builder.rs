//! [`IdempotencyLayer`]: the builder and the tower `Layer`.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderName, Method};
use tokio::sync::Semaphore;
use tower::Layer;

use crate::{
    BodyFingerprint, Idempotency, IdempotencyKey, KeySource, Scope, TraceHook, UploadAppends,
    error::ConfigError,
    headers::IDEMPOTENCY_KEY,
    hints::RetryHint,
    layer::config::Answers,
    layer::config::{
        Config, DEFAULT_LEASE, DEFAULT_MAX_DETACHED, DEFAULT_MAX_RECORD, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_WAITERS,
        DEFAULT_TTL, Duplicates, KeyPolicy, MAX_DURATION, StoreFailure,
    },
    layer::duplicates::Waiting,
    layer::lock::{Keeper, LiveOps},
    predicate::{CachePredicate, SuccessOnly},
    problem::ProblemRenderer,
    secret::{Digests, Secret},
    store::{IdempotencyStore, LiveLog, MemoryStore, StoreKey},
};

/// The layer that makes covered requests idempotent. See the [crate docs](crate).
///
/// `St` is the store; [`IdempotencyLayer::new`] uses a fresh [`MemoryStore`]. Every setter
/// takes and returns the layer by value and documents its default. Clones share the store.
#[must_use]
pub struct IdempotencyLayer<St = MemoryStore> {
    store: Arc<St>,
    config: Arc<Config>,
    /// The store's live log, set with a mode that needs it (wait, join).
    live: Option<LiveOps<St>>,
}

impl IdempotencyLayer<MemoryStore> {
    /// A layer with the defaults and a new in-memory store.
    pub fn new() -> Self {
        Self::from_store(MemoryStore::new())
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
    ///
    /// A store that outlives the process (Redis, PostgreSQL) also needs
    /// [`with_secret`](Self::with_secret), the same on every replica; until it has one, every
    /// guarded request is refused with `503`.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, store::MemoryStore};
    ///
    /// let store = MemoryStore::builder().with_max_entries(10_000).build();
    /// let orders = IdempotencyLayer::from_store(store);
    /// // Clones share the store: a second route's layer with settings of its own.
    /// let payments = orders.clone().with_key_policy(tower_idempotency::KeyPolicy::Required);
    /// # let _ = (orders, payments);
    /// ```
    pub fn from_store(store: St) -> Self {
        let config = Config {
            methods: vec![Method::POST, Method::PATCH],
            header: IDEMPOTENCY_KEY,
            key_source: KeySource::header(),
            key_policy: KeyPolicy::Optional,
            upload_appends: UploadAppends::Pass,
            scope: Scope::authorization(),
            digests: Digests::default_for(&store),
            fingerprint_headers: Vec::new(),
            body_fingerprint: BodyFingerprint::raw(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_record: DEFAULT_MAX_RECORD,
            predicate: Arc::new(SuccessOnly),
            ttl: DEFAULT_TTL,
            expired_grace: Duration::ZERO,
            retention: None,
            lease: DEFAULT_LEASE,
            duplicates: Duplicates::default(),
            store_failure: StoreFailure::default(),
            unstored_headers: vec![http::header::SET_COOKIE],
            detached: Arc::new(Semaphore::new(DEFAULT_MAX_DETACHED)),
            max_detached: DEFAULT_MAX_DETACHED,
            waiting: Waiting::new(DEFAULT_MAX_WAITERS),
            answers: Answers::default(),
            keeper: Keeper::new(DEFAULT_LEASE),
            trace: None,
            bounds_shown: Default::default(),
        };
        Self { store: Arc::new(store), config: Arc::new(config), live: None }
    }

    /// The store this layer uses.
    pub fn store(&self) -> &Arc<St> {
        &self.store
    }

    /// The store key of the request whose head is `head` with idempotency key `key`, as this
    /// layer computes it: its [scope](Self::with_scope), keyed with its
    /// [secret](Self::with_secret). What an operator looks up with the store's
    /// [`Inspect`](crate::store::Inspect) capability: `head` needs only what the scope reads
    /// (the `Authorization` header, by default; the extension or header a custom scope reads).
    ///
    /// [`ConfigError::NoSecret`] over a store that outlives the process without a secret (such
    /// a layer refuses every guarded request, so it has keyed nothing).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, store::{Inspect, KeyState}};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = IdempotencyLayer::new();
    /// // The head of the customer's request: what the scope reads (by default `Authorization`).
    /// let head = http::Request::post("/orders").header("authorization", "Bearer cust_42").body(())?.into_parts().0;
    /// let key = layer.store_key(&head, &IdempotencyKey::parse(b"order-77")?)?;
    /// assert_eq!(layer.store().inspect(&key).await?, KeyState::Unknown);
    /// # Ok(())
    /// # }
    /// ```
    pub fn store_key(&self, head: &http::request::Parts, key: &IdempotencyKey) -> Result<StoreKey, ConfigError> {
        let keyed = self.config.digests.unchecked().ok_or(ConfigError::NoSecret)?;
        Ok(self.config.store_key(keyed, head, key.clone()))
    }

    /// A layer in another mode over this one's store, with this one's settings (changed by
    /// `settings` where the mode needs it).
    #[cfg(feature = "postgres")]
    pub(crate) fn into_mode<M>(
        self,
        mode: impl FnOnce(Arc<St>) -> M,
        settings: impl FnOnce(&mut Config),
    ) -> IdempotencyLayer<M> {
        let Self { store, config, .. } = self.config(settings);
        IdempotencyLayer { store: Arc::new(mode(store)), config, live: None }
    }

    /// The settings its services share.
    #[cfg(test)]
    pub(crate) fn settings(&self) -> &Config {
        &self.config
    }

    fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        f(config);
        // Settings changed: shown again by the next service made.
        config.bounds_shown = Default::default();
        self
    }

    /// The methods the layer covers; others pass through untouched. Default: `POST`, `PATCH`.
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // `PUT` too: idempotent by definition, unless the handler charges a card.
    /// let layer = IdempotencyLayer::new().with_methods([Method::POST, Method::PATCH, Method::PUT]);
    /// # let _ = layer;
    /// ```
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// The header carrying the key. Default: `Idempotency-Key`.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new().with_header_name(HeaderName::from_static("x-request-key"));
    /// # let _ = layer;
    /// ```
    pub fn with_header_name(self, name: HeaderName) -> Self {
        self.config(|c| c.header = name)
    }

    /// Where the key is read: the header (the default), a field of a JSON body, or a JSON-RPC
    /// request's `params._meta.idempotencyKey` (MCP); see [`KeySource`]. A JSON-RPC source
    /// also makes the layer's own answers JSON-RPC errors ([`JsonRpc`](crate::problem::JsonRpc)
    /// as the problem renderer; set another one after this to replace it).
    ///
    /// ```
    /// # #[cfg(feature = "json")] {
    /// use tower_idempotency::{IdempotencyLayer, KeySource};
    ///
    /// // An MCP server's `/mcp` endpoint: tool calls keyed by `params._meta.idempotencyKey`.
    /// let mcp = IdempotencyLayer::new().with_key_source(KeySource::json_rpc());
    /// # let _ = mcp;
    /// # }
    /// ```
    pub fn with_key_source(self, source: KeySource) -> Self {
        #[cfg(feature = "json")]
        let json_rpc = matches!(source.0, crate::key::Source::JsonRpc);
        self.config(|c| {
            #[cfg(feature = "json")]
            if json_rpc {
                c.answers.renderer = Arc::new(crate::problem::JsonRpc);
            }
            c.key_source = source;
        })
    }

    /// [`with_header_name`](Self::with_header_name) from a string, with an error for an invalid
    /// name.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new().try_with_header_name("X-Request-Key")?;
    /// assert!(IdempotencyLayer::new().try_with_header_name("not a header name").is_err());
    /// # let _ = layer;
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn try_with_header_name(self, name: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::try_from(name).map_err(|_| ConfigError::InvalidHeaderName(name.to_owned()))?;
        Ok(self.with_header_name(name))
    }

    /// Whether a covered request without a key passes through or gets `400`.
    /// Default: [`KeyPolicy::Optional`]. To require a key on some routes only, layer those
    /// routes with a clone of this layer set to [`KeyPolicy::Required`].
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, KeyPolicy};
    ///
    /// // Payments without a key get `400` `missing-key` instead of running unprotected.
    /// let payments = IdempotencyLayer::new().with_key_policy(KeyPolicy::Required);
    /// # let _ = payments;
    /// ```
    pub fn with_key_policy(self, policy: KeyPolicy) -> Self {
        self.config(|c| c.key_policy = policy)
    }

    /// What upload appends of the IETF resumable-upload draft get (`PATCH` with
    /// `Upload-Offset`, or a body of type `application/partial-upload`): by default
    /// ([`UploadAppends::Pass`]) they pass through untouched, with or without a key, as an
    /// uncovered method does. The draft makes them safe to repeat itself, by their offset; see
    /// [`UploadAppends`].
    pub fn with_upload_appends(self, appends: UploadAppends) -> Self {
        self.config(|c| c.upload_appends = appends)
    }

    /// The deployment secret that keys the digests a store keeps: the scope and the request
    /// fingerprint (HMAC-SHA-256), so that nothing a store keeps reveals a credential or a
    /// secret in a request body. See [`secret`](crate::secret) for what it protects and how to
    /// rotate it.
    ///
    /// Default: over a store that ends with the process ([`MemoryStore`]), a random secret
    /// drawn once per process. Over a store that outlives it (Redis, PostgreSQL: see
    /// [`IdempotencyStore::outlives_process`]) there is no default: set the same secret on
    /// every replica, or every guarded request is refused with `503` (a random secret per
    /// process would lose every record at a restart, and run its requests again). Such a
    /// layer checks at its first guarded request that the store's other users have the same
    /// secret, and refuses with `503` if not.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, Secret};
    ///
    /// // From the environment or a secret manager: at least 16 bytes, the same on every replica.
    /// let secret = std::env::var("IDEMPOTENCY_SECRET").unwrap_or_else(|_| "a development secret, never in production".into());
    /// let layer = IdempotencyLayer::new().with_secret(Secret::new(secret)?);
    /// # let _ = layer;
    /// # Ok::<(), tower_idempotency::ConfigError>(())
    /// ```
    pub fn with_secret(self, secret: Secret) -> Self {
        let digests = Digests::keyed(&secret, self.store.outlives_process());
        self.config(|c| c.digests = digests)
    }

    /// Who a key belongs to. Default: [`Scope::authorization`], a keyed digest of the
    /// `Authorization` header.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::{IdempotencyLayer, Scope};
    ///
    /// // Keys belong to the API key the client sends.
    /// let layer = IdempotencyLayer::new().with_scope(Scope::header(HeaderName::from_static("x-api-key")));
    /// # let _ = layer;
    /// ```
    pub fn with_scope(self, scope: Scope) -> Self {
        self.config(|c| c.scope = scope)
    }

    /// Headers included in the request fingerprint, besides method, path, query and body.
    /// Default: none.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // The same body for another account is another request (`422` under the same key).
    /// let layer = IdempotencyLayer::new().with_fingerprint_headers([HeaderName::from_static("x-account-id")]);
    /// # let _ = layer;
    /// ```
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.config(|c| c.fingerprint_headers = headers)
    }

    /// How the body enters the request fingerprint: [`BodyFingerprint::raw`] (the default),
    /// or, with the feature `json`, `BodyFingerprint::canonical_json` with
    /// listed members left out, where a body that is not JSON gets `400`
    /// [`request-body-not-json`](crate::problem::REQUEST_BODY_NOT_JSON).
    pub fn with_body_fingerprint(self, body: BodyFingerprint) -> Self {
        self.config(|c| c.body_fingerprint = body)
    }

    /// The largest request body the layer buffers to fingerprint; larger gets `413`.
    /// Default: 2 MiB.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let uploads = IdempotencyLayer::new().with_max_request_body(16 * 1024 * 1024);
    /// # let _ = uploads;
    /// ```
    pub fn with_max_request_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_request_body = bytes)
    }

    /// The largest response body recorded. A larger response is still sent in full, but only a
    /// not-retained record is kept: retries get `409` `response-not-retained`. Default: 1 MiB.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // Long LLM completions fit in a record.
    /// let layer = IdempotencyLayer::new().with_max_record(4 * 1024 * 1024);
    /// # let _ = layer;
    /// ```
    pub fn with_max_record(self, bytes: usize) -> Self {
        self.config(|c| c.max_record = bytes)
    }

    /// Which responses are recorded; the others release the key. Default: [`SuccessOnly`]
    /// (`2xx`, and a gRPC call only when its `grpc-status` is `0`).
    ///
    /// ```
    /// use http::response::Parts;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // Also record `4xx` answers (a declined card stays declined on a retry); `5xx` still runs again.
    /// let layer = IdempotencyLayer::new().with_cache_predicate(|head: &Parts| !head.status.is_server_error());
    /// # let _ = layer;
    /// ```
    pub fn with_cache_predicate(self, predicate: impl CachePredicate) -> Self {
        let predicate = Arc::new(predicate);
        self.config(|c| c.predicate = predicate)
    }

    /// How long a record is kept, counted from completion; replays never extend it.
    /// Default: 24 h. At most a century (`Duration::MAX` is taken as that).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new().with_ttl(Duration::from_secs(7 * 24 * 3600));
    /// # let _ = layer;
    /// ```
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.config(|c| {
            c.ttl = ttl.clamp(Duration::from_millis(1), MAX_DURATION);
            c.set_retention();
        })
    }

    /// Opt-in: for `grace` after a record's TTL, a retry of its key gets a final answer of its
    /// own, `410` [`key-expired`](crate::problem::KEY_EXPIRED) (with `x-should-retry: false`),
    /// instead of running again as a new request. Past the grace the key is free. Default:
    /// none (zero): a key past its TTL runs again. At most a century.
    ///
    /// Clients learn the retention from [`IDEMPOTENCY_KEY_RETENTION`](crate::IDEMPOTENCY_KEY_RETENTION)
    /// (`ttl=86400, grace=604800`, in seconds), on the route's recorded responses (so on their
    /// replays) and on its `key-expired` answers; add it to the API's docs too.
    ///
    /// The store keeps a mark of the key through the grace
    /// ([`IdempotencyStore::complete_with_grace`]); what that costs, per store:
    ///
    /// | store | what it keeps through the grace | cost |
    /// | --- | --- | --- |
    /// | [`MemoryStore`] | the entry, record included | its bytes, within the store's bounds (eviction may drop it first) |
    /// | `RedisStore` | a second key of its own, a few bytes (`1`), no record | one `SET` with `PX` more per completion; the record key expires at the TTL as before |
    /// | `PostgresStore` | the row, record included, and its `grace_until` | the row's bytes until the reaper deletes it at the grace's end |
    /// | `DynamoDbStore` | the item, record included, and its `grace` attribute | the item's storage until DynamoDB's TTL deletes it after the grace |
    ///
    /// Transactional mode keeps no mark: a key past its TTL runs again there.
    pub fn with_expired_grace(self, grace: Duration) -> Self {
        self.config(|c| {
            c.expired_grace = grace.min(MAX_DURATION);
            c.set_retention();
        })
    }

    /// The lease of an in-flight lock: renewed every third of it while the handler runs, so a
    /// crashed process frees its keys within one lease. Default: 30 s. Values under 3 ms are
    /// raised to 3 ms.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // A crashed replica's keys come free after 10 s instead of 30 s.
    /// let layer = IdempotencyLayer::new().with_lease(Duration::from_secs(10));
    /// # let _ = layer;
    /// ```
    pub fn with_lease(self, lease: Duration) -> Self {
        let lease = lease.clamp(Duration::from_millis(3), MAX_DURATION);
        self.config(|c| {
            c.lease = lease;
            c.keeper = Keeper::new(lease);
        })
    }

    /// What a duplicate of an in-flight request gets. Default: [`Duplicates::Reject`] with a 1 s
    /// `Retry-After`.
    ///
    /// Waiting and joining follow the lock's live log in the store, so this setting needs a
    /// store with that capability ([`LiveLog`]); every store of this crate has it. Over a store
    /// that implements only [`IdempotencyStore`], duplicates in flight get `409`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{Duplicates, IdempotencyLayer};
    ///
    /// // A duplicate waits up to 10 s for the first request and gets its response.
    /// let jobs = IdempotencyLayer::new().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) });
    /// // A reconnecting client joins a streamed completion still being generated.
    /// let completions = IdempotencyLayer::new().with_duplicates(Duplicates::join());
    /// # let _ = (jobs, completions);
    /// ```
    pub fn with_duplicates(mut self, in_flight: Duplicates) -> Self
    where
        St: LiveLog,
    {
        self.live = Some(LiveOps::new());
        self.config(|c| c.duplicates = in_flight)
    }

    /// The most duplicates of one key that wait for it ([`Duplicates::Wait`]) or join it
    /// ([`Duplicates::Join`]) in this process at once; past it, `409` with `Retry-After`. Each
    /// holds a connection and, when joined, its place in the shared response, until its body
    /// ends or its client leaves. Default: 64.
    ///
    /// ```
    /// use tower_idempotency::{Duplicates, IdempotencyLayer};
    ///
    /// let layer = IdempotencyLayer::new().with_duplicates(Duplicates::join()).with_max_waiters(8);
    /// # let _ = layer;
    /// ```
    pub fn with_max_waiters(self, max: usize) -> Self {
        let waiting = Waiting::new(max);
        self.config(|c| c.waiting = waiting)
    }

    /// How the layer meets the application's tracing system (OpenTelemetry, say): the hook
    /// names the span a request executes in, which its record keeps (with the caller's
    /// `traceparent`, kept without a hook), as does the head it publishes for joiners, and
    /// links a replayed or joined request's span to it. Without one, a replay's or a joiner's
    /// `idempotency` span still carries the original's ids as the fields `original_trace_id`
    /// and `original_traceparent`. Default: none. See [`TraceHook`].
    pub fn with_trace_hook(self, hook: impl TraceHook) -> Self {
        let hook: Arc<dyn TraceHook> = Arc::new(hook);
        self.config(|c| c.trace = Some(hook))
    }

    /// What happens when the store fails. Default: [`StoreFailure::FailClosed`] with a 1 s
    /// `Retry-After`.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, StoreFailure};
    ///
    /// // A store outage must not take the API down: run unprotected (and logged) meanwhile.
    /// let layer = IdempotencyLayer::new().with_store_failure(StoreFailure::FailOpen);
    /// # let _ = layer;
    /// ```
    pub fn with_store_failure(self, on_failure: StoreFailure) -> Self {
        self.config(|c| c.store_failure = on_failure)
    }

    /// Response headers never stored, so never replayed, on top of those always left out
    /// (hop-by-hop headers, `Content-Length`, recomputed, and `Date`). Default: `Set-Cookie`,
    /// so one caller's session cookie is never handed to whoever replays.
    ///
    /// ```
    /// use http::{HeaderName, header::SET_COOKIE};
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// // Keep `Set-Cookie` out, and the request id of the first attempt too.
    /// let layer = IdempotencyLayer::new().with_unstored_headers([SET_COOKIE, HeaderName::from_static("x-request-id")]);
    /// # let _ = layer;
    /// ```
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
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Response, header::CONTENT_TYPE};
    /// use tower_idempotency::{IdempotencyLayer, problem::Problem};
    ///
    /// // `{"error": "..."}`, as the rest of this API answers.
    /// let layer = IdempotencyLayer::new().with_problem_renderer(|problem: &Problem| {
    ///     let body = format!(r#"{{"error":"{}"}}"#, problem.kind().slug());
    ///     let mut response = Response::new(Bytes::from(body));
    ///     *response.status_mut() = problem.status();
    ///     response.headers_mut().insert(CONTENT_TYPE, "application/json".parse().unwrap());
    ///     response
    /// });
    /// # let _ = layer;
    /// ```
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
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, hints::{RetryHint, STRIPE_SHOULD_RETRY}};
    ///
    /// let layer = IdempotencyLayer::new()
    ///     .with_retry_hints(RetryHint::DEFAULT.into_iter().chain([RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)]));
    /// # let _ = layer;
    /// ```
    pub fn with_retry_hints(self, hints: impl IntoIterator<Item = RetryHint>) -> Self {
        let hints = hints.into_iter().collect();
        self.config(|c| c.answers.hints = hints)
    }

    /// The most requests kept running after their client went away, so their result is
    /// recorded. Past it, a handler that has not answered yet is cancelled and its key released;
    /// one that already answered (its body was being sent) keeps a not-retained record, so it never runs
    /// twice. Default: 1024.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::new().with_max_detached(256);
    /// # let _ = layer;
    /// ```
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
        Self { store: self.store.clone(), config: self.config.clone(), live: self.live }
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
        let config = &self.config;
        crate::telemetry::bounds(&config.bounds_shown, config.lease, config.waiting.max, config.max_detached);
        Idempotency::new(inner, self.store.clone(), self.config.clone(), self.live)
    }
}

//! Make HTTP `POST` and `PATCH` safe to retry.
//!
//! A client sends `Idempotency-Key: <key>` with a request; [`IdempotencyLayer`] runs the
//! handler once, records its response, and replays that response to every retry of the same
//! key, so a network timeout never charges a card, places an order or bills an LLM generation
//! twice. It follows the IETF `Idempotency-Key` draft and Stripe's semantics.
//!
//! **The [guide]** is the contract in one page: the path of a request through the layer, every
//! outcome, the guarantees, and where they stop. This page gets you started; each setting of
//! [`IdempotencyLayer`] and of each store's builder has an example on its own page.
//!
//! # Quick start (axum)
//!
//! ```
//! use axum::{Router, routing::post, http::StatusCode};
//! use tower_idempotency::IdempotencyLayer;
//!
//! async fn create_order(body: String) -> (StatusCode, String) {
//!     (StatusCode::CREATED, format!("order for {body}"))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(create_order))
//!     .layer(IdempotencyLayer::new());
//! # let _ = app;
//! ```
//!
//! The same request twice, with one key: the handler runs once, the second response is a
//! replay.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use axum::{Router, body::Body, routing::post, http::{Request, StatusCode}};
//! use tower::ServiceExt;
//! use tower_idempotency::IdempotencyLayer;
//!
//! let runs = Arc::new(AtomicUsize::new(0));
//! let counter = runs.clone();
//! let app = Router::new()
//!     .route("/orders", post(move || async move {
//!         counter.fetch_add(1, Ordering::SeqCst);
//!         (StatusCode::CREATED, "ord_1")
//!     }))
//!     .layer(IdempotencyLayer::new());
//!
//! let request = || Request::post("/orders").header("idempotency-key", "k-1").body(Body::from("{}")).unwrap();
//! let first = app.clone().oneshot(request()).await.unwrap();
//! let retry = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! # Quick start (hyper)
//!
//! The layer wraps any `tower::Service<http::Request<_>>`; serve it with hyper-util's
//! `TowerToHyperService`:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use hyper_util::{rt::{TokioExecutor, TokioIo}, server::conn::auto, service::TowerToHyperService};
//! use tower::ServiceBuilder;
//! use tower_idempotency::{IdempotencyLayer, RequestBody};
//!
//! let service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new())
//!     .service_fn(|_req: Request<RequestBody<hyper::body::Incoming>>| async {
//!         Ok::<_, Infallible>(Response::builder().status(StatusCode::CREATED).body(Full::new(Bytes::from("created"))).unwrap())
//!     });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     // Streamed responses whose chunks come apart are small writes; without this, Nagle's
//!     // algorithm holds each one until the client's delayed ACK (~40 ms). Answers complete
//!     // when the handler returns go out in one write either way.
//!     stream.set_nodelay(true)?;
//!     let service = TowerToHyperService::new(service.clone());
//!     tokio::spawn(async move {
//!         let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
//!     });
//! }
//! # }
//! ```
//!
//! # What happens to a request
//!
//! | request | answer |
//! | --- | --- |
//! | method not covered (default: anything but `POST`, `PATCH`) | passed through untouched |
//! | no key, key optional (default) | passed through untouched |
//! | no key, key required ([`KeyPolicy::Required`]) | `400` `missing-key` |
//! | invalid key (empty, > 255 bytes, not visible ASCII, bad quoting, sent twice) | `400` `invalid-key` |
//! | body over the limit (default 2 MiB) | `413` `request-body-too-large` |
//! | first time | handler runs; a `2xx` whose body ends normally is recorded |
//! | same key, same request, completed | replay: same status, headers, body, plus `Idempotent-Replayed: true` |
//! | same key, same request, still running | `409` `in-flight` with `Retry-After` (or wait, [`Duplicates::Wait`], or join its response as it is produced, [`Duplicates::Join`]) |
//! | same key, response was over the record limit (default 1 MiB) | `409` `response-not-retained`, no `Retry-After` |
//! | same key, different request (method, path, query, body) | `422` `key-reused` |
//! | store unreachable | `503` `store-unavailable` with `Retry-After` (or run unprotected, [`StoreFailure::FailOpen`]) |
//! | handler answers non-`2xx`, errors, panics, or its body fails | key released: a retry runs again |
//!
//! Errors the layer makes are RFC 9457 `application/problem+json` by default; see [`problem`]
//! for each `type`, and [`problem::ProblemRenderer`] to answer in an envelope of your own
//! (Stripe's, OpenAI's). Retryable ones (`409` in flight, `503`) carry `Retry-After` and
//! `retry-after-ms`, final ones `x-should-retry: false`, which the OpenAI and Anthropic SDKs
//! obey; the set is configurable ([`hints`]: add `Stripe-Should-Retry` for a
//! Stripe-compatible API). What the layer did is in the response extensions as an
//! [`Outcome`].
//!
//! # Semantics worth knowing
//!
//! - **Scope.** The stored key is (scope, key); by default the scope is a keyed digest of
//!   the `Authorization` header, so one tenant can never replay another's response. Requests
//!   without `Authorization` share one namespace. See [`Scope`].
//! - **Fingerprint.** A keyed digest over method, path, query and body (plus configured
//!   headers). The body is buffered (up to the limit) to compute it, then handed to the
//!   handler with the request's trailers, if it had any (trailers are not fingerprinted).
//! - **Secret.** Both digests are HMAC-SHA-256 under the deployment [`Secret`], so nothing a
//!   store keeps reveals a credential or a secret in a request body. [`store::MemoryStore`]
//!   needs no configuration (a random secret per process); over Redis or PostgreSQL, set the
//!   same secret on every replica with [`IdempotencyLayer::with_secret`]: without one the
//!   layer refuses with `503`, and replicas with different secrets are detected and refused.
//!   See [`secret`] for the threat model and rotation.
//! - **Browsers.** A page calling the API through CORS reads `Idempotent-Replayed` (and the
//!   retry hints) only if they are exposed: pass [`EXPOSE_HEADERS`] to tower-http's
//!   `CorsLayer::expose_headers`.
//! - **Streaming.** The handler's response streams to the client as produced while it is
//!   recorded. The record is written before the client can see the end, however the server
//!   reads the body (to its end, to `Content-Length`, to its trailers): the frame that ends it
//!   is held back until the record is stored. A body complete when the handler returns (a
//!   JSON answer, a stream with every chunk ready) is recorded before its head goes out, so
//!   head and body leave in one write: no second small write for Nagle's algorithm to hold
//!   until the client's delayed ACK on a server without `TCP_NODELAY`. The head waits only for
//!   the write's first attempt: a failing store holds back the body's end, not the head. A
//!   stream whose chunks come apart is several writes whatever the layer does: serve it with
//!   `TCP_NODELAY` (see the hyper quick start).
//! - **Completion is owned.** Once the handler answered with a recordable response, its record
//!   (or, past the record limit, a not-retained record) is written whatever happens to the client, and
//!   failed writes are retried with backoff while the lease lasts. Only a crash, or a store
//!   outage longer than the lease, leaves the key to expire; a retry then executes again.
//! - **Client gone.** A request whose handler is running when its client goes away is not
//!   cancelled: it runs to the end on the runtime (their number bounded) and is recorded, so
//!   the retry replays it. A detached body is read only until its record is decided (never
//!   past the record limit, never for a status that is not recorded). Requests that only
//!   wait, replay or are refused hold no detach slot and no capacity of the inner service.
//! - **Timeouts** belong inside the layer (between it and the handler): a timed-out handler then
//!   answers an error and releases its key. A timeout outside the layer drops the layer's
//!   future, which the layer treats as a client gone: the handler finishes in the background.
//! - **Leases.** A task per layer renews every lock a third of its lease (default 30 s) after
//!   its last renewal, whether or not the request is polled (a handler blocking in
//!   `block_in_place` keeps its lock); a request that finishes sooner costs no task. A crashed
//!   process frees its keys within one lease.
//! - **TTL.** A record lives for the TTL (default 24 h) from completion; replays never extend it.
//! - **Not replayed:** hop-by-hop headers, `Content-Length` (recomputed where the status allows
//!   a body and there are no trailers, so HTTP/1.1 sends a replay with trailers chunked),
//!   `Date`, and by default `Set-Cookie`. Trailers are recorded and replayed.
//! - **Keys are quoted or bare.** `"abc"` (Structured Field string, as the IETF draft writes
//!   it) and `abc` (as Stripe writes it) are the same key. Parameters after a quoted key are not
//!   accepted.
//!
//! # The client half
//!
//! [`client`] makes keys ([`IdempotencyKey::random`], [`client::KeyDeriver`]), stamps them on
//! requests ([`client::SetIdempotencyKeyLayer`]) and retries with the same key
//! ([`client::RetryPolicy`], a `tower::retry` policy). Stamp outside the retry layer. With the
//! `reqwest` feature, `client::reqwest::IdempotencyMiddleware` does both for a
//! `reqwest-middleware` client, by the same rules.
//!
//! # gRPC
//!
//! In front of a tonic service the layer works as it is, with no configuration: the key is the
//! `idempotency-key` metadata entry, the layer's own answers to a gRPC request are gRPC
//! statuses, and the default cache predicate records only calls that succeeded
//! (`grpc-status: 0`, in the head or in the trailers of a stream); a failed call releases its
//! key. See [`grpc`].
//!
//! # Stores
//!
//! | store | feature | for |
//! | --- | --- | --- |
//! | [`store::MemoryStore`] | (always; the default) | one process |
//! | `store::RedisStore` | `redis` (`redis-cluster` for Redis Cluster) | many replicas sharing a Redis |
//! | `store::PostgresStore` | `postgres` | records in the application's own PostgreSQL, and transactional mode (`IdempotencyLayer::transactional`): the handler's writes and the record in one transaction |
//! | `store::DynamoDbStore` | `dynamodb` | AWS Lambda functions and replicas sharing one DynamoDB table |
//!
//! A retry that lands on another replica replays the same record. Every store implements
//! [`store::IdempotencyStore`] (and [`store::LiveLog`], for waiting and joining) and passes
//! the same conformance suite; [`store`] shows how to write one of your own. A store shared
//! by processes needs the same [`Secret`] on every replica:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Starts even while Redis is down; each request then answers per the store-failure mode.
//! let store = tower_idempotency::store::RedisStore::builder().build(tower_idempotency::store::redis::Client::open("redis://127.0.0.1:6379")?);
//! // The same secret on every replica (from the environment or a secret manager).
//! let secret = tower_idempotency::Secret::new(std::env::var("IDEMPOTENCY_SECRET")?)?;
//! let layer = tower_idempotency::IdempotencyLayer::from_store(store).with_secret(secret);
//! # let _ = layer;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "redis"))]
//! # fn main() {}
//! ```
//!
//! # Feature flags
//!
//! - `redis`: `RedisStore`, over redis-rs's multiplexed `ConnectionManager` (re-exported as
//!   `tower_idempotency::store::redis`, so versions match).
//! - `redis-cluster`: `RedisStore` over Redis Cluster as well (every operation touches one key).
//! - `postgres`: `store::PostgresStore` on the application's sqlx `PgPool` (sqlx re-exported as
//!   `store::sqlx`; no TLS added by this crate), and its transactional mode
//!   (`IdempotencyLayer::transactional`): the handler's writes and the record commit in one
//!   transaction.
//! - `dynamodb`: `store::DynamoDbStore`, one DynamoDB table on the application's
//!   `aws-sdk-dynamodb` client (re-exported as `store::aws_sdk_dynamodb`), for AWS Lambda
//!   functions and replicas sharing keys.
//! - `reqwest`: `client::reqwest::IdempotencyMiddleware`, the client half for `reqwest` (on
//!   `reqwest-middleware`; `reqwest` without default features, so no TLS is added by this crate).
//! - `json`: keys read from a JSON body or a JSON-RPC request ([`KeySource`], for MCP tool calls),
//!   with `serde_json`.
//! - `conformance`: `store::conformance`, the suite every store passes, for a store crate of
//!   your own to run against its store in its tests.
//! - `metrics`: counters, gauges and histograms of what the layer does, through the `metrics`
//!   facade (any exporter: Prometheus, StatsD, OpenTelemetry); off, nothing is recorded. With
//!   Prometheus' recorder, a first request costs 1.07× the instructions it costs without the
//!   feature and a replay 1.11× (instructions counted with callgrind).
//!
//! No feature is on by default: the layer, the client half and `MemoryStore` need none.
//!
//! # Minimum Rust version
//!
//! Rust 1.85 (edition 2024) for the crate and every feature, except `postgres`: 1.94, what
//! sqlx 0.9 needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
mod error;
pub mod grpc;
pub mod guide;
mod headers;
pub mod hints;
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub mod json;
mod key;
mod layer;
mod outcome;
mod predicate;
pub mod problem;
mod rt;
mod scope;
pub mod secret;
pub mod store;
mod telemetry;
mod trace;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod transactional;
mod upload;

mod fingerprint;

pub use error::ConfigError;
pub use fingerprint::BodyFingerprint;
pub use headers::{EXPOSE_HEADERS, IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_RETENTION, IDEMPOTENT_REPLAYED};
pub use key::{IdempotencyKey, InvalidKey, JSON_RPC_KEY_POINTER, KeySource, MAX_KEY_LEN};
pub use layer::{
    DEFAULT_LEASE, DEFAULT_MAX_DETACHED, DEFAULT_MAX_RECORD, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_WAITERS,
    DEFAULT_TTL, Duplicates, Idempotency, IdempotencyLayer, KeyPolicy, RequestBody, ResponseBody, ResponseFuture,
    StoreFailure,
};
pub use outcome::Outcome;
pub use predicate::{CachePredicate, SuccessOnly};
pub use scope::{MakeScope, Scope, ScopeId};
pub use secret::Secret;
pub use trace::{Origin, TraceContext, TraceHook};
pub use upload::UploadAppends;

/// The README's code blocks, compiled as doctests (its store examples need the `redis`,
/// `postgres` and `dynamodb` features).
#[cfg(all(doctest, feature = "redis", feature = "postgres", feature = "dynamodb"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// What the public types promise to the servers and frameworks they go into, checked at
/// compile time: axum's `Router::layer` needs a `Clone + Send + Sync` service and a `Send`
/// future; hyper needs `Send` bodies.
#[cfg(test)]
mod static_checks {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;

    use super::*;
    use crate::store::{MemoryStore, StoreError};

    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    fn clone<T: Clone>() {}
    fn service<S: tower::Service<Request<Full<Bytes>>>>() -> std::marker::PhantomData<S::Future> {
        std::marker::PhantomData
    }
    fn send_value<T: Send>(_: T) {}

    type Handler =
        tower::util::BoxCloneSyncService<Request<RequestBody<Full<Bytes>>>, Response<Full<Bytes>>, Infallible>;

    #[test]
    fn the_public_types_are_send_and_sync_where_servers_need_it() {
        send::<Idempotency<Handler, MemoryStore>>();
        sync::<Idempotency<Handler, MemoryStore>>();
        clone::<Idempotency<Handler, MemoryStore>>();
        send_value(service::<Idempotency<Handler, MemoryStore>>());
        send::<
            ResponseFuture<
                <Handler as tower::Service<Request<RequestBody<Full<Bytes>>>>>::Future,
                Full<Bytes>,
                Infallible,
            >,
        >();
        send::<RequestBody<Full<Bytes>>>();
        sync::<RequestBody<Full<Bytes>>>();
        send::<ResponseBody<Full<Bytes>>>();
        send::<IdempotencyLayer>();
        sync::<IdempotencyLayer>();
        clone::<IdempotencyLayer>();
        send::<StoreError>();
        sync::<StoreError>();
        #[cfg(feature = "redis")]
        {
            send::<crate::store::RedisStore>();
            sync::<crate::store::RedisStore>();
        }
        #[cfg(feature = "postgres")]
        {
            use crate::transactional::Transactional;
            send::<Idempotency<Handler, Transactional>>();
            sync::<Idempotency<Handler, Transactional>>();
            clone::<Idempotency<Handler, Transactional>>();
            send_value(service::<Idempotency<Handler, Transactional>>());
            send::<IdempotencyLayer<Transactional>>();
            clone::<IdempotencyLayer<Transactional>>();
        }
    }
}

//! The client half: make keys, stamp them on requests, retry with the same key.
//!
//! The server layer makes a request safe to repeat; this module repeats it. It works with any
//! [`tower::Service`] that sends `http::Request`s (a `hyper_util` client, a `reqwest`-like
//! service, an in-process router in tests):
//!
//! - **Keys**: [`IdempotencyKey::random`](crate::IdempotencyKey::random) (UUID v4) for a request
//!   with no natural identity; [`KeyDeriver`] / [`IdempotencyKey::derive`](crate::IdempotencyKey::derive)
//!   (SHA-256 over length-prefixed parts) for one the caller can recompute, e.g. (user, prompt,
//!   model); [`IdempotencyKey::for_item`](crate::IdempotencyKey::for_item) for the items of a
//!   batch.
//! - **Stamping**: [`SetIdempotencyKeyLayer`] gives each `POST`/`PATCH` that has no
//!   `Idempotency-Key` a fresh one (or one from your [`KeyGenerator`]).
//! - **Retrying**: [`RetryPolicy`] is a [`tower::retry::Policy`] that retries transient
//!   outcomes ([`DefaultClassifier`]: errors, `408`, `409` in flight, `425`, `429`, `5xx`)
//!   with [`ExponentialBackoff`] and full jitter, waits what the server asks
//!   (`retry-after-ms`, else `Retry-After`), never retries what the server marks
//!   `x-should-retry: false`, and stops after a number of attempts or a time budget.
//!
//! # The stack: stamp outside, retry inside
//!
//! The key must be stamped **once per logical request**, so the stamping layer goes *outside*
//! the retry layer: the retry layer then copies the stamped request for every attempt, and the
//! server sees one key, runs the handler once and replays its response to later attempts.
//! Stamped inside, each attempt would carry a new key and the server would run each one;
//! [`RetryPolicy`] guards against that by never retrying a `POST` or `PATCH` that reaches it
//! without a key.
//!
//! ```text
//! caller ──▶ SetIdempotencyKeyLayer ──▶ RetryLayer<RetryPolicy> ──▶ [timeout] ──▶ HTTP client ──▶ server
//!            (stamp once)            (attempt 1, 2, ... same key)
//! ```
//!
//! With [`tower::ServiceBuilder`], the first layer added is the outermost:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use http::{HeaderValue, Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer, service_fn};
//! use tower_idempotency::{
//!     IdempotencyKey,
//!     client::{RetryPolicy, SetIdempotencyKeyLayer},
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A server that fails the first attempt with 503, then creates the order.
//! let keys_seen: Arc<Mutex<Vec<HeaderValue>>> = Arc::default();
//! let server = service_fn({
//!     let keys_seen = keys_seen.clone();
//!     move |request: Request<String>| {
//!         let keys_seen = keys_seen.clone();
//!         async move {
//!             let mut keys_seen = keys_seen.lock().unwrap();
//!             keys_seen.push(request.headers()["idempotency-key"].clone());
//!             let status = if keys_seen.len() == 1 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::CREATED };
//!             Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(String::new()).unwrap())
//!         }
//!     }
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(SetIdempotencyKeyLayer::new()) // outside: one key per logical request
//!     .layer(RetryLayer::new(RetryPolicy::new())) // inside: each attempt copies the stamped request
//!     .service(server);
//!
//! let request = Request::post("/orders").body(r#"{"item":"book"}"#.to_owned())?;
//! let response = client.oneshot(request).await?;
//!
//! assert_eq!(response.status(), StatusCode::CREATED);
//! let keys_seen = keys_seen.lock().unwrap();
//! assert_eq!(keys_seen.len(), 2, "one failed attempt, one retry");
//! assert_eq!(keys_seen[0], keys_seen[1], "both attempts carried the same key");
//! // The response tells the caller which key was used.
//! let key = response.extensions().get::<IdempotencyKey>().unwrap();
//! assert_eq!(key.as_str(), keys_seen[0]);
//! # Ok(())
//! # }
//! ```
//!
//! Over real HTTP, the inner service is an HTTP client, for example `hyper_util`'s:
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
//! use tower_idempotency::client::{SetIdempotencyKeyLayer, RetryPolicy};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = ServiceBuilder::new()
//!     .layer(SetIdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::new()))
//!     .service(http);
//!
//! let request = Request::post("http://127.0.0.1:3000/orders")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"item":"book"}"#)))?;
//! let response = client.oneshot(request).await?;
//! println!("{} (replayed: {:?})", response.status(), response.headers().get("idempotent-replayed"));
//! # Ok(())
//! # }
//! ```
//!
//! The request body must be copyable for a request to be retried ([`TryCloneBody`]:
//! `Full<Bytes>`, `String`, any `Clone` body); a streaming body is sent once.
//!
//! # Choosing a key
//!
//! | situation | key |
//! | --- | --- |
//! | one call, retried within this process | nothing to do: [`SetIdempotencyKeyLayer`] stamps a random key |
//! | the caller may crash and retry later (a job queue, a saga) | [`IdempotencyKey::random`](crate::IdempotencyKey::random), stored with the job before the first attempt, set on the request |
//! | the request has a natural identity | [`KeyDeriver`]: `KeyDeriver::new("generate").part(user).part(prompt).part(model).finish()` |
//! | one operation sent as many requests | a batch key, and [`for_item(i)`](crate::IdempotencyKey::for_item) per item |

mod backoff;
mod classify;
mod keys;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod retry;
mod stamp;

pub use backoff::{Delays, ExponentialBackoff};
pub use classify::{Attempt, Classification, Classify, DefaultClassifier, retry_after};
pub use keys::KeyDeriver;
pub use retry::{RetryDelay, RetryPolicy, TryCloneBody};
pub use stamp::{KeyGenerator, RandomKey, ResponseFuture, SetIdempotencyKey, SetIdempotencyKeyLayer};

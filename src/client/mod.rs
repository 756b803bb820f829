//! The client half: make keys, stamp them on requests, retry with the same key.
//!
//! The server layer makes a request safe to repeat; this module repeats it. It works with any
//! [`tower::Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) that sends `http::Request`s (a `hyper_util` client, a `reqwest`-like
//! service, an in-process router in tests):
//!
//! - **Keys**: [`IdempotencyKey::random`](crate::IdempotencyKey::random) (UUID v4) for a request
//!   with no natural identity; [`KeyDeriver`] / [`IdempotencyKey::derive`](crate::IdempotencyKey::derive)
//!   (SHA-256 over length-prefixed parts) for one the caller can recompute, e.g. (user, prompt,
//!   model); [`IdempotencyKey::for_item`](crate::IdempotencyKey::for_item) for the items of a
//!   batch.
//! - **Stamping**: [`SetIdempotencyKeyLayer`] gives each `POST`/`PATCH` that has no
//!   `Idempotency-Key` a fresh one (or one from your [`KeyGenerator`]).
//! - **Retrying**: [`RetryPolicy`] is a [`tower::retry::Policy`](https://docs.rs/tower/0.5/tower/retry/trait.Policy.html) that retries transient
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
//! With [`tower::ServiceBuilder`](https://docs.rs/tower/0.5/tower/struct.ServiceBuilder.html), the first layer added is the outermost:
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
//!
//! # Other clients: the SDKs of Stripe, OpenAI and Anthropic
//!
//! The rule for every client, whatever its language: make the key once per logical call, before
//! the first attempt, and send the same key on every retry of that call. A new key per attempt
//! makes each attempt a new request, and the server runs each one. What the layer tells clients
//! (on the answers it makes itself, never on a handler's response or a replay): retryable answers
//! (`409` in flight, `503`) carry `Retry-After` (seconds, rounded up) and `retry-after-ms`; final
//! ones (`400`, `413`, `422`, `409` response-not-retained) carry `x-should-retry: false`
//! ([`crate::hints`]).
//!
//! ## Stripe's SDKs
//!
//! Stripe's SDKs put an `Idempotency-Key` on every `POST` themselves, generated once per call and
//! reused by their automatic retries (`stripe-python`: `max_network_retries`, default 2;
//! `stripe-node`: `maxNetworkRetries`). Pass your own key to keep it across process restarts:
//!
//! ```python
//! from stripe import StripeClient
//!
//! client = StripeClient("sk_test_...", max_network_retries=2)
//! intent = client.v1.payment_intents.create(
//!     params={"amount": 1999, "currency": "usd"},
//!     options={"idempotency_key": f"order-{order.id}"},  # one key per logical payment
//! )
//! # The older module-level API: stripe.PaymentIntent.create(..., idempotency_key="...")
//! ```
//!
//! ```js
//! const stripe = require('stripe')('sk_test_...', { maxNetworkRetries: 2 });
//! const intent = await stripe.paymentIntents.create(
//!   { amount: 1999, currency: 'usd' },
//!   { idempotencyKey: `order-${order.id}` },
//! );
//! ```
//!
//! They retry connection errors, `409` and `5xx`, and obey `Stripe-Should-Retry: true` / `false`
//! before the status; `stripe-python` also waits a `Retry-After` of up to 60 s. So a
//! Stripe-compatible API behind this layer adds `RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)`:
//! without it, they would retry the final `409` response-not-retained.
//!
//! ## OpenAI's and Anthropic's SDKs (Stainless-generated)
//!
//! The Python and JS SDKs of OpenAI and Anthropic retry 2 times by default (`max_retries` /
//! `maxRetries`): connection errors, `408`, `409`, `429` and `≥ 500`, with `x-should-retry: true`
//! / `false` overriding the status. They wait `retry-after-ms`, else `Retry-After`, when it is
//! short (up to about a minute; the exact bound differs per SDK), else their own backoff (0.5 s
//! doubling to 8 s). They send no idempotency key of their own, so pass one per call; the headers
//! of a call are sent again on each of its retries:
//!
//! ```python
//! import uuid
//! from openai import OpenAI
//!
//! client = OpenAI(base_url="https://llm.example.com/v1")  # your OpenAI-compatible API
//! key = str(uuid.uuid4())  # once per logical call, stored with the job if it must survive a crash
//! completion = client.chat.completions.create(
//!     model="gpt-5.5",
//!     messages=[{"role": "user", "content": "Write a haiku about retries."}],
//!     extra_headers={"Idempotency-Key": key},
//! )
//! ```
//!
//! ```python
//! from anthropic import Anthropic
//!
//! client = Anthropic(base_url="https://llm.example.com")
//! message = client.messages.create(
//!     model="claude-opus-4-6",
//!     max_tokens=1024,
//!     messages=[{"role": "user", "content": "Write a haiku about retries."}],
//!     extra_headers={"Idempotency-Key": key},
//! )
//! ```
//!
//! ```js
//! import OpenAI from 'openai';            // or: import Anthropic from '@anthropic-ai/sdk';
//!
//! const client = new OpenAI({ baseURL: 'https://llm.example.com/v1' });
//! const completion = await client.chat.completions.create(
//!   { model: 'gpt-5.5', messages: [{ role: 'user', content: 'Write a haiku about retries.' }] },
//!   { headers: { 'Idempotency-Key': crypto.randomUUID() } },
//! );
//! ```
//!
//! They retry every `409`: the layer's `x-should-retry: false` on the final ones (and `retry-after-ms` on
//! the in-flight one) is what makes them give up, or wait, correctly. Each retry also carries an
//! `X-Stainless-Retry-Count` that changes per attempt, so never add it to
//! `with_fingerprint_headers`.

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

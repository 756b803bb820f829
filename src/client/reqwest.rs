//! The client half for `reqwest`: a [`reqwest_middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/) middleware that stamps one key per
//! logical request and retries with it (cargo feature `reqwest`).
//!
//! [`IdempotencyMiddleware`] is [`SetIdempotencyKeyLayer`](super::SetIdempotencyKeyLayer) and a
//! `RetryLayer<`[`RetryPolicy`]`>` in one: it decides what to retry with the policy's
//! [classifier](super::Classify) and waits its [backoff](super::ExponentialBackoff), the very
//! same code as the tower stack, so both clients behave alike:
//!
//! - every attempt of one call carries the same key: the caller's (a header it set, or an
//!   [`IdempotencyKey`] it attached with
//!   [`with_extension`](reqwest_middleware::RequestBuilder::with_extension), such as one from a
//!   [`KeyDeriver`](super::KeyDeriver)), or one the [generator](KeyGenerator) made (default: a
//!   random UUID v4);
//! - it retries transport errors, `408`, `409` in flight, `425`, `429` and `5xx`, never a
//!   response marked `x-should-retry: false`, waiting what the server asks (`retry-after-ms`,
//!   else `Retry-After`) or the jittered backoff, within the policy's attempts and time
//!   budget;
//! - a request whose body cannot be copied (a stream) is sent once, and so is a `POST` or
//!   `PATCH` that ends up without a key (a method it was told not to stamp).
//!
//! ```no_run
//! use tower_idempotency::client::{
//!     KeyDeriver, RetryPolicy,
//!     reqwest::{IdempotencyMiddleware, reqwest_middleware::ClientBuilder},
//! };
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotencyMiddleware::new().with_policy(RetryPolicy::new().with_max_attempts(4)))
//!     .build();
//!
//! // A random key, stamped once, sent with every attempt.
//! let response = client.post("http://127.0.0.1:3000/orders").body(r#"{"sku":"A1"}"#).send().await?;
//! println!("{} replayed: {:?}", response.status(), response.headers().get("idempotent-replayed"));
//!
//! // A key the caller can recompute after a crash: derived from its own data.
//! let key = KeyDeriver::new("payments").part("customer-42").part("invoice-7").finish();
//! let response = client.post("http://127.0.0.1:3000/payments").body("{}").with_extension(key).send().await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! The response of a call whose key the middleware set (from the extension or the
//! generator) carries it in its extensions:
//! `response.extensions().get::<IdempotencyKey>()`.
//!
//! # With other middlewares
//!
//! A key the middleware generates is also put in the call's extensions (the
//! `&mut Extensions` every middleware of the call shares), so a middleware registered before
//! this one (outside it) that sends the request again, such as `reqwest-retry`'s
//! `RetryTransientMiddleware` or a hedging middleware, sends it with the same key: one
//! logical request, one key, whatever wraps it.
//!
//! Where to put it: this middleware already retries, with the key, by the server's hints. A
//! retry middleware of your own is best left out; if you keep one, register it **before**
//! (outside) this one, so that each of its attempts goes through this middleware and gets
//! the call's key. A retry middleware registered after (inside) this one also reuses the key
//! (it re-sends the request this middleware stamped), but then two retry loops multiply
//! their attempts. Middlewares that must see every attempt (logging, metrics, auth that signs
//! each request) go after (inside) it.

use std::fmt;

use ::reqwest::{Request, Response};
use http::{Extensions, HeaderName, HeaderValue, Method, request::Parts};

use super::{Attempt, DefaultClassifier, KeyGenerator, RandomKey, RetryPolicy, classify::Classify};
use crate::IdempotencyKey;

pub use ::reqwest;
pub use ::reqwest_middleware;

/// A [`reqwest_middleware::Middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/trait.Middleware.html) that stamps an idempotency key once per logical
/// request and retries with it; see the [module docs](self).
///
/// `C` is the policy's [classifier](Classify), `G` the [`KeyGenerator`] for calls that bring
/// no key.
#[derive(Clone)]
pub struct IdempotencyMiddleware<C = DefaultClassifier, G = RandomKey> {
    policy: RetryPolicy<C>,
    generator: G,
    methods: Vec<Method>,
}

impl IdempotencyMiddleware {
    /// Stamps a random key on `POST` and `PATCH` requests under `Idempotency-Key` and retries
    /// by [`RetryPolicy::new`] (at most 5 attempts within 30 s).
    #[must_use]
    pub fn new() -> Self {
        Self { policy: RetryPolicy::new(), generator: RandomKey, methods: vec![Method::POST, Method::PATCH] }
    }
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        Self::new()
    }
}

impl<C, G> IdempotencyMiddleware<C, G> {
    /// How to retry: classification, backoff, attempts, time budget (default:
    /// [`RetryPolicy::new`]). The policy's key header is kept as set with
    /// [`with_header_name`](Self::with_header_name).
    #[must_use]
    pub fn with_policy<C2>(self, policy: RetryPolicy<C2>) -> IdempotencyMiddleware<C2, G> {
        let header = self.policy.header().clone();
        IdempotencyMiddleware {
            policy: policy.with_header_name(header),
            generator: self.generator,
            methods: self.methods,
        }
    }

    /// How keys are made for calls that bring none (default: [`RandomKey`]). The generator
    /// sees the request head, with the call's extensions.
    #[must_use]
    pub fn with_generator<G2>(self, generator: G2) -> IdempotencyMiddleware<C, G2> {
        IdempotencyMiddleware { policy: self.policy, generator, methods: self.methods }
    }

    /// The methods whose requests get a key (default: `POST`, `PATCH`).
    #[must_use]
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The header that carries the key (default: `Idempotency-Key`).
    #[must_use]
    pub fn with_header_name(mut self, header: HeaderName) -> Self {
        self.policy = self.policy.with_header_name(header);
        self
    }

    /// Sets the key of `request` unless it has one: the [`IdempotencyKey`] in `extensions`,
    /// else the generator's, which it then puts in `extensions`, so that a middleware outside
    /// this one that sends the request again (a retry middleware, hedging) sends it with the
    /// same key. Returns the key it set.
    fn stamp(&self, request: &mut Request, extensions: &mut Extensions) -> Option<IdempotencyKey>
    where
        G: KeyGenerator,
    {
        let header = self.policy.header();
        if !self.methods.contains(request.method()) || request.headers().contains_key(header) {
            return None;
        }
        let key = match extensions.get::<IdempotencyKey>() {
            Some(key) => key.clone(),
            None => {
                let key = self.generator.generate(&head(request, extensions));
                // The call's extensions outlive this attempt: an outer middleware that sends the
                // request again passes them to us again, and the key is reused.
                extensions.insert(key.clone());
                key
            }
        };
        let value =
            HeaderValue::from_str(key.as_str()).expect("a key is visible ASCII, which is always a valid header value");
        request.headers_mut().insert(header.clone(), value);
        tracing::trace!(method = %request.method(), "stamped an idempotency key");
        Some(key)
    }
}

/// The head of `request` as an `http` request head, for a [`KeyGenerator`].
fn head(request: &Request, extensions: &Extensions) -> Parts {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = request.method().clone();
    head.uri = request.url().as_str().parse().unwrap_or_default();
    head.version = request.version();
    head.headers = request.headers().clone();
    head.extensions = extensions.clone();
    head
}

#[async_trait::async_trait]
impl<C, G> reqwest_middleware::Middleware for IdempotencyMiddleware<C, G>
where
    C: Classify<reqwest_middleware::Error> + Clone + Send + Sync + 'static,
    G: KeyGenerator + Send + Sync + 'static,
{
    async fn handle(
        &self,
        mut request: Request,
        extensions: &mut Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let key = self.stamp(&mut request, extensions);
        let mut policy = self.policy.clone();
        let mut result = if !policy.may_repeat(request.method(), request.headers()) {
            tracing::debug!(method = %request.method(), "not retryable: a non-idempotent method without a key");
            next.run(request, extensions).await
        } else {
            policy.start();
            loop {
                let Some(attempt) = request.try_clone() else {
                    tracing::debug!("not retryable: the body cannot be copied");
                    break next.run(request, extensions).await;
                };
                let result = next.clone().run(attempt, extensions).await;
                let seen = match &result {
                    Ok(response) => Attempt::Response { status: response.status(), headers: response.headers() },
                    Err(error) => Attempt::Error(error),
                };
                let Some(delay) = policy.after_attempt(seen) else { break result };
                // Frees the connection (or closes it) before the wait.
                drop(result);
                tokio::time::sleep(delay).await;
            }
        };
        if let (Ok(response), Some(key)) = (&mut result, key) {
            response.extensions_mut().insert(key);
        }
        result
    }
}

impl<C, G> fmt::Debug for IdempotencyMiddleware<C, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("policy", &self.policy)
            .field("methods", &self.methods)
            .field("generator", &std::any::type_name::<G>())
            .finish()
    }
}

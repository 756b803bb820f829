//! The `tower::retry::Policy` for HTTP requests that carry an idempotency key.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::retry::Policy;

use crate::headers::IDEMPOTENCY_KEY;

use super::{
    backoff::{Delays, ExponentialBackoff, SplitMix64, fresh_seed},
    classify::{Attempt, Classification, Classify, DefaultClassifier, retry_after},
};

/// A [`tower::retry::Policy`](https://docs.rs/tower/0.5/tower/retry/trait.Policy.html) that retries transient failures of HTTP requests, sending
/// every attempt with the same idempotency key.
///
/// Put it in a [`tower::retry::RetryLayer`](https://docs.rs/tower/0.5/tower/retry/struct.RetryLayer.html) *inside* an
/// [`SetIdempotencyKeyLayer`](super::SetIdempotencyKeyLayer), so the key is stamped once and each
/// attempt is a copy of the stamped request (see the [module docs](super) for the stack).
///
/// # What it retries
///
/// An attempt is retried when all of these hold:
///
/// 1. The [classifier](Classify) says the outcome is transient. The default,
///    [`DefaultClassifier`], retries errors (no response), `408`, `409` with `Retry-After`
///    (the same key is still in flight), `425`, `429` and `5xx`, and nothing else; never a
///    response marked `x-should-retry: false` (or `Stripe-Should-Retry: false`).
/// 2. Retrying is safe: the request's method is idempotent by RFC 9110 (`GET`, `HEAD`,
///    `OPTIONS`, `TRACE`, `PUT`, `DELETE`), or it carries an idempotency key. A `POST` or
///    `PATCH` without a key is sent once and never retried, since the server could run it
///    twice. This also makes a wrongly ordered stack (stamping *inside* the retry layer) fail
///    safe: no retries rather than retries with a new key each time.
/// 3. The body can be copied before it is sent (see [`TryCloneBody`]); otherwise the request
///    is sent once.
/// 4. Fewer than [`max attempts`](Self::with_max_attempts) have been made, and the next
///    attempt can start within the [time budget](Self::with_max_elapsed).
///
/// # How long it waits
///
/// Before retry `n` (from 0) it waits a delay from its [`ExponentialBackoff`]: uniform in
/// `[0, min(max_delay, base * 2^n)]`. The wait the response asks for replaces that delay:
/// its `retry-after-ms`, else its `Retry-After` (seconds or an HTTP-date); see
/// [`retry_after`](super::retry_after). A date is compared with the system clock ([`SystemTime::now`]), the
/// clock the server's date refers to; everything else, the waiting and the time budget, runs on
/// [`tokio::time`](https://docs.rs/tokio/1/tokio/time/index.html), so tests drive it with `tokio::time::pause`.
///
/// No wait ends after the time budget: a backoff delay is shortened to end at the deadline,
/// and a `Retry-After` that ends after it stops the retries (coming back before the server
/// said it is ready would only spend an attempt), and the caller gets that last response.
/// The budget bounds when attempts *start*; bound each attempt with a timeout layer placed
/// inside the retry layer.
///
/// A `409` in flight counts as an attempt like any other. For a handler that runs longer than
/// the defaults cover (5 attempts, 30 s; the server's in-flight `Retry-After` is 1 s by
/// default), raise both bounds, or configure the server to hold a duplicate until the first
/// request finishes ([`Duplicates::Wait`](crate::Duplicates::Wait)) so a retry gets the replay directly.
///
/// # State
///
/// [`tower::retry::Retry`](https://docs.rs/tower/0.5/tower/retry/struct.Retry.html) clones the policy for every request, so attempts and the start time
/// are counted per logical request. Each logical request draws a new jitter seed: from the OS
/// (through a process-wide counter) by default, so clones of one policy jitter independently,
/// or from the stream set with [`with_seed`](Self::with_seed) for reproducible tests.
#[derive(Clone)]
pub struct RetryPolicy<C = DefaultClassifier> {
    classifier: C,
    backoff: ExponentialBackoff,
    max_attempts: u32,
    max_elapsed: Duration,
    header: HeaderName,
    seeds: Seeds,
    current: Option<Attempts>,
}

/// Where each logical request's jitter seed comes from.
#[derive(Clone, Debug)]
enum Seeds {
    Fresh,
    /// The seed of the next logical request; each one's seed is derived from the previous.
    Fixed(u64),
}

/// The state of one logical request.
#[derive(Clone, Debug)]
struct Attempts {
    started: Instant,
    /// Attempts whose result has been seen.
    made: u32,
    delays: Delays,
}

impl RetryPolicy {
    /// The default policy: [`DefaultClassifier`], at most 5 attempts within 30 s, backoff
    /// from 100 ms doubling up to 10 s, key header `Idempotency-Key`.
    #[must_use]
    pub fn new() -> Self {
        Self {
            classifier: DefaultClassifier,
            backoff: ExponentialBackoff::default(),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            header: IDEMPOTENCY_KEY,
            seeds: Seeds::Fresh,
            current: None,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryPolicy<C> {
    /// Decides which outcomes are transient (default: [`DefaultClassifier`]).
    #[must_use]
    pub fn with_classifier<C2>(self, classifier: C2) -> RetryPolicy<C2> {
        RetryPolicy {
            classifier,
            backoff: self.backoff,
            max_attempts: self.max_attempts,
            max_elapsed: self.max_elapsed,
            header: self.header,
            seeds: self.seeds,
            current: None,
        }
    }

    /// The delays between attempts when the response has no `Retry-After` (default: 100 ms,
    /// doubling, at most 10 s, full jitter).
    #[must_use]
    pub fn with_backoff(mut self, backoff: ExponentialBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The most attempts per logical request, the first one included (default: 5). `1`, and
    /// `0` which means the same, turn retries off.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The time budget of a logical request, from the start of its first attempt (default:
    /// 30 s). No retry starts after it; see [How long it waits](Self#how-long-it-waits).
    #[must_use]
    pub fn with_max_elapsed(mut self, max_elapsed: Duration) -> Self {
        self.max_elapsed = max_elapsed;
        self
    }

    /// Seeds the jitter, so the same sequence of requests sees the same delays (default: a
    /// fresh seed per logical request).
    ///
    /// The first logical request waits exactly the delays of
    /// [`backoff.delays(seed)`](ExponentialBackoff::delays) (unless a `Retry-After` overrides
    /// one); each later request's seed is derived from the previous one.
    ///
    /// Meant for tests. Clones of a seeded policy draw the same seeds in the same order, so in
    /// production a fixed seed would make concurrent clients retry in step, which jitter is
    /// there to prevent.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seeds = Seeds::Fixed(seed);
        self
    }

    /// The header that carries the key (default: `Idempotency-Key`). Set it to the same name as
    /// the [`SetIdempotencyKeyLayer`](super::SetIdempotencyKeyLayer)'s: a `POST` or `PATCH` is only
    /// retried when it carries this header.
    #[must_use]
    pub fn with_header_name(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// The header that carries the key.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Whether a request may be sent more than once: an idempotent method, or a key.
    pub(crate) fn may_repeat(&self, method: &Method, headers: &HeaderMap) -> bool {
        let idempotent_method = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        idempotent_method || headers.contains_key(&self.header)
    }

    /// Starts a logical request: no attempt made yet, the time budget from now, a new jitter
    /// seed.
    pub(crate) fn start(&mut self) {
        let seed = match &mut self.seeds {
            Seeds::Fresh => fresh_seed(),
            Seeds::Fixed(next) => std::mem::replace(next, SplitMix64::new(*next).next_u64()),
        };
        self.current = Some(Attempts { started: Instant::now(), made: 0, delays: self.backoff.delays(seed) });
    }

    /// After an attempt of the logical request begun by [`start`](Self::start): the wait
    /// before the next attempt, or `None` to hand this result to the caller. The one decision
    /// of both this policy and the `reqwest` middleware.
    pub(crate) fn after_attempt<E>(&mut self, attempt: Attempt<'_, E>) -> Option<Duration>
    where
        C: Classify<E>,
    {
        if self.classifier.classify(attempt) == Classification::Done {
            return None;
        }
        let headers = match attempt {
            Attempt::Response { headers, .. } => Some(headers),
            Attempt::Error(_) => None,
        };
        let delay = self.next_delay(headers)?;
        tracing::debug!(
            attempt = self.current.as_ref().map_or(0, |current| current.made) + 1,
            ?delay,
            status = match attempt {
                Attempt::Response { status, .. } => Some(status.as_u16()),
                Attempt::Error(_) => None,
            },
            "retrying"
        );
        Some(delay)
    }

    /// The wait before the next attempt, or `None` to hand the last result to the caller.
    fn next_delay(&mut self, headers: Option<&HeaderMap>) -> Option<Duration> {
        let max_attempts = self.max_attempts;
        let max_elapsed = self.max_elapsed;
        let current = self.current.as_mut()?;
        current.made += 1;
        if current.made >= max_attempts {
            tracing::debug!(attempts = current.made, "not retrying: attempts exhausted");
            return None;
        }
        let remaining = match current.started.checked_add(max_elapsed) {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        if remaining.is_zero() {
            tracing::debug!(attempts = current.made, "not retrying: time budget spent");
            return None;
        }
        // Drawn even when `Retry-After` wins, so the window keeps growing with the attempts.
        let backoff = current.delays.next().unwrap_or_default();
        let server_asked = headers.and_then(|headers| retry_after(headers, SystemTime::now()));
        match server_asked {
            Some(wait) if wait > remaining => {
                tracing::debug!(attempts = current.made, ?wait, "not retrying: Retry-After exceeds the time budget");
                None
            }
            Some(wait) => Some(wait),
            None => Some(backoff.min(remaining)),
        }
    }
}

impl<C, B, ResB, E> Policy<Request<B>, Response<ResB>, E> for RetryPolicy<C>
where
    C: Classify<E>,
    B: TryCloneBody,
{
    type Future = RetryDelay;

    fn retry(&mut self, _request: &mut Request<B>, result: &mut Result<Response<ResB>, E>) -> Option<RetryDelay> {
        let delay = self.after_attempt(Attempt::of(result))?;
        Some(RetryDelay { sleep: tokio::time::sleep(delay) })
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if !self.may_repeat(request.method(), request.headers()) {
            tracing::debug!(method = %request.method(), "not retryable: a non-idempotent method without a key");
            return None;
        }
        let Some(body) = request.body().try_clone_body() else {
            tracing::debug!("not retryable: the body cannot be copied");
            return None;
        };
        // `Retry::call` calls this on its own policy just before cloning that policy for the new
        // request, and the clone then calls it before each retry. A count of zero therefore
        // marks the start of a new logical request.
        if self.current.as_ref().is_none_or(|current| current.made == 0) {
            self.start();
        }
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

impl<C> fmt::Debug for RetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("classifier", &std::any::type_name::<C>())
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The wait before a retry: the [`Future`](Policy::Future) of [`RetryPolicy`].
    #[derive(Debug)]
    pub struct RetryDelay {
        #[pin]
        sleep: Sleep,
    }
}

impl Future for RetryDelay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().sleep.poll(cx)
    }
}

/// A request body that may be copied so the request can be sent again.
///
/// [`RetryPolicy`] copies each request before sending it; when the copy is `None`, the request
/// is sent once and never retried. Every `Clone` body implements it (`String`, `Vec<u8>`,
/// `Bytes`, `()`, `http_body_util::Full<Bytes>`, `http_body_util::Empty<Bytes>`, ...), always
/// with `Some`.
///
/// A streaming body cannot be copied. To retry the requests whose body is in memory and send
/// the streaming ones once, use a body type of your own that knows which it is:
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{Full, combinators::UnsyncBoxBody};
/// use tower_idempotency::client::TryCloneBody;
///
/// enum Body {
///     Buffered(Full<Bytes>),
///     Streaming(UnsyncBoxBody<Bytes, std::io::Error>),
/// }
///
/// impl TryCloneBody for Body {
///     fn try_clone_body(&self) -> Option<Self> {
///         match self {
///             Body::Buffered(full) => Some(Body::Buffered(full.clone())),
///             Body::Streaming(_) => None,
///         }
///     }
/// }
/// # assert!(Body::Buffered(Full::new(Bytes::new())).try_clone_body().is_some());
/// ```
///
/// (Your type then implements `http_body::Body` by delegating to the variant.) For a body
/// type you do not own, such as `hyper::body::Incoming` or `axum::body::Body`, buffer it into
/// `Full<Bytes>` before the retry layer, or wrap it in such an enum.
pub trait TryCloneBody: Sized {
    /// A copy of the body that sends the same bytes, or `None` when it cannot be copied.
    ///
    /// Called before the body is polled, so it only needs to copy a body that has not been
    /// read yet.
    fn try_clone_body(&self) -> Option<Self>;
}

impl<B: Clone> TryCloneBody for B {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

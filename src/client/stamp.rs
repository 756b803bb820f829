//! The layer that stamps an `Idempotency-Key` on requests that lack one.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderName, HeaderValue, Method, Request, Response, request::Parts};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{IdempotencyKey, UploadAppends, headers::IDEMPOTENCY_KEY};

/// Makes the key for a request that has none.
///
/// Implemented by [`RandomKey`] (the default) and by every closure
/// `Fn(&http::request::Parts) -> IdempotencyKey`, so a key can be derived from the request
/// head, or taken from an extension that the caller set:
///
/// ```
/// use http::request::Parts;
/// use tower_idempotency::{IdempotencyKey, client::SetIdempotencyKeyLayer};
///
/// /// The caller's own operation id, set as a request extension.
/// #[derive(Clone)]
/// struct OperationId(String);
///
/// let layer = SetIdempotencyKeyLayer::new().with_generator(|head: &Parts| match head.extensions.get::<OperationId>() {
///     Some(OperationId(id)) => IdempotencyKey::derive("operation", [id]),
///     None => IdempotencyKey::random(),
/// });
/// # let _ = layer;
/// ```
///
/// The generator sees the head only, never the body. A key that depends on the body (a
/// prompt, say) is best made where the body is, with [`KeyDeriver`](super::KeyDeriver), and set
/// on the request before it is sent: the layer leaves a key that is already there alone.
pub trait KeyGenerator {
    /// The key for this request. Called once per logical request, before the first attempt.
    fn generate(&self, head: &Parts) -> IdempotencyKey;
}

impl<F> KeyGenerator for F
where
    F: Fn(&Parts) -> IdempotencyKey,
{
    fn generate(&self, head: &Parts) -> IdempotencyKey {
        self(head)
    }
}

/// The default [`KeyGenerator`]: a new [`IdempotencyKey::random`] (UUID v4) per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomKey;

impl KeyGenerator for RandomKey {
    fn generate(&self, _head: &Parts) -> IdempotencyKey {
        IdempotencyKey::random()
    }
}

/// A [`Layer`](https://docs.rs/tower/0.5/tower/trait.Layer.html) that stamps an idempotency key on each covered request that lacks one.
///
/// - Covered: the methods `POST` and `PATCH` by default ([`with_methods`](Self::with_methods)).
///   Other requests pass through untouched, and so do the upload appends of the IETF
///   resumable-upload draft (`PATCH` with `Upload-Offset` or `application/partial-upload`,
///   see [`UploadAppends`](crate::UploadAppends); [`with_upload_appends`](Self::with_upload_appends)):
///   the draft makes them safe to repeat by their offset, and without a key the retry policy
///   does not repeat them blindly.
/// - A request that already has the header keeps it, whatever its value: the caller chose that
///   key (to keep it across restarts, or derived from the body).
/// - Otherwise the [generator](KeyGenerator) makes a key, which is set as the header's value
///   (the bare form, `Idempotency-Key: 0b3c...`) and, once the response arrives, added to its
///   extensions, so the caller can learn the key it was sent with (to log it, or to retry
///   later with the same key).
///
/// Place it *outside* a retry layer, so the key is stamped once per logical request and
/// every attempt is a copy of the stamped request (see the [module docs](super)).
///
/// ```
/// use http::Method;
/// use tower_idempotency::client::SetIdempotencyKeyLayer;
///
/// let layer = SetIdempotencyKeyLayer::new().with_methods([Method::POST, Method::PATCH, Method::DELETE]);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct SetIdempotencyKeyLayer<G = RandomKey> {
    config: Arc<Config>,
    generator: G,
}

#[derive(Clone, Debug)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    upload_appends: UploadAppends,
}

impl SetIdempotencyKeyLayer {
    /// Stamps a random key on `POST` and `PATCH` requests under `Idempotency-Key`.
    #[must_use]
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                header: IDEMPOTENCY_KEY,
                methods: vec![Method::POST, Method::PATCH],
                upload_appends: UploadAppends::Pass,
            }),
            generator: RandomKey,
        }
    }
}

impl Default for SetIdempotencyKeyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<G> SetIdempotencyKeyLayer<G> {
    /// How keys are made (default: [`RandomKey`]).
    #[must_use]
    pub fn with_generator<G2>(self, generator: G2) -> SetIdempotencyKeyLayer<G2> {
        SetIdempotencyKeyLayer { config: self.config, generator }
    }

    /// The methods whose requests get a key (default: `POST`, `PATCH`).
    #[must_use]
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        Arc::make_mut(&mut self.config).methods = methods.into_iter().collect();
        self
    }

    /// Whether upload appends of the resumable-upload draft get a key (default:
    /// [`UploadAppends::Pass`], they do not).
    #[must_use]
    pub fn with_upload_appends(mut self, appends: UploadAppends) -> Self {
        Arc::make_mut(&mut self.config).upload_appends = appends;
        self
    }

    /// The header that carries the key (default: `Idempotency-Key`).
    #[must_use]
    pub fn with_header_name(mut self, header: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).header = header;
        self
    }
}

impl<S, G: Clone> Layer<S> for SetIdempotencyKeyLayer<G> {
    type Service = SetIdempotencyKey<S, G>;

    fn layer(&self, inner: S) -> Self::Service {
        SetIdempotencyKey { inner, config: Arc::clone(&self.config), generator: self.generator.clone() }
    }
}

impl<G> fmt::Debug for SetIdempotencyKeyLayer<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetIdempotencyKeyLayer")
            .field("header", &self.config.header)
            .field("methods", &self.config.methods)
            .field("generator", &std::any::type_name::<G>())
            .finish()
    }
}

/// The [`Service`](https://docs.rs/tower/0.5/tower/trait.Service.html) made by [`SetIdempotencyKeyLayer`]: stamps a key, then calls the inner service.
#[derive(Clone)]
pub struct SetIdempotencyKey<S, G = RandomKey> {
    inner: S,
    config: Arc<Config>,
    generator: G,
}

impl<S, G> SetIdempotencyKey<S, G> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, G, ReqB, ResB> Service<Request<ReqB>> for SetIdempotencyKey<S, G>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    G: KeyGenerator,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let Config { header, methods, upload_appends } = &*self.config;
        if !methods.contains(request.method())
            || request.headers().contains_key(header)
            || upload_appends.passes(request.method(), request.headers())
        {
            return ResponseFuture { inner: self.inner.call(request), key: None };
        }
        let (mut head, body) = request.into_parts();
        let key = self.generator.generate(&head);
        let value =
            HeaderValue::from_str(key.as_str()).expect("a key is visible ASCII, which is always a valid header value");
        head.headers.insert(header.clone(), value);
        tracing::trace!(method = %head.method, "stamped an idempotency key");
        ResponseFuture { inner: self.inner.call(Request::from_parts(head, body)), key: Some(key) }
    }
}

impl<S: fmt::Debug, G> fmt::Debug for SetIdempotencyKey<S, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetIdempotencyKey")
            .field("inner", &self.inner)
            .field("header", &self.config.header)
            .field("methods", &self.config.methods)
            .field("generator", &std::any::type_name::<G>())
            .finish()
    }
}

pin_project! {
    /// The response future of [`SetIdempotencyKey`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        key: Option<IdempotencyKey>,
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(key) = this.key.take() {
            response.extensions_mut().insert(key);
        }
        Poll::Ready(Ok(response))
    }
}

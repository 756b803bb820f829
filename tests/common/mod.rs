//! Helpers shared by the integration tests: a handler whose behaviour the request picks, and
//! request/response shorthands.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod dictionary;
pub mod outage;
pub mod pace;
pub mod probe;
#[cfg(feature = "redis")]
pub mod redis;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use tower::{BoxError, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody, ResponseBody, store::IdempotencyStore};

pub type TestBody = BoxBody<Bytes, BoxError>;

/// Counts handler executions.
#[derive(Clone, Default, Debug)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A handler driven by request headers (none of which is fingerprinted):
///
/// - `x-status: N` answers status N (default 201);
/// - `x-delay-ms: N` sleeps N ms (tokio time) before answering;
/// - `x-panic: 1` panics; `x-error: 1` returns a service error;
/// - `x-chunks: N` streams N chunks `chunk-i;` with `x-chunk-delay-ms` between them;
/// - `x-body-error: 1` streams one chunk then fails;
/// - `x-big: N` answers a body of N bytes.
///
/// The body is `run N: <request body>`; the response carries a few headers that must or must
/// not be replayed.
pub fn handler(
    runs: Runs,
) -> impl Service<Request<RequestBody<Full<Bytes>>>, Response = Response<TestBody>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let runs = runs.clone();
        async move {
            let n = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
            let (head, body) = request.into_parts();
            let body = body.collect().await.map_err(|e| -> BoxError { Box::new(e) })?.to_bytes();
            let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
            if let Some(ms) = number("x-delay-ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if header("x-panic").is_some() {
                panic!("x-panic asked the handler to panic");
            }
            if header("x-error").is_some() {
                return Err::<Response<TestBody>, BoxError>("x-error asked for a service error".into());
            }
            let status = number("x-status").map_or(StatusCode::CREATED, |s| StatusCode::from_u16(s as u16).unwrap());
            let mut response = Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .header("x-multi", "one")
                .header("x-multi", "two")
                .header("set-cookie", "session=secret-of-the-first-caller")
                .header("connection", "x-hop")
                .header("x-hop", "hop-by-hop")
                .header("keep-alive", "timeout=5")
                .header("date", "Mon, 23 Nov 2026 00:00:00 GMT");
            let text = format!("run {n}: {}", String::from_utf8_lossy(&body));
            let body: TestBody = if let Some(chunks) = number("x-chunks") {
                let every = Duration::from_millis(number("x-chunk-delay-ms").unwrap_or(0));
                let stream = futures_util::stream::iter(0..chunks).then(move |i| async move {
                    if i > 0 {
                        tokio::time::sleep(every).await;
                    }
                    Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(format!("chunk-{i};"))))
                });
                BodyExt::boxed(StreamBody::new(stream))
            } else if header("x-body-error").is_some() {
                let stream = futures_util::stream::iter([
                    Ok(http_body::Frame::data(Bytes::from_static(b"partial"))),
                    Err::<http_body::Frame<Bytes>, BoxError>("the body failed".into()),
                ]);
                BodyExt::boxed(StreamBody::new(stream))
            } else if let Some(size) = number("x-big") {
                full(vec![b'x'; size as usize])
            } else {
                full(text)
            };
            if let Some(len) = body.size_hint().exact() {
                response = response.header("content-length", len);
            }
            Ok(response.body(body).unwrap())
        }
    })
}

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// The handler behind `layer`.
pub fn service<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    runs: Runs,
) -> impl Service<Request<Full<Bytes>>, Response = Response<ResponseBody<TestBody>>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static {
    tower::Layer::layer(&layer, handler(runs))
}

/// A `POST` with a key and a body.
pub fn post(uri: &str, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri).header("idempotency-key", key).body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

/// Sends one request through a clone of `service` and reads the whole response.
pub fn send<S>(service: &S, request: Request<Full<Bytes>>) -> impl Future<Output = Reply> + Send + use<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResponseBody<TestBody>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let service = service.clone();
    async move {
        let response = service.oneshot(request).await.expect("the service answers");
        Reply::read_boxed(response).await
    }
}

/// Sends `request()` until the key is no longer `409` in flight (a store write may still be
/// under way right after a client left), at most `tries` times, `every` apart.
pub async fn settled(
    svc: &impl TestService,
    request: impl Fn() -> Request<Full<Bytes>>,
    tries: usize,
    every: Duration,
) -> Reply {
    for _ in 0..tries {
        let reply = send(svc, request()).await;
        if reply.outcome != tower_idempotency::Outcome::InFlight {
            return reply;
        }
        tokio::time::sleep(every).await;
    }
    panic!("the key stayed in flight after {tries} tries");
}

/// A layered test service, as [`service`] builds it.
pub trait TestService:
    Service<Request<Full<Bytes>>, Response = Response<ResponseBody<TestBody>>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> TestService for S where
    S: Service<Request<Full<Bytes>>, Response = Response<ResponseBody<TestBody>>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// Sends `n` copies of one `POST /orders` with `key` at once (released together by a barrier,
/// each on its own task), spread round-robin over `replicas`, and reads every reply.
pub async fn race(replicas: &[impl TestService], key: &str, n: usize, delay_ms: u32) -> Vec<Reply> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let key: &'static str = key.to_owned().leak();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let mut request = post("/orders", key, r#"{"sku":"A1"}"#);
            request.headers_mut().insert("x-delay-ms", delay_ms.into());
            let sent = send(&replicas[i % replicas.len()], request);
            tokio::spawn(async move {
                barrier.wait().await;
                sent.await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.expect("no task panics"));
    }
    replies
}

/// Checks the replies of a race on one key (reject mode): exactly one executed (`201`), every
/// other one is the `in-flight` problem with `Retry-After`, or, arriving after completion, the
/// replay of the executed response.
pub fn assert_executed_once(replies: &[Reply], round: usize) {
    let executed: Vec<_> = replies.iter().filter(|r| r.outcome == tower_idempotency::Outcome::Executed).collect();
    assert_eq!(executed.len(), 1, "round {round}");
    for reply in replies {
        match reply.outcome {
            tower_idempotency::Outcome::Executed => assert_eq!(reply.status, StatusCode::CREATED),
            tower_idempotency::Outcome::InFlight => {
                reply.assert_problem(409, "in-flight");
                assert!(reply.headers.contains_key("retry-after"));
            }
            tower_idempotency::Outcome::Replayed => assert_eq!(reply.body, executed[0].body),
            other => panic!("round {round}: unexpected {other:?}"),
        }
    }
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub outcome: tower_idempotency::Outcome,
}

impl Reply {
    pub async fn read(response: Response<ResponseBody<TestBody>>) -> Self {
        let outcome = tower_idempotency::Outcome::of(&response);
        let (head, body) = response.into_parts();
        let collected = body.collect().await.expect("the body reads to its end");
        let trailers = collected.trailers().cloned();
        Self { status: head.status, headers: head.headers, body: collected.to_bytes(), trailers, outcome }
    }

    /// `read`, boxed: proving `Send` for it inside generic code trips a compiler limitation
    /// (rust-lang/rust#64552), so the proof is made here, on the concrete type.
    pub fn read_boxed(
        response: Response<ResponseBody<TestBody>>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Self> + Send>> {
        Box::pin(Self::read(response))
    }

    pub fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed") == Some(&HeaderValue::from_static("true"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The problem+json body, checked for shape: content type, type URI, title, status, detail.
    pub fn problem(&self) -> serde_json::Value {
        assert_eq!(self.headers["content-type"], "application/problem+json", "{self:?}");
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("problem body is JSON");
        assert_eq!(json["status"], self.status.as_u16());
        assert!(json["type"].as_str().is_some_and(|t| t.starts_with("https://")), "{json}");
        assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()), "{json}");
        assert!(json["detail"].as_str().is_some_and(|t| !t.is_empty()), "{json}");
        json
    }

    /// Asserts a problem answer with `status` and the `type` ending in `#slug`.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let json = self.problem();
        assert!(json["type"].as_str().unwrap().ends_with(&format!("#{slug}")), "{json}");
    }
}

//! Black-box harness: the example server on a loopback port, driven by a real
//! HTTP client (hyper-util's legacy client).
#![allow(dead_code, unreachable_pub)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tower_idempotency::{IdempotencyLayer, store::MemoryStore};

#[path = "../../examples/server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs, clippy::result_large_err)]
pub mod server;

pub use server::Stats;

/// The HTTP client every test uses.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A fresh client (its own connection pool).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A fresh, unique idempotency key.
pub fn key() -> String {
    format!("key-{}", uuid::Uuid::new_v4())
}

/// The example server, serving on `127.0.0.1:<free port>` until dropped.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    stats: Arc<Stats>,
    client: HttpClient,
    task: JoinHandle<()>,
}

impl TestServer {
    /// The example server with the default layer (in-memory store).
    pub async fn start() -> Self {
        Self::start_with(IdempotencyLayer::new()).await
    }

    /// The example server over `layer`.
    pub async fn start_with(layer: IdempotencyLayer<MemoryStore>) -> Self {
        Self::start_with_admin(layer, None).await
    }

    /// The example server over `layer`, with its admin routes behind `admin_token` (none: not
    /// served).
    pub async fn start_with_admin(layer: IdempotencyLayer<MemoryStore>, admin_token: Option<&str>) -> Self {
        let stats = Arc::new(Stats::default());
        let app = server::app_with_admin(layer, stats.clone(), admin_token.map(server::AdminToken::new));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        TestServer { addr, stats, client: client(), task }
    }

    /// The example server (default layer) behind a fault: the first `responses` `POST`s run
    /// their handler, the layer records the answer (its body is read to the end), and then
    /// the connection is closed without sending it, as when a response is lost on the way
    /// back. The returned [`Faults`] show the keys every `POST` arrived with.
    pub async fn start_losing_responses(responses: usize) -> (Self, Arc<Faults>) {
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        let stats = Arc::new(Stats::default());
        let app = server::app(IdempotencyLayer::new(), stats.clone());
        let faults = Arc::new(Faults { responses_to_lose: AtomicUsize::new(responses), keys_seen: Mutex::default() });
        let faulty = tower::service_fn({
            let faults = faults.clone();
            move |request: Request<Incoming>| {
                let (app, faults) = (app.clone(), faults.clone());
                async move {
                    let post = request.method() == Method::POST;
                    if post {
                        faults.keys_seen.lock().unwrap().push(request.headers().get("idempotency-key").cloned());
                    }
                    let lose = post
                        && faults
                            .responses_to_lose
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let Ok(response) = app.oneshot(request).await;
                    if lose {
                        response.into_body().collect().await.map_err(std::io::Error::other)?;
                        // An error from the service makes hyper close the connection, sending nothing.
                        return Err(std::io::Error::other("the response was lost on the way back"));
                    }
                    Ok(response)
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper_util::service::TowerToHyperService::new(faulty.clone());
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _lost = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        (TestServer { addr, stats, client: client(), task }, faults)
    }

    /// A handle on this server's shared client (for spawned requests).
    pub fn client(&self) -> HttpClient {
        self.client.clone()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Executions of `route` (a key of `GET /stats`) so far.
    pub fn executions(&self, route: &str) -> u64 {
        self.stats.executions(route)
    }

    /// The absolute URI of `path_and_query` on this server.
    pub fn uri(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// A request to send with this server's shared client.
    pub fn call(&self, method: Method, path_and_query: &str) -> Call<'_> {
        Call { server: self, method, uri: self.uri(path_and_query), headers: HeaderMap::new(), body: Bytes::new() }
    }

    /// `POST path_and_query`.
    pub fn post(&self, path_and_query: &str) -> Call<'_> {
        self.call(Method::POST, path_and_query)
    }

    /// `GET /stats`, parsed.
    pub async fn stats_json(&self) -> Value {
        let response = self.call(Method::GET, "/stats").send().await;
        assert_eq!(response.status, StatusCode::OK);
        response.json()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`TestServer::start_losing_responses`] did.
#[derive(Debug)]
pub struct Faults {
    responses_to_lose: AtomicUsize,
    keys_seen: Mutex<Vec<Option<HeaderValue>>>,
}

impl Faults {
    /// The `Idempotency-Key` of every `POST` that reached the server, in order.
    pub fn keys_seen(&self) -> Vec<Option<HeaderValue>> {
        self.keys_seen.lock().unwrap().clone()
    }
}

/// A request being built.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    server: &'a TestServer,
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Call<'_> {
    /// Adds (appends) a header.
    pub fn header(self, name: &str, value: &str) -> Self {
        self.header_bytes(name, value.as_bytes())
    }

    /// Adds (appends) a header with raw bytes (obs-text and HTAB allowed by `http`).
    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
        let value = HeaderValue::from_bytes(value).expect("header value the http crate accepts");
        self.headers.append(name, value);
        self
    }

    /// Adds `Idempotency-Key: key`.
    pub fn key(self, key: &str) -> Self {
        self.header("idempotency-key", key)
    }

    /// A JSON body.
    pub fn json(mut self, body: &Value) -> Self {
        self.body = Bytes::from(body.to_string());
        self.headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self
    }

    /// A raw body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The `http::Request` this call sends.
    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut request =
            Request::builder().method(self.method.clone()).uri(&self.uri).body(Full::new(self.body.clone())).unwrap();
        *request.headers_mut() = self.headers.clone();
        request
    }

    /// Sends it and returns the head with the body still streaming.
    pub async fn send_streaming(&self) -> Response<Incoming> {
        self.server.client.request(self.build()).await.expect("request reaches the server")
    }

    /// Sends it and reads the whole body.
    pub async fn send(&self) -> Resp {
        Resp::read(self.send_streaming().await).await
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// Reads the whole body of `response`.
    pub async fn read(response: Response<Incoming>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body reads to its end").to_bytes();
        Resp { status: parts.status, headers: parts.headers, body }
    }

    /// The single value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let value = values.next()?;
        assert!(values.next().is_none(), "header {name} sent more than once: {:?}", self.headers);
        Some(value.to_str().expect("header value is text"))
    }

    /// Whether it carries `Idempotent-Replayed: true`; any other value of the header fails.
    pub fn replayed(&self) -> bool {
        match self.header("idempotent-replayed") {
            None => false,
            Some("true") => true,
            Some(other) => panic!("Idempotent-Replayed: {other:?}, expected absent or \"true\""),
        }
    }

    /// The body, parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("body is UTF-8")
    }

    /// Asserts this is the layer's own RFC 9457 problem with `status` whose `type` URI ends in
    /// `slug`, and that its body echoes none of `secrets` (the key, request content). Returns
    /// the `type`.
    #[track_caller]
    pub fn assert_problem(&self, status: StatusCode, slug: &str, secrets: &[&str]) -> String {
        let text = String::from_utf8_lossy(&self.body).into_owned();
        assert_eq!(self.status, status, "status; body: {text}");
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "content-type; body: {text}");
        let problem = self.json();
        let object = problem.as_object().unwrap_or_else(|| panic!("problem is not a JSON object: {text}"));
        let ty = object.get("type").and_then(Value::as_str).unwrap_or_else(|| panic!("no string `type`: {text}"));
        assert!(ty.contains(':'), "`type` is not an absolute URI: {ty}");
        assert!(ty.ends_with(slug), "`type` {ty} does not end in {slug}");
        let end = ty.rsplit(['/', '#', ':']).next().unwrap();
        assert!(
            !end.is_empty() && end.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "`type` {ty} does not end in a slug"
        );
        assert!(object.get("title").and_then(Value::as_str).is_some_and(|t| !t.is_empty()), "no `title`: {text}");
        assert_eq!(object.get("status").and_then(Value::as_u64), Some(u64::from(status.as_u16())), "`status`: {text}");
        assert!(object.get("detail").and_then(Value::as_str).is_some_and(|d| !d.is_empty()), "no `detail`: {text}");
        for secret in secrets {
            assert!(!text.contains(secret), "problem echoes request content {secret:?}: {text}");
        }
        ty.to_owned()
    }

    /// Asserts a `Retry-After` with a delay in seconds or an HTTP date.
    #[track_caller]
    pub fn assert_retry_after(&self) {
        let value = self.header("retry-after").unwrap_or_else(|| panic!("no Retry-After: {:?}", self.headers));
        assert!(
            value.parse::<u64>().is_ok() || value.ends_with(" GMT"),
            "Retry-After is neither delay-seconds nor an HTTP-date: {value:?}"
        );
    }
}

/// Sleeps `ms` milliseconds of real time.
pub async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

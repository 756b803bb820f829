//! Acceptance tests over real hyper 1 servers and clients on loopback, each over HTTP/1.1 and
//! HTTP/2 (prior knowledge), one connection per test, requests sent one after another.
//!
//! - guide, step 7: the record exists before the client can see the response end, for every body
//!   shape hyper stops reading early (at `Content-Length`, at the trailers, at an exact
//!   `size_hint`, at `is_end_stream`), so a retry sent right after the whole response was read
//!   always replays and never sees `409` in flight.
//! - guide, step 8: replays are faithful on the wire (status, body, trailers, `Content-Length` only
//!   where the status allows a body and no trailers need chunked framing).
//! - guide, step 3: the guarded handler receives the request's trailers.
//!
//! Every expectation comes from the docs, not from what the current code does.
//! `REAL_SERVER_PAIRS` (default 1000) sets the number of first/retry pairs per body kind.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header, response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, RequestBody, store::MemoryStore};

/// The body type of every handler response and every client request here.
type BoxBody = UnsyncBoxBody<Bytes, Infallible>;
/// What the guarded handler receives.
type HandlerRequest = Request<RequestBody<Incoming>>;

/// The longest one exchange (request and whole response) may take before the test fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The trailer field the handlers send.
const CHECKSUM: HeaderName = HeaderName::from_static("x-checksum");

/// First/retry pairs per body kind and protocol: `REAL_SERVER_PAIRS`, default 1000.
fn pairs() -> usize {
    std::env::var("REAL_SERVER_PAIRS").map_or(1000, |v| v.parse().expect("REAL_SERVER_PAIRS is a number"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// A streamed body of `frames`: each frame, and the end, comes after one `Pending` (a yield),
/// so the body is never already complete when the layer first looks at it.
fn lazy(frames: Vec<Frame<Bytes>>) -> BoxBody {
    let frames = stream::unfold(frames.into_iter(), |mut rest| async move {
        tokio::task::yield_now().await;
        rest.next().map(|frame| (Ok::<_, Infallible>(frame), rest))
    });
    StreamBody::new(frames).boxed_unsync()
}

/// A streamed body of `chunks`, `gap` apart (the first one at once); its end comes right after
/// the last chunk.
fn slow(chunks: Vec<Bytes>, gap: Duration) -> BoxBody {
    let frames = stream::unfold((chunks.into_iter(), true), move |(mut rest, first)| async move {
        let chunk = rest.next()?;
        if !first {
            tokio::time::sleep(gap).await;
        }
        Some((Ok::<_, Infallible>(Frame::data(chunk)), (rest, false)))
    });
    StreamBody::new(frames).boxed_unsync()
}

/// A streamed body of `chunks` (each after a yield) whose end comes only `delay` after the
/// last chunk, as a channel body's does when its sender is dropped later.
fn late_end(chunks: Vec<Bytes>, delay: Duration) -> BoxBody {
    let frames = stream::unfold(chunks.into_iter(), move |mut rest| async move {
        match rest.next() {
            Some(chunk) => {
                tokio::task::yield_now().await;
                Some((Ok::<_, Infallible>(Frame::data(chunk)), rest))
            }
            None => {
                tokio::time::sleep(delay).await;
                None
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

/// Data chunks with an exact, shrinking `size_hint` and an accurate `is_end_stream`; each
/// frame comes after one `Pending`. No `Content-Length` header: hyper takes the length from
/// the hint.
struct ExactBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
    ready: bool,
}

impl ExactBody {
    fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self { chunks: chunks.into(), remaining, ready: false }
    }
}

impl Body for ExactBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if !this.ready {
            this.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.ready = false;
        Poll::Ready(this.chunks.pop_front().map(|chunk| {
            this.remaining -= chunk.len() as u64;
            Ok(Frame::data(chunk))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn trailers(name: HeaderName, value: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(name, HeaderValue::from_str(value).expect("trailer value"));
    map
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Serves `layer` in front of `handler` on `127.0.0.1:<free port>` with hyper-util's
/// connection builder restricted to `proto`, until the test's runtime ends.
async fn serve<F, Fut>(proto: Proto, layer: IdempotencyLayer<MemoryStore>, handler: F) -> SocketAddr
where
    F: Fn(HandlerRequest) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let service = ServiceBuilder::new().layer(layer).service_fn(move |request: HandlerRequest| {
        let answer = handler(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).expect("TCP_NODELAY");
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let builder = match proto {
                    Proto::Http1 => builder.http1_only(),
                    Proto::Http2 => builder.http2_only(),
                };
                // A connection error (the client went away) ends this connection only.
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A whole response: head, every body byte, the trailers.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    /// The response head as sent on the wire (raw HTTP/1.1 client only).
    raw_head: Option<String>,
}

impl Got {
    fn replayed(&self) -> Option<&HeaderValue> {
        self.headers.get("idempotent-replayed")
    }

    fn describe(&self) -> String {
        let head = match &self.raw_head {
            Some(raw) => format!("{raw:?}"),
            None => format!("{:?}", self.headers),
        };
        format!(
            "{} head {head} body {:?} trailers {:?}",
            self.status,
            String::from_utf8_lossy(&self.body),
            self.trailers
        )
    }

    /// Whether this is the layer's `409` for a request still in flight.
    fn is_in_flight(&self) -> bool {
        self.status == StatusCode::CONFLICT && String::from_utf8_lossy(&self.body).contains("in-flight")
    }
}

/// A TCP connection to `addr`, without Nagle's delay (the server's sockets have none either).
async fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    tcp
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<BoxBody>),
    Http2(hyper::client::conn::http2::SendRequest<BoxBody>),
}

/// One hyper client connection.
struct Client {
    proto: Proto,
    addr: SocketAddr,
    sender: Sender,
}

impl Client {
    async fn connect(proto: Proto, addr: SocketAddr) -> Self {
        let io = TokioIo::new(connect(addr).await);
        let sender = match proto {
            Proto::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await.expect("HTTP/1.1 handshake");
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            Proto::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("HTTP/2 handshake");
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        Self { proto, addr, sender }
    }

    /// `POST path` with `Idempotency-Key: key`; over HTTP/1.1 with `TE: trailers`, so the
    /// server may send trailers.
    fn post(&self, path: &str, key: &str) -> http::request::Builder {
        let builder = match self.proto {
            Proto::Http1 => {
                Request::post(path).header(header::HOST, self.addr.to_string()).header(header::TE, "trailers")
            }
            Proto::Http2 => Request::post(format!("http://{}{path}", self.addr)),
        };
        builder.header("idempotency-key", key).header(header::CONTENT_TYPE, "application/json")
    }

    /// Sends `request` and reads the whole response, body and trailers.
    async fn send(&mut self, request: Request<BoxBody>) -> Got {
        let exchange = async {
            let response = match &mut self.sender {
                Sender::Http1(sender) => {
                    sender.ready().await.expect("HTTP/1.1 connection ready");
                    sender.send_request(request).await
                }
                Sender::Http2(sender) => {
                    sender.ready().await.expect("HTTP/2 connection ready");
                    sender.send_request(request).await
                }
            }
            .expect("the server answers");
            let (head, body) = response.into_parts();
            let collected = body.collect().await.expect("the response body reads to its end");
            let trailers = collected.trailers().cloned();
            Got { status: head.status, headers: head.headers, body: collected.to_bytes(), trailers, raw_head: None }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.expect("the exchange ends within 10 s")
    }
}

/// A hand-written HTTP/1.1 client on one keep-alive connection, to see the response head
/// exactly as sent (hyper's client may normalise it).
struct RawClient {
    addr: SocketAddr,
    conn: BufReader<TcpStream>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        Self { addr, conn: BufReader::new(connect(addr).await) }
    }

    async fn post(&mut self, path: &str, key: &str, body: &str) -> Got {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nidempotency-key: {key}\r\nte: trailers\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            self.conn.get_mut().write_all(request.as_bytes()).await.expect("write request");
            self.read_response().await
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.expect("the exchange ends within 10 s")
    }

    async fn read_line(&mut self, what: &str) -> String {
        let mut line = String::new();
        let n = self.conn.read_line(&mut line).await.expect("read from the server");
        assert!(n > 0, "the server closed the connection in the {what}");
        line
    }

    async fn read_fields(&mut self, what: &str, raw: &mut String) -> HeaderMap {
        let mut fields = HeaderMap::new();
        loop {
            let line = self.read_line(what).await;
            raw.push_str(&line);
            if line == "\r\n" {
                return fields;
            }
            let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("malformed field line {line:?}"));
            fields.append(
                HeaderName::from_bytes(name.as_bytes()).expect("field name"),
                HeaderValue::from_str(value.trim()).expect("field value"),
            );
        }
    }

    async fn read_response(&mut self) -> Got {
        let mut raw_head = self.read_line("status line").await;
        let status = raw_head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()).expect("status code");
        let status = StatusCode::from_u16(status).expect("status code");
        let headers = self.read_fields("head", &mut raw_head).await;
        let mut body = Vec::new();
        let mut trailers = None;
        let chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("chunked")));
        let no_body =
            status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        if no_body {
            // RFC 9112 6.3: no body, whatever the head says.
        } else if chunked {
            loop {
                let line = self.read_line("chunk size").await;
                let size = line.trim_end().split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk size line {line:?}"));
                if size == 0 {
                    let mut raw_trailers = String::new();
                    let fields = self.read_fields("trailers", &mut raw_trailers).await;
                    trailers = (!fields.is_empty()).then_some(fields);
                    break;
                }
                let mut chunk = vec![0; size + 2];
                self.conn.read_exact(&mut chunk).await.expect("read chunk");
                assert_eq!(&chunk[size..], b"\r\n", "chunk not followed by CRLF");
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = headers.get(header::CONTENT_LENGTH) {
            let length: usize = length.to_str().ok().and_then(|l| l.parse().ok()).expect("Content-Length is a number");
            body.resize(length, 0);
            self.conn.read_exact(&mut body).await.expect("read body");
        } else {
            panic!("a response with a body but neither Content-Length nor chunked framing: {raw_head:?}");
        }
        Got { status, headers, body: body.into(), trailers, raw_head: Some(raw_head) }
    }
}

// ---------------------------------------------------------------------------------------------
// Guide, step 7: the record exists before the client can see the response end
// ---------------------------------------------------------------------------------------------

/// The shapes of response body the handler answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Several streamed chunks, `Content-Length` set by the handler: hyper stops reading at it.
    ContentLength,
    /// Several streamed chunks, exact `size_hint`, no header: hyper stops at the hinted length.
    ExactSizeHint,
    /// Several streamed chunks, unknown length: chunked.
    Chunked,
    /// Streamed chunks, then a trailers frame: hyper stops at the trailers.
    DataAndTrailers,
    /// A trailers frame only.
    TrailersOnly,
    /// `Full::new(Bytes::new())`.
    EmptyFull,
    /// A streamed body with no frame at all and `Content-Length: 0`.
    EmptyStreamed,
    /// Three chunks 20 ms apart, `Content-Length` set.
    Slow,
    /// Streamed chunks with `Content-Length`, the body's end 20 ms after the last chunk.
    LateEnd,
}

impl Kind {
    fn has_trailers(self) -> bool {
        matches!(self, Kind::DataAndTrailers | Kind::TrailersOnly)
    }

    fn has_data(self) -> bool {
        !matches!(self, Kind::TrailersOnly | Kind::EmptyFull | Kind::EmptyStreamed)
    }
}

/// The body chunks of execution `n` (fixed length for any `n` under a million).
fn chunks(n: usize) -> Vec<Bytes> {
    (0..3).map(|i| Bytes::from(format!("exec {n:06} chunk {i};"))).collect()
}

/// The length of `chunks(n)`.
fn chunks_len() -> usize {
    chunks(0).iter().map(Bytes::len).sum()
}

/// The handler: counts its execution, reads the request, answers the status in `x-status`
/// with a body of shape `kind` whose bytes (and trailers) are unique to this execution.
async fn kind_handler(kind: Kind, executions: Arc<AtomicUsize>, request: HandlerRequest) -> Response<BoxBody> {
    let n = executions.fetch_add(1, Ordering::SeqCst);
    let status = request
        .headers()
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
        .map_or(StatusCode::OK, |s| StatusCode::from_u16(s).expect("status"));
    request.into_body().collect().await.expect("the request body reads");
    let chunks = chunks(n);
    let data: Vec<_> = chunks.iter().cloned().map(Frame::data).collect();
    let checksum = || Frame::trailers(trailers(CHECKSUM, &format!("abc-{n}")));
    let head = Response::builder().status(status).header(header::CONTENT_TYPE, "text/plain");
    let response = match kind {
        Kind::ContentLength => head.header(header::CONTENT_LENGTH, chunks_len()).body(lazy(data)),
        Kind::ExactSizeHint => head.body(ExactBody::new(chunks).boxed_unsync()),
        Kind::Chunked => head.body(lazy(data)),
        Kind::DataAndTrailers => {
            let mut frames = data;
            frames.push(checksum());
            head.header(header::TRAILER, CHECKSUM.as_str()).body(lazy(frames))
        }
        Kind::TrailersOnly => head.header(header::TRAILER, CHECKSUM.as_str()).body(lazy(vec![checksum()])),
        Kind::EmptyFull => head.body(full(Bytes::new())),
        Kind::EmptyStreamed => head.header(header::CONTENT_LENGTH, 0).body(lazy(Vec::new())),
        Kind::Slow => head.header(header::CONTENT_LENGTH, chunks_len()).body(slow(chunks, Duration::from_millis(20))),
        Kind::LateEnd => {
            head.header(header::CONTENT_LENGTH, chunks_len()).body(late_end(chunks, Duration::from_millis(20)))
        }
    };
    response.expect("response")
}

/// Why pairs failed: per reason, how many and the first occurrence.
#[derive(Default)]
struct Failures {
    by_reason: BTreeMap<String, (usize, usize, String)>,
}

impl Failures {
    fn add(&mut self, pair: usize, reason: String, detail: String) {
        self.by_reason.entry(reason).or_insert((0, pair, detail)).0 += 1;
    }

    #[track_caller]
    fn assert_none(&self, label: &str, pairs: usize) {
        if self.by_reason.is_empty() {
            return;
        }
        let failed: usize = self.by_reason.values().map(|(count, ..)| count).sum();
        let mut report = format!("{label}: {failed} of {pairs} pairs failed");
        for (reason, (count, pair, detail)) in &self.by_reason {
            report.push_str(&format!("\n  - {reason}: {count} pairs, first at pair {pair}: {detail}"));
        }
        panic!("{report}");
    }
}

/// Checks the first response is the handler's, in shape `kind` with `status`.
fn check_first(kind: Kind, status: StatusCode, first: &Got) -> Result<(), (String, String)> {
    let fail = |reason: &str| Err((format!("first response: {reason}"), first.describe()));
    if first.status != status {
        return fail("wrong status");
    }
    if first.replayed().is_some() {
        return fail("marked Idempotent-Replayed");
    }
    let want_len = if kind.has_data() { chunks_len() } else { 0 };
    if first.body.len() != want_len {
        return fail(&format!("body not of {want_len} bytes"));
    }
    let checksum = first.trailers.as_ref().and_then(|t| t.get(&CHECKSUM));
    if kind.has_trailers() != checksum.is_some() {
        return fail(if kind.has_trailers() { "no x-checksum trailer" } else { "unexpected trailers" });
    }
    Ok(())
}

/// Checks `retry` replays `first` (guide, steps 7, 8).
fn check_retry(first: &Got, retry: &Got) -> Result<(), (String, String)> {
    let fail = |reason: String| Err((reason, retry.describe()));
    if retry.status != first.status {
        let reason = if retry.status == StatusCode::CONFLICT {
            let problem = String::from_utf8_lossy(&retry.body);
            let ty = problem.split('"').skip_while(|s| *s != "type").nth(2).unwrap_or("?").to_owned();
            format!("retry got 409 {}", ty.rsplit(['/', '#']).next().unwrap_or(&ty))
        } else {
            format!("retry status {} (first {})", retry.status.as_u16(), first.status.as_u16())
        };
        return fail(reason);
    }
    if retry.replayed().is_none_or(|v| v != "true") {
        return fail(format!("retry not marked Idempotent-Replayed: true ({:?})", retry.replayed()));
    }
    let differs = |what: &str, first: String| {
        Err((format!("replayed {what} differ from the first"), format!("first {first}, replay {}", retry.describe())))
    };
    if retry.body != first.body {
        return differs("body bytes", format!("{:?}", String::from_utf8_lossy(&first.body)));
    }
    if retry.trailers != first.trailers {
        return differs("trailers", format!("{:?}", first.trailers));
    }
    Ok(())
}

/// `pairs` times: a fresh key, the request, its whole response, then at once the same request
/// again, which must replay the first (guide, steps 7 and 8). The handler runs once per
/// pair.
async fn record_before_end(proto: Proto, kind: Kind, pairs: usize) {
    let label = format!("{kind:?} body over {proto:?}");
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let addr = serve(proto, IdempotencyLayer::new(), move |request| kind_handler(kind, counter.clone(), request)).await;
    let mut client = Client::connect(proto, addr).await;
    let run = uuid::Uuid::new_v4();
    let mut failures = Failures::default();
    for pair in 0..pairs {
        let key = format!("{run}-{pair}");
        let status = if pair % 2 == 0 { StatusCode::OK } else { StatusCode::CREATED };
        let body = Bytes::from(format!("{{\"pair\":{pair}}}"));
        let request = |client: &Client| {
            client.post("/kinds", &key).header("x-status", status.as_u16()).body(full(body.clone())).expect("request")
        };
        let request_1 = request(&client);
        let first = client.send(request_1).await;
        let request_2 = request(&client);
        let retry = client.send(request_2).await;
        if let Err((reason, detail)) = check_first(kind, status, &first).and_then(|()| check_retry(&first, &retry)) {
            failures.add(pair, reason, detail);
        }
    }
    let runs = executions.load(Ordering::SeqCst);
    failures.assert_none(&format!("{label} (handler executions: {runs} for {pairs} keys)"), pairs);
    assert_eq!(runs, pairs, "{label}: handler executions for {pairs} keys");
}

macro_rules! over_both_protocols {
    ($($(#[doc = $doc:literal])* $http1:ident, $http2:ident => $run:ident($($arg:expr),*);)*) => {$(
        $(#[doc = $doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $http1() {
            $run(Proto::Http1 $(, $arg)*).await;
        }

        $(#[doc = $doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $http2() {
            $run(Proto::Http2 $(, $arg)*).await;
        }
    )*};
}

over_both_protocols! {
    /// 2.7: streamed chunks with the handler's own `Content-Length`: a retry replays.
    content_length_stream_replays_http1, content_length_stream_replays_http2
        => record_before_end(Kind::ContentLength, pairs());
    /// 2.7: streamed chunks with an exact `size_hint` and no header: a retry replays.
    exact_size_hint_stream_replays_http1, exact_size_hint_stream_replays_http2
        => record_before_end(Kind::ExactSizeHint, pairs());
    /// 2.7: chunked, several chunks, unknown length: a retry replays.
    chunked_stream_replays_http1, chunked_stream_replays_http2
        => record_before_end(Kind::Chunked, pairs());
    /// 2.7, 2.8: data chunks then trailers: a retry replays, trailers included.
    data_and_trailers_replay_http1, data_and_trailers_replay_http2
        => record_before_end(Kind::DataAndTrailers, pairs());
    /// 2.7, 2.8: a trailers frame only: a retry replays, trailers included.
    trailers_only_replay_http1, trailers_only_replay_http2
        => record_before_end(Kind::TrailersOnly, pairs());
    /// 2.7: an empty `Full` body: a retry replays.
    empty_full_body_replays_http1, empty_full_body_replays_http2
        => record_before_end(Kind::EmptyFull, pairs());
    /// 2.7: an empty streamed body with `Content-Length: 0`: a retry replays.
    empty_stream_content_length_zero_replays_http1, empty_stream_content_length_zero_replays_http2
        => record_before_end(Kind::EmptyStreamed, pairs());
    /// 2.7: three chunks 20 ms apart with `Content-Length`: a retry right after replays.
    slow_content_length_stream_replays_http1, slow_content_length_stream_replays_http2
        => record_before_end(Kind::Slow, 50);
    /// 2.7: streamed chunks with `Content-Length` whose end comes 20 ms after the last byte:
    /// the client has the whole response at the last byte, and a retry then replays.
    content_length_stream_with_late_end_replays_http1, content_length_stream_with_late_end_replays_http2
        => record_before_end(Kind::LateEnd, 50);
}

// ---------------------------------------------------------------------------------------------
// Guide, step 8: replays are faithful on the wire
// ---------------------------------------------------------------------------------------------

/// Routes of the wire tests: `/no-content` (204), `/not-modified` (304, recorded by the
/// layer's predicate), `/body` (200, chunked, no length), `/trailers` (200, data and trailers).
async fn wire_handler(executions: Arc<AtomicUsize>, request: HandlerRequest) -> Response<BoxBody> {
    let n = executions.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
    request.into_body().collect().await.expect("the request body reads");
    let head = Response::builder().header("x-execution", n);
    let data = || chunks(n).into_iter().map(Frame::data).collect::<Vec<_>>();
    let response = match path.as_str() {
        "/no-content" => head.status(StatusCode::NO_CONTENT).body(full(Bytes::new())),
        "/not-modified" => {
            head.status(StatusCode::NOT_MODIFIED).header(header::ETAG, "\"v1\"").body(full(Bytes::new()))
        }
        "/body" => head.status(StatusCode::OK).header(header::CONTENT_TYPE, "text/plain").body(lazy(data())),
        "/trailers" => {
            let mut frames = data();
            frames.push(Frame::trailers(trailers(CHECKSUM, &format!("abc-{n}"))));
            head.status(StatusCode::OK).header(header::TRAILER, CHECKSUM.as_str()).body(lazy(frames))
        }
        other => panic!("no route {other}"),
    };
    response.expect("response")
}

/// A first request to `path` and its replay, over `proto` (HTTP/1.1: the hand-written client,
/// to see the head as sent). A retry that meets the first still in flight is sent again (up to
/// 1 s): that rule is 2.7's, tested above; here only the replay's framing is.
async fn first_and_replay(proto: Proto, path: &str) -> (Got, Got) {
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let layer = IdempotencyLayer::new().with_cache_predicate(|head: &response::Parts| {
        head.status.is_success() || head.status == StatusCode::NOT_MODIFIED
    });
    let addr = serve(proto, layer, move |request| wire_handler(counter.clone(), request)).await;
    let key = format!("wire-{}", uuid::Uuid::new_v4());
    let body = "{\"sku\":\"A1\"}";
    let (first, replay) = match proto {
        Proto::Http1 => {
            let mut client = RawClient::connect(addr).await;
            let first = client.post(path, &key, body).await;
            let mut replay = client.post(path, &key, body).await;
            for _ in 0..100 {
                if !replay.is_in_flight() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                replay = client.post(path, &key, body).await;
            }
            (first, replay)
        }
        Proto::Http2 => {
            let mut client = Client::connect(proto, addr).await;
            let request = |client: &Client| client.post(path, &key).body(full(body)).expect("request");
            let first = client.send(request(&client)).await;
            let mut replay = client.send(request(&client)).await;
            for _ in 0..100 {
                if !replay.is_in_flight() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                replay = client.send(request(&client)).await;
            }
            (first, replay)
        }
    };
    assert_eq!(executions.load(Ordering::SeqCst), 1, "the handler runs once; replay: {}", replay.describe());
    assert!(first.replayed().is_none(), "the first response is marked replayed: {}", first.describe());
    assert_eq!(replay.replayed().map(|v| v.as_bytes()), Some(&b"true"[..]), "not a replay: {}", replay.describe());
    assert_eq!(replay.status, first.status, "replayed status: {}", replay.describe());
    assert_eq!(replay.body, first.body, "replayed body: {}", replay.describe());
    for name in ["x-execution", "etag", "content-type"] {
        assert_eq!(replay.headers.get(name), first.headers.get(name), "replayed header {name}: {}", replay.describe());
    }
    (first, replay)
}

/// 2.8: `Content-Length` is never added to a `204` or `304` replay.
async fn bodiless_replay_has_no_content_length(proto: Proto, path: &str, status: StatusCode) {
    let (first, replay) = first_and_replay(proto, path).await;
    assert_eq!(first.status, status, "first: {}", first.describe());
    assert!(replay.body.is_empty(), "replay body: {}", replay.describe());
    assert!(
        replay.headers.get(header::CONTENT_LENGTH).is_none(),
        "{status} replay with Content-Length: {}",
        replay.describe()
    );
    assert!(
        replay.headers.get(header::TRANSFER_ENCODING).is_none(),
        "{status} replay with Transfer-Encoding: {}",
        replay.describe()
    );
}

async fn no_content_replay_has_no_content_length(proto: Proto) {
    bodiless_replay_has_no_content_length(proto, "/no-content", StatusCode::NO_CONTENT).await;
}

async fn not_modified_replay_has_no_content_length(proto: Proto) {
    bodiless_replay_has_no_content_length(proto, "/not-modified", StatusCode::NOT_MODIFIED).await;
}

/// 2.8: a `2xx` replay with a body (first sent chunked, without a length) carries the
/// recomputed `Content-Length`.
async fn body_replay_has_correct_content_length(proto: Proto) {
    let (first, replay) = first_and_replay(proto, "/body").await;
    assert_eq!(first.status, StatusCode::OK, "first: {}", first.describe());
    assert_eq!(first.body.len(), chunks_len(), "first: {}", first.describe());
    let length = replay
        .headers
        .get(header::CONTENT_LENGTH)
        .unwrap_or_else(|| panic!("replay with a body and no trailers has no Content-Length: {}", replay.describe()));
    assert_eq!(length.to_str().ok(), Some(replay.body.len().to_string().as_str()), "{}", replay.describe());
    assert!(replay.headers.get(header::TRANSFER_ENCODING).is_none(), "replay is also chunked: {}", replay.describe());
    assert_eq!(replay.headers.get(header::CONTENT_TYPE), first.headers.get(header::CONTENT_TYPE), "content-type");
}

/// 2.8: a replay with trailers carries the same trailers; over HTTP/1.1 that needs chunked
/// framing, so no `Content-Length`; over HTTP/2 a `Content-Length`, if sent, is the body's.
async fn trailers_replay_keeps_trailers(proto: Proto) {
    let (first, replay) = first_and_replay(proto, "/trailers").await;
    assert_eq!(first.status, StatusCode::OK, "first: {}", first.describe());
    assert!(first.trailers.as_ref().is_some_and(|t| t.contains_key(&CHECKSUM)), "first: {}", first.describe());
    assert_eq!(replay.trailers, first.trailers, "replayed trailers: {}", replay.describe());
    let length = replay.headers.get(header::CONTENT_LENGTH);
    match proto {
        Proto::Http1 => {
            assert!(length.is_none(), "HTTP/1.1 replay with trailers and Content-Length: {}", replay.describe());
            let chunked = replay.headers.get(header::TRANSFER_ENCODING).is_some_and(|v| v == "chunked");
            assert!(chunked, "HTTP/1.1 replay with trailers is not chunked: {}", replay.describe());
        }
        Proto::Http2 => {
            if let Some(length) = length {
                assert_eq!(length.to_str().ok(), Some(replay.body.len().to_string().as_str()), "{}", replay.describe());
            }
        }
    }
}

over_both_protocols! {
    /// 2.8: a recorded `204` replays without `Content-Length`.
    no_content_replay_has_no_content_length_http1, no_content_replay_has_no_content_length_http2
        => no_content_replay_has_no_content_length();
    /// 2.8: a `304` recorded by a custom predicate replays without `Content-Length`.
    not_modified_replay_has_no_content_length_http1, not_modified_replay_has_no_content_length_http2
        => not_modified_replay_has_no_content_length();
    /// 2.8: a `200` with a body replays with the body's `Content-Length`.
    body_replay_has_correct_content_length_http1, body_replay_has_correct_content_length_http2
        => body_replay_has_correct_content_length();
    /// 2.8: a `200` with trailers replays them, with framing that can carry them.
    trailers_replay_keeps_trailers_http1, trailers_replay_keeps_trailers_http2
        => trailers_replay_keeps_trailers();
}

// ---------------------------------------------------------------------------------------------
// Guide, step 3: request trailers reach the guarded handler
// ---------------------------------------------------------------------------------------------

/// A chunked request body with a trailers frame and an `Idempotency-Key`: the handler sees the
/// data and the trailers.
async fn request_trailers_reach_the_handler(proto: Proto) {
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let handler = move |request: HandlerRequest| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let collected = request.into_body().collect().await.expect("the request body reads");
            let trailer = collected
                .trailers()
                .and_then(|t| t.get("x-request-checksum"))
                .map_or_else(|| "none".to_owned(), |v| v.to_str().expect("text").to_owned());
            let data = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
            let saw = format!("data={data} trailer={trailer}");
            Response::builder().status(StatusCode::CREATED).body(full(saw)).expect("response")
        }
    };
    let addr = serve(proto, IdempotencyLayer::new(), handler).await;
    let mut client = Client::connect(proto, addr).await;
    let frames = vec![
        Frame::data(Bytes::from_static(b"part-1;")),
        Frame::data(Bytes::from_static(b"part-2;")),
        Frame::trailers(trailers(HeaderName::from_static("x-request-checksum"), "req-abc")),
    ];
    // HTTP/1.1: unknown length, so chunked; hyper's client sends the fields `Trailer` names.
    let request = client
        .post("/trailers", &format!("req-trailers-{}", uuid::Uuid::new_v4()))
        .header(header::TRAILER, "x-request-checksum")
        .body(lazy(frames))
        .expect("request");
    let response = client.send(request).await;
    assert_eq!(response.status, StatusCode::CREATED, "{}", response.describe());
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        "data=part-1;part-2; trailer=req-abc",
        "what the guarded handler saw of the request body and trailers"
    );
    assert_eq!(executions.load(Ordering::SeqCst), 1, "handler executions");
}

over_both_protocols! {
    /// 2.4: the guarded handler receives the request's trailers.
    request_trailers_reach_the_handler_http1, request_trailers_reach_the_handler_http2
        => request_trailers_reach_the_handler();
}

// ---------------------------------------------------------------------------------------------
// A client that hangs up mid-stream (guide, steps 6-7)
// ---------------------------------------------------------------------------------------------

/// The client reads the first chunk of a streamed `201` and closes its connection: hyper drops
/// the response body mid-stream, the layer reads the rest on the runtime and records it, and a
/// retry on a new connection replays the whole body; the handler ran once.
async fn a_client_that_hangs_up_mid_stream_leaves_a_record(proto: Proto) {
    let executions = Arc::new(AtomicUsize::new(0));
    let runs = executions.clone();
    let addr = serve(proto, IdempotencyLayer::new(), move |_request: HandlerRequest| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = slow(chunks(3), Duration::from_millis(50));
            Response::builder().status(StatusCode::CREATED).body(body).unwrap()
        }
    })
    .await;
    let key = format!("hang-up-{}", uuid::Uuid::new_v4());
    {
        let mut client = Client::connect(proto, addr).await;
        let request = client.post("/stream", &key).body(full(Bytes::new())).unwrap();
        let response = match &mut client.sender {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }
        .expect("the server answers");
        let mut body = response.into_body();
        let first = body.frame().await.expect("a first frame").expect("no error");
        assert_eq!(first.into_data().unwrap(), chunks(3)[0]);
        // Dropping the body and the connection hangs up.
    }
    let mut client = Client::connect(proto, addr).await;
    let mut retry = client.send(client.post("/stream", &key).body(full(Bytes::new())).unwrap()).await;
    for _ in 0..50 {
        if !retry.is_in_flight() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        retry = client.send(client.post("/stream", &key).body(full(Bytes::new())).unwrap()).await;
    }
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.describe());
    assert_eq!(retry.replayed().map(|v| v.as_bytes()), Some(&b"true"[..]), "{}", retry.describe());
    assert_eq!(retry.body, chunks(3).concat(), "the whole body was recorded");
    assert_eq!(executions.load(Ordering::SeqCst), 1, "handler executions");
}

over_both_protocols! {
    /// 2.6: a client that hangs up mid-stream leaves a recorded response; the retry replays it.
    a_client_that_hangs_up_mid_stream_leaves_a_record_http1, a_client_that_hangs_up_mid_stream_leaves_a_record_http2
        => a_client_that_hangs_up_mid_stream_leaves_a_record();
}

// ---------------------------------------------------------------------------------------------
// Join an in-flight event stream (guide, step 9)
// ---------------------------------------------------------------------------------------------

/// `id: I\ndata: token-I\n\n`.
fn event(i: usize) -> Bytes {
    Bytes::from(format!("id: {i}\ndata: token-{i}\n\n"))
}

/// A streamed completion over real hyper: the first client reads three events and hangs up;
/// its retry (same key, `Last-Event-ID: 2`, a new connection) joins the generation still
/// running and gets events 3.. exactly once, as they are produced; a second joiner without
/// `Last-Event-ID` gets the whole stream; after the end, a retry is a replay. One execution.
async fn a_cut_stream_continues_under_the_same_key(proto: Proto) {
    const EVENTS: usize = 12;
    let executions = Arc::new(AtomicUsize::new(0));
    let runs = executions.clone();
    let layer = IdempotencyLayer::new().with_duplicates(tower_idempotency::Duplicates::join());
    let addr = serve(proto, layer, move |_request: HandlerRequest| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = slow((0..EVENTS).map(event).collect(), Duration::from_millis(40));
            Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(body).unwrap()
        }
    })
    .await;
    let key = format!("join-{}", uuid::Uuid::new_v4());
    {
        let mut client = Client::connect(proto, addr).await;
        let request = client.post("/complete", &key).body(full(Bytes::new())).unwrap();
        let response = match &mut client.sender {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }
        .expect("the server answers");
        let mut body = response.into_body();
        let mut seen: Vec<Bytes> = Vec::new();
        while seen.concat().len() < (0..3).map(|i| event(i).len()).sum::<usize>() {
            seen.push(body.frame().await.expect("a frame").expect("no error").into_data().unwrap());
        }
        assert_eq!(seen.concat(), (0..3).map(event).collect::<Vec<_>>().concat());
        // Dropping the body and the connection hangs up mid-generation.
    }
    let mut resumed = Client::connect(proto, addr).await;
    let mut whole = Client::connect(proto, addr).await;
    let (resumed, whole) = tokio::join!(
        resumed.send(resumed.post("/complete", &key).header("last-event-id", "2").body(full(Bytes::new())).unwrap()),
        whole.send(whole.post("/complete", &key).body(full(Bytes::new())).unwrap()),
    );
    for (got, from) in [(&resumed, 3), (&whole, 0)] {
        assert_eq!(got.status, StatusCode::OK, "{}", got.describe());
        assert_eq!(got.replayed().map(|v| v.as_bytes()), Some(&b"true"[..]), "{}", got.describe());
        assert_eq!(got.headers[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(got.body, (from..EVENTS).map(event).collect::<Vec<_>>().concat(), "{}", got.describe());
    }
    let mut client = Client::connect(proto, addr).await;
    let replay = client
        .send(client.post("/complete", &key).header("last-event-id", "10").body(full(Bytes::new())).unwrap())
        .await;
    assert_eq!(replay.body, event(11), "{}", replay.describe());
    assert_eq!(executions.load(Ordering::SeqCst), 1, "one generation, billed once");
}

over_both_protocols! {
    /// 2.9: a cut event stream continues under the same key, joined on a new connection.
    a_cut_stream_continues_under_the_same_key_http1, a_cut_stream_continues_under_the_same_key_http2
        => a_cut_stream_continues_under_the_same_key();
}

//! Resume exactly: a client cut after event `k` of a streamed completion reconnects with
//! `Last-Event-ID: k` and gets events `k+1..` once each, in order, whatever the stream's
//! length, line endings and chunks, joining the stream in flight or replaying it after its end,
//! on the replica that runs it or another (two layers over one store), over real hyper
//! HTTP/1.1 and HTTP/2 on loopback. Shared by the test binaries of every store
//! (`tests/http/resume_exactly.rs`: memory, Redis, PostgreSQL; `tests/stores/redis_cluster.rs`:
//! Redis Cluster).
//!
//! One stream per [`Shape`], many reconnects through it: the handler's body is released chunk
//! by chunk by the test, and for each `k` (every 50th event, the first and the last) the test
//! releases the stream up to the chunk that completes event `k`, then reconnects with
//! `Last-Event-ID: k` (alternating replicas and protocols) and keeps the joined body reading;
//! at the end every joined body and a replay per `k` must be exactly events `k+1..`.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tower::{ServiceBuilder, util::BoxCloneService};
use tower_idempotency::{Duplicates, IdempotencyLayer, RequestBody, ResponseBody, Secret, store::LiveLog};

/// The body type of the handler's responses.
pub type BoxBody = UnsyncBoxBody<Bytes, Infallible>;

/// How long one reconnect may take, start to end, before the test fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(300);

/// The line ending of every line of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newline {
    Lf,
    CrLf,
    Cr,
}

impl Newline {
    fn as_str(self) -> &'static str {
        match self {
            Self::Lf => "\n",
            Self::CrLf => "\r\n",
            Self::Cr => "\r",
        }
    }
}

/// How the handler cuts its body into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunks {
    /// One chunk per event.
    Events,
    /// Chunks of 1 to 48 bytes (a seeded sequence), ending anywhere: mid-line, between a CR
    /// and its LF, mid-id.
    Cut(u64),
    /// One byte at a time.
    Bytes,
}

/// One stream: its number of events, line ending and chunks.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub events: usize,
    pub newline: Newline,
    pub chunks: Chunks,
}

/// The shapes every store runs: 1,000 and 5,000 events, LF, CRLF and CR, whole events,
/// arbitrary cuts and single bytes.
pub const SHAPES: [Shape; 5] = [
    Shape { events: 1000, newline: Newline::Lf, chunks: Chunks::Events },
    Shape { events: 1000, newline: Newline::CrLf, chunks: Chunks::Cut(7) },
    Shape { events: 1000, newline: Newline::Cr, chunks: Chunks::Bytes },
    Shape { events: 5000, newline: Newline::Cr, chunks: Chunks::Cut(11) },
    Shape { events: 5000, newline: Newline::CrLf, chunks: Chunks::Events },
];

/// A stream's bytes: the body, the end of each event in it, and its chunks (each with the
/// body offset it ends at).
pub struct Stream {
    pub body: Bytes,
    pub ends: Vec<usize>,
    chunks: Vec<Bytes>,
    chunk_ends: Vec<usize>,
}

/// `id: I<nl>data: token-I<nl><nl>`.
pub fn event(i: usize, newline: Newline) -> String {
    let nl = newline.as_str();
    format!("id: {i}{nl}data: token-{i}{nl}{nl}")
}

impl Stream {
    pub fn new(shape: Shape) -> Self {
        let (mut body, mut ends) = (Vec::new(), Vec::new());
        for i in 0..shape.events {
            body.extend_from_slice(event(i, shape.newline).as_bytes());
            ends.push(body.len());
        }
        let body = Bytes::from(body);
        let mut cuts = Vec::new();
        match shape.chunks {
            Chunks::Events => cuts.clone_from(&ends),
            Chunks::Bytes => cuts.extend(1..=body.len()),
            Chunks::Cut(seed) => {
                let (mut state, mut at) = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, 0);
                while at < body.len() {
                    // xorshift64
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    at = (at + 1 + (state % 48) as usize).min(body.len());
                    cuts.push(at);
                }
            }
        }
        let mut from = 0;
        let chunks = cuts
            .iter()
            .map(|&to| {
                let chunk = body.slice(from..to);
                from = to;
                chunk
            })
            .collect();
        Self { body, ends, chunks, chunk_ends: cuts }
    }

    /// How many chunks hold every byte of event `k`.
    fn chunks_through(&self, k: usize) -> usize {
        self.chunk_ends.partition_point(|&end| end < self.ends[k]) + 1
    }

    /// The events after event `k`, as the body holds them.
    pub fn after(&self, k: usize) -> Bytes {
        self.body.slice(self.ends[k]..)
    }
}

/// The handler's gate: how many chunks it may send (past the last, its end).
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<usize>>);

impl Gate {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }

    /// Lets the body go on to `chunks` chunks.
    pub fn release(&self, chunks: usize) {
        self.0.send_modify(|allowed| *allowed = (*allowed).max(chunks));
    }

    /// Lets the body send everything and end.
    pub fn open(&self) {
        self.release(usize::MAX);
    }
}

/// The handler: streams `stream` as `text/event-stream`, each chunk once the gate lets it.
pub fn body(stream: Arc<Stream>, gate: &Gate) -> BoxBody {
    let gate = gate.0.subscribe();
    let frames = futures_util::stream::unfold((0, gate, stream), |(i, mut gate, stream)| async move {
        gate.wait_for(|allowed| *allowed > i).await.ok()?;
        let chunk = stream.chunks.get(i)?.clone();
        Some((Ok::<_, Infallible>(Frame::data(chunk)), (i + 1, gate, stream)))
    });
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

/// A layer in join mode for a replica of the test: every replica has the same secret.
pub fn join_layer<St: LiveLog + Clone>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::from_store(store)
        .with_secret(Secret::new("the resume tests' secret, the same on every replica").unwrap())
        .with_duplicates(Duplicates::join())
        .with_max_waiters(512)
}

/// What the handler of a served replica does.
pub type Handler = Arc<dyn Fn() -> Response<BoxBody> + Send + Sync>;

/// Serves `layer` in front of `handler` on `127.0.0.1:<free port>` (HTTP/1.1 and HTTP/2 with
/// prior knowledge, whichever the client speaks), until the runtime ends.
pub async fn serve<St: LiveLog + Clone>(layer: IdempotencyLayer<St>, handler: Handler) -> SocketAddr {
    let service = ServiceBuilder::new().layer(layer).service_fn(move |_request: Request<RequestBody<Incoming>>| {
        let response = handler();
        async move { Ok::<_, Infallible>(response) }
    });
    listen(BoxCloneService::new(service)).await
}

/// What [`serve`] serves, its store type erased.
type Served = BoxCloneService<Request<Incoming>, Response<ResponseBody<BoxBody>>, Infallible>;

async fn listen(service: Served) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).expect("TCP_NODELAY");
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

/// The HTTP version of a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A response whose head came, its body still to read; the connection lives as long as it.
pub struct Open {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Incoming,
    connection: JoinHandle<()>,
}

impl Open {
    /// Reads the body to its end.
    pub async fn read(self) -> Bytes {
        let body = tokio::time::timeout(EXCHANGE_TIMEOUT, self.body.collect()).await;
        let bytes = body.expect("the body ends in time").expect("the body reads to its end").to_bytes();
        self.connection.abort();
        bytes
    }

    /// Reads until `len` body bytes came, then hangs up (the client is cut).
    pub async fn cut_after(mut self, len: usize) -> Bytes {
        let mut got = Vec::new();
        while got.len() < len {
            let frame = tokio::time::timeout(EXCHANGE_TIMEOUT, self.body.frame()).await.expect("a frame in time");
            if let Ok(data) = frame.expect("a frame").expect("no error").into_data() {
                got.extend_from_slice(&data);
            }
        }
        self.connection.abort();
        Bytes::from(got)
    }
}

/// `POST /complete` to `addr` on a new connection, with `key` and maybe `Last-Event-ID`:
/// returns once the head is there.
pub async fn post(proto: Proto, addr: SocketAddr, key: &str, last_event_id: Option<&str>) -> Open {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("TCP_NODELAY");
    let io = TokioIo::new(tcp);
    let mut request = match proto {
        Proto::Http1 => Request::post("/complete").header(header::HOST, addr.to_string()),
        Proto::Http2 => Request::post(format!("http://{addr}/complete")),
    }
    .header("idempotency-key", key)
    .header(header::CONTENT_TYPE, "application/json");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let request = request.body(Full::new(Bytes::from_static(b"{\"prompt\":\"a long answer\"}"))).unwrap();
    let exchange = async {
        match proto {
            Proto::Http1 => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.expect("handshake");
                let connection = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (sender.send_request(request).await.expect("the server answers"), connection)
            }
            Proto::Http2 => {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("handshake");
                let connection = tokio::spawn(async move {
                    let _ = connection.await;
                });
                (sender.send_request(request).await.expect("the server answers"), connection)
            }
        }
    };
    let (response, connection) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.expect("a head in time");
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    Open { status: response.status(), replayed, body: response.into_body(), connection }
}

/// The `k`s a stream of `n` events is cut after: every 50th event, the first and the last.
pub fn cuts(n: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = (0..n).step_by(50).collect();
    ks.push(n - 1);
    ks
}

/// Runs one stream of `shape` through two replicas (`stores[0]` runs it, both take
/// reconnects) and checks every reconnect: joining in flight and replaying after the end, for
/// every `k` of [`cuts`], over HTTP/1.1 and HTTP/2 on both replicas. One handler run.
pub async fn resume_exactly<St: LiveLog + Clone>(stores: [St; 2], shape: Shape) {
    let started = std::time::Instant::now();
    let stream = Arc::new(Stream::new(shape));
    let gate = Gate::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler: Handler = Arc::new({
        let (stream, gate, runs) = (stream.clone(), gate.clone(), runs.clone());
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            let body = body(stream.clone(), &gate);
            Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(body).unwrap()
        }
    });
    let [a, b] = stores;
    let replicas = [serve(join_layer(a), handler.clone()).await, serve(join_layer(b), handler).await];
    let key = format!("resume-{}", uuid::Uuid::new_v4());
    let ks = cuts(shape.events);
    let what = |k: usize, how: &str| format!("{shape:?}, {how} with Last-Event-ID {k}");

    // The first client gets event 0 and is cut.
    gate.release(stream.chunks_through(0));
    let first = post(Proto::Http1, replicas[0], &key, None).await;
    assert_eq!(first.status, StatusCode::OK);
    let seen = first.cut_after(stream.ends[0]).await;
    assert!(seen.starts_with(event(0, shape.newline).as_bytes()), "{shape:?}: {seen:?}");

    // A reconnect after each `k`, once event `k` is produced (its publish may still be on its
    // way), left to follow the stream in flight.
    let mut joined = Vec::new();
    for (j, &k) in ks.iter().enumerate() {
        gate.release(stream.chunks_through(k));
        let proto = if j / 2 % 2 == 0 { Proto::Http1 } else { Proto::Http2 };
        let open = post(proto, replicas[j % 2], &key, Some(&k.to_string())).await;
        assert_eq!((open.status, open.replayed), (StatusCode::OK, true), "{}", what(k, "joined"));
        joined.push((k, tokio::spawn(open.read())));
    }
    gate.open();
    let joined_at = started.elapsed();
    for (k, body) in joined {
        let body = body.await.unwrap();
        assert!(
            body == stream.after(k),
            "{}: got {} bytes, {}",
            what(k, "joined"),
            body.len(),
            diff(&body, &stream.after(k))
        );
    }

    // After the end: replays.
    for (j, &k) in ks.iter().enumerate() {
        let proto = if j / 2 % 2 == 0 { Proto::Http2 } else { Proto::Http1 };
        let open = post(proto, replicas[(j + 1) % 2], &key, Some(&k.to_string())).await;
        assert_eq!((open.status, open.replayed), (StatusCode::OK, true), "{}", what(k, "replayed"));
        let body = open.read().await;
        assert!(body == stream.after(k), "{}: {}", what(k, "replayed"), diff(&body, &stream.after(k)));
    }
    let whole = post(Proto::Http1, replicas[1], &key, Some("no such event")).await.read().await;
    assert!(whole == stream.body, "{shape:?}: an unknown id gets the whole stream");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "{shape:?}: the handler runs once");
    println!("{shape:?}: {} reconnects joined in {joined_at:?}, all checked in {:?}", ks.len(), started.elapsed());
}

/// Where two bodies first differ, for a failure message.
fn diff(got: &[u8], expected: &[u8]) -> String {
    let at = got.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(got.len().min(expected.len()));
    let around =
        |bytes: &[u8]| String::from_utf8_lossy(&bytes[at.saturating_sub(20)..(at + 40).min(bytes.len())]).into_owned();
    format!(
        "{} vs {} bytes expected, first difference at {at}: {:?} vs {:?}",
        got.len(),
        expected.len(),
        around(got),
        around(expected)
    )
}

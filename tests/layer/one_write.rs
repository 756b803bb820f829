//! A response complete when the handler returns goes out in one write, its record written
//! before it, over a real hyper 1 server on loopback with Nagle's algorithm on (no
//! `TCP_NODELAY`, as plain `axum::serve` leaves it).
//!
//! Why it matters: the record is written before the client can see the response end. Were the
//! end a write of its own, made once the record is written, Nagle's algorithm would hold that
//! second small write until the client's delayed ACK (about 40 ms on Linux) whenever the store
//! takes a round trip. The store here ([`Outage`] over `MemoryStore`, each `complete` taking a
//! few milliseconds) stands for that round trip. The server's socket is wrapped so that every
//! write call the server makes is counted.

use crate::common::outage::Outage;

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tower::{Layer, Service};
use tower_idempotency::{IdempotencyLayer, RequestBody, store::MemoryStore};

type BoxBody = UnsyncBoxBody<Bytes, Infallible>;

/// The longest one exchange may take before the test fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket whose write calls (each `write`/`writev` that wrote something) are counted.
struct Counted {
    tcp: TcpStream,
    writes: Arc<AtomicUsize>,
}

impl Counted {
    fn count(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &polled {
            if *n > 0 {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
        }
        polled
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.count(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.count(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The body shapes a handler answers with.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A JSON answer in memory (`Full`, `Content-Length`).
    Json,
    /// A short stream whose chunks and end are ready at once (chunked encoding: its end is
    /// known only when the stream says `None`).
    ShortStream,
}

fn answer(shape: Shape) -> Response<BoxBody> {
    let body = match shape {
        Shape::Json => Full::new(Bytes::from_static(br#"{"id":"ord_1","status":"created"}"#)).boxed_unsync(),
        Shape::ShortStream => {
            let events = ["id: 1\ndata: a\n\n", "id: 2\ndata: b\n\n", "id: 3\ndata: c\n\n"];
            let frames = futures_util::stream::iter(
                events.map(|e| Ok(http_body::Frame::data(Bytes::from_static(e.as_bytes())))),
            );
            StreamBody::new(frames).boxed_unsync()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::CREATED;
    response
}

/// Serves `service` over HTTP/1.1 on a loopback port (Nagle on), each connection's write calls
/// counted into `writes`.
async fn serve<S, B>(service: S, writes: Arc<AtomicUsize>) -> std::net::SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            assert!(!tcp.nodelay().unwrap(), "Nagle's algorithm is on, as plain axum::serve leaves it");
            let io = TokioIo::new(Counted { tcp, writes: writes.clone() });
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    addr
}

/// One HTTP/1.1 client connection to `addr`.
async fn client(addr: std::net::SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(connection);
    sender
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("host", "localhost")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"sku":"A1"}"#)))
        .unwrap()
}

/// What one exchange showed: the server's write calls for it, whether the record existed when
/// the head reached the client, and the response.
struct Exchange {
    writes: usize,
    recorded_at_head: usize,
    status: StatusCode,
    replayed: bool,
    body: Bytes,
}

async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    writes: &AtomicUsize,
    completes: &AtomicUsize,
    key: &str,
) -> Exchange {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let before = writes.load(Ordering::SeqCst);
        let response = sender.send_request(post(key)).await.expect("response head");
        let recorded_at_head = completes.load(Ordering::SeqCst);
        let (head, body) = response.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Exchange {
            writes: writes.load(Ordering::SeqCst) - before,
            recorded_at_head,
            status: head.status,
            replayed: head.headers.contains_key("idempotent-replayed"),
            body,
        }
    })
    .await
    .expect("the exchange finished in time")
}

/// The layer over a store whose `complete` takes a few milliseconds, behind a hyper server
/// with Nagle on: the first request's response (head and body) is one write call, made once
/// its record is written; the retry replays it.
async fn one_write_with_the_record_before_it(shape: Shape) {
    let store = Outage::new(MemoryStore::new());
    // Stands for a remote store's round trip: the record's write does not finish in the poll
    // that starts it.
    store.slow_completes(Duration::from_millis(5));
    let handler =
        tower::service_fn(move |_: Request<RequestBody<Incoming>>| async move { Ok::<_, Infallible>(answer(shape)) });
    let service = IdempotencyLayer::from_store(store.clone()).layer(handler);
    let writes = Arc::new(AtomicUsize::new(0));
    let addr = serve(service, writes.clone()).await;
    let mut sender = client(addr).await;
    for round in 0..3 {
        let key = format!("{shape:?}-{round}");
        let first = exchange(&mut sender, &writes, &store.completes, &key).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed);
        assert_eq!(
            first.recorded_at_head,
            round + 1,
            "{shape:?}: the record is written before the head reaches the client"
        );
        assert_eq!(first.writes, 1, "{shape:?}: head and body go out in one write, not the end in a second one");
        let retry = exchange(&mut sender, &writes, &store.completes, &key).await;
        assert!(retry.replayed, "{shape:?}: the retry replays");
        assert_eq!(retry.body, first.body);
    }
}

#[tokio::test]
async fn a_json_answer_goes_out_in_one_write_after_its_record() {
    one_write_with_the_record_before_it(Shape::Json).await;
}

#[tokio::test]
async fn a_short_stream_ready_at_once_goes_out_in_one_write_after_its_record() {
    one_write_with_the_record_before_it(Shape::ShortStream).await;
}

/// The harness itself: the same server without the layer answers in one write, for both
/// shapes (so a count of two above would be the layer's doing, not hyper's).
#[tokio::test]
async fn without_the_layer_hyper_answers_in_one_write() {
    for shape in [Shape::Json, Shape::ShortStream] {
        let handler = tower::service_fn(move |_: Request<Incoming>| async move { Ok::<_, Infallible>(answer(shape)) });
        let writes = Arc::new(AtomicUsize::new(0));
        let addr = serve(handler, writes.clone()).await;
        let mut sender = client(addr).await;
        let none = AtomicUsize::new(0);
        for round in 0..3 {
            let bare = exchange(&mut sender, &writes, &none, &format!("bare-{round}")).await;
            assert_eq!(bare.status, StatusCode::CREATED);
            assert_eq!(bare.writes, 1, "{shape:?}: hyper writes head and body at once");
        }
    }
}

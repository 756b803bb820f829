//! Guide, step 9 on the example server (`POST /stream`), over real HTTP on loopback,
//! HTTP/1.1 and HTTP/2 (prior knowledge): a duplicate of a stream still in flight joins it and
//! gets every event exactly once, in order; `Last-Event-ID` resumes after the event it names;
//! after the end, a duplicate is an ordinary replay (which `Last-Event-ID` resumes too). The
//! handler runs once per key, as `GET /stats` shows.
//!
//! The example server's app (its router, the default in-memory layer) is served by hyper-util's
//! connection builder, which speaks both protocols (`axum::serve` here is HTTP/1.1 only), and
//! driven by hyper-util's client as a black box.

use crate::support::server::{self, Stats};

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::task::JoinHandle;
use tower_idempotency::IdempotencyLayer;

/// The longest one exchange (request and whole response) may take before the test fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Proto {
    Http1,
    Http2,
}

/// The example server's app on `127.0.0.1:<free port>`, speaking only `proto`, until dropped.
struct StreamServer {
    proto: Proto,
    addr: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl StreamServer {
    async fn start(proto: Proto) -> Self {
        let stats = Arc::new(Stats::default());
        let app = server::app(IdempotencyLayer::new(), stats.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // As the example server does: a response's last frame must not wait for an ACK.
                tcp.set_nodelay(true).expect("TCP_NODELAY");
                let service = TowerToHyperService::new(app.clone());
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
        StreamServer { proto, addr, stats, task }
    }

    /// A new client with a pool of its own: dropping it (and its responses) closes its
    /// connection.
    fn client(&self) -> Client<HttpConnector, Full<Bytes>> {
        let mut builder = Client::builder(TokioExecutor::new());
        if let Proto::Http2 = self.proto {
            builder.http2_only(true);
        }
        builder.build_http()
    }

    /// `POST /stream?QUERY` with `Idempotency-Key: key`, a JSON prompt, and `Last-Event-ID`
    /// when given.
    fn stream(&self, query: &str, key: &str, last_event_id: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::post(format!("http://{}/stream?{query}", self.addr))
            .header("idempotency-key", key)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.body(Full::new(Bytes::from_static(br#"{"prompt":"a haiku about retries"}"#))).unwrap()
    }

    /// Sends `request` on `client`; the head, the body still streaming.
    async fn send(
        client: &Client<HttpConnector, Full<Bytes>>,
        request: Request<Full<Bytes>>,
    ) -> http::Response<Incoming> {
        tokio::time::timeout(EXCHANGE_TIMEOUT, client.request(request))
            .await
            .expect("the head arrives within 10 s")
            .expect("the server answers")
    }

    /// `GET /stats`' `stream`: the executions of `POST /stream`, as the server reports them.
    async fn stream_executions(&self) -> u64 {
        let request = Request::get(format!("http://{}/stats", self.addr)).body(Full::new(Bytes::new())).unwrap();
        let response = Self::send(&self.client(), request).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.expect("stats body").to_bytes();
        let stats: serde_json::Value = serde_json::from_slice(&body).expect("stats are JSON");
        let reported = stats["stream"].as_u64().unwrap_or_else(|| panic!("no `stream` in {stats}"));
        assert_eq!(reported, self.stats.executions("stream"), "/stats and the counter agree");
        reported
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The example server's event `I`: `id: I\ndata: I\n\n`.
fn event(i: usize) -> String {
    format!("id: {i}\ndata: {i}\n\n")
}

/// Events `from..to`, concatenated.
fn events(from: usize, to: usize) -> String {
    (from..to).map(event).collect()
}

/// Reads frames of `body` until `n` events have arrived in all (into `seen`).
async fn read_events(body: &mut Incoming, seen: &mut String, n: usize) {
    let read = async {
        while seen.matches("\n\n").count() < n {
            let frame = body.frame().await.expect("the stream goes on").expect("no body error");
            if let Ok(data) = frame.into_data() {
                seen.push_str(std::str::from_utf8(&data).expect("events are UTF-8"));
            }
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, read).await.expect("the events arrive within 10 s");
}

/// A body read to its end, and when its first and last bytes arrived.
struct Timed {
    text: String,
    first_byte: Option<Instant>,
    end: Instant,
}

async fn read_to_end(body: Incoming) -> Timed {
    let read = async {
        let mut body = body;
        let (mut text, mut first_byte) = (String::new(), None);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("no body error").into_data() {
                if !data.is_empty() {
                    first_byte.get_or_insert_with(Instant::now);
                }
                text.push_str(std::str::from_utf8(&data).expect("events are UTF-8"));
            }
        }
        Timed { text, first_byte, end: Instant::now() }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, read).await.expect("the body ends within 10 s")
}

/// A joined response: `200`, the event stream, `Idempotent-Replayed: true`, and no
/// `Content-Length` (still being produced; a replay after the end carries one).
#[track_caller]
fn assert_joined(status: StatusCode, headers: &HeaderMap, what: &str) {
    assert_eq!(status, StatusCode::OK, "{what}: {headers:?}");
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream", "{what}");
    assert_eq!(headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]), "{what}: {headers:?}");
    assert!(headers.get(header::CONTENT_LENGTH).is_none(), "{what}: a replay, not a join: {headers:?}");
}

/// A duplicate sent while the first is three events into a 12-event stream joins it: it gets
/// every event exactly once, in order, the later ones as they are produced; the first request
/// gets the whole stream too; one execution.
async fn a_duplicate_joins_mid_stream(proto: Proto) {
    let server = StreamServer::start(proto).await;
    let key = format!("join-{}", uuid::Uuid::new_v4());
    let query = "chunks=12&chunk_delay_ms=100";
    let (first_client, joiner_client) = (server.client(), server.client());

    let first = StreamServer::send(&first_client, server.stream(query, &key, None)).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none(), "the first is no replay: {:?}", first.headers());
    let mut first_body = first.into_body();
    let mut first_seen = String::new();
    read_events(&mut first_body, &mut first_seen, 3).await;

    let joined = StreamServer::send(&joiner_client, server.stream(query, &key, None)).await;
    assert_joined(joined.status(), joined.headers(), "the duplicate");
    let (joined, ()) = tokio::join!(read_to_end(joined.into_body()), async {
        while let Some(frame) = first_body.frame().await {
            if let Ok(data) = frame.expect("no body error").into_data() {
                first_seen.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    });
    assert_eq!(joined.text, events(0, 12), "the joiner gets every event once, in order");
    assert_eq!(first_seen, events(0, 12), "the first gets the whole stream");
    // Joined live, not handed a finished stream: about 8 events (800 ms) were still to come.
    let live = joined.end - joined.first_byte.expect("some bytes");
    assert!(live >= Duration::from_millis(300), "the joined body took only {live:?} from its first byte to its end");
    assert_eq!(server.stream_executions().await, 1, "the handler ran once");
}

/// The client reads events 0–3 and its connection is cut; the retries (same key, new
/// connections) join the generation still running: `Last-Event-ID: 3` gets events 4.. once,
/// `Last-Event-ID: 1` gets 2.., an id the stream never had gets it whole. One execution.
async fn a_cut_stream_resumes_after_last_event_id(proto: Proto) {
    let server = StreamServer::start(proto).await;
    let key = format!("resume-{}", uuid::Uuid::new_v4());
    let query = "chunks=12&chunk_delay_ms=100";
    {
        let client = server.client();
        let response = StreamServer::send(&client, server.stream(query, &key, None)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut seen = String::new();
        read_events(&mut body, &mut seen, 4).await;
        assert_eq!(seen, events(0, 4));
        // Dropping the body and the client cuts the connection mid-stream.
    }
    sleep_ms(150).await;

    let (a, b, c) = (server.client(), server.client(), server.client());
    let (resumed, earlier, unknown) = tokio::join!(
        StreamServer::send(&a, server.stream(query, &key, Some("3"))),
        StreamServer::send(&b, server.stream(query, &key, Some("1"))),
        StreamServer::send(&c, server.stream(query, &key, Some("no-such-event"))),
    );
    for (response, what) in [(&resumed, "Last-Event-ID: 3"), (&earlier, "Last-Event-ID: 1"), (&unknown, "unknown id")] {
        assert_joined(response.status(), response.headers(), what);
    }
    let (resumed, earlier, unknown) = tokio::join!(
        read_to_end(resumed.into_body()),
        read_to_end(earlier.into_body()),
        read_to_end(unknown.into_body()),
    );
    assert_eq!(resumed.text, events(4, 12), "after event 3: every later event once, in order");
    assert_eq!(earlier.text, events(2, 12), "after event 1");
    assert_eq!(unknown.text, events(0, 12), "an unknown id gets the whole stream");
    assert_eq!(server.stream_executions().await, 1, "one generation for all of them");
}

/// Once the first has ended, a duplicate is an ordinary replay (with its `Content-Length`),
/// which `Last-Event-ID` resumes too: after a middle event, after the last one (nothing), or
/// the whole stream for an unknown id. One execution.
async fn after_the_end_a_duplicate_is_a_replay(proto: Proto) {
    let server = StreamServer::start(proto).await;
    let key = format!("replay-{}", uuid::Uuid::new_v4());
    let query = "chunks=6&chunk_delay_ms=20";
    let client = server.client();
    let first = StreamServer::send(&client, server.stream(query, &key, None)).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(read_to_end(first.into_body()).await.text, events(0, 6));

    for (last, expected) in
        [(None, events(0, 6)), (Some("2"), events(3, 6)), (Some("5"), String::new()), (Some("x"), events(0, 6))]
    {
        let what = format!("Last-Event-ID {last:?}");
        let replay = StreamServer::send(&client, server.stream(query, &key, last)).await;
        assert_eq!(replay.status(), StatusCode::OK, "{what}");
        assert_eq!(replay.headers()[header::CONTENT_TYPE], "text/event-stream", "{what}");
        assert_eq!(replay.headers()["idempotent-replayed"], "true", "{what}");
        let length =
            replay.headers().get(header::CONTENT_LENGTH).map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
        let text = read_to_end(replay.into_body()).await.text;
        assert_eq!(text, expected, "{what}");
        assert_eq!(length, Some(expected.len()), "{what}: a replay carries the length of what it sends");
    }
    assert_eq!(server.stream_executions().await, 1, "replays never run the handler");
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

macro_rules! over_both_protocols {
    ($($(#[$doc:meta])* $http1:ident, $http2:ident => $test:ident();)*) => {$(
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $http1() {
            $test(Proto::Http1).await;
        }

        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $http2() {
            $test(Proto::Http2).await;
        }
    )*};
}

over_both_protocols! {
    /// 2.9: a duplicate in flight joins the running stream, every event once, in order.
    a_duplicate_joins_mid_stream_http1, a_duplicate_joins_mid_stream_http2 => a_duplicate_joins_mid_stream();
    /// 2.9: a cut stream continues, joined, after the retry's `Last-Event-ID`.
    a_cut_stream_resumes_after_last_event_id_http1, a_cut_stream_resumes_after_last_event_id_http2
        => a_cut_stream_resumes_after_last_event_id();
    /// 2.8–2.9: after the end, a replay, resumed by `Last-Event-ID`.
    after_the_end_a_duplicate_is_a_replay_http1, after_the_end_a_duplicate_is_a_replay_http2
        => after_the_end_a_duplicate_is_a_replay();
}

//! A streamed completion that survives dropped connections: each retry joins the generation
//! still running, gets exactly the events after the last one it saw, and the generation is
//! billed once.
//!
//! Run with: `cargo run --example llm_stream`. It starts the example server's app in process on
//! a free loopback port; to talk to a server you started yourself (`cargo run --example
//! server`), give its address: `SERVER=http://127.0.0.1:3000 cargo run --example llm_stream`.
//!
//! The story, over real HTTP/1.1 connections:
//! 1. `POST /stream?chunks=600&chunk_delay_ms=4` with an `Idempotency-Key`: a "completion" of
//!    600 server-sent events (token-sized: `id: I` / `data: I`), one every 4 ms.
//! 2. After event 149 the network drops the connection (the socket is closed for real). The
//!    server keeps generating: the handler of a covered request runs to its end.
//! 3. The client reconnects and retries with the same key and `Last-Event-ID: 149`. The route
//!    is in join mode (`Duplicates::join()`), so the retry joins the generation in flight:
//!    `Idempotent-Replayed: true`, the events produced while the client was away at once, then
//!    each further one live.
//! 4. After event 411 the connection drops again.
//! 5. The client retries with `Last-Event-ID: 411` and reads to the end.
//! 6. Every event `0..=599` arrived exactly once, in order, over the three connections.
//! 7. Once it ended, the same key is an ordinary replay, which `Last-Event-ID` resumes too.
//! 8. `GET /stats`: one execution of `/stream` for the whole story, billed once.
//!
//! It checks every step and exits non-zero if one is off.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};
use tower_idempotency::IdempotencyLayer;

#[path = "server.rs"]
#[allow(dead_code, unreachable_pub, clippy::result_large_err)]
mod server;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The completion: 600 events, 4 ms apart (about 2.4 s).
const EVENTS: u64 = 600;
const PATH: &str = "/stream?chunks=600&chunk_delay_ms=4";
/// The last event each connection sees before the network drops it (the third reads to the
/// end).
const CUTS: [u64; 2] = [149, 411];
/// How long the client takes to notice and reconnect.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);
/// Events that arrive sooner than this after a retry's head are the backlog, sent at once.
const BACKLOG: Duration = Duration::from_millis(20);
const PROMPT: &str = r#"{"model":"haiku-1","prompt":"a long answer about retries","stream":true}"#;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let authority = server().await?;
    let key = uuid::Uuid::new_v4().to_string();
    let executions_before = stream_executions(&authority).await?;
    let started = Instant::now();
    let mut received: Vec<Event> = Vec::new();

    // Three connections: the first and two retries, each cut after its event in `CUTS` but the
    // last, which reads to the end.
    for (attempt, cut) in CUTS.iter().map(Some).chain([None]).enumerate() {
        let last_seen = received.last().map(|event| event.id.clone());
        match &last_seen {
            None => println!("1. POST {PATH} with Idempotency-Key: {key}"),
            Some(id) => println!(
                "{}. {} ms later the client reconnects: the same key, Last-Event-ID: {id}",
                attempt * 2 + 1,
                RECONNECT_AFTER.as_millis()
            ),
        }
        let mut connection = Connection::open(&authority).await?;
        let asked = Instant::now();
        let response = connection.post(PATH, &key, last_seen.as_deref()).await?;
        let joined = response.headers().get(header::CONTENT_LENGTH).is_none();
        println!(
            "   client: {}, Idempotent-Replayed: {}, {}",
            response.status(),
            header_text(&response, "idempotent-replayed"),
            match (attempt, joined) {
                (0, _) => "the generation starts",
                (_, true) => "no Content-Length: joined the generation in flight",
                (_, false) => "a finished replay",
            }
        );
        check(response.status() == StatusCode::OK, "the completion answers 200")?;
        check(is_replayed(&response) == (attempt > 0), "only the retries carry Idempotent-Replayed: true")?;
        check(joined, "each retry joins the generation still running (a replay after its end has a Content-Length)")?;
        let mut body = response.into_body();
        let mut events = Events::default();
        let (mut got, mut backlog) = (Vec::new(), 0);
        'reading: while let Some(frame) = body.frame().await.transpose()? {
            let Ok(chunk) = frame.into_data() else { continue };
            for event in events.push(&chunk) {
                // What the server produced while the client was away comes at once, right
                // after the head; the rest as it is produced.
                backlog += usize::from(asked.elapsed() < BACKLOG);
                let done = cut.is_some_and(|cut| event.id == cut.to_string());
                got.push(event);
                if done {
                    break 'reading;
                }
            }
        }
        let (first, last) = (&got[0].id, &got[got.len() - 1].id);
        print!("   client: events {first}..={last} ({} events", got.len());
        if attempt > 0 {
            print!(", {backlog} of them produced while the client was away, the rest live");
        }
        println!(")");
        received.extend(got);
        match cut {
            Some(cut) => {
                println!("{}. The network drops the connection after event {cut}", attempt * 2 + 2);
                drop(body);
                connection.cut();
                println!("   client: connection closed; the server keeps generating");
                tokio::time::sleep(RECONNECT_AFTER).await;
            }
            None => check(events.is_empty(), "the stream ends with a whole event")?,
        }
    }

    let ids: Vec<String> = received.iter().map(|event| event.id.clone()).collect();
    let expected: Vec<String> = (0..EVENTS).map(|i| i.to_string()).collect();
    let twice = ids.len() - ids.iter().collect::<std::collections::BTreeSet<_>>().len();
    let missing = expected.iter().filter(|id| !ids.contains(id)).count();
    println!(
        "6. Over three connections in {} ms: {} events received, {missing} missing, {twice} twice",
        started.elapsed().as_millis(),
        ids.len()
    );
    check(ids == expected, &format!("every event 0..{EVENTS} exactly once, in order: got {} events", ids.len()))?;
    check(received.iter().all(|event| event.data == event.id), "each event's data is its id")?;
    println!("   client: every event of the completion arrived exactly once, in order");

    let resume = (EVENTS - 3).to_string();
    println!("7. After the end, the same key once more, with Last-Event-ID: {resume}");
    let mut connection = Connection::open(&authority).await?;
    let response = connection.post(PATH, &key, Some(&resume)).await?;
    let (status, replayed, length) =
        (response.status(), is_replayed(&response), header_text(&response, header::CONTENT_LENGTH));
    let replay = Events::default().push(&response.into_body().collect().await?.to_bytes());
    let replay: Vec<String> = replay.iter().map(|event| event.id.clone()).collect();
    println!(
        "   client: {status}, Idempotent-Replayed: {replayed}, Content-Length: {length}: a replay of events {replay:?}"
    );
    check(status == StatusCode::OK && replayed, "the retry after the end is a replay")?;
    check(replay == expected[expected.len() - 2..], "the replay resumes after Last-Event-ID")?;

    println!("8. GET /stats");
    let executions = stream_executions(&authority).await? - executions_before;
    println!("   server: \"stream\": {executions} execution for this key");
    check(executions == 1, "one generation for the completion, its two retries and its replay")?;
    println!(
        "Done: one completion of {EVENTS} events, two dropped connections, three retries: generated and billed once."
    );
    Ok(())
}

/// `SERVER`'s host and port, or the example server's app started in process on a free loopback
/// port.
async fn server() -> Result<String, Error> {
    if let Ok(server) = std::env::var("SERVER") {
        let uri: Uri = server.parse()?;
        let host = uri.host().ok_or("SERVER has no host (give http://HOST:PORT)")?;
        return Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = server::app(IdempotencyLayer::new(), Default::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("(SERVER not set: the example server runs in process on http://{addr})\n");
    Ok(addr.to_string())
}

/// One HTTP/1.1 connection of its own, so that it can be cut.
struct Connection {
    authority: String,
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Connection {
    async fn open(authority: &str) -> Result<Self, Error> {
        let tcp = TcpStream::connect(authority).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { authority: authority.to_owned(), sender, task })
    }

    /// `POST path` with the key, the prompt, and `Last-Event-ID` when given.
    async fn post(&mut self, path: &str, key: &str, last_event_id: Option<&str>) -> Result<Response<Incoming>, Error> {
        let mut request = Request::post(path)
            .header(header::HOST, &self.authority)
            .header("idempotency-key", key)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        self.sender.ready().await?;
        let response = self.sender.send_request(request.body(Full::new(Bytes::from_static(PROMPT.as_bytes())))?);
        let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
        // The connection lives on in its task for as long as the response body is read.
        Ok(response)
    }

    /// Closes the socket at once, whatever is still in flight on it.
    fn cut(&self) {
        self.task.abort();
    }
}

/// A server-sent event.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    data: String,
}

/// Splits a `text/event-stream` body into events, fed chunk by chunk.
#[derive(Default)]
struct Events {
    pending: String,
}

impl Events {
    fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.pending.push_str(&String::from_utf8_lossy(chunk));
        let mut events = Vec::new();
        while let Some(end) = self.pending.find("\n\n") {
            let text: String = self.pending.drain(..end + 2).collect();
            let field = |name: &str| {
                text.lines().find_map(|line| line.strip_prefix(name)).map(|value| value.trim_start().to_owned())
            };
            events.push(Event { id: field("id:").unwrap_or_default(), data: field("data:").unwrap_or_default() });
        }
        events
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// `GET /stats`' `stream`: how often `POST /stream` ran.
async fn stream_executions(authority: &str) -> Result<u64, Error> {
    let Connection { authority, mut sender, task } = Connection::open(authority).await?;
    let request = Request::get("/stats").header(header::HOST, authority).body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let stats: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    task.abort();
    stats["stream"].as_u64().ok_or_else(|| format!("no `stream` in /stats: {stats}").into())
}

fn is_replayed(response: &Response<Incoming>) -> bool {
    response.headers().get("idempotent-replayed").is_some_and(|v| v == "true")
}

fn header_text(response: &Response<Incoming>, name: impl header::AsHeaderName) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("(none)").to_owned()
}

fn check(ok: bool, what: &str) -> Result<(), Error> {
    if ok { Ok(()) } else { Err(format!("llm_stream failed: {what}").into()) }
}

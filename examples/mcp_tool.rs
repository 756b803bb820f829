//! An MCP tool call over Streamable HTTP, cut mid-stream and retried with a new JSON-RPC `id`:
//! the tool runs once, and the retry gets the result under its own `id`.
//!
//! Run with: `cargo run --example mcp_tool --features json`. It starts an MCP-style server in
//! process on a free loopback port: `POST /mcp` takes JSON-RPC 2.0 messages; `tools/call`
//! answers a `text/event-stream` of JSON-RPC messages (progress notifications, then the
//! call's response), as MCP's Streamable HTTP transport does. The layer reads the key where
//! MCP carries it, `params._meta.idempotencyKey` (`KeySource::json_rpc()`), and joins a retry
//! to the call still running (`Duplicates::join()`).
//!
//! The story, over real HTTP/1.1 connections:
//! 1. The agent calls the tool `send_invoice` (JSON-RPC `id` 1) with an idempotency key.
//! 2. After two progress notifications the connection drops. The tool keeps running.
//! 3. The agent's client retries the call with a new JSON-RPC `id` (2), the same key: it joins
//!    the call in flight and gets every message, the progress notifications under its own
//!    progress token and the response with `id` 2, not 1.
//! 4. Once it ended, another retry (`id` 3) is a replay, answered with `id` 3.
//! 5. The tool ran once: one invoice.
//!
//! It checks every step and exits non-zero if one is off.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, task::JoinHandle};
use tower_idempotency::{Duplicates, IdempotencyLayer, KeySource};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Progress notifications before the tool's result, 100 ms apart.
const STEPS: u64 = 5;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let runs = Arc::new(AtomicU64::new(0));
    let addr = serve(runs.clone()).await?;
    let key = format!("invoice-{}", uuid::Uuid::new_v4());

    println!("1. tools/call send_invoice, JSON-RPC id 1, params._meta.idempotencyKey: {key}");
    let mut first = Connection::open(addr).await?;
    let response = first.send(tool_call(json!(1), &key)).await?;
    println!("   client: {}, content-type: {}", response.status(), text(response.headers(), header::CONTENT_TYPE));
    check(response.status() == StatusCode::OK, "the call answers 200")?;
    let mut body = response.into_body();
    let mut stream = Messages::default();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let Some(chunk) = body.frame().await.transpose()?.and_then(|frame| frame.into_data().ok()) else {
            return Err("the stream ended before the cut".into());
        };
        for message in stream.push(&chunk) {
            println!("   message: {message}");
            seen.push(message);
        }
    }

    println!("2. The connection drops after {} progress notifications; the tool keeps running", seen.len());
    drop(body);
    first.cut();
    tokio::time::sleep(Duration::from_millis(150)).await;

    println!("3. The client retries: JSON-RPC id 2, the same key");
    let mut retry = Connection::open(addr).await?;
    let response = retry.send(tool_call(json!(2), &key)).await?;
    println!(
        "   client: {}, Idempotent-Replayed: {}",
        response.status(),
        text(response.headers(), "idempotent-replayed")
    );
    check(response.headers().get("idempotent-replayed").is_some(), "the retry joins the call in flight")?;
    let messages = Messages::read_all(response.into_body()).await?;
    for message in &messages {
        println!("   message: {message}");
    }
    let result = messages.last().ok_or("no message")?;
    check(messages.len() as u64 == STEPS + 1, "every progress notification, then the response")?;
    check(result["id"] == 2, "the response carries the retry's id, 2")?;
    let tokens = messages.iter().filter_map(|message| message["params"].get("progressToken"));
    check(tokens.clone().count() as u64 == STEPS, "every progress notification")?;
    check(tokens.into_iter().all(|token| token == "attempt-2"), "progress under the retry's progress token")?;
    let invoice = result["result"]["content"][0]["text"].clone();
    println!("   client: the response has id {} (the retry's own), result {invoice}", result["id"]);

    println!("4. After the end, another retry: JSON-RPC id 3");
    let mut again = Connection::open(addr).await?;
    let response = again.send(tool_call(json!(3), &key)).await?;
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let messages = Messages::read_all(response.into_body()).await?;
    let result = messages.last().ok_or("no message")?;
    println!(
        "   client: replayed: {replayed}, response id {}, result {}",
        result["id"], result["result"]["content"][0]["text"]
    );
    check(replayed && result["id"] == 3, "a replay, with id 3")?;
    check(result["result"]["content"][0]["text"] == invoice, "the same result")?;

    println!("5. The server");
    let runs = runs.load(Ordering::SeqCst);
    println!("   server: the tool ran {runs} time(s): {invoice}");
    check(runs == 1, "the tool ran once")?;
    println!("The tool ran once; each retry got the result under its own JSON-RPC id.");
    Ok(())
}

/// A `tools/call` of `send_invoice` with `id`, keyed in `params._meta` (with a progress token
/// per attempt, as MCP clients send).
fn tool_call(id: Value, key: &str) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {
            "name": "send_invoice",
            "arguments": {"customer": "cus_42", "amount": 1200},
            "_meta": {"idempotencyKey": key, "progressToken": format!("attempt-{id}")}
        }
    })
}

/// The MCP-style server on a free loopback port.
async fn serve(runs: Arc<AtomicU64>) -> Result<SocketAddr, Error> {
    let layer = IdempotencyLayer::new().with_key_source(KeySource::json_rpc()).with_duplicates(Duplicates::join());
    let app = Router::new().route("/mcp", post(mcp).layer(layer)).with_state(runs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// `POST /mcp`: `tools/call` streams progress, then its result; a notification gets `202`.
async fn mcp(State(runs): State<Arc<AtomicU64>>, body: Bytes) -> axum::response::Response {
    let Ok(call) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST.into_response() };
    let Some(id) = call.get("id").cloned() else { return StatusCode::ACCEPTED.into_response() };
    if call["method"] != "tools/call" {
        let error = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found"}});
        return axum::Json(error).into_response();
    }
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let token = call["params"]["_meta"]["progressToken"].clone();
    let messages = futures_util::stream::unfold(0, move |step| {
        let (id, token) = (id.clone(), token.clone());
        async move {
            if step > STEPS {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let message = match step {
                STEPS => json!({"jsonrpc": "2.0", "id": id,
                    "result": {"content": [{"type": "text", "text": format!("invoice inv_{run} sent to cus_42")}]}}),
                _ => json!({"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": step + 1, "total": STEPS}}),
            };
            let event = Bytes::from(format!("id: {step}\nevent: message\ndata: {message}\n\n"));
            Some((Ok::<_, Infallible>(event), step + 1))
        }
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(messages)).into_response()
}

/// One HTTP/1.1 connection to the server.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
    addr: SocketAddr,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self, Error> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _closed = connection.await;
        });
        Ok(Self { sender, task, addr })
    }

    async fn send(&mut self, message: Value) -> Result<http::Response<Incoming>, Error> {
        let request = Request::post("/mcp")
            .header(header::HOST, self.addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .body(Full::new(Bytes::from(message.to_string())))?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Closes the socket, as a dropped network connection does.
    fn cut(self) {
        self.task.abort();
    }
}

/// JSON-RPC messages out of a `text/event-stream`, as its chunks arrive.
#[derive(Default)]
struct Messages {
    pending: String,
}

impl Messages {
    fn push(&mut self, chunk: &[u8]) -> Vec<Value> {
        self.pending.push_str(&String::from_utf8_lossy(chunk));
        let mut messages = Vec::new();
        while let Some(end) = self.pending.find("\n\n") {
            let event: String = self.pending.drain(..end + 2).collect();
            let data = event.lines().filter_map(|line| line.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
            if let Ok(message) = serde_json::from_str(&data) {
                messages.push(message);
            }
        }
        messages
    }

    async fn read_all(body: Incoming) -> Result<Vec<Value>, Error> {
        Ok(Self::default().push(&body.collect().await?.to_bytes()))
    }
}

fn text(headers: &http::HeaderMap, name: impl header::AsHeaderName) -> String {
    headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("-").to_owned()
}

fn check(ok: bool, what: &str) -> Result<(), Error> {
    if ok { Ok(()) } else { Err(format!("check failed: {what}").into()) }
}

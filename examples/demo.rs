//! The story in one command: a lost response, a retry, and a generation billed once.
//!
//! Run with: `cargo run --example demo`
//!
//! On loopback it serves an LLM-style `POST /v1/completions` that bills tokens, behind
//! `IdempotencyLayer`. The network cuts the connection after the first request's handler ran;
//! the client retries with the same `Idempotency-Key` and gets the recorded response instead
//! of a second generation. Then it shows a key reused for a different prompt (`422`) and a
//! duplicate sent while a second request is still generating (`409`).
//!
//! What it prints is the README's transcript, word for word (checked by `tests/http/readme.rs`,
//! which runs [`run`]).

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::{Layer, Service};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer};

/// Where the demo's lines go: stdout here, a list in the README's test.
pub type Say = Arc<dyn Fn(String) + Send + Sync>;

/// What the provider has charged, as the billing system sees it.
struct Billing {
    generations: AtomicU64,
    tokens: AtomicU64,
    /// How many generations have started (the client waits for the second one).
    started: watch::Sender<u64>,
    say: Say,
}

async fn complete(State(billing): State<Arc<Billing>>, Json(request): Json<Value>) -> (StatusCode, Json<Value>) {
    billing.started.send_modify(|n| *n += 1);
    let prompt = request["prompt"].as_str().unwrap_or_default().to_owned();
    let delay = request["generation_ms"].as_u64().unwrap_or(100);
    tokio::time::sleep(Duration::from_millis(delay)).await; // the model thinks
    let text = format!("Retries come and go / the key remembers the work / billed only once. ({prompt})");
    let tokens = 7 + text.split_whitespace().count() as u64;
    let n = billing.generations.fetch_add(1, Ordering::SeqCst) + 1;
    billing.tokens.fetch_add(tokens, Ordering::SeqCst);
    (billing.say)(format!("   server: generation #{n} ran and billed {tokens} tokens"));
    (StatusCode::OK, Json(json!({ "id": format!("cmpl_{n}"), "text": text, "usage": { "total_tokens": tokens } })))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    run(Arc::new(|line| println!("{line}"))).await
}

/// The whole demo, each line of its transcript handed to `say`.
pub async fn run(say: Say) -> Result<(), Error> {
    let billing = Arc::new(Billing {
        generations: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        started: watch::Sender::new(0),
        say: say.clone(),
    });
    let cut_next = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route("/v1/completions", post(complete))
        .with_state(billing.clone())
        .layer(IdempotencyLayer::new())
        // Outside the idempotency layer: a flaky network that can cut a response.
        .layer(CutConnectionLayer { cut_next: cut_next.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/completions", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    // One key per logical request, made before its first attempt and sent with every retry.
    let key = IdempotencyKey::random();
    let prompt = json!({ "model": "haiku-1", "prompt": "a haiku about retries", "generation_ms": 200 });
    say(format!("1. POST /v1/completions with Idempotency-Key: {}", short(&key)));
    cut_next.store(true, Ordering::SeqCst);
    if let Ok((status, ..)) = send(&client, &url, &key, &prompt).await {
        return Err(format!("expected a cut connection, got {status}").into());
    }
    say("   client: the connection was cut before the response arrived".into());

    say("2. The client retries with the same key".into());
    let (status, replayed, _) = retry_until_answered(&client, &url, &key, &prompt).await?;
    say(format!("   client: {status}, Idempotent-Replayed: {replayed}"));
    let (generations, tokens) = (billing.generations.load(Ordering::SeqCst), billing.tokens.load(Ordering::SeqCst));
    say(format!("   billing: {generations} generation, {tokens} tokens: the retry was a replay, billed once"));
    check(status == StatusCode::OK && replayed && generations == 1, "the retry must be a replay")?;

    say("3. The same key with a different prompt".into());
    let other = json!({ "model": "haiku-1", "prompt": "a haiku about caching" });
    let (status, _, body) = send(&client, &url, &key, &other).await?;
    say(format!("   client: {status} {}", serde_json::from_str::<Value>(&body)?["title"]));
    check(status == StatusCode::UNPROCESSABLE_ENTITY, "a reused key must answer 422")?;

    let second = IdempotencyKey::random();
    say(format!(
        "4. A second request, Idempotency-Key: {}, and a duplicate of it sent while it generates",
        short(&second)
    ));
    let slow = json!({ "model": "haiku-1", "prompt": "a slow haiku", "generation_ms": 1000 });
    let first = tokio::spawn({
        let (client, url, key, slow) = (client.clone(), url.clone(), second.clone(), slow.clone());
        async move { send(&client, &url, &key, &slow).await }
    });
    billing.started.subscribe().wait_for(|started| *started == 2).await?;
    let (status, _, body) = send(&client, &url, &second, &slow).await?;
    say(format!("   client: the duplicate got {status} {}", serde_json::from_str::<Value>(&body)?["title"]));
    check(status == StatusCode::CONFLICT, "a concurrent duplicate must answer 409")?;
    let (status, ..) = first.await??;
    say(format!("   client: the second request got {status}"));

    let generations = billing.generations.load(Ordering::SeqCst);
    say(format!("Done: 2 keys, {generations} generations billed, one per key."));
    check(generations == 2, "each key is billed once")?;
    server.abort();
    Ok(())
}

/// The first characters of a key: enough to tell two apart in the transcript.
fn short(key: &IdempotencyKey) -> String {
    format!("{}…", &key.as_str()[..4])
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;
/// Any failure of the demo.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

async fn send(
    client: &HttpClient,
    url: &str,
    key: &IdempotencyKey,
    body: &Value,
) -> Result<(StatusCode, bool, String), Error> {
    let request = Request::post(url)
        .header("idempotency-key", key.as_str())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let response = client.request(request).await?;
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, replayed, String::from_utf8_lossy(&body).into_owned()))
}

/// Retries transport errors and `409` with `Retry-After` (the first attempt may still be
/// recording); `tower_idempotency::client` has the production-grade policy.
async fn retry_until_answered(
    client: &HttpClient,
    url: &str,
    key: &IdempotencyKey,
    body: &Value,
) -> Result<(StatusCode, bool, String), Error> {
    for _ in 0..10 {
        match send(client, url, key, body).await {
            Ok((StatusCode::CONFLICT, ..)) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(answer) => return Ok(answer),
        }
    }
    Err("no answer after 10 attempts".into())
}

fn check(ok: bool, what: &str) -> Result<(), Error> {
    if ok { Ok(()) } else { Err(format!("demo failed: {what}").into()) }
}

/// Cuts the connection of the next response once `cut_next` is set: the response body fails
/// immediately, so hyper aborts the connection. The handler has already run by then.
#[derive(Clone)]
struct CutConnectionLayer {
    cut_next: Arc<AtomicBool>,
}

impl<S> Layer<S> for CutConnectionLayer {
    type Service = CutConnection<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CutConnection { inner, cut_next: self.cut_next.clone() }
    }
}

#[derive(Clone)]
struct CutConnection<S> {
    inner: S,
    cut_next: Arc<AtomicBool>,
}

impl<S, B> Service<Request<B>> for CutConnection<S>
where
    S: Service<Request<B>, Response = Response<axum::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let cut = self.cut_next.swap(false, Ordering::SeqCst);
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            if !cut {
                return Ok(response);
            }
            // Drop the real body unread (the layer finishes recording it on its own) and send
            // a body that fails: the client sees the connection cut.
            let (head, _lost) = response.into_parts();
            let broken = http_body_util::StreamBody::new(futures_util::stream::once(async {
                Err::<http_body::Frame<Bytes>, std::io::Error>(std::io::Error::other("connection cut"))
            }));
            Ok(Response::from_parts(head, axum::body::Body::new(broken)))
        })
    }
}

//! A client that retries `POST`s safely: one key per logical request, the same key on every
//! attempt, and replays instead of duplicates.
//!
//! Run with: `cargo run --example client`. It starts the example server's app in process on a
//! free loopback port; to talk to a server you started yourself (`cargo run --example server`),
//! give its address: `SERVER=http://127.0.0.1:3000 cargo run --example client`.
//!
//! It sends:
//! 1. `POST /orders` with a stamped random key, through the retry policy: `201`.
//! 2. `POST /payments` (the server requires a key there) with a key derived from the
//!    caller's own data, twice, as a client that crashed and started over would: the second
//!    answer is the replay of the first (`Idempotent-Replayed: true`), the payment is made once.
//! 3. A batch of three `PATCH`es, each keyed from the batch key and its index, sent twice.
//! 4. `POST /orders` that fails with `503` on every attempt (the server's `X-Fail-Status`):
//!    the policy retries with backoff and gives up after its attempts, returning the `503`.
//!
//! Then it prints the server's `GET /stats`, which counts each handler's executions.

use std::{error::Error, time::Duration};

use bytes::Bytes;
use http::{Request, Response, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{Service, ServiceBuilder, ServiceExt, retry::RetryLayer, util::BoxCloneService};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer,
    client::{ExponentialBackoff, KeyDeriver, RetryPolicy, SetIdempotencyKeyLayer},
};

#[path = "server.rs"]
#[allow(dead_code, unreachable_pub, clippy::result_large_err)]
mod server;

type HttpClient = BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, hyper_util::client::legacy::Error>;

/// `SERVER`, or the example server's app started in process on a free loopback port.
async fn server() -> std::io::Result<String> {
    if let Ok(server) = std::env::var("SERVER") {
        return Ok(server);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = server::app(IdempotencyLayer::new(), Default::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("(SERVER not set: the example server runs in process on http://{addr})\n");
    Ok(format!("http://{addr}"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let server = server().await?;
    let http: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

    // Stamp outside, retry inside: every attempt of a request carries the key stamped once.
    let policy = RetryPolicy::new()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(2)))
        .with_max_attempts(4)
        .with_max_elapsed(Duration::from_secs(10));
    let client: HttpClient = BoxCloneService::new(
        ServiceBuilder::new().layer(SetIdempotencyKeyLayer::new()).layer(RetryLayer::new(policy)).service(http.clone()),
    );

    println!("1. POST /orders, key stamped by the layer");
    let response = send(&client, post(&server, "/orders", r#"{"sku":"A1","qty":1}"#)).await?;
    let key = response.extensions().get::<IdempotencyKey>().map(|key| key.as_str().to_owned());
    print!("   ");
    show(response, key.as_deref()).await?;

    println!("\n2. POST /payments twice with a key derived from (customer, invoice)");
    let key = KeyDeriver::new("payments").part("customer-42").part("invoice-2024-0007").finish();
    for attempt in ["first run", "after a restart"] {
        print!("   {attempt}: ");
        let mut request = post(&server, "/payments", r#"{"invoice":"2024-0007","amount":1999}"#);
        request.headers_mut().insert("idempotency-key", key.as_str().parse()?);
        show(send(&client, request).await?, Some(key.as_str())).await?;
    }

    println!("\n3. a batch of PATCHes, item keys derived from the batch key, sent twice");
    let batch = IdempotencyKey::random();
    for round in 1..=2 {
        for (index, order) in ["ord_1", "ord_2", "ord_3"].into_iter().enumerate() {
            print!("   round {round}, {order}: ");
            let item_key = batch.for_item(index as u64);
            let mut request = Request::patch(format!("{server}/orders/{order}"))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(r#"{"status":"shipped"}"#)))?;
            request.headers_mut().insert("idempotency-key", item_key.as_str().parse()?);
            show(send(&client, request).await?, Some(item_key.as_str())).await?;
        }
    }

    println!("\n4. POST /orders failing with 503 on every attempt");
    let mut request = post(&server, "/orders", r#"{"sku":"B2"}"#);
    request.headers_mut().insert("x-fail-status", "503".parse()?);
    let started = std::time::Instant::now();
    let response = send(&client, request).await?;
    print!("   gave up after {:.1?}: ", started.elapsed());
    show(response, None).await?;

    println!("\nGET /stats (handler executions):");
    let stats = http.request(Request::get(format!("{server}/stats")).body(Full::default())?).await?;
    println!("   {}", String::from_utf8_lossy(&stats.into_body().collect().await?.to_bytes()));
    Ok(())
}

fn post(server: &str, path: &str, json: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("{server}{path}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(json.as_bytes())))
        .expect("a valid request")
}

async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, Box<dyn Error>> {
    let mut client = client.clone();
    Ok(client.ready().await?.call(request).await?)
}

async fn show(response: Response<Incoming>, key: Option<&str>) -> Result<(), Box<dyn Error>> {
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|value| value == "true");
    let body = response.into_body().collect().await?.to_bytes();
    let key = key.map(|key| format!(" key={}…", &key[..8])).unwrap_or_default();
    println!("{status}{key} replayed={replayed} {}", String::from_utf8_lossy(&body));
    Ok(())
}

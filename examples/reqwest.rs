//! The `reqwest` client: `IdempotencyMiddleware` stamps one key per call and retries with it.
//!
//! Run with: `cargo run --example reqwest --features reqwest`. It starts the example server's
//! app in process on a free loopback port, with a fault in front of it that loses the first
//! `POST /orders` response after the handler ran (`SERVER=http://HOST:PORT` talks to a server
//! of your own instead, without the fault).
//!
//! 1. `POST /orders` with a stamped random key: the first response is lost, the middleware
//!    retries with the same key and gets the replay; the order is created once.
//! 2. `POST /payments` with a key derived from the caller's data, from two "processes" (two
//!    clients): the second gets the replay.
//! 3. The same derived key for another payment: `422`, which is not retried.

use std::{
    error::Error,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{body::Body, extract::Request, middleware::Next, response::Response};
use http::StatusCode;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer,
    client::{ExponentialBackoff, KeyDeriver, RetryPolicy, reqwest::IdempotencyMiddleware},
};

#[path = "server.rs"]
#[allow(dead_code, unreachable_pub, clippy::result_large_err)]
mod server;

/// `SERVER`, or the example app in process behind a fault that loses the first `POST /orders`
/// response (the handler runs and the layer records it; the connection is then closed).
async fn server() -> std::io::Result<String> {
    if let Ok(server) = std::env::var("SERVER") {
        return Ok(server);
    }
    let lost = Arc::new(AtomicBool::new(false));
    let app = server::app(IdempotencyLayer::new(), Default::default()).layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let lose = request.uri().path() == "/orders" && !lost.swap(true, Ordering::SeqCst);
            async move {
                let response = next.run(request).await;
                if !lose {
                    return response;
                }
                // Read the body (the layer records it as it goes), then cut the connection.
                let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from_stream(futures_util::stream::once(async {
                        Err::<bytes::Bytes, _>(std::io::Error::other("the response was lost on the way back"))
                    })))
                    .unwrap()
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("(SERVER not set: the example server runs in process on http://{addr}, losing one response)\n");
    Ok(format!("http://{addr}"))
}

fn client() -> ClientWithMiddleware {
    let policy = RetryPolicy::new()
        .with_backoff(ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1)))
        .with_max_attempts(4);
    ClientBuilder::new(reqwest::Client::new()).with(IdempotencyMiddleware::new().with_policy(policy)).build()
}

async fn show(response: reqwest::Response) -> Result<StatusCode, Box<dyn Error>> {
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let key = response.extensions().get::<IdempotencyKey>().map(|key| format!(" key={}…", &key.as_str()[..8]));
    let body = response.text().await?;
    println!("{status}{} replayed={replayed} {body}", key.unwrap_or_default());
    Ok(status)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let server = server().await?;

    println!("1. POST /orders; the first response is lost");
    let response = client().post(format!("{server}/orders")).body(r#"{"sku":"A1"}"#).send().await?;
    print!("   ");
    show(response).await?;

    println!("\n2. POST /payments from two clients, one key derived from (customer, invoice)");
    let key = KeyDeriver::new("payments").part("customer-42").part("invoice-7").finish();
    for run in ["first process", "second process"] {
        let response = client()
            .post(format!("{server}/payments"))
            .body(r#"{"amount":1999}"#)
            .with_extension(key.clone())
            .send()
            .await?;
        print!("   {run}: ");
        show(response).await?;
    }

    println!("\n3. The same key for another amount");
    let response =
        client().post(format!("{server}/payments")).body(r#"{"amount":5}"#).with_extension(key).send().await?;
    print!("   ");
    let status = show(response).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let stats = reqwest::get(format!("{server}/stats")).await?.text().await?;
    println!("\nGET /stats (handler executions): {stats}");
    Ok(())
}

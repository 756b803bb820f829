//! The example server's `POST /orders`, with no idempotency layer: the baseline of the loopback
//! load benchmark (`scripts/load.sh`).
//!
//! Run with: `cargo run --release --example bare_server`
//!
//! Same handler, same catch-panic layer, same runtime and logging as `examples/server.rs`; only
//! the idempotency layer is missing. Environment: `ADDR` (default `127.0.0.1:3001`, port `0`
//! picks a free one), `TCP_NODELAY` (default on; `0`: plain `axum::serve`, Nagle on). Prints
//! `listening on http://HOST:PORT`.

#[path = "server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs, clippy::result_large_err)]
mod server;

use std::sync::Arc;

use axum::{Router, routing::post};
use server::{ORDERS, Stats, create};
use tower_http::catch_panic::CatchPanicLayer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    server::init_tracing();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let app = Router::new()
        .route("/orders", post(create::<ORDERS>))
        .with_state(Arc::new(Stats::default()))
        .layer(CatchPanicLayer::new());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    // `TCP_NODELAY=0`: plain `axum::serve`, Nagle's algorithm on (scripts/load.sh measures both).
    if std::env::var("TCP_NODELAY").is_ok_and(|v| v == "0") {
        return axum::serve(listener, app).await;
    }
    // No Nagle: chunks of a stream that come apart are small writes of their own, and Nagle's
    // algorithm holds each one behind the client's delayed ACK of the one before (about 40 ms),
    // with or without the layer. A response complete when the handler returns goes out in one
    // write either way.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

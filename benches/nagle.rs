//! Latency of first requests over loopback HTTP, on a server with Nagle's algorithm on (plain
//! `axum::serve`, as axum's docs show it) and on the same server with `TCP_NODELAY`, for each
//! store: the bare router (no layer), `MemoryStore`, `RedisStore`, `PostgresStore`.
//!
//! Run with: `cargo bench --bench nagle --features redis,postgres` (needs Redis at `REDIS_URL`,
//! default `redis://127.0.0.1:6379`, and PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). `REQUESTS` (default 1000) sets the number of
//! sequential requests per row, each with a key of its own (every one a first request), on one
//! keep-alive connection, after 20 of warm-up. An argument filters the rows by name
//! (`cargo bench --bench nagle --features redis,postgres -- redis`).
//!
//! Shapes: `json` (an axum `Json` answer: complete when the handler returns), `stream` (three
//! server-sent events from a stream that has them all at once, chunked), `paced` (three events
//! 2 ms apart: a real stream, which the layer cannot make one write; on a Nagle server its
//! later chunks wait for the client's ACKs without the layer too).
//!
//! Prints, per row, the median and the 99th percentile in milliseconds; the Nagle rows also
//! their difference to the `TCP_NODELAY` row of the same store and shape.

#![allow(missing_docs)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{Json, Router, body::Body, response::IntoResponse, routing::post};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::{
    IdempotencyLayer,
    store::{IdempotencyStore, MemoryStore, PostgresStore, RedisStore, sqlx},
};

const SHAPES: [&str; 3] = ["json", "stream", "paced"];

async fn json() -> impl IntoResponse {
    (StatusCode::CREATED, Json(serde_json::json!({"id": "ord_1", "status": "created", "amount": 4999})))
}

fn events(gap: Option<Duration>) -> Body {
    let events = futures_util::stream::unfold(0u32, move |i| async move {
        if i == 3 {
            return None;
        }
        if let (Some(gap), true) = (gap, i > 0) {
            tokio::time::sleep(gap).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(format!("id: {i}\ndata: token {i}\n\n"))), i + 1))
    });
    Body::from_stream(events)
}

async fn stream() -> impl IntoResponse {
    (StatusCode::CREATED, [(http::header::CONTENT_TYPE, "text/event-stream")], events(None))
}

async fn paced() -> impl IntoResponse {
    (StatusCode::CREATED, [(http::header::CONTENT_TYPE, "text/event-stream")], events(Some(Duration::from_millis(2))))
}

fn routes() -> Router {
    Router::new().route("/json", post(json)).route("/stream", post(stream)).route("/paced", post(paced))
}

/// Serves `app` on a loopback port: plain `axum::serve`, or with `TCP_NODELAY` on each
/// accepted socket.
async fn serve(app: Router, nodelay: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    if nodelay {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
    } else {
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    addr
}

/// `n` sequential first requests to `addr/shape` on one connection: each one's time from
/// sending to the last body byte.
async fn measure(addr: SocketAddr, shape: &str, run: &str, n: usize) -> Vec<Duration> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let request = Request::post(format!("/{shape}"))
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("idempotency-key", format!("{run}-{shape}-{i}"))
            .body(Full::new(Bytes::from_static(br#"{"sku":"A1","quantity":2}"#)))
            .unwrap();
        sender.ready().await.unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!response.headers().contains_key("idempotent-replayed"));
        response.into_body().collect().await.unwrap();
        if i >= 20 {
            times.push(started.elapsed());
        }
    }
    times
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

struct Rows {
    filter: Option<String>,
    n: usize,
    run: String,
}

impl Rows {
    async fn store<St: IdempotencyStore>(&self, name: &str, store: Option<St>) {
        let app = match store {
            Some(store) => routes().layer(IdempotencyLayer::from_store(store)),
            None => routes(),
        };
        for shape in SHAPES {
            let mut medians = [0.0; 2];
            for (j, nodelay) in [true, false].into_iter().enumerate() {
                let socket = if nodelay { "TCP_NODELAY" } else { "Nagle on" };
                let row = format!("{name:<8} {shape:<7} {socket:<12}");
                if self.filter.as_ref().is_some_and(|f| !row.contains(f.as_str())) {
                    continue;
                }
                let addr = serve(app.clone(), nodelay).await;
                let mut times = measure(addr, shape, &format!("{}-{name}-{j}", self.run), self.n).await;
                times.sort();
                let (median, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
                medians[j] = median;
                let versus = if nodelay { String::new() } else { format!("{:+8.2}", median - medians[0]) };
                println!("{row} {median:>9.2} {p99:>9.2} {versus:>14}");
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n = std::env::var("REQUESTS").map_or(1000, |v| v.parse().expect("REQUESTS is a number"));
    let rows = Rows { filter: args.first().cloned(), n, run: uuid::Uuid::new_v4().simple().to_string() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        println!("{n} sequential first requests per row, one keep-alive connection, loopback; times in ms");
        println!(
            "{:<8} {:<7} {:<12} {:>9} {:>9} {:>14}",
            "store", "shape", "server", "median", "p99", "median - nodelay"
        );
        rows.store::<MemoryStore>("bare", None).await;
        rows.store("memory", Some(MemoryStore::new())).await;

        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!("idem-nagle:{}:", rows.run);
        let redis = RedisStore::builder().with_prefix(prefix).connect(url.as_str()).await.expect("Redis answers");
        rows.store("redis", Some(redis)).await;

        let url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let pool =
            sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await.expect("PostgreSQL answers");
        let schema = format!("idem_nagle_{}", rows.run);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
        let postgres = PostgresStore::builder().with_schema(&schema).build(pool.clone());
        postgres.migrate().await.unwrap();
        rows.store("postgres", Some(postgres)).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await.unwrap();
    });
}

//! Exactly once with PostgreSQL: a charge endpoint whose insert into `charges` and the
//! idempotency record commit in one transaction, so a process killed between the work and its
//! record leaves nothing behind, and the client's retry charges once.
//!
//! Run with: `cargo run --example payments_pg --features postgres`
//! (needs only a local PostgreSQL: `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; it works in a schema of its own,
//! `payments_pg_example`, which it recreates on every run).
//!
//! The story, with real processes: this program starts itself again as a child process (the
//! payments server); the first charge makes the child insert its row and then abort before the
//! commit, as an OOM kill or a power cut would; the program checks the database, starts a new
//! child, retries with the same key, and shows one charge.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitCode, Stdio},
};

use axum::{Extension, Router, body::Bytes, http::HeaderMap, http::StatusCode, response::IntoResponse, routing::post};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tower_idempotency::{
    IdempotencyLayer, KeyPolicy, Secret,
    store::{PostgresStore, sqlx},
    transactional::PgTransaction,
};

/// Set in the child: it serves the payments API instead of telling the story.
const CHILD: &str = "PAYMENTS_PG_CHILD";
const SCHEMA: &str = "payments_pg_example";

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The database URL with the example's schema first on the `search_path`.
fn schema_url() -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{SCHEMA}")
}

/// `POST /charges`: inserts the charge in the layer's transaction. With
/// `X-Crash-Before-Commit: 1` the process aborts after the insert, before the commit.
async fn charge(Extension(tx): Extension<PgTransaction>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let amount = request["amount"].as_i64().unwrap_or(0);
    let mut tx = tx.lock().await.expect("the request's transaction is open while the handler runs");
    let id: i64 = match sqlx::query_scalar("INSERT INTO charges (amount) VALUES ($1) RETURNING id")
        .bind(amount)
        .fetch_one(&mut *tx)
        .await
    {
        Ok(id) => id,
        Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    };
    if headers.get("x-crash-before-commit").is_some_and(|v| v == "1") {
        eprintln!("  [server] charge ch_{id} inserted; crashing before the commit");
        std::process::abort();
    }
    (StatusCode::CREATED, axum::Json(json!({"id": format!("ch_{id}"), "amount": amount}))).into_response()
}

/// The child: the payments server on a free port, printing `listening on URL`.
async fn serve() {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&schema_url()).await.unwrap();
    let store = PostgresStore::new(pool);
    store.migrate().await.unwrap();
    // Every process sharing the table needs the same secret: `IDEMPOTENCY_SECRET`, or (this
    // demo only) a fixed one. Yours comes from a secret manager.
    let secret = std::env::var("IDEMPOTENCY_SECRET").unwrap_or_else(|_| "payments_pg demo: development secret".into());
    let layer = IdempotencyLayer::from_store(store)
        .with_secret(Secret::new(secret).expect("IDEMPOTENCY_SECRET has at least 16 bytes"))
        .with_key_policy(KeyPolicy::Required)
        .transactional();
    let app = Router::new().route("/charges", post(charge).layer(layer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

/// A payments server process.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the payments server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("the server printed its address").unwrap();
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        println!("  [client] payments server started (pid {})", child.id());
        Self { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST /charges` with `key`; `None` when the connection broke.
async fn post_charge(server: &Server, key: &str, crash: bool) -> Option<(u16, bool, Value)> {
    let mut request = http::Request::post(format!("{}/charges", server.url))
        .header("idempotency-key", key)
        .header("content-type", "application/json");
    if crash {
        request = request.header("x-crash-before-commit", "1");
    }
    let request = request.body(Full::new(Bytes::from_static(br#"{"amount":4200}"#))).unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(request).await.ok()?;
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, replayed, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {SCHEMA}.{table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await.unwrap()
}

/// The keys in the idempotency table, less the record that holds the layer's secret check.
async fn keys(pool: &sqlx::PgPool) -> i64 {
    let sql = format!("SELECT count(*) FROM {SCHEMA}.idempotency WHERE key <> $1");
    let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(tower_idempotency::secret::CHECK_KEY);
    query.fetch_one(pool).await.unwrap()
}

/// Checks `condition`, printing the step; a broken promise ends the program with status 1.
fn check(condition: bool, what: &str) -> Result<(), String> {
    if condition {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}"))
    }
}

async fn story() -> Result<(), String> {
    let url = database_url();
    let pool = sqlx::PgPool::connect(&url).await.map_err(|error| format!("PostgreSQL at {url}: {error}"))?;
    let reset = format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; \
         CREATE TABLE {SCHEMA}.charges (id bigserial PRIMARY KEY, amount bigint NOT NULL)"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(reset)).execute(&pool).await.map_err(|e| e.to_string())?;

    println!("1. The client charges 42.00 with Idempotency-Key: order-42; the server crashes mid-way.");
    let server = Server::start();
    let answer = post_charge(&server, "order-42", true).await;
    let mut child = server;
    let status = child.child.wait().unwrap();
    check(answer.is_none(), "the client got no answer (the connection broke)")?;
    check(!status.success(), &format!("the server process died ({status})"))?;
    check(count(&pool, "charges").await == 0, "no charge was kept: the insert was never committed")?;
    check(keys(&pool).await == 0, "no record and no lock: the key is free")?;
    drop(child);

    println!("2. The server restarts; the client retries with the same key.");
    let server = Server::start();
    let Some((status, replayed, body)) = post_charge(&server, "order-42", false).await else {
        return Err("the retry got no answer".to_owned());
    };
    check(status == 201 && !replayed, &format!("the retry executed: {status} {body}"))?;
    let Some((again, replayed, again_body)) = post_charge(&server, "order-42", false).await else {
        return Err("the second retry got no answer".to_owned());
    };
    check(again == 201 && replayed && again_body == body, &format!("a further retry replays: {again} {again_body}"))?;
    let charges = count(&pool, "charges").await;
    check(charges == 1, &format!("the customer was charged once ({charges} row in charges)"))?;
    println!("Exactly once: the work and its record committed together, or not at all.");
    Ok(())
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if std::env::var_os(CHILD).is_some() {
        runtime.block_on(serve());
        return ExitCode::SUCCESS;
    }
    match runtime.block_on(story()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

//! A small orders API: every behaviour of the layer, over real HTTP.
//!
//! Run with: `cargo run --example server`
//! (or `REDIS_URL=redis://127.0.0.1:6379 cargo run --example server --features redis` to share
//! keys between several processes, or
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example server --features postgres`
//! to keep them in PostgreSQL, with `POST /ledger` in transactional mode, or
//! `DYNAMODB_ENDPOINT=http://127.0.0.1:8000 cargo run --example server --features dynamodb`
//! to keep them in a DynamoDB table, `DYNAMODB_TABLE`, default `idempotency`, created if
//! missing).
//!
//! Environment: `ADDR` (default `127.0.0.1:3000`, port `0` picks a free one), `TCP_NODELAY`
//! (default on; `0` serves as plain `axum::serve`, Nagle on),
//! `IDEMPOTENCY_TTL_MS` (default: the library's 24 h), one of `REDIS_URL`, `DATABASE_URL` and
//! `DYNAMODB_ENDPOINT` (with `DYNAMODB_TABLE`; credentials from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`, placeholders when unset, the region from `AWS_REGION`, default
//! `us-east-1`), `IDEMPOTENCY_SECRET` (with a shared store: the deployment secret that keys
//! what the store keeps, at least 16 bytes, the same for every process; unset, a fixed
//! development secret, with a warning, so processes started alike still share keys),
//! `IDEMPOTENCY_ADMIN_TOKEN` (the bearer token of the admin routes below; unset, they are not
//! served). Prints `listening on http://HOST:PORT`. `POST /quotes` needs `--features json` (it
//! fingerprints its body as canonical JSON). With `--features metrics`, `GET /metrics` serves
//! the layer's metrics in the Prometheus text format.
//!
//! Admin routes, for an operator answering "did this charge go through, and what did we
//! answer?" (with `Authorization: Bearer $IDEMPOTENCY_ADMIN_TOKEN`; the customer's own
//! `Authorization` value, which the layer scopes keys by, in `X-Scope-Authorization`, or none
//! for the unscoped namespace):
//!
//! - `GET /admin/keys/{key}`: `{"state": "unknown"}`, `{"state": "in_flight", "since_ms",
//!   "lease_until_ms"}` or `{"state": "completed", "completed_at_ms", "status", "size",
//!   "expires_at_ms", "trace_id", "retained"}` (times in milliseconds since the Unix epoch;
//!   `trace_id`, of the request that executed, in hex, or `null`);
//! - `DELETE /admin/keys/{key}`: `204` when the record was purged (the next request with the
//!   key executes), `404` when the key held nothing, `409` while a request holds it in flight
//!   (purging then could run it twice at once).
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: k1' -d '{"sku":"A1"}'
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: k1' -d '{"sku":"A1"}'   # replay
//! curl -i -X POST localhost:3000/quotes -H 'Idempotency-Key: q1' -d '{"amount":10,"client_time":"12:00"}'
//! curl -i -X POST localhost:3000/quotes -H 'Idempotency-Key: q1' -d '{"client_time":"12:01", "amount":1e1}'   # replay
//! curl -s localhost:3000/stats
//! curl -s localhost:3000/admin/keys/k1 -H "Authorization: Bearer $IDEMPOTENCY_ADMIN_TOKEN"
//! ```
//!
//! `POST /rpc` (with `--features json`) is a JSON-RPC 2.0 endpoint, keyed as MCP keys tool
//! calls, in `params._meta.idempotencyKey`; a retry with a new `id` gets the recorded result
//! with its own `id`:
//!
//! ```text
//! curl -s localhost:3000/rpc -d '{"jsonrpc":"2.0","id":1,"method":"charge","params":{"_meta":{"idempotencyKey":"k2"}}}'
//! curl -s localhost:3000/rpc -d '{"jsonrpc":"2.0","id":2,"method":"charge","params":{"_meta":{"idempotencyKey":"k2"}}}'
//! ```

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

#[cfg(feature = "postgres")]
use tower_idempotency::{
    store::{PostgresStore, sqlx},
    transactional::PgTransaction,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    Duplicates, IdempotencyKey, IdempotencyLayer, KeyPolicy, Secret,
    store::{IdempotencyStore, Inspect, KeyState, LiveLog, Purged},
};

/// The routes whose executions `GET /stats` counts.
pub const ROUTES: [&str; 9] = ["orders", "payments", "jobs", "patch", "put", "stream", "large", "rpc", "quotes"];

/// Executions per route since start, and the id sequences.
#[derive(Debug, Default)]
pub struct Stats {
    executions: [AtomicU64; ROUTES.len()],
    next_id: AtomicU64,
    /// Executions of `POST /ledger` (with `DATABASE_URL`).
    #[cfg(feature = "postgres")]
    ledger: AtomicU64,
    /// The database `/stats` counts `ledger` rows in (with `DATABASE_URL`).
    #[cfg(feature = "postgres")]
    database: std::sync::OnceLock<sqlx::PgPool>,
}

impl Stats {
    fn count(&self, route: &str) {
        let i = ROUTES.iter().position(|r| *r == route).expect("known route");
        self.executions[i].fetch_add(1, Ordering::SeqCst);
    }

    /// Executions of `route` so far.
    pub fn executions(&self, route: &str) -> u64 {
        let i = ROUTES.iter().position(|r| *r == route).expect("known route");
        self.executions[i].load(Ordering::SeqCst)
    }

    fn to_json(&self) -> Value {
        let counts: BTreeMap<&str, u64> = ROUTES.iter().map(|r| (*r, self.executions(r))).collect();
        json!(counts)
    }

    /// `GET /stats`: the executions, and with `DATABASE_URL` the `ledger` executions and rows.
    async fn report(&self) -> Value {
        #[allow(unused_mut)]
        let mut report = self.to_json();
        #[cfg(feature = "postgres")]
        if let Some(pool) = self.database.get() {
            // -1: the count failed.
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger").fetch_one(pool).await.unwrap_or(-1);
            report["ledger"] = json!(self.ledger.load(Ordering::SeqCst));
            report["ledger_rows"] = json!(rows);
        }
        report
    }
}

/// The app over any store: `layer` carries the store and the shared settings (TTL); each
/// route gets it with its own key policy and in-flight behaviour. No admin routes.
pub fn app<St: LiveLog + Inspect>(layer: IdempotencyLayer<St>, stats: Arc<Stats>) -> Router {
    app_with_admin(layer, stats, None)
}

/// [`app`], with the admin routes when `admin` is set.
pub fn app_with_admin<St: LiveLog + Inspect>(
    layer: IdempotencyLayer<St>,
    stats: Arc<Stats>,
    admin: Option<AdminToken>,
) -> Router {
    finish(routes(layer, admin), stats)
}

/// The bearer token of the admin routes. Compared in constant time: the comparison takes as
/// long whatever the guess, so its timing tells an attacker nothing about the token.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8; 32]>);

impl AdminToken {
    /// The token `token` (its SHA-256 is kept: guesses of any length compare in equal time).
    pub fn new(token: &str) -> Self {
        Self(Arc::new(sha2::Sha256::digest(token.as_bytes()).into()))
    }

    /// `IDEMPOTENCY_ADMIN_TOKEN`, when set and not empty.
    fn from_env() -> Option<Self> {
        let token = std::env::var("IDEMPOTENCY_ADMIN_TOKEN").ok().filter(|token| !token.is_empty())?;
        Some(Self::new(&token))
    }

    /// Whether `headers` carry `Authorization: Bearer <the token>`. Every byte of the digests is
    /// compared, whatever the first difference.
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given: [u8; 32] = sha2::Sha256::digest(given).into();
        let difference = given.iter().zip(self.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// `GET` and `DELETE /admin/keys/{key}` over `layer`'s store, behind `token`.
fn admin<St: Inspect>(layer: IdempotencyLayer<St>, token: AdminToken) -> Router<Arc<Stats>> {
    let handler = move |method: Method, Path(key): Path<String>, headers: HeaderMap| {
        let (layer, token) = (layer.clone(), token.clone());
        async move { admin_key(&layer, &token, method, &key, &headers).await }
    };
    Router::new().route("/admin/keys/{key}", get(handler.clone()).delete(handler))
}

/// A problem answer of the admin routes.
fn admin_problem(status: StatusCode, detail: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail});
    (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

/// Milliseconds since the Unix epoch.
fn epoch_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

/// One admin request: authorized, the store key computed as the layer computes it for the
/// customer's requests, then the store inspected or purged.
async fn admin_key<St: Inspect>(
    layer: &IdempotencyLayer<St>,
    token: &AdminToken,
    method: Method,
    key: &str,
    headers: &HeaderMap,
) -> Response {
    if !token.allows(headers) {
        let mut response = admin_problem(StatusCode::UNAUTHORIZED, "a valid admin bearer token is required");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let Ok(key) = IdempotencyKey::parse(key.as_bytes()) else {
        return admin_problem(StatusCode::BAD_REQUEST, "not a valid idempotency key");
    };
    // The head of a customer's request, as far as the scope reads it: their `Authorization`.
    let mut customer = axum::http::Request::new(());
    if let Some(scope) = headers.get("x-scope-authorization") {
        customer.headers_mut().insert(header::AUTHORIZATION, scope.clone());
    }
    let store_key = match layer.store_key(&customer.into_parts().0, &key) {
        Ok(store_key) => store_key,
        Err(error) => return admin_problem(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
    };
    let unavailable =
        |error: &dyn std::fmt::Display| admin_problem(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
    if method == Method::DELETE {
        return match layer.store().purge(&store_key).await {
            Ok(Purged::Removed) => StatusCode::NO_CONTENT.into_response(),
            Ok(Purged::Locked) => admin_problem(
                StatusCode::CONFLICT,
                "a request holds this key in flight: purging it could run the request twice at once",
            ),
            Ok(_) => admin_problem(StatusCode::NOT_FOUND, "the key holds nothing"),
            Err(error) => unavailable(&error),
        };
    }
    let state = match layer.store().inspect(&store_key).await {
        Ok(state) => state,
        Err(error) => return unavailable(&error),
    };
    let body = match state {
        KeyState::Locked(in_flight) => json!({
            "state": "in_flight",
            "since_ms": in_flight.since().map(epoch_ms),
            "lease_until_ms": epoch_ms(in_flight.lease_until()),
        }),
        KeyState::Completed(completed) => json!({
            "state": "completed",
            "completed_at_ms": completed.completed_at().map(epoch_ms),
            "status": completed.status().map(|status| status.as_u16()),
            "size": completed.size(),
            "expires_at_ms": epoch_ms(completed.expires_at()),
            "trace_id": completed.trace_id().map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            "retained": completed.is_retained(),
        }),
        _ => json!({"state": "unknown"}),
    };
    axum::Json(body).into_response()
}

/// The state, and a catch-panic layer outside every route.
fn finish(routes: Router<Arc<Stats>>, stats: Arc<Stats>) -> Router {
    // The recorder before the first request, so every series is counted from the start.
    #[cfg(feature = "metrics")]
    prometheus();
    #[cfg(feature = "metrics")]
    let routes = routes.route(
        "/metrics",
        get(|| async {
            let handle = prometheus();
            // The recorder installed without its HTTP listener: its upkeep (histogram windows)
            // is run here, on each scrape.
            handle.run_upkeep();
            handle.render()
        }),
    );
    routes
        .route("/stats", get(|State(stats): State<Arc<Stats>>| async move { axum::Json(stats.report().await) }))
        .with_state(stats)
        // Outside the idempotency layer: a panic releases the key, then becomes a 500 here.
        .layer(CatchPanicLayer::new())
}

/// With `--features metrics`: the process's Prometheus recorder, installed on first use, which
/// every layer's metrics go to and `GET /metrics` renders in the Prometheus text format.
#[cfg(feature = "metrics")]
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("no other metrics recorder")
    })
}

/// Every route but `/stats` and `/ledger`; the admin routes with a token.
fn routes<St: LiveLog + Inspect>(layer: IdempotencyLayer<St>, admin_token: Option<AdminToken>) -> Router<Arc<Stats>> {
    let admin_routes = match admin_token {
        Some(token) => admin(layer.clone(), token),
        None => Router::new(),
    };
    let required = layer.clone().with_key_policy(KeyPolicy::Required);
    let waiting = layer.clone().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(30) });
    // A duplicate of a stream in flight joins it: the events so far at once, then
    // each one as it is produced; `Last-Event-ID` resumes after the event it names.
    let joining = layer.clone().with_duplicates(Duplicates::join());
    #[cfg(feature = "json")]
    let rpc = layer.clone().with_key_source(tower_idempotency::KeySource::json_rpc());
    // `POST /quotes`: as `/orders`, but fingerprinted as canonical JSON (RFC 8785) without the
    // member `client_time`, so a retry whose members come in another order, whose numbers are
    // spelled otherwise, or whose `client_time` is newer is the same request. A body that is
    // not JSON gets `400` `request-body-not-json` from the layer.
    #[cfg(feature = "json")]
    let quotes = layer.clone().with_body_fingerprint(
        tower_idempotency::BodyFingerprint::canonical_json(["/client_time"]).expect("a JSON Pointer"),
    );
    let router = Router::new();
    #[cfg(feature = "json")]
    let router = router.route("/rpc", post(rpc_call).layer(rpc)).route("/quotes", post(create::<QUOTES>).layer(quotes));
    router
        .route("/orders", post(create::<ORDERS>).layer(layer.clone()))
        .route("/payments", post(create::<PAYMENTS>).layer(required))
        .route("/jobs", post(create::<JOBS>).layer(waiting))
        .route("/orders/{id}", patch(update_order::<false>).put(update_order::<true>).layer(layer.clone()))
        .route("/stream", post(stream).layer(joining))
        .route("/large", post(large).layer(layer))
        .merge(admin_routes)
}

/// The query parameters every handler understands.
#[derive(Debug, Deserialize, Default)]
pub struct Knobs {
    delay_ms: Option<u64>,
    chunks: Option<u64>,
    chunk_delay_ms: Option<u64>,
    bytes: Option<usize>,
}

/// What every handler does after counting itself: the `delay_ms`, `X-Fail-Status` and
/// `X-Panic` knobs.
async fn knobs(knobs: &Knobs, headers: &HeaderMap) -> Option<Response> {
    if let Some(ms) = knobs.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.get("x-panic").is_some_and(|v| v == "1") {
        panic!("X-Panic: 1 asked this handler to panic");
    }
    let status = headers.get("x-fail-status")?.to_str().ok()?.parse::<u16>().ok()?;
    let status = StatusCode::from_u16(status).ok()?;
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Failure"),
        "status": status.as_u16(),
        "detail": "X-Fail-Status asked for this failure",
    });
    Some((status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response())
}

/// The body as JSON, or the `400` problem for a body that is not JSON.
fn parse_json(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|_| {
        let problem =
            json!({"type": "about:blank", "title": "Bad Request", "status": 400, "detail": "body is not JSON"});
        Box::new(
            (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/problem+json")], problem.to_string())
                .into_response(),
        )
    })
}

/// Index of `orders` in [`ROUTES`].
pub const ORDERS: usize = 0;
const PAYMENTS: usize = 1;
const JOBS: usize = 2;
#[cfg_attr(not(feature = "json"), allow(dead_code))]
const QUOTES: usize = 8;

/// `POST /orders`, `/payments`, `/jobs`, `/quotes`: `ROUTE` indexes [`ROUTES`].
pub async fn create<const ROUTE: usize>(
    State(stats): State<Arc<Stats>>,
    Query(q): Query<Knobs>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = ROUTES[ROUTE];
    stats.count(route);
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    let order = match parse_json(&body) {
        Ok(order) => order,
        Err(response) => return *response,
    };
    let prefix = match ROUTE {
        ORDERS => "ord",
        PAYMENTS => "pay",
        JOBS => "job",
        _ => "quo",
    };
    let id = format!("{prefix}_{}", stats.next_id.fetch_add(1, Ordering::SeqCst) + 1);
    let location = format!("/{route}/{id}");
    (StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(json!({"id": id, "order": order}))).into_response()
}

/// `PATCH /orders/{id}` (covered) and `PUT /orders/{id}` (not covered); the method names both
/// the route in `/stats` and the field the body is echoed under.
async fn update_order<const PUT: bool>(
    State(stats): State<Arc<Stats>>,
    Path(id): Path<String>,
    Query(q): Query<Knobs>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let field = if PUT { "put" } else { "patch" };
    stats.count(field);
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    match parse_json(&body) {
        Ok(update) => axum::Json(json!({"id": id, field: update})).into_response(),
        Err(response) => *response,
    }
}

/// `POST /stream`: `chunks` events `id: I\ndata: I\n\n` (I from 0), `chunk_delay_ms` apart, as
/// `text/event-stream`; its layer joins duplicates in flight.
async fn stream(State(stats): State<Arc<Stats>>, Query(q): Query<Knobs>, headers: HeaderMap) -> Response {
    stats.count("stream");
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    let chunks = q.chunks.unwrap_or(5);
    let every = Duration::from_millis(q.chunk_delay_ms.unwrap_or(10));
    let events = futures_util::stream::unfold(0, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(format!("id: {i}\ndata: {i}\n\n"))), i + 1))
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(events)).into_response()
}

/// `POST /rpc` (feature `json`): JSON-RPC 2.0, method `charge` answers
/// `{"charge":"rpc_N"}`; a notification gets `202`; its layer reads the key from
/// `params._meta.idempotencyKey` and answers a retry with the retry's own `id`.
#[cfg(feature = "json")]
async fn rpc_call(
    State(stats): State<Arc<Stats>>,
    Query(q): Query<Knobs>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    stats.count("rpc");
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    let answer = |id: &Value, outcome: (&str, Value)| {
        axum::Json(json!({"jsonrpc": "2.0", "id": id, outcome.0: outcome.1})).into_response()
    };
    let Ok(call) = serde_json::from_slice::<Value>(&body) else {
        return answer(&Value::Null, ("error", json!({"code": -32700, "message": "Parse error"})));
    };
    let Some(id) = call.get("id") else { return StatusCode::ACCEPTED.into_response() };
    match call["method"].as_str() {
        Some("charge") => {
            let charge = format!("rpc_{}", stats.next_id.fetch_add(1, Ordering::SeqCst) + 1);
            answer(id, ("result", json!({"charge": charge})))
        }
        _ => answer(id, ("error", json!({"code": -32601, "message": "Method not found"}))),
    }
}

async fn large(State(stats): State<Arc<Stats>>, Query(q): Query<Knobs>, headers: HeaderMap) -> Response {
    stats.count("large");
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    let bytes = q.bytes.unwrap_or(0);
    ([(header::CONTENT_TYPE, "application/octet-stream")], vec![b'x'; bytes]).into_response()
}

/// `POST /ledger` (with `DATABASE_URL`, in transactional mode): one row into `ledger` in the
/// layer's transaction; `X-Abort-Before-Commit: 1` aborts the process after the insert, before
/// the layer commits.
#[cfg(feature = "postgres")]
async fn ledger(
    State(stats): State<Arc<Stats>>,
    axum::Extension(transaction): axum::Extension<PgTransaction>,
    Query(q): Query<Knobs>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    stats.ledger.fetch_add(1, Ordering::SeqCst);
    if let Some(response) = knobs(&q, &headers).await {
        return response;
    }
    let failed = |error: &dyn std::fmt::Display| {
        eprintln!("POST /ledger: {error}");
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    };
    let mut tx = match transaction.lock().await {
        Ok(tx) => tx,
        Err(error) => return failed(&error),
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    let inserted = sqlx::query_scalar::<_, i64>("INSERT INTO ledger (body) VALUES ($1) RETURNING id")
        .bind(body)
        .fetch_one(&mut *tx)
        .await;
    let id = match inserted {
        Ok(id) => id,
        Err(error) => return failed(&error),
    };
    if headers.get("x-abort-before-commit").is_some_and(|v| v == "1") {
        // No unwinding, no commit: what a crash (OOM kill, power loss) leaves behind.
        std::process::abort();
    }
    (StatusCode::CREATED, axum::Json(json!({"id": format!("led_{id}")}))).into_response()
}

/// The app over PostgreSQL: the store's table and `ledger` created if missing, every route on
/// the store, and `POST /ledger` in transactional mode.
#[cfg(feature = "postgres")]
async fn postgres_app(url: &str, stats: Arc<Stats>) -> Router {
    // Lazy: the server starts even while PostgreSQL is down, answers `503` until it is up, and
    // creates its tables once it can.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(url)
        .unwrap_or_else(|error| {
            eprintln!("DATABASE_URL is not a valid PostgreSQL URL ({url:?}): {error}");
            std::process::exit(2);
        });
    let store = PostgresStore::new(pool.clone());
    // A database that answers has the tables before the first request; one that does not gets
    // them from a task that tries until it answers.
    let mut attempt = 0;
    let created = loop {
        attempt += 1;
        match create_tables(&store).await {
            // The database answered with an error: processes starting together race to
            // create a table (`CREATE ... IF NOT EXISTS` is not atomic). Again.
            Err(sqlx::Error::Database(_)) if attempt < 3 => continue,
            created => break created,
        }
    };
    if let Err(error) = created {
        eprintln!("DATABASE_URL ({url:?}): cannot create the tables yet, answering 503 until then: {error}");
        let (creating, url) = (store.clone(), url.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match create_tables(&creating).await {
                    Ok(()) => break eprintln!("DATABASE_URL ({url:?}): tables created"),
                    Err(error) => eprintln!("DATABASE_URL ({url:?}): cannot create the tables yet: {error}"),
                }
            }
        });
    }
    let _ = stats.database.set(pool);
    let layer = configure(IdempotencyLayer::from_store(store));
    let transactional = layer.clone().transactional();
    finish(routes(layer, AdminToken::from_env()).route("/ledger", post(ledger).layer(transactional)), stats)
}

/// The example's `ledger` table, then the store's: once the store's exists (until then the
/// layer answers `503`), `/ledger` finds its table.
#[cfg(feature = "postgres")]
async fn create_tables(store: &PostgresStore) -> Result<(), sqlx::Error> {
    let ledger = "CREATE TABLE IF NOT EXISTS ledger (id bigserial PRIMARY KEY, body text NOT NULL, \
                  created_at timestamptz NOT NULL DEFAULT now())";
    sqlx::raw_sql(ledger).execute(store.pool()).await?;
    store.migrate().await
}

/// `IDEMPOTENCY_TTL_MS`, when set.
fn ttl_from_env() -> Option<Duration> {
    let ms = std::env::var("IDEMPOTENCY_TTL_MS").ok()?;
    match ms.parse() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            eprintln!("IDEMPOTENCY_TTL_MS must be a whole number of milliseconds, got {ms:?}");
            std::process::exit(2);
        }
    }
}

/// The secret every process sharing a store must have, unless `IDEMPOTENCY_SECRET` says
/// otherwise. Public, so anyone who reads a store keyed with it can test guesses: development
/// only.
const DEVELOPMENT_SECRET: &str = "tower-idempotency example server: development secret, never in production";

/// `IDEMPOTENCY_SECRET`, or the development secret with a warning.
fn secret_from_env() -> Secret {
    let secret = match std::env::var("IDEMPOTENCY_SECRET") {
        Ok(secret) => secret,
        Err(_) => {
            eprintln!(
                "warning: IDEMPOTENCY_SECRET is not set: using a fixed development secret, which anyone \
                 can read here; set IDEMPOTENCY_SECRET (at least 16 random bytes, the same for every \
                 process) in production"
            );
            DEVELOPMENT_SECRET.to_owned()
        }
    };
    Secret::new(secret).unwrap_or_else(|error| {
        eprintln!("IDEMPOTENCY_SECRET: {error}");
        std::process::exit(2);
    })
}

/// The settings from the environment: the TTL, and, over a store shared by processes, the
/// secret.
fn configure<St: IdempotencyStore>(mut layer: IdempotencyLayer<St>) -> IdempotencyLayer<St> {
    if layer.store().outlives_process() {
        layer = layer.with_secret(secret_from_env());
    }
    match ttl_from_env() {
        Some(ttl) => layer.with_ttl(ttl),
        None => layer,
    }
}

/// The app over DynamoDB at `endpoint`: the table `DYNAMODB_TABLE` (default `idempotency`)
/// created in the background, again and again until it can be (until then, and whenever the
/// endpoint is down, each request gets `503`).
#[cfg(feature = "dynamodb")]
fn dynamodb_app(endpoint: &str, stats: Arc<Stats>) -> Router {
    use tower_idempotency::store::{
        DynamoDbStore,
        aws_sdk_dynamodb::{
            self,
            config::{BehaviorVersion, Credentials, Region},
        },
    };
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let credentials = Credentials::new(
        var("AWS_ACCESS_KEY_ID", "local"),
        var("AWS_SECRET_ACCESS_KEY", "local"),
        std::env::var("AWS_SESSION_TOKEN").ok(),
        None,
        "environment",
    );
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(var("AWS_REGION", "us-east-1")))
        .endpoint_url(endpoint)
        .credentials_provider(credentials)
        // As `aws_config` sets it up: three attempts, with backoff.
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::standard())
        .build();
    let store = DynamoDbStore::builder()
        .with_table(var("DYNAMODB_TABLE", "idempotency"))
        .build(aws_sdk_dynamodb::Client::from_conf(config));
    let (creating, endpoint) = (store.clone(), endpoint.to_owned());
    tokio::spawn(async move {
        while let Err(error) = creating.create_table().await {
            eprintln!("DYNAMODB_ENDPOINT ({endpoint}): cannot create the table {:?} yet: {error}", creating.table());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    app_with_admin(configure(IdempotencyLayer::from_store(store)), stats, AdminToken::from_env())
}

/// The app over the store the environment asks for: the Redis store when built with
/// `--features redis` and `REDIS_URL` is set, the PostgreSQL store when built with
/// `--features postgres` and `DATABASE_URL` is set, the DynamoDB store when built with
/// `--features dynamodb` and `DYNAMODB_ENDPOINT` is set, the in-memory store otherwise.
pub async fn app_from_env(stats: Arc<Stats>) -> Router {
    let asked: Vec<_> = ["REDIS_URL", "DATABASE_URL", "DYNAMODB_ENDPOINT"]
        .into_iter()
        .filter(|name| std::env::var_os(name).is_some())
        .collect();
    if asked.len() > 1 {
        eprintln!(
            "{} are set: the server keeps its keys in one store, so unset all but one \
             (REDIS_URL for Redis, DATABASE_URL for PostgreSQL, DYNAMODB_ENDPOINT for DynamoDB)",
            asked.join(" and ")
        );
        std::process::exit(2);
    }
    #[cfg(feature = "dynamodb")]
    if let Ok(endpoint) = std::env::var("DYNAMODB_ENDPOINT") {
        return dynamodb_app(&endpoint, stats);
    }
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return postgres_app(&url, stats).await;
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        // Lazy: the server starts even while Redis is down, and answers `503` until it is up.
        let client = tower_idempotency::store::redis::Client::open(url.as_str()).unwrap_or_else(|error| {
            eprintln!("REDIS_URL is not a valid Redis URL ({url:?}): {error}");
            std::process::exit(2);
        });
        let store = tower_idempotency::store::RedisStore::builder().build(client);
        return app_with_admin(configure(IdempotencyLayer::from_store(store)), stats, AdminToken::from_env());
    }
    app_with_admin(configure(IdempotencyLayer::new()), stats, AdminToken::from_env())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`; `RUST_LOG=tower_idempotency=debug`
/// shows every request's outcome).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    init_tracing();
    // Installed before the first request, so every series is there from the start.
    #[cfg(feature = "metrics")]
    prometheus();
    serve_from_env().await
}

/// Serves the app the environment asks for on `ADDR` until the process ends.
pub async fn serve_from_env() -> std::io::Result<()> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let stats = Arc::new(Stats::default());
    let app = app_from_env(stats).await;
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

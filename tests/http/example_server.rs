//! Black-box tests of the guide's request path and of the example server's documented routes,
//! over real HTTP
//! on loopback, driven by a real client. Every expectation comes from the docs.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::{Resp, TestServer, key, sleep_ms};
use tokio::io::AsyncWriteExt;
use tower_idempotency::IdempotencyLayer;

/// A JSON body unique to this call, so a problem that echoed it would be caught.
fn order() -> Value {
    json!({"sku": "A1", "qty": 2, "note": format!("note-{}", uuid::Uuid::new_v4())})
}

/// The marker inside `order()` that must never be echoed by a problem.
fn note(order: &Value) -> String {
    order["note"].as_str().unwrap().to_owned()
}

/// Headers a replay regenerates or never stores (guide, step 8), and the replay marker.
const NOT_COMPARED: [&str; 5] = ["date", "content-length", "transfer-encoding", "connection", "idempotent-replayed"];

/// Asserts `replay` is a replay of `first`: same status, same end-to-end headers, same body,
/// `Idempotent-Replayed: true` on the replay only, a regenerated `Date` and a `Content-Length`
/// that matches the body.
#[track_caller]
fn assert_replay_of(first: &Resp, replay: &Resp) {
    assert!(!first.replayed(), "the first response is marked as a replay: {:?}", first.headers);
    assert!(replay.replayed(), "the retry is not marked as a replay: {:?}", replay.headers);
    assert_eq!(replay.status, first.status, "replayed status");
    assert_eq!(replay.body, first.body, "replayed body bytes");
    for name in first.headers.keys().filter(|n| !NOT_COMPARED.contains(&n.as_str())) {
        let want: Vec<_> = first.headers.get_all(name).iter().collect();
        let got: Vec<_> = replay.headers.get_all(name).iter().collect();
        assert_eq!(got, want, "replayed header {name}");
    }
    for name in replay.headers.keys().filter(|n| !NOT_COMPARED.contains(&n.as_str())) {
        assert!(first.headers.contains_key(name), "the replay adds header {name}: {:?}", replay.headers);
    }
    let date = replay.header("date").unwrap_or_else(|| panic!("replay without Date: {:?}", replay.headers));
    assert!(date.ends_with(" GMT"), "replay Date is not an HTTP-date: {date:?}");
    let length = replay
        .header("content-length")
        .unwrap_or_else(|| panic!("replay without Content-Length: {:?}", replay.headers))
        .parse::<usize>()
        .expect("Content-Length is a number");
    assert_eq!(length, replay.body.len(), "replay Content-Length vs body");
}

/// `{"id": ID, "order": BODY}` and `Location: /ROUTE/ID` with `201`: what `/orders`, `/payments`
/// and `/jobs` answer. Returns the id.
#[track_caller]
fn assert_created(response: &Resp, route: &str, prefix: &str, body: &Value) -> String {
    assert_eq!(response.status, StatusCode::CREATED, "status; body: {:?}", String::from_utf8_lossy(&response.body));
    let json = response.json();
    let id = json["id"].as_str().unwrap_or_else(|| panic!("no id: {json}")).to_owned();
    assert!(id.starts_with(&format!("{prefix}_")), "id {id} has not the prefix {prefix}_");
    assert_eq!(json, json!({"id": id, "order": body}));
    assert_eq!(response.header("location"), Some(format!("/{route}/{id}").as_str()), "Location");
    id
}

// ---------------------------------------------------------------------------------------------
// Run once, replay
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn post_orders_twice_with_one_key_runs_once_and_replays() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    let id = assert_created(&first, "orders", "ord", &body);
    assert_eq!(id, "ord_1");
    assert!(!first.replayed());

    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&retry, "orders", "ord", &body);
    assert_replay_of(&first, &retry);
    assert_eq!(retry.header("location"), Some("/orders/ord_1"));
    assert_eq!(server.executions("orders"), 1);

    // And again: every retry is a replay, the handler never runs a second time.
    let third = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &third);
    assert_eq!(server.executions("orders"), 1);
    assert_eq!(server.stats_json().await["orders"], 1);
}

#[tokio::test]
async fn quoted_and_bare_key_are_the_same_key() {
    let server = TestServer::start().await;

    // Quoted (IETF draft) first, bare (Stripe) second.
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&format!("\"{k}\"")).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("orders"), 1);

    // Bare first, quoted second.
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let retry = server.post("/orders").key(&format!("\"{k}\"")).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("orders"), 2);
}

#[tokio::test]
async fn patch_is_covered_and_replays() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = server.call(Method::PATCH, "/orders/1").key(&k).json(&body).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json(), json!({"id": "1", "patch": body}));
    let retry = server.call(Method::PATCH, "/orders/1").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("patch"), 1);
}

#[tokio::test]
async fn replay_has_same_headers_a_fresh_date_and_a_matching_content_length() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    assert_eq!(first.header("content-type"), Some("application/json"));
    let retry = server.post("/orders").key(&k).json(&body).send().await;
    // assert_replay_of checks every end-to-end header, Date and Content-Length.
    assert_replay_of(&first, &retry);
    assert_eq!(retry.header("content-type"), Some("application/json"));
    assert_eq!(retry.header("content-length"), Some(first.body.len().to_string().as_str()));
    assert_eq!(server.executions("orders"), 1);
}

// ---------------------------------------------------------------------------------------------
// Key reused with a different request: 422
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn same_key_different_body_is_422() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);

    let other = order();
    let reused = server.post("/orders").key(&k).json(&other).send().await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body), &note(&other)]);
    assert!(!reused.replayed());
    assert_eq!(server.executions("orders"), 1);

    // The record is untouched: the original request still replays.
    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test]
async fn same_key_different_path_is_422() {
    let server = TestServer::start().await;

    // Same route, different path.
    let (k, body) = (key(), order());
    let first = server.call(Method::PATCH, "/orders/1").key(&k).json(&body).send().await;
    assert_eq!(first.status, StatusCode::OK);
    let reused = server.call(Method::PATCH, "/orders/2").key(&k).json(&body).send().await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body)]);
    assert_eq!(server.executions("patch"), 1);

    // Another endpoint of the same service (the routes share the layer's store).
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let reused = server.post("/jobs").key(&k).json(&body).send().await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body)]);
    assert_eq!(server.executions("orders"), 1);
    assert_eq!(server.executions("jobs"), 0);
}

#[tokio::test]
async fn same_key_different_query_is_422() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = server.post("/orders?src=a").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);

    let reused = server.post("/orders?src=b").key(&k).json(&body).send().await;
    let ty = reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body)]);
    let no_query = server.post("/orders").key(&k).json(&body).send().await;
    let ty2 = no_query.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body)]);
    assert_eq!(ty, ty2, "the problem type is stable");
    assert_eq!(server.executions("orders"), 1);

    let retry = server.post("/orders?src=a").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_different_body_while_in_flight_is_422() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let first = {
        let request = server.post("/orders?delay_ms=300").key(&k).json(&body).build();
        let client = server.client();
        tokio::spawn(async move { Resp::read(client.request(request).await.unwrap()).await })
    };
    sleep_ms(100).await;
    let other = order();
    let reused = server.post("/orders?delay_ms=300").key(&k).json(&other).send().await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[&k, &note(&body), &note(&other)]);
    let first = first.await.unwrap();
    assert_created(&first, "orders", "ord", &body);
    assert_eq!(server.executions("orders"), 1);
}

// ---------------------------------------------------------------------------------------------
// Keys: valid and invalid
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_keys_are_400_and_never_run_the_handler() {
    let server = TestServer::start().await;
    let long = {
        let mut long = key();
        while long.len() < 256 {
            long.push('z');
        }
        long.truncate(256);
        long
    };
    let marker = key(); // inside several invalid keys, must not be echoed
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("empty", vec![b"".to_vec()]),
        ("empty quoted string", vec![b"\"\"".to_vec()]),
        ("256 bytes", vec![long.clone().into_bytes()]),
        ("256 bytes, quoted", vec![format!("\"{long}\"").into_bytes()]),
        ("non-ASCII bytes", vec![[marker.as_bytes(), "-caf\u{e9}".as_bytes()].concat()]),
        ("obs-text byte", vec![[marker.as_bytes(), b"\xff"].concat()]),
        ("control character (HTAB)", vec![format!("{marker}\tx").into_bytes()]),
        ("space", vec![format!("{marker} x").into_bytes()]),
        ("unterminated quoted string", vec![format!("\"{marker}").into_bytes()]),
        ("bad escape in quoted string", vec![format!("\"{marker}\\x\"").into_bytes()]),
        ("characters after the quoted string", vec![format!("\"{marker}\"x").into_bytes()]),
        ("two fields, different values", vec![marker.clone().into_bytes(), key().into_bytes()]),
        ("two fields, same value", vec![marker.clone().into_bytes(), marker.clone().into_bytes()]),
    ];
    let mut types = Vec::new();
    for (case, values) in &cases {
        let body = order();
        let mut call = server.post("/orders").json(&body);
        for value in values {
            call = call.header_bytes("idempotency-key", value);
        }
        let response = call.send().await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{case}: {}", String::from_utf8_lossy(&response.body));
        types.push(response.assert_problem(StatusCode::BAD_REQUEST, "invalid-key", &[&marker, &long, &note(&body)]));
        assert!(!response.replayed(), "{case}");
        assert_eq!(server.executions("orders"), 0, "{case}: the handler ran");
    }
    assert!(types.windows(2).all(|w| w[0] == w[1]), "one stable type for an invalid key: {types:?}");
}

#[tokio::test]
async fn key_of_255_bytes_is_accepted() {
    let server = TestServer::start().await;
    let mut k = key();
    while k.len() < 255 {
        k.push('~');
    }
    k.truncate(255);
    assert_eq!(k.len(), 255);
    let body = order();
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    // Quoted, it is the same 255-byte key.
    let quoted = server.post("/orders").key(&format!("\"{k}\"")).json(&body).send().await;
    assert_replay_of(&first, &quoted);
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test]
async fn key_of_every_visible_ascii_character_is_accepted() {
    let server = TestServer::start().await;
    // 0x21..=0x7E, bare. (A leading `"` would make it a quoted string; start elsewhere.)
    let visible: String = (0x21u8..=0x7e).map(char::from).filter(|c| *c != '"').collect();
    let k = format!("{}{visible}", key());
    let body = order();
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test]
async fn payments_require_a_key() {
    let server = TestServer::start().await;
    let body = order();
    let missing = server.post("/payments").json(&body).send().await;
    missing.assert_problem(StatusCode::BAD_REQUEST, "missing-key", &[&note(&body)]);
    assert_eq!(server.executions("payments"), 0);

    let k = key();
    let first = server.post("/payments").key(&k).json(&body).send().await;
    assert_created(&first, "payments", "pay", &body);
    let retry = server.post("/payments").key(&k).json(&body).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("payments"), 1);

    let invalid = server.post("/payments").key("").json(&body).send().await;
    invalid.assert_problem(StatusCode::BAD_REQUEST, "invalid-key", &[&note(&body)]);
    assert_eq!(server.executions("payments"), 1);
}

#[tokio::test]
async fn orders_without_key_run_every_time() {
    let server = TestServer::start().await;
    let body = order();
    let first = server.post("/orders").json(&body).send().await;
    let second = server.post("/orders").json(&body).send().await;
    let id1 = assert_created(&first, "orders", "ord", &body);
    let id2 = assert_created(&second, "orders", "ord", &body);
    assert_ne!(id1, id2);
    assert!(!first.replayed());
    assert!(!second.replayed());
    assert_eq!(server.executions("orders"), 2);
}

// ---------------------------------------------------------------------------------------------
// Methods not covered
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn put_is_not_covered_and_runs_every_time() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    for _ in 0..2 {
        let response = server.call(Method::PUT, "/orders/1").key(&k).json(&body).send().await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json(), json!({"id": "1", "put": body}));
        assert!(!response.replayed());
    }
    assert_eq!(server.executions("put"), 2);

    // Untouched "with or without a key": even an invalid one is not looked at.
    let response = server.call(Method::PUT, "/orders/1").key("").json(&body).send().await;
    assert_eq!(response.status, StatusCode::OK);
    let response = server.call(Method::PUT, "/orders/1").key("a").key("b").json(&body).send().await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(server.executions("put"), 4);
}

#[tokio::test]
async fn get_is_not_covered() {
    let server = TestServer::start().await;
    let k = key();
    let first = server.call(Method::GET, "/stats").key(&k).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    // A handler ran in between: a GET with the same key sees the new state, not a replay.
    let body = order();
    assert_created(&server.post("/orders").json(&body).send().await, "orders", "ord", &body);
    let second = server.call(Method::GET, "/stats").key(&k).send().await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(!second.replayed());
    assert_eq!(first.json()["orders"], 0);
    assert_eq!(second.json()["orders"], 1);

    let invalid = server.call(Method::GET, "/stats").key("").key("x y").send().await;
    assert_eq!(invalid.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Scope
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn scope_is_the_authorization_header() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let a = server.post("/orders").header("authorization", "Bearer a").key(&k).json(&body).send().await;
    let b = server.post("/orders").header("authorization", "Bearer b").key(&k).json(&body).send().await;
    let id_a = assert_created(&a, "orders", "ord", &body);
    let id_b = assert_created(&b, "orders", "ord", &body);
    assert_ne!(id_a, id_b, "tenant B got tenant A's order");
    assert!(!a.replayed());
    assert!(!b.replayed(), "tenant B got a replay of tenant A's response");
    assert_eq!(server.executions("orders"), 2);

    // Replays only within the same Authorization.
    let a2 = server.post("/orders").header("authorization", "Bearer a").key(&k).json(&body).send().await;
    assert_replay_of(&a, &a2);
    let b2 = server.post("/orders").header("authorization", "Bearer b").key(&k).json(&body).send().await;
    assert_replay_of(&b, &b2);
    assert_eq!(server.executions("orders"), 2);

    // No Authorization at all is yet another scope.
    let anonymous = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&anonymous, "orders", "ord", &body);
    assert!(!anonymous.replayed());
    assert_eq!(server.executions("orders"), 3);
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

/// Sends `n` copies of the same request at once and returns the answers.
async fn concurrently(server: &TestServer, n: usize, path: &str, k: &str, body: &Value) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let request = server.post(path).key(k).json(body).build();
            let client = server.client();
            tokio::spawn(async move { Resp::read(client.request(request).await.expect("request")).await })
        })
        .collect();
    let mut responses = Vec::with_capacity(n);
    for task in tasks {
        responses.push(task.await.expect("request task"));
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_get_409_in_flight() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let responses = concurrently(&server, 50, "/orders?delay_ms=300", &k, &body).await;

    let created: Vec<_> = responses.iter().filter(|r| r.status == StatusCode::CREATED).collect();
    let conflicts: Vec<_> = responses.iter().filter(|r| r.status == StatusCode::CONFLICT).collect();
    let statuses: Vec<_> = responses.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(created.len(), 1, "exactly one executes: {statuses:?}");
    assert_eq!(conflicts.len(), 49, "the others get 409: {statuses:?}");
    assert_created(created[0], "orders", "ord", &body);
    assert!(!created[0].replayed());
    for conflict in &conflicts {
        conflict.assert_problem(StatusCode::CONFLICT, "in-flight", &[&k, &note(&body)]);
        conflict.assert_retry_after();
        assert!(!conflict.replayed());
    }
    assert_eq!(server.executions("orders"), 1);

    // Once it finished, the retry replays it.
    let retry = server.post("/orders?delay_ms=300").key(&k).json(&body).send().await;
    assert_replay_of(created[0], &retry);
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_on_jobs_wait_and_replay() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let responses = concurrently(&server, 50, "/jobs?delay_ms=300", &k, &body).await;

    let statuses: Vec<_> = responses.iter().map(|r| r.status.as_u16()).collect();
    assert!(responses.iter().all(|r| r.status == StatusCode::CREATED), "all get 201: {statuses:?}");
    let executed: Vec<_> = responses.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(executed.len(), 1, "exactly one is not a replay");
    assert_created(executed[0], "jobs", "job", &body);
    for response in responses.iter().filter(|r| r.replayed()) {
        assert_replay_of(executed[0], response);
    }
    assert_eq!(server.executions("jobs"), 1);
}

// ---------------------------------------------------------------------------------------------
// Failures release the key
// ---------------------------------------------------------------------------------------------

/// `X-Fail-Status: status` once, then the same request without it: the retry executes (the
/// failure released the key) and is recorded.
async fn failure_releases_the_key(status: u16) {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let failed = server.post("/orders").key(&k).header("x-fail-status", &status.to_string()).json(&body).send().await;
    assert_eq!(failed.status.as_u16(), status);
    assert_eq!(failed.json()["detail"], "X-Fail-Status asked for this failure", "the handler's own answer");
    assert!(!failed.replayed());
    assert_eq!(server.executions("orders"), 1);

    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&retry, "orders", "ord", &body);
    assert!(!retry.replayed(), "a failure must not be replayed");
    assert_eq!(server.executions("orders"), 2);

    let again = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&retry, &again);
    assert_eq!(server.executions("orders"), 2);
}

#[tokio::test]
async fn failure_500_releases_the_key() {
    failure_releases_the_key(500).await;
}

#[tokio::test]
async fn failure_400_releases_the_key() {
    failure_releases_the_key(400).await;
}

#[tokio::test]
async fn failure_422_releases_the_key() {
    failure_releases_the_key(422).await;
}

#[tokio::test]
async fn failure_503_releases_the_key() {
    failure_releases_the_key(503).await;
}

#[tokio::test]
async fn panic_releases_the_key_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let panicked = server.post("/orders").key(&k).header("x-panic", "1").json(&body).send().await;
    assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!panicked.replayed());
    assert_eq!(server.executions("orders"), 1);

    let retry = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&retry, "orders", "ord", &body);
    assert!(!retry.replayed(), "a panic must not be replayed");
    assert_eq!(server.executions("orders"), 2);

    let again = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&retry, &again);

    // Still serving, other keys and other routes.
    let other = order();
    assert_created(&server.post("/orders").key(&key()).json(&other).send().await, "orders", "ord", &other);
    assert_eq!(server.stats_json().await["orders"], 3);
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

const FIVE_EVENTS: &str = "id: 0\ndata: 0\n\nid: 1\ndata: 1\n\nid: 2\ndata: 2\n\nid: 3\ndata: 3\n\nid: 4\ndata: 4\n\n";

#[tokio::test]
async fn stream_is_relayed_then_replayed_byte_for_byte() {
    let server = TestServer::start().await;
    let k = key();
    let first = server.post("/stream?chunks=5&chunk_delay_ms=20").key(&k).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("content-type"), Some("text/event-stream"));
    assert_eq!(first.text(), FIVE_EVENTS);

    let retry = server.post("/stream?chunks=5&chunk_delay_ms=20").key(&k).send().await;
    assert_eq!(retry.header("content-type"), Some("text/event-stream"));
    assert_eq!(retry.text(), FIVE_EVENTS);
    assert_replay_of(&first, &retry);
    assert_eq!(server.executions("stream"), 1);
}

#[tokio::test]
async fn stream_first_bytes_arrive_before_the_stream_ends() {
    let server = TestServer::start().await;
    let k = key();
    // 5 events 200 ms apart: the stream itself lasts ~800 ms.
    let response = server.post("/stream?chunks=5&chunk_delay_ms=200").key(&k).send_streaming().await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut first_data_at = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            if !data.is_empty() && first_data_at.is_none() {
                first_data_at = Some(Instant::now());
                assert!(data.starts_with(b"id: 0\ndata: 0\n\n"), "first frame: {data:?}");
            }
            received.extend_from_slice(data);
        }
    }
    let ended_at = Instant::now();
    assert_eq!(String::from_utf8(received).unwrap(), FIVE_EVENTS);
    let first_data_at = first_data_at.expect("some data");
    // The first event must have been relayed as produced, not after the whole stream was
    // buffered: it arrives about 800 ms before the end; half of that is a generous margin.
    let lead = ended_at - first_data_at;
    assert!(lead >= Duration::from_millis(400), "the first event arrived only {lead:?} before the end");

    let retry = server.post("/stream?chunks=5&chunk_delay_ms=200").key(&k).send().await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), FIVE_EVENTS);
    assert_eq!(server.executions("stream"), 1);
}

// ---------------------------------------------------------------------------------------------
// Large responses
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn large_response_is_sent_in_full_but_not_retained() {
    let server = TestServer::start().await;
    let k = key();
    let first = server.post("/large?bytes=2000000").key(&k).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("content-type"), Some("application/octet-stream"));
    assert_eq!(first.body.len(), 2_000_000);
    assert!(first.body.iter().all(|b| *b == b'x'), "body bytes");
    assert!(!first.replayed());

    for _ in 0..2 {
        let retry = server.post("/large?bytes=2000000").key(&k).send().await;
        retry.assert_problem(StatusCode::CONFLICT, "response-not-retained", &[&k]);
        assert!(retry.header("retry-after").is_none(), "response-not-retained has no Retry-After: {:?}", retry.headers);
        assert!(!retry.replayed());
    }
    assert_eq!(server.executions("large"), 1);
}

#[tokio::test]
async fn small_binary_response_is_replayed() {
    let server = TestServer::start().await;
    let k = key();
    let first = server.post("/large?bytes=1000").key(&k).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("content-type"), Some("application/octet-stream"));
    assert_eq!(first.body, Bytes::from(vec![b'x'; 1000]));
    let retry = server.post("/large?bytes=1000").key(&k).send().await;
    assert_replay_of(&first, &retry);
    assert_eq!(retry.header("content-length"), Some("1000"));
    assert_eq!(server.executions("large"), 1);
}

#[tokio::test]
async fn request_body_over_the_limit_is_413() {
    let server = TestServer::start().await;
    let k = key();
    let body = vec![b' '; 2 * 1024 * 1024 + 1];
    let response = server.post("/orders").key(&k).header("content-type", "application/json").body(body).send().await;
    response.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "request-body-too-large", &[&k]);
    assert_eq!(server.executions("orders"), 0);
}

// ---------------------------------------------------------------------------------------------
// Client gone
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_finishes_when_the_client_goes_away() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    {
        // Its own client, dropped with the request: its connection closes.
        let client = support::client();
        let request = server.post("/orders?delay_ms=300").key(&k).json(&body).build();
        let gave_up = tokio::time::timeout(Duration::from_millis(50), client.request(request)).await;
        assert!(gave_up.is_err(), "the 300 ms handler answered within 50 ms");
    }
    assert_eq!(server.executions("orders"), 1, "the handler started");
    sleep_ms(500).await;

    let retry = server.post("/orders?delay_ms=300").key(&k).json(&body).send().await;
    assert_created(&retry, "orders", "ord", &body);
    assert!(
        retry.replayed(),
        "the retry executed again instead of replaying (executions: {}): {:?}",
        server.executions("orders"),
        retry.headers
    );
    assert_eq!(retry.header("location"), Some("/orders/ord_1"));
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_finishes_when_the_connection_closes() {
    let server = TestServer::start().await;
    let (k, body) = (key(), order());
    let body_text = body.to_string();
    let mut socket = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let head = format!(
        "POST /orders?delay_ms=300 HTTP/1.1\r\nhost: {}\r\nidempotency-key: {k}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body_text}",
        server.addr(),
        body_text.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    sleep_ms(50).await;
    assert_eq!(server.executions("orders"), 1, "the handler started");
    drop(socket);
    sleep_ms(450).await;

    let retry = server.post("/orders?delay_ms=300").key(&k).json(&body).send().await;
    assert_created(&retry, "orders", "ord", &body);
    assert!(
        retry.replayed(),
        "the retry executed again instead of replaying (executions: {}): {:?}",
        server.executions("orders"),
        retry.headers
    );
    assert_eq!(server.executions("orders"), 1);
}

// ---------------------------------------------------------------------------------------------
// TTL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn record_expires_after_the_ttl() {
    let server = TestServer::start_with(IdempotencyLayer::new().with_ttl(Duration::from_millis(300))).await;
    let (k, body) = (key(), order());
    let first = server.post("/orders").key(&k).json(&body).send().await;
    assert_created(&first, "orders", "ord", &body);
    let replay = server.post("/orders").key(&k).json(&body).send().await;
    assert_replay_of(&first, &replay);
    assert_eq!(server.executions("orders"), 1);

    sleep_ms(600).await;
    let after = server.post("/orders").key(&k).json(&body).send().await;
    let id = assert_created(&after, "orders", "ord", &body);
    assert!(!after.replayed(), "replayed after the TTL");
    assert_eq!(id, "ord_2");
    assert_eq!(server.executions("orders"), 2);
}

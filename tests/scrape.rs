//! `GET /metrics` of the example server (feature `metrics`): a scripted scenario over loopback
//! — executions, replays, a `422`, a `409`, a wait, a missing key — and the exact counts it
//! scrapes, in the Prometheus text format.
//!
//! A binary of its own, with one test: the metrics recorder is process-wide, so no other test
//! may send requests in this process.
#![cfg(feature = "metrics")]

#[path = "support/mod.rs"]
mod support;

use http::{Method, StatusCode};
use serde_json::json;
use support::{TestServer, key, sleep_ms};

/// The value of the series written exactly as `series` (name and labels), or 0.
fn value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn the_example_server_serves_what_a_scripted_scenario_did() {
    let server = TestServer::start().await;
    let body = json!({"sku": "A1"});
    // Executed, then replayed; the key reused for another request: 422.
    let (one, two, three) = (key(), key(), key());
    assert_eq!(server.post("/orders").key(&one).json(&body).send().await.status, StatusCode::CREATED);
    assert!(server.post("/orders").key(&one).json(&body).send().await.replayed());
    let reused = server.post("/orders").key(&one).json(&json!({"sku": "B2"})).send().await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A duplicate of a request in flight: 409 on /orders, a wait then a replay on /jobs.
    let slow = server.post("/orders?delay_ms=1500").key(&two).json(&body).build();
    let slow = tokio::spawn(server.client().request(slow));
    let long = server.post("/jobs?delay_ms=1500").key(&three).json(&body).build();
    let long = tokio::spawn(server.client().request(long));
    sleep_ms(500).await;
    assert_eq!(server.post("/orders?delay_ms=1500").key(&two).json(&body).send().await.status, StatusCode::CONFLICT);
    let waited = server.post("/jobs?delay_ms=1500").key(&three).json(&body).send().await;
    assert!(waited.replayed(), "{waited:?}");
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(long.await.unwrap().unwrap().status(), StatusCode::CREATED);
    // No key where one is required: 400. A method the layer does not cover passes.
    assert_eq!(server.post("/payments").json(&body).send().await.status, StatusCode::BAD_REQUEST);
    let put = server.call(Method::PUT, "/orders/ord_1").key(&key()).json(&body).send().await;
    assert_eq!(put.status, StatusCode::OK);

    let scraped = server.call(Method::GET, "/metrics").send().await;
    assert_eq!(scraped.status, StatusCode::OK);
    let text = scraped.text();
    println!("scraped {} bytes:\n{text}", text.len());
    let requests = |outcome: &str| value(text, &format!("idempotency_requests_total{{outcome=\"{outcome}\"}}"));
    let counts = ["executed", "replayed", "key_reused", "in_flight", "missing_key", "bypassed"].map(requests);
    assert_eq!(counts, [3.0, 2.0, 1.0, 1.0, 1.0, 1.0], "{text}");
    assert_eq!(value(text, "idempotency_wait_seconds_count{duplicates=\"wait\"}"), 1.0, "{text}");
    assert_eq!(value(text, "idempotency_replayed_record_age_seconds_count"), 2.0, "{text}");
    assert_eq!(value(text, "idempotency_lock_held_seconds_count"), 3.0, "{text}");
    assert_eq!(value(text, "idempotency_locks_held"), 0.0, "{text}");
    assert_eq!(value(text, "idempotency_waiters"), 0.0, "{text}");
    assert_eq!(value(text, "idempotency_lease_takeovers_total"), 0.0, "{text}");
    assert_eq!(server.executions("orders") + server.executions("jobs"), 3);
}

//! The example server's admin routes (`GET` and `DELETE /admin/keys/{key}`) as a black box over
//! loopback: the bearer token, the look at one key in each state, and the purge, refused while
//! the key is in flight.

use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Resp, TestServer, key};
use tower_idempotency::IdempotencyLayer;

const TOKEN: &str = "s3cret-admin-token-for-tests";
/// The customer whose keys the admin looks at: the layer scopes keys by `Authorization`.
const CUSTOMER: &str = "Bearer cust_42";

async fn server() -> TestServer {
    TestServer::start_with_admin(IdempotencyLayer::new(), Some(TOKEN)).await
}

/// An admin request on `key` with `authorization`, looking in `CUSTOMER`'s scope.
async fn admin(server: &TestServer, method: Method, key: &str, authorization: Option<&str>) -> Resp {
    let mut call = server.call(method, &format!("/admin/keys/{key}")).header("x-scope-authorization", CUSTOMER);
    if let Some(authorization) = authorization {
        call = call.header("authorization", authorization);
    }
    call.send().await
}

async fn inspect(server: &TestServer, key: &str) -> Value {
    let response = admin(server, Method::GET, key, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    response.json()
}

async fn purge(server: &TestServer, key: &str) -> Resp {
    admin(server, Method::DELETE, key, Some(&format!("Bearer {TOKEN}"))).await
}

/// `POST /orders` by `CUSTOMER` with `key`.
async fn order(server: &TestServer, key: &str, sku: &str) -> Resp {
    server.post("/orders").key(key).header("authorization", CUSTOMER).json(&json!({"sku": sku})).send().await
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Asserts `at` (ms since the epoch) lies within `[from, to]`.
#[track_caller]
fn assert_between(at: &Value, from: u64, to: u64) {
    let at = at.as_u64().unwrap_or_else(|| panic!("not a time: {at}"));
    assert!((from..=to).contains(&at), "{at} not within [{from}, {to}]");
}

#[tokio::test]
async fn without_a_token_set_the_admin_routes_are_not_served() {
    let server = TestServer::start().await;
    let key = key();
    for method in [Method::GET, Method::DELETE] {
        let response = admin(&server, method, &key, Some(&format!("Bearer {TOKEN}"))).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn the_admin_routes_need_the_bearer_token() {
    let server = server().await;
    let key = key();
    let wrong = [None, Some("Bearer wrong"), Some(TOKEN), Some("Basic czNjcmV0"), Some("Bearer "), Some(CUSTOMER)];
    for authorization in wrong {
        for method in [Method::GET, Method::DELETE] {
            let response = admin(&server, method, &key, authorization).await;
            assert_eq!(response.status, StatusCode::UNAUTHORIZED, "{authorization:?}");
            assert_eq!(response.header("www-authenticate"), Some("Bearer"));
        }
    }
    assert_eq!(inspect(&server, &key).await, json!({"state": "unknown"}));
}

#[tokio::test]
async fn an_operator_sees_a_completed_key_and_purges_it() {
    let server = server().await;
    let key = key();
    let before = now_ms();
    // The caller's trace: the record keeps it, and the operator sees its trace id.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = server
        .post("/orders")
        .key(&key)
        .header("authorization", CUSTOMER)
        .header("traceparent", traceparent)
        .json(&json!({"sku": "A1"}))
        .send()
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let after = now_ms();

    let seen = inspect(&server, &key).await;
    assert_eq!(seen["state"], "completed", "{seen}");
    assert_eq!(seen["status"], 201);
    assert_eq!(seen["size"], first.body.len());
    assert_eq!(seen["retained"], true);
    assert_eq!(seen["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_between(&seen["completed_at_ms"], before, after);
    // The library's default TTL: 24 h from completion.
    let day = 24 * 60 * 60 * 1000;
    assert_between(&seen["expires_at_ms"], before + day, after + day + 1);

    // Another scope (another customer, or none) is another key.
    let other = server
        .call(Method::GET, &format!("/admin/keys/{key}"))
        .header("authorization", &format!("Bearer {TOKEN}"))
        .header("x-scope-authorization", "Bearer cust_7")
        .send()
        .await;
    assert_eq!(other.json(), json!({"state": "unknown"}));

    // The retry is a replay until the purge; after it, the request executes again.
    assert!(order(&server, &key, "A1").await.replayed());
    assert_eq!(purge(&server, &key).await.status, StatusCode::NO_CONTENT);
    assert_eq!(inspect(&server, &key).await, json!({"state": "unknown"}));
    let purged = purge(&server, &key).await;
    assert_eq!(purged.status, StatusCode::NOT_FOUND, "purged once");
    let again = order(&server, &key, "A1").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed());
    assert_eq!(server.executions("orders"), 2);
}

#[tokio::test]
async fn a_key_in_flight_is_shown_and_its_purge_refused() {
    let server = server().await;
    let key = key();
    let before = now_ms();
    let call =
        server.post("/orders?delay_ms=600").key(&key).header("authorization", CUSTOMER).json(&json!({"sku": "slow"}));
    let slow = {
        let request = call.build();
        let client = server.client();
        tokio::spawn(async move { Resp::read(client.request(request).await.unwrap()).await })
    };
    // Until the handler runs (it counts itself first), nothing is in flight yet.
    while server.executions("orders") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = inspect(&server, &key).await;
    assert_eq!(seen["state"], "in_flight", "{seen}");
    assert_between(&seen["since_ms"], before, now_ms());
    // The library's default lease: 30 s, renewed while the handler runs.
    assert_between(&seen["lease_until_ms"], before + 29_000, now_ms() + 30_000);

    let refused = purge(&server, &key).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.text());
    assert!(refused.text().contains("in flight"));

    // The refused purge changed nothing: the request completes and its retry replays.
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(inspect(&server, &key).await["state"], "completed");
    assert!(call.send().await.replayed());
    assert_eq!(server.executions("orders"), 1);
}

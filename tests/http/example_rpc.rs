//! `POST /rpc` of the example server (feature `json`), over real HTTP on loopback: JSON-RPC
//! 2.0, the key in `params._meta.idempotencyKey`. The charge runs once; each retry gets the
//! recorded result with its own `id`; the layer's refusals are JSON-RPC errors.
#![cfg(feature = "json")]

use crate::support;

use http::StatusCode;
use serde_json::{Value, json};
use support::{TestServer, key};

fn charge(id: Value, key: &str, amount: u32) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "charge",
        "params": {"amount": amount, "_meta": {"idempotencyKey": key, "progressToken": id}}})
}

#[tokio::test]
async fn a_charge_retried_with_new_ids_runs_once_and_each_retry_gets_its_id() {
    let server = TestServer::start().await;
    let k = key();
    let first = server.post("/rpc").json(&charge(json!(1), &k, 5)).send().await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    let result = first.json()["result"].clone();
    assert!(result["charge"].as_str().unwrap().starts_with("rpc_"), "{result}");
    assert_eq!(first.json()["id"], 1);
    for id in [json!(2), json!("retry-3")] {
        let retry = server.post("/rpc").json(&charge(id.clone(), &k, 5)).send().await;
        assert_eq!(retry.status, StatusCode::OK);
        assert!(retry.replayed());
        assert_eq!(retry.json(), json!({"jsonrpc": "2.0", "id": id, "result": result}));
        let length: usize = retry.header("content-length").unwrap().parse().unwrap();
        assert_eq!(length, retry.body.len());
    }
    assert_eq!(server.executions("rpc"), 1);
    assert_eq!(server.stats_json().await["rpc"], 1);

    // The same key for another charge: a JSON-RPC error with the caller's id, `422`.
    let reused = server.post("/rpc").json(&charge(json!(9), &k, 6)).send().await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.header("content-type"), Some("application/json"));
    let error = reused.json();
    assert_eq!((error["id"].clone(), error["error"]["code"].clone()), (json!(9), json!(-32002)));
    assert!(error["error"]["data"]["type"].as_str().unwrap().ends_with("#key-reused"));
    // Two at once: one runs, the other is told it is in flight (`409`, its own id).
    let slow = |id: u32| server.post("/rpc?delay_ms=300").json(&charge(json!(id), "slow-key-rpc", 1));
    let (first, second) = (slow(1), slow(2));
    let (a, b) = tokio::join!(first.send(), async {
        support::sleep_ms(50).await;
        second.send().await
    });
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::CONFLICT);
    assert_eq!(b.json()["id"], 2);
    assert_eq!(b.json()["error"]["code"], -32001);
    assert!(b.header("retry-after").is_some());
    assert_eq!(server.executions("rpc"), 2);
}

#[tokio::test]
async fn notifications_and_unkeyed_calls_run_through_and_bad_bodies_are_json_rpc_errors() {
    let server = TestServer::start().await;
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    for _ in 0..2 {
        let through = server.post("/rpc").json(&notification).send().await;
        assert_eq!(through.status, StatusCode::ACCEPTED);
    }
    let unkeyed = json!({"jsonrpc": "2.0", "id": 1, "method": "charge", "params": {}});
    let a = server.post("/rpc").json(&unkeyed).send().await.json();
    let b = server.post("/rpc").json(&unkeyed).send().await.json();
    assert_ne!(a["result"], b["result"], "without a key, each call runs");
    assert_eq!(server.executions("rpc"), 4);
    let not_json = server.post("/rpc").body("charge please").send().await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_json.json()["error"]["code"], -32700);
    assert_eq!(not_json.json()["id"], Value::Null);
    let bad_key = server.post("/rpc").json(&charge(json!(5), "no spaces allowed", 1)).send().await;
    assert_eq!(bad_key.status, StatusCode::BAD_REQUEST);
    assert_eq!((bad_key.json()["id"].clone(), bad_key.json()["error"]["code"].clone()), (json!(5), json!(-32602)));
    assert_eq!(server.executions("rpc"), 4);
}

//! `POST /quotes` of the example server, as a black box: as `/orders`, but fingerprinted as
//! canonical JSON without the member `client_time`.

use crate::support;

use http::StatusCode;
use serde_json::json;
use support::{TestServer, key};

#[tokio::test]
async fn a_retry_in_another_spelling_with_a_newer_client_time_replays() {
    let server = TestServer::start().await;
    let k = key();
    let body = r#"{"amount": 10.50, "currency": "EUR", "client_time": "2026-12-07T12:00:00Z"}"#;
    let first = server.post("/quotes").key(&k).body(body).send().await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let json = first.json();
    assert_eq!(json["id"], "quo_1");
    assert_eq!(json["order"], json!({"amount": 10.5, "currency": "EUR", "client_time": "2026-12-07T12:00:00Z"}));
    assert_eq!(first.header("location"), Some("/quotes/quo_1"));

    // Members reordered, no whitespace, the amount spelled `1.05e1`, a later client time.
    let retry = r#"{"client_time":"2026-12-07T12:00:09Z","currency":"EUR","amount":1.05e1}"#;
    let replay = server.post("/quotes").key(&k).body(retry).send().await;
    assert!(replay.replayed(), "{:?}", replay.headers);
    assert_eq!(replay.body, first.body);
    assert_eq!(server.stats_json().await["quotes"], 1);

    // Another amount under the same key is another request.
    let other = r#"{"amount":10.51,"currency":"EUR","client_time":"2026-12-07T12:00:09Z"}"#;
    server.post("/quotes").key(&k).body(other).send().await.assert_problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "key-reused",
        &[],
    );
    // `/orders` takes raw bytes: the same reordering there is another request.
    let k2 = key();
    server.post("/orders").key(&k2).body(body).send().await;
    let reordered = server.post("/orders").key(&k2).body(retry).send().await;
    reordered.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused", &[]);
    assert_eq!(server.stats_json().await["quotes"], 1);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400_and_never_runs() {
    let server = TestServer::start().await;
    let k = key();
    for body in ["{\"amount\": 10", "{\"amount\":1,\"amount\":2}", "secret-token-123"] {
        let reply = server.post("/quotes").key(&k).body(body).send().await;
        reply.assert_problem(StatusCode::BAD_REQUEST, "request-body-not-json", &["secret-token-123"]);
        assert_eq!(reply.header("x-should-retry"), Some("false"));
    }
    assert_eq!(server.stats_json().await["quotes"], 0);
    let fixed = server.post("/quotes").key(&k).body(r#"{"amount":10}"#).send().await;
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert_eq!(server.stats_json().await["quotes"], 1);
}

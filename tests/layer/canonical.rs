//! A route that fingerprints its body as canonical JSON (RFC 8785) with listed members left
//! out, against the raw bytes of the default.

use crate::common;

use common::{Runs, post, send, service};
use http::StatusCode;
use tower_idempotency::{BodyFingerprint, ConfigError, IdempotencyLayer, Outcome};

fn quotes() -> IdempotencyLayer {
    IdempotencyLayer::new().with_body_fingerprint(BodyFingerprint::canonical_json(["/client_time"]).unwrap())
}

#[tokio::test]
async fn the_same_json_in_another_spelling_is_the_same_request() {
    let runs = Runs::default();
    let svc = service(quotes(), runs.clone());
    let first =
        send(&svc, post("/quotes", "q-1", r#"{"amount": 10.0, "currency": "EUR", "client_time": "12:00:00"}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Members in another order, no whitespace, `1e1` for `10.0`, another client time.
    let retry = send(&svc, post("/quotes", "q-1", r#"{"client_time":"12:00:07","currency":"EUR","amount":1e1}"#)).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    // Without the excluded member at all: still the same request.
    assert!(send(&svc, post("/quotes", "q-1", r#"{"currency":"EUR","amount":10}"#)).await.replayed());
    assert_eq!(runs.get(), 1);
    // Another amount is another request.
    send(&svc, post("/quotes", "q-1", r#"{"currency":"EUR","amount":11}"#)).await.assert_problem(422, "key-reused");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn raw_bytes_stay_the_default() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    send(&svc, post("/orders", "o-1", r#"{"a":1,"b":2}"#)).await;
    send(&svc, post("/orders", "o-1", r#"{"b":2,"a":1}"#)).await.assert_problem(422, "key-reused");
    // Not JSON at all is a body like any other.
    assert!(!send(&svc, post("/orders", "o-2", "not json")).await.replayed());
    assert!(send(&svc, post("/orders", "o-2", "not json")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400_and_never_runs() {
    let runs = Runs::default();
    let svc = service(quotes(), runs.clone());
    for body in ["", "not json", r#"{"amount":1"#, r#"{"amount":1,"amount":2}"#, "[1e400]"] {
        let reply = send(&svc, post("/quotes", "q-2", body)).await;
        reply.assert_problem(400, "request-body-not-json");
        assert_eq!(reply.headers["x-should-retry"], "false");
        assert_eq!(reply.outcome, Outcome::RequestBodyNotJson);
    }
    assert_eq!(runs.get(), 0);
    // Nothing was kept: the key is free for the corrected body.
    let reply = send(&svc, post("/quotes", "q-2", r#"{"amount":1}"#)).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[test]
fn excluded_members_are_json_pointers() {
    assert!(BodyFingerprint::canonical_json(["/client_time", "/meta/trace_id", "/a~1b"]).is_ok());
    for invalid in ["client_time", "", "/~2"] {
        assert_eq!(
            BodyFingerprint::canonical_json([invalid]),
            Err(ConfigError::InvalidJsonPointer(invalid.to_owned())),
        );
    }
}

//! Opt-in: a key past its TTL, within a grace, gets a final `410` `key-expired` instead of
//! running again; the retention is told in `Idempotency-Key-Retention`.

use crate::common;

use std::time::Duration;

use common::{Runs, post, send, service};
use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, Outcome};

const TTL: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn a_key_past_its_ttl_is_told_it_expired_for_the_grace_then_runs_again() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_ttl(TTL).with_expired_grace(GRACE), runs.clone());
    let first = send(&svc, post("/orders", "k-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.headers["idempotency-key-retention"], "ttl=10, grace=60");
    let replay = send(&svc, post("/orders", "k-1", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.headers["idempotency-key-retention"], "ttl=10, grace=60", "recorded with the response");

    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    for body in ["{}", r#"{"another":"request"}"#] {
        let expired = send(&svc, post("/orders", "k-1", body)).await;
        expired.assert_problem(410, "key-expired");
        assert_eq!(expired.outcome, Outcome::KeyExpired);
        assert_eq!(expired.headers["x-should-retry"], "false");
        assert_eq!(expired.headers["idempotency-key-retention"], "ttl=10, grace=60");
        assert!(expired.headers.get("retry-after").is_none());
    }
    assert_eq!(runs.get(), 1, "never run again within the grace");

    tokio::time::advance(GRACE).await;
    let again = send(&svc, post("/orders", "k-1", "{}")).await;
    assert_eq!((again.status, again.outcome), (StatusCode::CREATED, Outcome::Executed));
    assert_eq!(runs.get(), 2, "past the grace the key is free");
}

#[tokio::test(start_paused = true)]
async fn without_a_grace_a_key_past_its_ttl_runs_again_and_nothing_is_told() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_ttl(TTL), runs.clone());
    let first = send(&svc, post("/orders", "k-1", "{}")).await;
    assert!(first.headers.get("idempotency-key-retention").is_none());
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    let again = send(&svc, post("/orders", "k-1", "{}")).await;
    assert_eq!(again.outcome, Outcome::Executed);
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_response_not_recorded_leaves_no_mark() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_ttl(TTL).with_expired_grace(GRACE), runs.clone());
    // The test handler answers `x-status`; a 500 is not recorded.
    let failed = http::Request::post("/orders")
        .header("idempotency-key", "k-2")
        .header("x-status", "500")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let _ = send(&svc, failed).await;
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    assert_eq!(send(&svc, post("/orders", "k-2", "{}")).await.outcome, Outcome::Executed);
}

//! The layer's own answers (the guide's outcomes, and `hints`): the retry hints they carry, and the renderer that
//! makes their bodies.

use crate::common;

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use common::{Reply, Runs, outage::Switch, post, send, service};
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use serde_json::{Value, json};
use tower_idempotency::{
    Duplicates, IdempotencyLayer, KeyPolicy, Outcome, StoreFailure,
    hints::{RetryHint, STRIPE_SHOULD_RETRY},
    problem::{Problem, ProblemKind},
};

const KEY: &str = "very-distinctive-key-4711";
const BODY: &str = "very-distinctive-body-0815";

/// Every answer the layer makes itself, each once, through `layer` (over a [`Switch`] store),
/// with 64-byte request and record limits, a 1.5 s in-flight `Retry-After` and a
/// 2.5 s store-failure `Retry-After`; and the executions and replays around them.
async fn answers(layer: IdempotencyLayer<Switch>) -> Vec<(&'static str, Reply)> {
    let runs = Runs::default();
    let layer = layer
        .with_max_request_body(64)
        .with_max_record(64)
        .with_duplicates(Duplicates::Reject { retry_after: Duration::from_millis(1500) })
        .with_store_failure(StoreFailure::FailClosed { retry_after: Duration::from_millis(2500) });
    let svc = service(layer.clone(), runs.clone());
    let required = service(layer.clone().with_key_policy(KeyPolicy::Required), runs.clone());
    let key = |n: u8| -> &'static str { format!("{KEY}-{n}").leak() };

    let mut slow = post("/slow", key(1), BODY);
    slow.headers_mut().insert("x-delay-ms", "1000".parse().unwrap());
    let running = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut big = post("/not-retained", key(2), BODY);
    big.headers_mut().insert("x-big", "100".parse().unwrap());
    let not_retained = send(&svc, big).await; // over the record limit: a not-retained record
    let mut bad_key = post("/x", key(3), BODY);
    bad_key.headers_mut().insert("idempotency-key", format!("{KEY} with spaces").parse().unwrap());
    let mut failed = post("/failed", key(6), BODY);
    failed.headers_mut().insert("x-status", "503".parse().unwrap());

    let mut replies = vec![
        ("missing-key", send(&required, Request::post("/x").body(Full::new(Bytes::from(BODY))).unwrap()).await),
        ("invalid-key", send(&svc, bad_key).await),
        ("in-flight", send(&svc, post("/slow", key(1), BODY)).await),
        ("response-not-retained", send(&svc, post("/not-retained", key(2), BODY)).await),
        ("request-body-too-large", send(&svc, post("/x", key(4), "x".repeat(65).leak())).await),
        ("key-reused", send(&svc, post("/slow", key(1), "another body")).await),
    ];
    layer.store().down.store(true, Ordering::SeqCst);
    replies.push(("store-unavailable", send(&svc, post("/x", key(5), BODY)).await));
    layer.store().down.store(false, Ordering::SeqCst);
    replies.push(("executed", running.await.unwrap()));
    replies.push(("executed-over-the-limit", not_retained));
    replies.push(("replayed", send(&svc, post("/slow", key(1), BODY)).await));
    replies.push(("executed-503", send(&svc, failed).await));
    replies.push(("bypassed", send(&svc, Request::post("/x").body(Full::new(Bytes::from(BODY))).unwrap()).await));
    replies
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    let mut values = reply.headers.get_all(name).iter();
    let value = values.next()?;
    assert!(values.next().is_none(), "{name} sent twice: {reply:?}");
    Some(value.to_str().unwrap())
}

const RETRYABLE: [&str; 2] = ["in-flight", "store-unavailable"];
const FINAL: [&str; 5] =
    ["missing-key", "invalid-key", "response-not-retained", "request-body-too-large", "key-reused"];
const NOT_ANSWERED_BY_THE_LAYER: [&str; 5] =
    ["executed", "executed-over-the-limit", "replayed", "executed-503", "bypassed"];
const HINTS: [&str; 4] = ["retry-after", "retry-after-ms", "x-should-retry", "stripe-should-retry"];

#[tokio::test(start_paused = true)]
async fn retryable_answers_carry_retry_after_in_seconds_and_milliseconds() {
    let replies = answers(IdempotencyLayer::from_store(Switch::default())).await;
    for (slug, reply) in &replies {
        let (secs, ms) = match *slug {
            "in-flight" => ("2", "1500"),
            "store-unavailable" => ("3", "2500"),
            _ => continue,
        };
        assert_eq!(header(reply, "retry-after"), Some(secs), "{slug}: seconds, rounded up");
        assert_eq!(header(reply, "retry-after-ms"), Some(ms), "{slug}");
        assert_eq!(header(reply, "x-should-retry"), None, "{slug}: retryable, so no `false`");
    }
}

#[tokio::test(start_paused = true)]
async fn final_answers_carry_x_should_retry_false_and_no_wait() {
    let replies = answers(IdempotencyLayer::from_store(Switch::default())).await;
    let finals: Vec<_> = replies.iter().filter(|(slug, _)| FINAL.contains(slug)).collect();
    assert_eq!(finals.len(), FINAL.len());
    for (slug, reply) in finals {
        reply.assert_problem(reply.status.as_u16(), slug);
        assert_eq!(header(reply, "x-should-retry"), Some("false"), "{slug}");
        assert_eq!(header(reply, "retry-after"), None, "{slug}");
        assert_eq!(header(reply, "retry-after-ms"), None, "{slug}");
        assert_eq!(header(reply, "stripe-should-retry"), None, "{slug}: not in the default set");
    }
}

#[tokio::test(start_paused = true)]
async fn executions_replays_and_bypasses_carry_no_hint() {
    let replies = answers(IdempotencyLayer::from_store(Switch::default())).await;
    for (slug, reply) in replies.iter().filter(|(slug, _)| NOT_ANSWERED_BY_THE_LAYER.contains(slug)) {
        for hint in HINTS {
            assert_eq!(header(reply, hint), None, "{slug} carries {hint}: {reply:?}");
        }
    }
    let outcome = |wanted: &str| replies.iter().find(|(slug, _)| *slug == wanted).unwrap().1.outcome;
    assert_eq!(outcome("replayed"), Outcome::Replayed);
    assert_eq!(outcome("executed-503"), Outcome::Executed, "the handler's own 503 is passed on untouched");
}

#[tokio::test(start_paused = true)]
async fn the_hint_headers_are_configurable() {
    // A Stripe-compatible API: Stripe's SDKs read `Stripe-Should-Retry`.
    let stripe = RetryHint::DEFAULT.into_iter().chain([RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)]);
    let replies = answers(IdempotencyLayer::from_store(Switch::default()).with_retry_hints(stripe)).await;
    for (slug, reply) in &replies {
        let expected = FINAL.contains(slug).then_some("false");
        assert_eq!(header(reply, "stripe-should-retry"), expected, "{slug}");
        assert_eq!(header(reply, "x-should-retry"), expected, "{slug}");
        assert_eq!(header(reply, "retry-after-ms").is_some(), RETRYABLE.contains(slug), "{slug}");
    }

    // Only the standard header.
    let replies =
        answers(IdempotencyLayer::from_store(Switch::default()).with_retry_hints([RetryHint::RetryAfter])).await;
    for (slug, reply) in &replies {
        assert_eq!(header(reply, "retry-after").is_some(), RETRYABLE.contains(slug), "{slug}");
        for hint in ["retry-after-ms", "x-should-retry", "stripe-should-retry"] {
            assert_eq!(header(reply, hint), None, "{slug} carries {hint}");
        }
    }

    // None at all.
    let replies = answers(IdempotencyLayer::from_store(Switch::default()).with_retry_hints([])).await;
    for (slug, reply) in &replies {
        for hint in HINTS {
            assert_eq!(header(reply, hint), None, "{slug} carries {hint}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_renderer_is_rfc_9457() {
    let replies = answers(IdempotencyLayer::from_store(Switch::default())).await;
    for (slug, reply) in replies.iter().filter(|(slug, _)| RETRYABLE.contains(slug) || FINAL.contains(slug)) {
        reply.assert_problem(reply.status.as_u16(), slug);
        assert_eq!(header(reply, "cache-control"), Some("no-store"), "{slug}");
        assert!(!reply.text().contains("distinctive"), "{slug} echoes the request: {}", reply.text());
    }
}

/// What a renderer was shown, per answer.
type Seen = Arc<Mutex<Vec<(ProblemKind, StatusCode, Option<Duration>)>>>;

#[tokio::test(start_paused = true)]
async fn the_renderer_sees_each_problem_with_its_status_and_retry_hint() {
    let seen: Seen = Arc::default();
    let renderer = {
        let seen = seen.clone();
        move |problem: &Problem| {
            seen.lock().unwrap().push((problem.kind(), problem.status(), problem.retry_after()));
            Response::builder().status(problem.status()).body(Bytes::from_static(b"rendered")).unwrap()
        }
    };
    let replies = answers(IdempotencyLayer::from_store(Switch::default()).with_problem_renderer(renderer)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (ProblemKind::MissingKey, StatusCode::BAD_REQUEST, None),
            (ProblemKind::InvalidKey, StatusCode::BAD_REQUEST, None),
            (ProblemKind::InFlight, StatusCode::CONFLICT, Some(Duration::from_millis(1500))),
            (ProblemKind::ResponseNotRetained, StatusCode::CONFLICT, None),
            (ProblemKind::RequestBodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE, None),
            (ProblemKind::KeyReused, StatusCode::UNPROCESSABLE_ENTITY, None),
            (ProblemKind::StoreUnavailable, StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_millis(2500))),
        ]
    );
    for (slug, reply) in replies.iter().filter(|(slug, _)| RETRYABLE.contains(slug) || FINAL.contains(slug)) {
        assert_eq!(reply.body, "rendered", "{slug}");
        // The layer still adds the hints, the outcome and `Cache-Control: no-store`.
        assert_eq!(header(reply, "x-should-retry").is_some(), FINAL.contains(slug), "{slug}");
        assert_eq!(header(reply, "retry-after").is_some(), RETRYABLE.contains(slug), "{slug}");
        assert_eq!(header(reply, "cache-control"), Some("no-store"), "{slug}");
        assert_ne!(reply.outcome, Outcome::Executed, "{slug}");
    }
}

/// Stripe's error envelope: `{"error": {"type": "idempotency_error", "message": ...}}`, with
/// the statuses Stripe uses (`400` for a key reused with other parameters).
fn stripe(problem: &Problem) -> Response<Bytes> {
    let (status, kind) = match problem.kind() {
        ProblemKind::InFlight | ProblemKind::ResponseNotRetained => (StatusCode::CONFLICT, "idempotency_error"),
        ProblemKind::KeyReused => (StatusCode::BAD_REQUEST, "idempotency_error"),
        ProblemKind::StoreUnavailable => (problem.status(), "api_error"),
        _ => (problem.status(), "invalid_request_error"),
    };
    let body = json!({"error": {"type": kind, "message": problem.detail()}});
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_renderer_answers_in_stripes_envelope() {
    let layer = IdempotencyLayer::from_store(Switch::default())
        .with_problem_renderer(stripe)
        .with_retry_hints(RetryHint::DEFAULT.into_iter().chain([RetryHint::ShouldRetry(STRIPE_SHOULD_RETRY)]));
    let replies = answers(layer).await;
    let reply = |wanted: &str| &replies.iter().find(|(slug, _)| *slug == wanted).unwrap().1;

    let reused = reply("key-reused");
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert_eq!(header(reused, "content-type"), Some("application/json"));
    assert_eq!(header(reused, "stripe-should-retry"), Some("false"));
    let json: Value = serde_json::from_slice(&reused.body).unwrap();
    assert_eq!(json["error"]["type"], "idempotency_error");
    assert_eq!(json["error"]["message"], "This idempotency key was already used with a different request.");
    assert_eq!(json.as_object().unwrap().len(), 1, "{json}");

    let in_flight = reply("in-flight");
    assert_eq!(in_flight.status, StatusCode::CONFLICT);
    assert_eq!(serde_json::from_slice::<Value>(&in_flight.body).unwrap()["error"]["type"], "idempotency_error");
    assert_eq!(header(in_flight, "retry-after"), Some("2"));
    assert_eq!(header(in_flight, "stripe-should-retry"), None);

    let unavailable = reply("store-unavailable");
    assert_eq!(serde_json::from_slice::<Value>(&unavailable.body).unwrap()["error"]["type"], "api_error");
    for (slug, reply) in &replies {
        assert!(!reply.text().contains("distinctive-key"), "{slug} echoes the key");
    }
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param": null, "code"}}`.
fn openai(problem: &Problem) -> Response<Bytes> {
    let kind = match problem.status().as_u16() {
        503 => "server_error",
        409 => "conflict_error",
        _ => "invalid_request_error",
    };
    let message = match problem.retry_after() {
        Some(after) => format!("{} Retry after {} ms.", problem.detail(), after.as_millis()),
        None => problem.detail().into_owned(),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": problem.kind().slug().replace('-', "_")}});
    Response::builder()
        .status(problem.status())
        .header(CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_renderer_answers_in_openais_envelope() {
    let replies = answers(IdempotencyLayer::from_store(Switch::default()).with_problem_renderer(openai)).await;
    for (slug, reply) in replies.iter().filter(|(slug, _)| RETRYABLE.contains(slug) || FINAL.contains(slug)) {
        assert_eq!(header(reply, "content-type"), Some("application/json"), "{slug}");
        let json: Value = serde_json::from_slice(&reply.body).unwrap();
        let error = json["error"].as_object().unwrap_or_else(|| panic!("{slug}: {json}"));
        let mut keys: Vec<_> = error.keys().collect();
        keys.sort();
        assert_eq!(keys, ["code", "message", "param", "type"], "{slug}");
        assert_eq!(error["param"], Value::Null);
        assert_eq!(error["code"], slug.replace('-', "_"));
        assert!(!reply.text().contains("distinctive"), "{slug} echoes the request");
    }
    let in_flight = &replies.iter().find(|(slug, _)| *slug == "in-flight").unwrap().1;
    let json: Value = serde_json::from_slice(&in_flight.body).unwrap();
    assert_eq!(json["error"]["type"], "conflict_error");
    assert!(json["error"]["message"].as_str().unwrap().ends_with("Retry after 1500 ms."), "{json}");
    assert_eq!(header(in_flight, "retry-after-ms"), Some("1500"));
}

/// An invalid key is told which rule it broke, and a body over the limit the limit, without
/// echoing the request.
#[tokio::test]
async fn an_invalid_key_hears_the_rule_it_broke_and_a_large_body_the_limit() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_request_body(1000), runs.clone());
    let long = "k".repeat(256);
    let cases: [(&[&str], &str); 5] = [
        (&[""], "is empty"),
        (&[&long], "longer than 255 bytes"),
        (&["has space"], "not visible ASCII"),
        (&["\"open-quote"], "not a well-formed quoted string"),
        (&["first-key", "second-key"], "sent more than once"),
    ];
    for (values, rule) in cases {
        let mut request = post("/orders", "placeholder", "{}");
        request.headers_mut().remove("idempotency-key");
        for value in values {
            request.headers_mut().append("idempotency-key", value.parse().unwrap());
        }
        let reply = send(&svc, request).await;
        reply.assert_problem(400, "invalid-key");
        let detail = reply.problem()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(rule), "{values:?}: {detail}");
        for value in values.iter().filter(|v| v.len() > 3) {
            assert!(!reply.text().contains(value.trim_start_matches('"')), "the answer echoes the key: {detail}");
        }
    }

    let reply = send(&svc, post("/orders", "big-1", "x".repeat(1001).leak())).await;
    reply.assert_problem(413, "request-body-too-large");
    let detail = reply.problem()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("1000 bytes"), "{detail}");
    assert_eq!(runs.get(), 0);
}

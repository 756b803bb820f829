//! Every rule of the guide's request path, driven through `tower::ServiceExt`.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{Reply, Runs, post, send, service};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tower::ServiceExt;
use tower_idempotency::{
    Duplicates, IdempotencyLayer, KeyPolicy, Outcome, Scope, ScopeId, StoreFailure, problem,
    store::{IdempotencyStore, LiveLog, MemoryStore},
};

fn request(method: Method, uri: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

#[tokio::test]
async fn uncovered_methods_pass_through_even_with_a_key() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for _ in 0..2 {
            let reply = send(&svc, request(method.clone(), "/orders/1", Some("k-1"), "{}")).await;
            assert_eq!(reply.status, StatusCode::CREATED);
            assert!(!reply.replayed());
            assert_eq!(reply.outcome, Outcome::Bypassed);
        }
    }
    assert_eq!(runs.get(), 6);
}

#[tokio::test]
async fn covered_methods_are_configurable() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_methods([Method::PUT]), runs.clone());
    send(&svc, request(Method::PUT, "/a", Some("k"), "{}")).await;
    assert!(send(&svc, request(Method::PUT, "/a", Some("k"), "{}")).await.replayed());
    // POST is no longer covered.
    send(&svc, request(Method::POST, "/a", Some("k2"), "{}")).await;
    assert!(!send(&svc, request(Method::POST, "/a", Some("k2"), "{}")).await.replayed());
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn no_key_passes_through_by_default() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    for _ in 0..2 {
        let reply = send(&svc, request(Method::POST, "/orders", None, "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn required_key_answers_400_without_running_the_handler() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_key_policy(KeyPolicy::Required), runs.clone());
    let reply = send(&svc, request(Method::POST, "/payments", None, "{}")).await;
    reply.assert_problem(400, "missing-key");
    assert_eq!(reply.outcome, Outcome::MissingKey);
    assert_eq!(reply.problem()["detail"], "This endpoint requires an Idempotency-Key header.");
    assert_eq!(runs.get(), 0);
    // Uncovered methods still pass without a key.
    assert_eq!(send(&svc, request(Method::GET, "/payments", None, "")).await.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn quoted_and_bare_keys_are_one_key() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let first = send(&svc, post("/orders", "\"abc-123\"", "{}")).await;
    let second = send(&svc, post("/orders", "abc-123", "{}")).await;
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!(first.body, second.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn invalid_keys_answer_400() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let long = "k".repeat(256);
    let cases: Vec<(&str, http::HeaderValue)> = vec![
        ("empty", http::HeaderValue::from_static("")),
        ("too long", http::HeaderValue::from_str(&long).unwrap()),
        ("space", http::HeaderValue::from_static("a b")),
        ("tab", http::HeaderValue::from_bytes(b"a\tb").unwrap()),
        ("non-ascii", http::HeaderValue::from_bytes("clé".as_bytes()).unwrap()),
        ("obs-text", http::HeaderValue::from_bytes(b"a\xffb").unwrap()),
        ("unterminated quote", http::HeaderValue::from_static("\"abc")),
        ("quote inside", http::HeaderValue::from_static("\"a\"b\"")),
        ("bad escape", http::HeaderValue::from_static("\"a\\nb\"")),
        ("empty quoted", http::HeaderValue::from_static("\"\"")),
    ];
    for (case, value) in cases {
        let mut req = request(Method::POST, "/orders", None, "{}");
        req.headers_mut().insert("idempotency-key", value);
        let reply = send(&svc, req).await;
        reply.assert_problem(400, "invalid-key");
        assert_eq!(reply.outcome, Outcome::InvalidKey, "{case}");
    }
    // Two fields, even with the same value.
    let mut req = request(Method::POST, "/orders", None, "{}");
    req.headers_mut().append("idempotency-key", "a".parse().unwrap());
    req.headers_mut().append("idempotency-key", "a".parse().unwrap());
    send(&svc, req).await.assert_problem(400, "invalid-key");
    // The longest valid key is accepted.
    let max = "k".repeat(255);
    let mut req = request(Method::POST, "/orders", None, "{}");
    req.headers_mut().insert("idempotency-key", max.parse().unwrap());
    assert_eq!(send(&svc, req).await.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn header_name_is_configurable() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().try_with_header_name("x-request-key").unwrap();
    let svc = service(layer, runs.clone());
    let req = || Request::post("/a").header("x-request-key", "k").body(Full::new(Bytes::new())).unwrap();
    send(&svc, req()).await;
    assert!(send(&svc, req()).await.replayed());
    assert!(IdempotencyLayer::new().try_with_header_name("bad header").is_err());
    // Required there, a request without it is asked for an idempotency key header, never for
    // an `Idempotency-Key` it would not read.
    let layer =
        IdempotencyLayer::new().try_with_header_name("x-request-key").unwrap().with_key_policy(KeyPolicy::Required);
    let svc = service(layer, runs.clone());
    let mut req = request(Method::POST, "/a", None, "{}");
    req.headers_mut().insert("idempotency-key", "k".parse().unwrap());
    let reply = send(&svc, req).await;
    reply.assert_problem(400, "missing-key");
    assert_eq!(reply.problem()["detail"], "This endpoint requires an idempotency key header.");
    assert_eq!(runs.get(), 1);
}

fn with_auth(mut req: Request<Full<Bytes>>, auth: &'static str) -> Request<Full<Bytes>> {
    req.headers_mut().insert("authorization", auth.parse().unwrap());
    req
}

#[tokio::test]
async fn default_scope_keeps_tenants_apart() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let a = send(&svc, with_auth(post("/orders", "shared", "{}"), "Bearer tenant-a")).await;
    let b = send(&svc, with_auth(post("/orders", "shared", "{}"), "Bearer tenant-b")).await;
    assert!(!a.replayed() && !b.replayed(), "tenant B must never get tenant A's response");
    assert_ne!(a.body, b.body);
    // Anonymous requests are a third namespace.
    assert!(!send(&svc, post("/orders", "shared", "{}")).await.replayed());
    // Within a tenant, the key replays.
    let again = send(&svc, with_auth(post("/orders", "shared", "{}"), "Bearer tenant-a")).await;
    assert!(again.replayed());
    assert_eq!(again.body, a.body);
    assert_eq!(runs.get(), 3);
}

#[derive(Clone)]
struct Tenant(&'static str);

#[tokio::test]
async fn custom_scope_from_an_extension() {
    let runs = Runs::default();
    let scope =
        Scope::from_fn(|head: &http::request::Parts| head.extensions.get::<Tenant>().map(|t| ScopeId::digest(t.0)));
    let svc = service(IdempotencyLayer::new().with_scope(scope), runs.clone());
    let as_tenant = |tenant| {
        let mut req = post("/orders", "k", "{}");
        req.extensions_mut().insert(Tenant(tenant));
        // The Authorization header no longer scopes.
        req.headers_mut().insert("authorization", "Bearer same-for-all".parse().unwrap());
        req
    };
    assert!(!send(&svc, as_tenant("a")).await.replayed());
    assert!(!send(&svc, as_tenant("b")).await.replayed());
    assert!(send(&svc, as_tenant("a")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn no_scope_shares_keys_across_callers() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_scope(Scope::none()), runs.clone());
    send(&svc, with_auth(post("/orders", "k", "{}"), "Bearer a")).await;
    assert!(send(&svc, with_auth(post("/orders", "k", "{}"), "Bearer b")).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_key_reused_for_another_request_answers_422() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    send(&svc, post("/orders?x=1", "k", r#"{"sku":"A"}"#)).await;
    let different = [
        post("/orders?x=1", "k", r#"{"sku":"B"}"#),
        post("/other?x=1", "k", r#"{"sku":"A"}"#),
        post("/orders?x=2", "k", r#"{"sku":"A"}"#),
        post("/orders", "k", r#"{"sku":"A"}"#),
        request(Method::PATCH, "/orders?x=1", Some("k"), r#"{"sku":"A"}"#),
    ];
    for req in different {
        let reply = send(&svc, req).await;
        reply.assert_problem(422, "key-reused");
        assert_eq!(reply.outcome, Outcome::KeyReused);
    }
    // Headers are not fingerprinted by default: this is the same request.
    let mut same = post("/orders?x=1", "k", r#"{"sku":"A"}"#);
    same.headers_mut().insert("x-trace", "other".parse().unwrap());
    assert!(send(&svc, same).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn fingerprinted_headers_count() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_fingerprint_headers([http::HeaderName::from_static("x-account")]);
    let svc = service(layer, runs.clone());
    let mut a = post("/orders", "k", "{}");
    a.headers_mut().insert("x-account", "1".parse().unwrap());
    send(&svc, a).await;
    let mut b = post("/orders", "k", "{}");
    b.headers_mut().insert("x-account", "2".parse().unwrap());
    send(&svc, b).await.assert_problem(422, "key-reused");
}

#[tokio::test(start_paused = true)]
async fn a_key_reused_while_in_flight_with_another_payload_answers_422() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut slow = post("/orders", "k", "first");
    slow.headers_mut().insert("x-delay-ms", "200".parse().unwrap());
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(&svc, post("/orders", "k", "second")).await.assert_problem(422, "key-reused");
    let dup = send(&svc, post("/orders", "k", "first")).await;
    dup.assert_problem(409, "in-flight");
    assert_eq!(dup.headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

#[tokio::test]
async fn request_body_over_the_limit_answers_413() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_request_body(16), runs.clone());
    let reply = send(&svc, post("/orders", "k", "this body is longer than sixteen bytes")).await;
    reply.assert_problem(413, "request-body-too-large");
    assert_eq!(reply.outcome, Outcome::RequestBodyTooLarge);
    assert_eq!(runs.get(), 0);
    // Exactly at the limit is fine, and the handler sees the whole body.
    let reply = send(&svc, post("/orders", "k2", "sixteen bytes!!!")).await;
    assert_eq!(reply.text(), "run 1: sixteen bytes!!!");
    // Without a key the body is not buffered, so the limit does not apply.
    let reply = send(&svc, request(Method::POST, "/orders", None, "this body is longer than sixteen bytes")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
}

#[tokio::test]
async fn replay_is_faithful_and_leaves_out_what_must_not_be_replayed() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let first = send(&svc, post("/orders", "k", "payload")).await;
    let replay = send(&svc, post("/orders", "k", "payload")).await;
    assert_eq!(runs.get(), 1);
    assert_eq!(first.outcome, Outcome::Executed);
    assert_eq!(replay.outcome, Outcome::Replayed);
    assert!(!first.replayed());
    assert!(replay.replayed());
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.text(), "run 1: payload");
    assert_eq!(replay.headers["content-type"], "text/plain");
    let multi: Vec<_> = replay.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(replay.headers["content-length"], first.body.len().to_string());
    // The first caller got its cookie and every header; the replay does not carry them.
    assert!(first.headers.contains_key("set-cookie"));
    for gone in ["set-cookie", "connection", "x-hop", "keep-alive", "date"] {
        assert!(!replay.headers.contains_key(gone), "{gone} must not be replayed");
    }
}

#[tokio::test]
async fn unstored_headers_are_configurable() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_unstored_headers([http::HeaderName::from_static("x-multi")]);
    let svc = service(layer, runs.clone());
    send(&svc, post("/orders", "k", "")).await;
    let replay = send(&svc, post("/orders", "k", "")).await;
    assert!(replay.headers.contains_key("set-cookie"));
    assert!(!replay.headers.contains_key("x-multi"));
}

#[tokio::test]
async fn non_2xx_responses_release_the_key() {
    for status in ["400", "404", "409", "422", "429", "500", "503"] {
        let runs = Runs::default();
        let svc = service(IdempotencyLayer::new(), runs.clone());
        let mut failing = post("/orders", "k", "{}");
        failing.headers_mut().insert("x-status", status.parse().unwrap());
        let reply = send(&svc, failing).await;
        assert_eq!(reply.status.as_str(), status);
        assert_eq!(reply.outcome, Outcome::Executed);
        let retry = send(&svc, post("/orders", "k", "{}")).await;
        assert_eq!(retry.status, StatusCode::CREATED, "after {status}");
        assert!(!retry.replayed());
        assert_eq!(runs.get(), 2, "after {status}");
        assert!(send(&svc, post("/orders", "k", "{}")).await.replayed());
    }
}

#[tokio::test]
async fn the_cache_predicate_decides_what_is_recorded() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new()
        .with_cache_predicate(|head: &http::response::Parts| head.status.is_success() || head.status == 404);
    let svc = service(layer, runs.clone());
    let mut not_found = post("/orders", "k", "{}");
    not_found.headers_mut().insert("x-status", "404".parse().unwrap());
    send(&svc, not_found).await;
    let replay = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(replay.status, StatusCode::NOT_FOUND);
    assert!(replay.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn an_inner_service_error_releases_the_key() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut failing = post("/orders", "k", "{}");
    failing.headers_mut().insert("x-error", "1".parse().unwrap());
    assert!(svc.clone().oneshot(failing).await.is_err());
    assert_eq!(send(&svc, post("/orders", "k", "{}")).await.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_panicking_handler_releases_the_key() {
    let runs = Runs::default();
    let svc = tower::ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(service(IdempotencyLayer::new(), runs.clone()));
    let mut panicking = post("/orders", "k", "{}");
    panicking.headers_mut().insert("x-panic", "1".parse().unwrap());
    let reply = svc.clone().oneshot(panicking).await.unwrap();
    assert_eq!(reply.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = svc.clone().oneshot(post("/orders", "k", "{}")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_failing_response_body_releases_the_key() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut failing = post("/orders", "k", "{}");
    failing.headers_mut().insert("x-body-error", "1".parse().unwrap());
    let response = svc.clone().oneshot(failing).await.unwrap();
    assert!(http_body_util::BodyExt::collect(response.into_body()).await.is_err());
    let retry = send(&svc, post("/orders", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_response_over_the_record_limit_leaves_a_not_retained_record() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_max_record(1000), runs.clone());
    // Known length over the limit, and a stream that passes it midway.
    for (key, header, value, len) in [("k1", "x-big", "5000", 5000), ("k2", "x-chunks", "200", 1890)] {
        let mut big = post("/large", key, "{}");
        big.headers_mut().insert(header, value.parse().unwrap());
        let first = send(&svc, big).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(first.body.len(), len, "the first caller gets the whole body");
        let retry = send(&svc, post("/large", key, "{}")).await;
        retry.assert_problem(409, "response-not-retained");
        assert!(!retry.headers.contains_key("retry-after"));
        assert_eq!(retry.outcome, Outcome::ResponseNotRetained);
        // A different payload is still a mismatch.
        send(&svc, post("/large", key, "other")).await.assert_problem(422, "key-reused");
    }
    assert_eq!(runs.get(), 2, "the handler never runs twice for one key");
    // Just under the limit is recorded.
    let mut fits = post("/large", "k3", "{}");
    fits.headers_mut().insert("x-big", "1000".parse().unwrap());
    send(&svc, fits).await;
    let replay = send(&svc, post("/large", "k3", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body.len(), 1000);
}

#[tokio::test]
async fn streamed_responses_are_recorded_and_trailers_replayed() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let mut stream = post("/stream", "k", "{}");
    stream.headers_mut().insert("x-chunks", "4".parse().unwrap());
    let first = send(&svc, stream).await;
    assert_eq!(first.text(), "chunk-0;chunk-1;chunk-2;chunk-3;");
    let replay = send(&svc, post("/stream", "k", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(runs.get(), 1);

    // Trailers (gRPC keeps its status there) are recorded too.
    let with_trailers = tower::service_fn(|_req: Request<tower_idempotency::RequestBody<Full<Bytes>>>| async {
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"msg"))),
            Ok(http_body::Frame::trailers({
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t
            })),
        ]);
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::StreamBody::new(frames)))
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::new(), with_trailers);
    let read = |r: http::Response<_>| async move {
        let collected = http_body_util::BodyExt::collect(r.into_body()).await.unwrap();
        (collected.trailers().cloned(), collected.to_bytes())
    };
    let first = read(svc.clone().oneshot(post("/grpc", "k", "")).await.unwrap()).await;
    let replay = svc.clone().oneshot(post("/grpc", "k", "")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay = read(replay).await;
    assert_eq!(first, replay);
    assert_eq!(replay.0.unwrap()["grpc-status"], "0");
}

/// A store that always fails, as an unreachable one does.
#[derive(Debug, Clone, Default)]
struct DownStore;

impl IdempotencyStore for DownStore {
    fn outlives_process(&self) -> bool {
        false
    }

    async fn begin(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::Fingerprint,
        _: Duration,
    ) -> Result<tower_idempotency::store::Begin, tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
    async fn complete(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::LockToken,
        _: tower_idempotency::store::Record,
        _: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
    async fn renew(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::LockToken,
        _: Duration,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
    async fn release(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::LockToken,
    ) -> Result<bool, tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
}

impl LiveLog for DownStore {
    async fn publish(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::LockToken,
        _: u64,
        _: Vec<tower_idempotency::store::LiveEvent>,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
    async fn follow(
        &self,
        _: &tower_idempotency::store::StoreKey,
        _: &tower_idempotency::store::Fingerprint,
        _: Option<tower_idempotency::store::LiveCursor>,
        _: Duration,
    ) -> Result<tower_idempotency::store::Followed, tower_idempotency::store::StoreError> {
        Err(tower_idempotency::store::StoreError::unavailable("connection refused"))
    }
}

#[tokio::test]
async fn store_failure_fails_closed_by_default() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(DownStore), runs.clone());
    let reply = send(&svc, post("/orders", "k", "{}")).await;
    reply.assert_problem(503, "store-unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.outcome, Outcome::StoreUnavailable);
    assert_eq!(runs.get(), 0);
    // Requests without a key never touch the store.
    assert_eq!(send(&svc, request(Method::POST, "/orders", None, "{}")).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn store_failure_can_fail_open() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::from_store(DownStore).with_store_failure(StoreFailure::FailOpen), runs.clone());
    for _ in 0..2 {
        let reply = send(&svc, post("/orders", "k", "body")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text().split(':').nth(1), Some(" body"), "the handler got the buffered body");
        assert_eq!(reply.outcome, Outcome::Unprotected);
    }
    assert_eq!(runs.get(), 2);
}

/// A `Retry-After` of `Duration::MAX` (or any huge value) renders as the most seconds the
/// header can say, rounded up and saturating: never an overflow, a panic or a broken answer.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_saturates() {
    const MOST: &str = "18446744073709551615"; // u64::MAX seconds
    let runs = Runs::default();
    for retry_after in [Duration::MAX, Duration::new(u64::MAX, 1), Duration::from_secs(u64::MAX)] {
        let layer = IdempotencyLayer::new().with_duplicates(Duplicates::Reject { retry_after });
        let svc = service(layer, runs.clone());
        let mut slow = post("/slow", "k", "{}");
        slow.headers_mut().insert("x-delay-ms", "100".parse().unwrap());
        let running = tokio::spawn(send(&svc, slow));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let reply = send(&svc, post("/slow", "k", "{}")).await;
        reply.assert_problem(409, "in-flight");
        assert_eq!(reply.headers["retry-after"], MOST, "{retry_after:?}");
        assert_eq!(running.await.unwrap().status, StatusCode::CREATED);

        let down = service(
            IdempotencyLayer::from_store(DownStore).with_store_failure(StoreFailure::FailClosed { retry_after }),
            runs.clone(),
        );
        let reply = send(&down, post("/orders", "k", "{}")).await;
        reply.assert_problem(503, "store-unavailable");
        assert_eq!(reply.headers["retry-after"], MOST, "{retry_after:?}");
        assert_eq!(reply.outcome, Outcome::StoreUnavailable);
    }
    assert_eq!(runs.get(), 3, "only the first request of each round ran");
}

#[tokio::test(start_paused = true)]
async fn every_problem_is_problem_json_and_echoes_nothing() {
    const KEY: &str = "very-distinctive-key-4711";
    const BODY: &str = "very-distinctive-body-0815";
    let runs = Runs::default();
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::from_store(store.clone()).with_max_request_body(64).with_max_record(8);
    let svc = service(layer.clone(), runs.clone());
    let required = service(layer.clone().with_key_policy(KeyPolicy::Required), runs.clone());
    let down = service(IdempotencyLayer::from_store(DownStore), runs.clone());

    let key = |n: u8| -> &'static str { format!("{KEY}-{n}").leak() };
    let mut slow = post("/slow", key(1), BODY);
    slow.headers_mut().insert("x-delay-ms", "100".parse().unwrap());
    let running = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(&svc, post("/not-retained", key(2), BODY)).await; // the body is over 8 bytes: not-retained record

    let mut bad_key = post("/x", key(3), BODY);
    bad_key.headers_mut().insert("idempotency-key", format!("{KEY} with spaces").parse().unwrap());
    let answers = [
        (send(&required, request(Method::POST, "/x", None, BODY)).await, 400, "missing-key"),
        (send(&svc, bad_key).await, 400, "invalid-key"),
        (send(&svc, post("/slow", key(1), BODY)).await, 409, "in-flight"),
        (send(&svc, post("/not-retained", key(2), BODY)).await, 409, "response-not-retained"),
        (send(&svc, post("/x", key(4), "x".repeat(65).leak())).await, 413, "request-body-too-large"),
        (send(&svc, post("/slow", key(1), "another body")).await, 422, "key-reused"),
        (send(&down, post("/x", key(5), BODY)).await, 503, "store-unavailable"),
    ];
    for (reply, status, slug) in answers {
        reply.assert_problem(status, slug);
        assert_eq!(reply.problem()["type"], format!("{}", problem_type(slug)));
        let text = reply.text();
        assert!(!text.contains("distinctive"), "{slug} echoes the request: {text}");
        let retry_after = reply.headers.contains_key("retry-after");
        assert_eq!(retry_after, matches!(slug, "in-flight" | "store-unavailable"), "{slug}");
    }
    running.await.unwrap();
}

fn problem_type(slug: &str) -> &'static str {
    match slug {
        "missing-key" => problem::MISSING_KEY,
        "invalid-key" => problem::INVALID_KEY,
        "in-flight" => problem::IN_FLIGHT,
        "response-not-retained" => problem::RESPONSE_NOT_RETAINED,
        "request-body-too-large" => problem::REQUEST_BODY_TOO_LARGE,
        "key-reused" => problem::KEY_REUSED,
        "store-unavailable" => problem::STORE_UNAVAILABLE,
        other => panic!("unknown problem {other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_the_ttl_and_replays_do_not_extend_it() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new().with_ttl(Duration::from_secs(60)), runs.clone());
    send(&svc, post("/orders", "k", "{}")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(send(&svc, post("/orders", "k", "{}")).await.replayed());
    tokio::time::advance(Duration::from_secs(2)).await;
    let after = send(&svc, post("/orders", "k", "{}")).await;
    assert!(!after.replayed(), "60 s after completion the key is free, replays notwithstanding");
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_answers_duplicates_with_the_first_response() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_duplicates(Duplicates::Wait { timeout: Duration::from_secs(10) });
    let svc = service(layer, runs.clone());
    let mut slow = post("/jobs", "k", "{}");
    slow.headers_mut().insert("x-delay-ms", "3000".parse().unwrap());
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, slow).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = send(&svc, post("/jobs", "k", "{}")).await;
    let first = first.await.unwrap();
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(runs.get(), 1);

    // Past the wait bound: 409.
    let mut slower = post("/jobs", "k2", "{}");
    slower.headers_mut().insert("x-delay-ms", "60000".parse().unwrap());
    tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, slower).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = tokio::time::Instant::now();
    let waited = send(&svc, post("/jobs", "k2", "{}")).await;
    waited.assert_problem(409, "in-flight");
    assert!(start.elapsed() >= Duration::from_secs(10));
}

#[tokio::test]
async fn reply_helper_reads_outcomes() {
    // Keeps `Reply` honest: a replayed header without the extension would be a bug.
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let first: Reply = send(&svc, post("/a", "k", "")).await;
    assert_eq!(first.outcome, Outcome::Executed);
}

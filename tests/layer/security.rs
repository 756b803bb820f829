//! The claims of SECURITY.md, one test each.

use crate::common;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use common::{Runs, post, send, service};
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, Outcome, Scope, ScopeId, store::StoreKey};

fn as_caller(mut request: Request<http_body_util::Full<Bytes>>, auth: &str) -> Request<http_body_util::Full<Bytes>> {
    request.headers_mut().insert("authorization", auth.parse().unwrap());
    request
}

/// An attacker who knows a victim's key, under the default scope, learns nothing: not the
/// response (no replay), not that the key was used (no `422`), not that it is running (no `409`).
#[tokio::test(start_paused = true)]
async fn a_known_key_in_another_scope_reveals_nothing() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let victim = "Bearer victim";
    let attacker = "Bearer attacker";
    let first = send(&svc, as_caller(post("/payments", "victims-key", r#"{"amount":100}"#), victim)).await;
    assert_eq!(first.outcome, Outcome::Executed);
    // Same request: a fresh execution of the attacker's own, never the victim's response.
    let same = send(&svc, as_caller(post("/payments", "victims-key", r#"{"amount":100}"#), attacker)).await;
    assert_eq!(same.outcome, Outcome::Executed);
    assert_ne!(same.body, first.body);
    // Another body: no 422, so no oracle for "this key was used".
    let other = send(&svc, as_caller(post("/payments", "other-key", r#"{"amount":1}"#), victim)).await;
    assert_eq!(other.outcome, Outcome::Executed);
    let probe = send(&svc, as_caller(post("/payments", "other-key", r#"{"probe":true}"#), attacker)).await;
    assert_eq!(probe.outcome, Outcome::Executed, "a 422 here would tell the attacker the key was used");
    // A victim's request still running: no 409 for the attacker either.
    let mut slow = as_caller(post("/payments", "running-key", "{}"), victim);
    slow.headers_mut().insert("x-delay-ms", "5000".parse().unwrap());
    let running = tokio::spawn(send(&svc, slow));
    tokio::task::yield_now().await;
    let probe = send(&svc, as_caller(post("/payments", "running-key", "{}"), attacker)).await;
    assert_eq!(probe.outcome, Outcome::Executed);
    assert_eq!(running.await.unwrap().outcome, Outcome::Executed);
    // Within the victim's own scope the rules apply as usual.
    let again = send(&svc, as_caller(post("/payments", "victims-key", r#"{"amount":100}"#), victim)).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
}

/// The same holds for a custom scope (a tenant header set by a gateway): tenants never see each
/// other's responses or `422`s, whatever `Authorization` says.
#[tokio::test]
async fn a_custom_scope_keeps_tenants_apart() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new().with_scope(Scope::header(HeaderName::from_static("x-tenant")));
    let svc = service(layer, runs.clone());
    let as_tenant = |tenant: &str, body: &'static str| {
        let mut request = as_caller(post("/orders", "k", body), "Bearer shared-service-token");
        request.headers_mut().insert("x-tenant", tenant.parse().unwrap());
        request
    };
    let a = send(&svc, as_tenant("a", "{}")).await;
    let b = send(&svc, as_tenant("b", "{}")).await;
    assert_eq!((a.outcome, b.outcome), (Outcome::Executed, Outcome::Executed));
    assert_ne!(a.body, b.body);
    assert_eq!(send(&svc, as_tenant("b", r#"{"other":1}"#)).await.outcome, Outcome::KeyReused);
    assert_eq!(send(&svc, as_tenant("c", r#"{"other":1}"#)).await.outcome, Outcome::Executed);
    let replay = send(&svc, as_tenant("a", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, a.body);
    assert_eq!(runs.get(), 3);
}

/// Requests without `Authorization` share one namespace (documented): one anonymous caller can
/// replay another's response. Scope by an identity your auth layer sets if that matters.
#[tokio::test]
async fn anonymous_requests_share_one_namespace() {
    let runs = Runs::default();
    let svc = service(IdempotencyLayer::new(), runs.clone());
    let first = send(&svc, post("/orders", "k", "{}")).await;
    let second = send(&svc, post("/orders", "k", "{}")).await;
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    // The cookie the first anonymous caller got is not part of the replay.
    assert!(first.headers.contains_key("set-cookie"));
    assert!(!second.headers.contains_key("set-cookie"));
    assert_eq!(runs.get(), 1);
}

/// A body that never ends is cut at the limit: the layer holds at most the limit (plus one
/// chunk) per request, answers `413`, and the handler never runs.
#[tokio::test]
async fn an_endless_request_body_is_cut_at_the_limit() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let handler = tower::service_fn(move |_request: Request<tower_idempotency::RequestBody<Endless>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new()))) }
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::new().with_max_request_body(64 * 1024), handler);
    let chunk: Box<dyn FnMut() -> Result<http_body::Frame<Bytes>, Infallible> + Send> =
        Box::new(|| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 1024]))));
    let endless: Endless = StreamBody::new(futures_util::stream::repeat_with(chunk));
    let request = Request::post("/orders").header("idempotency-key", "k").body(endless).unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(Outcome::of(&response), Outcome::RequestBodyTooLarge);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.len() < 512, "a static problem body");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

type Endless = StreamBody<
    futures_util::stream::RepeatWith<Box<dyn FnMut() -> Result<http_body::Frame<Bytes>, Infallible> + Send>>,
>;

/// Keys, scopes and store keys print no secret: a key only as its length, a scope as a digest
/// prefix, never the `Authorization` value.
#[test]
fn debug_output_hides_keys_and_credentials() {
    let key = IdempotencyKey::parse(b"secret-key-4711").unwrap();
    let scope = ScopeId::digest("Bearer secret-token-0815");
    let store_key = StoreKey::new(Some(scope), key.clone());
    for text in [format!("{key:?}"), format!("{scope:?}"), format!("{store_key:?}")] {
        assert!(!text.contains("4711") && !text.contains("0815") && !text.contains("secret"), "{text}");
    }
}

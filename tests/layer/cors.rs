//! Browsers: a page calling the API from another origin reads `Idempotent-Replayed` and the
//! retry hints only if the CORS layer exposes them. `EXPOSE_HEADERS` is that one setting, here
//! through tower-http's `CorsLayer`: a real preflight, then real responses.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{Router, body::Body, routing::post};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use tower::ServiceExt;
use tower_http::cors::CorsLayer;
use tower_idempotency::{EXPOSE_HEADERS, IDEMPOTENCY_KEY, IdempotencyLayer};

const ORIGIN: &str = "https://shop.example";

fn app(runs: Arc<AtomicUsize>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(HeaderValue::from_static(ORIGIN))
        .allow_methods([Method::POST])
        .allow_headers([IDEMPOTENCY_KEY, header::CONTENT_TYPE])
        .expose_headers(EXPOSE_HEADERS);
    let handler = move || {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        async move { (StatusCode::CREATED, format!(r#"{{"id":"ord_{n}"}}"#)) }
    };
    let layer = IdempotencyLayer::new().with_expired_grace(std::time::Duration::from_secs(3600));
    Router::new().route("/orders", post(handler)).layer(layer).layer(cors)
}

fn order(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header(header::ORIGIN, ORIGIN)
        .header(IDEMPOTENCY_KEY, key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

/// The names in `Access-Control-Expose-Headers`, lowercased.
fn exposed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCESS_CONTROL_EXPOSE_HEADERS)
        .iter()
        .flat_map(|value| value.to_str().unwrap().split(',').map(|name| name.trim().to_ascii_lowercase()))
        .collect()
}

#[tokio::test]
async fn a_cross_origin_page_can_read_the_replay_marker_and_the_retry_hints() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(runs.clone());

    // The preflight the browser sends before a POST with an Idempotency-Key.
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/orders")
        .header(header::ORIGIN, ORIGIN)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "idempotency-key,content-type")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(preflight).await.unwrap();
    assert!(response.status().is_success(), "{:?}", response.status());
    assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], ORIGIN);
    let allowed = response.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("idempotency-key"), "{allowed}");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the preflight runs nothing");

    // The order, then its retry: a replay whose marker the page may read.
    let first = app.clone().oneshot(order("order-1", r#"{"sku":"A1"}"#)).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let retry = app.clone().oneshot(order("order-1", r#"{"sku":"A1"}"#)).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], ORIGIN);
    assert!(exposed(retry.headers()).contains(&"idempotent-replayed".to_owned()), "{:?}", exposed(retry.headers()));
    // How long the key is kept (an expired grace is set): readable by the page too.
    assert!(retry.headers().contains_key("idempotency-key-retention"));
    assert!(
        exposed(retry.headers()).contains(&"idempotency-key-retention".to_owned()),
        "{:?}",
        exposed(retry.headers())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The layer's own answer: its retry hint is exposed too.
    let reused = app.oneshot(order("order-1", r#"{"sku":"B2"}"#)).await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.headers()["x-should-retry"], "false");
    let names = exposed(reused.headers());
    for name in EXPOSE_HEADERS {
        assert!(names.contains(&name.as_str().to_owned()), "{name} not in {names:?}");
    }
}

//! `SetIdempotencyKeyLayer`: which requests get a key, which key, and that a retry layer inside it
//! sends every attempt with that key.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, request::Parts};
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer, service_fn};
use tower_idempotency::{
    IdempotencyKey,
    client::{ExponentialBackoff, KeyDeriver, RetryPolicy, SetIdempotencyKeyLayer},
};
use tower_test::mock;

/// Sends `request` through `layer` to a server that answers `200` and returns the key header
/// the server saw (if any) and the response.
async fn through(
    layer: SetIdempotencyKeyLayer<impl tower_idempotency::client::KeyGenerator + Clone>,
    request: Request<()>,
    header: &str,
) -> (Option<HeaderValue>, Response<()>) {
    let seen = Arc::new(Mutex::new(None));
    let server = service_fn({
        let seen = seen.clone();
        let header = HeaderName::from_bytes(header.as_bytes()).unwrap();
        move |request: Request<()>| {
            *seen.lock().unwrap() = Some(request.headers().get_all(&header).iter().cloned().collect::<Vec<_>>());
            async { Ok::<_, Infallible>(Response::new(())) }
        }
    });
    let response = ServiceBuilder::new().layer(layer).service(server).oneshot(request).await.unwrap();
    let values = seen.lock().unwrap().take().unwrap();
    assert!(values.len() <= 1, "one key header at most: {values:?}");
    (values.into_iter().next(), response)
}

fn request(method: Method) -> Request<()> {
    Request::builder().method(method).uri("/orders").body(()).unwrap()
}

#[tokio::test]
async fn post_and_patch_get_a_fresh_valid_key() {
    for method in [Method::POST, Method::PATCH] {
        let (key, response) = through(SetIdempotencyKeyLayer::new(), request(method.clone()), "idempotency-key").await;
        let key = key.unwrap_or_else(|| panic!("{method} was not stamped"));
        // What the server layer accepts, and a UUID v4 by default.
        let parsed = IdempotencyKey::parse(key.as_bytes()).unwrap();
        assert_eq!(uuid_version(parsed.as_str()), 4);
        assert_eq!(response.extensions().get::<IdempotencyKey>(), Some(&parsed), "the response reports the key");
    }
}

fn uuid_version(text: &str) -> u32 {
    // xxxxxxxx-xxxx-Mxxx-...: M is the version.
    assert_eq!(text.len(), 36);
    text[14..15].parse().unwrap()
}

#[tokio::test]
async fn every_logical_request_gets_its_own_key() {
    let service = ServiceBuilder::new().layer(SetIdempotencyKeyLayer::new()).service(service_fn(
        |request: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(request.headers()["idempotency-key"].clone()))
        },
    ));
    let mut keys = std::collections::HashSet::new();
    for _ in 0..100 {
        let response = service.clone().oneshot(request(Method::POST)).await.unwrap();
        assert!(keys.insert(response.into_body()));
    }
}

#[tokio::test]
async fn other_methods_pass_through_untouched() {
    for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS] {
        let (key, response) = through(SetIdempotencyKeyLayer::new(), request(method.clone()), "idempotency-key").await;
        assert_eq!(key, None, "{method}");
        assert!(response.extensions().get::<IdempotencyKey>().is_none());
    }
}

#[tokio::test]
async fn an_existing_key_is_left_alone() {
    // Whatever the caller set, even a value the server would reject: the caller chose it.
    for existing in ["caller-key", "\"quoted-key\"", "not valid"] {
        let mut post = request(Method::POST);
        post.headers_mut().insert("idempotency-key", HeaderValue::from_str(existing).unwrap());
        let (key, response) = through(SetIdempotencyKeyLayer::new(), post, "idempotency-key").await;
        assert_eq!(key.unwrap(), existing);
        assert!(response.extensions().get::<IdempotencyKey>().is_none(), "only a stamped key is reported");
    }
}

#[tokio::test]
async fn methods_and_header_name_are_configurable() {
    let layer = SetIdempotencyKeyLayer::new()
        .with_methods([Method::PUT, Method::DELETE])
        .with_header_name(HeaderName::from_static("x-request-key"));
    for (method, stamped) in
        [(Method::PUT, true), (Method::DELETE, true), (Method::POST, false), (Method::PATCH, false)]
    {
        let (key, _) = through(layer.clone(), request(method.clone()), "x-request-key").await;
        assert_eq!(key.is_some(), stamped, "{method}");
        let (default_header, _) = through(layer.clone(), request(method.clone()), "idempotency-key").await;
        assert_eq!(default_header, None, "{method}");
    }
    // An existing key under the configured name is left alone too.
    let mut put = request(Method::PUT);
    put.headers_mut().insert("x-request-key", HeaderValue::from_static("mine"));
    assert_eq!(through(layer, put, "x-request-key").await.0.unwrap(), "mine");
}

#[tokio::test]
async fn a_closure_generates_the_key_from_the_head() {
    #[derive(Clone)]
    struct UserId(u64);

    let layer = SetIdempotencyKeyLayer::new().with_generator(|head: &Parts| {
        let user = head.extensions.get::<UserId>().map_or(0, |UserId(id)| *id);
        KeyDeriver::new("orders").part(user.to_be_bytes()).part(head.uri.path()).finish()
    });
    let mut post = request(Method::POST);
    post.extensions_mut().insert(UserId(7));
    let (key, _) = through(layer.clone(), post, "idempotency-key").await;
    let expected = KeyDeriver::new("orders").part(7u64.to_be_bytes()).part("/orders").finish();
    assert_eq!(key.unwrap(), expected.as_str());

    let (other_user, _) = through(layer, request(Method::POST), "idempotency-key").await;
    assert_ne!(other_user.unwrap(), expected.as_str());
}

/// The stack the module docs recommend, with the inner service a `tower_test` mock that holds
/// each attempt until the test answers it: the first attempt fails, the retry carries the
/// same key, and no further request is sent.
#[tokio::test(start_paused = true)]
async fn stamping_outside_the_retry_layer_sends_every_attempt_with_the_same_key() {
    let (inner, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let policy = RetryPolicy::new()
        .with_seed(1)
        .with_backoff(ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(1)));
    let client =
        ServiceBuilder::new().layer(SetIdempotencyKeyLayer::new()).layer(RetryLayer::new(policy)).service(inner);

    let call = tokio::spawn(client.oneshot(Request::post("/orders").body("order".to_owned()).unwrap()));

    let (first, reply) = handle.next_request().await.expect("the first attempt");
    let key = first.headers()["idempotency-key"].clone();
    IdempotencyKey::parse(key.as_bytes()).expect("a valid key");
    reply.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));

    let (second, reply) = handle.next_request().await.expect("a retry");
    assert_eq!(second.headers()["idempotency-key"], key, "the retry carries the first attempt's key");
    assert_eq!(second.headers().get_all("idempotency-key").iter().count(), 1);
    assert_eq!(second.body(), "order");
    reply.send_response(Response::builder().status(StatusCode::CREATED).body(String::new()).unwrap());

    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.extensions().get::<IdempotencyKey>().unwrap().as_str(), key);
    // Nothing else was sent: the mock's sender side is gone once the call is done.
    assert!(handle.next_request().await.is_none());
}

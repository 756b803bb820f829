//! gRPC (the `grpc` docs): a real tonic server (`examples/grpc.rs`) behind the layer and a real tonic
//! client, over HTTP/2 on loopback; and a raw HTTP/2 client for what is on the wire.

use crate::common;

#[path = "../../examples/grpc.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod example;

use std::{sync::atomic::Ordering, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use common::outage::Switch;
use example::{CreateOrder, Event, OrdersClient, Running, WatchOrder, keyed, replayed, serve};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tonic::{Code, Status};
use tower_idempotency::{IdempotencyLayer, grpc::GrpcStatusOk};

/// The layer with no configuration: its default cache predicate is right for gRPC.
fn layer() -> IdempotencyLayer<Switch> {
    IdempotencyLayer::from_store(Switch::default())
}

/// The stricter predicate for gRPC-only layers.
fn strict() -> IdempotencyLayer<Switch> {
    layer().with_cache_predicate(GrpcStatusOk)
}

async fn start(layer: IdempotencyLayer<Switch>) -> (Running, OrdersClient) {
    let server = serve(layer).await.unwrap();
    let client = OrdersClient::connect(server.addr).await.unwrap();
    (server, client)
}

fn book() -> CreateOrder {
    CreateOrder { sku: "book".into(), quantity: 1, ..CreateOrder::default() }
}

fn creates(server: &Running) -> u64 {
    server.orders.creates.load(Ordering::SeqCst)
}

fn watches(server: &Running) -> u64 {
    server.orders.watches.load(Ordering::SeqCst)
}

#[tokio::test]
async fn the_key_comes_from_the_idempotency_key_metadata_and_a_unary_call_runs_once() {
    let (server, mut client) = start(layer()).await;

    let first = client.create(keyed(book(), "order-1")).await.unwrap();
    let retry = client.create(keyed(book(), "order-1")).await.unwrap();

    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()), "{:?}", retry.metadata());
    assert_eq!(retry.into_inner(), first.into_inner());
    assert_eq!(creates(&server), 1);
    // Another key, or none: the handler runs.
    client.create(keyed(book(), "order-2")).await.unwrap();
    client.create(tonic::Request::new(book())).await.unwrap();
    client.create(tonic::Request::new(book())).await.unwrap();
    assert_eq!(creates(&server), 4);
}

#[tokio::test]
async fn a_failed_call_is_not_recorded() {
    a_failed_call_releases_its_key(layer()).await;
    a_failed_call_releases_its_key(strict()).await;
}

async fn a_failed_call_releases_its_key(layer: IdempotencyLayer<Switch>) {
    let (server, mut client) = start(layer).await;
    let failing = || keyed(CreateOrder { fail: true, ..book() }, "fail-1");

    // tonic answers `Err(Status)` trailers-only: `grpc-status: 9` in the head.
    for _ in 0..2 {
        let status = client.create(failing()).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "out of stock");
    }
    assert_eq!(creates(&server), 2, "the key was released: the retry ran again");
    // Once the call succeeds, it is recorded and replayed.
    let succeeding = || keyed(book(), "fail-1");
    assert!(!replayed(client.create(succeeding()).await.unwrap().metadata()));
    assert!(replayed(client.create(succeeding()).await.unwrap().metadata()));
    assert_eq!(creates(&server), 3);
}

#[tokio::test]
async fn a_server_stream_is_replayed_message_for_message() {
    let (server, mut client) = start(layer()).await;
    let watch = || keyed(WatchOrder { id: "ord_1".into(), events: 4, fail_after: 0 }, "watch-1");

    let first = client.watch(watch()).await.unwrap();
    assert!(!replayed(first.metadata()));
    let first = collect(first.into_inner()).await.unwrap();
    let retry = client.watch(watch()).await.unwrap();
    assert!(replayed(retry.metadata()));
    let retry = collect(retry.into_inner()).await.unwrap();

    assert_eq!(first.len(), 4);
    assert_eq!(first[3].status, "ord_1: step 3 (run 1)");
    assert_eq!(retry, first);
    assert_eq!(watches(&server), 1);
}

#[tokio::test]
async fn a_stream_that_fails_in_its_trailers_is_not_recorded() {
    a_stream_failing_in_its_trailers_releases_its_key(layer()).await;
    a_stream_failing_in_its_trailers_releases_its_key(strict()).await;
}

async fn a_stream_failing_in_its_trailers_releases_its_key(layer: IdempotencyLayer<Switch>) {
    let (server, mut client) = start(layer).await;
    let watch = || keyed(WatchOrder { id: "ord_1".into(), events: 4, fail_after: 2 }, "watch-2");

    for run in 1..=2 {
        let mut stream = client.watch(watch()).await.unwrap().into_inner();
        let mut events = Vec::new();
        let status = loop {
            match stream.message().await {
                Ok(Some(event)) => events.push(event.status),
                Ok(None) => panic!("the stream ended without its error"),
                Err(status) => break status,
            }
        };
        assert_eq!(events, [format!("ord_1: step 0 (run {run})"), format!("ord_1: step 1 (run {run})")]);
        assert_eq!(status.code(), Code::Internal);
    }
    assert_eq!(watches(&server), 2, "grpc-status 13 in the trailers released the key");
}

async fn collect(mut stream: tonic::Streaming<Event>) -> Result<Vec<Event>, Status> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.push(event);
    }
    Ok(events)
}

#[tokio::test]
async fn the_layers_own_answers_are_grpc_statuses() {
    let layer = layer().with_max_record(64).with_max_request_body(64);
    let store = layer.store().clone();
    let (server, mut client) = start(layer).await;

    // 422 key-reused: ALREADY_EXISTS.
    client.create(keyed(book(), "order-1")).await.unwrap();
    let reused = client.create(keyed(CreateOrder { quantity: 2, ..book() }, "order-1")).await.unwrap_err();
    assert_status(&reused, Code::AlreadyExists, "This idempotency key was already used with a different request.");
    assert_eq!(reused.metadata().get("x-should-retry").unwrap(), "false");

    // 400 invalid-key: INVALID_ARGUMENT.
    let invalid = client.create(keyed(book(), &"k".repeat(256))).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(invalid.message(), "The idempotency key is longer than 255 bytes.", "{invalid:?}");

    // 413 request-body-too-large: INVALID_ARGUMENT.
    let big = client.create(keyed(CreateOrder { sku: "x".repeat(100), ..book() }, "big-1")).await.unwrap_err();
    assert_status(
        &big,
        Code::InvalidArgument,
        "The request body is larger than 64 bytes, the most this endpoint accepts.",
    );

    // 409 in-flight: ABORTED, with the pushback.
    let slow = || keyed(CreateOrder { delay_ms: 500, ..book() }, "slow-1");
    let first = tokio::spawn({
        let mut client = client.clone();
        async move { client.create(slow()).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let in_flight = client.create(slow()).await.unwrap_err();
    assert_eq!(in_flight.code(), Code::Aborted);
    assert_eq!(in_flight.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    assert_eq!(in_flight.metadata().get("retry-after").unwrap(), "1");
    assert!(in_flight.metadata().get("x-should-retry").is_none());
    first.await.unwrap().unwrap();

    // 409 response-not-retained: FAILED_PRECONDITION.
    let long = || keyed(WatchOrder { id: "ord_1".into(), events: 10, fail_after: 0 }, "long-1");
    assert_eq!(collect(client.watch(long()).await.unwrap().into_inner()).await.unwrap().len(), 10);
    let not_retained = client.watch(long()).await.unwrap_err();
    assert_eq!(not_retained.code(), Code::FailedPrecondition);
    assert!(not_retained.message().contains("too large to keep"), "{not_retained:?}");

    // 503 store-unavailable: UNAVAILABLE.
    store.down.store(true, Ordering::SeqCst);
    let unavailable = client.create(keyed(book(), "order-3")).await.unwrap_err();
    assert_eq!(unavailable.code(), Code::Unavailable);
    assert_eq!(unavailable.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    store.down.store(false, Ordering::SeqCst);

    // The handler ran for order-1, slow-1 and long-1 only.
    assert_eq!((creates(&server), watches(&server)), (2, 1));
}

#[track_caller]
fn assert_status(status: &Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), message, "{status:?}");
}

/// A raw HTTP/2 exchange: the response head, every body byte, the trailers.
#[derive(Debug)]
struct Wire {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// Sends one gRPC call over a fresh HTTP/2 connection with hyper, bypassing tonic's client.
async fn raw(server: &Running, path: &str, message: &[u8], key: Option<&str>) -> Wire {
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    // gRPC framing: no compression, a 4-byte big-endian length, the message.
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(message);
    let mut request = Request::post(format!("http://{}{path}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame.freeze()))
        .unwrap();
    if let Some(key) = key {
        request.headers_mut().insert("idempotency-key", key.parse().unwrap());
    }
    let response = sender.send_request(request).await.unwrap();
    let (head, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Wire { status: head.status, headers: head.headers, body: collected.to_bytes(), trailers }
}

/// The headers a replay is allowed to differ in.
fn comparable(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    headers.remove("date");
    headers.remove("idempotent-replayed");
    headers
}

#[tokio::test]
async fn replays_are_byte_exact_on_the_wire() {
    let (server, _) = start(layer()).await;
    let calls = [
        ("/orders.v1.Orders/Create", book().encode_to_vec()),
        ("/orders.v1.Orders/Watch", WatchOrder { id: "ord_9".into(), events: 5, fail_after: 0 }.encode_to_vec()),
    ];
    for (path, message) in calls {
        let key = format!("wire{}", path.replace('/', "-"));
        let first = raw(&server, path, &message, Some(&key)).await;
        let replay = raw(&server, path, &message, Some(&key)).await;

        assert_eq!(first.status, StatusCode::OK, "{path}");
        assert!(first.headers.get("idempotent-replayed").is_none(), "{path}");
        assert_eq!(
            replay.headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()),
            Some("true"),
            "{path}: {replay:?}"
        );
        assert_eq!(comparable(&replay.headers), comparable(&first.headers), "{path}");
        assert!(!first.body.is_empty(), "{path}");
        assert_eq!(replay.body, first.body, "{path}: the same message frames, byte for byte");
        assert_eq!(first.trailers.as_ref().unwrap()["grpc-status"], "0", "{path}");
        assert_eq!(replay.trailers, first.trailers, "{path}");
    }
    assert_eq!((creates(&server), watches(&server)), (1, 1));
}

#[tokio::test]
async fn a_layer_answer_is_trailers_only_never_problem_json() {
    let (server, _) = start(layer()).await;
    let create = "/orders.v1.Orders/Create";
    raw(&server, create, &book().encode_to_vec(), Some("k-1")).await;
    let reused = raw(&server, create, &CreateOrder { quantity: 9, ..book() }.encode_to_vec(), Some("k-1")).await;

    assert_eq!(reused.status, StatusCode::OK, "gRPC answers travel over HTTP 200");
    assert_eq!(reused.headers["content-type"], "application/grpc");
    assert_eq!(reused.headers["grpc-status"], "6");
    assert_eq!(reused.headers["grpc-message"], "This idempotency key was already used with a different request.");
    assert!(reused.body.is_empty(), "no message, no problem+json: {:?}", reused.body);
    assert_eq!(reused.trailers, None, "trailers-only: the status is in the head");
}

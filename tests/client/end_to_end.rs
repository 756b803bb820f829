//! The client half against the server half.
//!
//! Over loopback HTTP: the example server's router behind a fault that loses the first
//! response after the handler ran, and a `hyper_util` client wrapped in the stamping layer and
//! the retry policy. In process, on paused time: a server answering `503` twice, and a client
//! timeout that meets the server's `409` in flight.

use crate::support::server;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use serde_json::Value;
use tokio::{net::TcpListener, time::Instant};
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer, service_fn, timeout::TimeoutLayer};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer,
    client::{ExponentialBackoff, RetryPolicy, SetIdempotencyKeyLayer},
};

/// Keys of the `POST`s that reached the server, and how many responses are still to be lost.
#[derive(Default)]
struct Faults {
    responses_to_lose: AtomicUsize,
    keys_seen: Mutex<Vec<Option<HeaderValue>>>,
}

/// Serves the example server's app on a free loopback port, behind the fault: for the first
/// `responses_to_lose` `POST`s, the handler runs and its response is read to the end (so the
/// idempotency layer records it), then the connection is closed without sending it.
async fn serve(faults: Arc<Faults>) -> SocketAddr {
    let app = server::app(IdempotencyLayer::new(), Arc::default());
    let faulty = service_fn(move |request: Request<Incoming>| {
        let (app, faults) = (app.clone(), faults.clone());
        async move {
            let lose = request.method() == Method::POST
                && faults
                    .responses_to_lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if request.method() == Method::POST {
                faults.keys_seen.lock().unwrap().push(request.headers().get("idempotency-key").cloned());
            }
            let Ok(response) = app.oneshot(request).await;
            if lose {
                response.into_body().collect().await.map_err(std::io::Error::other)?;
                // An error from the service makes hyper close the connection, sending nothing.
                return Err::<Response<Body>, _>(std::io::Error::other("the response was lost on the way back"));
            }
            Ok(response)
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = TowerToHyperService::new(faulty.clone());
            tokio::spawn(async move {
                let _lost =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn create_order(addr: SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/orders"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"sku":"A1"}"#)))
        .unwrap()
}

async fn json(response: Response<impl http_body::Body<Error: std::fmt::Debug>>) -> Value {
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn executions(addr: SocketAddr, route: &str) -> u64 {
    let request = Request::get(format!("http://{addr}/stats")).body(Full::default()).unwrap();
    let stats = json(http_client().request(request).await.unwrap()).await;
    stats[route].as_u64().unwrap()
}

#[tokio::test]
async fn a_lost_response_is_recovered_by_a_replay_not_a_second_execution() {
    let faults = Arc::new(Faults { responses_to_lose: AtomicUsize::new(1), ..Faults::default() });
    let addr = serve(faults.clone()).await;
    let policy =
        RetryPolicy::new().with_backoff(ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100)));
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(http_client());

    let response = client.oneshot(create_order(addr)).await.expect("the retry recovers");

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true", "the second attempt was a replay");
    let key = response.extensions().get::<IdempotencyKey>().unwrap().clone();
    let body = json(response).await;
    assert_eq!(body["id"], "ord_1");
    assert_eq!(body["order"]["sku"], "A1");
    assert_eq!(executions(addr, "orders").await, 1, "the handler ran once");
    let keys_seen = faults.keys_seen.lock().unwrap().clone();
    assert_eq!(keys_seen.len(), 2, "{keys_seen:?}");
    assert!(keys_seen.iter().all(|seen| seen.as_ref().unwrap() == key.as_str()), "both attempts carried one key");
}

/// The control: the same fault without the client layers is an error for the caller, although
/// the order was created.
#[tokio::test]
async fn without_the_client_layers_the_lost_response_is_an_error() {
    let faults = Arc::new(Faults { responses_to_lose: AtomicUsize::new(1), ..Faults::default() });
    let addr = serve(faults.clone()).await;

    let error = http_client().request(create_order(addr)).await.expect_err("the response was lost");
    assert!(!error.is_connect(), "the request was sent: {error:?}");
    assert_eq!(executions(addr, "orders").await, 1);
    assert_eq!(faults.keys_seen.lock().unwrap().as_slice(), [None]);
}

/// A server with the idempotency layer whose handler fails with `503` on its first `failures`
/// runs (a `5xx` is not recorded, so each retry runs the handler again) and sleeps `work`
/// before answering `201`. Returns the router and the keys the handler ran with.
fn flaky_server(failures: usize, work: Duration) -> (Router, Arc<Mutex<Vec<HeaderValue>>>) {
    let runs: Arc<Mutex<Vec<HeaderValue>>> = Arc::default();
    let handler = {
        let runs = runs.clone();
        move |request: Request<Body>| {
            let run = {
                let mut runs = runs.lock().unwrap();
                runs.push(request.headers()["idempotency-key"].clone());
                runs.len()
            };
            async move {
                tokio::time::sleep(work).await;
                if run <= failures { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::CREATED }
            }
        }
    };
    (Router::new().route("/orders", post(handler)).layer(IdempotencyLayer::new()), runs)
}

fn in_process_order() -> Request<Full<Bytes>> {
    Request::post("/orders").body(Full::new(Bytes::from_static(br#"{"sku":"A1"}"#))).unwrap()
}

/// What tokio waits for `delay`: its timer wheel rounds deadlines up to the millisecond.
fn on_tokio_timer(delay: Duration) -> Duration {
    Duration::from_millis(delay.as_nanos().div_ceil(1_000_000) as u64)
}

#[tokio::test(start_paused = true)]
async fn two_503s_then_201_after_two_backoffs() {
    let (router, runs) = flaky_server(2, Duration::ZERO);
    let backoff = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(RetryPolicy::new().with_backoff(backoff).with_seed(5)))
        .map_request(|request: Request<Full<Bytes>>| request.map(Body::new))
        .service(router);

    let started = Instant::now();
    let response = client.oneshot(in_process_order()).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.headers().get("idempotent-replayed").is_none(), "the third run executed");
    let waited: Duration = backoff.delays(5).take(2).map(on_tokio_timer).sum();
    assert_eq!(started.elapsed(), waited, "two backoff delays, exactly");
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|key| key == runs[0]), "one key for every run");
}

#[tokio::test(start_paused = true)]
async fn a_client_timeout_meets_the_409_in_flight_then_gets_the_replay() {
    // The handler takes 2 s; the client gives each attempt 500 ms.
    let (router, runs) = flaky_server(0, Duration::from_secs(2));
    let seen: Arc<Mutex<Vec<(StatusCode, bool)>>> = Arc::default();
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(RetryPolicy::new().with_seed(9)))
        .layer(TimeoutLayer::new(Duration::from_millis(500)))
        .map_response({
            let seen = seen.clone();
            move |response: Response<Body>| {
                seen.lock().unwrap().push((response.status(), response.headers().contains_key("retry-after")));
                response
            }
        })
        .map_request(|request: Request<Full<Bytes>>| request.map(Body::new))
        .service(router);

    let started = Instant::now();
    let response = client.oneshot(in_process_order()).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.lock().unwrap().len(), 1, "the timed-out attempt's handler finished; no other ran");
    assert!(started.elapsed() >= Duration::from_secs(2), "the replay of a handler that took 2 s");
    let seen = seen.lock().unwrap();
    // After the timeout, at least one 409 with Retry-After, then the replay.
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|&attempt| attempt == (StatusCode::CONFLICT, true)), "{seen:?}");
}

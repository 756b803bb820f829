//! `client::reqwest::IdempotencyMiddleware` (feature `reqwest`).
//!
//! Over loopback, against the example server: a lost response recovered by a replay, a `422`
//! given up at once, a `409` in flight waited out. In process, on paused time, against a
//! scripted terminal middleware: the waits are those of `RetryPolicy`, exactly.
#![cfg(feature = "reqwest")]

use crate::support;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Extensions, HeaderMap, HeaderValue, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use serde_json::{Value, json};
use support::TestServer;
use tokio::time::Instant;
use tower_idempotency::{
    IdempotencyKey,
    client::{ExponentialBackoff, KeyDeriver, RetryPolicy, reqwest::IdempotencyMiddleware},
};

/// Counts the attempts that pass it: placed after (inside) the idempotency middleware.
#[derive(Clone, Default)]
struct Attempts(Arc<AtomicUsize>);

impl Attempts {
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Middleware for Attempts {
    async fn handle(
        &self,
        request: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        self.0.fetch_add(1, Ordering::SeqCst);
        next.run(request, extensions).await
    }
}

/// A short backoff, so a retried transport error costs little real time.
fn policy() -> RetryPolicy {
    RetryPolicy::new().with_backoff(ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100)))
}

fn client(attempts: &Attempts) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(IdempotencyMiddleware::new().with_policy(policy()))
        .with(attempts.clone())
        .build()
}

async fn json(response: Response) -> Value {
    let bytes = response.bytes().await.expect("the body reads");
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

#[tokio::test]
async fn a_cut_first_response_is_replayed_not_run_again() {
    let (server, faults) = TestServer::start_losing_responses(1).await;
    let attempts = Attempts::default();

    let response = client(&attempts)
        .post(server.uri("/orders"))
        .header("content-type", "application/json")
        .body(r#"{"sku":"A1"}"#)
        .send()
        .await
        .expect("the retry recovers the lost response");

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true", "the second attempt was a replay");
    let key = response.extensions().get::<IdempotencyKey>().expect("the response reports its key").clone();
    let body = json(response).await;
    assert_eq!(body, json!({"id": "ord_1", "order": {"sku": "A1"}}));
    assert_eq!(server.executions("orders"), 1, "the handler ran once");
    assert_eq!(attempts.get(), 2);
    let seen = faults.keys_seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|sent| sent.as_ref().is_some_and(|sent| sent == key.as_str())), "one key: {seen:?}");
}

/// The control: without the middleware the lost response is an error, though the order exists.
#[tokio::test]
async fn without_the_middleware_the_cut_response_is_an_error() {
    let (server, faults) = TestServer::start_losing_responses(1).await;
    let error = reqwest::Client::new().post(server.uri("/orders")).body("{}").send().await.expect_err("lost");
    assert!(!error.is_connect(), "the request was sent: {error:?}");
    assert_eq!(server.executions("orders"), 1);
    assert_eq!(faults.keys_seen(), [None]);
}

#[tokio::test]
async fn a_422_key_reused_is_not_retried() {
    let server = TestServer::start().await;
    let first = server.post("/orders").key("order-7").json(&json!({"sku": "A1"})).send().await;
    assert_eq!(first.status, StatusCode::CREATED);
    let attempts = Attempts::default();

    let started = Instant::now();
    let response = client(&attempts)
        .post(server.uri("/orders"))
        .header("idempotency-key", "order-7")
        .header("content-type", "application/json")
        .body(r#"{"sku":"B2"}"#)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert!(response.extensions().get::<IdempotencyKey>().is_none(), "the caller's own key, not stamped");
    assert_eq!(attempts.get(), 1, "one attempt");
    assert!(started.elapsed() < Duration::from_millis(500), "no wait");
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test]
async fn a_409_in_flight_is_waited_out_then_replayed() {
    let server = TestServer::start().await;
    // The first request takes 600 ms; the duplicate arrives while it runs.
    let first = tokio::spawn({
        let call = server.post("/orders?delay_ms=600").key("slow-1").json(&json!({"sku": "A1"})).build();
        let client = server.client();
        async move { client.request(call).await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let attempts = Attempts::default();

    let started = Instant::now();
    let response = client(&attempts)
        .post(server.uri("/orders?delay_ms=600"))
        .header("idempotency-key", "slow-1")
        .header("content-type", "application/json")
        .body(r#"{"sku":"A1"}"#)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    // 409 in flight with `retry-after-ms: 1000`: the retry came after that wait.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(attempts.get(), 2);
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert_eq!(server.executions("orders"), 1);
}

#[tokio::test]
async fn a_key_derived_from_the_callers_parts_survives_a_restart_of_the_client() {
    let server = TestServer::start().await;
    let key = KeyDeriver::new("payments").part("customer-42").part("invoice-7").finish();
    let mut replayed = Vec::new();
    for _restart in 0..2 {
        let attempts = Attempts::default();
        let response = client(&attempts)
            .post(server.uri("/payments"))
            .header("content-type", "application/json")
            .body(r#"{"amount":1999}"#)
            .with_extension(key.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.extensions().get::<IdempotencyKey>(), Some(&key));
        replayed.push(response.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(replayed, [false, true]);
    assert_eq!(server.executions("payments"), 1, "one payment for one (customer, invoice)");
}

#[tokio::test]
async fn each_logical_request_gets_its_own_random_key() {
    let server = TestServer::start().await;
    let attempts = Attempts::default();
    let client = client(&attempts);
    let mut keys = Vec::new();
    for _ in 0..2 {
        let response = client.post(server.uri("/orders")).body("{}").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(!response.headers().contains_key("idempotent-replayed"));
        keys.push(response.extensions().get::<IdempotencyKey>().unwrap().clone());
    }
    assert_ne!(keys[0], keys[1]);
    assert_eq!(server.executions("orders"), 2);
    // Not covered: no key.
    let response = client.put(server.uri("/orders/ord_1")).body("{}").send().await.unwrap();
    assert!(response.extensions().get::<IdempotencyKey>().is_none());
}

/// One scripted answer of [`Script`].
#[derive(Clone, Debug)]
enum Answer {
    Status(u16, Vec<(&'static str, &'static str)>),
    Error,
}

/// A terminal middleware that answers from a script instead of sending anything, recording
/// when each attempt came and with which key.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<(Instant, HeaderMap)>>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Self { answers: Arc::new(Mutex::new(answers.into_iter().collect())), seen: Arc::default() }
    }

    fn gaps(&self) -> Vec<Duration> {
        self.seen.lock().unwrap().windows(2).map(|pair| pair[1].0 - pair[0].0).collect()
    }

    /// The values of `header` each attempt carried.
    fn sent(&self, header: &str) -> Vec<Option<HeaderValue>> {
        self.seen.lock().unwrap().iter().map(|(_, headers)| headers.get(header).cloned()).collect()
    }

    fn keys(&self) -> Vec<Option<HeaderValue>> {
        self.sent("idempotency-key")
    }
}

#[async_trait::async_trait]
impl Middleware for Script {
    async fn handle(&self, request: Request, _: &mut Extensions, _: Next<'_>) -> reqwest_middleware::Result<Response> {
        self.seen.lock().unwrap().push((Instant::now(), request.headers().clone()));
        match self.answers.lock().unwrap().pop_front().expect("the script ran out of answers") {
            Answer::Error => Err(reqwest_middleware::Error::middleware(std::io::Error::other("connection reset"))),
            Answer::Status(status, headers) => {
                let mut response = http::Response::builder().status(status);
                for (name, value) in headers {
                    response = response.header(name, value);
                }
                Ok(Response::from(response.body("").unwrap()))
            }
        }
    }
}

fn scripted(middleware: IdempotencyMiddleware, script: &Script) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new()).with(middleware).with(script.clone()).build()
}

const URL: &str = "http://scripted.invalid/orders";

/// What tokio waits for `delay`: its timer wheel rounds deadlines up to the millisecond.
fn on_tokio_timer(delay: Duration) -> Duration {
    Duration::from_millis(delay.as_nanos().div_ceil(1_000_000) as u64)
}

#[tokio::test(start_paused = true)]
async fn it_waits_the_backoff_of_retry_policy_exactly() {
    let backoff = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let script = Script::new([Answer::Error, Answer::Status(503, vec![]), Answer::Status(201, vec![])]);
    let middleware = IdempotencyMiddleware::new().with_policy(RetryPolicy::new().with_backoff(backoff).with_seed(5));

    let response = scripted(middleware, &script).post(URL).body("{}").send().await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let expected: Vec<Duration> = backoff.delays(5).take(2).map(on_tokio_timer).collect();
    assert_eq!(script.gaps(), expected, "the delays of RetryPolicy with the same seed");
    let keys = script.keys();
    assert!(keys[0].is_some() && keys.iter().all(|key| key == &keys[0]), "one key for every attempt: {keys:?}");
}

#[tokio::test(start_paused = true)]
async fn it_waits_retry_after_ms_before_retry_after() {
    let script = Script::new([
        Answer::Status(409, vec![("retry-after", "2"), ("retry-after-ms", "1500")]),
        Answer::Status(503, vec![("retry-after", "3")]),
        Answer::Status(201, vec![]),
    ]);
    let response = scripted(IdempotencyMiddleware::new(), &script).post(URL).body("{}").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(script.gaps(), [Duration::from_millis(1500), Duration::from_secs(3)]);
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_is_not_retried() {
    for hint in ["x-should-retry", "stripe-should-retry"] {
        let script = Script::new([Answer::Status(503, vec![(hint, "false"), ("retry-after", "1")])]);
        let started = Instant::now();
        let response = scripted(IdempotencyMiddleware::new(), &script).post(URL).body("{}").send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{hint}");
        assert_eq!(script.keys().len(), 1, "{hint}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{hint}");
    }
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded_by_the_policy() {
    let script = Script::new(vec![Answer::Status(503, vec![]); 3]);
    let middleware = IdempotencyMiddleware::new().with_policy(RetryPolicy::new().with_max_attempts(3).with_seed(1));
    let response = scripted(middleware, &script).post(URL).body("{}").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "the last answer");
    assert_eq!(script.keys().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_post_the_middleware_does_not_stamp_is_sent_once() {
    let script = Script::new([Answer::Status(503, vec![])]);
    let middleware = IdempotencyMiddleware::new().with_methods([http::Method::PATCH]);
    let response = scripted(middleware, &script).post(URL).body("{}").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(script.keys(), [None], "no key, so no retry: the server could run it twice");
}

#[tokio::test(start_paused = true)]
async fn a_custom_header_and_generator() {
    let script = Script::new([Answer::Status(201, vec![])]);
    let middleware = IdempotencyMiddleware::new()
        .with_header_name(http::HeaderName::from_static("x-request-key"))
        .with_generator(|head: &http::request::Parts| IdempotencyKey::derive("by-path", [head.uri.path()]));
    let client = ClientBuilder::new(reqwest::Client::new()).with(middleware).with(script.clone()).build();
    let response = client.post(URL).body("{}").send().await.unwrap();
    let key = IdempotencyKey::derive("by-path", ["/orders"]);
    assert_eq!(response.extensions().get::<IdempotencyKey>(), Some(&key));
    assert_eq!(script.sent("x-request-key"), [Some(HeaderValue::from_str(key.as_str()).unwrap())]);
    assert_eq!(script.keys(), [None], "not under the default header");
}

/// An outer middleware that sends the call again (reqwest-retry's, registered before ours, so
/// outside it): every attempt it makes goes through our middleware, which must stamp the key
/// it generated for the first one. The first response is lost after the handler ran; the
/// outer re-send carries the same key, so the server replays instead of running it twice.
#[tokio::test]
async fn an_outer_retry_middleware_resends_with_the_same_key() {
    use reqwest_retry::{RetryTransientMiddleware, policies::ExponentialBackoff as OuterBackoff};

    let (server, faults) = TestServer::start_losing_responses(1).await;
    let attempts = Attempts::default();
    let outer = RetryTransientMiddleware::new_with_policy(
        OuterBackoff::builder()
            .retry_bounds(Duration::from_millis(10), Duration::from_millis(50))
            .build_with_max_retries(2),
    );
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(outer)
        // Ours sends each call once: the re-send is the outer middleware's.
        .with(IdempotencyMiddleware::new().with_policy(policy().with_max_attempts(1)))
        .with(attempts.clone())
        .build();

    let response = client
        .post(server.uri("/orders"))
        .header("content-type", "application/json")
        .body(r#"{"sku":"A1"}"#)
        .send()
        .await
        .expect("the outer retry recovers the lost response");

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true", "the re-send was a replay");
    assert_eq!(attempts.get(), 2, "the outer middleware sent it twice");
    assert_eq!(server.executions("orders"), 1, "the handler ran once");
    let seen = faults.keys_seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].is_some() && seen[0] == seen[1], "one key for both attempts: {seen:?}");
    let key = response.extensions().get::<IdempotencyKey>().expect("the response reports its key");
    assert_eq!(seen[0].as_ref().unwrap(), key.as_str());
}

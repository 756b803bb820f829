//! `RetryPolicy` behind `SetIdempotencyKeyLayer`, against a scripted in-process server, on paused
//! tokio time: every wait below is measured on the paused clock, which only moves when all
//! tasks are idle and then jumps exactly to the next timer, so the elapsed times are exact.

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::{HeaderValue, Method, Request, Response, StatusCode, header::RETRY_AFTER};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, retry::RetryLayer, service_fn, util::BoxCloneService};
use tower_idempotency::{
    IdempotencyKey,
    client::{ExponentialBackoff, RetryPolicy, SetIdempotencyKeyLayer, TryCloneBody},
};

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// What the scripted server does for one attempt.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    /// A status with a `Retry-After` value.
    StatusAfter(u16, String),
    /// A transport error: no response at all.
    Error,
    /// Sleeps, then answers the status.
    Slow(Duration, u16),
    /// A status with these headers.
    Headers(u16, Vec<(&'static str, &'static str)>),
}

/// One attempt as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    method: Method,
    uri: String,
    key: Option<HeaderValue>,
    trace: Option<HeaderValue>,
    body: String,
    extension: Option<&'static str>,
}

#[derive(Clone, Default)]
struct Server {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn new(script: impl IntoIterator<Item = Reply>) -> Self {
        Self { script: Arc::new(Mutex::new(script.into_iter().collect())), seen: Arc::default() }
    }

    /// Appends replies for the next requests.
    fn then(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The server as a tower service, generic over a body it can print.
    fn service<B: Into<String> + Send + 'static>(
        &self,
    ) -> impl Service<Request<B>, Response = Response<String>, Error = io::Error, Future: Send> + Clone + Send + 'static
    {
        let this = self.clone();
        service_fn(move |request: Request<B>| {
            let this = this.clone();
            async move {
                let (head, body) = request.into_parts();
                this.seen.lock().unwrap().push(Seen {
                    at: Instant::now(),
                    method: head.method.clone(),
                    uri: head.uri.to_string(),
                    key: head.headers.get("idempotency-key").cloned(),
                    trace: head.headers.get("x-trace").cloned(),
                    body: body.into(),
                    extension: head.extensions.get::<&'static str>().copied(),
                });
                let reply = this.script.lock().unwrap().pop_front().expect("the script ran out of replies");
                let mut headers = Vec::new();
                let (status, retry_after) = match reply {
                    Reply::Status(status) => (status, None),
                    Reply::StatusAfter(status, value) => (status, Some(value)),
                    Reply::Headers(status, named) => {
                        headers = named;
                        (status, None)
                    }
                    Reply::Error => return Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")),
                    Reply::Slow(duration, status) => {
                        tokio::time::sleep(duration).await;
                        (status, None)
                    }
                };
                let mut response = Response::builder().status(status);
                if let Some(value) = retry_after {
                    response = response.header(RETRY_AFTER, value);
                }
                for (name, value) in headers {
                    response = response.header(name, value);
                }
                Ok(response.body(format!("attempt answered {status}")).unwrap())
            }
        })
    }
}

type Client<B> = BoxCloneService<Request<B>, Response<String>, io::Error>;

/// The recommended stack: stamp outside, retry inside.
fn client(server: &Server, policy: RetryPolicy) -> Client<String> {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(SetIdempotencyKeyLayer::new())
            .layer(RetryLayer::new(policy))
            .service(server.service()),
    )
}

/// A policy that never waits long by backoff alone, so `Retry-After` waits stand out.
fn policy() -> RetryPolicy {
    RetryPolicy::new().with_seed(7)
}

fn post() -> Request<String> {
    Request::post("/orders").body(r#"{"item":"book"}"#.to_owned()).unwrap()
}

async fn send(client: &Client<String>, request: Request<String>) -> Result<Response<String>, io::Error> {
    client.clone().oneshot(request).await
}

/// What tokio waits for `delay`: its timer wheel rounds deadlines up to the millisecond.
fn on_tokio_timer(delay: Duration) -> Duration {
    Duration::from_millis(delay.as_nanos().div_ceil(1_000_000) as u64)
}

fn gaps(seen: &[Seen]) -> Vec<Duration> {
    seen.windows(2).map(|pair| pair[1].at - pair[0].at).collect()
}

/// Every attempt carried the same, valid key, and it is the one the response reports.
fn assert_one_key(seen: &[Seen], response: &Response<String>) {
    let first = seen[0].key.clone().expect("a key was stamped");
    assert!(seen.iter().all(|attempt| attempt.key.as_ref() == Some(&first)), "{seen:?}");
    let reported = response.extensions().get::<IdempotencyKey>().expect("the response reports the key");
    assert_eq!(reported.as_str(), first);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_with_the_same_key() {
    let server = Server::new([Reply::Error, Reply::Error, Reply::Status(201)]);
    let response = send(&client(&server, policy()), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    assert_one_key(&seen, &response);
}

#[tokio::test(start_paused = true)]
async fn each_transient_status_is_retried() {
    for status in [408, 425, 429, 500, 502, 503, 504] {
        let server = Server::new([Reply::Status(status), Reply::Status(201)]);
        let response = send(&client(&server, policy()), post()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{status}");
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{status}");
        assert_one_key(&seen, &response);
    }
}

#[tokio::test(start_paused = true)]
async fn conflict_in_flight_is_retried_after_its_retry_after() {
    let server = Server::new([Reply::StatusAfter(409, "2".into()), Reply::Status(201)]);
    let response = send(&client(&server, policy()), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(gaps(&seen), [2 * SECOND]);
    assert_one_key(&seen, &response);
}

#[tokio::test(start_paused = true)]
async fn conflict_without_retry_after_is_returned_at_once() {
    // The server's "response not retained": repeating would only get the same 409.
    let server = Server::new([Reply::Status(409)]);
    let started = Instant::now();
    let response = send(&client(&server, policy()), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(server.seen().len(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn successes_and_other_client_errors_are_returned_at_once() {
    for status in [200, 201, 204, 303, 400, 401, 403, 404, 413, 422] {
        let server = Server::new([Reply::Status(status)]);
        let started = Instant::now();
        let response = send(&client(&server, policy()), post()).await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(server.seen().len(), 1, "{status}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{status}");
    }
    // A Retry-After does not make a client error transient.
    let server = Server::new([Reply::StatusAfter(422, "1".into())]);
    assert_eq!(send(&client(&server, policy()), post()).await.unwrap().status(), 422);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_overrides_the_backoff() {
    // Backoff alone would wait anywhere up to 60 s; the server's 3 s and 0 s win.
    let policy =
        policy().with_backoff(ExponentialBackoff::new(60 * SECOND, 60 * SECOND)).with_max_elapsed(120 * SECOND);
    let server =
        Server::new([Reply::StatusAfter(503, "3".into()), Reply::StatusAfter(429, "0".into()), Reply::Status(201)]);
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(gaps(&server.seen()), [3 * SECOND, Duration::ZERO]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_is_read_before_retry_after() {
    let policy =
        policy().with_backoff(ExponentialBackoff::new(60 * SECOND, 60 * SECOND)).with_max_elapsed(120 * SECOND);
    let server = Server::new([
        Reply::Headers(503, vec![("retry-after", "9"), ("retry-after-ms", "1500")]),
        // Unreadable milliseconds: `Retry-After` decides.
        Reply::Headers(503, vec![("retry-after", "2"), ("retry-after-ms", "soon")]),
        // Milliseconds alone, with a fraction.
        Reply::Headers(429, vec![("retry-after-ms", "250.5")]),
        Reply::Status(201),
    ]);
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(gaps(&server.seen()), [1500 * MS, 2 * SECOND, on_tokio_timer(Duration::from_micros(250_500))]);
}

#[tokio::test(start_paused = true)]
async fn conflict_with_retry_after_ms_only_is_in_flight() {
    let server = Server::new([Reply::Headers(409, vec![("retry-after-ms", "700")]), Reply::Status(201)]);
    let response = send(&client(&server, policy()), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(gaps(&server.seen()), [700 * MS]);
}

#[tokio::test(start_paused = true)]
async fn should_retry_false_is_never_retried() {
    for (status, hint) in [
        (503, "x-should-retry"),
        (429, "x-should-retry"),
        (500, "stripe-should-retry"),
        // A 409 in flight that the server says will not get better.
        (409, "x-should-retry"),
    ] {
        let server = Server::new([Reply::Headers(status, vec![(hint, "false"), ("retry-after", "1")])]);
        let started = Instant::now();
        let response = send(&client(&server, policy()), post()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{status} {hint}");
        assert_eq!(server.seen().len(), 1, "{status} {hint}: not retried");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn should_retry_true_does_not_make_a_final_status_transient() {
    let server = Server::new([Reply::Headers(422, vec![("x-should-retry", "true")])]);
    assert_eq!(send(&client(&server, policy()), post()).await.unwrap().status(), 422);
    assert_eq!(server.seen().len(), 1);
    // Nor does it stop a transient one.
    let server = Server::new([Reply::Headers(503, vec![("x-should-retry", "true")]), Reply::Status(201)]);
    assert_eq!(send(&client(&server, policy()), post()).await.unwrap().status(), 201);
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_measured_against_the_system_clock() {
    let policy =
        policy().with_backoff(ExponentialBackoff::new(60 * SECOND, 60 * SECOND)).with_max_elapsed(120 * SECOND);
    // The paused tokio clock does not move the system clock: the date is 30 s ahead of it.
    let date = httpdate::fmt_http_date(SystemTime::now() + 30 * SECOND);
    let server = Server::new([Reply::StatusAfter(503, date), Reply::Status(201)]);
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let gap = gaps(&server.seen())[0];
    // HTTP dates have whole seconds, so up to one second is lost to truncation.
    assert!(gap > 28 * SECOND && gap <= 30 * SECOND, "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_past_the_time_budget_returns_the_response() {
    let server = Server::new([Reply::StatusAfter(429, "60".into())]);
    let started = Instant::now();
    let response = send(&client(&server, policy().with_max_elapsed(10 * SECOND)), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.seen().len(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO, "no sleep that could not end within the budget");
}

#[tokio::test(start_paused = true)]
async fn unreadable_retry_after_falls_back_to_the_backoff() {
    let backoff = ExponentialBackoff::new(SECOND, 10 * SECOND);
    let server = Server::new([Reply::StatusAfter(503, "soon".into()), Reply::Status(201)]);
    let response = send(&client(&server, policy().with_backoff(backoff).with_seed(11)), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(gaps(&server.seen()), [on_tokio_timer(backoff.delays(11).next().unwrap())]);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded() {
    let server = Server::new(vec![Reply::Status(503); 10]);
    let response = send(&client(&server, policy().with_max_attempts(3)), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "the last response is returned");
    assert_eq!(server.seen().len(), 3);

    for no_retries in [0, 1] {
        let server = Server::new([Reply::Error]);
        let result = send(&client(&server, policy().with_max_attempts(no_retries)), post()).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset, "the last error is returned");
        assert_eq!(server.seen().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn total_time_is_bounded() {
    let backoff = ExponentialBackoff::new(SECOND, SECOND);
    let policy = policy().with_backoff(backoff).with_max_attempts(u32::MAX).with_max_elapsed(5 * SECOND);
    let server = Server::new(vec![Reply::Status(503); 1000]);
    let started = Instant::now();
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = server.seen();
    // Delays of at most 1 s within a 5 s budget: several retries, the last one shortened to
    // start exactly at the deadline, and none after it.
    assert!(seen.len() > 5, "{} attempts", seen.len());
    assert!(seen.iter().all(|attempt| attempt.at - started <= 5 * SECOND));
    assert_eq!(seen.last().unwrap().at - started, 5 * SECOND);
    assert_eq!(started.elapsed(), 5 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_when_attempts_start_not_how_long_they_run() {
    let policy = policy().with_backoff(ExponentialBackoff::new(SECOND, SECOND)).with_max_elapsed(5 * SECOND);
    let slow = Reply::Slow(4 * SECOND, 503);
    let server = Server::new([slow.clone(), slow.clone(), slow]);
    let started = Instant::now();
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = server.seen();
    // Attempt 1 runs 0-4 s, attempt 2 starts by 5 s and runs 4 s; then the budget is spent.
    assert_eq!(seen.len(), 2);
    assert!(seen[1].at - started <= 5 * SECOND);
    assert!(started.elapsed() >= 8 * SECOND && started.elapsed() <= 9 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_the_seeded_delays() {
    let backoff = ExponentialBackoff::new(Duration::from_millis(100), 10 * SECOND);
    let policy =
        RetryPolicy::new().with_backoff(backoff).with_seed(42).with_max_attempts(10).with_max_elapsed(60 * SECOND);
    let server =
        Server::new([Reply::Status(503), Reply::Error, Reply::Status(502), Reply::Status(500), Reply::Status(201)]);
    let response = send(&client(&server, policy), post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let expected: Vec<Duration> = backoff.delays(42).take(4).collect();
    assert_eq!(gaps(&server.seen()), expected.iter().copied().map(on_tokio_timer).collect::<Vec<_>>());
    for (retry, delay) in expected.iter().enumerate() {
        assert!(*delay <= backoff.ceiling(retry as u32));
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_and_jitters_within_its_windows() {
    let backoff = ExponentialBackoff::new(Duration::from_millis(100), 10 * SECOND);
    let server = Server::default();
    // One policy, many logical requests: each draws its own seed from the policy's stream.
    let mut client = client(&server, RetryPolicy::new().with_backoff(backoff).with_seed(2024).with_max_attempts(5));
    let requests = 300;
    for _ in 0..requests {
        server.then(vec![Reply::Status(503); 4].into_iter().chain([Reply::Status(201)]));
        let response = client.ready().await.unwrap().call(post()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let seen = server.seen();
    assert_eq!(seen.len(), requests * 5);
    let mut sums = [Duration::ZERO; 4];
    let mut distinct_sequences = std::collections::HashSet::new();
    for attempts in seen.chunks(5) {
        for (retry, gap) in gaps(attempts).into_iter().enumerate() {
            assert!(gap <= backoff.ceiling(retry as u32), "retry {retry} waited {gap:?}");
            sums[retry] += gap;
        }
        distinct_sequences.insert(gaps(attempts));
    }
    // Full jitter: each window's mean delay is about half its ceiling, so the means double.
    for (retry, sum) in sums.iter().enumerate() {
        let mean = *sum / requests as u32;
        let half = backoff.ceiling(retry as u32) / 2;
        assert!(mean > half * 8 / 10 && mean < half * 12 / 10, "retry {retry}: mean {mean:?}, half window {half:?}");
    }
    assert!(distinct_sequences.len() > requests * 9 / 10, "requests do not share delays");
}

#[tokio::test(start_paused = true)]
async fn each_logical_request_gets_fresh_attempts_and_budget() {
    let policy = policy().with_max_attempts(3).with_max_elapsed(5 * SECOND);
    let server = Server::new(vec![Reply::Status(503); 3]);
    // The same service value serves both requests, so its policy is reused.
    let mut client = client(&server, policy);
    let first = client.ready().await.unwrap().call(post()).await.unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.seen().len(), 3);
    // Later than the first request's budget: a budget or count leaking from it would stop at once.
    tokio::time::sleep(60 * SECOND).await;
    server.then([Reply::Status(503), Reply::Status(503), Reply::Status(201)]);
    let second = client.ready().await.unwrap().call(post()).await.unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(seen.len(), 6);
    assert_ne!(seen[0].key, seen[3].key, "a new logical request gets a new key");
    assert_one_key(&seen[3..], &second);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_a_full_copy_of_the_request() {
    let server = Server::new([Reply::Error, Reply::Status(201)]);
    let mut request =
        Request::patch("/orders/ord_1?expand=items").header("x-trace", "t-1").body("patch-body".to_owned()).unwrap();
    request.extensions_mut().insert("an extension");
    let response = send(&client(&server, policy()), request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    for attempt in &seen {
        assert_eq!(attempt.method, Method::PATCH);
        assert_eq!(attempt.uri, "/orders/ord_1?expand=items");
        assert_eq!(attempt.trace.as_ref().unwrap(), "t-1");
        assert_eq!(attempt.body, "patch-body");
        assert_eq!(attempt.extension, Some("an extension"));
    }
    assert_one_key(&seen, &response);
}

#[tokio::test(start_paused = true)]
async fn a_key_the_caller_set_is_kept_and_used_for_every_attempt() {
    let server = Server::new([Reply::Status(503), Reply::Status(201)]);
    let request = Request::post("/orders").header("idempotency-key", "job-42").body(String::new()).unwrap();
    let response = send(&client(&server, policy()), request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert!(seen.iter().all(|attempt| attempt.key.as_ref().unwrap() == "job-42"));
    assert_eq!(seen.len(), 2);
    assert!(response.extensions().get::<IdempotencyKey>().is_none(), "only a stamped key is reported");
}

#[tokio::test(start_paused = true)]
async fn a_post_without_a_key_is_never_retried() {
    // No stamping layer: retrying this POST could run it twice.
    let server = Server::new([Reply::Error]);
    let client = ServiceBuilder::new().layer(RetryLayer::new(policy())).service(server.service::<String>());
    let result = client.oneshot(post()).await;
    assert!(result.is_err());
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stack_stamping_inside_the_retry_layer_fails_safe() {
    // Wrong order: the retry layer sees no key, so it does not retry (rather than sending a new
    // key on each attempt, which the server would execute each time).
    let server = Server::new([Reply::Status(503), Reply::Status(201)]);
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(policy()))
        .layer(SetIdempotencyKeyLayer::new())
        .service(server.service::<String>());
    let response = client.oneshot(post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn idempotent_methods_are_retried_without_a_key() {
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let server = Server::new([Reply::Status(503), Reply::Status(200)]);
        let client = ServiceBuilder::new().layer(RetryLayer::new(policy())).service(server.service::<String>());
        let request = Request::builder().method(method.clone()).uri("/orders/ord_1").body(String::new()).unwrap();
        assert_eq!(client.oneshot(request).await.unwrap().status(), StatusCode::OK, "{method}");
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{method}");
        assert!(seen.iter().all(|attempt| attempt.key.is_none()));
    }
}

/// A body that is sometimes in memory and sometimes a one-shot stream.
enum Body {
    Buffered(String),
    Streaming(String),
}

impl From<Body> for String {
    fn from(body: Body) -> String {
        match body {
            Body::Buffered(text) | Body::Streaming(text) => text,
        }
    }
}

impl TryCloneBody for Body {
    fn try_clone_body(&self) -> Option<Self> {
        match self {
            Body::Buffered(text) => Some(Body::Buffered(text.clone())),
            Body::Streaming(_) => None,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_copied_is_sent_once() {
    let server = Server::new([Reply::Status(503), Reply::Status(503), Reply::Status(201)]);
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy()))
        .service(server.service::<Body>());

    let streaming = Request::post("/orders").body(Body::Streaming("chunks".into())).unwrap();
    let response = client.clone().oneshot(streaming).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.seen().len(), 1);

    let buffered = Request::post("/orders").body(Body::Buffered("bytes".into())).unwrap();
    let response = client.oneshot(buffered).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body, "bytes");
    assert_eq!(seen[2].body, "bytes");
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides_what_is_transient() {
    use tower_idempotency::client::{Attempt, Classification, Classify, DefaultClassifier};

    // Also retry 404 (say, a replica that has not seen the resource yet); never retry 503.
    let classify = |attempt: Attempt<'_, io::Error>| match attempt {
        Attempt::Response { status: StatusCode::NOT_FOUND, .. } => Classification::Retry,
        Attempt::Response { status: StatusCode::SERVICE_UNAVAILABLE, .. } => Classification::Done,
        other => DefaultClassifier.classify(other),
    };
    let policy = policy().with_classifier(classify);
    let server = Server::new([Reply::Status(404), Reply::Error, Reply::Status(503)]);
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(server.service::<String>());
    let response = client.oneshot(post()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.seen().len(), 3);
}

//! `DynamoDbStore` itself: the conformance suite, the 400 KB item, the table helper, and the
//! answers to DynamoDB's errors (a throttle, a table that is not there) through the layer.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, RequestBody, ScopeId,
    store::{
        Begin, Followed, IdempotencyStore, LiveEvent, LiveLog, Record, StoreKey, StoredResponse,
        conformance::{self, fp},
    },
};

use crate::{builder, client, dynamodb, store};

/// Real time: the store's clock is the system clock, as on every replica.
async fn sleep(duration: Duration) {
    tokio::time::sleep(duration).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms() {
    let addr = dynamodb().await;
    let table = builder();
    table.clone().build(client(addr)).create_table().await.unwrap();
    conformance::run(|| async { table.clone().build(client(addr)) }, sleep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_live() {
    let addr = dynamodb().await;
    let table = builder();
    table.clone().build(client(addr)).create_table().await.unwrap();
    conformance::run_live(|| async { table.clone().build(client(addr)) }, sleep).await;
    conformance::run_expired(|| async { table.clone().build(client(addr)) }, sleep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_inspect() {
    let addr = dynamodb().await;
    let table = builder();
    table.clone().build(client(addr)).create_table().await.unwrap();
    conformance::run_inspect(|| async { table.clone().build(client(addr)) }, sleep).await;
}

/// The longest key the layer accepts, in a scope: the largest partition key.
fn longest_key() -> StoreKey {
    StoreKey::new(Some(ScopeId::digest("tenant")), IdempotencyKey::parse(&[b'k'; 255]).unwrap())
}

/// A response whose encoding is `len` bytes.
fn response_of(len: usize) -> StoredResponse {
    let empty = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new());
    StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from(vec![0xa5; len - empty.encoded_len()]))
}

/// A response that fits an item (with the longest key) is kept whole; one byte more and it is
/// kept as not retained: the retry gets the not-retained answer, never a second execution,
/// and DynamoDB never refuses the item.
#[tokio::test]
async fn a_response_over_the_item_limit_is_kept_as_not_retained() {
    let store = store().await;
    let max = store.max_record();
    assert!(max > 390 * 1024, "most of the 400 KB item holds the response: {max}");

    let fits = longest_key();
    let lock = lock_long(&store, &fits).await;
    let whole = response_of(max);
    assert!(
        store.complete(&fits, &lock, Record::Response(Arc::new(whole.clone())), conformance::TTL * 10).await.unwrap()
    );
    match conformance::begin(&store, &fits, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(*got, whole, "kept byte for byte"),
        other => panic!("expected the whole record, got {other:?}"),
    }

    let over = StoreKey::new(Some(ScopeId::digest("tenant")), IdempotencyKey::parse(&[b'o'; 255]).unwrap());
    let lock = lock_long(&store, &over).await;
    let record = Record::Response(Arc::new(response_of(max + 1)));
    assert!(store.complete(&over, &lock, record, conformance::TTL * 10).await.unwrap());
    assert!(matches!(conformance::begin(&store, &over, fp(1)).await, Begin::Completed(Record::NotRetained)));
    assert!(matches!(conformance::begin(&store, &over, fp(2)).await, Begin::Mismatch));
}

/// Through the layer: the handler's large response is sent to the first request, and its
/// retry gets `409` `response-not-retained` without running the handler again.
#[tokio::test]
async fn through_the_layer_a_large_response_is_not_retained_and_not_run_twice() {
    let store = store().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let service = {
        let runs = runs.clone();
        ServiceBuilder::new()
            .layer(IdempotencyLayer::from_store(store).with_secret(secret()).with_max_record(1024 * 1024))
            .service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![7; 500 * 1024])))) }
            })
    };
    let request = || Request::post("/orders").header("idempotency-key", "large-1").body(Full::default()).unwrap();
    let first = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes().len(), 500 * 1024);
    let retry = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("response-not-retained"), "{body:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `create_table` makes the table and turns TTL on; run again (every start does), it changes
/// nothing and succeeds.
#[tokio::test]
async fn create_table_is_idempotent_and_turns_ttl_on() {
    let addr = dynamodb().await;
    let store = builder().build(client(addr));
    store.create_table().await.unwrap();
    store.create_table().await.unwrap();
    let client = client(addr);
    let described = client.describe_table().table_name(store.table()).send().await.unwrap();
    let table = described.table().unwrap();
    let keys: Vec<_> = table.key_schema().iter().map(|key| (key.attribute_name(), key.key_type().as_str())).collect();
    assert_eq!(keys, [("pk", "HASH")]);
    let ttl = client.describe_time_to_live().table_name(store.table()).send().await.unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.attribute_name(), Some("ttl"));
    assert_eq!(ttl.time_to_live_status().map(|status| status.as_str()), Some("ENABLED"));
}

/// An item's `ttl` attribute is its expiry in seconds, so DynamoDB reclaims it; the record is
/// judged expired by its `exp` (milliseconds) on read, before any deletion.
#[tokio::test]
async fn items_carry_the_ttl_attribute() {
    let store = store().await;
    let key = conformance::fresh_key(None);
    let lock = lock_long(&store, &key).await;
    assert!(store.complete(&key, &lock, conformance::record(b"x"), Duration::from_secs(3600)).await.unwrap());
    let item = store
        .client()
        .get_item()
        .table_name(store.table())
        .key(
            "pk",
            tower_idempotency::store::aws_sdk_dynamodb::types::AttributeValue::S(format!("-/{}", key.key().as_str())),
        )
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    let item = item.item().expect("the record's item");
    let number = |name: &str| item[name].as_n().unwrap().parse::<u64>().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now + 3590..=now + 3610).contains(&number("ttl")), "ttl {} now {now}", number("ttl"));
    assert_eq!(number("ttl"), number("exp").div_ceil(1000));
    assert!(!item.contains_key("tok"), "a record holds no lock");
}

/// A server that answers every request as DynamoDB does when it throttles.
async fn throttling_server(requests: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(move || {
        requests.fetch_add(1, Ordering::SeqCst);
        async {
            (
                StatusCode::BAD_REQUEST,
                [("content-type", "application/x-amz-json-1.0")],
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded."}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A throttled `begin` (after the SDK's own retries) is a store error: the layer answers `503`
/// with `Retry-After` and never runs the handler.
#[tokio::test]
async fn a_throttle_is_a_503_with_a_retry_hint_and_never_runs_the_handler() {
    let requests = Arc::new(AtomicUsize::new(0));
    let store = builder().build(client(throttling_server(requests.clone()).await));
    let error = store.begin(&conformance::fresh_key(None), &fp(1), conformance::LEASE).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
    assert!(requests.load(Ordering::SeqCst) >= 1);

    let runs = Arc::new(AtomicUsize::new(0));
    let service = {
        let runs = runs.clone();
        ServiceBuilder::new().layer(IdempotencyLayer::from_store(store).with_secret(secret())).service_fn(
            move |_: Request<RequestBody<Full<Bytes>>>| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ran")))) }
            },
        )
    };
    let request = Request::post("/orders").header("idempotency-key", "throttled").body(Full::default()).unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"), "{:?}", response.headers());
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler never runs on a throttle");
}

/// A table that does not exist (not created yet) is a store error, not a panic nor a lock.
#[tokio::test]
async fn a_missing_table_is_unavailable() {
    let store = builder().build(client(dynamodb().await));
    let error = store.begin(&conformance::fresh_key(None), &fp(1), conformance::LEASE).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
}

/// A proxy to the DynamoDB at `upstream` that forwards every request, but answers the first
/// one whose `X-Amz-Target` is `target` with a `500` once DynamoDB has carried it out: an
/// answer lost on the way back, which the SDK sends again. Counts the requests to `target`.
async fn losing_proxy(
    upstream: std::net::SocketAddr,
    target: &'static str,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let seen = Arc::new(AtomicUsize::new(0));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (client, seen) = (client.clone(), counter.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let mut forward = Request::builder().method(parts.method.clone()).uri(format!("http://{upstream}{}", parts.uri));
            for (name, value) in &parts.headers {
                forward = forward.header(name, value);
            }
            let response = client.request(forward.body(Full::new(body)).unwrap()).await.unwrap();
            let (head, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let targeted = parts.headers.get("x-amz-target").is_some_and(|value| value == target);
            if targeted && seen.fetch_add(1, Ordering::SeqCst) == 0 {
                let lost = r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"the answer was lost"}"#;
                return Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .header("content-type", "application/x-amz-json-1.0")
                    .body(axum::body::Body::from(lost))
                    .unwrap();
            }
            Response::from_parts(head, axum::body::Body::from(body))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// A `begin` whose lock was written but whose answer was lost is sent again by the SDK: it
/// finds its own lock and executes, instead of answering `409` to the request that holds it.
#[tokio::test]
async fn a_begin_sent_again_after_a_lost_answer_executes() {
    let upstream = dynamodb().await;
    let table = builder();
    let direct = table.clone().build(client(upstream));
    direct.create_table().await.unwrap();
    let (proxy, sent) = losing_proxy(upstream, "DynamoDB_20120810.PutItem").await;
    let store = table.build(client(proxy));
    let key = conformance::fresh_key(None);
    // A lease longer than the SDK's backoff: the second request finds the first one's lock live.
    let Begin::Execute(token) = store.begin(&key, &fp(1), Duration::from_secs(30)).await.unwrap() else {
        panic!("the lock written by the first request is the caller's");
    };
    assert_eq!(sent.load(Ordering::SeqCst), 2, "the SDK sent the lost `begin` again");
    assert!(matches!(conformance::begin(&direct, &key, fp(1)).await, Begin::Locked));
    assert!(store.complete(&key, &token, conformance::record(b"once"), conformance::TTL).await.unwrap());
}

/// A `complete` whose record was written but whose answer was lost is sent again by the SDK:
/// it reports success. A second `complete` call still gets `false`.
#[tokio::test]
async fn a_complete_sent_again_after_a_lost_answer_reports_success() {
    let upstream = dynamodb().await;
    let table = builder();
    table.clone().build(client(upstream)).create_table().await.unwrap();
    let (proxy, sent) = losing_proxy(upstream, "DynamoDB_20120810.UpdateItem").await;
    let store = table.build(client(proxy));
    let key = conformance::fresh_key(None);
    let Begin::Execute(token) = store.begin(&key, &fp(1), Duration::from_secs(30)).await.unwrap() else {
        panic!("the key is free");
    };
    assert!(store.complete(&key, &token, conformance::record(b"once"), Duration::from_secs(30)).await.unwrap());
    assert_eq!(sent.load(Ordering::SeqCst), 2, "the SDK sent the lost `complete` again");
    assert!(!store.complete(&key, &token, conformance::record(b"twice"), Duration::from_secs(30)).await.unwrap());
    match conformance::begin(&store, &key, fp(1)).await {
        Begin::Completed(Record::Response(got)) => assert_eq!(got.body(), &Bytes::from_static(b"once")),
        other => panic!("expected the record, got {other:?}"),
    }
}

/// The live log lives in the lock's item, so it has a byte bound, and follows the store
/// contract past it: a publish that would pass it fails with a capacity error and appends
/// nothing (so does one sent again), a later one would leave a gap and appends nothing either,
/// the log keeps what came before, and its followers learn of the end as usual.
#[tokio::test]
async fn a_publish_past_the_live_log_bound_fails_with_a_capacity_error_and_appends_nothing() {
    let store = builder().with_live_log_limit(1024).build(client(dynamodb().await));
    store.create_table().await.unwrap();
    let key = conformance::fresh_key(None);
    let token = lock_long(&store, &key).await;
    let data = |len: usize| LiveEvent::Data(Bytes::from(vec![b'x'; len]));
    store.publish(&key, &token, 0, vec![conformance::live_head(), data(600)]).await.unwrap();
    for _ in 0..2 {
        let refused = store.publish(&key, &token, 2, vec![data(600)]).await.unwrap_err();
        assert!(refused.is_capacity(), "past the bound: {refused:?}");
    }
    // One event past the log's end: a gap, never written.
    store.publish(&key, &token, 3, vec![data(10)]).await.unwrap();
    // Too large for the bound on its own, in an empty log's place.
    let key2 = conformance::fresh_key(None);
    let token2 = lock_long(&store, &key2).await;
    let refused = store.publish(&key2, &token2, 0, vec![conformance::live_head(), data(2000)]).await.unwrap_err();
    assert!(refused.is_capacity(), "larger than the bound: {refused:?}");
    let Followed::Live { events, .. } = conformance::follow(&store, &key2, fp(1), None, Duration::ZERO).await else {
        panic!("the lock is live");
    };
    assert!(events.is_empty(), "nothing appended: {events:?}");
    let Followed::Live { events, cursor } =
        conformance::follow(&store, &key, fp(1), None, Duration::from_millis(50)).await
    else {
        panic!("the lock is live");
    };
    assert_eq!(events, vec![conformance::live_head(), data(600)], "the log up to its bound");
    assert!(store.complete(&key, &token, conformance::record(b"all of it"), conformance::TTL).await.unwrap());
    assert_eq!(
        conformance::follow(&store, &key, fp(1), Some(cursor), conformance::LEASE).await,
        Followed::Ended { completed: true }
    );
}

/// Through the layer, the live log's bound is the store contract's: a joined response whose
/// log passes it is kept as not retained (the joiner's body ends with an error, a later
/// duplicate gets `409` `response-not-retained`), the first client gets it all, the handler
/// runs once: the same check as `MemoryStore`'s bound (`tests/common/live_bound.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_response_past_the_live_log_bound_is_not_retained() {
    let store = builder().with_live_log_limit(4096).build(client(dynamodb().await));
    store.create_table().await.unwrap();
    crate::live_bound::a_live_log_past_its_bound_cannot_be_joined(store, 600, || {}).await;
}

/// The key locked for `fp(1)` with a lease no loaded machine outlives: these tests check what
/// the store keeps, not what a lease's end does (the conformance suite checks that), and a
/// DynamoDB-compatible server in the test process can take longer than the suite's short
/// lease between the lock and the last write when the machine is busy.
async fn lock_long(
    store: &tower_idempotency::store::DynamoDbStore,
    key: &StoreKey,
) -> tower_idempotency::store::LockToken {
    match store.begin(key, &fp(1), Duration::from_secs(60)).await.unwrap() {
        Begin::Execute(token) => token,
        other => panic!("expected the key to be free, got {other:?}"),
    }
}

/// The deployment secret of these tests' layers.
fn secret() -> tower_idempotency::Secret {
    tower_idempotency::Secret::new("a test secret, the same on every replica").unwrap()
}

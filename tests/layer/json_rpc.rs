//! Keys from the body (feature `json`), in process on paused time: a JSON-RPC 2.0 route
//! keyed by `params._meta.idempotencyKey` (MCP) replays, joins and refuses with the retry's
//! own `id`, in JSON and in an event stream; notifications and batches as documented; and a
//! key at a JSON Pointer of a plain JSON body.
#![cfg(feature = "json")]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use serde_json::{Value, json};
use tower::{BoxError, Service, ServiceExt};
use tower_idempotency::{
    Duplicates, IdempotencyLayer, KeyPolicy, KeySource, Outcome, RequestBody, ResponseBody, problem,
};

type Body = BoxBody<Bytes, BoxError>;
type Svc = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<ResponseBody<Body>>, BoxError>;

/// A JSON-RPC server: `charge` answers `{"charge":"rpc_N"}` (after `params.delay_ms`, tokio
/// time); `stream` answers `text/event-stream`: `params.events` progress notifications 100 ms
/// apart, then its response; a notification gets `202` and no body. Every call counts.
fn rpc_handler(
    runs: Arc<AtomicUsize>,
) -> impl Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Body>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let body = request.into_body().collect().await?.to_bytes();
            let call: Value = serde_json::from_slice(&body)?;
            let full = |status: u16, content_type: &str, body: String| {
                let body = Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}).boxed();
                Response::builder().status(status).header(header::CONTENT_TYPE, content_type).body(body).unwrap()
            };
            let Some(id) = call.get("id").cloned() else { return Ok(full(202, "text/plain", String::new())) };
            let ms = call["params"]["delay_ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if call["method"] != "stream" {
                let answer = json!({"jsonrpc": "2.0", "id": id, "result": {"charge": format!("rpc_{n}")}});
                return Ok(full(200, "application/json", answer.to_string()));
            }
            let events = call["params"]["events"].as_u64().unwrap_or(3);
            let stream = futures_util::stream::iter(0..=events).then(move |i| {
                let id = id.clone();
                async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let message = match i == events {
                        true => json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": format!("ran {n}")}]}}),
                        false => json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": i}}),
                    };
                    Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(format!("id: {i}\ndata: {message}\n\n"))))
                }
            });
            let body = BodyExt::boxed(StreamBody::new(stream));
            Ok(Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(body).unwrap())
        }
    })
}

fn app(layer: IdempotencyLayer) -> (Svc, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    (tower::util::BoxCloneService::new(tower::Layer::layer(&layer, rpc_handler(runs.clone()))), runs)
}

fn rpc_layer() -> IdempotencyLayer {
    IdempotencyLayer::new().with_key_source(KeySource::json_rpc())
}

/// A JSON-RPC call `method` with `id`, key `key` (none if `None`) and more `params`.
fn call(id: Value, method: &str, key: Option<&str>, params: Value) -> Value {
    let mut params = params;
    if let Some(key) = key {
        params["_meta"] = json!({"idempotencyKey": key, "progressToken": id.clone()});
    }
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

fn post(body: &Value) -> Request<Full<Bytes>> {
    Request::post("/rpc").body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn send(svc: &Svc, request: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let response = svc.clone().oneshot(request).await.unwrap();
    let (head, body) = response.into_parts();
    (Response::from_parts(head, ()), body.collect().await.unwrap().to_bytes())
}

fn json_of(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"))
}

#[tokio::test(start_paused = true)]
async fn a_replay_answers_with_the_retrys_id() {
    let (svc, runs) = app(rpc_layer());
    let (first, body) = send(&svc, post(&call(json!(1), "charge", Some("k-1"), json!({"amount": 5})))).await;
    assert_eq!(Outcome::of(&first), Outcome::Executed);
    assert_eq!(json_of(&body), json!({"jsonrpc": "2.0", "id": 1, "result": {"charge": "rpc_1"}}));
    // The retry has a new id, and a new progress token in `_meta`: the same call.
    for id in [json!("retry-2"), json!(3), json!(null)] {
        let (retry, body) = send(&svc, post(&call(id.clone(), "charge", Some("k-1"), json!({"amount": 5})))).await;
        assert_eq!(Outcome::of(&retry), Outcome::Replayed);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.headers()[header::CONTENT_LENGTH], body.len().to_string().as_str());
        assert_eq!(json_of(&body), json!({"jsonrpc": "2.0", "id": id, "result": {"charge": "rpc_1"}}));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "charged once");
}

#[tokio::test(start_paused = true)]
async fn another_call_with_the_key_is_a_json_rpc_error_with_its_id() {
    let (svc, runs) = app(rpc_layer());
    send(&svc, post(&call(json!(1), "charge", Some("k-2"), json!({"amount": 5})))).await;
    let (reused, body) = send(&svc, post(&call(json!("x"), "charge", Some("k-2"), json!({"amount": 6})))).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.headers()[header::CONTENT_TYPE], "application/json");
    let error = json_of(&body);
    assert_eq!(error["jsonrpc"], "2.0");
    assert_eq!(error["id"], "x");
    assert_eq!(error["error"]["code"], -32002);
    assert_eq!(error["error"]["data"]["type"], problem::KEY_REUSED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_json_rpc_errors_with_the_requests_id() {
    let (svc, runs) = app(rpc_layer());
    // In flight: 409, retryable, with the duplicate's id.
    let slow = call(json!(1), "charge", Some("k-3"), json!({"delay_ms": 1000}));
    let first = tokio::spawn(svc.clone().oneshot(post(&slow)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (busy, body) = send(&svc, post(&call(json!(2), "charge", Some("k-3"), json!({"delay_ms": 1000})))).await;
    assert_eq!(busy.status(), StatusCode::CONFLICT);
    assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    let error = json_of(&body);
    assert_eq!((error["id"].clone(), error["error"]["code"].clone()), (json!(2), json!(-32001)));
    assert_eq!(error["error"]["data"]["retryAfterMs"], 1000);
    first.await.unwrap().unwrap().into_body().collect().await.unwrap();
    // An invalid key, a key that is not a string: 400 invalid params, with the id.
    for key in [json!("a b"), json!(""), json!(7)] {
        let mut bad = call(json!("bad"), "charge", None, json!({}));
        bad["params"]["_meta"] = json!({"idempotencyKey": key});
        let (refused, body) = send(&svc, post(&bad)).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{key}");
        assert_eq!(Outcome::of(&refused), Outcome::InvalidKey);
        let error = json_of(&body);
        assert_eq!((error["id"].clone(), error["error"]["code"].clone()), (json!("bad"), json!(-32602)));
    }
    // Not JSON: a parse error, id null.
    let (refused, body) = send(&svc, Request::post("/rpc").body(Full::new(Bytes::from("{oops"))).unwrap()).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::of(&refused), Outcome::RequestBodyNotJson);
    let error = json_of(&body);
    assert_eq!((error["id"].clone(), error["error"]["code"].clone()), (Value::Null, json!(-32700)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Required keys: a call without one is refused with its id; too large a body, id null.
    let (svc, runs) = app(rpc_layer().with_key_policy(KeyPolicy::Required).with_max_request_body(200));
    let (missing, body) = send(&svc, post(&call(json!(9), "charge", None, json!({})))).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::of(&missing), Outcome::MissingKey);
    let error = json_of(&body);
    assert_eq!((error["id"].clone(), error["error"]["code"].clone()), (json!(9), json!(-32602)));
    let detail = error["error"]["data"]["detail"].as_str().unwrap();
    assert!(detail.starts_with("This method requires an idempotency key in params._meta.idempotencyKey"), "{detail}");
    let (large, body) = send(&svc, post(&call(json!(9), "charge", Some("k"), json!({"pad": "x".repeat(300)})))).await;
    assert_eq!(large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(&body)["id"], Value::Null);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn notifications_and_unkeyed_calls_run_through_keyed_batches_are_refused() {
    let (svc, runs) = app(rpc_layer().with_key_policy(KeyPolicy::Required));
    // A notification, even keyed and where keys are required: no answer to replay or refuse.
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"_meta": {"idempotencyKey": "k-n"}}});
    for _ in 0..2 {
        let (through, body) = send(&svc, post(&notification)).await;
        assert_eq!(through.status(), StatusCode::ACCEPTED);
        assert_eq!(Outcome::of(&through), Outcome::Bypassed);
        assert!(body.is_empty());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // A batch where keys are required: refused, id null.
    let batch = json!([call(json!(1), "charge", None, json!({}))]);
    let (refused, body) = send(&svc, post(&batch)).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&body)["id"], Value::Null);
    assert_eq!(json_of(&body)["error"]["code"], -32602);

    let (svc, runs) = app(rpc_layer());
    // Where keys are optional, a call without a key and a batch without keys run through...
    let unkeyed = call(json!(1), "charge", None, json!({}));
    send(&svc, post(&unkeyed)).await;
    let (again, body) = send(&svc, post(&unkeyed)).await;
    assert_eq!(Outcome::of(&again), Outcome::Bypassed);
    assert_eq!(json_of(&body)["result"]["charge"], "rpc_2");
    // (the handler answers a batch 202: what matters is that it ran)
    let batch = json!([unkeyed.clone(), {"jsonrpc": "2.0", "method": "notifications/x"}]);
    let (through, _) = send(&svc, post(&batch)).await;
    assert_eq!(Outcome::of(&through), Outcome::Bypassed);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // ... and a batch in which a call carries a key is refused.
    let keyed = json!([unkeyed, call(json!(2), "charge", Some("k-b"), json!({}))]);
    let (refused, _) = send(&svc, post(&keyed)).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::of(&refused), Outcome::InvalidKey);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// The data of each event of a JSON-RPC event stream.
fn messages(stream: &Bytes) -> Vec<Value> {
    let text = std::str::from_utf8(stream).unwrap();
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn an_event_stream_joined_and_replayed_carries_the_retrys_id() {
    let (svc, runs) = app(rpc_layer().with_duplicates(Duplicates::join()));
    let stream_call = |id: Value| post(&call(id, "stream", Some("k-s"), json!({"events": 4})));
    let mut first = svc.clone().oneshot(stream_call(json!(1))).await.unwrap().into_body();
    // Two events out, then the client is cut off mid-stream and retries with a new id.
    for _ in 0..2 {
        first.frame().await.unwrap().unwrap();
    }
    let joined = svc.clone().oneshot(stream_call(json!("retry"))).await.unwrap();
    assert_eq!(Outcome::of(&joined), Outcome::Joined);
    assert_eq!(joined.headers()[header::CONTENT_TYPE], "text/event-stream");
    drop(first);
    let joined = joined.into_body().collect().await.unwrap().to_bytes();
    let joined = messages(&joined);
    assert_eq!(joined.len(), 5, "{joined:?}");
    for (i, progress) in joined[..4].iter().enumerate() {
        assert_eq!(progress["method"], "notifications/progress");
        assert_eq!(progress["params"]["progress"], i);
    }
    assert_eq!(joined[4]["id"], "retry");
    assert_eq!(joined[4]["result"]["content"][0]["text"], "ran 1");
    // Once recorded, a replay: the events as recorded, the response with this retry's id.
    let (replay, body) = send(&svc, stream_call(json!(42))).await;
    assert_eq!(Outcome::of(&replay), Outcome::Replayed);
    assert!(
        !replay.headers().contains_key(header::CONTENT_LENGTH)
            || replay.headers()[header::CONTENT_LENGTH] == body.len().to_string().as_str()
    );
    let replayed = messages(&body);
    assert_eq!(replayed[..4], joined[..4]);
    assert_eq!(replayed[4]["id"], 42);
    assert_eq!(replayed[4]["result"], joined[4]["result"]);
    // `Last-Event-ID` still resumes after the event it names.
    let mut resumed = stream_call(json!(43));
    resumed.headers_mut().insert("last-event-id", "2".parse().unwrap());
    let (_, body) = send(&svc, resumed).await;
    let resumed = messages(&body);
    assert_eq!(resumed.len(), 2);
    assert_eq!(resumed[1]["id"], 43);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the tool ran once");
}

#[tokio::test(start_paused = true)]
async fn a_key_at_a_json_pointer_of_a_plain_json_body() {
    let layer = IdempotencyLayer::new().with_key_source(KeySource::json_pointer("/idempotency_key").unwrap());
    let (svc, runs) = app(layer);
    let order = |amount: u32| {
        post(&json!({"jsonrpc": "2.0", "id": 1, "method": "charge", "idempotency_key": "k-p", "amount": amount}))
    };
    let (first, body) = send(&svc, order(5)).await;
    assert_eq!(Outcome::of(&first), Outcome::Executed);
    let (replay, again) = send(&svc, order(5)).await;
    assert_eq!(Outcome::of(&replay), Outcome::Replayed);
    assert_eq!(again, body, "a plain JSON route replays the record as it is");
    let (reused, body) = send(&svc, order(6)).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.headers()[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(json_of(&body)["type"], problem::KEY_REUSED);
    // No key in the body: through, as a request without the header.
    let (through, _) = send(&svc, post(&json!({"amount": 5}))).await;
    assert_eq!(Outcome::of(&through), Outcome::Bypassed);
    let (not_json, _) = send(&svc, Request::post("/rpc").body(Full::new(Bytes::from("amount=5"))).unwrap()).await;
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::of(&not_json), Outcome::RequestBodyNotJson);
    // A header key is not read on such a route.
    let mut with_header = post(&json!({"amount": 7}));
    with_header.headers_mut().insert("idempotency-key", "k-h".parse().unwrap());
    send(&svc, with_header).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Required there, a body without the key is asked for one in the body, never for a header
    // the route does not read.
    let required = IdempotencyLayer::new()
        .with_key_source(KeySource::json_pointer("/idempotency_key").unwrap())
        .with_key_policy(KeyPolicy::Required);
    let (svc, runs) = app(required);
    let mut with_header = post(&json!({"amount": 7}));
    with_header.headers_mut().insert("idempotency-key", "k-h".parse().unwrap());
    let (missing, body) = send(&svc, with_header).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(Outcome::of(&missing), Outcome::MissingKey);
    let problem = json_of(&body);
    assert_eq!(problem["type"], problem::MISSING_KEY);
    assert_eq!(problem["detail"], "This endpoint requires an idempotency key in the JSON request body.");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

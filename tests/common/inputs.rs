//! Checks on arbitrary input, shared by the property tests (`tests/layer/inputs.rs`, run in CI) and
//! the cargo-fuzz targets (`fuzz/`), which include this file by path.
//!
//! - [`check_key`]: `IdempotencyKey::parse` never panics; an accepted key is 1 to 255 visible
//!   ASCII bytes; its quoted form parses to the same key, and so does its bare form when that
//!   form is unambiguous (it does not start with `"`).
//! - [`check_layer`]: the whole layer, fed an arbitrary request head and body, never panics,
//!   answers every request, and every answer it makes itself is a static RFC 9457 problem. The
//!   handler's response comes in memory or streamed (frames that may each be pending once
//!   first), with or without `Content-Length`, with or without a trailers frame; the "server"
//!   reads it to its end, or like hyper (not past `Content-Length` bytes nor past the trailers,
//!   not at all once the body says it ended, then drops it). A recordable response received
//!   whole is replayed, body and trailers, by the request sent next.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MAX_KEY_LEN, Outcome, RequestBody, store::MemoryStore};

/// Checks the key parser on one input.
pub fn check_key(data: &[u8]) {
    let Ok(key) = IdempotencyKey::parse(data) else { return };
    let text = key.as_str();
    assert!(!text.is_empty() && text.len() <= MAX_KEY_LEN, "accepted a key of {} bytes", text.len());
    assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)), "accepted a key with a byte that is not visible ASCII");
    // The quoted form (an RFC 8941 sf-string) is the same key.
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    assert_eq!(IdempotencyKey::parse(quoted.as_bytes()).as_ref(), Ok(&key), "quoted form differs");
    // The bare form is the same key, unless it starts with `"` (then it reads as a quoted string).
    if !text.starts_with('"') {
        assert_eq!(IdempotencyKey::parse(text.as_bytes()).as_ref(), Ok(&key), "bare form differs");
    }
    // `Debug` never shows the key: only its length.
    assert_eq!(format!("{key:?}"), format!("IdempotencyKey({} bytes)", text.len()), "Debug shows the key");
}

/// One arbitrary request, as raw parts: invalid pieces are dropped when it is built.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    pub method: Vec<u8>,
    pub path: Vec<u8>,
    /// Headers as raw name and value bytes (each field on its own, repeats allowed).
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// `Idempotency-Key` values (zero, one, or several fields).
    pub keys: Vec<Vec<u8>>,
    pub authorization: Option<Vec<u8>>,
    /// The body, sent in this many chunks (at least one).
    pub body: Vec<u8>,
    pub chunks: u8,
    /// The response body size the handler answers with.
    pub response_len: u16,
    /// How the handler sends it: in memory (0, and no trailers) or streamed in this many data
    /// frames.
    pub response_chunks: u8,
    /// The handler declares the body's `Content-Length`.
    pub response_sized: bool,
    /// The handler ends the body with a trailers frame.
    pub response_trailers: bool,
    /// Each streamed frame is `Pending` once before it is ready.
    pub response_yields: bool,
    /// The server reads the response body like hyper instead of to its end.
    pub read_like_hyper: bool,
}

/// The request body limit the checked layer is configured with.
pub const MAX_REQUEST_BODY: usize = 512;
/// The record limit the checked layer is configured with.
pub const MAX_RECORD: usize = 256;

/// The trailer a response with trailers ends with.
pub const TRAILER: &str = "x-checksum";

/// What the handler answers with: a body in memory, or [`Streamed`].
pub type ResponseBody = Either<Full<Bytes>, Streamed>;

pub type Handler = tower::util::BoxCloneService<Request<RequestBody<ChunkedBody>>, Response<ResponseBody>, Infallible>;

/// A request body in chunks.
pub type ChunkedBody = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

/// The layer over the handler, boxed.
pub type Layered = tower::util::BoxCloneService<
    Request<ChunkedBody>,
    Response<tower_idempotency::ResponseBody<ResponseBody>>,
    Infallible,
>;

/// A streamed response body: its frames, each `Pending` once first when `yields` (woken at
/// once). It never says it ended before its `None`, and gives no size hint: only its
/// `Content-Length`, its trailers or its `None` tell the layer where it ends.
#[derive(Debug)]
pub struct Streamed {
    frames: VecDeque<Frame<Bytes>>,
    yields: bool,
    yielded: bool,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.yields && !self.yielded && !self.frames.is_empty() {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        Poll::Ready(self.frames.pop_front().map(Ok))
    }
}

/// The layer under test (a small `MemoryStore`, small limits), over a handler that answers
/// `x-len` bytes with the status in `x-status` (default `201`) and a cookie; streamed in
/// `x-chunks` data frames (each pending once first with `x-yield`) when set, or when
/// `x-trailers` asks for a trailers frame at the end; with `Content-Length` when `x-sized`.
pub fn layered() -> Layered {
    let handler: Handler =
        tower::util::BoxCloneService::new(tower::service_fn(|request: Request<RequestBody<ChunkedBody>>| async move {
            let number = |name: &str| {
                request.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
            };
            let len = number("x-len").unwrap_or(0);
            let chunks = number("x-chunks").unwrap_or(0);
            let flag = |name: &str| number(name) == Some(1);
            let (sized, trailers, yields) = (flag("x-sized"), flag("x-trailers"), flag("x-yield"));
            let status = number("x-status")
                .and_then(|s| u16::try_from(s).ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::CREATED);
            let _ = request.into_body().collect().await;
            let data = Bytes::from(vec![b'r'; len]);
            let body = if chunks == 0 && !trailers {
                Either::Left(Full::new(data))
            } else {
                let size = len.div_ceil(chunks.max(1)).max(1);
                let mut frames: VecDeque<_> =
                    data.chunks(size).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect();
                if trailers {
                    let mut map = HeaderMap::new();
                    map.insert(TRAILER, HeaderValue::from(len));
                    frames.push_back(Frame::trailers(map));
                }
                Either::Right(Streamed { frames, yields, yielded: false })
            };
            let mut response = Response::new(body);
            *response.status_mut() = status;
            response.headers_mut().insert("set-cookie", HeaderValue::from_static("sid=secret"));
            if sized {
                response.headers_mut().insert("content-length", HeaderValue::from(len));
            }
            Ok::<_, Infallible>(response)
        }));
    let store = MemoryStore::builder().with_max_entries(64).build();
    let layer = IdempotencyLayer::from_store(store)
        .with_max_request_body(MAX_REQUEST_BODY)
        .with_max_record(MAX_RECORD)
        .with_lease(Duration::from_secs(5));
    tower::util::BoxCloneService::new(tower::Layer::layer(&layer, handler))
}

/// Builds the request; `None` when `http` itself refuses the method or path.
pub fn build(raw: &RawRequest) -> Option<Request<ChunkedBody>> {
    let method = Method::from_bytes(&raw.method).ok()?;
    let mut builder = Request::builder().method(method).uri(http::Uri::try_from(&raw.path[..]).ok()?);
    let headers = builder.headers_mut()?;
    for (name, value) in &raw.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    for key in &raw.keys {
        if let Ok(value) = HeaderValue::from_bytes(key) {
            headers.append("idempotency-key", value);
        }
    }
    if let Some(auth) = raw.authorization.as_ref().and_then(|a| HeaderValue::from_bytes(a).ok()) {
        headers.insert("authorization", auth);
    }
    headers.insert("x-len", HeaderValue::from(raw.response_len));
    headers.insert("x-chunks", HeaderValue::from(u16::from(raw.response_chunks)));
    for (name, on) in
        [("x-sized", raw.response_sized), ("x-trailers", raw.response_trailers), ("x-yield", raw.response_yields)]
    {
        headers.insert(name, HeaderValue::from(u16::from(on)));
    }
    let chunks = usize::from(raw.chunks.max(1));
    let size = raw.body.len().div_ceil(chunks).max(1);
    let frames: Vec<_> = raw.body.chunks(size).map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c)))).collect();
    builder.body(http_body_util::StreamBody::new(futures_util::stream::iter(frames))).ok()
}

/// Sends `raw` twice through `svc` (the second is a retry) and checks both answers.
pub async fn check_layer(svc: &Layered, raw: &RawRequest) {
    let mut answers = Vec::new();
    for _ in 0..2 {
        let Some(request) = build(raw) else { return };
        let response = svc.clone().oneshot(request).await.unwrap_or_else(|never| match never {});
        answers.push(check_response(raw, response).await);
    }
    // A recorded first answer, received whole (however the server read it), is replayed to
    // the request sent next — body and trailers; one over the record limit leaves a not-retained record.
    if let [(Outcome::Executed, status, body, trailers), (second, status2, body2, trailers2)] = &answers[..] {
        if status.is_success() && body.len() <= MAX_RECORD {
            assert_eq!(*second, Outcome::Replayed, "a recordable response received whole is replayed next");
            assert_eq!((status, body, trailers), (status2, body2, trailers2), "the replay differs from the original");
        } else if status.is_success() {
            assert_eq!(*second, Outcome::ResponseNotRetained);
        } else {
            assert_eq!(*second, Outcome::Executed, "a {status} must release the key");
        }
    }
}

/// Reads a response body as the server does: to its end, or like hyper — not at all once the
/// body says it ended, not past `Content-Length` bytes nor past a trailers frame — and drops
/// it. Returns its bytes and trailers.
pub async fn read_body<B>(headers: &HeaderMap, body: B, like_hyper: bool) -> (Bytes, Option<HeaderMap>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    if !like_hyper {
        let collected = body.collect().await.expect("the body reads to its end");
        let trailers = collected.trailers().cloned();
        return (collected.to_bytes(), trailers);
    }
    let length = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let (mut body, mut data, mut trailers) = (body, BytesMut::new(), None);
    while !body.is_end_stream() && length != Some(data.len()) {
        let Some(frame) = body.frame().await else { break };
        match frame.expect("the body reads").into_data() {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                break;
            }
        }
    }
    (data.freeze(), trailers)
}

/// Checks one answer; returns what it was.
async fn check_response(
    raw: &RawRequest,
    response: Response<tower_idempotency::ResponseBody<ResponseBody>>,
) -> (Outcome, StatusCode, Bytes, Option<HeaderMap>) {
    let outcome = Outcome::of(&response);
    let (head, body) = response.into_parts();
    let (body, trailers) = read_body(&head.headers, body, raw.read_like_hyper).await;
    let status = head.status.as_u16();
    assert!((100..=999).contains(&status), "status {status}");
    match outcome {
        Outcome::Bypassed | Outcome::Executed | Outcome::Unprotected => {
            assert_eq!(body.len(), usize::from(raw.response_len), "the handler's own body");
            // The handler's trailers, if any arrive; they always do when no `Content-Length`
            // ends the body before them.
            if let Some(trailers) = &trailers {
                assert!(raw.response_trailers, "trailers the handler did not send");
                assert_eq!(trailers[TRAILER], raw.response_len.to_string().as_str(), "the handler's trailers");
            }
            assert!(
                trailers.is_some() || !raw.response_trailers || raw.response_sized,
                "the handler's trailers were lost"
            );
            assert!(head.headers.get("idempotent-replayed").is_none());
        }
        Outcome::Replayed => {
            assert_eq!(head.headers["idempotent-replayed"], "true");
            // `Content-Length` is recomputed, except where it does not belong (guide, step 8).
            let no_content = head.status.is_informational() || status == 204 || status == 304;
            let length = head.headers.get("content-length").map(|v| v.to_str().unwrap().to_owned());
            let expected = (!no_content && trailers.is_none()).then(|| body.len().to_string());
            assert_eq!(length, expected, "a replay's Content-Length");
            assert!(head.headers.get("set-cookie").is_none(), "a replay carries a cookie");
        }
        _ => {
            assert_eq!(head.headers["content-type"], "application/problem+json", "{outcome:?}");
            let json: serde_json::Value = serde_json::from_slice(&body).expect("a problem body is JSON");
            assert_eq!(json["status"], status);
            let kind = json["type"].as_str().expect("a type");
            assert!(
                kind.starts_with("https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#"),
                "{kind}"
            );
            assert!(json["title"].is_string() && json["detail"].is_string());
            assert_eq!(json.as_object().map(|o| o.len()), Some(4), "only type, title, status, detail");
            // Nothing from the request is echoed: every problem body is one of the static texts.
            for needle in raw.keys.iter().chain(raw.authorization.iter()).filter(|n| n.len() >= 12) {
                assert!(!body.windows(needle.len()).any(|w| w == &needle[..]), "a problem echoes the request");
            }
            match outcome {
                Outcome::InvalidKey
                | Outcome::MissingKey
                | Outcome::RequestBodyUnreadable
                | Outcome::RequestBodyNotJson => assert_eq!(status, 400),
                Outcome::InFlight => assert_eq!(status, 409),
                Outcome::ResponseNotRetained => assert_eq!(status, 409),
                Outcome::RequestBodyTooLarge => {
                    assert_eq!(status, 413);
                    assert!(raw.body.len() > MAX_REQUEST_BODY);
                }
                Outcome::KeyReused => assert_eq!(status, 422),
                Outcome::StoreUnavailable => assert_eq!(status, 503),
                other => panic!("unexpected outcome {other:?}"),
            }
            let retry_after = head.headers.contains_key("retry-after");
            assert_eq!(retry_after, matches!(outcome, Outcome::InFlight | Outcome::StoreUnavailable), "{outcome:?}");
        }
    }
    (outcome, head.status, body, trailers)
}

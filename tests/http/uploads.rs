//! Resumable uploads (the IETF draft "Resumable Uploads for HTTP") over real hyper on
//! loopback: upload appends (`PATCH` with `Upload-Offset`, `application/partial-upload`) pass
//! the layer untouched by default, and `104 (Upload Resumption Supported)` interim responses
//! reach the application through the client half, on every attempt.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tower::{ServiceBuilder, ServiceExt, retry::RetryLayer};
use tower_idempotency::{
    IdempotencyLayer, Outcome, RequestBody, UploadAppends,
    client::{RetryPolicy, SetIdempotencyKeyLayer},
};

/// The layer in front of a handler that counts its runs, on a real hyper server (HTTP/1.1
/// and HTTP/2 on one port, hyper-util's auto builder). Each response carries its outcome.
async fn serve(layer: IdempotencyLayer) -> (SocketAddr, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |request: Request<RequestBody<hyper::body::Incoming>>| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let offset = request.headers().get("upload-offset").cloned();
                let body = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                let mut response = Response::new(Full::new(Bytes::from(format!("run {n}"))));
                *response.status_mut() = StatusCode::CREATED;
                if let Some(offset) = offset {
                    let end = offset.to_str().unwrap().parse::<usize>().unwrap() + body;
                    response.headers_mut().insert("upload-offset", end.into());
                }
                Ok::<_, Infallible>(response)
            }
        }
    };
    let service = ServiceBuilder::new()
        .map_response(|response: Response<_>| {
            let outcome = Outcome::of(&response).as_str();
            let (mut head, body) = response.into_parts();
            head.headers.insert("x-outcome", outcome.parse().unwrap());
            Response::from_parts(head, body)
        })
        .layer(layer)
        .service_fn(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    (addr, runs)
}

struct Got {
    status: StatusCode,
    outcome: String,
    replayed: bool,
    offset: Option<String>,
}

async fn patch(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &'static str) -> Got {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::patch(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap()).await.unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    Got {
        status: response.status(),
        outcome: header("x-outcome").unwrap_or_default(),
        replayed: header("idempotent-replayed").is_some(),
        offset: header("upload-offset"),
    }
}

const APPEND: [(&str, &str); 3] =
    [("idempotency-key", "upload-1"), ("upload-offset", "0"), ("content-type", "application/partial-upload")];

#[tokio::test]
async fn upload_appends_pass_the_layer_untouched_by_default() {
    let (addr, runs) = serve(IdempotencyLayer::new()).await;
    // The same append twice, even under one key: both run, neither is recorded or replayed.
    for _ in 0..2 {
        let got = patch(addr, "/uploads/1", &APPEND, "chunk").await;
        assert_eq!((got.status, got.outcome.as_str(), got.replayed), (StatusCode::CREATED, "bypassed", false));
        assert_eq!(got.offset.as_deref(), Some("5"), "the handler saw the append and its offset");
    }
    // Either sign alone makes an append.
    let offset_only = [("idempotency-key", "upload-2"), ("upload-offset", "5")];
    let type_only = [("idempotency-key", "upload-3"), ("content-type", "application/partial-upload; x=1")];
    for headers in [&offset_only[..], &type_only[..]] {
        for _ in 0..2 {
            assert_eq!(patch(addr, "/uploads/1", headers, "more").await.outcome, "bypassed");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);
    // Any other PATCH with a key is guarded: it runs once and replays.
    let other = [("idempotency-key", "patch-1"), ("content-type", "application/json")];
    assert_eq!(patch(addr, "/orders/1", &other, "{}").await.outcome, "executed");
    let retry = patch(addr, "/orders/1", &other, "{}").await;
    assert!(retry.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn upload_appends_can_be_guarded_instead() {
    let (addr, runs) = serve(IdempotencyLayer::new().with_upload_appends(UploadAppends::Guard)).await;
    assert_eq!(patch(addr, "/uploads/1", &APPEND, "chunk").await.outcome, "executed");
    let retry = patch(addr, "/uploads/1", &APPEND, "chunk").await;
    assert_eq!((retry.outcome.as_str(), retry.replayed), ("replayed", true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A server that answers every request on its connection first with a `104 (Upload
/// Resumption Supported)` interim response naming the upload, then with `503` (asking for a
/// retry in 1 ms) the first time and `201` after. hyper's server cannot send interim responses
/// yet, so this one writes HTTP/1.1 by hand; the client is hyper's.
async fn upload_server() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let keys = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = keys.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    // One request: its head, then its Content-Length body.
                    let head_end = loop {
                        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        let mut chunk = [0; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
                    let field = |name: &str| {
                        head.lines().find_map(|line| line.strip_prefix(&format!("{name}: ")).map(str::to_owned))
                    };
                    let length: usize = field("content-length").map_or(0, |v| v.parse().unwrap());
                    while buffer.len() < head_end + length {
                        let mut chunk = [0; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buffer.drain(..head_end + length);
                    let attempt = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(field("idempotency-key").unwrap_or_default());
                        seen.len()
                    };
                    let interim = "HTTP/1.1 104 Upload Resumption Supported\r\nlocation: /uploads/7\r\nupload-draft-interop-version: 6\r\n\r\n";
                    let last = if attempt == 1 {
                        "HTTP/1.1 503 Service Unavailable\r\nretry-after-ms: 1\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        "HTTP/1.1 201 Created\r\nlocation: /uploads/7\r\ncontent-length: 0\r\n\r\n"
                    };
                    if tcp.write_all(format!("{interim}{last}").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, keys)
}

#[tokio::test]
async fn interim_104_responses_reach_the_application_on_every_attempt() {
    let (addr, keys) = upload_server().await;
    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(RetryPolicy::new()))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let interim: Arc<Mutex<Vec<(StatusCode, String)>>> = Arc::default();
    let mut request = Request::post(format!("http://{addr}/uploads"))
        .header("upload-complete", "?1")
        .header("upload-draft-interop-version", "6")
        .body(Full::new(Bytes::from_static(b"the whole file")))
        .unwrap();
    hyper::ext::on_informational(&mut request, {
        let interim = interim.clone();
        move |response| {
            let location = response.headers()["location"].to_str().unwrap().to_owned();
            interim.lock().unwrap().push((response.status(), location));
        }
    });
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2, "a 503, then the retry");
    assert!(!keys[0].is_empty() && keys[0] == keys[1], "one key for both attempts: {keys:?}");
    let upload = (StatusCode::from_u16(104).unwrap(), "/uploads/7".to_owned());
    assert_eq!(*interim.lock().unwrap(), [upload.clone(), upload], "the 104 of each attempt reached the application");
}

#[tokio::test]
async fn the_client_stamps_no_key_on_an_append() {
    let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
    let server = tower::service_fn({
        let seen = seen.clone();
        move |request: Request<Full<Bytes>>| {
            seen.lock().unwrap().push(request.headers().contains_key("idempotency-key"));
            async { Ok::<_, Infallible>(Response::new(())) }
        }
    });
    let client = ServiceBuilder::new().layer(SetIdempotencyKeyLayer::new()).service(server);
    let append = Request::patch("/uploads/7").header("upload-offset", "10").body(Full::default()).unwrap();
    let other = Request::patch("/orders/7").body(Full::default()).unwrap();
    client.clone().oneshot(append).await.unwrap();
    client.oneshot(other).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [false, true]);
}

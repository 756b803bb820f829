//! Real processes: example servers (this test binary started again with
//! `IDEM_DYNAMODB_CHILD` set runs the example server's `serve_from_env`) on one DynamoDB table,
//! served by this process. Two of them replay each other's keys, keep a large response as not
//! retained, let a duplicate wait on one for the request running on the other, and join a
//! stream running on the other; one started while DynamoDB is down answers `503` until it is
//! back.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower_idempotency::store::DynamoDbStore;

use crate::{client, dynamodb, serve};

#[path = "../../examples/server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs, clippy::result_large_err)]
mod server;

/// The environment variable that makes this binary the example server.
const CHILD: &str = "IDEM_DYNAMODB_CHILD";

/// Not a test of its own: in a child started with `IDEM_DYNAMODB_CHILD`, the example server
/// (it never returns); anywhere else it returns at once.
#[test]
fn example_server_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(server::serve_from_env()).unwrap();
}

/// One example server process on the DynamoDB at `endpoint`, table `table`.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(endpoint: SocketAddr, table: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "processes::example_server_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .env("DYNAMODB_ENDPOINT", format!("http://{endpoint}"))
            .env("DYNAMODB_TABLE", table)
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .env("ADDR", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("the server printed its address").unwrap();
            if let Some((_, url)) = line.split_once("listening on ") {
                break url.trim().to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, url }
    }

    async fn post(&self, path: &str, key: &str) -> (StatusCode, HeaderMap, Bytes) {
        post(&self.url, path, key).await
    }

    async fn executions(&self, route: &str) -> u64 {
        let request = Request::get(format!("{}/stats", self.url)).body(Full::new(Bytes::new())).unwrap();
        let response = Client::builder(TokioExecutor::new()).build_http().request(request).await.unwrap();
        let stats: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        stats[route].as_u64().expect("stats has the route")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST path` on the server at `url` with `key` and a JSON body: status, headers, body.
async fn post(url: &str, path: &str, key: &str) -> (StatusCode, HeaderMap, Bytes) {
    let request = Request::post(format!("{url}{path}"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"sku\":\"A1\"}")))
        .unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

fn replayed(headers: &HeaderMap) -> bool {
    headers.get("idempotent-replayed").is_some_and(|value| value == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sharing_a_table_replay_each_others_keys() {
    let endpoint = dynamodb().await;
    let table = format!("idem-{}", uuid::Uuid::new_v4().simple());
    DynamoDbStore::builder().with_table(&table).build(client(endpoint)).create_table().await.unwrap();
    let (one, two) = (Server::start(endpoint, &table), Server::start(endpoint, &table));
    let key = |name: &str| format!("{name}-{}", uuid::Uuid::new_v4());

    // A record made on one is replayed by the other.
    let orders = key("order");
    let (status, headers, body) = one.post("/orders", &orders).await;
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    assert!(!replayed(&headers));
    let (status, headers, replay) = two.post("/orders", &orders).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers), "{headers:?}");
    assert_eq!(replay, body);

    // A response too large for an item: the other server answers not retained, never runs it.
    let large = key("large");
    let (status, _, body) = one.post("/large?bytes=450000", &large).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 450_000));
    let (status, _, body) = two.post("/large?bytes=450000", &large).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8_lossy(&body).contains("response-not-retained"), "{body:?}");

    // A duplicate on the other server waits (polling the table) for the request in flight.
    let jobs = key("job");
    let first = {
        let (url, jobs) = (one.url.clone(), jobs.clone());
        tokio::spawn(async move { post(&url, "/jobs?delay_ms=1500", &jobs).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, headers, waited) = two.post("/jobs?delay_ms=1500", &jobs).await;
    let (first_status, _, first_body) = first.await.unwrap();
    assert_eq!((first_status, status), (StatusCode::CREATED, StatusCode::CREATED), "{waited:?}");
    assert!(replayed(&headers), "the duplicate got the first request's response: {headers:?}");
    assert_eq!(waited, first_body);

    for (route, executions) in [("orders", (1, 0)), ("large", (1, 0)), ("jobs", (1, 0))] {
        assert_eq!((one.executions(route).await, two.executions(route).await), executions, "{route}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_dynamodb_is_down_answers_503_until_it_is_back() {
    // A port nothing listens on yet.
    let endpoint = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let table = format!("idem-{}", uuid::Uuid::new_v4().simple());
    let server = Server::start(endpoint, &table);
    let orders = format!("down-{}", uuid::Uuid::new_v4());
    let (status, headers, _) = server.post("/orders", &orders).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(server.executions("orders").await, 0);

    // DynamoDB comes up; the server creates its table and serves.
    serve(tokio::net::TcpListener::bind(endpoint).await.unwrap());
    let mut answered = None;
    for _ in 0..120 {
        let (status, headers, _) = server.post("/orders", &orders).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            answered = Some((status, replayed(&headers)));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(answered, Some((StatusCode::CREATED, false)), "served once DynamoDB is back");
    let (status, headers, _) = server.post("/orders", &orders).await;
    assert_eq!((status, replayed(&headers)), (StatusCode::CREATED, true));
    assert_eq!(server.executions("orders").await, 1);
}

fn event(i: usize) -> String {
    format!("id: {i}\ndata: {i}\n\n")
}

/// A stream cut on one server is joined on the other: the retry, with `Last-Event-ID`, follows
/// the generation still running on the first (by polling the table) and gets every later
/// event once, as it is produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_is_joined_on_the_other_server() {
    let endpoint = dynamodb().await;
    let table = format!("idem-{}", uuid::Uuid::new_v4().simple());
    DynamoDbStore::builder().with_table(&table).build(client(endpoint)).create_table().await.unwrap();
    let (one, two) = (Server::start(endpoint, &table), Server::start(endpoint, &table));
    let key = format!("stream-{}", uuid::Uuid::new_v4());
    const EVENTS: usize = 20;
    let stream = |server: &Server, last: Option<&str>| {
        let mut request = Request::post(format!("{}/stream?chunks={EVENTS}&chunk_delay_ms=50", server.url))
            .header("idempotency-key", &key)
            .header("content-type", "application/json");
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request.body(Full::new(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap()
    };
    {
        let response = Client::builder(TokioExecutor::new()).build_http().request(stream(&one, None)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut seen = String::new();
        while seen.matches("\n\n").count() < 3 {
            let frame = body.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
        }
        assert_eq!(seen, (0..3).map(event).collect::<String>());
    }
    let response = Client::builder(TokioExecutor::new()).build_http().request(stream(&two, Some("2"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(replayed(response.headers()));
    assert!(response.headers().get("content-length").is_none(), "joined, not replayed: {:?}", response.headers());
    let rest = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(rest, (3..EVENTS).map(event).collect::<String>(), "every event after the last seen, once");
    assert_eq!((one.executions("stream").await, two.executions("stream").await), (1, 0));
}

/// Two stores asked for: the example server refuses to start, saying why.
#[test]
fn the_server_refuses_two_stores() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "processes::example_server_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("DYNAMODB_ENDPOINT", "http://127.0.0.1:9")
        .env("REDIS_URL", "redis://127.0.0.1:9")
        .env_remove("DATABASE_URL")
        .env("ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("REDIS_URL and DYNAMODB_ENDPOINT are set"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"));
}

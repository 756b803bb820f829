//! Guide, step 9 across replicas: two example server processes sharing one Redis. A generation
//! started on one is cut after a few events; the retry, sent to the other process with the
//! same key and `Last-Event-ID`, joins the generation still running there and gets the rest,
//! exactly once, as it is produced. Real processes: this test binary started again with
//! `IDEM_REDIS_CHILD` set runs the example server's `serve_from_env`.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use crate::common::redis::{Proxy, redis_url, tcp_addr};

#[path = "../../examples/server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs, clippy::result_large_err)]
mod server;

/// The environment variable that makes this binary the example server.
const CHILD: &str = "IDEM_REDIS_CHILD";

/// Not a test of its own: in a child started with `IDEM_REDIS_CHILD`, the example server (it
/// never returns); anywhere else it returns at once.
#[test]
fn example_server_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(server::serve_from_env()).unwrap();
}

/// One example server process on `REDIS_URL` = `url`.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(redis: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "redis_processes::example_server_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .env("REDIS_URL", redis)
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

    async fn stream_executions(&self) -> u64 {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let request = Request::get(format!("{}/stats", self.url)).body(Full::new(Bytes::new())).unwrap();
        let response = client.request(request).await.unwrap();
        let stats: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        stats["stream"].as_u64().expect("stats has `stream`")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(i: usize) -> String {
    format!("id: {i}\ndata: {i}\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_continues_on_another_replica() {
    let Some(redis) = redis_url().await else { return };
    let (one, two) = (Server::start(&redis), Server::start(&redis));
    let key = format!("replicas-{}", uuid::Uuid::new_v4());
    const EVENTS: usize = 20;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let stream = |server: &Server, last: Option<&str>| {
        let mut request = Request::post(format!("{}/stream?chunks={EVENTS}&chunk_delay_ms=50", server.url))
            .header("idempotency-key", &key)
            .header("content-type", "application/json");
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request.body(Full::new(Bytes::from_static(b"{\"prompt\":\"hi\"}"))).unwrap()
    };
    // Cut after three events: the body and its connection are dropped.
    {
        let response = client.request(stream(&one, None)).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut seen = String::new();
        while seen.matches("\n\n").count() < 3 {
            let frame = body.frame().await.unwrap().unwrap();
            seen.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
        }
        assert_eq!(seen, (0..3).map(event).collect::<String>());
    }
    // The retry lands on the other replica, which joins the generation running on the first.
    let response = Client::builder(TokioExecutor::new()).build_http().request(stream(&two, Some("2"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    // Joined, not replayed after the end: a replay carries its length, a joined response
    // (still being produced) cannot.
    assert!(response.headers().get("content-length").is_none(), "a replay, not a join: {:?}", response.headers());
    let rest = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(rest, (3..EVENTS).map(event).collect::<String>(), "every event after the last seen, once");
    assert_eq!((one.stream_executions().await, two.stream_executions().await), (1, 0), "one generation");
}

/// `POST url` with `key`: the status, and whether it was a replay.
async fn post(url: &str, key: &str) -> (u16, bool) {
    let request = Request::post(url)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"sku\":\"A1\"}")))
        .unwrap();
    let response = Client::builder(TokioExecutor::new()).build_http().request(request).await.unwrap();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    (response.status().as_u16(), replayed)
}

/// Started while Redis does not answer (its port closed), the example server starts anyway
/// and answers `503` per request; once Redis answers (a proxy opens the port), it serves, each
/// key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_redis_is_down_answers_503_until_it_is_back() {
    let Some(redis) = redis_url().await else { return };
    let mut proxy = Proxy::down(tcp_addr(&redis)).await;
    // The same URL (database, credentials), at the proxy's closed port.
    let authority_start = redis.find("://").map_or(0, |i| i + 3);
    let authority_end = redis[authority_start..].find('/').map_or(redis.len(), |i| i + authority_start);
    let host_start =
        redis[authority_start..authority_end].rfind('@').map_or(authority_start, |i| i + authority_start + 1);
    let through_proxy = format!("{}{}{}", &redis[..host_start], proxy.addr, &redis[authority_end..]);
    let server = Server::start(&through_proxy);
    let orders = format!("{}/orders", server.url);
    let key = format!("down-{}", uuid::Uuid::new_v4());
    for _ in 0..2 {
        assert_eq!(post(&orders, &key).await, (503, false), "while Redis is down");
    }

    proxy.up().await;
    let mut answered = None;
    for _ in 0..120 {
        match post(&orders, &key).await {
            (503, _) => tokio::time::sleep(Duration::from_millis(250)).await,
            other => {
                answered = Some(other);
                break;
            }
        }
    }
    assert_eq!(answered, Some((201, false)), "served once Redis is back");
    assert_eq!(post(&orders, &key).await, (201, true));
    drop(server);
    proxy.take_down().await;
}

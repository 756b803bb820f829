//! Real processes over one database: the example server, run as a child process (this test
//! binary started again with `IDEM_PG_CHILD` set runs the server's `serve_from_env`), started
//! twice, restarted, and aborted between the handler's insert and the commit.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use super::Db;

#[path = "../../examples/server.rs"]
#[allow(dead_code, unreachable_pub, missing_docs, clippy::result_large_err)]
mod server;

/// The environment variable that makes this binary the example server.
const CHILD: &str = "IDEM_PG_CHILD";

/// Not a test of its own: in a child started with `IDEM_PG_CHILD`, the example server (it
/// never returns); anywhere else it returns at once.
#[test]
fn example_server_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(server::serve_from_env()).unwrap();
}

/// One example server process on `DATABASE_URL` = `db.url()`.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(db: &Db) -> Self {
        Self::start_at(&db.url())
    }

    /// One example server process on `DATABASE_URL` = `database`.
    fn start_at(database: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "processes::example_server_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .env("DATABASE_URL", database)
            .env_remove("REDIS_URL")
            .env("ADDR", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("the server printed its address").unwrap();
            // The test harness prints the test's name on the same line first.
            if let Some((_, url)) = line.split_once("listening on ") {
                break url.trim().to_owned();
            }
        };
        // Keep draining stdout so that the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, url }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to end by itself (an abort); its exit status.
    fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    async fn stats(&self) -> Value {
        reqwest_like::get(&format!("{}/stats", self.url)).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP/1.1 client over hyper: status, `Idempotent-Replayed`, body.
mod reqwest_like {
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use serde_json::Value;

    pub(super) struct Reply {
        pub(super) status: u16,
        pub(super) replayed: bool,
        pub(super) body: Value,
    }

    /// `POST url` with `key` and extra headers; `None` when the connection broke (the server
    /// died).
    pub(super) async fn post(url: &str, key: &str, headers: &[(&str, &str)], body: &'static str) -> Option<Reply> {
        let mut request = Request::post(url).header("idempotency-key", key).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        let response = client.request(request).await.ok()?;
        let status = response.status().as_u16();
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        Some(Reply { status, replayed, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) })
    }

    pub(super) async fn get(url: &str) -> Value {
        let client = Client::builder(TokioExecutor::new()).build_http();
        let response = client.request(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
    }
}

use reqwest_like::post;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_keys_wait_for_each_other_and_records_survive_restarting_both() {
    let db = Db::new().await;
    let (a, b) = (Server::start(&db), Server::start(&db));
    let first = post(&format!("{}/orders", a.url), "shared-1", &[], r#"{"sku":"A1"}"#).await.unwrap();
    assert_eq!((first.status, first.replayed), (201, false));
    // The other process replays what the first did.
    let second = post(&format!("{}/orders", b.url), "shared-1", &[], r#"{"sku":"A1"}"#).await.unwrap();
    assert_eq!((second.status, second.replayed), (201, true));
    assert_eq!(second.body, first.body);
    // Another payload under the key, on either process: 422.
    let reused = post(&format!("{}/orders", b.url), "shared-1", &[], r#"{"sku":"B2"}"#).await.unwrap();
    assert_eq!(reused.status, 422);
    // A duplicate in flight on the other process: 409, the handler ran once.
    let slow_url = format!("{}/orders?delay_ms=1000", a.url);
    let slow = tokio::spawn(async move { post(&slow_url, "shared-2", &[], "{}").await.unwrap() });
    super::eventually(Duration::from_secs(5), "the slow order runs", || async { a.stats().await["orders"] == 2 }).await;
    let dup = post(&format!("{}/orders?delay_ms=1000", b.url), "shared-2", &[], "{}").await.unwrap();
    assert_eq!(dup.status, 409);
    assert_eq!(slow.await.unwrap().status, 201);
    // `/jobs` waits: a duplicate on the other process waits for the first and replays it.
    let slow_url = format!("{}/jobs?delay_ms=500", a.url);
    let slow = tokio::spawn(async move { post(&slow_url, "shared-3", &[], "{}").await.unwrap() });
    super::eventually(Duration::from_secs(5), "the slow job runs", || async { a.stats().await["jobs"] == 1 }).await;
    let waited = post(&format!("{}/jobs?delay_ms=500", b.url), "shared-3", &[], "{}").await.unwrap();
    let first = slow.await.unwrap();
    assert_eq!((first.status, waited.status, waited.replayed), (201, 201, true));
    assert_eq!(waited.body, first.body);
    let (a_stats, b_stats) = (a.stats().await, b.stats().await);
    assert_eq!((a_stats["orders"].as_u64(), a_stats["jobs"].as_u64()), (Some(2), Some(1)), "{a_stats}");
    assert_eq!((b_stats["orders"].as_u64(), b_stats["jobs"].as_u64()), (Some(0), Some(0)), "{b_stats}");

    // Both processes restart: the records are in the database.
    a.kill();
    b.kill();
    let c = Server::start(&db);
    for key in ["shared-1", "shared-2"] {
        let body = if key == "shared-1" { r#"{"sku":"A1"}"# } else { "{}" };
        let url =
            if key == "shared-1" { format!("{}/orders", c.url) } else { format!("{}/orders?delay_ms=1000", c.url) };
        let again = post(&url, key, &[], body).await.unwrap();
        assert_eq!((again.status, again.replayed), (201, true), "{key}");
    }
    assert_eq!(c.stats().await["orders"], 0);
    c.kill();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_aborted_before_its_commit_leaves_nothing_and_the_retry_runs_once() {
    let db = Db::new().await;
    let server = Server::start(&db);
    let abort = [("x-abort-before-commit", "1")];
    let url = format!("{}/ledger", server.url);
    // The handler inserted its row, then the process died before the layer committed.
    assert!(post(&url, "charge-1", &abort, r#"{"amount":100}"#).await.is_none(), "the process died");
    let status = server.wait();
    assert!(!status.success(), "aborted: {status:?}");
    // Nothing is left: no ledger row, no record, no lock.
    assert_eq!(db.count("ledger").await, 0);
    assert_eq!(db.keys().await, 0);

    // Restarted, the retry executes (the key is free) once; the next one replays.
    let server = Server::start(&db);
    let url = format!("{}/ledger", server.url);
    let retry = post(&url, "charge-1", &[], r#"{"amount":100}"#).await.unwrap();
    assert_eq!((retry.status, retry.replayed), (201, false));
    let again = post(&url, "charge-1", &[], r#"{"amount":100}"#).await.unwrap();
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, retry.body);
    let stats = server.stats().await;
    assert_eq!((stats["ledger"].as_u64(), stats["ledger_rows"].as_i64()), (Some(1), Some(1)), "{stats}");
    assert_eq!(db.count("ledger").await, 1);
    server.kill();
    db.drop().await;
}

/// Started while PostgreSQL does not answer (its port closed), the example server starts
/// anyway and answers `503` per request, the transactional route too; once the database
/// answers (a proxy opens the port), it creates its tables and serves, each key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_postgres_is_down_answers_503_until_it_is_back() {
    let db = Db::new().await;
    let options: sqlx::postgres::PgConnectOptions = super::database_url().parse().unwrap();
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    // A port nothing listens on yet: the database as the server will reach it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = db.url();
    let through_port = if url.contains(&upstream) {
        url.replacen(&upstream, &format!("127.0.0.1:{port}"), 1)
    } else {
        url.replacen(&format!("@{}", options.get_host()), &format!("@127.0.0.1:{port}"), 1)
    };
    let server = Server::start_at(&through_port);

    let orders = format!("{}/orders", server.url);
    let ledger = format!("{}/ledger", server.url);
    let key = |url: &str| if url.ends_with("/orders") { "down-order" } else { "down-charge" };
    for url in [&orders, &ledger] {
        let down = post(url, key(url), &[], r#"{"sku":"A1"}"#).await.unwrap();
        assert_eq!(down.status, 503, "{url} while PostgreSQL is down: {:?}", down.body);
    }
    assert_eq!(server.stats().await["orders"], 0);

    // The database appears on the port.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    for url in [&orders, &ledger] {
        let mut answered = None;
        for _ in 0..120 {
            let reply = post(url, key(url), &[], r#"{"sku":"A1"}"#).await.unwrap();
            if reply.status != 503 {
                answered = Some((reply.status, reply.replayed));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(answered, Some((201, false)), "{url} once PostgreSQL is back");
        let again = post(url, key(url), &[], r#"{"sku":"A1"}"#).await.unwrap();
        assert_eq!((again.status, again.replayed), (201, true), "{url}");
    }
    assert_eq!(server.stats().await["orders"], 1);
    assert_eq!(db.count("ledger").await, 1, "the server created its ledger table, and wrote one row");
    assert_eq!(db.keys().await, 2);
    server.kill();
    db.drop().await;
}

//! Resume exactly (`Last-Event-ID`) over real hyper, on the memory, Redis and PostgreSQL
//! stores (the matrix is in `tests/common/resume.rs`; Redis Cluster runs it in
//! `tests/stores/redis_cluster.rs`), and "seen means resumable": a client that reconnects to
//! another replica faster than the publish of the event it saw reaches the store still resumes
//! after it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use crate::resume::{self, Gate, Newline, Proto, SHAPES, Shape, Stream, post, serve};
use http::{Response, StatusCode, header};
use tower_idempotency::store::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_resumes_exactly() {
    let store = MemoryStore::new();
    for shape in SHAPES {
        resume::resume_exactly([store.clone(), store.clone()], shape).await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use tower_idempotency::store::RedisStore;

    pub(super) fn url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A replica's store: its own connections (enough blocking readers for every joiner), and
    /// an operation timeout a loaded test machine does not reach.
    pub(super) async fn store(url: impl redis::IntoConnectionInfo, prefix: &str) -> RedisStore {
        RedisStore::builder()
            .with_prefix(prefix)
            .with_operation_timeout(Duration::from_secs(30))
            .with_max_blocking_connections(128)
            .connect(url)
            .await
            .expect("Redis answers (REDIS_URL)")
    }

    use tower_idempotency::store::redis;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_resumes_exactly() {
        let prefix = format!("idem-resume-{}:", uuid::Uuid::new_v4().simple());
        for shape in SHAPES {
            let stores = [store(url(), &prefix).await, store(url(), &prefix).await];
            resume::resume_exactly(stores, shape).await;
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use tower_idempotency::store::{
        PostgresStore,
        sqlx::{self, postgres::PgPoolOptions},
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_resumes_exactly() {
        let url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("idem_resume_{}", uuid::Uuid::new_v4().simple());
        let pool = || PgPoolOptions::new().max_connections(16).connect(&url);
        let admin = pool().await.expect("PostgreSQL answers (DATABASE_URL)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
        let replica = async || PostgresStore::builder().with_schema(&schema).build(pool().await.unwrap());
        let stores = [replica().await, replica().await];
        stores[0].migrate().await.unwrap();
        for shape in SHAPES {
            resume::resume_exactly(stores.clone(), shape).await;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
    }
}

/// A TCP proxy whose client-to-server direction can be held: what the client sends while
/// held reaches the server only once released. A store on it is a store whose writes (a
/// publish) arrive late.
struct HoldingProxy {
    addr: SocketAddr,
    held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl HoldingProxy {
    async fn new(upstream: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(tokio::sync::watch::channel(false).0);
        let holding = held.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let mut held = holding.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                        if held.wait_for(|held| !held).await.is_err()
                            || server_write.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        Self { addr, held }
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

/// Seen means resumable (Redis, two replicas): replica A's store reaches Redis through a
/// proxy the test holds, so the publish of event 9 is still on its way when A's client has
/// event 9 and reconnects to replica B with `Last-Event-ID: 9`. B's joiner waits for the event
/// (the layer's bounded wait), and resumes after it once the publish arrives. Held longer than
/// that bound, the id counts as unknown and the reconnect gets the whole stream.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_faster_than_the_publish_resumes_after_the_event_it_saw() {
    use std::net::ToSocketAddrs;
    let url = redis::url();
    let upstream = url.trim_start_matches("redis://").trim_end_matches('/').to_socket_addrs().unwrap().next().unwrap();
    for (held_for, resumed) in [(Duration::from_millis(300), true), (Duration::from_millis(1500), false)] {
        let proxy = HoldingProxy::new(upstream).await;
        let prefix = format!("idem-resume-{}:", uuid::Uuid::new_v4().simple());
        let a = redis::store(format!("redis://{}", proxy.addr), &prefix).await;
        let b = redis::store(url.clone(), &prefix).await;
        let shape = Shape { events: 20, newline: Newline::Lf, chunks: resume::Chunks::Events };
        let stream = Arc::new(Stream::new(shape));
        let gate = Gate::new();
        let handler: resume::Handler = Arc::new({
            let (stream, gate) = (stream.clone(), gate.clone());
            move || {
                let body = resume::body(stream.clone(), &gate);
                Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(body).unwrap()
            }
        });
        let replicas =
            [serve(resume::join_layer(a), handler.clone()).await, serve(resume::join_layer(b), handler).await];
        let key = format!("resume-{}", uuid::Uuid::new_v4());

        // Events 0..=8 produced, and in the shared log: a joiner on B got them.
        gate.release(9);
        let mut first = post(Proto::Http1, replicas[0], &key, None).await;
        let mut probe = post(Proto::Http2, replicas[1], &key, None).await;
        let mut probed = Vec::new();
        while probed.len() < stream.ends[8] {
            probed.extend_from_slice(
                &http_body_util::BodyExt::frame(&mut probe.body).await.unwrap().unwrap().into_data().unwrap(),
            );
        }
        // A's writes held: event 9 reaches A's client, its publish does not reach Redis.
        proxy.hold(true);
        gate.release(10);
        let mut seen = Vec::new();
        while seen.len() < stream.ends[9] {
            seen.extend_from_slice(
                &http_body_util::BodyExt::frame(&mut first.body).await.unwrap().unwrap().into_data().unwrap(),
            );
        }
        drop(first);
        let reconnect = post(Proto::Http1, replicas[1], &key, Some("9")).await;
        assert_eq!((reconnect.status, reconnect.replayed), (StatusCode::OK, true));
        let reconnect = tokio::spawn(reconnect.read());
        tokio::time::sleep(held_for).await;
        proxy.hold(false);
        gate.open();
        let got = reconnect.await.unwrap();
        let expected = if resumed { stream.after(9) } else { stream.body.clone() };
        assert!(got == expected, "held {held_for:?}: got {:?}", String::from_utf8_lossy(&got));
        drop(probe);
    }
}

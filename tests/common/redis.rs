//! The Redis the tests run against, and raw access to what the store wrote.
//!
//! Skip policy: with `REDIS_URL` unset, the tests use `redis://127.0.0.1:6379` when it
//! answers and otherwise say once that they are skipped and pass; with `REDIS_URL` set, a
//! Redis that does not answer fails the test.

use std::{io::Write, net::SocketAddr, sync::OnceLock, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use tower_idempotency::store::{
    RedisStore, StoreKey,
    redis::{self, AsyncCommands, IntoConnectionInfo, aio::MultiplexedConnection},
};

pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// The URL of the Redis to test against, or `None` when the tests are to be skipped.
pub async fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) => {
            if let Err(error) = ping(&url).await {
                panic!("REDIS_URL is set to {url} but Redis does not answer: {error}");
            }
            Some(url)
        }
        Err(_) => match ping(DEFAULT_URL).await {
            Ok(()) => Some(DEFAULT_URL.to_owned()),
            Err(error) => {
                static SAID: OnceLock<()> = OnceLock::new();
                SAID.get_or_init(|| {
                    // Straight to stderr: `eprintln!` would be captured and hidden by the harness.
                    let _ = writeln!(
                        std::io::stderr(),
                        "skipping Redis tests: no Redis at {DEFAULT_URL} ({error}); \
                         start redis-server or set REDIS_URL to run them"
                    );
                });
                None
            }
        },
    }
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut connection).await
    });
    match answer.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    }
}

/// The key prefix of this test run: parallel runs against one Redis never share a key.
pub fn run_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| format!("idem-test:{}:", uuid::Uuid::new_v4().simple()))
}

/// A store on its own connection, with this run's prefix.
pub async fn store(url: &str) -> RedisStore {
    RedisStore::builder().with_prefix(run_prefix()).connect(url).await.expect("connect to Redis")
}

/// A plain connection, to look at what the store wrote.
pub async fn raw(url: &str) -> MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// The Redis key of `key`, built from the documented layout `{prefix}{scope hex or -}:{key}`.
pub fn raw_key(key: &StoreKey) -> Vec<u8> {
    let scope = match key.scope() {
        Some(scope) => scope.as_bytes().iter().map(|b| format!("{b:02x}")).collect(),
        None => "-".to_owned(),
    };
    format!("{}{scope}:{}", run_prefix(), key.key().as_str()).into_bytes()
}

/// The value at `key`, if any.
pub async fn raw_get(connection: &mut MultiplexedConnection, key: &StoreKey) -> Option<Vec<u8>> {
    connection.get(raw_key(key)).await.unwrap()
}

/// The remaining time to live of `key` in ms (`-2`: no such key, `-1`: no expiry).
pub async fn pttl(connection: &mut MultiplexedConnection, key: &StoreKey) -> i64 {
    connection.pttl(raw_key(key)).await.unwrap()
}

/// Whether `key` exists, asked of Redis directly.
pub async fn exists(connection: &mut MultiplexedConnection, key: &StoreKey) -> bool {
    connection.exists(raw_key(key)).await.unwrap()
}

/// A port on 127.0.0.1 with nothing listening.
pub async fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// A TCP proxy in front of the real Redis that can be taken down (port closed, connections
/// cut) and brought back on the same port, or frozen (Redis runs the commands, its answers
/// are held back): Redis going away, coming back, or turning slow.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// A proxy for `upstream`, not yet listening.
    pub async fn down(upstream: SocketAddr) -> Self {
        Self { addr: closed_port().await, upstream, task: None, frozen: tokio::sync::watch::channel(false).0 }
    }

    /// Opens the port (again).
    pub async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let (upstream, frozen) = (self.upstream, self.frozen.clone());
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set, so aborting the task cuts them all.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(upstream).await.unwrap();
                let ((client_read, client_write), (server_read, server_write)) =
                    (client.into_split(), server.into_split());
                connections.spawn(pump(client_read, server_write, None));
                connections.spawn(pump(server_read, client_write, Some(frozen.subscribe())));
            }
        }));
    }

    /// The connection settings of `url`, pointed at this proxy.
    pub fn url(&self, url: &str) -> redis::ConnectionInfo {
        url.into_connection_info().unwrap().set_addr(redis::ConnectionAddr::Tcp("127.0.0.1".into(), self.addr.port()))
    }

    /// Holds Redis's answers back (`true`) or lets them through again.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Closes the port and cuts every connection.
    pub async fn take_down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Copies bytes from `from` to `to`, holding them back while `frozen`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: Option<tokio::sync::watch::Receiver<bool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(frozen) = &mut frozen {
            if frozen.wait_for(|frozen| !frozen).await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The address of the Redis at `url`.
pub fn tcp_addr(url: &str) -> SocketAddr {
    use std::net::ToSocketAddrs;
    match url.into_connection_info().unwrap().addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.as_str(), *port).to_socket_addrs().unwrap().next().unwrap(),
        other => panic!("this test needs a plain TCP REDIS_URL, not {other:?}"),
    }
}

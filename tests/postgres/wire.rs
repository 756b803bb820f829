//! A TCP proxy in front of PostgreSQL that counts what the client sends, message by message:
//! statements (a simple `Query`, or an `Execute` of the extended protocol) and round trips
//! (each `Sync` or simple `Query` waits for the server's `ReadyForQuery`). The server's side is
//! copied untouched. A connection that sent `LISTEN` is a listener's, counted apart.
//!
//! sqlx pings a connection (a bare `Sync`) each time it goes back to the pool, after the
//! caller has its answer: a prepared statement is one round trip on the caller's path, and
//! two on the wire.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower_idempotency::store::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower_idempotency::store::sqlx::{ConnectOptions, PgPool};

/// What one client connection sent.
#[derive(Debug, Default)]
struct Connection {
    statements: AtomicU64,
    round_trips: AtomicU64,
    listens: AtomicBool,
}

/// Counts of the connections through the proxy that are not listeners, or that are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub(crate) statements: u64,
    pub(crate) round_trips: u64,
}

impl std::ops::Sub for Counts {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self { statements: self.statements - earlier.statements, round_trips: self.round_trips - earlier.round_trips }
    }
}

pub(crate) struct Proxy {
    port: u16,
    connections: Arc<Mutex<Vec<Arc<Connection>>>>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to the database of `url`.
    pub(crate) async fn start(url: &str) -> Self {
        let options: PgConnectOptions = url.parse().unwrap();
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<Arc<Connection>>>> = Arc::default();
        let registry = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                // No delayed small frames: the proxy must not add latency of its own.
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let connection = Arc::new(Connection::default());
                registry.lock().unwrap().push(connection.clone());
                tokio::spawn(forward(client, server, connection));
            }
        });
        Self { port, connections }
    }

    /// A pool through the proxy to the database of `url` (its options, search path included).
    /// `test_before_acquire` is off, so that pings do not count as round trips: every round
    /// trip counted is a statement's.
    pub(crate) async fn pool(&self, url: &str, max_connections: u32) -> PgPool {
        let options: PgConnectOptions = url.parse().unwrap();
        let options = options.host("127.0.0.1").port(self.port).disable_statement_logging();
        PgPoolOptions::new()
            .max_connections(max_connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .unwrap()
    }

    fn sum(&self, listeners: bool) -> Counts {
        let connections = self.connections.lock().unwrap();
        let mut counts = Counts::default();
        for connection in connections.iter().filter(|c| c.listens.load(Ordering::SeqCst) == listeners) {
            counts.statements += connection.statements.load(Ordering::SeqCst);
            counts.round_trips += connection.round_trips.load(Ordering::SeqCst);
        }
        counts
    }

    /// What the pool's connections sent so far.
    pub(crate) fn pool_counts(&self) -> Counts {
        self.sum(false)
    }

    /// What listening connections sent so far.
    pub(crate) fn listener_counts(&self) -> Counts {
        self.sum(true)
    }
}

/// Copies both ways; parses the client's side to count it.
async fn forward(client: TcpStream, server: TcpStream, connection: Arc<Connection>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let up = async move {
        // Untyped messages first: SSL / GSS requests, then the startup message.
        loop {
            let len = client_read.read_u32().await? as usize;
            let mut body = vec![0; len - 4];
            client_read.read_exact(&mut body).await?;
            let mut message = (len as u32).to_be_bytes().to_vec();
            message.extend_from_slice(&body);
            server_write.write_all(&message).await?;
            let code = body.get(..4).map(|c| u32::from_be_bytes(c.try_into().unwrap()));
            if !matches!(code, Some(80_877_103 | 80_877_104)) {
                break;
            }
        }
        loop {
            let kind = client_read.read_u8().await?;
            let len = client_read.read_u32().await? as usize;
            let mut body = vec![0; len - 4];
            client_read.read_exact(&mut body).await?;
            match kind {
                b'Q' => {
                    connection.statements.fetch_add(1, Ordering::SeqCst);
                    connection.round_trips.fetch_add(1, Ordering::SeqCst);
                }
                b'E' => {
                    connection.statements.fetch_add(1, Ordering::SeqCst);
                }
                b'S' => {
                    connection.round_trips.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
            if matches!(kind, b'Q' | b'P') && body.windows(6).any(|w| w == b"LISTEN") {
                connection.listens.store(true, Ordering::SeqCst);
            }
            let mut message = Vec::with_capacity(1 + len);
            message.push(kind);
            message.extend_from_slice(&(len as u32).to_be_bytes());
            message.extend_from_slice(&body);
            server_write.write_all(&message).await?;
        }
        #[allow(unreachable_code)]
        Ok::<_, std::io::Error>(())
    };
    let _ = up.await;
    down.abort();
}

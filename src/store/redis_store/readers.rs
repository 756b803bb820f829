//! The dedicated connections of blocking reads: a follower waiting for a live log blocks in
//! `XREAD BLOCK` on a connection of its own, never on the shared multiplexed one (which every
//! other operation of the store needs meanwhile).
//!
//! At most `max` exist at once; a follower takes an idle one or opens one, and one that finds
//! `max` in use waits for one to be given back. A connection is given back only after its read
//! came back: one dropped while a read is under way (a follower cancelled) is closed, which
//! also ends the read in Redis.

use std::{fmt, sync::Mutex, time::Duration};

use ::redis::{AsyncConnectionConfig, Client, Cmd, RedisError, RedisResult, Value, aio::MultiplexedConnection};
#[cfg(feature = "redis-cluster")]
use ::redis::{
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};
use tokio::{
    sync::{Semaphore, SemaphorePermit},
    time::Instant,
};

/// What the dedicated connections are opened from.
#[derive(Clone)]
pub(super) enum Source {
    Single(Client),
    #[cfg(feature = "redis-cluster")]
    Cluster(ClusterClient),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(client) => f.debug_tuple("Single").field(client.get_connection_info()).finish(),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

enum Reader {
    Single(MultiplexedConnection),
    #[cfg(feature = "redis-cluster")]
    Cluster(ClusterConnection),
}

pub(super) struct Readers {
    source: Source,
    idle: Mutex<Vec<Reader>>,
    permits: Semaphore,
    max: usize,
    connect_timeout: Duration,
}

impl Readers {
    pub(super) fn new(source: Source, max: usize, connect_timeout: Duration) -> Self {
        Self { source, idle: Mutex::new(Vec::new()), permits: Semaphore::new(max), max, connect_timeout }
    }

    /// The bound on dedicated connections.
    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// A connection's turn, if one is free now.
    pub(super) fn try_take(&self) -> Option<Held<'_>> {
        self.permits.try_acquire().ok().map(|permit| self.held(permit))
    }

    /// A connection's turn, waiting for one to be given back until `until`.
    pub(super) async fn take_until(&self, until: Instant) -> Option<Held<'_>> {
        match tokio::time::timeout_at(until, self.permits.acquire()).await {
            Ok(Ok(permit)) => Some(self.held(permit)),
            // Never closed; timed out.
            _ => None,
        }
    }

    fn held<'a>(&'a self, permit: SemaphorePermit<'a>) -> Held<'a> {
        let reader = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Held { readers: self, reader, busy: false, _permit: permit }
    }

    async fn open(&self) -> RedisResult<Reader> {
        let connecting = async {
            match &self.source {
                Source::Single(client) => {
                    // No response timeout: a blocking read answers when it ends; the caller
                    // bounds it.
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.connect_timeout))
                        .set_response_timeout(None);
                    client.get_multiplexed_async_connection_with_config(&config).await.map(Reader::Single)
                }
                #[cfg(feature = "redis-cluster")]
                Source::Cluster(client) => {
                    let config = ClusterConfig::new().set_connection_timeout(self.connect_timeout);
                    client.get_async_connection_with_config(config).await.map(Reader::Cluster)
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(reader) => reader,
            Err(_) => Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        }
    }
}

/// One follower's turn on a dedicated connection (opened at its first read, if no idle one was
/// there), given back when dropped.
pub(super) struct Held<'a> {
    readers: &'a Readers,
    reader: Option<Reader>,
    /// A read was sent and its answer has not come back.
    busy: bool,
    _permit: SemaphorePermit<'a>,
}

impl Held<'_> {
    /// Sends one blocking read and waits for its answer. A connection that fails is closed; an
    /// idle one found broken (Redis restarted, the connection killed) is replaced once.
    pub(super) async fn read(&mut self, command: &Cmd) -> RedisResult<Value> {
        let fresh = self.reader.is_none();
        match self.send(command).await {
            Err(error) if !fresh && is_broken(&error) => self.send(command).await,
            reply => reply,
        }
    }

    async fn send(&mut self, command: &Cmd) -> RedisResult<Value> {
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => self.reader.insert(self.readers.open().await?),
        };
        self.busy = true;
        let reply = match reader {
            Reader::Single(connection) => command.query_async(connection).await,
            #[cfg(feature = "redis-cluster")]
            Reader::Cluster(connection) => command.query_async(connection).await,
        };
        self.busy = false;
        if reply.is_err() {
            self.reader = None;
        }
        reply
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take().filter(|_| !self.busy) {
            self.readers.idle.lock().unwrap_or_else(|e| e.into_inner()).push(reader);
        }
    }
}

fn is_broken(error: &RedisError) -> bool {
    error.is_io_error() || error.is_connection_dropped() || error.is_connection_refusal()
}

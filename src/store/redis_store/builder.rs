//! [`RedisStoreBuilder`]: the prefix, the command timeout, the dedicated connections of
//! blocking reads, and the connection to build on.

use std::{sync::Arc, sync::OnceLock, time::Duration};

use ::redis::{
    Client, IntoConnectionInfo, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
#[cfg(feature = "redis-cluster")]
use ::redis::{cluster::ClusterClient, cluster_async::ClusterConnection};

#[cfg(feature = "redis-cluster")]
use super::connection::DeferredCluster;
use super::{
    Inner, RedisStore,
    connection::{Connection, Deferred},
    live::Live,
    readers::{Readers, Source},
    slot,
};

/// Default prefix of every Redis key the store writes.
const DEFAULT_PREFIX: &str = "idem:";
/// Default bound on one store operation, connecting included.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Default bound on the dedicated connections of blocking reads.
const DEFAULT_MAX_BLOCKING_CONNECTIONS: usize = 32;
/// Default longest single blocking read.
const DEFAULT_MAX_BLOCK: Duration = Duration::from_secs(10);

/// Builds a [`RedisStore`] with a non-default key prefix, command timeout or blocking reads.
///
/// Finish with [`build`](Self::build), as every store builder does (on a client: connects on
/// first use; or on a connection of your own), or with [`connect`](Self::connect) (connects
/// now, and fails if Redis does not answer).
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    operation_timeout: Duration,
    max_blocking_connections: usize,
    max_block: Duration,
    /// Given with `with_blocking_client`: where the dedicated connections come from when the
    /// store is built on a connection of the caller's.
    blocking: Option<Source>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            operation_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_blocking_connections: DEFAULT_MAX_BLOCKING_CONNECTIONS,
            max_block: DEFAULT_MAX_BLOCK,
            blocking: None,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every Redis key the store writes. Default: `idem:`.
    ///
    /// Give each service (or environment) sharing one Redis its own prefix. Avoid `{` and `}`
    /// in it: on Redis Cluster they would make it a hash tag and put every key in one slot.
    ///
    /// ```
    /// use tower_idempotency::store::RedisStore;
    ///
    /// let builder = RedisStore::builder().with_prefix("orders-api:idem:");
    /// # let _ = builder;
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, waiting for a connection included; past it
    /// the operation fails with [`StoreError::is_timeout`](crate::store::StoreError::is_timeout). Default: 1 s. It also bounds each
    /// connection attempt of the managers this builder makes.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::RedisStore;
    ///
    /// let builder = RedisStore::builder().with_operation_timeout(Duration::from_millis(250));
    /// # let _ = builder;
    /// ```
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The most dedicated connections the store opens for blocking reads: how many live logs
    /// of in-flight requests (join and wait mode) its followers wait on at once. Default: 32.
    /// At least 1.
    ///
    /// Followers wait for a new event on a connection of their own (`XREAD BLOCK`), so that
    /// the shared connection is never blocked; the followers of one log at one place (a
    /// request's duplicates waiting for its head, its joiners at the end of what it produced)
    /// share one read, however many they are, so one key's duplicates cannot take the
    /// connections other keys' followers need. Past the bound, a follower waits for one of
    /// them to be free (reading what it missed once it has one); connections are kept open,
    /// idle, for the next follower.
    ///
    /// ```
    /// use tower_idempotency::store::RedisStore;
    ///
    /// let builder = RedisStore::builder().with_max_blocking_connections(8);
    /// # let _ = builder;
    /// ```
    pub fn with_max_blocking_connections(mut self, max: usize) -> Self {
        self.max_blocking_connections = max.max(1);
        self
    }

    /// The longest one blocking read waits before the follower checks its lock again.
    /// Default: 10 s. At least 1 ms.
    ///
    /// A follower's read also ends when the lock's lease (as last checked) runs out, so a
    /// crashed owner is noticed as its lease expires whatever this is; this bounds the rest
    /// (a live log lost to eviction or a failover), and keeps a blocked connection from
    /// looking idle for longer to a proxy or load balancer that cuts idle connections.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::RedisStore;
    ///
    /// // Behind a proxy that cuts connections idle for 5 s.
    /// let builder = RedisStore::builder().with_max_block(Duration::from_secs(4));
    /// # let _ = builder;
    /// ```
    pub fn with_max_block(mut self, max: Duration) -> Self {
        self.max_block = max.max(Duration::from_millis(1));
        self
    }

    /// The client the store opens its dedicated connections for blocking reads with, when it
    /// is built on a connection of yours ([`build`](Self::build) on a `ConnectionManager`),
    /// whose client the store cannot know.
    ///
    /// Without it such a store has no dedicated connections, and its followers check their
    /// lock every 100 ms instead of being woken. The other ways to build a store have a client
    /// (the URL's, or the one given) and use it; this one overrides it.
    ///
    /// ```
    /// use tower_idempotency::store::{RedisStore, redis};
    ///
    /// # async fn run() -> Result<(), redis::RedisError> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let manager = redis::aio::ConnectionManager::new(client.clone()).await?; // the application's
    /// let store = RedisStore::builder().with_blocking_client(client).build(manager);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_blocking_client(mut self, client: Client) -> Self {
        self.blocking = Some(Source::Single(client));
        self
    }

    /// The cluster client the store opens its dedicated connections for blocking reads with,
    /// when it is built on a cluster connection of yours
    /// ([`build`](Self::build) on a `ClusterConnection`); see
    /// [`with_blocking_client`](Self::with_blocking_client). Give it no response timeout
    /// shorter than the [block limit](Self::with_max_block).
    ///
    /// ```
    /// use tower_idempotency::store::{RedisStore, redis};
    ///
    /// # async fn run() -> Result<(), redis::RedisError> {
    /// let nodes = ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"];
    /// let client = redis::cluster::ClusterClient::new(nodes.to_vec())?;
    /// let connection = client.get_async_connection().await?; // the application's
    /// let store = RedisStore::builder().with_blocking_cluster_client(client).build(connection);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn with_blocking_cluster_client(mut self, client: ClusterClient) -> Self {
        self.blocking = Some(Source::Cluster(client));
        self
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, `rediss://`
    /// needs a TLS feature of the `redis` crate) and builds the store.
    ///
    /// Fails when the URL is invalid or Redis does not answer within nine tenths of the
    /// command timeout (the connection attempts of the manager it makes end then).
    ///
    /// ```
    /// use tower_idempotency::store::{RedisStore, redis::RedisError};
    ///
    /// # async fn run() -> Result<(), RedisError> {
    /// // Fails at once if Redis does not answer (`build` would start anyway).
    /// let store = RedisStore::builder().connect("redis://127.0.0.1:6379").await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(self, url: impl IntoConnectionInfo) -> Result<RedisStore, RedisError> {
        let client = Client::open(url)?;
        let config = self.manager_config();
        let manager = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
        let made = Deferred { client: client.clone(), config, manager: OnceLock::from(manager) };
        Ok(self.finish(Connection::Deferred(Box::new(made)), Some(Source::Single(client))))
    }

    /// Builds the store on `connection` without waiting for Redis: a [`Client`](https://docs.rs/redis/1/redis/struct.Client.html) or a Redis
    /// Cluster `ClusterClient` (the store connects on first use), or a connection of your own (a
    /// [`ConnectionManager`](https://docs.rs/redis/1/redis/aio/struct.ConnectionManager.html), whose reconnection settings apply, or a `ClusterConnection`).
    /// Needs no tokio runtime.
    ///
    /// A service built on a client starts while Redis is down; its requests then fail as
    /// [`StoreError::is_unavailable`](crate::store::StoreError::is_unavailable) (the layer's
    /// `503`) until Redis answers. On a connection of your own, give the store its client
    /// with [`with_blocking_client`](Self::with_blocking_client) (or
    /// `with_blocking_cluster_client`) too, so that followers of in-flight requests are woken
    /// by Redis instead of checking every 100 ms.
    ///
    /// ```
    /// use tower_idempotency::store::{RedisStore, redis::Client};
    ///
    /// let client = Client::open("redis://127.0.0.1:6379").expect("a valid Redis URL");
    /// let store = RedisStore::builder().with_prefix("orders:").build(client);
    /// # let _ = store;
    /// ```
    ///
    /// With Redis Cluster (feature `redis-cluster`), a `ClusterClient` has no response
    /// timeout by default; give the one you build the store on none shorter than the
    /// [block limit](Self::with_max_block), since the dedicated connections of blocking reads
    /// come from it too.
    pub fn build(self, connection: impl Into<RedisConnection>) -> RedisStore {
        match connection.into().0 {
            Given::Client(client) => {
                let config = self.manager_config();
                let blocking = Source::Single(client.clone());
                self.finish(
                    Connection::Deferred(Box::new(Deferred { client, config, manager: OnceLock::new() })),
                    Some(blocking),
                )
            }
            Given::Manager(manager) => self.finish(Connection::Given(manager), None),
            #[cfg(feature = "redis-cluster")]
            Given::ClusterClient(client) => {
                let blocking = Source::Cluster(client.clone());
                let cluster = DeferredCluster { client, connection: tokio::sync::OnceCell::new() };
                self.finish(Connection::DeferredCluster(Box::new(cluster)), Some(blocking))
            }
            #[cfg(feature = "redis-cluster")]
            Given::ClusterConnection(connection) => self.finish(Connection::GivenCluster(connection), None),
        }
    }

    /// Connects to the Redis Cluster that `nodes` belong to (one or more of its nodes'
    /// URLs) and builds the store. Each connection attempt and each answer is bounded by the
    /// command timeout. Fails when no node answers.
    ///
    /// ```
    /// use tower_idempotency::store::{RedisStore, redis::RedisError};
    ///
    /// # async fn run() -> Result<(), RedisError> {
    /// let store = RedisStore::builder().connect_cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]).await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisStore, RedisError> {
        let nodes = nodes.into_iter().map(IntoConnectionInfo::into_connection_info).collect::<Result<Vec<_>, _>>()?;
        let client = ClusterClient::builder(nodes.clone())
            .connection_timeout(self.operation_timeout)
            .response_timeout(self.operation_timeout)
            .build()?;
        // Blocking reads answer when they end: no response timeout (the store bounds them).
        let blocking = ClusterClient::builder(nodes)
            .connection_timeout(self.operation_timeout)
            .overall_response_timeout(None)
            .build()?;
        let connection = client.get_async_connection().await?;
        Ok(self.finish(Connection::GivenCluster(connection), Some(Source::Cluster(blocking))))
    }

    /// The settings of the managers this builder makes: one attempt per connection (the
    /// store makes a fresh one per operation while Redis is down, so a request fails fast
    /// instead of waiting out a backoff), ending a tenth before the command timeout: the
    /// operation that starts an attempt sees it end, and the manager begins the next at once.
    /// (An attempt the manager began with no operation waiting can still end unobserved; the
    /// next operation, handed its failure, tries again (`Inner::unsent`).)
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.operation_timeout - self.operation_timeout / 10))
            .set_response_timeout(Some(self.operation_timeout))
    }

    /// The store on `connection`, with dedicated connections from `blocking` unless
    /// [`with_blocking_client`](Self::with_blocking_client) named another source.
    fn finish(self, connection: Connection, blocking: Option<Source>) -> RedisStore {
        // The stream-key tags of every Cluster slot, found now so that no request pays for it.
        slot::prepare();
        let readers = self
            .blocking
            .or(blocking)
            .map(|source| Readers::new(source, self.max_blocking_connections, self.operation_timeout));
        RedisStore {
            inner: Arc::new(Inner {
                connection,
                prefix: self.prefix.into_bytes().into_boxed_slice(),
                operation_timeout: self.operation_timeout,
                live: Live::new(readers, self.max_block),
            }),
        }
    }
}

impl RedisStore {
    /// A builder for the key prefix, the command timeout and the connection.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }
}

/// What [`RedisStoreBuilder::build`] builds a store on: a [`Client`](https://docs.rs/redis/1/redis/struct.Client.html), a [`ConnectionManager`](https://docs.rs/redis/1/redis/aio/struct.ConnectionManager.html)
/// and, with the `redis-cluster` feature, a `ClusterClient` or a `ClusterConnection` (each
/// converts into it).
pub struct RedisConnection(Given);

enum Given {
    Client(Client),
    Manager(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    ClusterClient(ClusterClient),
    #[cfg(feature = "redis-cluster")]
    ClusterConnection(ClusterConnection),
}

impl From<Client> for RedisConnection {
    fn from(client: Client) -> Self {
        Self(Given::Client(client))
    }
}

impl From<ConnectionManager> for RedisConnection {
    fn from(manager: ConnectionManager) -> Self {
        Self(Given::Manager(manager))
    }
}

#[cfg(feature = "redis-cluster")]
impl From<ClusterClient> for RedisConnection {
    fn from(client: ClusterClient) -> Self {
        Self(Given::ClusterClient(client))
    }
}

#[cfg(feature = "redis-cluster")]
impl From<ClusterConnection> for RedisConnection {
    fn from(connection: ClusterConnection) -> Self {
        Self(Given::ClusterConnection(connection))
    }
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Given::Client(_) => "Client",
            Given::Manager(_) => "ConnectionManager",
            #[cfg(feature = "redis-cluster")]
            Given::ClusterClient(_) => "ClusterClient",
            #[cfg(feature = "redis-cluster")]
            Given::ClusterConnection(_) => "ClusterConnection",
        };
        f.debug_tuple("RedisConnection").field(&kind).finish()
    }
}

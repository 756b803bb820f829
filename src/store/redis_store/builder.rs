//! [`RedisStoreBuilder`]: the prefix, the command timeout, and the connection to build on.

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
};

/// Default prefix of every Redis key the store writes.
const DEFAULT_PREFIX: &str = "idem:";
/// Default bound on one store operation, connecting included.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds a [`RedisStore`] with a non-default key prefix or command timeout.
///
/// Finish with [`connect`](Self::connect) (connects now), [`connect_lazy`](Self::connect_lazy)
/// or [`build`](Self::build) (connect on first use), or
/// [`build_with_manager`](Self::build_with_manager) (your own connection).
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    prefix: String,
    command_timeout: Duration,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_owned(), command_timeout: DEFAULT_COMMAND_TIMEOUT }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every Redis key the store writes. Default: `idem:`.
    ///
    /// Give each service (or environment) sharing one Redis its own prefix. Avoid `{` and `}`
    /// in it: on Redis Cluster they would make it a hash tag and put every key in one slot.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, waiting for a connection included; past it
    /// the operation fails with [`StoreError::is_timeout`](crate::store::StoreError::is_timeout). Default: 1 s. It also bounds each
    /// connection attempt of the managers this builder makes.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, `rediss://`
    /// needs a TLS feature of the `redis` crate) and builds the store.
    ///
    /// Fails when the URL is invalid or Redis does not answer within the command timeout.
    pub async fn connect(self, url: impl IntoConnectionInfo) -> Result<RedisStore, RedisError> {
        let client = Client::open(url)?;
        let manager = ConnectionManager::new_with_config(client, self.manager_config()).await?;
        Ok(self.build_with_manager(manager))
    }

    /// Builds the store for the Redis at `url` without connecting: the first operation
    /// connects. Fails only when the URL is invalid.
    ///
    /// A service built this way starts while Redis is down; its requests then fail as
    /// [`StoreError::is_unavailable`](crate::store::StoreError::is_unavailable) (the layer's `503`) until Redis answers.
    pub fn connect_lazy(self, url: impl IntoConnectionInfo) -> Result<RedisStore, RedisError> {
        Ok(self.build(Client::open(url)?))
    }

    /// Builds the store on `client` without connecting: the first operation connects (see
    /// [`connect_lazy`](Self::connect_lazy)). Needs no tokio runtime.
    pub fn build(self, client: Client) -> RedisStore {
        let config = self.manager_config();
        self.finish(Connection::Deferred(Box::new(Deferred { client, config, manager: OnceLock::new() })))
    }

    /// Builds the store on a connection manager of your own (its reconnection settings
    /// apply; the command timeout still bounds every operation).
    pub fn build_with_manager(self, manager: ConnectionManager) -> RedisStore {
        self.finish(Connection::Given(manager))
    }

    /// Connects to the Redis Cluster that `nodes` belong to (one or more of its nodes'
    /// URLs) and builds the store. Each connection attempt and each answer is bounded by the
    /// command timeout. Fails when no node answers.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisStore, RedisError> {
        let client = ClusterClient::builder(nodes)
            .connection_timeout(self.command_timeout)
            .response_timeout(self.command_timeout)
            .build()?;
        let connection = client.get_async_connection().await?;
        Ok(self.build_with_cluster_connection(connection))
    }

    /// Builds the store on a Redis Cluster client without connecting: the first operation
    /// connects, and while that fails each operation tries again (failing as
    /// [`StoreError::is_unavailable`](crate::store::StoreError::is_unavailable) or [`StoreError::is_timeout`](crate::store::StoreError::is_timeout) meanwhile).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn build_cluster(self, client: ClusterClient) -> RedisStore {
        let cluster = DeferredCluster { client, connection: tokio::sync::OnceCell::new() };
        self.finish(Connection::DeferredCluster(Box::new(cluster)))
    }

    /// Builds the store on a Redis Cluster connection of your own.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn build_with_cluster_connection(self, connection: ClusterConnection) -> RedisStore {
        self.finish(Connection::GivenCluster(connection))
    }

    /// The settings of the managers this builder makes: one attempt per connection (the
    /// store makes a fresh one per operation while Redis is down, so a request fails fast
    /// instead of waiting out a backoff) bounded by the command timeout.
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(Some(self.command_timeout))
    }

    fn finish(self, connection: Connection) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                connection,
                prefix: self.prefix.into_bytes().into_boxed_slice(),
                command_timeout: self.command_timeout,
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

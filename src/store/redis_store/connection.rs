//! The connection one operation goes out on, and how a command is sent on it: one round trip,
//! once more after a refused connection, and with the script loaded when Redis lacks it.

use std::{sync::OnceLock, time::Duration};

use ::redis::{
    Client, Pipeline, RedisError, RedisResult, ScriptInvocation, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};
#[cfg(feature = "redis-cluster")]
use ::redis::{cluster::ClusterClient, cluster_async::ClusterConnection};

use super::{Inner, scripts::BEGIN};
use crate::store::StoreError;

pub(super) enum Connection {
    /// A manager given by the caller or made by [`RedisStoreBuilder::connect`].
    Given(ConnectionManager),
    /// A manager made on first use, so that building the store needs neither Redis nor a
    /// tokio runtime.
    Deferred(Box<Deferred>),
    /// A Redis Cluster connection given by the caller or made by
    /// [`RedisStoreBuilder::connect_cluster`].
    #[cfg(feature = "redis-cluster")]
    GivenCluster(ClusterConnection),
    /// A Redis Cluster connection made on first use.
    #[cfg(feature = "redis-cluster")]
    DeferredCluster(Box<DeferredCluster>),
}

/// A `ConnectionManager` this store made, with its settings: on first use (itself connecting
/// lazily), or by [`RedisStoreBuilder::connect`](super::RedisStoreBuilder::connect).
pub(super) struct Deferred {
    pub(super) client: Client,
    pub(super) config: ConnectionManagerConfig,
    pub(super) manager: OnceLock<ConnectionManager>,
}

/// Connects on first use; a failed attempt leaves the cell empty, so the next operation
/// tries again.
#[cfg(feature = "redis-cluster")]
pub(super) struct DeferredCluster {
    pub(super) client: ClusterClient,
    pub(super) connection: tokio::sync::OnceCell<ClusterConnection>,
}

/// The connection one operation goes out on.
pub(super) enum Handle {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(ClusterConnection),
}

/// What one store operation sends: one round trip.
#[derive(Clone, Copy)]
pub(super) enum Command<'a> {
    /// One script: `complete`, `renew`, `release`.
    Script(&'a ScriptInvocation<'a>),
    /// `begin`: `MULTI`, the begin script, `GET`, `EXEC`.
    Begin(&'a Pipeline),
}

impl Command<'_> {
    /// Sends the command, and once more after an error that shows it was not sent (`unsent`,
    /// `Inner::unsent`): a `ConnectionManager` hands the failure of its last connection
    /// attempt to the next command, however old, and starts a fresh attempt meanwhile, so the
    /// first request after Redis is back works.
    pub(super) async fn send_retrying<C: ConnectionLike + Send>(
        self,
        connection: &mut C,
        unsent: impl Fn(&RedisError) -> bool,
    ) -> RedisResult<Value> {
        match self.send(connection).await {
            Err(error) if unsent(&error) => self.send(connection).await,
            reply => reply,
        }
    }

    /// Sends the command; when Redis lacks the script (first use, restart, `SCRIPT FLUSH`),
    /// loads it and sends the command again.
    async fn send<C: ConnectionLike + Send>(self, connection: &mut C) -> RedisResult<Value> {
        match self {
            // `invoke_async` sends `EVALSHA`, and on `NOSCRIPT` loads the script and retries.
            Self::Script(invocation) => invocation.invoke_async(connection).await,
            Self::Begin(transaction) => {
                let replies: Value = transaction.query_async(connection).await?;
                if !lacks_script(&replies) {
                    return Ok(replies);
                }
                BEGIN.load_async(connection).await?;
                transaction.query_async(connection).await
            }
        }
    }
}

impl Inner {
    /// Whether `error`, `elapsed` into an operation, shows that its command was not sent: a
    /// refused connection; or, on a manager this store made, a timeout within half the command
    /// timeout. Such a manager's response timeout is the whole command timeout, so an earlier
    /// timeout is a connection attempt's: one under way that failed, or one that ended while
    /// no operation waited and was handed over at once.
    pub(super) fn unsent(&self, error: &RedisError, elapsed: Duration) -> bool {
        error.is_connection_refusal()
            || (matches!(self.connection, Connection::Deferred(_))
                && error.is_timeout()
                && elapsed < self.operation_timeout / 2)
    }

    pub(super) async fn handle(&self) -> Result<Handle, StoreError> {
        let deferred = match &self.connection {
            Connection::Given(manager) => return Ok(Handle::Single(manager.clone())),
            Connection::Deferred(deferred) => deferred,
            #[cfg(feature = "redis-cluster")]
            Connection::GivenCluster(connection) => return Ok(Handle::Cluster(connection.clone())),
            #[cfg(feature = "redis-cluster")]
            Connection::DeferredCluster(cluster) => {
                let connecting = cluster.connection.get_or_try_init(|| cluster.client.get_async_connection());
                return Ok(Handle::Cluster(connecting.await.map_err(store_error)?.clone()));
            }
        };
        if let Some(manager) = deferred.manager.get() {
            return Ok(Handle::Single(manager.clone()));
        }
        let made = ConnectionManager::new_lazy_with_config(deferred.client.clone(), deferred.config.clone())
            .map_err(StoreError::unavailable)?;
        // Two first calls may race: both make a manager (lazy: not yet connected) and the
        // first one stored wins.
        Ok(Handle::Single(deferred.manager.get_or_init(|| made).clone()))
    }
}

pub(super) fn store_error(error: RedisError) -> StoreError {
    if error.is_timeout() { StoreError::timeout() } else { StoreError::unavailable(error) }
}

/// Whether the begin transaction's script failed with `NOSCRIPT`.
fn lacks_script(replies: &Value) -> bool {
    let Value::Array(replies) = replies else { return false };
    matches!(replies.first(), Some(Value::ServerError(error)) if error.kind() == Some(ServerErrorKind::NoScript))
}

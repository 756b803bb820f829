//! [`DynamoDbStoreBuilder`]: the table, the key prefix, the operation timeout and the pace of
//! waiting duplicates.

use std::{sync::Arc, time::Duration};

use aws_sdk_dynamodb::Client;

use super::{DynamoDbStore, Inner, item::ITEM_LIMIT};

/// Default table name.
const DEFAULT_TABLE: &str = "idempotency";
/// Default bound on one store operation, the SDK's retries included.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Default pause between two reads of a waiting or joining duplicate.
const DEFAULT_FOLLOW_INTERVAL: Duration = Duration::from_millis(250);
/// Bounds of the polling interval.
const MIN_FOLLOW_INTERVAL: Duration = Duration::from_millis(10);
const MAX_FOLLOW_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound on the bytes of one lock's live log.
const DEFAULT_LIVE_LOG_LIMIT: usize = 64 * 1024;
/// What a lock's item holds beside its log, at most (as for a record).
const LOCK_OVERHEAD: usize = 1024;

/// Builds a [`DynamoDbStore`] with a non-default table, key prefix, operation timeout or
/// polling interval.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{DynamoDbStore, aws_sdk_dynamodb};
///
/// // A client configured by the application (here by hand, for a local endpoint).
/// let config = aws_sdk_dynamodb::Config::builder()
///     .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
///     .region(aws_sdk_dynamodb::config::Region::new("eu-west-1"))
///     .endpoint_url("http://127.0.0.1:8000")
///     .build();
/// let store = DynamoDbStore::builder()
///     .with_table("orders-idempotency")
///     .with_key_prefix("orders/")
///     .with_operation_timeout(Duration::from_secs(2))
///     .build(aws_sdk_dynamodb::Client::from_conf(config));
/// assert_eq!(store.table(), "orders-idempotency");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct DynamoDbStoreBuilder {
    table: String,
    key_prefix: String,
    operation_timeout: Duration,
    follow_interval: Duration,
    live_log_limit: usize,
}

impl Default for DynamoDbStoreBuilder {
    fn default() -> Self {
        Self {
            table: DEFAULT_TABLE.to_owned(),
            key_prefix: String::new(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            follow_interval: DEFAULT_FOLLOW_INTERVAL,
            live_log_limit: DEFAULT_LIVE_LOG_LIMIT,
        }
    }
}

impl DynamoDbStoreBuilder {
    /// The table's name (or ARN). Default: `idempotency`.
    ///
    /// ```
    /// use tower_idempotency::store::DynamoDbStore;
    ///
    /// let builder = DynamoDbStore::builder().with_table("orders-idempotency");
    /// # let _ = builder;
    /// ```
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// A prefix of every partition key, so that several applications (or test runs) share one
    /// table without sharing keys. Default: none. Keep it short: DynamoDB refuses a partition
    /// key over 2 KB (a store key takes up to 320 bytes of it; every request would then fail),
    /// and the prefix counts against the item limit.
    ///
    /// ```
    /// use tower_idempotency::store::DynamoDbStore;
    ///
    /// // Two services sharing one table keep their keys apart.
    /// let builder = DynamoDbStore::builder().with_key_prefix("orders/");
    /// # let _ = builder;
    /// ```
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The longest one store operation may take, the SDK's own retries included; past it the
    /// operation fails with [`StoreError::is_timeout`](crate::store::StoreError::is_timeout).
    /// Default: 5 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::DynamoDbStore;
    ///
    /// // Within a Lambda function's timeout, with room for the handler.
    /// let builder = DynamoDbStore::builder().with_operation_timeout(Duration::from_secs(2));
    /// # let _ = builder;
    /// ```
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The pause between two reads of a duplicate waiting for, or joining, a response in
    /// flight: each read costs ⌈item / 4 KB⌉ read units, so 4 read units per waiting second at
    /// the default, 250 ms. Clamped to 10 ms ..= 10 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::store::DynamoDbStore;
    ///
    /// // Fewer read units per waiting duplicate, later wake-ups.
    /// let builder = DynamoDbStore::builder().with_follow_interval(Duration::from_secs(1));
    /// # let _ = builder;
    /// ```
    pub fn with_follow_interval(mut self, every: Duration) -> Self {
        self.follow_interval = every.clamp(MIN_FOLLOW_INTERVAL, MAX_FOLLOW_INTERVAL);
        self
    }

    /// The most bytes of events one lock's live log holds (join mode; an event costs its bytes
    /// and 2 more). Default: 64 KB; at most what the 400 KB item leaves.
    ///
    /// Past it the store refuses the response's next publish
    /// ([`StoreError::is_capacity`](crate::store::StoreError::is_capacity)) and appends nothing
    /// of it; the layer then keeps the response as not retained, as past its record limit: its
    /// joined bodies end with an error and later duplicates get `409` `response-not-retained`,
    /// while the response itself goes on to its client. Raise it for the longest stream that
    /// must be joinable (each publish rewrites the item, so the log's size is paid in write
    /// units per publish).
    ///
    /// ```
    /// use tower_idempotency::store::DynamoDbStore;
    ///
    /// let builder = DynamoDbStore::builder().with_live_log_limit(128 * 1024);
    /// # let _ = builder;
    /// ```
    pub fn with_live_log_limit(mut self, bytes: usize) -> Self {
        self.live_log_limit = bytes;
        self
    }

    /// Builds the store on the application's client. Sends nothing and needs no runtime: the
    /// table must exist by the first operation (see [`DynamoDbStore::create_table`]).
    ///
    /// ```
    /// use tower_idempotency::store::{DynamoDbStore, aws_sdk_dynamodb};
    ///
    /// // `config`: the application's, e.g. `aws_config::load_from_env().await`.
    /// fn store(config: &aws_sdk_dynamodb::Config) -> DynamoDbStore {
    ///     DynamoDbStore::builder().build(aws_sdk_dynamodb::Client::from_conf(config.clone()))
    /// }
    /// ```
    pub fn build(self, client: Client) -> DynamoDbStore {
        let room = ITEM_LIMIT.saturating_sub(LOCK_OVERHEAD + self.key_prefix.len());
        DynamoDbStore {
            inner: Arc::new(Inner {
                client,
                table: self.table,
                key_prefix: self.key_prefix,
                operation_timeout: self.operation_timeout,
                follow_interval: self.follow_interval,
                live_log_limit: self.live_log_limit.min(room) as u64,
            }),
        }
    }
}

impl DynamoDbStore {
    /// A builder for the table, the key prefix, the operation timeout and the polling interval.
    pub fn builder() -> DynamoDbStoreBuilder {
        DynamoDbStoreBuilder::default()
    }
}

//! The DynamoDB store: one table, for replicas and AWS Lambda functions sharing keys.
//!
//! - `mod.rs`: [`DynamoDbStore`], its contract (table, round trips, units, expiry, limits,
//!   failure) and the core trait;
//! - `builder.rs`: [`DynamoDbStoreBuilder`];
//! - `item.rs`: the item's attributes, the partition key, the clock;
//! - `table.rs`: [`DynamoDbStore::create_table`];
//! - `live.rs`: the live log (`publish`, `follow`), kept in the lock's item and polled.

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use aws_sdk_dynamodb::{
    Client,
    error::{ProvideErrorMetadata, SdkError},
    operation::{
        delete_item::{DeleteItemError, DeleteItemOutput, builders::DeleteItemFluentBuilder},
        put_item::PutItemError,
        update_item::UpdateItemError,
    },
    types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure},
};

use crate::store::{
    Begin, Completed, Fingerprint, Followed, IdempotencyStore, Inspect, KeyState, LiveCursor, LiveEvent, LiveLog,
    LockToken, Locked, Purged, Record, StoreError, StoreKey,
};

mod builder;
mod item;
mod live;
mod table;

pub use builder::DynamoDbStoreBuilder;
use item::{
    COMPLETED_BY, EXPIRES, FINGERPRINT, GRACE, ITEM_LIMIT, ITEM_OVERHEAD, Item, LOG, LOG_BYTES, LOG_LEN, PK, RESPONSE,
    TOKEN, TTL, after, binary, now_ms, number, partition_key, token_bytes, ttl_seconds,
};

/// An [`IdempotencyStore`] in one DynamoDB table, on the application's
/// [`aws_sdk_dynamodb::Client`](https://docs.rs/aws-sdk-dynamodb/1/aws_sdk_dynamodb/client/struct.Client.html): many replicas, and any number of AWS Lambda instances, share
/// keys; a miss and a replay are one round trip each.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, store::{DynamoDbStore, aws_sdk_dynamodb}};
///
/// // `config`: the application's own configuration (credentials, region, retries, HTTP
/// // client), e.g. `aws_config::load_from_env().await`.
/// # async fn run(config: aws_sdk_dynamodb::Config) -> Result<(), tower_idempotency::store::StoreError> {
/// let store = DynamoDbStore::new(aws_sdk_dynamodb::Client::from_conf(config));
/// // Or create the table with the application's infrastructure code (see "The table").
/// store.create_table().await?;
/// let layer = IdempotencyLayer::from_store(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # The table
///
/// One table (default `idempotency`, see [`with_table`](DynamoDbStoreBuilder::with_table)),
/// one item per (scope, key). Its partition key is the string attribute `pk`; there is no sort
/// key and no index. [`create_table`](DynamoDbStore::create_table) makes it (on-demand
/// capacity) and turns on TTL; with CloudFormation, CDK or Terraform, declare the same:
///
/// ```text
/// AttributeDefinitions: [{ AttributeName: pk, AttributeType: S }]
/// KeySchema:            [{ AttributeName: pk, KeyType: HASH }]
/// BillingMode:          PAY_PER_REQUEST     (or PROVISIONED, see "Capacity")
/// TimeToLiveSpecification: { AttributeName: ttl, Enabled: true }
/// ```
///
/// | attribute | type | holds |
/// | --- | --- | --- |
/// | `pk` | S | the store's [key prefix](DynamoDbStoreBuilder::with_key_prefix), the [`ScopeId`](crate::ScopeId) as 64 hex digits (`-` for the unscoped namespace), `/`, the idempotency key as sent |
/// | `fp` | B | the fingerprint of the request that locked or completed the key (32 bytes) |
/// | `tok` | B | the lock's token (16 bytes) while locked; absent once completed |
/// | `exp` | N | the end of the lease (locked) or of the TTL (completed), in milliseconds since the Unix epoch: what every operation judges expiry by |
/// | `ttl` | N | the same instant in seconds, rounded up: the table's TTL attribute, so DynamoDB deletes the item some time later |
/// | `rec` | B | once completed, the response as [`StoredResponse::encode_into`](crate::store::StoredResponse::encode_into) writes it; absent when not retained |
/// | `gr` | N | with a grace for expired keys (`IdempotencyLayer::with_expired_grace`), its end in milliseconds since the Unix epoch: from `exp` to then, `begin` answers that the key expired (and `ttl` is this instant) |
/// | `by` | B | once completed, the token of the lock that completed it (16 bytes) and a number drawn for that `complete` call (16 bytes) |
/// | `n`, `lb`, `log` | N, N, L | while locked, the live log of join and wait modes: its events, their count and bytes (see [Responses in flight](#responses-in-flight)) |
///
/// # Round trips
///
/// Every operation is one request, hence atomic:
///
/// | operation | request |
/// | --- | --- |
/// | `begin` | `PutItem` of a new lock, on condition `attribute_not_exists(pk) OR (exp <= :now AND (attribute_not_exists(gr) OR gr <= :now))`, with `ReturnValuesOnConditionCheckFailure=ALL_OLD`: a free key is locked; a taken one fails the condition and the same answer carries the item found (a record to replay, a lock in flight, a mismatch) |
/// | `renew` | `UpdateItem SET exp, ttl` on condition `tok = :token AND exp > :now` |
/// | `complete` | `UpdateItem SET rec, by, exp, ttl REMOVE tok, log, n, lb`, on the same condition |
/// | `release` | `DeleteItem` on the same condition |
/// | `publish` | `UpdateItem SET log = list_append(log, :events)` on condition of the token, the lease, the log's length and its byte bound |
/// | `follow` | a strongly consistent `GetItem`, repeated at the [polling interval](DynamoDbStoreBuilder::with_follow_interval) while nothing is new |
///
/// A replay, a duplicate in flight and a mismatch are each one failed conditional write; a
/// miss is two writes (`begin`, `complete`).
///
/// # Capacity
///
/// DynamoDB charges a write 1 write unit per KB (rounded up) of the larger of the item before
/// and after it, a failed conditional write included, and a strongly consistent read 1 read
/// unit per 4 KB of the item (on-demand tables: request units, the same numbers). With `R` the
/// item of a completed record (its encoded response, plus about 150 bytes):
///
/// | request | units |
/// | --- | --- |
/// | first request (`begin`, `complete`) | 1 + ⌈R / 1 KB⌉ write units |
/// | replay (a failed `begin`) | ⌈R / 1 KB⌉ write units, no read unit |
/// | duplicate in flight (`409`), or a mismatch on a lock | 1 write unit (more once the live log passes 1 KB) |
/// | renewal (every third of a lease while the handler runs) | 1 write unit (⌈item / 1 KB⌉ with a live log) |
/// | release (a failed or unrecorded response) | 1 write unit |
/// | a waiting or joining duplicate | 1 read unit per poll while the lock's item is under 4 KB: 4 read units per waiting second at the default interval of 250 ms |
/// | one publish (join mode) | ⌈item with its log / 1 KB⌉ write units |
///
/// A replay is charged by the size of the record it finds: for large responses, the
/// [record limit](crate::IdempotencyLayer::with_max_record) bounds it. (The crate's tests read
/// the units of `begin`, `renew`, `complete`, `publish` and a poll back from
/// `ReturnConsumedCapacity` on a local DynamoDB-compatible server; those of a failed
/// conditional write come from DynamoDB's documented rules.)
///
/// **Hot partitions.** Each key is its own partition key value, so keys spread over the
/// table's partitions by themselves. One partition key value takes at most 1 000 write units
/// and 3 000 read units per second: a single key hammered by retries (a client in a tight
/// retry loop, a replay storm after an outage) is throttled on its own, without slowing other
/// keys; the throttled requests get `503` with `Retry-After` (see [Failure](#failure)).
/// Clients should back off (the crate's [client half](crate::client) does). Keep keys random
/// (UUIDs): a prefix that many keys share does not matter, the whole value is hashed.
///
/// # Permissions
///
/// The store's requests need these IAM actions on the table's ARN: `dynamodb:PutItem`,
/// `dynamodb:UpdateItem`, `dynamodb:DeleteItem`, `dynamodb:GetItem` (the last one for waiting
/// and joining only). [`create_table`](DynamoDbStore::create_table) needs
/// `dynamodb:CreateTable`, `dynamodb:DescribeTable`, `dynamodb:DescribeTimeToLive` and
/// `dynamodb:UpdateTimeToLive` too; a function whose table is made by its deployment needs
/// neither.
///
/// # Expiry, the clock, and fencing
///
/// DynamoDB has no clock of its own in a condition: **time is the process's system clock**
/// (`SystemTime::now`, in milliseconds since the Unix epoch), sent with each request. Each
/// request compares `exp` with it, so an item past its expiry counts as absent for every
/// operation at once, although DynamoDB's TTL deletes it only later (typically within days):
/// `begin` takes it over, and `complete`, `renew` and `release` change an item only while it
/// is locked by the caller's token under an unexpired lease, by the caller's clock.
///
/// **Clock skew between replicas.** A replica whose clock is ahead by `δ` sees every lease end
/// `δ` early. The layer renews a lock every third of its lease (checked every sixth), so a live
/// owner's lease always has more than half of it left: a takeover while the owner runs needs
/// `δ` above half the lease (15 s with the default lease of 30 s), less the time a renewal
/// takes. Replicas synchronised by NTP or the Amazon Time Sync Service (Lambda and EC2 are) are
/// within milliseconds. The same `δ` ends a record's TTL `δ` early on the replica ahead (and
/// late on one behind): set the TTL with that margin. A
/// takeover, whenever it happens, is fenced: the old owner's `complete`, `renew` and `release`
/// carry its token, and change nothing once another lock holds the key.
///
/// **Retries of the SDK.** The client (with the standard retry configuration, which
/// `aws_config` sets up) retries a request whose answer was lost (a timeout, a `5xx`, a
/// throttle). A `begin` retried after its lock was written finds its own token in the
/// item and executes; a `complete` retried after it was written finds its own call's number in
/// `by` and reports success (a second `complete` call, with a number of its own, does not): a
/// retry never turns into a second execution nor a spurious `409`.
///
/// # Limits
///
/// **The 400 KB item.** A record is one item. A response whose encoding does not fit in an
/// item (400 KB, less 1 KB for the other attributes and the length of the key prefix) is kept
/// as not retained ([`Record::NotRetained`]): its retries get `409` with the problem type
/// `response-not-retained`, and the handler never runs twice. Responses are not split over
/// several items: a record stays one conditional write and one read. Set the layer's
/// [record limit](crate::IdempotencyLayer::with_max_record) to match, so such a response is
/// not buffered for nothing.
///
/// # Failure
///
/// Every operation is bounded by the
/// [operation timeout](DynamoDbStoreBuilder::with_operation_timeout) (default 5 s, the SDK's
/// own retries included): past it, [`StoreError::is_timeout`]. Any error the SDK returns
/// (unreachable endpoint, missing table, access denied, and throttling:
/// `ProvisionedThroughputExceededException`, `ThrottlingException`, `RequestLimitExceeded`,
/// once the SDK's retries gave up) is [`StoreError::is_unavailable`]; an item this crate
/// cannot read is [`StoreError::is_corrupt`]. The layer fails closed on all of them by default:
/// `503` with `Retry-After`, the handler does not run. A `begin` whose answer was lost may
/// still have locked the key: retries then get `409` until its lease ends; the handler never
/// runs twice.
///
/// # Responses in flight
///
/// DynamoDB has no push channel a request can wait on (Streams are read per shard, seconds
/// behind, and cost a reader per shard), so on this store waiting and joining duplicates
/// **poll** the lock's item: one strongly consistent `GetItem` at once, then one every
/// [`with_follow_interval`](DynamoDbStoreBuilder::with_follow_interval) (default 250 ms,
/// bounded between 10 ms and 10 s) until something is new, the log ends or the wait times
/// out. Each poll costs ⌈item / 4 KB⌉ read units: 4 read units per waiting second while the
/// item is under 4 KB. A duplicate therefore learns of an event or of the end at most one
/// interval late.
///
/// The log lives in the lock's item, as a list of events (`log`), with its count (`n`) and
/// size (`lb`). A publish appends the events past the log's end, only while the caller's lock
/// is live (one sent again adds nothing; one leaving a gap adds nothing). The log has a
/// [byte bound](DynamoDbStoreBuilder::with_live_log_limit) (default 64 KB, at most what the
/// item limit leaves): a publish that would pass it is refused
/// ([`StoreError::is_capacity`]) and appends nothing, and the layer then keeps the response as
/// not retained, as past its record limit (joined bodies end with an error, later duplicates
/// get `409` `response-not-retained`, the response itself goes on to its client). Every
/// publish rewrites the item, so it costs the item's size in write units: join mode is for
/// short streams on this store. `complete` and `release` remove the log with the lock; a lock
/// taken over starts an empty one.
///
/// Cloning is cheap; clones share the client and the configuration.
#[derive(Clone)]
pub struct DynamoDbStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    table: String,
    key_prefix: String,
    operation_timeout: Duration,
    follow_interval: Duration,
    live_log_limit: u64,
}

impl DynamoDbStore {
    /// A store with the defaults (table `idempotency`) on `client`. Sends nothing yet.
    pub fn new(client: Client) -> Self {
        Self::builder().build(client)
    }

    /// The client the store sends its requests with.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The largest encoded response kept as a record: the item limit less the other
    /// attributes. A larger one is kept as not retained.
    pub fn max_record(&self) -> usize {
        ITEM_LIMIT.saturating_sub(ITEM_OVERHEAD + self.inner.key_prefix.len())
    }

    fn pk(&self, key: &StoreKey) -> AttributeValue {
        AttributeValue::S(partition_key(&self.inner.key_prefix, key))
    }

    /// A `DeleteItem` of the key's item, with the names its conditions use (`#tok`, `#exp`).
    fn delete(&self, key: &StoreKey) -> DeleteItemFluentBuilder {
        self.inner
            .client
            .delete_item()
            .table_name(&self.inner.table)
            .key(PK, self.pk(key))
            .expression_attribute_names("#tok", TOKEN)
            .expression_attribute_names("#exp", EXPIRES)
    }

    /// Sends a conditional `DeleteItem`: what it answered, or `None` when its condition did not
    /// hold (nothing was deleted).
    async fn delete_if(&self, request: DeleteItemFluentBuilder) -> Result<Option<DeleteItemOutput>, StoreError> {
        self.run(async {
            match request.send().await {
                Ok(deleted) => Ok(Some(deleted)),
                Err(SdkError::ServiceError(failed)) => match failed.into_err() {
                    DeleteItemError::ConditionalCheckFailedException(_) => Ok(None),
                    error => Err(service_error(error)),
                },
                Err(error) => Err(sdk_error(error)),
            }
        })
        .await
    }

    /// Runs `operation` within the operation timeout.
    async fn run<T>(&self, operation: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        tokio::time::timeout(self.inner.operation_timeout, operation)
            .await
            .unwrap_or_else(|_| Err(StoreError::timeout()))
    }

    /// An owner-only `UpdateItem`: `update` on the key's item on condition that `lock` holds it
    /// under an unexpired lease at `now`. `Ok(None)` when it was written, `Ok(Some(item))`
    /// with the item found when the condition failed.
    async fn owner_update(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        now: u64,
        update: &str,
        values: impl IntoIterator<Item = (&'static str, AttributeValue)>,
        names: &[(&'static str, &'static str)],
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        self.owner_update_if(key, lock, now, update, "#tok = :token AND #exp > :now", values, names).await
    }

    /// An owner-only `UpdateItem` with a condition of its own (which names `#tok`, `#exp`,
    /// `:token` and `:now`): `Ok(None)` when written, the item found when the condition failed.
    #[allow(clippy::too_many_arguments)]
    async fn owner_update_if(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        now: u64,
        update: &str,
        condition: &str,
        values: impl IntoIterator<Item = (&'static str, AttributeValue)>,
        names: &[(&'static str, &'static str)],
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let mut request = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.table)
            .key(PK, self.pk(key))
            .update_expression(update)
            .condition_expression(condition)
            .expression_attribute_names("#tok", TOKEN)
            .expression_attribute_names("#exp", EXPIRES)
            .expression_attribute_values(":token", token_bytes(lock.id()))
            .expression_attribute_values(":now", number(now))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (name, attribute) in names {
            request = request.expression_attribute_names(*name, *attribute);
        }
        for (name, value) in values {
            request = request.expression_attribute_values(name, value);
        }
        self.run(async {
            match request.send().await {
                Ok(_) => Ok(None),
                Err(SdkError::ServiceError(failed)) => match failed.into_err() {
                    UpdateItemError::ConditionalCheckFailedException(failed) => {
                        Ok(Some(failed.item.unwrap_or_default()))
                    }
                    error => Err(service_error(error)),
                },
                Err(error) => Err(sdk_error(error)),
            }
        })
        .await
    }

    /// The encoded record of `record`, or `None` when not retained (or too large for an item).
    fn encode(&self, record: &Record) -> Option<Vec<u8>> {
        match record {
            Record::Response(response) if response.encoded_len() <= self.max_record() => {
                let mut out = Vec::with_capacity(response.encoded_len());
                response.encode_into(&mut out).map(|()| out)
            }
            _ => None,
        }
    }
}

/// A service error as a store error: unavailable, with DynamoDB's code and message (a
/// throttle included: the layer answers `503` with `Retry-After`).
fn service_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(error: E) -> StoreError {
    StoreError::unavailable(error)
}

/// An SDK error as a store error: the SDK's own timeouts are timeouts, anything else (a
/// connection refused, a response that did not parse, a service error) unavailable.
fn sdk_error<E: std::error::Error + Send + Sync + 'static, R: fmt::Debug + Send + Sync + 'static>(
    error: SdkError<E, R>,
) -> StoreError {
    match error {
        SdkError::TimeoutError(_) => StoreError::timeout(),
        error => StoreError::unavailable(error),
    }
}

/// What `begin` learns from the item it found (its condition failed) for `token`.
fn found(item: &HashMap<String, AttributeValue>, token: &LockToken, now: u64) -> Result<Begin, StoreError> {
    let item = Item(item);
    if item.0.is_empty() {
        // The condition failed, yet nothing was there: a race with a `release` or with
        // DynamoDB's TTL deletion. Treated as in flight: the caller retries.
        return Ok(Begin::Locked);
    }
    let held = item.token()?;
    if held == Some(token.id()) {
        // The SDK retried this `begin` after its lock was written.
        return Ok(Begin::Execute(*token));
    }
    if item.in_grace(now)? {
        return Ok(Begin::Expired);
    }
    if item.expired(now)? {
        // Expired by this clock but not by the condition's (the same `now`): cannot happen;
        // answered as in flight rather than executing without a lock.
        return Ok(Begin::Locked);
    }
    let same = item.fingerprint()? == *token.fingerprint();
    Ok(match (held, same) {
        (_, false) => Begin::Mismatch,
        (Some(_), true) => Begin::Locked,
        (None, true) => Begin::Completed(item.record()?),
    })
}

impl DynamoDbStore {
    /// `complete`, with a grace for expired keys or without.
    async fn complete_for(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let expires = after(now, ttl);
        // The lock's token, and a number of this call's own: a request the SDK sends again
        // after its answer was lost finds it, and a second call does not.
        let mut by = lock.id().to_be_bytes().to_vec();
        by.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        // With a grace, the item is kept (and DynamoDB's TTL waits) until the grace ends.
        let kept = grace.map_or(expires, |grace| after(expires, grace));
        let mut values =
            vec![(":by", binary(by.clone())), (":expires", number(expires)), (":ttl", number(ttl_seconds(kept)))];
        let mut update = match self.encode(&record) {
            Some(encoded) => {
                values.push((":rec", binary(encoded)));
                "SET #rec = :rec, #by = :by, #exp = :expires, #ttl = :ttl".to_owned()
            }
            None => "SET #by = :by, #exp = :expires, #ttl = :ttl".to_owned(),
        };
        if grace.is_some() {
            values.push((":grace", number(kept)));
            update.push_str(", #gr = :grace");
        }
        update.push_str(" REMOVE #tok, #log, #n, #lb");
        if values.iter().all(|(name, _)| *name != ":rec") {
            update.push_str(", #rec");
        }
        let mut names = vec![
            ("#rec", RESPONSE),
            ("#by", COMPLETED_BY),
            ("#ttl", TTL),
            ("#log", LOG),
            ("#n", LOG_LEN),
            ("#lb", LOG_BYTES),
        ];
        if grace.is_some() {
            names.push(("#gr", GRACE));
        }
        match self.owner_update(key, lock, now, &update, values, &names).await? {
            None => Ok(true),
            // The SDK sent this call again after it was written.
            Some(found) => Ok(Item(&found).completion()? == Some(&by[..])),
        }
    }
}

impl IdempotencyStore for DynamoDbStore {
    async fn begin(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration) -> Result<Begin, StoreError> {
        let token = LockToken::new(*fingerprint);
        let now = now_ms();
        let expires = after(now, lease);
        let request = self
            .inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .item(PK, self.pk(key))
            .item(FINGERPRINT, binary(fingerprint.as_bytes().to_vec()))
            .item(TOKEN, token_bytes(token.id()))
            .item(EXPIRES, number(expires))
            .item(TTL, number(ttl_seconds(expires)))
            .item(LOG_LEN, number(0))
            .item(LOG_BYTES, number(0))
            .condition_expression(
                "attribute_not_exists(#pk) OR (#exp <= :now AND (attribute_not_exists(#gr) OR #gr <= :now))",
            )
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#exp", EXPIRES)
            .expression_attribute_names("#gr", GRACE)
            .expression_attribute_values(":now", number(now))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        self.run(async {
            match request.send().await {
                Ok(_) => Ok(Begin::Execute(token)),
                Err(SdkError::ServiceError(failed)) => match failed.into_err() {
                    PutItemError::ConditionalCheckFailedException(failed) => {
                        found(&failed.item.unwrap_or_default(), &token, now)
                    }
                    error => Err(service_error(error)),
                },
                Err(error) => Err(sdk_error(error)),
            }
        })
        .await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.complete_for(key, lock, record, ttl, None).await
    }

    /// The item is kept, record included, until the grace ends (its `gr`), and its `ttl`
    /// attribute moves there: the item's storage for the grace, one number more.
    async fn complete_with_grace(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        record: Record,
        ttl: Duration,
        grace: Duration,
    ) -> Result<bool, StoreError> {
        self.complete_for(key, lock, record, ttl, Some(grace)).await
    }

    async fn renew(&self, key: &StoreKey, lock: &LockToken, lease: Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let expires = after(now, lease);
        let values = [(":expires", number(expires)), (":ttl", number(ttl_seconds(expires)))];
        let written =
            self.owner_update(key, lock, now, "SET #exp = :expires, #ttl = :ttl", values, &[("#ttl", TTL)]).await?;
        Ok(written.is_none())
    }

    async fn release(&self, key: &StoreKey, lock: &LockToken) -> Result<bool, StoreError> {
        let request = self
            .delete(key)
            .condition_expression("#tok = :token AND #exp > :now")
            .expression_attribute_values(":token", token_bytes(lock.id()))
            .expression_attribute_values(":now", number(now_ms()));
        Ok(self.delete_if(request).await?.is_some())
    }
}

/// One strongly consistent `GetItem` (`inspect`) or one conditional `DeleteItem` (`purge`).
/// Expiry is the `exp` attribute, on the clocks of the processes that wrote it.
impl Inspect for DynamoDbStore {
    async fn inspect(&self, key: &StoreKey) -> Result<KeyState, StoreError> {
        let request =
            self.inner.client.get_item().table_name(&self.inner.table).key(PK, self.pk(key)).consistent_read(true);
        let found = self.run(async { request.send().await.map_err(sdk_error) }).await?;
        let Some(found) = found.item else { return Ok(KeyState::Unknown) };
        let item = Item(&found);
        let now = now_ms();
        if item.0.is_empty() || item.expired(now)? {
            return Ok(KeyState::Unknown);
        }
        let until = item.expires_at()?;
        Ok(match item.token()? {
            Some(id) => KeyState::Locked(Locked::new(&LockToken::from_parts(id, item.fingerprint()?), until)),
            None => KeyState::Completed(Completed::new(item.record()?, until)),
        })
    }

    async fn purge(&self, key: &StoreKey) -> Result<Purged, StoreError> {
        let now = now_ms();
        let request = self
            .delete(key)
            .condition_expression("attribute_not_exists(#tok) OR #exp <= :now")
            .expression_attribute_values(":now", number(now))
            .return_values(ReturnValue::AllOld);
        Ok(match self.delete_if(request).await?.map(|deleted| deleted.attributes) {
            None => Purged::Locked,
            Some(Some(old)) if !old.is_empty() && !Item(&old).expired(now)? => Purged::Removed,
            Some(_) => Purged::Unknown,
        })
    }
}

impl LiveLog for DynamoDbStore {
    async fn publish(
        &self,
        key: &StoreKey,
        lock: &LockToken,
        from: u64,
        events: Vec<LiveEvent>,
    ) -> Result<(), StoreError> {
        self.publish_events(key, lock, from, events).await
    }

    async fn follow(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> Result<Followed, StoreError> {
        self.follow_log(key, fingerprint, cursor, timeout).await
    }
}

impl fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("table", &self.inner.table)
            .field("key_prefix", &self.inner.key_prefix)
            .field("operation_timeout", &self.inner.operation_timeout)
            .field("follow_interval", &self.inner.follow_interval)
            .field("live_log_limit", &self.inner.live_log_limit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(token: Option<u128>, fingerprint: u8, expires: u64) -> HashMap<String, AttributeValue> {
        let mut item = HashMap::from([
            (PK.to_owned(), AttributeValue::S("-/k".to_owned())),
            (FINGERPRINT.to_owned(), binary(vec![fingerprint; 32])),
            (EXPIRES.to_owned(), number(expires)),
        ]);
        if let Some(token) = token {
            item.insert(TOKEN.to_owned(), token_bytes(token));
        }
        item
    }

    /// A `begin` the SDK sent again after its lock was written finds its own token, and
    /// executes: the lost answer turns neither into a `409` nor into a second lock.
    #[test]
    fn a_retried_begin_that_finds_its_own_lock_executes() {
        let token = LockToken::new(Fingerprint::from_bytes([1; 32]));
        let now = now_ms();
        let own = item(Some(token.id()), 1, now + 1000);
        assert!(matches!(found(&own, &token, now), Ok(Begin::Execute(got)) if got == token));
        let other = item(Some(token.id() ^ 1), 1, now + 1000);
        assert!(matches!(found(&other, &token, now), Ok(Begin::Locked)));
        let mismatch = item(Some(token.id() ^ 1), 2, now + 1000);
        assert!(matches!(found(&mismatch, &token, now), Ok(Begin::Mismatch)));
        let completed = item(None, 1, now + 1000);
        assert!(matches!(found(&completed, &token, now), Ok(Begin::Completed(Record::NotRetained))));
    }
}

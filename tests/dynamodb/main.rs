//! Everything DynamoDB, in one test binary: `DynamoDbStore` against the store conformance
//! suite and what only DynamoDB shows (the item limit, throttling, the table helper), and real
//! processes (two example servers sharing one table, one started while the store is down).
//!
//! Each test starts its own DynamoDB-compatible server (dynoxide, in this process, on a
//! loopback port) with an in-memory database: nothing to start beforehand, nothing shared
//! between tests.

#[path = "../common/live_bound.rs"]
mod live_bound;
mod processes;
mod store;
mod units;

use std::net::SocketAddr;

use tower_idempotency::store::{
    DynamoDbStore, DynamoDbStoreBuilder,
    aws_sdk_dynamodb::{
        self,
        config::{BehaviorVersion, Credentials, Region, retry::RetryConfig},
    },
};

/// A DynamoDB-compatible server on loopback, serving until the test's runtime ends.
pub(crate) async fn dynamodb() -> SocketAddr {
    serve(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// Serves an in-memory DynamoDB on `listener`.
pub(crate) fn serve(listener: tokio::net::TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let database = dynoxide::Database::memory().unwrap();
    tokio::spawn(dynoxide::server::serve_on(listener, database));
    addr
}

/// A client of the server at `addr`, with throwaway credentials.
pub(crate) fn client(addr: SocketAddr) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://{addr}"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        // As `aws_config` sets it up: three attempts, with backoff.
        .retry_config(RetryConfig::standard())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A builder on a table of the test's own, polling often (the suite's leases are short).
pub(crate) fn builder() -> DynamoDbStoreBuilder {
    DynamoDbStore::builder()
        .with_table(format!("idem-{}", uuid::Uuid::new_v4().simple()))
        .with_follow_interval(std::time::Duration::from_millis(20))
}

/// A store on a fresh server and table, the table created.
pub(crate) async fn store() -> DynamoDbStore {
    let store = builder().build(client(dynamodb().await));
    store.create_table().await.unwrap();
    store
}

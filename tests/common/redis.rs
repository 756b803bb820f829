//! The Redis the tests run against, and raw access to what the store wrote.
//!
//! Skip policy: with `REDIS_URL` unset, the tests use `redis://127.0.0.1:6379` when it
//! answers and otherwise say once that they are skipped and pass; with `REDIS_URL` set, a
//! Redis that does not answer fails the test.

use std::{io::Write, sync::OnceLock, time::Duration};

use tower_idempotency::{
    StoreKey,
    store::{
        RedisStore,
        redis::{self, AsyncCommands, aio::MultiplexedConnection},
    },
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
    RedisStore::builder().prefix(run_prefix()).connect(url).await.expect("connect to Redis")
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

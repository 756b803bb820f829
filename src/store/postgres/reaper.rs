//! The reaper: deletes expired rows in bounded batches, in the background, with the live logs
//! of their keys.

use std::{sync::Weak, time::Duration};

use sqlx::AssertSqlSafe;

use super::{Inner, store_error};
use crate::{rt::Running, store::StoreError};

impl Inner {
    /// Deletes up to one batch of expired rows; how many it deleted.
    pub(super) async fn reap(&self) -> Result<u64, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.statements.reap.clone())).bind(self.reap_batch);
        let deleting = query.fetch_one(&self.pool);
        match tokio::time::timeout(self.operation_timeout, deleting).await {
            Ok(done) => Ok(done.map_err(store_error)?.unsigned_abs()),
            Err(_) => Err(StoreError::timeout()),
        }
    }
}

/// Every `every`, the first one `every` after the start: batches until one comes back short.
/// A failure waits for the next round. Ends when the store is dropped.
pub(super) async fn reap_forever(store: Weak<Inner>, every: Duration, _running: Running) {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        loop {
            let Some(inner) = store.upgrade() else { return };
            match inner.reap().await {
                Ok(deleted) if deleted >= inner.reap_batch.unsigned_abs() => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::debug!(%error, "idempotency: the PostgreSQL reaper failed; trying again next round");
                    break;
                }
            }
        }
    }
}

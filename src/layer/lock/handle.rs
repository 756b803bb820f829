//! [`StoreHandle`]: one key of one store, the store's type erased. It is the one view of a
//! store that the layer's bodies, its tasks and the [`Keeper`](super::Keeper) hold, since they
//! cannot name the store's type: the executing request's lock (renew, complete, release,
//! publish) and a duplicate's place in the key's live log (follow, then the record).
//!
//! The live log is an optional capability of a store ([`LiveLog`]): a handle reaches it
//! through [`LiveOps`], made only where the store's type is known to have one (the layer's
//! wait and join setting), so a store that implements only the core never needs it.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{COMPLETE_FIRST_PAUSE, COMPLETE_MAX_PAUSE, Lease};
use crate::rt::BoxFuture;
use crate::store::{
    Begin, Fingerprint, Followed, IdempotencyStore, LiveCursor, LiveEvent, LiveLog, LockToken, Record, StoreError,
    StoreKey, StoredResponse,
};
use crate::telemetry::{self, Operation};

/// One key of one store, its type erased. See the [module docs](self).
pub(crate) trait StoreHandle: Send + Sync + 'static {
    /// The lease of the lock this handle holds (`None` for a follower's handle).
    fn lease(&self) -> Option<&Lease>;
    /// Renews the lease once (started by [`Lease::start_renewal`]).
    fn renew(self: Arc<Self>) -> BoxFuture<()>;
    /// Replaces the lock by `record`, retrying failed writes while the lease lasts.
    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()>;
    /// Removes the lock.
    fn release(self: Arc<Self>) -> BoxFuture<()>;
    /// Appends `events` to the lock's live log from index `from`: stored, failed (the caller
    /// sends them again), or refused for the log's bound.
    fn publish(self: Arc<Self>, from: u64, events: Vec<LiveEvent>) -> BoxFuture<Published>;
    /// Reads the key's live log after `cursor`, waiting up to `timeout` (see
    /// [`LiveLog::follow`]).
    fn follow(
        self: Arc<Self>,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> BoxFuture<Result<Followed, StoreError>>;
    /// The record that ended the log, if the key holds one for the handle's fingerprint.
    fn record(self: Arc<Self>) -> BoxFuture<Result<Option<Arc<StoredResponse>>, StoreError>>;
}

/// The live-log operations of a store whose type implements [`LiveLog`], for a handle over it.
/// Made where that bound is known (the layer's wait and join setting); plain function
/// pointers, so copying them costs nothing.
pub(crate) struct LiveOps<St> {
    publish: PublishFn<St>,
    follow: FollowFn<St>,
}

type PublishFn<St> = fn(Arc<Handle<St>>, u64, Vec<LiveEvent>) -> BoxFuture<Published>;

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// The store has the events (or the lock is gone, and nothing is to be written).
    Stored,
    /// The store failed: send them again.
    Failed,
    /// The store refused them for the log's bound ([`StoreError::is_capacity`]): the response
    /// cannot be joined, and is kept as not retained.
    Full,
}
type FollowFn<St> = fn(Arc<Handle<St>>, Option<LiveCursor>, Duration) -> BoxFuture<Result<Followed, StoreError>>;

impl<St: LiveLog> LiveOps<St> {
    pub(crate) fn new() -> Self {
        Self { publish: publish::<St>, follow: follow::<St> }
    }
}

impl<St> Clone for LiveOps<St> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<St> Copy for LiveOps<St> {}

fn publish<St: LiveLog>(handle: Arc<Handle<St>>, from: u64, events: Vec<LiveEvent>) -> BoxFuture<Published> {
    Box::pin(async move {
        let Some(holding) = &handle.holding else { return Published::Stored };
        match handle.store.publish(&handle.key, &holding.token, from, events).await {
            Ok(()) => Published::Stored,
            Err(error) if error.is_capacity() => {
                tracing::debug!(token = ?holding.token, "idempotency live log full; the response is not retained");
                Published::Full
            }
            Err(error) => {
                tracing::debug!(%error, token = ?holding.token, "idempotency live publish failed; sending it again");
                Published::Failed
            }
        }
    })
}

fn follow<St: LiveLog>(
    handle: Arc<Handle<St>>,
    cursor: Option<LiveCursor>,
    timeout: Duration,
) -> BoxFuture<Result<Followed, StoreError>> {
    Box::pin(async move { handle.store.follow(&handle.key, &handle.fingerprint, cursor, timeout).await })
}

/// What a handle holding a lock knows of it.
pub(super) struct Holding {
    pub(super) token: LockToken,
    pub(super) ttl: Duration,
    /// How long past `ttl` the key stays marked expired (zero: not at all).
    pub(super) grace: Duration,
    pub(super) lease: Lease,
}

/// The [`StoreHandle`] over a store of type `St`.
pub(crate) struct Handle<St> {
    store: Arc<St>,
    key: StoreKey,
    fingerprint: Fingerprint,
    /// The lease used to read a record back (a `begin` that finds the record expired takes the
    /// key, and gives it back at once).
    lease: Duration,
    live: Option<LiveOps<St>>,
    /// The lock, for the executing request's handle.
    holding: Option<Holding>,
}

impl<St: IdempotencyStore> Handle<St> {
    /// The handle of the executing request, holding the lock.
    pub(super) fn held(
        store: Arc<St>,
        key: StoreKey,
        live: Option<LiveOps<St>>,
        holding: Holding,
    ) -> Arc<dyn StoreHandle> {
        let (fingerprint, lease) = (*holding.token.fingerprint(), holding.lease.length);
        Arc::new(Self { store, key, fingerprint, lease, live, holding: Some(holding) })
    }
}

/// The handle of a duplicate following the live log of `key`'s lock for `fingerprint`.
pub(crate) fn follower<St: IdempotencyStore>(
    store: Arc<St>,
    key: StoreKey,
    fingerprint: Fingerprint,
    lease: Duration,
    live: LiveOps<St>,
) -> Arc<dyn StoreHandle> {
    Arc::new(Handle { store, key, fingerprint, lease, live: Some(live), holding: None })
}

impl<St: IdempotencyStore> StoreHandle for Handle<St> {
    fn lease(&self) -> Option<&Lease> {
        self.holding.as_ref().map(|holding| &holding.lease)
    }

    fn renew(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let Some(Holding { token, lease, .. }) = &self.holding else { return };
            let started = Instant::now();
            let renewed = self.store.renew(&self.key, token, lease.length).await;
            telemetry::store_operation(Operation::Renew, started);
            let lost = !lease.is_finished();
            match &renewed {
                Ok(true) => tracing::trace!(?token, "idempotency lease renewed"),
                Ok(false) if lost => {
                    if !lease.lost.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        telemetry::lease_taken_over();
                    }
                    tracing::warn!(?token, "idempotency lock lost while in flight");
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, ?token, "idempotency lease renewal failed"),
            }
            lease.end_renewal(matches!(renewed, Ok(true)).then_some(started));
        })
    }

    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()> {
        Box::pin(async move {
            let Some(Holding { token, ttl, grace, lease }) = &self.holding else { return };
            // A failed write is retried with backoff while the lock surely holds the key (the
            // keeper renews it meanwhile, extending that), and for one lease at most: giving
            // up frees the key once the lease expires, and a retry of the request would then
            // run the handler again.
            let started = Instant::now();
            let mut pause = COMPLETE_FIRST_PAUSE;
            for attempt in 1u32.. {
                let attempted = Instant::now();
                let completed = if grace.is_zero() {
                    self.store.complete(&self.key, token, record.clone(), *ttl).await
                } else {
                    self.store.complete_with_grace(&self.key, token, record.clone(), *ttl, *grace).await
                };
                telemetry::store_operation(Operation::Complete, attempted);
                let error = match completed {
                    Ok(true) => {
                        tracing::trace!(?token, "idempotency record completed");
                        break;
                    }
                    Ok(false) => {
                        // Either an earlier attempt did write (its answer was lost) or the
                        // lease expired and the key was taken over.
                        telemetry::fenced_write_rejected();
                        tracing::warn!(?token, "idempotency lock no longer held at completion");
                        break;
                    }
                    Err(error) => error,
                };
                let next = Instant::now() + pause;
                if next >= lease.until() || next >= started + lease.length {
                    tracing::error!(
                        %error,
                        attempt,
                        ?token,
                        "idempotency record could not be stored within the lease; the key frees when it expires"
                    );
                    lease.retrying.store(true, std::sync::atomic::Ordering::Release);
                    telemetry::record_write_failed();
                    break;
                }
                telemetry::record_write_retried();
                tracing::warn!(%error, attempt, "idempotency record not stored yet; retrying");
                lease.retrying.store(true, std::sync::atomic::Ordering::Release);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(COMPLETE_MAX_PAUSE);
            }
            lease.finish();
        })
    }

    fn release(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            let Some(Holding { token, lease, .. }) = &self.holding else { return };
            let started = Instant::now();
            let released = self.store.release(&self.key, token).await;
            telemetry::store_operation(Operation::Release, started);
            match released {
                Ok(_) => tracing::trace!(?token, "idempotency lock released"),
                Err(error) => tracing::warn!(
                    %error,
                    ?token,
                    "idempotency lock release failed; the key frees when its lease expires"
                ),
            }
            lease.finish();
        })
    }

    fn publish(self: Arc<Self>, from: u64, events: Vec<LiveEvent>) -> BoxFuture<Published> {
        match self.live {
            Some(live) => (live.publish)(self, from, events),
            // Only join mode publishes, and it is set only over a store with a live log.
            None => Box::pin(async { Published::Stored }),
        }
    }

    fn follow(
        self: Arc<Self>,
        cursor: Option<LiveCursor>,
        timeout: Duration,
    ) -> BoxFuture<Result<Followed, StoreError>> {
        match self.live {
            Some(live) => (live.follow)(self, cursor, timeout),
            // No live log to follow: as a log that ended without a record.
            None => Box::pin(async { Ok(Followed::Ended { completed: false }) }),
        }
    }

    fn record(self: Arc<Self>) -> BoxFuture<Result<Option<Arc<StoredResponse>>, StoreError>> {
        Box::pin(async move {
            match self.store.begin(&self.key, &self.fingerprint, self.lease).await? {
                Begin::Completed(Record::Response(record)) => Ok(Some(record)),
                Begin::Execute(token) => {
                    // The record expired already and `begin` locked the key: give it back.
                    self.store.release(&self.key, &token).await?;
                    Ok(None)
                }
                _ => Ok(None),
            }
        })
    }
}

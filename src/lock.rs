//! The in-flight lock as a guard value: renewed while held, released on drop unless completed.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Waker},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use crate::{
    Record,
    store::{IdempotencyStore, LockToken, StoreKey},
};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How often a failed completion is tried in all.
const COMPLETE_ATTEMPTS: u32 = 4;
/// The pause after the first failed completion; it doubles after each.
const COMPLETE_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// A held lock, with its store type erased so bodies and futures need not name it.
trait Held: Send + Sync + 'static {
    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()>;
    fn renew(self: Arc<Self>) -> BoxFuture<()>;
    fn release(self: Arc<Self>) -> BoxFuture<()>;
}

struct StoreLock<St> {
    store: Arc<St>,
    key: StoreKey,
    token: LockToken,
    lease: Duration,
    ttl: Duration,
}

impl<St: IdempotencyStore> Held for StoreLock<St> {
    fn complete(self: Arc<Self>, record: Record) -> BoxFuture<()> {
        Box::pin(async move {
            // A failed write is retried a few times within the lease (the lock still holds the
            // key meanwhile): giving up frees the key once the lease expires, and a retry of the
            // request would then run the handler again.
            let mut pause = COMPLETE_RETRY_FIRST_PAUSE;
            for attempt in 1.. {
                let error = match self.store.complete(&self.key, &self.token, record.clone(), self.ttl).await {
                    Ok(true) => return tracing::trace!(token = ?self.token, "idempotency record completed"),
                    Ok(false) => {
                        return tracing::warn!(
                            token = ?self.token,
                            "idempotency lock was lost before completion (lease expired and taken over); response not recorded"
                        );
                    }
                    Err(error) => error,
                };
                if attempt == COMPLETE_ATTEMPTS || pause * 2 >= self.lease {
                    return tracing::error!(
                        %error,
                        token = ?self.token,
                        "idempotency record could not be stored; the key frees when its lease expires"
                    );
                }
                tracing::warn!(%error, attempt, "idempotency record not stored yet; retrying");
                let renewed = self.store.renew(&self.key, &self.token, self.lease);
                let (_, ()) = tokio::join!(renewed, tokio::time::sleep(pause));
                pause *= 2;
            }
        })
    }

    fn renew(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            match self.store.renew(&self.key, &self.token, self.lease).await {
                Ok(true) => tracing::trace!(token = ?self.token, "idempotency lease renewed"),
                Ok(false) => tracing::warn!(token = ?self.token, "idempotency lock lost while the handler runs"),
                Err(error) => tracing::warn!(%error, token = ?self.token, "idempotency lease renewal failed"),
            }
        })
    }

    fn release(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            match self.store.release(&self.key, &self.token).await {
                Ok(_) => tracing::trace!(token = ?self.token, "idempotency lock released"),
                Err(error) => tracing::warn!(
                    %error,
                    token = ?self.token,
                    "idempotency lock release failed; the key frees when its lease expires"
                ),
            }
        })
    }
}

/// The lock a request holds while its handler runs and its response is recorded.
///
/// [`poll_renew`](Self::poll_renew) renews the lease every third of it; the renewal timer is
/// only created once the handler is actually pending, so a fast handler never pays for it.
/// Dropped without [`complete`](Self::complete) or [`release`](Self::release), it releases the
/// lock in the background.
pub(crate) struct LockGuard {
    held: Option<Arc<dyn Held>>,
    renew_every: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    renewing: Option<BoxFuture<()>>,
    /// The task renewing the lease on its own, once the response is streaming.
    background: Option<tokio::task::AbortHandle>,
}

impl LockGuard {
    pub(crate) fn new<St: IdempotencyStore>(
        store: Arc<St>,
        key: StoreKey,
        token: LockToken,
        lease: Duration,
        ttl: Duration,
    ) -> Self {
        Self {
            held: Some(Arc::new(StoreLock { store, key, token, lease, ttl })),
            renew_every: lease / 3,
            timer: None,
            renewing: None,
            background: None,
        }
    }

    /// Renews the lease from a task of its own until the lock is completed or released.
    ///
    /// While the handler runs, [`poll_renew`](Self::poll_renew) renews it from the request's
    /// own task. Once the response streams, that task is only polled when the client reads, so
    /// a slow or stalled reader would let the lease lapse: from then on a task keeps it.
    pub(crate) fn renew_in_background(&mut self) {
        let Some(held) = &self.held else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (held, every) = (held.clone(), self.renew_every);
        let task = runtime.spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                ticks.tick().await;
                held.clone().renew().await;
            }
        });
        self.background = Some(task.abort_handle());
        self.timer = None;
        self.renewing = None;
    }

    /// Replaces the lock by `record`. The returned future does the store write.
    pub(crate) fn complete(&mut self, record: Record) -> Option<BoxFuture<()>> {
        self.stop_renewing();
        self.held.take().map(|held| held.complete(record))
    }

    /// Releases the lock. The returned future does the store write.
    pub(crate) fn release(&mut self) -> Option<BoxFuture<()>> {
        self.stop_renewing();
        self.held.take().map(Held::release)
    }

    fn stop_renewing(&mut self) {
        if let Some(task) = self.background.take() {
            task.abort();
        }
    }

    /// Drives lease renewal; call it whenever the guarded work is pending.
    pub(crate) fn poll_renew(&mut self, cx: &mut Context<'_>) {
        let Some(held) = &self.held else { return };
        if self.background.is_some() {
            return;
        }
        loop {
            if let Some(renewing) = &mut self.renewing {
                if renewing.as_mut().poll(cx).is_pending() {
                    return;
                }
                self.renewing = None;
            }
            let every = self.renew_every;
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            timer.as_mut().reset(Instant::now() + every);
            self.renewing = Some(held.clone().renew());
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release() {
            run_soon(release);
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard").field("held", &self.held.is_some()).finish_non_exhaustive()
    }
}

/// Runs a short store write to completion without awaiting it: one poll now (an in-memory
/// store finishes there), the rest on the runtime. Outside a runtime, a store write that
/// cannot finish at once is dropped; the lock then frees when its lease expires.
pub(crate) fn run_soon(mut future: BoxFuture<()>) {
    let mut cx = Context::from_waker(Waker::noop());
    if future.as_mut().poll(&mut cx).is_ready() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(future);
    }
}

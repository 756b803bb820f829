//! [`Completion`]: a store write that, once started, runs to its end whoever stops waiting.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker, ready},
};

use tokio::runtime::Handle;

use std::sync::Arc;

use super::StoreHandle;
use crate::rt::{self, BoxFuture};

/// A store write (a record, a not-retained record, a release) that is owned, not hoped for.
///
/// Whoever needs its result (a body holding back its last frame, a response head waiting for
/// a record) polls it. Dropped before it finished — the client went away, the server dropped
/// the body, a timeout outside the layer fired — it is handed to the runtime it was started
/// on and runs there to its end. Nothing bounds that hand-over: the bound on detached requests
/// limits draining bodies and running handlers, never a final write.
pub(crate) struct Completion {
    future: Option<BoxFuture<()>>,
    /// Where the write goes on if its waiter drops it: the runtime of the request, so that a
    /// drop outside any runtime (a body dropped on another thread) still hands it over.
    runtime: Option<Handle>,
    /// The lock a record's write replaces: it tells whether that write failed once and is
    /// being retried (see [`poll_first_attempt`](Self::poll_first_attempt)).
    held: Option<Arc<dyn StoreHandle>>,
}

impl Completion {
    /// Starts `write`, polling it once where a runtime is current (an in-memory store is done
    /// there and then), so the write is under way before anyone waits for it.
    pub(crate) fn start(write: BoxFuture<()>, runtime: Option<Handle>) -> Self {
        let mut completion = Self { future: Some(write), runtime, held: None };
        // Outside a runtime a store's future may not be polled at all (its timers would
        // panic); it then runs once handed to `runtime`.
        if Handle::try_current().is_ok() {
            let _ = completion.poll_write(&mut Context::from_waker(Waker::noop()));
        }
        completion
    }

    /// A write that had nothing to do.
    pub(crate) fn done() -> Self {
        Self { future: None, runtime: None, held: None }
    }

    /// Watches `held`'s record write, for [`poll_first_attempt`](Self::poll_first_attempt).
    pub(crate) fn watching(mut self, held: Arc<dyn StoreHandle>) -> Self {
        if !self.is_done() {
            self.held = Some(held);
        }
        self
    }

    /// Ready once the write is done, or once its first attempt failed (it goes on being
    /// retried, and [`poll`](Future::poll) still waits for its end).
    pub(crate) fn poll_first_attempt(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.poll_write(cx).is_ready() {
            return Poll::Ready(());
        }
        match &self.held {
            Some(held) if held.lease().is_some_and(super::Lease::is_retrying) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }

    /// Whether the write has finished (stored, or given up).
    pub(crate) fn is_done(&self) -> bool {
        self.future.is_none()
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(future) = &mut self.future else { return Poll::Ready(()) };
        ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(())
    }
}

impl Future for Completion {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_write(cx)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else { return };
        // Unbounded: a final write is owned, never refused for want of a place. On a runtime
        // that has shut down the task is dropped at once: the process is ending, and the lock
        // frees when its lease expires.
        match rt::reserve(self.runtime.clone(), None) {
            Ok(detaching) => detaching.spawn(future),
            Err(_) => {
                tracing::warn!("idempotency store write dropped outside a runtime; the key frees after its lease")
            }
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion").field("done", &self.is_done()).finish()
    }
}

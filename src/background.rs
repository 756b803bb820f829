//! [`Background`]: a task of a long-lived value (a store's sweep, a layer's lease keeper) that
//! runs on whichever tokio runtime is running.
//!
//! The value may outlive the runtime that first started its task: a test per runtime, a
//! service rebuilt on a new runtime, a runtime shut down and replaced. A task dies with its
//! runtime, so the value must notice and start it again: the task owns a [`Running`] marker
//! whose drop — when the task ends, or when its runtime drops it, polled or not — clears the
//! flag, and the next [`ensure`](Background::ensure) on a runtime starts a new task.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

/// Whether a value's background task is alive.
#[derive(Default)]
pub(crate) struct Background {
    running: Arc<AtomicBool>,
}

/// Owned by the background task: its drop marks the task as gone.
pub(crate) struct Running(Arc<AtomicBool>);

impl Background {
    /// Starts `task(running)` on the current runtime unless a task is alive; outside a runtime
    /// it does nothing (the next call from a runtime starts it). The task must keep `running`
    /// for as long as it runs.
    pub(crate) fn ensure<F>(&self, task: impl FnOnce(Running) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        // `running` goes into the future before it is spawned, so a task dropped before its
        // first poll still clears the flag.
        runtime.spawn(task(Running(self.running.clone())));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl fmt::Debug for Background {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Background").field("running", &self.running.load(Ordering::Relaxed)).finish()
    }
}

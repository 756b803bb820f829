//! Private plumbing that the server half, the stores and the client half share:
//!
//! - [`Background`]: a task of a long-lived value (a store's sweep, a layer's lease keeper)
//!   that runs on whichever tokio runtime is running;
//! - [`reserve`] and [`Detaching`]: the one way work left behind by a drop (a handler whose
//!   client went away, a body that must be drained, a store write) goes on on the runtime;
//! - [`BoxFuture`] and [`into_bytes`].
//!
//! About [`Background`]:
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

/// A boxed future that can be moved to another task.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A frame with its data as `Bytes`: free for `Bytes` itself, one copy for other buffers.
pub(crate) fn into_bytes<D: bytes::Buf>(frame: http_body::Frame<D>) -> http_body::Frame<bytes::Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

/// Why work left by a drop could not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undetached {
    /// No runtime to run it on (dropped outside every runtime, with none recorded).
    NoRuntime,
    /// The bound on detached work is reached.
    Full,
}

/// A place on a runtime for work left behind by a drop, with its permit if it is bounded.
pub(crate) struct Detaching {
    runtime: tokio::runtime::Handle,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reserves a place for work left behind by a drop: on `runtime` (the runtime its request ran
/// on, so a drop on another thread still hands it over), else on the current one; with
/// `bound`, only while one of its permits is free. Every hand-over after a drop in the crate
/// goes through here.
pub(crate) fn reserve(
    runtime: Option<tokio::runtime::Handle>,
    bound: Option<&Arc<tokio::sync::Semaphore>>,
) -> Result<Detaching, Undetached> {
    let runtime = runtime.or_else(|| tokio::runtime::Handle::try_current().ok()).ok_or(Undetached::NoRuntime)?;
    let permit = match bound {
        Some(bound) => Some(bound.clone().try_acquire_owned().map_err(|_| Undetached::Full)?),
        None => None,
    };
    Ok(Detaching { runtime, permit })
}

impl Detaching {
    /// Runs `work` to its end on the reserved runtime, holding the permit until then. On a
    /// runtime that has shut down the work is dropped at once (the process is ending).
    pub(crate) fn spawn(self, work: impl Future<Output = ()> + Send + 'static) {
        let Self { runtime, permit } = self;
        // Bounded work is a detached handler or its body's drain: counted while it runs.
        let tracked = permit.is_some().then(|| crate::telemetry::Tracked::new(crate::telemetry::Held::Detached));
        drop(runtime.spawn(async move {
            let _permit = permit;
            let _tracked = tracked;
            work.await;
        }));
    }
}

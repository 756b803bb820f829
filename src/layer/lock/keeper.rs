//! [`Keeper`]: one task per layer that renews the leases of the locks its requests hold.
//!
//! A lease must not depend on the request being polled: a handler that blocks its thread
//! (`block_in_place`, a CPU-heavy step) or a body no one reads would otherwise let its lock
//! lapse, and a retry would run the handler a second time, concurrently. So every executing
//! request registers its lock here, and the keeper — a task of its own on the runtime — renews
//! each lock once a third of its lease has passed since the last renewal.
//!
//! A request that finishes within that first third costs a register and a deregister (a short
//! mutex and a map insert and remove, no allocation once the map has grown) and never a task:
//! renewals, and the tasks that send them, are only for the requests that are still running.

use std::{
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::StoreHandle;
use crate::rt::{Background, Running};

/// The lease keeper of one layer configuration (one lease length).
#[derive(Clone)]
pub(crate) struct Keeper {
    shared: Arc<Shared>,
}

struct Shared {
    /// Weak: a lock whose every owner is gone (its guard and its completion dropped unrun, as
    /// on a runtime that shut down) is no longer renewed, and is forgotten at the next tick.
    locks: Mutex<Slots>,
    /// The keeper task: started again on the next runtime that registers a lock if the one
    /// that ran it ended.
    task: Background,
    /// Wakes the task when the first lock arrives, or when the layer is gone.
    wake: Arc<Notify>,
    /// How often the task looks for locks due for renewal.
    tick: Duration,
    /// How long after its last renewal a lock is renewed.
    renew_after: Duration,
}

impl Keeper {
    /// A keeper for locks with `lease`: each is renewed a third of a lease after its last
    /// renewal, checked every sixth of a lease, so a lease is never more than half spent.
    pub(crate) fn new(lease: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                locks: Mutex::new(Slots::default()),
                task: Background::default(),
                wake: Arc::new(Notify::new()),
                tick: (lease / 6).max(Duration::from_millis(1)),
                renew_after: lease / 3,
            }),
        }
    }

    /// Keeps `held` renewed until [`forget`](Self::forget) is called with the returned id.
    pub(crate) fn register(&self, held: &Arc<dyn StoreHandle>) -> usize {
        let shared = &self.shared;
        let (id, was_empty) = {
            let mut locks = shared.locks.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = locks.live == 0;
            (locks.insert(Arc::downgrade(held)), was_empty)
        };
        self.ensure_running();
        if was_empty {
            shared.wake.notify_one();
        }
        id
    }

    /// Stops renewing the lock registered as `id`.
    pub(crate) fn forget(&self, id: usize) {
        self.shared.locks.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    fn ensure_running(&self) {
        let shared = &self.shared;
        let (weak, wake) = (Arc::downgrade(shared), shared.wake.clone());
        shared.task.ensure(|running| keep(weak, wake, running));
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The layer is gone: let the task see it and end.
        self.wake.notify_one();
    }
}

async fn keep(shared: Weak<Shared>, wake: Arc<Notify>, _running: Running) {
    loop {
        let notified = wake.notified();
        let tick = {
            let Some(shared) = shared.upgrade() else { return };
            let idle = shared.locks.lock().unwrap_or_else(|e| e.into_inner()).live == 0;
            (!idle).then_some(shared.tick)
        };
        match tick {
            Some(tick) => tokio::time::sleep(tick).await,
            None => notified.await,
        }
        let Some(shared) = shared.upgrade() else { return };
        shared.renew_due(Instant::now());
    }
}

impl Shared {
    fn renew_due(&self, now: Instant) {
        let due: Vec<Arc<dyn StoreHandle>> = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.forget_dead();
            locks
                .entries
                .iter()
                .flatten()
                .filter_map(Weak::upgrade)
                .filter(|held| held.lease().is_some_and(|lease| lease.start_renewal(now, self.renew_after)))
                .collect()
        };
        // One task per renewal, so a slow store holds back no other lock's renewal.
        for held in due {
            tokio::spawn(held.renew());
        }
    }
}

/// The registered locks: a slot table whose freed slots are reused, so that registering and
/// forgetting allocate nothing once it has grown to the number of locks held at once.
#[derive(Default)]
struct Slots {
    entries: Vec<Option<Weak<dyn StoreHandle>>>,
    free: Vec<usize>,
    live: usize,
}

impl Slots {
    fn insert(&mut self, held: Weak<dyn StoreHandle>) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(id) => {
                self.entries[id] = Some(held);
                id
            }
            None => {
                self.entries.push(Some(held));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, id: usize) {
        if let Some(slot) = self.entries.get_mut(id) {
            if slot.take().is_some() {
                self.live -= 1;
                self.free.push(id);
            }
        }
    }

    /// Frees the slots of locks no one holds any more.
    fn forget_dead(&mut self) {
        for id in 0..self.entries.len() {
            if self.entries[id].as_ref().is_some_and(|held| held.strong_count() == 0) {
                self.remove(id);
            }
        }
    }
}

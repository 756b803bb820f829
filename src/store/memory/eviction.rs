//! The eviction order: completed records, oldest first, in queues that completions on
//! different cores do not share.
//!
//! One queue for the whole store would serialise every completion on its mutex (a push per
//! record), so completions of distinct keys on two cores would scale no better than on one.
//! Here a record goes to the queue its key hashes to, and every completion takes a global
//! sequence number. Each queue publishes the sequence number at its front; eviction takes the
//! front of the queue whose front is oldest. Records leave in the order of their sequence
//! numbers across the whole store, exactly when one thread completes and evicts at a time.
//! With several at once the order is that of the sequence numbers, taken just before each
//! record is written: a completion whose thread is preempted between the two is queued late,
//! and may leave after records that completed after it (or, at the bound, before them).

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::slot::KeyId;

/// No record waits in a queue.
const EMPTY: u64 = u64::MAX;

/// The eviction queues of one store.
pub(super) struct Queues {
    queues: Box<[Queue]>,
    /// The next completion's sequence number.
    seq: Padded<AtomicU64>,
}

/// A value on a cache line of its own: a counter every core writes must not share its line
/// with values every core only reads.
#[repr(align(128))]
#[derive(Default)]
pub(super) struct Padded<T>(pub(super) T);

/// One queue, on a cache line of its own so that two cores pushing to two queues do not
/// share one.
#[repr(align(128))]
struct Queue {
    /// `(key, seq)` of completed records, oldest first. An element whose `seq` no longer
    /// matches the map (the record expired, or its key was taken over) is stale and skipped.
    elements: Mutex<VecDeque<(KeyId, u64)>>,
    /// The `seq` at the front, or [`EMPTY`].
    front: AtomicU64,
}

impl Queues {
    /// Queues for a machine with `cores` cores: four per core, a power of two, at most 64
    /// (an eviction reads every queue's front).
    pub(super) fn new(cores: usize) -> Self {
        let count = (cores.max(1) * 4).next_power_of_two().min(64);
        let queues = (0..count).map(|_| Queue { elements: Mutex::default(), front: AtomicU64::new(EMPTY) }).collect();
        Self { queues, seq: Padded(AtomicU64::new(0)) }
    }

    /// The sequence number of the next completed record.
    pub(super) fn next_seq(&self) -> u64 {
        self.seq.0.fetch_add(1, Ordering::Relaxed)
    }

    fn queue_of(&self, key: &KeyId) -> &Queue {
        // The map shards by the first half of the id; the second is independent of it.
        &self.queues[key.0[1] as usize & (self.queues.len() - 1)]
    }

    /// Queues the record `seq` of `key`, completed now.
    pub(super) fn push(&self, key: KeyId, seq: u64) {
        let queue = self.queue_of(&key);
        let mut elements = queue.lock();
        if elements.is_empty() {
            queue.front.store(seq, Ordering::Release);
        }
        elements.push_back((key, seq));
    }

    /// Takes the oldest queued record (possibly a stale one): `None` once every queue is empty.
    pub(super) fn pop_oldest(&self) -> Option<(KeyId, u64)> {
        loop {
            let (oldest, front) = self
                .queues
                .iter()
                .map(|queue| (queue, queue.front.load(Ordering::Acquire)))
                .min_by_key(|&(_, front)| front)?;
            if front == EMPTY {
                return None;
            }
            let mut elements = oldest.lock();
            // Another eviction may have taken it meanwhile: look again.
            let Some(popped) = elements.pop_front() else {
                oldest.front.store(EMPTY, Ordering::Release);
                continue;
            };
            oldest.front.store(elements.front().map_or(EMPTY, |&(_, seq)| seq), Ordering::Release);
            return Some(popped);
        }
    }

    /// Drops the elements `stale` accepts from the front of every queue, up to the first it
    /// does not: cheap (records expire roughly in completion order, so their elements gather
    /// at the fronts), and it keeps them off the path of the next eviction.
    pub(super) fn drop_stale_fronts(&self, mut stale: impl FnMut(&KeyId, u64) -> bool) {
        for queue in &self.queues {
            let mut elements = queue.lock();
            let before = elements.len();
            while elements.front().is_some_and(|(key, seq)| stale(key, *seq)) {
                elements.pop_front();
            }
            if elements.len() != before {
                queue.front.store(elements.front().map_or(EMPTY, |&(_, seq)| seq), Ordering::Release);
            }
        }
    }

    /// Keeps only the elements `keep` accepts, in every queue.
    pub(super) fn retain(&self, mut keep: impl FnMut(&KeyId, u64) -> bool) {
        for queue in &self.queues {
            let mut elements = queue.lock();
            elements.retain(|(key, seq)| keep(key, *seq));
            queue.front.store(elements.front().map_or(EMPTY, |&(_, seq)| seq), Ordering::Release);
        }
    }

    /// Queued elements over all queues, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.queues.iter().map(|queue| queue.lock().len()).sum()
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(KeyId, u64)>> {
        self.elements.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_record_leaves_first_across_queues() {
        let queues = Queues::new(2);
        // Keys spread over every queue, completed in order.
        let keys: Vec<KeyId> = (0..100u64).map(|n| KeyId([n, n.wrapping_mul(0x9e37_79b9_7f4a_7c15)])).collect();
        for key in &keys {
            queues.push(*key, queues.next_seq());
        }
        let popped: Vec<u64> = std::iter::from_fn(|| queues.pop_oldest().map(|(_, seq)| seq)).collect();
        assert_eq!(popped, (0..100).collect::<Vec<_>>());
        assert_eq!(queues.len(), 0);
    }

    #[test]
    fn retain_keeps_the_fronts_right() {
        let queues = Queues::new(1);
        for n in 0..20u64 {
            queues.push(KeyId([n, n]), queues.next_seq());
        }
        queues.retain(|_, seq| seq % 2 == 1);
        let popped: Vec<u64> = std::iter::from_fn(|| queues.pop_oldest().map(|(_, seq)| seq)).collect();
        assert_eq!(popped, (0..20).filter(|s| s % 2 == 1).collect::<Vec<_>>());
    }
}

//! Exponential backoff with full jitter, as a pure, seedable iterator.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

/// Exponential backoff with "full jitter": the delay before retry `n` (counting from 0) is
/// drawn uniformly from `[0, min(max_delay, base * 2^n)]`.
///
/// Full jitter spreads the retries of many clients that failed together (a server restart, a
/// load spike) over the whole window instead of sending them back in synchronised waves; see
/// "Exponential Backoff And Jitter" on the AWS Architecture Blog. The window, its
/// [`ceiling`](Self::ceiling), doubles on every retry until it reaches `max_delay`.
///
/// `ExponentialBackoff` is only the configuration; [`delays`](Self::delays) turns it into an
/// iterator that is a pure function of the seed, so tests can pin the exact delays.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::client::ExponentialBackoff;
///
/// let backoff = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
/// assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
/// assert_eq!(backoff.ceiling(4), Duration::from_secs(1));
///
/// let delays: Vec<Duration> = backoff.delays(7).take(5).collect();
/// assert_eq!(delays, backoff.delays(7).take(5).collect::<Vec<_>>()); // same seed, same delays
/// for (n, delay) in delays.iter().enumerate() {
///     assert!(*delay <= backoff.ceiling(n as u32));
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExponentialBackoff {
    base: Duration,
    max_delay: Duration,
}

impl ExponentialBackoff {
    /// A backoff whose first window is `base` and whose windows never exceed `max_delay`.
    ///
    /// A `base` above `max_delay` is allowed: every window is then `max_delay`.
    #[must_use]
    pub const fn new(base: Duration, max_delay: Duration) -> Self {
        Self { base, max_delay }
    }

    /// The first window (default: 100 ms).
    #[must_use]
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The largest window (default: 10 s).
    #[must_use]
    pub const fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The longest delay before retry `retry` (0 for the first retry): `min(max_delay,
    /// base * 2^retry)`, without overflow for any `retry`.
    #[must_use]
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.max_delay, |window| window.min(self.max_delay))
    }

    /// The delays before each retry, drawn from a generator seeded with `seed`: the same seed
    /// always gives the same sequence. The iterator never ends; bound it with the policy's
    /// attempts (or [`Iterator::take`]).
    pub fn delays(&self, seed: u64) -> Delays {
        Delays { backoff: *self, retry: 0, rng: SplitMix64::new(seed) }
    }
}

impl Default for ExponentialBackoff {
    /// 100 ms, doubling, at most 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// The delays of an [`ExponentialBackoff`], made by [`ExponentialBackoff::delays`].
#[derive(Clone, Debug)]
pub struct Delays {
    backoff: ExponentialBackoff,
    retry: u32,
    rng: SplitMix64,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let ceiling = self.backoff.ceiling(self.retry);
        self.retry = self.retry.saturating_add(1);
        Some(self.rng.duration_up_to(ceiling))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit generator in a few lines, good enough
/// for spreading retries and reproducible from a seed.
///
/// Jitter needs neither cryptographic strength nor a long period, only a uniform spread and a
/// seed for tests; a hand-written generator gives that without adding the `rand` crate (and its
/// version churn) to every client's dependency tree for ten lines of arithmetic.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration drawn uniformly from `[0, max]`, at nanosecond resolution.
    fn duration_up_to(&mut self, max: Duration) -> Duration {
        let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let span = u128::from(max_nanos) + 1;
        // Lemire's multiply-shift: maps 64 random bits onto `[0, span)` without a division;
        // its bias is below span / 2^64, far under a nanosecond for any real delay.
        let nanos = (u128::from(self.next_u64()) * span) >> 64;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(max_nanos))
    }
}

/// A seed no other call in this process gets: a process-wide random base (from the OS, through
/// `uuid`'s generator) mixed with a counter.
///
/// Used for every logical request of a policy that was not given a seed, so clones of one
/// policy (one per connection or task) still jitter independently.
pub(crate) fn fresh_seed() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        high ^ low
    });
    SplitMix64::new(base ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_up_to_the_max() {
        let backoff = ExponentialBackoff::new(100 * MS, 3000 * MS);
        let ceilings: Vec<_> = (0..8).map(|n| backoff.ceiling(n)).collect();
        assert_eq!(ceilings, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS, 3000 * MS, 3000 * MS, 3000 * MS]);
        // No overflow, however many retries.
        assert_eq!(backoff.ceiling(64), 3000 * MS);
        assert_eq!(backoff.ceiling(u32::MAX), 3000 * MS);
        let huge = ExponentialBackoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.ceiling(5), Duration::MAX);
        // A base above the max is capped from the start.
        assert_eq!(ExponentialBackoff::new(5 * MS, 2 * MS).ceiling(0), 2 * MS);
    }

    #[test]
    fn same_seed_same_delays_other_seed_other_delays() {
        let backoff = ExponentialBackoff::default();
        let a: Vec<_> = backoff.delays(42).take(10).collect();
        assert_eq!(a, backoff.delays(42).take(10).collect::<Vec<_>>());
        assert_ne!(a, backoff.delays(43).take(10).collect::<Vec<_>>());
    }

    #[test]
    fn every_delay_is_within_its_window() {
        let backoff = ExponentialBackoff::new(50 * MS, 2000 * MS);
        for seed in 0..500 {
            for (n, delay) in backoff.delays(seed).take(12).enumerate() {
                assert!(delay <= backoff.ceiling(n as u32), "seed {seed}, retry {n}: {delay:?}");
            }
        }
    }

    /// Full jitter: over many seeds, the delays of one retry fill the whole window `[0,
    /// ceiling]` (not only its top, as "equal jitter" would), with a mean near half the ceiling,
    /// and the mean grows with the window.
    #[test]
    fn jitter_spreads_over_the_whole_window() {
        let backoff = ExponentialBackoff::new(100 * MS, 10_000 * MS);
        let mut previous_mean = Duration::ZERO;
        for retry in 0..6 {
            let ceiling = backoff.ceiling(retry);
            let draws: Vec<Duration> =
                (0..2000u64).map(|seed| backoff.delays(seed).nth(retry as usize).unwrap()).collect();
            let min = *draws.iter().min().unwrap();
            let max = *draws.iter().max().unwrap();
            let mean = draws.iter().sum::<Duration>() / 2000;
            assert!(min < ceiling / 50, "retry {retry}: min {min:?}");
            assert!(max > ceiling * 49 / 50, "retry {retry}: max {max:?}");
            assert!(mean > ceiling * 45 / 100 && mean < ceiling * 55 / 100, "retry {retry}: mean {mean:?}");
            assert!(mean > previous_mean);
            previous_mean = mean;
        }
    }

    #[test]
    fn zero_base_means_no_delay() {
        let backoff = ExponentialBackoff::new(Duration::ZERO, Duration::from_secs(1));
        assert!(backoff.delays(1).take(20).all(|d| d.is_zero()));
    }

    #[test]
    fn splitmix_matches_the_reference_output() {
        // First outputs of the reference implementation for seed 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        let expected = [6_457_827_717_110_365_317, 3_203_168_211_198_807_973, 9_817_491_932_198_370_423];
        for value in expected {
            assert_eq!(rng.next_u64(), value);
        }
    }

    #[test]
    fn fresh_seeds_differ() {
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|_| fresh_seed()).collect();
        assert_eq!(seeds.len(), 1000);
    }
}

//! The retry delay of the node's watches: short, capped at a few seconds, and reset by any
//! sign that the API server is answering again.
//!
//! kube-runtime's `default_backoff()` grows to 30 s (×1–2 jitter) and resets only on a
//! delivered object, so after an outage a quiet but healthy watch keeps the long delay and the
//! next 410 Gone sleeps it before relisting: verdicts stayed stale for 47–89 s. The node agent
//! guards a security boundary, so it retries every few seconds at most; with one request per
//! retry per node that is still far below what an API server's priority-and-fairness limits
//! (and a 429 is answered by the same delay).

use std::{
    hash::{BuildHasher as _, Hasher as _},
    time::Duration,
};

/// First delay after a failure.
pub const INITIAL: Duration = Duration::from_millis(200);
/// Longest delay: the staleness bound of a watch whose API server keeps failing.
pub const MAX: Duration = Duration::from_secs(4);
/// Each delay is up to this fraction longer than the nominal one, so that the agents of a
/// whole cluster do not reconnect in lock-step after an outage.
const JITTER: f64 = 0.25;

/// Exponential backoff (×2 per failure) from [`INITIAL`] to [`MAX`], with jitter.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: INITIAL }
    }
}

impl WatchBackoff {
    /// The delay before the next attempt; the one after will be twice as long, up to [`MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.next = (nominal * 2).min(MAX);
        nominal.mul_f64(1.0 + JITTER * unit_random())
    }

    /// The API server answered: the next failure starts again at [`INITIAL`].
    pub fn reset(&mut self) {
        self.next = INITIAL;
    }
}

/// A number in [0, 1). Jitter needs no strong randomness: std's randomly keyed SipHash of
/// nothing gives a different value per call (each `RandomState` gets fresh keys).
pub fn unit_random() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(d: Duration, nominal: Duration) -> bool {
        d >= nominal && d <= nominal.mul_f64(1.0 + JITTER)
    }

    #[test]
    fn grows_to_a_cap_of_a_few_seconds() {
        let mut b = WatchBackoff::default();
        let expected = [200, 400, 800, 1600, 3200, 4000, 4000, 4000];
        for ms in expected {
            let d = b.next_delay();
            assert!(
                within(d, Duration::from_millis(ms)),
                "{d:?} not in [{ms} ms, +25%]"
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = WatchBackoff::default();
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(within(b.next_delay(), INITIAL));
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let samples: Vec<f64> = (0..200).map(|_| unit_random()).collect();
        assert!(samples.iter().all(|x| (0.0..1.0).contains(x)));
        let distinct: std::collections::BTreeSet<u64> =
            samples.iter().map(|x| (x * 1e6) as u64).collect();
        assert!(distinct.len() > 150, "jitter is not random: {distinct:?}");
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((0.3..0.7).contains(&mean), "mean {mean}");
    }
}

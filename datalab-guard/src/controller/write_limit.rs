//! The controller's client-side write limit (`controller.writesPerSecond`,
//! `controller.writeBurst`): one token bucket shared by every write the controller makes to
//! the API server — NetworkPolicy applies and deletions, Pod Security label applies,
//! namespace Events — so that provisioning ten thousand new environments is a steady stream
//! the API server (and its priority-and-fairness budget) can take, not a storm. Lease
//! renewals do not go through it: leadership must never wait behind a provisioning wave.
//!
//! Callers reserve a slot and sleep until it comes, so concurrent writers queue in order and
//! the long-run rate never exceeds the limit, whatever the burst.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::ControllerConfig;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct WriteLimiter {
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    /// May go negative: slots already promised to waiting writers.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }
}

impl WriteLimiter {
    /// A full bucket for `config`.
    pub fn new(config: &ControllerConfig) -> WriteLimiter {
        let burst = f64::from(config.write_burst.max(1));
        WriteLimiter {
            bucket: Mutex::new(Bucket {
                rate: f64::from(config.writes_per_second.max(1)),
                burst,
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Follows a reloaded config; writes already waiting keep their slots.
    pub fn set(&self, config: &ControllerConfig) {
        let mut b = self.bucket.lock().expect("write limiter lock");
        b.refill(Instant::now());
        b.rate = f64::from(config.writes_per_second.max(1));
        b.burst = f64::from(config.write_burst.max(1));
        b.tokens = b.tokens.min(b.burst);
    }

    /// Waits until one more write may go.
    pub async fn acquire(&self) {
        let wait = self.reserve(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token at `now`; returns how long the caller must wait before writing.
    fn reserve(&self, now: Instant) -> Duration {
        let mut b = self.bucket.lock().expect("write limiter lock");
        b.refill(now);
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / b.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, burst: u32) -> WriteLimiter {
        WriteLimiter::new(&ControllerConfig {
            writes_per_second: rate,
            write_burst: burst,
        })
    }

    #[test]
    fn a_burst_goes_at_once_then_writes_are_spaced_by_the_rate() {
        let l = limiter(50, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.reserve(t0), Duration::ZERO);
        }
        // The 11th waits one interval (20 ms), the 12th two: slots are handed out in order.
        let w11 = l.reserve(t0);
        let w12 = l.reserve(t0);
        assert!((w11.as_secs_f64() - 0.020).abs() < 1e-6, "{w11:?}");
        assert!((w12.as_secs_f64() - 0.040).abs() < 1e-6, "{w12:?}");
    }

    #[test]
    fn the_long_run_rate_is_the_limit() {
        let l = limiter(50, 50);
        let t0 = Instant::now();
        // 1050 writes asked for at once: the last may go after (1050 - 50) / 50 = 20 s.
        let last = (0..1050).map(|_| l.reserve(t0)).last().unwrap();
        assert!((last.as_secs_f64() - 20.0).abs() < 1e-6, "{last:?}");
    }

    #[test]
    fn a_quiet_spell_saves_up_at_most_the_burst() {
        let l = limiter(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            l.reserve(t0);
        }
        let later = t0 + Duration::from_secs(60);
        let free = (0..20)
            .take_while(|_| l.reserve(later) == Duration::ZERO)
            .count();
        assert_eq!(free, 5);
    }

    #[test]
    fn a_reload_changes_the_rate() {
        let l = limiter(1, 1);
        let t0 = Instant::now();
        l.reserve(t0);
        l.set(&ControllerConfig {
            writes_per_second: 100,
            write_burst: 1,
        });
        let w = l.reserve(Instant::now());
        assert!(w <= Duration::from_millis(10), "{w:?}");
    }
}

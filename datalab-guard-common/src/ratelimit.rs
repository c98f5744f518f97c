//! The audit rate limit: per cgroup, at most `events_per_window` audit events per window of
//! `window_ms`; further attempts in the window are counted as suppressed, and the count is
//! reported (and reset) with the next event that goes out.
//!
//! A pure decision over a [`RateState`], so the kernel (which keeps the state in the RATE
//! map) and the host tests run the same code. Only events are limited: the counters are
//! bumped before this decision and stay exact.

use crate::{GuardConfig, RateState};

/// What to do with one audit event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send it, carrying the number of events of this cgroup suppressed since the last one
    /// sent.
    Emit { suppressed_before: u32 },
    /// Drop it (and count it as suppressed).
    Suppress,
}

/// The state of a cgroup seen for the first time at `now_ns`, before its first decision.
#[inline(always)]
pub const fn fresh(now_ns: u64) -> RateState {
    RateState {
        window_start_ns: now_ns,
        emitted: 0,
        suppressed: 0,
    }
}

/// Decides one event at `now_ns` (CLOCK_BOOTTIME) and updates `state`. A window that has
/// run out starts a new one at `now_ns`; `window_ms` 0 makes every event start a new window
/// (no limit), `events_per_window` 0 suppresses every event.
#[inline(always)]
pub fn admit(cfg: &GuardConfig, state: &mut RateState, now_ns: u64) -> Admission {
    let window_ns = u64::from(cfg.window_ms) * 1_000_000;
    if now_ns.wrapping_sub(state.window_start_ns) >= window_ns {
        state.window_start_ns = now_ns;
        state.emitted = 0;
    }
    if state.emitted < cfg.events_per_window {
        state.emitted += 1;
        let suppressed_before = state.suppressed;
        state.suppressed = 0;
        Admission::Emit { suppressed_before }
    } else {
        state.suppressed = state.suppressed.saturating_add(1);
        Admission::Suppress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cfg(events_per_window: u32, window_ms: u32) -> GuardConfig {
        let mut c = GuardConfig::zeroed();
        c.events_per_window = events_per_window;
        c.window_ms = window_ms;
        c
    }

    /// Decides `n` events at `at_ns` and returns (emitted, suppressed, what the emitted ones
    /// carried as `suppressed_before`).
    fn burst(c: &GuardConfig, s: &mut RateState, n: u32, at_ns: u64) -> (u32, u32, u32) {
        let (mut emitted, mut suppressed, mut carried) = (0, 0, 0);
        for _ in 0..n {
            match admit(c, s, at_ns) {
                Admission::Emit { suppressed_before } => {
                    emitted += 1;
                    carried += suppressed_before;
                }
                Admission::Suppress => suppressed += 1,
            }
        }
        (emitted, suppressed, carried)
    }

    #[test]
    fn within_one_window_the_limit_holds_and_the_rest_is_counted() {
        let c = cfg(2, 1000);
        let mut s = fresh(5 * MS);
        assert_eq!(burst(&c, &mut s, 10, 5 * MS + 999 * MS - 1), (2, 8, 0));
        assert_eq!(s.suppressed, 8);
        assert_eq!(s.emitted, 2);
        assert_eq!(s.window_start_ns, 5 * MS);
    }

    #[test]
    fn the_window_rolls_over_and_the_next_event_carries_the_suppressed_count() {
        let c = cfg(2, 1000);
        let mut s = fresh(0);
        assert_eq!(burst(&c, &mut s, 5, 10 * MS), (2, 3, 0));
        // One nanosecond before the window ends: still suppressed.
        assert_eq!(admit(&c, &mut s, 1000 * MS - 1), Admission::Suppress);
        // At the end of the window a new one starts; the first event reports the four.
        assert_eq!(
            admit(&c, &mut s, 1000 * MS),
            Admission::Emit {
                suppressed_before: 4
            }
        );
        assert_eq!(s.window_start_ns, 1000 * MS);
        assert_eq!(
            admit(&c, &mut s, 1000 * MS + 1),
            Admission::Emit {
                suppressed_before: 0
            }
        );
        assert_eq!(admit(&c, &mut s, 1000 * MS + 2), Admission::Suppress);
        // A long quiet spell: one rollover, however many windows passed.
        assert_eq!(
            admit(&c, &mut s, 50_000 * MS),
            Admission::Emit {
                suppressed_before: 1
            }
        );
        assert_eq!(s.window_start_ns, 50_000 * MS);
    }

    #[test]
    fn zero_events_per_window_suppresses_everything() {
        let c = cfg(0, 1000);
        let mut s = fresh(0);
        assert_eq!(burst(&c, &mut s, 3, 0), (0, 3, 0));
        assert_eq!(burst(&c, &mut s, 3, 5000 * MS), (0, 3, 0));
        assert_eq!(s.suppressed, 6);
    }

    #[test]
    fn zero_window_means_no_limit() {
        let c = cfg(1, 0);
        let mut s = fresh(7);
        assert_eq!(burst(&c, &mut s, 100, 7), (100, 0, 0));
    }

    #[test]
    fn the_suppressed_count_saturates_instead_of_wrapping() {
        let c = cfg(1, 1000);
        let mut s = RateState {
            window_start_ns: 0,
            emitted: 1,
            suppressed: u32::MAX - 1,
        };
        assert_eq!(burst(&c, &mut s, 3, 1), (0, 3, 0));
        assert_eq!(s.suppressed, u32::MAX);
        assert_eq!(
            admit(&c, &mut s, 1000 * MS),
            Admission::Emit {
                suppressed_before: u32::MAX
            }
        );
    }
}

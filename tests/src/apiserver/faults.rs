//! Faults injected at runtime: failed requests and latency. (Closing and stalling watches,
//! going down or dark, restarts and compaction act on the server and the store; see
//! [`super::FakeApiServer`].)

use std::time::Duration;

use super::throttle::Throttle;

#[derive(Debug, Default)]
pub(crate) struct Faults {
    fail_remaining: u32,
    fail_status: u16,
    pub latency: Duration,
    pub throttle: Option<Throttle>,
}

impl Faults {
    /// The next `n` requests, whatever they are, get `status` and a Status body.
    pub fn fail_next(&mut self, n: u32, status: u16) {
        self.fail_remaining = n;
        self.fail_status = status;
    }

    /// The status to fail this request with, if failures are pending.
    pub fn take_failure(&mut self) -> Option<u16> {
        if self.fail_remaining == 0 {
            return None;
        }
        self.fail_remaining -= 1;
        Some(self.fail_status)
    }

    /// The Retry-After (seconds) of a 429 for a request of `verb`, while throttled.
    pub fn throttled(&self, verb: &str) -> Option<u32> {
        self.throttle.as_ref()?.refuses(verb)
    }
}

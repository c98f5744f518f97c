//! What the API server says about retrying, read from its error Status: how long to wait
//! (`Retry-After`, carried as `details.retryAfterSeconds` on a 429 from API Priority and
//! Fairness and on 5xx timeouts), and whether a resourceVersion is ahead of the server's
//! watch cache (504 "Too large resource version": only a fresh list helps, as client-go's
//! reflector does).
//!
//! A client that retries sooner than Retry-After makes an overloaded API server worse: every
//! agent of a cluster would hammer it in its own backoff rhythm. The wait is bounded so that
//! a server asking for minutes cannot freeze the agent's view for that long.

use std::time::Duration;

use kube::core::Status;

/// Longest Retry-After honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The delay the server asked for in `status` (bounded by [`MAX_RETRY_AFTER`]), if any.
pub fn asked_delay(status: &Status) -> Option<Duration> {
    let secs = status.details.as_ref()?.retry_after_seconds;
    (secs > 0).then(|| Duration::from_secs(u64::from(secs)).min(MAX_RETRY_AFTER))
}

/// The delay before retrying after `error`: our own `backoff`, or longer if the server asked.
pub fn delay_after(error: &kube::Error, backoff: Duration) -> Duration {
    match error {
        kube::Error::Api(status) => asked_delay(status).map_or(backoff, |d| d.max(backoff)),
        _ => backoff,
    }
}

/// 504 "Too large resource version": the server (or its watch cache) has not reached the
/// resourceVersion asked for; a list without one (a consistent read) resynchronises.
pub fn is_too_large_resource_version(status: &Status) -> bool {
    let by_cause = status.details.as_ref().is_some_and(|d| {
        d.causes
            .iter()
            .any(|c| c.reason == "ResourceVersionTooLarge")
    });
    by_cause || status.message.contains("Too large resource version")
}

#[cfg(test)]
mod tests {
    use kube::core::response::{StatusCause, StatusDetails};

    use super::*;

    fn status(code: u16, retry_after: u32, cause: &str) -> Status {
        let mut s = Status::failure("m", "r").with_code(code);
        s.details = Some(StatusDetails {
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            retry_after_seconds: retry_after,
            causes: vec![StatusCause {
                reason: cause.into(),
                message: String::new(),
                field: String::new(),
            }],
        });
        s
    }

    #[test]
    fn retry_after_is_honoured_and_bounded() {
        let backoff = Duration::from_millis(200);
        let e = |secs| kube::Error::Api(Box::new(status(429, secs, "")));
        assert_eq!(delay_after(&e(3), backoff), Duration::from_secs(3));
        assert_eq!(delay_after(&e(0), backoff), backoff);
        assert_eq!(delay_after(&e(3600), backoff), MAX_RETRY_AFTER);
        // Our own backoff, when longer, wins.
        assert_eq!(
            delay_after(&e(1), Duration::from_secs(4)),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn too_large_resource_version_is_recognised() {
        assert!(is_too_large_resource_version(&status(
            504,
            1,
            "ResourceVersionTooLarge"
        )));
        let plain = Status::failure("Too large resource version: 9, current: 7", "Timeout");
        assert!(is_too_large_resource_version(&plain));
        assert!(!is_too_large_resource_version(&status(504, 1, "")));
    }
}

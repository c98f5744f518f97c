//! API Priority and Fairness as a client meets it: for a while, requests of some verbs get
//! `429 Too Many Requests` with a `Retry-After` header and the same number of seconds in the
//! Status's `details.retryAfterSeconds`, exactly as the real API server rejects a flow whose
//! queue is full. A client that honours it sends about one request per Retry-After; one that
//! does not hammers the server, which the request log shows.

use std::time::{Duration, Instant};

use serde_json::json;

use super::status::ApiError;

/// One throttling window.
#[derive(Clone, Debug)]
pub(crate) struct Throttle {
    verbs: Vec<String>,
    retry_after_secs: u32,
    until: Instant,
}

impl Throttle {
    /// Requests whose verb is in `verbs` (get, list, watch, create, update, patch, ...) get a
    /// 429 with `Retry-After: retry_after` (whole seconds, at least 1) for `window`.
    pub fn new(verbs: &[&str], retry_after: Duration, window: Duration) -> Throttle {
        Throttle {
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
            retry_after_secs: u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX),
            until: Instant::now() + window,
        }
    }

    /// The Retry-After (seconds) to refuse a request of `verb` with now, if it is throttled.
    pub fn refuses(&self, verb: &str) -> Option<u32> {
        (Instant::now() < self.until && self.verbs.iter().any(|v| v == verb))
            .then_some(self.retry_after_secs)
    }
}

/// The real API server's 429 body (`apierrors.NewTooManyRequests`).
pub(crate) fn too_many_requests(retry_after_secs: u32) -> ApiError {
    ApiError {
        details: Some(json!({"retryAfterSeconds": retry_after_secs})),
        ..ApiError::new(429, "Too many requests, please try again later.")
    }
}

/// The 429 response: the Status above and the `Retry-After` header.
pub(crate) fn response(retry_after_secs: u32) -> http::Response<super::Body> {
    let mut resp = super::server::error_response(&too_many_requests(retry_after_secs));
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_secs),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_its_verbs_and_only_within_the_window() {
        let t = Throttle::new(
            &["list", "watch"],
            Duration::from_secs(3),
            Duration::from_millis(200),
        );
        assert_eq!(t.refuses("list"), Some(3));
        assert_eq!(t.refuses("watch"), Some(3));
        assert_eq!(t.refuses("patch"), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.refuses("list"), None);
        let e = too_many_requests(3).to_status();
        assert_eq!(e["reason"], "TooManyRequests");
        assert_eq!(e["code"], 429);
        assert_eq!(e["details"]["retryAfterSeconds"], 3);
    }
}

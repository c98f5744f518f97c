//! The watch cache's view of time: what a real API server serves from its cache may be
//! older than etcd, and a resourceVersion the cache has not reached is waited for, then
//! refused.
//!
//! - [`super::FakeApiServer::lag_watch_cache`] freezes the cache at the current
//!   resourceVersion: writes still happen (and a list without `resourceVersion`, a
//!   consistent read, sees them), but a list with `resourceVersion=0` (or any version the
//!   cache has reached, `NotOlderThan`) is served from the stale cache state, and watches
//!   deliver nothing past it. [`super::FakeApiServer::catch_up_watch_cache`] lets the cache
//!   catch up: every watch then receives the changes it missed, in order.
//! - A list or watch from a resourceVersion the cache has not reached (newer than the server
//!   knows, or than a lagging cache) is held up to [`FRESH_WAIT`] for the cache to catch up,
//!   then answered `504` "Too large resource version" (reason `Timeout`, cause
//!   `ResourceVersionTooLarge`), as the real `waitUntilFreshAndBlock` does.
//! - `sendInitialEvents=true` without `resourceVersionMatch=NotOlderThan` is refused (422
//!   Invalid, like `ValidateListOptions`).

use std::{sync::Arc, time::Duration};

use super::{lock, status::ApiError, Shared};

/// How long a request from a resourceVersion the cache has not reached is held (the real
/// API server's value).
pub const FRESH_WAIT: Duration = Duration::from_secs(3);

/// The newest resourceVersion the watch cache has seen, given the store's.
pub(crate) fn cache_rv(frozen_at: Option<u64>, store_rv: u64) -> u64 {
    frozen_at.map_or(store_rv, |f| f.min(store_rv))
}

/// The watch cache's resourceVersion now.
pub(crate) fn current(shared: &Shared) -> u64 {
    let frozen = lock(&shared.settings).cache_frozen_at;
    cache_rv(frozen, lock(&shared.store).rv())
}

/// For a list or watch from resourceVersion `requested` (unparsable or absent: nothing to
/// wait for), waits until the cache has reached it, at most [`FRESH_WAIT`].
pub(crate) async fn wait_until_fresh(
    shared: &Arc<Shared>,
    requested: Option<&str>,
) -> Result<(), ApiError> {
    let Some(rv) = requested
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&rv| rv > 0)
    else {
        return Ok(());
    };
    let mut changed = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + FRESH_WAIT;
    loop {
        let have = current(shared);
        if rv <= have {
            return Ok(());
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Err(ApiError::too_large(rv, have)) },
            () = tokio::time::sleep_until(deadline) => return Err(ApiError::too_large(rv, have)),
        }
    }
}

/// `sendInitialEvents` is only valid with `resourceVersionMatch=NotOlderThan`.
pub(crate) fn check_send_initial_events(
    kind: super::Kind,
    send_initial_events: bool,
    resource_version_match: Option<&str>,
) -> Result<(), ApiError> {
    if send_initial_events && resource_version_match != Some("NotOlderThan") {
        return Err(ApiError::invalid(
            kind,
            "",
            "resourceVersionMatch",
            "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_cache_never_runs_ahead_of_the_store() {
        assert_eq!(cache_rv(None, 10), 10);
        assert_eq!(cache_rv(Some(7), 10), 7);
        assert_eq!(cache_rv(Some(12), 10), 10);
    }

    #[test]
    fn initial_events_need_not_older_than() {
        let k = super::super::Kind::Pod;
        assert!(check_send_initial_events(k, true, None).is_err());
        assert!(check_send_initial_events(k, true, Some("Exact")).is_err());
        assert!(check_send_initial_events(k, true, Some("NotOlderThan")).is_ok());
        assert!(check_send_initial_events(k, false, None).is_ok());
        let e = check_send_initial_events(k, true, None).unwrap_err();
        assert_eq!(e.code, 422);
    }
}

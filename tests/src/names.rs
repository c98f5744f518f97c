//! Unique names for everything the kit creates, and removal of stale leftovers.
//!
//! Names are `<prefix>-<pid>-<counter>`: the pid keeps parallel test *processes* apart, the
//! counter parallel tests *within* one process. Because the owning pid is in the name, a
//! later run can tell a leftover of a crashed run (its pid is gone) from a live neighbour's
//! resource (its pid is alive) and remove only the former: see [`cleanup_stale`].

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;

/// The prefix the kit uses unless told otherwise.
pub const DEFAULT_PREFIX: &str = "dgkit";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh `<prefix>-<pid>-<counter>` name, unique on this machine while this process lives.
pub fn unique_name(prefix: &str) -> String {
    assert!(
        !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "name prefix must be non-empty ASCII alphanumerics or '_' (got {prefix:?})"
    );
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The pid that owns `name` if it was made by [`unique_name`] with `prefix`.
pub fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, rest) = rest.split_once('-')?;
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if digits_end == 0 {
        return None;
    }
    pid.parse().ok()
}

/// True if a process with this pid exists (a reused pid counts as alive: we err on the side
/// of leaving a resource in place).
pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// True if `name` was made with `prefix` by a process that no longer exists.
pub fn is_stale(name: &str, prefix: &str) -> bool {
    matches!(owner_pid(name, prefix), Some(pid) if pid != std::process::id() && !pid_alive(pid))
}

/// Removes leftovers of earlier, crashed runs that used `prefix`: network namespaces,
/// top-level test cgroups and bpffs directories whose owning process is gone. Resources of
/// live processes (parallel test binaries) are left alone. Returns how many were removed.
pub fn cleanup_stale(prefix: &str) -> Result<usize> {
    let mut removed = crate::lab::cleanup_stale_netns(prefix)?;
    removed += crate::cgroup::cleanup_stale_cgroups(prefix)?;
    removed += crate::bpffs::cleanup_stale_bpffs(prefix)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_parse_back() {
        let a = unique_name("dgx");
        let b = unique_name("dgx");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a, "dgx"), Some(std::process::id()));
        assert_eq!(
            owner_pid(&format!("{a}-tenant"), "dgx"),
            Some(std::process::id())
        );
        assert!(!is_stale(&a, "dgx"));
    }

    #[test]
    fn owner_pid_rejects_foreign_names() {
        assert_eq!(owner_pid("dgx-12-3", "dgx"), Some(12));
        assert_eq!(owner_pid("dgxy-12-3", "dgx"), None);
        assert_eq!(owner_pid("dgx-12", "dgx"), None);
        assert_eq!(owner_pid("dgx-ab-3", "dgx"), None);
        assert_eq!(owner_pid("dgx-12-", "dgx"), None);
        assert_eq!(owner_pid("other", "dgx"), None);
    }

    #[test]
    fn dead_owner_is_stale() {
        // pid_max is at most 2^22 on Linux, so this pid cannot exist.
        assert!(is_stale("dgx-99999999-0", "dgx"));
        assert!(!is_stale("dgx-1-0", "dgx"), "pid 1 is always alive");
    }

    #[test]
    #[should_panic(expected = "prefix")]
    fn bad_prefix_panics() {
        unique_name("a-b");
    }
}

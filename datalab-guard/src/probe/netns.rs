//! Finding and entering network namespaces for the probe: the dedicated thread that alone
//! calls `setns` ([`on_netns_thread`]), a pod's namespace from a process in its cgroup
//! ([`netns_of_cgroup`]), and the runtime's named namespaces with their addresses
//! ([`netns_addresses`]).
//!
//! # Entering a network namespace
//! `setns(CLONE_NEWNET)` changes only the calling thread. Only a short-lived OS thread
//! spawned by [`on_netns_thread`] ever calls it (through the [`NetnsThread`] handle, which
//! exists only on such a thread): tokio's worker and blocking-pool threads are reused for
//! other work and must keep the agent's namespace.
//!
//! # Privileges, and the DaemonSet's choice
//! - `setns(CLONE_NEWNET)` needs CAP_SYS_ADMIN (the runtime's default seccomp profile allows
//!   it with that capability). Without it the probe is useless: set `probe.enabled: false`
//!   and drop the capability (see deploy/README.md).
//! - A handle on each pod's network namespace. Two ways:
//!   - **The runtime's named namespaces** (containerd: `/run/netns/cni-<id>`, CRI-O:
//!     `/run/netns/<id>`), mounted read-only from the host (hostPath `/run/netns`,
//!     `mountPropagation: HostToContainer`, at `/host/run/netns`). A pod is mapped to its file
//!     by address: [`netns_addresses`] enters each namespace and lists its addresses, which
//!     are matched against the pod's `status.podIPs`. Needs nothing beyond CAP_SYS_ADMIN and
//!     exposes nothing but network namespace handles. Runtimes that do not name namespaces
//!     there (cri-dockerd) are not probed: their namespaces get no state.
//!   - **A process of the pod**: [`netns_of_cgroup`] reads `cgroup.procs` of the pod's
//!     cgroup and returns `/proc/<pid>/ns/net`. Works with every runtime, but the pids are
//!     host pids, so it needs `hostPID: true`, and opening another user's (or a more
//!     capable process's) namespace link needs CAP_SYS_PTRACE: together they expose every
//!     process on the node to the agent, far more than it needs.
//!
//!   **Decision: the DaemonSet uses the named namespaces** (`hostPID: false`, no
//!   SYS_PTRACE, `/run/netns` read-only), as deploy/base/daemonset.yaml already does.
//!   [`netns_of_cgroup`] stays for `hostPID` deployments and tests.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    net::IpAddr,
    path::{Path, PathBuf},
};

use nix::sched::CloneFlags;

/// Proof that the code holding it runs on a thread spawned by [`on_netns_thread`], the only
/// kind of thread allowed to change its network namespace. Neither `Send` nor `Sync`, so it
/// cannot leave that thread.
pub(crate) struct NetnsThread {
    _not_send: PhantomData<*const ()>,
}

impl NetnsThread {
    /// Moves this thread into the network namespace `netns` (an open namespace file).
    /// EINVAL if the file is not a network namespace, EPERM without CAP_SYS_ADMIN.
    #[expect(
        clippy::unused_self,
        reason = "the &self is the proof that the caller runs on a thread made for this"
    )]
    pub(crate) fn enter(&self, netns: &File) -> io::Result<()> {
        nix::sched::setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }
}

/// Runs `work` on a new OS thread named `name`, which may change its network namespace
/// through the [`NetnsThread`] it is given, and waits for it. The thread ends with `work`,
/// so no other code ever runs in the namespace it entered. A panic in `work` is an error.
pub(crate) fn on_netns_thread<T, F>(name: &str, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&NetnsThread) -> T + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            work(&NetnsThread {
                _not_send: PhantomData,
            })
        })?
        .join()
        .map_err(|_| io::Error::other(format!("the {name} thread panicked")))
}

/// `/proc/<pid>/ns/net` of the first process found in the cgroup subtree at `dir` (the
/// directory itself first, then its children, breadth first), or `None` when the subtree
/// has no process visible here. Needs `hostPID` (and CAP_SYS_PTRACE to use the link of
/// another user's process); see the module docs. The pid may exit (or, rarely, be reused)
/// before the path is opened: probe right away, and treat an error as inconclusive.
pub fn netns_of_cgroup(dir: &Path) -> Option<PathBuf> {
    let mut queue = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < queue.len() {
        let current = queue[i].clone();
        i += 1;
        if let Ok(text) = std::fs::read_to_string(current.join("cgroup.procs")) {
            // A pid outside our pid namespace reads as 0.
            for pid in text
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .filter(|p| *p != 0)
            {
                let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if path.exists() {
                    return Some(path);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&current) {
            let mut children: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            children.sort();
            queue.extend(children);
        }
    }
    None
}

/// Every network namespace file in `dir` (e.g. the host's `/run/netns`, mounted at
/// `/host/run/netns`) with the addresses configured in it (loopback left out), sorted by
/// path. Match a pod's `status.podIPs` against them to find its namespace. Entries that are
/// not network namespaces, or vanish while being read, are skipped. One helper thread enters
/// each namespace in turn; fails only when `dir` cannot be listed.
pub fn netns_addresses(dir: &Path) -> io::Result<Vec<(PathBuf, Vec<IpAddr>)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    on_netns_thread("dg-netns-scan", move |thread| {
        let mut out = Vec::new();
        for path in paths {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if thread.enter(&file).is_err() {
                continue;
            }
            if let Ok(addrs) = local_addresses() {
                out.push((path, addrs));
            }
        }
        out
    })
}

/// The addresses of the calling thread's network namespace, loopback excluded (getifaddrs
/// asks over a netlink socket made in the calling thread's namespace).
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        let Some(address) = interface.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_the_netns_thread_is_an_error() {
        let err = on_netns_thread("dg-test-panic", |_| -> () { panic!("boom") }).unwrap_err();
        assert!(err.to_string().contains("dg-test-panic"), "{err}");
        assert_eq!(on_netns_thread("dg-test-value", |_| 7).unwrap(), 7);
    }

    #[test]
    fn our_own_addresses_leave_loopback_out() {
        // The agent's own namespace: whatever it has, loopback is never listed, and no
        // address twice.
        let addrs = local_addresses().unwrap();
        assert!(addrs.iter().all(|ip| !ip.is_loopback()), "{addrs:?}");
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
    }

    #[test]
    fn a_missing_scan_directory_is_an_error() {
        assert!(netns_addresses(Path::new("/nonexistent-netns-dir")).is_err());
    }
}

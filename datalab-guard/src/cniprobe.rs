//! The CNI enforcement probe: does the CNI actually enforce the `allow-web-egress`
//! NetworkPolicy on this node? (DESIGN.md: "every node: CNI enforcement probe", the
//! `cni_enforcement{namespace, state}` metric.)
//!
//! # What is probed
//! Every `probe.interval` (plus up to `probe.jitter`, so that nodes do not probe in
//! lockstep) the agent:
//! 1. connects from its **control** network namespace — its own, [`SELF_NETNS`] — to every
//!    target (the blocked destinations that are single addresses, on `probe.port`: see
//!    [`targets_from_blocked`]). If none connects, nothing below can be judged and every
//!    namespace is [`CniState::Inconclusive`] (IMDS unreachable from pods anyway, e.g. an
//!    IMDSv2 hop limit of 1, or no metadata service at all);
//! 2. for each environment namespace with a running pod on this node, enters that pod's
//!    network namespace and connects to the same targets. Only targets the control reached
//!    count. Any of them connected: [`CniState::NotEnforced`] (the CNI ignores the policy;
//!    the eBPF guard is the only line). All timed out or refused (ECONNREFUSED from a
//!    REJECT, EHOSTUNREACH/ENETUNREACH/EACCES/EPERM from a policy): [`CniState::Enforced`].
//!    A local failure of the probe itself (netns gone, socket error): inconclusive.
//!    The rules are [`classify`], which is pure.
//!
//! The DaemonSet runs with `hostNetwork: false`, so the control namespace is the agent's own
//! *pod* network namespace: the same path to IMDS as a tenant pod's (pod interface → node →
//! metadata), minus the NetworkPolicy (the agent's namespace has none). That is a better
//! control than the host's namespace, whose path differs.
//!
//! A REJECT that answers with an ICMP error (rather than a TCP reset) is seen only when the
//! SYN is first retransmitted, after 1 s: the error to the first SYN comes back while
//! `connect` still holds the socket, where TCP keeps it as a soft error. With a timeout under
//! a second such a refusal shows as a timeout, which classifies the same (enforced).
//!
//! A connect is a TCP handshake only: non-blocking `connect`, `poll` until `probe.timeout`,
//! then the socket is closed at once. No byte of payload is sent. All targets of one namespace
//! are probed in parallel, so one namespace costs at most one timeout; up to
//! [`PARALLEL_NAMESPACES`] namespaces are probed at a time.
//!
//! # Entering a network namespace
//! [`probe_in_netns`] spawns a dedicated OS thread, which `setns(CLONE_NEWNET)`s into the
//! target namespace, makes its sockets there and exits. `setns` changes only the calling
//! thread, and only this short-lived thread ever calls it: tokio's worker and blocking-pool
//! threads are reused for other work and must keep the agent's namespace.
//!
//! # Why the guard does not see the probe as a tenant
//! The eBPF programs are attached at the pods' cgroup root (e.g. `kubepods.slice`), and the
//! agent's own pod lives below it — but its cgroup has an `Exempt` POLICY entry (the policy
//! core's own-pod rule). Changing the network namespace does not change the cgroup: on cgroup
//! v2 all threads of a process share the process's cgroup (unless moved into a threaded
//! subtree, which the agent never does). The connect hooks look at the calling task's
//! cgroup, and `cgroup_skb/egress` at the socket's, which is its creator's: both are the
//! agent's, so the guard passes the probe and what is measured is the CNI alone. Before the
//! agent has classified its own pod the default verdict (guard) applies: the control probe
//! then fails with EPERM and the round is inconclusive, never a false `not_enforced`.
//! The CNI, on the other hand, does see the probe as the pod's traffic: it leaves through the
//! pod's interface with the pod's address, which is what NetworkPolicy enforcement (iptables,
//! nftables or tc/eBPF on the pod's veth) keys on. A CNI that enforced egress policy by
//! socket cgroup instead would see the agent; none of the common ones does.
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
    collections::{hash_map::RandomState, BTreeMap, BTreeSet},
    fs::File,
    hash::{BuildHasher as _, Hasher as _},
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use datalab_guard_common::cidr::Cidr;
use futures::StreamExt as _;
use tokio::sync::watch;

use crate::{
    baseline_state::{CniState, NamespaceStates},
    config::ProbeConfig,
};

/// The agent's own network namespace: the control of every round.
pub const SELF_NETNS: &str = "/proc/self/ns/net";

/// Namespaces probed at the same time (each takes one blocking thread for up to one timeout).
pub const PARALLEL_NAMESPACES: usize = 4;

/// What one TCP connect attempt ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The handshake completed: the destination is reachable.
    Connected,
    /// No answer within the timeout (dropped by a policy, or nothing there).
    TimedOut,
    /// Refused on the way or by the peer: ECONNREFUSED (RST, e.g. a REJECT rule),
    /// EHOSTUNREACH / ENETUNREACH (ICMP unreachable from a REJECT, or no route),
    /// EACCES / EPERM (a local policy said no).
    Refused(i32),
    /// The probe itself failed (namespace handle, `setns`, `socket`, an unexpected connect
    /// error): says nothing about the network.
    Error(i32),
}

impl ProbeResult {
    /// For logs: `connected`, `timed out`, `refused: Connection refused (os error 111)`, ...
    pub fn describe(&self) -> String {
        match self {
            ProbeResult::Connected => "connected".to_owned(),
            ProbeResult::TimedOut => "timed out".to_owned(),
            ProbeResult::Refused(e) => format!("refused: {}", io::Error::from_raw_os_error(*e)),
            ProbeResult::Error(e) => format!("probe error: {}", io::Error::from_raw_os_error(*e)),
        }
    }
}

/// One target's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub target: SocketAddr,
    pub result: ProbeResult,
}

/// Connects to every target from inside the network namespace `netns` (a namespace file such
/// as `/proc/<pid>/ns/net` or `/run/netns/<name>`), all in parallel, each given `timeout`,
/// and closes each socket as soon as its handshake ends. Runs on a dedicated OS thread that
/// alone enters the namespace (see the module docs); blocks the caller for at most about
/// `timeout`. Never fails as a whole: a namespace that cannot be entered gives
/// [`ProbeResult::Error`] for every target. Outcomes are in `targets` order.
pub fn probe_in_netns(
    netns: &Path,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Vec<ProbeOutcome> {
    let all = |result: ProbeResult| -> Vec<ProbeOutcome> {
        targets
            .iter()
            .map(|&target| ProbeOutcome { target, result })
            .collect()
    };
    if targets.is_empty() {
        return Vec::new();
    }
    let file = match File::open(netns) {
        Ok(f) => f,
        Err(e) => return all(ProbeResult::Error(errno_of(&e))),
    };
    let owned = targets.to_vec();
    let spawned = std::thread::Builder::new()
        .name("dg-cniprobe".to_owned())
        .spawn(move || -> io::Result<Vec<ProbeOutcome>> {
            // SAFETY: setns on a valid, open namespace fd; it changes only this thread, which
            // ends when the probe is done. EINVAL if the file is not a network namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(file);
            Ok(connect_all(&owned, timeout))
        });
    match spawned.map(|thread| thread.join()) {
        Ok(Ok(Ok(outcomes))) => outcomes,
        Ok(Ok(Err(e))) | Err(e) => all(ProbeResult::Error(errno_of(&e))),
        // A panic in the probe thread (none is expected): report, do not propagate.
        Ok(Err(_)) => all(ProbeResult::Error(libc::EIO)),
    }
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Maps a connect error to a result (see [`ProbeResult`]).
fn connect_errno(e: i32) -> ProbeResult {
    match e {
        libc::ECONNREFUSED
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EACCES
        | libc::EPERM => ProbeResult::Refused(e),
        // The kernel gave up retrying SYNs (only after minutes; here for completeness).
        libc::ETIMEDOUT => ProbeResult::TimedOut,
        _ => ProbeResult::Error(e),
    }
}

enum Started {
    Done(ProbeResult),
    Pending(OwnedFd),
}

/// Non-blocking connects to all targets from the calling thread's network namespace, then
/// one `poll` loop until all finished or the deadline passed.
fn connect_all(targets: &[SocketAddr], timeout: Duration) -> Vec<ProbeOutcome> {
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<ProbeResult>> = vec![None; targets.len()];
    let mut pending: Vec<(usize, OwnedFd)> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        match start_connect(target) {
            Started::Done(r) => results[i] = Some(r),
            Started::Pending(fd) => pending.push((i, fd)),
        }
    }
    while !pending.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // Round up, so that a sub-millisecond rest does not spin with a 0 ms poll.
        let wait_ms = (deadline - now)
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128) as i32;
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for (i, _) in pending.drain(..) {
                results[i] = Some(ProbeResult::Error(errno_of(&e)));
            }
            break;
        }
        let mut still = Vec::with_capacity(pending.len());
        for ((i, fd), polled) in pending.into_iter().zip(&fds) {
            if polled.revents == 0 {
                still.push((i, fd));
                continue;
            }
            results[i] = Some(match socket_error(&fd) {
                Ok(0) => ProbeResult::Connected,
                Ok(e) => connect_errno(e),
                Err(e) => ProbeResult::Error(errno_of(&e)),
            });
            // `fd` is dropped here: closed at once, handshake only.
        }
        pending = still;
    }
    for (i, _) in pending {
        results[i] = Some(ProbeResult::TimedOut);
    }
    targets
        .iter()
        .zip(results)
        .map(|(&target, result)| ProbeOutcome {
            target,
            result: result.unwrap_or(ProbeResult::TimedOut),
        })
        .collect()
}

fn start_connect(target: &SocketAddr) -> Started {
    let (domain, addr, len) = sockaddr_of(target);
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if raw < 0 {
        return Started::Done(ProbeResult::Error(errno_of(&io::Error::last_os_error())));
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is a sockaddr_storage holding a sockaddr of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc == 0 {
        return Started::Done(ProbeResult::Connected);
    }
    match errno_of(&io::Error::last_os_error()) {
        // EINTR: the connect goes on asynchronously, as for EINPROGRESS.
        libc::EINPROGRESS | libc::EINTR => Started::Pending(fd),
        e => Started::Done(connect_errno(e)),
    }
}

fn socket_error(fd: &OwnedFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR writes one c_int into `err`; `len` says how large it is.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
}

fn sockaddr_of(target: &SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage / sockaddr_in / sockaddr_in6.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match target {
        SocketAddr::V4(a) => {
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (
                libc::AF_INET,
                storage,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                libc::AF_INET6,
                storage,
                mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// The verdict for one namespace, from the control's outcomes (`host`) and the pod's.
///
/// Only targets the control connected to are compared (a target the node cannot reach says
/// nothing about the CNI). Among those: any pod connect → `NotEnforced`; every one timed out
/// or refused → `Enforced`; a probe error on any, or no comparable target at all (the
/// control reached nothing) → `Inconclusive`.
pub fn classify(host: &[ProbeOutcome], pod: &[ProbeOutcome]) -> CniState {
    let reachable: BTreeSet<SocketAddr> = host
        .iter()
        .filter(|o| o.result == ProbeResult::Connected)
        .map(|o| o.target)
        .collect();
    let mut blocked = false;
    let mut unclear = false;
    for outcome in pod.iter().filter(|o| reachable.contains(&o.target)) {
        match outcome.result {
            ProbeResult::Connected => return CniState::NotEnforced,
            ProbeResult::TimedOut | ProbeResult::Refused(_) => blocked = true,
            ProbeResult::Error(_) => unclear = true,
        }
    }
    if blocked && !unclear {
        CniState::Enforced
    } else {
        CniState::Inconclusive
    }
}

/// The probe targets for a blocked set: every single-address CIDR (/32, /128) on `port`, in
/// order, without duplicates. Wider blocked ranges have no one address worth probing and
/// are skipped, and so are IPv6 link-local addresses (fe80::/10, e.g. OpenStack's), which
/// need an interface to be connected to.
pub fn targets_from_blocked(blocked: &[Cidr], port: u16) -> Vec<SocketAddr> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for cidr in blocked {
        let ip = match *cidr {
            Cidr::V4 { addr, prefix: 32 } => IpAddr::V4(Ipv4Addr::from(addr)),
            Cidr::V6 { addr, prefix: 128 } => {
                let v6 = Ipv6Addr::from(addr);
                if v6.segments()[0] & 0xffc0 == 0xfe80 {
                    continue;
                }
                IpAddr::V6(v6)
            }
            _ => continue,
        };
        let target = SocketAddr::new(ip, port);
        if seen.insert(target) {
            out.push(target);
        }
    }
    out
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
    let thread = std::thread::Builder::new()
        .name("dg-netns-scan".to_owned())
        .spawn(move || {
            let mut out = Vec::new();
            for path in paths {
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                // SAFETY: setns on a valid fd; only this helper thread changes namespace,
                // and it ends after the scan.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    continue;
                }
                if let Ok(addrs) = local_addresses() {
                    out.push((path, addrs));
                }
            }
            out
        })?;
    thread
        .join()
        .map_err(|_| io::Error::other("network namespace scan thread panicked"))
}

/// The addresses of the calling thread's network namespace, loopback excluded.
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below. Its netlink socket is made
    // in the calling thread's network namespace.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` walks the list getifaddrs returned, which is valid until freed.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// One round: the control first, then every listed pod namespace (one per Kubernetes
/// namespace: the first pair listed for it). Returns the state of every listed namespace.
/// Blocking work runs on tokio's blocking pool; at most [`PARALLEL_NAMESPACES`] at a time.
pub async fn probe_once(
    control_netns: &Path,
    targets: &[SocketAddr],
    timeout: Duration,
    pods: Vec<(String, PathBuf)>,
) -> BTreeMap<String, CniState> {
    let mut unique: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (namespace, netns) in pods {
        unique.entry(namespace).or_insert(netns);
    }
    if unique.is_empty() {
        return BTreeMap::new();
    }
    let control = {
        let (netns, targets) = (control_netns.to_path_buf(), targets.to_vec());
        tokio::task::spawn_blocking(move || probe_in_netns(&netns, &targets, timeout))
            .await
            .unwrap_or_default()
    };
    if !control.iter().any(|o| o.result == ProbeResult::Connected) {
        tracing::debug!(
            control = %control_netns.display(),
            outcomes = %describe_outcomes(&control),
            "CNI probe: the control reaches no target; every namespace is inconclusive"
        );
        return unique
            .into_keys()
            .map(|ns| (ns, CniState::Inconclusive))
            .collect();
    }
    let control = Arc::new(control);
    let targets: Arc<[SocketAddr]> = targets.into();
    futures::stream::iter(unique)
        .map(|(namespace, netns)| {
            let (control, targets) = (control.clone(), targets.clone());
            async move {
                let pod = tokio::task::spawn_blocking(move || probe_in_netns(&netns, &targets, timeout)).await;
                let state = match &pod {
                    Ok(pod) => classify(&control, pod),
                    Err(_) => CniState::Inconclusive,
                };
                if let Ok(pod) = &pod {
                    tracing::debug!(namespace, state = state.as_str(), outcomes = %describe_outcomes(pod), "CNI probe");
                }
                (namespace, state)
            }
        })
        .buffer_unordered(PARALLEL_NAMESPACES)
        .collect()
        .await
}

fn describe_outcomes(outcomes: &[ProbeOutcome]) -> String {
    outcomes
        .iter()
        .map(|o| format!("{} {}", o.target, o.result.describe()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The probe task (spawn it on tokio; it runs until `shutdown` turns true or its sender is
/// dropped). Does nothing when `config.enabled` is false or there is no target.
///
/// Every `config.interval` plus a random part of `config.jitter` (the first round after the
/// jitter alone) it calls `list` on the blocking pool for the (Kubernetes namespace, network
/// namespace file) pairs of environment namespaces with a running pod on this node, probes
/// them ([`probe_once`], with `control_netns` — [`SELF_NETNS`] in the agent — as the
/// control), writes each state into `states` and calls `on_change(namespace, old, new)` when
/// it differs from the previous one (`old` is `None` on the first result). A namespace no
/// longer listed (no pod on this node any more) has its `cni` reset to `None`, without a
/// callback.
pub async fn run_probe_loop<L, C>(
    config: ProbeConfig,
    control_netns: PathBuf,
    targets: Vec<SocketAddr>,
    list: L,
    states: NamespaceStates,
    mut on_change: C,
    mut shutdown: watch::Receiver<bool>,
) where
    L: Fn() -> Vec<(String, PathBuf)> + Send + Sync + 'static,
    C: FnMut(&str, Option<CniState>, CniState) + Send,
{
    if !config.enabled {
        tracing::info!("CNI enforcement probe disabled (probe.enabled: false)");
        return;
    }
    if targets.is_empty() {
        tracing::warn!(
            "CNI enforcement probe has no single-address blocked destination to probe; not running"
        );
        return;
    }
    let list = Arc::new(list);
    let timeout = config.timeout.as_std();
    let mut delay = random_below(config.jitter.as_std());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown_requested(&mut shutdown) => return,
        }
        let round = async {
            let lister = list.clone();
            let pods = tokio::task::spawn_blocking(move || lister())
                .await
                .unwrap_or_default();
            probe_once(&control_netns, &targets, timeout, pods).await
        };
        let results = tokio::select! {
            r = round => r,
            _ = shutdown_requested(&mut shutdown) => return,
        };
        apply_round(&states, &results, &mut on_change);
        delay = config.interval.as_std() + random_below(config.jitter.as_std());
    }
}

/// Writes one round's results into `states`, reporting changes; forgets namespaces that were
/// not probed this round.
fn apply_round<C>(states: &NamespaceStates, results: &BTreeMap<String, CniState>, on_change: &mut C)
where
    C: FnMut(&str, Option<CniState>, CniState),
{
    let before = states.snapshot();
    for (namespace, &new) in results {
        let old = before.get(namespace).and_then(|s| s.cni);
        states.update(namespace, |s| s.cni = Some(new));
        if old != Some(new) {
            on_change(namespace, old, new);
        }
    }
    for (namespace, status) in &before {
        if status.cni.is_some() && !results.contains_key(namespace) {
            states.update(namespace, |s| s.cni = None);
        }
    }
}

/// Resolves when shutdown is requested (the value turns true, or the sender is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A uniformly spread duration in `[0, max)`; not cryptographic (std's per-process random
/// hash keys, fresh for every call).
fn random_below(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = RandomState::new().build_hasher().finish();
    Duration::from_nanos(random % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocklist::parse_cidr;

    const V4: &str = "169.254.169.254:80";
    const V6: &str = "[fd00:ec2::254]:80";

    fn outcomes(list: &[(&str, ProbeResult)]) -> Vec<ProbeOutcome> {
        list.iter()
            .map(|(t, result)| ProbeOutcome {
                target: t.parse().unwrap(),
                result: *result,
            })
            .collect()
    }

    use ProbeResult::{Connected, Error, Refused, TimedOut};

    #[test]
    fn classify_pod_connect_is_not_enforced() {
        let host = outcomes(&[(V4, Connected), (V6, Connected)]);
        assert_eq!(
            classify(&host, &outcomes(&[(V4, Connected), (V6, TimedOut)])),
            CniState::NotEnforced
        );
        assert_eq!(
            classify(&host, &outcomes(&[(V4, TimedOut), (V6, Connected)])),
            CniState::NotEnforced
        );
        // A connect is definitive even when another target had a probe error.
        assert_eq!(
            classify(
                &host,
                &outcomes(&[(V4, Error(libc::EMFILE)), (V6, Connected)])
            ),
            CniState::NotEnforced
        );
    }

    #[test]
    fn classify_timeouts_and_refusals_are_enforced() {
        let host = outcomes(&[(V4, Connected), (V6, Connected)]);
        for pod in [
            [(V4, TimedOut), (V6, TimedOut)],
            [
                (V4, Refused(libc::ECONNREFUSED)),
                (V6, Refused(libc::EHOSTUNREACH)),
            ],
            [(V4, Refused(libc::EPERM)), (V6, Refused(libc::EACCES))],
            [(V4, Refused(libc::ENETUNREACH)), (V6, TimedOut)],
        ] {
            assert_eq!(
                classify(&host, &outcomes(&pod)),
                CniState::Enforced,
                "{pod:?}"
            );
        }
    }

    #[test]
    fn classify_unreachable_from_the_node_is_inconclusive() {
        let pod_open = outcomes(&[(V4, Connected), (V6, Connected)]);
        let pod_closed = outcomes(&[(V4, TimedOut), (V6, TimedOut)]);
        for host in [
            outcomes(&[(V4, TimedOut), (V6, TimedOut)]),
            outcomes(&[
                (V4, Refused(libc::ECONNREFUSED)),
                (V6, Refused(libc::ENETUNREACH)),
            ]),
            outcomes(&[(V4, Error(libc::EPERM)), (V6, Error(libc::EPERM))]),
            vec![],
        ] {
            assert_eq!(
                classify(&host, &pod_closed),
                CniState::Inconclusive,
                "{host:?}"
            );
            // Even a pod "connect" is not judged against a target the node cannot reach.
            assert_eq!(
                classify(&host, &pod_open),
                CniState::Inconclusive,
                "{host:?}"
            );
        }
    }

    #[test]
    fn classify_only_compares_targets_the_node_reaches() {
        // v6 unreachable from the node: only v4 counts.
        let host = outcomes(&[(V4, Connected), (V6, Refused(libc::ENETUNREACH))]);
        assert_eq!(
            classify(&host, &outcomes(&[(V4, TimedOut), (V6, Connected)])),
            CniState::Enforced
        );
        assert_eq!(
            classify(&host, &outcomes(&[(V4, Connected), (V6, TimedOut)])),
            CniState::NotEnforced
        );
        // The pod probe failed locally on the one comparable target.
        assert_eq!(
            classify(
                &host,
                &outcomes(&[(V4, Error(libc::ENOENT)), (V6, TimedOut)])
            ),
            CniState::Inconclusive
        );
        // One target blocked, the other not probable: cannot claim enforcement.
        let both = outcomes(&[(V4, Connected), (V6, Connected)]);
        assert_eq!(
            classify(
                &both,
                &outcomes(&[(V4, TimedOut), (V6, Error(libc::EADDRNOTAVAIL))])
            ),
            CniState::Inconclusive
        );
        // Targets missing from the pod's list are not judged.
        assert_eq!(
            classify(&both, &outcomes(&[(V4, TimedOut)])),
            CniState::Enforced
        );
        assert_eq!(classify(&both, &[]), CniState::Inconclusive);
    }

    #[test]
    fn connect_errors_map_to_results() {
        assert_eq!(
            connect_errno(libc::ECONNREFUSED),
            Refused(libc::ECONNREFUSED)
        );
        assert_eq!(
            connect_errno(libc::EHOSTUNREACH),
            Refused(libc::EHOSTUNREACH)
        );
        assert_eq!(connect_errno(libc::ENETUNREACH), Refused(libc::ENETUNREACH));
        assert_eq!(connect_errno(libc::EACCES), Refused(libc::EACCES));
        assert_eq!(connect_errno(libc::EPERM), Refused(libc::EPERM));
        assert_eq!(connect_errno(libc::ETIMEDOUT), TimedOut);
        assert_eq!(connect_errno(libc::EAFNOSUPPORT), Error(libc::EAFNOSUPPORT));
        assert_eq!(
            connect_errno(libc::EADDRNOTAVAIL),
            Error(libc::EADDRNOTAVAIL)
        );
        assert!(Refused(libc::ECONNREFUSED)
            .describe()
            .starts_with("refused: "));
        assert_eq!(TimedOut.describe(), "timed out");
    }

    #[test]
    fn targets_are_single_addresses() {
        let blocked: Vec<Cidr> = [
            "169.254.169.254/32",
            "fd00:ec2::254/128",
            "169.254.169.254",
            "100.64.0.0/10",
            "fe80::a9fe:a9fe/128",
            "fd00::/8",
            "168.63.129.16/32",
        ]
        .iter()
        .map(|s| parse_cidr(s).unwrap())
        .collect();
        let want: Vec<SocketAddr> = [V4, V6, "168.63.129.16:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(targets_from_blocked(&blocked, 80), want);
        assert_eq!(
            targets_from_blocked(&blocked, 8080)[0],
            "169.254.169.254:8080".parse().unwrap()
        );
        assert_eq!(targets_from_blocked(&[], 80), []);
    }

    #[test]
    fn a_missing_namespace_is_an_error_for_every_target() {
        let targets: Vec<SocketAddr> = vec![V4.parse().unwrap(), V6.parse().unwrap()];
        let out = probe_in_netns(
            Path::new("/nonexistent/netns/x"),
            &targets,
            Duration::from_millis(100),
        );
        assert_eq!(
            out,
            targets
                .iter()
                .map(|&target| ProbeOutcome {
                    target,
                    result: Error(libc::ENOENT)
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(
            probe_in_netns(Path::new("/nonexistent"), &[], Duration::from_millis(100)),
            []
        );
    }

    #[test]
    fn a_file_that_is_no_network_namespace_is_an_error() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (setns)");
            return;
        }
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // The mount namespace handle: setns(CLONE_NEWNET) refuses it with EINVAL.
        let out = probe_in_netns(
            Path::new("/proc/self/ns/mnt"),
            &[target],
            Duration::from_millis(100),
        );
        assert_eq!(out[0].result, Error(libc::EINVAL));
    }

    #[test]
    fn loopback_connect_and_refusal_in_our_own_namespace() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (setns)");
            return;
        }
        // Loopback only: a listener we own, and a port we just closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = Instant::now();
        let out = probe_in_netns(
            Path::new(SELF_NETNS),
            &[open, closed],
            Duration::from_secs(2),
        );
        assert_eq!(
            out[0],
            ProbeOutcome {
                target: open,
                result: Connected
            }
        );
        assert_eq!(
            out[1],
            ProbeOutcome {
                target: closed,
                result: Refused(libc::ECONNREFUSED)
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The probe only did a handshake: the accepted connection is closed with no data.
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        use std::io::Read as _;
        assert_eq!(conn.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn sockaddrs_are_built_in_network_order() {
        let (family, storage, len) = sockaddr_of(&"10.1.2.3:8080".parse().unwrap());
        assert_eq!(family, libc::AF_INET);
        assert_eq!(len as usize, mem::size_of::<libc::sockaddr_in>());
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin.sin_port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [10, 1, 2, 3]);
        let (family, storage, _) = sockaddr_of(&V6.parse().unwrap());
        assert_eq!(family, libc::AF_INET6);
        let sin6: libc::sockaddr_in6 =
            unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
        assert_eq!(
            sin6.sin6_addr.s6_addr,
            "fd00:ec2::254".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(sin6.sin6_port.to_ne_bytes(), 80u16.to_be_bytes());
    }

    #[test]
    fn random_delays_stay_below_the_bound_and_vary() {
        assert_eq!(random_below(Duration::ZERO), Duration::ZERO);
        let max = Duration::from_secs(30);
        let draws: BTreeSet<Duration> = (0..32).map(|_| random_below(max)).collect();
        assert!(draws.iter().all(|d| *d < max));
        assert!(draws.len() > 16, "{draws:?}");
    }

    #[test]
    fn rounds_update_states_and_report_changes() {
        let states = NamespaceStates::default();
        states.update("provisioned-only", |s| s.psa = None);
        let mut changes: Vec<(String, Option<CniState>, CniState)> = Vec::new();
        let mut record = |ns: &str, old: Option<CniState>, new: CniState| {
            changes.push((ns.to_owned(), old, new))
        };
        let round1: BTreeMap<String, CniState> = [
            ("a".to_owned(), CniState::Enforced),
            ("b".to_owned(), CniState::NotEnforced),
        ]
        .into();
        apply_round(&states, &round1, &mut record);
        let round2: BTreeMap<String, CniState> = [
            ("a".to_owned(), CniState::Enforced),
            ("b".to_owned(), CniState::Inconclusive),
        ]
        .into();
        apply_round(&states, &round2, &mut record);
        let round3: BTreeMap<String, CniState> = [("b".to_owned(), CniState::Inconclusive)].into();
        apply_round(&states, &round3, &mut record);
        assert_eq!(
            changes,
            [
                ("a".to_owned(), None, CniState::Enforced),
                ("b".to_owned(), None, CniState::NotEnforced),
                (
                    "b".to_owned(),
                    Some(CniState::NotEnforced),
                    CniState::Inconclusive
                ),
            ]
        );
        let snap = states.snapshot();
        assert_eq!(snap["a"].cni, None, "not listed any more: forgotten");
        assert_eq!(snap["b"].cni, Some(CniState::Inconclusive));
        assert_eq!(snap["provisioned-only"].cni, None);
    }

    #[tokio::test]
    async fn disabled_or_targetless_loops_return_at_once() {
        let (_tx, rx) = watch::channel(false);
        let config = ProbeConfig {
            enabled: false,
            ..ProbeConfig::default()
        };
        let target: SocketAddr = V4.parse().unwrap();
        let run = run_probe_loop(
            config,
            PathBuf::from(SELF_NETNS),
            vec![target],
            Vec::new,
            NamespaceStates::default(),
            |_: &str, _, _| {},
            rx.clone(),
        );
        tokio::time::timeout(Duration::from_secs(1), run)
            .await
            .expect("returns");
        let run = run_probe_loop(
            ProbeConfig::default(),
            PathBuf::from(SELF_NETNS),
            vec![],
            Vec::new,
            NamespaceStates::default(),
            |_: &str, _, _| {},
            rx,
        );
        tokio::time::timeout(Duration::from_secs(1), run)
            .await
            .expect("returns");
    }

    #[tokio::test]
    async fn shutdown_stops_a_waiting_loop() {
        let (tx, rx) = watch::channel(false);
        let target: SocketAddr = V4.parse().unwrap();
        // Lists nothing, so even a round that starts probes nothing (no traffic leaves this
        // machine's namespace).
        let task = tokio::spawn(run_probe_loop(
            ProbeConfig::default(),
            PathBuf::from(SELF_NETNS),
            vec![target],
            Vec::new,
            NamespaceStates::default(),
            |_: &str, _, _| {},
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops")
            .unwrap();
    }
}

//! The sandbox kit: everything a privileged datalab-guard test (and `cargo xtask demo`)
//! needs to build an isolated network lab, and nothing else.
//!
//! Our machines have one hard rule (see `TOOLCHAIN.md`): test traffic goes only to loopback
//! or to hosts the test created itself in its own network namespaces. The kit makes that the
//! easy path, and makes cleanup automatic so that a failing test leaves nothing behind.
//!
//! What each part owns:
//! - [`lab`]: [`Lab`], two network namespaces (a *metadata host* holding 169.254.169.254,
//!   fd00:ec2::254 and ordinary "other" addresses, and a *tenant*) joined by one veth pair
//!   that lives entirely inside them; nftables counters on the metadata host's ingress that
//!   count every packet that reached it; the fake metadata server `dg-fake-imds`.
//! - [`cgroup`]: [`TestCgroup`], a cgroup v2 directory (and children) under the real cgroup2
//!   mount, whose processes are killed and whose directories are removed on drop.
//! - [`process`]: [`spawn_in`] / [`run_in`], starting a program already inside a cgroup and a
//!   network namespace *before it execs*, so its very first packet is covered.
//! - [`probe`]: running the `dg-probe` binary (one network attempt, one JSON line) and
//!   parsing its result into [`ProbeResult`].
//! - [`agent`]: [`Agent`], the real `datalab-guard` binary as a child process, with its audit
//!   lines captured and a tiny loopback-only HTTP client for `/readyz` and `/metrics`.
//! - [`bpffs`]: [`BpffsDir`], a private bpf filesystem (never the system's `/sys/fs/bpf`),
//!   unmounted with all its pins on drop.
//! - [`mountinfo`]: parsing `/proc/self/mountinfo` (cgroup2 and bpffs are found, never
//!   hard-coded: our machines run cgroup v2 in hybrid mode, Kubernetes nodes in pure mode).
//! - [`names`]: unique per-instance names (`<prefix>-<pid>-<counter>`) so parallel tests never
//!   collide, and [`cleanup_stale`] for leftovers of crashed runs.
//! - [`cri_lab`]: [`CriLab`], a private containerd (Debian's containerd + runc + CNI plugins)
//!   running kubelet-style pod sandboxes through the CRI API, with a busybox image built
//!   locally (no registry); its pod cgroups, netns and bridge are removed on drop.
//! - [`fake_node`]: [`fake_node::FakeNode`], one node as the node agent sees it (pod cgroup
//!   tree, API server fixture, pins, state directory, network lab) for end-to-end tests.
//! - [`bins`]: locating the helper binaries and the agent binary.
//! - [`af_xdp`]: a minimal AF_XDP copy-mode transmitter (raw syscalls) for `dg-probe xdp-tx`.
//!
//! Every resource type removes what it created in `Drop`, which also runs when a test panics.
//! Nothing here touches an interface, route or firewall rule of the root network namespace.

pub mod af_xdp;
pub mod agent;
pub mod apiserver;
pub mod bins;
pub mod bpffs;
pub mod cgroup;
pub mod cri_lab;
pub mod fake_node;
pub mod lab;
pub mod local_guard;
pub mod mountinfo;
pub mod names;
pub mod probe;
pub mod process;

use std::io::Write as _;

pub use agent::{free_loopback_addr, http_get, Agent, HttpResponse};
pub use apiserver::{FakeApiServer, PodBuilder, RequestLog};
pub use bpffs::BpffsDir;
pub use cgroup::{cgroup2_root, cgroup_id, TestCgroup};
pub use cri_lab::{CriLab, LabPod, PodSpec};
pub use lab::{Lab, PacketCounters};
pub use local_guard::LocalGuard;
pub use names::{cleanup_stale, DEFAULT_PREFIX};
pub use probe::{probe_in, ProbeResult};
pub use process::{command_in, run_in, spawn_in};

/// Environment variable that lets privileged tests skip (instead of fail) when not root.
/// For developer machines only: CI never sets it, and `cargo xtask test` removes it and fails
/// the run if any test printed `SKIPPED:`.
pub const ALLOW_SKIP_ENV: &str = "DATALAB_GUARD_ALLOW_SKIP";

/// Call first in every privileged test: `if !require_root() { return; }`.
///
/// Returns true when running as root. Otherwise it panics with a clear message, unless
/// `DATALAB_GUARD_ALLOW_SKIP=1` is set, in which case it prints `SKIPPED: needs root` and
/// returns false. The line is written straight to the process's stderr, past the test
/// harness's output capture, so that `cargo xtask test` always sees it.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var(ALLOW_SKIP_ENV).as_deref() == Ok("1") {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("?");
        // One write, so the marker is never split by concurrent output.
        let line = format!("SKIPPED: needs root ({test})\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return false;
    }
    panic!(
        "this privileged test needs root (network namespaces, cgroups, bpffs); run it as root \
         (e.g. `cargo xtask test`), or set {ALLOW_SKIP_ENV}=1 to skip it on a developer machine"
    );
}

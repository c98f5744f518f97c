//! The fake node the node-agent benchmarks share: a kubelet-style pod cgroup tree (systemd
//! driver, all three QoS classes) and pods numbered `n`, each with a stable uid, QoS class
//! and container id, so a pod's API object and its cgroup directory always agree.
//!
//! Also the agent's process facts the benchmarks report: resident memory (VmRSS), its peak
//! (VmHWM) and CPU seconds, read from `/proc/<pid>` of the agent alone, never the process
//! that runs the API fixture.
//!
//! Included by path (`#[path]`) by the helper binaries that use it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The pod's API uid (and cgroup uid: no static pods here).
pub fn uid(n: u32) -> String {
    format!("{n:08x}-aaaa-bbbb-cccc-dddddddddddd")
}

/// One third of the pods in each QoS class.
pub fn qos(n: u32) -> &'static str {
    match n % 3 {
        0 => "Guaranteed",
        1 => "Burstable",
        _ => "BestEffort",
    }
}

/// The pod's cgroup directory under `root` (the `kubepods.slice` directory).
pub fn pod_dir(root: &Path, n: u32) -> PathBuf {
    let u = uid(n).replace('-', "_");
    match qos(n) {
        "Guaranteed" => root.join(format!("kubepods-pod{u}.slice")),
        "Burstable" => root
            .join("kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{u}.slice")),
        _ => root
            .join("kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{u}.slice")),
    }
}

/// The container id the pod's status reports.
pub fn container_id(n: u32) -> String {
    format!("containerd://{n:064x}")
}

/// Creates `root` and its two QoS sub-slices.
pub fn make_root(root: &Path) -> Result<()> {
    for q in ["", "kubepods-burstable.slice", "kubepods-besteffort.slice"] {
        let dir = root.join(q);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    Ok(())
}

/// The cgroup id (inode) of a directory.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?,
    ))
}

/// Resident memory and its peak so far, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU seconds (user + system) the process has used so far, all its threads.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: the 12th and 13th after the ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11) + ticks(12)) as f64 / hz)
}

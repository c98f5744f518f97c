//! Removing what a lab's runtime left on the host: processes, mounts, pod network namespaces,
//! pod cgroups, the bridge, the runtime's hard-coded directories.
//!
//! The runtime puts some things outside the lab's directory, at paths it hard-codes:
//! `/run/containerd/s` (shim sockets), `/var/run/netns/cni-*` (pod network namespaces) and
//! the kubelet-style pod cgroups `kubepods/<qos>/pod<uid>` in *every* cgroup hierarchy (the
//! v1 controllers and the v2 one). The lab records each pod's cgroup parent and netns path
//! in its state file as it creates them, so that these are removed — and only these — also
//! after a crashed run (see [`cleanup_stale_labs`]). Shared parents (`kubepods`,
//! `/run/containerd`, when the lab made it) are removed only when empty, so a neighbour's pods are never touched.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::{mountinfo, names};

/// The runtime keeps its shim sockets in `<this>/s` regardless of its config (containerd 1.6).
pub const RUN_CONTAINERD: &str = "/run/containerd";
/// Prefix of every lab's name (directory, bridge); see [`names::unique_name`].
pub const LAB_PREFIX: &str = "dgc";
/// The state file in a lab directory: one record per line, `cgroup <parent>`, `netns <path>`
/// or `made /run/containerd` (the lab created it, so removes it once empty).
pub const STATE_FILE: &str = "lab-state";

/// Appends a record to the lab's state file (see [`STATE_FILE`]).
pub fn record(dir: &Path, kind: &str, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(STATE_FILE))?;
    writeln!(f, "{kind} {value}")?;
    Ok(())
}

/// The records of `kind` in the lab's state file (none if the file is missing).
pub fn records(dir: &Path, kind: &str) -> Vec<String> {
    fs::read_to_string(dir.join(STATE_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
        .map(str::to_owned)
        .collect()
}

/// SIGKILLs every process (never this one) whose command line contains `needle` — the lab
/// directory's unique path, which only its containerd and shims carry — and returns their
/// pids.
pub fn kill_processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return killed;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != me && text.contains(needle) {
            // A killed shim cannot remove its socket: find it first, remove it after.
            let sockets = shim_sockets_of(pid);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
            for s in sockets {
                let _ = fs::remove_file(s);
            }
        }
    }
    killed
}

/// The unix sockets under `/run/containerd/s` that process `pid` holds open (a shim's
/// listening socket), from its fds' socket inodes and `/proc/net/unix`.
fn shim_sockets_of(pid: i32) -> Vec<PathBuf> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let shim_dir = Path::new(RUN_CONTAINERD).join("s");
    // Lines: `Num RefCount Protocol Flags Type St Inode Path`.
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, Path::new(f.get(7)?));
            (inodes.iter().any(|i| i == inode) && path.starts_with(&shim_dir))
                .then(|| path.to_owned())
        })
        .collect()
}

/// Detaches (lazily) every mount at or below `dir`, deepest first: the runtime's rootfs
/// overlays and shm mounts of a runtime that died with pods running.
pub fn unmount_under(dir: &Path) -> Result<usize> {
    let mut points: Vec<PathBuf> = mountinfo::read()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in &points {
        detach(p);
    }
    Ok(points.len())
}

fn detach(path: &Path) {
    if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path; failure (not mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Removes a pod network namespace file the runtime left (`/var/run/netns/cni-*`): it is a
/// bind mount of the namespace, detached first.
pub fn remove_netns(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    detach(path);
    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

/// Every cgroup hierarchy's mount point (v1 controllers and v2), hierarchy roots only.
pub fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    Ok(mountinfo::read()?
        .into_iter()
        .filter(|m| (m.fstype == "cgroup" || m.fstype == "cgroup2") && m.root == "/")
        .map(|m| m.mount_point)
        .collect())
}

/// Removes the pod cgroup `parent` (e.g. `/kubepods/burstable/pod<uid>`) from every
/// hierarchy: kills what still runs in it, removes it deepest first, then removes its
/// ancestors up to (and including) the top component when they are empty.
pub fn remove_pod_cgroup(parent: &str) -> Result<()> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(anyhow!("refusing to remove cgroup {parent:?}"));
    }
    let mut problems = Vec::new();
    for hierarchy in cgroup_hierarchies()? {
        let dir = hierarchy.join(rel);
        if dir.exists() {
            if let Err(e) = remove_tree(&dir) {
                problems.push(format!("{e:#}"));
                continue;
            }
        }
        let mut ancestor = dir.parent();
        while let Some(a) = ancestor.filter(|a| *a != hierarchy) {
            if fs::remove_dir(a).is_err() {
                break; // not empty (a neighbour's pods) or already gone
            }
            ancestor = a.parent();
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(anyhow!("{}", problems.join("; "))),
    }
}

/// Kills every process in the cgroup tree `dir` and removes its directories deepest first,
/// retrying while the kernel still reaps them (up to 5 s).
fn remove_tree(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(dir, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            kill_members(d);
        }
        // Try every directory (deepest first), remember the last one that would not go.
        let mut last_error = None;
        for d in &dirs {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => last_error = Some((d, e)),
                _ => {}
            }
        }
        match last_error {
            None => return Ok(()),
            Some((d, e)) if Instant::now() >= deadline => {
                return Err(anyhow!("cannot remove cgroup {}: {e}", d.display()))
            }
            Some(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
    if dir.exists() {
        out.push(dir.to_owned());
    }
}

fn kill_members(dir: &Path) {
    for file in ["cgroup.procs", "tasks"] {
        for pid in fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes `dir` if it is empty; says whether it is gone.
pub fn remove_dir_if_empty(dir: &Path) -> bool {
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Deletes the link `name` if it exists.
pub fn delete_link(name: &str) -> Result<()> {
    if Path::new("/sys/class/net").join(name).exists() {
        super::ip(&["link", "del", name])?;
    }
    Ok(())
}

/// Everything a lab in `dir` may have left behind, for a lab whose process is gone (or in
/// `Drop` after the runtime stopped): its processes, mounts, recorded netns and cgroups,
/// its bridge (named like the directory) and the directory. Returns the problems met.
pub fn remove_leftovers(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            problems.push(format!("{what}: {e:#}"));
        }
    };
    // With the trailing slash: `/tmp/dgc-1-1` must not match `/tmp/dgc-1-10`.
    kill_processes_mentioning(&format!("{}/", dir.display()));
    note("unmount", unmount_under(dir).map(drop));
    for netns in records(dir, "netns") {
        note("netns", remove_netns(Path::new(&netns)));
    }
    for parent in records(dir, "cgroup") {
        note("cgroup", remove_pod_cgroup(&parent));
    }
    if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
        note("bridge", delete_link(name));
    }
    // Only when empty: a neighbour's runtime may have shims there.
    for made in records(dir, "made").iter().map(Path::new) {
        if remove_dir_if_empty(&made.join("s")) {
            remove_dir_if_empty(made);
        }
    }
    note(
        "lab directory",
        fs::remove_dir_all(dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .with_context(|| format!("removing {}", dir.display())),
    );
    problems
}

/// Removes the leftovers of labs whose process is gone (a crashed or killed test run).
/// Returns how many labs were cleaned.
pub fn cleanup_stale_labs() -> usize {
    let tmp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return 0;
    };
    let mut cleaned = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if names::is_stale(&name, LAB_PREFIX) {
            for p in remove_leftovers(&tmp.join(&name)) {
                eprintln!("cri lab: stale lab {name}: {p}");
            }
            cleaned += 1;
        }
    }
    cleaned
}

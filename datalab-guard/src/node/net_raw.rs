//! Which guarded pods hold CAP_NET_RAW (#14.4): read from `CapEff` in `/proc/<pid>/status`
//! of the processes in a pod's cgroup subtree. Bounded: at most [`MAX_DIRS`] directories
//! and [`MAX_PIDS`] processes per pod. Pids of other pid namespaces read as 0 in
//! `cgroup.procs` (a DaemonSet without `hostPID`): such a pod is "unknown", not counted.

use std::path::Path;

use crate::commands::check::parse_cap_eff;

/// Capability number of CAP_NET_RAW.
const CAP_NET_RAW: u32 = 13;
const MAX_DIRS: usize = 64;
const MAX_PIDS: usize = 64;

/// `Some(true)` when a process of the pod holds CAP_NET_RAW in its effective set,
/// `Some(false)` when processes were seen and none does, `None` when none was visible.
pub fn holds_net_raw(pod_dir: &Path) -> Option<bool> {
    let mut queue = vec![pod_dir.to_path_buf()];
    let mut seen_pids = 0;
    let mut i = 0;
    while i < queue.len() && i < MAX_DIRS {
        let dir = queue[i].clone();
        i += 1;
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if pid == 0 || seen_pids >= MAX_PIDS {
                    continue;
                }
                let Some(caps) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .as_deref()
                    .and_then(parse_cap_eff)
                else {
                    continue;
                };
                seen_pids += 1;
                if caps & (1 << CAP_NET_RAW) != 0 {
                    return Some(true);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    (seen_pids > 0).then_some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_processes_is_unknown() {
        assert_eq!(holds_net_raw(Path::new("/nonexistent-cgroup")), None);
    }

    #[test]
    fn our_own_cgroup_is_read() {
        // This test process is in some cgroup; as root it holds CAP_NET_RAW, otherwise not:
        // either way the answer is known, and it matches our own CapEff.
        let Some(line) = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| t.lines().find(|l| l.starts_with("0::")).map(str::to_owned))
        else {
            return;
        };
        let Ok(mount) = crate::cgroups::cgroup2_mount() else {
            return;
        };
        let dir = mount.join(line.trim_start_matches("0::").trim_start_matches('/'));
        let own = std::fs::read_to_string("/proc/self/status")
            .ok()
            .as_deref()
            .and_then(parse_cap_eff)
            .unwrap();
        if own & (1 << CAP_NET_RAW) != 0 {
            assert_eq!(holds_net_raw(&dir), Some(true));
        }
    }
}

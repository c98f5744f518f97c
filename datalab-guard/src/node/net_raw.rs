//! Which guarded pods hold CAP_NET_RAW (#14.4): read from `CapEff` in `/proc/<pid>/status`
//! of the processes in a pod's cgroup subtree. Bounded: at most [`MAX_DIRS`] directories
//! and [`MAX_PIDS`] processes per pod. Pids of other pid namespaces read as 0 in
//! `cgroup.procs` (a DaemonSet without `hostPID`): such a pod is "unknown", not counted.
//!
//! Also the state file's view of them ([`NetRawReport`]): the exposed pods by name, at most
//! [`MAX_ROWS`] of them, with the total, for `status`.

use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};

use super::state_file::PodRow;
use crate::commands::check::parse_cap_eff;

/// Rows the state file (and so `status`) lists; the total counts every exposed pod. A node
/// runs a few hundred pods at most, but `status` is read by people: the first rows say what
/// to fix, the gauge and the total say how much.
pub const MAX_ROWS: usize = 20;

/// A guarded pod whose processes hold CAP_NET_RAW while no layer closes raw paths for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    pub uid: String,
    /// Why the edge layer does not cover it (a `node::edge::Uncovered` label, or `pending`
    /// before its first attempt).
    pub edge: &'static str,
}

/// What the state file says about them. `None` in the file: not counted yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRawReport {
    /// Every exposed pod (the `guarded_pods_with_net_raw` gauge).
    pub total: u64,
    /// The first [`MAX_ROWS`] of them, by namespace and name.
    pub pods: Vec<NetRawRow>,
}

/// One exposed pod, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRawRow {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// Why the edge layer does not cover it (`host_network`, `netns_unknown`, ...).
    pub edge: String,
}

impl NetRawReport {
    /// Names `exposed` from the reconcile's pod rows (a pod the rows no longer hold keeps
    /// its uid, with empty names), sorted, capped at [`MAX_ROWS`].
    pub fn new(exposed: &[Exposed], rows: &[PodRow]) -> NetRawReport {
        let names: HashMap<&str, &PodRow> = rows.iter().map(|r| (r.uid.as_str(), r)).collect();
        let mut pods: Vec<NetRawRow> = exposed
            .iter()
            .map(|e| {
                let row = names.get(e.uid.as_str());
                NetRawRow {
                    namespace: row.map(|r| r.namespace.clone()).unwrap_or_default(),
                    pod: row.map(|r| r.pod.clone()).unwrap_or_default(),
                    uid: e.uid.clone(),
                    edge: e.edge.to_owned(),
                }
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.pod, &a.uid).cmp(&(&b.namespace, &b.pod, &b.uid)));
        pods.truncate(MAX_ROWS);
        NetRawReport {
            total: exposed.len() as u64,
            pods,
        }
    }

    /// Exposed pods not listed.
    pub fn more(&self) -> u64 {
        self.total.saturating_sub(self.pods.len() as u64)
    }
}

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
    use datalab_guard_common::Verdict;

    use super::*;

    fn row(ns: &str, pod: &str, uid: &str) -> PodRow {
        PodRow {
            namespace: ns.into(),
            pod: pod.into(),
            uid: uid.into(),
            verdict: Verdict::Guard,
            reason: "environment_namespace".into(),
            cgroup_id: Some(1),
            audited_attempts: 0,
        }
    }

    #[test]
    fn the_report_names_sorts_and_caps_the_rows() {
        let rows: Vec<PodRow> = (0..30)
            .map(|i| {
                row(
                    &format!("ns-{}", i % 3),
                    &format!("pod-{i:02}"),
                    &format!("u{i}"),
                )
            })
            .collect();
        let mut exposed: Vec<Exposed> = (0..25)
            .rev()
            .map(|i| Exposed {
                uid: format!("u{i}"),
                edge: "host_network",
            })
            .collect();
        exposed.push(Exposed {
            uid: "gone".into(),
            edge: "pending",
        });
        let report = NetRawReport::new(&exposed, &rows);
        assert_eq!(report.total, 26);
        assert_eq!(report.pods.len(), MAX_ROWS);
        assert_eq!(report.more(), 6);
        // A pod no longer in the rows sorts first (empty names) and keeps its uid.
        assert_eq!(
            (report.pods[0].uid.as_str(), report.pods[0].pod.as_str()),
            ("gone", "")
        );
        assert_eq!(report.pods[1].namespace, "ns-0");
        assert_eq!(report.pods[1].pod, "pod-00");
        assert_eq!(report.pods[1].edge, "host_network");
        let keys: Vec<_> = report.pods.iter().map(|p| (&p.namespace, &p.pod)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn nothing_exposed_is_an_empty_report() {
        let report = NetRawReport::new(&[], &[row("a", "b", "u")]);
        assert_eq!(report, NetRawReport::default());
        assert_eq!(report.more(), 0);
    }

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

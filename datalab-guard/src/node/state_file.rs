//! The node agent's state file: what `status` shows beyond the pins (per environment
//! namespace: CNI enforcement as probed from this node; per pod: verdict, reason, audited
//! attempts; the counter classes' namespaces; where the verdicts come from: the API server
//! or, before the first full sync, the state cache). The NetworkPolicy and Pod Security
//! state is the controller's (its metrics and logs), not the node's: nodes do not watch
//! policies. The agent writes it after reconciles (at most once a second, off the reconcile
//! loop: [`super::outputs`]), and every few seconds before its first sync; `status` reads it
//! with the same types.
//!
//! The writer stamps the file with the `--bpffs` directory whose pins it describes, so that
//! `status` run against other pins (local mode on the same machine, say) does not present
//! this agent's pods and namespaces as theirs.
//!
//! It stays in `/run` (a tmpfs, emptied by a reboot) rather than in the state directory:
//! it describes this boot's enforcement, and `status` must not present what a previous boot
//! enforced as current.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use datalab_guard_common::Verdict;
use serde::{Deserialize, Serialize};

use super::{cache::CacheReport, net_raw::NetRawReport};
use crate::baseline_state::CniState;

/// Where the agent writes it and `status` reads it.
pub const DEFAULT_STATE_FILE: &str = "/run/datalab-guard/state.json";

/// A file older than this is shown as stale: the agent rewrites it at least every
/// [`crate::node::reconcile::PERIODIC_RECONCILE`] (5 s), so a minute without a write means
/// the agent is stuck, gone, or cannot write.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// The node the agent runs on.
    pub node: String,
    /// When it was written (seconds since the epoch).
    pub written_unix: u64,
    /// Environment namespaces, as this node knows them.
    pub namespaces: BTreeMap<String, NodeNamespaceState>,
    /// This node's pods, as of the write.
    pub pods: Vec<PodRow>,
    /// Counter class → namespace: which in-kernel counters are whose.
    pub counter_classes: BTreeMap<u32, String>,
    /// Where the verdicts in force come from (absent in files of older agents, which wrote
    /// only after a sync: `api`).
    #[serde(default)]
    pub enforcing_from: EnforcingFrom,
    /// The state cache: where, when it was written, why it was ignored.
    #[serde(default)]
    pub cache: CacheReport,
    /// Guarded pods whose processes hold CAP_NET_RAW while neither the BPF LSM nor the
    /// edge layer closes raw paths for them (`None`: not counted yet, or an older agent).
    #[serde(default)]
    pub net_raw: Option<NetRawReport>,
}

/// Where the verdicts in force come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcingFrom {
    /// The first full list of namespaces and pods arrived; the API is the authority.
    #[default]
    Api,
    /// Not synced with the API server yet: the state cache (and the unknown-cgroup verdict
    /// for everything it does not know).
    Cache,
}

/// What a node knows about one environment namespace: whether the CNI enforces its
/// NetworkPolicy, as probed from a pod on this node (`None`: not probed yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNamespaceState {
    pub cni: Option<CniState>,
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRow {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    #[serde(with = "crate::config::verdict_name")]
    pub verdict: Verdict,
    /// Why the verdict (the policy's reason name, e.g. `environment_namespace`).
    pub reason: String,
    /// The pod's cgroup, `None` while the kubelet has not made it.
    pub cgroup_id: Option<u64>,
    /// Audit records attributed to the pod (after the in-kernel rate limit, so a floor;
    /// exact totals are per namespace in the counters).
    #[serde(default)]
    pub audited_attempts: u64,
}

/// The file as written: the state and the bpffs directory whose pins it describes.
#[derive(Serialize)]
struct Stamped<'a> {
    bpffs: &'a Path,
    #[serde(flatten)]
    state: &'a StateFile,
}

/// The stamp alone, read from the same text (absent in files of older agents).
#[derive(Deserialize)]
struct Stamp {
    #[serde(default)]
    bpffs: Option<PathBuf>,
}

/// A state file as read: the state and, where the writer recorded it, the `--bpffs`
/// directory it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadStateFile {
    pub state: StateFile,
    pub bpffs: Option<PathBuf>,
}

impl ReadStateFile {
    /// Whether it describes the pins under `bpffs`. A file of an older agent, which did not
    /// record its directory, is taken to describe the node agent's default directory only.
    pub fn describes(&self, bpffs: &Path, node_default: &Path) -> bool {
        let recorded = self.bpffs.as_deref().unwrap_or(node_default);
        same_dir(recorded, bpffs)
    }
}

/// Paths compared as the filesystem resolves them where it can (trailing slashes, `..`,
/// symlinks), else as written.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.components().eq(b.components()),
    }
}

impl StateFile {
    /// Reads it; `Ok(None)` when there is none (not a node, or no agent has run).
    pub fn read(path: &Path) -> anyhow::Result<Option<StateFile>> {
        Ok(StateFile::read_stamped(path)?.map(|r| r.state))
    }

    /// Reads it with the bpffs directory it describes.
    pub fn read_stamped(path: &Path) -> anyhow::Result<Option<ReadStateFile>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::Error::new(e).context(path.display().to_string())),
        };
        let context = |e| anyhow::Error::new(e).context(path.display().to_string());
        let state = serde_json::from_str(&text).map_err(context)?;
        let stamp: Stamp = serde_json::from_str(&text).map_err(context)?;
        Ok(Some(ReadStateFile {
            state,
            bpffs: stamp.bpffs,
        }))
    }

    /// Seconds since it was written (0 if written "in the future": clocks differ).
    pub fn age_secs(&self, now: SystemTime) -> u64 {
        unix_secs(now).saturating_sub(self.written_unix)
    }

    pub fn is_stale(&self, now: SystemTime) -> bool {
        self.age_secs(now) > STALE_AFTER.as_secs()
    }
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes the file atomically (write, then rename) and logs failures at warn, once per
/// streak of failures (and once when writing works again).
pub struct StateFileWriter {
    path: PathBuf,
    /// The `--bpffs` directory of the agent's pins, recorded in every write.
    bpffs: PathBuf,
    failing: bool,
}

impl StateFileWriter {
    pub fn new(path: PathBuf, bpffs: PathBuf) -> StateFileWriter {
        StateFileWriter {
            path,
            bpffs,
            failing: false,
        }
    }

    pub fn write(&mut self, state: &StateFile) {
        let stamped = Stamped {
            bpffs: &self.bpffs,
            state,
        };
        match write_atomically(&self.path, &stamped) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(path = %self.path.display(), "state file written again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the state file; `status` shows stale data until this clears");
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "state file still not writable");
            }
        }
    }
}

fn write_atomically(path: &Path, state: &Stamped<'_>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        StateFile {
            node: "node-1".into(),
            written_unix: 1_700_000_000,
            namespaces: BTreeMap::from([(
                "tenant-a".to_owned(),
                NodeNamespaceState {
                    cni: Some(CniState::Enforced),
                },
            )]),
            pods: vec![PodRow {
                namespace: "tenant-a".into(),
                pod: "nb".into(),
                uid: "u1".into(),
                verdict: Verdict::Guard,
                reason: "environment_namespace".into(),
                cgroup_id: Some(42),
                audited_attempts: 3,
            }],
            counter_classes: BTreeMap::from([(1, "tenant-a".to_owned())]),
            enforcing_from: EnforcingFrom::Cache,
            cache: CacheReport {
                dir: Some("/var/lib/datalab-guard".into()),
                loaded_written_unix: Some(1_699_999_990),
                ..CacheReport::default()
            },
            net_raw: Some(NetRawReport {
                total: 2,
                pods: vec![super::super::net_raw::NetRawRow {
                    namespace: "tenant-a".into(),
                    pod: "nb".into(),
                    uid: "u1".into(),
                    edge: "host_network".into(),
                }],
            }),
        }
    }

    #[test]
    fn writes_and_reads_back_the_same_state() {
        let dir = std::env::temp_dir().join(format!("dg-state-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut writer = StateFileWriter::new(path.clone(), "/sys/fs/bpf/dg-a".into());
        writer.write(&sample());
        let back = StateFile::read_stamped(&path).unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.state, sample());
        assert_eq!(back.bpffs.as_deref(), Some(Path::new("/sys/fs/bpf/dg-a")));
    }

    #[test]
    fn describes_only_the_bpffs_it_was_written_for() {
        let default = Path::new("/sys/fs/bpf/datalab-guard");
        let stamped = |bpffs: Option<&str>| ReadStateFile {
            state: sample(),
            bpffs: bpffs.map(PathBuf::from),
        };
        let node = stamped(Some("/sys/fs/bpf/datalab-guard"));
        assert!(node.describes(Path::new("/sys/fs/bpf/datalab-guard/"), default));
        assert!(!node.describes(Path::new("/sys/fs/bpf/dg-local"), default));
        let other = stamped(Some("/sys/fs/bpf/dg-local"));
        assert!(other.describes(Path::new("/sys/fs/bpf/dg-local"), default));
        assert!(!other.describes(default, default));
        // Files of older agents: the node agent's default directory only.
        let old = stamped(None);
        assert!(old.describes(default, default));
        assert!(!old.describes(Path::new("/sys/fs/bpf/dg-local"), default));
    }

    #[test]
    fn keeps_the_json_shape_status_and_operators_read() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["pods"][0]["verdict"], "guard");
        assert_eq!(json["pods"][0]["cgroup_id"], 42);
        assert_eq!(json["counter_classes"]["1"], "tenant-a");
        assert_eq!(json["namespaces"]["tenant-a"]["cni"], "enforced");
        // The node does not know the policy or Pod Security state (the controller does).
        assert_eq!(json["namespaces"]["tenant-a"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn net_raw_rows_keep_their_shape_and_older_files_read_as_not_counted() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["net_raw"]["total"], 2);
        assert_eq!(json["net_raw"]["pods"][0]["pod"], "nb");
        assert_eq!(json["net_raw"]["pods"][0]["edge"], "host_network");
        let mut old = json;
        old.as_object_mut().unwrap().remove("net_raw");
        let state: StateFile = serde_json::from_value(old).unwrap();
        assert_eq!(state.net_raw, None);
    }

    #[test]
    fn cache_fields_round_trip() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["enforcing_from"], "cache");
        assert_eq!(json["cache"]["loaded_written_unix"], 1_699_999_990);
    }

    #[test]
    fn files_of_older_agents_read_as_api_synced() {
        let mut json = serde_json::to_value(sample()).unwrap();
        let obj = json.as_object_mut().unwrap();
        obj.remove("enforcing_from");
        obj.remove("cache");
        let state: StateFile = serde_json::from_value(json).unwrap();
        assert_eq!(state.enforcing_from, EnforcingFrom::Api);
        assert_eq!(state.cache, CacheReport::default());
    }

    #[test]
    fn a_missing_file_is_none_and_a_broken_one_an_error() {
        assert!(StateFile::read(Path::new("/nonexistent/dg/state.json"))
            .unwrap()
            .is_none());
        let path = std::env::temp_dir().join(format!("dg-state-bad-{}.json", std::process::id()));
        std::fs::write(&path, "{not json").unwrap();
        let err = StateFile::read(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{err:#}").contains("dg-state-bad"), "{err:#}");
    }

    #[test]
    fn age_and_staleness_follow_the_written_time() {
        let state = sample();
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(state.age_secs(at(1_700_000_010)), 10);
        assert!(!state.is_stale(at(1_700_000_060)));
        assert!(state.is_stale(at(1_700_000_061)));
        assert_eq!(state.age_secs(at(1_600_000_000)), 0);
    }

    #[test]
    fn write_failures_are_reported_once_per_streak() {
        // A path under a regular file cannot be created.
        let file = std::env::temp_dir().join(format!("dg-state-file-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let mut writer = StateFileWriter::new(file.join("state.json"), PathBuf::new());
        writer.write(&sample());
        assert!(writer.failing);
        writer.path = std::env::temp_dir().join(format!("dg-state-ok-{}.json", std::process::id()));
        writer.write(&sample());
        assert!(!writer.failing);
        std::fs::remove_file(&writer.path).unwrap();
        std::fs::remove_file(&file).unwrap();
    }
}

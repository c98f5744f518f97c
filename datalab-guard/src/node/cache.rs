//! The state directory's cache: what the node agent knew at its last API-synced reconcile,
//! kept on the host (`--state-dir`, default `/var/lib/datalab-guard`) so that after a
//! restart or a reboot it enforces the last known verdicts at once, before (and without)
//! the API server.
//!
//! What it holds: every namespace's labels, and this node's pods (uid, namespace, name,
//! labels, QoS class, the uid the kubelet named the cgroup with, and the last verdict for
//! people reading the file). Labels rather than verdicts, because the policy core decides
//! again under the config the agent runs with now: an exemption added since the last run
//! applies to cached pods too. The cached verdicts are a starting point only: the first full
//! API sync replaces them.
//!
//! Failure never opens anything: a missing, unreadable, corrupt, foreign (another node) or
//! future-format cache is reported and ignored, and every pod it cannot vouch for keeps the
//! unknown-cgroup verdict (guard). The file is written atomically (write to a per-process
//! temporary file, then rename), only when its contents changed, at most once per
//! [`MIN_WRITE_INTERVAL`].

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    io::Read as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use datalab_guard_common::{Verdict, VerdictEntry};
use datalab_guard_policy::{
    self as policy, NamespaceClasses, NamespaceInfo, PodInfo, PolicyConfig,
};
use serde::{Deserialize, Serialize};

use super::{
    audit_sink::PodRef,
    state_file::{unix_secs, PodRow},
};
use crate::{
    cgroups::pod::{is_valid_uid, DiscoveredPod},
    k8s::convert::{NamespaceLabels, NAME_LABEL},
};

/// The cache's file name inside the state directory.
pub const CACHE_FILE: &str = "cache.json";
/// Bumped when the layout changes incompatibly; another version is ignored (reported).
const FORMAT_VERSION: u32 = 1;
/// At most one write per this interval (the reconcile loop offers the contents every
/// reconcile, at most every 200 ms and at least every 5 s).
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// A larger file is not read (bounded memory whatever is on disk).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Namespace name → labels, as read back.
pub type LabelsByNamespace = BTreeMap<String, BTreeMap<String, String>>;

/// What is cached (without the header). Written with the namespaces as the live view holds
/// them ([`NamespacesOut`]: no copy of every namespace's labels), read back as
/// [`LabelsByNamespace`]; both serialize alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents<N = LabelsByNamespace> {
    pub namespaces: N,
    /// This node's pods, by uid.
    pub pods: Vec<CachedPod>,
}

/// The live view's namespaces (sorted by name) as they are written: each one's shared label
/// set with [`NAME_LABEL`] put back in its sorted place, so the bytes are those of the
/// equivalent [`LabelsByNamespace`].
pub struct NamespacesOut(pub Vec<(String, NamespaceLabels)>);

impl Serialize for NamespacesOut {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, ns) in &self.0 {
            map.serialize_entry(name, &LabelsOut { ns, name })?;
        }
        map.end()
    }
}

struct LabelsOut<'a> {
    ns: &'a NamespaceLabels,
    name: &'a str,
}

impl Serialize for LabelsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let labels = &*self.ns.labels;
        let mut map =
            serializer.serialize_map(Some(labels.len() + usize::from(self.ns.name_label)))?;
        let mut name_label_due = self.ns.name_label;
        for (key, value) in labels {
            if name_label_due && key.as_str() > NAME_LABEL {
                map.serialize_entry(NAME_LABEL, self.name)?;
                name_label_due = false;
            }
            map.serialize_entry(key, value)?;
        }
        if name_label_due {
            map.serialize_entry(NAME_LABEL, self.name)?;
        }
        map.end()
    }
}

/// One pod of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `status.qosClass`.
    #[serde(default)]
    pub qos_class: Option<String>,
    /// The uid the kubelet named the pod's cgroup with, when it is not `uid` (static pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_uid: Option<String>,
    /// The verdict at the time of the write, for people reading the file; the agent decides
    /// again from the labels.
    #[serde(with = "crate::config::verdict_name")]
    pub last_verdict: Verdict,
}

impl CachedPod {
    fn cgroup_uid(&self) -> &str {
        self.cgroup_uid.as_deref().unwrap_or(&self.uid)
    }

    fn pod_info(&self) -> PodInfo {
        PodInfo {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            qos_class: self.qos_class.clone(),
            ..PodInfo::default()
        }
    }
}

/// The file: a header and the contents.
#[derive(Debug, Serialize, Deserialize)]
struct CacheFile<N = LabelsByNamespace> {
    version: u32,
    node: String,
    written_unix: u64,
    #[serde(flatten)]
    contents: Contents<N>,
}

impl<N> Contents<N> {
    /// What to cache from the API caches as of a reconcile: every namespace's labels, and
    /// this node's pods that still run (`rows` give their verdicts).
    pub fn from_api<'a>(
        namespaces: N,
        pods: impl IntoIterator<Item = &'a PodInfo>,
        cgroup_uids: &HashMap<String, String>,
        rows: &[PodRow],
    ) -> Contents<N> {
        let verdicts: HashMap<&str, Verdict> =
            rows.iter().map(|r| (r.uid.as_str(), r.verdict)).collect();
        let mut pods: Vec<CachedPod> = pods
            .into_iter()
            .filter(|p| !p.is_terminated())
            .map(|p| CachedPod {
                uid: p.uid.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                labels: p.labels.clone(),
                qos_class: p.qos_class.clone(),
                cgroup_uid: cgroup_uids.get(&p.uid).cloned(),
                last_verdict: verdicts
                    .get(p.uid.as_str())
                    .copied()
                    .unwrap_or(Verdict::Guard),
            })
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        Contents { namespaces, pods }
    }
}

/// The outcome of reading the cache at start.
#[derive(Debug)]
pub enum Loaded {
    Cache(LoadedCache),
    /// No state directory, or no cache in it yet (a new node).
    Missing,
    /// There is a file but it cannot be used; the reason, for the log and `status`.
    Unusable(String),
}

/// A cache read at start, indexed for classifying cgroups.
#[derive(Debug, Default)]
pub struct LoadedCache {
    /// When the agent that wrote it wrote it (seconds since the epoch).
    pub written_unix: u64,
    namespaces: BTreeMap<String, NamespaceInfo>,
    /// cgroup uid → pod.
    pods: HashMap<String, PodInfo>,
}

/// What the cache says about the pod cgroups found on the node.
#[derive(Debug, Default)]
pub struct Classified {
    /// cgroup id → entry, for the pods the cache knows.
    pub verdicts: BTreeMap<u64, VerdictEntry>,
    /// One row per cached pod (for the state file), with its cgroup if found.
    pub rows: Vec<PodRow>,
    /// cgroup id → pod, for the audit lines.
    pub owners: HashMap<u64, PodRef>,
}

impl LoadedCache {
    fn from_contents(written_unix: u64, contents: Contents) -> LoadedCache {
        let namespaces = contents
            .namespaces
            .into_iter()
            .map(|(name, labels)| (name.clone(), NamespaceInfo { name, labels }))
            .collect();
        let pods = contents
            .pods
            .iter()
            .map(|p| (p.cgroup_uid().to_owned(), p.pod_info()))
            .collect();
        LoadedCache {
            written_unix,
            namespaces,
            pods,
        }
    }

    /// How many pods of this node it knows.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The cached namespace (its labels as last seen from the API).
    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.get(name)
    }

    /// Every cached namespace (labels), for classifying runtime-only pods before the sync.
    pub fn namespaces(&self) -> &BTreeMap<String, NamespaceInfo> {
        &self.namespaces
    }

    /// The cached pod whose cgroup is named after `cgroup_uid`.
    pub fn pod_by_cgroup_uid(&self, cgroup_uid: &str) -> Option<&PodInfo> {
        self.pods.get(cgroup_uid)
    }

    /// Seconds since it was written (0 if "in the future").
    pub fn age_secs(&self, now: SystemTime) -> u64 {
        unix_secs(now).saturating_sub(self.written_unix)
    }

    /// The verdict entry of one cached pod under `cfg` (class from `classes`).
    pub fn entry(
        &self,
        pod: &PodInfo,
        cfg: &PolicyConfig,
        classes: &mut NamespaceClasses,
    ) -> VerdictEntry {
        let decision = policy::verdict(pod, self.namespace(&pod.namespace), cfg);
        let class = if decision.verdict == Verdict::Guard {
            classes.class_of(&pod.namespace)
        } else {
            0
        };
        VerdictEntry {
            verdict: decision.verdict as u32,
            class,
        }
    }

    /// Classifies the pod cgroups found on the node (`found`, a scan of the pods' root) by
    /// the cached pods and namespaces under `cfg`. Cgroups the cache does not know get no
    /// entry (the unknown-cgroup verdict applies).
    pub fn classify(
        &self,
        found: &[DiscoveredPod],
        cfg: &PolicyConfig,
        classes: &mut NamespaceClasses,
    ) -> Classified {
        let dirs: HashMap<&str, u64> = found.iter().map(|d| (d.uid.as_str(), d.dir.id)).collect();
        let mut by_uid: Vec<(&String, &PodInfo)> = self.pods.iter().collect();
        by_uid.sort_by(|a, b| a.0.cmp(b.0));
        let resolved: Vec<(&PodInfo, Option<&NamespaceInfo>, Option<u64>)> = by_uid
            .iter()
            .map(|(cgroup_uid, pod)| {
                (
                    *pod,
                    self.namespace(&pod.namespace),
                    dirs.get(cgroup_uid.as_str()).copied(),
                )
            })
            .collect();
        let (verdicts, _) = policy::desired_entries(resolved.iter().copied(), cfg, classes);
        let mut out = Classified {
            verdicts,
            ..Classified::default()
        };
        for (pod, ns, id) in resolved {
            let decision = policy::verdict(pod, ns, cfg);
            out.rows.push(PodRow {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                uid: pod.uid.clone(),
                verdict: decision.verdict,
                reason: decision.reason.as_str().to_owned(),
                cgroup_id: id,
                audited_attempts: 0,
            });
            if let Some(id) = id {
                out.owners.insert(
                    id,
                    PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                    },
                );
            }
        }
        out
    }
}

/// Creates the state directory (mode 0700) if needed and checks that a file can be written
/// in it.
pub fn prepare_state_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&probe)?;
    fs::remove_file(&probe)
}

/// Reads the cache in `dir` written for `node`.
pub fn load(dir: &Path, node: &str) -> Loaded {
    let path = dir.join(CACHE_FILE);
    let file = match fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Unusable(format!("{}: {e}", path.display())),
    };
    let mut text = Vec::new();
    if let Err(e) = file.take(MAX_FILE_BYTES + 1).read_to_end(&mut text) {
        return Loaded::Unusable(format!("{}: {e}", path.display()));
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        return Loaded::Unusable(format!(
            "{}: larger than {MAX_FILE_BYTES} bytes",
            path.display()
        ));
    }
    match parse(&text, node) {
        Ok(cache) => Loaded::Cache(cache),
        Err(e) => Loaded::Unusable(format!("{}: {e}", path.display())),
    }
}

fn parse(text: &[u8], node: &str) -> Result<LoadedCache, String> {
    let file: CacheFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this agent reads {FORMAT_VERSION})",
            file.version
        ));
    }
    if file.node != node {
        return Err(format!("written for node {:?}, not {node:?}", file.node));
    }
    if let Some(bad) = file
        .contents
        .pods
        .iter()
        .find(|p| !is_valid_uid(p.cgroup_uid()))
    {
        return Err(format!("pod {:?} has an invalid cgroup uid", bad.name));
    }
    Ok(LoadedCache::from_contents(file.written_unix, file.contents))
}

/// Writes the cache when its contents changed, at a bounded rate; failures are logged once
/// per streak.
#[derive(Debug)]
pub struct CacheWriter {
    /// `None`: no state directory (nothing is written).
    path: Option<PathBuf>,
    node: String,
    /// Digest of the contents last written (not a copy: they hold every namespace).
    written: Option<u64>,
    last_write: Option<Instant>,
    /// When the last successful write happened (seconds since the epoch).
    pub last_written_unix: Option<u64>,
    failing: bool,
    /// What loading at start found, for [`CacheWriter::report`].
    loaded_written_unix: Option<u64>,
    load_error: Option<String>,
}

impl CacheWriter {
    pub fn new(dir: Option<&Path>, node: &str) -> CacheWriter {
        CacheWriter {
            path: dir.map(|d| d.join(CACHE_FILE)),
            node: node.to_owned(),
            written: None,
            last_write: None,
            last_written_unix: None,
            failing: false,
            loaded_written_unix: None,
            load_error: None,
        }
    }

    /// Remembers what loading at start found (for `status`).
    pub fn note_loaded(&mut self, loaded: &Loaded) {
        match loaded {
            Loaded::Cache(cache) => self.loaded_written_unix = Some(cache.written_unix),
            Loaded::Missing => {}
            Loaded::Unusable(e) => self.load_error = Some(e.clone()),
        }
    }

    /// The cache's part of the state file.
    pub fn report(&self) -> CacheReport {
        CacheReport {
            dir: self
                .path
                .as_deref()
                .and_then(Path::parent)
                .map(|d| d.display().to_string()),
            loaded_written_unix: self.loaded_written_unix,
            load_error: self.load_error.clone(),
            last_written_unix: self.last_written_unix,
        }
    }

    /// Whether an offer now could write (a state directory, and the last write at least
    /// [`MIN_WRITE_INTERVAL`] ago): lets the caller skip building the contents.
    pub fn due(&self) -> bool {
        self.path.is_some()
            && self
                .last_write
                .is_none_or(|t| t.elapsed() >= MIN_WRITE_INTERVAL)
    }

    /// Writes `contents` unless they are what was last written or the last write was less
    /// than [`MIN_WRITE_INTERVAL`] ago (then a later offer writes them).
    pub fn offer<N: Serialize>(&mut self, contents: Contents<N>) {
        let digest = digest_of(&contents);
        if !self.due() || self.written == Some(digest) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        self.last_write = Some(Instant::now());
        let now = unix_secs(SystemTime::now());
        let file = CacheFile {
            version: FORMAT_VERSION,
            node: self.node.clone(),
            written_unix: now,
            contents,
        };
        match write_atomically(path, &file) {
            Ok(()) => {
                if self.failing {
                    tracing::info!(path = %path.display(), "state cache written again");
                    self.failing = false;
                }
                self.last_written_unix = Some(now);
                self.written = Some(digest);
            }
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(path = %path.display(), error = %e, "cannot write the state cache; a restart without the API server would fall back to older or no verdicts");
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "state cache still not writable");
            }
        }
    }
}

/// A digest of the contents as serialized (what is written), to see whether they changed.
fn digest_of<N: Serialize>(contents: &Contents<N>) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    // Serializing these types cannot fail.
    serde_json::to_vec(contents)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn write_atomically<N: Serialize>(path: &Path, file: &CacheFile<N>) -> io::Result<()> {
    // Per process: two agents sharing a directory by mistake never mix their bytes.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec(file)?;
    let result = (|| {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut out, &bytes)?;
        out.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What `status` shows about the cache (a field of the state file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    /// The state directory; `None`: no cache (none configured usable).
    pub dir: Option<String>,
    /// When the cache loaded at start had been written; `None`: none was loaded.
    pub loaded_written_unix: Option<u64>,
    /// Why the cache found at start was ignored.
    pub load_error: Option<String>,
    /// The last successful write by this agent.
    pub last_written_unix: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use datalab_guard_policy::LabelSelector;

    use super::*;
    use crate::cgroups::{pod::QosClass, CgroupDir};

    const NODE: &str = "node-1";

    fn uid(n: u32) -> String {
        format!("{n:08x}-1111-2222-3333-444455556666")
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            environment_selector: LabelSelector::parse("env=true").unwrap(),
            exempt_namespaces: BTreeSet::new(),
            exempt_namespace_selectors: vec![],
            exempt_pod_selectors: vec![],
            non_environment_verdict: Verdict::Exempt,
            own_pod_uid: None,
        }
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> (String, NamespaceInfo) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        (
            name.to_owned(),
            NamespaceInfo {
                name: name.to_owned(),
                labels,
            },
        )
    }

    fn pod(n: u32, namespace: &str) -> PodInfo {
        PodInfo {
            uid: uid(n),
            namespace: namespace.to_owned(),
            name: format!("pod-{n}"),
            ..PodInfo::default()
        }
    }

    fn found(n: u32, id: u64) -> DiscoveredPod {
        DiscoveredPod {
            uid: uid(n),
            qos: QosClass::BestEffort,
            dir: CgroupDir {
                path: PathBuf::from(format!("/pods/{n}")),
                id,
                level: 3,
            },
            containers: vec![],
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dg-cache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Namespace name → labels, from `ns` pairs.
    fn labels_of(namespaces: &[(String, NamespaceInfo)]) -> LabelsByNamespace {
        (namespaces.iter())
            .map(|(name, ns)| (name.clone(), ns.labels.clone()))
            .collect()
    }

    fn sample() -> Contents {
        let namespaces = labels_of(&[ns("tenant", &[("env", "true")]), ns("kube-system", &[])]);
        let pods = [pod(1, "tenant"), pod(2, "kube-system"), pod(3, "gone-ns")];
        Contents::from_api(namespaces, &pods, &HashMap::new(), &[])
    }

    #[test]
    fn the_live_views_namespaces_are_written_as_their_labels_would_be() {
        let shared = std::sync::Arc::new(BTreeMap::from([
            ("a-first".to_owned(), "1".to_owned()),
            ("z-last".to_owned(), "2".to_owned()),
        ]));
        let live = |name_label| NamespaceLabels {
            labels: shared.clone(),
            name_label,
        };
        let out = NamespacesOut(vec![
            ("env-a".to_owned(), live(true)),
            ("env-b".to_owned(), live(false)),
        ]);
        let expected: LabelsByNamespace = BTreeMap::from([
            ("env-a".to_owned(), live(true).info("env-a").labels),
            ("env-b".to_owned(), live(false).info("env-b").labels),
        ]);
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
        assert!(expected["env-a"].contains_key(NAME_LABEL));
    }

    #[test]
    fn written_contents_classify_the_cgroups_found_at_start() {
        let dir = scratch("roundtrip");
        prepare_state_dir(&dir).unwrap();
        let mut writer = CacheWriter::new(Some(&dir), NODE);
        writer.offer(sample());
        assert!(writer.last_written_unix.is_some());
        let Loaded::Cache(cache) = load(&dir, NODE) else {
            panic!("cache not loaded")
        };
        fs::remove_dir_all(&dir).unwrap();
        let mut classes = NamespaceClasses::new();
        // pod 4 has a cgroup but is not cached: no entry (unknown stays guard).
        let out = cache.classify(
            &[found(1, 101), found(2, 102), found(3, 103), found(4, 104)],
            &cfg(),
            &mut classes,
        );
        let verdict = |id| out.verdicts.get(&id).map(|e| Verdict::from_raw(e.verdict));
        assert_eq!(verdict(101), Some(Verdict::Guard));
        assert_eq!(verdict(102), Some(Verdict::Exempt));
        // Its namespace is not cached: fail closed.
        assert_eq!(verdict(103), Some(Verdict::Guard));
        assert_eq!(verdict(104), None);
        assert_ne!(
            out.verdicts[&101].class, 0,
            "tenant pods count per namespace"
        );
        assert_eq!(out.rows.len(), 3);
        assert_eq!(out.owners[&102].name, "pod-2");
    }

    #[test]
    fn the_current_config_decides_not_the_cached_verdict() {
        let cache = LoadedCache::from_contents(1, sample());
        let mut exempting = cfg();
        exempting.environment_selector = LabelSelector::parse("env=other").unwrap();
        let out = cache.classify(&[found(1, 101)], &exempting, &mut NamespaceClasses::new());
        assert_eq!(out.verdicts[&101].verdict, Verdict::Exempt as u32);
    }

    #[test]
    fn static_pods_are_found_by_their_cgroup_uid() {
        let namespaces = labels_of(&[ns("kube-system", &[])]);
        let cgroup_uids = HashMap::from([(uid(5), uid(6))]);
        let contents = Contents::from_api(namespaces, &[pod(5, "kube-system")], &cgroup_uids, &[]);
        let cache = LoadedCache::from_contents(1, contents);
        assert!(cache.pod_by_cgroup_uid(&uid(6)).is_some());
        assert!(cache.pod_by_cgroup_uid(&uid(5)).is_none());
    }

    #[test]
    fn unusable_caches_are_reported_not_used() {
        let dir = scratch("bad");
        prepare_state_dir(&dir).unwrap();
        assert!(matches!(load(&dir, NODE), Loaded::Missing));
        let cases: [(&str, &str); 4] = [
            ("{not json", "key must be a string"),
            (
                r#"{"version":9,"node":"node-1","written_unix":1,"namespaces":{},"pods":[]}"#,
                "format version 9",
            ),
            (
                r#"{"version":1,"node":"node-2","written_unix":1,"namespaces":{},"pods":[]}"#,
                "written for node \"node-2\"",
            ),
            (
                r#"{"version":1,"node":"node-1","written_unix":1,"namespaces":{},"pods":[{"uid":"../x","namespace":"a","name":"p","last_verdict":"exempt"}]}"#,
                "invalid cgroup uid",
            ),
        ];
        for (text, want) in cases {
            fs::write(dir.join(CACHE_FILE), text).unwrap();
            match load(&dir, NODE) {
                Loaded::Unusable(e) => assert!(e.contains(want), "{want}: {e}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_only_changes_and_at_a_bounded_rate() {
        let dir = scratch("rate");
        prepare_state_dir(&dir).unwrap();
        let mut writer = CacheWriter::new(Some(&dir), NODE);
        writer.offer(sample());
        let first = fs::metadata(dir.join(CACHE_FILE))
            .unwrap()
            .modified()
            .unwrap();
        let mut changed = sample();
        changed.namespaces.insert("new".into(), BTreeMap::new());
        writer.offer(changed.clone());
        let Loaded::Cache(cache) = load(&dir, NODE) else {
            panic!()
        };
        assert!(cache.namespace("new").is_none(), "too soon: not written");
        writer.last_write = Some(Instant::now() - MIN_WRITE_INTERVAL);
        writer.offer(changed);
        let Loaded::Cache(cache) = load(&dir, NODE) else {
            panic!()
        };
        assert!(cache.namespace("new").is_some());
        assert!(
            fs::metadata(dir.join(CACHE_FILE))
                .unwrap()
                .modified()
                .unwrap()
                >= first
        );
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != CACHE_FILE)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_dir_that_cannot_be_written_is_an_error() {
        let file = scratch("not-a-dir");
        fs::write(&file, "").unwrap();
        assert!(prepare_state_dir(&file.join("sub")).is_err());
        fs::remove_file(&file).unwrap();
        let mut writer = CacheWriter::new(Some(&file.join("sub")), NODE);
        writer.offer(sample());
        assert!(writer.failing && writer.last_written_unix.is_none());
    }
}

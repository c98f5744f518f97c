//! The pod index: this node's pods (from the API caches) matched to their cgroup
//! directories (from the filesystem and the watcher), and from those the verdict-map entries
//! the kernel should hold, the cgroup owners the audit stream names, the pod gauges and the
//! state file's rows. The policy decides each verdict; this module only gathers the inputs
//! and keeps the lookups cheap (10 000 pods must not mean 30 000 stats per reconcile).
//!
//! Pods the API view does not know but the container runtime reported (see
//! [`super::runtime_classify`]) are kept beside the API's pods while their cgroup exists;
//! they get entries only as long as the API does not know them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
};

use super::runtime_classify::{self, RuntimePod};

use datalab_guard_common::{Verdict, VerdictEntry};
use datalab_guard_policy::{
    self as policy, NamespaceClasses, NamespaceInfo, PodInfo, PolicyConfig,
};

use super::{
    audit_sink::{CgroupOwners, PodRef},
    context::Gauges,
    probe_targets::PodCgroupResolver,
    state_file::PodRow,
};
use crate::{
    cgroups::{
        self,
        pod::{self as podcgroup, CgroupDriver, QosClass},
        watch::CgroupEvent,
        CgroupDir,
    },
    cri::SandboxInfo,
    k8s::{convert::NodePod, ClusterView},
};

/// What one reconcile computed.
pub struct Desired {
    /// cgroup id → entry: what the verdict map must hold.
    pub verdicts: BTreeMap<u64, VerdictEntry>,
    pub owners: CgroupOwners,
    pub gauges: Gauges,
    /// One row per pod for the state file (attempt counts are added by the caller).
    pub rows: Vec<PodRow>,
}

/// A pod with its namespace and (once the kubelet made it) its cgroup id.
type Resolved<'a> = (&'a PodInfo, Option<&'a NamespaceInfo>, Option<u64>);

pub struct PodIndex {
    root: CgroupDir,
    driver: CgroupDriver,
    pub policy: PolicyConfig,
    /// Namespace → counter class (bounded; see `policy::classes`).
    pub classes: NamespaceClasses,
    /// API uid → the uid the kubelet named the cgroup with (differs for static pods).
    cgroup_uids: HashMap<String, String>,
    /// API uid → the pod's cgroup directory, once the kubelet has made it.
    dirs: HashMap<String, CgroupDir>,
    /// Pod directories (ids) that gained a child since the last container scan.
    container_scan: HashSet<u64>,
    /// Pod uids of the cgroup directories the watcher has seen.
    discovered: HashSet<String>,
    /// cgroup uid → pod, as of the last reconcile (for the new-cgroup fast path).
    by_uid: HashMap<String, Arc<NodePod>>,
    /// Pod cgroups the watcher has seen whose pod has no directory here yet (the cgroup
    /// came first): what a watch event may resolve, looked at instead of every pod.
    awaiting_pod: HashSet<String>,
    /// cgroup uid → pod the runtime reported, while its cgroup exists.
    runtime_pods: HashMap<String, RuntimePod>,
    /// Of those, the ones the API did not know at the last reconcile.
    runtime_count: u64,
    /// Namespace labels from the state cache, for runtime-only pods whose namespace the
    /// live view does not hold (before the first sync, or with the API down).
    pub cached_namespaces: BTreeMap<String, NamespaceInfo>,
}

impl PodIndex {
    /// Starts from a scan of the pods' root (what exists before the watcher runs).
    pub fn new(root: CgroupDir, driver: CgroupDriver, policy: PolicyConfig) -> PodIndex {
        let discovered = podcgroup::scan_pods(&root.path, driver)
            .map(|found| found.into_iter().map(|d| d.uid).collect())
            .unwrap_or_default();
        PodIndex {
            root,
            driver,
            policy,
            classes: NamespaceClasses::new(),
            cgroup_uids: HashMap::new(),
            dirs: HashMap::new(),
            container_scan: HashSet::new(),
            discovered,
            by_uid: HashMap::new(),
            awaiting_pod: HashSet::new(),
            runtime_pods: HashMap::new(),
            runtime_count: 0,
            cached_namespaces: BTreeMap::new(),
        }
    }

    /// The cgroup directory of pod `uid` (API uid), once the kubelet has made it; for a pod
    /// only the runtime knows, the directory it was reported in (keyed by the uid its state
    /// row shows).
    pub fn dir_of_pod(&self, uid: &str) -> Option<&CgroupDir> {
        self.dirs
            .get(uid)
            .or_else(|| self.runtime_pods.get(uid).map(|p| &p.dir))
    }

    pub fn root(&self) -> &CgroupDir {
        &self.root
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// What the CNI probe's target selection needs (a copy: it runs on its own task).
    pub fn resolver(&self) -> PodCgroupResolver {
        PodCgroupResolver {
            root: self.root.path.clone(),
            driver: self.driver,
            policy: Arc::new(self.policy.clone()),
        }
    }

    /// Computes everything the kernel and the agent's views need from the caches and the
    /// cgroup tree. `previous` are the owners of the last reconcile: container entries of
    /// pods whose directories did not change are kept rather than read again.
    pub fn desired(&mut self, view: &ClusterView, previous: CgroupOwners) -> Desired {
        // Shared records, borrowed: a node's pods are not copied on every reconcile.
        let records = view.node_pods();
        let pods: Vec<&PodInfo> = records.iter().map(|p| &p.info).collect();
        self.cgroup_uids = crate::k8s::convert::cgroup_uids(&records);
        self.free_classes_of_former_environments(view);
        let namespaces = self.namespaces_in_use(view, &pods);
        let newly_resolved = self.resolve_dirs(&pods);
        let resolved: Vec<Resolved<'_>> = pods
            .iter()
            .map(|pod| {
                let dir = self.dirs.get(&pod.uid).map(|d| d.id);
                (*pod, namespaces.get(&pod.namespace), dir)
            })
            .collect();
        let (mut verdicts, summary) =
            policy::desired_entries(resolved.iter().copied(), &self.policy, &mut self.classes);
        let mut rows = self.rows(&resolved);
        let mut owners = CgroupOwners {
            pods: self.pod_owners(&pods),
            containers: HashMap::new(),
        };
        owners.containers = self.container_owners(&pods, newly_resolved, previous, &owners);
        let mut gauges = Gauges {
            guarded: summary.guarded as u64,
            exempt: summary.exempt as u64,
            unknown: 0,
        };
        self.by_uid = records
            .iter()
            .map(|p| (self.cgroup_uid(&p.info).to_owned(), p.clone()))
            .collect();
        let dirs = &self.dirs;
        self.awaiting_pod.retain(|uid| !dirs.contains_key(uid));
        self.add_runtime_pods(
            &namespaces,
            &mut verdicts,
            &mut rows,
            &mut owners,
            &mut gauges,
        );
        gauges.unknown = self.unknown_cgroups(&pods);
        Desired {
            verdicts,
            owners,
            gauges,
            rows,
        }
    }

    /// Pods only the runtime knows, beside the API's (which [`Self::desired`] has just put
    /// in `by_uid`): their entries (an API pod's entry on the same cgroup wins; two claims
    /// merge fail-closed), rows, owners and counts.
    fn add_runtime_pods(
        &mut self,
        namespaces: &BTreeMap<String, NamespaceInfo>,
        verdicts: &mut BTreeMap<u64, VerdictEntry>,
        rows: &mut Vec<PodRow>,
        owners: &mut CgroupOwners,
        gauges: &mut Gauges,
    ) {
        let mut count = 0u64;
        for (uid, pod) in &self.runtime_pods {
            if self.by_uid.contains_key(uid) {
                continue;
            }
            count += 1;
            let s = &pod.sandbox;
            let (decision, entry) = self.runtime_entry(s, namespaces.get(&s.namespace));
            match decision.verdict {
                Verdict::Guard => gauges.guarded += 1,
                Verdict::Exempt => gauges.exempt += 1,
            }
            verdicts
                .entry(pod.dir.id)
                .and_modify(|e| {
                    if decision.verdict == Verdict::Guard {
                        *e = entry;
                    }
                })
                .or_insert(entry);
            rows.push(PodRow {
                namespace: s.namespace.clone(),
                pod: s.name.clone(),
                uid: s.uid.clone(),
                verdict: decision.verdict,
                reason: format!("runtime:{}", decision.reason),
                cgroup_id: Some(pod.dir.id),
                audited_attempts: 0,
            });
            owners.pods.entry(pod.dir.id).or_insert_with(|| PodRef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                uid: s.uid.clone(),
            });
        }
        self.runtime_count = count;
    }

    /// The verdict and map entry of a pod known from the runtime.
    fn runtime_entry(
        &self,
        sandbox: &SandboxInfo,
        ns: Option<&NamespaceInfo>,
    ) -> (runtime_classify::RuntimeDecision, VerdictEntry) {
        let decision = runtime_classify::classify(sandbox, ns, &self.policy);
        // Counter class only for a namespace known to be an environment that already has one.
        let class = match (decision.verdict, ns) {
            (Verdict::Guard, Some(ns)) if self.policy.is_environment(ns) => {
                self.classes.class_of(&ns.name)
            }
            _ => policy::UNCLASSIFIED,
        };
        let entry = VerdictEntry {
            verdict: decision.verdict as u32,
            class,
        };
        (decision, entry)
    }

    /// Pods whose verdict comes from the runtime, as of the last reconcile.
    pub fn runtime_count(&self) -> u64 {
        self.runtime_count
    }

    /// Whether the API view knows the pod whose cgroup is named after `cgroup_uid`. A pod
    /// announced since the last reconcile is looked up alone (its API uid is the cgroup's,
    /// or a static pod's mirror annotation maps to it) and remembered: a new cgroup must not
    /// cost a copy of every pod on the node.
    pub fn api_knows(&mut self, view: &ClusterView, cgroup_uid: &str) -> bool {
        if self.by_uid.contains_key(cgroup_uid) {
            return true;
        }
        match view
            .api_uid_of_cgroup(cgroup_uid)
            .and_then(|api_uid| view.node_pod(&api_uid))
        {
            Some(pod) => {
                self.by_uid.insert(cgroup_uid.to_owned(), pod);
                true
            }
            None => false,
        }
    }

    /// Whether the runtime already told us about the pod of this cgroup uid.
    pub fn runtime_knows(&self, cgroup_uid: &str) -> bool {
        self.runtime_pods.contains_key(cgroup_uid)
    }

    /// The runtime reported `sandbox` as the pod of the cgroup `pod<uid>` (at `path` when the
    /// caller knows it, else looked up under the root): remember it and return the entry to
    /// write now — unless the API knows the pod (it is the authority) or the cgroup is gone.
    pub fn adopt_runtime_pod(
        &mut self,
        view: &ClusterView,
        sandbox: SandboxInfo,
        path: Option<&Path>,
    ) -> Option<(u64, VerdictEntry)> {
        let uid = sandbox.uid.clone();
        if !podcgroup::is_valid_uid(&uid) || self.api_knows(view, &uid) {
            return None;
        }
        let dir = match path {
            Some(path) => cgroups::validate_cgroup_dir(path).ok()?,
            None => self.dir_of_cgroup_uid(&uid)?,
        };
        // The live view's labels; before the first sync (or for a namespace the view lost),
        // the state cache's; else name-only rules (fail closed).
        let live = view.namespace(&sandbox.namespace);
        let namespace = live
            .as_ref()
            .or_else(|| self.cached_namespaces.get(&sandbox.namespace));
        let (decision, entry) = self.runtime_entry(&sandbox, namespace);
        tracing::info!(
            namespace = %sandbox.namespace,
            pod = %sandbox.name,
            uid = %uid,
            verdict = decision.verdict.name(),
            reason = decision.reason,
            "pod classified from the container runtime (the API does not know it yet)"
        );
        let id = dir.id;
        self.runtime_pods.insert(uid, RuntimePod { sandbox, dir });
        Some((id, entry))
    }

    /// The pod cgroup named after `cgroup_uid`, in whichever QoS class it is.
    fn dir_of_cgroup_uid(&self, cgroup_uid: &str) -> Option<CgroupDir> {
        QosClass::ALL.iter().find_map(|qos| {
            let path = podcgroup::pod_cgroup_dir(&self.root.path, self.driver, *qos, cgroup_uid);
            cgroups::validate_cgroup_dir(&path).ok()
        })
    }

    /// Namespaces that left the environment set give their counter class back.
    fn free_classes_of_former_environments(&mut self, view: &ClusterView) {
        let policy = &self.policy;
        self.classes.retain(|name| {
            view.namespace(name)
                .is_some_and(|ns| policy.is_environment(&ns))
        });
    }

    /// The namespaces of this node's pods (the API's and the runtime's), looked up one by
    /// one: a node needs a few hundred of them, not a copy of the cluster's tens of
    /// thousands on every reconcile.
    fn namespaces_in_use(
        &self,
        view: &ClusterView,
        pods: &[&PodInfo],
    ) -> BTreeMap<String, NamespaceInfo> {
        let names: HashSet<&str> = pods
            .iter()
            .map(|p| p.namespace.as_str())
            .chain(
                self.runtime_pods
                    .values()
                    .map(|p| p.sandbox.namespace.as_str()),
            )
            .collect();
        names
            .into_iter()
            .filter_map(|name| view.namespace(name))
            .map(|ns| (ns.name.clone(), ns))
            .collect()
    }

    /// Drops directories of pods that are gone and looks up those not found yet (inotify
    /// removals invalidate the rest). Returns the ids found now.
    fn resolve_dirs(&mut self, pods: &[&PodInfo]) -> Vec<u64> {
        let live: HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        self.dirs.retain(|uid, _| live.contains(uid.as_str()));
        let mut newly_resolved = Vec::new();
        for pod in pods {
            if !self.dirs.contains_key(&pod.uid) {
                if let Some(dir) = self.pod_dir(pod) {
                    newly_resolved.push(dir.id);
                    self.dirs.insert(pod.uid.clone(), dir);
                }
            }
        }
        newly_resolved
    }

    fn rows(&self, resolved: &[Resolved<'_>]) -> Vec<PodRow> {
        resolved
            .iter()
            .map(|(pod, ns, id)| {
                let decision = policy::verdict(pod, *ns, &self.policy);
                PodRow {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    uid: pod.uid.clone(),
                    verdict: decision.verdict,
                    reason: decision.reason.as_str().to_owned(),
                    cgroup_id: *id,
                    audited_attempts: 0,
                }
            })
            .collect()
    }

    fn pod_owners(&self, pods: &[&PodInfo]) -> HashMap<u64, PodRef> {
        pods.iter()
            .filter_map(|pod| {
                let dir = self.dirs.get(&pod.uid)?;
                Some((
                    dir.id,
                    PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                    },
                ))
            })
            .collect()
    }

    /// Container sub-cgroups, for naming containers in audit lines: scanned for pods seen
    /// for the first time and pods whose directory gained a child since; kept for the rest.
    fn container_owners(
        &mut self,
        pods: &[&PodInfo],
        newly_resolved: Vec<u64>,
        previous: CgroupOwners,
        owners: &CgroupOwners,
    ) -> HashMap<u64, (u64, String)> {
        let rescan: HashSet<u64> = newly_resolved
            .into_iter()
            .chain(self.container_scan.drain())
            .collect();
        let mut containers: HashMap<u64, (u64, String)> = previous
            .containers
            .into_iter()
            .filter(|(_, (pod, _))| owners.pods.contains_key(pod) && !rescan.contains(pod))
            .collect();
        for pod in pods {
            let Some(dir) = self.dirs.get(&pod.uid) else {
                continue;
            };
            if rescan.contains(&dir.id) {
                scan_containers(pod, dir, &mut containers);
            }
        }
        containers
    }

    /// Pod cgroups with no pod behind them, from the watcher's last full scan.
    fn unknown_cgroups(&self, pods: &[&PodInfo]) -> u64 {
        let known: HashSet<&str> = pods
            .iter()
            .flat_map(|p| [p.uid.as_str(), self.cgroup_uid(p)])
            .collect();
        self.discovered
            .iter()
            .filter(|uid| !known.contains(uid.as_str()) && !self.runtime_pods.contains_key(*uid))
            .count() as u64
    }

    /// The uid the kubelet names the pod's cgroup with.
    fn cgroup_uid<'a>(&'a self, pod: &'a PodInfo) -> &'a str {
        self.cgroup_uids
            .get(&pod.uid)
            .map_or(pod.uid.as_str(), String::as_str)
    }

    /// A watcher event: keeps the caches in line with the cgroup tree.
    pub fn observe(&mut self, event: &CgroupEvent) {
        match event {
            CgroupEvent::Created(path) => {
                if let Some(parent) = path
                    .parent()
                    .and_then(|p| cgroups::validate_cgroup_dir(p).ok())
                {
                    if self.dirs.values().any(|d| d.id == parent.id) {
                        self.container_scan.insert(parent.id);
                    }
                }
                if let Some(uid) = pod_uid_of(path) {
                    if !self.dirs.contains_key(&uid) {
                        self.awaiting_pod.insert(uid.clone());
                    }
                    self.discovered.insert(uid);
                }
            }
            CgroupEvent::Removed(path) => {
                // Only pod directories are held; a container's removal changes nothing here.
                if let Some(uid) = pod_uid_of(path) {
                    self.forget_pod_dir(&uid, path);
                    self.discovered.remove(&uid);
                    self.awaiting_pod.remove(&uid);
                }
            }
            CgroupEvent::Rescan(found) => {
                self.discovered = found.iter().map(|d| d.uid.clone()).collect();
                let dirs = &self.dirs;
                self.awaiting_pod = (self.discovered.iter())
                    .filter(|uid| !dirs.contains_key(*uid))
                    .cloned()
                    .collect();
                let by_path: HashSet<&Path> = found.iter().map(|d| d.dir.path.as_path()).collect();
                self.dirs.retain(|_, d| by_path.contains(d.path.as_path()));
                self.runtime_pods
                    .retain(|_, p| by_path.contains(p.dir.path.as_path()));
            }
        }
    }

    /// A pod cgroup just appeared: if the API already told us about the pod, its entry now
    /// rather than at the next reconcile, so its containers start under the right verdict.
    pub fn new_pod_cgroup(
        &mut self,
        view: &ClusterView,
        path: &Path,
    ) -> Option<(u64, VerdictEntry)> {
        let uid = pod_uid_of(path)?;
        // Announced since the last reconcile: refresh the index (no syscalls, just the cache).
        if !self.api_knows(view, &uid) {
            return None;
        }
        let pod = self.by_uid.get(&uid)?.info.clone();
        let dir = cgroups::validate_cgroup_dir(path).ok()?;
        let namespace = view.namespace(&pod.namespace);
        let (_, entry) =
            policy::event_entry(&pod, namespace.as_ref(), &self.policy, &mut self.classes);
        let id = dir.id;
        self.dirs.insert(pod.uid, dir);
        Some((id, entry))
    }

    /// After a watch event: pods the API announced whose cgroup the watcher has already
    /// seen (the cgroup came first) and that have no directory yet get their entry now,
    /// not at the next debounced reconcile. Only such pods are converted and looked up, so
    /// this stays cheap on a node with thousands of pods.
    pub fn announced_with_cgroup(&mut self, view: &ClusterView) -> Vec<(u64, VerdictEntry)> {
        let records: Vec<Arc<NodePod>> = (self.awaiting_pod.iter())
            .filter(|uid| !self.dirs.contains_key(*uid))
            .filter_map(|uid| view.node_pod(uid))
            .collect();
        let mut entries = Vec::new();
        for record in records {
            let pod = &record.info;
            let Some(dir) = self.pod_dir(pod) else {
                continue;
            };
            let namespace = view.namespace(&pod.namespace);
            let (_, entry) =
                policy::event_entry(pod, namespace.as_ref(), &self.policy, &mut self.classes);
            entries.push((dir.id, entry));
            self.awaiting_pod.remove(&pod.uid);
            self.by_uid.insert(pod.uid.clone(), record.clone());
            self.dirs.insert(pod.uid.clone(), dir);
        }
        entries
    }

    /// The pod directory at `path` (named after cgroup uid `uid`) is gone: forget it. The
    /// directories are keyed by API uid, which is the cgroup's uid for all but static pods.
    fn forget_pod_dir(&mut self, uid: &str, path: &Path) {
        let api_uid = match self.dirs.get(uid) {
            Some(dir) if dir.path == path => Some(uid.to_owned()),
            _ => (self.cgroup_uids.iter())
                .find(|(_, cgroup_uid)| cgroup_uid.as_str() == uid)
                .map(|(api_uid, _)| api_uid.clone()),
        };
        if let Some(api_uid) = api_uid {
            if self.dirs.get(&api_uid).is_some_and(|d| d.path == path) {
                self.dirs.remove(&api_uid);
            }
        }
        if self
            .runtime_pods
            .get(uid)
            .is_some_and(|p| p.dir.path == path)
        {
            self.runtime_pods.remove(uid);
        }
    }

    /// The pod's cgroup directory, if the kubelet has created it. The QoS class decides the
    /// parent; when the API has not reported it yet every class is tried.
    fn pod_dir(&self, pod: &PodInfo) -> Option<CgroupDir> {
        let classes: Vec<QosClass> = match pod
            .qos_class
            .as_deref()
            .and_then(|q| q.parse::<QosClass>().ok())
        {
            Some(q) => vec![q],
            None => QosClass::ALL.to_vec(),
        };
        // Static pods' cgroups carry the config hash (the mirror annotation), not the API uid.
        let uid = self.cgroup_uid(pod);
        classes.into_iter().find_map(|qos| {
            let path = podcgroup::pod_cgroup_dir(&self.root.path, self.driver, qos, uid);
            cgroups::validate_cgroup_dir(&path).ok()
        })
    }
}

/// The pod uid in a pod cgroup directory's name.
pub fn pod_uid_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    podcgroup::parse_pod_dir_name(&name).map(|(_, uid)| uid)
}

/// Adds the container cgroups under a pod's directory whose ids the pod's status names.
fn scan_containers(pod: &PodInfo, dir: &CgroupDir, containers: &mut HashMap<u64, (u64, String)>) {
    let names: HashMap<String, String> = pod
        .containers
        .iter()
        .filter_map(|c| {
            let (_, id) = podcgroup::container_id_from_status(c.container_id.as_deref()?)?;
            Some((id.to_owned(), c.name.clone()))
        })
        .collect();
    let Ok(children) = std::fs::read_dir(&dir.path) else {
        return;
    };
    for child in children.flatten() {
        let name = child.file_name().to_string_lossy().into_owned();
        let Some(parsed) = podcgroup::parse_container_dir_name(&name) else {
            continue;
        };
        let Some(container) = names.get(&parsed.id) else {
            continue;
        };
        if let Ok(meta) = child.metadata() {
            containers.insert(meta.ino(), (dir.id, container.clone()));
        }
    }
}

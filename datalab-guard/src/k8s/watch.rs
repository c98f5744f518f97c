//! Node-local caches of the cluster: every Namespace, listed and watched as metadata only
//! (`Accept: ...;as=PartialObjectMetadata`: labels are all a node needs), and the Pods
//! scheduled on this node (`spec.nodeName` field selector), each converted on arrival into
//! the agent's own compact record ([`super::store::CompactStore`]: a name and a shared label
//! set per namespace, a [`NodePod`] per pod), so that 20 000 namespaces cost a few MiB.
//! Every change pokes a `Notify` so the agent reconciles at once. The list-and-watch loops ([`super::informer`]) recover from API outages, 410 Gone
//! and stalled streams within seconds and never touch what is enforced; their health
//! (staleness, relists, errors) is in [`WatchHealth`].

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use datalab_guard_policy::NamespaceInfo;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{core::PartialObjectMeta, Api, Client};
use tokio::sync::Notify;

use super::{
    convert::{node_pod, NamespaceLabels, NodePod, NAME_LABEL},
    informer::{Informer, WatchStats},
    store::{Compact, CompactStore},
};
use crate::metrics::WatchSample;

/// The health of the node's two watches, shared by the [`ClusterView`] and the metrics.
/// Create it first (the metrics endpoint serves before the first sync) and hand it to
/// [`ClusterView::start`].
#[derive(Clone, Debug, Default)]
pub struct WatchHealth {
    pub namespaces: Arc<WatchStats>,
    pub pods: Arc<WatchStats>,
}

impl WatchHealth {
    /// One sample per watch (`resource` = `namespaces` | `pods`) for the metrics.
    pub fn samples(&self) -> Vec<WatchSample> {
        vec![
            WatchSample::of("namespaces", &self.namespaces),
            WatchSample::of("pods", &self.pods),
        ]
    }
}

pub struct ClusterView {
    pods: CompactStore<Arc<NodePod>>,
    namespaces: CompactStore<NamespaceLabels>,
    changed: Arc<Notify>,
    health: WatchHealth,
}

/// Pods keyed by uid, as [`NodePod`]s.
struct PodRecords;

impl Compact<Pod> for PodRecords {
    type Record = Arc<NodePod>;

    fn key(pod: &Pod) -> Option<Box<str>> {
        pod.metadata.uid.as_deref().map(Box::from)
    }

    fn record(&mut self, pod: Pod) -> Option<Arc<NodePod>> {
        node_pod(pod).map(Arc::new)
    }
}

/// Namespaces keyed by name, their label sets interned.
#[derive(Default)]
struct NamespaceRecords {
    sets: HashSet<Arc<BTreeMap<String, String>>>,
    /// Records written since the last sweep of unused sets.
    since_sweep: usize,
}

/// Label sets are swept of unused ones after every list and after this many writes, so
/// that relabelling cannot grow the interner without bound.
const SWEEP_EVERY: usize = 4096;

impl NamespaceRecords {
    fn intern(&mut self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        if let Some(set) = self.sets.get(&labels) {
            return set.clone();
        }
        let set = Arc::new(labels);
        self.sets.insert(set.clone());
        set
    }

    /// Drops the sets no stored namespace uses any more (only the interner holds them).
    fn sweep(&mut self) {
        self.sets.retain(|set| Arc::strong_count(set) > 1);
        self.since_sweep = 0;
    }
}

impl Compact<PartialObjectMeta<Namespace>> for NamespaceRecords {
    type Record = NamespaceLabels;

    fn key(ns: &PartialObjectMeta<Namespace>) -> Option<Box<str>> {
        ns.metadata.name.as_deref().map(Box::from)
    }

    fn record(&mut self, ns: PartialObjectMeta<Namespace>) -> Option<NamespaceLabels> {
        let name = ns.metadata.name?;
        let mut labels = ns.metadata.labels.unwrap_or_default();
        let name_label = labels.get(NAME_LABEL) == Some(&name);
        if name_label {
            labels.remove(NAME_LABEL);
        }
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep();
        }
        Some(NamespaceLabels {
            labels: self.intern(labels),
            name_label,
        })
    }

    fn after_list(&mut self) {
        self.sweep();
    }
}

impl ClusterView {
    /// Starts the two list-and-watch loops on the current tokio runtime.
    pub fn start(client: Client, node_name: &str, health: WatchHealth) -> ClusterView {
        let changed = Arc::new(Notify::new());

        let (pods, pod_writer) = CompactStore::new(PodRecords);
        tokio::spawn(
            Informer::new(
                "pods",
                Api::<Pod>::all(client.clone()),
                Some(format!("spec.nodeName={node_name}")),
                pod_writer,
                health.pods.clone(),
                changed.clone(),
            )
            .run(),
        );

        let (namespaces, ns_writer) = CompactStore::new(NamespaceRecords::default());
        tokio::spawn(
            Informer::new(
                "namespaces",
                // An Api of PartialObjectMeta lists and watches with the metadata Accept header.
                Api::<PartialObjectMeta<Namespace>>::all(client),
                None,
                ns_writer,
                health.namespaces.clone(),
                changed.clone(),
            )
            .run(),
        );

        ClusterView {
            pods,
            namespaces,
            changed,
            health,
        }
    }

    /// Resolves once both initial lists are complete.
    pub async fn wait_synced(&self) {
        self.pods.wait_until_ready().await;
        self.namespaces.wait_until_ready().await;
    }

    /// Notified on every change seen by either watch.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Changes of the namespace cache so far: equal numbers mean the same namespaces.
    pub fn namespaces_generation(&self) -> u64 {
        self.namespaces.generation()
    }

    /// Changes of the pod cache so far.
    pub fn pods_generation(&self) -> u64 {
        self.pods.generation()
    }

    /// Watch errors so far, both watches (API unreachable, 410, 5xx, stalled streams).
    pub fn watch_errors(&self) -> u64 {
        self.health.namespaces.errors() + self.health.pods.errors()
    }

    /// Staleness, relists and errors of each watch.
    pub fn health(&self) -> &WatchHealth {
        &self.health
    }

    /// This node's pods as stored (shared records, no copies).
    pub fn node_pods(&self) -> Vec<Arc<NodePod>> {
        self.pods.values()
    }

    /// The pod with this API uid.
    pub fn node_pod(&self, uid: &str) -> Option<Arc<NodePod>> {
        self.pods.get(uid)
    }

    /// The API uid of the pod whose cgroup is named after `cgroup_uid` (itself, or a static
    /// pod's mirror), if the cache holds it.
    pub fn api_uid_of_cgroup(&self, cgroup_uid: &str) -> Option<String> {
        if self.pods.get(cgroup_uid).is_some() {
            return Some(cgroup_uid.to_owned());
        }
        let mut found = None;
        self.pods.for_each(|uid, p| {
            if found.is_none() && p.cgroup_uid.as_deref() == Some(cgroup_uid) {
                found = Some(uid.to_owned());
            }
        });
        found
    }

    /// One namespace as the policy sees it: a lookup, for the per-pod paths that must not
    /// copy tens of thousands of namespaces to judge one pod.
    pub fn namespace(&self, name: &str) -> Option<NamespaceInfo> {
        self.namespaces.get(name).map(|ns| ns.info(name))
    }

    /// The names of the namespaces `keep` accepts. Each namespace is converted and dropped
    /// in turn: no copy of all of them is held at once.
    pub fn namespace_names_where(&self, keep: impl Fn(&NamespaceInfo) -> bool) -> Vec<String> {
        let mut names = Vec::new();
        self.namespaces.for_each(|name, ns| {
            let info = ns.info(name);
            if keep(&info) {
                names.push(info.name);
            }
        });
        names
    }

    /// Every namespace's record (shared label sets), sorted by name: for writing them all
    /// without copying their labels.
    pub fn namespace_records(&self) -> Vec<(String, NamespaceLabels)> {
        let mut all = Vec::with_capacity(self.namespaces.len());
        self.namespaces
            .for_each(|name, ns| all.push((name.to_owned(), ns.clone())));
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    use crate::k8s::store::WatchSink as _;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
        let mut ns = PartialObjectMeta::<Namespace>::default();
        ns.metadata.name = Some(name.to_owned());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        ns
    }

    #[test]
    fn namespaces_with_the_same_labels_share_one_set_and_keep_their_name_label() {
        let (store, mut writer) = CompactStore::new(NamespaceRecords::default());
        writer.apply(Event::Init);
        for name in ["env-a", "env-b"] {
            writer.apply(Event::InitApply(namespace(
                name,
                &[("datalab.io/environment", "true"), (NAME_LABEL, name)],
            )));
        }
        // A name label that is not the namespace's own name is an ordinary label.
        writer.apply(Event::InitApply(namespace("odd", &[(NAME_LABEL, "other")])));
        writer.apply(Event::InitDone);

        let (a, b) = (store.get("env-a").unwrap(), store.get("env-b").unwrap());
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        let info = a.info("env-a");
        assert_eq!(
            info.labels.get(NAME_LABEL).map(String::as_str),
            Some("env-a")
        );
        assert_eq!(
            info.labels
                .get("datalab.io/environment")
                .map(String::as_str),
            Some("true")
        );
        let odd = store.get("odd").unwrap().info("odd");
        assert_eq!(
            odd.labels.get(NAME_LABEL).map(String::as_str),
            Some("other")
        );
    }

    #[test]
    fn unused_label_sets_are_swept() {
        let mut records = NamespaceRecords::default();
        let kept = records.record(namespace("a", &[("team", "x")])).unwrap();
        drop(records.record(namespace("b", &[("team", "y")])));
        records.sweep();
        assert_eq!(records.sets.len(), 1);
        assert!(records.sets.contains(&kept.labels));
    }
}

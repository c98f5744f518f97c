//! Node-local caches of the cluster: every Namespace, as metadata only (labels are all a node
//! needs: `Accept: ...;as=PartialObjectMetadata`, a fraction of the memory of full objects),
//! and the Pods scheduled on this node (`spec.nodeName` field selector), kept in kube-rs
//! reflector stores with managed fields and other unused parts stripped. Every change pokes a `Notify` so the agent reconciles at
//! once. The list-and-watch loops ([`super::informer`]) recover from API outages, 410 Gone
//! and stalled streams within seconds and never touch what is enforced; their health
//! (staleness, relists, errors) is in [`WatchHealth`].

use std::{collections::BTreeMap, sync::Arc};

use datalab_guard_policy::{NamespaceInfo, PodInfo};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    core::PartialObjectMeta,
    runtime::reflector::{self, ObjectRef, Store},
    Api, Client,
};
use tokio::sync::Notify;

use super::{
    convert::{namespace_info, pod_info, slim_namespace, slim_pod},
    informer::{Informer, WatchStats},
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
    pods: Store<Pod>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    changed: Arc<Notify>,
    health: WatchHealth,
}

impl ClusterView {
    /// Starts the two list-and-watch loops on the current tokio runtime.
    pub fn start(client: Client, node_name: &str, health: WatchHealth) -> ClusterView {
        let changed = Arc::new(Notify::new());

        let (pods, pod_writer) = reflector::store::<Pod>();
        tokio::spawn(
            Informer::new(
                "pods",
                Api::<Pod>::all(client.clone()),
                Some(format!("spec.nodeName={node_name}")),
                slim_pod,
                pod_writer,
                health.pods.clone(),
                changed.clone(),
            )
            .run(),
        );

        let (namespaces, ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        tokio::spawn(
            Informer::new(
                "namespaces",
                // An Api of PartialObjectMeta lists and watches with the metadata Accept header.
                Api::<PartialObjectMeta<Namespace>>::all(client),
                None,
                slim_namespace,
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
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }

    /// Notified on every change seen by either reflector.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Watch errors so far, both watches (API unreachable, 410, 5xx, stalled streams).
    pub fn watch_errors(&self) -> u64 {
        self.health.namespaces.errors() + self.health.pods.errors()
    }

    /// Staleness, relists and errors of each watch.
    pub fn health(&self) -> &WatchHealth {
        &self.health
    }

    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods
            .state()
            .iter()
            .filter_map(|p| pod_info(p))
            .collect()
    }

    /// The pods whose API uid `wanted` accepts; only those are converted (the per-event
    /// path must not copy every pod of a full node).
    pub fn pods_where(&self, wanted: impl Fn(&str) -> bool) -> Vec<PodInfo> {
        self.pods
            .state()
            .iter()
            .filter(|p| p.metadata.uid.as_deref().is_some_and(&wanted))
            .filter_map(|p| pod_info(p))
            .collect()
    }

    /// API uid → the pod's IP (`status.podIP`), for finding its network namespace.
    pub fn pod_ips(&self) -> std::collections::HashMap<String, std::net::IpAddr> {
        self.pods
            .state()
            .iter()
            .filter_map(|p| {
                Some((
                    p.metadata.uid.clone()?,
                    p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// API uid → cgroup uid, for the static pods whose mirror annotation names another uid.
    pub fn cgroup_uids(&self) -> std::collections::HashMap<String, String> {
        self.pods
            .state()
            .iter()
            .filter_map(|p| {
                let uid = p.metadata.uid.as_deref()?;
                let mirror = p
                    .metadata
                    .annotations
                    .as_ref()?
                    .get(crate::cgroups::pod::MIRROR_POD_ANNOTATION)?;
                let cgroup_uid = crate::cgroups::pod::cgroup_pod_uid(uid, Some(mirror));
                (cgroup_uid != uid).then(|| (uid.to_owned(), cgroup_uid.to_owned()))
            })
            .collect()
    }

    /// One namespace as the policy sees it: a lookup, for the per-pod paths that must not
    /// copy tens of thousands of namespaces to judge one pod.
    pub fn namespace(&self, name: &str) -> Option<NamespaceInfo> {
        self.namespaces
            .get(&ObjectRef::new(name))
            .and_then(|ns| namespace_info(&ns.metadata))
    }

    /// The names of the namespaces `keep` accepts. Each namespace is converted and dropped
    /// in turn: no copy of all of them is held at once.
    pub fn namespace_names_where(&self, keep: impl Fn(&NamespaceInfo) -> bool) -> Vec<String> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|ns| namespace_info(&ns.metadata))
            .filter(|ns| keep(ns))
            .map(|ns| ns.name)
            .collect()
    }

    pub fn namespaces(&self) -> BTreeMap<String, NamespaceInfo> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|ns| namespace_info(&ns.metadata))
            .map(|ns| (ns.name.clone(), ns))
            .collect()
    }
}

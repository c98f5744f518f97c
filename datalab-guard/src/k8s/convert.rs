//! From Kubernetes objects to the policy core's plain types, keeping only what the policy
//! and the cgroup resolver need. Never fails: a field the API server left out becomes
//! `None`/empty, which the policy treats conservatively.

use std::collections::BTreeMap;

use datalab_guard_policy::{ContainerInfo, NamespaceInfo, PodInfo};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::core::PartialObjectMeta;

/// A namespace as the policy sees it: its name and labels. Takes the metadata only, so that
/// it works on full objects and on the metadata-only watches alike.
pub fn namespace_info(meta: &ObjectMeta) -> Option<NamespaceInfo> {
    Some(NamespaceInfo {
        name: meta.name.clone()?,
        labels: meta.labels.clone().unwrap_or_default(),
    })
}

/// A pod of this node as the node agent keeps it: what the policy reads, plus what finds
/// its cgroup (a static pod's cgroup uid) and its network namespace (its IP). Built from
/// the owned object, moving its strings rather than copying them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePod {
    pub info: PodInfo,
    /// The uid the kubelet named the pod's cgroup with, where it differs from the API uid
    /// (a static pod: its mirror annotation).
    pub cgroup_uid: Option<String>,
    /// `status.podIP`.
    pub ip: Option<std::net::IpAddr>,
}

/// Converts a pod into its [`NodePod`]; `None` without a uid, namespace or name.
pub fn node_pod(pod: Pod) -> Option<NodePod> {
    let Pod {
        metadata,
        spec,
        status,
    } = pod;
    let uid = metadata.uid?;
    let mirror = metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::cgroups::pod::MIRROR_POD_ANNOTATION));
    let cgroup_uid = mirror
        .map(|m| crate::cgroups::pod::cgroup_pod_uid(&uid, Some(m)).to_owned())
        .filter(|c| *c != uid);
    let mut containers = Vec::new();
    let (mut qos_class, mut phase, mut ip) = (None, None, None);
    if let Some(status) = status {
        for list in [
            status.container_statuses,
            status.init_container_statuses,
            status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            containers.extend(list.into_iter().map(|c| ContainerInfo {
                name: c.name,
                container_id: c.container_id,
            }));
        }
        qos_class = status.qos_class;
        phase = status.phase;
        ip = status.pod_ip.and_then(|ip| ip.parse().ok());
    }
    containers.shrink_to_fit();
    let (host_network, node_name) = spec.map_or((false, None), |s| {
        (s.host_network.unwrap_or(false), s.node_name)
    });
    Some(NodePod {
        info: PodInfo {
            uid,
            namespace: metadata.namespace?,
            name: metadata.name?,
            labels: metadata.labels.unwrap_or_default(),
            host_network,
            node_name,
            qos_class,
            phase,
            containers,
        },
        cgroup_uid,
        ip,
    })
}

/// API uid → cgroup uid of the static pods among `pods` (those whose mirror annotation
/// names another uid), from the same records the caller judges.
pub fn cgroup_uids(pods: &[std::sync::Arc<NodePod>]) -> std::collections::HashMap<String, String> {
    pods.iter()
        .filter_map(|p| Some((p.info.uid.clone(), p.cgroup_uid.clone()?)))
        .collect()
}

/// The label the API server sets on every namespace to its own name (since 1.22): dropped
/// from the stored label set, so that namespaces with the same labels share one set.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespace's labels as the node agent keeps them: shared with every namespace that has
/// the same set (a Datalab's environments mostly do), [`NAME_LABEL`] taken out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceLabels {
    pub labels: std::sync::Arc<BTreeMap<String, String>>,
    /// Whether the namespace carried [`NAME_LABEL`] set to its name.
    pub name_label: bool,
}

impl NamespaceLabels {
    /// The namespace as the policy sees it, [`NAME_LABEL`] put back.
    pub fn info(&self, name: &str) -> NamespaceInfo {
        let mut labels = (*self.labels).clone();
        if self.name_label {
            labels.insert(NAME_LABEL.to_owned(), name.to_owned());
        }
        NamespaceInfo {
            name: name.to_owned(),
            labels,
        }
    }
}

/// Namespaces are watched as metadata only (`PartialObjectMetadata`): name, labels, uid and
/// the deletion timestamp are all either process reads. The rest goes before a namespace is
/// stored (twenty thousand of them on every node): managed fields, annotations, the type
/// strings, the resourceVersion (the watch keeps its own, read before this runs), owner
/// references, finalizers and timestamps.
pub fn slim_namespace(ns: &mut PartialObjectMeta<Namespace>) {
    ns.types = None;
    let meta = &mut ns.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.generation = None;
}

//! From Kubernetes objects to the policy core's plain types, keeping only what the policy
//! and the cgroup resolver need. Never fails: a field the API server left out becomes
//! `None`/empty, which the policy treats conservatively.

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

pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut containers = Vec::new();
    if let Some(status) = status {
        for list in [
            &status.container_statuses,
            &status.init_container_statuses,
            &status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            for c in list {
                containers.push(ContainerInfo {
                    name: c.name.clone(),
                    container_id: c.container_id.clone(),
                });
            }
        }
    }
    Some(PodInfo {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        labels: meta.labels.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node_name: spec.and_then(|s| s.node_name.clone()),
        qos_class: status.and_then(|s| s.qos_class.clone()),
        phase: status.and_then(|s| s.phase.clone()),
        containers,
    })
}

/// Drops what the agent never reads, so 10 000 cached pods stay small: managed fields,
/// annotations (but the mirror one), the container specs, volumes and conditions.
pub fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k == crate::cgroups::pod::MIRROR_POD_ANNOTATION);
        if annotations.is_empty() {
            pod.metadata.annotations = None;
        }
    }
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        spec.topology_spread_constraints = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.pod_ips = None;
        status.host_ips = None;
        for list in [
            &mut status.container_statuses,
            &mut status.init_container_statuses,
            &mut status.ephemeral_container_statuses,
        ]
        .into_iter()
        .flatten()
        {
            for c in list.iter_mut() {
                c.image = String::new();
                c.image_id = String::new();
                c.last_state = None;
                c.state = None;
                c.volume_mounts = None;
                c.resources = None;
                c.allocated_resources = None;
            }
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

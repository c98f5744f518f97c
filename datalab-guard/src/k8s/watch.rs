//! Node-local caches of the cluster: every Namespace, and the Pods scheduled on this node
//! (`spec.nodeName` field selector), kept by kube-rs reflectors with managed fields and
//! other unused parts stripped. Every change pokes a `Notify` so the agent reconciles at
//! once; watch failures (API server down, 410 Gone, dropped connections) are retried with
//! backoff and never touch what is enforced.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use datalab_guard_policy::{NamespaceInfo, PodInfo};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client,
};
use tokio::sync::Notify;

use super::convert::{namespace_info, pod_info, slim_namespace, slim_pod};

pub struct ClusterView {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    changed: Arc<Notify>,
    errors: Arc<std::sync::atomic::AtomicU64>,
}

impl ClusterView {
    /// Starts the two reflectors on the current tokio runtime.
    pub fn start(client: Client, node_name: &str) -> ClusterView {
        let changed = Arc::new(Notify::new());
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));

        let (pods, pod_writer) = reflector::store::<Pod>();
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let pod_stream = watcher(Api::<Pod>::all(client.clone()), pod_config)
            .default_backoff()
            .modify(slim_pod)
            .reflect(pod_writer);
        tokio::spawn(drive("pods", pod_stream, changed.clone(), errors.clone()));

        let (namespaces, ns_writer) = reflector::store::<Namespace>();
        let ns_stream = watcher(Api::<Namespace>::all(client), watcher::Config::default())
            .default_backoff()
            .modify(slim_namespace)
            .reflect(ns_writer);
        tokio::spawn(drive(
            "namespaces",
            ns_stream,
            changed.clone(),
            errors.clone(),
        ));

        ClusterView {
            pods,
            namespaces,
            changed,
            errors,
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

    /// Watch errors so far (API unreachable, 410, 5xx...), for logs and metrics.
    pub fn watch_errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods
            .state()
            .iter()
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

    pub fn namespaces(&self) -> BTreeMap<String, NamespaceInfo> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|ns| namespace_info(ns))
            .map(|ns| (ns.name.clone(), ns))
            .collect()
    }
}

async fn drive<S, K>(
    what: &'static str,
    stream: S,
    changed: Arc<Notify>,
    errors: Arc<std::sync::atomic::AtomicU64>,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    tracing::info!(what, "watch recovered");
                    failing = false;
                }
                // During a (re)list the store is replaced at InitDone: reconcile then, not on
                // every InitApply.
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    changed.notify_one();
                }
            }
            Err(e) => {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !failing {
                    tracing::warn!(what, error = %e, "watch failed; retrying with backoff, enforcement unchanged");
                    failing = true;
                } else {
                    tracing::debug!(what, error = %e, "watch still failing");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::error!(what, "watch stream ended");
}

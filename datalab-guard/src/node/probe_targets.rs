//! Which network namespace the CNI probe tests each environment namespace from, and the
//! probe's wiring into the node agent (state changes logged and sent as namespace Events).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

use datalab_guard_policy::PolicyConfig;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::context::Context;
use crate::{
    baseline_state::CniState,
    cgroups::pod::{pod_cgroup_dir, CgroupDriver, QosClass},
    k8s::{self, ClusterView},
    probe::{self, ProbeSettings},
};

/// What target selection needs to find a pod's cgroup and tell environments apart.
#[derive(Clone)]
pub struct PodCgroupResolver {
    pub root: PathBuf,
    pub driver: CgroupDriver,
    pub policy: Arc<PolicyConfig>,
}

/// Starts the probe loop and the task that turns its state changes into namespace Events.
/// The loop takes its settings from `settings`, so a reload reaches its next round.
pub fn spawn(
    ctx: &Arc<Context>,
    settings: watch::Receiver<ProbeSettings>,
    resolver: PodCgroupResolver,
    netns_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> [JoinHandle<()>; 2] {
    let (cni_tx, cni_rx) = mpsc::channel::<(String, Option<CniState>, CniState)>(64);
    let events_task = tokio::spawn(k8s::events::publish_cni_changes(
        ctx.client.clone(),
        ctx.node.clone(),
        ctx.event_budget.clone(),
        cni_rx,
    ));
    let on_change = move |namespace: &str, old: Option<CniState>, new: CniState| {
        tracing::warn!(
            namespace,
            old = old.map(|o| o.as_str()),
            new = new.as_str(),
            "CNI enforcement of the namespace's NetworkPolicy changed"
        );
        let _ = cni_tx.try_send((namespace.to_owned(), old, new));
    };
    let probe_task = tokio::spawn(probe::run_probe_loop(
        settings,
        PathBuf::from(probe::SELF_NETNS),
        probe_targets(ctx.view.clone(), resolver, netns_dir),
        ctx.namespace_states.clone(),
        on_change,
        shutdown,
    ));
    [probe_task, events_task]
}

/// For each environment namespace with a running pod on this node, one network namespace
/// to probe from: the runtime's netns file holding the pod's IP (`--netns-dir`, the host's
/// /run/netns), else the namespace of a process in the pod's cgroup (needs hostPID).
fn probe_targets(
    view: Arc<ClusterView>,
    resolver: PodCgroupResolver,
    netns_dir: PathBuf,
) -> impl Fn() -> Vec<(String, PathBuf)> + Send + Sync + 'static {
    move || {
        let by_ip: Vec<(PathBuf, Vec<IpAddr>)> =
            probe::netns_addresses(&netns_dir).unwrap_or_default();
        let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for record in view.node_pods() {
            let pod = &record.info;
            if chosen.contains_key(&pod.namespace)
                || pod.phase.as_deref() != Some("Running")
                || pod.host_network
            {
                continue;
            }
            // One lookup per pod: not a copy of the cluster's namespaces per probe round.
            let Some(ns) = view.namespace(&pod.namespace) else {
                continue;
            };
            if !resolver.policy.is_environment(&ns) {
                continue;
            }
            let from_ip = record.ip.and_then(|ip| {
                by_ip
                    .iter()
                    .find(|(_, addrs)| addrs.contains(&ip))
                    .map(|(p, _)| p.clone())
            });
            let from_cgroup = || {
                QosClass::ALL.into_iter().find_map(|qos| {
                    probe::netns_of_cgroup(&pod_cgroup_dir(
                        &resolver.root,
                        resolver.driver,
                        qos,
                        &pod.uid,
                    ))
                })
            };
            if let Some(path) = from_ip.or_else(from_cgroup) {
                chosen.insert(pod.namespace.clone(), path);
            }
        }
        chosen.into_iter().collect()
    }
}

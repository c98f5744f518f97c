//! The node's audit sink: each ring-buffer event becomes one JSON line on stdout naming the
//! namespace, pod, container and node, and pod-attributed attempts go on to the pod Event
//! publisher (dropped when it lags: Events are a courtesy, the counters and audit lines are
//! the record).

use std::{collections::HashMap, sync::Arc};

use aya::maps::{MapData, RingBuf};
use datalab_guard_common::{Action, AuditEvent};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::context::Context;
use crate::{
    audit::{self, ConsumerStats},
    config::AuditConfig,
    k8s::events::{publish_pod_events, PodAttempt, PodEvents},
};

/// Attempts waiting for the Event publisher; beyond this they are dropped (not the lines).
const ATTEMPT_QUEUE: usize = 1024;

/// Who owns which cgroup, as of the last reconcile.
#[derive(Clone, Debug, Default)]
pub struct CgroupOwners {
    /// Pod-level cgroup id → pod.
    pub pods: HashMap<u64, PodRef>,
    /// Container cgroup id → (pod cgroup id, container name).
    pub containers: HashMap<u64, (u64, String)>,
}

#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl CgroupOwners {
    /// The pod and container of an event: its own cgroup first (a container's, or the pod's
    /// for processes placed in the pod cgroup), else the verdict's cgroup.
    fn owner_of(&self, event: &AuditEvent) -> (Option<PodRef>, Option<String>) {
        let container = self.containers.get(&event.cgroup_id);
        let pod_id = container.map_or(event.policy_cgroup_id, |(pod, _)| *pod);
        let pod = self
            .pods
            .get(&pod_id)
            .or_else(|| self.pods.get(&event.cgroup_id))
            .cloned();
        (pod, container.map(|(_, name)| name.clone()))
    }
}

/// Starts the audit stream and, when `audit.kubernetesEvents` is on, the pod Event
/// publisher it feeds.
pub fn spawn(
    ctx: &Arc<Context>,
    config: &AuditConfig,
    events: RingBuf<MapData>,
    stats: Arc<ConsumerStats>,
    shutdown: watch::Receiver<bool>,
) -> (JoinHandle<()>, Option<JoinHandle<()>>) {
    let (attempt_tx, attempt_rx) = mpsc::channel(ATTEMPT_QUEUE);
    let audit_task = tokio::spawn(stream_audit(
        ctx.clone(),
        events,
        stats,
        attempt_tx,
        shutdown,
    ));
    let events_task = config.kubernetes_events.then(|| {
        let publisher = PodEvents::new(
            ctx.client.clone(),
            &ctx.node,
            config.events_per_pod_per_minute,
            ctx.event_budget.clone(),
        );
        tokio::spawn(publish_pod_events(publisher, attempt_rx))
    });
    (audit_task, events_task)
}

/// Reads the ring buffer until shutdown.
async fn stream_audit(
    ctx: Arc<Context>,
    events: RingBuf<MapData>,
    stats: Arc<ConsumerStats>,
    attempts: mpsc::Sender<PodAttempt>,
    shutdown: watch::Receiver<bool>,
) {
    let clock = audit::BootClock::new();
    let sink = move |event: AuditEvent| {
        let (pod, container) = ctx
            .owners
            .read()
            .map(|owners| owners.owner_of(&event))
            .unwrap_or_default();
        let who = audit::Attribution {
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            pod: pod.as_ref().map(|p| p.name.clone()),
            container,
            node: Some(ctx.node.clone()),
            cgroup: None,
        };
        let record = audit::record(&event, &clock, &who);
        audit::write_line(&record);
        if let Some(pod) = pod {
            if let Ok(mut counts) = ctx.attempts_by_pod.lock() {
                *counts.entry(pod.uid.clone()).or_insert(0) += 1;
            }
            let _ = attempts.try_send(PodAttempt {
                namespace: pod.namespace,
                pod: pod.name,
                uid: pod.uid,
                container: who.container,
                destination: record["dst"].as_str().unwrap_or("(socket)").to_owned(),
                audited: event.action == Action::Audited as u8,
            });
        }
    };
    if let Err(e) = audit::consume(events, sink, stats, shutdown).await {
        tracing::error!(error = %e, "audit stream stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(cgroup_id: u64, policy_cgroup_id: u64) -> AuditEvent {
        // SAFETY: AuditEvent is plain integers; all-zero is a valid value.
        let mut e: AuditEvent = unsafe { std::mem::zeroed() };
        e.cgroup_id = cgroup_id;
        e.policy_cgroup_id = policy_cgroup_id;
        e
    }

    #[test]
    fn events_are_attributed_to_container_then_pod() {
        let mut owners = CgroupOwners::default();
        owners.pods.insert(
            10,
            PodRef {
                namespace: "tenant-a".into(),
                name: "nb".into(),
                uid: "u".into(),
            },
        );
        owners.containers.insert(11, (10, "main".into()));
        let (pod, container) = owners.owner_of(&event(11, 10));
        assert_eq!(pod.unwrap().name, "nb");
        assert_eq!(container.as_deref(), Some("main"));
        // A process in the pod cgroup itself.
        let (pod, container) = owners.owner_of(&event(10, 10));
        assert_eq!(pod.unwrap().name, "nb");
        assert_eq!(container, None);
        // Unknown cgroup: nobody.
        let (pod, _) = owners.owner_of(&event(99, 98));
        assert!(pod.is_none());
    }
}

//! Kubernetes Events on pods whose processes tried to reach a blocked destination: type
//! Warning, reason `MetadataAccessBlocked` (or `MetadataAccessAudited`), at most one per pod
//! per minute, carrying the number of attempts since the previous Event. Bounded: state is
//! kept only for pods that exist on this node.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};

/// One blocked attempt attributed to a pod.
#[derive(Clone, Debug)]
pub struct PodAttempt {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: Option<String>,
    pub destination: String,
    pub audited: bool,
}

struct PodState {
    last_sent: Option<Instant>,
    pending: u64,
}

pub struct PodEvents {
    recorder: Recorder,
    interval: Duration,
    pods: HashMap<String, PodState>,
    max_pods: usize,
}

impl PodEvents {
    pub fn new(client: Client, node: &str, per_minute: u32) -> PodEvents {
        let reporter = Reporter {
            controller: super::client::MANAGER.into(),
            instance: Some(node.to_owned()),
        };
        let per_minute = per_minute.max(1);
        PodEvents {
            recorder: Recorder::new(client, reporter),
            interval: Duration::from_secs(60) / per_minute,
            pods: HashMap::new(),
            max_pods: 65_536,
        }
    }

    /// Counts an attempt and publishes an Event when the pod's interval has passed.
    pub async fn record(&mut self, attempt: PodAttempt) {
        if self.pods.len() >= self.max_pods && !self.pods.contains_key(&attempt.uid) {
            // More pods than a node can hold: someone is churning; keep memory bounded.
            self.pods.clear();
        }
        let state = self.pods.entry(attempt.uid.clone()).or_insert(PodState {
            last_sent: None,
            pending: 0,
        });
        state.pending += 1;
        let due = state.last_sent.is_none_or(|t| t.elapsed() >= self.interval);
        if !due {
            return;
        }
        let count = state.pending;
        state.pending = 0;
        state.last_sent = Some(Instant::now());
        let (reason, verb) = if attempt.audited {
            (
                "MetadataAccessAudited",
                "would have been blocked (audit mode)",
            )
        } else {
            ("MetadataAccessBlocked", "blocked")
        };
        let container = attempt
            .container
            .as_deref()
            .map(|c| format!(" from container {c}"))
            .unwrap_or_default();
        let note = format!(
            "datalab-guard {verb} {count} attempt(s) to reach the instance metadata endpoint {}{container} since the last event",
            attempt.destination
        );
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(attempt.pod.clone()),
            namespace: Some(attempt.namespace.clone()),
            uid: Some(attempt.uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "BlockMetadataAccess".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = %attempt.namespace, pod = %attempt.pod, error = %e, "cannot publish the pod Event");
        }
    }

    /// Forgets pods that no longer exist.
    pub fn retain(&mut self, live_uids: &std::collections::HashSet<String>) {
        self.pods.retain(|uid, _| live_uids.contains(uid));
    }
}

/// Publishes an Event on a namespace whose CNI enforcement state changed (as probed from
/// this node): Warning `NetworkPolicyNotEnforced` when the CNI lets a pod reach a blocked
/// destination, Normal `NetworkPolicyEnforced` when it stops, Normal
/// `NetworkPolicyEnforcementInconclusive` when this node cannot tell.
pub async fn publish_cni_changes(
    client: Client,
    node: String,
    mut changes: tokio::sync::mpsc::Receiver<(
        String,
        Option<crate::baseline_state::CniState>,
        crate::baseline_state::CniState,
    )>,
) {
    use crate::baseline_state::CniState;
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: super::client::MANAGER.into(),
            instance: Some(node.clone()),
        },
    );
    while let Some((namespace, old, new)) = changes.recv().await {
        let (type_, reason) = match new {
            CniState::NotEnforced => (EventType::Warning, "NetworkPolicyNotEnforced"),
            CniState::Enforced => (EventType::Normal, "NetworkPolicyEnforced"),
            CniState::Inconclusive => (EventType::Normal, "NetworkPolicyEnforcementInconclusive"),
        };
        let note = format!(
            "probe from node {node}: CNI enforcement {} (was {}){}",
            new.as_str(),
            old.map_or("unknown", |o| o.as_str()),
            if new == CniState::NotEnforced {
                "; the eBPF guard is the only line of defence for this namespace"
            } else {
                ""
            }
        );
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
            name: Some(namespace.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "ProbeCniEnforcement".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(namespace, error = %e, "cannot publish the CNI enforcement Event");
        }
    }
}

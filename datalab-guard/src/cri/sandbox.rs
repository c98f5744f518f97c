//! [`SandboxInfo`]: what the runtime says about one pod sandbox, checked and bounded.
//!
//! Pure: converts the CRI messages the client received; no I/O.

use std::collections::BTreeMap;

use k8s_cri::v1::{NamespaceMode, PodSandbox, PodSandboxState, PodSandboxStatus};

use super::{error::bounded, CriError, CONFIG_SOURCE_ANNOTATION};

/// Most labels kept per sandbox. Kubernetes allows more, but a pod with more than this is
/// not a system pod anyone exempts by label; the rest are dropped and `labels_complete` is
/// false, so a caller never decides from a partial set as if it were whole.
pub const MAX_LABELS: usize = 64;
/// Longest label key kept (a Kubernetes key is at most a 253-byte prefix, `/` and 63 bytes).
pub const MAX_LABEL_KEY_BYTES: usize = 317;
/// Longest label value kept (Kubernetes allows 63 bytes).
pub const MAX_LABEL_VALUE_BYTES: usize = 63;
/// Longest name, namespace or uid accepted (Kubernetes names are at most 253 bytes).
const MAX_NAME_BYTES: usize = 253;

/// One pod sandbox as the runtime reports it (`PodSandboxStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxInfo {
    /// The runtime's sandbox id.
    pub id: String,
    /// The pod's UID as the kubelet gave it to the runtime: the API UID, or a static pod's
    /// config hash. It is what the pod's cgroup is named after.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The sandbox shares the node's network namespace (`hostNetwork: true`).
    pub host_network: bool,
    /// The sandbox is running (`SANDBOX_READY`), not stopped.
    pub ready: bool,
    /// Creation time, nanoseconds since the Unix epoch, as the runtime reports it.
    pub created_at_ns: i64,
    /// The pod's labels as the kubelet passed them (pod labels plus the kubelet's
    /// `io.kubernetes.*` ones), at most [`MAX_LABELS`].
    pub labels: BTreeMap<String, String>,
    /// False when labels were dropped for the bounds above.
    pub labels_complete: bool,
    /// A static pod (config source `file` or `http`): its uid is the kubelet's config hash
    /// and the API knows it only through a mirror pod.
    pub static_pod: bool,
}

impl SandboxInfo {
    /// Checks and bounds a `PodSandboxStatus` answer. Fields every runtime fills (id,
    /// metadata with uid, name and namespace) must be there and plausible.
    pub(super) fn from_status(status: PodSandboxStatus) -> Result<SandboxInfo, CriError> {
        const CALL: &str = "PodSandboxStatus";
        let malformed = |missing| CriError::Malformed {
            call: CALL,
            missing,
        };
        let metadata = status.metadata.ok_or(malformed("metadata"))?;
        let text = |s: String, what| {
            (!s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.chars().any(char::is_control))
                .then_some(s)
                .ok_or(malformed(what))
        };
        let host_network = status
            .linux
            .and_then(|l| l.namespaces)
            .and_then(|n| n.options)
            .is_some_and(|o| o.network == NamespaceMode::Node as i32);
        let (labels, labels_complete) = bounded_labels(status.labels);
        let static_pod = matches!(
            status
                .annotations
                .get(CONFIG_SOURCE_ANNOTATION)
                .map(String::as_str),
            Some("file" | "http")
        );
        Ok(SandboxInfo {
            id: text(status.id, "a sandbox id")?,
            uid: text(metadata.uid, "a pod uid")?,
            namespace: text(metadata.namespace, "a pod namespace")?,
            name: text(metadata.name, "a pod name")?,
            host_network,
            ready: status.state == PodSandboxState::SandboxReady as i32,
            created_at_ns: status.created_at,
            labels,
            labels_complete,
            static_pod,
        })
    }
}

/// Of the sandboxes listed for one pod uid (a pod can have stopped sandboxes from earlier
/// attempts beside its running one), the one that describes the pod now: a ready one
/// before a stopped one, then the newest. Only sandboxes whose metadata uid is `uid` count.
pub(super) fn current_sandbox<'a>(items: &'a [PodSandbox], uid: &str) -> Option<&'a PodSandbox> {
    items
        .iter()
        .filter(|s| s.metadata.as_ref().is_some_and(|m| m.uid == uid))
        .max_by_key(|s| {
            (
                s.state == PodSandboxState::SandboxReady as i32,
                s.created_at,
            )
        })
}

/// At most [`MAX_LABELS`] labels within the size bounds, in key order, and whether all
/// of them fit. Control characters are never kept (they would reach log lines).
fn bounded_labels(
    labels: std::collections::HashMap<String, String>,
) -> (BTreeMap<String, String>, bool) {
    let total = labels.len();
    let kept: BTreeMap<String, String> = labels
        .into_iter()
        .filter(|(k, v)| {
            !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_BYTES
                && v.len() <= MAX_LABEL_VALUE_BYTES
                && bounded(k) == *k
                && bounded(v) == *v
        })
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .take(MAX_LABELS)
        .collect();
    let complete = kept.len() == total;
    (kept, complete)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use k8s_cri::v1::{LinuxPodSandboxStatus, Namespace, NamespaceOption, PodSandboxMetadata};

    use super::*;

    fn status(network: NamespaceMode) -> PodSandboxStatus {
        PodSandboxStatus {
            id: "abc123".into(),
            metadata: Some(PodSandboxMetadata {
                name: "aws-node-x7".into(),
                uid: "0b7c0f2e-1111-4000-8000-000000000001".into(),
                namespace: "kube-system".into(),
                attempt: 0,
            }),
            state: PodSandboxState::SandboxReady as i32,
            created_at: 42,
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                }),
            }),
            labels: HashMap::from([("k8s-app".into(), "aws-node".into())]),
            annotations: HashMap::from([(CONFIG_SOURCE_ANNOTATION.into(), "api".into())]),
            ..Default::default()
        }
    }

    #[test]
    fn status_converts_with_host_network() {
        let info = SandboxInfo::from_status(status(NamespaceMode::Node)).unwrap();
        assert_eq!(info.uid, "0b7c0f2e-1111-4000-8000-000000000001");
        assert_eq!(info.namespace, "kube-system");
        assert_eq!(info.name, "aws-node-x7");
        assert!(info.host_network && info.ready && info.labels_complete && !info.static_pod);
        assert_eq!(info.labels["k8s-app"], "aws-node");
        let pod_net = SandboxInfo::from_status(status(NamespaceMode::Pod)).unwrap();
        assert!(!pod_net.host_network);
    }

    #[test]
    fn static_pods_are_recognised_by_config_source() {
        let mut s = status(NamespaceMode::Node);
        s.annotations
            .insert(CONFIG_SOURCE_ANNOTATION.into(), "file".into());
        assert!(SandboxInfo::from_status(s).unwrap().static_pod);
    }

    #[test]
    fn missing_or_implausible_metadata_is_malformed() {
        let mut s = status(NamespaceMode::Pod);
        s.metadata = None;
        assert_eq!(SandboxInfo::from_status(s).unwrap_err().kind(), "malformed");
        for bad in ["", "a\nb", &"n".repeat(300)] {
            let mut s = status(NamespaceMode::Pod);
            s.metadata.as_mut().unwrap().namespace = bad.to_owned();
            let err = SandboxInfo::from_status(s).unwrap_err();
            assert!(
                matches!(
                    err,
                    CriError::Malformed {
                        missing: "a pod namespace",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn labels_are_bounded_and_flagged() {
        let mut s = status(NamespaceMode::Pod);
        s.labels = (0..100).map(|i| (format!("l{i:03}"), "v".into())).collect();
        let info = SandboxInfo::from_status(s).unwrap();
        assert_eq!(info.labels.len(), MAX_LABELS);
        assert!(!info.labels_complete);
        assert!(info.labels.contains_key("l000"), "kept in key order");

        let mut s = status(NamespaceMode::Pod);
        s.labels.insert("big".into(), "v".repeat(64));
        s.labels.insert("ctl".into(), "a\u{7}".into());
        let info = SandboxInfo::from_status(s).unwrap();
        assert_eq!(info.labels.len(), 1);
        assert!(!info.labels_complete);
    }

    fn listed(uid: &str, ready: bool, created_at: i64) -> PodSandbox {
        PodSandbox {
            id: format!("{uid}-{created_at}"),
            metadata: Some(PodSandboxMetadata {
                uid: uid.into(),
                ..Default::default()
            }),
            state: if ready {
                PodSandboxState::SandboxReady
            } else {
                PodSandboxState::SandboxNotready
            } as i32,
            created_at,
            ..Default::default()
        }
    }

    #[test]
    fn current_sandbox_prefers_ready_then_newest_of_the_right_uid() {
        let items = vec![
            listed("a", false, 30),
            listed("a", true, 10),
            listed("a", true, 20),
            listed("b", true, 99),
        ];
        assert_eq!(current_sandbox(&items, "a").unwrap().id, "a-20");
        let stopped = vec![listed("a", false, 1), listed("a", false, 2)];
        assert_eq!(current_sandbox(&stopped, "a").unwrap().id, "a-2");
        // A runtime that ignores the label filter returns other pods: never one of those.
        assert!(current_sandbox(&items, "c").is_none());
    }
}

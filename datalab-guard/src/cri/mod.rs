//! The container runtime, asked through its CRI API which pod a cgroup belongs to.
//!
//! This module owns the agent's *read-only* view of the node's container runtime (containerd,
//! CRI-O): a CRI v1 gRPC client over the runtime's unix socket ([`RuntimeClient`]), the
//! answer it gives ([`SandboxInfo`]: pod uid, namespace, name, hostNetwork, labels), and the
//! `runtime` config section ([`RuntimeConfig`]: which socket, how long to wait). It answers
//! one question, without the API server: "which pod, in which namespace, is the pod cgroup
//! `pod<uid>`?" — so that a system pod can be exempt before its first process runs even when
//! the API server is unreachable or the agent has just restarted. The API server stays the
//! authority once synced (labels change; the runtime's copy of them is the kubelet's).
//!
//! # Why the pod uid is the key
//! The kubelet names a pod's cgroup after the pod's UID (`pod<uid>`, see
//! [`crate::cgroups::pod`]) and passes the same UID to the runtime twice: in the sandbox's
//! metadata and in its `io.kubernetes.pod.uid` label (`kuberuntime_sandbox.go`,
//! `generatePodSandboxConfig` / `newPodLabels`). For a static pod that UID is the kubelet's
//! config hash — the cgroup, the sandbox metadata and the label all carry the hash, and the
//! API's mirror pod carries it in its `kubernetes.io/config.mirror` annotation.
//! [`RuntimeClient::pod_of_cgroup`] filters `ListPodSandbox` by that label and then checks
//! the metadata uid itself (a runtime that ignored the filter would otherwise answer with
//! the wrong pod).
//!
//! # Timing
//! The kubelet creates the pod cgroup *before* it calls `RunPodSandbox`, and a runtime lists
//! a sandbox only once it is running: a lookup at the moment `pod<uid>` appears can answer
//! "not (yet) known". Callers look again when the pod's first container directory (the
//! sandbox's own, created during `RunPodSandbox`) appears, or retry with
//! [`RuntimeClient::wait_pod_of_cgroup`]. Until then the cgroup keeps the default verdict
//! (guard): a late answer delays an exemption, it never opens anything.
//!
//! # Failure
//! Every call is bounded by the client's timeout; a missing socket, a runtime that does not
//! speak CRI v1 or answers garbage, or a hung runtime is a [`CriError`], never a panic and
//! never a stall. The error says which; [`CriError::kind`] is a bounded label for metrics
//! and for "log once per kind" in the caller. Answers are bounded too: message size, number
//! of sandboxes and labels (see the constants).
//!
//! The client only reads (`Version`, `ListPodSandbox`, `PodSandboxStatus`); it cannot create,
//! stop or exec anything, and the socket can be mounted read-only for it.

mod client;
mod config;
pub(crate) mod error;
mod sandbox;

pub use client::{RuntimeClient, RuntimeVersion};
pub use config::{RuntimeConfig, RuntimeSocket, DEFAULT_CALL_TIMEOUT, KNOWN_SOCKETS};
pub use error::CriError;
pub use sandbox::SandboxInfo;

/// Sandbox label in which the kubelet records the pod's UID (`types.KubernetesPodUIDLabel`).
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// Sandbox label with the pod's namespace (`types.KubernetesPodNamespaceLabel`).
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Sandbox label with the pod's name (`types.KubernetesPodNameLabel`).
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
/// Pod annotation saying where the kubelet got the pod from: `api` for pods of the API
/// server, `file` or `http` for static pods (`kubetypes.ConfigSourceAnnotationKey`).
pub const CONFIG_SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";

/// Largest gRPC message the client decodes (the kubelet allows 16 MiB for its CRI client;
/// a sandbox listing of a full node is far below 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Most sandboxes one [`RuntimeClient::list_sandboxes`] returns (kubelet's default is 110
/// pods per node; each pod can leave a few stopped sandboxes behind).
pub const MAX_SANDBOXES: usize = 4096;
/// How many `PodSandboxStatus` calls [`RuntimeClient::list_sandboxes`] runs at once.
pub const STATUS_CONCURRENCY: usize = 8;

//! Pods classified from the container runtime (issue 9.2): which pod and namespace a pod
//! cgroup is, asked through CRI ([`crate::cri`]) when the API view does not know the pod —
//! not synced yet, API server unreachable, the pod not announced yet, or a static pod whose
//! mirror pod has not appeared. Its verdict then comes from the policy core and what is
//! known of the namespace, and the map entry is written at once, so that a system pod (the
//! CNI agent in kube-system, a KMS plugin static pod) is exempt before its first process
//! runs even when the API server cannot be asked.
//!
//! This module owns:
//! - [`classify`]: the verdict of a runtime-reported pod (pure);
//! - [`RuntimeLookups`]: the lookups, each on its own task so that the reconcile loop never
//!   waits for the runtime; answers come back through a channel ([`RuntimeAnswer`]);
//! - [`RuntimeStats`]: errors per kind (logged once per kind), whether the runtime answers,
//!   how many pods have a runtime-derived verdict — for the metrics.
//!
//! # What the runtime is trusted with
//! Only "this cgroup is pod `name` in namespace `ns`" (the kubelet wrote that into the
//! sandbox's metadata). The API stays the authority: once the API view knows a pod, its
//! verdict is the API's and the runtime's answer is ignored (labels can change; the
//! runtime's copy of them is from the sandbox's creation).
//!
//! # Namespaces whose labels are not known (fail closed)
//! The verdict needs the namespace's labels (environment selector, namespace selectors).
//! With the namespace in the live view, the full policy applies. Without it (the API not
//! synced and no cached copy) only rules about the namespace's *name* can be evaluated, so:
//! the agent's own pod, namespaces listed by name in `exemptions.namespaces`, and namespace
//! selectors whose every requirement is on `kubernetes.io/metadata.name` exempt; everything
//! else is guarded — including what `nonEnvironmentVerdict` or a pod selector would exempt,
//! because whether the namespace is an environment (where no exemption applies) cannot be
//! told. The one risk accepted: a namespace exempt by name that has *since* been labelled an
//! environment stays exempt until the API is reached (an operator's contradiction that
//! `shadowed_exemptions` reports once the labels are known).
//!
//! # Errors
//! A missing socket, a runtime that answers garbage or not at all: logged once per error
//! kind, counted in `datalab_guard_runtime_errors_total{kind}`, never fatal, and never an
//! exemption — the cgroup keeps the default verdict (guard) and the API path goes on.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use datalab_guard_common::Verdict;
use datalab_guard_policy::{
    self as policy, LabelSelector, NamespaceInfo, PodInfo, PolicyConfig, NAMESPACE_NAME_LABEL,
};
use tokio::sync::mpsc;

use crate::{
    cgroups::CgroupDir,
    cri::{
        CriError, RuntimeClient, RuntimeConfig, SandboxInfo, POD_NAMESPACE_LABEL, POD_NAME_LABEL,
        POD_UID_LABEL,
    },
    metrics::RuntimeSample,
};

/// How long a lookup for a pod cgroup that has just appeared waits for the runtime to list
/// its sandbox (the kubelet creates the cgroup before `RunPodSandbox`; here the sandbox is
/// listed 0.1–0.3 s later).
pub const NEW_CGROUP_WAIT: Duration = Duration::from_secs(2);
/// Most lookups running at once; more new pod cgroups than this within one lookup's time
/// wait for the periodic rescan (they stay guarded meanwhile).
pub const MAX_IN_FLIGHT: usize = 64;
/// Answers waiting for the reconcile loop.
const ANSWER_QUEUE: usize = 256;

/// Reason (state file rows) of a pod guarded because its namespace's labels are not known.
pub const REASON_LABELS_UNKNOWN: &str = "namespace_labels_unknown";
/// Reason of a pod guarded because the runtime reported only part of its labels while a
/// pod selector would have exempted it.
pub const REASON_LABELS_INCOMPLETE: &str = "pod_labels_incomplete";

/// A verdict derived from the runtime, with why (a policy reason or one of the above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeDecision {
    pub verdict: Verdict,
    pub reason: &'static str,
}

impl RuntimeDecision {
    fn guard(reason: &'static str) -> RuntimeDecision {
        RuntimeDecision {
            verdict: Verdict::Guard,
            reason,
        }
    }
}

/// A pod the API view does not know, as the runtime reported it, with its cgroup.
#[derive(Clone, Debug)]
pub struct RuntimePod {
    pub sandbox: SandboxInfo,
    pub dir: CgroupDir,
}

/// The verdict of a pod known only from the runtime. `ns` is the namespace as the live view
/// (or a cache) knows it, `None` when its labels are not known: see the module docs.
pub fn classify(
    sandbox: &SandboxInfo,
    ns: Option<&NamespaceInfo>,
    cfg: &PolicyConfig,
) -> RuntimeDecision {
    let pod = pod_info(sandbox);
    let Some(ns) = ns else {
        return by_name_only(&pod, cfg);
    };
    let decision = policy::verdict(&pod, Some(ns), cfg);
    if decision.reason == policy::Reason::ExemptPodSelector && !sandbox.labels_complete {
        // The labels dropped for their bounds could make the selector not match.
        return RuntimeDecision::guard(REASON_LABELS_INCOMPLETE);
    }
    RuntimeDecision {
        verdict: decision.verdict,
        reason: decision.reason.as_str(),
    }
}

/// Only rules about names: the agent's own pod, exempt namespace names, namespace selectors
/// on the name label alone. Everything else is guarded.
fn by_name_only(pod: &PodInfo, cfg: &PolicyConfig) -> RuntimeDecision {
    let exempt = |reason: policy::Reason| RuntimeDecision {
        verdict: Verdict::Exempt,
        reason: reason.as_str(),
    };
    if cfg
        .own_pod_uid
        .as_deref()
        .is_some_and(|own| !own.is_empty() && own == pod.uid)
    {
        return exempt(policy::Reason::OwnPod);
    }
    if cfg.exempt_namespaces.contains(&pod.namespace) {
        return exempt(policy::Reason::ExemptNamespace);
    }
    let name_label = BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())]);
    if cfg
        .exempt_namespace_selectors
        .iter()
        .any(|s| selects_by_name_only(s) && s.matches(&name_label))
    {
        return exempt(policy::Reason::ExemptNamespaceSelector);
    }
    RuntimeDecision::guard(REASON_LABELS_UNKNOWN)
}

/// A selector whose every requirement is on `kubernetes.io/metadata.name`: it means the
/// same on the name label alone as on the namespace's full label set.
fn selects_by_name_only(selector: &LabelSelector) -> bool {
    !selector.is_empty()
        && selector
            .requirements()
            .iter()
            .all(|r| r.key == NAMESPACE_NAME_LABEL)
}

/// The pod as the policy sees it: the kubelet passes the pod's labels to the runtime plus
/// its own three `io.kubernetes.pod.*` ones, which are taken out again.
fn pod_info(sandbox: &SandboxInfo) -> PodInfo {
    let mut labels = sandbox.labels.clone();
    for kubelet_label in [POD_UID_LABEL, POD_NAMESPACE_LABEL, POD_NAME_LABEL] {
        labels.remove(kubelet_label);
    }
    PodInfo {
        uid: sandbox.uid.clone(),
        namespace: sandbox.namespace.clone(),
        name: sandbox.name.clone(),
        labels,
        host_network: sandbox.host_network,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Lookups

/// What a lookup task sends back to the reconcile loop.
#[derive(Debug)]
pub enum RuntimeAnswer {
    /// The pod of the cgroup `pod<uid>` at `path`; `None`: the runtime has no sandbox for it.
    Pod {
        uid: String,
        path: PathBuf,
        found: Option<SandboxInfo>,
    },
    /// Every sandbox the runtime has (the startup scan).
    Listed(Vec<SandboxInfo>),
    /// A lookup for `uid` failed (already logged and counted).
    Failed { uid: Option<String> },
}

/// Starts lookups on their own tasks; see the module docs.
pub struct RuntimeLookups {
    /// `None` with `runtime.socket: none`.
    shared: Option<Arc<Shared>>,
    tx: mpsc::Sender<RuntimeAnswer>,
    answers: Option<mpsc::Receiver<RuntimeAnswer>>,
    /// Pod uids being looked up.
    in_flight: HashSet<String>,
}

struct Shared {
    config: RuntimeConfig,
    /// Connected on first use and again after a connection-level error (the socket may
    /// appear after the agent: a runtime that starts late at boot).
    client: tokio::sync::Mutex<Option<RuntimeClient>>,
    stats: Arc<RuntimeStats>,
}

impl RuntimeLookups {
    /// Lookups per `config`, counted in `stats`. Must run inside the tokio runtime.
    pub fn new(config: &RuntimeConfig, stats: Arc<RuntimeStats>) -> RuntimeLookups {
        let (tx, rx) = mpsc::channel(ANSWER_QUEUE);
        let enabled = config.socket != crate::cri::RuntimeSocket::Disabled;
        stats.set_enabled(enabled);
        RuntimeLookups {
            shared: enabled.then(|| {
                Arc::new(Shared {
                    config: config.clone(),
                    client: tokio::sync::Mutex::new(None),
                    stats,
                })
            }),
            tx,
            answers: Some(rx),
            in_flight: HashSet::new(),
        }
    }

    /// The answers, for the loop that owns this (taken once).
    pub fn take_answers(&mut self) -> Option<mpsc::Receiver<RuntimeAnswer>> {
        self.answers.take()
    }

    /// Lists every sandbox once (startup: classify the pod cgroups that exist already).
    pub fn list_all(&self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let answer = match shared.client().await {
                Ok(client) => shared.outcome(client.list_sandboxes().await),
                Err(e) => shared.failed(e),
            };
            let _ = tx
                .send(match answer {
                    Some(all) => RuntimeAnswer::Listed(all),
                    None => RuntimeAnswer::Failed { uid: None },
                })
                .await;
        });
    }

    /// Asks which pod the cgroup `pod<uid>` at `path` is, waiting up to `within` for the
    /// runtime to list it. A uid already being looked up, or more than [`MAX_IN_FLIGHT`]
    /// lookups at once, is not asked again.
    pub fn look_up(&mut self, uid: String, path: PathBuf, within: Duration) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.in_flight.len() >= MAX_IN_FLIGHT || !self.in_flight.insert(uid.clone()) {
            return;
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let answer = match shared.client().await {
                Ok(client) => shared.outcome(client.wait_pod_of_cgroup(&uid, within).await),
                Err(e) => shared.failed(e),
            };
            let _ = tx
                .send(match answer {
                    Some(found) => RuntimeAnswer::Pod { uid, path, found },
                    None => RuntimeAnswer::Failed { uid: Some(uid) },
                })
                .await;
        });
    }

    /// The loop received the answer for `uid`.
    pub fn done(&mut self, uid: &str) {
        self.in_flight.remove(uid);
    }

    pub fn is_in_flight(&self, uid: &str) -> bool {
        self.in_flight.contains(uid)
    }

    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }
}

impl Shared {
    /// The connected client, connecting first if needed.
    async fn client(&self) -> Result<RuntimeClient, CriError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let socket =
            self.config
                .socket
                .resolve(|p| p.exists())
                .ok_or_else(|| CriError::Socket {
                    path: PathBuf::from("auto"),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "none of {} exists (set runtime.socket)",
                            crate::cri::KNOWN_SOCKETS.join(", ")
                        ),
                    ),
                })?;
        let client = RuntimeClient::connect(socket, self.config.timeout.as_std()).await?;
        let v = client.version();
        tracing::info!(
            socket = %client.socket().display(),
            runtime = %v.runtime_name,
            version = %v.runtime_version,
            "container runtime connected: new pod cgroups are classified from it when the API does not know them"
        );
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The answer, or `None` for an error (counted and logged).
    fn outcome<T>(&self, result: Result<T, CriError>) -> Option<T> {
        match result {
            Ok(value) => {
                self.stats.answered();
                Some(value)
            }
            Err(e) => self.failed(e),
        }
    }

    /// Counts and logs `e`; `None`, for the caller's answer.
    fn failed<T>(&self, e: CriError) -> Option<T> {
        if matches!(e.kind(), "socket" | "connect") {
            // Connect again next time (and look for an `auto` socket again).
            if let Ok(mut slot) = self.client.try_lock() {
                *slot = None;
            }
        }
        self.stats.error(&e);
        None
    }
}

// ---------------------------------------------------------------------------------------
// Stats

/// Error kinds of [`CriError::kind`], the bounded `kind` label.
pub const ERROR_KINDS: [&str; 6] = [
    "socket",
    "timeout",
    "connect",
    "unimplemented",
    "call",
    "malformed",
];

const STATE_DISABLED: u8 = 0;
const STATE_UNKNOWN: u8 = 1;
const STATE_UP: u8 = 2;
const STATE_DOWN: u8 = 3;

/// Runtime lookups' health, shared with the metrics.
#[derive(Debug)]
pub struct RuntimeStats {
    state: AtomicU8,
    errors: [AtomicU64; ERROR_KINDS.len()],
    /// Kinds already logged (each is logged once, then counted only).
    logged: Mutex<HashSet<&'static str>>,
    /// Pods whose verdict comes from the runtime, as of the last reconcile.
    pods: AtomicU64,
}

impl Default for RuntimeStats {
    fn default() -> Self {
        RuntimeStats {
            state: AtomicU8::new(STATE_DISABLED),
            errors: Default::default(),
            logged: Mutex::new(HashSet::new()),
            pods: AtomicU64::new(0),
        }
    }
}

impl RuntimeStats {
    fn set_enabled(&self, enabled: bool) {
        let state = if enabled {
            STATE_UNKNOWN
        } else {
            STATE_DISABLED
        };
        self.state.store(state, Ordering::Relaxed);
    }

    fn answered(&self) {
        let was = self.state.swap(STATE_UP, Ordering::Relaxed);
        if was == STATE_DOWN {
            tracing::info!("container runtime answers again");
        }
    }

    /// Counts `e` under its kind and logs it if it is the first of its kind.
    pub fn error(&self, e: &CriError) {
        self.state.store(STATE_DOWN, Ordering::Relaxed);
        let kind = e.kind();
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let first = self.logged.lock().is_ok_and(|mut l| l.insert(kind));
        if first {
            tracing::warn!(
                error = %e,
                kind,
                "container runtime lookup failed; new pods the API does not know stay guarded until it does (logged once per kind, counted in datalab_guard_runtime_errors_total)"
            );
        } else {
            tracing::debug!(error = %e, kind, "container runtime lookup failed");
        }
    }

    pub fn set_pods(&self, pods: u64) {
        self.pods.store(pods, Ordering::Relaxed);
    }

    /// For the metrics; `None` with `runtime.socket: none` (no series).
    pub fn sample(&self) -> Option<RuntimeSample> {
        let state = self.state.load(Ordering::Relaxed);
        (state != STATE_DISABLED).then(|| RuntimeSample {
            up: state == STATE_UP,
            errors: ERROR_KINDS
                .iter()
                .zip(&self.errors)
                .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
                .collect(),
            pods: self.pods.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn sandbox(namespace: &str, labels: &[(&str, &str)]) -> SandboxInfo {
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.insert(POD_UID_LABEL.into(), "u-1".into());
        l.insert(POD_NAMESPACE_LABEL.into(), namespace.into());
        l.insert(POD_NAME_LABEL.into(), "p".into());
        SandboxInfo {
            id: "sb".into(),
            uid: "u-1".into(),
            namespace: namespace.into(),
            name: "p".into(),
            host_network: true,
            ready: true,
            created_at_ns: 1,
            labels: l,
            labels_complete: true,
            static_pod: false,
        }
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        NamespaceInfo {
            name: name.into(),
            labels: l,
        }
    }

    fn config() -> PolicyConfig {
        PolicyConfig {
            environment_selector: "datalab.io/environment=true".parse().unwrap(),
            exempt_namespaces: BTreeSet::from(["kube-system".to_owned()]),
            exempt_namespace_selectors: vec![],
            exempt_pod_selectors: vec![policy::PodExemption {
                namespace: None,
                selector: "k8s-app=aws-node".parse().unwrap(),
            }],
            non_environment_verdict: Verdict::Exempt,
            own_pod_uid: Some("own".into()),
        }
    }

    fn decide(
        s: &SandboxInfo,
        n: Option<&NamespaceInfo>,
        c: &PolicyConfig,
    ) -> (Verdict, &'static str) {
        let d = classify(s, n, c);
        (d.verdict, d.reason)
    }

    #[test]
    fn known_namespaces_get_the_full_policy() {
        let c = config();
        let env = ns("team-a", &[("datalab.io/environment", "true")]);
        let other = ns("web", &[]);
        let system = ns("kube-system", &[]);
        assert_eq!(
            decide(
                &sandbox("team-a", &[("k8s-app", "aws-node")]),
                Some(&env),
                &c
            ),
            (Verdict::Guard, "environment_namespace"),
            "environment membership wins over a pod selector"
        );
        assert_eq!(
            decide(&sandbox("kube-system", &[]), Some(&system), &c),
            (Verdict::Exempt, "exempt_namespace")
        );
        assert_eq!(
            decide(&sandbox("web", &[]), Some(&other), &c),
            (Verdict::Exempt, "non_environment_default")
        );
        assert_eq!(
            decide(
                &sandbox("web", &[("k8s-app", "aws-node")]),
                Some(&other),
                &c
            ),
            (Verdict::Exempt, "exempt_pod_selector")
        );
    }

    #[test]
    fn the_kubelets_own_labels_are_not_pod_labels() {
        // A selector on the kubelet's label must not match through the runtime's copy.
        let mut c = config();
        c.non_environment_verdict = Verdict::Guard;
        c.exempt_pod_selectors = vec![policy::PodExemption {
            namespace: None,
            selector: format!("{POD_NAME_LABEL}=p").parse().unwrap(),
        }];
        assert_eq!(
            decide(&sandbox("web", &[]), Some(&ns("web", &[])), &c).0,
            Verdict::Guard
        );
    }

    #[test]
    fn incomplete_labels_never_exempt_by_pod_selector() {
        let mut strict = config();
        strict.non_environment_verdict = Verdict::Guard;
        let mut s = sandbox("web", &[("k8s-app", "aws-node")]);
        s.labels_complete = false;
        assert_eq!(
            decide(&s, Some(&ns("web", &[])), &strict),
            (Verdict::Guard, REASON_LABELS_INCOMPLETE)
        );
    }

    /// Without the namespace's labels only names can exempt; every other rule that could
    /// exempt is not evaluated (fail closed).
    #[test]
    fn unknown_namespace_labels_exempt_only_by_name() {
        let mut c = config();
        assert_eq!(
            decide(&sandbox("kube-system", &[]), None, &c),
            (Verdict::Exempt, "exempt_namespace")
        );
        // nonEnvironmentVerdict exempt, a matching pod selector: still guarded.
        assert_eq!(
            decide(&sandbox("team-a", &[("k8s-app", "aws-node")]), None, &c),
            (Verdict::Guard, REASON_LABELS_UNKNOWN)
        );
        let mut own = sandbox("team-a", &[]);
        own.uid = "own".into();
        assert_eq!(decide(&own, None, &c), (Verdict::Exempt, "own_pod"));
        // A namespace selector on the name label alone can be evaluated; one on any other
        // label cannot, even one that would match every namespace without that label.
        c.exempt_namespace_selectors = vec![
            format!("{NAMESPACE_NAME_LABEL} in (calico-system)")
                .parse()
                .unwrap(),
            "!tenant".parse().unwrap(),
        ];
        assert_eq!(
            decide(&sandbox("calico-system", &[]), None, &c),
            (Verdict::Exempt, "exempt_namespace_selector")
        );
        assert_eq!(
            decide(&sandbox("team-b", &[]), None, &c),
            (Verdict::Guard, REASON_LABELS_UNKNOWN)
        );
    }

    #[test]
    fn errors_are_counted_per_kind_and_sampled() {
        let stats = RuntimeStats::default();
        assert_eq!(stats.sample(), None, "disabled: no series");
        stats.set_enabled(true);
        let s = stats.sample().unwrap();
        assert!(!s.up && s.errors.iter().all(|(_, n)| *n == 0));
        let timeout = CriError::Timeout {
            call: "ListPodSandbox",
            timeout: Duration::from_secs(2),
        };
        stats.error(&timeout);
        stats.error(&timeout);
        stats.set_pods(3);
        let s = stats.sample().unwrap();
        assert_eq!(
            s.errors.iter().find(|(k, _)| *k == "timeout"),
            Some(&("timeout", 2))
        );
        assert_eq!((s.up, s.pods), (false, 3));
        stats.answered();
        assert!(stats.sample().unwrap().up);
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_answer_never_a_pod() {
        let stats = Arc::new(RuntimeStats::default());
        let config = RuntimeConfig {
            socket: crate::cri::RuntimeSocket::Path("/nonexistent/dg-cri.sock".into()),
            ..Default::default()
        };
        let mut lookups = RuntimeLookups::new(&config, stats.clone());
        let mut answers = lookups.take_answers().unwrap();
        lookups.look_up("u-1".into(), "/x/podu-1".into(), Duration::from_millis(50));
        lookups.look_up("u-1".into(), "/x/podu-1".into(), Duration::from_millis(50));
        assert!(lookups.is_in_flight("u-1"));
        match answers.recv().await.unwrap() {
            RuntimeAnswer::Failed { uid } => assert_eq!(uid.as_deref(), Some("u-1")),
            other => panic!("{other:?}"),
        }
        lookups.list_all();
        assert!(matches!(
            answers.recv().await.unwrap(),
            RuntimeAnswer::Failed { uid: None }
        ));
        let s = stats.sample().unwrap();
        assert_eq!(
            s.errors[0],
            ("socket", 2),
            "one lookup (deduplicated) and one listing"
        );
        let disabled = RuntimeLookups::new(
            &RuntimeConfig {
                socket: crate::cri::RuntimeSocket::Disabled,
                ..Default::default()
            },
            Arc::new(RuntimeStats::default()),
        );
        assert!(!disabled.enabled());
    }
}

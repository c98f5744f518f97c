//! The policy core of datalab-guard: pods + namespaces + config in, a verdict per pod and
//! the desired VERDICTS map (cgroup id → entry) out.
//!
//! # What this crate owns
//! - the verdict rules ([`verdict`], [`Decision`], [`Reason`]) and the desired entries with
//!   their pod counts ([`desired_entries`], [`Summary`]);
//! - the plain config they read ([`PolicyConfig`]), which the agent builds from its config
//!   file, and the check for exemptions that config makes dead ([`shadowed_exemptions`]);
//! - the namespace counter classes of the in-kernel counters ([`classes`]);
//! - Kubernetes label selectors: grammar, validation, matching ([`selector`]).
//!
//! # Why it is a crate of its own, and pure
//! Like linkerd2's policy-controller `core`, this is where the decisions live, so it has to
//! be the easiest code to read and to test: plain types, no Kubernetes client or object
//! types, no aya, no tokio, no I/O, no clock, no `unsafe`. Its Cargo.toml is what enforces
//! that, not this comment: kube, k8s-openapi, aya and tokio are not dependencies, so no
//! change can quietly import them. Everything around it belongs to the agent
//! (`datalab-guard`): its `k8s` module turns API objects into [`PodInfo`]/[`NamespaceInfo`],
//! its `cgroups` module supplies cgroup ids, its `bpf` module writes what
//! [`desired_entries`] returns, and its `config` module converts the config file into a
//! [`PolicyConfig`]. The agent depends on this crate, never the other way round.
//!
//! # The rules, in order ([`verdict`])
//! 1. The agent's own pod is exempt ([`Reason::OwnPod`]).
//! 2. A pod whose namespace is not known (yet) is guarded: fail closed
//!    ([`Reason::NamespaceUnknown`]).
//! 3. A pod in an environment namespace (the namespace's labels match
//!    `environments.namespaceSelector`) is guarded — hostNetwork pods included — and **no
//!    exemption applies**: not a listed namespace name, not a namespace selector, not a pod
//!    selector. Environment membership always wins, so a tenant cannot exempt itself by
//!    labelling its pods, and an operator's exemption cannot accidentally open a tenant
//!    namespace ([`shadowed_exemptions`] finds exemptions the config makes dead this way,
//!    so the agent can say so when it loads the config).
//! 4. A pod in any other namespace is exempt when an exemption matches (namespace name,
//!    namespace selector, pod selector — checked in that order, the first match is the
//!    reason), and otherwise gets `nonEnvironmentVerdict` ([`Reason::NonEnvironmentDefault`]).
//!
//! Verdicts are re-evaluated from current labels every time: relabelling a namespace into or
//! out of the environment set flips its pods' verdicts on the next reconcile.
#![forbid(unsafe_code)]

pub mod classes;
pub mod selector;
mod shadow;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use datalab_guard_common::{Verdict, VerdictEntry};

pub use self::{
    classes::{NamespaceClasses, UNCLASSIFIED},
    selector::{LabelSelector, Operator, Requirement, SelectorError},
    shadow::{shadowed_exemptions, ShadowedExemption},
};

/// The label the API server puts on every namespace (since Kubernetes 1.21), with the
/// namespace's name as value: what an exemption by name is known to match.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the policy needs to know about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// What the policy (and the cgroup resolver and audit enrichment) need to know about a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub node_name: Option<String>,
    /// `status.qosClass` (Guaranteed, Burstable, BestEffort): picks the pod's cgroup parent.
    pub qos_class: Option<String>,
    /// `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub phase: Option<String>,
    pub containers: Vec<ContainerInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// `status.containerStatuses[].containerID`, e.g. `containerd://<hex>`.
    pub container_id: Option<String>,
}

impl PodInfo {
    /// Succeeded or Failed: its containers are gone and so, soon, is its cgroup.
    pub fn is_terminated(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// The part of the config the verdict depends on, plus who the agent itself is. Plain data:
/// the agent builds it from its config file (`Config::policy_config`), tests write it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Namespaces whose labels match are environments (`environments.namespaceSelector`).
    pub environment_selector: LabelSelector,
    /// Exempt namespaces, by name (`exemptions.namespaces`).
    pub exempt_namespaces: BTreeSet<String>,
    /// Exempt namespaces, by label (`exemptions.namespaceSelectors`).
    pub exempt_namespace_selectors: Vec<LabelSelector>,
    /// Exempt pods, by label (`exemptions.podSelectors`).
    pub exempt_pod_selectors: Vec<PodExemption>,
    /// Verdict for pods outside environments that no exemption matches.
    pub non_environment_verdict: Verdict,
    /// UID of the agent's own pod (from the downward API), always exempt. An empty UID
    /// matches nothing ([`PolicyConfig::with_own_pod_uid`] drops it, [`verdict`] ignores it).
    pub own_pod_uid: Option<String>,
}

/// One pod exemption rule: pods whose labels match `selector`, in `namespace` only or (when
/// `None`) in every non-environment namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodExemption {
    pub namespace: Option<String>,
    pub selector: LabelSelector,
}

impl PolicyConfig {
    /// Sets the agent's own pod UID; an empty one (downward API not wired) means none.
    pub fn with_own_pod_uid(mut self, own_pod_uid: Option<String>) -> PolicyConfig {
        self.own_pod_uid = own_pod_uid.filter(|uid| !uid.is_empty());
        self
    }

    /// Whether the namespace is an environment (tenant) namespace.
    pub fn is_environment(&self, ns: &NamespaceInfo) -> bool {
        self.environment_selector.matches(&ns.labels)
    }
}

/// Why a pod got its verdict (a log field; bounded, so usable as a metric label too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    EnvironmentNamespace,
    OwnPod,
    ExemptNamespace,
    ExemptNamespaceSelector,
    ExemptPodSelector,
    NonEnvironmentDefault,
    NamespaceUnknown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::EnvironmentNamespace => "environment_namespace",
            Reason::OwnPod => "own_pod",
            Reason::ExemptNamespace => "exempt_namespace",
            Reason::ExemptNamespaceSelector => "exempt_namespace_selector",
            Reason::ExemptPodSelector => "exempt_pod_selector",
            Reason::NonEnvironmentDefault => "non_environment_default",
            Reason::NamespaceUnknown => "namespace_unknown",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    const fn guard(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Guard,
            reason,
        }
    }

    const fn exempt(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Exempt,
            reason,
        }
    }
}

/// The verdict for one pod (see the module docs for the rules). `ns` is the pod's namespace
/// as currently known, `None` when the namespace cache has not seen it.
pub fn verdict(pod: &PodInfo, ns: Option<&NamespaceInfo>, cfg: &PolicyConfig) -> Decision {
    if cfg
        .own_pod_uid
        .as_deref()
        .is_some_and(|own| !own.is_empty() && own == pod.uid)
    {
        return Decision::exempt(Reason::OwnPod);
    }
    let Some(ns) = ns else {
        return Decision::guard(Reason::NamespaceUnknown);
    };
    if cfg.is_environment(ns) {
        return Decision::guard(Reason::EnvironmentNamespace);
    }
    match matching_exemption(pod, ns, cfg) {
        Some(reason) => Decision::exempt(reason),
        None => Decision {
            verdict: cfg.non_environment_verdict,
            reason: Reason::NonEnvironmentDefault,
        },
    }
}

fn matching_exemption(pod: &PodInfo, ns: &NamespaceInfo, cfg: &PolicyConfig) -> Option<Reason> {
    if cfg.exempt_namespaces.contains(&ns.name) {
        return Some(Reason::ExemptNamespace);
    }
    if cfg
        .exempt_namespace_selectors
        .iter()
        .any(|s| s.matches(&ns.labels))
    {
        return Some(Reason::ExemptNamespaceSelector);
    }
    let pod_match = cfg.exempt_pod_selectors.iter().any(|rule| {
        rule.namespace.as_deref().is_none_or(|n| n == ns.name) && rule.selector.matches(&pod.labels)
    });
    pod_match.then_some(Reason::ExemptPodSelector)
}

/// Pod counts of one reconcile (the `guarded_pods` / `exempt_pods` gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pods with a cgroup whose entry says Guard.
    pub guarded: usize,
    /// Pods with a cgroup whose entry says Exempt.
    pub exempt: usize,
    /// Pods that should be running but whose cgroup was not found (yet): they get the
    /// default (unknown cgroup) verdict in the kernel until it is.
    pub unresolved: usize,
}

/// One new pod's entry, for the agent's event path (a pod cgroup appeared, or a pod was
/// announced): its verdict, and for a guarded pod of an environment namespace that
/// namespace's counter class, assigned now if it has none (a fresh or freed class, never
/// one taken from another namespace: [`desired_entries`] does that on the next reconcile),
/// so that the pod's first attempts are counted under its namespace.
pub fn event_entry(
    pod: &PodInfo,
    ns: Option<&NamespaceInfo>,
    cfg: &PolicyConfig,
    classes: &mut NamespaceClasses,
) -> (Decision, VerdictEntry) {
    let decision = verdict(pod, ns, cfg);
    let class = match (decision.reason, ns) {
        (Reason::EnvironmentNamespace, Some(ns)) => classes.assign(&ns.name),
        _ => UNCLASSIFIED,
    };
    let entry = VerdictEntry {
        verdict: decision.verdict as u32,
        class,
    };
    (decision, entry)
}

/// The VERDICTS map the kernel should hold for these pods: cgroup id -> entry.
///
/// - Guarded pods in environment namespaces get their namespace's counter class: the
///   namespaces with such pods are passed to [`NamespaceClasses::claim`] first. Every other
///   entry has class 0.
/// - Pods without a cgroup id (or with id 0) are counted as unresolved, except terminated
///   pods (Succeeded/Failed), which are skipped: there is nothing left to guard.
/// - Two pods claiming one cgroup id (which should not happen) merge fail-closed: Guard wins.
/// - The summary counts pods by their own verdict.
pub fn desired_entries<'a>(
    pods: impl IntoIterator<Item = (&'a PodInfo, Option<&'a NamespaceInfo>, Option<u64>)>,
    cfg: &PolicyConfig,
    classes: &mut NamespaceClasses,
) -> (BTreeMap<u64, VerdictEntry>, Summary) {
    let mut summary = Summary::default();
    // (cgroup id, verdict, namespace whose class the entry carries)
    let mut decided: Vec<(u64, Verdict, Option<&'a str>)> = Vec::new();
    for (pod, ns, cgroup_id) in pods {
        let Some(id) = cgroup_id.filter(|id| *id != 0) else {
            if !pod.is_terminated() {
                summary.unresolved += 1;
            }
            continue;
        };
        let decision = verdict(pod, ns, cfg);
        match decision.verdict {
            Verdict::Guard => summary.guarded += 1,
            Verdict::Exempt => summary.exempt += 1,
        }
        let classed = match (decision.reason, ns) {
            (Reason::EnvironmentNamespace, Some(ns)) => Some(ns.name.as_str()),
            _ => None,
        };
        decided.push((id, decision.verdict, classed));
    }
    classes.claim(decided.iter().filter_map(|(_, _, ns)| *ns));

    let mut entries: BTreeMap<u64, VerdictEntry> = BTreeMap::new();
    for (id, verdict, classed) in decided {
        let entry = VerdictEntry {
            verdict: verdict as u32,
            class: classed.map_or(UNCLASSIFIED, |ns| classes.class_of(ns)),
        };
        entries
            .entry(id)
            .and_modify(|existing| {
                if Verdict::from_raw(existing.verdict) == Verdict::Exempt {
                    *existing = entry;
                }
            })
            .or_insert(entry);
    }
    (entries, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ns(name: &str, pairs: &[(&str, &str)]) -> NamespaceInfo {
        let mut l = labels(pairs);
        l.insert("kubernetes.io/metadata.name".into(), name.into());
        NamespaceInfo {
            name: name.into(),
            labels: l,
        }
    }

    fn env_ns(name: &str) -> NamespaceInfo {
        ns(name, &[("datalab.io/environment", "true")])
    }

    fn pod(namespace: &str, name: &str, pairs: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: format!("uid-{namespace}-{name}"),
            namespace: namespace.into(),
            name: name.into(),
            labels: labels(pairs),
            phase: Some("Running".into()),
            ..PodInfo::default()
        }
    }

    fn sel(text: &str) -> LabelSelector {
        LabelSelector::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Environments are namespaces labelled `datalab.io/environment=true` (the agent's
    /// default). Exempts kube-system and tenant-a by name, namespaces labelled
    /// `platform=true`, and pods labelled `app=aws-node` (anywhere) or `role=csi` (in
    /// storage only).
    fn cfg_with_exemptions() -> PolicyConfig {
        PolicyConfig {
            environment_selector: sel("datalab.io/environment=true"),
            exempt_namespaces: ["kube-system", "tenant-a"].map(String::from).into(),
            exempt_namespace_selectors: vec![sel("platform=true")],
            exempt_pod_selectors: vec![
                PodExemption {
                    namespace: None,
                    selector: sel("app=aws-node"),
                },
                PodExemption {
                    namespace: Some("storage".into()),
                    selector: sel("role=csi"),
                },
            ],
            non_environment_verdict: Verdict::Exempt,
            own_pod_uid: None,
        }
        .with_own_pod_uid(Some("uid-guard".into()))
    }

    fn decide(p: &PodInfo, n: Option<&NamespaceInfo>, cfg: &PolicyConfig) -> (Verdict, Reason) {
        let d = verdict(p, n, cfg);
        (d.verdict, d.reason)
    }

    #[test]
    fn environment_pods_are_guarded() {
        let cfg = cfg_with_exemptions();
        let n = env_ns("tenant-b");
        assert_eq!(
            decide(&pod("tenant-b", "notebook", &[]), Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
    }

    #[test]
    fn host_network_environment_pods_are_guarded() {
        let cfg = cfg_with_exemptions();
        let n = env_ns("tenant-b");
        let mut p = pod("tenant-b", "hostnet", &[]);
        p.host_network = true;
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
    }

    #[test]
    fn a_tenant_labelling_its_pod_like_an_exempt_one_is_still_guarded() {
        let cfg = cfg_with_exemptions();
        let n = env_ns("tenant-b");
        let p = pod(
            "tenant-b",
            "sneaky",
            &[("app", "aws-node"), ("role", "csi")],
        );
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
    }

    #[test]
    fn a_tenant_labelling_its_namespace_like_an_exempt_one_is_still_guarded() {
        let cfg = cfg_with_exemptions();
        let n = ns(
            "tenant-b",
            &[("datalab.io/environment", "true"), ("platform", "true")],
        );
        let p = pod("tenant-b", "x", &[]);
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
    }

    /// Documented: listing an environment namespace among exempt names has no effect.
    #[test]
    fn an_environment_namespace_listed_as_exempt_is_still_guarded() {
        let cfg = cfg_with_exemptions();
        let n = env_ns("tenant-a");
        let p = pod("tenant-a", "x", &[]);
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
    }

    #[test]
    fn unknown_namespace_is_guarded() {
        let cfg = cfg_with_exemptions();
        // Even a pod that would match an exemption: its namespace may be an environment.
        let p = pod("kube-system", "aws-node-x", &[("app", "aws-node")]);
        assert_eq!(
            decide(&p, None, &cfg),
            (Verdict::Guard, Reason::NamespaceUnknown)
        );
    }

    #[test]
    fn own_pod_is_exempt_wherever_it_runs() {
        let cfg = cfg_with_exemptions();
        let mut p = pod("datalab-guard", "agent", &[]);
        p.uid = "uid-guard".into();
        assert_eq!(
            decide(&p, Some(&ns("datalab-guard", &[])), &cfg),
            (Verdict::Exempt, Reason::OwnPod)
        );
        assert_eq!(decide(&p, None, &cfg), (Verdict::Exempt, Reason::OwnPod));
        assert_eq!(
            decide(&p, Some(&env_ns("datalab-guard")), &cfg),
            (Verdict::Exempt, Reason::OwnPod)
        );
        // An empty own UID matches nothing (not even pods with an empty UID).
        let nobody = cfg.clone().with_own_pod_uid(Some(String::new()));
        assert_eq!(nobody.own_pod_uid, None);
        // Also when written into the field directly.
        let mut blank_uid = cfg;
        blank_uid.own_pod_uid = Some(String::new());
        let mut blank = pod("x", "y", &[]);
        blank.uid.clear();
        for cfg in [&nobody, &blank_uid] {
            assert_eq!(
                decide(&blank, None, cfg),
                (Verdict::Guard, Reason::NamespaceUnknown)
            );
        }
    }

    #[test]
    fn exemptions_in_non_environment_namespaces() {
        let cfg = cfg_with_exemptions();
        let kube_system = ns("kube-system", &[]);
        let platform = ns("monitoring", &[("platform", "true")]);
        let storage = ns("storage", &[]);
        let other = ns("ingress", &[]);
        assert_eq!(
            decide(
                &pod("kube-system", "coredns", &[]),
                Some(&kube_system),
                &cfg
            ),
            (Verdict::Exempt, Reason::ExemptNamespace)
        );
        assert_eq!(
            decide(&pod("monitoring", "prom", &[]), Some(&platform), &cfg),
            (Verdict::Exempt, Reason::ExemptNamespaceSelector)
        );
        assert_eq!(
            decide(
                &pod("ingress", "aws-node", &[("app", "aws-node")]),
                Some(&other),
                &cfg
            ),
            (Verdict::Exempt, Reason::ExemptPodSelector)
        );
        assert_eq!(
            decide(
                &pod("storage", "csi", &[("role", "csi")]),
                Some(&storage),
                &cfg
            ),
            (Verdict::Exempt, Reason::ExemptPodSelector)
        );
        // The namespaced pod selector applies only in its namespace.
        assert_eq!(
            decide(
                &pod("ingress", "csi", &[("role", "csi")]),
                Some(&other),
                &cfg
            ),
            (Verdict::Exempt, Reason::NonEnvironmentDefault)
        );
        // Default exempt anyway; with guard as the default the difference shows.
        let mut strict = cfg;
        strict.non_environment_verdict = Verdict::Guard;
        assert_eq!(
            decide(
                &pod("ingress", "csi", &[("role", "csi")]),
                Some(&other),
                &strict
            ),
            (Verdict::Guard, Reason::NonEnvironmentDefault)
        );
        assert_eq!(
            decide(
                &pod("storage", "csi", &[("role", "csi")]),
                Some(&storage),
                &strict
            ),
            (Verdict::Exempt, Reason::ExemptPodSelector)
        );
    }

    #[test]
    fn relabelling_a_namespace_flips_the_verdict() {
        let cfg = cfg_with_exemptions();
        let p = pod("lab-1", "nb", &[]);
        let mut n = env_ns("lab-1");
        assert_eq!(decide(&p, Some(&n), &cfg).0, Verdict::Guard);
        n.labels
            .insert("datalab.io/environment".into(), "false".into());
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Exempt, Reason::NonEnvironmentDefault)
        );
        n.labels
            .insert("datalab.io/environment".into(), "true".into());
        assert_eq!(
            decide(&p, Some(&n), &cfg),
            (Verdict::Guard, Reason::EnvironmentNamespace)
        );
        n.labels.remove("datalab.io/environment");
        assert_eq!(decide(&p, Some(&n), &cfg).0, Verdict::Exempt);
    }

    #[test]
    fn reasons_have_stable_names() {
        assert_eq!(
            Reason::EnvironmentNamespace.to_string(),
            "environment_namespace"
        );
        assert_eq!(Reason::NamespaceUnknown.as_str(), "namespace_unknown");
    }

    #[test]
    fn an_event_entry_gives_an_environment_its_class_at_once() {
        let cfg = cfg_with_exemptions();
        let mut classes = NamespaceClasses::new();
        let env = env_ns("team-a");
        let notebook = pod("team-a", "notebook", &[]);
        let (decision, entry) = event_entry(&notebook, Some(&env), &cfg, &mut classes);
        assert_eq!(decision.verdict, Verdict::Guard);
        assert_ne!(entry.class, UNCLASSIFIED);
        assert_eq!(classes.get("team-a"), Some(entry.class));
        // The next reconcile keeps that class.
        let resolved = [(&notebook, Some(&env), Some(7))];
        let (entries, _) = desired_entries(resolved.iter().copied(), &cfg, &mut classes);
        assert_eq!(entries[&7].class, entry.class);
        // Elsewhere: no class.
        let other = ns("kube-system", &[]);
        let dns = pod("kube-system", "coredns", &[]);
        let (_, entry) = event_entry(&dns, Some(&other), &cfg, &mut classes);
        assert_eq!(entry.class, UNCLASSIFIED);
    }

    #[test]
    fn desired_entries_cover_every_resolved_pod() {
        let cfg = cfg_with_exemptions();
        let mut classes = NamespaceClasses::new();
        let lab1 = env_ns("lab-1");
        let lab2 = env_ns("lab-2");
        let kube_system = ns("kube-system", &[]);
        let mut agent = pod("datalab-guard", "agent", &[]);
        agent.uid = "uid-guard".into();
        let mut finished = pod("lab-1", "job", &[]);
        finished.phase = Some("Succeeded".into());
        let pods = [
            (pod("lab-1", "a", &[]), Some(&lab1), Some(101)),
            (pod("lab-1", "b", &[]), Some(&lab1), Some(102)),
            (
                pod("lab-2", "c", &[("app", "aws-node")]),
                Some(&lab2),
                Some(103),
            ),
            (
                pod("kube-system", "dns", &[]),
                Some(&kube_system),
                Some(104),
            ),
            (pod("new", "d", &[]), None, Some(105)),
            (agent, None, Some(106)),
            (pod("lab-1", "pending", &[]), Some(&lab1), None),
            (pod("lab-1", "zero", &[]), Some(&lab1), Some(0)),
            (finished, Some(&lab1), None),
        ];
        let (entries, summary) = desired_entries(
            pods.iter().map(|(p, n, id)| (p, *n, *id)),
            &cfg,
            &mut classes,
        );
        let guard = Verdict::Guard as u32;
        let exempt = Verdict::Exempt as u32;
        let class1 = classes.get("lab-1").unwrap();
        let class2 = classes.get("lab-2").unwrap();
        assert_ne!(class1, class2);
        assert_ne!(class1, UNCLASSIFIED);
        let want: BTreeMap<u64, VerdictEntry> = [
            (
                101,
                VerdictEntry {
                    verdict: guard,
                    class: class1,
                },
            ),
            (
                102,
                VerdictEntry {
                    verdict: guard,
                    class: class1,
                },
            ),
            (
                103,
                VerdictEntry {
                    verdict: guard,
                    class: class2,
                },
            ),
            (
                104,
                VerdictEntry {
                    verdict: exempt,
                    class: 0,
                },
            ),
            (
                105,
                VerdictEntry {
                    verdict: guard,
                    class: 0,
                },
            ),
            (
                106,
                VerdictEntry {
                    verdict: exempt,
                    class: 0,
                },
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(entries, want);
        assert_eq!(
            summary,
            Summary {
                guarded: 4,
                exempt: 2,
                unresolved: 2
            }
        );
        assert_eq!(classes.name(class1), Some("lab-1"));
        // Only environment namespaces get classes.
        assert_eq!(classes.len(), 2);
        assert_eq!(classes.get("kube-system"), None);

        // A second pass keeps the classes.
        let (again, _) = desired_entries(
            pods.iter().map(|(p, n, id)| (p, *n, *id)),
            &cfg,
            &mut classes,
        );
        assert_eq!(again, want);
    }

    #[test]
    fn a_shared_cgroup_id_fails_closed() {
        let cfg = cfg_with_exemptions();
        let kube_system = ns("kube-system", &[]);
        let lab = env_ns("lab");
        let a = pod("kube-system", "a", &[]);
        let b = pod("lab", "b", &[]);
        for order in [
            [(&a, &kube_system), (&b, &lab)],
            [(&b, &lab), (&a, &kube_system)],
        ] {
            let mut classes = NamespaceClasses::new();
            let (entries, _) = desired_entries(
                order.iter().map(|(p, n)| (*p, Some(*n), Some(7))),
                &cfg,
                &mut classes,
            );
            assert_eq!(Verdict::from_raw(entries[&7].verdict), Verdict::Guard);
        }
    }

    #[test]
    fn classes_overflow_into_zero() {
        let cfg = cfg_with_exemptions();
        let mut classes = NamespaceClasses::with_limit(2);
        let (a, b) = (env_ns("a"), env_ns("b"));
        let (pa, pb) = (pod("a", "x", &[]), pod("b", "x", &[]));
        let (entries, summary) = desired_entries(
            [(&pa, Some(&a), Some(1)), (&pb, Some(&b), Some(2))],
            &cfg,
            &mut classes,
        );
        assert_eq!(entries[&1].class, 1);
        assert_eq!(entries[&2].class, UNCLASSIFIED);
        assert_eq!(Verdict::from_raw(entries[&2].verdict), Verdict::Guard);
        assert_eq!(summary.guarded, 2);
        assert_eq!(classes.overflowed(), 1);
    }
}

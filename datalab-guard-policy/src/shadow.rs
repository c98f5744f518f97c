//! Exemptions the config itself makes dead: rules that can never exempt a pod, because every
//! namespace they could match is an environment namespace, where no exemption applies.
//!
//! Examples: `environments.namespaceSelector: ""` (every namespace is an environment) with any
//! exemption at all; an environment selector `team` (exists) with an exemption selector
//! `team=platform`; an environment selector `kubernetes.io/metadata.name in (lab-1,lab-2)`
//! with `lab-1` among the exempt namespace names. The verdict is right in all of these
//! (environment membership wins, fail closed), but the operator meant something the config
//! does not say, so the agent logs each such rule when it loads the config.
//!
//! This is decided from the config alone: what is known about the namespaces an exemption
//! can match is written as a selector (its namespace selector; `kubernetes.io/metadata.name=N`
//! for a rule naming namespace `N`), and the rule is dead when that selector *implies* the
//! environment selector. Every namespace has the `kubernetes.io/metadata.name` label (the API
//! server sets it), which the context includes. What depends on the cluster's namespaces —
//! a namespace exempted by name that happens to carry the environment label today — is not
//! known at load time and is not reported here.

use std::collections::BTreeSet;

use crate::{
    selector::{LabelSelector, Operator, Requirement},
    PolicyConfig, Reason, NAMESPACE_NAME_LABEL,
};

/// One exemption rule that can never take effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowedExemption {
    /// Which kind of rule: [`Reason::ExemptNamespace`], [`Reason::ExemptNamespaceSelector`]
    /// or [`Reason::ExemptPodSelector`].
    pub kind: Reason,
    /// The rule as the operator wrote it: a namespace name, a selector, or
    /// `<selector> in namespace <name>` for a namespaced pod selector.
    pub rule: String,
}

/// Every exemption of `cfg` that no pod can ever get, in config order (namespace names
/// sorted, as [`PolicyConfig`] holds them).
pub fn shadowed_exemptions(cfg: &PolicyConfig) -> Vec<ShadowedExemption> {
    let env = &cfg.environment_selector;
    let mut found = Vec::new();
    for name in &cfg.exempt_namespaces {
        if implies(&[named(name)], env) {
            found.push(ShadowedExemption {
                kind: Reason::ExemptNamespace,
                rule: name.clone(),
            });
        }
    }
    for selector in &cfg.exempt_namespace_selectors {
        let mut known = selector.requirements().to_vec();
        known.push(any_namespace());
        if implies(&known, env) {
            found.push(ShadowedExemption {
                kind: Reason::ExemptNamespaceSelector,
                rule: selector.to_string(),
            });
        }
    }
    for rule in &cfg.exempt_pod_selectors {
        let known = rule.namespace.as_deref().map_or_else(any_namespace, named);
        if implies(&[known], env) {
            found.push(ShadowedExemption {
                kind: Reason::ExemptPodSelector,
                rule: match &rule.namespace {
                    Some(ns) => format!("{} in namespace {ns}", rule.selector),
                    None => rule.selector.to_string(),
                },
            });
        }
    }
    found
}

/// What is known about the namespace called `name`.
fn named(name: &str) -> Requirement {
    Requirement {
        key: NAMESPACE_NAME_LABEL.to_owned(),
        op: Operator::Equals(name.to_owned()),
    }
}

/// What is known about every namespace.
fn any_namespace() -> Requirement {
    Requirement {
        key: NAMESPACE_NAME_LABEL.to_owned(),
        op: Operator::Exists,
    }
}

/// Whether every label set that meets all of `known` is matched by `selector`. Exact for the
/// whole selector grammar: requirements on different keys are independent, so it is decided
/// key by key, comparing the values (or absence) each side allows. `known` that no label
/// set meets implies anything.
fn implies(known: &[Requirement], selector: &LabelSelector) -> bool {
    let keys: BTreeSet<&str> = known.iter().map(|r| r.key.as_str()).collect();
    let allowed = |key: &str| {
        known
            .iter()
            .filter(|r| r.key == key)
            .fold(Allowed::anything(), |acc, r| acc.and(&Allowed::by(&r.op)))
    };
    if keys.iter().any(|key| allowed(key).is_nothing()) {
        return true;
    }
    selector
        .requirements()
        .iter()
        .all(|r| allowed(&r.key).within(&Allowed::by(&r.op)))
}

/// The states one label key may be in: absent, or present with some values.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Allowed {
    absent: bool,
    present: Values,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Values {
    /// Exactly these values.
    Only(BTreeSet<String>),
    /// Every value except these.
    AllBut(BTreeSet<String>),
}

impl Allowed {
    fn anything() -> Allowed {
        Allowed {
            absent: true,
            present: Values::AllBut(BTreeSet::new()),
        }
    }

    /// What one requirement allows for its key.
    fn by(op: &Operator) -> Allowed {
        let one = |v: &String| BTreeSet::from([v.clone()]);
        let (absent, present) = match op {
            Operator::Equals(v) => (false, Values::Only(one(v))),
            Operator::In(set) => (false, Values::Only(set.clone())),
            Operator::NotEquals(v) => (true, Values::AllBut(one(v))),
            Operator::NotIn(set) => (true, Values::AllBut(set.clone())),
            Operator::Exists => (false, Values::AllBut(BTreeSet::new())),
            Operator::DoesNotExist => (true, Values::Only(BTreeSet::new())),
        };
        Allowed { absent, present }
    }

    /// Both at once.
    fn and(&self, other: &Allowed) -> Allowed {
        use Values::{AllBut, Only};
        let present = match (&self.present, &other.present) {
            (Only(a), Only(b)) => Only(a.intersection(b).cloned().collect()),
            (Only(a), AllBut(b)) | (AllBut(b), Only(a)) => Only(a.difference(b).cloned().collect()),
            (AllBut(a), AllBut(b)) => AllBut(a.union(b).cloned().collect()),
        };
        Allowed {
            absent: self.absent && other.absent,
            present,
        }
    }

    fn is_nothing(&self) -> bool {
        !self.absent && matches!(&self.present, Values::Only(v) if v.is_empty())
    }

    /// Whether every state allowed here is allowed by `other` too.
    fn within(&self, other: &Allowed) -> bool {
        use Values::{AllBut, Only};
        let present = match (&self.present, &other.present) {
            (Only(a), Only(b)) => a.is_subset(b),
            (Only(a), AllBut(b)) => a.is_disjoint(b),
            // Infinitely many values against finitely many.
            (AllBut(_), Only(_)) => false,
            (AllBut(a), AllBut(b)) => b.is_subset(a),
        };
        present && (!self.absent || other.absent)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datalab_guard_common::Verdict;

    use super::*;
    use crate::{verdict, NamespaceInfo, PodExemption, PodInfo};

    fn sel(text: &str) -> LabelSelector {
        LabelSelector::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn cfg(env: &str) -> PolicyConfig {
        PolicyConfig {
            environment_selector: sel(env),
            exempt_namespaces: ["kube-system", "lab-1"].map(String::from).into(),
            exempt_namespace_selectors: vec![sel("platform=true"), sel("team=data,tier")],
            exempt_pod_selectors: vec![
                PodExemption {
                    namespace: None,
                    selector: sel("app=aws-node"),
                },
                PodExemption {
                    namespace: Some("lab-2".into()),
                    selector: sel("role=csi"),
                },
            ],
            non_environment_verdict: Verdict::Exempt,
            own_pod_uid: None,
        }
    }

    fn rules(found: &[ShadowedExemption]) -> Vec<(Reason, &str)> {
        found.iter().map(|s| (s.kind, s.rule.as_str())).collect()
    }

    #[test]
    fn the_default_environment_label_shadows_nothing() {
        assert_eq!(
            shadowed_exemptions(&cfg("datalab.io/environment=true")),
            vec![]
        );
    }

    #[test]
    fn everything_is_shadowed_when_every_namespace_is_an_environment() {
        let all = vec![
            (Reason::ExemptNamespace, "kube-system"),
            (Reason::ExemptNamespace, "lab-1"),
            (Reason::ExemptNamespaceSelector, "platform=true"),
            (Reason::ExemptNamespaceSelector, "team=data,tier"),
            (Reason::ExemptPodSelector, "app=aws-node"),
            (Reason::ExemptPodSelector, "role=csi in namespace lab-2"),
        ];
        // The empty selector, and one only the automatic name label is needed for.
        for env in ["", "kubernetes.io/metadata.name"] {
            assert_eq!(rules(&shadowed_exemptions(&cfg(env))), all, "{env:?}");
        }
    }

    #[test]
    fn environments_by_name_shadow_the_rules_naming_them() {
        let found = shadowed_exemptions(&cfg("kubernetes.io/metadata.name in (lab-1,lab-2)"));
        assert_eq!(
            rules(&found),
            vec![
                (Reason::ExemptNamespace, "lab-1"),
                (Reason::ExemptPodSelector, "role=csi in namespace lab-2"),
            ]
        );
        // A negative form: everything but kube-system is an environment.
        let found = shadowed_exemptions(&cfg("kubernetes.io/metadata.name!=kube-system"));
        assert_eq!(
            rules(&found),
            vec![
                (Reason::ExemptNamespace, "lab-1"),
                (Reason::ExemptPodSelector, "role=csi in namespace lab-2"),
            ]
        );
    }

    #[test]
    fn an_exemption_selector_narrower_than_the_environments_is_shadowed() {
        // Every namespace with `tier` (and team=data) has `tier`: shadowed. `platform=true`
        // says nothing about `tier`: not shadowed.
        assert_eq!(
            rules(&shadowed_exemptions(&cfg("tier"))),
            vec![(Reason::ExemptNamespaceSelector, "team=data,tier")]
        );
        assert_eq!(
            rules(&shadowed_exemptions(&cfg("team in (data,ml)"))),
            vec![(Reason::ExemptNamespaceSelector, "team=data,tier")]
        );
        assert_eq!(
            rules(&shadowed_exemptions(&cfg("team notin (ml)"))),
            vec![(Reason::ExemptNamespaceSelector, "team=data,tier")]
        );
        // Not implied: team=data may be absent-or-other under these.
        for env in [
            "team=ml",
            "team notin (data)",
            "!team",
            "team,tier=x",
            "other",
        ] {
            assert_eq!(shadowed_exemptions(&cfg(env)), vec![], "{env:?}");
        }
    }

    /// `implies` agrees with matching on every label set over a small universe: for each
    /// pair of selectors, "known implies env" must hold exactly when no label set matches
    /// `known` but not `env`.
    #[test]
    fn implication_agrees_with_matching() {
        let selectors = [
            "",
            "k",
            "!k",
            "k=a",
            "k!=a",
            "k in (a,b)",
            "k notin (a,b)",
            "k in (b,c)",
            "k notin (c)",
            "k=a,k!=a",
            "k,j=a",
            "j!=b",
        ];
        // Values outside the selectors' own stand in for "any other value".
        let states = [None, Some("a"), Some("b"), Some("c"), Some("z")];
        let mut universe = Vec::new();
        for k in states {
            for j in states {
                let mut labels = BTreeMap::new();
                if let Some(v) = k {
                    labels.insert("k".to_owned(), v.to_owned());
                }
                if let Some(v) = j {
                    labels.insert("j".to_owned(), v.to_owned());
                }
                universe.push(labels);
            }
        }
        for known in selectors {
            let known = sel(known);
            for env in selectors {
                let env = sel(env);
                let by_matching = universe
                    .iter()
                    .filter(|l| known.matches(l))
                    .all(|l| env.matches(l));
                assert_eq!(
                    implies(known.requirements(), &env),
                    by_matching,
                    "{known} => {env}"
                );
            }
        }
    }

    /// What is reported really never gets exempt: checked against the verdict.
    #[test]
    fn a_shadowed_rule_never_exempts() {
        let cfg = cfg("kubernetes.io/metadata.name in (lab-1,lab-2)");
        for (ns, labels) in [("lab-1", vec![]), ("lab-2", vec![("role", "csi")])] {
            let namespace = NamespaceInfo {
                name: ns.into(),
                labels: [(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned())].into(),
            };
            let pod = PodInfo {
                uid: "u".into(),
                namespace: ns.into(),
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ..PodInfo::default()
            };
            assert_eq!(
                verdict(&pod, Some(&namespace), &cfg).reason,
                Reason::EnvironmentNamespace
            );
        }
    }
}

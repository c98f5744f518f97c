//! The NetworkPolicy we want in each environment namespace, and how a live one compares to
//! it. Pure: no client, no clock; unit-tested here.
//!
//! The desired policy (`networkPolicy.name`, default `allow-web-egress`):
//! ```yaml
//! metadata:
//!   labels: {app.kubernetes.io/managed-by: datalab-guard}
//! spec:
//!   podSelector: {}            # every pod in the namespace
//!   policyTypes: [Egress]
//!   ingress: []                # owned by us so that nobody can hang rules on it
//!   egress:
//!   - to:
//!     - ipBlock: {cidr: 0.0.0.0/0, except: [<blocked IPv4 CIDRs>]}
//!     - ipBlock: {cidr: ::/0, except: [<blocked IPv6 CIDRs>]}   # dual-stack only
//!   - to:
//!     - namespaceSelector: {}  # every pod in every namespace
//! ```
//!
//! The second rule is what makes the policy mean "all egress except the blocked set" on every
//! CNI: several dataplanes (Cilium and those built on it, and others, see `deploy/README.md`)
//! do not match traffic to in-cluster endpoints against `ipBlock` CIDRs, so with `ipBlock`
//! peers alone tenants would lose cluster DNS and pod-to-pod egress. No pod holds a
//! metadata address, so the rule opens nothing that the `except` lists close, and the bypass
//! detector does not count pod-selecting peers as reopening anything.
//!
//! Comparison is semantic: except lists, rules and peers in any order, defaults spelled or
//! not (`policyTypes` absent, `ingress: []` vs absent, `protocol: TCP`), CIDRs in any valid
//! spelling. Ownership is checked from `managedFields`: a spec field we apply that our field
//! manager no longer owns has been taken over by another manager, which is drift even when
//! the value is still right (the next write of that manager would change it unopposed).

use std::collections::{BTreeMap, BTreeSet};

use datalab_guard_common::cidr::Cidr;
use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde_json::{json, Value};

use crate::{blocklist, k8s::client::MANAGER};

/// The label that marks the policy as ours.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The spec fields whose ownership by our field manager is checked (`ingress` is left out:
/// an API server may drop an empty list, and then nobody owns it; its value is compared).
const OWNED_SPEC_FIELDS: [&str; 3] = ["podSelector", "policyTypes", "egress"];

/// The spec fields compared.
const SPEC_FIELDS: [&str; 4] = ["podSelector", "policyTypes", "ingress", "egress"];

/// The blocked CIDRs as `except` lists: (IPv4, IPv6), canonical text, sorted, no
/// duplicates. A `/0` cannot be an exception of `0.0.0.0/0` (the API server requires a
/// strict subset), so it is left out.
pub fn except_lists(blocked: &[Cidr]) -> (Vec<String>, Vec<String>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for c in blocked.iter().filter(|c| c.prefix() > 0) {
        match c {
            Cidr::V4 { .. } => v4.insert(*c),
            Cidr::V6 { .. } => v6.insert(*c),
        };
    }
    (
        v4.iter().map(blocklist::describe).collect(),
        v6.iter().map(blocklist::describe).collect(),
    )
}

fn ip_peer(cidr: &str, except: Vec<String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_owned(),
            except: (!except.is_empty()).then_some(except),
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// The in-cluster rule: egress to every pod in every namespace.
fn all_pods_rule() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        ports: None,
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        }]),
    }
}

/// The policy we apply in `namespace`.
pub fn desired_policy(
    namespace: &str,
    name: &str,
    blocked: &[Cidr],
    dual_stack: bool,
) -> NetworkPolicy {
    let (v4, v6) = except_lists(blocked);
    let mut to = vec![ip_peer("0.0.0.0/0", v4)];
    if dual_stack {
        to.push(ip_peer("::/0", v6));
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Egress".to_owned()]),
            ingress: Some(Vec::new()),
            egress: Some(vec![
                NetworkPolicyEgressRule {
                    ports: None,
                    to: Some(to),
                },
                all_pods_rule(),
            ]),
        }),
    }
}

/// What a live policy is, compared with the desired one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Ok,
    Missing,
    /// Present but different.
    Drifted(Vec<Drift>),
}

/// One difference between the live and the desired policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// Our managed-by label is missing (`None`) or has another value.
    Label(Option<String>),
    /// `spec.<field>` has another value.
    Spec(&'static str),
    /// `spec.<field>` is not owned by our field manager; these managers own it.
    Owner {
        field: &'static str,
        owners: Vec<String>,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Label(Some(v)) => {
                write!(f, "label {MANAGED_BY_LABEL} is {v:?}, not {MANAGER:?}")
            }
            Drift::Label(None) => write!(f, "label {MANAGED_BY_LABEL} is missing"),
            Drift::Spec(field) => write!(f, "spec.{field} differs"),
            Drift::Owner { field, owners } if owners.is_empty() => {
                write!(f, "spec.{field} is not applied by {MANAGER}")
            }
            Drift::Owner { field, owners } => {
                write!(f, "spec.{field} is owned by {}", owners.join(", "))
            }
        }
    }
}

impl Observed {
    /// Drift that only our own field manager can have caused: values differ, but we still
    /// own every field and the label is ours. Any other writer changing a field takes its
    /// ownership (server-side apply), so this is a policy we applied under an earlier
    /// configuration (blocked set, dual-stack), not an edit by someone else.
    pub fn is_our_own_change(&self) -> bool {
        matches!(self, Observed::Drifted(d) if d.iter().all(|d| matches!(d, Drift::Spec(_))))
    }
}

/// Compares `live` with `desired`. `strict` (we manage the policy) also requires our label
/// and our field manager's ownership of the spec; without it (report-only) a policy put
/// there by other means counts as long as its spec is right.
pub fn observe(live: Option<&NetworkPolicy>, desired: &NetworkPolicy, strict: bool) -> Observed {
    let Some(live) = live else {
        return Observed::Missing;
    };
    if live.metadata.deletion_timestamp.is_some() {
        return Observed::Missing;
    }
    let mut reasons = Vec::new();
    if strict {
        let label = live
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL));
        if label.map(String::as_str) != Some(MANAGER) {
            reasons.push(Drift::Label(label.cloned()));
        }
    }
    let have = canonical_spec(live.spec.as_ref());
    let want = canonical_spec(desired.spec.as_ref());
    for field in SPEC_FIELDS {
        if have.get(field) != want.get(field) {
            reasons.push(Drift::Spec(field));
        }
    }
    if strict {
        reasons.extend(ownership_problems(live));
    }
    if reasons.is_empty() {
        Observed::Ok
    } else {
        Observed::Drifted(reasons)
    }
}

/// Whether `policy` was made by us: our label, and our field manager in its managedFields.
/// Only such a policy is ever deleted.
pub fn is_ours(policy: &NetworkPolicy) -> bool {
    let labelled = policy
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGER);
    let managed = policy
        .metadata
        .managed_fields
        .as_ref()
        .is_some_and(|entries| {
            entries
                .iter()
                .any(|e| e.manager.as_deref() == Some(MANAGER))
        });
    labelled && managed
}

fn owns(fields: Option<&Value>, field: &str) -> bool {
    fields
        .and_then(|f| f.get("f:spec"))
        .and_then(|s| s.get(format!("f:{field}")))
        .is_some()
}

/// Spec fields we apply that our manager does not own (any more), with who does.
fn ownership_problems(live: &NetworkPolicy) -> Vec<Drift> {
    let Some(entries) = live.metadata.managed_fields.as_ref() else {
        // A server that does not report ownership: nothing to judge by.
        return Vec::new();
    };
    let ours = |e: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry| {
        e.manager.as_deref() == Some(MANAGER) && e.operation.as_deref() == Some("Apply")
    };
    let mut out = Vec::new();
    for field in OWNED_SPEC_FIELDS {
        let owned_by_us = entries
            .iter()
            .filter(ours)
            .any(|e| owns(e.fields_v1.as_ref().map(|f| &f.0), field));
        if owned_by_us {
            continue;
        }
        let others: BTreeSet<String> = entries
            .iter()
            .filter(|e| !ours(e))
            .filter(|e| owns(e.fields_v1.as_ref().map(|f| &f.0), field))
            .map(|e| e.manager.clone().unwrap_or_else(|| "(unnamed)".to_owned()))
            .collect();
        out.push(Drift::Owner {
            field,
            owners: others.into_iter().collect(),
        });
    }
    out
}

// ---- canonical forms ----

fn canonical_cidr(text: &str) -> String {
    match text.trim().parse::<ipnet::IpNet>() {
        Ok(net) => net.trunc().to_string(),
        Err(_) => text.trim().to_owned(),
    }
}

/// `None` and `{}` are the same selector (everything); expressions in any order.
fn canonical_selector(s: Option<&LabelSelector>) -> Value {
    let labels: BTreeMap<String, String> =
        s.and_then(|s| s.match_labels.clone()).unwrap_or_default();
    let mut exprs: Vec<String> = s
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .map(|e| {
            let values: BTreeSet<&String> = e.values.iter().flatten().collect();
            json!({"key": e.key, "operator": e.operator, "values": values}).to_string()
        })
        .collect();
    exprs.sort();
    exprs.dedup();
    json!({"matchLabels": labels, "matchExpressions": exprs})
}

fn canonical_ports(ports: Option<&Vec<NetworkPolicyPort>>) -> Value {
    let mut out: Vec<String> = ports
        .into_iter()
        .flatten()
        .map(|p| {
            json!({
                "protocol": p.protocol.as_deref().unwrap_or("TCP"),
                "port": serde_json::to_value(&p.port).unwrap_or(Value::Null),
                "endPort": p.end_port,
            })
            .to_string()
        })
        .collect();
    out.sort();
    out.dedup();
    json!(out)
}

/// A peer; an absent selector and an empty one differ here (own namespace vs all).
fn canonical_peers(peers: Option<&Vec<NetworkPolicyPeer>>) -> Value {
    let mut out: Vec<String> = peers
        .into_iter()
        .flatten()
        .map(|p| {
            let block = p.ip_block.as_ref().map(|b| {
                let except: BTreeSet<String> = b.except.iter().flatten().map(|e| canonical_cidr(e)).collect();
                json!({"cidr": canonical_cidr(&b.cidr), "except": except})
            });
            json!({
                "ipBlock": block,
                "namespaceSelector": p.namespace_selector.as_ref().map(|s| canonical_selector(Some(s))),
                "podSelector": p.pod_selector.as_ref().map(|s| canonical_selector(Some(s))),
            })
            .to_string()
        })
        .collect();
    out.sort();
    out.dedup();
    json!(out)
}

fn canonical_rules<'a>(
    rules: impl Iterator<
        Item = (
            Option<&'a Vec<NetworkPolicyPort>>,
            Option<&'a Vec<NetworkPolicyPeer>>,
        ),
    >,
) -> Value {
    let mut out: Vec<String> = rules
        .map(|(ports, peers)| json!([canonical_ports(ports), canonical_peers(peers)]).to_string())
        .collect();
    out.sort();
    out.dedup();
    json!(out)
}

/// Each compared spec field in canonical form.
fn canonical_spec(spec: Option<&NetworkPolicySpec>) -> BTreeMap<&'static str, Value> {
    let default = NetworkPolicySpec::default();
    let spec = spec.unwrap_or(&default);
    let egress = spec.egress.as_deref().unwrap_or_default();
    let ingress = spec.ingress.as_deref().unwrap_or_default();
    // The API server's default: Ingress always, Egress when there are egress rules.
    let types: BTreeSet<String> = match &spec.policy_types {
        Some(t) => t.iter().cloned().collect(),
        None => {
            let mut t = BTreeSet::from(["Ingress".to_owned()]);
            if !egress.is_empty() {
                t.insert("Egress".to_owned());
            }
            t
        }
    };
    BTreeMap::from([
        (
            "podSelector",
            canonical_selector(spec.pod_selector.as_ref()),
        ),
        ("policyTypes", json!(types)),
        (
            "ingress",
            canonical_rules(ingress.iter().map(|r| (r.ports.as_ref(), r.from.as_ref()))),
        ),
        (
            "egress",
            canonical_rules(egress.iter().map(|r| (r.ports.as_ref(), r.to.as_ref()))),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        FieldsV1, LabelSelectorRequirement, ManagedFieldsEntry,
    };

    use super::*;
    use crate::blocklist::parse_cidr;

    fn blocked(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| parse_cidr(c).unwrap()).collect()
    }

    fn default_blocked() -> Vec<Cidr> {
        blocked(&["169.254.169.254/32", "fd00:ec2::254/128"])
    }

    fn entry(manager: &str, operation: &str, spec_fields: &[&str]) -> ManagedFieldsEntry {
        let mut spec = serde_json::Map::new();
        for f in spec_fields {
            spec.insert(format!("f:{f}"), json!({}));
        }
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            api_version: Some("networking.k8s.io/v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(
                json!({"f:metadata": {"f:labels": {"f:app.kubernetes.io/managed-by": {}}}, "f:spec": spec}),
            )),
            ..ManagedFieldsEntry::default()
        }
    }

    /// The desired policy as the API server would return it after our apply.
    fn applied(desired: &NetworkPolicy) -> NetworkPolicy {
        let mut p = desired.clone();
        p.metadata.managed_fields = Some(vec![entry(
            MANAGER,
            "Apply",
            &["podSelector", "policyTypes", "ingress", "egress"],
        )]);
        p.metadata.resource_version = Some("12".into());
        p
    }

    fn egress_peers(p: &NetworkPolicy) -> Vec<IPBlock> {
        p.spec.as_ref().unwrap().egress.as_ref().unwrap()[0]
            .to
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.ip_block.clone().unwrap())
            .collect()
    }

    #[test]
    fn desired_policy_selects_every_pod_and_excepts_the_blocked_set() {
        let p = desired_policy("tenant-a", "allow-web-egress", &default_blocked(), false);
        assert_eq!(p.metadata.name.as_deref(), Some("allow-web-egress"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(
            p.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
            "datalab-guard"
        );
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.pod_selector, Some(LabelSelector::default()));
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Egress".to_owned()][..])
        );
        let peers = egress_peers(&p);
        assert_eq!(
            peers,
            vec![IPBlock {
                cidr: "0.0.0.0/0".into(),
                except: Some(vec!["169.254.169.254/32".into()])
            }]
        );

        // Serialized as the API expects it (apiVersion/kind for apply, `podSelector: {}`).
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["apiVersion"], "networking.k8s.io/v1");
        assert_eq!(v["kind"], "NetworkPolicy");
        assert_eq!(v["spec"]["podSelector"], json!({}));
        assert_eq!(v["spec"]["ingress"], json!([]));
        assert!(v["spec"]["egress"][0].get("ports").is_none(), "all ports");
        // The in-cluster rule, exactly as the API sees it: every pod in every namespace, all
        // ports.
        assert_eq!(
            v["spec"]["egress"][1],
            json!({"to": [{"namespaceSelector": {}}]})
        );
        assert_eq!(v["spec"]["egress"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_in_cluster_rule_is_part_of_the_desired_policy() {
        for dual in [false, true] {
            let d = desired_policy("t", "allow-web-egress", &default_blocked(), dual);
            // Applied as is: ok. Without the in-cluster rule (a policy applied by an older
            // version of ours): an update of our own, not a repair.
            assert_eq!(observe(Some(&applied(&d)), &d, true), Observed::Ok);
            let mut old = applied(&d);
            old.spec
                .as_mut()
                .unwrap()
                .egress
                .as_mut()
                .unwrap()
                .truncate(1);
            let observed = observe(Some(&old), &d, true);
            assert_eq!(observed, Observed::Drifted(vec![Drift::Spec("egress")]));
            assert!(observed.is_our_own_change());
            // Narrowed by someone else to the own namespace (no namespaceSelector): drift.
            let mut narrowed = applied(&d);
            narrowed.spec.as_mut().unwrap().egress.as_mut().unwrap()[1] = NetworkPolicyEgressRule {
                ports: None,
                to: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector::default()),
                    ..Default::default()
                }]),
            };
            assert!(matches!(
                observe(Some(&narrowed), &d, true),
                Observed::Drifted(_)
            ));
            // Merged into the ipBlock rule as a third peer: other rules, reported (the
            // comparison is by rule, as for a split).
            let mut merged = applied(&d);
            let egress = merged.spec.as_mut().unwrap().egress.as_mut().unwrap();
            let all = egress.pop().unwrap().to.unwrap();
            egress[0].to.as_mut().unwrap().extend(all);
            assert!(matches!(
                observe(Some(&merged), &d, true),
                Observed::Drifted(_)
            ));
        }
    }

    #[test]
    fn dual_stack_adds_the_ipv6_rule() {
        let list = blocked(&[
            "fd00:ec2::254/128",
            "169.254.169.254/32",
            "100.100.100.200/32",
            "fd20:ce::254",
            "169.254.169.254",
        ]);
        let p = desired_policy("t", "allow-web-egress", &list, true);
        let peers = egress_peers(&p);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].cidr, "0.0.0.0/0");
        assert_eq!(
            peers[0].except.as_deref().unwrap(),
            ["100.100.100.200/32", "169.254.169.254/32"]
        );
        assert_eq!(peers[1].cidr, "::/0");
        assert_eq!(
            peers[1].except.as_deref().unwrap(),
            ["fd00:ec2::254/128", "fd20:ce::254/128"]
        );
        // v4 only: the IPv6 blocked entries are simply not used.
        assert_eq!(
            egress_peers(&desired_policy("t", "n", &list, false)).len(),
            1
        );
    }

    #[test]
    fn a_slash_zero_is_never_an_exception() {
        let (v4, v6) = except_lists(&blocked(&["0.0.0.0/0", "169.254.169.254/32", "::/0"]));
        assert_eq!(v4, ["169.254.169.254/32"]);
        assert!(v6.is_empty());
        let p = desired_policy("t", "n", &blocked(&["::/0"]), true);
        assert_eq!(egress_peers(&p)[1].except, None);
    }

    #[test]
    fn what_we_applied_is_ok() {
        let d = desired_policy("t", "allow-web-egress", &default_blocked(), true);
        assert_eq!(observe(Some(&applied(&d)), &d, true), Observed::Ok);
        assert_eq!(observe(None, &d, true), Observed::Missing);
    }

    #[test]
    fn normalization_ignores_order_spelling_and_defaults() {
        let d = desired_policy(
            "t",
            "allow-web-egress",
            &blocked(&[
                "169.254.169.254/32",
                "100.100.100.200/32",
                "fd00:ec2::254/128",
            ]),
            true,
        );
        let mut live = applied(&d);
        let spec = live.spec.as_mut().unwrap();
        // Peers swapped, except lists reversed and spelled differently, ingress absent, an
        // empty selector with empty lists, `policyTypes` still [Egress].
        let to = spec.egress.as_mut().unwrap()[0].to.as_mut().unwrap();
        to.reverse();
        for peer in to.iter_mut() {
            let b = peer.ip_block.as_mut().unwrap();
            b.except.as_mut().unwrap().reverse();
            if b.cidr == "::/0" {
                b.cidr = "0::0/0".into();
                b.except = Some(vec!["fd00:ec2:0::254/128".into()]);
            }
        }
        spec.ingress = None;
        spec.pod_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::new()),
            match_expressions: Some(vec![]),
        });
        assert_eq!(observe(Some(&live), &d, true), Observed::Ok);

        // Egress split into two rules holding one peer each: the same set of rules? No —
        // but the same traffic. We compare rules, so this is reported (and re-applied).
        let mut split = applied(&d);
        let spec = split.spec.as_mut().unwrap();
        let peers = spec.egress.as_ref().unwrap()[0].to.clone().unwrap();
        spec.egress = Some(
            peers
                .into_iter()
                .map(|p| NetworkPolicyEgressRule {
                    ports: None,
                    to: Some(vec![p]),
                })
                .collect(),
        );
        assert!(matches!(
            observe(Some(&split), &d, true),
            Observed::Drifted(_)
        ));
    }

    #[test]
    fn policy_types_default_like_the_api_server() {
        let d = desired_policy("t", "n", &default_blocked(), false);
        let mut live = applied(&d);
        // Absent policyTypes with egress rules defaults to [Ingress, Egress]: not ours.
        live.spec.as_mut().unwrap().policy_types = None;
        assert_eq!(
            observe(Some(&live), &d, true),
            Observed::Drifted(vec![Drift::Spec("policyTypes")])
        );
    }

    #[test]
    fn foreign_edits_are_drift() {
        let d = desired_policy("t", "allow-web-egress", &default_blocked(), false);

        // Someone removed the exception (reopening metadata) with kubectl edit.
        let mut live = applied(&d);
        live.spec.as_mut().unwrap().egress.as_mut().unwrap()[0]
            .to
            .as_mut()
            .unwrap()[0]
            .ip_block
            .as_mut()
            .unwrap()
            .except = None;
        live.metadata.managed_fields = Some(vec![
            entry(MANAGER, "Apply", &["podSelector", "policyTypes", "ingress"]),
            entry("kubectl-edit", "Update", &["egress"]),
        ]);
        let observed = observe(Some(&live), &d, true);
        assert_eq!(
            observed,
            Observed::Drifted(vec![
                Drift::Spec("egress"),
                Drift::Owner {
                    field: "egress",
                    owners: vec!["kubectl-edit".into()]
                }
            ])
        );
        assert!(!observed.is_our_own_change());
        assert_eq!(
            texts(&observed),
            [
                "spec.egress differs",
                "spec.egress is owned by kubectl-edit"
            ]
        );

        // Someone took the field over with the same value: still drift (ownership).
        let mut taken = applied(&d);
        taken.metadata.managed_fields = Some(vec![
            entry(MANAGER, "Apply", &["podSelector", "ingress", "egress"]),
            entry("kubectl", "Apply", &["policyTypes"]),
        ]);
        assert_eq!(
            texts(&observe(Some(&taken), &d, true)),
            ["spec.policyTypes is owned by kubectl"]
        );

        // Shared ownership with the same value is fine (a force apply cannot undo it).
        let mut shared = applied(&d);
        shared.metadata.managed_fields.as_mut().unwrap().push(entry(
            "kubectl",
            "Apply",
            &["egress"],
        ));
        assert_eq!(observe(Some(&shared), &d, true), Observed::Ok);

        // An added ingress rule, our label removed.
        let mut more = applied(&d);
        more.spec.as_mut().unwrap().ingress = Some(vec![Default::default()]);
        more.metadata.labels = None;
        assert_eq!(
            texts(&observe(Some(&more), &d, true)),
            [
                format!("label {MANAGED_BY_LABEL} is missing"),
                "spec.ingress differs".into()
            ]
        );
        // Report-only mode does not care who wrote it, only what it says.
        let mut plain = applied(&d);
        plain.metadata.labels = None;
        plain.metadata.managed_fields = Some(vec![entry(
            "helm",
            "Update",
            &["podSelector", "policyTypes", "egress"],
        )]);
        assert_eq!(observe(Some(&plain), &d, false), Observed::Ok);
        assert_eq!(
            texts(&observe(Some(&plain), &d, true)),
            [
                format!("label {MANAGED_BY_LABEL} is missing"),
                "spec.podSelector is owned by helm".into(),
                "spec.policyTypes is owned by helm".into(),
                "spec.egress is owned by helm".into(),
            ]
        );
        let mut unapplied = applied(&d);
        unapplied.metadata.managed_fields = Some(vec![]);
        assert_eq!(
            texts(&observe(Some(&unapplied), &d, true))[0],
            "spec.podSelector is not applied by datalab-guard"
        );
    }

    fn texts(o: &Observed) -> Vec<String> {
        match o {
            Observed::Drifted(d) => d.iter().map(ToString::to_string).collect(),
            other => panic!("not drifted: {other:?}"),
        }
    }

    #[test]
    fn our_own_older_policy_is_an_update_not_a_repair() {
        // Applied under dualStack: false; the config now says true.
        let before = desired_policy("t", "allow-web-egress", &default_blocked(), false);
        let now = desired_policy("t", "allow-web-egress", &default_blocked(), true);
        let observed = observe(Some(&applied(&before)), &now, true);
        assert_eq!(observed, Observed::Drifted(vec![Drift::Spec("egress")]));
        assert!(observed.is_our_own_change());
        assert!(!Observed::Missing.is_our_own_change());
        assert!(!Observed::Ok.is_our_own_change());
    }

    #[test]
    fn selectors_compare_semantically() {
        let a = LabelSelector {
            match_labels: Some(BTreeMap::from([("a".into(), "1".into())])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "k".into(),
                    operator: "In".into(),
                    values: Some(vec!["y".into(), "x".into()]),
                },
                LabelSelectorRequirement {
                    key: "j".into(),
                    operator: "Exists".into(),
                    values: None,
                },
            ]),
        };
        let mut b = a.clone();
        b.match_expressions.as_mut().unwrap().reverse();
        b.match_expressions.as_mut().unwrap()[1].values = Some(vec!["x".into(), "y".into()]);
        assert_eq!(canonical_selector(Some(&a)), canonical_selector(Some(&b)));
        assert_eq!(
            canonical_selector(None),
            canonical_selector(Some(&LabelSelector::default()))
        );
        assert_ne!(canonical_selector(None), canonical_selector(Some(&a)));
        // In a peer, an absent namespaceSelector (own namespace) is not an empty one (all).
        let own = NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        };
        let all = NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            ..own.clone()
        };
        assert_ne!(
            canonical_peers(Some(&vec![own])),
            canonical_peers(Some(&vec![all]))
        );
    }

    #[test]
    fn only_our_labelled_and_managed_policies_are_ours() {
        let d = desired_policy("t", "allow-web-egress", &default_blocked(), false);
        assert!(is_ours(&applied(&d)));
        let mut unlabelled = applied(&d);
        unlabelled.metadata.labels = None;
        assert!(!is_ours(&unlabelled));
        let mut foreign = applied(&d);
        foreign.metadata.managed_fields = Some(vec![entry("kubectl", "Update", &["podSelector"])]);
        assert!(
            !is_ours(&foreign),
            "our label copied by someone else is not enough"
        );
        let mut no_fields = applied(&d);
        no_fields.metadata.managed_fields = None;
        assert!(!is_ours(&no_fields));
    }
}

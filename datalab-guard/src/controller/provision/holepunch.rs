//! Hole-punch detection: other NetworkPolicies that reopen a blocked destination.
//!
//! NetworkPolicies are additive. Once any policy selects a pod for egress, the pod may send
//! whatever the *union* of the egress rules of all policies selecting it allows. Our
//! `allow-web-egress` allows everything except the metadata endpoints; a second policy in the
//! same namespace that allows `0.0.0.0/0` (say, "let the notebook reach the internet")
//! silently reopens them for the pods it selects. [`find_bypasses`] finds such rules.
//!
//! Pure: API objects in, findings out; no client, no I/O. It reads `k8s-openapi`'s
//! `NetworkPolicy` as plain data (the brief's interface), so it lives here, next to the
//! provisioning that reports what it finds, and not in the kube-free `datalab-guard-policy`
//! crate: translating the whole NetworkPolicy schema into a local mirror would only add a
//! place to get it wrong.
//!
//! # The rules
//! A policy is considered when:
//! - it is not ours (`our_name`);
//! - it has the `Egress` policy type. When `policyTypes` is absent, the API server's
//!   defaulting applies: `Egress` exactly when `spec.egress` has at least one rule. A policy
//!   with the `Egress` type and no rules denies all egress and reopens nothing.
//!
//! Within it, each egress rule (`egress[i]`) reopens a blocked CIDR when
//! - its `to` is absent or empty: it allows every destination;
//! - or one of its peers is an `ipBlock` whose `cidr` contains the whole blocked CIDR (same
//!   family, at most as long a prefix) and whose `except` list does not cover it. "Cover"
//!   means the union of the `except` entries contains every address of the blocked CIDR, so
//!   `except: [169.254.169.254/32]` covers the /32 and `except: [169.254.0.0/16]` too, while
//!   an except that takes only part of a blocked range leaves the rest open (reported).
//!
//! Not reopening:
//! - `podSelector` / `namespaceSelector` peers: they match pod IPs, never the metadata
//!   endpoint, which no pod holds.
//! - an `ipBlock` of a different family, or one that only partly overlaps a blocked CIDR (a
//!   /16 blocked range and an allowed /24 inside it). Blocked CIDRs are normally single
//!   addresses (/32, /128), where "contains" and "overlaps" are the same thing; for a wider
//!   blocked range only a rule opening the whole range is reported. IPv4 destinations are
//!   never reopened by IPv6 blocks (`::ffff:0:0/96` included): CNIs match IPv4 packets
//!   against IPv4 CIDRs only.
//! - peers that cannot be read: an `ipBlock.cidr` that does not parse is ignored (the API
//!   server rejects it anyway; a CNI would not enforce it). An `except` entry that does not
//!   parse is ignored too, which can only make a rule look *more* open: when in doubt, report.
//!   A peer with none of the three fields (invalid) is ignored.
//!
//! # Ports
//! A rule with a `ports` list still reopens the blocked destination, on those ports. The
//! metadata services listen on port 80 (HTTP), but which ports matter depends on the
//! endpoint (Azure's wireserver uses 80 and 32526, some clouds proxy on 8080 or 443, and a
//! named port resolves per pod), so guessing would trade a noisy finding for a missed one.
//! The ports are written into [`Bypass::rule`] (`, ports TCP/443, UDP/53`) so that an
//! operator can judge a DNS-only rule at a glance. Nothing is hidden: the eBPF guard drops
//! every port anyway; the finding is about the policy layer no longer being a second line.
//!
//! # Output
//! One [`Bypass`] per (policy, egress rule, blocked CIDR), in input order: policies as given,
//! rules by index, blocked CIDRs as given. When several peers of one rule reopen the same
//! CIDR, the first one names it.

use datalab_guard_common::cidr::{mask, Cidr};
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::blocklist::{describe, parse_cidr};

/// One egress rule of another policy that reopens a blocked destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bypass {
    /// The policy's name (`metadata.name`; `<unnamed>` when it has none).
    pub policy: String,
    /// The blocked CIDR this rule reopens.
    pub destination: Cidr,
    /// Which rule and why, for logs and Events, e.g. `egress[0] to 0.0.0.0/0 without except`,
    /// `egress[1] allows all destinations (no 'to')`, `egress[2] to 169.254.0.0/16`,
    /// `egress[0] to 0.0.0.0/0 except 169.254.0.0/24 (does not cover 169.254.169.254/32)`,
    /// with `, ports TCP/443` appended when the rule lists ports.
    pub rule: String,
}

/// The rules of `policies` (one namespace's NetworkPolicies) that reopen any of `blocked`;
/// see the module docs. Our own policy, `our_name`, is skipped.
pub fn find_bypasses<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    blocked: &[Cidr],
    our_name: &str,
) -> Vec<Bypass> {
    let mut found = Vec::new();
    for policy in policies {
        let name = policy.metadata.name.as_deref().unwrap_or("<unnamed>");
        if name == our_name {
            continue;
        }
        let Some(spec) = &policy.spec else {
            continue;
        };
        let rules = spec.egress.as_deref().unwrap_or_default();
        let has_egress_type = match &spec.policy_types {
            Some(types) => types.iter().any(|t| t == "Egress"),
            None => !rules.is_empty(),
        };
        if !has_egress_type {
            continue;
        }
        for (index, rule) in rules.iter().enumerate() {
            for destination in blocked {
                if let Some(why) = reopens(rule, destination) {
                    found.push(Bypass {
                        policy: name.to_owned(),
                        destination: *destination,
                        rule: format!("egress[{index}] {why}{}", ports_suffix(rule)),
                    });
                }
            }
        }
    }
    found
}

/// Why `rule` allows traffic to all of `blocked`, or `None`.
fn reopens(rule: &NetworkPolicyEgressRule, blocked: &Cidr) -> Option<String> {
    let peers = rule.to.as_deref().unwrap_or_default();
    if peers.is_empty() {
        return Some("allows all destinations (no 'to')".to_owned());
    }
    peers
        .iter()
        .filter_map(|peer| peer.ip_block.as_ref())
        .find_map(|block| ip_block_reopens(block, blocked))
}

fn ip_block_reopens(block: &IPBlock, blocked: &Cidr) -> Option<String> {
    let allowed = parse_cidr(&block.cidr).ok()?;
    if !contains(&allowed, blocked) {
        return None;
    }
    let cidr_text = block.cidr.trim();
    let except_texts: Vec<&str> = block
        .except
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| e.trim())
        .collect();
    if except_texts.is_empty() {
        // "without except" where the missing except is the obvious fix: a default route.
        return Some(if allowed.prefix() == 0 {
            format!("to {cidr_text} without except")
        } else {
            format!("to {cidr_text}")
        });
    }
    let excepts: Vec<Cidr> = except_texts
        .iter()
        .filter_map(|e| parse_cidr(e).ok())
        .collect();
    if covered(blocked, &excepts) {
        return None;
    }
    Some(format!(
        "to {cidr_text} except {} (does not cover {})",
        except_texts.join(", "),
        describe(blocked)
    ))
}

/// Whether `outer` contains every address of `inner` (same family only).
fn contains(outer: &Cidr, inner: &Cidr) -> bool {
    match (*outer, *inner) {
        (
            Cidr::V4 {
                addr: o,
                prefix: op,
            },
            Cidr::V4 {
                addr: i,
                prefix: ip,
            },
        ) => op <= ip && mask(i, op) == o,
        (
            Cidr::V6 {
                addr: o,
                prefix: op,
            },
            Cidr::V6 {
                addr: i,
                prefix: ip,
            },
        ) => op <= ip && mask(i, op) == o,
        _ => false,
    }
}

/// Whether the union of `excepts` contains every address of `target`. Splits `target` in
/// halves only where some except lies strictly inside it, so the work is bounded by the
/// number of excepts times the prefix length.
fn covered(target: &Cidr, excepts: &[Cidr]) -> bool {
    if excepts.iter().any(|e| contains(e, target)) {
        return true;
    }
    if !excepts.iter().any(|e| contains(target, e)) {
        return false;
    }
    // Some except is strictly longer than `target` (else the first test would have held),
    // so `target` is not a single address and its halves exist.
    let (low, high) = halves(target);
    covered(&low, excepts) && covered(&high, excepts)
}

/// The two halves of a CIDR whose prefix is shorter than its family's maximum.
fn halves(c: &Cidr) -> (Cidr, Cidr) {
    fn split<const N: usize>(addr: [u8; N], prefix: u8) -> ([u8; N], [u8; N]) {
        let mut high = addr;
        let bit = prefix as usize; // the first host bit, set in the high half
        high[bit / 8] |= 0x80 >> (bit % 8);
        (addr, high)
    }
    match *c {
        Cidr::V4 { addr, prefix } => {
            let (l, h) = split(addr, prefix);
            (
                Cidr::V4 {
                    addr: l,
                    prefix: prefix + 1,
                },
                Cidr::V4 {
                    addr: h,
                    prefix: prefix + 1,
                },
            )
        }
        Cidr::V6 { addr, prefix } => {
            let (l, h) = split(addr, prefix);
            (
                Cidr::V6 {
                    addr: l,
                    prefix: prefix + 1,
                },
                Cidr::V6 {
                    addr: h,
                    prefix: prefix + 1,
                },
            )
        }
    }
}

/// `, ports TCP/80, UDP/53, TCP/8000-8080, TCP/http, SCTP/any` when the rule lists ports.
fn ports_suffix(rule: &NetworkPolicyEgressRule) -> String {
    let ports = rule.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ports.iter().map(describe_port).collect();
    format!(", ports {}", list.join(", "))
}

fn describe_port(p: &NetworkPolicyPort) -> String {
    // The API server defaults the protocol to TCP.
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    let port = match (&p.port, p.end_port) {
        (None, _) => "any".to_owned(),
        (Some(IntOrString::Int(n)), Some(end)) if end > *n => format!("{n}-{end}"),
        (Some(IntOrString::Int(n)), _) => n.to_string(),
        (Some(IntOrString::String(name)), _) => name.clone(),
    };
    format!("{proto}/{port}")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::networking::v1::{NetworkPolicyPeer, NetworkPolicySpec},
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    };

    use super::*;

    fn cidr(s: &str) -> Cidr {
        parse_cidr(s).unwrap()
    }

    fn default_blocked() -> Vec<Cidr> {
        vec![cidr("169.254.169.254/32"), cidr("fd00:ec2::254/128")]
    }

    fn block(c: &str, except: &[&str]) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: c.to_owned(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|e| e.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    fn to(peers: Vec<NetworkPolicyPeer>) -> NetworkPolicyEgressRule {
        NetworkPolicyEgressRule {
            to: Some(peers),
            ports: None,
        }
    }

    fn policy(
        name: &str,
        types: Option<&[&str]>,
        egress: Option<Vec<NetworkPolicyEgressRule>>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("lab-1".to_owned()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                egress,
                ingress: None,
            }),
        }
    }

    fn egress_policy(name: &str, rules: Vec<NetworkPolicyEgressRule>) -> NetworkPolicy {
        policy(name, Some(&["Egress"]), Some(rules))
    }

    /// (policy, destination text, rule) triples, for compact assertions.
    fn found(policies: &[NetworkPolicy], blocked: &[Cidr]) -> Vec<(String, String, String)> {
        find_bypasses(policies, blocked, "allow-web-egress")
            .into_iter()
            .map(|b| (b.policy, describe(&b.destination), b.rule))
            .collect()
    }

    fn triple(p: &str, d: &str, r: &str) -> (String, String, String) {
        (p.to_owned(), d.to_owned(), r.to_owned())
    }

    #[test]
    fn default_route_without_except_reopens_v4() {
        let p = egress_policy("internet", vec![to(vec![block("0.0.0.0/0", &[])])]);
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "internet",
                "169.254.169.254/32",
                "egress[0] to 0.0.0.0/0 without except"
            )]
        );
    }

    #[test]
    fn except_covering_imds_is_no_bypass() {
        for except in [
            &["169.254.169.254/32"][..],
            &["169.254.0.0/16"],
            &["10.0.0.0/8", "169.254.169.254/32"],
        ] {
            let p = egress_policy("internet", vec![to(vec![block("0.0.0.0/0", except)])]);
            assert_eq!(found(&[p], &default_blocked()), [], "except {except:?}");
        }
    }

    #[test]
    fn except_that_misses_imds_is_reported() {
        let p = egress_policy(
            "internet",
            vec![to(vec![block(
                "0.0.0.0/0",
                &["10.0.0.0/8", "169.254.170.0/24"],
            )])],
        );
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "internet",
                "169.254.169.254/32",
                "egress[0] to 0.0.0.0/0 except 10.0.0.0/8, 169.254.170.0/24 (does not cover 169.254.169.254/32)"
            )]
        );
    }

    #[test]
    fn excepts_covering_a_range_together() {
        let range = [cidr("169.254.169.252/30")];
        let halves = egress_policy(
            "a",
            vec![to(vec![block(
                "0.0.0.0/0",
                &["169.254.169.252/31", "169.254.169.254/31"],
            )])],
        );
        assert_eq!(found(&[halves], &range), []);
        let quarters = egress_policy(
            "b",
            vec![to(vec![block(
                "0.0.0.0/0",
                &[
                    "169.254.169.252/32",
                    "169.254.169.253/32",
                    "169.254.169.254/32",
                    "169.254.169.255/32",
                ],
            )])],
        );
        assert_eq!(found(&[quarters], &range), []);
        let gap = egress_policy(
            "c",
            vec![to(vec![block(
                "0.0.0.0/0",
                &["169.254.169.252/31", "169.254.169.255/32"],
            )])],
        );
        assert_eq!(found(&[gap], &range).len(), 1);
    }

    #[test]
    fn link_local_range_reopens() {
        let p = egress_policy(
            "link-local",
            vec![
                to(vec![block("10.0.0.0/8", &[])]),
                to(vec![block("192.168.0.0/16", &[])]),
                to(vec![block("169.254.0.0/16", &[])]),
            ],
        );
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "link-local",
                "169.254.169.254/32",
                "egress[2] to 169.254.0.0/16"
            )]
        );
        // The exact address, and a block written with host bits set, reopen it too.
        let exact = egress_policy("exact", vec![to(vec![block("169.254.169.254/32", &[])])]);
        let sloppy = egress_policy("sloppy", vec![to(vec![block("169.254.169.254/16", &[])])]);
        assert_eq!(found(&[exact], &default_blocked()).len(), 1);
        assert_eq!(
            found(&[sloppy], &default_blocked()),
            [triple(
                "sloppy",
                "169.254.169.254/32",
                "egress[0] to 169.254.169.254/16"
            )]
        );
    }

    #[test]
    fn allow_all_egress_rule_reopens_every_blocked_cidr() {
        // `egress: [{}]`
        let all = egress_policy("allow-all", vec![NetworkPolicyEgressRule::default()]);
        assert_eq!(
            found(&[all], &default_blocked()),
            [
                triple(
                    "allow-all",
                    "169.254.169.254/32",
                    "egress[0] allows all destinations (no 'to')"
                ),
                triple(
                    "allow-all",
                    "fd00:ec2::254/128",
                    "egress[0] allows all destinations (no 'to')"
                ),
            ]
        );
        // `to: []` means the same.
        let empty = egress_policy(
            "empty-to",
            vec![to(vec![block("10.0.0.0/8", &[])]), to(vec![])],
        );
        let f = found(&[empty], &default_blocked());
        assert_eq!(f.len(), 2);
        assert!(
            f.iter()
                .all(|(_, _, r)| r == "egress[1] allows all destinations (no 'to')"),
            "{f:?}"
        );
    }

    #[test]
    fn ingress_only_policy_is_no_bypass() {
        let ingress = policy("ingress-only", Some(&["Ingress"]), None);
        assert_eq!(found(&[ingress], &default_blocked()), []);
        // Egress rules are ignored when the types leave Egress out (the API server keeps them
        // but no CNI applies them).
        let typed = policy(
            "typed",
            Some(&["Ingress"]),
            Some(vec![NetworkPolicyEgressRule::default()]),
        );
        assert_eq!(found(&[typed], &default_blocked()), []);
        // Egress type without rules: deny all egress, nothing reopened.
        let deny = policy("deny-egress", Some(&["Ingress", "Egress"]), None);
        assert_eq!(found(&[deny], &default_blocked()), []);
        let no_spec = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("no-spec".into()),
                ..Default::default()
            },
            spec: None,
        };
        assert_eq!(found(&[no_spec], &default_blocked()), []);
    }

    #[test]
    fn policy_types_absent_follow_api_defaulting() {
        let with_egress = policy(
            "untyped",
            None,
            Some(vec![to(vec![block("0.0.0.0/0", &[])])]),
        );
        assert_eq!(found(&[with_egress], &default_blocked()).len(), 1);
        let without = policy("untyped-empty", None, Some(vec![]));
        assert_eq!(found(&[without], &default_blocked()), []);
        let none = policy("untyped-none", None, None);
        assert_eq!(found(&[none], &default_blocked()), []);
    }

    #[test]
    fn ipv6_default_route_reopens_v6_only() {
        let p = egress_policy("v6", vec![to(vec![block("::/0", &[])])]);
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "v6",
                "fd00:ec2::254/128",
                "egress[0] to ::/0 without except"
            )]
        );
        let covered = egress_policy(
            "v6-except",
            vec![to(vec![block("::/0", &["fd00:ec2::254/128"])])],
        );
        assert_eq!(found(&[covered], &default_blocked()), []);
        // IPv4-mapped space does not reopen the IPv4 endpoint.
        let mapped = egress_policy("mapped", vec![to(vec![block("::ffff:0.0.0.0/96", &[])])]);
        assert_eq!(found(&[mapped], &default_blocked()), []);
    }

    #[test]
    fn aws_v6_metadata_range_reopens() {
        let p = egress_policy("ec2", vec![to(vec![block("fd00:ec2::/32", &[])])]);
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "ec2",
                "fd00:ec2::254/128",
                "egress[0] to fd00:ec2::/32"
            )]
        );
        // fd00:ec2::254 is ...:0254 (hex): inside fd00:ec2::200/120, not fd00:ec2::/120.
        let covering = egress_policy(
            "ec2-except",
            vec![to(vec![block("fd00:ec2::/32", &["fd00:ec2::200/120"])])],
        );
        assert_eq!(found(&[covering], &default_blocked()), []);
        let beside = egress_policy(
            "ec2-beside",
            vec![to(vec![block("fd00:ec2::/32", &["fd00:ec2::/120"])])],
        );
        assert_eq!(
            found(&[beside], &default_blocked()),
            [triple(
                "ec2-beside",
                "fd00:ec2::254/128",
                "egress[0] to fd00:ec2::/32 except fd00:ec2::/120 (does not cover fd00:ec2::254/128)"
            )]
        );
        let other = egress_policy("ula", vec![to(vec![block("fd00:ec3::/32", &[])])]);
        assert_eq!(found(&[other], &default_blocked()), []);
    }

    #[test]
    fn dual_stack_policy_reports_each_family() {
        let p = egress_policy(
            "both",
            vec![to(vec![
                block("0.0.0.0/0", &["169.254.169.254/32"]),
                block("::/0", &[]),
            ])],
        );
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "both",
                "fd00:ec2::254/128",
                "egress[0] to ::/0 without except"
            )]
        );
    }

    #[test]
    fn selector_peers_are_pod_ips() {
        let p = egress_policy(
            "selectors",
            vec![to(vec![
                NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector::default()),
                    ..Default::default()
                },
                NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector::default()),
                    ..Default::default()
                },
                NetworkPolicyPeer::default(),
            ])],
        );
        assert_eq!(found(&[p], &default_blocked()), []);
    }

    #[test]
    fn ports_do_not_save_it_and_are_reported() {
        let mut rule = to(vec![block("0.0.0.0/0", &[])]);
        rule.ports = Some(vec![
            NetworkPolicyPort {
                port: Some(IntOrString::Int(443)),
                ..Default::default()
            },
            NetworkPolicyPort {
                protocol: Some("UDP".into()),
                port: Some(IntOrString::Int(53)),
                end_port: None,
            },
            NetworkPolicyPort {
                protocol: Some("TCP".into()),
                port: Some(IntOrString::Int(8000)),
                end_port: Some(8080),
            },
            NetworkPolicyPort {
                protocol: None,
                port: Some(IntOrString::String("http".into())),
                end_port: None,
            },
            NetworkPolicyPort {
                protocol: Some("SCTP".into()),
                port: None,
                end_port: None,
            },
        ]);
        let p = egress_policy("https-only", vec![rule]);
        assert_eq!(
            found(&[p], &default_blocked()),
            [triple(
                "https-only",
                "169.254.169.254/32",
                "egress[0] to 0.0.0.0/0 without except, ports TCP/443, UDP/53, TCP/8000-8080, TCP/http, SCTP/any"
            )]
        );
        let all_to = NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(80)),
                ..Default::default()
            }]),
        };
        let f = found(
            &[egress_policy("port-80", vec![all_to])],
            &default_blocked(),
        );
        assert_eq!(
            f[0].2,
            "egress[0] allows all destinations (no 'to'), ports TCP/80"
        );
    }

    #[test]
    fn our_own_policy_is_skipped() {
        let ours = egress_policy("allow-web-egress", vec![NetworkPolicyEgressRule::default()]);
        assert_eq!(found(&[ours], &default_blocked()), []);
        // And the real shape of ours is no bypass even when not skipped.
        let shape = egress_policy(
            "copy-of-ours",
            vec![to(vec![
                block("0.0.0.0/0", &["169.254.169.254/32"]),
                block("::/0", &["fd00:ec2::254/128"]),
            ])],
        );
        assert_eq!(found(&[shape], &default_blocked()), []);
    }

    #[test]
    fn bad_cidrs_are_ignored_without_panic() {
        let p = egress_policy(
            "garbage",
            vec![to(vec![
                block("", &[]),
                block("not-a-cidr", &[]),
                block("0.0.0.0/33", &[]),
                block("::/129", &[]),
                block("0.0.0.0/-1", &[]),
                block("1.2.3.4/+8", &[]),
                block("169.254.169.254/32/1", &[]),
            ])],
        );
        assert_eq!(found(&[p], &default_blocked()), []);
        // A bad except cannot cover anything: the rule stays open and is reported.
        let bad_except = egress_policy(
            "bad-except",
            vec![to(vec![block("0.0.0.0/0", &["169.254.169.254/99"])])],
        );
        assert_eq!(found(&[bad_except], &default_blocked()).len(), 1);
    }

    #[test]
    fn several_policies_and_rules_in_order() {
        let policies = [
            egress_policy("allow-web-egress", vec![NetworkPolicyEgressRule::default()]),
            egress_policy(
                "a",
                vec![
                    to(vec![block("10.0.0.0/8", &[])]),
                    NetworkPolicyEgressRule::default(),
                ],
            ),
            policy("ingress", Some(&["Ingress"]), None),
            egress_policy(
                "b",
                vec![to(vec![
                    block("169.254.0.0/16", &[]),
                    block("0.0.0.0/0", &[]),
                ])],
            ),
        ];
        assert_eq!(
            found(&policies, &default_blocked()),
            [
                triple(
                    "a",
                    "169.254.169.254/32",
                    "egress[1] allows all destinations (no 'to')"
                ),
                triple(
                    "a",
                    "fd00:ec2::254/128",
                    "egress[1] allows all destinations (no 'to')"
                ),
                // First reopening peer names it.
                triple("b", "169.254.169.254/32", "egress[0] to 169.254.0.0/16"),
            ]
        );
        assert_eq!(find_bypasses(&policies, &[], "allow-web-egress"), []);
    }

    #[test]
    fn wide_blocked_ranges_need_the_whole_range_opened() {
        let blocked = [cidr("169.254.0.0/16")];
        let inside = egress_policy("inside", vec![to(vec![block("169.254.169.0/24", &[])])]);
        assert_eq!(found(&[inside], &blocked), []);
        let whole = egress_policy(
            "whole",
            vec![to(vec![block("169.0.0.0/8", &["169.254.169.254/32"])])],
        );
        assert_eq!(
            found(&[whole], &blocked),
            [triple("whole", "169.254.0.0/16", "egress[0] to 169.0.0.0/8 except 169.254.169.254/32 (does not cover 169.254.0.0/16)")]
        );
    }

    #[test]
    fn containment_and_halves() {
        assert!(contains(&cidr("0.0.0.0/0"), &cidr("169.254.169.254/32")));
        assert!(!contains(
            &cidr("169.254.169.254/32"),
            &cidr("169.254.0.0/16")
        ));
        assert!(!contains(&cidr("::/0"), &cidr("1.2.3.4/32")));
        let (l, h) = halves(&cidr("10.0.0.0/8"));
        assert_eq!(
            (describe(&l), describe(&h)),
            ("10.0.0.0/9".to_owned(), "10.128.0.0/9".to_owned())
        );
        let (l, h) = halves(&cidr("fd00:ec2::254/127"));
        assert_eq!(
            (describe(&l), describe(&h)),
            (
                "fd00:ec2::254/128".to_owned(),
                "fd00:ec2::255/128".to_owned()
            )
        );
        let (l, h) = halves(&cidr("0.0.0.0/0"));
        assert_eq!(
            (describe(&l), describe(&h)),
            ("0.0.0.0/1".to_owned(), "128.0.0.0/1".to_owned())
        );
        // The whole v6 space covered by its two halves.
        assert!(covered(&cidr("::/0"), &[cidr("::/1"), cidr("8000::/1")]));
        assert!(!covered(&cidr("::/0"), &[cidr("::/1"), cidr("8000::/2")]));
    }
}

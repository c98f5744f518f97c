//! Prometheus metrics (prefix `datalab_guard_`), read from the kernel at scrape time.
//!
//! Nothing is cached: a [`GuardCollector`] calls the caller's snapshot function on every
//! scrape (per-CPU counters summed, map sizes, audit-consumer counts) and encodes the
//! result. The exposition is OpenMetrics text, which is what prometheus-client writes.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `datalab_guard_blocked_total` | counter | `family`, `hook`, `namespace` |
//! | `datalab_guard_audited_total` | counter | `family`, `hook`, `namespace` |
//! | `datalab_guard_audit_events_dropped_total` | counter | `reason` = `ring_full` \| `rate_limited` \| `malformed` |
//! | `datalab_guard_guarded_pods`, `_exempt_pods`, `_unknown_cgroups` | gauge (only when known) | |
//! | `datalab_guard_verdict_map_entries`, `_verdict_map_capacity` | gauge | |
//! | `datalab_guard_watch_staleness_seconds` | gauge (node mode) | `resource` = `namespaces` \| `pods` |
//! | `datalab_guard_watch_relists_total`, `_watch_errors_total` | counter (node mode) | `resource` |
//! | `datalab_guard_runtime_up` | gauge (node mode, `runtime.socket` not `none`) | |
//! | `datalab_guard_runtime_errors_total` | counter (likewise) | `kind` = `socket` \| `timeout` \| `connect` \| `unimplemented` \| `call` \| `malformed` |
//! | `datalab_guard_runtime_classified_pods` | gauge (likewise) | |
//! | `datalab_guard_edge_pods` | gauge (node mode) | `state` = `covered` \| `host_network` \| `netns_unknown` \| `netns_unreadable` \| `no_veth_peer` \| `interface_gone` \| `attach_failed` |
//! | `datalab_guard_edge_failures_total` | counter (node mode) | `reason` (the states but `covered`) |
//! | `datalab_guard_guarded_pods_with_net_raw` | gauge (node mode) | |
//! | `datalab_guard_build_info` | info (always 1) | `version` |
//! | `datalab_guard_scrape_errors_total` | counter | |
//!
//! DESIGN.md's `audit_events_dropped_total` is the one metric with a `reason` label;
//! `sum without (reason) (datalab_guard_audit_events_dropped_total)` is the plain total.
//!
//! Label cardinality is bounded by the caller: `namespace` values come from the bounded
//! namespace classes of the counter map (DESIGN.md: no pod names in labels).

use std::{
    collections::BTreeMap,
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use datalab_guard_common::{Action, Family, Hook};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::baseline_state::{CniState, PolicyState};

/// Summed in-kernel counter of one (action, family, hook, namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSample {
    pub action: Action,
    pub family: Family,
    pub hook: Hook,
    pub namespace: String,
    pub value: u64,
}

/// What one scrape reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub counters: Vec<CounterSample>,
    /// Events lost because the ring buffer was full (STATS EventsLost).
    pub events_lost: u64,
    /// Events suppressed by the per-cgroup rate limit (STATS EventsSuppressed).
    pub events_suppressed: u64,
    /// Ring buffer records of the wrong size (audit::ConsumerStats::malformed).
    pub events_malformed: u64,
    /// `None` where unknown (e.g. local mode has no pods): the gauge is then left out.
    pub guarded: Option<u64>,
    pub exempt: Option<u64>,
    pub unknown_cgroups: Option<u64>,
    pub verdict_entries: u64,
    pub verdict_capacity: u64,
    /// Environment namespaces' baseline (node mode): `networkpolicy_state` and
    /// `cni_enforcement` gauges, one series per namespace and possible state (1 for the
    /// current one, 0 for the others), so alerts can match on a state going to 1.
    pub namespaces: Vec<NamespaceSample>,
    /// The API watches' health (node mode; empty elsewhere: no series).
    pub watches: Vec<WatchSample>,
    /// The container runtime lookups (node mode with a runtime socket; `None`: no series).
    pub runtime: Option<RuntimeSample>,
    /// The pod-edge layer's coverage (node mode; `None`: no series).
    pub edge: Option<EdgeSample>,
}

/// The pod-edge layer's coverage of guarded pods (see `node::edge`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeSample {
    /// Guarded pods whose host-side interface runs the edge program.
    pub attached: u64,
    /// Guarded pods not covered, per reason (every reason listed, zeros included).
    pub uncovered: Vec<(&'static str, u64)>,
    /// Attempts to cover a pod that failed, per reason.
    pub failures: Vec<(&'static str, u64)>,
    /// Guarded pods holding CAP_NET_RAW that neither the BPF LSM nor the edge layer covers
    /// (`None` until first counted).
    pub net_raw_uncovered: Option<u64>,
}

/// The container runtime lookups' health (see `node::runtime_classify::RuntimeStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeSample {
    /// The last lookup got an answer.
    pub up: bool,
    /// Failed lookups per error kind (a fixed, bounded set).
    pub errors: Vec<(&'static str, u64)>,
    /// Pods whose verdict comes from the runtime (the API does not know them).
    pub pods: u64,
}

/// One API watch's health (see `k8s::informer::WatchStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchSample {
    /// `namespaces` or `pods` (node), `namespaces` or `networkpolicies` (controller).
    pub resource: &'static str,
    /// Since the watch last delivered an event or a bookmark (or completed a list).
    pub staleness_ms: u64,
    pub relists: u64,
    pub errors: u64,
}

impl WatchSample {
    /// The sample of one watch's stats now.
    pub fn of(resource: &'static str, stats: &crate::k8s::informer::WatchStats) -> WatchSample {
        WatchSample {
            resource,
            staleness_ms: u64::try_from(stats.staleness().as_millis()).unwrap_or(u64::MAX),
            relists: stats.relists(),
            errors: stats.errors(),
        }
    }
}

/// One environment namespace's baseline state (`None`: not checked yet, no series). The
/// `state` label values are [`PolicyState::as_str`] and [`CniState::as_str`] over `ALL`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSample {
    pub namespace: String,
    pub policy: Option<PolicyState>,
    pub cni: Option<CniState>,
}

/// Produces a [`Snapshot`]; called on every scrape, from a blocking thread.
pub type SnapshotFn = Arc<dyn Fn() -> anyhow::Result<Snapshot> + Send + Sync>;

/// Registry prefix (prometheus-client joins it to every name with `_`).
pub const PREFIX: &str = "datalab_guard";

const HELP_BLOCKED: &str = "Attempts to reach a blocked destination that were dropped or refused \
    (enforce mode), by address family, hook and namespace. Counted in the kernel before audit \
    rate limiting, so exact even when audit events are suppressed or lost.";
const HELP_AUDITED: &str = "Attempts to reach a blocked destination that were let through and \
    reported (audit mode), by address family, hook and namespace. Counted in the kernel before \
    audit rate limiting.";
const HELP_DROPPED: &str =
    "Audit events that were not written as a log line, by reason: ring_full \
    (the ring buffer was full), rate_limited (suppressed by the per-cgroup rate limit), \
    malformed (ring buffer records of an unexpected size). The attempts themselves are still \
    counted in blocked_total and audited_total.";
const HELP_GUARDED: &str = "Pods whose cgroup has the guard verdict in the policy map.";
const HELP_EXEMPT: &str = "Pods whose cgroup has the exempt verdict in the policy map.";
const HELP_UNKNOWN: &str = "cgroups under the attach root that the agent could not match to a \
    known pod; they get the default verdict.";
const HELP_ENTRIES: &str = "Entries in the policy map (cgroup id to verdict).";
const HELP_CAPACITY: &str = "Maximum number of entries of the policy map.";
pub(crate) const HELP_POLICY_STATE: &str =
    "State of the allow-web-egress NetworkPolicy of each environment \
    namespace: 1 for the current state (ok, missing, drifted, repaired, or bypassed when another \
    policy reopens a blocked destination), 0 for the others.";
const HELP_CNI: &str = "Whether the CNI enforces the namespace's NetworkPolicy, as probed from a \
    pod's network namespace on this node: 1 for the current state (enforced, not_enforced, \
    inconclusive), 0 for the others.";
const HELP_WATCH_STALENESS: &str = "Seconds since the API watch of this resource last delivered \
    an event or a bookmark (or completed a list). The API server sends a bookmark about every \
    minute, so a healthy watch stays below ~60; more means the agent may be missing changes.";
const HELP_WATCH_RELISTS: &str = "Full lists of this resource after the first one, made when the \
    API server no longer had the watch's resourceVersion (410 Gone).";
const HELP_WATCH_ERRORS: &str = "Failed list and watch requests, ERROR events (410 included), \
    undecodable events and stalled streams of this resource's API watch. Enforcement is \
    unchanged while they fail.";
const HELP_RUNTIME_UP: &str = "1 when the container runtime (CRI) answered the agent's last \
    lookup, 0 when it failed or was not asked yet. The API path works either way.";
const HELP_RUNTIME_ERRORS: &str = "Failed container runtime (CRI) lookups, by kind: socket \
    (missing or not a socket), connect, timeout, unimplemented (no CRI v1), call, malformed. \
    A pod the agent could not classify keeps the default verdict (guard).";
const HELP_RUNTIME_PODS: &str = "Pods whose verdict comes from the container runtime because \
    the API server does not know them (yet).";
const HELP_EDGE_PODS: &str = "Guarded pods by pod-edge layer state: covered (the edge program \
    runs on the host side of the pod's interface) or why not (host_network, netns_unknown, \
    netns_unreadable, no_veth_peer, interface_gone, attach_failed). The cgroup layer guards \
    them either way.";
const HELP_NET_RAW: &str = "Guarded pods whose processes hold CAP_NET_RAW while neither the \
    BPF LSM program nor the pod-edge layer closes raw paths (AF_PACKET, AF_XDP) for them. \
    Drop NET_RAW (deploy/components/kyverno: datalab-drop-net-raw) to bring it to 0.";
const HELP_EDGE_FAILURES: &str = "Failed attempts to give a guarded pod the pod-edge layer, by \
    reason (retried after 1 s, the wait doubling up to 30 s; logged once per pod).";
pub(crate) const HELP_BUILD: &str = "Version of the running agent; the value is always 1.";
const HELP_SCRAPE_ERRORS: &str = "Scrapes in which reading the kernel counters and maps failed; \
    those scrapes carry only build_info and this counter.";

/// The collector registered in the agent's registry.
pub struct GuardCollector {
    snapshot: SnapshotFn,
    version: &'static str,
    scrape_errors: AtomicU64,
}

impl fmt::Debug for GuardCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardCollector")
            .field("version", &self.version)
            .field("scrape_errors", &self.scrape_errors)
            .finish_non_exhaustive()
    }
}

impl GuardCollector {
    pub fn new(snapshot: SnapshotFn, version: &'static str) -> Self {
        GuardCollector {
            snapshot,
            version,
            scrape_errors: AtomicU64::new(0),
        }
    }

    /// Calls the snapshot function; a failure or a panic in it is a scrape error, never a
    /// crashed scrape.
    fn take_snapshot(&self) -> Option<Snapshot> {
        match catch_unwind(AssertUnwindSafe(|| (self.snapshot)())) {
            Ok(Ok(snapshot)) => Some(snapshot),
            Ok(Err(err)) => {
                self.scrape_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    error = format!("{err:#}"),
                    "metrics scrape: reading the kernel state failed"
                );
                None
            }
            Err(_) => {
                self.scrape_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("metrics scrape: the snapshot function panicked");
                None
            }
        }
    }
}

/// A state-set gauge family: one series per (namespace, state), 1 for the current state.
pub(crate) fn encode_states<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    states: &[&str],
    current: impl Iterator<Item = (&'a str, &'a str)>,
) -> fmt::Result {
    let current: Vec<(&str, &str)> = current.collect();
    if current.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (namespace, now) in current {
        let namespace = escape_label_value(namespace);
        for state in states {
            let value: i64 = i64::from(*state == now);
            ConstGauge::new(value).encode(
                family.encode_family(&[("namespace", namespace.as_str()), ("state", state)])?,
            )?;
        }
    }
    Ok(())
}

impl Collector for GuardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = self.take_snapshot();
        if let Some(s) = &snapshot {
            encode_counters(
                &mut encoder,
                "blocked",
                HELP_BLOCKED,
                Action::Blocked,
                &s.counters,
            )?;
            encode_counters(
                &mut encoder,
                "audited",
                HELP_AUDITED,
                Action::Audited,
                &s.counters,
            )?;
            let dropped = encoder.encode_descriptor(
                "audit_events_dropped",
                HELP_DROPPED,
                None,
                MetricType::Counter,
            )?;
            let mut dropped = dropped;
            for (reason, value) in [
                ("ring_full", s.events_lost),
                ("rate_limited", s.events_suppressed),
                ("malformed", s.events_malformed),
            ] {
                ConstCounter::new(value).encode(dropped.encode_family(&[("reason", reason)])?)?;
            }
            for (name, help, value) in [
                ("guarded_pods", HELP_GUARDED, s.guarded),
                ("exempt_pods", HELP_EXEMPT, s.exempt),
                ("unknown_cgroups", HELP_UNKNOWN, s.unknown_cgroups),
                ("verdict_map_entries", HELP_ENTRIES, Some(s.verdict_entries)),
                (
                    "verdict_map_capacity",
                    HELP_CAPACITY,
                    Some(s.verdict_capacity),
                ),
            ] {
                if let Some(value) = value {
                    let gauge = ConstGauge::new(value);
                    gauge.encode(encoder.encode_descriptor(
                        name,
                        help,
                        None,
                        gauge.metric_type(),
                    )?)?;
                }
            }
            encode_states(
                &mut encoder,
                "networkpolicy_state",
                HELP_POLICY_STATE,
                &PolicyState::ALL.map(PolicyState::as_str),
                s.namespaces
                    .iter()
                    .filter_map(|n| Some((n.namespace.as_str(), n.policy?.as_str()))),
            )?;
            encode_states(
                &mut encoder,
                "cni_enforcement",
                HELP_CNI,
                &CniState::ALL.map(CniState::as_str),
                s.namespaces
                    .iter()
                    .filter_map(|n| Some((n.namespace.as_str(), n.cni?.as_str()))),
            )?;
            encode_watches(&mut encoder, &s.watches)?;
            if let Some(runtime) = &s.runtime {
                encode_runtime(&mut encoder, runtime)?;
            }
            if let Some(edge) = &s.edge {
                encode_edge(&mut encoder, edge)?;
            }
        }
        // OpenMetrics "info": the family is `build`, the sample `build_info{version} 1`.
        let mut build = encoder.encode_descriptor("build", HELP_BUILD, None, MetricType::Info)?;
        build.encode_info(&[("version", escape_label_value(self.version))])?;
        let errors = ConstCounter::new(self.scrape_errors.load(Ordering::Relaxed));
        errors.encode(encoder.encode_descriptor(
            "scrape_errors",
            HELP_SCRAPE_ERRORS,
            None,
            errors.metric_type(),
        )?)
    }
}

/// The watch health families, one series per resource; nothing without watches.
pub(crate) fn encode_watches(
    encoder: &mut DescriptorEncoder<'_>,
    watches: &[WatchSample],
) -> fmt::Result {
    if watches.is_empty() {
        return Ok(());
    }
    let mut staleness = encoder.encode_descriptor(
        "watch_staleness_seconds",
        HELP_WATCH_STALENESS,
        None,
        MetricType::Gauge,
    )?;
    for w in watches {
        let seconds = w.staleness_ms as f64 / 1000.0;
        ConstGauge::new(seconds).encode(staleness.encode_family(&[("resource", w.resource)])?)?;
    }
    /// (family, help, value of a sample)
    type WatchCounter = (&'static str, &'static str, fn(&WatchSample) -> u64);
    let counters: [WatchCounter; 2] = [
        ("watch_relists", HELP_WATCH_RELISTS, |w| w.relists),
        ("watch_errors", HELP_WATCH_ERRORS, |w| w.errors),
    ];
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for w in watches {
            ConstCounter::new(value(w))
                .encode(family.encode_family(&[("resource", w.resource)])?)?;
        }
    }
    Ok(())
}

/// The pod-edge layer families.
fn encode_edge(encoder: &mut DescriptorEncoder<'_>, e: &EdgeSample) -> fmt::Result {
    let mut pods =
        encoder.encode_descriptor("edge_pods", HELP_EDGE_PODS, None, MetricType::Gauge)?;
    ConstGauge::new(e.attached).encode(pods.encode_family(&[("state", "covered")])?)?;
    for (state, value) in &e.uncovered {
        ConstGauge::new(*value).encode(pods.encode_family(&[("state", *state)])?)?;
    }
    let mut failures = encoder.encode_descriptor(
        "edge_failures",
        HELP_EDGE_FAILURES,
        None,
        MetricType::Counter,
    )?;
    for (reason, value) in &e.failures {
        ConstCounter::new(*value).encode(failures.encode_family(&[("reason", *reason)])?)?;
    }
    if let Some(n) = e.net_raw_uncovered {
        let gauge = ConstGauge::new(n);
        gauge.encode(encoder.encode_descriptor(
            "guarded_pods_with_net_raw",
            HELP_NET_RAW,
            None,
            gauge.metric_type(),
        )?)?;
    }
    Ok(())
}

/// The runtime lookup families.
fn encode_runtime(encoder: &mut DescriptorEncoder<'_>, r: &RuntimeSample) -> fmt::Result {
    for (name, help, value) in [
        ("runtime_up", HELP_RUNTIME_UP, u64::from(r.up)),
        ("runtime_classified_pods", HELP_RUNTIME_PODS, r.pods),
    ] {
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
    }
    let mut errors = encoder.encode_descriptor(
        "runtime_errors",
        HELP_RUNTIME_ERRORS,
        None,
        MetricType::Counter,
    )?;
    for (kind, value) in &r.errors {
        ConstCounter::new(*value).encode(errors.encode_family(&[("kind", *kind)])?)?;
    }
    Ok(())
}

/// One counter family from the samples of `action`, summed per label set (the caller may
/// hand several samples for one namespace, e.g. folded classes) and in a stable order.
fn encode_counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    action: Action,
    samples: &[CounterSample],
) -> fmt::Result {
    let mut series: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.action == action) {
        let total = series
            .entry((s.family.name(), s.hook.name(), s.namespace.as_str()))
            .or_default();
        *total = total.saturating_add(s.value);
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for ((family_name, hook, namespace), value) in series {
        let labels = [
            ("family", family_name.to_owned()),
            ("hook", hook.to_owned()),
            ("namespace", escape_label_value(namespace)),
        ];
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Escapes a label value for the text format (backslash, double quote, newline);
/// prometheus-client 0.23 writes label values verbatim.
pub(crate) fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A registry with the `datalab_guard` prefix and the collector in it; other modules may
/// register more metrics (e.g. `networkpolicy_state`) before it is shared.
pub fn registry(snapshot: SnapshotFn) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(GuardCollector::new(snapshot, crate::VERSION)));
    registry
}

/// The full OpenMetrics exposition of `registry` (ends with `# EOF`).
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        action: Action,
        family: Family,
        hook: Hook,
        namespace: &str,
        value: u64,
    ) -> CounterSample {
        CounterSample {
            action,
            family,
            hook,
            namespace: namespace.to_owned(),
            value,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            counters: vec![
                sample(Action::Blocked, Family::Ipv6, Hook::Connect, "lab-a", 2),
                sample(Action::Blocked, Family::Ipv4, Hook::Egress, "lab-a", 5),
                sample(Action::Blocked, Family::Ipv4, Hook::Egress, "lab-a", 1),
                sample(Action::Audited, Family::Ipv4, Hook::Sendmsg, "lab-b", 3),
            ],
            events_lost: 4,
            events_suppressed: 9,
            events_malformed: 0,
            guarded: Some(12),
            exempt: Some(2),
            unknown_cgroups: None,
            verdict_entries: 14,
            verdict_capacity: 65_536,
            namespaces: Vec::new(),
            watches: Vec::new(),
            runtime: None,
            edge: None,
        }
    }

    fn exposition(f: impl Fn() -> anyhow::Result<Snapshot> + Send + Sync + 'static) -> String {
        encode(&registry(Arc::new(f))).unwrap()
    }

    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn encodes_every_metric_with_exact_lines() {
        let text = exposition(|| Ok(snapshot()));
        let v = crate::VERSION;
        assert_eq!(
            samples(&text),
            [
                r#"datalab_guard_blocked_total{family="ipv4",hook="egress",namespace="lab-a"} 6"#,
                r#"datalab_guard_blocked_total{family="ipv6",hook="connect",namespace="lab-a"} 2"#,
                r#"datalab_guard_audited_total{family="ipv4",hook="sendmsg",namespace="lab-b"} 3"#,
                r#"datalab_guard_audit_events_dropped_total{reason="ring_full"} 4"#,
                r#"datalab_guard_audit_events_dropped_total{reason="rate_limited"} 9"#,
                r#"datalab_guard_audit_events_dropped_total{reason="malformed"} 0"#,
                "datalab_guard_guarded_pods 12",
                "datalab_guard_exempt_pods 2",
                "datalab_guard_verdict_map_entries 14",
                "datalab_guard_verdict_map_capacity 65536",
                &format!(r#"datalab_guard_build_info{{version="{v}"}} 1"#),
                "datalab_guard_scrape_errors_total 0",
            ]
        );
        assert!(text.contains("# TYPE datalab_guard_blocked counter\n"));
        assert!(text.contains("# TYPE datalab_guard_guarded_pods gauge\n"));
        assert!(text.contains("# TYPE datalab_guard_build info\n"));
        assert!(text.contains(
            "# HELP datalab_guard_audit_events_dropped Audit events that were not written"
        ));
        assert!(
            !text.contains("unknown_cgroups"),
            "a None gauge is left out"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn every_family_has_help_and_type() {
        let text = exposition(|| {
            Ok(Snapshot {
                unknown_cgroups: Some(1),
                ..snapshot()
            })
        });
        for name in [
            "blocked",
            "audited",
            "audit_events_dropped",
            "guarded_pods",
            "exempt_pods",
            "unknown_cgroups",
            "verdict_map_entries",
            "verdict_map_capacity",
            "build",
            "scrape_errors",
        ] {
            assert!(
                text.contains(&format!("# HELP datalab_guard_{name} ")),
                "{name}"
            );
            assert!(
                text.contains(&format!("# TYPE datalab_guard_{name} ")),
                "{name}"
            );
        }
    }

    #[test]
    fn runtime_lookups_have_bounded_series() {
        let text = exposition(|| {
            Ok(Snapshot {
                runtime: Some(RuntimeSample {
                    up: true,
                    errors: vec![("socket", 1), ("timeout", 0)],
                    pods: 2,
                }),
                ..Snapshot::default()
            })
        });
        let lines: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("datalab_guard_runtime_"))
            .collect();
        assert_eq!(
            lines,
            [
                "datalab_guard_runtime_up 1",
                "datalab_guard_runtime_classified_pods 2",
                r#"datalab_guard_runtime_errors_total{kind="socket"} 1"#,
                r#"datalab_guard_runtime_errors_total{kind="timeout"} 0"#,
            ]
        );
        assert!(text.contains("# TYPE datalab_guard_runtime_errors counter\n"));
        // socket: none (and local mode): no runtime families at all.
        assert!(!exposition(|| Ok(snapshot())).contains("runtime_"));
    }

    #[test]
    fn edge_coverage_has_bounded_series() {
        let text = exposition(|| {
            Ok(Snapshot {
                edge: Some(EdgeSample {
                    attached: 3,
                    uncovered: vec![("host_network", 1), ("no_veth_peer", 0)],
                    failures: vec![("host_network", 1)],
                    net_raw_uncovered: Some(2),
                }),
                ..Snapshot::default()
            })
        });
        for line in [
            r#"datalab_guard_edge_pods{state="covered"} 3"#,
            r#"datalab_guard_edge_pods{state="host_network"} 1"#,
            r#"datalab_guard_edge_pods{state="no_veth_peer"} 0"#,
            r#"datalab_guard_edge_failures_total{reason="host_network"} 1"#,
            "datalab_guard_guarded_pods_with_net_raw 2",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(!exposition(|| Ok(Snapshot::default())).contains("edge_"));
    }

    #[test]
    fn watch_health_has_one_series_per_resource() {
        let text = exposition(|| {
            Ok(Snapshot {
                watches: vec![
                    WatchSample {
                        resource: "namespaces",
                        staleness_ms: 1_500,
                        relists: 2,
                        errors: 7,
                    },
                    WatchSample {
                        resource: "pods",
                        staleness_ms: 61_000,
                        relists: 0,
                        errors: 0,
                    },
                ],
                ..Snapshot::default()
            })
        });
        let watch_lines: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("datalab_guard_watch_"))
            .collect();
        assert_eq!(
            watch_lines,
            [
                r#"datalab_guard_watch_staleness_seconds{resource="namespaces"} 1.5"#,
                r#"datalab_guard_watch_staleness_seconds{resource="pods"} 61.0"#,
                r#"datalab_guard_watch_relists_total{resource="namespaces"} 2"#,
                r#"datalab_guard_watch_relists_total{resource="pods"} 0"#,
                r#"datalab_guard_watch_errors_total{resource="namespaces"} 7"#,
                r#"datalab_guard_watch_errors_total{resource="pods"} 0"#,
            ]
        );
        for (name, ty) in [
            ("watch_staleness_seconds", "gauge"),
            ("watch_relists", "counter"),
            ("watch_errors", "counter"),
        ] {
            assert!(
                text.contains(&format!("# HELP datalab_guard_{name} ")),
                "{name}"
            );
            assert!(
                text.contains(&format!("# TYPE datalab_guard_{name} {ty}\n")),
                "{name}"
            );
        }
        // Local mode has no watches: no families at all.
        assert!(!exposition(|| Ok(snapshot())).contains("watch_"));
    }

    #[test]
    fn empty_counters_still_declare_their_families() {
        let text = exposition(|| Ok(Snapshot::default()));
        assert!(text.contains("# TYPE datalab_guard_blocked counter\n"));
        assert!(!text.contains("datalab_guard_blocked_total"));
    }

    #[test]
    fn a_failing_snapshot_counts_a_scrape_error_and_keeps_build_info() {
        let registry = registry(Arc::new(|| anyhow::bail!("map read failed")));
        let first = encode(&registry).unwrap();
        assert_eq!(
            samples(&first),
            [
                format!(
                    r#"datalab_guard_build_info{{version="{}"}} 1"#,
                    crate::VERSION
                )
                .as_str(),
                "datalab_guard_scrape_errors_total 1",
            ]
        );
        let second = encode(&registry).unwrap();
        assert!(second.contains("datalab_guard_scrape_errors_total 2\n"));
    }

    #[test]
    fn a_panicking_snapshot_is_a_scrape_error_too() {
        let text = exposition(|| panic!("boom"));
        assert!(text.contains("datalab_guard_scrape_errors_total 1\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = exposition(|| {
            Ok(Snapshot {
                counters: vec![sample(
                    Action::Blocked,
                    Family::Ipv4,
                    Hook::Connect,
                    "a\"b\\c\nd",
                    1,
                )],
                ..Snapshot::default()
            })
        });
        assert!(text.contains(r#"namespace="a\"b\\c\nd"} 1"#), "{text}");
    }

    #[test]
    fn namespace_states_are_state_sets() {
        let mut s = snapshot();
        s.namespaces = vec![
            NamespaceSample {
                namespace: "env-a".into(),
                policy: Some(PolicyState::Bypassed),
                cni: Some(CniState::Enforced),
            },
            NamespaceSample {
                namespace: "env-b".into(),
                policy: Some(PolicyState::Ok),
                cni: None,
            },
        ];
        let text = exposition(move || Ok(s.clone()));
        assert!(
            text.contains(
                "datalab_guard_networkpolicy_state{namespace=\"env-a\",state=\"bypassed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("datalab_guard_networkpolicy_state{namespace=\"env-a\",state=\"ok\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("datalab_guard_networkpolicy_state{namespace=\"env-b\",state=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "datalab_guard_cni_enforcement{namespace=\"env-a\",state=\"enforced\"} 1"
            ),
            "{text}"
        );
        assert!(
            !text.contains("namespace=\"env-b\",state=\"enforced\""),
            "no CNI series before a probe: {text}"
        );
    }
}

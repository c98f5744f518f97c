//! The controller's metrics (prefix `datalab_guard_`), computed at scrape time:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `datalab_guard_leader` | gauge: 1 while this replica holds the Lease, else 0 | `identity` |
//! | `datalab_guard_networkpolicy_state` | gauge per (namespace, state), 1 for the current | `namespace`, `state` |
//! | `datalab_guard_watch_staleness_seconds`, `_watch_relists_total`, `_watch_errors_total` | as on the node | `resource` = `namespaces` \| `networkpolicies` |
//! | `datalab_guard_build_info` | info | `version` |
//!
//! Leadership is a metric, not readiness: a standby is healthy and ready (it keeps its caches
//! and the states current), it just does not write.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    baseline_state::{NamespaceStates, PolicyState},
    metrics::{
        encode_states, encode_watches, escape_label_value, WatchSample, HELP_BUILD,
        HELP_POLICY_STATE, PREFIX,
    },
};

const HELP_LEADER: &str = "1 while this controller replica holds the leader-election Lease (the \
    only one that writes NetworkPolicies, namespace labels and namespace Events), else 0.";

/// The health of the controller's watches, at each call.
pub type WatchSamplesFn = Arc<dyn Fn() -> Vec<WatchSample> + Send + Sync>;

/// Reads the controller's shared state on every scrape.
pub struct ControllerCollector {
    identity: String,
    leader: watch::Receiver<bool>,
    states: NamespaceStates,
    watches: WatchSamplesFn,
}

impl fmt::Debug for ControllerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerCollector")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Collector for ControllerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let leader = ConstGauge::new(i64::from(*self.leader.borrow()));
        let identity = escape_label_value(&self.identity);
        leader.encode(
            encoder
                .encode_descriptor("leader", HELP_LEADER, None, MetricType::Gauge)?
                .encode_family(&[("identity", identity.as_str())])?,
        )?;
        let states = self.states.snapshot();
        encode_states(
            &mut encoder,
            "networkpolicy_state",
            HELP_POLICY_STATE,
            &PolicyState::ALL.map(PolicyState::as_str),
            states
                .iter()
                .filter_map(|(ns, st)| Some((ns.as_str(), st.policy?.as_str()))),
        )?;
        encode_watches(&mut encoder, &(self.watches)())?;
        let mut build = encoder.encode_descriptor("build", HELP_BUILD, None, MetricType::Info)?;
        build.encode_info(&[("version", escape_label_value(crate::VERSION))])
    }
}

/// The controller's registry: leadership, namespace states, watch health, build info.
pub fn registry(
    identity: &str,
    leader: watch::Receiver<bool>,
    states: NamespaceStates,
    watches: WatchSamplesFn,
) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(ControllerCollector {
        identity: identity.to_owned(),
        leader,
        states,
        watches,
    }));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_gauge_states_and_watches_are_exposed() {
        let (tx, rx) = watch::channel(false);
        let states = NamespaceStates::default();
        states.update("tenant-a", |s| s.policy = Some(PolicyState::Repaired));
        states.update("tenant-b", |s| s.psa = None);
        let watches: WatchSamplesFn = Arc::new(|| {
            vec![WatchSample {
                resource: "networkpolicies",
                staleness_ms: 1500,
                relists: 2,
                errors: 3,
            }]
        });
        let registry = registry("ctl-0", rx, states, watches);
        let text = crate::metrics::encode(&registry).unwrap();
        assert!(
            text.contains("\ndatalab_guard_leader{identity=\"ctl-0\"} 0\n"),
            "{text}"
        );
        assert!(text.contains(
            "datalab_guard_networkpolicy_state{namespace=\"tenant-a\",state=\"repaired\"} 1\n"
        ));
        assert!(text.contains(
            "datalab_guard_networkpolicy_state{namespace=\"tenant-a\",state=\"ok\"} 0\n"
        ));
        // A namespace not judged yet has no series (no made-up state).
        assert!(!text.contains("namespace=\"tenant-b\""), "{text}");
        assert!(text.contains("datalab_guard_watch_errors_total{resource=\"networkpolicies\"} 3\n"));
        assert!(text.contains("datalab_guard_build_info{version="));
        tx.send(true).unwrap();
        let text = crate::metrics::encode(&registry).unwrap();
        assert!(text.contains("\ndatalab_guard_leader{identity=\"ctl-0\"} 1\n"));
    }
}

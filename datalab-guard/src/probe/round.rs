//! One probe round: the control namespace first, then every listed pod namespace, and the
//! results written into the per-namespace states ([`probe_once`], [`apply_round`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;

use super::{
    attempt::{probe_in_netns, ProbeOutcome, ProbeResult},
    classify::classify,
};
use crate::baseline_state::{CniState, NamespaceStates};

/// Namespaces probed at the same time (each takes one blocking thread for up to one timeout).
pub const PARALLEL_NAMESPACES: usize = 4;

/// One round: the control first, then every listed pod namespace (one per Kubernetes
/// namespace: the first pair listed for it). Returns the state of every listed namespace.
/// Blocking work runs on tokio's blocking pool; at most [`PARALLEL_NAMESPACES`] at a time.
pub async fn probe_once(
    control_netns: &Path,
    targets: &[SocketAddr],
    timeout: Duration,
    pods: Vec<(String, PathBuf)>,
) -> BTreeMap<String, CniState> {
    let mut unique: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (namespace, netns) in pods {
        unique.entry(namespace).or_insert(netns);
    }
    if unique.is_empty() {
        return BTreeMap::new();
    }
    let control = {
        let (netns, targets) = (control_netns.to_path_buf(), targets.to_vec());
        tokio::task::spawn_blocking(move || probe_in_netns(&netns, &targets, timeout))
            .await
            .unwrap_or_default()
    };
    if !control.iter().any(|o| o.result == ProbeResult::Connected) {
        tracing::debug!(
            control = %control_netns.display(),
            outcomes = %describe_outcomes(&control),
            "CNI probe: the control reaches no target; every namespace is inconclusive"
        );
        return unique
            .into_keys()
            .map(|ns| (ns, CniState::Inconclusive))
            .collect();
    }
    let control = Arc::new(control);
    let targets: Arc<[SocketAddr]> = targets.into();
    futures::stream::iter(unique)
        .map(|(namespace, netns)| {
            let (control, targets) = (control.clone(), targets.clone());
            async move {
                let pod = tokio::task::spawn_blocking(move || probe_in_netns(&netns, &targets, timeout)).await;
                let state = match &pod {
                    Ok(pod) => classify(&control, pod),
                    Err(_) => CniState::Inconclusive,
                };
                if let Ok(pod) = &pod {
                    tracing::debug!(namespace, state = state.as_str(), outcomes = %describe_outcomes(pod), "CNI probe");
                }
                (namespace, state)
            }
        })
        .buffer_unordered(PARALLEL_NAMESPACES)
        .collect()
        .await
}

fn describe_outcomes(outcomes: &[ProbeOutcome]) -> String {
    outcomes
        .iter()
        .map(|o| format!("{} {}", o.target, o.result.describe()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes one round's results into `states`, reporting changes; forgets namespaces that were
/// not probed this round.
pub(super) fn apply_round<C>(
    states: &NamespaceStates,
    results: &BTreeMap<String, CniState>,
    on_change: &mut C,
) where
    C: FnMut(&str, Option<CniState>, CniState),
{
    let before = states.snapshot();
    for (namespace, &new) in results {
        let old = before.get(namespace).and_then(|s| s.cni);
        states.update(namespace, |s| s.cni = Some(new));
        if old != Some(new) {
            on_change(namespace, old, new);
        }
    }
    for (namespace, status) in &before {
        if status.cni.is_some() && !results.contains_key(namespace) {
            states.update(namespace, |s| s.cni = None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_update_states_and_report_changes() {
        let states = NamespaceStates::default();
        states.update("provisioned-only", |s| s.psa = None);
        let mut changes: Vec<(String, Option<CniState>, CniState)> = Vec::new();
        let mut record = |ns: &str, old: Option<CniState>, new: CniState| {
            changes.push((ns.to_owned(), old, new));
        };
        let round1: BTreeMap<String, CniState> = [
            ("a".to_owned(), CniState::Enforced),
            ("b".to_owned(), CniState::NotEnforced),
        ]
        .into();
        apply_round(&states, &round1, &mut record);
        let round2: BTreeMap<String, CniState> = [
            ("a".to_owned(), CniState::Enforced),
            ("b".to_owned(), CniState::Inconclusive),
        ]
        .into();
        apply_round(&states, &round2, &mut record);
        let round3: BTreeMap<String, CniState> = [("b".to_owned(), CniState::Inconclusive)].into();
        apply_round(&states, &round3, &mut record);
        assert_eq!(
            changes,
            [
                ("a".to_owned(), None, CniState::Enforced),
                ("b".to_owned(), None, CniState::NotEnforced),
                (
                    "b".to_owned(),
                    Some(CniState::NotEnforced),
                    CniState::Inconclusive
                ),
            ]
        );
        let snap = states.snapshot();
        assert_eq!(snap["a"].cni, None, "not listed any more: forgotten");
        assert_eq!(snap["b"].cni, Some(CniState::Inconclusive));
        assert_eq!(snap["provisioned-only"].cni, None);
    }

    #[tokio::test]
    async fn a_round_without_pods_probes_nothing() {
        // Not even the control: nothing is listed, so no connect leaves this namespace.
        let target: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let results = probe_once(
            Path::new("/nonexistent"),
            &[target],
            Duration::from_millis(100),
            Vec::new(),
        )
        .await;
        assert!(results.is_empty());
    }

    #[tokio::test]
    async fn a_control_that_reaches_nothing_makes_every_namespace_inconclusive() {
        // The control's namespace cannot be entered: no target counts as reachable.
        let target: SocketAddr = "169.254.169.254:80".parse().unwrap();
        let pods = vec![
            ("a".to_owned(), PathBuf::from("/nonexistent/a")),
            ("b".to_owned(), PathBuf::from("/nonexistent/b")),
            ("a".to_owned(), PathBuf::from("/nonexistent/a2")),
        ];
        let results = probe_once(
            Path::new("/nonexistent/control"),
            &[target],
            Duration::from_millis(100),
            pods,
        )
        .await;
        assert_eq!(
            results,
            [
                ("a".to_owned(), CniState::Inconclusive),
                ("b".to_owned(), CniState::Inconclusive),
            ]
            .into()
        );
    }
}

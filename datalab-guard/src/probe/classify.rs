//! Judging one namespace: the control's outcomes and the pod's, compared target by target,
//! give `enforced`, `not_enforced` or `inconclusive`. Pure.

use std::{collections::BTreeSet, net::SocketAddr};

use super::attempt::{ProbeOutcome, ProbeResult};
use crate::baseline_state::CniState;

/// The verdict for one namespace, from the control's outcomes (`host`) and the pod's.
///
/// Only targets the control connected to are compared (a target the node cannot reach says
/// nothing about the CNI). Among those: any pod connect → `NotEnforced`; every one timed out
/// or refused → `Enforced`; a probe error on any, or no comparable target at all (the
/// control reached nothing) → `Inconclusive`.
pub fn classify(host: &[ProbeOutcome], pod: &[ProbeOutcome]) -> CniState {
    let reachable: BTreeSet<SocketAddr> = host
        .iter()
        .filter(|o| o.result == ProbeResult::Connected)
        .map(|o| o.target)
        .collect();
    let mut blocked = false;
    let mut unclear = false;
    for outcome in pod.iter().filter(|o| reachable.contains(&o.target)) {
        match outcome.result {
            ProbeResult::Connected => return CniState::NotEnforced,
            ProbeResult::TimedOut | ProbeResult::Refused(_) => blocked = true,
            ProbeResult::Error(_) => unclear = true,
        }
    }
    if blocked && !unclear {
        CniState::Enforced
    } else {
        CniState::Inconclusive
    }
}

#[cfg(test)]
mod tests {
    use super::{ProbeResult::*, *};

    const V4: &str = "169.254.169.254:80";
    const V6: &str = "[fd00:ec2::254]:80";

    fn outcomes(list: &[(&str, ProbeResult)]) -> Vec<ProbeOutcome> {
        list.iter()
            .map(|(t, result)| ProbeOutcome {
                target: t.parse().unwrap(),
                result: *result,
            })
            .collect()
    }

    #[test]
    fn classify_pod_connect_is_not_enforced() {
        let host = outcomes(&[(V4, Connected), (V6, Connected)]);
        assert_eq!(
            classify(&host, &outcomes(&[(V4, Connected), (V6, TimedOut)])),
            CniState::NotEnforced
        );
        assert_eq!(
            classify(&host, &outcomes(&[(V4, TimedOut), (V6, Connected)])),
            CniState::NotEnforced
        );
        // A connect is definitive even when another target had a probe error.
        assert_eq!(
            classify(
                &host,
                &outcomes(&[(V4, Error(libc::EMFILE)), (V6, Connected)])
            ),
            CniState::NotEnforced
        );
    }

    #[test]
    fn classify_timeouts_and_refusals_are_enforced() {
        let host = outcomes(&[(V4, Connected), (V6, Connected)]);
        for pod in [
            [(V4, TimedOut), (V6, TimedOut)],
            [
                (V4, Refused(libc::ECONNREFUSED)),
                (V6, Refused(libc::EHOSTUNREACH)),
            ],
            [(V4, Refused(libc::EPERM)), (V6, Refused(libc::EACCES))],
            [(V4, Refused(libc::ENETUNREACH)), (V6, TimedOut)],
        ] {
            assert_eq!(
                classify(&host, &outcomes(&pod)),
                CniState::Enforced,
                "{pod:?}"
            );
        }
    }

    #[test]
    fn classify_unreachable_from_the_node_is_inconclusive() {
        let pod_open = outcomes(&[(V4, Connected), (V6, Connected)]);
        let pod_closed = outcomes(&[(V4, TimedOut), (V6, TimedOut)]);
        for host in [
            outcomes(&[(V4, TimedOut), (V6, TimedOut)]),
            outcomes(&[
                (V4, Refused(libc::ECONNREFUSED)),
                (V6, Refused(libc::ENETUNREACH)),
            ]),
            outcomes(&[(V4, Error(libc::EPERM)), (V6, Error(libc::EPERM))]),
            vec![],
        ] {
            assert_eq!(
                classify(&host, &pod_closed),
                CniState::Inconclusive,
                "{host:?}"
            );
            // Even a pod "connect" is not judged against a target the node cannot reach.
            assert_eq!(
                classify(&host, &pod_open),
                CniState::Inconclusive,
                "{host:?}"
            );
        }
    }

    #[test]
    fn classify_only_compares_targets_the_node_reaches() {
        // v6 unreachable from the node: only v4 counts.
        let host = outcomes(&[(V4, Connected), (V6, Refused(libc::ENETUNREACH))]);
        assert_eq!(
            classify(&host, &outcomes(&[(V4, TimedOut), (V6, Connected)])),
            CniState::Enforced
        );
        assert_eq!(
            classify(&host, &outcomes(&[(V4, Connected), (V6, TimedOut)])),
            CniState::NotEnforced
        );
        // The pod probe failed locally on the one comparable target.
        assert_eq!(
            classify(
                &host,
                &outcomes(&[(V4, Error(libc::ENOENT)), (V6, TimedOut)])
            ),
            CniState::Inconclusive
        );
        // One target blocked, the other not probable: cannot claim enforcement.
        let both = outcomes(&[(V4, Connected), (V6, Connected)]);
        assert_eq!(
            classify(
                &both,
                &outcomes(&[(V4, TimedOut), (V6, Error(libc::EADDRNOTAVAIL))])
            ),
            CniState::Inconclusive
        );
        // Targets missing from the pod's list are not judged.
        assert_eq!(
            classify(&both, &outcomes(&[(V4, TimedOut)])),
            CniState::Enforced
        );
        assert_eq!(classify(&both, &[]), CniState::Inconclusive);
    }
}

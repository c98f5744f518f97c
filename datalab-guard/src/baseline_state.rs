//! What a process knows about each environment namespace's baseline: the controller fills
//! the allow-web-egress NetworkPolicy and Pod Security fields (`networkpolicy_state`), a node
//! agent's CNI probe the CNI enforcement field (`cni_enforcement`, the node's state file and
//! `status`). Plain data: writers replace entries, readers snapshot. The state names here are
//! the only spelling: the metrics' `state` labels and the state file both use them.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

/// `networkpolicy_state{state}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyState {
    /// Our policy exists and matches what we apply.
    Ok,
    /// Not there (and we are not the leader, or provisioning is off).
    Missing,
    /// Edited by someone else / fields taken by another manager (not repaired yet).
    Drifted,
    /// Was missing or drifted and the leader put it back (this reconcile).
    Repaired,
    /// Another policy in the namespace allows egress to a blocked destination.
    Bypassed,
}

impl PolicyState {
    pub const ALL: [PolicyState; 5] = [
        PolicyState::Ok,
        PolicyState::Missing,
        PolicyState::Drifted,
        PolicyState::Repaired,
        PolicyState::Bypassed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::Ok => "ok",
            PolicyState::Missing => "missing",
            PolicyState::Drifted => "drifted",
            PolicyState::Repaired => "repaired",
            PolicyState::Bypassed => "bypassed",
        }
    }
}

/// `cni_enforcement{state}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CniState {
    Enforced,
    NotEnforced,
    Inconclusive,
}

impl CniState {
    pub const ALL: [CniState; 3] = [
        CniState::Enforced,
        CniState::NotEnforced,
        CniState::Inconclusive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CniState::Enforced => "enforced",
            CniState::NotEnforced => "not_enforced",
            CniState::Inconclusive => "inconclusive",
        }
    }
}

/// Pod Security Admission as found on the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsaState {
    /// `pod-security.kubernetes.io/enforce` value, if any.
    pub enforce: Option<String>,
    /// At least the configured level (restricted > baseline > privileged).
    pub sufficient: bool,
}

/// Everything known about one environment namespace. `None` = not checked (yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStatus {
    pub policy: Option<PolicyState>,
    /// Names of other policies that reopen a blocked destination.
    pub bypassed_by: Vec<String>,
    pub psa: Option<PsaState>,
    pub cni: Option<CniState>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct NamespaceStates(Arc<RwLock<BTreeMap<String, NamespaceStatus>>>);

impl NamespaceStates {
    pub fn update(&self, namespace: &str, f: impl FnOnce(&mut NamespaceStatus)) {
        let mut map = self.0.write().expect("namespace states lock");
        f(map.entry(namespace.to_owned()).or_default());
    }

    /// Drops namespaces that are no longer environments.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0
            .write()
            .expect("namespace states lock")
            .retain(|ns, _| keep(ns));
    }

    pub fn snapshot(&self) -> BTreeMap<String, NamespaceStatus> {
        self.0.read().expect("namespace states lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_serialized_names() {
        for state in PolicyState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        for state in CniState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
    }
}

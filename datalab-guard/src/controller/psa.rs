//! Pod Security Admission on environment namespaces: is `pod-security.kubernetes.io/enforce`
//! at least the configured level (privileged < baseline < restricted)? Pure checks and the
//! server-side apply body the leader sends when `podSecurity.setLabel` is on; the
//! provisioning loop ([`super::provision`]) decides when, reports and writes.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::baseline_state::PsaState;
use crate::config::PodSecurityLevel;

/// The label Pod Security Admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
/// The policy version the enforce label refers to; we set `latest`.
pub const ENFORCE_VERSION_LABEL: &str = "pod-security.kubernetes.io/enforce-version";

/// A label value as a level; `None` for anything PSA would not accept.
pub fn parse_level(value: &str) -> Option<PodSecurityLevel> {
    match value {
        "privileged" => Some(PodSecurityLevel::Privileged),
        "baseline" => Some(PodSecurityLevel::Baseline),
        "restricted" => Some(PodSecurityLevel::Restricted),
        _ => None,
    }
}

/// The namespace's enforce label against `required`. A missing or unknown value is not
/// sufficient (an unknown value would be rejected by PSA; without the label the cluster
/// default applies, usually privileged).
pub fn check(labels: &BTreeMap<String, String>, required: PodSecurityLevel) -> PsaState {
    let enforce = labels.get(ENFORCE_LABEL).cloned();
    let sufficient = enforce
        .as_deref()
        .and_then(parse_level)
        .is_some_and(|level| level >= required);
    PsaState {
        enforce,
        sufficient,
    }
}

/// One line saying what is wrong, for the log and the Event.
pub fn describe_weakness(state: &PsaState, required: PodSecurityLevel) -> String {
    match &state.enforce {
        None => format!(
            "namespace has no {ENFORCE_LABEL} label; environments must enforce at least {}",
            required.as_str()
        ),
        Some(v) if parse_level(v).is_none() => {
            format!("{ENFORCE_LABEL}={v:?} is not a Pod Security level; environments must enforce at least {}", required.as_str())
        }
        Some(v) => format!(
            "{ENFORCE_LABEL}={v} is weaker than the required {}",
            required.as_str()
        ),
    }
}

/// The server-side apply body for the namespace: only the two labels we own.
pub fn label_apply_body(namespace: &str, level: PodSecurityLevel) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace,
            "labels": {
                ENFORCE_LABEL: level.as_str(),
                ENFORCE_VERSION_LABEL: "latest",
            },
        },
    })
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

    #[test]
    fn levels_are_ordered_privileged_baseline_restricted() {
        use PodSecurityLevel::*;
        let cases = [
            (None, Baseline, false),
            (Some("privileged"), Baseline, false),
            (Some("baseline"), Baseline, true),
            (Some("restricted"), Baseline, true),
            (Some("baseline"), Restricted, false),
            (Some("restricted"), Restricted, true),
            (Some("privileged"), Privileged, true),
            (None, Privileged, false),
            (Some("Restricted"), Baseline, false),
            (Some(""), Baseline, false),
        ];
        for (value, required, want) in cases {
            let l = match value {
                Some(v) => labels(&[(ENFORCE_LABEL, v)]),
                None => labels(&[("other", "x")]),
            };
            let state = check(&l, required);
            assert_eq!(state.sufficient, want, "{value:?} vs {required:?}");
            assert_eq!(state.enforce.as_deref(), value);
        }
    }

    #[test]
    fn weaknesses_are_described() {
        let s = check(&labels(&[]), PodSecurityLevel::Baseline);
        assert!(describe_weakness(&s, PodSecurityLevel::Baseline)
            .contains("no pod-security.kubernetes.io/enforce label"));
        let s = check(
            &labels(&[(ENFORCE_LABEL, "privileged")]),
            PodSecurityLevel::Restricted,
        );
        assert_eq!(
            describe_weakness(&s, PodSecurityLevel::Restricted),
            "pod-security.kubernetes.io/enforce=privileged is weaker than the required restricted"
        );
        let s = check(
            &labels(&[(ENFORCE_LABEL, "strict")]),
            PodSecurityLevel::Baseline,
        );
        assert!(
            describe_weakness(&s, PodSecurityLevel::Baseline).contains("not a Pod Security level")
        );
    }

    #[test]
    fn the_apply_body_names_only_our_two_labels() {
        let body = label_apply_body("tenant-a", PodSecurityLevel::Restricted);
        assert_eq!(body["metadata"]["name"], "tenant-a");
        let l = body["metadata"]["labels"].as_object().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[ENFORCE_LABEL], "restricted");
        assert_eq!(l[ENFORCE_VERSION_LABEL], "latest");
        assert_eq!(body["kind"], "Namespace");
        assert!(body.get("spec").is_none());
    }
}

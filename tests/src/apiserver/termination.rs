//! Terminating namespaces, as a real cluster has them: deleting a namespace first only marks
//! it (`metadata.deletionTimestamp`, `status.phase: Terminating`, the `kubernetes` finalizer
//! still in `spec.finalizers`); the namespace controller then deletes what is inside, and
//! only then does the namespace go. Meanwhile the NamespaceLifecycle admission plugin refuses
//! every create in it — Events included — with `403 Forbidden` "unable to create new content
//! in namespace X because it is being terminated" and a `NamespaceTerminating` cause.
//! Updates, patches and deletes of existing objects still work.
//!
//! The fixture's control methods drive the phases ([`super::FakeApiServer::terminate_namespace`],
//! then [`super::FakeApiServer::delete_namespace`] for the end), so a test decides how long
//! the namespace stays Terminating.

use serde_json::{json, Value};

use super::{resources::Kind, status::ApiError, store::now_rfc3339};

/// Whether a stored namespace object is Terminating.
pub(crate) fn is_terminating(ns: &Value) -> bool {
    ns.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating")
        || ns
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null())
}

/// `ns` marked as deleted but not gone: what a DELETE of a namespace leaves.
pub(crate) fn mark_terminating(mut ns: Value) -> Value {
    ns["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    ns["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    ns["spec"]["finalizers"] = json!(["kubernetes"]);
    ns["status"]["phase"] = json!("Terminating");
    ns
}

/// The NamespaceLifecycle refusal of a create of `kind` named `name` in namespace `ns`.
pub(crate) fn forbidden(kind: Kind, name: &str, ns: &str) -> ApiError {
    let mut details = json!({
        "name": name,
        "kind": kind.plural(),
        "causes": [{
            "reason": "NamespaceTerminating",
            "message": format!("namespace {ns} is being terminated"),
            "field": "metadata.namespace",
        }],
    });
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    ApiError {
        details: Some(details),
        ..ApiError::new(
            403,
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                kind.plural()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_and_refusing() {
        let ns = json!({"metadata": {"name": "a"}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        assert!(!is_terminating(&ns));
        let t = mark_terminating(ns);
        assert!(is_terminating(&t));
        assert_eq!(t["spec"]["finalizers"], json!(["kubernetes"]));
        let e = forbidden(Kind::EventV1, "e1", "a").to_status();
        assert_eq!(
            (e["code"].as_u64(), e["reason"].as_str()),
            (Some(403), Some("Forbidden"))
        );
        assert_eq!(e["details"]["causes"][0]["reason"], "NamespaceTerminating");
        assert!(e["message"]
            .as_str()
            .unwrap()
            .ends_with("because it is being terminated"));
    }
}

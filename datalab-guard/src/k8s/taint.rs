//! The startup taint (config `startupTaint`, default `datalab.io/guard-not-ready`): clusters
//! put it on new nodes so that nothing is scheduled (or, with `NoExecute`, keeps running)
//! there before the guard enforces; the node agent removes it from its own Node once its
//! programs are attached and every pod of the node has its verdict from the API, and never
//! before.
//!
//! Only taints with that key (any effect) go, only on the agent's own Node; every other
//! taint stays. The write is a JSON patch (`application/json-patch+json`) that first
//! `test`s the whole taint list it read, so a concurrent change (the node controller, the
//! autoscaler, an admin) makes the API server refuse it (422) and the agent reads again,
//! instead of writing back a list that drops someone else's change. Outages and other
//! errors are retried with the watches' capped backoff until it is done.
//!
//! API calls: `get` and `patch` on `nodes` (core/v1, no subresource), by name.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::backoff::WatchBackoff;

/// How often the agent checks whether it enforces the API's verdicts yet.
const READY_POLL: Duration = Duration::from_millis(100);
/// Pause before reading the Node again after a refused (conflicting) patch.
const CONFLICT_PAUSE: Duration = Duration::from_millis(50);

/// The JSON patch that removes every taint with `key` from `taints` (the Node's
/// `spec.taints` as read), guarded by a `test` of the whole list; `None` when no taint has
/// the key.
pub fn removal_patch(taints: &[Value], key: &str) -> Option<Value> {
    let kept: Vec<&Value> = taints
        .iter()
        .filter(|t| t.get("key").and_then(Value::as_str) != Some(key))
        .collect();
    if kept.len() == taints.len() {
        return None;
    }
    Some(json!([
        { "op": "test", "path": "/spec/taints", "value": taints },
        { "op": "replace", "path": "/spec/taints", "value": kept },
    ]))
}

/// Removes the taint `key` from Node `node` once `enforcing()` is true; runs until done.
pub fn spawn(
    client: kube::Client,
    node: String,
    key: String,
    enforcing: impl Fn() -> bool + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !enforcing() {
            tokio::time::sleep(READY_POLL).await;
        }
        remove_until_done(&client, &node, &key).await;
    })
}

/// What one attempt found.
enum Attempt {
    Removed,
    Absent,
    /// The taints changed between the read and the patch.
    Conflict,
}

async fn remove_until_done(client: &kube::Client, node: &str, key: &str) {
    let mut backoff = WatchBackoff::default();
    let mut failing = false;
    loop {
        match attempt(client, node, key).await {
            Ok(Attempt::Removed) => {
                tracing::info!(
                    node,
                    taint = key,
                    "startup taint removed: the guard enforces the API's verdicts on this node"
                );
                return;
            }
            Ok(Attempt::Absent) => {
                tracing::info!(
                    node,
                    taint = key,
                    "no startup taint on this node; nothing to remove"
                );
                return;
            }
            Ok(Attempt::Conflict) => {
                tracing::debug!(
                    node,
                    taint = key,
                    "the node's taints changed meanwhile; reading them again"
                );
                tokio::time::sleep(CONFLICT_PAUSE).await;
            }
            Err(e) => {
                if failing {
                    tracing::debug!(node, taint = key, error = %e, "still cannot remove the startup taint");
                } else {
                    tracing::warn!(node, taint = key, error = %e, "cannot remove the startup taint yet; retrying");
                    failing = true;
                }
                tokio::time::sleep(super::retry::delay_after(&e, backoff.next_delay())).await;
            }
        }
    }
}

async fn attempt(client: &kube::Client, node: &str, key: &str) -> Result<Attempt, kube::Error> {
    let path = format!("/api/v1/nodes/{node}");
    let get = http::Request::get(&path)
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let current: Value = client.request(get).await?;
    let taints = current
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(patch) = removal_patch(&taints, key) else {
        return Ok(Attempt::Absent);
    };
    let body = serde_json::to_vec(&patch).map_err(kube::Error::SerdeError)?;
    let request = http::Request::patch(&path)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    match client.request::<Value>(request).await {
        Ok(_) => Ok(Attempt::Removed),
        // 422: the `test` failed (the list changed); 409: a conflicting write.
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
            Ok(Attempt::Conflict)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "datalab.io/guard-not-ready";

    #[test]
    fn removes_only_the_key_with_any_effect_after_a_test_of_the_whole_list() {
        let taints = vec![
            json!({"key": KEY, "effect": "NoSchedule"}),
            json!({"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2025-01-01T00:00:00Z"}),
            json!({"key": KEY, "value": "x", "effect": "NoExecute"}),
            json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}),
        ];
        let patch = removal_patch(&taints, KEY).unwrap();
        assert_eq!(patch[0]["op"], "test");
        assert_eq!(patch[0]["path"], "/spec/taints");
        assert_eq!(patch[0]["value"], json!(taints));
        assert_eq!(patch[1]["op"], "replace");
        assert_eq!(patch[1]["value"], json!([taints[1], taints[3]]));
    }

    #[test]
    fn nothing_to_do_without_the_key() {
        let taints = vec![json!({"key": "dedicated", "effect": "NoSchedule"})];
        assert!(removal_patch(&taints, KEY).is_none());
        assert!(removal_patch(&[], KEY).is_none());
    }

    #[test]
    fn the_last_taint_leaves_an_empty_list() {
        let taints = vec![json!({"key": KEY, "effect": "NoExecute"})];
        assert_eq!(removal_patch(&taints, KEY).unwrap()[1]["value"], json!([]));
    }
}

//! The node agent's life around the API server (issue 9, points 1 and 4), end to end: the
//! real `datalab-guard node` binary against the API server fixture, a kubelet-style cgroup
//! tree and a network lab ([`datalab_guard_tests::fake_node`]). Needs root.
//!
//! - attach first: with the API server down at the first start the agent enforces within
//!   seconds (unknown pods guarded), says so in `status`, is not ready, and becomes ready
//!   once the API server answers;
//! - a simulated reboot (agent stopped, every pin removed, pod cgroups re-created, API
//!   server down): the state cache's verdicts are in the map before any pod connects;
//! - a corrupt cache is reported and ignored, never fail-open;
//! - the startup taint: removed only once the programs are attached and every pod is
//!   classified, only that key, never when the install fails, never asked about when off.
//!
//! Verdicts are read from the map (`status --output json`) before any probe, so a test can
//! tell a verdict from the default.

use std::time::{Duration, Instant};

use datalab_guard_tests::{
    apiserver::Kind,
    cgroup::remove_tree,
    fake_node::{cgroup_id, container_id, eventually, uid, FakeNode, IMDS4, NODE},
    http_get, require_root, Agent, RequestLog,
};
use serde_json::{json, Value};

const TAINT: &str = "datalab.io/guard-not-ready";

fn readyz(node: &FakeNode) -> u16 {
    http_get(node.metrics, "/readyz", Duration::from_secs(2)).map_or(0, |r| r.status)
}

fn append_config(node: &FakeNode, extra: &str) {
    let path = node.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{config}{extra}")).unwrap();
}

/// The pods' uids in the agent's state cache file (empty when there is none).
fn cached_uids(node: &FakeNode) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(node.state_dir().join("cache.json")) else {
        return Vec::new();
    };
    let cache: Value = serde_json::from_str(&text).unwrap_or_default();
    cache["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["uid"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `status` says the programs are attached (while the agent is still pinning
/// its maps `status` may fail: not yet); returns how long that took.
fn wait_enforcing(node: &FakeNode, timeout: Duration) -> Duration {
    eventually("status says ENFORCING", timeout, || {
        serde_json::from_slice::<Value>(&node.status(true).stdout)
            .is_ok_and(|s| s["enforcing"] == true)
    })
}

#[test]
fn api_down_at_first_start_attaches_at_once_and_guards() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    let (ut, ct) = (uid(101), container_id(101));
    node.announce("tenant-a", "notebook", "Burstable", &ut, &ct, false);
    let tenant = node.make_cgroups("Burstable", &ut, &ct);
    let (us, cs) = (uid(102), container_id(102));
    node.announce("kube-system", "aws-node", "BestEffort", &us, &cs, false);
    let system = node.make_cgroups("BestEffort", &us, &cs);
    node.api.go_down();

    let started = Instant::now();
    node.spawn();
    wait_enforcing(&node, Duration::from_secs(5));
    eprintln!(
        "attached {:?} after start with the API server down",
        started.elapsed()
    );

    // No cache, no API: no entry for any pod, so the default (guard) decides.
    let verdicts = node.verdicts();
    assert!(verdicts.is_empty(), "{verdicts:?}");
    let status = node.status_json();
    assert_eq!(status["default_verdict"], "guard", "{status}");
    assert!(
        node.probe(&tenant, "tcp", IMDS4).is_eperm(),
        "tenant blocked"
    );
    assert!(
        node.probe(&system, "tcp", IMDS4).is_eperm(),
        "unknown stays guarded, even a system pod"
    );
    let out = node.status(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("ENFORCING"), "{text}");
    assert!(
        text.contains("verdicts from: cache/runtime only (no cache"),
        "{text}"
    );
    let status = node.status_json();
    assert_eq!(status["enforcing_from"], "cache", "{status}");
    assert_eq!(readyz(&node), 503, "not ready before the first sync");

    node.api.come_back();
    node.wait_ready(Duration::from_secs(30));
    let (tenant_id, system_id) = (
        cgroup_id(&node.pod_dir("Burstable", &ut)),
        cgroup_id(&node.pod_dir("BestEffort", &us)),
    );
    let verdicts = node.verdicts();
    assert_eq!(verdicts.get(&tenant_id).map(String::as_str), Some("guard"));
    assert_eq!(verdicts.get(&system_id).map(String::as_str), Some("exempt"));
    eventually("status says API-synced", Duration::from_secs(10), || {
        node.status_json()["enforcing_from"] == "api"
    });
    assert!(
        node.probe(&system, "http", IMDS4).ok,
        "system pod exempt once synced"
    );
    assert!(node.probe(&tenant, "tcp", IMDS4).is_eperm());
    eventually(
        "the state cache holds both pods",
        Duration::from_secs(10),
        || {
            let cached = cached_uids(&node);
            cached.contains(&ut) && cached.contains(&us)
        },
    );
}

#[test]
fn reboot_with_api_down_enforces_the_cached_verdicts() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    // Exempt by config, and nothing else outside environments.
    append_config(
        &node,
        "exemptions:\n  namespaces: [kube-system]\nnonEnvironmentVerdict: guard\n",
    );
    node.api.apply_namespace("other", &[]);
    let (ut, ct) = (uid(111), container_id(111));
    node.announce("tenant-a", "notebook", "Burstable", &ut, &ct, false);
    let tenant = node.make_cgroups("Burstable", &ut, &ct);
    let (us, cs) = (uid(112), container_id(112));
    node.announce("kube-system", "aws-node", "BestEffort", &us, &cs, false);
    let system = node.make_cgroups("BestEffort", &us, &cs);
    let (ur, cr) = (uid(113), container_id(113));
    node.announce("kube-system", "kube-proxy", "Guaranteed", &ur, &cr, false);
    node.make_cgroups("Guaranteed", &ur, &cr);
    let (uo, co) = (uid(114), container_id(114));
    node.announce("other", "batch", "BestEffort", &uo, &co, false);
    let other = node.make_cgroups("BestEffort", &uo, &co);
    node.start();
    eventually(
        "the state cache holds every pod",
        Duration::from_secs(10),
        || {
            let cached = cached_uids(&node);
            [&ut, &us, &ur, &uo].iter().all(|u| cached.contains(u))
        },
    );

    // "Reboot": the agent stops, every pin goes (bpffs does not survive a reboot), the
    // kubelet re-creates one pod's cgroup (new cgroup id) only after the agent is back, and
    // the API server is unreachable throughout.
    node.stop();
    let pins = node.pins().display().to_string();
    let out = Agent::run(&["uninstall", "--bpffs", &pins]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.pins().join("maps").exists(), "pins removed");
    let old_proxy_dir = node.pod_dir("Guaranteed", &ur);
    remove_tree(&old_proxy_dir).unwrap();
    node.api.go_down();
    node.spawn();
    wait_enforcing(&node, Duration::from_secs(5));
    let proxy = node.make_cgroups("Guaranteed", &ur, &cr);
    let proxy_id = cgroup_id(&node.pod_dir("Guaranteed", &ur));

    // The map holds the cached verdicts before anything connects.
    let id = |qos: &str, u: &str| cgroup_id(&node.pod_dir(qos, u));
    let verdicts = node.verdicts();
    assert_eq!(
        verdicts.get(&id("BestEffort", &us)).map(String::as_str),
        Some("exempt"),
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.get(&id("Burstable", &ut)).map(String::as_str),
        Some("guard"),
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.get(&id("BestEffort", &uo)).map(String::as_str),
        Some("guard"),
        "{verdicts:?}"
    );
    eventually(
        "the re-created pod cgroup gets its cached verdict",
        Duration::from_secs(3),
        || node.verdicts().get(&proxy_id).map(String::as_str) == Some("exempt"),
    );
    assert!(
        node.probe(&system, "http", IMDS4).ok,
        "cached system pod exempt"
    );
    assert!(
        node.probe(&proxy, "http", IMDS4).ok,
        "re-created system pod exempt"
    );
    assert!(
        node.probe(&tenant, "tcp", IMDS4).is_eperm(),
        "tenant blocked"
    );
    assert!(
        node.probe(&other, "tcp", IMDS4).is_eperm(),
        "non-exempt pod blocked"
    );

    let status = node.status_json();
    assert_eq!(status["enforcing_from"], "cache", "{status}");
    assert!(status["cache_age_seconds"].as_u64().is_some(), "{status}");
    let text = String::from_utf8_lossy(&node.status(false).stdout).into_owned();
    assert!(
        text.contains("verdicts from: cache/runtime only (cache age"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains("aws-node"))
        .unwrap_or_default();
    assert!(row.trim_start().starts_with("exempt"), "{text}");
    assert_eq!(readyz(&node), 503);

    node.api.come_back();
    node.wait_ready(Duration::from_secs(30));
    assert_eq!(node.status_json()["enforcing_from"], "api");
    assert!(node.probe(&proxy, "http", IMDS4).ok);
    assert!(node.probe(&tenant, "tcp", IMDS4).is_eperm());
}

#[test]
fn a_corrupt_cache_is_reported_and_ignored() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    let (us, cs) = (uid(121), container_id(121));
    node.announce("kube-system", "aws-node", "BestEffort", &us, &cs, false);
    let system = node.make_cgroups("BestEffort", &us, &cs);
    std::fs::create_dir_all(node.state_dir()).unwrap();
    std::fs::write(
        node.state_dir().join("cache.json"),
        "{\"version\": 1, \"pods\": [",
    )
    .unwrap();
    node.api.go_down();
    node.spawn();
    wait_enforcing(&node, Duration::from_secs(5));
    assert!(
        node.verdicts().is_empty(),
        "nothing taken from a corrupt cache"
    );
    assert!(
        node.probe(&system, "tcp", IMDS4).is_eperm(),
        "unknown stays guarded"
    );
    let status = node.status_json();
    let error = status["environments"]["cache"]["load_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("cache.json"), "{status}");
    let text = String::from_utf8_lossy(&node.status(false).stdout).into_owned();
    assert!(
        text.contains("the state cache was ignored at start"),
        "{text}"
    );
    assert!(
        node.agent()
            .stderr_lines()
            .iter()
            .any(|l| l.contains("state cache ignored")),
        "logged"
    );
    node.api.come_back();
    node.wait_ready(Duration::from_secs(30));
    assert!(node.probe(&system, "http", IMDS4).ok);
}

/// A Node with the startup taint and another taint.
fn tainted_node(node: &FakeNode) {
    let mut obj = node.api.apply_node(NODE, &["10.244.1.0/24"]);
    obj["spec"]["taints"] = json!([
        {"key": TAINT, "effect": "NoExecute"},
        {"key": "dedicated", "value": "datalab", "effect": "NoSchedule"},
    ]);
    node.api.apply_object(Kind::Node, obj);
}

fn taints(node: &FakeNode) -> Value {
    node.api
        .get(Kind::Node, None, NODE)
        .map(|n| n["spec"]["taints"].clone())
        .unwrap_or_default()
}

fn has_taint(node: &FakeNode) -> bool {
    taints(node)
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["key"] == TAINT))
}

/// Requests for this node's Node object (the startup taint's get and patch; the
/// NetworkPolicy's dual-stack detection lists nodes, which is another matter).
fn node_requests(node: &FakeNode) -> Vec<RequestLog> {
    node.api
        .requests()
        .into_iter()
        .filter(|r| r.resource.as_deref() == Some("nodes") && r.name.as_deref() == Some(NODE))
        .collect()
}

#[test]
fn the_startup_taint_goes_only_after_attach_and_classification() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    tainted_node(&node);
    let (ut, ct) = (uid(131), container_id(131));
    node.announce("tenant-a", "notebook", "Burstable", &ut, &ct, false);
    node.make_cgroups("Burstable", &ut, &ct);
    let (us, cs) = (uid(132), container_id(132));
    node.announce("kube-system", "aws-node", "BestEffort", &us, &cs, false);
    node.make_cgroups("BestEffort", &us, &cs);
    let (tenant_id, system_id) = (
        cgroup_id(&node.pod_dir("Burstable", &ut)),
        cgroup_id(&node.pod_dir("BestEffort", &us)),
    );
    // A slow API server: the agent is attached well before its first sync.
    node.api.set_latency(Duration::from_secs(3));
    node.spawn();

    let mut attached_unsynced = false;
    let mut classified_while_tainted = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while has_taint(&node) {
        assert!(Instant::now() < deadline, "the taint was never removed");
        let Ok(status) = serde_json::from_slice::<Value>(&node.status(true).stdout) else {
            continue; // still pinning its maps
        };
        let verdicts = node.verdicts();
        let classified = verdicts.get(&tenant_id).map(String::as_str) == Some("guard")
            && verdicts.get(&system_id).map(String::as_str) == Some("exempt");
        if status["enforcing"] == true && !classified && has_taint(&node) {
            attached_unsynced = true;
        }
        if classified && has_taint(&node) {
            classified_while_tainted = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        attached_unsynced,
        "seen attached, not yet classified, taint still on"
    );
    assert!(
        classified_while_tainted,
        "every pod had its entry before the taint went"
    );

    // Only that key went; the other taint is exactly as it was.
    assert_eq!(
        taints(&node),
        json!([{"key": "dedicated", "value": "datalab", "effect": "NoSchedule"}])
    );
    // The request log: one JSON patch of this node, after both initial lists.
    let requests = node.api.requests();
    let patch_at = requests
        .iter()
        .position(|r| r.resource.as_deref() == Some("nodes") && r.verb == "patch")
        .expect("a patch of the node");
    let patch = &requests[patch_at];
    assert_eq!(patch.name.as_deref(), Some(NODE));
    assert_eq!(patch.status, 200);
    assert_eq!(
        patch
            .content_type
            .as_deref()
            .map(|c| c.split(';').next().unwrap_or("")),
        Some("application/json-patch+json")
    );
    for resource in ["pods", "namespaces"] {
        let listed = requests
            .iter()
            .position(|r| {
                r.resource.as_deref() == Some(resource) && r.verb == "list" && r.status == 200
            })
            .unwrap_or_else(|| panic!("no list of {resource}"));
        assert!(listed < patch_at, "{resource} listed before the patch");
    }
    let patches = node_requests(&node)
        .iter()
        .filter(|r| r.verb == "patch")
        .count();
    assert_eq!(patches, 1);
    let removed_lines = || {
        node.agent()
            .stderr_lines()
            .iter()
            .filter(|l| l.contains("startup taint removed"))
            .count()
    };
    eventually("the removal is logged", Duration::from_secs(5), || {
        removed_lines() > 0
    });
    assert_eq!(removed_lines(), 1, "logged once");
}

#[test]
fn the_startup_taint_stays_when_the_install_fails() {
    if !require_root() {
        return;
    }
    let node = FakeNode::new();
    tainted_node(&node);
    // Not a bpf filesystem: the install fails.
    let not_bpffs = node.dir.join("not-bpffs");
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let mut args = node.args();
    let at = args.iter().position(|a| a == "--bpffs").unwrap();
    args[at + 1] = not_bpffs.join("guard").display().to_string();
    let mut agent = Agent::spawn(&args).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = agent.try_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running without an install"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "exits non-zero: {status}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(has_taint(&node), "the taint stays");
    assert!(
        node_requests(&node).iter().all(|r| r.verb != "patch"),
        "{:?}",
        node_requests(&node)
    );
}

#[test]
fn no_node_request_when_the_startup_taint_is_off() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    append_config(&node, "startupTaint: \"\"\n");
    tainted_node(&node);
    node.start();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        node_requests(&node).is_empty(),
        "{:?}",
        node_requests(&node)
    );
    assert!(has_taint(&node));
}

/// Someone else changes the node's taints between the agent's read and its patch: the
/// patch's `test` fails (422), the agent reads again, and the other change is kept.
#[test]
fn a_concurrent_taint_change_is_kept_not_clobbered() {
    if !require_root() {
        return;
    }
    let mut node = FakeNode::new();
    tainted_node(&node);
    // Every request waits 2 s before it is handled: the agent's patch is in flight for that
    // long after its read was answered.
    node.api.set_latency(Duration::from_secs(2));
    node.spawn();
    eventually("the agent read its Node", Duration::from_secs(30), || {
        node_requests(&node).iter().any(|r| r.verb == "get")
    });
    let mut obj = node.api.get(Kind::Node, None, NODE).unwrap();
    obj["spec"]["taints"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "maintenance", "effect": "NoSchedule"}));
    node.api.apply_object(Kind::Node, obj);
    eventually("the startup taint removed", Duration::from_secs(30), || {
        !has_taint(&node)
    });
    assert_eq!(
        taints(&node),
        json!([
            {"key": "dedicated", "value": "datalab", "effect": "NoSchedule"},
            {"key": "maintenance", "effect": "NoSchedule"},
        ])
    );
    let patches: Vec<u16> = node_requests(&node)
        .iter()
        .filter(|r| r.verb == "patch")
        .map(|r| r.status)
        .collect();
    assert_eq!(
        patches,
        [422, 200],
        "a refused patch, then one on the fresh list"
    );
}

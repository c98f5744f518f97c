//! The cluster-wide baseline: leader election on a Lease, the `allow-web-egress`
//! NetworkPolicy (provisioning, drift repair, removal), Pod Security labels and hole-punch
//! reporting — against the API server fixture.
//!
//! Two layers:
//! - in-process (no root): `datalab_guard::controller::{leader, provision}` driven directly,
//!   each "replica" with its own kube client; most behaviour is checked here;
//! - the real binary: two or three `datalab-guard controller` processes against one fixture
//!   (no root: a controller touches nothing in the kernel) — only one writes, `kill -9` of the
//!   leader hands over within the lease, SIGTERM hands over at once, clock skew neither
//!   steals nor loses the Lease; a controller waits for an unreachable API server; bad input
//!   exits 2; and (root) a node agent beside them writes nothing but Events.
//!
//! Who wrote what: the fixture authenticates bearer tokens and enforces the RBAC of the
//! rendered manifests, so every controller runs as the controller's ServiceAccount and every
//! node agent as the node agent's (a call the RBAC does not grant fails the test). One
//! controller gets the ServiceAccount's first token and the others a second token of the
//! same ServiceAccount ([`REPLICA_TOKEN`], as two replicas of a Deployment hold different
//! tokens); the request log's `bearer_token` then says which of the two sent each request.
//! The test's own edits ("kubectl") use the fixture's admin. The Lease lives in the
//! controller's namespace (`datalab-guard`), where the manifests' Role grants it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use datalab_guard::{
    baseline_state::{NamespaceStates, PolicyState},
    config::Config,
    controller::{
        leader::{Elector, LeaseSettings},
        provision::{self, BaselineHandle},
    },
};
use datalab_guard_tests::{
    apiserver::{
        node_agent_violations,
        rbac::{Identity, AGENT_NAMESPACE},
        Kind, RequestLog,
    },
    free_loopback_addr, http_get, require_root, Agent, BpffsDir, FakeApiServer, PodBuilder,
    TestCgroup,
};
use k8s_openapi::{
    api::networking::v1::NetworkPolicy,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config as KubeConfig,
};
use serde_json::{json, Value};

const ENV: (&str, &str) = ("datalab.io/environment", "true");
const POLICY: &str = "allow-web-egress";
const LEASE: &str = "datalab-guard-leader";
const LEASE_NS: &str = AGENT_NAMESPACE;
const MANAGER: &str = "datalab-guard";
const ENFORCE: &str = "pod-security.kubernetes.io/enforce";
const ENFORCE_VERSION: &str = "pod-security.kubernetes.io/enforce-version";

/// Short lease settings: leaseDuration 3s, renewDeadline 2s, retryPeriod 500ms.
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RETRY_PERIOD: Duration = Duration::from_millis(500);
/// A crashed leader is replaced within leaseDuration + 2.4 × retryPeriod of its last renewal
/// (client-go semantics: a standby counts the lease from when it *saw* the last renewal, up
/// to one jittered look — at most 2.2 × retryPeriod — after it was written, and wakes at most
/// 0.2 × retryPeriod after that expiry), plus a margin for the requests.
const TAKEOVER_WITHIN: Duration = Duration::from_millis(3_000 + 1_200 + 400);
/// Appended to the config of a node agent (see `node_agents_beside_controllers_only_read`).
const NO_PROBE: &str = "probe:\n  enabled: false\n";

const LEADER_ELECTION: &str = "leaderElection:\n  namespace: datalab-guard\n  leaseDuration: 3s\n  renewDeadline: 2s\n  retryPeriod: 500ms\n";

// ---------------------------------------------------------------------------------------
// Helpers shared by both layers.

fn config(extra: &str) -> Config {
    Config::from_yaml_str(
        &format!("{LEADER_ELECTION}{extra}"),
        Path::new("provisioning-test.yaml"),
    )
    .expect("test config")
}

/// The second token of the controller's ServiceAccount (see the module docs).
const REPLICA_TOKEN: &str = "datalab-guard-controller-replica-token";

/// A controller's kubeconfig: the ServiceAccount's first token (`token`) or
/// [`REPLICA_TOKEN`]. Also makes the Lease's namespace, as deploy/ does.
fn controller_kubeconfig(server: &FakeApiServer, token: bool) -> String {
    if server.get(Kind::Namespace, None, LEASE_NS).is_none() {
        server.apply_namespace(LEASE_NS, &[]);
    }
    if token {
        server.kubeconfig_yaml_as(Identity::Controller)
    } else {
        server.add_token(Identity::Controller, REPLICA_TOKEN);
        server.kubeconfig_yaml_with_token(REPLICA_TOKEN)
    }
}

/// Sent by the controller holding the first token (`true`) or [`REPLICA_TOKEN`].
fn sent_with(r: &RequestLog, token: bool) -> bool {
    let want = if token {
        Identity::Controller.default_token()
    } else {
        REPLICA_TOKEN
    };
    r.bearer_token.as_deref() == Some(want)
}

/// A controller's client (see [`controller_kubeconfig`]).
async fn client(server: &FakeApiServer, token: bool) -> Client {
    client_from(&controller_kubeconfig(server, token)).await
}

/// The test's own client ("kubectl"): the fixture's admin.
async fn admin_client(server: &FakeApiServer) -> Client {
    client_from(&server.kubeconfig_yaml()).await
}

async fn client_from(yaml: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(yaml).expect("kubeconfig parses");
    let config = KubeConfig::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

fn policy(server: &FakeApiServer, ns: &str) -> Option<Value> {
    server.get(Kind::NetworkPolicy, Some(ns), POLICY)
}

/// `(cidr, except)` of every ipBlock peer of the policy's egress rules.
fn ip_blocks(p: &Value) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for rule in p["spec"]["egress"].as_array().into_iter().flatten() {
        for peer in rule["to"].as_array().into_iter().flatten() {
            let block = &peer["ipBlock"];
            if !block.is_object() {
                continue;
            }
            let except = block["except"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect();
            out.push((
                block["cidr"].as_str().unwrap_or_default().to_owned(),
                except,
            ));
        }
    }
    out
}

/// Whether the policy has the in-cluster rule: egress to every pod in every namespace, on
/// all ports, as a rule of its own.
fn has_in_cluster_rule(p: &Value) -> bool {
    p["spec"]["egress"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|rule| *rule == json!({"to": [{"namespaceSelector": {}}]}))
}

fn owners(obj: &Value, field: &str) -> Vec<String> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.pointer(field).is_some())
        .filter_map(|e| e["manager"].as_str().map(str::to_owned))
        .collect()
}

/// Events with `reason` about namespace `ns` (series counted: a repeated Event is one
/// object whose `series.count` grows).
fn event_count(server: &FakeApiServer, reason: &str, ns: &str) -> u64 {
    server
        .events()
        .iter()
        .filter(|e| e["reason"] == reason)
        .filter(|e| {
            let r = if e["regarding"].is_object() {
                &e["regarding"]
            } else {
                &e["involvedObject"]
            };
            r["kind"] == "Namespace" && r["name"] == ns
        })
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

fn events_by(server: &FakeApiServer, reason: &str, instance: &str) -> usize {
    server
        .events()
        .iter()
        .filter(|e| e["reason"] == reason && e["reportingInstance"] == instance)
        .count()
}

fn is_write(r: &RequestLog) -> bool {
    r.is_write()
}

fn lease_holder(server: &FakeApiServer) -> Option<String> {
    server.get(Kind::Lease, Some(LEASE_NS), LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

fn eventually_sync(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what}: not within {timeout:?}");
}

/// Another writer, as `kubectl` would be: its own field manager.
async fn foreign_merge(client: &Client, ns: &str, name: &str, manager: &str, patch: Value) {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let params = PatchParams {
        field_manager: Some(manager.into()),
        ..PatchParams::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch))
        .await
        .expect("foreign merge patch");
}

fn tenant_policy(ns: &str, name: &str, cidr: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "notebook"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": cidr}}]}]},
    }))
    .unwrap()
}

async fn create_foreign(client: &Client, p: &NetworkPolicy) -> Value {
    let api: Api<NetworkPolicy> =
        Api::namespaced(client.clone(), p.metadata.namespace.as_deref().unwrap());
    let params = PostParams {
        field_manager: Some("kubectl-create".into()),
        ..PostParams::default()
    };
    serde_json::to_value(api.create(&params, p).await.expect("create foreign policy")).unwrap()
}

// ---------------------------------------------------------------------------------------
// In-process agents.

struct InProc {
    handle: Option<BaselineHandle>,
    states: NamespaceStates,
}

impl InProc {
    async fn start(server: &FakeApiServer, node: &str, token: bool, config: &Config) -> InProc {
        let states = NamespaceStates::default();
        let handle = provision::spawn(client(server, token).await, config, node, states.clone());
        InProc {
            handle: Some(handle),
            states,
        }
    }

    fn leader(&self) -> bool {
        *self.handle.as_ref().expect("running").is_leader().borrow()
    }

    fn policy_state(&self, ns: &str) -> Option<PolicyState> {
        self.states.snapshot().get(ns).and_then(|s| s.policy)
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

fn lease_settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: LEASE.into(),
        namespace: LEASE_NS.into(),
        identity: identity.into(),
        lease_duration: LEASE_DURATION,
        renew_deadline: Duration::from_secs(2),
        retry_period: RETRY_PERIOD,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_elects_one_and_hands_over() {
    let server = FakeApiServer::start();
    let a = Elector::spawn(client(&server, true).await, lease_settings("node-a"));
    eventually(
        "node-a leads (it created the Lease)",
        Duration::from_secs(5),
        || a.is_leader(),
    )
    .await;
    let b = Elector::spawn(client(&server, false).await, lease_settings("node-b"));
    let c = Elector::spawn(client(&server, false).await, lease_settings("node-c"));
    // For a few lease periods: exactly one leader, and it is the Lease's holder.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert!(
            a.is_leader() && !b.is_leader() && !c.is_leader(),
            "exactly one leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lease_holder(&server).as_deref(), Some("node-a"));
    let lease = server.get(Kind::Lease, Some(LEASE_NS), LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 3);
    assert_eq!(lease["spec"]["leaseTransitions"], 0);
    assert!(lease["spec"]["renewTime"].is_string() && lease["spec"]["acquireTime"].is_string());
    // Standbys only read while the lease is valid: no writes from b or c.
    let standby_writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| sent_with(r, false) && is_write(r))
        .collect();
    assert!(
        standby_writes.is_empty(),
        "standbys wrote: {standby_writes:?}"
    );

    // Clean shutdown releases the Lease: a standby takes over at once, not after 3 s.
    let t0 = Instant::now();
    a.shutdown(Duration::from_secs(2)).await;
    eventually(
        "a standby takes the released lease",
        Duration::from_secs(3),
        || b.is_leader() || c.is_leader(),
    )
    .await;
    let took = t0.elapsed();
    eprintln!("released lease taken over after {took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "took {took:?}: the release should not wait for expiry"
    );
    let (leader, standby) = if b.is_leader() { (b, c) } else { (c, b) };
    let lease = server.get(Kind::Lease, Some(LEASE_NS), LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 3);

    // A crash (no release): the standby waits for the lease to expire, then takes it within
    // TAKEOVER_WITHIN of the last renewal.
    let t0 = Instant::now();
    drop(leader);
    let took = eventually(
        "the standby takes over the expired lease",
        Duration::from_secs(6),
        || standby.is_leader(),
    )
    .await;
    eprintln!("crashed leader replaced after {took:?}");
    assert!(
        took >= LEASE_DURATION - RETRY_PERIOD - Duration::from_millis(200),
        "took over before the lease expired: {took:?}"
    );
    assert!(t0.elapsed() <= TAKEOVER_WITHIN, "took {:?}", t0.elapsed());
    assert_eq!(
        server.get(Kind::Lease, Some(LEASE_NS), LEASE).unwrap()["spec"]["leaseTransitions"],
        2
    );

    // The API server goes away: the leader steps down within the renew deadline (and so
    // before anyone could take over), and leads again when it is back.
    let t0 = Instant::now();
    server.go_down();
    eventually("the leader steps down", Duration::from_secs(4), || {
        !standby.is_leader()
    })
    .await;
    let took = t0.elapsed();
    eprintln!("stepped down {took:?} after the API server went away");
    assert!(
        took <= Duration::from_millis(2300),
        "stepped down only after {took:?}"
    );
    server.come_back();
    eventually(
        "leading again once the API server is back",
        Duration::from_secs(6),
        || standby.is_leader(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_races_are_lost_cleanly() {
    // Many candidates start at once against a missing Lease: one creates it, the others get
    // 409 AlreadyExists / Conflict and stand by.
    let server = FakeApiServer::start();
    let mut electors = Vec::new();
    for i in 0..5 {
        electors.push(Elector::spawn(
            client(&server, true).await,
            lease_settings(&format!("node-{i}")),
        ));
    }
    eventually("someone leads", Duration::from_secs(5), || {
        electors.iter().any(Elector::is_leader)
    })
    .await;
    for _ in 0..40 {
        assert_eq!(
            electors.iter().filter(|e| e.is_leader()).count(),
            1,
            "exactly one leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder = lease_holder(&server).unwrap();
    let leader = electors.iter().position(Elector::is_leader).unwrap();
    assert_eq!(holder, format!("node-{leader}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_repairs_and_removes_only_its_own_policy() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    server.apply_namespace("plain", &[]);
    let kubectl = admin_client(&server).await;
    // A policy with our name in a non-environment namespace, made by someone else.
    let mut lookalike = tenant_policy("plain", POLICY, "0.0.0.0/0");
    lookalike.metadata.labels = Some(
        [(
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        )]
        .into(),
    );
    create_foreign(&kubectl, &lookalike).await;

    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config("networkPolicy:\n  dualStack: false\n"),
    )
    .await;
    eventually("leader", Duration::from_secs(5), || agent.leader()).await;

    // Provisioned: the desired spec, our label, our field manager; no repair Event.
    eventually(
        "policy provisioned in tenant-a",
        Duration::from_secs(5),
        || policy(&server, "tenant-a").is_some(),
    )
    .await;
    let p = policy(&server, "tenant-a").unwrap();
    assert_eq!(p["spec"]["podSelector"], json!({}));
    assert_eq!(p["spec"]["policyTypes"], json!(["Egress"]));
    assert_eq!(
        ip_blocks(&p),
        vec![(
            "0.0.0.0/0".to_owned(),
            vec!["169.254.169.254/32".to_owned()]
        )]
    );
    assert!(has_in_cluster_rule(&p), "{p}");
    assert_eq!(p["spec"]["egress"].as_array().unwrap().len(), 2);
    assert_eq!(
        p["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        MANAGER
    );
    assert_eq!(owners(&p, "/fieldsV1/f:spec/f:egress"), [MANAGER]);
    eventually("state ok", Duration::from_secs(3), || {
        agent.policy_state("tenant-a") == Some(PolicyState::Ok)
    })
    .await;
    assert_eq!(
        event_count(&server, "NetworkPolicyRepaired", "tenant-a"),
        0,
        "provisioning is not a repair"
    );

    // A namespace that becomes an environment gets it too.
    server.apply_namespace("tenant-b", &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        policy(&server, "tenant-b").is_none(),
        "not an environment yet"
    );
    server.set_namespace_labels("tenant-b", &[ENV]);
    let took = eventually(
        "policy provisioned in tenant-b",
        Duration::from_secs(3),
        || policy(&server, "tenant-b").is_some(),
    )
    .await;
    eprintln!("labelled namespace provisioned after {took:?}");

    // A tenant's own policy next to ours: never touched.
    let own = create_foreign(
        &kubectl,
        &tenant_policy("tenant-a", "notebook-egress", "10.0.0.0/8"),
    )
    .await;

    // Deleted → repaired, reported, counted.
    server
        .delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY)
        .unwrap();
    let took = eventually(
        "policy repaired after delete",
        Duration::from_secs(3),
        || policy(&server, "tenant-a").is_some(),
    )
    .await;
    eprintln!("deleted policy repaired after {took:?}");
    eventually("repair Event", Duration::from_secs(3), || {
        event_count(&server, "NetworkPolicyRepaired", "tenant-a") == 1
    })
    .await;
    let ev = server
        .events()
        .into_iter()
        .find(|e| e["reason"] == "NetworkPolicyRepaired")
        .unwrap();
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reportingController"], MANAGER);
    assert_eq!(ev["reportingInstance"], "node-1");
    assert_eq!(ev["related"]["kind"], "NetworkPolicy");
    assert!(ev["note"].as_str().unwrap().contains("missing"), "{ev}");
    assert_eq!(
        agent.policy_state("tenant-a"),
        Some(PolicyState::Repaired),
        "repaired is shown for a while"
    );

    // Edited by someone else (kubectl edit: the exception removed, reopening metadata).
    foreign_merge(
        &kubectl,
        "tenant-a",
        POLICY,
        "kubectl-edit",
        json!({"spec": {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}),
    )
    .await;
    eventually("foreign edit repaired", Duration::from_secs(3), || {
        policy(&server, "tenant-a").is_some_and(|p| {
            ip_blocks(&p)
                == vec![(
                    "0.0.0.0/0".to_owned(),
                    vec!["169.254.169.254/32".to_owned()],
                )]
        })
    })
    .await;
    let p = policy(&server, "tenant-a").unwrap();
    assert_eq!(
        owners(&p, "/fieldsV1/f:spec/f:egress"),
        [MANAGER],
        "ownership taken back"
    );
    eventually("second repair reported", Duration::from_secs(3), || {
        event_count(&server, "NetworkPolicyRepaired", "tenant-a") == 2
    })
    .await;

    // Taken over by another field manager with server-side apply (kubectl apply
    // --server-side --force-conflicts), changing policyTypes.
    let api: Api<NetworkPolicy> = Api::namespaced(kubectl.clone(), "tenant-a");
    let takeover = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": POLICY, "namespace": "tenant-a"},
                          "spec": {"policyTypes": ["Ingress", "Egress"]}});
    api.patch(
        POLICY,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(&takeover),
    )
    .await
    .unwrap();
    eventually("takeover repaired", Duration::from_secs(3), || {
        policy(&server, "tenant-a").is_some_and(|p| {
            p["spec"]["policyTypes"] == json!(["Egress"])
                && owners(&p, "/fieldsV1/f:spec/f:policyTypes") == [MANAGER]
        })
    })
    .await;
    eventually("third repair reported", Duration::from_secs(3), || {
        event_count(&server, "NetworkPolicyRepaired", "tenant-a") == 3
    })
    .await;

    // The same values applied by someone else: shared ownership, no drift, no write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mark = server.requests().len();
    let same = serde_json::to_value(provision::desired_policy(
        "tenant-a",
        POLICY,
        &config("").blocklist(),
        false,
    ))
    .unwrap();
    api.patch(POLICY, &PatchParams::apply("argocd"), &Patch::Apply(&same))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ours: Vec<_> = server
        .requests()
        .into_iter()
        .skip(mark)
        .filter(|r| {
            is_write(r)
                && r.resource.as_deref() == Some("networkpolicies")
                && r.param("fieldManager").as_deref() == Some(MANAGER)
        })
        .collect();
    assert!(
        ours.is_empty(),
        "no repair for an equal co-owned policy: {ours:?}"
    );
    assert_eq!(event_count(&server, "NetworkPolicyRepaired", "tenant-a"), 3);

    // Leaving the environment set: our policy goes, the tenant's stays.
    create_foreign(&kubectl, &tenant_policy("tenant-b", "other", "10.0.0.0/8")).await;
    server.set_namespace_labels("tenant-b", &[]);
    eventually(
        "our policy removed from tenant-b",
        Duration::from_secs(3),
        || policy(&server, "tenant-b").is_none(),
    )
    .await;
    assert!(server
        .get(Kind::NetworkPolicy, Some("tenant-b"), "other")
        .is_some());
    eventually(
        "tenant-b dropped from the states",
        Duration::from_secs(3),
        || !agent.states.snapshot().contains_key("tenant-b"),
    )
    .await;

    // Nothing but our own object was ever written or deleted by the agent (its writes are
    // applies as `datalab-guard` and deletes; the test's own go through `kubectl-*` managers);
    // the lookalike and the tenant's policies are as their owners left them.
    let foreign_writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| is_write(r) && r.resource.as_deref() == Some("networkpolicies"))
        .filter(|r| r.method == "DELETE" || r.param("fieldManager").as_deref() == Some(MANAGER))
        .filter(|r| r.name.as_deref() != Some(POLICY))
        .collect();
    assert!(foreign_writes.is_empty(), "{foreign_writes:?}");
    assert!(
        policy(&server, "plain").is_some(),
        "a lookalike we did not create is never deleted"
    );
    let now = server
        .get(Kind::NetworkPolicy, Some("tenant-a"), "notebook-egress")
        .unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"],
        own["metadata"]["resourceVersion"]
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn except_lists_follow_the_blocked_set_and_the_stack() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let blocked = "blocked:\n  cidrs: [\"100.100.100.200\", \"fd20:ce::254\"]\n";

    // dualStack: true — IPv4 and IPv6 rules, each with its own exceptions.
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config(&format!("{blocked}networkPolicy:\n  dualStack: true\n")),
    )
    .await;
    eventually("provisioned", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    })
    .await;
    let mut blocks = ip_blocks(&policy(&server, "tenant-a").unwrap());
    blocks.sort();
    assert_eq!(
        blocks,
        vec![
            (
                "0.0.0.0/0".to_owned(),
                vec![
                    "100.100.100.200/32".to_owned(),
                    "169.254.169.254/32".to_owned()
                ]
            ),
            (
                "::/0".to_owned(),
                vec![
                    "fd00:ec2::254/128".to_owned(),
                    "fd20:ce::254/128".to_owned()
                ]
            ),
        ]
    );
    assert!(has_in_cluster_rule(&policy(&server, "tenant-a").unwrap()));
    agent.stop().await;

    // dualStack: false — IPv4 only; the running policy is updated (not a repair).
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config(&format!("{blocked}networkPolicy:\n  dualStack: false\n")),
    )
    .await;
    eventually("IPv4 only", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some_and(|p| ip_blocks(&p).len() == 1)
    })
    .await;
    assert_eq!(
        ip_blocks(&policy(&server, "tenant-a").unwrap())[0],
        (
            "0.0.0.0/0".to_owned(),
            vec![
                "100.100.100.200/32".to_owned(),
                "169.254.169.254/32".to_owned()
            ]
        )
    );
    assert!(has_in_cluster_rule(&policy(&server, "tenant-a").unwrap()));
    agent.stop().await;

    // auto: IPv4-only Nodes → IPv4 rule; a dual-stack Node → the IPv6 rule too.
    server.apply_node("node-1", &["10.244.1.0/24"]);
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config("networkPolicy:\n  dualStack: auto\n"),
    )
    .await;
    eventually("leader", Duration::from_secs(5), || agent.leader()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ip_blocks(&policy(&server, "tenant-a").unwrap()).len(), 1);
    agent.stop().await;
    server.apply_node("node-2", &["10.244.2.0/24", "fd00:10:244:2::/64"]);
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config("networkPolicy:\n  dualStack: auto\n"),
    )
    .await;
    eventually("dual-stack detected", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some_and(|p| ip_blocks(&p).len() == 2)
    })
    .await;
    agent.stop().await;
    // None of these configuration changes was reported as a repair.
    assert_eq!(event_count(&server, "NetworkPolicyRepaired", "tenant-a"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_security_is_reported_and_optionally_labelled() {
    let server = FakeApiServer::start();
    // setLabel needs the psa-labels component's grant (namespaces patch).
    server.use_rbac_variant("base_psa-labels");
    server.apply_namespace("none", &[ENV]);
    server.apply_namespace("weak", &[ENV, (ENFORCE, "privileged")]);
    server.apply_namespace("strong", &[ENV, (ENFORCE, "restricted")]);
    server.apply_namespace("not-env", &[]);

    // Report only (setLabel false, level baseline).
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config("networkPolicy:\n  dualStack: false\n"),
    )
    .await;
    eventually("reports", Duration::from_secs(5), || {
        let states = agent.states.snapshot();
        event_count(&server, "PodSecurityTooWeak", "none") == 1
            && event_count(&server, "PodSecurityTooWeak", "weak") == 1
            && ["none", "weak", "strong"]
                .iter()
                .all(|ns| states.get(*ns).is_some_and(|s| s.psa.is_some()))
    })
    .await;
    let states = agent.states.snapshot();
    assert_eq!(
        states["none"]
            .psa
            .as_ref()
            .map(|p| (p.enforce.clone(), p.sufficient)),
        Some((None, false))
    );
    assert_eq!(
        states["weak"]
            .psa
            .as_ref()
            .map(|p| (p.enforce.clone(), p.sufficient)),
        Some((Some("privileged".into()), false))
    );
    assert_eq!(
        states["strong"].psa.as_ref().map(|p| p.sufficient),
        Some(true)
    );
    assert!(!states.contains_key("not-env"));
    let note = server
        .events()
        .into_iter()
        .find(|e| e["reason"] == "PodSecurityTooWeak" && e["regarding"]["name"] == "weak")
        .unwrap()["note"]
        .clone();
    assert!(
        note.as_str()
            .unwrap()
            .contains("privileged is weaker than the required baseline"),
        "{note}"
    );
    // Once per change: unrelated activity does not repeat it; a new weak value does.
    server.set_namespace_labels("weak", &[ENV, (ENFORCE, "privileged"), ("team", "x")]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(event_count(&server, "PodSecurityTooWeak", "weak"), 1);
    server.set_namespace_labels("weak", &[ENV, (ENFORCE, "bogus")]);
    eventually("new weakness reported", Duration::from_secs(3), || {
        event_count(&server, "PodSecurityTooWeak", "weak") == 2
    })
    .await;
    assert_eq!(event_count(&server, "PodSecurityTooWeak", "strong"), 0);
    assert_eq!(
        server.get(Kind::Namespace, None, "none").unwrap()["metadata"]["labels"].get(ENFORCE),
        None,
        "report only"
    );
    agent.stop().await;

    // setLabel: the leader applies the two labels it owns; stronger levels are left alone.
    let mut agent = InProc::start(&server, "node-1", true, &config("networkPolicy:\n  dualStack: false\npodSecurity:\n  level: baseline\n  setLabel: true\n")).await;
    for ns in ["none", "weak"] {
        eventually("label set", Duration::from_secs(5), || {
            let labels =
                server.get(Kind::Namespace, None, ns).unwrap()["metadata"]["labels"].clone();
            labels[ENFORCE] == "baseline" && labels[ENFORCE_VERSION] == "latest"
        })
        .await;
        let obj = server.get(Kind::Namespace, None, ns).unwrap();
        assert_eq!(
            owners(
                &obj,
                &format!(
                    "/fieldsV1/f:metadata/f:labels/f:{}",
                    ENFORCE.replace('/', "~1")
                )
            ),
            [MANAGER]
        );
        // Only those two labels are ours.
        assert!(owners(
            &obj,
            "/fieldsV1/f:metadata/f:labels/f:datalab.io~1environment"
        )
        .iter()
        .all(|m| m != MANAGER));
    }
    assert_eq!(
        server.get(Kind::Namespace, None, "strong").unwrap()["metadata"]["labels"][ENFORCE],
        "restricted"
    );
    assert!(
        server.get(Kind::Namespace, None, "not-env").unwrap()["metadata"]["labels"]
            .get(ENFORCE)
            .is_none()
    );
    eventually("states follow", Duration::from_secs(3), || {
        agent
            .states
            .snapshot()
            .get("none")
            .and_then(|s| s.psa.clone())
            .is_some_and(|p| p.sufficient)
    })
    .await;
    let writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| is_write(r) && r.resource.as_deref() == Some("namespaces"))
        .collect();
    assert!(
        writes
            .iter()
            .all(|r| r.param("fieldManager").as_deref() == Some(MANAGER)
                && r.content_type
                    .as_deref()
                    .unwrap_or("")
                    .starts_with("application/apply-patch")),
        "{writes:?}"
    );
    assert!(
        writes
            .iter()
            .all(|r| r.name.as_deref() != Some("strong") && r.name.as_deref() != Some("not-env")),
        "{writes:?}"
    );
    agent.stop().await;
}

/// The most writes in any window of `window` starting at a write, and the time from the
/// first write to the last.
fn busiest_window(times: &[Instant], window: Duration) -> (usize, Duration) {
    let most = times
        .iter()
        .map(|t0| {
            times
                .iter()
                .filter(|t| **t >= *t0 && **t - *t0 < window)
                .count()
        })
        .max()
        .unwrap_or(0);
    let span = match (times.first(), times.last()) {
        (Some(first), Some(last)) => *last - *first,
        _ => Duration::ZERO,
    };
    (most, span)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_respects_the_write_limit() {
    // 30 environments with no Pod Security label and setLabel on: per namespace a policy
    // apply, a PodSecurityTooWeak Event and a label apply, 90 writes or more; at 20 writes/s
    // with a burst of 5 that is at least (90 - 5) / 20 = 4.25 s.
    const ENVIRONMENTS: usize = 30;
    const RATE: usize = 20;
    const BURST: usize = 5;
    let server = FakeApiServer::start();
    // setLabel writes namespace labels: the RBAC of the psa-labels component grants that.
    server.use_rbac_variant("base_psa-labels");
    server.seed_namespaces((0..ENVIRONMENTS).map(|i| (format!("env-{i}"), vec![ENV])));
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config(&format!(
            "networkPolicy:\n  dualStack: false\npodSecurity:\n  setLabel: true\n\
             audit:\n  eventsPerMinutePerNode: 600\n\
             controller:\n  writesPerSecond: {RATE}\n  writeBurst: {BURST}\n"
        )),
    )
    .await;
    eventually("leader", Duration::from_secs(5), || agent.leader()).await;
    eventually(
        "every environment provisioned and labelled",
        Duration::from_secs(30),
        || {
            (0..ENVIRONMENTS).all(|i| {
                let ns = format!("env-{i}");
                policy(&server, &ns).is_some()
                    && server
                        .get(Kind::Namespace, None, &ns)
                        .is_some_and(|n| n["metadata"]["labels"][ENFORCE] == "baseline")
            })
        },
    )
    .await;
    // Let the Events of the last namespaces land too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.stop().await;

    let writes: Vec<_> = server
        .traffic()
        .into_iter()
        .filter(|t| t.is_write() && t.resource.as_deref() != Some("leases"))
        .collect();
    let kinds = |resource: &str| {
        writes
            .iter()
            .filter(|t| t.resource.as_deref() == Some(resource))
            .count()
    };
    let (policies, namespaces, events) = (
        kinds("networkpolicies"),
        kinds("namespaces"),
        kinds("events"),
    );
    assert!(
        policies >= ENVIRONMENTS && namespaces >= ENVIRONMENTS && events >= ENVIRONMENTS,
        "every kind of write was made: {policies} policy, {namespaces} namespace, {events} Event writes"
    );
    let times: Vec<Instant> = writes.iter().map(|t| t.at).collect();
    let (most, span) = busiest_window(&times, Duration::from_secs(1));
    eprintln!(
        "{} writes over {span:?}; at most {most} in one second (limit {RATE}/s, burst {BURST})",
        times.len()
    );
    // A token bucket lets through at most burst + rate x window in any window; one write of
    // slack for requests that arrive closer together than their slots (network jitter).
    assert!(most <= BURST + RATE + 1, "{most} writes within one second");
    let floor = Duration::from_secs_f64((times.len() - BURST) as f64 / RATE as f64);
    assert!(
        span >= floor.mul_f64(0.95),
        "{} writes took {span:?}, less than the {floor:?} the limit allows",
        times.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassing_policies_are_reported_and_left_alone() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let kubectl = admin_client(&server).await;
    let mut agent = InProc::start(
        &server,
        "node-1",
        true,
        &config("networkPolicy:\n  dualStack: false\n"),
    )
    .await;
    eventually("provisioned", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    })
    .await;
    eventually("ok", Duration::from_secs(3), || {
        agent.policy_state("tenant-a") == Some(PolicyState::Ok)
    })
    .await;

    // Our own policy, in-cluster rule included, is not a bypass — and not only because the
    // detector skips our name: a tenant's copy of it under another name passes too.
    let ours = policy(&server, "tenant-a").unwrap();
    assert!(has_in_cluster_rule(&ours));
    let copy: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "copy-of-baseline", "namespace": "tenant-a"},
        "spec": ours["spec"],
    }))
    .unwrap();
    create_foreign(&kubectl, &copy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.policy_state("tenant-a"), Some(PolicyState::Ok));
    assert!(agent.states.snapshot()["tenant-a"].bypassed_by.is_empty());
    assert_eq!(event_count(&server, "MetadataBypassPolicy", "tenant-a"), 0);

    // A policy that stays clear of metadata is fine.
    create_foreign(&kubectl, &tenant_policy("tenant-a", "to-10", "10.0.0.0/8")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.policy_state("tenant-a"), Some(PolicyState::Ok));

    // "Let the notebook reach the internet": reopens 169.254.169.254.
    let open = create_foreign(
        &kubectl,
        &tenant_policy("tenant-a", "internet", "0.0.0.0/0"),
    )
    .await;
    eventually("bypassed", Duration::from_secs(3), || {
        agent.policy_state("tenant-a") == Some(PolicyState::Bypassed)
    })
    .await;
    assert_eq!(
        agent.states.snapshot()["tenant-a"].bypassed_by,
        ["internet"]
    );
    eventually("reported", Duration::from_secs(3), || {
        event_count(&server, "MetadataBypassPolicy", "tenant-a") == 1
    })
    .await;
    let ev = server
        .events()
        .into_iter()
        .find(|e| e["reason"] == "MetadataBypassPolicy")
        .unwrap();
    assert!(ev["note"].as_str().unwrap().contains("internet"), "{ev}");
    // In the namespace concerned, where its tenants see it (not in `default`).
    assert_eq!(ev["metadata"]["namespace"], "tenant-a", "{ev}");
    assert_eq!(ev["regarding"]["kind"], "Namespace", "{ev}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        event_count(&server, "MetadataBypassPolicy", "tenant-a"),
        1,
        "once per change"
    );
    // Never touched.
    let now = server
        .get(Kind::NetworkPolicy, Some("tenant-a"), "internet")
        .unwrap();
    assert_eq!(
        now["metadata"]["resourceVersion"],
        open["metadata"]["resourceVersion"]
    );
    assert!(!server
        .requests()
        .iter()
        .any(|r| is_write(r) && r.name.as_deref() == Some("internet")));

    // Fixed by the tenant: back to ok.
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), "internet");
    eventually("ok again", Duration::from_secs(3), || {
        agent.policy_state("tenant-a") == Some(PolicyState::Ok)
    })
    .await;
    assert!(agent.states.snapshot()["tenant-a"].bypassed_by.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_standbys_still_know_the_state() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    server.apply_namespace("tenant-b", &[ENV]);
    let cfg = config("networkPolicy:\n  dualStack: false\n");
    let mut leader = InProc::start(&server, "node-1", true, &cfg).await;
    eventually("node-1 leads", Duration::from_secs(5), || leader.leader()).await;
    let mut standby = InProc::start(&server, "node-2", false, &cfg).await;

    for ns in ["tenant-a", "tenant-b"] {
        eventually("provisioned", Duration::from_secs(5), || {
            policy(&server, ns).is_some()
        })
        .await;
        eventually("the standby sees it ok", Duration::from_secs(3), || {
            standby.policy_state(ns) == Some(PolicyState::Ok)
        })
        .await;
    }
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    eventually("repaired", Duration::from_secs(3), || {
        policy(&server, "tenant-a").is_some()
    })
    .await;
    server.apply_namespace("tenant-c", &[ENV, (ENFORCE, "privileged")]);
    eventually("provisioned", Duration::from_secs(3), || {
        policy(&server, "tenant-c").is_some()
    })
    .await;
    eventually("PSA reported", Duration::from_secs(3), || {
        event_count(&server, "PodSecurityTooWeak", "tenant-c") == 1
    })
    .await;
    assert!(!standby.leader());
    let standby_writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| sent_with(r, false) && is_write(r))
        .collect();
    assert!(
        standby_writes.is_empty(),
        "the standby wrote: {standby_writes:?}"
    );

    // The leader stops: the standby takes over at once (released lease).
    leader.stop().await;
    eventually("node-2 took over", Duration::from_secs(3), || {
        standby.leader()
    })
    .await;
    standby.stop().await;
    // Report only (networkPolicy.manage: false): states, no writes.
    let mut cfg_off = cfg.clone();
    cfg_off.network_policy.manage = false;
    let mut standby2 = InProc::start(&server, "node-3", false, &cfg_off).await;
    eventually("node-3 leads", Duration::from_secs(6), || standby2.leader()).await;
    server.clear_requests();
    server.delete(Kind::NetworkPolicy, Some("tenant-b"), POLICY);
    eventually("missing", Duration::from_secs(3), || {
        standby2.policy_state("tenant-b") == Some(PolicyState::Missing)
    })
    .await;
    let p = policy(&server, "tenant-a").unwrap();
    let mut edited = p.clone();
    edited["spec"]["egress"] = json!([{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]);
    server.apply_object(Kind::NetworkPolicy, edited);
    eventually("drifted", Duration::from_secs(3), || {
        standby2.policy_state("tenant-a") == Some(PolicyState::Drifted)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        policy(&server, "tenant-b").is_none(),
        "manage: false never writes"
    );
    assert!(!server
        .requests()
        .iter()
        .any(|r| is_write(r) && r.resource.as_deref() == Some("networkpolicies")));
    standby2.stop().await;
}

// ---------------------------------------------------------------------------------------
// The real binary: several `datalab-guard controller` processes against one fixture (no
// root needed: a controller touches nothing in the kernel), and node agents beside them.

/// One controller replica: its identity, metrics port and process.
struct BinController {
    name: String,
    agent: Option<Agent>,
    metrics: SocketAddr,
}

/// How to run one candidate process.
#[derive(Clone, Debug)]
struct Launch<'a> {
    name: &'a str,
    /// With the ServiceAccount's first token, else [`REPLICA_TOKEN`] (see the module docs).
    token: bool,
    /// libfaketime offset of the process's wall clock (`+10m`, `-10m`); its monotonic clock
    /// stays true (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a node whose NTP is off.
    skew: Option<&'a str>,
}

impl<'a> Launch<'a> {
    fn new(name: &'a str, token: bool) -> Launch<'a> {
        Launch {
            name,
            token,
            skew: None,
        }
    }

    fn skewed(self, offset: &'a str) -> Launch<'a> {
        Launch {
            skew: Some(offset),
            ..self
        }
    }
}

/// Debian's libfaketime (package `faketime`, installed by `cargo xtask setup`).
fn faketime_lib() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found in {candidates:?}: run `cargo xtask setup` (Debian package faketime)")
        })
}

/// The command line of a candidate: `datalab-guard controller` (flags: --identity,
/// --kubeconfig, --config, --metrics-addr).
fn candidate_args(c: &BinController, kubeconfig: &Path, config: &Path) -> Vec<String> {
    vec![
        "controller".to_owned(),
        "--identity".into(),
        c.name.clone(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--metrics-addr".into(),
        c.metrics.to_string(),
    ]
}

/// Writes the kubeconfig and config of `name` into `dir`.
fn write_inputs(
    dir: &Path,
    name: &str,
    kubeconfig_yaml: &str,
    config_yaml: &str,
) -> (PathBuf, PathBuf) {
    let kubeconfig = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&kubeconfig, kubeconfig_yaml).unwrap();
    let config = dir.join(format!("config-{name}.yaml"));
    std::fs::write(&config, config_yaml).unwrap();
    (kubeconfig, config)
}

impl BinController {
    fn start(
        server: &FakeApiServer,
        dir: &Path,
        name: &str,
        token: bool,
        config_yaml: &str,
    ) -> BinController {
        BinController::launch(server, dir, &Launch::new(name, token), config_yaml)
    }

    /// Starts the process and waits for `/readyz` (caches synced: leader or not).
    fn launch(
        server: &FakeApiServer,
        dir: &Path,
        how: &Launch<'_>,
        config_yaml: &str,
    ) -> BinController {
        let mut c = BinController::spawn(server, dir, how, config_yaml);
        let metrics = c.metrics;
        c.agent()
            .wait_ready(metrics, Duration::from_secs(30))
            .expect("controller ready");
        c
    }

    /// Starts the process without waiting for it.
    fn spawn(
        server: &FakeApiServer,
        dir: &Path,
        how: &Launch<'_>,
        config_yaml: &str,
    ) -> BinController {
        let (kubeconfig, config) = write_inputs(
            dir,
            how.name,
            &controller_kubeconfig(server, how.token),
            config_yaml,
        );
        let mut c = BinController {
            name: how.name.to_owned(),
            agent: None,
            metrics: free_loopback_addr().unwrap(),
        };
        let args = candidate_args(&c, &kubeconfig, &config);
        let preload = how.skew.map(|_| faketime_lib().display().to_string());
        let mut env = vec![("POD_NAME", ""), ("POD_NAMESPACE", "")];
        if let (Some(offset), Some(lib)) = (how.skew, preload.as_deref()) {
            env.extend([
                ("LD_PRELOAD", lib),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ]);
        }
        c.agent = Some(
            Agent::spawn_with(&Agent::bin().expect("agent binary"), &args, &env)
                .expect("spawn controller"),
        );
        c
    }

    /// How far the process's wall clock is from ours, read from the timestamp of its first
    /// log line (proof that a skew took effect).
    fn clock_offset(&self) -> Option<SignedDuration> {
        let lines = self.agent.as_ref()?.stderr_lines();
        let first = lines.first()?;
        let plain = strip_ansi(first);
        let stamp: Timestamp = plain.split_whitespace().next()?.parse().ok()?;
        Some(stamp.duration_since(Timestamp::now()))
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent")
    }

    fn log_has(&self, needle: &str) -> bool {
        self.agent
            .as_ref()
            .is_some_and(|a| a.stderr_lines().iter().any(|l| l.contains(needle)))
    }

    fn log_count(&self, needle: &str) -> usize {
        self.agent.as_ref().map_or(0, |a| {
            a.stderr_lines()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
        })
    }

    /// `datalab_guard_leader{identity="<name>"}` as scraped now.
    fn leader_gauge(&self) -> Option<f64> {
        let text = self.agent.as_ref()?.metrics(self.metrics).ok()?;
        let prefix = format!("datalab_guard_leader{{identity=\"{}\"}} ", self.name);
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    fn readyz(&self) -> Option<u16> {
        http_get(self.metrics, "/readyz", Duration::from_millis(500))
            .ok()
            .map(|r| r.status)
    }
}

impl Drop for BinController {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(a) = &self.agent {
                let lines = a.stderr_lines();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "---- {} stderr (last {} lines) ----\n{}",
                    self.name,
                    tail.len(),
                    tail.join("\n")
                );
            }
        }
        self.agent.take();
    }
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dg-prov-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bin_config(extra: &str) -> String {
    format!("{LEADER_ELECTION}networkPolicy:\n  dualStack: false\n{extra}")
}

fn sync_client(server: &FakeApiServer) -> (tokio::runtime::Runtime, Client) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = rt.block_on(admin_client(server));
    (rt, c)
}

#[test]
fn controllers_elect_one_writer_and_hand_over_when_the_leader_is_killed() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("kill");
    let cfg = bin_config("");
    // ctl-1 starts first and takes the Lease; ctl-2 has the replica token (see module docs).
    let mut c1 = BinController::start(&server, &dir.0, "ctl-1", true, &cfg);
    eventually_sync("ctl-1 leads", Duration::from_secs(10), || {
        lease_holder(&server).as_deref() == Some("ctl-1")
    });
    let mut c2 = BinController::start(&server, &dir.0, "ctl-2", false, &cfg);
    let (rt, kubectl) = sync_client(&server);
    // Both are ready (caches synced); leadership shows in the gauge, not in readiness.
    assert_eq!((c1.readyz(), c2.readyz()), (Some(200), Some(200)));
    eventually_sync("leader gauges", Duration::from_secs(5), || {
        c1.leader_gauge() == Some(1.0) && c2.leader_gauge() == Some(0.0)
    });

    // Provisioning when a namespace becomes an environment.
    eventually_sync("provisioned in tenant-a", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });
    server.apply_namespace("tenant-b", &[ENV]);
    eventually_sync("provisioned in tenant-b", Duration::from_secs(5), || {
        policy(&server, "tenant-b").is_some()
    });
    assert_eq!(
        ip_blocks(&policy(&server, "tenant-b").unwrap()),
        vec![(
            "0.0.0.0/0".to_owned(),
            vec!["169.254.169.254/32".to_owned()]
        )]
    );
    assert!(has_in_cluster_rule(&policy(&server, "tenant-b").unwrap()));

    // Repair after delete and after a foreign edit; a tenant policy next to ours untouched.
    let own = rt.block_on(create_foreign(
        &kubectl,
        &tenant_policy("tenant-a", "notebook-egress", "10.0.0.0/8"),
    ));
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    eventually_sync("repaired after delete", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    });
    rt.block_on(foreign_merge(
        &kubectl,
        "tenant-a",
        POLICY,
        "kubectl-edit",
        json!({"spec": {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}),
    ));
    eventually_sync(
        "repaired after a foreign edit",
        Duration::from_secs(5),
        || {
            policy(&server, "tenant-a").is_some_and(|p| {
                ip_blocks(&p)[0].1 == ["169.254.169.254/32"]
                    && owners(&p, "/fieldsV1/f:spec/f:egress") == [MANAGER]
            })
        },
    );
    eventually_sync("both repairs reported", Duration::from_secs(5), || {
        event_count(&server, "NetworkPolicyRepaired", "tenant-a") == 2
    });
    // The Event can reach the fixture before the test has read the log line that goes
    // with it.
    eventually_sync("a log line for each repair", Duration::from_secs(5), || {
        c1.log_has("NetworkPolicy repaired")
    });
    assert_eq!(
        server
            .get(Kind::NetworkPolicy, Some("tenant-a"), "notebook-egress")
            .unwrap()["metadata"]["resourceVersion"],
        own["metadata"]["resourceVersion"]
    );

    // Removal when a namespace leaves the environment set.
    server.set_namespace_labels("tenant-b", &[]);
    eventually_sync("removed from tenant-b", Duration::from_secs(5), || {
        policy(&server, "tenant-b").is_none()
    });

    // Only the leader wrote: ctl-2 (replica token) sent no write at all — no policy, namespace,
    // Event or Lease write — while ctl-1's lease was valid.
    let requests = server.requests();
    let standby_writes: Vec<_> = requests
        .iter()
        .filter(|r| sent_with(r, false) && is_write(r))
        .collect();
    assert!(standby_writes.is_empty(), "ctl-2 wrote: {standby_writes:?}");
    assert!(
        requests.iter().any(|r| sent_with(r, false)
            && r.resource.as_deref() == Some("networkpolicies")
            && r.is_watch()),
        "ctl-2 watches the policies too"
    );
    assert!(
        requests.iter().any(|r| sent_with(r, false)
            && r.resource.as_deref() == Some("leases")
            && r.verb == "get"),
        "ctl-2 stands by on the Lease"
    );
    let leader_np_writes = requests
        .iter()
        .filter(|r| {
            sent_with(r, true) && is_write(r) && r.resource.as_deref() == Some("networkpolicies")
        })
        .count();
    assert!(
        leader_np_writes >= 4,
        "ctl-1 provisioned, repaired and removed: {leader_np_writes} writes"
    );

    // kill -9 the leader: ctl-2 takes over within TAKEOVER_WITHIN, then repairs.
    c1.agent().kill9().unwrap();
    let t0 = Instant::now();
    let took = eventually_sync("ctl-2 takes over", Duration::from_secs(8), || {
        lease_holder(&server).as_deref() == Some("ctl-2")
    });
    eprintln!("leader killed -> ctl-2 holds the lease after {took:?}");
    assert!(took <= TAKEOVER_WITHIN, "takeover took {took:?}");
    // The log line follows the Lease write; give the pipe a moment.
    eventually_sync("the transition is logged", Duration::from_secs(3), || {
        c2.log_has("became the leader")
    });
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    let repaired = eventually_sync("ctl-2 repairs", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    });
    eprintln!(
        "repaired by the new leader {repaired:?} after the delete ({:?} after the kill)",
        t0.elapsed()
    );
    eventually_sync("reported by ctl-2", Duration::from_secs(5), || {
        events_by(&server, "NetworkPolicyRepaired", "ctl-2") >= 1
    });
    assert!(c2.agent().try_status().is_none(), "ctl-2 still running");
    assert_eq!(c2.leader_gauge(), Some(1.0));
}

/// Watches the Lease for `how_long`: it must stay with `holder` after `transitions`
/// transitions the whole time.
fn lease_stays(server: &FakeApiServer, holder: &str, transitions: i64, how_long: Duration) {
    let start = Instant::now();
    let mut renewals = std::collections::BTreeSet::new();
    while start.elapsed() < how_long {
        let lease = server
            .get(Kind::Lease, Some(LEASE_NS), LEASE)
            .expect("lease");
        let spec = &lease["spec"];
        assert_eq!(
            (
                spec["holderIdentity"].as_str(),
                spec["leaseTransitions"].as_i64()
            ),
            (Some(holder), Some(transitions)),
            "the lease changed hands after {:?}: {spec}",
            start.elapsed()
        );
        renewals.insert(spec["renewTime"].to_string());
        std::thread::sleep(Duration::from_millis(25));
    }
    // The holder kept renewing all along (so the others had a live record to watch).
    let expected = (how_long.as_millis() / RETRY_PERIOD.as_millis()) as usize / 2;
    assert!(
        renewals.len() >= expected,
        "{holder} renewed only {} times in {how_long:?}",
        renewals.len()
    );
}

/// Lease writes (create, update, patch, delete) in the request log, from the agent with the
/// first token (`true`) or the replica token.
fn lease_writes(server: &FakeApiServer, token: bool) -> Vec<RequestLog> {
    server
        .requests()
        .into_iter()
        .filter(|r| sent_with(r, token) && r.resource.as_deref() == Some("leases") && is_write(r))
        .collect()
}

fn lease_renew_time(server: &FakeApiServer) -> Timestamp {
    server
        .get(Kind::Lease, Some(LEASE_NS), LEASE)
        .expect("lease")["spec"]["renewTime"]
        .as_str()
        .expect("renewTime")
        .parse()
        .expect("renewTime parses")
}

fn minutes_between(offset: SignedDuration, low: i64, high: i64) -> bool {
    offset >= SignedDuration::from_mins(low) && offset <= SignedDuration::from_mins(high)
}

/// Candidates whose wall clocks are 10 minutes off, against one fixture: expiry is judged
/// by each candidate's own observation of the Lease, so a skewed leader keeps it, a skewed
/// standby does not steal it, and each still takes over a dead leader's lease in time.
#[test]
fn skewed_clocks_neither_steal_nor_lose_the_lease() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("skew");
    let cfg = bin_config("");
    let hold = LEASE_DURATION * 4;

    // A leader whose clock is 10 minutes behind: the renewTime it writes looks long expired
    // to everyone else.
    let mut c1 = BinController::launch(
        &server,
        &dir.0,
        &Launch::new("ctl-1", true).skewed("-10m"),
        &cfg,
    );
    eventually_sync("ctl-1 leads", Duration::from_secs(10), || {
        lease_holder(&server).as_deref() == Some("ctl-1")
    });
    let behind = lease_renew_time(&server).duration_since(Timestamp::now());
    assert!(
        minutes_between(behind, -11, -9),
        "ctl-1's renewTime is {behind:?} from now: is libfaketime in effect?"
    );
    // A healthy standby does not take it from the skewed leader.
    let c2 = BinController::start(&server, &dir.0, "ctl-2", false, &cfg);
    lease_stays(&server, "ctl-1", 0, hold);
    let stolen = lease_writes(&server, false);
    assert!(stolen.is_empty(), "ctl-2 wrote the Lease: {stolen:?}");
    assert!(c2.log_has("standing by"), "ctl-2 saw the leader");

    // kill -9: the healthy standby takes over in time.
    c1.agent().kill9().unwrap();
    let took = eventually_sync("ctl-2 takes over", Duration::from_secs(8), || {
        lease_holder(&server).as_deref() == Some("ctl-2")
    });
    eprintln!("skewed leader killed -> ctl-2 leads after {took:?}");
    assert!(took <= TAKEOVER_WITHIN, "takeover took {took:?}");
    drop(c1);

    // A standby whose clock is 10 minutes ahead: ctl-2's renewTime looks 10 minutes old to
    // it. It gets the token now that ctl-1 (which had it) is gone.
    server.clear_requests();
    let mut c3 = BinController::launch(
        &server,
        &dir.0,
        &Launch::new("ctl-3", true).skewed("+10m"),
        &cfg,
    );
    let ahead = c3.clock_offset().expect("ctl-3 logged a timestamp");
    assert!(
        minutes_between(ahead, 9, 11),
        "ctl-3's clock is {ahead:?} from ours: is libfaketime in effect?"
    );
    lease_stays(&server, "ctl-2", 1, hold);
    let stolen = lease_writes(&server, true);
    assert!(stolen.is_empty(), "ctl-3 wrote the Lease: {stolen:?}");
    // Only Lease reads from ctl-3, and it did read.
    assert!(server
        .requests()
        .iter()
        .any(|r| sent_with(r, true) && r.resource.as_deref() == Some("leases") && r.verb == "get"));

    // kill -9 the healthy leader: the skewed standby takes over in time (neither at once nor
    // ten minutes late), and keeps it.
    let mut c2 = c2;
    c2.agent().kill9().unwrap();
    let took = eventually_sync("ctl-3 takes over", Duration::from_secs(8), || {
        lease_holder(&server).as_deref() == Some("ctl-3")
    });
    eprintln!("healthy leader killed -> skewed ctl-3 leads after {took:?}");
    assert!(
        took >= LEASE_DURATION - RETRY_PERIOD - Duration::from_millis(200),
        "ctl-3 took over before the lease expired: {took:?}"
    );
    assert!(took <= TAKEOVER_WITHIN, "takeover took {took:?}");
    lease_stays(&server, "ctl-3", 2, LEASE_DURATION * 2);
    assert!(c3.agent().try_status().is_none(), "ctl-3 still running");
}

#[test]
fn a_stopping_leader_releases_the_lease_at_once() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("term");
    // A long lease: a handover well under it can only come from the release.
    let cfg = "leaderElection:\n  namespace: datalab-guard\n  leaseDuration: 20s\n  renewDeadline: 10s\n  retryPeriod: 500ms\nnetworkPolicy:\n  dualStack: false\n";
    let mut c1 = BinController::start(&server, &dir.0, "ctl-1", true, cfg);
    eventually_sync("ctl-1 leads", Duration::from_secs(10), || {
        lease_holder(&server).as_deref() == Some("ctl-1")
    });
    let mut c2 = BinController::start(&server, &dir.0, "ctl-2", false, cfg);
    let mut c3 = BinController::start(&server, &dir.0, "ctl-3", false, cfg);
    eventually_sync("provisioned", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });

    c1.agent().sigterm().unwrap();
    let t0 = Instant::now();
    let status = c1.agent().wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "clean exit: {status}");
    let took = eventually_sync("a standby takes over", Duration::from_secs(5), || {
        matches!(lease_holder(&server).as_deref(), Some("ctl-2" | "ctl-3"))
    });
    eprintln!(
        "SIGTERM -> exit after {:?}; standby leads {took:?} after the exit",
        t0.elapsed().saturating_sub(took)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "handover took {:?} (lease 20 s): not released?",
        t0.elapsed()
    );
    assert!(c1.log_has("released the lease"));
    let new_leader = lease_holder(&server).unwrap();
    // The new leader does the work.
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    eventually_sync("repaired by the new leader", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    });
    eventually_sync("reported by the new leader", Duration::from_secs(5), || {
        events_by(&server, "NetworkPolicyRepaired", &new_leader) >= 1
    });
    assert!(c2.agent().try_status().is_none() && c3.agent().try_status().is_none());
}

#[test]
fn dual_stack_and_pod_security_through_the_binary() {
    let server = FakeApiServer::start();
    // setLabel needs the psa-labels component's grant (namespaces patch).
    server.use_rbac_variant("base_psa-labels");
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("psa");
    let cfg = format!("{LEADER_ELECTION}networkPolicy:\n  dualStack: true\npodSecurity:\n  level: restricted\n  setLabel: true\n");
    let _c1 = BinController::start(&server, &dir.0, "ctl-1", true, &cfg);
    eventually_sync("provisioned", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });
    let mut blocks = ip_blocks(&policy(&server, "tenant-a").unwrap());
    blocks.sort();
    assert_eq!(
        blocks,
        vec![
            (
                "0.0.0.0/0".to_owned(),
                vec!["169.254.169.254/32".to_owned()]
            ),
            ("::/0".to_owned(), vec!["fd00:ec2::254/128".to_owned()])
        ]
    );
    assert!(has_in_cluster_rule(&policy(&server, "tenant-a").unwrap()));
    eventually_sync("PSA reported", Duration::from_secs(5), || {
        event_count(&server, "PodSecurityTooWeak", "tenant-a") == 1
    });
    eventually_sync("PSA label set", Duration::from_secs(5), || {
        server.get(Kind::Namespace, None, "tenant-a").unwrap()["metadata"]["labels"][ENFORCE]
            == "restricted"
    });
}

/// Node agents are read-only on cluster state: beside two controllers doing their work
/// (provisioning, repair, removal), a node agent's requests — told apart by its User-Agent —
/// hold no write but Events and its own Node's taint, nothing about Leases or policies, and
/// namespaces only as metadata.
#[test]
fn node_agents_beside_controllers_only_read() {
    if !require_root() {
        return;
    }
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    server.apply_namespace("kube-system", &[]);
    let dir = TempDir::new("ro");
    let cfg = bin_config("");
    let _c1 = BinController::start(&server, &dir.0, "ctl-1", true, &cfg);
    let _c2 = BinController::start(&server, &dir.0, "ctl-2", false, &cfg);

    // A node agent on a fake kubelet cgroup tree, with a pod of its own.
    let cgroup = TestCgroup::new().expect("cgroup");
    let root = cgroup.path().join("kubepods.slice");
    for qos in ["", "kubepods-burstable.slice", "kubepods-besteffort.slice"] {
        std::fs::create_dir_all(root.join(qos)).expect("qos slice");
    }
    server.apply_pod(
        PodBuilder::new("tenant-a", "notebook")
            .node("node-1")
            .build(),
    );
    let bpffs = BpffsDir::new().expect("bpffs");
    let (kubeconfig, config) = write_inputs(
        &dir.0,
        "node-1",
        &server.kubeconfig_yaml_as(Identity::NodeAgent),
        &format!("{cfg}{NO_PROBE}"),
    );
    let metrics = free_loopback_addr().unwrap();
    let args = [
        "node".to_owned(),
        "--node-name".into(),
        "node-1".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--cgroup-root".into(),
        root.display().to_string(),
        "--bpffs".into(),
        bpffs.path().join("guard").display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
        // Never the machine's /run/datalab-guard or /var/lib/datalab-guard.
        "--state-file".into(),
        dir.0.join("node-state.json").display().to_string(),
        "--state-dir".into(),
        dir.0.join("node-state-dir").display().to_string(),
    ];
    let mut node = Agent::spawn_with(&Agent::bin().expect("agent binary"), &args, &[])
        .expect("spawn node agent");
    node.wait_ready(metrics, Duration::from_secs(30))
        .expect("node agent ready");

    // Cluster changes the controllers act on, while the node agent follows them.
    eventually_sync("provisioned", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });
    server.apply_namespace("tenant-b", &[ENV]);
    eventually_sync("provisioned in tenant-b", Duration::from_secs(5), || {
        policy(&server, "tenant-b").is_some()
    });
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    eventually_sync("repaired", Duration::from_secs(5), || {
        policy(&server, "tenant-a").is_some()
    });
    server.set_namespace_labels("tenant-b", &[]);
    eventually_sync("removed", Duration::from_secs(5), || {
        policy(&server, "tenant-b").is_none()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.try_status().is_none(), "node agent still running");
    // The node's metrics no longer carry the controller's networkpolicy_state.
    let text = node.metrics(metrics).unwrap();
    assert!(
        !text.contains("datalab_guard_networkpolicy_state"),
        "{text}"
    );
    assert!(!text.contains("datalab_guard_leader"), "{text}");

    let requests = server.requests();
    let node_requests = requests.iter().filter(|r| r.sent_by("node")).count();
    assert!(
        node_requests > 0,
        "no request recognised as the node agent's"
    );
    assert!(
        requests.iter().any(|r| r.sent_by("controller")
            && r.resource.as_deref() == Some("networkpolicies")
            && r.is_write()),
        "the controllers wrote policies"
    );
    let violations = node_agent_violations(&requests, "node-1");
    assert!(
        violations.is_empty(),
        "node agent requests: {violations:#?}"
    );
    drop(node);
}

/// A controller started while the API server is down waits (not ready, one log line per
/// state change, bounded retries), then syncs, becomes ready and provisions when it appears.
#[test]
fn a_controller_waits_for_the_api_server() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    server.go_down();
    let dir = TempDir::new("down");
    let c = BinController::spawn(
        &server,
        &dir.0,
        &Launch::new("ctl-1", true),
        &bin_config(""),
    );
    eventually_sync("metrics endpoint serves", Duration::from_secs(10), || {
        c.readyz().is_some()
    });
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(c.readyz(), Some(503), "not ready without the API server");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One warning per watch and one for the election while it lasts, not one per retry.
    assert_eq!(c.log_count("watch failed"), 2, "one line per watch");
    assert!(
        c.log_count("leader election: cannot read or write the lease") <= 1,
        "one line for the election"
    );
    assert!(c.log_has("waiting for the first full list"));

    server.come_back();
    let came_back = Instant::now();
    // The watches retry every 4-5 s at most: ready within that bound.
    eventually_sync(
        "ready after the API server returns",
        Duration::from_secs(10),
        || c.readyz() == Some(200),
    );
    eprintln!("API back -> ready after {:?}", came_back.elapsed());
    eventually_sync("provisions once it leads", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });
    assert!(c.log_has("watch recovered") && c.log_has("ready"));
}

/// Bad input: one line naming the problem (the config key), exit 2, nothing contacted.
#[test]
fn controller_bad_input_exits_2() {
    let dir = TempDir::new("bad");
    let cases: Vec<(Vec<String>, String, &str)> = vec![
        (
            vec!["--no-such-flag".into()],
            String::new(),
            "--no-such-flag",
        ),
        (
            vec![],
            "leaderElection:\n  leaseDuration: 1s\n  renewDeadline: 2s\n".into(),
            "leaderElection.leaseDuration",
        ),
        (
            vec![],
            "networkPolicy:\n  dualStack: sometimes\n".into(),
            "networkPolicy.dualStack",
        ),
        (
            vec!["--identity".into(), " ".into()],
            String::new(),
            "--identity",
        ),
    ];
    for (i, (flags, config_yaml, needle)) in cases.into_iter().enumerate() {
        let config = dir.0.join(format!("bad-{i}.yaml"));
        std::fs::write(&config, &config_yaml).unwrap();
        let mut args = vec!["controller".to_owned()];
        if !config_yaml.is_empty() {
            args.extend(["--config".to_owned(), config.display().to_string()]);
        }
        args.extend(flags);
        let out = Agent::run(&args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        if !needle.starts_with("--no-such") {
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        }
    }
}

/// A reload (SIGHUP) with a broken config is rejected and the previous one kept; a good one
/// applies (here: the policy's except list follows a new blocked CIDR).
#[test]
fn controller_reload_rejects_a_bad_config_and_applies_a_good_one() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("reload");
    let cfg = bin_config("");
    let mut c = BinController::start(&server, &dir.0, "ctl-1", true, &cfg);
    eventually_sync("provisioned", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some()
    });
    let config = dir.0.join("config-ctl-1.yaml");
    let pid = c.agent().pid() as i32;
    std::fs::write(&config, format!("{cfg}blocked:\n  cidrs: [not-a-cidr]\n")).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually_sync("bad reload rejected", Duration::from_secs(5), || {
        c.log_has("reloaded configuration rejected; keeping the previous one")
    });
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    eventually_sync(
        "still repairs with the previous config",
        Duration::from_secs(5),
        || {
            policy(&server, "tenant-a")
                .is_some_and(|p| ip_blocks(&p)[0].1 == ["169.254.169.254/32"])
        },
    );
    std::fs::write(
        &config,
        format!("{cfg}blocked:\n  cidrs: [100.100.100.200/32]\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually_sync("good reload applied", Duration::from_secs(10), || {
        policy(&server, "tenant-a").is_some_and(|p| {
            ip_blocks(&p)[0]
                .1
                .contains(&"100.100.100.200/32".to_owned())
        })
    });
    assert!(c.agent().try_status().is_none(), "still running");
}

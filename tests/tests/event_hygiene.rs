//! Event hygiene of a node (`datalab_guard::k8s::events`) against the API server fixture:
//! an attempt storm from 50 pods costs at most the node's Event budget, each pod has one
//! Event series carrying the latest note and count, and per-pod state stays bounded.
//!
//! The storm drives the node's real publisher ([`publish_pod_events`] with [`PodEvents`])
//! directly with attempts attributed to 50 pods, as the node agent's audit stream does,
//! rather than running 50 real pods: what is under test is what reaches the API server.
//! The scenario is a minute of hammering at the default budget (30 Events a minute
//! per node); here it runs 20 s at that budget (no minute can exceed it, so the first 20 s
//! already show the cap), and 30 s at a proportionally scaled budget (5 per 10 s) to show
//! that spent tokens come back and still no window holds more.

use std::time::{Duration, Instant};

use datalab_guard::{
    config::Config,
    k8s::events::{publish_pod_events, EventBudget, PodAttempt, PodEvents, MAX_PODS},
};
use datalab_guard_tests::{
    apiserver::{rbac::Identity, RequestLog},
    FakeApiServer,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config as KubeConfig,
};
use serde_json::Value;
use tokio::sync::mpsc;

const NODE: &str = "node-1";

async fn client(server: &FakeApiServer) -> Client {
    // The node agent's publisher, as its ServiceAccount (RBAC enforced).
    let yaml = server.kubeconfig_yaml_as(Identity::NodeAgent);
    let kubeconfig = Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
    let config = KubeConfig::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

fn attempt(pod: usize, destination: &str) -> PodAttempt {
    PodAttempt {
        namespace: "tenant-a".into(),
        pod: format!("notebook-{pod}"),
        uid: format!("uid-{pod}"),
        container: Some("main".into()),
        destination: destination.into(),
        audited: false,
    }
}

/// Event writes (create, patch) the fixture answered.
fn event_writes(server: &FakeApiServer) -> Vec<RequestLog> {
    server
        .requests()
        .into_iter()
        .filter(|r| {
            r.resource.as_deref() == Some("events")
                && matches!(r.method.as_str(), "POST" | "PUT" | "PATCH")
        })
        .collect()
}

fn pod_events(server: &FakeApiServer) -> Vec<Value> {
    server
        .events()
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "Pod")
        .collect()
}

/// Runs the node's publisher for `storm` while 50 pods each make an attempt every 200 ms
/// (the kernel's default audit rate, 5 per second per cgroup), then lets it flush for
/// `settle`. Returns the attempts sent.
async fn storm(publisher: PodEvents, storm: Duration, settle: Duration) -> u64 {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(publish_pod_events(publisher, rx));
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < storm {
        for pod in 0..50 {
            tx.send(attempt(pod, "169.254.169.254:80")).await.unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the publisher stops when the audit stream ends")
        .unwrap();
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_from_50_pods_costs_at_most_the_node_budget() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[]);
    let defaults = Config::default().audit;
    assert_eq!(defaults.events_per_minute_per_node, 30);
    // Each pod alone would be allowed one Event a second: only the node budget holds.
    let publisher = PodEvents::new(
        client(&server).await,
        NODE,
        60,
        EventBudget::per_minute(defaults.events_per_minute_per_node),
    );
    let sent = storm(publisher, Duration::from_secs(20), Duration::from_secs(6)).await;
    let writes = event_writes(&server);
    eprintln!(
        "{sent} attempts from 50 pods -> {} Event writes",
        writes.len()
    );
    assert!(sent >= 4000, "a real storm: {sent} attempts");
    assert_eq!(
        writes.len(),
        30,
        "at most the budget, and the budget is used: {writes:?}"
    );
    // Each written Event is a pod's own, reported by this node, in the pod's namespace.
    let events = pod_events(&server);
    assert_eq!(events.len(), 30);
    for e in &events {
        assert_eq!(e["reportingInstance"], NODE, "{e}");
        assert_eq!(e["reason"], "MetadataAccessBlocked", "{e}");
        assert_eq!(e["metadata"]["namespace"], "tenant-a", "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_tokens_come_back_and_no_window_holds_more() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[]);
    // 30 a minute, scaled to 5 per 10 s; 30 s of storm and flushing from the first write.
    let publisher = PodEvents::new(
        client(&server).await,
        NODE,
        60,
        EventBudget::new(5, Duration::from_secs(10)),
    );
    // Tokens spent at t1 (the first write, just after the start) come back at t1 + 10 s and
    // t1 + 20 s; the run ends before t1 + 30 s.
    storm(
        publisher,
        Duration::from_secs(24),
        Duration::from_millis(5500),
    )
    .await;
    let writes = event_writes(&server).len();
    eprintln!("{writes} Event writes in 3 windows of 5");
    assert!(writes <= 15, "{writes} writes: more than 5 per 10 s");
    assert!(
        writes >= 10,
        "{writes} writes: spent tokens did not come back"
    );
    // Waiting pods were served oldest first: 50 pods, so every write went to a pod that had
    // no Event yet.
    let events = pod_events(&server);
    assert_eq!(events.len(), writes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_series_per_pod_with_the_latest_note_and_count() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[]);
    let mut publisher =
        PodEvents::new(client(&server).await, NODE, 60, EventBudget::per_minute(30));
    // One attempt now (an Event), three more a second later (the series), then the last
    // one to another destination.
    publisher.record(attempt(7, "169.254.169.254:80")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        publisher.record(attempt(7, "169.254.169.254:80")).await;
    }
    publisher.record(attempt(7, "[fd00:ec2::254]:80")).await;
    // The last two waited for the pod's interval; the flush sends them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publisher.flush().await;

    let events = pod_events(&server);
    assert_eq!(events.len(), 1, "one series: {events:#?}");
    let e = &events[0];
    assert_eq!(e["regarding"]["name"], "notebook-7");
    assert_eq!(e["regarding"]["uid"], "uid-7");
    assert_eq!(e["series"]["count"], 4, "every attempt counted: {e}");
    let note = e["note"].as_str().unwrap();
    assert!(
        note.contains("[fd00:ec2::254]:80")
            && note.contains("2 attempt(s)")
            && note.contains("4 in all"),
        "the latest note: {note}"
    );
    let writes = event_writes(&server);
    let methods: Vec<&str> = writes.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["POST", "PATCH", "PATCH"], "{writes:?}");

    // A series whose Event went away (the API server's event TTL): a new one starts.
    server.delete(
        datalab_guard_tests::apiserver::Kind::EventV1,
        Some("tenant-a"),
        e["metadata"]["name"].as_str().unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publisher.record(attempt(7, "169.254.169.254:80")).await;
    let events = pod_events(&server);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(
        events[0]["series"].is_null(),
        "a fresh Event: {}",
        events[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_state_stays_bounded_under_churn() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[]);
    let mut publisher = PodEvents::new(client(&server).await, NODE, 1, EventBudget::per_minute(1));
    for pod in 0..MAX_PODS + 1000 {
        publisher.record(attempt(pod, "169.254.169.254:80")).await;
        assert!(publisher.tracked_pods() <= MAX_PODS);
    }
    assert!(
        publisher.tracked_pods() > MAX_PODS / 2,
        "only what churn needs goes"
    );
    assert_eq!(event_writes(&server).len(), 1, "the budget held");
}

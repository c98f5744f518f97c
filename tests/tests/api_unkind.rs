//! The real `datalab-guard` binaries (node agent and controller) against an API server that
//! is as unkind as a real one (issue 13, item 9): HTTPS verified with the CA from the
//! kubeconfig (and a wrong CA refused, never a plaintext fallback), 429 Too Many Requests with
//! Retry-After on lists, watch starts and writes, and a watch cache that lags behind etcd
//! (stale `resourceVersion=0` lists, 504 "Too large resource version").
//!
//! The controller tests need no root; the node-agent tests need root (BPF, cgroups) and
//! skip otherwise (`SKIPPED:` from `require_root`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use datalab_guard_tests::{
    apiserver::Kind, free_loopback_addr, http_get, require_root, Agent, BpffsDir, FakeApiServer,
    PodBuilder, RequestLog, TestCgroup,
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use serde_json::Value;

const NODE: &str = "node-1";
const ENV: (&str, &str) = ("datalab.io/environment", "true");
/// The controller's own NetworkPolicy (default `networkPolicy.name`).
const POLICY: &str = "allow-web-egress";
const CONTROLLER_CONFIG: &str = "leaderElection:\n  namespace: kube-system\n  leaseDuration: 3s\n  renewDeadline: 2s\n  retryPeriod: 500ms\nnetworkPolicy:\n  dualStack: false\n";
const PATIENCE: Duration = Duration::from_secs(30);

// ---- harness ----

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "dg-unkind-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `datalab-guard` process that prints its log tail if the test fails.
struct Proc {
    agent: Agent,
    metrics: SocketAddr,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, args: Vec<String>, metrics: SocketAddr) -> Proc {
        Proc {
            agent: Agent::spawn(&args).expect("spawn datalab-guard"),
            metrics,
            name,
        }
    }

    fn wait_ready(&mut self) {
        self.agent
            .wait_ready(self.metrics, PATIENCE)
            .unwrap_or_else(|e| panic!("{} not ready: {e:#}", self.name));
    }

    fn readyz(&self) -> Option<u16> {
        http_get(self.metrics, "/readyz", Duration::from_millis(500))
            .ok()
            .map(|r| r.status)
    }

    fn log(&self) -> Vec<String> {
        self.agent.stderr_lines()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = self.agent.stderr_lines();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- {} stderr (last {}) ----\n{}",
                self.name,
                tail.len(),
                tail.join("\n")
            );
        }
        let _ = self.agent.sigterm();
        let _ = self.agent.wait_exit(Duration::from_secs(10));
    }
}

/// `datalab-guard controller` with `kubeconfig` (no root needed).
fn controller(dir: &TempDir, name: &'static str, kubeconfig: &str) -> Proc {
    let kubeconfig = dir.file(&format!("kubeconfig-{name}"), kubeconfig);
    let config = dir.file(&format!("config-{name}.yaml"), CONTROLLER_CONFIG);
    let metrics = free_loopback_addr().unwrap();
    let args = vec![
        "controller".to_owned(),
        "--identity".into(),
        name.into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
    ];
    Proc::spawn(name, args, metrics)
}

/// A TLS fixture with the environment `tenant-a`, and a ready controller (`ctl-1`) that has
/// provisioned its policy there. The directory holds the controller's files.
fn provisioned_controller(tag: &str) -> (FakeApiServer, TempDir, Proc) {
    let server = FakeApiServer::start_tls();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new(tag);
    let mut ctl = controller(&dir, "ctl-1", &server.kubeconfig_yaml());
    ctl.wait_ready();
    wait_for(PATIENCE, "policy provisioned", || {
        server
            .get(Kind::NetworkPolicy, Some("tenant-a"), POLICY)
            .is_some()
    });
    (server, dir, ctl)
}

/// A node agent on a fake kubelet cgroup tree (systemd driver), needs root.
struct Node {
    proc: Option<Proc>,
    bpffs: BpffsDir,
    root: PathBuf,
    _cgroup: TestCgroup,
}

impl Node {
    fn start(server: &FakeApiServer, dir: &TempDir) -> Node {
        let cgroup = TestCgroup::new().expect("cgroup");
        let root = cgroup.path().join("kubepods.slice");
        std::fs::create_dir_all(root.join("kubepods-besteffort.slice")).expect("qos slice");
        let bpffs = BpffsDir::new().expect("bpffs");
        let kubeconfig = dir.file("kubeconfig-node", &server.kubeconfig_yaml());
        // The CNI probe is off: it would connect from the machine's own network namespace.
        let config = dir.file(
            "config-node.yaml",
            "rescanInterval: 1s\nprobe:\n  enabled: false\n",
        );
        let metrics = free_loopback_addr().unwrap();
        let path = |p: &Path| p.display().to_string();
        let args = vec![
            "node".to_owned(),
            "--node-name".into(),
            NODE.into(),
            "--kubeconfig".into(),
            path(&kubeconfig),
            "--config".into(),
            path(&config),
            "--cgroup-root".into(),
            path(&root),
            "--bpffs".into(),
            path(&bpffs.path().join("guard")),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--state-file".into(),
            path(&dir.0.join("node-state.json")),
            "--state-dir".into(),
            path(&dir.0.join("node-state")),
        ];
        let mut proc = Proc::spawn("node", args, metrics);
        proc.wait_ready();
        Node {
            proc: Some(proc),
            bpffs,
            root,
            _cgroup: cgroup,
        }
    }

    /// A BestEffort pod `n` on this node: its cgroup and the pod in the API. Returns the pod
    /// cgroup's id.
    fn pod(&self, server: &FakeApiServer, ns: &str, name: &str, n: u32) -> u64 {
        let uid = format!("{n:08x}-1111-2222-3333-444455556666");
        let dir = self.root.join("kubepods-besteffort.slice").join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(dir.join(format!("cri-containerd-{n:064x}.scope")))
            .expect("pod cgroup");
        server.apply_pod(
            PodBuilder::new(ns, name)
                .uid(&uid)
                .node(NODE)
                .container("main", Some(&format!("containerd://{n:064x}"))),
        );
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).unwrap())
    }

    /// The verdict in the pinned map for a cgroup id, if it has an entry.
    fn verdict(&self, cgroup_id: u64) -> Option<String> {
        let pins = self.bpffs.path().join("guard").display().to_string();
        let out = Agent::run(&["status", "--output", "json", "--bpffs", &pins]).ok()?;
        let report: Value = serde_json::from_slice(&out.stdout).ok()?;
        report["verdicts"]
            .as_array()?
            .iter()
            .find(|p| p["cgroup_id"].as_u64() == Some(cgroup_id))
            .and_then(|p| p["verdict"].as_str().map(str::to_owned))
    }

    fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("node agent")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent first (it holds the pins), then the bpffs and cgroup guards.
        self.proc.take();
    }
}

fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// The fixture's request log with the time each entry was first seen by the test (polled
/// every few tens of ms): enough to measure the spacing of retries in seconds.
#[derive(Default)]
struct RequestClock {
    stamped: Vec<(Instant, RequestLog)>,
}

impl RequestClock {
    fn poll(&mut self, server: &FakeApiServer) {
        let all = server.requests();
        let now = Instant::now();
        for r in all.into_iter().skip(self.stamped.len()) {
            self.stamped.push((now, r));
        }
    }

    /// Polls for `how_long`.
    fn watch_for(&mut self, server: &FakeApiServer, how_long: Duration) {
        let end = Instant::now() + how_long;
        while Instant::now() < end {
            self.poll(server);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// When each 429 matching `filter` was answered.
    fn throttled(&self, filter: impl Fn(&RequestLog) -> bool) -> Vec<Instant> {
        self.stamped
            .iter()
            .filter(|(_, r)| r.status == 429 && filter(r))
            .map(|(t, _)| *t)
            .collect()
    }
}

/// Every gap between consecutive times is at least `at_least` (less the polling slack).
fn assert_spaced(what: &str, times: &[Instant], at_least: Duration) {
    let slack = Duration::from_millis(150);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap + slack >= at_least,
            "{what}: retried {gap:?} after a 429 with Retry-After {at_least:?} (all: {:?})",
            times.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
        );
    }
}

async fn kube_client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig parses");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    // As the agent's client: kube-rs's own retries of 429/503/504 would hide the answers.
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

// ---- 1. TLS ----

/// Node agent and controller over HTTPS: both verify the fixture's certificate with the CA
/// from their kubeconfig (rustls), do their work, and never speak plaintext to it.
#[test]
fn node_and_controller_work_over_tls_with_the_kubeconfig_ca() {
    if !require_root() {
        return;
    }
    let server = FakeApiServer::start_tls();
    assert!(server.url().starts_with("https://"));
    assert!(server
        .kubeconfig_yaml()
        .contains("certificate-authority-data: "));
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("tls");
    let mut ctl = controller(&dir, "ctl-1", &server.kubeconfig_yaml());
    ctl.wait_ready();
    let node = Node::start(&server, &dir);
    let tenant = node.pod(&server, "tenant-a", "notebook", 1);
    wait_for(PATIENCE, "tenant pod guarded over TLS", || {
        node.verdict(tenant).as_deref() == Some("guard")
    });
    wait_for(PATIENCE, "policy provisioned over TLS", || {
        server
            .get(Kind::NetworkPolicy, Some("tenant-a"), POLICY)
            .is_some()
    });
    let stats = server.tls_stats().expect("TLS fixture");
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.sent_by("node")));
    assert!(requests
        .iter()
        .any(|r| r.sent_by("controller") && r.is_write()));
    assert_eq!(stats.plaintext_connections(), 0, "someone spoke plaintext");
    assert_eq!(stats.failed_handshakes(), 0, "a handshake failed");
    // Events pass the real validation of their group (events.k8s.io/v1: regarding,
    // reportingController, reportingInstance, action, eventTime): none answered 422.
    wait_for(
        PATIENCE,
        "the controller's PodSecurityTooWeak Event",
        || {
            server
                .events()
                .iter()
                .any(|e| e["reason"] == "PodSecurityTooWeak")
        },
    );
    let invalid: Vec<RequestLog> = server
        .requests()
        .into_iter()
        .filter(|r| r.status == 422)
        .collect();
    assert!(invalid.is_empty(), "{invalid:?}");
}

/// A kubeconfig whose CA did not sign the server's certificate: the controller refuses the
/// server (one clear warning line per failing watch, naming the certificate problem), keeps
/// retrying, never becomes ready, and never falls back to plaintext.
#[test]
fn a_wrong_ca_is_refused_clearly_and_never_bypassed() {
    let server = FakeApiServer::start_tls();
    let wrong = datalab_guard_tests::apiserver::tls::TestCa::new("some other CA").pem();
    assert_ne!(Some(&wrong), server.ca_pem().as_ref());
    let dir = TempDir::new("wrong-ca");
    let ctl = controller(
        &dir,
        "ctl-wrong-ca",
        &server.kubeconfig_yaml_trusting(Some(&wrong)),
    );
    let stats = server.tls_stats().unwrap();
    wait_for(PATIENCE, "handshakes refused by the client", || {
        stats.failed_handshakes() >= 4
    });
    // Still retrying a while later, still without a single HTTP request through.
    let seen = stats.failed_handshakes();
    wait_for(PATIENCE, "the client keeps retrying", || {
        stats.failed_handshakes() > seen
    });
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    assert_eq!(stats.plaintext_connections(), 0, "plaintext fallback");
    assert_ne!(ctl.readyz(), Some(200), "ready without a verified server");
    let log = ctl.log();
    let cert_lines: Vec<&String> = log
        .iter()
        .filter(|l| l.to_lowercase().contains("certificate"))
        .collect();
    eprintln!(
        "certificate lines:\n{}",
        cert_lines
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !cert_lines.is_empty(),
        "no line names the certificate problem:\n{}",
        log.join("\n")
    );
    // Not a line per retry: one per failing watch (namespaces, policies) and the elector.
    assert!(
        cert_lines.len() <= 6,
        "{} certificate lines for {} refused handshakes",
        cert_lines.len(),
        stats.failed_handshakes()
    );
}

// ---- 2. 429 Too Many Requests + Retry-After ----

/// The node agent's lists and watch starts throttled with Retry-After: it waits at least
/// that long between attempts (no hammering), then converges. Over TLS.
#[test]
fn node_agent_honours_retry_after_on_list_and_watch() {
    if !require_root() {
        return;
    }
    let server = FakeApiServer::start_tls();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("429-node");
    let mut node = Node::start(&server, &dir);
    let tenant = node.pod(&server, "tenant-a", "notebook", 1);
    wait_for(PATIENCE, "tenant pod guarded", || {
        node.verdict(tenant).as_deref() == Some("guard")
    });
    let mut clock = RequestClock::default();
    clock.poll(&server);
    let retry_after = Duration::from_secs(3);

    // Lists: the history is lost, so both watches must relist, and the lists are throttled.
    server.throttle(&["list"], retry_after, Duration::from_secs(8));
    server.compact();
    server.drop_watches();
    clock.watch_for(&server, Duration::from_secs(10));
    // Watch starts: both watches are cut and their re-watches throttled.
    server.throttle(&["watch"], retry_after, Duration::from_secs(8));
    server.drop_watches();
    clock.watch_for(&server, Duration::from_secs(10));

    for verb in ["list", "watch"] {
        for resource in ["pods", "namespaces"] {
            let times = clock.throttled(|r| {
                r.sent_by("node") && r.verb == verb && r.resource.as_deref() == Some(resource)
            });
            eprintln!("{verb} {resource}: {} requests answered 429", times.len());
            assert!(times.len() >= 2, "{verb} {resource}: {} 429s", times.len());
            // 8 s of throttling with Retry-After 3 s: at most 4 attempts (0, 3, 6, <8).
            assert!(
                times.len() <= 4,
                "{verb} {resource}: hammered ({} 429s)",
                times.len()
            );
            assert_spaced(&format!("{verb} {resource}"), &times, retry_after);
        }
    }
    // Converged: a change made now is applied at once.
    server.set_namespace_labels("tenant-a", &[]);
    let took = wait_for(PATIENCE, "relabel applied after throttling", || {
        node.verdict(tenant).as_deref() == Some("exempt")
    });
    assert!(took < Duration::from_secs(5), "relabel took {took:?}");
    assert!(
        node.proc().agent.try_status().is_none(),
        "the agent never restarted"
    );
}

/// The controller's writes (server-side apply of its NetworkPolicy) throttled with
/// Retry-After: the repair is retried no sooner than asked, then made.
#[test]
fn controller_honours_retry_after_on_writes() {
    let (server, _dir, mut ctl) = provisioned_controller("429-ctl");
    let mut clock = RequestClock::default();
    clock.poll(&server);
    let retry_after = Duration::from_secs(3);
    server.throttle(&["patch"], retry_after, Duration::from_secs(8));
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    // Other namespaces changing wake the controller's loop: it must still not retry early.
    for i in 0..5 {
        clock.watch_for(&server, Duration::from_millis(700));
        server.apply_namespace(&format!("noise-{i}"), &[]);
    }
    let start = Instant::now();
    while server
        .get(Kind::NetworkPolicy, Some("tenant-a"), POLICY)
        .is_none()
    {
        assert!(
            start.elapsed() < PATIENCE,
            "policy never restored after the throttling"
        );
        clock.poll(&server);
        std::thread::sleep(Duration::from_millis(20));
    }
    clock.poll(&server);
    let times = clock
        .throttled(|r| r.sent_by("controller") && r.resource.as_deref() == Some("networkpolicies"));
    eprintln!("policy patches answered 429: {}", times.len());
    assert!(times.len() >= 2, "{} 429s", times.len());
    assert!(times.len() <= 4, "hammered: {} 429s in 8 s", times.len());
    assert_spaced("policy patch", &times, retry_after);
    assert!(ctl.agent.try_status().is_none());
}

// ---- 3. resourceVersion semantics of a watch cache ----

/// Fixture self-test with kube-rs: a lagging watch cache serves `resourceVersion=0` lists
/// stale, refuses a newer resourceVersion with 504 Too large resource version after ~3 s,
/// and a watch from the stale list's version delivers the newer state once it catches up.
/// `sendInitialEvents` without `resourceVersionMatch=NotOlderThan` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watch_cache_rv0_is_stale_and_future_versions_are_refused() {
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    let client = kube_client(&server).await;
    let api: Api<Namespace> = Api::all(client.clone());
    let label = |ns: &Namespace| {
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ENV.0).cloned())
    };
    let tenant = |list: &kube::core::ObjectList<Namespace>| {
        list.items
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some("tenant-a"))
            .cloned()
            .unwrap()
    };

    server.lag_watch_cache();
    server.set_namespace_labels("tenant-a", &[]);
    let stale = api.list(&ListParams::default().match_any()).await.unwrap();
    assert_eq!(
        label(&tenant(&stale)).as_deref(),
        Some("true"),
        "rv=0 list not stale"
    );
    let fresh = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(label(&tenant(&fresh)), None, "consistent list stale");
    let fresh_rv = fresh.metadata.resource_version.clone().unwrap();
    let stale_rv = stale.metadata.resource_version.clone().unwrap();
    assert!(stale_rv.parse::<u64>().unwrap() < fresh_rv.parse::<u64>().unwrap());

    // A watch from the consistent list's version: held ~3 s, then 504.
    let asked = Instant::now();
    let err = match api.watch(&WatchParams::default(), &fresh_rv).await {
        Err(kube::Error::Api(s)) => s,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a watch from a version the cache has not reached was accepted"),
    };
    assert!(
        asked.elapsed() >= Duration::from_millis(2_900),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!((err.code, err.reason.as_str()), (504, "Timeout"), "{err:?}");
    let causes = &err.details.as_ref().unwrap().causes;
    assert!(
        causes.iter().any(|c| c.reason == "ResourceVersionTooLarge"),
        "{err:?}"
    );
    assert!(
        err.message.contains("Too large resource version"),
        "{err:?}"
    );

    // A watch from the stale list's version is open but silent while the cache lags.
    let mut from_stale = api
        .watch(&WatchParams::default(), &stale_rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), from_stale.next())
            .await
            .is_err(),
        "a lagging cache delivered a change it has not seen"
    );
    // The cache catches up: the watch delivers the newer state.
    server.catch_up_watch_cache();
    match tokio::time::timeout(PATIENCE, from_stale.next())
        .await
        .unwrap()
    {
        Some(Ok(WatchEvent::Modified(ns))) => assert_eq!(label(&ns), None),
        other => panic!("expected the relabel, got {other:?}"),
    }

    // sendInitialEvents needs resourceVersionMatch=NotOlderThan (and bookmarks).
    let req = http::Request::get(
        "/api/v1/namespaces?watch=true&sendInitialEvents=true&allowWatchBookmarks=true",
    )
    .body(Vec::new())
    .unwrap();
    match client.request_text(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
            assert!(s.message.contains("resourceVersionMatch"), "{s:?}");
        }
        other => panic!("sendInitialEvents without NotOlderThan accepted: {other:?}"),
    }
}

/// The node agent against a watch cache that lags: its lists are consistent reads (never
/// `resourceVersion=0`, so never stale) and never ask for `sendInitialEvents`; a watch from
/// a version the cache has not reached gets 504 Too large resource version, and the agent
/// relists instead of retrying that version — so it sees changes even while the cache
/// lags, and follows the watch again once it has caught up.
#[test]
fn node_agent_relists_on_too_large_resource_version() {
    if !require_root() {
        return;
    }
    let server = FakeApiServer::start();
    server.apply_namespace("tenant-a", &[ENV]);
    server.apply_namespace("tenant-b", &[ENV]);
    let dir = TempDir::new("rv-node");
    let node = Node::start(&server, &dir);
    let a = node.pod(&server, "tenant-a", "nb-a", 1);
    let b = node.pod(&server, "tenant-b", "nb-b", 2);
    wait_for(PATIENCE, "tenant pods guarded", || {
        node.verdict(a).as_deref() == Some("guard") && node.verdict(b).as_deref() == Some("guard")
    });

    // The cache freezes; the history is lost, so the watches relist (consistent: they get
    // a version the cache has not reached) and their next watch is refused with 504.
    server.lag_watch_cache();
    server.set_namespace_labels("tenant-a", &[]);
    server.compact();
    server.drop_watches();
    wait_for(PATIENCE, "relabel seen through the relist", || {
        node.verdict(a).as_deref() == Some("exempt")
    });
    wait_for(PATIENCE, "a watch refused with 504", || {
        server
            .requests()
            .iter()
            .any(|r| r.sent_by("node") && r.is_watch() && r.status == 504)
    });
    // A change while the cache still lags: only a relist can show it.
    server.set_namespace_labels("tenant-b", &[]);
    let took = wait_for(
        PATIENCE,
        "tenant-b relabel seen while the cache lags",
        || node.verdict(b).as_deref() == Some("exempt"),
    );
    eprintln!("change seen {took:?} after it was made, watch cache still lagging");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // The cache catches up: the watch works again and delivers the next change promptly.
    server.catch_up_watch_cache();
    std::thread::sleep(Duration::from_secs(8));
    server.set_namespace_labels("tenant-a", &[ENV]);
    let took = wait_for(PATIENCE, "tenant-a back in the environment", || {
        node.verdict(a).as_deref() == Some("guard")
    });
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let requests = server.requests();
    let node_lists: Vec<&RequestLog> = requests
        .iter()
        .filter(|r| r.sent_by("node") && r.verb == "list")
        .collect();
    assert!(node_lists.len() >= 4, "{} lists", node_lists.len());
    for r in &node_lists {
        assert_eq!(
            r.param("resourceVersion"),
            None,
            "a list that may be stale: {r:?}"
        );
    }
    assert!(
        requests
            .iter()
            .all(|r| r.param("sendInitialEvents").is_none()),
        "sendInitialEvents sent"
    );
}

// ---- 4. Terminating namespaces ----

/// A namespace being deleted stays Terminating for a while; its content goes first (our
/// policy too) and creates in it are 403. The controller neither writes into it nor calls it
/// drift, and does not loop on errors.
#[test]
fn controller_leaves_a_terminating_namespace_alone() {
    let (server, _dir, mut ctl) = provisioned_controller("term-ctl");
    let before = server.requests().len();
    let log_before = ctl.log().len();
    server.terminate_namespace("tenant-a");
    // The namespace controller removes the content first.
    std::thread::sleep(Duration::from_secs(1));
    server.delete(Kind::NetworkPolicy, Some("tenant-a"), POLICY);
    std::thread::sleep(Duration::from_secs(8));

    let after: Vec<RequestLog> = server.requests().into_iter().skip(before).collect();
    let writes_into: Vec<&RequestLog> = after
        .iter()
        .filter(|r| r.sent_by("controller") && r.is_write())
        .filter(|r| r.namespace.as_deref() == Some("tenant-a"))
        .collect();
    assert!(
        writes_into.is_empty(),
        "writes into a Terminating namespace: {writes_into:?}"
    );
    let forbidden: Vec<&RequestLog> = after.iter().filter(|r| r.status == 403).collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    let new_lines = &ctl.log()[log_before..];
    for bad in [
        "NetworkPolicy repaired",
        "NetworkPolicy provisioned",
        "not as configured",
        "cannot apply",
        "Forbidden",
    ] {
        assert!(
            !new_lines.iter().any(|l| l.contains(bad)),
            "{bad:?} logged for a Terminating namespace:\n{}",
            new_lines.join("\n")
        );
    }
    // A create there is refused as the real NamespaceLifecycle plugin does.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(kube_client(&server).await, "tenant-a");
        let e: k8s_openapi::api::events::v1::Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"},
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "test", "reportingInstance": "test",
            "action": "Test", "reason": "Test", "type": "Normal",
            "regarding": {"kind": "Namespace", "name": "tenant-a"},
        }))
        .unwrap();
        api.create(&Default::default(), &e).await
    });
    match status {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"), "{s:?}");
            assert!(
                s.message.ends_with("because it is being terminated"),
                "{s:?}"
            );
            let causes = &s.details.as_ref().unwrap().causes;
            assert!(
                causes.iter().any(|c| c.reason == "NamespaceTerminating"),
                "{s:?}"
            );
        }
        other => panic!("create in a Terminating namespace: {other:?}"),
    }
    // The namespace goes; the controller is still there and healthy.
    server.delete_namespace("tenant-a");
    std::thread::sleep(Duration::from_secs(2));
    assert!(ctl.agent.try_status().is_none());
    assert_eq!(ctl.readyz(), Some(200));
}

/// The node agent keeps guarding the pods of a Terminating namespace until they are gone.
#[test]
fn node_keeps_guarding_pods_in_a_terminating_namespace() {
    if !require_root() {
        return;
    }
    let server = FakeApiServer::start_tls();
    server.apply_namespace("tenant-a", &[ENV]);
    let dir = TempDir::new("term-node");
    let mut node = Node::start(&server, &dir);
    let pod = node.pod(&server, "tenant-a", "notebook", 1);
    wait_for(PATIENCE, "tenant pod guarded", || {
        node.verdict(pod).as_deref() == Some("guard")
    });
    server.terminate_namespace("tenant-a");
    server.mark_pod_terminating("tenant-a", "notebook");
    // Several rescans (1 s) and watch events later: still guarded.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            node.verdict(pod).as_deref(),
            Some("guard"),
            "unguarded while terminating"
        );
    }
    server.delete_pod("tenant-a", "notebook");
    server.delete_namespace("tenant-a");
    std::thread::sleep(Duration::from_secs(2));
    // Its cgroup is still there (the kubelet has not removed it yet): guarded by default.
    assert_ne!(node.verdict(pod).as_deref(), Some("exempt"));
    assert!(
        node.proc().agent.try_status().is_none(),
        "the agent never restarted"
    );
}

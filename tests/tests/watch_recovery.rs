//! Watch recovery that cannot stall (issue 9.3), tested the way it breaks on a real cluster:
//! an API outage long enough to grow any backoff, a quiet reconnect (nothing sent, so
//! nothing resets a backoff that only an event resets), then a restart that loses the watch
//! history (every old resourceVersion gets 410 Gone), then a change. The change must be
//! applied within seconds, not after the backoff a long outage left behind.
//!
//! Two levels: the node's cluster view (`ClusterView`) against the API fixture, no root
//! needed; and the real `datalab-guard node` binary with a fake kubelet cgroup tree, whose
//! verdicts are read from its pinned map (`status --output json`) and its health from
//! `/metrics`. Needs root for the second.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use datalab_guard::k8s::{ClusterView, WatchHealth};
use datalab_guard_tests::{
    apiserver::{rbac::Identity, ExpiredWatch},
    free_loopback_addr, require_root, Agent, BpffsDir, FakeApiServer, PodBuilder, TestCgroup,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};

const NODE: &str = "node-1";
const ENV_LABEL: (&str, &str) = ("datalab.io/environment", "true");
/// The bound issue 9 sets for a change after outage + compaction.
const BOUND: Duration = Duration::from_secs(5);
/// Long enough for kube-runtime's default backoff to reach ~13–26 s per retry.
const OUTAGE: Duration = Duration::from_secs(15);
/// How long the tests wait for anything before failing (longer than any backoff, so the
/// old behaviour shows its real delay instead of a timeout).
const PATIENCE: Duration = Duration::from_secs(120);

async fn client(server: &FakeApiServer) -> Client {
    // The node agent's watchers, as its ServiceAccount (RBAC enforced).
    let yaml = server.kubeconfig_yaml_as(Identity::NodeAgent);
    let kubeconfig = Kubeconfig::from_yaml(&yaml).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    Client::try_from(config).expect("client")
}

/// Polls `cond` every 20 ms; returns how long it took, or panics after `timeout`.
async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn has_env_label(view: &ClusterView, ns: &str) -> Option<bool> {
    view.namespace(ns)
        .map(|n| n.labels.get(ENV_LABEL.0).map(String::as_str) == Some(ENV_LABEL.1))
}

/// The fixture's side of the sequence up to the change: outage, quiet return, both
/// watches re-opened (without any event), then a restart that loses the history.
async fn outage_quiet_reconnect_restart(server: &FakeApiServer, dark: bool, watches: usize) {
    if dark {
        server.go_dark();
    } else {
        server.go_down();
    }
    tokio::time::sleep(OUTAGE).await;
    let back = Instant::now();
    server.come_back();
    eventually(PATIENCE, "the watches re-opened after the outage", || {
        server.open_watches() == watches
    })
    .await;
    eprintln!(
        "watches re-opened {:?} after the API came back",
        back.elapsed()
    );
    server.restart();
}

/// Waits (10 s at most) until the 410 made both watches relist, or panics with their stats.
async fn both_relisted(health: &WatchHealth) {
    let start = Instant::now();
    while health.namespaces.relists() == 0 || health.pods.relists() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not both relisted: namespaces {:?}, pods {:?}",
            health.namespaces,
            health.pods
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One run of the scenario against a `ClusterView`; returns the time from the change to
/// the view showing it, once both watches have relisted.
async fn view_scenario(dark: bool, expired: ExpiredWatch) -> (Duration, WatchHealth) {
    let server = FakeApiServer::start();
    server.set_expired_watch(expired);
    server.apply_namespace("tenant-a", &[ENV_LABEL]);
    server.apply_pod(PodBuilder::new("tenant-a", "nb").node(NODE));
    let health = WatchHealth::default();
    let view = ClusterView::start(client(&server).await, NODE, health.clone());
    tokio::time::timeout(PATIENCE, view.wait_synced())
        .await
        .expect("first sync");
    assert_eq!(has_env_label(&view, "tenant-a"), Some(true));
    eventually(PATIENCE, "both watches open", || server.open_watches() == 2).await;

    outage_quiet_reconnect_restart(&server, dark, 2).await;
    server.set_namespace_labels("tenant-a", &[]);
    let took = eventually(PATIENCE, "the relabel reaches the view", || {
        has_env_label(&view, "tenant-a") == Some(false)
    })
    .await;
    // While the server is still up: the 410 made both watches relist.
    both_relisted(&health).await;
    (took, health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_applies_a_change_within_seconds_after_outage_quiet_reconnect_and_410_event() {
    let (took, health) = view_scenario(false, ExpiredWatch::ErrorEvent).await;
    eprintln!("refused outage, ERROR 410 event: relabel seen after {took:?}");
    assert!(took <= BOUND, "relabel took {took:?} (bound {BOUND:?})");
    // The 410 made both watches relist once; the outage counted as errors.
    assert!(health.namespaces.errors() >= 2 && health.pods.errors() >= 2);
    assert!(health.namespaces.staleness() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_recovers_from_a_blackholed_outage_and_an_http_410() {
    // HTTP 410 on the watch request: kube-runtime 5's watcher would retry the expired
    // resourceVersion forever; a blackholed server answers nothing, so every request must
    // time out or be cut by itself.
    // view_scenario already waited for both watches to relist.
    let (took, _health) = view_scenario(true, ExpiredWatch::HttpGone).await;
    eprintln!("blackholed outage, HTTP 410: relabel seen after {took:?}");
    assert!(took <= BOUND, "relabel took {took:?} (bound {BOUND:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_a_quiet_watch_fresh_and_silence_shows_as_staleness() {
    let server = FakeApiServer::start();
    server.set_bookmark_interval(Duration::from_millis(200));
    let health = WatchHealth::default();
    let view = ClusterView::start(client(&server).await, NODE, health.clone());
    tokio::time::timeout(PATIENCE, view.wait_synced())
        .await
        .expect("first sync");
    // Nothing changes; only bookmarks arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (what, stats) in [("namespaces", &health.namespaces), ("pods", &health.pods)] {
        let stale = stats.staleness();
        assert!(stale < Duration::from_secs(1), "{what}: {stale:?}");
        assert_eq!((stats.relists(), stats.errors()), (0, 0), "{what}");
    }
    // Server silent (stalled streams): staleness grows.
    server.stall_watches();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for stats in [&health.namespaces, &health.pods] {
        assert!(stats.staleness() >= Duration::from_millis(1500));
    }
    assert!(
        view.watch_errors() == 0,
        "silence alone is not an error yet"
    );
}

// ---- the real agent ----

/// A fake node: kubelet-style cgroup tree (systemd driver), the API fixture and the agent.
struct Node {
    agent: Option<Agent>,
    bpffs: BpffsDir,
    root: PathBuf,
    metrics: std::net::SocketAddr,
    api: FakeApiServer,
    dir: PathBuf,
    _cgroup: TestCgroup,
}

impl Node {
    fn new() -> Node {
        let cgroup = TestCgroup::new().expect("cgroup");
        let root = cgroup.path().join("kubepods.slice");
        std::fs::create_dir_all(root.join("kubepods-besteffort.slice")).expect("qos slice");
        let api = FakeApiServer::start();
        api.apply_namespace("tenant-a", &[ENV_LABEL]);
        api.apply_namespace("kube-system", &[]);
        let dir = std::env::temp_dir().join(format!(
            "dg-watch-recovery-{}-{}",
            std::process::id(),
            cgroup.id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // As the DaemonSet's ServiceAccount: the fixture enforces the manifests' RBAC.
        api.write_kubeconfig_as(dir.join("kubeconfig"), Identity::NodeAgent)
            .unwrap();
        // The CNI probe is off: it would connect from the machine's own network namespace.
        std::fs::write(
            dir.join("config.yaml"),
            "rescanInterval: 1s\nprobe:\n  enabled: false\n",
        )
        .unwrap();
        Node {
            agent: None,
            bpffs: BpffsDir::new().expect("bpffs"),
            root,
            metrics: free_loopback_addr().unwrap(),
            api,
            dir,
            _cgroup: cgroup,
        }
    }

    fn pins(&self) -> String {
        self.bpffs.path().join("guard").display().to_string()
    }

    fn start(&mut self) {
        let path = |f: &str| self.dir.join(f).display().to_string();
        let args = [
            "node".to_owned(),
            "--node-name".into(),
            NODE.into(),
            "--kubeconfig".into(),
            path("kubeconfig"),
            "--config".into(),
            path("config.yaml"),
            "--cgroup-root".into(),
            self.root.display().to_string(),
            "--bpffs".into(),
            self.pins(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
            "--state-file".into(),
            path("state.json"),
            "--state-dir".into(),
            path("state"),
        ];
        let mut agent = Agent::spawn(&args).expect("spawn agent");
        agent
            .wait_ready(self.metrics, Duration::from_secs(30))
            .expect("agent ready");
        self.agent = Some(agent);
    }

    /// A BestEffort pod on this node: its cgroup (as the kubelet names it) and, if
    /// `announce`, the pod in the API. Returns the pod cgroup's id.
    fn pod(&self, ns: &str, name: &str, n: u32, announce: bool) -> u64 {
        let uid = format!("{n:08x}-1111-2222-3333-444455556666");
        let dir = self.root.join("kubepods-besteffort.slice").join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(dir.join(format!("cri-containerd-{n:064x}.scope")))
            .expect("pod cgroup");
        if announce {
            self.announce(ns, name, n);
        }
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).unwrap())
    }

    fn announce(&self, ns: &str, name: &str, n: u32) {
        let uid = format!("{n:08x}-1111-2222-3333-444455556666");
        self.api.apply_pod(
            PodBuilder::new(ns, name)
                .uid(&uid)
                .node(NODE)
                .container("main", Some(&format!("containerd://{n:064x}"))),
        );
    }

    /// The verdict in the pinned map for a cgroup id, if it has an entry.
    fn verdict(&self, cgroup_id: u64) -> Option<String> {
        let out = Agent::run(&["status", "--output", "json", "--bpffs", &self.pins()]).unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        report["verdicts"]
            .as_array()?
            .iter()
            .find(|p| p["cgroup_id"].as_u64() == Some(cgroup_id))
            .and_then(|p| p["verdict"].as_str().map(str::to_owned))
    }

    fn metric(&self, name: &str, resource: &str) -> f64 {
        let text = self
            .agent
            .as_ref()
            .expect("agent")
            .metrics(self.metrics)
            .unwrap();
        let prefix = format!("{name}{{resource=\"{resource}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            let _ = agent.sigterm();
            let _ = agent.wait_exit(Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Blocking wrapper of [`eventually`] for the agent test (which must not run inside a
/// runtime: the agent's status calls block).
fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn blocking_outage_quiet_reconnect_restart(node: &Node, dark: bool) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(outage_quiet_reconnect_restart(&node.api, dark, 2));
}

#[test]
fn agent_applies_relabel_and_new_exempt_pod_within_5s_after_outage_and_compaction() {
    if !require_root() {
        return;
    }
    let mut node = Node::new();
    let tenant = node.pod("tenant-a", "notebook", 1, true);
    node.start();
    wait_for(Duration::from_secs(10), "tenant pod guarded", || {
        node.verdict(tenant).as_deref() == Some("guard")
    });
    assert_eq!(
        node.metric("datalab_guard_watch_relists_total", "namespaces"),
        0.0
    );

    // 1. Refused outage, quiet return, restart (history lost), then the namespace leaves
    //    the environment set: its pod must become exempt within 5 s.
    blocking_outage_quiet_reconnect_restart(&node, false);
    node.api.set_namespace_labels("tenant-a", &[]);
    let took = wait_for(PATIENCE, "tenant-a's pod exempt after relabel", || {
        node.verdict(tenant).as_deref() == Some("exempt")
    });
    eprintln!("outage + quiet reconnect + compaction -> relabel applied after {took:?}");
    assert!(took <= BOUND, "relabel took {took:?} (bound {BOUND:?})");
    assert!(node.metric("datalab_guard_watch_relists_total", "namespaces") >= 1.0);
    assert!(node.metric("datalab_guard_watch_errors_total", "namespaces") >= 1.0);
    assert!(node.metric("datalab_guard_watch_staleness_seconds", "namespaces") < 5.0);

    // 2. The same through a blackholed outage, then a new kube-system pod (exempt by the
    //    default config) whose cgroup already exists: guarded by default until the agent
    //    sees it, exempt within 5 s of its announcement.
    let system = node.pod("kube-system", "aws-node-new", 2, false);
    wait_for(Duration::from_secs(10), "the unknown cgroup", || {
        node.verdict(system).is_none_or(|v| v == "guard")
    });
    blocking_outage_quiet_reconnect_restart(&node, true);
    node.announce("kube-system", "aws-node-new", 2);
    let took = wait_for(PATIENCE, "the new kube-system pod exempt", || {
        node.verdict(system).as_deref() == Some("exempt")
    });
    eprintln!(
        "blackholed outage + quiet reconnect + compaction -> new exempt pod applied after {took:?}"
    );
    assert!(
        took <= BOUND,
        "new exempt pod took {took:?} (bound {BOUND:?})"
    );
    assert!(node.metric("datalab_guard_watch_relists_total", "pods") >= 2.0);
    assert!(
        node.agent.as_mut().unwrap().try_status().is_none(),
        "the agent never restarted"
    );
}

//! End to end with a real container runtime (issue 9.2): the `datalab-guard node` binary with
//! the CRI lab's containerd as its runtime (`runtime.socket`) and the lab's pods' cgroup root
//! (`<cgroup2>/kubepods`, cgroupfs driver) as its attach point. Pod sandboxes are created
//! through CRI while the API server does not know them — it is down, or it never heard of
//! the pod — and the agent must classify them from the runtime alone: a kube-system pod
//! exempt, a tenant pod guarded, before any process of theirs makes a connection.
//!
//! Where the probe runs: in the sandbox's own cgroup (the pause container's, created by
//! containerd and runc), but in a network namespace this test made (the `Lab`'s tenant side),
//! linked by a veth to a fake metadata host that counts every packet it receives. The CRI
//! lab's bridge carries only on-link routes, so the metadata host is not reachable from the
//! sandbox's own network namespace; the verdict is per cgroup, so the cgroup is what matters.
//! Needs root.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use datalab_guard_tests::{
    apiserver::{rbac::Identity, FakeApiServer},
    cgroup2_root,
    cri_lab::LabPod,
    free_loopback_addr, probe_in, require_root, Agent, BpffsDir, CriLab, Lab, PodSpec, TestCgroup,
};

const NODE: &str = "node-1";
const IMDS4: &str = "169.254.169.254";
/// How long a runtime-classified entry may take after RunPodSandbox returned (the agent
/// waits up to 2 s for the runtime to list a new sandbox; it answers in ~0.1 s here).
const CLASSIFIED_WITHIN: Duration = Duration::from_secs(10);

/// The CRI lab, the network lab with the fake metadata host, the API fixture and the agent.
struct RuntimeNode {
    agent: Option<Agent>,
    bpffs: BpffsDir,
    metrics: SocketAddr,
    api: FakeApiServer,
    dir: PathBuf,
    root: PathBuf,
    /// QoS directories this test made under `root` (the lab removes what its pods used).
    made: Vec<PathBuf>,
    lab: Lab,
    cri: Option<CriLab>,
}

impl RuntimeNode {
    /// `runtime_socket`: what the config's `runtime.socket` says (`None`: the lab's).
    fn new(runtime_socket: Option<&str>) -> RuntimeNode {
        let cri = CriLab::start().expect("starting the CRI lab");
        let mut lab = Lab::new().expect("lab");
        lab.start_fake_imds().expect("fake imds");
        // The kubelet (here: the test) makes the pods' root and QoS parents before any pod.
        let root = cgroup2_root().unwrap().join("kubepods");
        let mut made = Vec::new();
        for dir in [
            root.clone(),
            root.join("burstable"),
            root.join("besteffort"),
        ] {
            if !dir.exists() {
                std::fs::create_dir(&dir).expect("kubepods cgroup");
                made.push(dir);
            }
        }
        let api = FakeApiServer::start();
        api.apply_namespace("tenant-a", &[("datalab.io/environment", "true")]);
        let dir = std::env::temp_dir().join(format!(
            "dg-node-runtime-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // As the DaemonSet's ServiceAccount: the fixture enforces the manifests' RBAC.
        api.write_kubeconfig_as(dir.join("kubeconfig"), Identity::NodeAgent)
            .unwrap();
        let socket =
            runtime_socket.map_or_else(|| cri.socket().display().to_string(), str::to_owned);
        // kube-system is exempt by name; cni-system too, and the API never hears of it.
        std::fs::write(
            dir.join("config.yaml"),
            format!(
                "exemptions:\n  namespaces: [kube-system, cni-system]\nrescanInterval: 1s\n\
                 probe:\n  enabled: false\nruntime:\n  socket: {socket}\n  timeout: 1s\n"
            ),
        )
        .unwrap();
        RuntimeNode {
            agent: None,
            bpffs: BpffsDir::new().expect("bpffs"),
            metrics: free_loopback_addr().unwrap(),
            api,
            dir,
            root,
            made,
            lab,
            cri: Some(cri),
        }
    }

    fn cri(&self) -> &CriLab {
        self.cri.as_ref().expect("CRI lab")
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.path().join("guard")
    }

    /// Points the agent's kubeconfig at a loopback port nothing listens on.
    fn make_api_unreachable(&self) {
        let dead = free_loopback_addr().unwrap();
        let yaml = self
            .api
            .kubeconfig_yaml_as(Identity::NodeAgent)
            .replace(&self.api.url(), &format!("http://{dead}"));
        std::fs::write(self.dir.join("kubeconfig"), yaml).unwrap();
    }

    fn start_agent(&mut self) {
        self.start_agent_with_root(&self.root.clone());
    }

    fn start_agent_with_root(&mut self, root: &Path) {
        let mut agent = self.spawn_agent(root);
        agent
            .wait_ready(self.metrics, Duration::from_secs(30))
            .expect("agent ready");
        self.agent = Some(agent);
    }

    /// Starts the agent and waits until its programs are pinned (not for `/readyz`, which
    /// needs the API server).
    fn start_agent_unsynced(&mut self) {
        let agent = self.spawn_agent(&self.root.clone());
        self.agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status()["installed"] != true {
            assert!(
                Instant::now() < deadline,
                "the agent did not attach without the API server; log:\n{}",
                self.agent().stderr_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_agent(&self, root: &Path) -> Agent {
        Agent::spawn(&self.agent_args(root)).expect("spawn agent")
    }

    /// Starts the agent in a PID namespace of its own (a fresh /proc), as a DaemonSet
    /// without `hostPID` runs: no pod process is visible to it.
    fn start_agent_without_host_pids(&mut self) {
        let bin = Agent::bin().expect("agent bin");
        let mut args = vec![
            "--pid".to_owned(),
            "--fork".into(),
            "--mount-proc".into(),
            // The agent dies with unshare when the test kills it.
            "--kill-child".into(),
            bin.display().to_string(),
        ];
        args.extend(self.agent_args(&self.root.clone()));
        let mut agent = Agent::spawn_with(Path::new("/usr/bin/unshare"), &args, &[])
            .expect("spawn agent in its own PID namespace");
        agent
            .wait_ready(self.metrics, Duration::from_secs(30))
            .expect("agent ready");
        self.agent = Some(agent);
    }

    fn agent_args(&self, root: &Path) -> Vec<String> {
        vec![
            "node".to_owned(),
            "--node-name".into(),
            NODE.into(),
            "--kubeconfig".into(),
            self.dir.join("kubeconfig").display().to_string(),
            "--config".into(),
            self.dir.join("config.yaml").display().to_string(),
            "--cgroup-root".into(),
            root.display().to_string(),
            "--bpffs".into(),
            self.pins().display().to_string(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
            "--state-file".into(),
            self.dir.join("state.json").display().to_string(),
            // Never the machine's /var/lib/datalab-guard.
            "--state-dir".into(),
            self.dir.join("state-dir").display().to_string(),
            "--log-format".into(),
            "json".into(),
        ]
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent")
    }

    fn status(&self) -> serde_json::Value {
        let out = Agent::run(&[
            "status",
            "--output",
            "json",
            "--bpffs",
            &self.pins().display().to_string(),
            "--state-file",
            &self.dir.join("state.json").display().to_string(),
        ])
        .unwrap();
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// The verdict the map holds for a cgroup id (`None`: no entry, the default applies).
    fn map_verdict(&self, id: u64) -> Option<String> {
        self.status()["verdicts"]
            .as_array()?
            .iter()
            .find(|e| e["cgroup_id"].as_u64() == Some(id))
            .and_then(|e| e["verdict"].as_str().map(str::to_owned))
    }

    /// The pod's cgroup and its sandbox (pause) container's cgroup, as containerd made them.
    fn cgroups_of(&self, pod: &LabPod) -> (PathBuf, PathBuf) {
        let dir = self.cri().pod_cgroup_dir(pod).unwrap();
        let sandbox = dir.join(&pod.id);
        assert!(
            sandbox.join("cgroup.procs").exists(),
            "sandbox cgroup {}",
            sandbox.display()
        );
        (dir, sandbox)
    }

    /// Waits for the pod's map entry and returns its verdict and how long it took since
    /// RunPodSandbox returned.
    fn wait_for_entry(&self, pod: &LabPod) -> (String, Duration) {
        let id = cgroup_id(&self.cri().pod_cgroup_dir(pod).unwrap());
        loop {
            if let Some(verdict) = self.map_verdict(id) {
                return (verdict, pod.ran_at.elapsed());
            }
            assert!(
                pod.ran_at.elapsed() < CLASSIFIED_WITHIN,
                "no map entry for {}/{} within {CLASSIFIED_WITHIN:?}; agent log:\n{}",
                pod.spec.namespace,
                pod.spec.name,
                self.agent().stderr_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The state file's row of a pod (by uid), once the agent wrote one.
    fn row(&self, uid: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status();
            let found = status["environments"]["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["uid"] == uid)
                .cloned();
            if let Some(row) = found {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "no state row for {uid}: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics_text(&self) -> String {
        self.agent().metrics(self.metrics).expect("metrics")
    }
}

impl Drop for RuntimeNode {
    fn drop(&mut self) {
        // The agent first (it watches the tree), then the runtime's pods, then what is left.
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill9();
        }
        if let Some(cri) = self.cri.take() {
            if let Err(e) = cri.shutdown() {
                eprintln!("CRI lab cleanup: {e:#}");
            }
        }
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir); // only if empty: a neighbour's pods stay
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cgroup_id(dir: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir).unwrap())
}

fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The API server goes down after the first sync; then a kube-system pod (hostNetwork, like
/// a CNI agent), a tenant pod, a pod in a namespace the API never had (exempt by name only)
/// and one in an unknown namespace are created through CRI. Their entries come from the
/// runtime alone and are in the map before anything in them connects; the kube-system pod
/// reaches the metadata host from its first connect, the tenant pod is refused and not one
/// packet of it arrives. When the API comes back and knows the tenant pod, its verdict is
/// the API's.
#[test]
fn runtime_classifies_new_sandboxes_while_the_api_server_is_down() {
    if !require_root() {
        return;
    }
    let mut node = RuntimeNode::new(None);
    node.start_agent();
    node.api.go_down();

    let system = node
        .cri()
        .run_pod(
            &PodSpec::new("kube-system", "aws-node-x7k2p")
                .host_network()
                .label("k8s-app", "aws-node"),
        )
        .unwrap();
    let tenant = node
        .cri()
        .run_pod(&PodSpec::new("tenant-a", "notebook-0").label("app", "jupyter"))
        .unwrap();
    let by_name = node
        .cri()
        .run_pod(&PodSpec::new("cni-system", "cni-agent-1").host_network())
        .unwrap();
    let unknown = node
        .cri()
        .run_pod(&PodSpec::new("team-z", "job-0"))
        .unwrap();

    // The map first, before anything probes.
    for (pod, want) in [
        (&system, "exempt"),
        (&tenant, "guard"),
        (&by_name, "exempt"),
        (&unknown, "guard"),
    ] {
        let (verdict, took) = node.wait_for_entry(pod);
        eprintln!(
            "TIMING RunPodSandbox returned -> {}/{} {verdict} in the map: {took:?}",
            pod.spec.namespace, pod.spec.name
        );
        assert_eq!(verdict, want, "{}/{}", pod.spec.namespace, pod.spec.name);
    }
    // Why, as the state file says: the namespace's labels from the agent's cached view for
    // the namespaces the API had sent before it went down, the name alone for the others.
    for (pod, reason) in [
        (&system, "runtime:exempt_namespace"),
        (&tenant, "runtime:environment_namespace"),
        (&by_name, "runtime:exempt_namespace"),
        (&unknown, "runtime:namespace_labels_unknown"),
    ] {
        let row = node.row(&pod.spec.uid);
        assert_eq!(row["reason"], reason, "{row}");
        assert_eq!(row["namespace"], pod.spec.namespace.as_str(), "{row}");
    }

    let before = node.lab.imds_packets();
    let (_, tenant_cg) = node.cgroups_of(&tenant);
    let r = node
        .lab
        .probe_timeout(&tenant_cg, "tcp", IMDS4, 80, 1000)
        .unwrap();
    assert!(r.is_eperm(), "tenant sandbox must be refused: {}", r.raw);
    assert_eq!(
        node.lab.imds_packets(),
        before,
        "not one packet of the tenant sandbox may reach the metadata host"
    );
    for pod in [&system, &by_name] {
        let (_, cg) = node.cgroups_of(pod);
        let r = node.lab.probe_timeout(&cg, "tcp", IMDS4, 80, 1000).unwrap();
        assert!(
            r.ok,
            "{}/{} must reach the metadata host on its first connect: {}",
            pod.spec.namespace, pod.spec.name, r.raw
        );
    }
    assert!(
        node.lab.imds_packets() > before,
        "the exempt connects arrived"
    );

    let text = node.metrics_text();
    assert_eq!(
        metric(&text, "datalab_guard_runtime_up", None),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "datalab_guard_runtime_classified_pods", None),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "datalab_guard_runtime_errors_total", None),
        0.0
    );

    // The API comes back knowing the tenant pod: the API's verdict is the authority (here
    // the same verdict, from the API's reason), and the runtime no longer counts the pod.
    node.api.come_back();
    node.api.apply_pod(
        datalab_guard_tests::PodBuilder::new("tenant-a", "notebook-0")
            .uid(&tenant.spec.uid)
            .node(NODE)
            .qos_class("Burstable")
            .build(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while node.row(&tenant.spec.uid)["reason"] != "environment_namespace" {
        assert!(
            Instant::now() < deadline,
            "the API's verdict did not take over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        node.map_verdict(cgroup_id(&node.cgroups_of(&tenant).0))
            .as_deref(),
        Some("guard")
    );
    let text = node.metrics_text();
    assert_eq!(
        metric(&text, "datalab_guard_runtime_classified_pods", None),
        3.0,
        "{text}"
    );
}

/// The API server unreachable from the agent's start (a new node, a control-plane upgrade):
/// with nothing known of any namespace's labels, the kube-system sandbox is exempt by name
/// and the tenant sandbox guarded, both from the runtime alone, before anything in them
/// connects: the agent attaches before its first API sync (issue 9.1) and classifies new pod
/// cgroups from the runtime meanwhile.
#[test]
fn runtime_classifies_sandboxes_with_the_api_unreachable_from_start() {
    if !require_root() {
        return;
    }
    let mut node = RuntimeNode::new(None);
    node.make_api_unreachable();
    node.start_agent_unsynced();
    let system = node
        .cri()
        .run_pod(&PodSpec::new("kube-system", "aws-node-boot").host_network())
        .unwrap();
    let tenant = node
        .cri()
        .run_pod(&PodSpec::new("tenant-a", "notebook-boot"))
        .unwrap();
    assert_eq!(node.wait_for_entry(&system).0, "exempt");
    assert_eq!(node.wait_for_entry(&tenant).0, "guard");
    let before = node.lab.imds_packets();
    let (_, cg) = node.cgroups_of(&tenant);
    let r = node.lab.probe_timeout(&cg, "tcp", IMDS4, 80, 1000).unwrap();
    assert!(r.is_eperm(), "tenant sandbox must be refused: {}", r.raw);
    assert_eq!(node.lab.imds_packets(), before, "no tenant packet arrives");
    let (_, cg) = node.cgroups_of(&system);
    let r = node.lab.probe_timeout(&cg, "tcp", IMDS4, 80, 1000).unwrap();
    assert!(
        r.ok,
        "kube-system reaches the metadata host first time: {}",
        r.raw
    );
}

/// Pods that existed before the agent started and that the API does not know (a static
/// pod, whose mirror pod has not appeared) are classified from one listing at startup.
#[test]
fn runtime_listing_at_startup_classifies_existing_static_pods() {
    if !require_root() {
        return;
    }
    let mut node = RuntimeNode::new(None);
    let kms = node
        .cri()
        .run_pod(
            &PodSpec::new("kube-system", "kms-plugin-node-1")
                .host_network()
                .static_pod(),
        )
        .unwrap();
    let tenant = node
        .cri()
        .run_pod(&PodSpec::new("tenant-a", "early-0"))
        .unwrap();
    node.start_agent();
    assert_eq!(node.wait_for_entry(&kms).0, "exempt");
    assert_eq!(node.wait_for_entry(&tenant).0, "guard");
    let row = node.row(&kms.spec.uid);
    assert_eq!(row["reason"], "runtime:exempt_namespace", "{row}");
    let (_, cg) = node.cgroups_of(&kms);
    let r = node.lab.probe_timeout(&cg, "tcp", IMDS4, 80, 1000).unwrap();
    assert!(r.ok, "the static pod is exempt: {}", r.raw);
}

/// A runtime socket that answers garbage: the agent stays up, logs the failure once per
/// kind however many pod cgroups it asks about, counts every one, reports the runtime as
/// down, and exempts nothing because of it (the pods' cgroups keep the default, guard).
#[test]
fn a_garbage_runtime_socket_is_logged_once_and_exempts_nothing() {
    if !require_root() {
        return;
    }
    let junk_dir = std::env::temp_dir().join(format!("dg-junk-cri-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&junk_dir);
    std::fs::create_dir_all(&junk_dir).unwrap();
    let junk = junk_dir.join("junk.sock");
    let listener = std::os::unix::net::UnixListener::bind(&junk).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            use std::io::Write as _;
            let _ = conn.write_all(b"220 not grpc\r\n\x00\xff\xfe garbage\r\n");
        }
    });
    // A fake kubelet tree (cgroupfs names) of its own: no runtime behind these pods at all.
    let cgroup = TestCgroup::new().expect("cgroup");
    let root = cgroup.path().join("kubepods");
    std::fs::create_dir_all(root.join("burstable")).unwrap();
    std::fs::create_dir_all(root.join("besteffort")).unwrap();
    let mut node = RuntimeNode::new(Some(&junk.display().to_string()));
    node.start_agent_with_root(&root);

    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = root
            .join("burstable")
            .join(format!("pod{i:08x}-aaaa-4bbb-8ccc-dddddddddddd"));
        std::fs::create_dir(&dir).unwrap();
        dirs.push(dir);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = node.metrics_text();
        if metric(&text, "datalab_guard_runtime_errors_total", None) >= 3.0 {
            assert_eq!(
                metric(&text, "datalab_guard_runtime_up", None),
                0.0,
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runtime errors not counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for dir in &dirs {
        assert_eq!(
            node.map_verdict(cgroup_id(dir)),
            None,
            "no entry: guard by default"
        );
    }
    let warnings = node
        .agent()
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("container runtime lookup failed"))
        .collect::<Vec<_>>();
    let kinds: std::collections::HashSet<String> = warnings
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["kind"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        warnings.len(),
        kinds.len(),
        "one warning per error kind: {warnings:#?}"
    );
    assert!(!warnings.is_empty(), "the failure is logged");
    assert!(
        node.agent.as_mut().unwrap().try_status().is_none(),
        "the agent still runs"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&junk_dir);
}

/// The IPv4 address CNI gave a pod (its `eth0`).
fn pod_ipv4(pod: &LabPod) -> String {
    let netns = netns_name(pod);
    let out = std::process::Command::new("ip")
        .args(["-n", &netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on the pod's eth0: {text}"))
        .to_owned()
}

/// The name of a bridged pod's network namespace under /run/netns.
fn netns_name(pod: &LabPod) -> String {
    pod.netns
        .as_ref()
        .and_then(|p| p.file_name())
        .expect("a bridged pod has a named network namespace")
        .to_string_lossy()
        .into_owned()
}

/// Sends `kind` frames (AF_PACKET, bypassing every socket hook) to the metadata address from
/// the pod's network namespace, out of its `eth0` onto the CRI lab's bridge. The frames
/// carry UDP to port 9 with the broadcast MAC; the host never forwards a frame that was not
/// addressed to it, so without the edge layer they end on the lab's bridge.
fn send_raw_from(node: &RuntimeNode, pod: &LabPod, kind: &str) {
    let (_, sandbox) = node.cgroups_of(pod);
    let r = probe_in(&sandbox, Some(&netns_name(pod)), kind, IMDS4, 9, None).expect(kind);
    assert!(r.ok, "{kind} could not be sent: {}", r.raw);
}

/// `blocked_total{hook="edge"}`.
fn edge_blocked(node: &RuntimeNode) -> f64 {
    metric(
        &node.metrics_text(),
        "datalab_guard_blocked_total",
        Some(("hook", "edge")),
    )
}

/// Waits until the agent reports `want` pods covered by the edge layer.
fn wait_covered(node: &RuntimeNode, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics_text();
        if metric(&text, "datalab_guard_edge_pods", Some(("state", "covered"))) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "edge_pods{{state=covered}} never reached {want}:\n{}\nagent log:\n{}",
            text.lines()
                .filter(|l| l.contains("edge"))
                .collect::<Vec<_>>()
                .join("\n"),
            node.agent().stderr_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `blocked_total{hook="edge"}` reads `want` (the per-CPU counters are read on
/// every scrape), then checks it stays there.
fn assert_edge_blocked(node: &RuntimeNode, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge_blocked(node) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(edge_blocked(node), want, "edge drops");
}

/// The node agent's pod-edge layer on a real runtime's pods: containerd and the CNI bridge
/// make the pod's veth, the agent finds the pod's network namespace and attaches the edge
/// program to the host side. First with the pod's processes visible (hostPID), where it
/// finds the namespace through a process of the pod's cgroup; then, restarted in a PID
/// namespace of its own (a DaemonSet without hostPID), through the runtime's named
/// namespace that holds the pod's IP, which the API server reports. AF_PACKET frames to the
/// metadata address from the guarded pod are dropped at the edge and counted exactly; an
/// exempt bridged pod's are not touched.
#[test]
fn the_edge_layer_covers_runtime_pods_with_and_without_host_pids() {
    if !require_root() {
        return;
    }
    let mut node = RuntimeNode::new(None);
    node.start_agent();
    let tenant = node
        .cri()
        .run_pod(&PodSpec::new("tenant-a", "notebook-edge"))
        .unwrap();
    // Bridged, and exempt by name (like a CNI helper that is not hostNetwork).
    let exempt = node
        .cri()
        .run_pod(&PodSpec::new("cni-system", "helper-0"))
        .unwrap();
    assert_eq!(node.wait_for_entry(&tenant).0, "guard");
    assert_eq!(node.wait_for_entry(&exempt).0, "exempt");

    // hostPID: the namespace of a process in the pod's cgroup (the API knows no IP yet).
    wait_covered(&node, 1.0);
    let base = edge_blocked(&node);
    for kind in [
        "packet-raw",
        "packet-raw",
        "packet-raw-vlan",
        "packet-dgram",
    ] {
        send_raw_from(&node, &tenant, kind);
    }
    assert_edge_blocked(&node, base + 4.0);
    // The exempt pod's interface has no edge program: nothing of it is counted.
    send_raw_from(&node, &exempt, "packet-raw");
    send_raw_from(&node, &exempt, "packet-dgram");
    assert_edge_blocked(&node, base + 4.0);

    // Without hostPID: the agent sees no pod process; the API reports the pod's IP, and
    // the runtime's named namespace holding it is the pod's.
    let ip = pod_ipv4(&tenant);
    node.api.apply_pod(
        datalab_guard_tests::PodBuilder::new("tenant-a", "notebook-edge")
            .uid(&tenant.spec.uid)
            .node(NODE)
            .qos_class("Burstable")
            .pod_ip(&ip)
            .build(),
    );
    node.agent
        .take()
        .expect("agent")
        .kill9()
        .expect("kill the agent");
    node.start_agent_without_host_pids();
    wait_covered(&node, 1.0);
    let log = node.agent().stderr_lines().join("\n");
    assert!(
        log.contains("edge layer attached") && log.contains(&tenant.spec.uid),
        "the restarted agent did not attach itself:\n{log}"
    );
    let base = edge_blocked(&node);
    send_raw_from(&node, &tenant, "packet-raw");
    send_raw_from(&node, &tenant, "packet-dgram");
    assert_edge_blocked(&node, base + 2.0);
}

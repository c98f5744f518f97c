//! [`FakeNode`]: one Kubernetes node as the node agent sees it, for end-to-end tests of the
//! real `datalab-guard node` binary: a kubelet-style pod cgroup tree (systemd driver) under
//! a [`TestCgroup`], the API server fixture (reached through a kubeconfig), a private
//! bpffs, a state directory and a state file in a scratch directory, and a network [`Lab`]
//! whose tenant namespace routes only to a fake metadata host. Pod processes are placed in
//! container cgroups and probe the metadata address from the lab's tenant namespace.
//! Everything is removed on drop (the agent is killed first).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    apiserver::{rbac::Identity, FakeApiServer, PodBuilder},
    free_loopback_addr, Agent, BpffsDir, Lab, ProbeResult, TestCgroup,
};

/// The node's name (`--node-name`).
pub const NODE: &str = "node-1";
/// The label that makes a namespace an environment (the default selector).
pub const ENV_LABEL: (&str, &str) = ("datalab.io/environment", "true");
/// The fake metadata host's IPv4 address.
pub const IMDS4: &str = "169.254.169.254";
/// The config every agent starts with: fast audit and rescans, and the CNI probe off (it
/// would connect to the metadata address from the agent's own network namespace, here the
/// machine's; the probe has its own tests in network namespaces).
pub const BASE_CONFIG: &str =
    "audit:\n  eventsPerSecond: 1000\nrescanInterval: 1s\nprobe:\n  enabled: false\n";

/// A pod uid from a number (distinct per test, valid as a kubelet cgroup name).
pub fn uid(n: u32) -> String {
    format!("{n:08x}-1111-2222-3333-444455556666")
}

/// A 64-hex container id from a number.
pub fn container_id(n: u32) -> String {
    format!("{n:064x}")
}

/// The cgroup id (inode) of a directory.
pub fn cgroup_id(dir: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir).unwrap())
}

/// Polls `check` every 50 ms; panics naming `what` after `timeout`. Returns the time taken.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {timeout:?}");
}

/// The sum of a metric's samples (optionally only those with the label `k="v"`).
pub fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// See the module docs.
pub struct FakeNode {
    pub agent: Option<Agent>,
    pub bpffs: BpffsDir,
    pub cgroup: TestCgroup,
    /// The pods' root (`kubepods.slice`).
    pub root: PathBuf,
    pub metrics: SocketAddr,
    pub api: FakeApiServer,
    /// Scratch: kubeconfig, config.yaml, state.json, state/.
    pub dir: PathBuf,
    pub lab: Lab,
}

impl FakeNode {
    /// The namespaces `tenant-a` (an environment) and `kube-system` exist; the API server
    /// runs.
    #[expect(
        clippy::new_without_default,
        reason = "building one makes network namespaces, cgroups and a server: not a default"
    )]
    pub fn new() -> FakeNode {
        let mut lab = Lab::new().expect("lab");
        lab.start_fake_imds().expect("fake imds");
        let cgroup = TestCgroup::new().expect("cgroup");
        let root = cgroup.path().join("kubepods.slice");
        for qos in ["", "kubepods-burstable.slice", "kubepods-besteffort.slice"] {
            std::fs::create_dir_all(root.join(qos)).expect("qos slice");
        }
        let api = FakeApiServer::start();
        api.apply_namespace("tenant-a", &[ENV_LABEL]);
        api.apply_namespace("kube-system", &[]);
        let dir =
            std::env::temp_dir().join(format!("dg-node-{}-{}", std::process::id(), cgroup.id()));
        std::fs::create_dir_all(&dir).unwrap();
        // As the DaemonSet's ServiceAccount: the fixture enforces the manifests' RBAC.
        api.write_kubeconfig_as(dir.join("kubeconfig"), Identity::NodeAgent)
            .unwrap();
        std::fs::write(dir.join("config.yaml"), BASE_CONFIG).unwrap();
        FakeNode {
            agent: None,
            bpffs: BpffsDir::new().expect("bpffs"),
            cgroup,
            root,
            metrics: free_loopback_addr().unwrap(),
            api,
            dir,
            lab,
        }
    }

    /// The agent's pins (`--bpffs`).
    pub fn pins(&self) -> PathBuf {
        self.bpffs.path().join("guard")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The agent's state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts the agent and waits until it is ready.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let metrics = self.metrics;
        self.agent
            .as_mut()
            .expect("agent")
            .wait_ready(metrics, timeout)
            .expect("agent ready");
    }

    /// The agent's command line.
    pub fn args(&self) -> Vec<String> {
        vec![
            "node".to_owned(),
            "--node-name".into(),
            NODE.into(),
            "--kubeconfig".into(),
            self.dir.join("kubeconfig").display().to_string(),
            "--config".into(),
            self.config_path().display().to_string(),
            "--cgroup-root".into(),
            self.root.display().to_string(),
            "--bpffs".into(),
            self.pins().display().to_string(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
            "--state-file".into(),
            self.state_file().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ]
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn spawn(&mut self) {
        self.agent = Some(Agent::spawn(&self.args()).expect("spawn agent"));
    }

    /// Stops the agent with SIGTERM (as the kubelet does) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut agent) = self.agent.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.try_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            agent.try_status().is_some(),
            "the agent did not exit on SIGTERM"
        );
    }

    pub fn sighup(&self) {
        let pid = self.agent().pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(sent, 0);
    }

    /// `datalab-guard status` (text or JSON) with this node's pins and state file.
    pub fn status(&self, json: bool) -> std::process::Output {
        let pins = self.pins().display().to_string();
        let state = self.state_file().display().to_string();
        let mut args = vec!["status", "--bpffs", &pins, "--state-file", &state];
        if json {
            args.extend(["--output", "json"]);
        }
        Agent::run(&args).unwrap()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.status(true);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status json: {e}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent")
    }

    /// The pod's cgroup directory as the kubelet names it (systemd driver).
    pub fn pod_dir(&self, qos: &str, uid: &str) -> PathBuf {
        let uid = uid.replace('-', "_");
        match qos {
            "Guaranteed" => self.root.join(format!("kubepods-pod{uid}.slice")),
            "Burstable" => self
                .root
                .join("kubepods-burstable.slice")
                .join(format!("kubepods-burstable-pod{uid}.slice")),
            _ => self
                .root
                .join("kubepods-besteffort.slice")
                .join(format!("kubepods-besteffort-pod{uid}.slice")),
        }
    }

    /// Creates the pod's cgroup and one container cgroup (as containerd names it).
    pub fn make_cgroups(&self, qos: &str, uid: &str, container: &str) -> PathBuf {
        let dir = self
            .pod_dir(qos, uid)
            .join(format!("cri-containerd-{container}.scope"));
        std::fs::create_dir_all(&dir).expect("pod cgroup");
        dir
    }

    /// Tells the API server about a pod of this node.
    pub fn announce(
        &self,
        ns: &str,
        name: &str,
        qos: &str,
        uid: &str,
        container: &str,
        host_network: bool,
    ) {
        self.api.apply_pod(
            PodBuilder::new(ns, name)
                .uid(uid)
                .node(NODE)
                .qos_class(qos)
                .host_network(host_network)
                .container("main", Some(&format!("containerd://{container}")))
                .build(),
        );
    }

    /// One TCP/HTTP attempt from a process in `from` (a container cgroup) in the lab's
    /// tenant namespace.
    pub fn probe(&self, from: &Path, kind: &str, addr: &str) -> ProbeResult {
        self.lab
            .probe_timeout(from, kind, addr, 80, 1000)
            .unwrap_or_else(|e| panic!("probe: {e:#}"))
    }

    /// The verdict map: cgroup id → verdict name, read through `status`.
    pub fn verdicts(&self) -> std::collections::BTreeMap<u64, String> {
        let pins = self.pins().display().to_string();
        let out = Agent::run(&["status", "--output", "json", "--bpffs", &pins]).unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        report["verdicts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["cgroup_id"].as_u64()?, p["verdict"].as_str()?.to_owned())))
            .collect()
    }

    /// The cgroup ids in the verdict map.
    pub fn policy_ids(&self) -> Vec<u64> {
        self.verdicts().into_keys().collect()
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.agent = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

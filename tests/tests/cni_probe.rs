//! Privileged tests of the CNI enforcement probe (`datalab_guard::probe`) in a three-host
//! network made of namespaces this test creates:
//!
//! ```text
//!   pod namespace              node namespace (forwarding on)        metadata namespace
//!   eth0 ───────── veth ───────── vpod            vmeta ───── veth ───── eth0
//!   10.77.0.2/24                  10.77.0.1/24    169.254.0.1/16         169.254.169.254/16
//!   fd77::2/64                    fd77::1/64      fd00:ec2::1/64         fd00:ec2::254/64
//!   default via the node          nftables "CNI" forward rules           dg-fake-imds
//! ```
//!
//! The node namespace plays the agent's control (it reaches the metadata host directly); the
//! pod's traffic is forwarded by the node, where a CNI would enforce NetworkPolicy. Every
//! veth is created inside these namespaces, so nothing touches the machine's own network
//! namespace (TOOLCHAIN.md's test network rule), and [`Topology`]'s `Drop` kills the fake
//! server and deletes the namespaces (with their veths), also when a test fails.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use datalab_guard::{
    baseline_state::{CniState, NamespaceStates},
    config::{HumanDuration, ProbeConfig},
    probe::{self, ProbeOutcome, ProbeResult, ProbeSettings},
};
use datalab_guard_tests::{
    bins, cleanup_stale, names,
    process::{command_in, netns_path, run_checked, tool, with_netns_thread},
    require_root, TestCgroup,
};

const PREFIX: &str = "dgcni";
const POD_V4: &str = "10.77.0.2";

fn v4_target() -> SocketAddr {
    "169.254.169.254:80".parse().unwrap()
}

fn v6_target() -> SocketAddr {
    "[fd00:ec2::254]:80".parse().unwrap()
}

fn targets() -> Vec<SocketAddr> {
    vec![v4_target(), v6_target()]
}

/// Pod, node and (optionally) metadata-host namespaces; see the module docs.
struct Topology {
    pod: String,
    node: String,
    meta: Option<String>,
    created: Vec<String>,
    imds: Option<Child>,
    imds_log: Arc<Mutex<Vec<String>>>,
}

impl Topology {
    /// Builds the network; `metadata_host: false` leaves out the metadata namespace (the
    /// node has no route to 169.254.169.254 or fd00:ec2::254 at all).
    fn new(metadata_host: bool) -> Topology {
        let _ = cleanup_stale(PREFIX);
        let id = names::unique_name(PREFIX);
        let mut t = Topology {
            pod: format!("{id}-pod"),
            node: format!("{id}-node"),
            meta: metadata_host.then(|| format!("{id}-meta")),
            created: Vec::new(),
            imds: None,
            imds_log: Arc::new(Mutex::new(Vec::new())),
        };
        // On a panic below, `t` is dropped and removes what exists so far.
        t.build();
        t
    }

    fn build(&mut self) {
        let mut all = vec![self.pod.clone(), self.node.clone()];
        all.extend(self.meta.clone());
        for ns in &all {
            ip(&["netns", "add", ns]);
            self.created.push(ns.clone());
            // Before any interface exists, so v6 addresses are usable at once.
            sysctls(
                ns,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_ra", "0"),
                ],
            );
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Forwarding in the node namespace only.
        sysctls(
            &self.node,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
            ],
        );
        let (pod, node) = (self.pod.as_str(), self.node.as_str());
        ip(&[
            "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "vpod", "netns", node,
        ]);
        ip(&["-n", pod, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            pod,
            "-6",
            "addr",
            "add",
            "fd77::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", node, "addr", "add", "10.77.0.1/24", "dev", "vpod"]);
        ip(&[
            "-n",
            node,
            "-6",
            "addr",
            "add",
            "fd77::1/64",
            "dev",
            "vpod",
            "nodad",
        ]);
        ip(&["-n", pod, "link", "set", "eth0", "up"]);
        ip(&["-n", node, "link", "set", "vpod", "up"]);
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n", pod, "-6", "route", "add", "default", "via", "fd77::1", "dev", "eth0",
        ]);
        let mut links = vec![(pod.to_owned(), "eth0"), (node.to_owned(), "vpod")];
        if let Some(meta) = self.meta.clone() {
            let meta = meta.as_str();
            ip(&[
                "-n", node, "link", "add", "vmeta", "type", "veth", "peer", "name", "eth0",
                "netns", meta,
            ]);
            ip(&["-n", node, "addr", "add", "169.254.0.1/16", "dev", "vmeta"]);
            ip(&[
                "-n",
                node,
                "-6",
                "addr",
                "add",
                "fd00:ec2::1/64",
                "dev",
                "vmeta",
                "nodad",
            ]);
            ip(&[
                "-n",
                meta,
                "addr",
                "add",
                "169.254.169.254/16",
                "dev",
                "eth0",
            ]);
            ip(&[
                "-n",
                meta,
                "-6",
                "addr",
                "add",
                "fd00:ec2::254/64",
                "dev",
                "eth0",
                "nodad",
            ]);
            ip(&["-n", node, "link", "set", "vmeta", "up"]);
            ip(&["-n", meta, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                meta,
                "route",
                "add",
                "10.77.0.0/24",
                "via",
                "169.254.0.1",
                "dev",
                "eth0",
            ]);
            ip(&[
                "-n",
                meta,
                "-6",
                "route",
                "add",
                "fd77::/64",
                "via",
                "fd00:ec2::1",
                "dev",
                "eth0",
            ]);
            links.push((node.to_owned(), "vmeta"));
            links.push((meta.to_owned(), "eth0"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (ns, dev) in links {
            loop {
                let out = ip(&["-n", &ns, "link", "show", "dev", dev]);
                if out.contains("LOWER_UP") {
                    break;
                }
                assert!(Instant::now() < deadline, "{ns}: {dev} not up: {out}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn pod_netns(&self) -> PathBuf {
        netns_path(&self.pod)
    }

    fn node_netns(&self) -> PathBuf {
        netns_path(&self.node)
    }

    /// Starts `dg-fake-imds` (TCP port 80 on every address) in the metadata namespace.
    fn start_imds(&mut self) {
        let meta = self.meta.clone().expect("a metadata host");
        let bin = bins::fake_imds_bin().expect("dg-fake-imds is built");
        let mut cmd = command_in(None, Some(&meta), &[bin.as_os_str()]).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting dg-fake-imds");
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        self.imds = Some(child);
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "ready" {
                    let _ = ready_tx.send(());
                }
            }
        });
        let log = self.imds_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("dg-fake-imds printed `ready`");
    }

    /// Loads an nftables ruleset into the node namespace (the "CNI").
    fn node_nft(&self, ruleset: &str) {
        let mut cmd = command_in(None, Some(&self.node), &["nft", "-f", "-"]).unwrap();
        run_checked(
            &mut cmd,
            "nft -f - (node namespace)",
            Some(ruleset.as_bytes()),
        )
        .unwrap();
    }

    /// A CNI that enforces by dropping forwarded packets to the metadata endpoints.
    fn enforce_by_drop(&self) {
        self.node_nft(
            "table inet dgcni {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip daddr 169.254.169.254 drop
    ip6 daddr fd00:ec2::254 drop
  }
}
",
        );
    }

    /// Lines `dg-fake-imds` printed for TCP connections.
    fn imds_tcp_log(&self) -> Vec<String> {
        self.imds_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("tcp "))
            .cloned()
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut child) = self.imds.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.created.drain(..).rev() {
            let out = std::process::Command::new(tool("ip".as_ref()))
                .args(["netns", "del", &ns])
                .output();
            if !matches!(&out, Ok(o) if o.status.success()) {
                eprintln!("cni_probe: could not delete network namespace {ns}: {out:?}");
            }
        }
    }
}

fn ip(args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(tool("ip".as_ref()));
    cmd.args(args);
    let out = run_checked(&mut cmd, &format!("ip {}", args.join(" ")), None).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sysctls(ns: &str, settings: &[(&str, &str)]) {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    with_netns_thread(ns, move || {
        for (key, value) in &settings {
            std::fs::write(format!("/proc/sys/{key}"), value)?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("sysctls in {ns}: {e:#}"));
}

fn results(outcomes: &[ProbeOutcome]) -> Vec<ProbeResult> {
    outcomes.iter().map(|o| o.result).collect()
}

/// Probes the node (control) and the pod namespace, checking that outcomes come in target
/// order, and classifies.
fn probe_node_and_pod(
    t: &Topology,
    pod_netns: &Path,
    timeout: Duration,
) -> (Vec<ProbeOutcome>, Vec<ProbeOutcome>, CniState) {
    let node = probe::probe_in_netns(&t.node_netns(), &targets(), timeout);
    let pod = probe::probe_in_netns(pod_netns, &targets(), timeout);
    for outcomes in [&node, &pod] {
        let order: Vec<SocketAddr> = outcomes.iter().map(|o| o.target).collect();
        assert_eq!(order, targets());
    }
    let state = probe::classify(&node, &pod);
    (node, pod, state)
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cni_ignoring_the_policy_is_not_enforced() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new(true);
    t.start_imds();
    let (node, pod, state) = probe_node_and_pod(&t, &t.pod_netns(), Duration::from_secs(2));
    assert_eq!(results(&node), [ProbeResult::Connected; 2], "{node:?}");
    assert_eq!(results(&pod), [ProbeResult::Connected; 2], "{pod:?}");
    assert_eq!(state, CniState::NotEnforced);
    // The pod's connections reached the metadata host from the pod's own addresses, and
    // carried no data: the server read an empty request from each.
    wait_for(
        "the server to log the pod's connections",
        Duration::from_secs(5),
        || {
            let log = t.imds_tcp_log();
            log.iter().any(|l| l.starts_with(&format!("tcp {POD_V4}:")))
                && log.iter().any(|l| l.starts_with("tcp [fd77::2]:"))
        },
    );
    let log = t.imds_tcp_log();
    assert!(
        log.iter().all(|l| l.ends_with(": \"\"")),
        "the probe sent data: {log:?}"
    );
}

#[test]
fn cni_dropping_metadata_traffic_is_enforced() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new(true);
    t.start_imds();
    t.enforce_by_drop();
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let (node, pod, state) = probe_node_and_pod(&t, &t.pod_netns(), timeout);
    assert_eq!(results(&node), [ProbeResult::Connected; 2], "{node:?}");
    assert_eq!(results(&pod), [ProbeResult::TimedOut; 2], "{pod:?}");
    assert_eq!(state, CniState::Enforced);
    // Both targets waited on together: about one timeout per namespace, not one per target.
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
}

#[test]
fn cni_rejecting_metadata_traffic_is_enforced() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new(true);
    t.start_imds();
    t.node_nft(
        "table inet dgcni {
  chain forward {
    type filter hook forward priority 0; policy accept;
    meta l4proto tcp ip daddr 169.254.169.254 reject with tcp reset
    ip6 daddr fd00:ec2::254 reject with icmpv6 type admin-prohibited
  }
}
",
    );
    // The RST ends the v4 connect at once. The ICMPv6 error to the first SYN comes back while
    // the connecting thread still holds its socket, where TCP keeps it as a soft error only;
    // the one answering the SYN retransmitted after 1 s ends the connect. So the timeout must
    // exceed 1 s to see the refusal (with a shorter one it is a timeout: enforced all the same).
    let (node, pod, state) = probe_node_and_pod(&t, &t.pod_netns(), Duration::from_secs(2));
    assert_eq!(results(&node), [ProbeResult::Connected; 2], "{node:?}");
    assert_eq!(
        results(&pod),
        [
            ProbeResult::Refused(libc::ECONNREFUSED),
            ProbeResult::Refused(libc::EACCES)
        ],
        "{pod:?}"
    );
    assert_eq!(state, CniState::Enforced);
    let quick = probe::probe_in_netns(
        &t.pod_netns(),
        &[v4_target(), v6_target()],
        Duration::from_millis(300),
    );
    assert_eq!(
        results(&quick),
        [
            ProbeResult::Refused(libc::ECONNREFUSED),
            ProbeResult::TimedOut
        ]
    );
}

#[test]
fn no_metadata_host_is_inconclusive() {
    if !require_root() {
        return;
    }
    let t = Topology::new(false);
    let (node, pod, state) = probe_node_and_pod(&t, &t.pod_netns(), Duration::from_millis(500));
    // The node has no route there; the pod's packets die at the node.
    assert!(
        node.iter().all(|o| o.result != ProbeResult::Connected),
        "{node:?}"
    );
    assert!(
        pod.iter().all(|o| o.result != ProbeResult::Connected),
        "{pod:?}"
    );
    assert_eq!(state, CniState::Inconclusive);
}

#[test]
fn metadata_host_without_a_server_is_inconclusive() {
    if !require_root() {
        return;
    }
    // The host is there but nothing listens: the node is refused, so nothing can be judged
    // even though the pod is refused too.
    let t = Topology::new(true);
    let (node, _pod, state) = probe_node_and_pod(&t, &t.pod_netns(), Duration::from_secs(2));
    assert_eq!(
        results(&node),
        [ProbeResult::Refused(libc::ECONNREFUSED); 2],
        "{node:?}"
    );
    assert_eq!(state, CniState::Inconclusive);
}

#[test]
fn probe_enters_a_pod_process_namespace_found_through_its_cgroup() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new(true);
    t.start_imds();
    // A "pod" cgroup with one container holding a sleeper inside the pod namespace.
    let cg = TestCgroup::with_prefix(PREFIX).unwrap();
    let container = cg.child("pod-uid/ctr").unwrap();
    let mut cmd = command_in(Some(&container), Some(&t.pod), &["sleep", "600"]).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let sleeper = KillOnDrop(cmd.spawn().expect("starting the sleeper"));
    let netns = probe::netns_of_cgroup(cg.path()).expect("a process in the pod cgroup");
    assert_eq!(
        netns,
        PathBuf::from(format!("/proc/{}/ns/net", sleeper.0.id()))
    );
    assert_eq!(probe::netns_of_cgroup(&cg.child("empty").unwrap()), None);

    let (_, pod, state) = probe_node_and_pod(&t, &netns, Duration::from_millis(500));
    assert_eq!(results(&pod), [ProbeResult::Connected; 2], "{pod:?}");
    assert_eq!(state, CniState::NotEnforced);
    t.enforce_by_drop();
    let (_, pod, state) = probe_node_and_pod(&t, &netns, Duration::from_millis(500));
    assert_eq!(results(&pod), [ProbeResult::TimedOut; 2], "{pod:?}");
    assert_eq!(state, CniState::Enforced);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn named_namespaces_are_found_by_address() {
    if !require_root() {
        return;
    }
    let t = Topology::new(true);
    let index = probe::netns_addresses(Path::new(datalab_guard_tests::process::NETNS_DIR)).unwrap();
    let pod_ip: IpAddr = POD_V4.parse().unwrap();
    let with_pod_ip: Vec<&PathBuf> = index
        .iter()
        .filter(|(_, a)| a.contains(&pod_ip))
        .map(|(p, _)| p)
        .collect();
    // Other tests may run a namespace with the same address; ours must be among them.
    assert!(with_pod_ip.contains(&&t.pod_netns()), "{index:?}");
    let (_, pod_addrs) = index.iter().find(|(p, _)| *p == t.pod_netns()).unwrap();
    assert!(
        pod_addrs.contains(&"fd77::2".parse().unwrap()),
        "{pod_addrs:?}"
    );
    assert!(!pod_addrs.iter().any(|a| a.is_loopback()), "{pod_addrs:?}");
    let (_, node_addrs) = index.iter().find(|(p, _)| *p == t.node_netns()).unwrap();
    assert!(
        node_addrs.contains(&"169.254.0.1".parse().unwrap()),
        "{node_addrs:?}"
    );
    assert!(probe::netns_addresses(Path::new("/nonexistent-netns-dir")).is_err());
}

#[tokio::test]
async fn probe_loop_tracks_enforcement_changes() {
    if !require_root() {
        return;
    }
    let mut t = Topology::new(true);
    t.start_imds();
    let listed: Arc<Mutex<Vec<(String, PathBuf)>>> =
        Arc::new(Mutex::new(vec![("lab-a".to_owned(), t.pod_netns())]));
    type Change = (String, Option<CniState>, CniState);
    let changes: Arc<Mutex<Vec<Change>>> = Arc::default();
    let states = NamespaceStates::default();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let config = ProbeConfig {
        enabled: true,
        interval: HumanDuration::from_millis(200),
        jitter: HumanDuration::from_millis(50),
        timeout: HumanDuration::from_millis(300),
        port: 80,
    };
    let task = {
        let (listed, changes) = (listed.clone(), changes.clone());
        tokio::spawn(probe::run_probe_loop(
            tokio::sync::watch::channel(ProbeSettings::new(&config, targets())).1,
            t.node_netns(),
            move || listed.lock().unwrap().clone(),
            states.clone(),
            move |ns: &str, old, new| changes.lock().unwrap().push((ns.to_owned(), old, new)),
            shutdown_rx,
        ))
    };
    let cni = |states: &NamespaceStates| states.snapshot().get("lab-a").and_then(|s| s.cni);
    let wait = |what: &'static str, want: Option<CniState>| {
        let states = states.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cni(&states) != want {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait("not_enforced", Some(CniState::NotEnforced)).await;
    t.enforce_by_drop();
    wait("enforced", Some(CniState::Enforced)).await;
    // The pod is gone from this node: forgotten.
    listed.lock().unwrap().clear();
    wait("forgotten", None).await;
    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the loop stops on shutdown")
        .unwrap();
    assert_eq!(
        *changes.lock().unwrap(),
        [
            ("lab-a".to_owned(), None, CniState::NotEnforced),
            (
                "lab-a".to_owned(),
                Some(CniState::NotEnforced),
                CniState::Enforced
            ),
        ]
    );
}

#[tokio::test]
async fn probe_loop_marks_everything_inconclusive_when_the_node_cannot_reach_metadata() {
    if !require_root() {
        return;
    }
    let t = Topology::new(false);
    let states = NamespaceStates::default();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let pods = vec![
        ("lab-a".to_owned(), t.pod_netns()),
        ("lab-b".to_owned(), PathBuf::from("/nonexistent")),
    ];
    let config = ProbeConfig {
        enabled: true,
        interval: HumanDuration::from_secs(60),
        jitter: HumanDuration::from_millis(1),
        timeout: HumanDuration::from_millis(300),
        port: 80,
    };
    let task = tokio::spawn(probe::run_probe_loop(
        tokio::sync::watch::channel(ProbeSettings::new(&config, targets())).1,
        t.node_netns(),
        move || pods.clone(),
        states.clone(),
        |_: &str, _, _| {},
        shutdown_rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = states.snapshot();
        if snap.get("lab-a").and_then(|s| s.cni).is_some() {
            assert_eq!(snap["lab-a"].cni, Some(CniState::Inconclusive));
            assert_eq!(snap["lab-b"].cni, Some(CniState::Inconclusive));
            break;
        }
        assert!(Instant::now() < deadline, "no round finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

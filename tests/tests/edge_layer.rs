//! The pod-edge layer end to end: the real `datalab-guard local --edge-iface` with the edge
//! program on the host side of a pod-like namespace's veth pair. Needs root.
//!
//! Topology (the kit's [`Lab`] plus a second pod): the tenant namespace is the guarded pod;
//! the metadata namespace plays the node, holding every pod's veth peer, and is also the
//! metadata host, whose nftables ingress counters run *after* tc ingress — so a frame the
//! edge program drops is never counted, and "zero arrivals" means nothing got past the edge.
//! AF_PACKET senders (raw, raw with an 802.1Q tag, dgram; IPv4 and IPv6) bypass every socket
//! hook, so without the edge layer the same frames arrive: the first phase proves it.

use std::{net::SocketAddr, path::Path, time::Duration};

use datalab_guard_tests::{
    free_loopback_addr, http_get,
    lab::{IMDS_IF, POD2_HOST_IF},
    probe_in,
    process::{command_in, run_checked, with_netns_thread},
    require_root, Agent, BpffsDir, Lab, TestCgroup,
};

const IMDS4: &str = "169.254.169.254";
const IMDS6: &str = "fd00:ec2::254";
const OTHER4: &str = "192.0.2.1";

/// Fields drop in order: agent, pins, cgroup, network (each cleans up on drop, also when
/// an assertion failed).
struct EdgeLab {
    agent: Option<Agent>,
    bpffs: BpffsDir,
    cgroup: TestCgroup,
    metrics: SocketAddr,
    pod2_ns: String,
    lab: Lab,
}

impl EdgeLab {
    fn new() -> EdgeLab {
        let mut lab = Lab::new().expect("lab");
        lab.start_fake_imds().expect("fake imds");
        let pod2_ns = lab.add_second_pod().expect("second pod");
        EdgeLab {
            agent: None,
            bpffs: BpffsDir::new().expect("bpffs dir"),
            cgroup: TestCgroup::new().expect("cgroup"),
            metrics: free_loopback_addr().expect("port"),
            pod2_ns,
            lab,
        }
    }

    fn bpffs_arg(&self) -> String {
        self.bpffs.path().join("dg").display().to_string()
    }

    /// Starts `local` in the "node" (metadata) namespace, with the edge layer on `edge`.
    fn start_agent(&mut self, edge: &[&str], envs: &[(&str, &str)]) {
        let mut args = vec![
            "local".to_string(),
            "--cgroup".into(),
            self.cgroup.path().display().to_string(),
            "--bpffs".into(),
            self.bpffs_arg(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
        ];
        for iface in edge {
            args.extend(["--edge-iface".to_string(), (*iface).to_string()]);
        }
        let mut agent =
            Agent::spawn_in_netns(self.lab.imds_ns(), &args, envs).expect("spawn agent");
        agent
            .wait_ready_in_netns(self.lab.imds_ns(), self.metrics, Duration::from_secs(30))
            .expect("agent ready");
        self.agent = Some(agent);
    }

    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.sigterm().expect("sigterm");
            agent
                .wait_exit(Duration::from_secs(10))
                .expect("agent exit");
        }
    }

    fn metrics_text(&self) -> String {
        let (ns, addr) = (self.lab.imds_ns().to_string(), self.metrics);
        with_netns_thread(&ns, move || {
            let r = http_get(addr, "/metrics", Duration::from_secs(5))?;
            anyhow::ensure!(r.status == 200, "GET /metrics: {}", r.status);
            Ok(r.body)
        })
        .expect("metrics")
    }

    fn edge_blocked(&self, family: &str) -> u64 {
        metric_sum(
            &self.metrics_text(),
            "datalab_guard_blocked_total",
            &[("hook", "edge"), ("family", family)],
        )
    }

    /// One AF_PACKET frame of `kind` to `addr` from the guarded pod (in the guarded cgroup:
    /// it makes no difference at the edge, which judges by interface).
    fn send(&self, kind: &str, addr: &str) {
        let r = self
            .lab
            .probe(self.cgroup.path(), kind, addr, 9)
            .expect(kind);
        assert!(r.ok, "{kind} to {addr} could not be sent: {}", r.raw);
    }

    fn send_from_pod2(&self, kind: &str, addr: &str) {
        let r = probe_in(self.cgroup.path(), Some(&self.pod2_ns), kind, addr, 9, None).expect(kind);
        assert!(r.ok, "{kind} from pod2 could not be sent: {}", r.raw);
    }

    fn imds_v4(&self) -> u64 {
        self.lab.counters().expect("counters").imds_v4
    }

    fn imds_v6(&self) -> u64 {
        self.lab.counters().expect("counters").imds_v6
    }

    /// Runs `datalab-guard ARGS` to completion in the node namespace (any exit code).
    fn run_in_node(&self, args: &[&str]) -> std::process::Output {
        let bin = Agent::bin().expect("agent bin");
        let mut argv = vec![bin.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        command_in(None, Some(self.lab.imds_ns()), &argv)
            .expect("command")
            .output()
            .expect("datalab-guard run")
    }

    /// `status --output json`'s `raw_paths`.
    fn raw_paths_status(&self) -> String {
        let out = self.run_in_node(&["status", "--output", "json", "--bpffs", &self.bpffs_arg()]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status JSON: {e}: {out:?}"));
        v["raw_paths"].as_str().unwrap_or_default().to_string()
    }

    /// The tcx programs on `iface`'s ingress; 0 on a kernel without tcx (before 6.6, e.g.
    /// Debian 12's 6.1 in the VM step), where the query itself is refused.
    fn tcx_programs(&self, iface: &'static str) -> usize {
        if !kernel_has_tcx() {
            return 0;
        }
        with_netns_thread(self.lab.imds_ns(), move || {
            let (_, progs) = aya::programs::SchedClassifier::query_tcx(
                iface,
                aya::programs::TcAttachType::Ingress,
            )?;
            Ok(progs.len())
        })
        .expect("query tcx")
    }

    /// Edge programs attached to `iface`'s ingress either way: tcx programs plus clsact
    /// filters running `dg_edge` (one line each in `tc filter show`).
    fn edge_attachments(&self, iface: &'static str) -> usize {
        let filters = self.tc_filters(iface);
        let clsact = filters.lines().filter(|l| l.contains("dg_edge")).count();
        self.tcx_programs(iface) + clsact
    }

    fn tc_filters(&self, iface: &str) -> String {
        let mut cmd = command_in(
            None,
            Some(self.lab.imds_ns()),
            &["tc", "filter", "show", "dev", iface, "ingress"],
        )
        .expect("command");
        let out = run_checked(&mut cmd, "tc filter show", None).expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// tcx came with Linux 6.6; below it the edge layer must fall back to clsact by itself.
fn kernel_has_tcx() -> bool {
    let version = aya::util::KernelVersion::current().expect("kernel version");
    version >= aya::util::KernelVersion::new(6, 6, 0)
}

fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn edge_pins(bpffs: &Path) -> Vec<String> {
    match std::fs::read_dir(bpffs.join("dg/edge")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Without the edge layer AF_PACKET frames from the guarded pod reach the metadata host
/// (the cgroup hooks never see them); with it none does, whatever the framing, counted
/// exactly as `hook="edge"`; normal traffic still flows; a pod whose interface is not listed
/// is unaffected; enforcement survives the agent's death and is adopted (not duplicated) by
/// the next one; `uninstall` removes it and frames arrive again.
#[test]
fn af_packet_frames_from_a_guarded_pod_are_dropped_at_its_veth_peer() {
    if !require_root() {
        return;
    }
    let mut t = EdgeLab::new();

    // 1. The cgroup layer alone: the same frame arrives (so this test can fail).
    t.start_agent(&[], &[]);
    let before = t.imds_v4();
    t.send("packet-raw", IMDS4);
    assert_eq!(
        t.imds_v4() - before,
        1,
        "without the edge layer an AF_PACKET frame must arrive"
    );
    t.stop_agent();
    assert_eq!(t.raw_paths_status(), "neither");

    // 2. With the edge layer on the pod's veth peer.
    t.start_agent(&[IMDS_IF], &[]);
    let pins = edge_pins(t.bpffs.path());
    assert_eq!(pins.len(), 1, "one edge record: {pins:?}");
    // Without the test knob: tcx where the kernel has it, clsact by itself where not.
    let clsact = pins[0].contains("-tc-");
    eprintln!(
        "edge backend chosen on this kernel: {}",
        if clsact { "clsact" } else { "tcx" }
    );
    assert_eq!(clsact, !kernel_has_tcx(), "backend record {pins:?}");
    assert_eq!(t.edge_attachments(IMDS_IF), 1);
    let (v4_before, v6_before) = (t.imds_v4(), t.imds_v6());
    let (mut sent_v4, mut sent_v6) = (0, 0);
    for _ in 0..3 {
        t.send("packet-raw", IMDS4);
        t.send("packet-dgram", IMDS4);
        t.send("packet-raw-vlan", IMDS4);
        sent_v4 += 3;
        t.send("packet-raw", IMDS6);
        t.send("packet-dgram", IMDS6);
        sent_v6 += 2;
    }
    assert_eq!(t.imds_v4() - v4_before, 0, "IPv4 frames got past the edge");
    assert_eq!(t.imds_v6() - v6_before, 0, "IPv6 frames got past the edge");
    assert_eq!(t.edge_blocked("ipv4"), sent_v4);
    assert_eq!(t.edge_blocked("ipv6"), sent_v6);
    assert_eq!(t.raw_paths_status(), "edge_layer");
    let check = t.run_in_node(&["check", "--bpffs", &t.bpffs_arg()]);
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains("raw paths (AF_PACKET, AF_XDP) closed by: edge layer (1 pod interface)"),
        "{check}"
    );

    // Normal traffic through the edge program is untouched.
    let r = t.lab.probe(t.cgroup.path(), "http", OTHER4, 80).unwrap();
    assert!(r.ok, "normal traffic must pass the edge layer: {}", r.raw);

    // A pod whose interface is not listed: its frames arrive, no edge counter moves.
    let v4 = t.imds_v4();
    t.send_from_pod2("packet-raw", IMDS4);
    t.send_from_pod2("packet-dgram", IMDS4);
    assert_eq!(
        t.imds_v4() - v4,
        2,
        "the unlisted interface must be unaffected"
    );
    assert_eq!(t.edge_attachments(POD2_HOST_IF), 0);
    assert_eq!(t.edge_blocked("ipv4"), sent_v4);

    // 3. The agent dies: the pinned link keeps dropping.
    t.agent.as_mut().unwrap().kill9().unwrap();
    t.agent = None;
    let v4 = t.imds_v4();
    t.send("packet-raw", IMDS4);
    assert_eq!(t.imds_v4() - v4, 0, "dropped while the agent is down");
    sent_v4 += 1;

    // 4. A new agent adopts the link: still one program on the interface, still dropping,
    //    and the counters kept what the dead agent's program counted.
    t.start_agent(&[IMDS_IF], &[]);
    assert_eq!(
        t.edge_attachments(IMDS_IF),
        1,
        "adopted, not attached twice"
    );
    t.send("packet-dgram", IMDS4);
    sent_v4 += 1;
    assert_eq!(t.imds_v4() - v4, 0);
    assert_eq!(t.edge_blocked("ipv4"), sent_v4);
    t.stop_agent();

    // 5. uninstall removes the edge layer too: frames arrive again.
    let out = t.run_in_node(&["uninstall", "--bpffs", &t.bpffs_arg()]);
    assert!(out.status.success(), "{out:?}");
    assert!(edge_pins(t.bpffs.path()).is_empty());
    assert_eq!(t.edge_attachments(IMDS_IF), 0);
    let v4 = t.imds_v4();
    t.send("packet-raw", IMDS4);
    assert_eq!(
        t.imds_v4() - v4,
        1,
        "after uninstall the frame arrives again"
    );
}

/// AF_XDP in copy mode (`dg-probe xdp-tx`: UMEM, TX and completion rings, bound with
/// `XDP_COPY` to queue 0 of the pod's veth): without the edge layer its frames reach the
/// metadata host (which proves the sender sends: the rest of the test cannot pass
/// vacuously); with it none does, counted exactly as `hook="edge"`; a pod whose interface is
/// not listed still gets its AF_XDP frames through.
#[test]
fn af_xdp_frames_from_a_guarded_pod_are_dropped_at_its_veth_peer() {
    if !require_root() {
        return;
    }
    let mut t = EdgeLab::new();

    // 1. The cgroup layer alone: AF_XDP frames arrive, IPv4 and IPv6.
    t.start_agent(&[], &[]);
    let (v4, v6) = (t.imds_v4(), t.imds_v6());
    t.send("xdp-tx", IMDS4);
    t.send("xdp-tx", IMDS6);
    assert_eq!(
        t.imds_v4() - v4,
        1,
        "without the edge layer an AF_XDP frame must arrive"
    );
    assert_eq!(
        t.imds_v6() - v6,
        1,
        "without the edge layer an AF_XDP frame must arrive"
    );
    t.stop_agent();

    // 2. With the edge layer on the pod's veth peer: nothing gets past it.
    t.start_agent(&[IMDS_IF], &[]);
    let (v4, v6) = (t.imds_v4(), t.imds_v6());
    for _ in 0..3 {
        t.send("xdp-tx", IMDS4);
        t.send("xdp-tx", IMDS6);
    }
    assert_eq!(t.imds_v4() - v4, 0, "IPv4 AF_XDP frames got past the edge");
    assert_eq!(t.imds_v6() - v6, 0, "IPv6 AF_XDP frames got past the edge");
    assert_eq!(t.edge_blocked("ipv4"), 3);
    assert_eq!(t.edge_blocked("ipv6"), 3);

    // 3. The pod whose interface is not listed: the same sender gets through.
    t.send_from_pod2("xdp-tx", IMDS4);
    assert_eq!(
        t.imds_v4() - v4,
        1,
        "the unlisted interface must be unaffected"
    );
    assert_eq!(t.edge_blocked("ipv4"), 3);
    t.stop_agent();
}

/// Where the kernel has no tcx the edge layer uses a clsact filter; forced here with the
/// test knob. Same drops and counts; a restart replaces the filter in place; uninstall
/// removes it.
#[test]
fn the_clsact_fallback_drops_the_same_frames() {
    if !require_root() {
        return;
    }
    let mut t = EdgeLab::new();
    let clsact = [("DATALAB_GUARD_EDGE_CLSACT", "1")];
    t.start_agent(&[IMDS_IF], &clsact);
    assert_eq!(t.tcx_programs(IMDS_IF), 0, "no tcx link with the knob set");
    let filters = t.tc_filters(IMDS_IF);
    assert_eq!(
        filters.matches("dg_edge").count(),
        2,
        "one filter:\n{filters}"
    );
    let pins = edge_pins(t.bpffs.path());
    assert!(
        pins.len() == 1 && pins[0].contains("-tc-"),
        "one clsact record: {pins:?}"
    );

    let v4 = t.imds_v4();
    t.send("packet-raw", IMDS4);
    t.send("packet-dgram", IMDS4);
    assert_eq!(t.imds_v4() - v4, 0);
    assert_eq!(t.edge_blocked("ipv4"), 2);

    t.stop_agent();
    t.start_agent(&[IMDS_IF], &clsact);
    let filters = t.tc_filters(IMDS_IF);
    assert_eq!(
        filters.matches("dg_edge").count(),
        2,
        "replaced in place:\n{filters}"
    );
    t.send("packet-raw-vlan", IMDS4);
    assert_eq!(t.imds_v4() - v4, 0);
    assert_eq!(t.edge_blocked("ipv4"), 3);
    t.stop_agent();

    let out = t.run_in_node(&["uninstall", "--bpffs", &t.bpffs_arg()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!t.tc_filters(IMDS_IF).contains("dg_edge"));
    t.send("packet-raw", IMDS4);
    assert_eq!(
        t.imds_v4() - v4,
        1,
        "after uninstall the frame arrives again"
    );
}

/// Bad input: an interface that does not exist, or is not Ethernet, is refused with exit
/// code 2 before anything is attached.
#[test]
fn edge_iface_bad_input_exits_2_and_attaches_nothing() {
    if !require_root() {
        return;
    }
    let t = EdgeLab::new();
    for iface in ["no-such-if0", "lo", "this-name-is-far-too-long"] {
        let bin = Agent::bin().unwrap();
        let cgroup = t.cgroup.path().display().to_string();
        let bpffs = t.bpffs_arg();
        let argv = [
            bin.display().to_string(),
            "local".into(),
            "--cgroup".into(),
            cgroup,
            "--bpffs".into(),
            bpffs,
            "--edge-iface".into(),
            iface.into(),
        ];
        let out = command_in(None, Some(t.lab.imds_ns()), &argv)
            .unwrap()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{iface}: {stderr}");
        assert!(stderr.contains("--edge-iface"), "{iface}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            !t.bpffs.path().join("dg").exists(),
            "nothing pinned for {iface}"
        );
    }
}

/// Node mode's wiring, driven directly: from the "node" namespace, a guarded pod's network
/// namespace is found from a process in its cgroup, the host side of its veth from the
/// pod's interface (and confirmed from the node's side), and the edge program attached
/// there; a hostNetwork pod and a pod with no process are reported uncovered (never an
/// error); when the pod stops being guarded the program goes and frames arrive again.
#[test]
fn node_mode_finds_a_guarded_pods_veth_peer_from_its_cgroup_and_attaches_there() {
    use datalab_guard::{
        bpf::{testrun::TestRunner, PinLayout},
        node::edge::{GuardedPod, NodeEdge},
    };
    use datalab_guard_common::{cidr::Cidr, Mode, Verdict};

    if !require_root() {
        return;
    }
    let t = EdgeLab::new();
    let pod_dir = t.cgroup.child("pod-a").unwrap();
    let empty_dir = t.cgroup.child("pod-empty").unwrap();
    let _sleeper = datalab_guard_tests::process::Reaped(
        datalab_guard_tests::process::spawn_in(&pod_dir, Some(t.lab.tenant_ns()), &["sleep", "60"])
            .unwrap(),
    );
    let pins = t.bpffs.path().join("node");
    let mut runner = TestRunner::new(&pins).unwrap();
    let blocked: Vec<Cidr> = ["169.254.169.254/32", "fd00:ec2::254/128"]
        .iter()
        .map(|c| datalab_guard::blocklist::parse_cidr(c).unwrap())
        .collect();
    runner
        .configure(&blocked, Mode::Enforce, Verdict::Guard, &Default::default())
        .unwrap();
    let pod = |uid: &str, dir: &Path, host_network: bool| GuardedPod {
        uid: uid.into(),
        cgroup_id: datalab_guard_tests::cgroup_id(dir).unwrap(),
        class: 0,
        dir: Some(dir.to_path_buf()),
        ip: None,
        host_network,
    };
    let pods = vec![
        pod("uid-a", &pod_dir, false),
        pod("uid-host", &pod_dir, true),
        pod("uid-empty", &empty_dir, false),
    ];
    let layout = PinLayout::new(&pins);
    let (edge_tx, edge_rx) = std::sync::mpsc::channel::<Vec<GuardedPod>>();
    let (sample_tx, sample_rx) = std::sync::mpsc::channel();
    // The node's agent thread: everything NodeEdge does runs in the "node" namespace.
    let ns = t.lab.imds_ns().to_string();
    let worker = std::thread::spawn(move || {
        with_netns_thread(&ns, move || {
            let mut edge = NodeEdge::new(layout, "/nonexistent-netns-dir".into());
            while let Ok(pods) = edge_rx.recv() {
                edge.sync(&pods);
                edge.count_net_raw(&pods, false);
                sample_tx.send(edge.sample()).unwrap();
            }
            Ok(())
        })
    });

    edge_tx.send(pods.clone()).unwrap();
    let sample = sample_rx.recv().unwrap();
    assert_eq!(sample.attached, 1, "{sample:?}");
    let uncovered: std::collections::BTreeMap<_, _> = sample.uncovered.iter().copied().collect();
    assert_eq!(uncovered["host_network"], 1, "{sample:?}");
    assert_eq!(uncovered["netns_unknown"], 1, "{sample:?}");
    // The sleeper runs as root with CAP_NET_RAW: counted for the uncovered hostNetwork
    // entry (same cgroup), not for the covered pod; the empty pod has no process to judge.
    assert_eq!(sample.net_raw_uncovered, Some(1), "{sample:?}");
    assert_eq!(t.edge_attachments(IMDS_IF), 1);
    let v4 = t.imds_v4();
    t.send("packet-raw", IMDS4);
    t.send("packet-dgram", IMDS4);
    assert_eq!(
        t.imds_v4() - v4,
        0,
        "the node-mode attachment drops the frames"
    );

    // Resynced once the first retry is due (1 s): the pod without a process is tried again,
    // the hostNetwork one never is, and nothing is attached twice.
    std::thread::sleep(Duration::from_millis(1200));
    edge_tx.send(pods.clone()).unwrap();
    let again = sample_rx.recv().unwrap();
    let failures = |s: &datalab_guard::metrics::EdgeSample, reason: &str| {
        s.failures
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(
        failures(&again, "netns_unknown"),
        failures(&sample, "netns_unknown") + 1,
        "{again:?}"
    );
    assert_eq!(
        failures(&again, "host_network"),
        failures(&sample, "host_network"),
        "{again:?}"
    );
    assert_eq!(t.edge_attachments(IMDS_IF), 1);
    // At once again: the retry has backed off to 2 s, so nothing is tried.
    edge_tx.send(pods).unwrap();
    let third = sample_rx.recv().unwrap();
    assert_eq!(third.failures, again.failures);

    // No longer guarded: detached, frames arrive.
    edge_tx.send(Vec::new()).unwrap();
    assert_eq!(sample_rx.recv().unwrap().attached, 0);
    assert_eq!(t.edge_attachments(IMDS_IF), 0);
    t.send("packet-raw", IMDS4);
    assert_eq!(t.imds_v4() - v4, 1);
    drop(edge_tx);
    worker.join().unwrap().unwrap();
    drop(runner);
}

/// Bad input at a pod's edge: an interface that is gone by the time the layer attaches (a
/// pod deleted while the agent looked it up) is reported as gone, which node mode counts as
/// `interface_gone`, and the attempt leaves nothing: no EDGE entry, no pinned link.
#[test]
fn an_interface_gone_before_the_attach_is_reported_and_leaves_nothing() {
    use datalab_guard::bpf::{
        edge::{EdgeError, EdgeLayer, Preference},
        PinLayout,
    };
    use datalab_guard_common::EdgeEntry;

    if !require_root() {
        return;
    }
    let bpffs = BpffsDir::new().expect("bpffs dir");
    let layout = PinLayout::new(bpffs.path().join("dg"));
    layout.create_dirs().expect("pin dirs");
    let mut layer = EdgeLayer::new(&layout, Preference::from_env()).expect("edge layer");
    let entry = EdgeEntry {
        verdict: 0,
        class: 0,
        cgroup_id: 1,
    };
    let err = layer
        .attach("dg-gone0", entry)
        .expect_err("no such interface");
    assert!(
        matches!(&err, EdgeError::InterfaceGone(name) if name == "dg-gone0"),
        "{err}"
    );
    assert!(layer.entries().expect("entries").is_empty());
    assert!(
        edge_pins(bpffs.path()).is_empty(),
        "{:?}",
        edge_pins(bpffs.path())
    );
}

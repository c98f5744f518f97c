//! End to end: the real `datalab-guard local` binary guarding a cgroup whose processes run
//! in a test network namespace routed only to a fake metadata host (see the kit). Every
//! protocol is tried from a guarded cgroup; the fake host counts what arrives. Needs root.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use datalab_guard_tests::{
    free_loopback_addr, require_root, Agent, BpffsDir, Lab, ProbeResult, TestCgroup,
};

const IMDS4: &str = "169.254.169.254";
const IMDS6: &str = "fd00:ec2::254";
const OTHER4: &str = "192.0.2.1";
const OTHER6: &str = "2001:db8::1";

/// One guarded sandbox. Fields drop in order: agent, pins, cgroups, network.
struct Sandbox {
    agent: Option<Agent>,
    bpffs: BpffsDir,
    cgroup: TestCgroup,
    guarded: PathBuf,
    exempt: PathBuf,
    metrics: SocketAddr,
    lab: Lab,
}

impl Sandbox {
    fn new() -> Sandbox {
        let mut lab = Lab::new().expect("lab");
        lab.start_fake_imds().expect("fake imds");
        let cgroup = TestCgroup::new().expect("cgroup");
        let guarded = cgroup.child("tenant").expect("tenant cgroup");
        let exempt = cgroup.child("exempt").expect("exempt cgroup");
        let bpffs = BpffsDir::new().expect("bpffs dir");
        let metrics = free_loopback_addr().expect("port");
        Sandbox {
            agent: None,
            bpffs,
            cgroup,
            guarded,
            exempt,
            metrics,
            lab,
        }
    }

    fn base_args(&self) -> Vec<String> {
        vec![
            "local".into(),
            "--cgroup".into(),
            self.cgroup.path().display().to_string(),
            "--exempt".into(),
            self.exempt.display().to_string(),
            "--bpffs".into(),
            self.bpffs.path().join("guard").display().to_string(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
            "--audit-rate".into(),
            "1000".into(),
        ]
    }

    fn start(&mut self, extra: &[&str]) {
        let mut args = self.base_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = Agent::spawn(&args).expect("spawn agent");
        agent
            .wait_ready(self.metrics, Duration::from_secs(20))
            .expect("agent ready");
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.path().join("guard")
    }

    fn probe(&self, from: &std::path::Path, kind: &str, addr: &str) -> ProbeResult {
        self.lab
            .probe_timeout(from, kind, addr, 80, 1000)
            .unwrap_or_else(|e| panic!("probe {kind} {addr}: {e:#}"))
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let pins = self.pins().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--bpffs", pins.as_str()]);
        Agent::run(&all).expect("run datalab-guard")
    }
}

fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Every protocol from the guarded cgroup: nothing reaches the metadata host, syscalls fail
/// with EPERM at once, other destinations and the exempt cgroup still work, and metrics and
/// audit lines account for each attempt.
#[test]
fn guarded_cgroup_cannot_reach_metadata_by_any_protocol() {
    if !require_root() {
        return;
    }
    let mut sb = Sandbox::new();
    sb.start(&[]);
    let before = sb.lab.imds_packets();

    // (kind, address, expected (family, hook) counted in-kernel by the syscall hooks)
    let syscall_attempts = [
        ("tcp", IMDS4, "ipv4", "connect"),
        ("http", IMDS4, "ipv4", "connect"),
        ("tcp", IMDS6, "ipv6", "connect"),
        ("udp-connected", IMDS4, "ipv4", "connect"),
        ("udp-connected", IMDS6, "ipv6", "connect"),
        ("udp-sendto", IMDS4, "ipv4", "sendmsg"),
        ("udp-sendto", IMDS6, "ipv6", "sendmsg"),
        ("tcp-v4mapped", IMDS4, "ipv6", "connect"),
        // udpv6_sendmsg hands v4-mapped destinations to the IPv4 path before its hook.
        ("udp-v4mapped-sendto", IMDS4, "ipv4", "sendmsg"),
        ("tcp-fastopen", IMDS4, "ipv4", "connect"),
    ];
    for (kind, addr, _, _) in syscall_attempts {
        let r = sb.probe(&sb.guarded, kind, addr);
        assert!(!r.ok, "{kind} to {addr} got through: {}", r.raw);
        assert!(
            r.is_eperm(),
            "{kind} to {addr} should fail with EPERM: {}",
            r.raw
        );
    }
    // No syscall hook for these: the egress program drops the packets themselves.
    for (kind, addr) in [("icmp", IMDS4), ("icmp6", IMDS6), ("raw-hdrincl", IMDS4)] {
        let r = sb.probe(&sb.guarded, kind, addr);
        assert!(!r.ok, "{kind} to {addr} got through: {}", r.raw);
    }
    // TCP connects fail fast (no hanging on dropped SYNs).
    for addr in [IMDS4, IMDS6] {
        let r = sb.probe(&sb.guarded, "tcp", addr);
        assert!(
            r.is_eperm() && r.elapsed_ms < 100.0,
            "slow or wrong refusal: {}",
            r.raw
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sb.lab.imds_packets(),
        before,
        "packets reached the metadata host"
    );

    // Other destinations and the exempt cgroup are untouched.
    for (kind, addr) in [
        ("http", OTHER4),
        ("tcp", OTHER6),
        ("udp-sendto", OTHER4),
        ("icmp", OTHER4),
    ] {
        let r = sb.probe(&sb.guarded, kind, addr);
        assert!(r.ok, "guarded {kind} to {addr} should work: {}", r.raw);
    }
    for (kind, addr) in [("http", IMDS4), ("tcp", IMDS6), ("udp-sendto", IMDS4)] {
        let r = sb.probe(&sb.exempt, kind, addr);
        assert!(r.ok, "exempt {kind} to {addr} should work: {}", r.raw);
    }
    assert!(
        sb.lab.imds_packets() > before,
        "the exempt cgroup's packets should arrive"
    );

    // Metrics: exact per (family, hook) for the syscall hooks, and egress drops counted.
    let metrics = sb.agent().metrics(sb.metrics).expect("metrics");
    for (family, hook) in [
        ("ipv4", "connect"),
        ("ipv6", "connect"),
        ("ipv4", "sendmsg"),
        ("ipv6", "sendmsg"),
    ] {
        let expected = syscall_attempts
            .iter()
            .filter(|a| a.2 == family && a.3 == hook)
            .count() as u64
            + if hook == "connect" && family == "ipv4" {
                1
            } else {
                0
            }
            + if hook == "connect" && family == "ipv6" {
                1
            } else {
                0
            };
        let got = metric_sum(
            &metrics,
            "datalab_guard_blocked_total",
            &[("family", family), ("hook", hook)],
        );
        assert_eq!(
            got, expected,
            "blocked_total{{family={family},hook={hook}}}\n{metrics}"
        );
    }
    assert!(
        metric_sum(
            &metrics,
            "datalab_guard_blocked_total",
            &[("hook", "egress")]
        ) >= 3,
        "{metrics}"
    );
    assert_eq!(metric_sum(&metrics, "datalab_guard_audited_total", &[]), 0);

    // Audit lines: one per counted drop (the rate limit is high in this test).
    let total_blocked = metric_sum(&metrics, "datalab_guard_blocked_total", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let events = loop {
        let events: Vec<_> = sb
            .agent()
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "egress_blocked")
            .collect();
        if events.len() as u64 >= total_blocked || std::time::Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        events.len() as u64,
        total_blocked,
        "audit lines vs counters"
    );
    let connect = events
        .iter()
        .find(|e| e["hook"] == "connect" && e["dst"] == IMDS4)
        .expect("a connect record");
    for field in [
        "timestamp",
        "level",
        "action",
        "family",
        "proto",
        "dport",
        "pid",
        "comm",
        "uid",
        "cgroup_id",
    ] {
        assert!(
            !connect[field].is_null(),
            "audit record lacks {field}: {connect}"
        );
    }
    assert_eq!(connect["dport"], 80);
    assert_eq!(connect["comm"], "dg-probe");
    assert!(
        connect["cgroup"]
            .as_str()
            .unwrap_or("")
            .ends_with("/tenant"),
        "{connect}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["hook"] == "egress" && e["proto"] == "icmp"),
        "no egress icmp record"
    );
}

#[test]
fn audit_mode_lets_through_but_reports() {
    if !require_root() {
        return;
    }
    let mut sb = Sandbox::new();
    sb.start(&["--mode", "audit"]);
    let r = sb.probe(&sb.guarded, "http", IMDS4);
    assert!(r.ok, "audit mode must not block: {}", r.raw);
    let metrics = sb.agent().metrics(sb.metrics).unwrap();
    assert!(
        metric_sum(
            &metrics,
            "datalab_guard_audited_total",
            &[("hook", "connect")]
        ) >= 1,
        "{metrics}"
    );
    assert_eq!(metric_sum(&metrics, "datalab_guard_blocked_total", &[]), 0);
    sb.agent()
        .wait_for_stdout(Duration::from_secs(5), |l| l.contains("egress_audited"))
        .expect("audit line");
}

/// Runs attempts from the guarded cgroup in a background thread until stopped; returns how
/// many got through.
fn attempt_loop(sb: &Sandbox, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let guarded = sb.guarded.clone();
    let tenant_ns = sb.lab.tenant_ns().to_owned();
    let leaked = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            for kind in ["tcp", "udp-sendto"] {
                let r = datalab_guard_tests::probe_in(
                    &guarded,
                    Some(&tenant_ns),
                    kind,
                    IMDS4,
                    80,
                    Some(300),
                )
                .expect("probe");
                if r.ok {
                    leaked.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        leaked.load(Ordering::SeqCst)
    })
}

#[test]
fn enforcement_survives_kill9_restart_upgrade_and_ends_with_uninstall() {
    if !require_root() {
        return;
    }
    let mut sb = Sandbox::new();
    sb.start(&[]);
    let before = sb.lab.imds_packets();
    let stop = Arc::new(AtomicBool::new(false));
    let looper = attempt_loop(&sb, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // kill -9 mid-loop: the pinned links keep enforcing.
    sb.agent.as_mut().unwrap().kill9().expect("kill -9");
    sb.agent = None;
    std::thread::sleep(Duration::from_millis(500));
    let status = sb.cli(&["status", "--output", "json"]);
    assert!(
        status.status.success(),
        "status after kill -9: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(report["enforcing"], true, "{report}");

    // Restart: adopts the pins.
    sb.start(&[]);
    wait_stderr(sb.agent(), "adopted existing pins");

    // Upgrade: make the pinned install look like another program version; the next start
    // must attach the new links before detaching the old ones.
    let old_ids = link_ids(&sb.pins());
    sb.agent.as_mut().unwrap().kill9().unwrap();
    sb.agent = None;
    pretend_other_program_version(&sb.pins());
    sb.start(&[]);
    wait_stderr(sb.agent(), "upgraded programs");
    let new_ids = link_ids(&sb.pins());
    assert_eq!(old_ids.len(), new_ids.len());
    assert!(
        old_ids.iter().all(|id| !new_ids.contains(id)),
        "links were not replaced: {old_ids:?} {new_ids:?}"
    );
    assert!(std::fs::read_dir(sb.pins().join("links"))
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with("-next")));

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let leaked = looper.join().expect("loop thread");
    assert_eq!(
        leaked, 0,
        "attempts got through during kill/restart/upgrade"
    );
    assert_eq!(
        sb.lab.imds_packets(),
        before,
        "packets leaked to the metadata host"
    );

    // SIGTERM leaves enforcement; uninstall ends it.
    sb.agent.as_mut().unwrap().sigterm().unwrap();
    let exit = sb
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5))
        .unwrap();
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    sb.agent = None;
    assert!(
        !sb.probe(&sb.guarded, "tcp", IMDS4).ok,
        "enforcement must survive SIGTERM"
    );
    let out = sb.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sb.pins().exists(), "pins left after uninstall");
    let r = sb.probe(&sb.guarded, "http", IMDS4);
    assert!(
        r.ok,
        "after uninstall the metadata host is reachable again: {}",
        r.raw
    );
    let status = sb.cli(&["status"]);
    assert!(
        !status.status.success(),
        "status with nothing installed should fail"
    );
}

/// Forces the next start to see another program version: the pinned install's recorded
/// object hash no longer matches the binary's, so the agent upgrades (new links, then the
/// old ones go). Call with no agent running.
fn pretend_other_program_version(pins: &std::path::Path) {
    let layout = datalab_guard::bpf::PinLayout::new(pins);
    let mut maps = datalab_guard::bpf::GuardMaps::from_pins(&layout).unwrap();
    let mut meta = maps.meta().unwrap();
    meta.object_hash ^= 0x5a5a;
    maps.write_meta(&meta).unwrap();
}

/// A child process killed if the test fails before it ends it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The upgrade leaves no gap, seen by a sender that never stops: one process in the guarded
/// cgroup sends about 20,000 UDP datagrams a second to the metadata address from before the
/// old agent dies until after the upgraded one runs. Every sendto is refused (EPERM), none
/// leaves, none arrives at the metadata host, and the kernel counted every refusal (those
/// in the overlap of old and new programs twice); after the upgrade, exactly once. With the old links detached before the new ones are attached, the
/// programs' load and attach take milliseconds and dozens of datagrams get through.
#[test]
fn a_continuous_sender_gets_nothing_through_an_upgrade() {
    if !require_root() {
        return;
    }
    let mut sb = Sandbox::new();
    sb.start(&[]);
    let sendmsg_v4 = [("family", "ipv4"), ("hook", "sendmsg")];
    let counted_before = metric_sum(
        &sb.agent().metrics(sb.metrics).expect("metrics"),
        "datalab_guard_blocked_total",
        &sendmsg_v4,
    );
    let arrived_before = sb.lab.imds_packets();

    // stdin is a pipe: the sender streams until the test closes it (or 60 s pass).
    let probe = datalab_guard_tests::bins::probe_bin().expect("dg-probe");
    let argv = [
        probe.as_os_str(),
        "udp-stream".as_ref(),
        IMDS4.as_ref(),
        "53".as_ref(),
        "--timeout-ms".as_ref(),
        "60000".as_ref(),
    ];
    let mut sender = KillOnDrop(Some(
        datalab_guard_tests::command_in(Some(&sb.guarded), Some(sb.lab.tenant_ns()), &argv)
            .expect("sender command")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sender"),
    ));
    // The sender runs: its refusals show in the kernel's counters.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric_sum(
        &sb.agent().metrics(sb.metrics).expect("metrics"),
        "datalab_guard_blocked_total",
        &sendmsg_v4,
    ) < counted_before + 1000
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sender was not refused 1000 times within 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    sb.agent.as_mut().unwrap().kill9().expect("kill -9");
    sb.agent = None;
    pretend_other_program_version(&sb.pins());
    sb.start(&[]);
    wait_stderr(sb.agent(), "upgraded programs");
    std::thread::sleep(Duration::from_millis(300));

    let mut child = sender.0.take().expect("sender running");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("sender output");
    let line = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("sender printed {line:?} ({e}); stderr {:?}", out.stderr));
    let count = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    let arrived = sb.lab.imds_packets() - arrived_before;
    let counted = metric_sum(
        &sb.agent().metrics(sb.metrics).expect("metrics"),
        "datalab_guard_blocked_total",
        &sendmsg_v4,
    ) - counted_before;
    println!(
        "udp-stream through the upgrade: sent {}, refused {}, failed {}, in {} ms; \
         arrived at the metadata host {arrived}; counted {counted}",
        count("sent"),
        count("refused"),
        count("failed"),
        report["elapsed_ms"]
    );
    assert_eq!(arrived, 0, "datagrams reached the metadata host: {report}");
    assert_eq!(count("sent"), 0, "datagrams left the socket: {report}");
    assert_eq!(
        count("failed"),
        0,
        "sendto failed otherwise than EPERM: {report}"
    );
    let per_second = count("refused") as f64 / (report["elapsed_ms"].as_f64().unwrap() / 1e3);
    assert!(
        per_second > 2000.0,
        "the sender managed only {per_second:.0}/s: {report}"
    );
    // While both program versions are attached each refusal runs both sendmsg hooks, and
    // both count it: every refusal is counted, some twice (the overlap), none more.
    assert!(
        counted >= count("refused") && counted <= 2 * count("refused"),
        "the kernel counted {counted} sendmsg refusals, the sender saw {}",
        count("refused")
    );

    // Once upgraded, one program per hook: a second stream is counted exactly.
    let counted_before = metric_sum(
        &sb.agent().metrics(sb.metrics).expect("metrics"),
        "datalab_guard_blocked_total",
        &sendmsg_v4,
    );
    let after = datalab_guard_tests::probe_in(
        &sb.guarded,
        Some(sb.lab.tenant_ns()),
        "udp-stream",
        IMDS4,
        53,
        Some(300),
    )
    .expect("second stream");
    let refused: u64 = serde_json::from_str::<serde_json::Value>(&after.raw).unwrap()["refused"]
        .as_u64()
        .unwrap();
    assert!(!after.ok && refused > 0, "{}", after.raw);
    let counted = metric_sum(
        &sb.agent().metrics(sb.metrics).expect("metrics"),
        "datalab_guard_blocked_total",
        &sendmsg_v4,
    ) - counted_before;
    assert_eq!(counted, refused, "after the upgrade: {}", after.raw);
    assert_eq!(sb.lab.imds_packets() - arrived_before, 0);
}

fn wait_stderr(agent: &Agent, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if agent.stderr_lines().iter().any(|l| l.contains(needle)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("agent never logged {needle:?}: {:?}", agent.stderr_lines());
}

fn link_ids(pins: &std::path::Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(pins.join("links")).unwrap() {
        let link = aya::programs::links::PinnedLink::from_pin(entry.unwrap().path()).unwrap();
        let fd: aya::programs::links::FdLink = link.into();
        ids.push(fd.info().unwrap().id());
    }
    ids.sort();
    ids
}

/// Bad input: one clear line on stderr, exit code 2, and nothing pinned.
#[test]
fn bad_input_exits_2_with_one_line_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let cgroup = TestCgroup::new().unwrap();
    let inside = cgroup.child("a").unwrap();
    let other = TestCgroup::new().unwrap();
    let bpffs = BpffsDir::new().unwrap();
    let pins = bpffs.path().join("guard").display().to_string();
    let root = cgroup.path().display().to_string();
    let inside = inside.display().to_string();
    let outside = other.path().display().to_string();
    let missing = format!("{root}/does-not-exist");
    let port = free_loopback_addr().unwrap().to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "unknown flag",
            vec!["local", "--cgroup", &root, "--frobnicate"],
        ),
        (
            "bad v4 CIDR",
            vec!["local", "--cgroup", &root, "--block", "169.254.169.254/33"],
        ),
        (
            "bad v4 address",
            vec!["local", "--cgroup", &root, "--block", "169.254.169/32"],
        ),
        (
            "bad v6 CIDR",
            vec!["local", "--cgroup", &root, "--block", "fd00::ec2::254/128"],
        ),
        (
            "bad v6 prefix",
            vec!["local", "--cgroup", &root, "--block", "fd00:ec2::254/129"],
        ),
        ("missing cgroup", vec!["local", "--cgroup", &missing]),
        ("not cgroup2", vec!["local", "--cgroup", "/tmp"]),
        (
            "exempt outside",
            vec!["local", "--cgroup", &root, "--exempt", &outside],
        ),
        (
            "exempt missing",
            vec!["local", "--cgroup", &root, "--exempt", &missing],
        ),
        (
            "bad mode",
            vec![
                "local", "--cgroup", &root, "--exempt", &inside, "--mode", "block",
            ],
        ),
        (
            "bad preset",
            vec!["local", "--cgroup", &root, "--preset", "mars"],
        ),
        (
            "bad metrics addr",
            vec!["local", "--cgroup", &root, "--metrics-addr", "localhost"],
        ),
    ];
    for (name, mut args) in cases {
        args.extend(["--bpffs", pins.as_str()]);
        if !args.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", port.as_str()]);
        }
        let out = Agent::run(&args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: exit {:?}, stderr: {stderr}",
            out.status
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "{name}: no error message");
        let first = lines[0].to_lowercase();
        assert!(
            first.contains("error"),
            "{name}: first line should say error: {stderr}"
        );
        assert!(
            !std::path::Path::new(&pins).exists(),
            "{name}: pins left behind"
        );
    }
    // A port already in use is bad input too, and leaves nothing pinned.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let out = Agent::run(&[
        "local",
        "--cgroup",
        root.as_str(),
        "--bpffs",
        pins.as_str(),
        "--metrics-addr",
        taken_addr.as_str(),
    ])
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!std::path::Path::new(&pins).exists());
}

//! Raw and packet sockets from guarded cgroups (`--deny-raw-sockets`). Needs root.
//!
//! SOCK_RAW IPv4/IPv6 sockets are refused by `cgroup/sock_create`, tested here by attaching
//! that program to a test cgroup. AF_PACKET and AF_XDP sockets never reach that hook (the
//! kernel runs it from inet_create only), so they are refused by a BPF LSM program; a kernel
//! that will not load BPF LSM programs must make the agent refuse to start (fail closed),
//! never start without the protection the operator asked for.
//!
//! Each test with a BPF LSM branch prints which branch it ran (`lsm_branch_ran`,
//! `fail_closed_branch_only`). This machine's kernel refuses BPF LSM programs, so here only
//! the fail-closed branches run; `cargo xtask test` fails unless the LSM branches ran
//! somewhere, which its VM step (`cargo xtask vm`, Debian 12's 6.1 kernel) provides.

use std::{collections::BTreeMap, time::Duration};

use datalab_guard::bpf::testrun::TestRunner;
use datalab_guard_common::{maps::programs, Action, Family, Hook, Mode, Verdict, VerdictEntry};
use datalab_guard_tests::{free_loopback_addr, require_root, Agent, BpffsDir, Lab, TestCgroup};

#[test]
fn sock_create_refuses_raw_inet_sockets_to_guarded_cgroups_only() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.start_fake_imds().unwrap();
    let root = TestCgroup::new().unwrap();
    let guarded = root.child("tenant").unwrap();
    let exempt = root.child("exempt").unwrap();
    let bpffs = BpffsDir::new().unwrap();
    let mut runner = TestRunner::new(&bpffs.path().join("r")).unwrap();
    let exempt_id = datalab_guard_tests::cgroup_id(&exempt).unwrap();
    let policy = BTreeMap::from([(
        exempt_id,
        VerdictEntry {
            verdict: Verdict::Exempt as u32,
            class: 0,
        },
    )]);
    runner
        .configure(&[], Mode::Enforce, Verdict::Guard, &policy)
        .unwrap();

    // Off in the config: the attached program allows everything.
    let link = runner.attach(programs::SOCK_CREATE, root.path()).unwrap();
    assert!(
        lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80)
            .unwrap()
            .ok
    );

    runner.set_deny_raw_sockets(true).unwrap();
    let r = lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80).unwrap();
    assert!(
        !r.ok && r.is_eperm(),
        "guarded raw socket should be refused: {}",
        r.raw
    );
    let r = lab.probe(&exempt, "raw-hdrincl", "192.0.2.1", 80).unwrap();
    assert!(r.ok, "exempt raw socket should work: {}", r.raw);
    // Ordinary sockets are untouched.
    assert!(lab.probe(&guarded, "http", "192.0.2.1", 80).unwrap().ok);
    let counters = runner.counters().unwrap();
    let refused: u64 = counters
        .iter()
        .filter(|c| {
            c.action == Action::Blocked && c.hook == Hook::SockCreate && c.family == Family::Ipv4
        })
        .map(|c| c.value)
        .sum();
    assert_eq!(refused, 1, "{counters:?}");
    drop(link);
    assert!(
        lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80)
            .unwrap()
            .ok,
        "detached on drop"
    );
}

/// With `--deny-raw-sockets` the agent either refuses every socket that bypasses the IP
/// stack to guarded processes (BPF LSM available: AF_PACKET raw and dgram, AF_XDP, and
/// SOCK_RAW through `sock_create`), counted and audited, while exempt cgroups and cgroups
/// outside the guarded tree keep them; or it does not start at all and leaves nothing
/// attached or pinned.
#[test]
fn deny_raw_sockets_refuses_af_packet_or_fails_closed() {
    const TEST: &str = "deny_raw_sockets_refuses_af_packet_or_fails_closed";
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.start_fake_imds().unwrap();
    let root = TestCgroup::new().unwrap();
    let guarded = root.child("tenant").unwrap();
    let exempt = root.child("exempt").unwrap();
    let bpffs = BpffsDir::new().unwrap();
    let pins = bpffs.path().join("guard");
    let metrics = free_loopback_addr().unwrap();
    let args = [
        "local".to_owned(),
        "--cgroup".into(),
        root.path().display().to_string(),
        "--exempt".into(),
        exempt.display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
        "--deny-raw-sockets".into(),
    ];
    let mut agent = Agent::spawn(&args).unwrap();
    match agent.wait_ready(metrics, Duration::from_secs(20)) {
        Ok(()) => {
            eprintln!("BPF LSM available: exercising the raw and packet socket refusals");
            let outside = TestCgroup::new().unwrap();
            // (probe kind, family label, sock_type label) of every refused socket.
            let refused = [
                ("packet-socket", "packet", "raw"),
                ("packet-dgram-socket", "packet", "dgram"),
                ("xdp-socket", "xdp", "raw"),
                ("raw-hdrincl", "ipv4", "raw"),
            ];
            for (kind, ..) in refused {
                let r = lab.probe(&guarded, kind, "192.0.2.1", 80).unwrap();
                assert!(
                    !r.ok && r.is_eperm(),
                    "{kind} from the guarded cgroup must fail with EPERM: {}",
                    r.raw
                );
                for (name, cgroup) in [("exempt", exempt.as_path()), ("outside", outside.path())] {
                    let r = lab.probe(cgroup, kind, "192.0.2.1", 80).unwrap();
                    assert!(r.ok, "{kind} from the {name} cgroup must work: {}", r.raw);
                }
            }
            // Ordinary sockets are untouched.
            assert!(lab.probe(&guarded, "http", "192.0.2.1", 80).unwrap().ok);

            // Counted exactly, per family, under the sock_create hook.
            let text = agent.metrics(metrics).unwrap();
            for (family, want) in [("packet", 2), ("xdp", 1), ("ipv4", 1)] {
                assert_eq!(
                    blocked(&text, family, "sock_create"),
                    want,
                    "blocked_total{{family={family}}}:\n{text}"
                );
            }
            // One audit line per refusal, naming what was refused and who asked.
            let lines = wait_for_audit(&agent, refused.len());
            let mut seen: Vec<(String, String)> = lines
                .iter()
                .map(|e| {
                    assert_eq!(e["event"], "egress_blocked", "{e}");
                    assert_eq!(e["hook"], "sock_create", "{e}");
                    assert_eq!(e["reason"], "raw_socket", "{e}");
                    assert_eq!(e["comm"], "dg-probe", "{e}");
                    assert!(e.get("dst").is_none(), "{e}");
                    let cgroup = e["cgroup"].as_str().unwrap_or_default();
                    assert!(cgroup.ends_with("/tenant"), "{e}");
                    (
                        e["family"].as_str().unwrap().to_owned(),
                        e["sock_type"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            seen.sort();
            let mut want: Vec<(String, String)> = refused
                .iter()
                .map(|(_, f, t)| (f.to_string(), t.to_string()))
                .collect();
            want.sort();
            assert_eq!(seen, want);
            lsm_branch_ran(TEST);
        }
        Err(_) => {
            eprintln!("BPF LSM programs refused by this kernel: exercising the fail-closed path");
            let status = agent.wait_exit(Duration::from_secs(5)).unwrap();
            assert!(!status.success());
            let stderr = agent.stderr_lines().join("\n");
            assert!(
                stderr.contains("BPF LSM"),
                "the error must name the missing BPF LSM: {stderr}"
            );
            assert!(!pins.exists(), "a failed start must leave nothing pinned");
            // Nothing attached either: the metadata host is still reachable from the tenant.
            assert!(
                lab.probe(&guarded, "http", "169.254.169.254", 80)
                    .unwrap()
                    .ok
            );
            fail_closed_branch_only(TEST);
        }
    }
}

/// `datalab_guard_blocked_total` for one family and hook, summed over namespaces.
fn blocked(text: &str, family: &str, hook: &str) -> u64 {
    let labels = [format!("family=\"{family}\""), format!("hook=\"{hook}\"")];
    text.lines()
        .filter(|l| l.starts_with("datalab_guard_blocked_total{"))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Waits (bounded) until the agent printed `n` raw-socket audit lines, and returns them;
/// more than `n` fails too (each refusal is reported once).
fn wait_for_audit(agent: &Agent, n: usize) -> Vec<serde_json::Value> {
    let raw_socket = |agent: &Agent| -> Vec<serde_json::Value> {
        agent
            .audit_events()
            .into_iter()
            .filter(|e| e["reason"] == "raw_socket")
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while raw_socket(agent).len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = raw_socket(agent);
    assert_eq!(lines.len(), n, "raw-socket audit lines: {lines:#?}");
    lines
}

/// The marker `cargo xtask test` requires, from the host run or the VM step, for each BPF
/// LSM test (xtask/src/vm_markers.rs): printed only once the LSM branch has passed.
fn lsm_branch_ran(test: &str) {
    eprintln!("BPF LSM branch ran: {test}");
}

/// The marker of a run where the kernel refused the BPF LSM and only the fail-closed branch
/// ran: `cargo xtask test` then fails unless the LSM branch ran elsewhere (the VM step).
fn fail_closed_branch_only(test: &str) {
    eprintln!("BPF LSM refused, fail-closed branch only: {test}");
}

/// The reload path's attach: socket programs attached to a running install later, pinned
/// (so `status` and the next agent see them), and all or none: with the BPF LSM refused,
/// asking for both leaves neither attached.
#[test]
fn socket_programs_attach_to_a_running_install_all_or_none() {
    const TEST: &str = "socket_programs_attach_to_a_running_install_all_or_none";
    use datalab_guard::bpf::{
        install::{attach_pinned, detach_pinned_links, SOCKET_PROGRAMS},
        GuardMaps, PinLayout,
    };
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.start_fake_imds().unwrap();
    let root = TestCgroup::new().unwrap();
    let guarded = root.child("tenant").unwrap();
    let bpffs = BpffsDir::new().unwrap();
    let pins = bpffs.path().join("guard");
    let metrics = free_loopback_addr().unwrap();
    let args = [
        "local".to_owned(),
        "--cgroup".into(),
        root.path().display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
    ];
    let mut agent = Agent::spawn(&args).unwrap();
    agent.wait_ready(metrics, Duration::from_secs(20)).unwrap();
    let layout = PinLayout::new(&pins);
    let root_dir = datalab_guard::cgroups::validate_cgroup_dir(root.path()).unwrap();
    let raw_ok = || {
        lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80)
            .unwrap()
            .ok
    };

    let mut maps = GuardMaps::from_pins(&layout).unwrap();
    let mut config = maps.config().unwrap();
    config.deny_raw_sockets = 1;
    maps.config_set(config).unwrap();
    assert!(raw_ok(), "no sock_create attached: raw sockets still work");

    // Both programs: where the kernel refuses the LSM one, nothing stays attached.
    let lsm_ran = match attach_pinned(&layout, &root_dir, &SOCKET_PROGRAMS) {
        Ok(()) => {
            eprintln!("BPF LSM available: both socket programs attached");
            assert!(SOCKET_PROGRAMS.iter().all(|p| layout.link(p).exists()));
            // Both enforce, straight from the pins: AF_PACKET through the LSM program.
            let r = lab
                .probe(&guarded, "packet-socket", "192.0.2.1", 80)
                .unwrap();
            assert!(!r.ok && r.is_eperm(), "AF_PACKET refused: {}", r.raw);
            assert!(!raw_ok(), "raw socket refused");
            detach_pinned_links(&layout, &SOCKET_PROGRAMS).unwrap();
            assert!(SOCKET_PROGRAMS.iter().all(|p| !layout.link(p).exists()));
            let r = lab
                .probe(&guarded, "packet-socket", "192.0.2.1", 80)
                .unwrap();
            assert!(r.ok, "detached: AF_PACKET works again: {}", r.raw);
            true
        }
        Err(e) => {
            eprintln!("BPF LSM refused ({e:#}): checking nothing is half-attached");
            assert!(
                SOCKET_PROGRAMS.iter().all(|p| !layout.link(p).exists()),
                "no link pinned after a failed attach"
            );
            false
        }
    };
    assert!(raw_ok(), "nothing attached: raw sockets work");

    // sock_create alone attaches here: pinned, enforcing, and gone again when detached.
    attach_pinned(&layout, &root_dir, &[programs::SOCK_CREATE]).unwrap();
    assert!(layout.link(programs::SOCK_CREATE).exists());
    let r = lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80).unwrap();
    assert!(!r.ok && r.is_eperm(), "raw socket refused: {}", r.raw);
    // Attaching again is a no-op (already pinned), not a second link.
    attach_pinned(&layout, &root_dir, &[programs::SOCK_CREATE]).unwrap();
    detach_pinned_links(&layout, &[programs::SOCK_CREATE]).unwrap();
    assert!(!layout.link(programs::SOCK_CREATE).exists());
    assert!(raw_ok(), "detached: raw sockets work again");

    agent.sigterm().unwrap();
    agent.wait_exit(Duration::from_secs(10)).unwrap();
    let out = Agent::run(&["uninstall", "--bpffs", &pins.display().to_string()]).unwrap();
    assert!(out.status.success());
    if lsm_ran {
        lsm_branch_ran(TEST);
    } else {
        fail_closed_branch_only(TEST);
    }
}

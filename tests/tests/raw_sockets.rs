//! Raw and packet sockets from guarded cgroups (`--deny-raw-sockets`). Needs root.
//!
//! SOCK_RAW IPv4/IPv6 sockets are refused by `cgroup/sock_create`, tested here by attaching
//! that program to a test cgroup. AF_PACKET sockets never reach that hook (the kernel runs it
//! from inet_create only), so they are refused by a BPF LSM program; a kernel that will not
//! load BPF LSM programs must make the agent refuse to start (fail closed), never start
//! without the protection the operator asked for.

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

/// With `--deny-raw-sockets` the agent either refuses AF_PACKET to guarded processes (BPF LSM
/// available) or does not start at all and leaves nothing attached or pinned.
#[test]
fn deny_raw_sockets_refuses_af_packet_or_fails_closed() {
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
            eprintln!("BPF LSM available: exercising AF_PACKET refusal");
            let r = lab
                .probe(&guarded, "packet-socket", "169.254.169.254", 80)
                .unwrap();
            assert!(
                !r.ok && r.is_eperm(),
                "AF_PACKET should be refused: {}",
                r.raw
            );
            assert!(
                lab.probe(&exempt, "packet-socket", "169.254.169.254", 80)
                    .unwrap()
                    .ok
            );
            let r = lab.probe(&guarded, "raw-hdrincl", "192.0.2.1", 80).unwrap();
            assert!(
                !r.ok && r.is_eperm(),
                "raw socket should be refused: {}",
                r.raw
            );
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
        }
    }
}

/// The reload path's attach: socket programs attached to a running install later, pinned
/// (so `status` and the next agent see them), and all or none: with the BPF LSM refused,
/// asking for both leaves neither attached.
#[test]
fn socket_programs_attach_to_a_running_install_all_or_none() {
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

    // Both programs: where the kernel refuses the LSM one, nothing stays attached.
    match attach_pinned(&layout, &root_dir, &SOCKET_PROGRAMS) {
        Ok(()) => {
            eprintln!("BPF LSM available: both socket programs attached");
            assert!(SOCKET_PROGRAMS.iter().all(|p| layout.link(p).exists()));
            detach_pinned_links(&layout, &SOCKET_PROGRAMS).unwrap();
        }
        Err(e) => {
            eprintln!("BPF LSM refused ({e:#}): checking nothing is half-attached");
            assert!(
                SOCKET_PROGRAMS.iter().all(|p| !layout.link(p).exists()),
                "no link pinned after a failed attach"
            );
        }
    }
    let mut maps = GuardMaps::from_pins(&layout).unwrap();
    let mut config = maps.config().unwrap();
    config.deny_raw_sockets = 1;
    maps.config_set(config).unwrap();
    assert!(raw_ok(), "no sock_create attached: raw sockets still work");

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
}

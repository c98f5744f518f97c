//! Privileged tests of the sandbox kit itself, without datalab-guard: if these fail, the
//! end-to-end tests built on the kit cannot be trusted either way.

use std::{path::Path, time::Duration};

use datalab_guard_tests::{
    cgroup_id, cleanup_stale, lab, process, require_root, spawn_in, BpffsDir, Lab, TestCgroup,
};

fn netns_list() -> String {
    let out = std::process::Command::new(process::tool("ip".as_ref()))
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lab_with_server() -> Lab {
    let mut lab = Lab::new().expect("lab comes up");
    lab.start_fake_imds().expect("fake metadata server starts");
    lab
}

#[test]
fn http_v4_to_metadata_reaches_fake_server_and_is_counted() {
    if !require_root() {
        return;
    }
    let lab = lab_with_server();
    let cg = TestCgroup::new().unwrap();
    let before = lab.imds_packets();
    let r = lab.probe(cg.path(), "http", lab::IMDS_V4, 80).unwrap();
    assert!(r.ok, "{}; server log: {:?}", r.raw, lab.fake_imds_log());
    let after = lab.counters().unwrap();
    assert!(
        after.imds() > before,
        "IMDS counter did not move: {before} -> {after:?}"
    );
    assert!(after.imds_v4 >= 3, "SYN, ACK, request at least: {after:?}");
    assert_eq!(after.imds_v6, 0);
    assert!(
        lab.fake_imds_log()
            .iter()
            .any(|l| l.contains("GET /latest/meta-data/")),
        "{:?}",
        lab.fake_imds_log()
    );
}

#[test]
fn tcp_and_http_v6_to_metadata() {
    if !require_root() {
        return;
    }
    let lab = lab_with_server();
    let cg = TestCgroup::new().unwrap();
    let r = lab.probe(cg.path(), "tcp", lab::IMDS_V6, 80).unwrap();
    assert!(r.ok, "{}", r.raw);
    let r = lab.probe(cg.path(), "http", lab::IMDS_V6, 80).unwrap();
    assert!(r.ok, "{}", r.raw);
    assert!(lab.packets_to(lab::IMDS_V6.into()) > 0);
}

#[test]
fn every_probe_kind_works_towards_the_fake_host() {
    if !require_root() {
        return;
    }
    let lab = lab_with_server();
    let cg = TestCgroup::new().unwrap();
    let v4 = lab::IMDS_V4.to_string();
    let v6 = lab::IMDS_V6.to_string();
    let other4 = lab::OTHER_V4.to_string();
    let other6 = lab::OTHER_V6.to_string();
    let cases: &[(&str, &str)] = &[
        ("tcp", &v4),
        ("tcp", &other4),
        ("tcp", &other6),
        ("tcp-v4mapped", &v4),
        ("tcp-fastopen", &v4),
        ("tcp-fastopen", &v6),
        ("http", &other4),
        ("http", &other6),
        ("udp-connected", &v4),
        ("udp-connected", &v6),
        ("udp-connected", &other6),
        ("udp-sendto", &v4),
        ("udp-sendto", &v6),
        ("udp-v4mapped-sendto", &v4),
        ("icmp", &v4),
        ("icmp", &other4),
        ("icmp6", &v6),
        ("icmp6", &other6),
        ("raw-hdrincl", &v4),
        ("packet-socket", &v4),
    ];
    let mut failures = Vec::new();
    for (kind, addr) in cases {
        let before = lab.counters().unwrap();
        let r = lab.probe(cg.path(), kind, addr, 80).unwrap();
        let after = lab.counters().unwrap();
        let ip: std::net::IpAddr = addr.parse().unwrap();
        let arrived = after.to(ip).unwrap() - before.to(ip).unwrap();
        if !r.ok {
            failures.push(format!("{kind} {addr}: {}", r.raw));
        } else if *kind != "packet-socket" && arrived == 0 {
            failures.push(format!(
                "{kind} {addr}: ok but no packet counted at the metadata host"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\nserver log: {:#?}",
        lab.fake_imds_log()
    );
}

#[test]
fn unreachable_port_and_timeouts_are_reported_not_hidden() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap(); // no server: port 80 is closed
    let cg = TestCgroup::new().unwrap();
    let r = lab.probe(cg.path(), "tcp", lab::IMDS_V4, 80).unwrap();
    assert!(!r.ok && r.errno == Some(libc::ECONNREFUSED), "{}", r.raw);
    // Nothing answers in the tenant's own subnet at .99: ARP fails, the connect times out.
    let r = lab
        .probe_timeout(cg.path(), "tcp", "192.0.2.99", 80, 300)
        .unwrap();
    assert!(
        !r.ok && (r.is_timeout() || r.errno == Some(libc::EHOSTUNREACH)),
        "{}",
        r.raw
    );
    assert!(r.elapsed_ms < 5000.0, "{}", r.raw);
}

#[test]
fn process_spawned_into_a_cgroup_is_listed_and_killed_on_drop() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let child_dir = cg.child("tenant/inner").unwrap();
    assert_eq!(cg_id_of(&child_dir), cgroup_id(&child_dir).unwrap());
    assert_ne!(cg.id(), cgroup_id(&child_dir).unwrap());
    let mut child = spawn_in(&child_dir, None, &["sleep", "600"]).unwrap();
    let pid = child.id();
    let procs = process_cgroup(pid);
    let listed = std::fs::read_to_string(child_dir.join("cgroup.procs")).unwrap();
    assert!(
        listed.lines().any(|l| l.trim() == pid.to_string()),
        "{pid} not in {listed:?}"
    );
    assert!(
        procs.ends_with(&format!(
            "{}/tenant/inner",
            cg.path().file_name().unwrap().to_string_lossy()
        )),
        "{procs}"
    );
    let (top, sub) = (cg.path().to_path_buf(), child_dir);
    drop(cg);
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "sleep was killed, not finished: {status}"
    );
    assert!(!sub.exists() && !top.exists(), "cgroup dirs left behind");
}

#[test]
fn spawned_process_is_in_cgroup_and_netns_before_exec() {
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let cg = TestCgroup::new().unwrap();
    // The program reports its own cgroup and addresses: it was placed before it started.
    let out = process::run_in(
        cg.path(),
        Some(lab.tenant_ns()),
        &["cat", "/proc/self/cgroup"],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let name = cg
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&name)),
        "{text}"
    );
    let out = lab
        .run_in_tenant(cg.path(), &["ip", "-o", "addr", "show"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("192.0.2.2/24") && text.contains("2001:db8::2/64"),
        "{text}"
    );
    assert!(!text.contains("tentative"), "{text}");
    let out = lab.run_in_imds(&["ip", "-o", "addr", "show"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for a in [
        "169.254.169.254/16",
        "192.0.2.1/24",
        "fd00:ec2::254/64",
        "2001:db8::1/64",
    ] {
        assert!(text.contains(a), "{a} missing: {text}");
    }
}

#[test]
fn everything_is_gone_after_drop() {
    if !require_root() {
        return;
    }
    let (tenant, imds, cg_path, bpf_path, mut sleeper);
    {
        let lab = lab_with_server();
        let cg = TestCgroup::new().unwrap();
        let bpffs = BpffsDir::new().unwrap();
        std::fs::create_dir(bpffs.path().join("nested")).unwrap();
        assert_eq!(bpffs.entries().unwrap().len(), 1);
        // A long-running process in the tenant namespace and cgroup must not keep anything alive.
        sleeper = spawn_in(cg.path(), Some(lab.tenant_ns()), &["sleep", "600"]).unwrap();
        tenant = lab.tenant_ns().to_string();
        imds = lab.imds_ns().to_string();
        cg_path = cg.path().to_path_buf();
        bpf_path = bpffs.path().to_path_buf();
        let listed = netns_list();
        assert!(
            listed.contains(&tenant) && listed.contains(&imds),
            "{listed}"
        );
    }
    let listed = netns_list();
    assert!(
        !listed.contains(&tenant) && !listed.contains(&imds),
        "namespaces left: {listed}"
    );
    assert!(
        !sleeper.wait().unwrap().success(),
        "the cgroup's process was killed"
    );
    assert!(!cg_path.exists(), "{} left behind", cg_path.display());
    assert!(!bpf_path.exists(), "{} left behind", bpf_path.display());
}

#[test]
fn cleanup_even_when_a_test_panics() {
    if !require_root() {
        return;
    }
    let names = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = names.clone();
    let result = std::thread::spawn(move || {
        let lab = Lab::new().unwrap();
        let cg = TestCgroup::new().unwrap();
        *seen.lock().unwrap() = Some((lab.tenant_ns().to_string(), cg.path().to_path_buf()));
        panic!("simulated test failure");
    })
    .join();
    assert!(result.is_err());
    let (tenant, cg_path) = names.lock().unwrap().clone().unwrap();
    assert!(!netns_list().contains(&tenant));
    assert!(!cg_path.exists());
    // And nothing stale of a dead owner survives the helper (ours are alive and kept).
    cleanup_stale(datalab_guard_tests::DEFAULT_PREFIX).unwrap();
}

#[test]
fn lab_counts_but_does_not_answer_packets_it_was_not_asked_about() {
    if !require_root() {
        return;
    }
    let lab = lab_with_server();
    let cg = TestCgroup::new().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let idle = lab.counters().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.counters().unwrap(),
        idle,
        "the lab must be silent on its own"
    );
    let r = lab
        .probe(cg.path(), "udp-sendto", lab::OTHER_V4, 80)
        .unwrap();
    assert!(r.ok, "{}", r.raw);
    let after = lab.counters().unwrap();
    assert_eq!(
        after.imds(),
        idle.imds(),
        "traffic to 192.0.2.1 must not count as IMDS"
    );
    assert!(after.other_v4 > idle.other_v4);
}

fn cg_id_of(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).unwrap().ino()
}

fn process_cgroup(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}
